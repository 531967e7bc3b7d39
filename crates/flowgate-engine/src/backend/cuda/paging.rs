//! The VRAM expert tier (`--vram-budget`): MoE experts held in page-locked host memory and
//! copied on demand into a device cache of fixed-size slots.
//!
//! - **Slots.** One VMM reservation ([`VmmArena`]) cut into chunks of about 64 MiB (whole
//!   allocation-granularity units), each holding several expert slots back to back; every chunk
//!   is mapped when the cache is provisioned, so a slot's address never changes and the
//!   allocator's budget is charged once, up front (paging never allocates). A slot holds one
//!   expert's gate, up and down matrices in their file format, each 256-byte aligned.
//! - **Host tier** ([`PinnedTier`]). With `--vram-budget` alone the expert tensors stay in the
//!   loader's arenas, which are page-locked in place with `cuMemHostRegister` ([`HostPin`]): a
//!   miss is three asynchronous host→device copies straight from them at the link's full
//!   speed, no staging. With `--ram-budget` as well, the host tier is itself a cache: a
//!   [`HostExpertCache`] of RAM slots (page-locked once) over the model file, so a miss in
//!   VRAM that also misses in RAM is first read from the SSD by the direct loader, then copied;
//!   the RAM slots a copy reads stay pinned until an event after it has completed.
//! - **Bookkeeping** is [`SlotMap`] (per-layer quotas, LRU or LFU-with-aging eviction); each
//!   paged layer keeps its own device table of expert addresses, which the expert-indexed
//!   mat-vecs of `moe_decode` read. When a miss lands in a slot, one `moe_page` launch points
//!   the table entries at it.
//! - **Per token** (`moe_decode`): the router and top-k run on the device as for resident
//!   experts; the chosen ids come back to the host (the one round trip per sparse layer
//!   paging needs: `publish_back` writes them into device-mapped host memory and raises a
//!   flag the host spins on, no stream synchronisation), the misses are copied on the compute
//!   stream (ordered after the work that read the evicted slots, before the products that read
//!   the new ones), then the products run. A layer whose quota is smaller than `k` runs its
//!   experts in waves of the quota.
//!   Prefill routes on the host and takes the experts wave by wave as weight views of the slots.
//! - **Copies**: an expert whose three parts lie evenly spaced in host memory (a layer's merged
//!   gate, up and down tensors back to back) goes in one 2-D copy, else in three ([`copy_plan`]).
//! - **Statistics**: hits and misses per layer, bytes copied, evictions, and the device time
//!   spent copying (events around each layer's copies, read when the statistics are asked for).
//!   With `FLOWGATE_PAGING_TIMELINE=1`, the device time between fixed points of every paged
//!   layer as well ([`super::layer_timeline`]).
//! - **Missed experts on the CPU** (Fiddler's idea; `--cpu-experts auto|all|off`, the CLI's
//!   default `auto`): copying an expert over PCIe and computing it on the host's cores take
//!   comparable time, so when a token's layer misses m experts, j of them are computed on the
//!   CPU (from the same page-locked host copies, with the CPU backend's kernels) while the
//!   other m − j are copied and computed on the GPU. `auto` picks j minimising
//!   max(L_cpu + T_cpu(j), L_gpu + (m − j)·t_copy) ([`split`]), with t_copy measured when the
//!   cache is provisioned, T_cpu(j) a line a + b·j fitted to the times measured when CPU
//!   experts are first switched on and then in decode ([`CpuFit`]), and the two sides' fixed
//!   parts L measured in decode ([`Lags`]). The layer's copies are queued first, the CPU share
//!   is handed over right after them (the routes and table entries the products need follow
//!   in one launch), and it runs on a [`Team`] of spinning workers (one [`ExpertSum`] job per
//!   layer: blocks of gate and up rows, then of down rows, summed over the experts at the end)
//!   while this thread goes on queueing; the last worker writes the sum into page-locked
//!   memory and raises a [`HostFlag`] to the share's sequence number, on which the stream
//!   waits (`cuStreamWaitValue32`: the GPU polls it, no host thread has to wake), then the
//!   stream copies the sum in and adds it to the GPU's. Where the device cannot wait on host
//!   memory (or with `FLOWGATE_CPU_GATE=host`, to compare) the stream waits at a
//!   host-function gate instead (`cuLaunchHostFunc`), whose thread has to be scheduled while
//!   every core is busy: on the H100 box that gate cost the whole gain (37.6 tok/s against
//!   48.0 with the flag, moe30b at 3 GiB). Results differ from all-GPU ones by the CPU
//!   kernels' own rounding (8-bit activations per 256 instead of per 32).
//!
//! - **Misses read in place** (`--miss-path in-place`, the default where every expert is
//!   page-locked in host RAM, i.e. `--vram-budget` without `--ram-budget`; no speculative
//!   prefetch). Page-locked host memory is mapped into the device's address space, so a
//!   product kernel can read a missed expert where it lies, over the link, at the link's
//!   speed: no copy, no eviction, and no host round trip before the products. Each paged
//!   layer's device table then holds a valid address for every expert (its slot, or its host
//!   memory) and a residency flag; the table is rewritten whole whenever the layer's
//!   residency changed since ([`ExpertPager`]'s per-layer generation: prefill still copies
//!   its waves into slots). Per token, after the router's top-k on the device, one kernel
//!   (`moe_split_mask`) takes the CPU's share out of the routes by the flags and a table of
//!   CPU shares passed by value (for m misses, the last `j(m)` in route order), the routes
//!   are published, and the products are queued before the host waits for them; the host
//!   reads the routes, finds the same CPU experts from the same residency and table, and
//!   hands them to the team as above. Q4_K products of a layer read in place stage their
//!   rows through shared memory in whole 16-byte words (`matvec1q8xs_q4_k`): with the
//!   per-row kernel's small, line-straddling loads, reading in place was slower than copying
//!   (H100, moe30b at 8 GiB, all misses on the GPU: 54–56 against 60–64 tok/s), staged it is
//!   faster (docs/benchmarks.md).
//!   `FLOWGATE_CPU_SHARE=n` fixes the CPU's share at n misses a layer (measurements).
//! - **Speculative prefetch** (Mixtral-offloading's idea; off by default, `--expert-prefetch`
//!   on the commands that run a model, `bench moe --prefetch`): before a sparse layer's router runs, the next sparse layer's router is
//!   applied to the same input on the device ([`super::Backend::moe_predict`]); its top-k
//!   comes back with this layer's routes (no extra synchronisation). Once this layer's work
//!   is queued, the predicted experts that are not resident get slots in the next layer
//!   ([`SlotMap::prefetch`]: no hits or misses counted) and are copied on a stream of their
//!   own, which first waits for the work queued so far (this layer's own copies go first on
//!   the link, and nothing queued may still read an evicted slot). The next layer's `page_in`
//!   makes the compute stream wait for those copies before its own; the experts it asks for
//!   that were prefetched count as used (prefetch accuracy). A prediction of the model's
//!   router only: uniform benchmark routing draws experts at random.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flowgate_cuda::cudarc::driver::sys;
use flowgate_cuda::{Event, HostFlag, HostPin, PinnedBuffer, VmmArena};
use flowgate_formats::catalog::names;
use flowgate_formats::{DType, ModelSpec};
use flowgate_io::AlignedBuf;

use super::layer_timeline::{LayerTimeline, Mark};
use super::pinned_tier::{PinnedTier, Resident};
use super::{
    cuda_err, dtype_index, grid_1d, lock, one_block, Arg, CudaBackend, CudaExperts, CudaWeight,
    WMem,
};
use crate::backend::cpu::experts::ExpertSum;
use crate::backend::cpu::team::Team;
use crate::backend::cpu::{CpuBackend, CpuWeight};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::residency::host_tier::CacheStats;
use crate::residency::{
    Assigned, DevicePlan, HostExpertCache, Lease, PolicyKind, RamCachePlan, SlotMap,
};
use crate::weights::HostTensor;

/// One split layer in this many measures its GPU part's fixed time.
const SIDE_EVERY: u32 = 4;

/// Table entries and routes one `moe_page` launch can write (`PAGE_MAX` in moe.cu).
const PAGE_MAX: usize = 64;
/// Where the token's hidden vector lands in the read-back buffer (after k ids and weights,
/// then a prediction's k ids).
const HIDDEN_BACK: usize = 12 * PAGE_MAX;
/// A RAM cache under the VRAM tier holds at least this many times `k` experts: a layer's
/// copies, the CPU share of the layer before (its job may end a moment after the stream has
/// gone on) and its own.
pub const RAM_SLOTS_PER_K: usize = 3;
/// Target bytes of one mapped chunk of slots.
const CHUNK_TARGET: usize = 64 << 20;

/// How the slots are mapped: `(per_chunk, n_chunks, n_slots)` for `want` slots of `slot`
/// bytes in chunks of whole `gran` units, each of at most [`CHUNK_TARGET`] (one slot at
/// least), within `avail` bytes. Chunks are all the same size, so the most slots come from
/// trying each chunk size: a budget between two chunks of the largest size would otherwise
/// lose the second one's slots whole (moe30b: 25 slots a 64 MiB chunk).
fn chunking(slot: usize, gran: usize, avail: u64, want: usize) -> (usize, usize, usize) {
    let max = (CHUNK_TARGET / slot.max(1)).clamp(1, want.max(1));
    let mut best = (max, 0, 0);
    for per_chunk in (1..=max).rev() {
        let chunk = ((per_chunk * slot).div_ceil(gran) * gran) as u64;
        let n_chunks = (avail / chunk.max(1)).min(want.div_ceil(per_chunk) as u64) as usize;
        let n_slots = (n_chunks * per_chunk).min(want);
        if n_slots > best.2 {
            best = (per_chunk, n_chunks, n_slots);
        }
        if n_slots == want {
            break;
        }
    }
    best
}

/// `moe_page`'s by-value argument (`struct MoePage` in moe.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MoePage {
    n: i32,
    k: i32,
    e: [i32; PAGE_MAX],
    ids: [i32; PAGE_MAX],
    w: [f32; PAGE_MAX],
    r: [i32; PAGE_MAX],
    a: [[u64; PAGE_MAX]; 3],
}

// SAFETY: plain old data with the C layout of `struct MoePage` (2 ints, 4 arrays of 64 4-byte
// values, then 3 × 64 u64 starting at byte 1032, 8-aligned).
unsafe impl flowgate_cuda::cudarc::driver::DeviceRepr for MoePage {}

impl MoePage {
    pub(super) fn empty() -> MoePage {
        MoePage {
            n: 0,
            k: 0,
            e: [0; PAGE_MAX],
            ids: [0; PAGE_MAX],
            w: [0.0; PAGE_MAX],
            r: [0; PAGE_MAX],
            a: [[0; PAGE_MAX]; 3],
        }
    }

    /// Adds a table entry: `expert`'s gate, up and down are read at `parts`, in a device slot
    /// (`resident`) or in place in host memory. True once the table is full.
    fn push(&mut self, expert: usize, parts: [u64; 3], resident: bool) -> bool {
        let n = self.n as usize;
        self.e[n] = expert as i32;
        self.r[n] = i32::from(resident);
        for (a, x) in self.a.iter_mut().zip(parts) {
            a[n] = x;
        }
        self.n += 1;
        self.n as usize == PAGE_MAX
    }

    /// Routes chosen on the host, to be written to the device.
    pub(super) fn routes(routes: &[(usize, f32)]) -> Option<MoePage> {
        if routes.len() > PAGE_MAX {
            return None;
        }
        let mut p = MoePage::empty();
        p.k = routes.len() as i32;
        for (i, &(e, w)) in routes.iter().enumerate() {
            p.ids[i] = e as i32;
            p.w[i] = w;
        }
        Some(p)
    }
}

/// How the stream waits for a CPU share's sum (`FLOWGATE_CPU_GATE=kernel|stream|host`,
/// measuring; each falls back to the next where the device cannot do it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuGate {
    /// A kernel polls the flag over the link, then adds the sum read in place
    /// (`moe_cpu_join`): one operation, the flag seen within a read's round trip.
    Kernel,
    /// The stream's own wait on the flag (`cuStreamWaitValue32`), then a copy and an add.
    Stream,
    /// A host function that waits for the job, then a copy and an add.
    Host,
}

impl CpuGate {
    const ALL: [CpuGate; 3] = [CpuGate::Kernel, CpuGate::Stream, CpuGate::Host];

    fn from_env() -> CpuGate {
        std::env::var("FLOWGATE_CPU_GATE")
            .ok()
            .and_then(|v| CpuGate::parse(&v).ok())
            .unwrap_or(CpuGate::Kernel)
    }

    /// `kernel`, `stream` or `host`.
    pub fn parse(s: &str) -> Result<CpuGate> {
        CpuGate::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                EngineError::Invalid(format!("CPU gate {s}: expected kernel, stream or host"))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuGate::Kernel => "kernel",
            CpuGate::Stream => "stream",
            CpuGate::Host => "host",
        }
    }

    fn from_u8(v: u8) -> CpuGate {
        CpuGate::ALL
            .into_iter()
            .find(|g| *g as u8 == v)
            .unwrap_or(CpuGate::Host)
    }
}

/// `moe_split_mask`'s by-value argument (`struct MoeSplit` in moe.cu): for m misses among a
/// token's routes, how many (the last in route order) the CPU computes.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MoeSplit {
    j: [i32; PAGE_MAX + 1],
}

// SAFETY: plain old data with the C layout of `struct MoeSplit` (65 ints).
unsafe impl flowgate_cuda::cudarc::driver::DeviceRepr for MoeSplit {}

/// An expert's three matrices in their file format: shapes and where they sit in a slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct ExpertShape {
    pub kind: usize,
    pub ffn: usize,
    pub hidden: usize,
    pub row_bytes: usize,
    pub down_kind: usize,
    pub down_row_bytes: usize,
    /// Bytes of gate, up and down.
    part: [usize; 3],
    /// Offsets of gate, up and down in a slot.
    off: [u64; 3],
    slot_bytes: usize,
}

