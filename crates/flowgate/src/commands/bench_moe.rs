//! `flowgate bench moe`: decode speed and expert-cache hit rates across memory budgets.
//!
//! For each `--ram-budget` (or, with none given, a sweep of `--steps` budgets from "dense part +
//! 10% of the experts" to "everything"), the model is loaded under that budget (dense weights
//! resident, the rest of the budget an expert cache of whole slots, experts paged from the model
//! file), a random prompt is prefilled (it also warms the cache), the counters are reset, and
//! `--gen` tokens are decoded one by one (the inputs are random tokens: see below). Reported per budget: decode tok/s, expert-cache hit rate
//! (all layers and per layer in `--json`), bytes read from the file per token, and the time
//! decode spent waiting for experts.
//!
//! `--cold` drops the model file from the page cache before each budget, so that misses come
//! from the disk (the loader reads uncached ranges with O_DIRECT, which does not refill the
//! page cache). Without it, misses may be served from the page cache at memory speed: say which
//! when quoting a figure.
//!
//! Routing: by default the model's router. The synthetic files' routers turn out to pick nearly
//! the same experts for every token (their Q4_K weights all have a positive mean, so hidden
//! states share one dominant direction), which flatters any cache; `--routing uniform` makes
//! each token pick experts uniformly at random instead (same work per token), the case where a
//! cache of a fraction f of the experts hits about f of the time.
//!
//! `--plot FILE.png` also draws the sweep: decode tok/s (left axis) and hit rate (right axis)
//! against the budget, with llama.cpp's figure as a reference when `--llama-bench` measured it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flowgate_engine::backend::cpu::CpuBackend;
use flowgate_engine::models::{Logits, Model, Routing};
use flowgate_engine::residency::{self, fmt_size, parse_size, HostPlan, PolicyKind};
use flowgate_engine::sampling::argmax;
use rand::{Rng, SeedableRng};

