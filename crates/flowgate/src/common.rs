//! Options and helpers shared by the commands.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flowgate_engine::backend::cuda::{CpuExperts, DeviceSpec, MissPath};
use flowgate_engine::residency::PolicyKind;
use flowgate_engine::runtime::{self, AnyLoaded, LoadOptions};
use flowgate_engine::sampling::SamplerConfig;

/// Where and how to run a model.
#[derive(ClapArgs, Clone, Debug)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (config.json + safetensors).
    pub model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Context length: positions the KV cache holds.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Where to run: auto (CUDA device 0 when CUDA is found, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Host memory the weights may use (e.g. 1.5GiB, 8GB). MoE experts that do not fit are
    /// paged in from the model file through a cache; the budget is never exceeded.
    #[arg(long, value_parser = parse_budget)]
    pub ram_budget: Option<u64>,
    /// Device memory flowgate may allocate (CUDA; e.g. 8GiB). Dense weights go to the GPU;
    /// MoE experts that do not fit stay in page-locked host RAM and are copied into a device
    /// cache as the router picks them; the budget is never exceeded.
    #[arg(long, value_parser = parse_budget)]
    pub vram_budget: Option<u64>,
    /// Under --vram-budget, missed experts computed on the CPU instead of copied to the GPU:
    /// auto (default: per layer, as many as finish no later than the copies, from measured
    /// costs), off, all.
    #[arg(long, default_value = "auto", value_parser = parse_cpu_experts)]
    pub cpu_experts: CpuExperts,
    /// Speculative prefetch of paged experts: the next sparse layer's router applied to this
    /// layer's input predicts its experts, which are brought in ahead (under --vram-budget
    /// copied into VRAM on a copy stream, under --ram-budget read into the RAM cache). Pays
    /// with trained routers; a wrong guess costs link or disk time and evicts an expert.
    #[arg(long)]
    pub expert_prefetch: bool,
    /// Under --vram-budget, how decode reaches a missed expert the CPU does not compute:
    /// in-place (default: the GPU reads it from page-locked host RAM over the link, no copy)
    /// or copy (into the device cache, evicting another). With --ram-budget misses are copied.
    #[arg(long, default_value = "in-place", value_parser = parse_miss_path)]
    pub miss_path: MissPath,
    /// Expert cache policy under --ram-budget / --vram-budget: lru or lfu (LFU with aging).
    #[arg(long, default_value = "lru", value_parser = parse_policy)]
    pub cache_policy: PolicyKind,
    /// Print where the weights were placed (dense part, expert cache, disk) on stderr.
    #[arg(long)]
    pub explain_placement: bool,
}

fn parse_budget(s: &str) -> std::result::Result<u64, String> {
    flowgate_engine::residency::parse_size(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_miss_path(s: &str) -> std::result::Result<MissPath, String> {
    MissPath::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_cpu_experts(s: &str) -> std::result::Result<CpuExperts, String> {
    CpuExperts::parse(s).map_err(|e| e.to_string())
}

fn parse_policy(s: &str) -> std::result::Result<PolicyKind, String> {
    PolicyKind::parse(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Sets up the thread pool and loads the model on the `--device` backend, with a progress
    /// bar on a terminal for models big enough to take a while (bytes, GB/s, ETA).
    pub fn load(&self) -> Result<AnyLoaded> {
        use std::io::IsTerminal;
        init_threads(self.threads)?;
        let mut opts = LoadOptions {
            ram_budget: self.ram_budget,
            vram_budget: self.vram_budget,
            cpu_experts: Some(self.cpu_experts),
            expert_prefetch: self.expert_prefetch,
            miss_path: Some(self.miss_path),
            ctx: self.ctx,
            cache_policy: self.cache_policy,
            ..Default::default()
        };
        let bar = match flowgate_formats::model::open(&self.model) {
            Ok(f) if std::io::stderr().is_terminal() && f.catalog.total_bytes() > 1 << 30 => {
                let b = indicatif::ProgressBar::new(f.catalog.total_bytes());
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "loading {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                let b2 = b.clone();
                opts.progress = Some(std::sync::Arc::new(move |done| b2.set_position(done)));
                Some(b)
            }
            // Errors surface, with context, from the load below.
            _ => None,
        };
        let r = runtime::load_on(&self.model, &opts, self.device).with_context(|| {
            format!(
                "loading {} (--device {})",
                self.model.display(),
                self.device
            )
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let r = r?;
        if self.explain_placement {
            eprint!("{}", explain(&r));
        }
        Ok(r)
    }
}

/// What `--explain-placement` prints: the residency plan, or why there is none.
fn explain(l: &AnyLoaded) -> String {
    let (plan, device, split, name) = flowgate_engine::with_loaded!(l, x => (
        x.residency.as_ref().map(|r| (r.plan.explain(), r.budget.used(), r.budget.peak())),
        x.device_plan().map(|p| p.explain()),
        x.split.as_ref().map(|s| s.explain()),
        x.model.backend_name()
    ));
    if device.is_some() || split.is_some() {
        // A split MoE model has both: which layers run where, then its expert cache.
        let text: String = [split, device].into_iter().flatten().collect();
        return format!("{text}  backend {name}\n");
    }
    match plan {
        Some((text, used, peak)) => format!(
            "{text}  accounting      in use {} (peak {}) right after loading; backend {name}\n",
            flowgate_engine::residency::fmt_size(used),
            flowgate_engine::residency::fmt_size(peak)
        ),
        None => format!(
            "placement: no --ram-budget, every weight resident ({}); backend {name}\n",
            flowgate_engine::residency::fmt_size(l.file().catalog.total_bytes())
        ),
    }
}

/// Installs the global compute pool.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    // A second call (tests in one process) keeps the first pool.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(n)
}

/// Sampling flags.
#[derive(ClapArgs, Clone, Debug)]
pub struct SampleArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// 1.0 = off.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// 1.0 = off (llama.cpp's default; Ollama uses 1.1).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    pub fn config(&self) -> Result<SamplerConfig> {
        if !self.temperature.is_finite() || !(0.0..=1.0).contains(&self.top_p) {
            bail!("--temperature must be finite and --top-p within 0..=1");
        }
        if !(0.0..=1.0).contains(&self.min_p)
            || self.repeat_penalty.is_nan()
            || self.repeat_penalty <= 0.0
        {
            bail!("--min-p must be within 0..=1 and --repeat-penalty positive");
        }
        Ok(SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        })
    }
}

/// Parses `1,2,3`.
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let v = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("'{t}' is not a token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if v.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(v)
}

/// Checks ids against the vocabulary.
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {t} is out of range: the vocabulary has {vocab} tokens");
    }
    Ok(())
}

/// Writes a line to stdout. When stdout is a closed pipe (`flowgate inspect … | head`), exits
/// quietly with success instead of panicking the way `println!` does.
pub fn emit_line(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{s}").and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` that survives a closed pipe (see [`emit_line`]).
macro_rules! outln {
    () => { $crate::common::emit_line("") };
    ($($t:tt)*) => { $crate::common::emit_line(&format!($($t)*)) };
}
