//! [`load`]: from a path (GGUF file or HF directory) to a ready [`Loaded`] model with its
//! tokenizer and chat template, plus [`Generation`], the prefill-then-decode loop shared by the
//! CLI commands.

use std::path::Path;
use std::time::{Duration, Instant};

use flowgate_formats::model::{ModelFile, ModelSource};

use crate::backend::cpu::CpuBackend;
use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::models::{Logits, Model};
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;

/// Options for loading.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Reader threads for weight loading (0: the loader's default).
    pub io_threads: usize,
    /// Called with the weight bytes read so far (progress bars, logs).
    pub progress: Option<flowgate_io::Progress>,
}

/// A model ready to run on the CPU backend, with what is needed to talk to it.
pub struct Loaded {
    pub file: ModelFile,
    pub model: Model<CpuBackend>,
    pub tokenizer: Option<Tokenizer>,
    pub chat: Option<ChatTemplate>,
    pub load_time: Duration,
}

/// Opens and loads a model.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let t0 = Instant::now();
    let file = flowgate_formats::model::open(path)?;
    let (tokenizer, chat) = match &file.source {
        ModelSource::Gguf(g) => (
            Tokenizer::from_gguf(g).map_err(|e| EngineError::Invalid(format!("tokenizer: {e}")))?,
            ChatTemplate::from_gguf(g)
                .map_err(|e| EngineError::Invalid(format!("chat template: {e}")))?,
        ),
        ModelSource::HfDir(dir) => (
            if dir.join("tokenizer.json").exists() {
                Some(
                    Tokenizer::from_hf_dir(dir)
                        .map_err(|e| EngineError::Invalid(format!("tokenizer: {e}")))?,
                )
            } else {
                None
            },
            ChatTemplate::from_hf_dir(dir)
                .map_err(|e| EngineError::Invalid(format!("chat template: {e}")))?,
        ),
    };
    let threads = if opts.io_threads == 0 {
        flowgate_io::LoaderOptions::default().threads
    } else {
        opts.io_threads
    };
    let tensors = crate::weights::load_all(&file.catalog, threads, opts.progress.clone())?;
    let model = Model::new(file.spec.clone(), CpuBackend, tensors)?;
    Ok(Loaded {
        file,
        model,
        tokenizer,
        chat,
        load_time: t0.elapsed(),
    })
}

/// Timings of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        // The first generated token comes from the prefill's logits.
        self.generated.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` for each new id; stops at an
/// end-of-sequence id unless `stop_ids` is empty, or when `on_token` returns false.
pub fn generate(
    model: &Model<CpuBackend>,
    cache: &mut KvCache<CpuBackend>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenStats)> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyInput);
    }
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok((out, stats));
    }
    let t0 = Instant::now();
    let mut logits = model.forward(prompt, cache, Logits::Last)?;
    stats.prefill = t0.elapsed();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&logits, &history);
        out.push(next);
        history.push(next);
        stats.generated += 1;
        if stop_ids.contains(&next) || !on_token(next) || out.len() >= max_tokens {
            break;
        }
        logits = model.forward(&[next], cache, Logits::Last)?;
    }
    stats.decode = t1.elapsed();
    Ok((out, stats))
}
