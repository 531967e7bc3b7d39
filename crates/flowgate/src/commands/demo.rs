//! `flowgate demo`: writes a small synthetic model (random weights) and runs it end to end —
//! load, prefill, decode — printing the tokens and the speed. Nothing meaningful comes out:
//! the weights are random; the point is to show the whole path working on this machine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flowgate_engine::runtime::{self, LoadOptions};
use flowgate_engine::sampling::{Sampler, SamplerConfig};

use crate::synth::{self, Shape};

#[derive(ClapArgs)]
pub struct Args {
    /// Which synthetic shape to run.
    #[arg(long, value_enum, default_value = "tiny")]
    pub shape: Shape,
    /// Tokens to generate.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Where to keep the model file (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

pub fn main(a: Args) -> Result<()> {
    let threads = crate::common::init_threads(a.threads)?;
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("synthetic-{:?}.gguf", a.shape).to_lowercase());
    outln!("flowgate demo: the weights are RANDOM (a synthetic {:?} model), so the tokens below are meaningless.", a.shape);
    outln!("It shows the whole path working: GGUF writing and parsing, loading, Q4_K kernels, prefill, KV cache, decode.");
    let bytes = synth::write(a.shape, &path, 0x5EED, &[], false)?;
    outln!(
        "wrote {} ({:.1} MiB)",
        path.display(),
        bytes as f64 / (1u64 << 20) as f64
    );
    let loaded = runtime::load(&path, &LoadOptions::default()).context("loading the demo model")?;
    let s = &loaded.model.spec;
    outln!(
        "loaded in {:.2} s: {} with {} layers, hidden {}, vocab {}{}; backend {}, {threads} threads",
        loaded.load_time.as_secs_f64(),
        s.arch,
        s.n_layers,
        s.hidden,
        s.vocab_size,
        s.moe
            .as_ref()
            .map(|m| format!(", {} experts ({} used)", m.n_experts, m.n_experts_used))
            .unwrap_or_default(),
        loaded.model.backend_name()
    );
    let prompt: Vec<u32> = (0..16u32)
        .map(|i| (i * 37 + 11) % s.vocab_size as u32)
        .collect();
    let mut cache = loaded.model.new_cache(prompt.len() + a.max_tokens)?;
    // Seeded sampling (temperature 0.8, top-k 40, top-p 0.95): greedy decoding of random weights
    // tends to repeat one token.
    let mut sampler = Sampler::new(SamplerConfig::default());
    let (out, stats) = runtime::generate(
        &loaded.model,
        &mut cache,
        &prompt,
        a.max_tokens,
        &mut sampler,
        &[],
        |_| true,
    )?;
    outln!("prompt ids:    {prompt:?}");
    outln!("generated ids: {out:?}");
    outln!(
        "prefill {} tokens: {:.1} tok/s; decode {} tokens: {:.1} tok/s",
        stats.prompt_tokens,
        stats.prefill_tps(),
        stats.generated,
        stats.decode_tps()
    );
    Ok(())
}
