//! `flowgate bench …`: performance figures, each printed with what it is compared against.
//!
//! `bench decode` measures prefill and decode like llama-bench (`pp` = one prompt of N random
//! tokens in one pass, `tg` = N tokens decoded one by one, each the median of `--reps` runs after
//! a warm-up; each decoded token is the greedy argmax of the previous step's logits, read back
//! to the host as a generation loop does, where llama-bench feeds random tokens), and compares decode with the machine's own memory bandwidth measured in the same
//! run: bytes of weights read per token × tok/s, over a multi-threaded read of a 1 GiB buffer.
//! When the model has one of the synthetic shapes of ANCHORS.md, llama.cpp's recorded figure for
//! it is shown too (recorded, not measured in this run: say so wherever it is quoted).
//!
//! On a CUDA device (`--device cuda`) the defaults are llama-bench's pp512 / tg128, the ceiling
//! is the device-to-device copy bandwidth measured now (1 GiB, read + write counted, as
//! ANCHORS.md's ~3.0 TB/s), and the anchors are llama.cpp's H100 figures.

use std::time::Instant;

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};
use flowgate_engine::backend::cuda::CudaBackend;
use flowgate_engine::backend::Backend;
use flowgate_engine::models::Logits;
use flowgate_engine::runtime::{AnyLoaded, Loaded};
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
    /// MoE decode and expert-cache hit rates across memory budgets (experts paged from disk).
    Moe(super::bench_moe::MoeArgs),
}

#[derive(ClapArgs)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prefill figure (llama-bench pp; default 64 on the CPU, 512 on
    /// CUDA).
    #[arg(long)]
    pub prompt: Option<usize>,
    /// Tokens to decode (llama-bench tg; default 32 on the CPU, 128 on CUDA).
    #[arg(long)]
    pub gen: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
    /// llama.cpp's `llama-bench` (tools/llamacpp/build.sh): run it on the same file with the same
    /// pp/tg sizes and thread count, and compare in this run.
    #[arg(long)]
    pub llama_bench: Option<std::path::PathBuf>,
}

pub fn main(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Load(a) => super::bench_load::load(a),
        BenchCmd::Moe(a) => super::bench_moe::moe(a),
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

/// llama.cpp figures from ANCHORS.md for the synthetic shapes: on the 2-core CPU machine
/// (pp64/tg32) or, with `gpu`, on the H100 (pp512/tg128, all layers on the GPU).
fn anchor(spec: &flowgate_formats::ModelSpec, gpu: bool) -> Option<(&'static str, f64, f64)> {
    match (
        gpu,
        spec.n_layers,
        spec.hidden,
        spec.vocab_size,
        spec.moe.is_some(),
    ) {
        (false, 16, 2048, 128256, false) => Some(("dense1b", 214.0, 52.0)),
        (false, 16, 2048, 50304, true) => Some(("moe7b", 110.0, 51.6)),
        (true, 32, 4096, 128256, false) => Some(("dense8b", 9478.0, 287.0)),
        (true, 48, 2048, 151936, true) => Some(("moe30b", 12072.0, 298.0)),
        _ => None,
    }
}

/// The decode ceiling of the device a model runs on: (GB/s, what was measured).
type Ceiling = (f64, String);

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
    match loaded {
        AnyLoaded::Cpu(l) => decode_on(&a, &l, threads, false, || {
            Ok((
                memory_read_gbps(),
                "multi-threaded read of a 1 GiB host buffer".to_string(),
            ))
        }),
        AnyLoaded::Cuda(l) => {
            let be = &l.model.backend;
            decode_on(&a, &l, threads, true, || {
                // 1 GiB, or what a --vram-budget leaves room for (two buffers).
                let (used, _) = be.memory_in_use();
                let free = be.memory_budget().saturating_sub(used);
                let bytes = (1u64 << 30).min(((free / 2) >> 20) << 20).max(1 << 20) as usize;
                Ok((
                    be.copy_bandwidth_gbps(bytes, 5)?,
                    format!(
                        "device-to-device copy of {}, read + write counted",
                        flowgate_engine::residency::fmt_size(bytes as u64)
                    ),
                ))
            })?;
            // Whether decode ran as replayed CUDA graphs (FLOWGATE_CUDA_GRAPHS=0: not).
            let (recorded, replayed) = be.decode_graph_counts();
            eprintln!("decode steps as CUDA graphs: {recorded} recorded, {replayed} replayed");
            if be.profiling() {
                cuda_profile(&l, a.prompt.unwrap_or(512))?;
            }
            Ok(())
        }
    }
}

