//! The CUDA backend: [`CudaBackend`] runs every [`Backend`] operation on one GPU.
//!
//! Design choices:
//! - **Weights stay in their file dtype.** A [`CudaWeight`] is the tensor's bytes (GGUF blocks
//!   or F32/F16/BF16) copied once into device memory; every format of flowgate-formats is
//!   supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). The kernels of
//!   `kernels/matvec_quant.cu` decode blocks as they stream them: one token (decode) runs
//!   `matvec1` (one warp per row, or a few warps per row for matrices of few rows), products
//!   that read the same input (q/k/v, gate/up, a MoE layer's chosen experts) run as one
//!   grouped launch (`matvec1g`, pointers passed by value); 2–8 tokens run `matvec`, which
//!   shares each decoded weight between the tokens. Larger batches (prefill) dequantise row
//!   tiles to f32 and multiply them with cuBLAS SGEMM: plain FP32 for F32/F16/BF16 weights
//!   (float models keep their precision), TF32 tensor cores for quantised weights (inputs
//!   rounded to 10 mantissa bits, f32 accumulation: ~3e-4 relative, far below the weights' own
//!   4–8-bit rounding; `FLOWGATE_CUDA_TF32=0` turns it off). Decode products of Q4_K run on
//!   activations quantised to 8 bits per 32 values with dp4a (`kernels/matvec_q8.cu`, as
//!   llama.cpp's MMVQ: 2× the bandwidth of the f32 kernel, ~4e-3 relative error per product);
//!   every other format, and Q4_K with `FLOWGATE_CUDA_Q8=0` or
//!   [`CudaBackend::set_q8_activations`], keeps f32 activations and float-rounding agreement
//!   with a float64 reference. The one-row `add_rms_norm`, `silu_mul` and decode attention
//!   also write their output's 8-bit form (bit-identical to `quantize_q8`'s), which the next mat-vec reads
//!   instead of quantising again, valid only while nothing else has been queued (`seq`).
//!   Prefill SwiGLU of quantised experts dequantises gate and up into one tile for one GEMM.
//! - **Attention.** Decode: split-K over the cache with the last block merging
//!   (`attention.cu`); the kernel also does the token's per-head norms, RoPE (from a
//!   (cos, sin) table per position, `rope_table`) and KV store (`rope_attention`: one launch
//!   where `qk_rope_kv` and `attention` were two; `FLOWGATE_CUDA_ROPE_IN_ATTENTION=0` keeps
//!   them). Prefill: a flash-attention-style kernel (`attention_prefill.cu`: 64
//!   query rows per block, grouped-query heads sharing the key tiles, FP32, online softmax)
//!   for head dims 64 and 128; `FLOWGATE_CUDA_ATTN=basic` (or
//!   [`CudaBackend::set_prefill_attention`]) keeps the one-query kernel for comparison.
//! - **Kernels are CUDA C in `kernels/`**, one file per family (`matvec_quant.cu`,
//!   `matvec_q8.cu`, `norm.cu`, `rope.cu`, `attention.cu`, `attention_prefill.cu`, `moe.cu`,
//!   `elementwise.cu`), with
//!   the shared helpers of `common.cuh` and the block formats of `quant.cuh` prepended; they are
//!   embedded with `include_str!` and compiled by NVRTC for the device's compute capability
//!   through flowgate-cuda's [`flowgate_cuda::KernelCache`] (cached on disk).
//! - **One stream, no host synchronisation inside a decode step**: MoE layers with resident
//!   experts route on the device ([`Backend::moe_decode`]: router top-k, expert-indexed
//!   products through a device table of expert addresses); the host reads values only through
//!   [`Backend::to_host`] (the logits at the end; in prefill the chosen experts and weights of
//!   every token, routed on the device by [`Backend::route_tokens`], once per MoE layer; the
//!   routes of paged experts). Small host inputs (token ids, row indices of prefill gathers) are queued with
//!   asynchronous pageable copies, which the driver stages before returning; decode-sized ones
//!   go as kernel parameters. Two chains are fused to cut the number of launches (residual
//!   add with RMSNorm; q/k norm, RoPE and KV write, for any number of tokens).
//! - **Decode steps are CUDA graphs** (`graph.rs`): the first step on a KV cache is captured,
//!   later ones replay it with their token and position read from device memory (one
//!   `cuGraphLaunch` per token instead of ~330–680 launches). On Hopper the kernels of the
//!   chain use programmatic dependent launch (`PDL_KERNELS`): each may start while the one
//!   before finishes, the mat-vecs prefetching their weights into L2 meanwhile.
//! - **Activation buffers come from a pool** ([`CudaBuf`] returns its memory on drop): a forward
//!   pass allocates the same sizes every step, and `cuMemFree` would synchronise the device.
//!   Every allocation (weights, KV, pool) is charged to one [`flowgate_cuda::MemoryBudget`]:
//!   cached pool memory counts as in use.
//! - **Errors.** The trait's compute operations return nothing (the CPU cannot fail there); a
//!   failed launch or allocation here is recorded and reported by [`Backend::check`], which
//!   `Model::forward` calls before returning logits — a clear error, never a panic.
//! - **Profiling.** With `FLOWGATE_CUDA_PROFILE=1` every launch and copy is bracketed by events
//!   and [`CudaBackend::profile_report`] gives device time per kernel (`flowgate bench decode
//!   --device cuda` prints it), plus host time in rows named "(host) …": waiting in
//!   `to_host`, queueing launches, queueing GEMMs (a host that never waits is the bottleneck).

use std::sync::{Arc, Mutex, MutexGuard};

use flowgate_cuda::cudarc::driver::{sys, LaunchConfig, PushKernelArg};
use flowgate_cuda::{Blas, CudaError, Device, DeviceAllocator, DeviceBuffer, Kernel, Stream};
use flowgate_formats::{DType, RopeStyle};

use super::{swiglu, AttnParams, Backend, QkRope, Route, ScatterPart, StepGraph, SwiGluJob};
use crate::error::{EngineError, Result};
use crate::weights::HostTensor;

pub use flowgate_cuda::{Cuda, DeviceSpec, Resolved};

mod graph;
mod layer_timeline;
mod paging;
mod pinned_tier;
pub use paging::{CpuExperts, CpuGate, ExpertPager, MissPath, PagedLayer};
pub use pinned_tier::PinnedArenas;

const COMMON_CUH: &str = include_str!("kernels/common.cuh");
const QUANT_CUH: &str = include_str!("kernels/quant.cuh");
const MATVEC_CU: &str = include_str!("kernels/matvec_quant.cu");
const MATVEC_Q8_CU: &str = include_str!("kernels/matvec_q8.cu");
const MOE_CU: &str = include_str!("kernels/moe.cu");
const NORM_CU: &str = include_str!("kernels/norm.cu");
const ROPE_CU: &str = include_str!("kernels/rope.cu");
const ATTENTION_CU: &str = include_str!("kernels/attention.cu");
const ATTENTION_PREFILL_CU: &str = include_str!("kernels/attention_prefill.cu");
const ELEMENTWISE_CU: &str = include_str!("kernels/elementwise.cu");

/// Batches up to this many tokens use the mat-vec kernels (their `MAXT`); more use GEMM.
pub const MATVEC_MAX_TOKENS: usize = 8;
/// Dequantised prefill tiles hold at most this many f32 values (128 MiB).
const TILE_FLOATS: usize = 32 << 20;
/// Device memory left to the driver, cuBLAS and other processes when sizing the budget.
const HEADROOM: usize = 768 << 20;

/// Kernel-name suffixes, indexed by [`dtype_index`].
const DTYPE_NAMES: [&str; 11] = [
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k",
];

/// A weight format's kernel index: its place in [`DType::ALL`] (whose first 11 formats are the
/// weight formats, in [`DTYPE_NAMES`]' order); `None` for Q8_K.
fn dtype_index(d: DType) -> Option<usize> {
    DType::ALL[..DTYPE_NAMES.len()].iter().position(|&x| x == d)
}

/// The full source of one kernel family, as NVRTC compiles it.
pub fn kernel_source(family: &str) -> Option<String> {
    let body = match family {
        "matvec_quant" => MATVEC_CU,
        "matvec_q8" => MATVEC_Q8_CU,
        "moe" => MOE_CU,
        "norm" => NORM_CU,
        "rope" => ROPE_CU,
        "attention" => ATTENTION_CU,
        "attention_prefill" => ATTENTION_PREFILL_CU,
        "elementwise" => ELEMENTWISE_CU,
        _ => return None,
    };
    Some(format!("{COMMON_CUH}\n{QUANT_CUH}\n{body}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cuda_err(e: CudaError) -> EngineError {
    EngineError::Invalid(format!("CUDA: {e}"))
}

/// Recycles device allocations for activations.
struct Pool {
    alloc: DeviceAllocator,
    free: Mutex<Vec<DeviceBuffer>>,
    /// While a decode step is being recorded: where buffers taken meanwhile go on release
    /// (the graph's, see `graph.rs`).
    recording: Mutex<Option<graph::Held>>,
}

impl Pool {
    fn round(bytes: usize) -> usize {
        if bytes <= 1 << 20 {
            bytes.max(256).next_power_of_two()
        } else {
            bytes.div_ceil(1 << 20) << 20
        }
    }

    fn get(&self, bytes: usize) -> std::result::Result<DeviceBuffer, CudaError> {
        {
            let mut free = lock(&self.free);
            let limit = bytes.saturating_mul(2).max(bytes + (1 << 20));
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= bytes && b.len() <= limit)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(free.swap_remove(i));
            }
        }
        let size = Self::round(bytes);
        match self.alloc.alloc(size) {
            Ok(b) => Ok(b),
            Err(_) => {
                // Give the cached buffers back to the driver and try once more.
                lock(&self.free).clear();
                let r = self.alloc.alloc(size);
                if r.is_err() && std::env::var_os("FLOWGATE_CUDA_ALLOC_TRACE").is_some() {
                    tracing::error!(
                        bytes = size,
                        "activation allocation refused by the budget at\n{}",
                        std::backtrace::Backtrace::force_capture()
                    );
                }
                r
            }
        }
    }

    fn put(&self, b: DeviceBuffer) {
        let mut free = lock(&self.free);
        if free.len() < 256 {
            free.push(b);
        }
    }

    /// A buffer for `bytes`, with the graph it belongs to if one is being recorded.
    fn take(&self, bytes: usize) -> std::result::Result<PoolMem, CudaError> {
        let mem = self.get(bytes)?;
        Ok(PoolMem {
            mem,
            held: lock(&self.recording).clone(),
        })
    }

    fn release(&self, m: PoolMem) {
        match m.held {
            Some(h) => lock(&h).push(m.mem),
            None => self.put(m.mem),
        }
    }
}

/// Pool memory and, if it was taken while a decode step was being recorded, the graph that
/// owns it once released.
struct PoolMem {
    mem: DeviceBuffer,
    held: Option<graph::Held>,
}

/// f32 activations on the device. Its memory goes back to the backend's pool on drop.
pub struct CudaBuf {
    mem: Option<PoolMem>,
    len: usize,
    pool: Arc<Pool>,
}

impl CudaBuf {
    /// Number of f32 values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> u64 {
        self.mem.as_ref().map_or(0, |m| m.mem.ptr())
    }

    fn capacity(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.mem.len() / 4)
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            self.pool.release(m);
        }
    }
}

/// A weight's device memory: its own allocation, or a view of memory owned elsewhere (a slot
/// of the paged expert cache).
enum WMem {
    Owned(DeviceBuffer),
    View { ptr: u64, len: usize },
}

impl WMem {
    fn ptr(&self) -> u64 {
        match self {
            WMem::Owned(b) => b.ptr(),
            WMem::View { ptr, .. } => *ptr,
        }
    }
    fn len(&self) -> usize {
        match self {
            WMem::Owned(b) => b.len(),
            WMem::View { len, .. } => *len,
        }
    }
}

/// A weight matrix in device memory, in its file dtype.
pub struct CudaWeight {
    mem: WMem,
    dtype: DType,
    kind: usize,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl CudaWeight {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn bytes(&self) -> usize {
        self.mem.len()
    }
}

/// One layer's keys and values: `capacity × n_kv_heads × head_dim` f32 each, position-major.
pub struct CudaKv {
    k: DeviceBuffer,
    v: DeviceBuffer,
    width: usize,
    capacity: usize,
}

/// A sparse layer's experts for [`Backend::moe_decode`]: device tables of the experts' gate,
/// up and down matrix addresses (the matrices stay owned by the model), and their shapes.
pub struct CudaExperts {
    tables: CudaBuf,
    n: usize,
    kind: usize,
    ffn: usize,
    hidden: usize,
    row_bytes: usize,
    down_kind: usize,
    down_row_bytes: usize,
    /// Paged through a device expert cache (`--vram-budget`): the table holds the addresses
    /// of the resident experts' slots.
    paged: Option<PagedLayer>,
}

/// A kernel with its name (for the profile).
struct K {
    f: Kernel,
    name: String,
    /// Written for programmatic dependent launch (see [`PDL_KERNELS`]).
    pdl: bool,
}

/// Warps (one per row) per SM up to which a decode mat-vec launch counts as one wave and uses
/// `matvec1q8u_*`: on the H100 the q/k/v, output and down products of dense8b (≤ 6144 rows on
/// 132 SMs) do, its gate/up pair (28,672 rows) does not (two steps gained nothing there).
const ONE_WAVE_WARPS_PER_SM: usize = 48;

/// How the decode attention splits the keys: about `keys_per_warp` keys per warp of a split
/// (default 2, `FLOWGATE_CUDA_ATTN_KEYS_PER_WARP`), at most `max` splits (`MAXSPLITS`, 128, in
/// attention.cu; `FLOWGATE_CUDA_ATTN_MAX_SPLITS`). By default the most is what makes about
/// [`ATTN_BLOCKS_PER_SM`] blocks a SM.
#[derive(Clone, Copy)]
struct AttnSplits {
    keys_per_warp: usize,
    max: Option<usize>,
}

/// Decode attention blocks per SM that the splits aim at, at most. On the H100 (moe30b, 32
/// heads: 17 splits) against the former cap of 128 splits, the attention of a decode step took
/// 0.88 against 1.61 ms after 512 positions, 1.93 against 3.11 ms after 2048, and the same
/// after 64 or 128 (`FLOWGATE_CUDA_PROFILE=1 bench decode`): more splits than that only add
/// blocks whose fixed work (the query's norm and rotation, the merge) outweighs their keys.
const ATTN_BLOCKS_PER_SM: usize = 4;

impl AttnSplits {
    /// The most splits for `blocks` (token, head) blocks on `sms` SMs.
    fn max_for(&self, blocks: usize, sms: usize) -> usize {
        self.max
            .unwrap_or_else(|| (ATTN_BLOCKS_PER_SM * sms).div_ceil(blocks.max(1)))
            .clamp(1, 128)
    }
}

impl AttnSplits {
    fn from_env() -> AttnSplits {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        };
        AttnSplits {
            keys_per_warp: var("FLOWGATE_CUDA_ATTN_KEYS_PER_WARP")
                .filter(|&k| k > 0)
                .unwrap_or(2),
            max: var("FLOWGATE_CUDA_ATTN_MAX_SPLITS").map(|v| v.clamp(1, 128)),
        }
    }
}

