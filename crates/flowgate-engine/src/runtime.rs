//! [`load`]: from a path (GGUF file or HF directory) to a ready [`Loaded`] model with its
//! tokenizer and chat template, plus [`generate`], the prefill-then-decode loop shared by the
//! CLI commands.
//!
//! Devices: [`load`] builds the model on the CPU backend; [`load_with`] on any backend;
//! [`load_on`] resolves `--device auto|cpu|cuda[:N]` and returns an [`AnyLoaded`], an enum over
//! the backends that callers open with [`with_loaded!`](crate::with_loaded) so that one generic
//! function serves both. `auto` picks CUDA device 0 when the driver is present and a device
//! answers, else the CPU; an explicit `cuda` without CUDA is one clear error.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_formats::model::{ModelFile, ModelSource};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, DeviceSpec, ExpertPager, Resolved};
use crate::backend::Backend;
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
    /// `--ram-budget`: weights held in host memory stay within this many bytes; MoE experts
    /// that do not fit are paged from the model file through a cache (see [`crate::residency`]).
    pub ram_budget: Option<u64>,
    /// Eviction policy of that cache (and of the device expert cache).
    pub cache_policy: crate::residency::PolicyKind,
    /// `--vram-budget` (CUDA): device memory flowgate may allocate. The dense weights go to the
    /// device first; MoE experts that do not fit stay in page-locked host memory and are
    /// copied into a device cache of slots as the router asks for them
    /// (`backend::cuda::ExpertPager`).
    pub vram_budget: Option<u64>,
    /// Positions the KV cache will hold: sizes the device memory kept for it under
    /// `--vram-budget` (0: 4096).
    pub ctx: usize,
    /// Caps the device expert cache at this many slots (tests and benchmarks: a cache of one
    /// expert per layer); with it, an MoE model is paged even when the budget holds it all.
    pub expert_slots: Option<usize>,
    /// Under `--vram-budget`: which missed experts decode computes on the CPU.
    pub cpu_experts: Option<crate::backend::cuda::CpuExperts>,
    /// Speculative prefetch of paged experts (`--expert-prefetch`): the VRAM tier's when
    /// experts are paged into VRAM, else the RAM cache's.
    pub expert_prefetch: bool,
    /// Under `--vram-budget`: how decode reaches a missed expert (None: in place where the
    /// host tier allows it, see `ExpertPager::set_miss_path`).
    pub miss_path: Option<crate::backend::cuda::MissPath>,
}

impl LoadOptions {
    /// Reader threads for weight loading: `io_threads`, or the loader's default.
    pub fn loader_threads(&self) -> usize {
        if self.io_threads == 0 {
            flowgate_io::LoaderOptions::default().threads
        } else {
            self.io_threads
        }
    }
}

/// A model ready to run on backend `B` (the CPU by default), with what is needed to talk to it.
pub struct Loaded<B: Backend = CpuBackend> {
    pub file: ModelFile,
    pub model: Model<B>,
    pub tokenizer: Option<Tokenizer>,
    pub chat: Option<ChatTemplate>,
    pub load_time: Duration,
    /// The placement and accounting of a load under `--ram-budget`.
    pub residency: Option<crate::residency::Residency>,
    /// The device expert tier when `--vram-budget` pages experts (its plan: [`Loaded::device_plan`]).
    pub pager: Option<Arc<ExpertPager>>,
    /// Which layers run on the CPU when `--vram-budget` cannot hold the dense weights.
    pub split: Option<crate::residency::LayerSplit>,
    /// The CPU layers' weights, page-locked (a long prompt copies them to the device).
    pub pinned: Option<crate::backend::cuda::PinnedArenas>,
}

impl<B: Backend> Loaded<B> {
    /// The placement under `--vram-budget`, when experts are paged.
    pub fn device_plan(&self) -> Option<crate::residency::DevicePlan> {
        self.pager.as_ref().and_then(|p| p.plan())
    }