/// With `FLOWGATE_CUDA_PROFILE=1`: device time per kernel of a prefill of `n_prompt` tokens
/// (`--prompt`, 512 by default) and of 32 decode steps after it, printed to stderr (each
/// launch timed with events, so the totals are a little above a plain run's).
fn cuda_profile(l: &Loaded<CudaBackend>, n_prompt: usize) -> Result<()> {
    let m = &l.model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let prompt: Vec<u32> = (0..n_prompt.max(1))
        .map(|_| rng.random_range(0..m.spec.vocab_size as u32))
        .collect();
    let steps = 32;
    let mut cache = m.new_cache(prompt.len() + steps + 1)?;
    m.backend.profile_reset();
    let t = Instant::now();
    let mut tok = argmax(&m.forward(&prompt, &mut cache, Logits::Last)?);
    let wall = t.elapsed().as_secs_f64() * 1e3;
    print_profile(
        &format!(
            "prefill profile ({} tokens): {wall:.2} ms wall",
            prompt.len()
        ),
        &m.backend.profile_report(),
        1,
    );
    m.backend.profile_reset();
    let t = Instant::now();
    for _ in 0..steps {
        tok = argmax(&m.forward(&[tok], &mut cache, Logits::Last)?);
    }
    let wall = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    print_profile(
        &format!(
            "decode profile ({steps} steps after {} prompt tokens): {wall:.3} ms/token wall",
            prompt.len()
        ),
        &m.backend.profile_report(),
        steps,
    );
    Ok(())
}

/// Prints a per-kernel table (times and launches divided by `per`).
fn print_profile(title: &str, rows: &[(String, f64, u64)], per: usize) {
    let per = per.max(1) as f64;
    // Rows named "(host) …" are host time (waits for the device), not part of the device total.
    let host = |name: &str| name.starts_with("(host)");
    let total: f64 = rows
        .iter()
        .filter(|r| !host(&r.0))
        .map(|r| r.1)
        .sum::<f64>()
        / per;
    eprintln!("{title}, {total:.3} ms of device time in kernels and copies");
    eprintln!(
        "{:<28} {:>12} {:>10} {:>8}",
        "kernel", "ms", "launches", "share"
    );
    for (name, ms, n) in rows {
        if host(name) {
            eprintln!(
                "{:<28} {:>12.4} {:>10.1} {:>8}",
                name,
                ms / per,
                *n as f64 / per,
                "-"
            );
            continue;
        }
        eprintln!(
            "{:<28} {:>12.4} {:>10.1} {:>7.1}%",
            name,
            ms / per,
            *n as f64 / per,
            100.0 * ms / per / total.max(1e-12)
        );
    }
}

