//! `flowgate logits`: the logits of every input position, as one JSON object.
//!
//! `--mode prefill` runs all tokens in one pass; `--mode decode` feeds them one at a time
//! through the KV cache. The two must agree; tests compare both with transformers.

use anyhow::Result;
use clap::{Args as ClapArgs, ValueEnum};
use flowgate_engine::backend::Backend;
use flowgate_engine::models::{Logits, Model};

use crate::common::{check_tokens, parse_tokens, ModelArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    Prefill,
    Decode,
}

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long)]
    pub tokens: String,
    #[arg(long, value_enum, default_value = "prefill")]
    pub mode: Mode,
}

pub fn main(a: Args) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let loaded = a.model.load()?;
    flowgate_engine::with_loaded!(loaded, l => run(&a, &tokens, &l.model))
}

fn run<B: Backend>(a: &Args, tokens: &[u32], m: &Model<B>) -> Result<()> {
    let tokens = tokens.to_vec();
    let vocab = m.spec.vocab_size;
    check_tokens(&tokens, vocab)?;
    let mut cache = m.new_cache(tokens.len())?;
    let flat = match a.mode {
        Mode::Prefill => m.forward(&tokens, &mut cache, Logits::All)?,
        Mode::Decode => {
            let mut all = Vec::with_capacity(tokens.len() * vocab);
            for &t in &tokens {
                all.extend(m.forward(&[t], &mut cache, Logits::All)?);
            }
            all
        }
    };
    let rows: Vec<&[f32]> = flat.chunks(vocab).collect();
    let out = serde_json::json!({ "logits": rows });
    outln!("{}", serde_json::to_string(&out)?);
    Ok(())
}