/// Whether an on-by-default switch of the environment (`FLOWGATE_CUDA_…`) is on: anything
/// but `0`, or unset.
fn switch_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// Reads back to the host of at least this many bytes go through page-locked staging.
const PINNED_READ_MIN: usize = 64 << 10;

/// The largest (cos, sin) table the folded decode RoPE builds (a cache of 131,072 positions
/// at head dim 128); longer caches keep `qk_rope_kv`.
const ROPE_TABLE_MAX_BYTES: usize = 64 << 20;

/// `qk_rope_kv`'s work folded into the decode attention kernel (`rope_attention`): the
/// unrotated k and v of the token, the optional per-head norm weights (0: none), the rotation
/// (1: pairs (i, i + d/2), 2: pairs (2i, 2i + 1); 0, the default: none, plain attention).
/// `FLOWGATE_CUDA_ROPE_IN_ATTENTION=0` keeps the two launches.
#[derive(Clone, Copy, Default)]
struct RopeInAttention {
    mode: i32,
    k: u64,
    v: u64,
    qn: u64,
    kn: u64,
    eps: f32,
    /// The (cos, sin) table of every position of the cache (`rope_cs_table`).
    cs: u64,
}

/// Kernels that call `grid_dep_wait()` (common.cuh) before touching memory an earlier kernel
/// may still use: on Hopper they are launched with programmatic stream serialisation, so
/// each may start (and the mat-vecs prefetch their weights into L2) while the kernel before
/// it finishes. The decode step is a chain of ~10 such kernels per layer.
/// `FLOWGATE_CUDA_PDL=0` turns it off.
const PDL_KERNELS: [&str; 15] = [
    "rms_norm",
    "add_rms_norm",
    "add_rms_norm_rows1",
    "qk_rope_kv",
    "attention",
    "router_topk",
    "moe_combine",
    "quantize_q8",
    "matvec1q8_q4_k",
    "matvec1q8u_q4_k",
    "matvec1q8x_q4_k",
    "matvec1q8xs_q4_k",
    "add",
    "add_sigmoid_gated",
    "silu_mul",
];

struct Kernels {
    matvec: Vec<K>,
    matvec1: Vec<K>,
    matvec1g: Vec<K>,
    /// Decode mat-vec on 8-bit activations (dp4a), for the formats that have one.
    matvec1q8: Vec<Option<K>>,
    /// The same with two steps' loads in flight per warp, for launches of one wave of warps.
    matvec1q8u: Vec<Option<K>>,
    /// Expert-indexed decode mat-vecs (MoE routed on the device), f32 and 8-bit activations.
    matvec1x: Vec<K>,
    matvec1q8x: Vec<Option<K>>,
    /// `matvec1q8x_q4_k` with the rows staged in shared memory: for weights read in place
    /// from host memory.
    matvec1q8xs_q4_k: K,
    quantize_q8: K,
    router_topk: K,
    moe_combine: K,
    moe_page: K,
    moe_split_mask: K,
    moe_cpu_join: K,
    moe_uniform_routes: K,
    /// A paged layer's routes (and hidden vector) into mapped host memory, then a flag.
    publish_back: K,
    dequant: Vec<K>,
    rms_norm: K,
    add_rms_norm: K,
    /// The decode form (one row) over several blocks.
    add_rms_norm_rows1: K,
    rope: K,
    rope_table: K,
    qk_rope_kv: K,
    attention: K,
    /// Tiled prefill attention (`attention_prefill.cu`): head dim 64 with 64-key tiles, head
    /// dim 128 with 64- and 32-key tiles.
    attention_prefill: [K; 3],
    add: K,
    add_sigmoid_gated: K,
    add_row_bias: K,
    silu_mul: K,
    silu_mul_rows: K,
    gather_rows: K,
    scatter_add_rows: K,
    scatter_add_rows_small: K,
}

impl Kernels {
    /// `early_launch`: the short kernels between mat-vecs let the next kernel start at once
    /// (`grid_dep_launch` in common.cuh), so the next mat-vec asks for its weights while they
    /// run. `FLOWGATE_CUDA_MV_PREFETCH=BYTES` sets how much of its row a decode mat-vec warp
    /// asks L2 for ahead (`FG_MV_PREFETCH` in matvec_q8.cu).
    fn load(
        cache: &flowgate_cuda::KernelCache,
        early_launch: bool,
    ) -> std::result::Result<Kernels, CudaError> {
        let mut options: Vec<String> = Vec::new();
        if early_launch {
            options.push("-DFG_EARLY_LAUNCH".to_string());
        }
        if let Ok(v) = std::env::var("FLOWGATE_CUDA_MV_PREFETCH") {
            match v.parse::<u64>() {
                Ok(n) => options.push(format!("-DFG_MV_PREFETCH={n}")),
                Err(_) => tracing::warn!(
                    "FLOWGATE_CUDA_MV_PREFETCH={v} is not a byte count: using the default"
                ),
            }
        }
        let module = |family: &str| {
            let src = kernel_source(family).unwrap_or_default();
            cache.load(family, &src, &options)
        };
        let mv = module("matvec_quant")?;
        let mvq = module("matvec_q8")?;
        let moe = module("moe")?;
        let norm = module("norm")?;
        let rope = module("rope")?;
        let attn = module("attention")?;
        let attn_pf = module("attention_prefill")?;
        let el = module("elementwise")?;
        let k = |m: &flowgate_cuda::Module, name: &str| {
            m.function(name).map(|f| K {
                f,
                name: name.to_string(),
                pdl: PDL_KERNELS.contains(&name),
            })
        };
        let mut matvec = Vec::new();
        let mut matvec1 = Vec::new();
        let mut matvec1g = Vec::new();
        let mut dequant = Vec::new();
        let mut matvec1q8 = Vec::new();
        let mut matvec1q8u = Vec::new();
        let mut matvec1x = Vec::new();
        let mut matvec1q8x = Vec::new();
        for n in DTYPE_NAMES {
            let q8 = Q8_ACTIVATION_DTYPES.contains(&n);
            matvec1q8.push(if q8 {
                Some(k(&mvq, &format!("matvec1q8_{n}"))?)
            } else {
                None
            });
            matvec1q8u.push(if q8 {
                Some(k(&mvq, &format!("matvec1q8u_{n}"))?)
            } else {
                None
            });
            matvec1q8x.push(if q8 {
                Some(k(&mvq, &format!("matvec1q8x_{n}"))?)
            } else {
                None
            });
            matvec1x.push(k(&mv, &format!("matvec1x_{n}"))?);
            matvec.push(k(&mv, &format!("matvec_{n}"))?);
            matvec1.push(k(&mv, &format!("matvec1_{n}"))?);
            matvec1g.push(k(&mv, &format!("matvec1g_{n}"))?);
            dequant.push(k(&mv, &format!("dequant_{n}"))?);
        }
        Ok(Kernels {
            matvec,
            matvec1,
            matvec1g,
            matvec1q8,
            matvec1q8u,
            matvec1x,
            matvec1q8x,
            matvec1q8xs_q4_k: k(&mvq, "matvec1q8xs_q4_k")?,
            quantize_q8: k(&mvq, "quantize_q8")?,
            router_topk: k(&moe, "router_topk")?,
            moe_combine: k(&moe, "moe_combine")?,
            moe_page: k(&moe, "moe_page")?,
            moe_split_mask: k(&moe, "moe_split_mask")?,
            moe_cpu_join: k(&moe, "moe_cpu_join")?,
            moe_uniform_routes: k(&moe, "moe_uniform_routes")?,
            publish_back: k(&moe, "publish_back")?,
            dequant,
            rms_norm: k(&norm, "rms_norm")?,
            add_rms_norm: k(&norm, "add_rms_norm")?,
            add_rms_norm_rows1: k(&norm, "add_rms_norm_rows1")?,
            rope: k(&rope, "rope")?,
            rope_table: k(&rope, "rope_table")?,
            qk_rope_kv: k(&rope, "qk_rope_kv")?,
            attention: k(&attn, "attention")?,
            attention_prefill: {
                let tiled = |d: usize, bk: usize| -> std::result::Result<K, CudaError> {
                    let f = k(&attn_pf, &format!("attention_prefill_{d}_{bk}"))?;
                    f.f.allow_dynamic_shared(prefill_attention_smem(d, bk))?;
                    Ok(f)
                };
                [tiled(64, 64)?, tiled(128, 64)?, tiled(128, 32)?]
            },
            add: k(&el, "add")?,
            add_sigmoid_gated: k(&el, "add_sigmoid_gated")?,
            add_row_bias: k(&el, "add_row_bias")?,
            silu_mul: k(&el, "silu_mul")?,
            silu_mul_rows: k(&el, "silu_mul_rows")?,
            gather_rows: k(&el, "gather_rows")?,
            scatter_add_rows: k(&el, "scatter_add_rows")?,
            scatter_add_rows_small: k(&el, "scatter_add_rows_small")?,
        })
    }
}

/// A kernel argument (kept in a slice that outlives the launch builder).
#[derive(Clone, Copy)]
enum Arg<'a> {
    P(u64),
    I(i32),
    F(f32),
    J(&'a MvJobs),
    Q(&'a QuantJobs),
    R(&'a RowScale),
    M(&'a paging::MoePage),
    S(&'a paging::MoeSplit),
}

/// Up to 16 (row, weight) pairs passed by value (`RowScale` in elementwise.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct RowScale {
    idx: [u32; 16],
    scale: [f32; 16],
}

// SAFETY: plain old data with the C layout of the kernel's `struct RowScale`.
unsafe impl flowgate_cuda::cudarc::driver::DeviceRepr for RowScale {}

/// Jobs of one grouped mat-vec launch (`MvJobs` in matvec_quant.cu), passed by value.
const MAXJ: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct MvJobs {
    w: [u64; MAXJ],
    x: [u64; MAXJ],
    y: [u64; MAXJ],
    rows: [i32; MAXJ],
}

// SAFETY: MvJobs is plain old data with the C layout of the kernel's `struct MvJobs`
// (three arrays of 16 u64 then 16 int, no padding between them).
unsafe impl flowgate_cuda::cudarc::driver::DeviceRepr for MvJobs {}

/// Vectors of one `quantize_q8` launch (`QuantJobs` in matvec_q8.cu), passed by value.
const MAXQ: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct QuantJobs {
    x: [u64; MAXQ],
    q: [u64; MAXQ],
}

// SAFETY: QuantJobs is plain old data with the C layout of the kernel's `struct QuantJobs`.
unsafe impl flowgate_cuda::cudarc::driver::DeviceRepr for QuantJobs {}

/// Formats whose decode mat-vec runs on 8-bit activations (`matvec1q8_*` in matvec_q8.cu).
const Q8_ACTIVATION_DTYPES: [&str; 1] = ["q4_k"];

/// Bytes of one quantised activation vector of `cols` values: the int8 values, one f32 scale
/// per 32, padded to 16 bytes (the kernels load 16 bytes at a time).
fn q8_bytes(cols: usize) -> usize {
    (cols + cols / 32 * 4).next_multiple_of(16)
}

/// Runs everything on one CUDA device.
pub struct CudaBackend {
    device: Device,
    stream: Stream,
    blas: Blas,
    kernels: Kernels,
    pool: Arc<Pool>,
    alloc: DeviceAllocator,
    error: Mutex<Option<String>>,
    rope_freqs: Mutex<Option<(Vec<f32>, CudaBuf)>>,
    /// (cos, sin) tables of the folded decode RoPE (`rope_cs_table`): the pairs' frequencies,
    /// the positions covered, the table. Kept for the backend's life: a recorded step may
    /// hold a table's address.
    rope_tables: Mutex<Vec<(Vec<f32>, usize, CudaBuf)>>,
    name: String,
    sms: usize,
    profile: Option<Mutex<Profile>>,
    tf32: bool,
    prefill_attention: std::sync::atomic::AtomicU8,
    q8_activations: std::sync::atomic::AtomicBool,
    /// Zeroed per-(token, head) counters of the split-K attention's last-block merge (each
    /// use leaves them zero again); grown on demand.
    attn_counters: Mutex<Option<DeviceBuffer>>,
    /// Whether one-wave decode mat-vecs use `matvec1q8u_*` (`FLOWGATE_CUDA_MV_TWO_STEPS=0`
    /// turns it off).
    mv_two_steps: std::sync::atomic::AtomicBool,
    /// How decode attention splits its keys.
    attn_splits: AttnSplits,
    /// Whether a one-row add + RMSNorm spreads over several blocks (`add_rms_norm_rows1`;
    /// `FLOWGATE_CUDA_NORM_ROWS1=0` turns it off).
    norm_rows1: std::sync::atomic::AtomicBool,
    /// Whether decode folds `qk_rope_kv` into the attention kernel (`RopeInAttention`;
    /// `FLOWGATE_CUDA_ROPE_IN_ATTENTION=0` turns it off).
    rope_in_attention: std::sync::atomic::AtomicBool,
    /// The device expert cache sparse layers page through (`--vram-budget`).
    pager: Mutex<Option<Arc<ExpertPager>>>,
    /// Operations queued so far (kernels, copies, memsets, GEMMs): a q8 vector made by a
    /// fused producer is valid only while no other work has been queued since.
    seq: std::sync::atomic::AtomicU64,
    /// The q8 form of the last one-row `add_rms_norm` output (see [`Q8Fresh`]).
    q8_fresh: Mutex<Option<Q8Fresh>>,
    /// Page-locked staging for reads back to the host of at least `PINNED_READ_MIN` bytes
    /// (a decode step's logits): grown on demand, kept.
    read_back: Mutex<Option<flowgate_cuda::PinnedBuffer>>,
    /// Whether a weight of a format with an 8-bit-activation kernel was loaded (only then do
    /// producers make q8 forms).
    q8_weights: std::sync::atomic::AtomicBool,
    /// How many q8 forms were read instead of quantising again.
    q8_reused: std::sync::atomic::AtomicU64,
    /// Recorded decode steps (`graph.rs`).
    graphs: Mutex<graph::Graphs>,
    /// The step slot's address while a step is being recorded, else 0.
    recording: std::sync::atomic::AtomicU64,
    /// Why the recording in progress cannot be used, if it cannot.
    graph_taint: Mutex<Option<String>>,
    /// Programmatic dependent launch of [`PDL_KERNELS`] (compute capability 9.0 and later).
    pdl: bool,
}

/// A q8 vector (`quantize_q8`'s layout) of the f32 row at `x`, written by the fused
/// `add_rms_norm` as it wrote `x`. The decode mat-vec that reads `x` next takes it instead of
/// quantising `x` again, if nothing was queued in between (`seq`: the count after the producer)
/// or the row is held by a caller that reads it only (`held`, see `moe_decode`).
struct Q8Fresh {
    x: u64,
    cols: usize,
    q: CudaBuf,
    seq: u64,
    held: bool,
}

/// Per-kernel device time, when `FLOWGATE_CUDA_PROFILE` is set: each launch and copy is
/// bracketed by two events; times are read at the next host synchronisation.
#[derive(Default)]
struct Profile {
    pending: Vec<(String, flowgate_cuda::Event, flowgate_cuda::Event)>,
    totals: std::collections::HashMap<String, (f64, u64)>,
}

/// Records the end event of a profiled operation when dropped.
struct Span<'a> {
    backend: &'a CudaBackend,
    name: &'a str,
    start: Option<flowgate_cuda::Event>,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let (Some(p), Some(start)) = (&self.backend.profile, self.start.take()) else {
            return;
        };
        if let Ok(end) = flowgate_cuda::Event::new(&self.backend.device) {
            if end.record(&self.backend.stream).is_ok() {
                lock(p).pending.push((self.name.to_string(), start, end));
            }
        }
    }
}

/// Warps sharing one row in the mat-vec kernels: one for matrices of 4096 rows or more (the
/// fastest measured: tools/device/matvec_bench.cu), more for fewer rows so that about 4096
/// warps stream memory, as long as each warp keeps at least two 256-wide steps.
fn warps_per_row(rows: usize, cols: usize) -> u32 {
    let steps = cols.div_ceil(256);
    let mut wpr = 1usize;
    while wpr < 8 && rows * wpr < 4096 && steps >= 4 * wpr {
        wpr *= 2;
    }
    wpr as u32
}

/// The by-value job table of one grouped mat-vec launch (at most MAXJ jobs of (weight, input
/// address, output address)); `input` maps each job's input address to the one the kernel
/// reads (itself, or its quantised copy).
fn mv_jobs(chunk: &[(&CudaWeight, u64, u64)], input: impl Fn(u64) -> u64) -> MvJobs {
    let mut p = MvJobs {
        w: [0; MAXJ],
        x: [0; MAXJ],
        y: [0; MAXJ],
        rows: [0; MAXJ],
    };
    for (i, (w, x, y)) in chunk.iter().enumerate() {
        p.w[i] = w.mem.ptr();
        p.x[i] = input(*x);
        p.y[i] = *y;
        p.rows[i] = w.rows as i32;
    }
    p
}

/// Dynamic shared memory of one block of the tiled prefill attention with head dim `d` and
/// `bk`-key tiles (`FA_SMEM` in `attention_prefill.cu`): Qᵀ, Kᵀ (later Pᵀ) and V tiles, rows
/// padded by four floats.
fn prefill_attention_smem(d: usize, bk: usize) -> usize {
    const BQ: usize = 64;
    4 * (d * (BQ + 4) + d * (bk + 4) + bk * (d + 4))
}

/// Which kernel runs attention for more than one query token ([`CudaBackend::set_prefill_attention`],
/// or `FLOWGATE_CUDA_ATTN=auto|tiled|tiled32|basic` when the backend is made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PrefillAttention {
    /// The tiled kernel (`attention_prefill.cu`) for head dims 64 and 128 when the call has
    /// at least 16 tokens and makes enough blocks to occupy a quarter of the SMs; otherwise
    /// the one-query kernel (the default).
    Auto,
    /// The tiled kernel whenever the head dim allows (2 tokens or more).
    Tiled,
    /// As `Tiled`, with 32-key tiles for head dim 128 (half the shared memory per block).
    Tiled32,
    /// Always the one-query kernel of `attention.cu`, a block per (token, head).
    Basic,
}