#[derive(ClapArgs)]
pub struct MoeArgs {
    /// An MoE model: GGUF file or HF directory.
    pub model: PathBuf,
    /// RAM budgets to measure (repeatable), e.g. `--ram-budget 1.5GiB --ram-budget 3GiB`.
    /// Without any, a sweep from the dense part + 10% of the experts to everything.
    #[arg(long = "ram-budget", value_parser = parse_budget)]
    pub ram_budget: Vec<u64>,
    /// VRAM budgets to measure on the GPU (repeatable): dense weights on the device, experts in
    /// page-locked host RAM, copied into a device cache of what the budget leaves. With
    /// `--device cuda` and no budget, a sweep from the dense part + reserve + 10% of the experts
    /// to everything.
    #[arg(long = "vram-budget", value_parser = parse_budget)]
    pub vram_budget: Vec<u64>,
    /// With --vram-budget: missed experts computed on the CPU instead of copied (auto, the
    /// default, off, all; repeatable to compare them in one run).
    #[arg(long = "cpu-experts", value_parser = crate::common::parse_cpu_experts)]
    pub cpu_experts: Vec<flowgate_engine::backend::cuda::CpuExperts>,
    /// With --vram-budget: how decode reaches a missed expert the CPU does not compute:
    /// in-place (the default: read by the GPU from page-locked host RAM) or copy (into the
    /// device cache); repeatable to compare them in one run.
    #[arg(long = "miss-path", value_parser = crate::common::parse_miss_path)]
    pub miss_path: Vec<flowgate_engine::backend::cuda::MissPath>,
    /// `cpu` (RAM budgets) or `cuda` / `cuda:N` (VRAM budgets; implied by --vram-budget).
    #[arg(long, default_value = "cpu", value_parser = crate::common::parse_device)]
    pub device: flowgate_engine::backend::cuda::DeviceSpec,
    /// Budgets in the automatic sweep.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Expert cache policy: lru or lfu (LFU with aging).
    #[arg(long, default_value = "lru", value_parser = parse_policy)]
    pub policy: PolicyKind,
    /// Compute threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Prompt tokens prefilled before measuring (warms the cache).
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// Tokens decoded per budget.
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    /// Drop the model file from the page cache before each budget (misses read from disk).
    #[arg(long)]
    pub cold: bool,
    /// Reader threads of the RAM expert cache (experts read from the model file; default 4).
    #[arg(long)]
    pub io_threads: Option<usize>,
    /// Which experts tokens use: `router` (the model's own) or `uniform` (each token picks
    /// experts uniformly at random, as ANCHORS.md assumes for random weights; a benchmarking
    /// aid: the work per token is the same, the logits are meaningless).
    #[arg(long, default_value = "router", value_parser = ["router", "uniform"])]
    pub routing: String,
    /// llama.cpp's `llama-bench` (see tools/llamacpp/build.sh): measure its decode (tg, mmap,
    /// the same thread count) on the same file next to flowgate's, in the same run.
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// Measure each budget in child processes, each in a memory cgroup of its own limited to
    /// the budget + `--headroom` (page cache included): flowgate with `--ram-budget` = the
    /// budget, llama.cpp (with `--llama-bench`) with mmap under the same limit. Needs root.
    #[arg(long)]
    pub cgroup: bool,
    /// Memory the cgroup allows above the weight budget (process, KV cache, activations).
    #[arg(long, default_value = "256MiB", value_parser = parse_budget)]
    pub headroom: u64,
    /// Speculative prefetch: predict the next layer's experts by applying its router to the
    /// current hidden state and start reading them early (off by default: on the synthetic
    /// files the prediction is poor, see docs/benchmarks.md).
    #[arg(long)]
    pub prefetch: bool,
    #[arg(long)]
    pub json: bool,
    /// Also write the sweep as a PNG plot: decode tok/s (left axis) and expert-cache hit rate
    /// (right axis) against the budget, llama.cpp's decode as a reference with `--llama-bench`.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

pub(crate) fn parse_budget(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_policy(s: &str) -> std::result::Result<PolicyKind, String> {
    PolicyKind::parse(s).map_err(|e| e.to_string())
}

struct Run {
    budget: u64,
    plan: HostPlan,
    decode_tps: f64,
    hit_rate: f64,
    hit_rate_per_layer: Vec<Option<f64>>,
    bytes_per_token: f64,
    stall_ms_per_token: f64,
    direct_per_token: f64,
    prefetched_per_token: f64,
    prefetch_accuracy: Option<f64>,
    peak: u64,
}

pub fn moe(a: MoeArgs) -> Result<()> {
    if let Some(p) = &a.plot {
        // Before the sweep, not after minutes of it.
        crate::plot::check_png_path(p)?;
    }
    let threads = crate::common::init_threads(a.threads)?;
    let file = flowgate_formats::model::open(&a.model)
        .with_context(|| format!("opening {}", a.model.display()))?;
    if file.spec.moe.is_none() {
        bail!(
            "{} is a dense model: `bench moe` measures expert paging (try `bench decode`)",
            a.model.display()
        );
    }
    if !a.vram_budget.is_empty()
        || matches!(
            a.device,
            flowgate_engine::backend::cuda::DeviceSpec::Cuda(_)
        )
    {
        return super::bench_moe_vram::moe_vram(&a, &file);
    }
    let full = HostPlan::new(&file.spec, &file.catalog, u64::MAX, a.policy)?;
    let layout = full
        .experts
        .clone()
        .context("MoE model without experts in its catalog")?;
    let budgets = if a.ram_budget.is_empty() {
        let lo = full.dense_bytes + (layout.n_paged() as u64).div_ceil(10) * layout.slot_bytes;
        let hi = full.dense_bytes + full.experts_bytes;
        let steps = a.steps.max(2) as u64;
        (0..steps)
            .map(|i| lo + (hi - lo) * i / (steps - 1))
            .collect()
    } else {
        a.ram_budget.clone()
    };
    if a.cgroup {
        return compare_in_cgroups(&a, &budgets, threads);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let prompt: Vec<u32> = (0..a.prompt.max(1))
        .map(|_| rng.random_range(0..file.spec.vocab_size as u32))
        .collect();
    // Decode inputs are random tokens, not the model's own greedy choices: a random-weight
    // model's greedy output tends to repeat one token, which would route every step to the same
    // experts and make any cache look perfect.
    let inputs: Vec<u32> = (0..a.gen)
        .map(|_| rng.random_range(0..file.spec.vocab_size as u32))
        .collect();
    let mut runs = Vec::new();
    for &budget in &budgets {
        if a.cold {
            flowgate_io::probe::evict(&file.catalog.files[0])
                .with_context(|| "--cold: dropping the model from the page cache")?;
        }
        let (tensors, res) =
            residency::load_host(&file, budget, a.policy, a.io_threads.unwrap_or(0), None)
                .with_context(|| format!("loading under --ram-budget {}", fmt_size(budget)))?;
        let mut model =
            Model::with_expert_cache(file.spec.clone(), CpuBackend, tensors, res.cache.clone())?;
        if a.routing == "uniform" {
            model.set_routing(Routing::UniformRandom { seed: 11 });
        }
        let mut kv = model.new_cache(prompt.len() + a.gen + 1)?;
        model.forward(&prompt, &mut kv, Logits::Last)?;
        if let Some(c) = &res.cache {
            c.set_speculative(a.prefetch);
            c.reset_stats();
        }
        let t0 = Instant::now();
        for &tok in &inputs {
            let l = model.forward(&[tok], &mut kv, Logits::Last)?;
            std::hint::black_box(argmax(&l));
        }
        let dt = t0.elapsed().as_secs_f64();
        let n = a.gen.max(1) as f64;
        let (hit_rate, per_layer, bytes, stall, direct, pf, pf_acc) = match &res.cache {
            Some(c) => {
                let st = c.stats();
                (
                    st.hit_rate(),
                    st.hit_rate_per_layer(),
                    st.bytes_read as f64,
                    st.stall.as_secs_f64(),
                    st.bytes_direct as f64,
                    st.prefetched as f64,
                    (st.prefetched > 0).then(|| st.prefetch_accuracy()),
                )
            }
            None => (1.0, vec![], 0.0, 0.0, 0.0, 0.0, None),
        };
        runs.push(Run {
            budget,
            plan: res.plan.clone(),
            decode_tps: a.gen as f64 / dt,
            hit_rate,
            hit_rate_per_layer: per_layer,
            bytes_per_token: bytes / n,
            stall_ms_per_token: 1e3 * stall / n,
            direct_per_token: direct / n,
            prefetched_per_token: pf / n,
            prefetch_accuracy: pf_acc,
            peak: res.budget.peak(),
        });
    }
    // llama.cpp on the same file, no memory limit (mmap; the page cache holds what it reads).
    let llama = match &a.llama_bench {
        Some(bin) => {
            Some(crate::llamacpp::bench(bin, &a.model, 0, a.gen, threads, &[], None)?.tg_tps)
        }
        None => None,
    };
    if a.json {
        let j = serde_json::json!({
            "llamacpp_decode_tps_unlimited": llama,
            "model": file.name, "threads": threads, "policy": a.policy.name(), "cold": a.cold,
            "routing": a.routing, "speculative_prefetch": a.prefetch,
            "prompt_tokens": prompt.len(), "gen_tokens": a.gen,
            "dense_bytes": full.dense_bytes, "experts_bytes": full.experts_bytes,
            "expert_slot_bytes": layout.slot_bytes, "n_experts": layout.n_paged(),
            "runs": runs.iter().map(|r| serde_json::json!({
                "ram_budget_bytes": r.budget,
                "paged": r.plan.paged(),
                "cache_slots": if r.plan.paged() { r.plan.n_slots } else { layout.n_paged() },
                "expert_fraction": if r.plan.paged() { r.plan.n_slots as f64 / layout.n_paged() as f64 } else { 1.0 },
                "decode_tps": r.decode_tps,
                "hit_rate": r.hit_rate,
                "hit_rate_per_layer": r.hit_rate_per_layer,
                "bytes_read_per_token": r.bytes_per_token,
                "stall_ms_per_token": r.stall_ms_per_token,
                "direct_bytes_per_token": r.direct_per_token,
                "prefetched_experts_per_token": r.prefetched_per_token,
                "prefetch_accuracy": r.prefetch_accuracy,
                "budget_peak_bytes": r.peak,
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return plot(&a, threads, &prompt, &runs, llama);
    }
    outln!(
        "model     {} ({}), {} experts of {} each, dense part {}",
        file.name,
        file.spec.arch,
        layout.n_paged(),
        fmt_size(layout.slot_bytes),
        fmt_size(full.dense_bytes)
    );
    outln!(
        "cpu, {threads} threads, policy {}, routing {}, prompt {} + decode {} tokens per budget, misses from {}",
        a.policy.name(),
        a.routing,
        prompt.len(),
        a.gen,
        if a.cold {
            "disk (page cache dropped before each budget)"
        } else {
            "the file (page cache allowed)"
        }
    );
    outln!();
    outln!(
        "{:>12} {:>8} {:>9} {:>10} {:>9} {:>12} {:>10} {:>9}",
        "ram budget",
        "experts",
        "cached",
        "tok/s",
        "hit rate",
        "read/token",
        "stall/tok",
        "prefetch"
    );
    for r in &runs {
        let (slots, frac) = if r.plan.paged() {
            (
                r.plan.n_slots,
                r.plan.n_slots as f64 / layout.n_paged() as f64,
            )
        } else {
            (layout.n_paged(), 1.0)
        };
        outln!(
            "{:>12} {:>8} {:>8.1}% {:>10.2} {:>8.1}% {:>12} {:>8.2}ms {:>9}",
            fmt_size(r.budget),
            slots,
            100.0 * frac,
            r.decode_tps,
            100.0 * r.hit_rate,
            fmt_size(r.bytes_per_token as u64),
            r.stall_ms_per_token,
            r.prefetch_accuracy
                .map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * p))
        );
    }
    if let Some(t) = llama {
        outln!(
            "llama.cpp on the same file, tg{} with {threads} threads, mmap, no memory limit: {t:.2} tok/s (measured now)",
            a.gen
        );
    }
    outln!();
    outln!("prefetch: of the experts read speculatively (next layer's router on the current hidden state), the share then used.");
    if a.routing == "uniform" {
        outln!("Uniform routing: expect a hit rate near the cached fraction.");
    } else {
        outln!("The model's router: on flowgate's synthetic files it picks nearly the same experts for every token (see docs/benchmarks.md); trained models sit between that and uniform.");
    }
    plot(&a, threads, &prompt, &runs, llama)?;
    if let Some(p) = &a.plot {
        outln!("plot: {}", p.display());
    }
    Ok(())
}

/// The plot's title: the model file, the policy and the routing.
pub(crate) fn plot_title(a: &MoeArgs) -> String {
    let name = a.model.file_name().map_or_else(
        || a.model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    format!(
        "flowgate bench moe: {name}, policy {}, routing {}",
        a.policy.name(),
        a.routing
    )
}

/// `--plot`: the sweep measured in this process.
fn plot(
    a: &MoeArgs,
    threads: usize,
    prompt: &[u32],
    runs: &[Run],
    llama: Option<f64>,
) -> Result<()> {
    let Some(path) = &a.plot else {
        return Ok(());
    };
    let sweep = crate::plot::Sweep {
        title: plot_title(a),
        subtitle: format!(
            "CPU, {threads} threads, prompt {} + decode {} tokens per budget, misses from {}{}",
            prompt.len(),
            a.gen,
            if a.cold {
                "disk"
            } else {
                "the file (page cache allowed)"
            },
            if a.prefetch {
                ", speculative prefetch"
            } else {
                ""
            }
        ),
        budget_name: "RAM budget".into(),
        points: runs
            .iter()
            .map(|r| crate::plot::SweepPoint {
                budget_bytes: r.budget,
                decode_tps: r.decode_tps,
                hit_rate: r.hit_rate,
                llama_tps: None,
            })
            .collect(),
        llama_unlimited: llama,
    };
    crate::plot::write_sweep_png(path, &sweep)
}

/// `--cgroup`: each budget measured in child processes, each in its own memory cgroup.
fn compare_in_cgroups(a: &MoeArgs, budgets: &[u64], threads: usize) -> Result<()> {
    let me = std::env::current_exe().context("locating the flowgate binary")?;
    let model = &a.model;
    let mut rows = Vec::new();
    for &b in budgets {
        let limit = b + a.headroom;
        crate::memlimit::check_limit(limit)?;
        flowgate_io::probe::evict(model).context("dropping the model from the page cache")?;
        let cg = crate::memlimit::MemCgroup::create("flowgate", limit)?;
        let mut args = vec![
            "bench".to_string(),
            "moe".into(),
            model.display().to_string(),
            "--ram-budget".into(),
            b.to_string(),
            "--gen".into(),
            a.gen.to_string(),
            "--prompt".into(),
            a.prompt.to_string(),
            "--policy".into(),
            a.policy.name().into(),
            "--routing".into(),
            a.routing.clone(),
            "-t".into(),
            threads.to_string(),
            "--json".into(),
        ];
        if a.prefetch {
            args.push("--prefetch".into());
        }
        let out = crate::llamacpp::child(&me, &args, Some(&cg))?;
        let j: serde_json::Value = serde_json::from_str(&out)?;
        let run = j["runs"][0].clone();
        let fg_peak = cg.peak();
        drop(cg);
        let ll = match &a.llama_bench {
            Some(bin) => {
                flowgate_io::probe::evict(model)?;
                let cg = crate::memlimit::MemCgroup::create("llamacpp", limit)?;
                let tps = crate::llamacpp::bench(
                    bin,
                    model,
                    0,
                    a.gen,
                    threads,
                    &["--repack", "0"],
                    Some(&cg),
                )?
                .tg_tps;
                Some((tps, cg.peak()))
            }
            None => None,
        };
        rows.push((b, limit, run, fg_peak, ll));
    }
    if a.json {
        let j = serde_json::json!({
            "model": model.display().to_string(), "threads": threads, "cgroup": true,
            "headroom_bytes": a.headroom, "gen_tokens": a.gen, "policy": a.policy.name(),
            "routing": a.routing,
            "runs": rows.iter().map(|(b, limit, run, fp, ll)| serde_json::json!({
                "ram_budget_bytes": b, "cgroup_limit_bytes": limit,
                "flowgate": run, "flowgate_cgroup_peak_bytes": fp,
                "llamacpp_decode_tps": ll.as_ref().map(|x| x.0),
                "llamacpp_cgroup_peak_bytes": ll.as_ref().and_then(|x| x.1),
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return plot_cgroups(a, threads, &rows);
    }
    outln!(
        "model {}: each budget in its own memory cgroup (limit = budget + {}), page cache dropped before each run, {threads} threads, tg{}",
        model.display(),
        fmt_size(a.headroom),
        a.gen
    );
    outln!();
    outln!(
        "{:>12} {:>12} {:>14} {:>9} {:>14} {:>9}",
        "ram budget",
        "cgroup limit",
        "flowgate tok/s",
        "hit rate",
        "llama.cpp tok/s",
        "ratio"
    );
    for (b, limit, run, _, ll) in &rows {
        let tps = run["decode_tps"].as_f64().unwrap_or(f64::NAN);
        let (lt, ratio) = match ll {
            Some((t, _)) => (format!("{t:.2}"), format!("{:.2}x", tps / t)),
            None => ("-".into(), "-".into()),
        };
        outln!(
            "{:>12} {:>12} {:>14.2} {:>8.1}% {:>14} {:>9}",
            fmt_size(*b),
            fmt_size(*limit),
            tps,
            100.0 * run["hit_rate"].as_f64().unwrap_or(f64::NAN),
            lt,
            ratio
        );
    }
    plot_cgroups(a, threads, &rows)?;
    if let Some(p) = &a.plot {
        outln!("plot: {}", p.display());
    }
    Ok(())
}

type CgroupRow = (
    u64,
    u64,
    serde_json::Value,
    Option<u64>,
    Option<(f64, Option<u64>)>,
);

/// `--plot` with `--cgroup`: llama.cpp, when measured, is a point per budget (same limit).
fn plot_cgroups(a: &MoeArgs, threads: usize, rows: &[CgroupRow]) -> Result<()> {
    let Some(path) = &a.plot else {
        return Ok(());
    };
    let sweep = crate::plot::Sweep {
        title: plot_title(a),
        subtitle: format!(
            "CPU, {threads} threads, decode {} tokens, each budget in a memory cgroup of budget + {}, page cache dropped before each run",
            a.gen,
            fmt_size(a.headroom)
        ),
        budget_name: "RAM budget".into(),
        points: rows
            .iter()
            .map(|(b, _, run, _, ll)| crate::plot::SweepPoint {
                budget_bytes: *b,
                decode_tps: run["decode_tps"].as_f64().unwrap_or(f64::NAN),
                hit_rate: run["hit_rate"].as_f64().unwrap_or(f64::NAN),
                llama_tps: ll.as_ref().map(|x| x.0),
            })
            .collect(),
        llama_unlimited: None,
    };
    crate::plot::write_sweep_png(path, &sweep)
}