fn decode_on<B: Backend>(
    a: &DecodeArgs,
    loaded: &Loaded<B>,
    threads: usize,
    gpu: bool,
    ceiling: impl FnOnce() -> Result<Ceiling, flowgate_engine::EngineError>,
) -> Result<()> {
    let m = &loaded.model;
    let s = &m.spec;
    let reps = a.reps.max(1);
    let (n_prompt, n_gen) = match gpu {
        true => (a.prompt.unwrap_or(512), a.gen.unwrap_or(128)),
        false => (a.prompt.unwrap_or(64), a.gen.unwrap_or(32)),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let prompt: Vec<u32> = (0..n_prompt.max(1))
        .map(|_| rng.random_range(0..s.vocab_size as u32))
        .collect();
    let mut cache = m.new_cache(prompt.len().max(n_gen + 1))?;
    // Warm-up: page in the weights, spin up the pool, compile and cache the kernels, and on a GPU
    // fill the device buffer pool with both the prefill and the decode sizes.
    m.forward(&prompt[..prompt.len().min(8)], &mut cache, Logits::Last)?;
    if gpu {
        cache.clear();
        m.forward(&prompt, &mut cache, Logits::Last)?;
    }
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
        for _ in 0..n_gen {
            let l = m.forward(&[tok], &mut cache, Logits::Last)?;
            tok = argmax(&l);
        }
        tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    let (pp, tg) = (median(pp), median(tg));
    // Weight bytes one decode step reads: everything but the embedding table, and for MoE
    // only the chosen fraction of the experts.
    let cat = &loaded.file.catalog;
    let mut per_token = 0f64;
    // Of which the CPU layers of a GPU layer split read.
    let n_host = loaded.split.as_ref().map_or(0, |sp| sp.n_host);
    let mut per_token_host = 0f64;
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
        if flowgate_engine::residency::layer_split::layer_of(&t.name).is_some_and(|l| l < n_host) {
            per_token_host += t.nbytes as f64 * frac;
        }
    }
    let achieved = per_token * tg / 1e9;
    let (ceiling, ceiling_what) = ceiling()?;
    // A dense model split between CPU and GPU: the bound is both parts' reads in turn, the
    // CPU's at the host memory bandwidth measured now.
    let split = match (&loaded.split, &s.moe) {
        (Some(sp), None) if sp.is_split() => {
            let host_gbps = memory_read_gbps();
            let t =
                per_token_host / (host_gbps * 1e9) + (per_token - per_token_host) / (ceiling * 1e9);
            Some((sp, host_gbps, 1.0 / t))
        }
        _ => None,
    };
    let anchor = anchor(s, gpu);
    // llama.cpp measured now, on the same file, after flowgate (its mmap then finds the file
    // wherever flowgate's load left it: flowgate reads uncached ranges with O_DIRECT, so
    // llama-bench's own warm-up run is what brings the file into the page cache).
    let measured = match &a.llama_bench {
        Some(bin) => Some(crate::llamacpp::bench(
            bin,
            &a.model.model,
            prompt.len(),
            n_gen,
            threads,
            &[],
            None,
        )?),
        None => None,
    };
    if a.json {
        let mut j = serde_json::json!({
            "model": loaded.file.name, "threads": threads, "backend": m.backend_name(),
            "prompt_tokens": prompt.len(), "gen_tokens": n_gen, "reps": reps,
            "prefill_tps": pp, "decode_tps": tg,
            "weight_bytes_per_token": per_token, "decode_gbps": achieved,
            "memory_read_gbps": ceiling, "memory_read_what": ceiling_what,
            "fraction_of_memory_bw": achieved / ceiling,
        });
        if let Some((sp, host_gbps, bound)) = split {
            j["layer_split"] = serde_json::json!({
                "cpu_layers": sp.n_host, "gpu_layers": sp.n_layers - sp.n_host,
                "cpu_bytes_per_token": per_token_host, "host_read_gbps": host_gbps,
                "bound_tps": bound, "fraction_of_bound": tg / bound,
            });
        }
        if let Some((name, app, atg)) = anchor {
            let source = if gpu {
                "ANCHORS.md (llama.cpp CUDA on the H100, all layers on the GPU, pp512/tg128; recorded, not this run)"
            } else {
                "ANCHORS.md (llama.cpp CPU, 2 threads, pp64/tg32; recorded, not this run)"
            };
            j["llamacpp_recorded"] = serde_json::json!({"shape": name, "prefill_tps": app, "decode_tps": atg,
                "source": source});
            j["decode_vs_llamacpp"] = serde_json::json!(tg / atg);
        }
        if let Some(l) = &measured {
            j["llamacpp_measured"] = serde_json::json!({"prefill_tps": l.pp_tps, "decode_tps": l.tg_tps,
                "source": "llama-bench run by this command on the same file and threads"});
            j["decode_vs_llamacpp_measured"] = serde_json::json!(tg / l.tg_tps);
            j["prefill_vs_llamacpp_measured"] = serde_json::json!(l.pp_tps.map(|p| pp / p));
        }
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    outln!("model     {} ({})", loaded.file.name, s.arch);
    if gpu {
        outln!("backend   {}", m.backend_name());
    } else {
        outln!("backend   {}, {threads} threads", m.backend_name());
    }
    outln!();
    outln!("{:<28} {:>12}", "test", "tok/s");
    outln!("{:<28} {:>12.1}", format!("prefill pp{}", prompt.len()), pp);
    outln!("{:<28} {:>12.1}", format!("decode tg{}", n_gen), tg);
    outln!();
    outln!(
        "decode reads {:.1} MiB of weights per token: {:.2} GB/s, {:.0}% of the memory bandwidth ({:.2} GB/s, {ceiling_what}, measured now)",
        per_token / (1u64 << 20) as f64,
        achieved,
        100.0 * achieved / ceiling,
        ceiling
    );
    if let Some((sp, host_gbps, bound)) = split {
        outln!(
            "GPU layer split: layers 0-{} of {} on the CPU read {:.1} MiB per token ({host_gbps:.1} GB/s host read, measured now), the rest on the GPU: bound {bound:.1} tok/s, decode is {:.0}% of it",
            sp.n_host - 1,
            sp.n_layers,
            per_token_host / (1u64 << 20) as f64,
            100.0 * tg / bound
        );
    }
    if let Some((name, app, atg)) = anchor {
        let (what, p, g) = if gpu {
            ("the H100, all layers on the GPU", "pp512", "tg128")
        } else {
            ("this machine type, 2 threads", "pp64", "tg32")
        };
        outln!(
            "llama.cpp on {name} (ANCHORS.md, recorded on {what}): {p} {app} tok/s, {g} {atg} tok/s -> flowgate decode is {:.2}x, prefill {:.2}x",
            tg / atg,
            pp / app
        );
    }
    if let Some(l) = &measured {
        outln!(
            "llama.cpp measured now (llama-bench, same file, {threads} threads): pp{} {} tok/s, tg{n_gen} {:.1} tok/s -> flowgate decode is {:.2}x{}",
            prompt.len(),
            l.pp_tps.map_or("-".into(), |p| format!("{p:.1}")),
            l.tg_tps,
            tg / l.tg_tps,
            l.pp_tps
                .map_or(String::new(), |p| format!(", prefill {:.2}x", pp / p))
        );
    }
    Ok(())
}