impl PrefillAttention {
    const ALL: [PrefillAttention; 4] = [
        PrefillAttention::Auto,
        PrefillAttention::Tiled,
        PrefillAttention::Tiled32,
        PrefillAttention::Basic,
    ];

    fn from_env() -> PrefillAttention {
        match std::env::var("FLOWGATE_CUDA_ATTN").as_deref() {
            Ok("basic") => PrefillAttention::Basic,
            Ok("tiled") => PrefillAttention::Tiled,
            Ok("tiled32") => PrefillAttention::Tiled32,
            _ => PrefillAttention::Auto,
        }
    }
}

fn grid_1d(n: u64, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(threads as u64).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` (the small bookkeeping kernels: routes, masks, tables).
fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or loads from the disk cache) the kernels, and sets
    /// the memory budget to the device's free memory less a headroom.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let device = flowgate_cuda::Device::open(ordinal).map_err(cuda_err)?;
        let (free, _total) = device.memory_info().map_err(cuda_err)?;
        Self::with_budget(device, free.saturating_sub(HEADROOM) as u64)
    }

    /// As [`CudaBackend::new`] on an opened device, with an explicit budget in bytes.
    pub fn with_budget(device: Device, budget: u64) -> Result<CudaBackend> {
        let stream = Stream::new(&device).map_err(cuda_err)?;
        let blas = Blas::new(&stream).map_err(cuda_err)?;
        let cache = flowgate_cuda::KernelCache::new(&device);
        let (maj, min) = device.compute_capability().map_err(cuda_err)?;
        let pdl = maj >= 9 && switch_on("FLOWGATE_CUDA_PDL");
        let early_launch = pdl && switch_on("FLOWGATE_CUDA_EARLY_LAUNCH");
        let kernels = Kernels::load(&cache, early_launch).map_err(cuda_err)?;
        let alloc = DeviceAllocator::new(&device, budget);
        let dev_name = device.name().unwrap_or_else(|_| "unknown".into());
        let sms = {
            let mut v = 0i32;
            // SAFETY: v is a valid out-pointer; cu_device is the opened device.
            let r = unsafe {
                sys::cuDeviceGetAttribute(
                    &mut v,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    device.cu_device(),
                )
            };
            if r == sys::CUresult::CUDA_SUCCESS && v > 0 {
                v as usize
            } else {
                80
            }
        };
        Ok(CudaBackend {
            name: format!("cuda:{} ({dev_name}, sm_{maj}{min})", device.ordinal()),
            pool: Arc::new(Pool {
                alloc: alloc.clone(),
                free: Mutex::new(Vec::new()),
                recording: Mutex::new(None),
            }),
            device,
            stream,
            blas,
            kernels,
            alloc,
            error: Mutex::new(None),
            rope_freqs: Mutex::new(None),
            rope_tables: Mutex::new(Vec::new()),
            sms,
            tf32: switch_on("FLOWGATE_CUDA_TF32"),
            prefill_attention: std::sync::atomic::AtomicU8::new(PrefillAttention::from_env() as u8),
            attn_counters: Mutex::new(None),
            norm_rows1: std::sync::atomic::AtomicBool::new(switch_on("FLOWGATE_CUDA_NORM_ROWS1")),
            attn_splits: AttnSplits::from_env(),
            rope_in_attention: std::sync::atomic::AtomicBool::new(switch_on(
                "FLOWGATE_CUDA_ROPE_IN_ATTENTION",
            )),
            mv_two_steps: std::sync::atomic::AtomicBool::new(switch_on(
                "FLOWGATE_CUDA_MV_TWO_STEPS",
            )),
            pager: Mutex::new(None),
            seq: std::sync::atomic::AtomicU64::new(0),
            q8_fresh: Mutex::new(None),
            read_back: Mutex::new(None),
            q8_weights: std::sync::atomic::AtomicBool::new(false),
            q8_reused: std::sync::atomic::AtomicU64::new(0),
            q8_activations: std::sync::atomic::AtomicBool::new(switch_on("FLOWGATE_CUDA_Q8")),
            profile: std::env::var_os("FLOWGATE_CUDA_PROFILE")
                .filter(|v| !v.is_empty() && v != "0")
                .map(|_| Mutex::new(Profile::default())),
            graphs: Mutex::new(graph::Graphs::new()),
            recording: std::sync::atomic::AtomicU64::new(0),
            graph_taint: Mutex::new(None),
            pdl,
        })
    }

    /// Whether a one-row add + RMSNorm (decode) spreads over dim/256 blocks (the default;
    /// `FLOWGATE_CUDA_NORM_ROWS1=0` turns it off): same values up to the order of the sum of
    /// squares.
    pub fn set_norm_rows1(&self, on: bool) {
        self.norm_rows1
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether one decode token's RoPE (with its per-head norms) and KV store run inside the
    /// attention kernel (the default; `FLOWGATE_CUDA_ROPE_IN_ATTENTION=0` turns it off): the
    /// same operations on the same values, the per-head norms' sums of squares in another
    /// order.
    pub fn set_rope_in_attention(&self, on: bool) {
        self.rope_in_attention
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether decode mat-vec launches of one wave of warps keep two steps' loads in flight
    /// per warp (`matvec1q8u_*`, the default; `FLOWGATE_CUDA_MV_TWO_STEPS=0` turns it off).
    /// Either way the sums run in the same order: the results are the same.
    pub fn set_mv_two_steps(&self, on: bool) {
        self.mv_two_steps
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether decode mat-vecs of the formats that support it (Q4_K) quantise the activations
    /// to 8 bits and use dp4a (the default; `FLOWGATE_CUDA_Q8=0` turns it off). Off, every
    /// format runs on f32 activations and matches a float reference up to summation order.
    pub fn set_q8_activations(&self, on: bool) {
        self.q8_activations
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Which kernel computes attention for more than one query token.
    pub fn set_prefill_attention(&self, mode: PrefillAttention) {
        self.prefill_attention
            .store(mode as u8, std::sync::atomic::Ordering::Relaxed);
    }

    fn prefill_attention(&self) -> PrefillAttention {
        let v = self
            .prefill_attention
            .load(std::sync::atomic::Ordering::Relaxed);
        PrefillAttention::ALL
            .into_iter()
            .find(|m| *m as u8 == v)
            .unwrap_or(PrefillAttention::Auto)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Device bytes charged to the budget now (weights, KV, pooled activations) and at peak.
    pub fn memory_in_use(&self) -> (u64, u64) {
        let b = self.alloc.budget();
        (b.in_use(), b.peak())
    }

    /// The budget every device allocation is charged to (bytes).
    pub fn memory_budget(&self) -> u64 {
        self.alloc.budget().budget()
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }

    /// Measures device-to-device copy bandwidth: the best of `reps` copies of `bytes` bytes,
    /// counted as read + write (2 × bytes per copy), in GB/s.
    pub fn copy_bandwidth_gbps(&self, bytes: usize, reps: usize) -> Result<f64> {
        let a = self.alloc.alloc(bytes).map_err(cuda_err)?;
        let b = self.alloc.alloc(bytes).map_err(cuda_err)?;
        let start = flowgate_cuda::Event::new(&self.device).map_err(cuda_err)?;
        let end = flowgate_cuda::Event::new(&self.device).map_err(cuda_err)?;
        self.device.bind().map_err(cuda_err)?;
        let mut best = 0f64;
        for i in 0..reps.max(1) + 1 {
            start.record(&self.stream).map_err(cuda_err)?;
            // SAFETY: both allocations are `bytes` long and live until after the synchronize.
            let r = unsafe {
                sys::cuMemcpyDtoDAsync_v2(b.ptr(), a.ptr(), bytes, self.stream.cu_stream())
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(EngineError::Invalid(format!(
                    "CUDA: cuMemcpyDtoDAsync: {r:?}"
                )));
            }
            end.record(&self.stream).map_err(cuda_err)?;
            end.synchronize().map_err(cuda_err)?;
            let ms = start.elapsed_ms(&end).map_err(cuda_err)? as f64;
            if i > 0 && ms > 0.0 {
                best = best.max(2.0 * bytes as f64 / (ms / 1e3) / 1e9);
            }
        }
        Ok(best)
    }

    fn profile_span<'a>(&'a self, name: &'a str) -> Span<'a> {
        let start = self.profile.as_ref().and_then(|_| {
            let e = flowgate_cuda::Event::new(&self.device).ok()?;
            e.record(&self.stream).ok()?;
            Some(e)
        });
        Span {
            backend: self,
            name,
            start,
        }
    }

    /// Adds host time since `since` to the profile row `name` (rows named "(host) …").
    fn host_time(&self, name: &str, since: Option<std::time::Instant>) {
        if let (Some(p), Some(t)) = (&self.profile, since) {
            let mut p = lock(p);
            let e = p.totals.entry(name.to_string()).or_insert((0.0, 0));
            e.0 += t.elapsed().as_secs_f64() * 1e3;
            e.1 += 1;
        }
    }

    /// Counts one queued operation (see `seq`).
    fn bump(&self) {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fresh q8 form of the row at `x` (`cols` values), if its producer's output is
    /// still untouched; consumed.
    fn take_q8_fresh(&self, x: u64, cols: usize) -> Option<CudaBuf> {
        let r = lock(&self.q8_fresh).take()?;
        let now = self.seq.load(std::sync::atomic::Ordering::Relaxed);
        let fresh = r.x == x && r.cols == cols && (r.held || r.seq == now);
        if fresh {
            self.q8_reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fresh.then_some(r.q)
    }

    /// How many times a decode mat-vec read the q8 form an `add_rms_norm` had just written,
    /// instead of quantising its input again.
    pub fn q8_reused(&self) -> u64 {
        self.q8_reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records `q` (if any) as the q8 form of the row at `x` that the launch just queued wrote.
    fn set_q8_fresh(&self, x: u64, cols: usize, q: Option<CudaBuf>) {
        *lock(&self.q8_fresh) = q.map(|q| Q8Fresh {
            x,
            cols,
            q,
            seq: self.seq.load(std::sync::atomic::Ordering::Relaxed),
            held: false,
        });
    }

    /// Keeps the fresh q8 form of `x` valid through work that only reads `x`.
    fn hold_q8_fresh(&self, x: u64, cols: usize) {
        let now = self.seq.load(std::sync::atomic::Ordering::Relaxed);
        let mut f = lock(&self.q8_fresh);
        match f.as_mut() {
            Some(r) if r.x == x && r.cols == cols && r.seq == now => r.held = true,
            _ => *f = None,
        }
    }

    /// Ends [`Self::hold_q8_fresh`]: an unused q8 vector is dropped.
    fn release_q8_fresh(&self) {
        *lock(&self.q8_fresh) = None;
    }

    /// The start of a host-time measurement, when profiling.
    fn host_clock(&self) -> Option<std::time::Instant> {
        self.profile.as_ref().map(|_| std::time::Instant::now())
    }

    /// True when `FLOWGATE_CUDA_PROFILE` was set when the backend was made.
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// Forgets the profile so far.
    pub fn profile_reset(&self) {
        if let Some(p) = &self.profile {
            let _ = self.stream.synchronize();
            let mut p = lock(p);
            p.pending.clear();
            p.totals.clear();
        }
    }

    /// Device time per kernel since the last reset, largest first: (name, ms, launches).
    pub fn profile_report(&self) -> Vec<(String, f64, u64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let _ = self.stream.synchronize();
        let mut p = lock(p);
        let pending = std::mem::take(&mut p.pending);
        for (name, a, b) in pending {
            let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
            let e = p.totals.entry(name).or_insert((0.0, 0));
            e.0 += ms;
            e.1 += 1;
        }
        let mut v: Vec<(String, f64, u64)> = p
            .totals
            .iter()
            .map(|(k, &(ms, n))| (k.clone(), ms, n))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    fn fail(&self, msg: String) {
        let mut e = lock(&self.error);
        if e.is_none() {
            tracing::error!("cuda backend: {msg}");
            *e = Some(msg);
        }
    }

    fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    fn launch(&self, k: &K, cfg: LaunchConfig, args: &[Arg]) {
        self.bump();
        let _timer = self.profile_span(&k.name);
        if self.pdl && k.pdl {
            return self.launch_pdl(k, cfg, args);
        }
        let mut b = self.stream.raw().launch_builder(k.f.function());
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::J(v) => b.arg(*v),
                Arg::Q(v) => b.arg(*v),
                Arg::R(v) => b.arg(*v),
                Arg::M(v) => b.arg(*v),
                Arg::S(v) => b.arg(*v),
            };
        }
        let queued = self.host_clock();
        // SAFETY: every argument matches the kernel's C signature (pointers as u64, `int` as
        // i32, `float` as f32), device pointers come from live allocations sized by the
        // callers, and `args` outlives the builder.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(format!("kernel launch: {e}"));
        }
        self.host_time("(host) cuLaunchKernel", queued);
    }

    /// [`Self::launch`] with programmatic stream serialisation allowed (`cuLaunchKernelEx`).
    fn launch_pdl(&self, k: &K, cfg: LaunchConfig, args: &[Arg]) {
        let queued = self.host_clock();
        let mut params: Vec<*mut std::ffi::c_void> = args
            .iter()
            .map(|a| match a {
                Arg::P(v) => v as *const u64 as *mut std::ffi::c_void,
                Arg::I(v) => v as *const i32 as *mut std::ffi::c_void,
                Arg::F(v) => v as *const f32 as *mut std::ffi::c_void,
                Arg::J(v) => *v as *const MvJobs as *mut std::ffi::c_void,
                Arg::Q(v) => *v as *const QuantJobs as *mut std::ffi::c_void,
                Arg::R(v) => *v as *const RowScale as *mut std::ffi::c_void,
                Arg::M(v) => *v as *const paging::MoePage as *mut std::ffi::c_void,
                Arg::S(v) => *v as *const paging::MoeSplit as *mut std::ffi::c_void,
            })
            .collect();
        // SAFETY: a zeroed launch attribute is a valid value of the C union; only the
        // programmatic-serialisation member is then set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let r = self.device.bind().map_err(|e| e.to_string()).and_then(|_| {
            // SAFETY: as for `launch`: every argument matches the kernel's C signature, and
            // `params` points into `args`, which outlives the call (the driver copies the
            // values before returning); the kernel waits (`grid_dep_wait`) before touching
            // memory earlier kernels may use.
            let r = unsafe {
                sys::cuLaunchKernelEx(
                    &config,
                    k.f.function().cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            match r {
                sys::CUresult::CUDA_SUCCESS => Ok(()),
                e => Err(format!("{e:?}")),
            }
        });
        if let Err(e) = r {
            self.fail(format!("kernel launch (cuLaunchKernelEx {}): {e}", k.name));
        }
        self.host_time("(host) cuLaunchKernel", queued);
    }

    fn new_buf(&self, n: usize) -> Result<CudaBuf> {
        let mut b = CudaBuf {
            mem: None,
            len: 0,
            pool: self.pool.clone(),
        };
        if n > 0 {
            b.mem = Some(self.pool.take(n * 4).map_err(cuda_err)?);
        }
        b.len = n;
        Ok(b)
    }

    /// Makes `b` hold `n` values (contents unspecified); false (error recorded) on failure.
    fn ensure(&self, b: &mut CudaBuf, n: usize) -> bool {
        if b.capacity() < n {
            if let Some(old) = b.mem.take() {
                self.pool.release(old);
            }
            match n.checked_mul(4).map(|bytes| self.pool.take(bytes)) {
                Some(Ok(m)) => b.mem = Some(m),
                Some(Err(e)) => {
                    self.fail(format!("allocating {n} floats: {e}"));
                    b.len = 0;
                    return false;
                }
                None => {
                    self.fail(format!("allocating {n} floats: size overflows"));
                    b.len = 0;
                    return false;
                }
            }
        }
        b.len = n;
        true
    }

    /// `len` floats at device address `ptr`, after the work queued before (synchronises).
    fn read_floats(&self, ptr: u64, len: usize) -> Vec<f32> {
        let mut out = vec![0f32; len];
        if len == 0 {
            return out;
        }
        if self.recording_step().is_some() {
            // Nothing runs while a step is recorded: there is nothing to read yet.
            self.taint_recording("a read back to the host");
            out.fill(f32::NAN);
            return out;
        }
        let res = (|| {
            self.device.bind()?;
            // Large reads land in page-locked memory first: a copy into pageable memory goes
            // through the driver's own staging, slower, while the GPU waits for the next step.
            let mut staging = lock(&self.read_back);
            if len * 4 >= PINNED_READ_MIN && staging.as_ref().is_none_or(|b| b.len() < len * 4) {
                *staging =
                    flowgate_cuda::PinnedBuffer::new(&self.device, (len * 4).next_power_of_two())
                        .ok();
            }
            let pinned = staging.as_mut().filter(|_| len * 4 >= PINNED_READ_MIN);
            let dst: *mut std::ffi::c_void = match &pinned {
                Some(b) => b.as_slice().as_ptr().cast_mut().cast(),
                None => out.as_mut_ptr().cast(),
            };
            // SAFETY: `ptr` holds `len` floats; `dst` (the staging buffer, at least len * 4
            // bytes, held locked, or `out`) is not touched until the stream synchronisation
            // below completes the copy.
            let r =
                unsafe { sys::cuMemcpyDtoHAsync_v2(dst, ptr, len * 4, self.stream.cu_stream()) };
            let waited = self.host_clock();
            let sync = self.stream.synchronize();
            self.host_time("(host) waiting in to_host", waited);
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(CudaError::Driver {
                    op: "cuMemcpyDtoHAsync",
                    msg: format!("{r:?}"),
                });
            }
            sync?;
            if let Some(b) = pinned {
                for (o, c) in out.iter_mut().zip(b.as_slice().chunks_exact(4)) {
                    *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            self.fail(e.to_string());
            out.fill(f32::NAN);
        }
        out
    }

    /// Queues a copy of host bytes into `dst` (which must hold them).
    fn upload(&self, dst: u64, src: &[u8]) {
        if src.is_empty() {
            return;
        }
        // A captured copy would replay this step's bytes.
        self.taint_recording("a host→device copy");
        self.bump();
        let _timer = self.profile_span("copy host->device");
        if let Err(e) = self.device.bind() {
            self.fail(e.to_string());
            return;
        }
        // SAFETY: `dst` is a live allocation of at least src.len() bytes (callers size it).
        // The source is pageable memory: the driver copies it to a staging buffer before
        // cuMemcpyHtoDAsync returns, so it may be dropped right after the call.
        let r = unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.stream.cu_stream())
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail(format!("cuMemcpyHtoDAsync: {r:?}"));
        }
    }

    fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.bump();
        let _timer = self.profile_span("copy device->device");
        // SAFETY: callers check both ranges against their allocations.
        let r = unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail(format!("cuMemcpyDtoDAsync: {r:?}"));
        }
    }

    /// Address of at least `n` zeroed attention merge counters (see `attention.cu`).
    pub(super) fn attn_counters(&self, n: usize) -> Option<u64> {
        let mut c = lock(&self.attn_counters);
        if let Some(b) = c.as_ref() {
            if b.len() >= n * 4 {
                return Some(b.ptr());
            }
        }
        if self.recording_step().is_some() {
            // Their zeroing would only be recorded, not run (`graph_step` sizes them first).
            self.taint_recording("making the attention counters");
            return None;
        }
        // Recorded steps use the old buffer's address.
        self.forget_graphs();
        match self.alloc.alloc((n * 4).next_power_of_two().max(1024)) {
            Ok(b) => {
                self.memset0(b.ptr(), b.len() / 4);
                let p = b.ptr();
                // The old buffer may still be in use by queued kernels: it is freed only
                // after them, as cuMemFree synchronises.
                *c = Some(b);
                Some(p)
            }
            Err(e) => {
                self.fail(format!("attention counters: {e}"));
                None
            }
        }
    }

    fn memset0(&self, dst: u64, n_floats: usize) {
        if n_floats == 0 {
            return;
        }
        if let Err(e) = self.device.bind() {
            self.fail(e.to_string());
            return;
        }
        self.bump();
        // SAFETY: dst holds at least n_floats 4-byte words (callers size it).
        let r = unsafe { sys::cuMemsetD32Async(dst, 0, n_floats, self.stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail(format!("cuMemsetD32Async: {r:?}"));
        }
    }

    /// A device buffer holding `v` as u32 (indices).
    fn upload_u32(&self, v: &[u32]) -> Result<CudaBuf> {
        let b = self.new_buf(v.len())?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload(b.ptr(), &bytes);
        Ok(b)
    }

    fn upload_f32(&self, v: &[f32]) -> Result<CudaBuf> {
        let b = self.new_buf(v.len())?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload(b.ptr(), &bytes);
        Ok(b)
    }

    /// Dequantises rows `row0..row0+nrows` (or rows `ids`) of `w` into `out` (f32).
    fn dequant(&self, w: &CudaWeight, ids: Option<u64>, row0: usize, nrows: usize, out: u64) {
        if nrows == 0 {
            return;
        }
        let groups = w.cols.div_ceil(8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(128), nrows.min(65535) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.dequant[w.kind],
            cfg,
            &[
                Arg::P(w.mem.ptr()),
                Arg::P(w.row_bytes as u64),
                Arg::P(ids.unwrap_or(0)),
                Arg::P(row0 as u64),
                Arg::P(out),
                Arg::I(nrows as i32),
                Arg::I(w.cols as i32),
            ],
        );
    }

    /// `out (n × rows) = x (n × cols) · Wᵀ` with cuBLAS, via dequantised row tiles.
    fn gemm(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &CudaBuf) {
        let queued = self.host_clock();
        self.gemm_tiles(w, x, n, out);
        self.host_time("(host) gemm calls (dequant + cuBLAS)", queued);
    }

    fn gemm_tiles(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &CudaBuf) {
        let (rows, cols) = (w.rows, w.cols);
        // SAFETY (both sgemm calls): W/tile hold `tr × cols` f32 from the tile's first row, x
        // holds n × cols (checked by the caller), out holds n × rows and the tile writes rows
        // r0..r0+tr of each of its n rows (ldc = rows); all on this backend's stream.
        if w.dtype == DType::F32 {
            self.bump();
            let r = unsafe {
                self.blas.sgemm_raw(
                    true,
                    false,
                    rows,
                    n,
                    cols,
                    w.mem.ptr(),
                    cols,
                    x.ptr(),
                    cols,
                    out.ptr(),
                    rows,
                )
            };
            if let Err(e) = r {
                self.fail(e.to_string());
            }
            return;
        }
        // Quantised weights already carry far more rounding than TF32's (see the module
        // doc); F32/F16/BF16 weights keep plain FP32 products.
        let tf32 = self.tf32 && w.dtype.is_quantized();
        if let Err(e) = self.blas.set_tf32(tf32) {
            self.fail(e.to_string());
            return;
        }
        let tile_rows = (TILE_FLOATS / cols.max(1)).clamp(1, rows);
        let tile = match self.new_buf(tile_rows * cols) {
            Ok(t) => t,
            Err(e) => {
                self.fail(e.to_string());
                return;
            }
        };
        let mut r0 = 0;
        while r0 < rows {
            let tr = tile_rows.min(rows - r0);
            self.dequant(w, None, r0, tr, tile.ptr());
            self.bump();
            let r = unsafe {
                self.blas.sgemm_raw(
                    true,
                    false,
                    tr,
                    n,
                    cols,
                    tile.ptr(),
                    cols,
                    x.ptr(),
                    cols,
                    out.ptr() + (r0 * 4) as u64,
                    rows,
                )
            };
            if let Err(e) = r {
                self.fail(e.to_string());
                return;
            }
            r0 += tr;
        }
    }

    /// The (cos, sin) table (`rope_table` in rope.cu) of frequencies `inv_freq` for positions
    /// `0..positions`, built on first use; `None` while recording a step (the build would only
    /// be recorded) or past `ROPE_TABLE_MAX_BYTES`.
    fn rope_cs_table(&self, inv_freq: &[f32], positions: usize) -> Option<u64> {
        let half = inv_freq.len();
        if let Some((_, _, b)) = lock(&self.rope_tables)
            .iter()
            .find(|(f, n, _)| f.as_slice() == inv_freq && *n >= positions)
        {
            return Some(b.ptr());
        }
        let floats = positions.checked_mul(half)?.checked_mul(2)?;
        if floats * 4 > ROPE_TABLE_MAX_BYTES || positions > i32::MAX as usize {
            return None;
        }
        if self.recording_step().is_some() {
            self.taint_recording("building the rope table");
            return None;
        }
        let f = self.inv_freq_buf(inv_freq)?;
        let table = match self.new_buf(floats) {
            Ok(b) => b,
            Err(e) => {
                self.fail(e.to_string());
                return None;
            }
        };
        self.launch(
            &self.kernels.rope_table,
            LaunchConfig {
                grid_dim: ((positions * half).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(table.ptr()),
                Arg::P(f),
                Arg::I(half as i32),
                Arg::I(positions as i32),
            ],
        );
        let p = table.ptr();
        lock(&self.rope_tables).push((inv_freq.to_vec(), positions, table));
        Some(p)
    }

    fn inv_freq_buf(&self, inv_freq: &[f32]) -> Option<u64> {
        let mut cache = lock(&self.rope_freqs);
        if let Some((v, b)) = cache.as_ref() {
            if v.as_slice() == inv_freq {
                return Some(b.ptr());
            }
        }
        if self.recording_step().is_some() {
            // Its upload would only be recorded, not run.
            self.taint_recording("uploading the rope table");
            return None;
        }
        match self.upload_f32(inv_freq) {
            Ok(b) => {
                let p = b.ptr();
                *cache = Some((inv_freq.to_vec(), b));
                Some(p)
            }
            Err(e) => {
                self.fail(e.to_string());
                None
            }
        }
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type Kv = CudaKv;
    type Experts = CudaExperts;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn weight(&self, t: HostTensor) -> Result<CudaWeight> {
        let werr = |msg: String| EngineError::Weight {
            tensor: t.name.clone(),
            msg,
        };
        if t.shape.len() != 2 {
            return Err(werr(format!(
                "expected a matrix, found shape {:?}",
                t.shape
            )));
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let kind = dtype_index(t.dtype)
            .ok_or_else(|| werr(format!("dtype {} is not a weight format", t.dtype)))?;
        let row_bytes = t
            .dtype
            .row_bytes(cols as u64)
            .map_err(|e| werr(e.to_string()))? as usize;
        let bytes = t.bytes();
        if rows.checked_mul(row_bytes) != Some(bytes.len()) || bytes.is_empty() {
            return Err(werr(format!(
                "{} bytes for {rows} rows of {row_bytes}",
                bytes.len()
            )));
        }
        if cols > i32::MAX as usize || rows > i32::MAX as usize {
            return Err(werr("matrix too large".into()));
        }
        let mut mem = self
            .alloc
            .alloc(bytes.len())
            .map_err(|e| werr(e.to_string()))?;
        mem.write(&self.stream, 0, bytes)
            .map_err(|e| werr(e.to_string()))?;
        if self
            .kernels
            .matvec1q8
            .get(kind)
            .is_some_and(|k| k.is_some())
        {
            self.q8_weights
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(CudaWeight {
            mem: WMem::Owned(mem),
            dtype: t.dtype,
            kind,
            rows,
            cols,
            row_bytes,
        })
    }

    fn weight_rows(&self, w: &CudaWeight) -> usize {
        w.rows
    }

    fn buf_from(&self, v: &[f32]) -> Result<CudaBuf> {
        self.upload_f32(v)
    }

    fn buf_zeros(&self, n: usize) -> Result<CudaBuf> {
        let b = self.new_buf(n)?;
        self.memset0(b.ptr(), n);
        Ok(b)
    }

    fn to_host(&self, b: &CudaBuf) -> Vec<f32> {
        self.read_floats(b.ptr(), b.len)
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = lock(&self.error).take() {
            return Err(EngineError::Invalid(format!("CUDA backend: {e}")));
        }
        // A CPU share of experts (paged decode) that failed; it has finished by the time the
        // stream passed its gate, which every read of results waits for.
        if let Some(f) = lock(&self.pager).as_ref().and_then(|p| p.take_failure()) {
            return Err(EngineError::Invalid(format!("experts on the CPU: {f}")));
        }
        Ok(())
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaBuf) -> Result<()> {
        for &id in ids {
            if id as usize >= table.rows {
                return Err(EngineError::TokenOutOfRange {
                    id,
                    vocab: table.rows,
                });
            }
        }
        if ids.is_empty() {
            out.len = 0;
            return Ok(());
        }
        if !self.ensure(out, ids.len() * table.cols) {
            return self.check();
        }
        if let (Some(step), 1) = (self.recording_step(), ids.len()) {
            // A recorded step reads its token from the step slot.
            self.dequant(table, Some(step), 0, 1, out.ptr());
            return Ok(());
        }
        let idb = self.upload_u32(ids)?;
        self.dequant(table, Some(idb.ptr()), 0, ids.len(), out.ptr());
        Ok(())
    }

    fn rms_norm(&self, x: &CudaBuf, w: &CudaBuf, dim: usize, eps: f32, out: &mut CudaBuf) {
        if !self.ensure(out, x.len) || dim == 0 || x.len == 0 {
            return;
        }
        self.norm_rows(x.ptr(), w, dim, eps, out.ptr(), x.len / dim);
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaBuf,
        y: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        out: &mut CudaBuf,
    ) {
        if dim == 0 || x.len == 0 || y.len < x.len || w.len < dim || !x.len.is_multiple_of(dim) {
            self.add(x, y);
            self.rms_norm(x, w, dim, eps, out);
            return;
        }
        if !self.ensure(out, x.len) {
            return;
        }
        let threads = (dim.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: ((x.len / dim) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // One row (decode) with 8-bit activations on: also its q8 form, for the mat-vecs
        // that read `out` next (q/k/v, gate/up, the experts).
        let q8 = if x.len == dim && self.q8_on_any(dim) {
            self.new_buf(q8_bytes(dim).div_ceil(4)).ok()
        } else {
            None
        };
        // One row (decode): spread over dim/256 blocks (`add_rms_norm_rows1`), which write the
        // new residual into a fresh buffer that then becomes `x`.
        if x.len == dim
            && dim.is_multiple_of(256)
            && x.ptr() != out.ptr()
            && self.norm_rows1.load(std::sync::atomic::Ordering::Relaxed)
        {
            let Ok(mut xo) = self.new_buf(dim) else {
                self.fail("allocating the residual stream".to_string());
                return;
            };
            self.launch(
                &self.kernels.add_rms_norm_rows1,
                LaunchConfig {
                    grid_dim: ((dim / 256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::P(x.ptr()),
                    Arg::P(y.ptr()),
                    Arg::P(w.ptr()),
                    Arg::P(xo.ptr()),
                    Arg::P(out.ptr()),
                    Arg::P(q8.as_ref().map_or(0, |b| b.ptr())),
                    Arg::I(dim as i32),
                    Arg::F(eps),
                ],
            );
            std::mem::swap(x, &mut xo);
            self.set_q8_fresh(out.ptr(), dim, q8);
            return;
        }
        self.launch(
            &self.kernels.add_rms_norm,
            cfg,
            &[
                Arg::P(x.ptr()),
                Arg::P(y.ptr()),
                Arg::P(w.ptr()),
                Arg::P(out.ptr()),
                Arg::I(dim as i32),
                Arg::F(eps),
                Arg::P(q8.as_ref().map_or(0, |b| b.ptr())),
            ],
        );
        self.set_q8_fresh(out.ptr(), dim, q8);
    }

    fn rms_norm_inplace(&self, x: &mut CudaBuf, w: &CudaBuf, dim: usize, eps: f32) {
        if dim == 0 || x.len == 0 {
            return;
        }
        self.norm_rows(x.ptr(), w, dim, eps, x.ptr(), x.len / dim);
    }

    fn matmul(&self, w: &CudaWeight, x: &CudaBuf, n_tokens: usize, out: &mut CudaBuf) {
        if n_tokens == 0 {
            out.len = 0;
            return;
        }
        if x.len < n_tokens * w.cols {
            self.fail(format!(
                "matmul: input holds {} values, {n_tokens} × {} needed",
                x.len, w.cols
            ));
            return;
        }
        if !self.ensure(out, n_tokens * w.rows) {
            return;
        }
        if n_tokens == 1 && self.q8_kernel(w).is_some() {
            self.matvec1_grouped(&[(w, x.ptr(), out.ptr())]);
        } else if n_tokens == 1 {
            let wpr = warps_per_row(w.rows, w.cols);
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(8 / wpr), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.kernels.matvec1[w.kind],
                cfg,
                &[
                    Arg::P(w.mem.ptr()),
                    Arg::P(w.row_bytes as u64),
                    Arg::P(x.ptr()),
                    Arg::P(out.ptr()),
                    Arg::I(w.rows as i32),
                    Arg::I(w.cols as i32),
                    Arg::I(wpr as i32),
                ],
            );
        } else if n_tokens <= MATVEC_MAX_TOKENS {
            let wpr = warps_per_row(w.rows, w.cols);
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(8 / wpr), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.kernels.matvec[w.kind],
                cfg,
                &[
                    Arg::P(w.mem.ptr()),
                    Arg::P(w.row_bytes as u64),
                    Arg::P(x.ptr()),
                    Arg::P(out.ptr()),
                    Arg::I(w.rows as i32),
                    Arg::I(w.cols as i32),
                    Arg::I(n_tokens as i32),
                    Arg::I(w.rows as i32),
                    Arg::I(wpr as i32),
                ],
            );
        } else {
            self.gemm(w, x, n_tokens, out);
        }
    }

    /// One token: products of matrices of one format and width (q/k/v, gate/up) run as one
    /// grouped launch; otherwise one by one.
    fn matmul_many(
        &self,
        ws: &[&CudaWeight],
        x: &CudaBuf,
        n_tokens: usize,
        outs: &mut [&mut CudaBuf],
    ) {
        let groupable = n_tokens == 1
            && ws.len() > 1
            && ws.len() == outs.len()
            && ws
                .iter()
                .all(|w| w.kind == ws[0].kind && w.cols == ws[0].cols && x.len >= w.cols);
        if !groupable {
            for (w, o) in ws.iter().zip(outs.iter_mut()) {
                self.matmul(w, x, n_tokens, o);
            }
            return;
        }
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            if !self.ensure(o, w.rows) {
                return;
            }
        }
        let jobs: Vec<(&CudaWeight, u64, u64)> = ws
            .iter()
            .zip(outs.iter())
            .map(|(w, o)| (*w, x.ptr(), o.ptr()))
            .collect();
        self.matvec1_grouped(&jobs);
    }

    /// Decode (one token per expert): the experts' gate and up products run as one grouped
    /// launch, SiLU·mul as one, the down products as one (pointers passed by value) —
    /// 3 launches for the layer instead of 4 per expert. Anything else (prefill
    /// groups, experts of different shapes) runs expert by expert.
    fn swiglu_many(&self, jobs: &[SwiGluJob<'_, Self>]) -> Result<Vec<CudaBuf>> {
        let same = |a: &CudaWeight, b: &CudaWeight| {
            a.kind == b.kind && a.rows == b.rows && a.cols == b.cols
        };
        let grouped = match jobs.first() {
            Some(f) => {
                jobs.len() > 1
                    && same(f.gate, f.up)
                    && jobs.iter().all(|j| {
                        j.n == 1
                            && j.x.len >= f.gate.cols
                            && same(j.gate, f.gate)
                            && same(j.up, f.gate)
                            && same(j.down, f.down)
                    })
                    && f.down.cols == f.gate.rows
            }
            None => false,
        };
        if !grouped {
            return jobs.iter().map(|j| self.swiglu_one(j)).collect();
        }
        let (g0, d0) = (jobs[0].gate, jobs[0].down);
        let nj = jobs.len();
        let ffn = g0.rows;
        // gu = [gate_0 … gate_{J-1} | up_0 … up_{J-1}], ffn values each.
        let gu = self.new_buf(2 * nj * ffn)?;
        let outs = (0..nj)
            .map(|_| self.new_buf(d0.rows))
            .collect::<Result<Vec<_>>>()?;
        let f4 = |i: usize| (i * ffn * 4) as u64;
        let gate_up: Vec<(&CudaWeight, u64, u64)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(i, j)| {
                [
                    (j.gate, j.x.ptr(), gu.ptr() + f4(i)),
                    (j.up, j.x.ptr(), gu.ptr() + f4(nj + i)),
                ]
            })
            .collect();
        self.matvec1_grouped(&gate_up);
        let n = (nj * ffn) as u64;
        self.launch(
            &self.kernels.silu_mul,
            grid_1d(n, 256),
            &[
                Arg::P(gu.ptr()),
                Arg::P(gu.ptr() + f4(nj)),
                Arg::P(n),
                Arg::P(0),
            ],
        );
        let down: Vec<(&CudaWeight, u64, u64)> = jobs
            .iter()
            .zip(&outs)
            .enumerate()
            .map(|(i, (j, o))| (j.down, gu.ptr() + f4(i), o.ptr()))
            .collect();
        self.matvec1_grouped(&down);
        self.check()?;
        Ok(outs)
    }

    fn add_row_bias(&self, x: &mut CudaBuf, b: &CudaBuf) {
        if x.len == 0 || b.len == 0 {
            return;
        }
        self.launch(
            &self.kernels.add_row_bias,
            grid_1d(x.len as u64, 256),
            &[
                Arg::P(x.ptr()),
                Arg::P(b.ptr()),
                Arg::P(x.len as u64),
                Arg::I(b.len as i32),
            ],
        );
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf) {
        let n = x.len.min(y.len);
        if n == 0 {
            return;
        }
        self.launch(
            &self.kernels.add,
            grid_1d(n as u64, 256),
            &[Arg::P(x.ptr()), Arg::P(y.ptr()), Arg::P(n as u64)],
        );
    }

    fn add_sigmoid_gated(&self, out: &mut CudaBuf, y: &CudaBuf, g: &CudaBuf, n: usize, dim: usize) {
        let total = n * dim;
        if total == 0 || out.len < total || y.len < total || g.len < n {
            if total > 0 {
                self.fail(format!(
                    "add_sigmoid_gated: {n} rows of {dim} into {} values",
                    out.len
                ));
            }
            return;
        }
        self.launch(
            &self.kernels.add_sigmoid_gated,
            grid_1d(total as u64, 256),
            &[
                Arg::P(out.ptr()),
                Arg::P(y.ptr()),
                Arg::P(g.ptr()),
                Arg::I(dim as i32),
                Arg::P(total as u64),
            ],
        );
    }

    fn silu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf) {
        let n = gate.len.min(up.len);
        if n == 0 {
            return;
        }
        // One decode row (FFN widths are below 2^16; a prefill batch's consumer is a GEMM,
        // which never reads q8 forms): its q8 form too, for the down product.
        let q8 = if n <= 1 << 16 && self.q8_on_any(n) {
            self.new_buf(q8_bytes(n).div_ceil(4)).ok()
        } else {
            None
        };
        self.launch(
            &self.kernels.silu_mul,
            grid_1d(n as u64, 256),
            &[
                Arg::P(gate.ptr()),
                Arg::P(up.ptr()),
                Arg::P(n as u64),
                Arg::P(q8.as_ref().map_or(0, |b| b.ptr())),
            ],
        );
        self.set_q8_fresh(gate.ptr(), n, q8);
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &[f32],
        style: RopeStyle,
    ) {
        let width = n_heads * head_dim;
        if width == 0 || x.len == 0 || inv_freq.len() < head_dim / 2 {
            return;
        }
        let Some(f) = self.inv_freq_buf(inv_freq) else {
            return;
        };
        self.taint_recording("rope at a fixed position");
        let n_tokens = x.len / width;
        let total = (n_tokens * n_heads * (head_dim / 2)) as u64;
        if total == 0 {
            return;
        }
        self.launch(
            &self.kernels.rope,
            grid_1d(total, 256),
            &[
                Arg::P(x.ptr()),
                Arg::P(f),
                Arg::I(n_tokens as i32),
                Arg::I(n_heads as i32),
                Arg::I(head_dim as i32),
                Arg::I(start_pos as i32),
                Arg::I(matches!(style, RopeStyle::Interleaved) as i32),
            ],
        );
    }

    /// One token: one fused launch (`qk_rope_kv` in rope.cu). Batches: the basic operations.
    fn qk_rope_kv(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        kv: &mut CudaKv,
        norms: Option<(&CudaBuf, &CudaBuf, f32)>,
        r: &QkRope<'_>,
    ) {
        let hd = r.head_dim;
        let kvw = r.n_kv_heads * hd;
        let n = r.n_tokens;
        let fused = (1..=65535).contains(&n)
            && hd.is_multiple_of(2)
            && (2..=512).contains(&hd)
            && r.inv_freq.len() >= hd / 2
            && q.len >= n * r.n_heads * hd
            && k.len >= n * kvw
            && v.len >= n * kvw
            && kv.width == kvw
            && r.start_pos + n <= kv.capacity
            && norms.is_none_or(|(qn, kn, _)| qn.len >= hd && kn.len >= hd);
        if !fused {
            return crate::backend::qk_rope_kv_unfused(self, q, k, v, kv, norms, r);
        }
        let Some(f) = self.inv_freq_buf(r.inv_freq) else {
            return;
        };
        let (qn, kn, eps) = norms.map_or((0, 0, 0.0), |(a, b, e)| (a.ptr(), b.ptr(), e));
        // A recorded step (one token) reads its position from the step slot.
        let pos_dev = self
            .recording_step()
            .filter(|_| n == 1)
            .map_or(0, |s| s + 4);
        if pos_dev == 0 {
            self.taint_recording("qk_rope_kv of several tokens");
        }
        let threads = (hd / 2).next_multiple_of(32) as u32;
        self.launch(
            &self.kernels.qk_rope_kv,
            LaunchConfig {
                grid_dim: ((r.n_heads + r.n_kv_heads) as u32, n as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(q.ptr()),
                Arg::P(k.ptr()),
                Arg::P(v.ptr()),
                Arg::P(qn),
                Arg::P(kn),
                Arg::F(eps),
                Arg::I(norms.is_some() as i32),
                Arg::P(kv.k.ptr()),
                Arg::P(kv.v.ptr()),
                Arg::P(f),
                Arg::I(r.n_heads as i32),
                Arg::I(r.n_kv_heads as i32),
                Arg::I(hd as i32),
                Arg::I(r.start_pos as i32),
                Arg::P(pos_dev),
                Arg::I(matches!(r.style, RopeStyle::Interleaved) as i32),
            ],
        );
    }

    fn kv_alloc(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<CudaKv> {
        let width = n_kv_heads * head_dim;
        let n = width
            .checked_mul(capacity)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| EngineError::Invalid("KV cache size overflows".into()))?
            .max(4);
        let k = self.alloc.alloc(n).map_err(cuda_err)?;
        let v = self.alloc.alloc(n).map_err(cuda_err)?;
        self.memset0(k.ptr(), n / 4);
        self.memset0(v.ptr(), n / 4);
        Ok(CudaKv {
            k,
            v,
            width,
            capacity,
        })
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        k: &CudaBuf,
        v: &CudaBuf,
        n_tokens: usize,
        start_pos: usize,
    ) {
        let w = kv.width;
        let n = n_tokens * w;
        if start_pos + n_tokens > kv.capacity || k.len < n || v.len < n {
            self.fail(format!(
                "kv_write: {n_tokens} tokens at {start_pos} into a cache of {}",
                kv.capacity
            ));
            return;
        }
        self.taint_recording("a KV write at a fixed position");
        let off = (start_pos * w * 4) as u64;
        self.copy_dtod(kv.k.ptr() + off, k.ptr(), n * 4);
        self.copy_dtod(kv.v.ptr() + off, v.ptr(), n * 4);
    }

    fn kv_read(&self, kv: &CudaKv, start: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = kv.width;
        crate::backend::kv_range(start, n, kv.capacity)?;
        let off = (start * w * 4) as u64;
        let k = self.read_floats(kv.k.ptr() + off, n * w);
        let v = self.read_floats(kv.v.ptr() + off, n * w);
        self.check()?;
        Ok((k, v))
    }

    fn attention(&self, q: &CudaBuf, kv: &CudaKv, p: AttnParams, out: &mut CudaBuf) {
        self.attention_launch(q, kv, p, out, None);
    }

    /// One decode token: `qk_rope_kv`'s work inside the attention kernel (one launch per layer
    /// instead of two) where the shape allows; otherwise the two calls.
    fn rope_attention(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        kv: &mut CudaKv,
        norms: Option<(&CudaBuf, &CudaBuf, f32)>,
        r: &QkRope<'_>,
        p: AttnParams,
        out: &mut CudaBuf,
    ) {
        let hd = r.head_dim;
        let kvw = r.n_kv_heads * hd;
        let mode = match r.style {
            RopeStyle::Interleaved => 2,
            _ => 1,
        };
        let fold = self
            .rope_in_attention
            .load(std::sync::atomic::Ordering::Relaxed)
            && r.n_tokens == 1
            && p.n_tokens == 1
            && p.start_pos == r.start_pos
            && p.n_heads == r.n_heads
            && p.n_kv_heads == r.n_kv_heads
            && p.head_dim == hd
            && hd.is_multiple_of(if mode == 1 { 64 } else { 32 })
            && (32..=256).contains(&hd)
            && r.n_kv_heads > 0
            && r.n_heads.is_multiple_of(r.n_kv_heads)
            && r.inv_freq.len() >= hd / 2
            && q.len >= r.n_heads * hd
            && k.len >= kvw
            && v.len >= kvw
            && kv.width == kvw
            && r.start_pos < kv.capacity
            && norms.is_none_or(|(qn, kn, _)| qn.len >= hd && kn.len >= hd);
        // (Without the rope table, as while recording a step before it was built, or for a
        // cache too long for one, the two calls.)
        let table = if fold {
            self.rope_cs_table(&r.inv_freq[..hd / 2], kv.capacity)
        } else {
            None
        };
        let Some(cs) = table else {
            self.qk_rope_kv(q, k, v, kv, norms, r);
            return self.attention_launch(q, kv, p, out, None);
        };
        let (qn, kn, eps) = norms.map_or((0, 0, 0.0), |(a, b, e)| (a.ptr(), b.ptr(), e));
        let rope = RopeInAttention {
            mode,
            k: k.ptr(),
            v: v.ptr(),
            qn,
            kn,
            eps,
            cs,
        };
        self.attention_launch(q, kv, p, out, Some(rope));
    }

    fn gather_rows(&self, x: &CudaBuf, dim: usize, idx: &[usize]) -> Result<CudaBuf> {
        let rows = x.len.checked_div(dim).unwrap_or(0);
        if let Some(&i) = idx.iter().find(|&&i| i >= rows) {
            return Err(EngineError::Invalid(format!(
                "gather_rows: row {i} of {rows}"
            )));
        }
        let out = self.new_buf(idx.len() * dim)?;
        if out.len == 0 {
            return Ok(out);
        }
        let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let idb = self.upload_u32(&ids)?;
        self.launch(
            &self.kernels.gather_rows,
            grid_1d(out.len as u64, 256),
            &[
                Arg::P(x.ptr()),
                Arg::P(idb.ptr()),
                Arg::P(out.ptr()),
                Arg::I(dim as i32),
                Arg::I(idx.len() as i32),
            ],
        );
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        out: &mut CudaBuf,
        y: &CudaBuf,
        dim: usize,
        idx: &[usize],
        scale: &[f32],
    ) {
        let n = idx
            .len()
            .min(scale.len())
            .min(y.len.checked_div(dim).unwrap_or(0));
        if n == 0 {
            return;
        }
        let rows = out.len / dim;
        if idx[..n].iter().any(|&i| i >= rows) {
            self.fail(format!("scatter_add_rows: index past {rows} rows"));
            return;
        }
        if n <= 16 {
            let mut rs = RowScale {
                idx: [0; 16],
                scale: [0.0; 16],
            };
            for i in 0..n {
                rs.idx[i] = idx[i] as u32;
                rs.scale[i] = scale[i];
            }
            self.launch(
                &self.kernels.scatter_add_rows_small,
                grid_1d((n * dim) as u64, 256),
                &[
                    Arg::P(out.ptr()),
                    Arg::P(y.ptr()),
                    Arg::R(&rs),
                    Arg::I(dim as i32),
                    Arg::I(n as i32),
                ],
            );
            return;
        }
        // Indices and weights in one upload: n u32 then n f32.
        let mut words: Vec<u32> = idx[..n].iter().map(|&i| i as u32).collect();
        words.extend(scale[..n].iter().map(|s| s.to_bits()));
        let tb = match self.upload_u32(&words) {
            Ok(b) => b,
            Err(e) => {
                self.fail(e.to_string());
                return;
            }
        };
        let (idb, sb) = (tb.ptr(), tb.ptr() + (4 * n) as u64);
        self.launch(
            &self.kernels.scatter_add_rows,
            grid_1d((n * dim) as u64, 256),
            &[
                Arg::P(out.ptr()),
                Arg::P(y.ptr()),
                Arg::P(idb),
                Arg::P(sb),
                Arg::I(dim as i32),
                Arg::I(n as i32),
            ],
        );
    }

    /// The indices and scales of every part with more than 16 rows go up in one copy (one
    /// per MoE layer in prefill, instead of one per expert); then one launch per part.
    fn scatter_add_many(&self, out: &mut CudaBuf, dim: usize, parts: &[ScatterPart<'_, Self>]) {
        let rows = out.len.checked_div(dim).unwrap_or(0);
        let mut words: Vec<u32> = Vec::new();
        let mut at = Vec::with_capacity(parts.len());
        for (y, idx, scale) in parts {
            let n = idx
                .len()
                .min(scale.len())
                .min(y.len.checked_div(dim).unwrap_or(0));
            if n <= 16 {
                at.push(None);
                continue;
            }
            if idx[..n].iter().any(|&i| i >= rows) {
                self.fail(format!("scatter_add_rows: index past {rows} rows"));
                return;
            }
            at.push(Some((words.len(), n)));
            words.extend(idx[..n].iter().map(|&i| i as u32));
            words.extend(scale[..n].iter().map(|s| s.to_bits()));
        }
        let table = if words.is_empty() {
            None
        } else {
            match self.upload_u32(&words) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.fail(e.to_string());
                    return;
                }
            }
        };
        for ((y, idx, scale), at) in parts.iter().zip(at) {
            let (Some((off, n)), Some(t)) = (at, table.as_ref()) else {
                self.scatter_add_rows(out, y, dim, idx, scale);
                continue;
            };
            let idb = t.ptr() + (4 * off) as u64;
            self.launch(
                &self.kernels.scatter_add_rows,
                grid_1d((n * dim) as u64, 256),
                &[
                    Arg::P(out.ptr()),
                    Arg::P(y.ptr()),
                    Arg::P(idb),
                    Arg::P(idb + (4 * n) as u64),
                    Arg::I(dim as i32),
                    Arg::I(n as i32),
                ],
            );
        }
    }

    fn resize(&self, b: &mut CudaBuf, n: usize) -> Result<()> {
        if self.ensure(b, n) {
            Ok(())
        } else {
            self.check()
        }
    }

    /// Experts of one shape and format each for gate/up and down: their addresses go into
    /// one device table (gate addresses, then up, then down).
    fn experts(&self, ex: &[[&CudaWeight; 3]]) -> Result<Option<CudaExperts>> {
        let Some([g0, _, d0]) = ex.first() else {
            return Ok(None);
        };
        let same = |a: &CudaWeight, b: &CudaWeight| {
            a.kind == b.kind && a.rows == b.rows && a.cols == b.cols
        };
        let fits = d0.cols == g0.rows
            && ex
                .iter()
                .all(|[g, u, d]| same(g, g0) && same(u, g0) && same(d, d0));
        if !fits {
            return Ok(None);
        }
        let n = ex.len();
        let mut bytes = Vec::with_capacity(3 * n * 8);
        for which in 0..3 {
            for e in ex {
                bytes.extend_from_slice(&e[which].mem.ptr().to_le_bytes());
            }
        }
        let tables = self.new_buf(bytes.len() / 4)?;
        self.upload(tables.ptr(), &bytes);
        self.check()?;
        Ok(Some(CudaExperts {
            tables,
            n,
            kind: g0.kind,
            ffn: g0.rows,
            hidden: g0.cols,
            row_bytes: g0.row_bytes,
            down_kind: d0.kind,
            down_row_bytes: d0.row_bytes,
            paged: None,
        }))
    }

    /// Router product, top-k on the device, gate/up of the k experts as one expert-indexed
    /// launch of 2k jobs, SiLU·mul, their downs as one launch of k, and the weighted sum:
    /// 6–8 launches and no host synchronisation. Paged experts (`--vram-budget`) read the
    /// chosen ids back, copy the misses into their slots, then run the same products.
    /// Prefill routing: the router's GEMM, then `router_topk` with one block per token; only
    /// the `2·n·k` ids and weights come back (the logits stay on the device).
    fn route_tokens(
        &self,
        router: &CudaWeight,
        h: &CudaBuf,
        n: usize,
        n_experts: usize,
        k: usize,
        renormalise: bool,
    ) -> Result<Option<Vec<Route>>> {
        // The kernel's limits: TOPK_MAXN logits, 64 chosen, one grid row per token.
        if n == 0 || n_experts > 4096 || k == 0 || k > 64 || k > n_experts || n > 65535 {
            return Ok(None);
        }
        let routed = self.route_topk(router, h, n, n_experts, k, renormalise)?;
        let v = self.to_host(&routed);
        self.check()?;
        let (ids, ws) = v.split_at(n * k);
        let mut out = Vec::with_capacity(n);
        for t in 0..n {
            let mut r = Vec::with_capacity(k);
            for j in t * k..(t + 1) * k {
                let e = ids[j].to_bits() as usize;
                if e >= n_experts {
                    return Err(EngineError::Invalid(format!(
                        "router top-k returned expert {e} of {n_experts}"
                    )));
                }
                r.push((e, ws[j]));
            }
            out.push(r);
        }
        Ok(Some(out))
    }

    fn moe_decode(
        &self,
        e: &CudaExperts,
        router: &CudaWeight,
        h: &CudaBuf,
        k: usize,
        renormalise: bool,
        out: &mut CudaBuf,
    ) -> Result<()> {
        if k == 0 || k > 64 || k > e.n || e.n > 4096 || router.rows != e.n || h.len < e.hidden {
            return Err(EngineError::Invalid(format!(
                "moe_decode: {k} of {} experts (router rows {}, input {} of {})",
                e.n, router.rows, h.len, e.hidden
            )));
        }
        // The router's products only read h: its q8 form stays valid for the experts.
        self.hold_q8_fresh(h.ptr(), e.hidden);
        let r = self.moe_decode_held(e, router, h, k, renormalise, out);
        self.release_q8_fresh();
        r
    }

    fn moe_predict(
        &self,
        next: &CudaExperts,
        next_router: &CudaWeight,
        h: &CudaBuf,
        k: usize,
    ) -> Result<()> {
        let Some(p) = &next.paged else {
            return Ok(());
        };
        if !p.pager.prefetch() || k == 0 || k > 64 || next_router.rows != next.n {
            return Ok(());
        }
        let pred = self.route_topk(next_router, h, 1, next.n, k, false)?;
        // Read back with this layer's routes (the same round trip).
        p.pager.set_predicted(p.layer, k, pred);
        self.check()
    }

    /// Experts on the device: the same draw made there (`moe_uniform_routes`), the position
    /// read from the step slot while recording, so that the step replays as a graph. Paged
    /// experts take the host's routes, read back as a router's would be.
    fn moe_decode_uniform(
        &self,
        e: &CudaExperts,
        routes: &[(usize, f32)],
        (seed, layer, pos): (u64, usize, usize),
        h: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let k = routes.len();
        if e.paged.is_some() || k == 0 || k > 64 || k > e.n || pos > i32::MAX as usize {
            return self.moe_decode_routed(e, routes, h, out);
        }
        let routed = self.new_buf(2 * k)?;
        self.launch(
            &self.kernels.moe_uniform_routes,
            one_block(32),
            &[
                Arg::P(self.recording_step().unwrap_or(0)),
                Arg::I(pos as i32),
                Arg::P(seed),
                Arg::I(layer as i32),
                Arg::I(e.n as i32),
                Arg::I(k as i32),
                Arg::P(routed.ptr()),
                Arg::P(routed.ptr() + 4 * k as u64),
            ],
        );
        self.moe_experts(e, &routed, k, None, h, out)
    }

    fn moe_decode_routed(
        &self,
        e: &CudaExperts,
        routes: &[(usize, f32)],
        h: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let k = routes.len();
        let upd = paging::MoePage::routes(routes);
        let Some(upd) = upd.filter(|_| k > 0 && routes.iter().all(|r| r.0 < e.n)) else {
            return Err(EngineError::Invalid(format!(
                "moe_decode_routed: {k} routes over {} experts",
                e.n
            )));
        };
        let routed = self.new_buf(2 * k)?;
        self.taint_recording("routes chosen on the host");
        self.launch_page(e, &upd, routed.ptr(), routed.ptr() + 4 * k as u64);
        if let Some(p) = &e.paged {
            if p.pager.in_place() {
                return self.moe_in_place(e, &routed, k, h, out);
            }
            // Paged experts behave as with a real router, whose choice must come back to the
            // host: one read-back (and round trip) per sparse layer, of the routes
            // written on the device, so that this benchmarking aid costs what routing costs.
            let cpu = self.cpu_experts_on(e);
            let (_, _, hh) = self.read_back(
                &p.pager,
                k,
                Some(routed.ptr()),
                true,
                cpu.then_some((h.ptr(), e.hidden)),
            )?;
            if cpu {
                return self.moe_split(e, Some(&routed), routes, h, &hh, out);
            }
        }
        let chosen: Vec<usize> = routes.iter().map(|r| r.0).collect();
        self.moe_experts(e, &routed, k, Some(&chosen), h, out)
    }

    fn paged_experts(&self, layer: usize) -> Result<Option<CudaExperts>> {
        self.paged_layer(layer)
    }

    fn paged_quota(&self, e: &CudaExperts) -> usize {
        e.paged.as_ref().map_or(0, |p| p.pager.quota(p.layer))
    }

    fn paged_weights(&self, e: &CudaExperts, experts: &[usize]) -> Result<Vec<[CudaWeight; 3]>> {
        self.paged_views(e, experts)
    }

    fn step_graph(&self, kv: &[CudaKv], token: u32, pos: usize) -> Result<StepGraph> {
        self.graph_step(kv, token, pos)
    }

    fn forget_step_graphs(&self) {
        self.forget_graphs();
    }

    fn step_graph_end(&self, logits: Option<&CudaBuf>) -> bool {
        self.graph_step_end(logits)
    }
}

impl CudaBackend {
    /// [`Backend::moe_decode`] with `h`'s q8 form held.
    fn moe_decode_held(
        &self,
        e: &CudaExperts,
        router: &CudaWeight,
        h: &CudaBuf,
        k: usize,
        renormalise: bool,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let routed = self.route_topk(router, h, 1, e.n, k, renormalise)?;
        if e.paged.as_ref().is_some_and(|p| p.pager.in_place()) {
            return self.moe_in_place(e, &routed, k, h, out);
        }
        let ids = routed.ptr();
        let chosen = match &e.paged {
            Some(p) if self.cpu_experts_on(e) => {
                let (c, w, hh) =
                    self.read_back(&p.pager, k, Some(ids), true, Some((h.ptr(), e.hidden)))?;
                let routes: Vec<(usize, f32)> = c.into_iter().zip(w).collect();
                self.moe_split(e, Some(&routed), &routes, h, &hh, out)?;
                return self.start_prefetch(e);
            }
            Some(p) => Some(self.read_back(&p.pager, k, Some(ids), false, None)?.0),
            None => None,
        };
        self.moe_experts(e, &routed, k, chosen.as_deref(), h, out)?;
        self.start_prefetch(e)
    }

    /// Router logits (`router · h`, `n` experts, for `tokens` rows of `h`), softmax and
    /// top-`k` on the device, one block per token: a new buffer of the `tokens·k` ids (ints)
    /// then their weights (floats), token by token.
    fn route_topk(
        &self,
        router: &CudaWeight,
        h: &CudaBuf,
        tokens: usize,
        n: usize,
        k: usize,
        renormalise: bool,
    ) -> Result<CudaBuf> {
        let mut logits = self.new_buf(tokens * n)?;
        self.matmul(router, h, tokens, &mut logits);
        let routed = self.new_buf(2 * tokens * k)?;
        // One warp per token does it when it fits (see router_topk_warp in moe.cu).
        let threads = if n <= 1024 && k <= 32 { 32 } else { 256 };
        self.launch(
            &self.kernels.router_topk,
            LaunchConfig {
                grid_dim: (tokens as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::P(logits.ptr()),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(renormalise as i32),
                Arg::P(routed.ptr()),
                Arg::P(routed.ptr() + (4 * tokens * k) as u64),
            ],
        );
        Ok(routed)
    }

    /// The chosen experts' products and their weighted sum: `routed` holds k ids then k
    /// weights on the device; `chosen` the same ids on the host (needed for paged experts,
    /// which run in waves of at most the layer's quota, each paged in first).
    fn moe_experts(
        &self,
        e: &CudaExperts,
        routed: &CudaBuf,
        k: usize,
        chosen: Option<&[usize]>,
        h: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        self.moe_experts_with(e, routed, k, chosen, true, h, out)
    }

    /// [`CudaBackend::moe_experts`]; with `page` false, paged experts were made resident (all
    /// `k` at once, within the layer's quota) by the caller.
    #[allow(clippy::too_many_arguments)]
    fn moe_experts_with(
        &self,
        e: &CudaExperts,
        routed: &CudaBuf,
        k: usize,
        chosen: Option<&[usize]>,
        page: bool,
        h: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let (ids, wts) = (routed.ptr(), routed.ptr() + 4 * k as u64);
        let paged = match (&e.paged, chosen) {
            (Some(p), Some(c)) => Some((p, c)),
            (Some(_), None) => {
                return Err(EngineError::Invalid(
                    "paged experts need the chosen ids on the host".into(),
                ))
            }
            _ => None,
        };
        // Misses read in place need no slot: the whole set goes at once.
        let in_place = paged.is_some_and(|(p, _)| p.pager.in_place());
        let wave = match paged {
            Some((p, _)) if page && !in_place => p.pager.quota(p.layer).clamp(1, k),
            _ => k,
        };
        let t = |i: u64| e.tables.ptr() + i * 8 * e.n as u64;
        // gu = [gate of the wave's experts | their up], ffn values each.
        let gu = self.new_buf(2 * wave * e.ffn)?;
        let ys = self.new_buf(k * e.hidden)?;
        for o in (0..k).step_by(wave) {
            let kw = wave.min(k - o);
            if let (Some((p, c)), true) = (paged, page) {
                self.page_in(e, p, &c[o..o + kw])?;
            }
            let wave_ids = ids + 4 * o as u64;
            self.matvec1_experts(
                (t(0), t(1)),
                wave_ids,
                kw,
                2 * kw,
                h.ptr(),
                0,
                gu.ptr(),
                (e.kind, e.ffn, e.hidden, e.row_bytes),
                in_place,
            );
            let n = (kw * e.ffn) as u64;
            self.launch(
                &self.kernels.silu_mul,
                grid_1d(n, 256),
                &[
                    Arg::P(gu.ptr()),
                    Arg::P(gu.ptr() + 4 * n),
                    Arg::P(n),
                    Arg::P(0),
                ],
            );
            self.matvec1_experts(
                (t(2), t(2)),
                wave_ids,
                kw,
                kw,
                gu.ptr(),
                e.ffn,
                ys.ptr() + (4 * o * e.hidden) as u64,
                (e.down_kind, e.hidden, e.ffn, e.down_row_bytes),
                in_place,
            );
        }
        if !self.ensure(out, e.hidden) {
            return self.check();
        }
        self.launch(
            &self.kernels.moe_combine,
            grid_1d(e.hidden as u64, 256),
            &[
                Arg::P(ys.ptr()),
                Arg::P(wts),
                Arg::I(k as i32),
                Arg::I(e.hidden as i32),
                Arg::P(out.ptr()),
            ],
        );
        if let Some((p, _)) = paged {
            p.pager
                .timeline
                .mark(&self.device, &self.stream, layer_timeline::Mark::Products);
        }
        self.check()
    }
}

impl CudaBackend {
    /// One SwiGLU job. Prefill-sized batches of quantised gate and up matrices of one shape
    /// dequantise both into one tile and run one GEMM (`gu`: per token gate then up), halving
    /// the GEMM calls the host queues; anything else runs the generic operations.
    fn swiglu_one(&self, j: &SwiGluJob<'_, Self>) -> Result<CudaBuf> {
        let (g, u) = (j.gate, j.up);
        let pair = j.n > MATVEC_MAX_TOKENS
            && g.dtype.is_quantized()
            && g.kind == u.kind
            && g.rows == u.rows
            && g.cols == u.cols
            && j.down.cols == g.rows
            && 2 * g.rows * g.cols <= TILE_FLOATS
            && j.x.len >= j.n * g.cols;
        if !pair {
            return swiglu(self, j);
        }
        let (rows, cols, n) = (g.rows, g.cols, j.n);
        let gu = self.new_buf(2 * rows * n)?;
        {
            let queued = self.host_clock();
            let tile = self.new_buf(2 * rows * cols)?;
            self.dequant(g, None, 0, rows, tile.ptr());
            self.dequant(u, None, 0, rows, tile.ptr() + (rows * cols * 4) as u64);
            if let Err(e) = self.blas.set_tf32(self.tf32) {
                self.fail(e.to_string());
            }
            // SAFETY: the tile holds 2·rows × cols f32 (gate rows then up rows), x holds
            // n × cols (checked above), gu holds n × 2·rows; all on this backend's stream.
            self.bump();
            let r = unsafe {
                self.blas.sgemm_raw(
                    true,
                    false,
                    2 * rows,
                    n,
                    cols,
                    tile.ptr(),
                    cols,
                    j.x.ptr(),
                    cols,
                    gu.ptr(),
                    2 * rows,
                )
            };
            if let Err(e) = r {
                self.fail(e.to_string());
            }
            self.host_time("(host) gemm calls (dequant + cuBLAS)", queued);
        }
        let h = self.new_buf(rows * n)?;
        self.launch(
            &self.kernels.silu_mul_rows,
            grid_1d((rows * n) as u64, 256),
            &[
                Arg::P(gu.ptr()),
                Arg::P(h.ptr()),
                Arg::I(rows as i32),
                Arg::P(n as u64),
            ],
        );
        drop(gu);
        let mut out = self.new_buf(0)?;
        self.matmul(j.down, &h, n, &mut out);
        self.check()?;
        Ok(out)
    }

    /// Attention over the KV cache with attention.cu (decode, and prefill shapes the tiled
    /// kernel does not take); with `rope` (one token) the kernel also does `qk_rope_kv`'s work.
    fn attention_launch(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        p: AttnParams,
        out: &mut CudaBuf,
        rope: Option<RopeInAttention>,
    ) {
        // None: mode 0, the kernel's plain attention.
        let rope = rope.unwrap_or_default();
        let hd = p.head_dim;
        if hd == 0 || hd > 256 || p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
            self.fail(format!(
                "attention: head_dim {hd} (at most 256), {} heads over {} kv heads",
                p.n_heads, p.n_kv_heads
            ));
            return;
        }
        if p.start_pos + p.n_tokens > kv.capacity || q.len < p.n_tokens * p.n_heads * hd {
            self.fail("attention: query or positions past the cache".into());
            return;
        }
        if !self.ensure(out, p.n_tokens * p.n_heads * hd) || p.n_tokens == 0 {
            return;
        }
        if self.attention_tiled(q, kv, &p, out) {
            return;
        }
        // Split the keys when there are too few (token, head) blocks to fill the GPU.
        let blocks = p.n_heads * p.n_tokens;
        let keys = match p.window {
            Some(w) if w > 0 => (p.start_pos + p.n_tokens).min(w),
            _ => p.start_pos + p.n_tokens,
        };
        // Decode: about 2 keys per warp (the per-key chain of loads, shuffles and exps is
        // latency-bound: many short splits beat few long ones), at least two blocks per SM, at
        // most 128 splits (`AttnSplits`); the kernel works the same number out from its
        // position (`split_keys`, `min_splits`), so that a recorded step (position read from
        // the step slot) launches the most and idles the rest.
        let warps = 4usize;
        let want = (2 * self.sms).div_ceil(blocks);
        let keys_per_warp = self.attn_splits.keys_per_warp;
        let max_splits = self.attn_splits.max_for(blocks, self.sms);
        let split_keys = if p.n_tokens == 1 {
            keys_per_warp * warps
        } else {
            0
        };
        let min_splits = want.min(max_splits);
        let pos_dev = match self.recording_step() {
            Some(step) if p.n_tokens == 1 => step + 4,
            Some(_) => {
                self.taint_recording("attention over several tokens");
                0
            }
            None => 0,
        };
        let splits = if pos_dev != 0 {
            max_splits
        } else if p.n_tokens == 1 {
            want.max(keys.div_ceil(split_keys)).min(max_splits)
        } else {
            want.min(keys.div_ceil(64)).clamp(1, max_splits)
        };
        let shmem = ((2 * warps + warps * hd) * 4) as u32;
        let window = match p.window {
            Some(w) if w > 0 => w as i32,
            _ => 0,
        };
        let part = if splits > 1 {
            match self.new_buf(blocks * splits * (hd + 2)) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.fail(e.to_string());
                    return;
                }
            }
        } else {
            None
        };
        let counters = if splits > 1 {
            match self.attn_counters(blocks) {
                Some(c) => c,
                None => return,
            }
        } else {
            0
        };
        // One token: the output's q8 form too, for the output projection's 8-bit mat-vec.
        let cols = p.n_heads * hd;
        let q8 = if p.n_tokens == 1 && hd.is_multiple_of(32) && self.q8_on_any(cols) {
            self.new_buf(q8_bytes(cols).div_ceil(4)).ok()
        } else {
            None
        };
        let cfg = LaunchConfig {
            grid_dim: (p.n_heads as u32, p.n_tokens as u32, splits as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: shmem,
        };
        self.launch(
            &self.kernels.attention,
            cfg,
            &[
                Arg::P(q.ptr()),
                Arg::P(kv.k.ptr()),
                Arg::P(kv.v.ptr()),
                Arg::P(out.ptr()),
                Arg::P(part.as_ref().map_or(0, |b| b.ptr())),
                Arg::P(counters),
                Arg::I(p.start_pos as i32),
                Arg::P(pos_dev),
                Arg::I(p.n_heads as i32),
                Arg::I(p.n_kv_heads as i32),
                Arg::I(hd as i32),
                Arg::I(window),
                Arg::F(p.scale),
                Arg::I(split_keys as i32),
                Arg::I(min_splits as i32),
                Arg::P(q8.as_ref().map_or(0, |b| b.ptr())),
                Arg::I(rope.mode),
                Arg::P(rope.k),
                Arg::P(rope.v),
                Arg::P(rope.qn),
                Arg::P(rope.kn),
                Arg::F(rope.eps),
                Arg::P(rope.cs),
                Arg::P(kv.k.ptr()),
                Arg::P(kv.v.ptr()),
            ],
        );
        if q8.is_some() {
            self.set_q8_fresh(out.ptr(), cols, q8);
        }
        // `part` goes back to the pool after the launch: stream order keeps it intact until
        // the kernel (which merges it) has finished.
        drop(part);
    }

    /// Attention for several query tokens with the tiled kernel, when the mode and the shape
    /// allow (see [`PrefillAttention`]); false when the caller should use the one-query kernel.
    fn attention_tiled(&self, q: &CudaBuf, kv: &CudaKv, p: &AttnParams, out: &CudaBuf) -> bool {
        let mode = self.prefill_attention();
        let hd = p.head_dim;
        let group = p.n_heads / p.n_kv_heads;
        if mode == PrefillAttention::Basic || p.n_tokens < 2 || group > 64 {
            return false;
        }
        let (kernel, bk) = match (hd, mode) {
            (64, _) => (&self.kernels.attention_prefill[0], 64),
            (128, PrefillAttention::Tiled32) => (&self.kernels.attention_prefill[2], 32),
            (128, _) => (&self.kernels.attention_prefill[1], 64),
            _ => return false,
        };
        let tiles = p.n_tokens.div_ceil(64 / group);
        let blocks = tiles * p.n_kv_heads;
        if mode == PrefillAttention::Auto && (p.n_tokens < 16 || 4 * blocks < self.sms) {
            return false;
        }
        let window = match p.window {
            Some(w) if w > 0 => w as i32,
            _ => 0,
        };
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, p.n_kv_heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: prefill_attention_smem(hd, bk) as u32,
        };
        self.launch(
            kernel,
            cfg,
            &[
                Arg::P(q.ptr()),
                Arg::P(kv.k.ptr()),
                Arg::P(kv.v.ptr()),
                Arg::P(out.ptr()),
                Arg::I(p.n_tokens as i32),
                Arg::I(p.start_pos as i32),
                Arg::I(p.n_heads as i32),
                Arg::I(p.n_kv_heads as i32),
                Arg::I(window),
                Arg::F(p.scale),
            ],
        );
        true
    }

    /// The 8-bit-activation decode kernel for `w`'s format, when it has one and it is on.
    fn q8_kernel(&self, w: &CudaWeight) -> Option<&K> {
        self.q8_on(w.kind, w.cols)?;
        self.kernels.matvec1q8.get(w.kind)?.as_ref()
    }

    /// Whether a decode mat-vec of `cols` columns may read 8-bit activations (for producers
    /// that make the q8 form in passing).
    fn q8_on_any(&self, cols: usize) -> bool {
        self.q8_activations
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.q8_weights.load(std::sync::atomic::Ordering::Relaxed)
            && cols.is_multiple_of(256)
    }

    /// Whether products of format `kind` and width `cols` run on 8-bit activations.
    fn q8_on(&self, kind: usize, cols: usize) -> Option<()> {
        let on = self
            .q8_activations
            .load(std::sync::atomic::Ordering::Relaxed)
            && cols.is_multiple_of(256)
            && self.kernels.matvec1q8.get(kind)?.is_some();
        on.then_some(())
    }

    /// Quantises the f32 vectors at `xs` (`cols` values each) into consecutive q8 vectors of
    /// a new buffer (stride `q8_bytes(cols)`).
    fn quantize_vectors(&self, xs: &[u64], cols: usize) -> Option<CudaBuf> {
        if let [x] = xs {
            if let Some(q) = self.take_q8_fresh(*x, cols) {
                return Some(q);
            }
        }
        let stride = q8_bytes(cols) as u64;
        let Ok(qbuf) = self.new_buf((stride as usize * xs.len()).div_ceil(4)) else {
            self.fail(format!(
                "allocating {} quantised activation vectors",
                xs.len()
            ));
            return None;
        };
        for (c, chunk) in xs.chunks(MAXQ).enumerate() {
            let mut p = QuantJobs {
                x: [0; MAXQ],
                q: [0; MAXQ],
            };
            for (i, &x) in chunk.iter().enumerate() {
                p.x[i] = x;
                p.q[i] = qbuf.ptr() + (c * MAXQ + i) as u64 * stride;
            }
            let groups = (cols / 32) as u32;
            let cfg = LaunchConfig {
                grid_dim: (groups.div_ceil(8), chunk.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.kernels.quantize_q8,
                cfg,
                &[Arg::Q(&p), Arg::I(cols as i32)],
            );
        }
        Some(qbuf)
    }

    /// Expert-indexed single-token products (`matvec1x_*` / `matvec1q8x_*`): job j of
    /// `jobs` multiplies expert `ids[j % k]` of table `ta` (j < k) or `tb` with the input at
    /// `x + (j % k) * stride` into `y + j * rows`. With `staged` (some experts are read in
    /// place from host memory), Q4_K blocks stage their rows in shared memory first.
    #[allow(clippy::too_many_arguments)]
    fn matvec1_experts(
        &self,
        (ta, tb): (u64, u64),
        ids: u64,
        k: usize,
        jobs: usize,
        x: u64,
        x_stride_floats: usize,
        y: u64,
        (kind, rows, cols, row_bytes): (usize, usize, usize, usize),
        staged: bool,
    ) {
        if self.q8_on(kind, cols).is_some() {
            let xs: Vec<u64> = if x_stride_floats == 0 {
                vec![x]
            } else {
                (0..k)
                    .map(|i| x + (i * x_stride_floats * 4) as u64)
                    .collect()
            };
            let Some(q) = self.quantize_vectors(&xs, cols) else {
                return;
            };
            let Some(mut kq) = self.kernels.matvec1q8x.get(kind).and_then(|k| k.as_ref()) else {
                return;
            };
            let stride = if x_stride_floats == 0 {
                0
            } else {
                q8_bytes(cols)
            };
            // 8 rows a block; the staged kernel keeps them in (at most 48 KiB of) shared memory.
            let smem = if staged && 8 * row_bytes <= 48 << 10 {
                kq = &self.kernels.matvec1q8xs_q4_k;
                8 * row_bytes as u32
            } else {
                0
            };
            let cfg = LaunchConfig {
                grid_dim: ((rows as u32).div_ceil(8), jobs as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem,
            };
            self.launch(
                kq,
                cfg,
                &[
                    Arg::P(ta),
                    Arg::P(tb),
                    Arg::P(ids),
                    Arg::I(k as i32),
                    Arg::P(q.ptr()),
                    Arg::P(stride as u64),
                    Arg::P(y),
                    Arg::I(rows as i32),
                    Arg::I(cols as i32),
                    Arg::P(row_bytes as u64),
                ],
            );
            return;
        }
        let wpr = warps_per_row(rows * jobs, cols);
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(8 / wpr), jobs as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.matvec1x[kind],
            cfg,
            &[
                Arg::P(ta),
                Arg::P(tb),
                Arg::P(ids),
                Arg::I(k as i32),
                Arg::P(x),
                Arg::P(x_stride_floats as u64),
                Arg::P(y),
                Arg::I(rows as i32),
                Arg::I(cols as i32),
                Arg::P(row_bytes as u64),
                Arg::I(wpr as i32),
            ],
        );
    }

    /// Single-token products on 8-bit activations: the distinct input vectors are quantised
    /// in one launch, then the products run as one grouped launch per 16 jobs.
    fn matvec1_grouped_q8(&self, k: &K, jobs: &[(&CudaWeight, u64, u64)]) {
        let cols = jobs[0].0.cols;
        let mut xs: Vec<u64> = Vec::new();
        for j in jobs {
            if !xs.contains(&j.1) {
                xs.push(j.1);
            }
        }
        let stride = q8_bytes(cols) as u64;
        let Some(qbuf) = self.quantize_vectors(&xs, cols) else {
            return;
        };
        let qptr = |i: usize| qbuf.ptr() + i as u64 * stride;
        for chunk in jobs.chunks(MAXJ) {
            let w0 = chunk[0].0;
            let max_rows = chunk.iter().map(|j| j.0.rows).max().unwrap_or(0);
            let p = mv_jobs(chunk, |x| {
                qptr(xs.iter().position(|v| *v == x).unwrap_or(0))
            });
            // A launch whose warps (one per row) all fit on the device at once keeps two
            // steps' loads in flight per warp; a longer one keeps more warps resident.
            let warps: usize = chunk.iter().map(|j| j.0.rows).sum();
            let k = match self.kernels.matvec1q8u.get(w0.kind) {
                Some(Some(ku))
                    if self.mv_two_steps.load(std::sync::atomic::Ordering::Relaxed)
                        && warps <= ONE_WAVE_WARPS_PER_SM * self.sms =>
                {
                    ku
                }
                _ => k,
            };
            // One warp per row, 8 warps per block (tools/device/matvec_bench.cu: 2 rows per
            // warp and 4-warp blocks were not faster).
            let cfg = LaunchConfig {
                grid_dim: ((max_rows as u32).div_ceil(8), chunk.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                k,
                cfg,
                &[Arg::J(&p), Arg::P(w0.row_bytes as u64), Arg::I(cols as i32)],
            );
        }
    }

    /// Single-token products `y = W · x` of matrices of one format and width, in launches of
    /// up to MAXJ jobs: (weight, x address, y address).
    fn matvec1_grouped(&self, jobs: &[(&CudaWeight, u64, u64)]) {
        let Some(first) = jobs.first() else {
            return;
        };
        if let Some(k) = self.q8_kernel(first.0) {
            if jobs
                .iter()
                .all(|j| j.0.kind == first.0.kind && j.0.cols == first.0.cols)
            {
                return self.matvec1_grouped_q8(k, jobs);
            }
        }
        for chunk in jobs.chunks(MAXJ) {
            let w0 = chunk[0].0;
            let max_rows = chunk.iter().map(|j| j.0.rows).max().unwrap_or(0);
            let wpr = warps_per_row(max_rows, w0.cols);
            let p = mv_jobs(chunk, |x| x);
            let cfg = LaunchConfig {
                grid_dim: ((max_rows as u32).div_ceil(8 / wpr), chunk.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.kernels.matvec1g[w0.kind],
                cfg,
                &[
                    Arg::J(&p),
                    Arg::P(w0.row_bytes as u64),
                    Arg::I(w0.cols as i32),
                    Arg::I(wpr as i32),
                ],
            );
        }
    }

    fn norm_rows(&self, x: u64, w: &CudaBuf, dim: usize, eps: f32, out: u64, rows: usize) {
        if rows == 0 || w.len < dim {
            if w.len < dim {
                self.fail(format!(
                    "rms_norm: weight of {} values for rows of {dim}",
                    w.len
                ));
            }
            return;
        }
        // About four values per thread: a decode step's single row uses the whole block.
        let threads = (dim.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            &self.kernels.rms_norm,
            cfg,
            &[
                Arg::P(x),
                Arg::P(w.ptr()),
                Arg::P(out),
                Arg::I(dim as i32),
                Arg::F(eps),
            ],
        );
    }

    /// True when an operation failed since the last [`Backend::check`].
    pub fn has_error(&self) -> bool {
        self.failed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_suffixes_follow_the_format_order() {
        for (i, name) in DTYPE_NAMES.iter().enumerate() {
            assert_eq!(DType::ALL[i].name().to_ascii_lowercase(), *name);
            assert_eq!(dtype_index(DType::ALL[i]), Some(i));
        }
        assert_eq!(dtype_index(DType::Q8K), None);
    }

    #[test]
    fn attention_splits_aim_at_a_few_blocks_per_sm() {
        let auto = AttnSplits {
            keys_per_warp: 2,
            max: None,
        };
        // 32 heads of one token on 132 SMs: 17 splits (528 blocks); one head: the kernel's 128;
        // a prefill's many (token, head) blocks: 1.
        assert_eq!(auto.max_for(32, 132), 17);
        assert_eq!(auto.max_for(64, 132), 9);
        assert_eq!(auto.max_for(1, 132), 128);
        assert_eq!(auto.max_for(4096, 132), 1);
        assert_eq!(auto.max_for(0, 132), 128);
        // FLOWGATE_CUDA_ATTN_MAX_SPLITS wins.
        let fixed = AttnSplits {
            keys_per_warp: 2,
            max: Some(100),
        };
        assert_eq!(fixed.max_for(32, 132), 100);
    }
}