/// Which missed experts decode computes on the CPU instead of copying them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuExperts {
    /// None: every miss is copied into the device cache (the default: on the H100 box the
    /// CPU share did not pay, see docs/benchmarks.md).
    Off = 0,
    /// As many as the measured costs say finish no later than copying.
    Auto = 1,
    /// Every miss (tests, and measuring the CPU side alone).
    All = 2,
}

impl CpuExperts {
    /// `off`, `auto` or `all`.
    pub fn parse(s: &str) -> Result<CpuExperts> {
        match s {
            "off" => Ok(CpuExperts::Off),
            "auto" => Ok(CpuExperts::Auto),
            "all" => Ok(CpuExperts::All),
            _ => Err(EngineError::Invalid(format!(
                "--cpu-experts {s}: expected off, auto or all"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuExperts::Off => "off",
            CpuExperts::Auto => "auto",
            CpuExperts::All => "all",
        }
    }
}

/// How decode reaches a missed expert that the CPU does not compute (`--miss-path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissPath {
    /// Copied into a slot of the device cache (evicting another), then computed there.
    Copy,
    /// Read in place by the GPU's products, from page-locked host memory over the link: no
    /// copy, no eviction in decode, and no host round trip before the products
    /// (`CudaBackend::moe_in_place`). Needs every expert in page-locked host memory
    /// (`--vram-budget` without `--ram-budget`); elsewhere misses are copied.
    InPlace,
}

impl MissPath {
    /// `copy` or `in-place`.
    pub fn parse(s: &str) -> Result<MissPath> {
        match s {
            "copy" => Ok(MissPath::Copy),
            "in-place" => Ok(MissPath::InPlace),
            _ => Err(EngineError::Invalid(format!(
                "--miss-path {s}: expected copy or in-place"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MissPath::Copy => "copy",
            MissPath::InPlace => "in-place",
        }
    }
}

/// The provisioned cache: slots and their bookkeeping.
struct Slots {
    map: SlotMap,
    arena: VmmArena,
    per_chunk: usize,
    plan: DevicePlan,
}

impl Slots {
    /// The device address of slot `slot` (slots of `slot_bytes`, `per_chunk` to a chunk).
    fn addr(&self, slot: usize, slot_bytes: usize) -> Result<u64> {
        let chunk = self
            .arena
            .slot_ptr(slot / self.per_chunk)
            .map_err(cuda_err)?;
        Ok(chunk + ((slot % self.per_chunk) * slot_bytes) as u64)
    }
}

/// The expert tier of one model on one device.
pub struct ExpertPager {
    n_experts: usize,
    sparse: Vec<bool>,
    /// Per layer: how many times its residency has changed (copies into slots, evictions);
    /// a table read in place is rewritten whole when it lags ([`CudaBackend::sync_table`]).
    gens: Vec<AtomicU64>,
    pub(super) shape: ExpertShape,
    /// Where misses are copied from: page-locked RAM holding every expert, or a RAM cache
    /// over the file (attached once the dense weights are on the device).
    host: OnceLock<PinnedTier>,
    /// Experts of the model, and their bytes.
    n_total: usize,
    host_bytes: u64,
    slots: Mutex<Option<Slots>>,
    /// Routed ids read back to the host (page-locked and device-mapped: `publish_back` writes
    /// it, at `ids_back_dev`).
    ids_back: Mutex<PinnedBuffer>,
    ids_back_dev: u64,
    /// Raised by `publish_back` to the read-back's sequence number once `ids_back` is written.
    back_flag: HostFlag,
    back_seq: AtomicU32,
    /// (start, end) events around each layer's copies, not read yet.
    copy_events: Mutex<Vec<(Event, Event)>>,
    /// Event pairs read by [`ExpertPager::stats`], for the next layers' copies (creating two
    /// events per layer cost the copies' start a few microseconds).
    spare_events: Mutex<Vec<(Event, Event)>>,
    /// Device time spent copying, read from the events so far.
    copy_time: Mutex<Duration>,
    policy: PolicyKind,
    /// Experts a token uses (`k`).
    n_used: usize,
    cpu_mode: AtomicU8,
    /// Measured at provisioning: seconds to copy one expert, and to compute j experts on the
    /// CPU (index j, 0..=k).
    cost: Mutex<Option<(f64, Vec<f64>)>>,
    /// The line behind the CPU part of `cost` ([`CpuFit`]).
    cpu_fit: Mutex<CpuFit>,
    /// When the routes being served came back to the host (the CPU share's lag is counted
    /// from there).
    routes_at: Mutex<Option<Instant>>,
    /// The fixed parts of the split's two sides ([`Lags`]).
    lags: Mutex<Lags>,
    /// Two events around the last layer's GPU part (recorded when it started being queued
    /// and after its products) and the copies it made, read at the next sampled split layer
    /// (by then the routes' read-back has seen the stream past them): [`Lags::gpu`].
    side: OnceLock<(Event, Event)>,
    side_copies: Mutex<Option<usize>>,
    /// Split layers seen: one in [`SIDE_EVERY`] measures its GPU part (see `side_events`).
    side_tick: AtomicU32,
    /// The CPU share of the layer being queued, not started yet: [`CudaBackend::page_in`]
    /// starts it once the layer's copies are all queued (see [`CudaBackend::moe_split`]).
    pending_share: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The CPU share's weighted sum (`hidden` floats, page-locked), and a CPU failure not
    /// reported yet.
    cpu_out: Mutex<PinnedBuffer>,
    /// `cpu_out`'s device address, which the join kernel reads (`None`: not mapped; the
    /// stream then waits on the flag and copies the sum).
    cpu_out_dev: Option<u64>,
    /// Raised to a share's sequence number once its sum is in `cpu_out`; the stream waits on
    /// it (see [`CpuGate`]).
    cpu_flag: HostFlag,
    cpu_seq: AtomicU32,
    /// How the stream waits for a CPU share: a [`CpuGate`] as u8.
    gate: AtomicU8,
    failure: Mutex<Option<String>>,
    /// The threads that compute the CPU share (started when CPU experts are first on).
    team: OnceLock<Team>,
    /// Speculative prefetch (off by default): the next layer's predicted experts are copied
    /// in on a stream of their own ([`CudaBackend::start_prefetch`]).
    prefetch_on: AtomicBool,
    /// With CPU experts on `auto`: this many misses of a layer (at most) on the CPU instead
    /// of what the cost model says ([`ExpertPager::set_fixed_share`]).
    fixed_share: Mutex<Option<usize>>,
    /// Decode reads a missed expert in place, from page-locked host memory over the link,
    /// instead of copying it into a slot first ([`ExpertPager::set_miss_path`]).
    in_place_on: AtomicBool,
    copy_stream: OnceLock<flowgate_cuda::Stream>,
    /// The prediction queued on the device, read back with the next routes: (layer, k, ids
    /// then weights).
    predicted: Mutex<Option<(usize, usize, super::CudaBuf)>>,
    /// The prediction read back: (layer, experts).
    guess: Mutex<Option<(usize, Vec<usize>)>>,
    /// Per layer: the prefetch in flight for it.
    inflight: Mutex<Vec<Option<Inflight>>>,
    /// Device time between fixed points of each paged layer (`FLOWGATE_PAGING_TIMELINE=1`).
    pub(super) timeline: LayerTimeline,
}

/// A read-back queued by [`CudaBackend::publish`], for [`CudaBackend::collect`].
struct Published {
    seq: u32,
    k: usize,
    ids: bool,
    with_weights: bool,
    hidden: usize,
    predicted: Option<(usize, usize, super::CudaBuf)>,
}

/// A prefetch in flight for one layer: copies on the copy stream, then `done`.
struct Inflight {
    done: Event,
    /// (expert, slot address) of each expert copied.
    table: Vec<(usize, u64)>,
}

impl Drop for ExpertPager {
    fn drop(&mut self) {
        // Prefetch copies read the pinned host memory unpinned right after this.
        if let Some(s) = self.copy_stream.get() {
            let _ = s.synchronize();
        }
    }
}

/// One paged layer's link to its pager (inside [`CudaExperts`]).
pub struct PagedLayer {
    pub(super) pager: Arc<ExpertPager>,
    pub(super) layer: usize,
    /// The layer's residency generation ([`ExpertPager::bump`]) this table was last written
    /// whole for (`u64::MAX`: never), by [`CudaBackend::sync_table`].
    synced: AtomicU64,
}

/// `e`'s link to its pager; an error naming `what` for resident experts.
fn paged_of<'a>(e: &'a CudaExperts, what: &str) -> Result<&'a PagedLayer> {
    e.paged
        .as_ref()
        .ok_or_else(|| EngineError::Invalid(format!("{what} on resident experts")))
}

/// Expert `e`'s projection `stem` in layer `l`: a slice of the merged tensor, or its own.
fn expert_view(
    map: &HashMap<String, HostTensor>,
    l: usize,
    stem: &str,
    e: usize,
) -> Result<HostTensor> {
    let merged = names::blk(l, &format!("{stem}_exps.weight"));
    if let Some(t) = map.get(&merged) {
        if t.shape.len() != 3 {
            return Err(EngineError::Weight {
                tensor: merged,
                msg: format!("expected 3 dimensions, found {:?}", t.shape),
            });
        }
        return t.slice_outer(e);
    }
    let own = names::blk(l, &format!("{stem}.{e}.weight"));
    map.get(&own)
        .cloned()
        .ok_or_else(|| flowgate_formats::FormatError::MissingTensor(own).into())
}

/// The CPU share's cost model: `T(j) = a + b·j` seconds for `j` experts, fitted by least
/// squares to the times measured (at calibration, then every share decode computes), each new
/// sample scaling the weight of the older ones by [`CpuFit::DECAY`]. One line through all the
/// samples instead of a moving average per `j`: decode mostly asks for 2 or 3 experts, and a
/// single slow share used to leave `T(3)` above `T(4)` for many tokens, so that the share
/// shrank to 2 experts where 3 paid (moe30b, 3 GiB, H100: 96 CPU experts per token instead of
/// ~140, see docs/benchmarks.md).
#[derive(Clone, Debug, Default)]
struct CpuFit {
    /// Decayed sums: weight, j, j², t, j·t.
    w: f64,
    sj: f64,
    sjj: f64,
    st: f64,
    sjt: f64,
    /// The last line: (a, b).
    line: Option<(f64, f64)>,
}

impl CpuFit {
    const DECAY: f64 = 0.98;

    /// Adds `t` seconds for `j` experts and refits.
    fn add(&mut self, j: usize, t: f64) {
        let j = j as f64;
        for v in [
            &mut self.w,
            &mut self.sj,
            &mut self.sjj,
            &mut self.st,
            &mut self.sjt,
        ] {
            *v *= Self::DECAY;
        }
        self.w += 1.0;
        self.sj += j;
        self.sjj += j * j;
        self.st += t;
        self.sjt += j * t;
        let (mj, mt) = (self.sj / self.w, self.st / self.w);
        let var = self.sjj / self.w - mj * mj;
        let b = if var > 0.05 {
            (self.sjt / self.w - mj * mt) / var
        } else {
            // Samples of (nearly) one j alone do not say the slope: keep the last one.
            self.line.map_or(mt / mj.max(1.0), |l| l.1)
        };
        // A slope of at least a tenth of the mean time per expert: more experts never cost less.
        let b = b.max(0.1 * mt / mj.max(1.0));
        self.line = Some(((mt - b * mj).max(0.0), b));
    }

    /// T(j) for j = 0..=k (T(0) = 0), once there is a line.
    fn table(&self, k: usize) -> Option<Vec<f64>> {
        let (a, b) = self.line?;
        Some(
            (0..=k)
                .map(|j| if j == 0 { 0.0 } else { a + b * j as f64 })
                .collect(),
        )
    }

    /// T(j) predicted, if there is a line.
    fn predict(&self, j: usize) -> Option<f64> {
        self.line.map(|(a, b)| a + b * j as f64)
    }
}

/// The fixed parts of each side of a layer's split (seconds, moving averages): the GPU's
/// part takes `gpu` beyond its copies (measured on the device, from when the layer's work
/// starts being queued to its products done: the queueing before the first copy, the
/// products after the last); the CPU share starts `cpu` after the routes reach the host
/// (once the GPU's copies are queued).
#[derive(Clone, Copy, Debug, Default)]
struct Lags {
    gpu: f64,
    cpu: f64,
}

impl Lags {
    /// Adds a sample of `t` seconds to `v`, capped at `cap` (one copy's time): a longer lag
    /// is a hiccup (the queueing thread preempted, a page fault), not what the next layer
    /// will see, and a lag capped so never prices a side out. Uncapped, one sample of 1.2 ms
    /// once put every miss of a run on the CPU (H100, moe30b at 8 GiB: 48 tok/s instead of
    /// ~75); capped at four copies, a run of slow starts still took the CPU's lag to 209 µs
    /// and the CPU share to 1.8 experts a token (56.7 tok/s): a model that then seldom picks
    /// a side seldom measures it again. The lags measured are 20–50 µs, a copy 53–60 µs.
    fn note(v: &mut f64, t: f64, cap: f64) {
        let t = t.min(cap);
        *v = if *v == 0.0 { t } else { 0.9 * *v + 0.1 * t };
    }
}

/// How many of `misses` missed experts to compute on the CPU: the `j` that finishes the layer
/// soonest, counted from the routes' arrival on the host — the CPU's `j` experts
/// (`cpu[j]` seconds) after its start lag, the GPU's `misses − j` copies (`copy` seconds
/// each) plus its fixed part.
fn split(misses: usize, copy: f64, cpu: &[f64], lags: Lags) -> usize {
    let cost = |j: usize| {
        let c = match j {
            0 => 0.0,
            _ => lags.cpu + cpu.get(j).copied().unwrap_or(f64::INFINITY),
        };
        let g = match misses - j {
            0 => 0.0,
            n => lags.gpu + n as f64 * copy,
        };
        c.max(g)
    };
    (0..=misses.min(cpu.len().saturating_sub(1)))
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(0)
}

/// How one expert's three parts go from host memory into a slot.
#[derive(Debug, PartialEq, Eq)]
enum CopyPlan {
    /// The parts lie back to back on the host and in the slot (no padding between them): one
    /// copy of this many bytes.
    Contiguous(usize),
    /// Parts of one size, evenly spaced on the host (a layer's merged gate, up and down
    /// tensors back to back, as in the synthetic files) and in the slot: one 2-D copy of
    /// three rows. One copy instead of three: 52 against 57 µs an expert on the H100 box.
    Pitched { src_pitch: usize },
    /// Anything else: three copies.
    Parts,
}

/// The copies for an expert whose parts are at `host` (gate, up, down).
fn copy_plan(host: &[u64; 3], s: &ExpertShape) -> CopyPlan {
    let rel = |i: usize| host[i].checked_sub(host[0]);
    let packed = (1..3).all(|i| s.off[i] - s.off[i - 1] == s.part[i - 1] as u64);
    if packed && (1..3).all(|i| rel(i) == Some(s.off[i] - s.off[0])) {
        return CopyPlan::Contiguous((s.off[2] - s.off[0]) as usize + s.part[2]);
    }
    let width = s.part[0];
    let dst_pitch = s.off[1] - s.off[0];
    let even = s.part.iter().all(|&p| p == width) && s.off[2] - s.off[1] == dst_pitch;
    match (rel(1), rel(2)) {
        (Some(p), Some(p2)) if even && p >= width as u64 && p2 == 2 * p && p <= i32::MAX as u64 => {
            CopyPlan::Pitched {
                src_pitch: p as usize,
            }
        }
        _ => CopyPlan::Parts,
    }
}

fn align256(n: usize) -> usize {
    n.div_ceil(256) * 256
}

impl ExpertShape {
    /// The slot layout of an expert stored as `dtypes` (gate, up, down) of `bytes` each, for
    /// `ffn × hidden` gate and up and a `hidden × ffn` down.
    fn new(
        name: &str,
        dtypes: [DType; 3],
        bytes: [usize; 3],
        ffn: usize,
        hidden: usize,
    ) -> Result<ExpertShape> {
        let format = |i: usize| -> Result<(usize, usize)> {
            let cols = if i < 2 { hidden } else { ffn };
            let kind = dtype_index(dtypes[i]).ok_or_else(|| EngineError::Weight {
                tensor: name.to_string(),
                msg: format!("dtype {} is not a weight format", dtypes[i]),
            })?;
            let row_bytes = dtypes[i]
                .row_bytes(cols as u64)
                .map_err(|e| EngineError::Invalid(e.to_string()))?
                as usize;
            Ok((kind, row_bytes))
        };
        let (g, u, d) = (format(0)?, format(1)?, format(2)?);
        if u.0 != g.0 {
            return Err(EngineError::Invalid(format!(
                "{name}: gate and up differ in format"
            )));
        }
        let off = [
            0,
            align256(bytes[0]) as u64,
            (align256(bytes[0]) + align256(bytes[1])) as u64,
        ];
        Ok(ExpertShape {
            kind: g.0,
            ffn,
            hidden,
            row_bytes: g.1,
            down_kind: d.0,
            down_row_bytes: d.1,
            part: bytes,
            off,
            slot_bytes: off[2] as usize + align256(bytes[2]),
        })
    }

    /// Where the gate, up and down of the expert in the slot at `base` lie.
    fn parts_at(&self, base: u64) -> [u64; 3] {
        self.off.map(|o| base + o)
    }

    /// Checks that `other` (expert `e` of layer `l`) is stored as the first expert was.
    fn same_as(&self, other: &ExpertShape, l: usize, e: usize) -> Result<()> {
        if (self.kind, self.down_kind, self.part) != (other.kind, other.down_kind, other.part) {
            return Err(EngineError::Invalid(format!(
                "expert {e} of layer {l} differs in format from the others: \
                 --vram-budget needs experts of one format"
            )));
        }
        Ok(())
    }
}

/// The experts of a model as they are walked through: their common storage (checked to be
/// one), how many, and their bytes.
struct ExpertsSeen {
    ffn: usize,
    hidden: usize,
    shape: Option<ExpertShape>,
    n: usize,
    bytes: u64,
}

impl ExpertsSeen {
    fn new(ffn: usize, hidden: usize) -> ExpertsSeen {
        ExpertsSeen {
            ffn,
            hidden,
            shape: None,
            n: 0,
            bytes: 0,
        }
    }

    /// Expert `e` of layer `l` (its gate named `name`), stored as `dtypes` in `bytes`.
    fn add(
        &mut self,
        (l, e, name): (usize, usize, &str),
        dtypes: [DType; 3],
        bytes: [usize; 3],
    ) -> Result<()> {
        let s = ExpertShape::new(name, dtypes, bytes, self.ffn, self.hidden)?;
        match &self.shape {
            None => self.shape = Some(s),
            Some(s0) => s0.same_as(&s, l, e)?,
        }
        self.n += 1;
        self.bytes += bytes.iter().sum::<usize>() as u64;
        Ok(())
    }
}

/// The MoE part of `spec`, or why paging does not apply.
fn moe_of(spec: &ModelSpec) -> Result<&flowgate_formats::MoeSpec> {
    spec.moe
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("--vram-budget paging needs an MoE model".into()))
}

impl ExpertPager {
    /// Takes the expert tensors of layers `first_layer..` out of `tensors` (they stay in host
    /// memory, page-locked in place) and prepares the tier; slots come with
    /// [`ExpertPager::provision`], once the dense weights are on the device. Layers before
    /// `first_layer` run on the CPU (the GPU layer split) and keep their experts in `tensors`.
    pub fn new(
        backend: &CudaBackend,
        spec: &ModelSpec,
        tensors: &mut HashMap<String, HostTensor>,
        policy: PolicyKind,
        first_layer: usize,
    ) -> Result<Arc<ExpertPager>> {
        let m = moe_of(spec)?;
        let n = m.n_experts;
        let mut host = vec![None; spec.n_layers * n];
        let mut cpu: Vec<Option<[CpuWeight; 3]>> = (0..spec.n_layers * n).map(|_| None).collect();
        let mut arenas: Vec<Arc<AlignedBuf>> = Vec::new();
        let mut experts = ExpertsSeen::new(m.expert_ffn, spec.hidden);
        for l in (first_layer..spec.n_layers).filter(|&l| spec.is_sparse_layer(l)) {
            for e in 0..n {
                let mut parts: Vec<HostTensor> = Vec::with_capacity(3);
                for (i, stem) in ["ffn_gate", "ffn_up", "ffn_down"].into_iter().enumerate() {
                    let t = expert_view(tensors, l, stem, e)?;
                    let want = if i < 2 {
                        [m.expert_ffn, spec.hidden]
                    } else {
                        [spec.hidden, m.expert_ffn]
                    };
                    if t.shape != want {
                        return Err(EngineError::Weight {
                            tensor: t.name.clone(),
                            msg: format!("shape {:?}, expected {want:?}", t.shape),
                        });
                    }
                    let buf = t.storage();
                    if !arenas.iter().any(|a| Arc::ptr_eq(a, buf)) {
                        arenas.push(buf.clone());
                    }
                    parts.push(t);
                }
                let [g, u, d] = [&parts[0], &parts[1], &parts[2]];
                experts.add(
                    (l, e, &g.name),
                    [g.dtype, u.dtype, d.dtype],
                    [g.bytes().len(), u.bytes().len(), d.bytes().len()],
                )?;
                host[l * n + e] = Some([0, 1, 2].map(|i| parts[i].bytes().as_ptr() as u64));
                let mut it = parts.into_iter().map(|t| CpuBackend.weight(t));
                let (Some(g), Some(u), Some(d)) = (it.next(), it.next(), it.next()) else {
                    return Err(EngineError::Invalid("expert without three matrices".into()));
                };
                cpu[l * n + e] = Some([g?, u?, d?]);
            }
        }
        // The views above hold the arenas; the tensors themselves leave the map.
        tensors.retain(|name, _| {
            !crate::residency::ExpertLayout::is_expert_tensor(name)
                || crate::residency::layer_split::layer_of(name).is_some_and(|l| l < first_layer)
        });
        let mut pins = Vec::with_capacity(arenas.len());
        for a in &arenas {
            // SAFETY: the arena is kept alive (and never moves: it is a mapping) by the tier's
            // `arenas`, which is dropped after its `pins`.
            let pin = unsafe { HostPin::new(&backend.device, a.as_ptr().cast_mut(), a.len()) }
                .map_err(cuda_err)?;
            pins.push(pin);
        }
        let tier = PinnedTier::Resident(Resident::new(host, cpu, pins, arenas));
        Self::build(backend, spec, experts, Some(tier), policy, first_layer)
    }

    /// The tier over a RAM cache of experts (`--ram-budget` under `--vram-budget`): misses in
    /// VRAM are copied from the cache's slots (page-locked here), misses in RAM are read
    /// from the model file first.
    ///
    /// The cache comes later, with [`ExpertPager::attach_cache`]: the model is built first
    /// (its dense weights pass through host RAM on their way to the device, under the same
    /// RAM budget the cache then takes).
    pub fn over_file(
        backend: &CudaBackend,
        spec: &ModelSpec,
        layout: &crate::residency::ExpertLayout,
        policy: PolicyKind,
    ) -> Result<Arc<ExpertPager>> {
        let m = moe_of(spec)?;
        let mut experts = ExpertsSeen::new(m.expert_ffn, spec.hidden);
        for l in (0..spec.n_layers).filter(|&l| spec.is_sparse_layer(l)) {
            for e in 0..m.n_experts {
                let [g, u, d] = layout.infos(l, e).ok_or_else(|| {
                    EngineError::Invalid(format!("no expert {e} of layer {l} in the file"))
                })?;
                experts.add(
                    (l, e, &g.name),
                    [g.dtype, u.dtype, d.dtype],
                    [g.nbytes as usize, u.nbytes as usize, d.nbytes as usize],
                )?;
            }
        }
        Self::build(backend, spec, experts, None, policy, 0)
    }

    /// Bytes of all experts of the model.
    pub fn experts_bytes(&self) -> u64 {
        self.host_bytes
    }

    /// Slots a RAM cache under this tier needs at least.
    pub fn min_ram_slots(&self) -> usize {
        RAM_SLOTS_PER_K * self.n_used.max(1)
    }

    /// Attaches the RAM cache of a pager made with [`ExpertPager::over_file`], page-locking
    /// its slots.
    pub fn attach_cache(&self, backend: &CudaBackend, cache: Arc<HostExpertCache>) -> Result<()> {
        if cache.capacity() < self.min_ram_slots() {
            return Err(EngineError::Invalid(format!(
                "--ram-budget leaves room for {} experts in RAM; paging them on into VRAM needs \
                 at least {} ({RAM_SLOTS_PER_K} tokens' worth of one layer)",
                cache.capacity(),
                self.min_ram_slots()
            )));
        }
        let tier = PinnedTier::cached(&backend.device, cache)?;
        self.host
            .set(tier)
            .map_err(|_| EngineError::Invalid("the pager has its host tier already".into()))
    }

    /// The host tier.
    fn host(&self) -> Result<&PinnedTier> {
        self.host
            .get()
            .ok_or_else(|| EngineError::Invalid("the expert pager has no host tier yet".into()))
    }

    fn build(
        backend: &CudaBackend,
        spec: &ModelSpec,
        experts: ExpertsSeen,
        host: Option<PinnedTier>,
        policy: PolicyKind,
        first_layer: usize,
    ) -> Result<Arc<ExpertPager>> {
        let m = moe_of(spec)?;
        let shape = experts
            .shape
            .ok_or_else(|| EngineError::Invalid("the model has no sparse layer".into()))?;
        let (n_total, host_bytes) = (experts.n, experts.bytes);
        // Paged: the sparse layers on the device.
        let sparse: Vec<bool> = (0..spec.n_layers)
            .map(|l| l >= first_layer && spec.is_sparse_layer(l))
            .collect();
        // ids and weights (k each), then the token's hidden vector.
        let ids_back =
            PinnedBuffer::new(&backend.device, HIDDEN_BACK + 4 * spec.hidden).map_err(cuda_err)?;
        let cpu_out = PinnedBuffer::new(&backend.device, 4 * spec.hidden).map_err(cuda_err)?;
        let cpu_out_dev = cpu_out
            .device_ptr()
            .map_err(|err| tracing::warn!(%err, "the CPU share's sum is not mapped for the device; the stream waits on its flag"))
            .ok();
        Ok(Arc::new(ExpertPager {
            n_experts: m.n_experts,
            gens: sparse.iter().map(|_| AtomicU64::new(0)).collect(),
            sparse,
            shape,
            host: host.map_or_else(OnceLock::new, OnceLock::from),
            n_total,
            host_bytes,
            slots: Mutex::new(None),
            ids_back_dev: ids_back.device_ptr().map_err(cuda_err)?,
            ids_back: Mutex::new(ids_back),
            back_flag: HostFlag::new(&backend.device).map_err(cuda_err)?,
            back_seq: AtomicU32::new(0),
            copy_events: Mutex::new(Vec::new()),
            spare_events: Mutex::new(Vec::new()),
            copy_time: Mutex::new(Duration::ZERO),
            policy,
            n_used: m.n_experts_used.min(PAGE_MAX),
            cpu_mode: AtomicU8::new(CpuExperts::Off as u8),
            cost: Mutex::new(None),
            cpu_fit: Mutex::new(CpuFit::default()),
            routes_at: Mutex::new(None),
            lags: Mutex::new(Lags::default()),
            side: OnceLock::new(),
            side_copies: Mutex::new(None),
            side_tick: AtomicU32::new(0),
            pending_share: Mutex::new(None),
            cpu_out: Mutex::new(cpu_out),
            cpu_out_dev,
            cpu_flag: HostFlag::new(&backend.device).map_err(cuda_err)?,
            cpu_seq: AtomicU32::new(0),
            gate: AtomicU8::new(CpuGate::from_env() as u8),
            failure: Mutex::new(None),
            team: OnceLock::new(),
            prefetch_on: AtomicBool::new(false),
            fixed_share: Mutex::new(
                std::env::var("FLOWGATE_CPU_SHARE")
                    .ok()
                    .and_then(|v| v.parse().ok()),
            ),
            in_place_on: AtomicBool::new(true),
            copy_stream: OnceLock::new(),
            predicted: Mutex::new(None),
            guess: Mutex::new(None),
            inflight: Mutex::new((0..spec.n_layers).map(|_| None).collect()),
            timeline: LayerTimeline::from_env(),
        }))
    }

    /// The RAM cache under the VRAM tier (`--ram-budget`), when there is one.
    pub fn ram_cache(&self) -> Option<&Arc<HostExpertCache>> {
        self.host.get().and_then(PinnedTier::cache)
    }

    /// Experts of the model.
    pub fn n_experts_total(&self) -> usize {
        self.n_total
    }

    /// Maps the slots the budget leaves (after what is in use now and `reserve` bytes kept
    /// for the KV cache and activations), at most `max_slots` if given, and returns the plan.
    pub fn provision(
        &self,
        backend: &CudaBackend,
        reserve: u64,
        max_slots: Option<usize>,
    ) -> Result<DevicePlan> {
        let budget = backend.alloc.budget();
        let n_sparse = self.sparse.iter().filter(|&&s| s).count();
        let slot = self.shape.slot_bytes;
        let mut plan = DevicePlan::new(
            budget.budget(),
            budget.in_use(),
            reserve,
            slot as u64,
            n_sparse,
            self.n_experts_total(),
            self.host_bytes,
            self.policy,
        )?;
        if let Some(m) = max_slots {
            plan.n_slots = plan.n_slots.min(m);
        }
        let gran = VmmArena::info(&backend.device).map_err(cuda_err)?.minimum;
        let avail = budget.available().saturating_sub(reserve);
        let (per_chunk, n_chunks, n_slots) = chunking(slot, gran, avail, plan.n_slots);
        let chunk = (per_chunk * slot).div_ceil(gran) * gran;
        if n_chunks == 0 || n_slots < n_sparse {
            return Err(EngineError::Invalid(format!(
                "--vram-budget {} leaves room for {n_slots} expert slots once mapped in chunks \
                 of {}; the {n_sparse} sparse layers need one each",
                crate::residency::fmt_size(budget.budget()),
                crate::residency::fmt_size(chunk as u64)
            )));
        }
        let mut arena = VmmArena::new(&backend.alloc, chunk, n_chunks).map_err(cuda_err)?;
        for c in 0..n_chunks {
            arena.map(c).map_err(cuda_err)?;
        }
        let map = SlotMap::new(&self.sparse, self.n_experts, n_slots, self.policy)?;
        let plan = DevicePlan {
            n_slots: map.n_slots(),
            ram_cache: self.ram_cache().map(|c| RamCachePlan {
                ram_budget: c.budget().limit(),
                n_slots: c.capacity(),
                slot_bytes: c.layout().slot_bytes,
            }),
            ..plan
        };
        *lock(&self.slots) = Some(Slots {
            map,
            arena,
            per_chunk,
            plan: plan.clone(),
        });
        let copy = self.calibrate_copy(backend)?;
        tracing::info!(copy_us = 1e6 * copy, "expert copy host->device, measured");
        *lock(&self.cost) = Some((copy, vec![0.0]));
        if self.cpu_experts() != CpuExperts::Off {
            self.calibrate_cpu()?;
        }
        Ok(plan)
    }

    /// Measures one way to serve a miss: copying an expert into a slot, as decode does, several
    /// back to back (a layer's misses are queued together, so the link's per-copy start is
    /// paid once): the device time of `BURST` copies into empty slots over `BURST`, best of 6
    /// (device events). Timed one at a time, the same copies measured 53–77 µs from run to run
    /// on the H100 box and the split priced the link by the worst of them.
    fn calibrate_copy(&self, b: &CudaBackend) -> Result<f64> {
        const BURST: usize = 4;
        let layer = self
            .sparse
            .iter()
            .position(|&s| s)
            .ok_or_else(|| EngineError::Invalid("no expert to calibrate with".into()))?;
        let fetched = self.host()?.fetch(layer, &[0], self.n_experts, false)?;
        let host = fetched.addrs[0];
        let s = self.shape;
        let bases: Vec<u64> = {
            let g = lock(&self.slots);
            let sl = g
                .as_ref()
                .ok_or_else(|| EngineError::Invalid("no slots".into()))?;
            let n = BURST.min(sl.map.n_slots()).max(1);
            (0..n)
                .map(|i| sl.addr(i, s.slot_bytes))
                .collect::<Result<_>>()?
        };
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let a = Event::new(&b.device).map_err(cuda_err)?;
            let z = Event::new(&b.device).map_err(cuda_err)?;
            a.record(&b.stream).map_err(cuda_err)?;
            for &base in &bases {
                // SAFETY: the slot is mapped and holds slot_bytes; nothing is resident yet
                // (the map is empty), so the bytes written are never read as an expert; the
                // source is page-locked memory of the pager.
                if let Err(r) = unsafe { b.copy_expert(&b.stream, base, &host, &s) } {
                    return Err(EngineError::Invalid(format!("calibration copy: {r:?}")));
                }
            }
            z.record(&b.stream).map_err(cuda_err)?;
            z.synchronize().map_err(cuda_err)?;
            let t = a.elapsed_ms(&z).map_err(cuda_err)? as f64 / 1e3 / bases.len() as f64;
            best = best.min(t);
        }
        // Every copy has run (synchronised above): the expert may go.
        drop(fetched);
        Ok(best)
    }

    /// The CPU team, started on first use.
    fn team(&self) -> Result<&Team> {
        if let Some(t) = self.team.get() {
            return Ok(t);
        }
        let t = Team::new(Team::default_threads(), Duration::from_millis(5))
            .map_err(|e| EngineError::Invalid(format!("starting the CPU expert threads: {e}")))?;
        Ok(self.team.get_or_init(|| t))
    }

    /// Threads computing the CPU share (0 before CPU experts were first on).
    pub fn cpu_threads(&self) -> usize {
        self.team.get().map_or(0, Team::threads)
    }

    /// Runs `experts` of `layer` on the CPU team for the token `x` and waits for the sum.
    fn cpu_sum_blocking(
        &self,
        layer: usize,
        experts: &[(usize, f32)],
        x: &[f32],
    ) -> Result<Vec<f32>> {
        let ids: Vec<usize> = experts.iter().map(|e| e.0).collect();
        let w = self.host()?.cpu_weights(layer, &ids, self.n_experts)?;
        let ws = w
            .weights
            .into_iter()
            .zip(experts)
            .map(|(w, e)| (w, e.1))
            .collect();
        let slot = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
        let s2 = slot.clone();
        // The lease goes with the job's completion, which the job drops after its weights.
        let lease = w.lease;
        let done: crate::backend::cpu::experts::Done = Box::new(move |r| {
            let _held = &lease;
            *lock(&s2.0) = Some(r);
            s2.1.notify_all();
        });
        self.team()?.submit(Arc::new(ExpertSum::new(ws, x, done)));
        let mut g = lock(&slot.0);
        loop {
            if let Some(r) = g.take() {
                return r.map_err(EngineError::Invalid);
            }
            g = slot.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Measures the other way: computing j = 1..=k experts of a token on the CPU team (best
    /// of 3, every timed run on experts not touched before, as misses are cold in the host's
    /// caches), and stores it in the cost model.
    fn calibrate_cpu(&self) -> Result<()> {
        if lock(&self.cost).as_ref().is_some_and(|c| c.1.len() > 1) {
            return Ok(());
        }
        let hidden = self.shape.hidden;
        let x: Vec<f32> = (0..hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        // Each run takes one layer's experts (as decode does), walking through the layers
        // first so that every timed run reads experts not touched before.
        let layers: Vec<usize> = (0..self.sparse.len()).filter(|&l| self.sparse[l]).collect();
        let n = self.n_experts;
        let mut run = 0usize;
        let mut pick = |j: usize| -> (usize, Vec<(usize, f32)>) {
            let l = layers[run % layers.len()];
            let start = (run / layers.len()) * self.n_used.max(1);
            run += 1;
            (l, (0..j).map(|i| ((start + i) % n, 0.5)).collect())
        };
        // Untimed first: starts the team.
        let (l, e) = pick(1);
        self.cpu_sum_blocking(l, &e, &x)?;
        let mut cpu = vec![0.0];
        for j in 1..=self.n_used.min(n) {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let (l, e) = pick(j);
                // Under a RAM cache, read them from the file first: the time is the CPU's.
                if self.ram_cache().is_some() {
                    let ids: Vec<usize> = e.iter().map(|x| x.0).collect();
                    drop(self.host()?.cpu_weights(l, &ids, n)?);
                }
                let t0 = Instant::now();
                std::hint::black_box(self.cpu_sum_blocking(l, &e, &x)?);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            cpu.push(best);
        }
        // Decode's model is the line through these (each j's best of three).
        let fitted = {
            let mut fit = lock(&self.cpu_fit);
            *fit = CpuFit::default();
            for (j, &t) in cpu.iter().enumerate().skip(1) {
                fit.add(j, t);
            }
            fit.table(cpu.len() - 1)
        };
        tracing::info!(
            threads = self.cpu_threads(),
            cpu_us = ?cpu.iter().map(|t| (1e6 * t) as u64).collect::<Vec<_>>(),
            "j experts of a token on the CPU, measured"
        );
        if let Some(c) = lock(&self.cost).as_mut() {
            c.1 = fitted.unwrap_or(cpu);
        }
        Ok(())
    }

    /// The failure of a CPU share of experts since the last call, if any.
    /// Starts the layer's CPU share if one waits (see `pending_share`), noting its lag.
    fn start_share(&self) {
        let f = lock(&self.pending_share).take();
        if let Some(f) = f {
            self.note_lag(|l| &mut l.cpu);
            f();
        }
    }

    /// The events around a split layer's GPU part (made once; `None` if the driver has none
    /// to give, and the GPU's fixed part then stays unmeasured, 0).
    fn side_events(&self, device: &flowgate_cuda::Device) -> Option<&(Event, Event)> {
        if self.side.get().is_none() {
            if let (Ok(a), Ok(b)) = (Event::new(device), Event::new(device)) {
                let _ = self.side.set((a, b));
            }
        }
        self.side.get()
    }

    /// Reads the last sampled split layer's GPU part (its events completed before this
    /// layer's routes were published) into [`Lags::gpu`]: its time less its copies'.
    fn read_side(&self, (a, b): &(Event, Event)) {
        let Some(n) = lock(&self.side_copies).take() else {
            return;
        };
        let Ok(ms) = a.elapsed_ms(b) else { return };
        let copy = lock(&self.cost).as_ref().map_or(0.0, |c| c.0);
        let t = (ms as f64 / 1e3 - n as f64 * copy).max(0.0);
        Lags::note(&mut lock(&self.lags).gpu, t, copy);
    }

    /// Notes the time since the routes came back in one of the lags, capped at one copy's
    /// time.
    fn note_lag(&self, which: impl FnOnce(&mut Lags) -> &mut f64) {
        let Some(t) = *lock(&self.routes_at) else {
            return;
        };
        let cap = lock(&self.cost).as_ref().map_or(0.0, |c| c.0);
        Lags::note(which(&mut lock(&self.lags)), t.elapsed().as_secs_f64(), cap);
    }

    pub fn take_failure(&self) -> Option<String> {
        lock(&self.failure).take()
    }

    /// Whether decode computes missed experts on the CPU ([`CpuExperts::Off`] by default).
    /// Sets where missed experts run; the first mode other than `Off` starts the CPU team and
    /// measures it (once the slots are provisioned).
    pub fn set_cpu_experts(&self, mode: CpuExperts) -> Result<()> {
        self.cpu_mode.store(mode as u8, Ordering::Relaxed);
        if mode != CpuExperts::Off && lock(&self.cost).is_some() {
            self.calibrate_cpu()?;
        }
        Ok(())
    }

    pub fn cpu_experts(&self) -> CpuExperts {
        match self.cpu_mode.load(Ordering::Relaxed) {
            0 => CpuExperts::Off,
            2 => CpuExperts::All,
            _ => CpuExperts::Auto,
        }
    }

    /// Speculative prefetch of the next layer's predicted experts (decode with the model's
    /// router); off by default: a wrong guess costs link time and evicts an expert that might
    /// have hit.
    pub fn set_prefetch(&self, on: bool) {
        self.prefetch_on.store(on, Ordering::Relaxed);
    }

    pub fn prefetch(&self) -> bool {
        self.prefetch_on.load(Ordering::Relaxed)
    }

    /// Missed experts in decode: read in place from page-locked host memory by the products
    /// themselves (`on`), or copied into a slot first, evicting another. In place, decode
    /// changes no residency (the slots keep what prefill left) and the GPU never waits for
    /// the host: see `CudaBackend::moe_in_place`.
    pub fn set_miss_path(&self, path: MissPath) {
        self.in_place_on
            .store(path == MissPath::InPlace, Ordering::Relaxed);
    }

    /// The miss path decode takes now (in place only where the host tier allows it).
    pub fn miss_path(&self) -> MissPath {
        if self.in_place() {
            MissPath::InPlace
        } else {
            MissPath::Copy
        }
    }

    /// Under `--cpu-experts auto`, `Some(n)` gives the CPU n of each layer's misses (fewer
    /// when fewer miss) instead of the cost model's choice: to test a split that the
    /// measured costs might not pick, and to measure one.
    pub fn set_fixed_share(&self, n: Option<usize>) {
        *lock(&self.fixed_share) = n;
    }

    /// How the stream waits for the CPU share from now on (the others are fallbacks, kept
    /// tested through this).
    pub fn set_cpu_gate(&self, gate: CpuGate) {
        self.gate.store(gate as u8, Ordering::Relaxed);
    }

    /// `layer`'s residency changed (see `gens`).
    fn bump(&self, layer: usize) {
        if let Some(g) = self.gens.get(layer) {
            g.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether decode reads misses in place: asked for, the host tier allows it (every
    /// expert page-locked where the device maps it, i.e. no RAM cache under the slots), and
    /// no speculative prefetch is on (it copies into slots ahead of the layer).
    pub fn in_place(&self) -> bool {
        self.in_place_on.load(Ordering::Relaxed)
            && !self.prefetch()
            && self.host.get().is_some_and(|h| h.reads_in_place())
    }

    /// A prediction for `layer` queued on the device (`k` ids then weights in `buf`), read
    /// back with the next routes.
    pub(super) fn set_predicted(&self, layer: usize, k: usize, buf: super::CudaBuf) {
        *lock(&self.predicted) = Some((layer, k, buf));
    }

    /// The fixed parts of a split layer's two sides (seconds, moving averages; 0 before any
    /// was measured): the GPU's part beyond its copies, and how late after the routes the
    /// CPU share starts.
    pub fn split_lags(&self) -> (f64, f64) {
        let l = *lock(&self.lags);
        (l.gpu, l.cpu)
    }

    /// The measured costs: seconds per expert copy, and seconds for j CPU experts (j = 0..=k).
    pub fn costs(&self) -> Option<(f64, Vec<f64>)> {
        lock(&self.cost).clone()
    }

    /// How many of `misses` misses to compute on the CPU.
    fn cpu_share(&self, misses: usize) -> usize {
        match self.cpu_experts() {
            _ if misses == 0 => return 0,
            CpuExperts::Off => return 0,
            CpuExperts::All => return misses,
            CpuExperts::Auto => {}
        }
        if let Some(n) = *lock(&self.fixed_share) {
            return n.min(misses);
        }
        let lags = *lock(&self.lags);
        let g = lock(&self.cost);
        let Some((copy, cpu)) = g.as_ref() else {
            return 0;
        };
        split(misses, *copy, cpu, lags)
    }

    /// The plan, once provisioned.
    pub fn plan(&self) -> Option<DevicePlan> {
        lock(&self.slots).as_ref().map(|s| s.plan.clone())
    }

    /// Experts `layer` may hold at once.
    pub fn quota(&self, layer: usize) -> usize {
        lock(&self.slots).as_ref().map_or(0, |s| s.map.quota(layer))
    }

    /// Hits, misses, bytes copied and copy time so far (waits for the copies queued).
    pub fn stats(&self) -> CacheStats {
        let pending = std::mem::take(&mut *lock(&self.copy_events));
        let mut t = lock(&self.copy_time);
        let mut spare = Vec::new();
        for (a, b) in pending {
            if b.synchronize().is_ok() {
                if let Ok(ms) = a.elapsed_ms(&b) {
                    *t += Duration::from_secs_f64(ms as f64 / 1e3);
                    spare.push((a, b));
                }
            }
        }
        let mut pool = lock(&self.spare_events);
        spare.truncate(256usize.saturating_sub(pool.len()));
        pool.extend(spare);
        let mut s = lock(&self.slots)
            .as_ref()
            .map(|s| s.map.stats().clone())
            .unwrap_or_default();
        s.stall = *t;
        s
    }

    /// Device time between the fixed points of paged layers since the last call (or reset),
    /// per token over `tokens` tokens, as lines; `None` unless `FLOWGATE_PAGING_TIMELINE=1`.
    pub fn timeline_report(&self, tokens: usize) -> Option<String> {
        self.timeline.report(tokens)
    }

    /// Zeroes the statistics; residency is kept.
    pub fn reset_stats(&self) {
        let _ = self.stats();
        let _ = self.timeline.report(1);
        *lock(&self.copy_time) = Duration::ZERO;
        if let Some(s) = lock(&self.slots).as_mut() {
            s.map.reset_stats();
        }
    }
}

impl CudaBackend {
    /// Routes the sparse layers of the model built next through `pager`'s device cache.
    pub fn set_expert_pager(&self, pager: Arc<ExpertPager>) {
        *lock(&self.pager) = Some(pager);
    }

    /// A paged layer's (empty) expert table.
    pub(super) fn paged_layer(&self, layer: usize) -> Result<Option<CudaExperts>> {
        let Some(pager) = lock(&self.pager).clone() else {
            return Ok(None);
        };
        if !pager.sparse.get(layer).copied().unwrap_or(false) {
            return Ok(None);
        }
        let n = pager.n_experts;
        // Gate, up and down addresses, then residency flags (moe.cu, `moe_page`); n u64 each.
        let tables = self.new_buf(4 * n * 2)?;
        self.memset0(tables.ptr(), 4 * n * 2);
        let s = pager.shape;
        Ok(Some(CudaExperts {
            tables,
            n,
            kind: s.kind,
            ffn: s.ffn,
            hidden: s.hidden,
            row_bytes: s.row_bytes,
            down_kind: s.down_kind,
            down_row_bytes: s.down_row_bytes,
            paged: Some(PagedLayer {
                pager,
                layer,
                synced: AtomicU64::new(u64::MAX),
            }),
        }))
    }

    /// Spins until `flag` reaches `seq` (raised by a kernel on the stream), checking the stream
    /// now and then so that a failed launch or a stream that finished without raising it is
    /// an error, not a hang.
    fn wait_published(&self, flag: &HostFlag, seq: u32) -> Result<()> {
        let reached = || flag.get().wrapping_sub(seq) as i32 >= 0;
        let mut spins = 0u32;
        while !reached() {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && self.stream.is_idle().map_err(cuda_err)? && !reached() {
                return Err(EngineError::Invalid(
                    "the stream finished without publishing the routes".into(),
                ));
            }
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Reads back to the host, after the work queued so far (one kernel, then a spin):
    /// the `k` ids at `ids` (when given) and the `k` weights that follow them (with
    /// `with_weights`), and the `hidden` values at `h` (when given).
    pub(super) fn read_back(
        &self,
        pager: &ExpertPager,
        k: usize,
        ids: Option<u64>,
        with_weights: bool,
        h: Option<(u64, usize)>,
    ) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
        let sent = self.publish(pager, k, ids, with_weights, h)?;
        self.collect(pager, sent)
    }

    /// [`CudaBackend::read_back`]'s first half: the kernel that publishes, queued after the
    /// work queued so far. Work queued after it runs on while the host waits in
    /// [`CudaBackend::collect`].
    fn publish(
        &self,
        pager: &ExpertPager,
        k: usize,
        ids: Option<u64>,
        with_weights: bool,
        h: Option<(u64, usize)>,
    ) -> Result<Published> {
        let hidden = h.map_or(0, |x| x.1);
        if k > PAGE_MAX || HIDDEN_BACK + 4 * hidden > lock(&pager.ids_back).len() {
            return Err(EngineError::Invalid(format!("read back of {k} routes")));
        }
        self.device.bind().map_err(cuda_err)?;
        pager
            .timeline
            .mark(&self.device, &self.stream, Mark::Routes);
        let route_bytes = if with_weights { 8 * k } else { 4 * k };
        // A prediction queued since the last read-back comes back with it.
        let predicted = lock(&pager.predicted).take();
        // One kernel writes the routes, the prediction and the hidden vector into the mapped
        // buffer and raises a flag this thread spins on: no copies to queue and no stream
        // synchronisation between the router and the layer's first copy.
        let seq = pager
            .back_seq
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let part = |src: Option<u64>, bytes: usize| match src {
            Some(p) if bytes > 0 => (p, (bytes / 4) as i32),
            _ => (0, 0),
        };
        let (a, na) = part(ids, route_bytes);
        let (b, nb) = part(
            predicted.as_ref().map(|p| p.2.ptr()),
            4 * predicted.as_ref().map_or(0, |p| p.1),
        );
        let (c, nc) = part(h.map(|x| x.0), 4 * hidden);
        self.launch(
            &self.kernels.publish_back,
            one_block(256),
            &[
                Arg::P(a),
                Arg::I(na),
                Arg::P(0),
                Arg::P(b),
                Arg::I(nb),
                Arg::P(8 * PAGE_MAX as u64),
                Arg::P(c),
                Arg::I(nc),
                Arg::P(HIDDEN_BACK as u64),
                Arg::P(pager.ids_back_dev),
                Arg::P(pager.back_flag.device_ptr()),
                Arg::I(seq as i32),
            ],
        );
        self.check()?;
        Ok(Published {
            seq,
            k,
            ids: ids.is_some(),
            with_weights,
            hidden,
            predicted,
        })
    }

    /// [`CudaBackend::read_back`]'s second half: waits for what [`CudaBackend::publish`]
    /// queued, and reads it.
    fn collect(
        &self,
        pager: &ExpertPager,
        sent: Published,
    ) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
        let Published {
            seq,
            k,
            ids,
            with_weights,
            hidden,
            predicted,
        } = sent;
        self.wait_published(&pager.back_flag, seq)?;
        let back = lock(&pager.ids_back);
        // Read only now: the device wrote these bytes, and the flag's acquire orders them.
        let dst = back.as_slice();
        *lock(&pager.routes_at) = Some(Instant::now());
        pager.timeline.routes_read();
        self.check()?;
        if let Some(f) = pager.take_failure() {
            return Err(EngineError::Invalid(format!("experts on the CPU: {f}")));
        }
        let f32s = |at: usize, n: usize| -> Vec<f32> {
            dst[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let v: Vec<usize> = if ids {
            dst[..4 * k]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                .collect()
        } else {
            Vec::new()
        };
        if v.iter().any(|&e| e >= pager.n_experts) {
            return Err(EngineError::Invalid(format!("router chose experts {v:?}")));
        }
        let w = if ids && with_weights {
            f32s(4 * k, k)
        } else {
            Vec::new()
        };
        if let Some((layer, k, _)) = predicted {
            let guess: Vec<usize> = dst[8 * PAGE_MAX..8 * PAGE_MAX + 4 * k]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                .filter(|&e| e < pager.n_experts)
                .collect();
            *lock(&pager.guess) = Some((layer, guess));
        }
        Ok((v, w, f32s(HIDDEN_BACK, hidden)))
    }

    /// Whether paged decode may compute missed experts on the CPU.
    pub(super) fn cpu_experts_on(&self, e: &CudaExperts) -> bool {
        e.paged.as_ref().is_some_and(|p| {
            p.pager.cpu_experts() != CpuExperts::Off
                && lock(&p.pager.cost).as_ref().is_some_and(|c| c.1.len() > 1)
        })
    }

    /// One split layer in [`SIDE_EVERY`]: the last sample is read into the lags and the
    /// first event of this one recorded (the caller records the second after its GPU part).
    fn side_sample<'a>(&self, pager: &'a ExpertPager) -> Option<&'a (Event, Event)> {
        let sample = pager
            .side_tick
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIDE_EVERY);
        pager.side_events(&self.device).filter(|ev| {
            sample && {
                pager.read_side(ev);
                ev.0.record(&self.stream).is_ok()
            }
        })
    }

    /// Writes `p`'s whole table (every expert: its slot, or its host memory read in place,
    /// and which) if the layer's residency changed since it was last written.
    fn sync_table(&self, e: &CudaExperts, p: &PagedLayer) -> Result<()> {
        let pager = &p.pager;
        let gen = pager
            .gens
            .get(p.layer)
            .map_or(0, |g| g.load(Ordering::Relaxed));
        if p.synced.load(Ordering::Relaxed) == gen {
            return Ok(());
        }
        let host = pager.host()?;
        let all: Vec<usize> = (0..pager.n_experts).collect();
        let in_place = host
            .in_place(p.layer, &all, pager.n_experts)
            .ok_or_else(|| EngineError::Invalid("no host copies to read in place".into()))?;
        let mut guard = lock(&pager.slots);
        let slots = guard
            .as_mut()
            .ok_or_else(|| EngineError::Invalid("expert slots were not provisioned".into()))?;
        // A prefetch still in flight for the layer lands first (its slots are in the map).
        self.settle_prefetch(pager, p.layer, &[], &mut slots.map)?;
        let mut upd = MoePage::empty();
        for (&x, host_parts) in all.iter().zip(in_place) {
            let (parts, resident) = match slots.map.slot_of(p.layer, x) {
                Some(slot) => (
                    pager
                        .shape
                        .parts_at(slots.addr(slot, pager.shape.slot_bytes)?),
                    true,
                ),
                None => (host_parts, false),
            };
            if upd.push(x, parts, resident) {
                self.launch_page(e, &upd, 0, 0);
                upd.n = 0;
            }
        }
        if upd.n > 0 {
            self.launch_page(e, &upd, 0, 0);
        }
        p.synced.store(gen, Ordering::Relaxed);
        self.check()
    }

    /// One token through a paged layer whose misses are read in place
    /// ([`ExpertPager::set_miss_path`]), `routed` holding the `k` routes on the device (ids
    /// then weights). The GPU never waits for the host: one kernel splits the routes by the
    /// layer's residency flags and a table of CPU shares passed by value (for m misses, the
    /// last `j(m)` in route order are the CPU's), the routes are published, and the GPU's
    /// products (hits from their slots, its misses straight from host memory, the CPU's
    /// skipped) are queued before the host waits for them. The host then reads the routes,
    /// picks the same CPU experts from the same residency and table, and hands them to the
    /// team; the stream adds their sum when the flag says it is there.
    pub(super) fn moe_in_place(
        &self,
        e: &CudaExperts,
        routed: &super::CudaBuf,
        k: usize,
        h: &super::CudaBuf,
        out: &mut super::CudaBuf,
    ) -> Result<()> {
        let p = paged_of(e, "moe_in_place")?;
        let pager = &p.pager;
        if k == 0 || k > PAGE_MAX {
            return Err(EngineError::Invalid(format!("{k} routes read in place")));
        }
        self.sync_table(e, p)?;
        let cpu_on = self.cpu_experts_on(e);
        let mut split = MoeSplit {
            j: [0; PAGE_MAX + 1],
        };
        if cpu_on {
            for m in 0..=k {
                split.j[m] = pager.cpu_share(m).min(m) as i32;
            }
        }
        let gpu = self.new_buf(2 * k)?;
        let (ids, w) = (routed.ptr(), routed.ptr() + 4 * k as u64);
        // One layer in SIDE_EVERY times the GPU's part on the device (mask to products done):
        // its time beyond the experts it reads in place is the GPU's fixed part in `split`.
        let side = cpu_on.then(|| self.side_sample(pager)).flatten();
        self.launch(
            &self.kernels.moe_split_mask,
            one_block(32),
            &[
                Arg::P(e.tables.ptr() + 3 * 8 * e.n as u64),
                Arg::P(ids),
                Arg::P(w),
                Arg::I(k as i32),
                Arg::S(&split),
                Arg::P(gpu.ptr()),
                Arg::P(gpu.ptr() + 4 * k as u64),
            ],
        );
        let sent = self.publish(
            pager,
            k,
            Some(ids),
            true,
            cpu_on.then_some((h.ptr(), e.hidden)),
        )?;
        self.moe_experts_with(e, &gpu, k, Some(&[]), false, h, out)?;
        let timed = side.is_some_and(|ev| ev.1.record(&self.stream).is_ok());
        let (chosen, weights, h_host) = self.collect(pager, sent)?;
        let (misses, j) = {
            let mut g = lock(&pager.slots);
            let sl = g
                .as_mut()
                .ok_or_else(|| EngineError::Invalid("expert slots were not provisioned".into()))?;
            let hits = sl.map.lookup(p.layer, &chosen);
            let misses: Vec<usize> = (0..k).filter(|&i| !hits[i]).collect();
            let j = split.j[misses.len()] as usize;
            let st = sl.map.stats_mut();
            // The CPU's misses are counted when its share ends (`cpu_share_done`).
            st.misses[p.layer] -= j as u64;
            st.read_in_place += (misses.len() - j) as u64;
            st.bytes_read += ((misses.len() - j) * pager.shape.part.iter().sum::<usize>()) as u64;
            (misses, j)
        };
        if timed {
            *lock(&pager.side_copies) = Some(misses.len() - j);
        }
        if j == 0 {
            return self.check();
        }
        let experts = misses[misses.len() - j..]
            .iter()
            .map(|&i| (chosen[i], weights[i]))
            .collect();
        let (seq, job, start) = cpu_share_job(pager, p.layer, experts, &h_host);
        // Measured from the routes' arrival on the host, as for the copy path.
        pager.note_lag(|l| &mut l.cpu);
        start();
        self.join_cpu_share(e, pager, seq, job, out)
    }

    /// One token through a paged layer with `routes` (expert, weight) known on the host (and
    /// on the device in `routed`, ids then weights, when the router chose them there) and
    /// the input `h` both on the device and on the host (`h_host`): of the missed experts,
    /// the share [`ExpertPager`]'s cost model gives the CPU is computed here, on the host,
    /// while the GPU copies and computes the rest; the two sums are added on the device.
    pub(super) fn moe_split(
        &self,
        e: &CudaExperts,
        routed: Option<&super::CudaBuf>,
        routes: &[(usize, f32)],
        h: &super::CudaBuf,
        h_host: &[f32],
        out: &mut super::CudaBuf,
    ) -> Result<()> {
        let p = paged_of(e, "moe_split")?;
        let pager = &p.pager;
        pager.timeline.probe("0 split entered");
        let resident = |x: usize| {
            lock(&pager.slots)
                .as_ref()
                .is_some_and(|s| s.map.slot_of(p.layer, x).is_some())
        };
        let misses: Vec<usize> = (0..routes.len())
            .filter(|&i| !resident(routes[i].0))
            .collect();
        let j = pager.cpu_share(misses.len());
        pager.timeline.probe("1 split decided");
        let on_cpu = &misses[misses.len() - j..];
        let gpu: Vec<(usize, f32)> = (0..routes.len())
            .filter(|i| !on_cpu.contains(i))
            .map(|i| routes[i])
            .collect();
        // The CPU's part runs on the team while this thread goes on queueing. It starts once
        // the GPU's copies are all queued (page_in starts it; below, when nothing is copied).
        // Submitting it before the copies, or after the first, so that the team starts
        // sooner, lost at 3 GiB (moe30b, H100: 44.0 / 46.7 against 53.4 / 48.6 tok/s; 49.8 /
        // 45.7 against 53.2 / 51.2): this thread queues slower while the team works, and the
        // copies wait; after the products' launches as well, it started ~100 µs after the
        // routes. Retested once the copies came first and queued faster (H100, moe30b,
        // uniform routing, 3 / 8 GiB): before the copies 53.8 / 77.9 and 50.9 / 65.6 tok/s,
        // after them 58.4 / 81.2 and 55.0 / 80.0. The stream waits until the share's sequence
        // number is in the flag (the device polls it), then copies the sum in and adds it.
        let share = (j > 0).then(|| {
            let experts: Vec<(usize, f32)> = on_cpu.iter().map(|&i| routes[i]).collect();
            let (seq, job, start) = cpu_share_job(pager, p.layer, experts, h_host);
            *lock(&pager.pending_share) = Some(start);
            (seq, job)
        });
        // The GPU's part, between two events that measure its fixed part (see `Lags`).
        // One split layer in SIDE_EVERY measures the GPU part's fixed time (a moving average
        // needs no more, and reading and recording the events cost ~5 µs before the copies).
        let side = self.side_sample(pager);
        let gpu_part = self.moe_split_gpu(e, p, routed, &gpu, j, h, out);
        // Started by now unless nothing was copied (or the GPU's part failed first).
        pager.start_share();
        if let (Some(ev), true) = (side, gpu_part.is_ok()) {
            if ev.1.record(&self.stream).is_ok() {
                *lock(&pager.side_copies) = Some(misses.len() - j);
            }
        }
        gpu_part?;
        let Some((seq, job)) = share else {
            return Ok(());
        };
        self.join_cpu_share(e, pager, seq, job, out)
    }

    /// Makes the stream wait for the CPU share `seq` (`job`), then adds its sum into `out`.
    fn join_cpu_share(
        &self,
        e: &CudaExperts,
        pager: &ExpertPager,
        seq: u32,
        job: Arc<CpuJob>,
        out: &mut super::CudaBuf,
    ) -> Result<()> {
        let gate = CpuGate::from_u8(pager.gate.load(Ordering::Relaxed));
        let part = pager.cpu_out_dev.filter(|_| gate == CpuGate::Kernel);
        if let (Some(part), true) = (part, self.ensure(out, e.hidden)) {
            // The job just submitted always raises the flag to `seq` when it ends (see below),
            // and no later share writes the sum before this kernel ran (the next starts after
            // the next read-back, queued after this).
            self.launch(
                &self.kernels.moe_cpu_join,
                grid_1d(e.hidden as u64, 256),
                &[
                    Arg::P(pager.cpu_flag.device_ptr()),
                    Arg::I(seq as i32),
                    Arg::P(part),
                    Arg::P(out.ptr()),
                    Arg::I(e.hidden as i32),
                ],
            );
            pager
                .timeline
                .mark(&self.device, &self.stream, Mark::Joined);
            return self.check();
        }
        let mut gated = false;
        if gate != CpuGate::Host {
            // SAFETY: the job just submitted always raises the flag to `seq` when it ends
            // (its completion sets it even when a chunk failed, see `cpu_share_done`), and
            // the flag lives in the pager, which the job holds.
            match unsafe { pager.cpu_flag.wait_on(&self.stream, seq) } {
                Ok(()) => gated = true,
                Err(err) => {
                    tracing::warn!(%err, "the device cannot wait on host memory; CPU experts use a host-function gate");
                    pager.gate.store(CpuGate::Host as u8, Ordering::Relaxed);
                }
            }
        }
        if !gated {
            let gate = Arc::into_raw(job.clone()) as *mut std::ffi::c_void;
            // SAFETY: `gate` is an Arc<CpuJob> reference handed to the callback, which takes
            // it back (Arc::from_raw) exactly once; the callback makes no CUDA call.
            let r =
                unsafe { sys::cuLaunchHostFunc(self.stream.cu_stream(), Some(wait_for_cpu), gate) };
            if r != sys::CUresult::CUDA_SUCCESS {
                // SAFETY: the callback was not queued: take the reference back here.
                drop(unsafe { Arc::from_raw(gate as *const CpuJob) });
                job.wait();
                return Err(EngineError::Invalid(format!("cuLaunchHostFunc: {r:?}")));
            }
        }
        let cpu_part = self.new_buf(e.hidden)?;
        {
            let src = lock(&pager.cpu_out);
            // SAFETY: the pinned buffer holds `hidden` floats; the copy runs after the gate,
            // i.e. after the worker wrote them, and before any later worker writes again (the
            // next one starts after the next read-back, which waits for this copy).
            let r = unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    cpu_part.ptr(),
                    src.as_slice().as_ptr().cast(),
                    4 * e.hidden,
                    self.stream.cu_stream(),
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(EngineError::Invalid(format!("cuMemcpyHtoDAsync: {r:?}")));
            }
        }
        self.add(out, &cpu_part);
        pager
            .timeline
            .mark(&self.device, &self.stream, Mark::Joined);
        self.check()
    }

    /// The GPU's part of [`CudaBackend::moe_split`]: the experts `gpu` (routes) copied where
    /// they miss and computed into `out` (zeros when there are none).
    #[allow(clippy::too_many_arguments)]
    fn moe_split_gpu(
        &self,
        e: &CudaExperts,
        p: &PagedLayer,
        routed: Option<&super::CudaBuf>,
        gpu: &[(usize, f32)],
        j: usize,
        h: &super::CudaBuf,
        out: &mut super::CudaBuf,
    ) -> Result<()> {
        let pager = &p.pager;
        if gpu.is_empty() {
            // A prefetch for this layer ends here all the same (none of it was used).
            let table = match lock(&pager.slots).as_mut() {
                Some(sl) => self.settle_prefetch(pager, p.layer, &[], &mut sl.map)?,
                None => Vec::new(),
            };
            if !table.is_empty() {
                let mut upd = MoePage::empty();
                for (x, base) in table {
                    upd.push(x, pager.shape.parts_at(base), true);
                }
                self.launch_page(e, &upd, 0, 0);
            }
            if !self.ensure(out, e.hidden) {
                return self.check();
            }
            self.memset0(out.ptr(), e.hidden);
            pager
                .timeline
                .mark(&self.device, &self.stream, Mark::Products);
        } else if let (Some(r), 0) = (routed, j) {
            // Nothing for the CPU: the routes already on the device serve as they are.
            let ids: Vec<usize> = gpu.iter().map(|r| r.0).collect();
            self.moe_experts(e, r, gpu.len(), Some(&ids), h, out)?;
        } else {
            let ids: Vec<usize> = gpu.iter().map(|r| r.0).collect();
            let mut upd = MoePage::routes(gpu)
                .ok_or_else(|| EngineError::Invalid("too many routes".into()))?;
            // The copies go on the stream first (and the CPU share starts once they are
            // queued): every call before them delays the link and the CPU alike. The
            // table entries they leave go out with the GPU's routes, in one launch.
            let paged_in = pager.quota(p.layer) >= ids.len();
            if paged_in {
                let entries = self.page_in_deferred(e, p, &ids)?;
                upd.n = entries.n;
                upd.e = entries.e;
                upd.a = entries.a;
            }
            let routed = self.new_buf(2 * gpu.len())?;
            self.launch_page(e, &upd, routed.ptr(), routed.ptr() + 4 * gpu.len() as u64);
            self.moe_experts_with(e, &routed, gpu.len(), Some(&ids), !paged_in, h, out)?;
        }
        Ok(())
    }

    /// Ends `layer`'s prefetch in flight, if any, before the layer's own work is queued: the
    /// stream waits for its copies, the prefetched experts the layer asks for now (`experts`)
    /// count as used, and the table entries to write are returned (expert, slot address),
    /// at most `PAGE_MAX - 8` (what a prefetch copies).
    fn settle_prefetch(
        &self,
        pager: &ExpertPager,
        layer: usize,
        experts: &[usize],
        map: &mut SlotMap,
    ) -> Result<Vec<(usize, u64)>> {
        let Some(f) = lock(&pager.inflight).get_mut(layer).and_then(Option::take) else {
            return Ok(Vec::new());
        };
        self.stream.wait(&f.done).map_err(cuda_err)?;
        let used = f.table.iter().filter(|(x, _)| experts.contains(x)).count();
        map.stats_mut().prefetch_used += used as u64;
        Ok(f.table)
    }

    /// Makes later work on the compute stream wait for what `other` has queued (best effort:
    /// on the way out of a failed copy).
    fn join_stream(&self, other: &flowgate_cuda::Stream) {
        if let Ok(end) = Event::new(&self.device) {
            if end.record(other).is_ok() {
                let _ = self.stream.wait(&end);
            }
        }
    }

    /// The pager's copy stream (speculative prefetches), created on first use.
    fn copy_stream<'a>(&self, pager: &'a ExpertPager) -> Result<&'a flowgate_cuda::Stream> {
        if let Some(s) = pager.copy_stream.get() {
            return Ok(s);
        }
        let s = flowgate_cuda::Stream::new(&self.device).map_err(cuda_err)?;
        Ok(pager.copy_stream.get_or_init(|| s))
    }

    /// Speculative prefetch, after a layer's work is queued: the experts the next sparse
    /// layer's router predicted (read back with this layer's routes) that are not resident are
    /// given slots in that layer now and copied on the copy stream, which first waits for the
    /// work queued so far (this layer's own copies go first on the link). The next layer's
    /// [`CudaBackend::page_in`] waits for them; its hits then include the good guesses.
    pub(super) fn start_prefetch(&self, e: &CudaExperts) -> Result<()> {
        let Some(p) = &e.paged else {
            return Ok(());
        };
        let pager = &p.pager;
        let Some((layer, guess)) = lock(&pager.guess).take() else {
            return Ok(());
        };
        if lock(&pager.inflight).get(layer).is_none_or(|f| f.is_some()) {
            return Ok(());
        }
        let mut guard = lock(&pager.slots);
        let slots = guard
            .as_mut()
            .ok_or_else(|| EngineError::Invalid("expert slots were not provisioned".into()))?;
        let mut want: Vec<usize> = Vec::new();
        for x in guess {
            if !want.contains(&x) && want.len() < slots.map.quota(layer).min(PAGE_MAX - 8) {
                want.push(x);
            }
        }
        let missing: Vec<usize> = want
            .iter()
            .copied()
            .filter(|&x| slots.map.slot_of(layer, x).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(cache) = pager.ram_cache() {
            // Under a RAM cache only experts already in RAM are copied on; the others are
            // read from the file into RAM now (a speculative read of the RAM tier).
            let in_ram = cache.prefetch(layer, &missing, true)?;
            want.retain(|x| !missing.contains(x) || in_ram.contains(x));
            if want.iter().all(|&x| slots.map.slot_of(layer, x).is_some()) {
                return Ok(());
            }
        }
        let stream = self.copy_stream(pager)?;
        let start = Event::new(&self.device).map_err(cuda_err)?;
        start.record(&self.stream).map_err(cuda_err)?;
        stream.wait(&start).map_err(cuda_err)?;
        let assigned = slots.map.prefetch(layer, &want)?;
        pager.bump(layer);
        let misses: Vec<&Assigned> = assigned.iter().filter(|a| !a.hit).collect();
        let s = pager.shape;
        let mut table = Vec::new();
        let mut copied = 0u64;
        let ids: Vec<usize> = misses.iter().map(|a| a.expert).collect();
        let evicted: Vec<usize> = misses.iter().filter_map(|a| a.evicted).collect();
        pager.host()?.evicted(layer, &evicted);
        // Counted: the RAM tier's prefetch above made its own count.
        let fetched = match pager.host()?.fetch(layer, &ids, pager.n_experts, true) {
            Ok(f) => f,
            Err(err) => {
                for a in &misses {
                    slots.map.invalidate(a.slot);
                }
                self.join_stream(stream);
                return Err(err);
            }
        };
        for (i, (a, host)) in misses.iter().zip(&fetched.addrs).enumerate() {
            let base = slots.addr(a.slot, s.slot_bytes)?;
            // SAFETY: the slot lies in a mapped chunk; the copy stream waits (event above) for
            // all work queued on the compute stream so far, and the compute stream waits for
            // this copy before the layer's next use of its slots (`settle_prefetch`); the
            // source is page-locked memory held past the copy (the pager's drop waits for the
            // stream; a RAM cache's experts are held below until an event after the copies).
            match unsafe { self.copy_expert(stream, base, host, &s) } {
                Ok(n) => copied += n,
                Err(r) => {
                    for a in &misses[i..] {
                        slots.map.invalidate(a.slot);
                    }
                    let _ = pager.host()?.hold(fetched.lease, &self.device, stream);
                    self.join_stream(stream);
                    return Err(EngineError::Invalid(format!(
                        "prefetching expert {} of layer {layer}: {r:?}",
                        a.expert
                    )));
                }
            }
            table.push((a.expert, base));
        }
        pager.host()?.hold(fetched.lease, &self.device, stream)?;
        slots.map.stats_mut().bytes_read += copied;
        let done = Event::new(&self.device).map_err(cuda_err)?;
        done.record(stream).map_err(cuda_err)?;
        if let Some(f) = lock(&pager.inflight).get_mut(layer) {
            *f = Some(Inflight { done, table });
        }
        Ok(())
    }

    /// Makes `experts` of `p`'s layer resident (at most its quota): copies the misses into
    /// their slots and points the layer's table at them, all queued on the stream.
    pub(super) fn page_in(&self, e: &CudaExperts, p: &PagedLayer, experts: &[usize]) -> Result<()> {
        let upd = self.page_in_deferred(e, p, experts)?;
        if upd.n > 0 {
            self.launch_page(e, &upd, 0, 0);
        }
        Ok(())
    }

    /// [`CudaBackend::page_in`] but the last table entries are returned, not written: the
    /// caller launches them (with routes of its own) before the experts are used.
    pub(super) fn page_in_deferred(
        &self,
        e: &CudaExperts,
        p: &PagedLayer,
        experts: &[usize],
    ) -> Result<MoePage> {
        let pager = &p.pager;
        let mut guard = lock(&pager.slots);
        let slots = guard
            .as_mut()
            .ok_or_else(|| EngineError::Invalid("expert slots were not provisioned".into()))?;
        let mut upd = MoePage::empty();
        // A prefetch for this layer: its copies (and the evictions it made) come first.
        for (x, base) in self.settle_prefetch(pager, p.layer, experts, &mut slots.map)? {
            upd.push(x, pager.shape.parts_at(base), true);
        }
        let host = pager.host()?;
        let s = pager.shape;
        let mut copied = 0u64;
        let assigned = slots.map.assign(p.layer, experts)?;
        pager.timeline.probe("2 slots assigned");
        let misses: Vec<&Assigned> = assigned.iter().filter(|a| !a.hit).collect();
        if !misses.is_empty() {
            // The layer's residency changed: its table is rewritten whole before the next
            // token that reads misses in place (see `sync_table`).
            pager.bump(p.layer);
        }
        let mut events: Option<(Event, Event)> = None;
        host.reap();
        let evicted: Vec<usize> = misses.iter().filter_map(|a| a.evicted).collect();
        host.evicted(p.layer, &evicted);
        let batch = host.batch(pager.n_used);
        for (c, chunk) in misses.chunks(batch).enumerate() {
            let ids: Vec<usize> = chunk.iter().map(|a| a.expert).collect();
            // Under a RAM cache this may read from the file (the RAM tier counts the wait).
            let fetched = match host.fetch(p.layer, &ids, pager.n_experts, false) {
                Ok(f) => f,
                Err(err) => {
                    for a in &misses[c * batch..] {
                        slots.map.invalidate(a.slot);
                    }
                    // The entries of the experts copied so far still go in.
                    self.launch_page(e, &upd, 0, 0);
                    return Err(err);
                }
            };
            for (i, (a, src)) in chunk.iter().zip(&fetched.addrs).enumerate() {
                let base = slots.addr(a.slot, s.slot_bytes)?;
                if events.is_none() {
                    let ev = match lock(&pager.spare_events).pop() {
                        Some(ev) => ev,
                        None => (
                            Event::new(&self.device).map_err(cuda_err)?,
                            Event::new(&self.device).map_err(cuda_err)?,
                        ),
                    };
                    ev.0.record(&self.stream).map_err(cuda_err)?;
                    pager
                        .timeline
                        .mark(&self.device, &self.stream, Mark::CopiesStart);
                    events = Some(ev);
                }
                let _timer = self.profile_span("expert copy host->device");
                // SAFETY: the slot lies in a mapped chunk and holds slot_bytes; the source is
                // page-locked host memory that stays there past the copy (all experts live as
                // long as the pager; a RAM cache's are held below until an event after the
                // copy), and the stream orders the copy before any later use of the slot.
                match unsafe { self.copy_expert(&self.stream, base, src, &s) } {
                    Ok(n) => copied += n,
                    Err(r) => {
                        for a in &misses[c * batch + i..] {
                            slots.map.invalidate(a.slot);
                        }
                        let _ = host.hold(fetched.lease, &self.device, &self.stream);
                        self.launch_page(e, &upd, 0, 0);
                        return Err(EngineError::Invalid(format!(
                            "copying expert {} of layer {}: {r:?}",
                            a.expert, p.layer
                        )));
                    }
                }
                if upd.push(a.expert, s.parts_at(base), true) {
                    // A prefill wave can miss more experts than one launch's table takes.
                    self.launch_page(e, &upd, 0, 0);
                    upd.n = 0;
                }
            }
            host.hold(fetched.lease, &self.device, &self.stream)?;
        }
        pager.timeline.probe("3 copies queued");
        // The link has its work: the layer's CPU share (if any) starts now, while this thread
        // queues the products. The routes' arrival has served (a later page-in, e.g. a
        // prefill's, is not late after it).
        pager.start_share();
        pager.timeline.probe("4 cpu share submitted");
        *lock(&pager.routes_at) = None;
        slots.map.stats_mut().bytes_read += copied;
        drop(guard);
        if let Some((a, b)) = events {
            b.record(&self.stream).map_err(cuda_err)?;
            pager
                .timeline
                .mark(&self.device, &self.stream, Mark::CopiesEnd);
            let mut ev = lock(&pager.copy_events);
            ev.push((a, b));
            if ev.len() >= 4096 {
                drop(ev);
                let _ = pager.stats();
            }
        }
        Ok(upd)
    }

    /// Queues the host→device copies of one expert into the slot at `base` (one copy where
    /// [`copy_plan`] finds the three parts laid out evenly on the host, else three); returns
    /// the bytes queued.
    ///
    /// # Safety
    /// `base` must be a mapped slot of at least `s.slot_bytes` bytes that no work queued on
    /// another stream reads or writes until the copies have run, and `host` the page-locked
    /// addresses of the expert's parts, alive until then.
    unsafe fn copy_expert(
        &self,
        stream: &flowgate_cuda::Stream,
        base: u64,
        host: &[u64; 3],
        s: &ExpertShape,
    ) -> std::result::Result<u64, sys::CUresult> {
        let r = match copy_plan(host, s) {
            CopyPlan::Contiguous(len) => {
                // SAFETY: the caller's contract covers the slot; the `len` host bytes from the
                // first part are exactly the three parts, back to back (checked by copy_plan).
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        base + s.off[0],
                        host[0] as *const std::ffi::c_void,
                        len,
                        stream.cu_stream(),
                    )
                }
            }
            CopyPlan::Pitched { src_pitch } => {
                let c = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                    srcHost: host[0] as *const std::ffi::c_void,
                    srcDevice: 0,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: src_pitch,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: base + s.off[0],
                    dstArray: std::ptr::null_mut(),
                    dstPitch: (s.off[1] - s.off[0]) as usize,
                    WidthInBytes: s.part[0],
                    Height: 3,
                };
                // SAFETY: three rows of `part` bytes each, at host[0] + i·src_pitch (= host[i],
                // checked by copy_plan: the caller's page-locked parts) and at the slot's
                // part offsets (inside the slot).
                unsafe { sys::cuMemcpy2DAsync_v2(&c, stream.cu_stream()) }
            }
            CopyPlan::Parts => {
                for ((&src, &off), &len) in host.iter().zip(&s.off).zip(&s.part) {
                    // SAFETY: the caller's contract covers both ranges.
                    let r = unsafe {
                        sys::cuMemcpyHtoDAsync_v2(
                            base + off,
                            src as *const std::ffi::c_void,
                            len,
                            stream.cu_stream(),
                        )
                    };
                    if r != sys::CUresult::CUDA_SUCCESS {
                        return Err(r);
                    }
                }
                sys::CUresult::CUDA_SUCCESS
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(r);
        }
        Ok(s.part.iter().sum::<usize>() as u64)
    }

    /// One `moe_page` launch: table entries, and routes written to `ids`/`w` when `upd.k > 0`.
    pub(super) fn launch_page(&self, e: &CudaExperts, upd: &MoePage, ids: u64, w: u64) {
        self.launch(
            &self.kernels.moe_page,
            one_block(PAGE_MAX as u32),
            &[
                Arg::P(e.tables.ptr()),
                Arg::I(e.n as i32),
                Arg::M(upd),
                Arg::P(ids),
                Arg::P(w),
            ],
        );
    }

    /// Weight views of `experts` of a paged layer, made resident first (valid for work queued
    /// before the layer's next page-in).
    pub(super) fn paged_views(
        &self,
        e: &CudaExperts,
        experts: &[usize],
    ) -> Result<Vec<[CudaWeight; 3]>> {
        let p = e
            .paged
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("these experts are not paged".into()))?;
        self.page_in(e, p, experts)?;
        let guard = lock(&p.pager.slots);
        let slots = guard
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("expert slots were not provisioned".into()))?;
        let s = p.pager.shape;
        let mut out = Vec::with_capacity(experts.len());
        for &x in experts {
            let slot = slots.map.slot_of(p.layer, x).ok_or_else(|| {
                EngineError::Invalid(format!("expert {x} of layer {} is not resident", p.layer))
            })?;
            let base = slots.addr(slot, s.slot_bytes)?;
            let view =
                |i: usize, kind: usize, rows: usize, cols: usize, row_bytes: usize| CudaWeight {
                    mem: WMem::View {
                        ptr: base + s.off[i],
                        len: s.part[i],
                    },
                    dtype: DType::ALL[kind],
                    kind,
                    rows,
                    cols,
                    row_bytes,
                };
            out.push([
                view(0, s.kind, s.ffn, s.hidden, s.row_bytes),
                view(1, s.kind, s.ffn, s.hidden, s.row_bytes),
                view(2, s.down_kind, s.hidden, s.ffn, s.down_row_bytes),
            ]);
        }
        Ok(out)
    }
}

/// Completion of one CPU share of experts, which the stream's host-function gate waits on.
#[derive(Default)]
struct CpuJob {
    done: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl CpuJob {
    fn finish(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut d = lock(&self.done);
        while !*d {
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The host-function gate: returns once the CPU share is written.
unsafe extern "C" fn wait_for_cpu(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the Arc<CpuJob> reference moe_split leaked for this call.
    let job = unsafe { Arc::from_raw(data as *const CpuJob) };
    job.wait();
}

/// What the CPU team does with a share's sum (the weighted sum of `j` experts of `layer`):
/// writes it into the pager's page-locked `cpu_out` (zeros and a failure to report on error),
/// opens the stream's gate, then records the statistics and the time taken in the cost model.
/// `lease` (the RAM cache's pins on the experts, if any) ends with the job's completion, which
/// the job drops after its weights.
/// The CPU share of a paged layer: `experts` (id, weight) of `layer` on the pager's team with
/// the input `h_host`. Returns its sequence number, the job the stream's gate waits on, and
/// the closure that submits it (the caller picks the moment).
fn cpu_share_job(
    pager: &Arc<ExpertPager>,
    layer: usize,
    experts: Vec<(usize, f32)>,
    h_host: &[f32],
) -> (u32, Arc<CpuJob>, Box<dyn FnOnce() + Send>) {
    let job = Arc::new(CpuJob::default());
    let seq = pager
        .cpu_seq
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(1);
    let (pager2, job2, x) = (pager.clone(), job.clone(), h_host.to_vec());
    let start = move || {
        let ids: Vec<usize> = experts.iter().map(|x| x.0).collect();
        let n = experts.len();
        let submit = || -> Result<()> {
            let w = pager2.host()?.cpu_weights(layer, &ids, pager2.n_experts)?;
            let ws = w
                .weights
                .into_iter()
                .zip(&experts)
                .map(|(w, x)| (w, x.1))
                .collect();
            let done = cpu_share_done(pager2.clone(), layer, n, seq, job2.clone(), w.lease);
            pager2
                .team()?
                .submit(Arc::new(ExpertSum::new(ws, &x, done)));
            Ok(())
        };
        if let Err(err) = submit() {
            // The flag still goes up (the stream never waits forever); the failure comes out
            // at the next read-back.
            cpu_share_done(pager2.clone(), layer, n, seq, job2.clone(), None)(Err(err.to_string()));
        }
    };
    (seq, job, Box::new(start))
}

fn cpu_share_done(
    pager: Arc<ExpertPager>,
    layer: usize,
    j: usize,
    seq: u32,
    job: Arc<CpuJob>,
    lease: Option<Lease>,
) -> crate::backend::cpu::experts::Done {
    /// Opens both gates once: when the sum is written, or when dropped before that (a panic,
    /// a job dropped unfinished), so that the stream can never be left waiting.
    struct Open(Arc<ExpertPager>, u32, Arc<CpuJob>, AtomicBool);
    impl Open {
        fn open(&self) {
            if !self.3.swap(true, Ordering::AcqRel) {
                self.0.cpu_flag.set(self.1);
                self.2.finish();
            }
        }
    }
    impl Drop for Open {
        fn drop(&mut self) {
            self.open();
        }
    }
    let t0 = Instant::now();
    let open = Open(pager.clone(), seq, job, AtomicBool::new(false));
    Box::new(move |result| {
        let _held = &lease;
        {
            let mut out = lock(&pager.cpu_out);
            let dst = out.as_mut_slice();
            match &result {
                Ok(acc) => {
                    for (d, v) in dst.chunks_exact_mut(4).zip(acc) {
                        d.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Err(e) => {
                    dst.fill(0);
                    *lock(&pager.failure) = Some(e.clone());
                }
            }
        }
        let took = t0.elapsed();
        open.open();
        if let Some(s) = lock(&pager.slots).as_mut() {
            let st = s.map.stats_mut();
            st.misses[layer] += j as u64;
            st.cpu_computed += j as u64;
            st.cpu_time += took;
        }
        // The cost model follows what the CPU really takes in decode (cold weights), starting
        // from the calibration; one outlier counts as at most twice (half) the prediction.
        let table = {
            let mut fit = lock(&pager.cpu_fit);
            let took = match fit.predict(j) {
                Some(t) => took.as_secs_f64().clamp(0.5 * t, 2.0 * t),
                None => took.as_secs_f64(),
            };
            fit.add(j, took);
            fit.table(pager.n_used)
        };
        if let (Some((_, cpu)), Some(t)) = (lock(&pager.cost).as_mut(), table) {
            if cpu.len() > 1 {
                *cpu = t;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn miss_paths_parse_and_the_kernel_arguments_keep_their_c_layout() {
        for p in [super::MissPath::Copy, super::MissPath::InPlace] {
            assert_eq!(super::MissPath::parse(p.name()).unwrap(), p);
        }
        for g in [
            super::CpuGate::Kernel,
            super::CpuGate::Stream,
            super::CpuGate::Host,
        ] {
            assert_eq!(super::CpuGate::parse(g.name()).unwrap(), g);
            assert_eq!(super::CpuGate::from_u8(g as u8), g);
        }
        assert!(super::CpuGate::parse("event").is_err());
        let e = super::MissPath::parse("zero-copy").unwrap_err().to_string();
        assert!(e.contains("copy or in-place"), "{e}");
        // struct MoePage / MoeSplit in moe.cu: 2 ints, 4 × 64 4-byte arrays, 3 × 64 u64; 65
        // ints. Both passed by value, within the 4 KiB of kernel parameters.
        assert_eq!(std::mem::size_of::<super::MoePage>(), 8 + 4 * 256 + 3 * 512);
        assert_eq!(std::mem::offset_of!(super::MoePage, a), 8 + 4 * 256);
        assert_eq!(std::mem::size_of::<super::MoeSplit>(), 4 * 65);
    }

    #[test]
    fn slots_are_mapped_in_the_chunks_that_hold_the_most() {
        use super::chunking;
        const MIB: usize = 1 << 20;
        let slot = 2_650_000; // a moe30b expert, about 2.53 MiB: 25 to a 64 MiB chunk
        let gran = 2 * MIB;
        // Room for everything wanted in big chunks.
        let (pc, n, slots) = chunking(slot, gran, 1 << 30, 200);
        assert_eq!(slots, 200);
        assert_eq!(pc, 25);
        assert_eq!(n, 8);
        // 100 MiB: one 64 MiB chunk holds 25; smaller equal chunks hold more (the old way
        // refused 26 sparse layers here).
        let (pc, n, slots) = chunking(slot, gran, 100 * MIB as u64, 40);
        assert!(slots >= 36, "{pc} × {n} = {slots}");
        assert!((n * (pc * slot).div_ceil(gran) * gran) as u64 <= 100 * MIB as u64);
        // Less than one slot: nothing.
        assert_eq!(chunking(slot, gran, MIB as u64, 10).2, 0);
        // Every outcome fits and never passes what is wanted.
        for avail in (0..300).map(|m| (m * MIB) as u64) {
            for want in [1, 7, 26, 48, 500] {
                let (pc, n, slots) = chunking(slot, gran, avail, want);
                let mapped = (n * (pc * slot).div_ceil(gran) * gran) as u64;
                assert!(mapped <= avail, "{avail} {want}: {pc} × {n}");
                assert!(slots <= want && slots <= n * pc);
                // Close to what the whole units would hold with no chunking at all (the old
                // mapping fell to 25 of 36 at 100 MiB).
                let ideal = (avail as usize / gran * gran / slot).min(want);
                assert!(
                    10 * slots + 10 >= 9 * ideal,
                    "{avail} {want}: {slots} of {ideal}"
                );
            }
        }
    }

    use super::*;

    fn shape(bytes: [usize; 3], dtypes: [DType; 3]) -> ExpertShape {
        ExpertShape::new("t", dtypes, bytes, 768, 2048).unwrap()
    }

    #[test]
    fn copy_plan_takes_one_copy_only_where_the_host_layout_allows() {
        // moe30b's Q4_K expert: three parts of 884,736 bytes (a multiple of 256: no padding).
        let p = 884_736usize;
        let s = shape([p; 3], [DType::Q4K; 3]);
        let n = 128 * p as u64;
        let x = 1u64 << 32;
        // Back to back, as in a slot: one copy of the three parts.
        assert_eq!(
            copy_plan(&[x, x + p as u64, x + 2 * p as u64], &s),
            CopyPlan::Contiguous(3 * p)
        );
        // A layer's merged tensors back to back (the synthetic files): one 2-D copy.
        assert_eq!(
            copy_plan(
                &[
                    x + 5 * p as u64,
                    x + n + 5 * p as u64,
                    x + 2 * n + 5 * p as u64
                ],
                &s
            ),
            CopyPlan::Pitched {
                src_pitch: n as usize
            }
        );
        // Uneven spacing, a part before the first, parts in another order (llama.cpp's files
        // hold gate, down, up), or a pitch past what a 2-D copy takes: three copies.
        for host in [
            [x, x + n, x + 2 * n + 256],
            [x, x - n, x + n],
            [x, x + 2 * n, x + n],
            [x, x + (3u64 << 30), x + (6u64 << 30)],
            [x, x + 100, x + 200],
        ] {
            assert_eq!(copy_plan(&host, &s), CopyPlan::Parts, "{host:?}");
        }
        // Parts of different sizes (a Q6_K down) are never pitched; padded parts laid out as
        // in a slot go as three rows (the padding between them is not the expert's, and is
        // not read), never as one range.
        let q6 = 768 * 2048 / 256 * 210;
        let s2 = shape([p, p, q6], [DType::Q4K, DType::Q4K, DType::Q6K]);
        assert_eq!(copy_plan(&[x, x + n, x + 2 * n], &s2), CopyPlan::Parts);
        let s3 = ExpertShape::new("t", [DType::F32; 3], [4000; 3], 1, 1000).unwrap();
        assert_eq!(s3.off, [0, 4096, 8192]);
        assert_eq!(
            copy_plan(&[x, x + 4096, x + 8192], &s3),
            CopyPlan::Pitched { src_pitch: 4096 }
        );
        // Packed on the host, padded in the slot: rows of 4000 bytes at two pitches.
        assert_eq!(
            copy_plan(&[x, x + 4000, x + 8000], &s3),
            CopyPlan::Pitched { src_pitch: 4000 }
        );
    }

    #[test]
    fn cpu_fit_finds_the_line_and_survives_one_j() {
        let mut f = CpuFit::default();
        assert!(f.table(8).is_none());
        // Exact samples of 45 µs + 57 µs per expert.
        for j in 1..=8 {
            f.add(j, 45e-6 + 57e-6 * j as f64);
        }
        let t = f.table(8).unwrap();
        assert_eq!(t[0], 0.0);
        for (j, v) in t.iter().enumerate().skip(1) {
            assert!((v - (45e-6 + 57e-6 * j as f64)).abs() < 1e-9, "{j}: {v}");
        }
        // Decode then sees only j = 2, slower than predicted: the line goes through the new
        // T(2), its slope stays near the calibrated one (what is left of the calibration's
        // samples still weighs), and T stays increasing in j.
        for _ in 0..200 {
            f.add(2, 200e-6);
        }
        let t = f.table(8).unwrap();
        assert!((t[2] - 200e-6).abs() < 2e-6, "{t:?}");
        assert!((t[3] - t[2] - 57e-6).abs() < 12e-6, "{t:?}");
        for _ in 0..300 {
            f.add(2, 200e-6);
        }
        let t2 = f.table(8).unwrap();
        assert!((t2[2] - 200e-6).abs() < 1e-6, "{t2:?}");
        assert!(t2.windows(2).all(|w| w[1] > w[0]), "{t2:?}");
        // One slow share among many fast ones moves the line a little, not T(3) above T(4).
        let mut g = CpuFit::default();
        for r in 0..100 {
            let j = 2 + r % 2;
            g.add(j, 45e-6 + 57e-6 * j as f64);
        }
        g.add(3, 400e-6);
        let t = g.table(8).unwrap();
        assert!(t.windows(2).all(|w| w[1] > w[0]), "{t:?}");
        assert!(t[3] < 240e-6, "{t:?}");
        // Nonsense samples (faster with more experts) still give a rising line.
        let mut h = CpuFit::default();
        for j in 1..=8 {
            h.add(j, 300e-6 - 20e-6 * j as f64);
        }
        let t = h.table(8).unwrap();
        assert!(t.windows(2).all(|w| w[1] > w[0]), "{t:?}");
    }

    #[test]
    fn split_balances_the_link_and_the_cpu_from_the_routes() {
        // 54 µs a copy; the CPU 45 µs + 60 µs an expert (the H100 box's figures).
        let cpu: Vec<f64> = (0..=8)
            .map(|j| {
                if j == 0 {
                    0.0
                } else {
                    45e-6 + 60e-6 * j as f64
                }
            })
            .collect();
        let none = Lags::default();
        assert_eq!(split(0, 54e-6, &cpu, none), 0);
        // One miss: copying it (54) beats the CPU (105).
        assert_eq!(split(1, 54e-6, &cpu, none), 0);
        // Seven misses: 3 on the CPU (225) against 4 copies (216).
        assert_eq!(split(7, 54e-6, &cpu, none), 3);
        // The CPU starting 100 µs after the routes, the GPU's part 20 µs beyond its copies:
        // fewer for the CPU.
        let late = Lags {
            gpu: 20e-6,
            cpu: 100e-6,
        };
        assert_eq!(split(7, 54e-6, &cpu, late), 2);
        // Never more than the table covers, nor than the misses.
        assert_eq!(split(12, 1.0, &cpu, none), 8);
        assert_eq!(split(3, 1.0, &cpu, none), 3);
        assert_eq!(split(3, 1.0, &[0.0], none), 0);
    }

    #[test]
    fn a_lag_sample_is_capped() {
        let mut v = 0.0;
        Lags::note(&mut v, 1.2e-3, 54e-6);
        assert_eq!(v, 54e-6);
        for _ in 0..100 {
            Lags::note(&mut v, 30e-6, 54e-6);
        }
        assert!((v - 30e-6).abs() < 1e-7, "{v}");
        Lags::note(&mut v, 1.0, 54e-6);
        assert!((v - 32.4e-6).abs() < 1e-7, "{v}");
    }
}
