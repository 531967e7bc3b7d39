//! `flowgate bench moe --vram-budget …` (or `--device cuda`): decode speed and device
//! expert-cache statistics across VRAM budgets.
//!
//! Per budget the model is loaded on the GPU under that budget (`runtime::load_cuda_budget`:
//! dense weights on the device, experts page-locked in host RAM, the rest of the budget a
//! device cache of expert slots; a budget that holds everything loads everything), a random
//! prompt is prefilled (which warms the cache), the counters are reset, and `--gen` random
//! tokens are decoded one by one, each step ending with the logits on the host. Reported:
//! decode tok/s, hit rate (per layer in `--json`), bytes copied host→device per token, device
//! time spent copying per token, the budget's peak use as flowgate's allocator accounts it,
//! and the device memory the driver reports in use (context included, as nvidia-smi shows).
//!
//! With one `--ram-budget` as well, the experts are not all held in RAM: a RAM cache of what
//! that budget leaves sits under the device cache and misses in it are read from the model
//! file (three tiers); its hit rate, bytes read from the file per token and time waited for
//! them are reported too (`--cold` drops the file from the page cache first, so the reads
//! come from the disk).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use flowgate_engine::backend::cuda::{CpuExperts, DeviceSpec, MissPath};
use flowgate_engine::models::{Logits, Routing};
use flowgate_engine::residency::{fmt_size, ExpertLayout};
use flowgate_engine::runtime::{self, LoadOptions};
use flowgate_engine::sampling::argmax;
use flowgate_formats::model::ModelFile;
use rand::{Rng, SeedableRng};

use super::bench_moe::MoeArgs;

/// The RAM tier's figures for one run (`--ram-budget` under `--vram-budget`).
struct RamTier {
    slots: usize,
    hit_rate: f64,
    hit_rate_per_layer: Vec<Option<f64>>,
    bytes_read_per_token: f64,
    direct_bytes_per_token: f64,
    stall_ms_per_token: f64,
    peak: u64,
}

impl RamTier {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "slots": self.slots,
            "hit_rate": self.hit_rate,
            "hit_rate_per_layer": self.hit_rate_per_layer,
            "bytes_read_per_token": self.bytes_read_per_token,
            "direct_bytes_per_token": self.direct_bytes_per_token,
            "stall_ms_per_token": self.stall_ms_per_token,
            "budget_peak_bytes": self.peak,
        })
    }
}

struct VramRun {
    budget: u64,
    /// Leading layers run whole on the CPU (the GPU layer split: the budget does not hold the
    /// dense part); slots, cached fraction and hit rate are then the GPU layers'.
    cpu_layers: usize,
    ram: Option<RamTier>,
    cpu_mode: CpuExperts,
    /// How misses were reached (copy where in place was asked for but not possible).
    miss_path: MissPath,
    /// Missed experts the GPU read in place, per token.
    read_in_place_per_token: f64,
    cpu_per_token: f64,
    cpu_ms_per_token: f64,
    /// Seconds to copy one expert (measured at provisioning) and to compute j = 0..=k on the
    /// CPU (a line fitted to what calibration, then decode, measured).
    costs: Option<(f64, Vec<f64>)>,
    /// The fixed parts of a split layer: the GPU's part beyond its copies, and how late the
    /// CPU share starts after the routes reach the host (seconds, moving averages).
    lags: (f64, f64),
    cpu_threads: usize,
    paged: bool,
    slots: usize,
    fraction: f64,
    decode_tps: f64,
    hit_rate: f64,
    hit_rate_per_layer: Vec<Option<f64>>,
    bytes_per_token: f64,
    copy_ms_per_token: f64,
    /// Experts copied speculatively per token, and the share of them the layer then used.
    prefetched_per_token: f64,
    prefetch_accuracy: Option<f64>,
    peak: u64,
    driver_used: u64,
    load_s: f64,
}

