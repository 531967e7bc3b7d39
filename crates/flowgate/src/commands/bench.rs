//! `flowgate bench …`: performance figures, each printed with what it is compared against.
//!
//! `bench decode` measures prefill and decode like llama-bench (`pp` = one prompt of N random
//! tokens in one pass, `tg` = N tokens decoded one by one, each the median of `--reps` runs after
//! a warm-up), and compares decode with the machine's own memory bandwidth measured in the same
//! run: bytes of weights read per token × tok/s, over a multi-threaded read of a 1 GiB buffer.
//! When the model has one of the synthetic shapes of ANCHORS.md, llama.cpp's recorded figure for
//! it is shown too (recorded, not measured in this run: say so wherever it is quoted).

use std::time::Instant;

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};
use flowgate_engine::models::Logits;
use flowgate_engine::sampling::argmax;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::common::ModelArgs;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill and decode throughput.
    Decode(DecodeArgs),
    /// Load every tensor into host memory; compare with O_DIRECT, mmap and read().
    Load(super::bench_load::LoadArgs),
}

#[derive(ClapArgs)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prefill figure (llama-bench pp).
    #[arg(long, default_value_t = 64)]
    pub prompt: usize,
    /// Tokens to decode (llama-bench tg).
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn main(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Load(a) => super::bench_load::load(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// GB/s of a parallel read of a 1 GiB buffer (the decode ceiling on this machine).
fn memory_read_gbps() -> f64 {
    let n = 1usize << 27; // u64s: 1 GiB
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / dt / 1e9);
    }
    best
}

/// llama.cpp figures from ANCHORS.md for the synthetic shapes on the 2-core CPU machine.
fn anchor(spec: &flowgate_formats::ModelSpec) -> Option<(&'static str, f64, f64)> {
    match (
        spec.n_layers,
        spec.hidden,
        spec.vocab_size,
        spec.moe.is_some(),
    ) {
        (16, 2048, 128256, false) => Some(("dense1b", 214.0, 52.0)),
        (16, 2048, 50304, true) => Some(("moe7b", 110.0, 51.6)),
        _ => None,
    }
}

/// Merged (`ffn_up_exps`) or per-expert (`ffn_up.7.weight`) expert weights.
fn is_expert_tensor(name: &str) -> bool {
    if name.contains("_exps.") {
        return true;
    }
    ["ffn_gate.", "ffn_up.", "ffn_down."].iter().any(|p| {
        name.split_once(p).is_some_and(|(_, rest)| {
            rest.split('.')
                .next()
                .is_some_and(|e| e.parse::<u32>().is_ok())
        })
    })
}

fn decode(a: DecodeArgs) -> Result<()> {
    let threads = crate::common::init_threads(a.model.threads)?;
    let loaded = a.model.load()?;
    let m = &loaded.model;
    let s = &m.spec;
    let reps = a.reps.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let prompt: Vec<u32> = (0..a.prompt.max(1))
        .map(|_| rng.random_range(0..s.vocab_size as u32))
        .collect();
    let mut cache = m.new_cache(prompt.len().max(a.gen + 1))?;
    // Warm-up: page in the weights, spin up the pool.
    m.forward(&prompt[..prompt.len().min(8)], &mut cache, Logits::Last)?;
    let mut pp = Vec::new();
    for _ in 0..reps {
        cache.clear();
        let t = Instant::now();
        m.forward(&prompt, &mut cache, Logits::Last)?;
        pp.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut tg = Vec::new();
    for _ in 0..reps {
        cache.clear();
        let mut tok = prompt[0];
        let t = Instant::now();
        for _ in 0..a.gen {
            let l = m.forward(&[tok], &mut cache, Logits::Last)?;
            tok = argmax(&l);
        }
        tg.push(a.gen as f64 / t.elapsed().as_secs_f64());
    }
    let (pp, tg) = (median(pp), median(tg));
    // Weight bytes one decode step reads: everything but the embedding table, and for MoE
    // only the chosen fraction of the experts.
    let cat = &loaded.file.catalog;
    let mut per_token = 0f64;
    for t in cat.iter() {
        if t.name == "token_embd.weight" && cat.get("output.weight").is_some() {
            continue;
        }
        let is_expert = is_expert_tensor(&t.name);
        let frac = match (&s.moe, is_expert) {
            (Some(mo), true) => mo.n_experts_used as f64 / mo.n_experts as f64,
            _ => 1.0,
        };
        per_token += t.nbytes as f64 * frac;
    }
    let achieved = per_token * tg / 1e9;
    let ceiling = memory_read_gbps();
    let anchor = anchor(s);
    if a.json {
        let mut j = serde_json::json!({
            "model": loaded.file.name, "threads": threads, "backend": m.backend_name(),
            "prompt_tokens": prompt.len(), "gen_tokens": a.gen, "reps": reps,
            "prefill_tps": pp, "decode_tps": tg,
            "weight_bytes_per_token": per_token, "decode_gbps": achieved,
            "memory_read_gbps": ceiling, "fraction_of_memory_bw": achieved / ceiling,
        });
        if let Some((name, app, atg)) = anchor {
            j["llamacpp_recorded"] = serde_json::json!({"shape": name, "prefill_tps": app, "decode_tps": atg,
                "source": "ANCHORS.md (llama.cpp CPU, 2 threads, pp64/tg32; recorded, not this run)"});
            j["decode_vs_llamacpp"] = serde_json::json!(tg / atg);
        }
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    outln!("model     {} ({})", loaded.file.name, s.arch);
    outln!("backend   {}, {threads} threads", m.backend_name());
    outln!();
    outln!("{:<28} {:>12}", "test", "tok/s");
    outln!("{:<28} {:>12.1}", format!("prefill pp{}", prompt.len()), pp);
    outln!("{:<28} {:>12.1}", format!("decode tg{}", a.gen), tg);
    outln!();
    outln!(
        "decode reads {:.1} MiB of weights per token: {:.2} GB/s, {:.0}% of this machine's memory read bandwidth ({:.2} GB/s, measured now)",
        per_token / (1u64 << 20) as f64,
        achieved,
        100.0 * achieved / ceiling,
        ceiling
    );
    if let Some((name, app, atg)) = anchor {
        outln!(
            "llama.cpp on {name} (ANCHORS.md, recorded on this machine type, 2 threads): pp64 {app} tok/s, tg32 {atg} tok/s -> flowgate decode is {:.2}x, prefill {:.2}x",
            tg / atg,
            pp / app
        );
    }
    Ok(())
}
