//! `flowgate generate`: token ids in, generated token ids out.

use anyhow::Result;
use clap::Args as ClapArgs;
use flowgate_engine::backend::Backend;
use flowgate_engine::runtime::{self, Loaded};
use flowgate_engine::sampling::Sampler;

use crate::common::{check_tokens, parse_tokens, ModelArgs, SampleArgs};

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated prompt token ids.
    #[arg(long)]
    pub tokens: String,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"tokens": [...]}` (the generated ids only).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sample: SampleArgs,
}

pub fn main(a: Args) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let sampler_cfg = a.sample.config()?;
    let loaded = a.model.load()?;
    flowgate_engine::with_loaded!(loaded, l => run(&a, &tokens, sampler_cfg, &l))
}

fn run<B: Backend>(
    a: &Args,
    tokens: &[u32],
    sampler_cfg: flowgate_engine::sampling::SamplerConfig,
    loaded: &Loaded<B>,
) -> Result<()> {
    let tokens = tokens.to_vec();
    let m = &loaded.model;
    check_tokens(&tokens, m.spec.vocab_size)?;
    let mut cache = m.new_cache(a.model.ctx.max(tokens.len() + a.max_tokens))?;
    let stop: Vec<u32> = if a.ignore_eos {
        Vec::new()
    } else {
        match &loaded.tokenizer {
            Some(t) => t.eos_ids().to_vec(),
            None => m.spec.eos_token_ids.clone(),
        }
    };
    let mut sampler = Sampler::new(sampler_cfg);
    let (out, stats) = runtime::generate(
        m,
        &mut cache,
        &tokens,
        a.max_tokens,
        &mut sampler,
        &stop,
        |_| true,
    )?;
    loaded.log_expert_stats(stats.prompt_tokens + stats.generated);
    if a.json {
        outln!("{}", serde_json::json!({ "tokens": out }));
    } else {
        outln!(
            "{}",
            out.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        eprintln!(
            "prompt {} tokens at {:.1} tok/s, generated {} at {:.1} tok/s",
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.generated,
            stats.decode_tps()
        );
    }
    Ok(())
}