    /// Logs the expert caches' statistics since the last call (then resets them): one
    /// `tracing` event per tier that pages (`ram`: `--ram-budget`'s host cache, `vram`:
    /// `--vram-budget`'s device cache), with the hit rate (all layers and per layer), bytes
    /// moved, time stalled and speculative-prefetch accuracy per token over `tokens` tokens.
    pub fn log_expert_stats(&self, tokens: usize) {
        if let Some(c) = self.residency.as_ref().and_then(|r| r.cache.as_ref()) {
            log_tier("ram", &c.stats(), tokens);
            c.reset_stats();
        }
        if let Some(p) = &self.pager {
            log_tier("vram", &p.stats(), tokens);
            p.reset_stats();
        }
    }
}

fn log_tier(tier: &str, s: &crate::residency::CacheStats, tokens: usize) {
    let n = tokens.max(1) as f64;
    let per_layer: Vec<String> = s
        .hit_rate_per_layer()
        .into_iter()
        .flatten()
        .map(|r| format!("{r:.2}"))
        .collect();
    tracing::info!(
        tier,
        tokens,
        hit_rate = s.hit_rate(),
        hits = s.total_hits(),
        misses = s.total_misses(),
        bytes_per_token = s.bytes_read as f64 / n,
        stall_ms_per_token = 1e3 * s.stall.as_secs_f64() / n,
        evictions = s.evictions,
        prefetched = s.prefetched,
        prefetch_accuracy = s.prefetch_accuracy(),
        cpu_experts = s.cpu_computed,
        hit_rate_per_layer = %per_layer.join(" "),
        "expert cache statistics"
    );
}

/// Opens and loads a model on the CPU backend.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    load_with(path, opts, CpuBackend)
}

/// A loaded model on whichever backend `--device` resolved to (one per process: the size
/// difference between the variants does not matter).
#[allow(clippy::large_enum_variant)]
pub enum AnyLoaded {
    Cpu(Loaded<CpuBackend>),
    Cuda(Loaded<CudaBackend>),
}

/// Runs `$body` with `$l` bound to the [`Loaded`] inside an [`AnyLoaded`], whatever its
/// backend (the body is compiled once per backend).
#[macro_export]
macro_rules! with_loaded {
    ($any:expr, $l:ident => $body:expr) => {
        match $any {
            $crate::runtime::AnyLoaded::Cpu($l) => $body,
            $crate::runtime::AnyLoaded::Cuda($l) => $body,
        }
    };
}

impl AnyLoaded {
    pub fn file(&self) -> &ModelFile {
        with_loaded!(self, l => &l.file)
    }
    pub fn backend_name(&self) -> String {
        with_loaded!(self, l => l.model.backend_name())
    }
}

/// Which backend a device spec selects on this machine (`auto` never fails).
pub fn resolve_device(spec: DeviceSpec) -> Result<Resolved> {
    flowgate_cuda::resolve(spec).map_err(|e| EngineError::Invalid(e.to_string()))
}

/// Opens and loads a model on the device `spec` resolves to.
pub fn load_on(path: &Path, opts: &LoadOptions, spec: DeviceSpec) -> Result<AnyLoaded> {
    match resolve_device(spec)? {
        Resolved::Cpu if opts.vram_budget.is_some() => Err(EngineError::Invalid(
            "--vram-budget needs a GPU (--device cuda); on the CPU use --ram-budget".into(),
        )),
        Resolved::Cpu => Ok(AnyLoaded::Cpu(load_with(path, opts, CpuBackend)?)),
        Resolved::Cuda(n) => match opts.vram_budget {
            None => Ok(AnyLoaded::Cuda(load_with(
                path,
                opts,
                CudaBackend::new(n)?,
            )?)),
            Some(budget) => Ok(AnyLoaded::Cuda(load_cuda_budget(path, opts, n, budget)?)),
        },
    }
}

/// Device memory kept free under `--vram-budget` for the KV cache (`ctx` positions, f32 keys
/// and values) and activations ([`activation_reserve`]).
pub fn device_reserve(spec: &flowgate_formats::ModelSpec, ctx: usize) -> u64 {
    spec.n_layers as u64 * kv_layer_bytes(spec, ctx) + activation_reserve(spec)
}