pub fn moe_vram(a: &MoeArgs, file: &ModelFile) -> Result<()> {
    if a.ram_budget.len() > 1 || a.cgroup {
        bail!("--vram-budget runs take one --ram-budget at most (the RAM tier under the sweep), and no --cgroup");
    }
    let ram_budget = a.ram_budget.first().copied();
    if a.cold && ram_budget.is_none() {
        bail!("--cold under --vram-budget needs a --ram-budget (without one every expert is read once, at load)");
    }
    if a.prefetch && a.routing == "uniform" {
        bail!("--prefetch predicts the model's router; uniform routing draws experts at random (use --routing router)");
    }
    let dev = match a.device {
        DeviceSpec::Cuda(n) => n,
        _ => 0,
    };
    let layout = ExpertLayout::new(&file.spec, &file.catalog)?;
    let experts_bytes = layout.total_bytes;
    let total = file.catalog.total_bytes();
    let dense = total - experts_bytes;
    let ctx = a.prompt.max(1) + a.gen + 1;
    let reserve = runtime::device_reserve(&file.spec, ctx);
    let budgets = if a.vram_budget.is_empty() {
        let lo = dense + reserve + (layout.n_paged() as u64).div_ceil(10) * layout.slot_bytes;
        let hi = total + reserve;
        let steps = a.steps.max(2) as u64;
        (0..steps)
            .map(|i| lo + (hi - lo) * i / (steps - 1))
            .collect()
    } else {
        a.vram_budget.clone()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let prompt: Vec<u32> = (0..a.prompt.max(1))
        .map(|_| rng.random_range(0..file.spec.vocab_size as u32))
        .collect();
    // Random decode inputs, as in the RAM sweep: a random-weight model's greedy output repeats.
    let inputs: Vec<u32> = (0..a.gen)
        .map(|_| rng.random_range(0..file.spec.vocab_size as u32))
        .collect();
    let modes = if a.cpu_experts.is_empty() {
        vec![CpuExperts::Auto]
    } else {
        a.cpu_experts.clone()
    };
    let paths = if a.miss_path.is_empty() {
        vec![MissPath::InPlace]
    } else {
        a.miss_path.clone()
    };
    let combos: Vec<(CpuExperts, MissPath)> = modes
        .iter()
        .flat_map(|&m| paths.iter().map(move |&p| (m, p)))
        .collect();
    let mut runs = Vec::new();
    for &budget in &budgets {
        let opts = LoadOptions {
            vram_budget: Some(budget),
            ram_budget,
            io_threads: a.io_threads.unwrap_or(0),
            cache_policy: a.policy,
            ctx,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut l = runtime::load_cuda_budget(&a.model, &opts, dev, budget)
            .with_context(|| format!("loading under --vram-budget {}", fmt_size(budget)))?;
        let load_s = t0.elapsed().as_secs_f64();
        if a.routing == "uniform" {
            l.model.set_routing(Routing::UniformRandom { seed: 11 });
        }
        for &(mode, path) in &combos {
            if let Some(p) = &l.pager {
                p.set_cpu_experts(mode)?;
                p.set_prefetch(a.prefetch);
                p.set_miss_path(path);
            }
            let mut kv = l.model.new_cache(ctx)?;
            l.model.forward(&prompt, &mut kv, Logits::Last)?;
            let ram_cache = l.pager.as_ref().and_then(|p| p.ram_cache().cloned());
            if let Some(p) = &l.pager {
                p.reset_stats();
            }
            if let Some(c) = &ram_cache {
                if a.cold {
                    for f in &file.catalog.files {
                        flowgate_io::probe::evict(f)
                            .with_context(|| "--cold: dropping the model from the page cache")?;
                    }
                }
                c.reset_stats();
            }
            let t0 = Instant::now();
            for &tok in &inputs {
                let lg = l.model.forward(&[tok], &mut kv, Logits::Last)?;
                std::hint::black_box(argmax(&lg));
            }
            let dt = t0.elapsed().as_secs_f64();
            if let Some(t) = l.pager.as_ref().and_then(|p| p.timeline_report(a.gen)) {
                eprintln!(
                    "device timeline of the paged layers, {} budget, cpu experts {}, misses {}:\n{t}",
                    fmt_size(budget),
                    mode.name(),
                    path.name()
                );
            }
            let n = a.gen.max(1) as f64;
            let (slots, fraction, paged) = match l.device_plan() {
                Some(p) => (p.n_slots, p.fraction(), true),
                None => (layout.n_paged(), 1.0, false),
            };
            let in_place_n = l
                .pager
                .as_ref()
                .map_or(0.0, |p| p.stats().read_in_place as f64 / n);
            let (hit_rate, per_layer, bytes, copy, cpu_n, cpu_t, pf) = match &l.pager {
                Some(p) => {
                    let st = p.stats();
                    (
                        st.hit_rate(),
                        st.hit_rate_per_layer(),
                        st.bytes_read as f64,
                        st.stall.as_secs_f64(),
                        st.cpu_computed as f64 / n,
                        1e3 * st.cpu_time.as_secs_f64() / n,
                        (
                            st.prefetched as f64 / n,
                            (st.prefetched > 0).then(|| st.prefetch_accuracy()),
                        ),
                    )
                }
                None => (1.0, vec![], 0.0, 0.0, 0.0, 0.0, (0.0, None)),
            };
            let ram = ram_cache.as_ref().map(|c| {
                let st = c.stats();
                RamTier {
                    slots: c.capacity(),
                    hit_rate: st.hit_rate(),
                    hit_rate_per_layer: st.hit_rate_per_layer(),
                    bytes_read_per_token: st.bytes_read as f64 / n,
                    direct_bytes_per_token: st.bytes_direct as f64 / n,
                    stall_ms_per_token: 1e3 * st.stall.as_secs_f64() / n,
                    peak: c.budget().peak(),
                }
            });
            let (_, peak) = l.model.backend.memory_in_use();
            let driver_used = l
                .model
                .backend
                .device()
                .memory_info()
                .map(|(free, tot)| (tot - free) as u64)
                .unwrap_or(0);
            runs.push(VramRun {
                budget,
                cpu_layers: l.model.n_host_layers(),
                ram,
                cpu_mode: mode,
                miss_path: l.pager.as_ref().map_or(path, |p| p.miss_path()),
                read_in_place_per_token: in_place_n,
                cpu_per_token: cpu_n,
                cpu_ms_per_token: cpu_t,
                costs: l.pager.as_ref().and_then(|p| p.costs()),
                lags: l.pager.as_ref().map_or((0.0, 0.0), |p| p.split_lags()),
                cpu_threads: l.pager.as_ref().map_or(0, |p| p.cpu_threads()),
                paged,
                slots,
                fraction,
                decode_tps: a.gen as f64 / dt,
                hit_rate,
                hit_rate_per_layer: per_layer,
                bytes_per_token: bytes / n,
                copy_ms_per_token: 1e3 * copy / n,
                prefetched_per_token: pf.0,
                prefetch_accuracy: pf.1,
                peak,
                driver_used,
                load_s,
            });
            if peak > budget {
                bail!(
                    "the allocator's peak {} passed the budget {}: a bug",
                    fmt_size(peak),
                    fmt_size(budget)
                );
            }
        }
    }
    if a.json {
        let j = serde_json::json!({
            "model": file.name, "device": format!("cuda:{dev}"), "policy": a.policy.name(),
            "routing": a.routing, "speculative_prefetch": a.prefetch,
            "prompt_tokens": prompt.len(), "gen_tokens": a.gen,
            "ram_budget_bytes": ram_budget, "cold": a.cold,
            "dense_bytes": dense, "experts_bytes": experts_bytes, "reserve_bytes": reserve,
            "n_experts": layout.n_paged(),
            "runs": runs.iter().map(|r| serde_json::json!({
                "vram_budget_bytes": r.budget,
                "cpu_layers": r.cpu_layers,
                "cpu_experts": r.cpu_mode.name(),
                "miss_path": r.miss_path.name(),
                "read_in_place_per_token": r.read_in_place_per_token,
                "cpu_experts_per_token": r.cpu_per_token,
                "cpu_ms_per_token": r.cpu_ms_per_token,
                "expert_copy_us": r.costs.as_ref().map(|c| 1e6 * c.0),
                "gpu_fixed_us": 1e6 * r.lags.0,
                "cpu_start_lag_us": 1e6 * r.lags.1,
                "cpu_expert_threads": r.cpu_threads,
                "cpu_experts_ms": r.costs.as_ref().map(|c| c.1.iter().map(|t| 1e3 * t).collect::<Vec<_>>()),
                "paged": r.paged,
                "cache_slots": r.slots,
                "expert_fraction": r.fraction,
                "decode_tps": r.decode_tps,
                "hit_rate": r.hit_rate,
                "hit_rate_per_layer": r.hit_rate_per_layer,
                "bytes_moved_per_token": r.bytes_per_token,
                "copy_ms_per_token": r.copy_ms_per_token,
                "prefetched_experts_per_token": r.prefetched_per_token,
                "prefetch_accuracy": r.prefetch_accuracy,
                "budget_peak_bytes": r.peak,
                "driver_used_bytes": r.driver_used,
                "load_s": r.load_s,
                "ram_cache": r.ram.as_ref().map(RamTier::json),
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return plot(a, &prompt, &runs);
    }
    outln!(
        "model     {} ({}), {} experts, dense part {}, experts {}, reserve (KV {} positions + activations) {}",
        file.name,
        file.spec.arch,
        layout.n_paged(),
        fmt_size(dense),
        fmt_size(experts_bytes),
        ctx,
        fmt_size(reserve)
    );
    outln!(
        "cuda:{dev}, policy {}, routing {}, prompt {} + decode {} tokens per budget; {}",
        a.policy.name(),
        a.routing,
        prompt.len(),
        a.gen,
        source(a, ram_budget)
    );
    outln!();
    let mut pf_head = if a.prefetch {
        format!(" {:>9} {:>8}", "pf exp/t", "pf used")
    } else {
        String::new()
    };
    if ram_budget.is_some() {
        pf_head += &format!(
            " {:>9} {:>8} {:>10} {:>9}",
            "ram slots", "ram hit", "ssd/tok", "ssd wait"
        );
    }
    outln!(
        "{:>12} {:>5} {:>8} {:>8} {:>8} {:>10} {:>9} {:>12} {:>10} {:>9} {:>10} {:>12} {:>12}{pf_head}",
        "vram budget",
        "cpu",
        "misses",
        "slots",
        "cached",
        "tok/s",
        "hit rate",
        "moved/tok",
        "copy/tok",
        "cpu exp/t",
        "cpu/tok",
        "budget peak",
        "driver used"
    );
    for r in &runs {
        let mut pf = if a.prefetch {
            format!(
                " {:>9.1} {:>8}",
                r.prefetched_per_token,
                r.prefetch_accuracy
                    .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
            )
        } else {
            String::new()
        };
        if let Some(t) = &r.ram {
            pf += &format!(
                " {:>9} {:>7.1}% {:>10} {:>7.2}ms",
                t.slots,
                100.0 * t.hit_rate,
                fmt_size(t.bytes_read_per_token as u64),
                t.stall_ms_per_token
            );
        } else if ram_budget.is_some() {
            pf += &format!(" {:>9} {:>8} {:>10} {:>9}", "all", "-", "-", "-");
        }
        outln!(
            "{:>12} {:>5} {:>8} {:>8} {:>7.1}% {:>10.2} {:>8.1}% {:>12} {:>8.2}ms {:>9.1} {:>8.2}ms {:>12} {:>12}{pf}",
            fmt_size(r.budget),
            r.cpu_mode.name(),
            r.miss_path.name(),
            r.slots,
            100.0 * r.fraction,
            r.decode_tps,
            100.0 * r.hit_rate,
            fmt_size(r.bytes_per_token as u64),
            r.copy_ms_per_token,
            r.cpu_per_token,
            r.cpu_ms_per_token,
            fmt_size(r.peak),
            fmt_size(r.driver_used)
        );
    }
    for r in runs.iter().filter(|r| r.cpu_layers > 0) {
        outln!(
            "{}, cpu {}: layers 0-{} of {} run whole on the CPU (GPU layer split: the budget does not hold the dense part); slots, cached and hit rate are the GPU layers'",
            fmt_size(r.budget),
            r.cpu_mode.name(),
            r.cpu_layers - 1,
            file.spec.n_layers
        );
    }
    // The CPU costs of the last run that measured them (runs without CPU experts have none).
    let measured = runs
        .iter()
        .rev()
        .find(|r| r.costs.as_ref().is_some_and(|c| c.1.len() > 1))
        .or(runs.first());
    if let Some((copy, cpu)) = measured.and_then(|r| r.costs.clone()) {
        outln!();
        outln!(
            "measured: one expert copied host->device in {:.0} us; j experts of a token on the CPU ({} threads, the line fitted to calibration and decode): {}",
            1e6 * copy,
            measured.map_or(0, |r| r.cpu_threads),
            cpu.iter()
                .enumerate()
                .skip(1)
                .map(|(j, t)| format!("{j}: {:.0} us", 1e6 * t))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some((gpu, cpu)) = measured.map(|r| r.lags) {
            outln!(
                "a split layer's GPU part takes {:.0} us beyond its copies; its CPU share starts {:.0} us after the routes reach the host (averages)",
                1e6 * gpu,
                1e6 * cpu
            );
        }
    }
    outln!();
    outln!("driver used: device memory in use on the GPU (cuMemGetInfo), CUDA context and cuBLAS workspace included, as nvidia-smi counts it.");
    if ram_budget.is_some() {
        outln!("ram: the RAM cache under the device cache (--ram-budget; 'all': the budget holds every expert, page-locked): its slots, hit rate (one lookup per miss in VRAM), bytes read from the model file per token and time decode waited for them.");
    }
    if a.prefetch {
        outln!("pf: experts copied speculatively per token (the next layer's router on this layer's input, on a copy stream of their own; counted in copied/tok, not in copy/tok), and the share of them the layer then used.");
    }
    if a.routing == "uniform" {
        outln!("Uniform routing: expect a hit rate near the cached fraction.");
    } else {
        outln!("The model's router: on flowgate's synthetic files it picks nearly the same experts for every token (see docs/benchmarks.md); trained models sit between that and uniform.");
    }
    plot(a, &prompt, &runs)?;
    if let Some(p) = &a.plot {
        outln!("plot: {}", p.display());
    }
    Ok(())
}

fn plot(a: &MoeArgs, prompt: &[u32], runs: &[VramRun]) -> Result<()> {
    let Some(path) = &a.plot else {
        return Ok(());
    };
    let sweep = crate::plot::Sweep {
        title: super::bench_moe::plot_title(a),
        subtitle: format!(
            "{}, prompt {} + decode {} tokens per budget, {}",
            a.device,
            prompt.len(),
            a.gen,
            source(a, a.ram_budget.first().copied())
        ),
        budget_name: "VRAM budget".into(),
        points: runs
            .iter()
            .map(|r| crate::plot::SweepPoint {
                budget_bytes: r.budget,
                decode_tps: r.decode_tps,
                hit_rate: r.hit_rate,
                llama_tps: None,
            })
            .collect(),
        llama_unlimited: None,
    };
    crate::plot::write_sweep_png(path, &sweep)
}

/// Where misses in VRAM come from, in words.
fn source(a: &MoeArgs, ram_budget: Option<u64>) -> String {
    match ram_budget {
        None => "misses read in place from (or copied out of) page-locked host RAM".into(),
        Some(b) => format!(
            "misses copied from a page-locked RAM cache (--ram-budget {}) over the model file{}",
            fmt_size(b),
            if a.cold { ", read cold" } else { "" }
        ),
    }
}