/// One layer's KV cache of `ctx` positions (0: 4096), f32 keys and values.
pub fn kv_layer_bytes(spec: &flowgate_formats::ModelSpec, ctx: usize) -> u64 {
    let ctx = if ctx == 0 { 4096 } else { ctx } as u64;
    2 * 4 * (spec.n_kv_heads * spec.head_dim) as u64 * ctx
}

/// Activations under `--vram-budget`: a 512-token prefill batch of every intermediate, twice
/// (the activation pool keeps freed buffers for reuse), a 128 MiB prefill tile and the logits.
pub fn activation_reserve(spec: &flowgate_formats::ModelSpec) -> u64 {
    let (k, eff) = spec
        .moe
        .as_ref()
        .map_or((1, 0), |m| (m.n_experts_used, m.expert_ffn));
    let per_token = 8 * spec.hidden
        + (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim
        + 3 * spec.ffn.max(2 * k * eff)
        + 2 * k * spec.hidden;
    let act = 2 * 512 * 4 * per_token as u64;
    act + (128 << 20) + 8 * spec.vocab_size as u64
}

/// Loads on CUDA device `ordinal` with every device allocation charged to `budget` bytes. An
/// MoE model that does not fit whole keeps its experts in page-locked host memory and pages
/// them through a device cache of what the dense weights and [`device_reserve`] leave. A dense
/// model that does not fit runs its leading layers on the CPU ([`crate::residency::LayerSplit`]).
pub fn load_cuda_budget(
    path: &Path,
    opts: &LoadOptions,
    ordinal: usize,
    budget: u64,
) -> Result<Loaded<CudaBackend>> {
    let device = flowgate_cuda::Device::open(ordinal)
        .map_err(|e| EngineError::Invalid(format!("CUDA: {e}")))?;
    let backend = CudaBackend::with_budget(device, budget)?;
    let file = flowgate_formats::model::open(path)?;
    let reserve = device_reserve(&file.spec, opts.ctx);
    let total = file.catalog.total_bytes();
    if file.spec.moe.is_none() || (total + reserve <= budget && opts.expert_slots.is_none()) {
        if total + reserve > budget {
            let split =
                crate::residency::LayerSplit::plan(&split_input(&file, opts.ctx, budget, false)?)?;
            return load_layer_split(file, opts, backend, split);
        }
        return load_with(path, opts, backend);
    }
    let t0 = Instant::now();
    let (tokenizer, chat) = tokenizer_and_template(&file)?;
    let split = moe_layer_split(&file, opts, budget)?;
    if let Some(s) = &split {
        if !(s.n_host..s.n_layers).any(|l| file.spec.is_sparse_layer(l)) {
            // No sparse layer left on the GPU: nothing to page.
            let s = s.clone();
            return load_layer_split(file, opts, backend, s);
        }
    }
    let (model, pager, residency) = match (opts.ram_budget, &split) {
        (None, _) => {
            let n_host = split.as_ref().map_or(0, |s| s.n_host);
            let (model, pager) = load_experts_pinned(&file, opts, backend, None, n_host)?;
            (model, pager, None)
        }
        (Some(ram), None) => load_three_tiers(&file, opts, backend, ram)?,
        (Some(_), Some(s)) => {
            return Err(EngineError::Invalid(format!(
                "--vram-budget {} cannot hold the dense weights of every layer, and running \
                 {} of them on the CPU under --ram-budget is not supported: drop --ram-budget \
                 (experts then stay in RAM) or raise --vram-budget",
                crate::residency::fmt_size(budget),
                s.n_host
            )))
        }
    };
    // The KV cache of the CPU layers is in host RAM. (The split's `act_bytes` holds a margin
    // for the slots' mapping in whole units on top of the activations: it is left to the slots.)
    let reserve = split.as_ref().map_or(reserve, |s| {
        s.kv_device_bytes + activation_reserve(&file.spec)
    });
    let plan = pager.provision(&model.backend, reserve, opts.expert_slots)?;
    if let Some(m) = opts.cpu_experts {
        pager.set_cpu_experts(m)?;
    }
    pager.set_prefetch(opts.expert_prefetch);
    if let Some(m) = opts.miss_path {
        pager.set_miss_path(m);
    }
    tracing::info!(
        slots = plan.n_slots,
        dense_bytes = plan.dense_bytes,
        "expert cache provisioned under --vram-budget"
    );
    Ok(Loaded {
        file,
        model,
        tokenizer,
        chat,
        load_time: t0.elapsed(),
        residency,
        pager: Some(pager),
        split,
        pinned: None,
    })
}

/// The GPU layer split of an MoE model whose experts are paged: `None` when the dense weights,
/// one expert slot per sparse layer and [`device_reserve`] fit `budget` (no layer leaves the
/// device), else the fewest leading layers, whole with their experts, to run on the CPU so
/// that the rest fit with one slot each.
fn moe_layer_split(
    file: &ModelFile,
    opts: &LoadOptions,
    budget: u64,
) -> Result<Option<crate::residency::LayerSplit>> {
    use crate::residency::{layer_split, LayerSplit};
    let mut split = LayerSplit::plan(&split_input(file, opts.ctx, budget, true)?)?;
    if !split.is_split() {
        return Ok(None);
    }
    // What the CPU layers really hold: their experts too.
    let (whole, _, embd) = layer_split::layer_bytes(&file.spec, &file.catalog);
    split.host_bytes = whole[..split.n_host].iter().sum::<u64>() + embd;
    Ok(Some(split))
}

/// What [`LayerSplit::plan`](crate::residency::LayerSplit::plan) weighs for `file` under
/// `budget` with a KV cache of `ctx` positions. `paged`: the model's experts are paged, so a
/// sparse layer on the GPU holds its dense weights, one expert slot and its slot tables; the
/// slots are mapped in chunks of 2 MiB units (a chunk per 64 MiB of slots), so each slot counts
/// a 32nd more and the activations 3 MiB more (one unit of rounding, with room to spare).
pub fn split_input(
    file: &ModelFile,
    ctx: usize,
    budget: u64,
    paged: bool,
) -> Result<crate::residency::SplitInput> {
    use crate::residency::{layer_split, ExpertLayout, SplitInput};
    let spec = &file.spec;
    let (mut layer_bytes, head_bytes, embd_bytes, act_bytes) = if paged {
        let (l, h, e) = layer_split::dense_layer_bytes(spec, &file.catalog);
        (l, h, e, activation_reserve(spec) + (3 << 20))
    } else {
        let (l, h, e) = layer_split::layer_bytes(spec, &file.catalog);
        (l, h, e, activation_reserve(spec))
    };
    if paged {
        let slot = ExpertLayout::new(spec, &file.catalog)?.slot_bytes;
        let n_experts = spec.moe.as_ref().map_or(0, |m| m.n_experts) as u64;
        for (l, b) in layer_bytes.iter_mut().enumerate() {
            if spec.is_sparse_layer(l) {
                *b += slot + 24 * n_experts + slot / 32;
            }
        }
    }
    Ok(SplitInput {
        budget,
        layer_bytes,
        kv_layer_bytes: kv_layer_bytes(spec, ctx),
        head_bytes,
        embd_bytes,
        act_bytes,
        // A dense model's CPU layers run on the GPU for long prompts (sparse ones stay).
        staging: !paged && spec.moe.is_none(),
    })
}

/// Loads a GPU layer split with no expert paging (a dense model, or an MoE model whose sparse
/// layers all run on the CPU): `split`'s leading layers on the CPU, from host RAM with their
/// KV cache, the rest whole on the device.
fn load_layer_split(
    file: ModelFile,
    opts: &LoadOptions,
    backend: CudaBackend,
    split: crate::residency::LayerSplit,
) -> Result<Loaded<CudaBackend>> {
    use crate::residency::Budget;
    let t0 = Instant::now();
    // Every weight passes through host RAM; the CPU layers' stay there.
    let ram = opts.ram_budget.map(|b| Budget::new("RAM", b));
    if let Some(r) = &ram {
        r.charge(
            file.catalog.total_bytes(),
            "the weights on their way to the CPU and GPU layers",
        )?;
    }
    let (tokenizer, chat) = tokenizer_and_template(&file)?;
    // The CPU layers' tensors in arenas of their own (page-locked below), the GPU layers' in
    // others that are freed once on the device.
    let n_host = split.n_host;
    let on_host = |t: &flowgate_formats::catalog::TensorInfo| {
        t.name == flowgate_formats::catalog::names::TOKEN_EMBD
            || crate::residency::layer_split::layer_of(&t.name).is_some_and(|l| l < n_host)
    };
    let threads = opts.loader_threads();
    let mut tensors =
        crate::weights::load_selected(&file.catalog, on_host, threads, opts.progress.clone())?;
    let host_arenas: Vec<_> = tensors.values().map(|t| t.storage().clone()).collect();
    let base: u64 = file
        .catalog
        .iter()
        .filter(|t| on_host(t))
        .map(|t| t.nbytes)
        .sum();
    let progress = opts.progress.clone().map(|p| {
        let p: flowgate_io::Progress = Arc::new(move |done| p(base + done));
        p
    });
    tensors.extend(crate::weights::load_selected(
        &file.catalog,
        |t| !on_host(t),
        threads,
        progress,
    )?);
    let pinned = crate::backend::cuda::PinnedArenas::pin(&backend, host_arenas)?;
    let mut model = Model::with_layer_split(file.spec.clone(), backend, tensors, split.n_host)?;
    // No room kept on the device for a CPU layer, or FLOWGATE_PREFILL_OFFLOAD=0 (to compare):
    // prompts stay on the CPU.
    if split.staging_bytes == 0
        || std::env::var_os("FLOWGATE_PREFILL_OFFLOAD").is_some_and(|v| v == "0")
    {
        model.set_prefill_offload(None);
    }
    if let Some(r) = &ram {
        r.release(file.catalog.total_bytes().saturating_sub(split.host_bytes));
    }
    tracing::info!(
        cpu_layers = split.n_host,
        gpu_layers = split.n_layers - split.n_host,
        host_bytes = split.host_bytes,
        device_bytes = split.device_bytes,
        "GPU layer split under --vram-budget"
    );
    Ok(Loaded {
        file,
        model,
        tokenizer,
        chat,
        load_time: t0.elapsed(),
        residency: None,
        pager: None,
        split: Some(split),
        pinned: Some(pinned),
    })
}

/// The dense weights onto the device and every expert into page-locked host RAM (charged to
/// `ram`, the `--ram-budget` accounting, when given).
fn load_experts_pinned(
    file: &ModelFile,
    opts: &LoadOptions,
    backend: CudaBackend,
    ram: Option<&crate::residency::Budget>,
    n_host: usize,
) -> Result<(Model<CudaBackend>, Arc<ExpertPager>)> {
    if let Some(b) = ram {
        b.charge(
            file.catalog.total_bytes(),
            "the weights (experts stay in RAM)",
        )?;
    }
    // Page-locked below: anonymous memory, not mappings of the page cache.
    let mut tensors = crate::weights::load_all_anonymous(
        &file.catalog,
        opts.loader_threads(),
        opts.progress.clone(),
    )?;
    let pager = ExpertPager::new(
        &backend,
        &file.spec,
        &mut tensors,
        opts.cache_policy,
        n_host,
    )?;
    backend.set_expert_pager(pager.clone());
    let mut model = Model::with_layer_split(file.spec.clone(), backend, tensors, n_host)?;
    // The split of a paged model keeps no room for a CPU layer: its prompts stay on the CPU.
    model.set_prefill_offload(None);
    if let Some(b) = ram {
        // The dense weights' host copies are gone, now on the device.
        let experts = pager.experts_bytes();
        b.release(file.catalog.total_bytes().saturating_sub(experts));
    }
    Ok((model, pager))
}

/// `--vram-budget` with `--ram-budget`: three tiers. The dense weights pass through host RAM
/// (charged to the RAM budget while they do) onto the device; then what the RAM budget
/// leaves becomes a RAM cache of experts over the model file ([`crate::residency::HostExpertCache`],
/// its slots page-locked), under the device cache of slots. A RAM budget that holds every
/// expert keeps them all in page-locked RAM instead (no reads from the file after loading).
fn load_three_tiers(
    file: &ModelFile,
    opts: &LoadOptions,
    backend: CudaBackend,
    ram: u64,
) -> Result<(
    Model<CudaBackend>,
    Arc<ExpertPager>,
    Option<crate::residency::Residency>,
)> {
    use crate::residency::{Budget, ExpertLayout, HostExpertCache, HostPlan};
    let budget = Arc::new(Budget::new("RAM", ram));
    let layout = ExpertLayout::new(&file.spec, &file.catalog)?;
    let dense = file.catalog.total_bytes() - layout.total_bytes;
    // What stays in RAM once loaded: experts only (the dense weights are on the device).
    let mut plan = HostPlan {
        budget: ram,
        dense_bytes: 0,
        n_dense_tensors: 0,
        experts_bytes: layout.total_bytes,
        experts: Some(layout.clone()),
        resident_all: dense + layout.total_bytes <= ram,
        n_slots: 0,
        policy: opts.cache_policy,
    };
    if plan.resident_all {
        let (model, pager) = load_experts_pinned(file, opts, backend, Some(&budget), 0)?;
        let res = crate::residency::Residency {
            plan,
            budget,
            cache: None,
        };
        return Ok((model, pager, Some(res)));
    }
    budget.charge(dense, "the dense weights on their way to the device")?;
    let tensors = crate::weights::load_selected(
        &file.catalog,
        |t| !ExpertLayout::is_expert_tensor(&t.name),
        opts.loader_threads(),
        opts.progress.clone(),
    )?;
    let pager = ExpertPager::over_file(&backend, &file.spec, &layout, opts.cache_policy)?;
    backend.set_expert_pager(pager.clone());
    let model = Model::new(file.spec.clone(), backend, tensors)?;
    budget.release(dense);
    let n_slots = ((budget.available() / layout.slot_bytes) as usize).min(layout.n_paged());
    if n_slots < pager.min_ram_slots() {
        return Err(EngineError::Invalid(format!(
            "--ram-budget {} holds {n_slots} expert slots of {}; under --vram-budget the RAM \
             cache needs at least {} ({} in all)",
            crate::residency::fmt_size(ram),
            crate::residency::fmt_size(layout.slot_bytes),
            pager.min_ram_slots(),
            crate::residency::fmt_size(pager.min_ram_slots() as u64 * layout.slot_bytes)
        )));
    }
    let cache = Arc::new(HostExpertCache::new(
        layout,
        file.catalog.files.clone(),
        n_slots,
        opts.cache_policy,
        budget.clone(),
        opts.io_threads,
    )?);
    pager.attach_cache(&model.backend, cache.clone())?;
    plan.n_slots = n_slots;
    let res = crate::residency::Residency {
        plan,
        budget,
        cache: Some(cache),
    };
    Ok((model, pager, Some(res)))
}

type TokenizerAndTemplate = (Option<Tokenizer>, Option<ChatTemplate>);

fn tokenizer_and_template(file: &ModelFile) -> Result<TokenizerAndTemplate> {
    Ok(match &file.source {
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
    })
}

/// Opens and loads a model on `backend`.
pub fn load_with<B: Backend>(path: &Path, opts: &LoadOptions, backend: B) -> Result<Loaded<B>> {
    let t0 = Instant::now();
    let file = flowgate_formats::model::open(path)?;
    let (tokenizer, chat) = tokenizer_and_template(&file)?;
    let threads = opts.loader_threads();
    let (model, residency) = match opts.ram_budget {
        Some(budget) => {
            let (tensors, res) = crate::residency::load_host(
                &file,
                budget,
                opts.cache_policy,
                opts.io_threads,
                opts.progress.clone(),
            )?;
            if let Some(c) = &res.cache {
                c.set_speculative(opts.expert_prefetch);
            }
            let model =
                Model::with_expert_cache(file.spec.clone(), backend, tensors, res.cache.clone())?;
            (model, Some(res))
        }
        None => {
            let tensors = crate::weights::load_all(&file.catalog, threads, opts.progress.clone())?;
            (Model::new(file.spec.clone(), backend, tensors)?, None)
        }
    };
    Ok(Loaded {
        file,
        model,
        tokenizer,
        chat,
        load_time: t0.elapsed(),
        residency,
        pager: None,
        split: None,
        pinned: None,
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
pub fn generate<B: Backend>(
    model: &Model<B>,
    cache: &mut KvCache<B>,
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
