//! [`HostExpertCache`]: MoE experts paged between the file (SSD) and a RAM cache of fixed-size
//! slots, under a [`Budget`].
//!
//! Each slot holds one expert (its gate, up and down matrices back to back, in their stored
//! dtype). The slots are allocated once, when the cache is made, and charged to the budget then:
//! paging never allocates, so the budget holds by construction and `Budget::used` is the truth.
//! A miss picks a free slot or asks the [`Policy`] for a victim among slots not in use, and
//! reads the expert's three byte ranges from the model file with flowgate-io's [`RangeReader`]
//! straight into the slot: each matrix sits in the slot at the same offset modulo 4096 as in the
//! file, with room around it, so an `O_DIRECT` read of the aligned superset lands in place (no
//! bounce buffer, no copy); ranges already in the page cache are copied from it with `pread`.
//!
//! Slots are shared by all layers but each sparse layer has a quota (the slots divided evenly):
//! a layer over its quota gives up its own experts first. Without quotas, a cache smaller than
//! one token's worth of experts under LRU evicts every expert just before the next token needs
//! it again (each layer's experts come back once per token, after all the other layers'), and
//! hits nothing; with per-layer quotas it behaves like one small LRU per layer, as in
//! Mixtral-offloading.
//!
//! [`HostExpertCache::acquire`] brings a set of experts in and pins them: the returned [`Lease`]
//! hands out [`HostTensor`] views of the slots, and the slots cannot be evicted until the lease
//! is dropped. A layer whose tokens chose more experts than there are slots runs them in waves
//! (see `models::moe`), so even a cache of one slot gives exact results, only slower.
//!
//! Reads run on the cache's own reader thread, so they overlap compute:
//! [`HostExpertCache::prefetch`] claims slots for experts and returns at once. `models::moe`
//! prefetches a wave's misses, computes its hits meanwhile, then acquires the rest (waiting only
//! for what is still in flight), and predicts the next sparse layer's experts by applying that
//! layer's router to the current hidden state (Mixtral-offloading's speculative prefetch), whose
//! accuracy the statistics record. A slot being filled is never evicted or read; its buffer is
//! moved to the reader thread for the read and moved back when done.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flowgate_formats::catalog::ExpertProj;
use flowgate_formats::{ModelSpec, TensorCatalog, TensorInfo};
use flowgate_io::{AlignedBuf, RangeRead, RangeReader};

use super::budget::Budget;
use super::policy::{Policy, PolicyKind};
use crate::error::{EngineError, Result};
use crate::weights::HostTensor;

const PROJS: [ExpertProj; 3] = [ExpertProj::Gate, ExpertProj::Up, ExpertProj::Down];
/// Slot regions start on pages; a matrix keeps its file offset's phase within the page (so a
/// direct read lands in place) when that phase is a multiple of [`MIN_PHASE_ALIGN`].
const PAGE: u64 = 4096;
/// Matrices start at least this aligned in a slot (cache lines, SIMD loads, f32 access).
const MIN_PHASE_ALIGN: u64 = 64;
/// Slots are allocated in chunks of about this many bytes.
const CHUNK: usize = 64 << 20;

/// Where one matrix of an expert sits in its slot.
#[derive(Clone, Debug)]
struct Part {
    info: TensorInfo,
    /// Byte offset of the matrix in the slot.
    at: u64,
}

/// Where every expert's bytes are in the file, and how big a slot must be.
#[derive(Clone, Debug)]
pub struct ExpertLayout {
    pub n_layers: usize,
    pub n_experts: usize,
    /// Per key (`layer * n_experts + expert`; absent for dense layers): gate, up, down.
    parts: Vec<Option<[Part; 3]>>,
    /// Bytes of one slot (the largest expert, parts aligned, rounded to a page).
    pub slot_bytes: u64,
    /// Sum of all experts' bytes.
    pub total_bytes: u64,
}

impl ExpertLayout {
    /// The experts of every sparse layer of `spec` in `catalog`.
    pub fn new(spec: &ModelSpec, catalog: &TensorCatalog) -> Result<ExpertLayout> {
        let m = spec
            .moe
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("expert paging needs an MoE model".into()))?;
        let mut parts = Vec::with_capacity(spec.n_layers * m.n_experts);
        let (mut slot, mut total) = (0u64, 0u64);
        for l in 0..spec.n_layers {
            for e in 0..m.n_experts {
                if !spec.is_sparse_layer(l) {
                    parts.push(None);
                    continue;
                }
                let p: [TensorInfo; 3] = [
                    catalog.expert(l, PROJS[0], e)?,
                    catalog.expert(l, PROJS[1], e)?,
                    catalog.expert(l, PROJS[2], e)?,
                ];
                let want = [
                    [m.expert_ffn as u64, spec.hidden as u64],
                    [m.expert_ffn as u64, spec.hidden as u64],
                    [spec.hidden as u64, m.expert_ffn as u64],
                ];
                for (t, w) in p.iter().zip(want) {
                    if t.shape != w {
                        return Err(flowgate_formats::FormatError::ShapeMismatch {
                            tensor: t.name.clone(),
                            found: t.shape.clone(),
                            expected: w.to_vec(),
                        }
                        .into());
                    }
                }
                let (placed, bytes) = place(p);
                slot = slot.max(bytes);
                total += placed.iter().map(|t| t.info.nbytes).sum::<u64>();
                parts.push(Some(placed));
            }
        }
        Ok(ExpertLayout {
            n_layers: spec.n_layers,
            n_experts: m.n_experts,
            parts,
            slot_bytes: slot.div_ceil(PAGE) * PAGE,
            total_bytes: total,
        })
    }

    pub fn n_keys(&self) -> usize {
        self.parts.len()
    }

    /// Where expert `expert` of `layer` is stored (gate, up, down); `None` in a dense layer.
    pub fn infos(&self, layer: usize, expert: usize) -> Option<[&TensorInfo; 3]> {
        let p = self.parts.get(self.key(layer, expert).ok()?)?.as_ref()?;
        Some([&p[0].info, &p[1].info, &p[2].info])
    }

    /// Number of experts stored (sparse layers × experts).
    pub fn n_paged(&self) -> usize {
        self.parts.iter().filter(|p| p.is_some()).count()
    }

    fn key(&self, layer: usize, expert: usize) -> Result<usize> {
        let k = layer * self.n_experts + expert;
        match self.parts.get(k) {
            Some(Some(_)) if expert < self.n_experts => Ok(k),
            _ => Err(EngineError::Invalid(format!(
                "no paged expert {expert} in layer {layer}"
            ))),
        }
    }

    /// Whether the catalog tensor `name` holds expert weights (paged, not loaded up front).
    pub fn is_expert_tensor(name: &str) -> bool {
        let Some(rest) = name.strip_prefix("blk.") else {
            return false;
        };
        let Some((_layer, rest)) = rest.split_once('.') else {
            return false;
        };
        PROJS.iter().any(|p| {
            let stem = p.gguf_stem();
            rest == format!("{stem}_exps.weight")
                || rest
                    .strip_prefix(&format!("{stem}."))
                    .and_then(|r| r.strip_suffix(".weight"))
                    .is_some_and(|e| !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()))
        })
    }
}

/// Lays out an expert's matrices in a slot: each in a page-aligned region, at its file offset's
/// phase within the page when that is aligned enough (direct reads land in place), else at the
/// region start (read buffered). Returns the parts and the bytes used.
fn place(p: [TensorInfo; 3]) -> ([Part; 3], u64) {
    let mut end = 0u64;
    let parts = p.map(|info| {
        let phase = info.offset % PAGE;
        let lead = if phase.is_multiple_of(MIN_PHASE_ALIGN) {
            phase
        } else {
            0
        };
        let at = end + lead;
        end += (lead + info.nbytes).div_ceil(PAGE) * PAGE;
        Part { info, at }
    });
    (parts, end)
}

/// Counters of one cache. `hits`/`misses` are per layer.
#[derive(Clone, Debug, Default)]
pub struct CacheStats {
    /// Experts found resident (or already being read) when a layer needed them.
    pub hits: Vec<u64>,
    /// Experts a layer needed that were not: read on demand.
    pub misses: Vec<u64>,
    /// Bytes read from the file (demand misses and prefetches).
    pub bytes_read: u64,
    /// Of those, read with direct I/O (not in the page cache) / copied from the page cache.
    pub bytes_direct: u64,
    pub bytes_cached: u64,
    /// Time layers spent waiting for experts to arrive.
    pub stall: Duration,
    pub evictions: u64,
    /// Experts read speculatively, and how many of those a layer then used.
    pub prefetched: u64,
    pub prefetch_used: u64,
    /// Missed experts computed on the CPU instead of being brought in (the VRAM tier's
    /// Fiddler-style choice), and the host time those computations took.
    pub cpu_computed: u64,
    pub cpu_time: Duration,
    /// Missed experts the GPU read in place from page-locked host memory (no copy; their
    /// bytes count in `bytes_read`).
    pub read_in_place: u64,
}

impl CacheStats {
    pub fn total_hits(&self) -> u64 {
        self.hits.iter().sum()
    }
    pub fn total_misses(&self) -> u64 {
        self.misses.iter().sum()
    }
    pub fn hit_rate(&self) -> f64 {
        let (h, m) = (self.total_hits(), self.total_misses());
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }
    /// Hit rate of each layer (`None` for layers that asked for no expert).
    pub fn hit_rate_per_layer(&self) -> Vec<Option<f64>> {
        self.hits
            .iter()
            .zip(&self.misses)
            .map(|(&h, &m)| (h + m > 0).then(|| h as f64 / (h + m) as f64))
            .collect()
    }

    /// Fraction of speculatively read experts that were used (0 when none were read).
    pub fn prefetch_accuracy(&self) -> f64 {
        if self.prefetched == 0 {
            0.0
        } else {
            self.prefetch_used as f64 / self.prefetched as f64
        }
    }
}

struct Slot {
    /// `None` while the reader thread holds the buffer.
    buf: Option<Arc<AlignedBuf>>,
    key: Option<usize>,
    pins: u32,
    /// Being filled by the reader thread (its buffer is there): not evictable, not readable.
    loading: bool,
    /// Filled by a prefetch and not used yet.
    speculative: bool,
}

struct Inner {
    slots: Vec<Slot>,
    slot_of: Vec<Option<usize>>,
    /// Resident experts per layer, and each layer's share of the slots.
    count: Vec<usize>,
    quota: Vec<usize>,
    policy: Box<dyn Policy>,
    stats: CacheStats,
    /// The last read failure, for the layer that waits on it.
    failure: Option<String>,
}

/// A batch of reads for the reader thread: (key, slot, the slot's buffer).
type Job = Vec<(usize, usize, AlignedBuf)>;

struct Shared {
    layout: ExpertLayout,
    reader: RangeReader,
    inner: Mutex<Inner>,
    /// Signalled whenever a batch of reads completes.
    done: Condvar,
}

/// A RAM cache of experts over the model file. See the module docs.
pub struct HostExpertCache {
    shared: Arc<Shared>,
    /// The memory the slots are cut from: (address, length) of each chunk.
    regions: Vec<(usize, usize)>,
    budget: Arc<Budget>,
    n_slots: usize,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    speculative: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // State changes are made only when reads complete, so a panic elsewhere while the lock
        // was held cannot leave a slot half-described: keep going with the data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a batch into its buffers, then hands the buffers back to their slots.
    fn run(&self, job: Job) {
        let mut job = job;
        let mut reads = Vec::with_capacity(job.len() * 3);
        let mut bad = None;
        for (k, _, buf) in job.iter_mut() {
            let Some(parts) = self.layout.parts.get(*k).and_then(|p| p.as_ref()) else {
                bad = Some("not a paged expert".to_string());
                break;
            };
            // Split the slot into the three parts' regions so each read owns its bytes.
            let mut rest = buf.as_mut_slice();
            let mut base = 0u64;
            for (i, p) in parts.iter().enumerate() {
                let region_end = match parts.get(i + 1) {
                    Some(next) => next.at / PAGE * PAGE,
                    None => base + rest.len() as u64,
                };
                let (region, tail) = rest.split_at_mut((region_end - base) as usize);
                reads.push(RangeRead {
                    file: p.info.file,
                    offset: p.info.offset,
                    len: p.info.nbytes as usize,
                    at: (p.at - base) as usize,
                    buf: region,
                });
                rest = tail;
                base = region_end;
            }
        }
        let res = match bad {
            Some(b) => Err(b),
            None => self.reader.read(&mut reads).map_err(|e| e.to_string()),
        };
        drop(reads);
        let mut g = self.lock();
        let n_exp = self.layout.n_experts;
        match res {
            Ok(st) => {
                g.stats.bytes_read += st.direct_bytes + st.cached_bytes;
                g.stats.bytes_direct += st.direct_bytes;
                g.stats.bytes_cached += st.cached_bytes;
                for (_, s, buf) in job {
                    g.slots[s].buf = Some(Arc::new(buf));
                    g.slots[s].loading = false;
                }
            }
            Err(e) => {
                for (k, s, buf) in job {
                    let sl = &mut g.slots[s];
                    sl.buf = Some(Arc::new(buf));
                    sl.loading = false;
                    sl.key = None;
                    sl.speculative = false;
                    g.slot_of[k] = None;
                    g.count[k / n_exp] -= 1;
                }
                g.failure = Some(e);
            }
        }
        drop(g);
        self.done.notify_all();
    }
}

impl HostExpertCache {
    /// A cache of `n_slots` slots charged to `budget`, reading experts from `files` with
    /// `io_threads` readers (0: 4).
    pub fn new(
        layout: ExpertLayout,
        files: Vec<PathBuf>,
        n_slots: usize,
        policy: PolicyKind,
        budget: Arc<Budget>,
        io_threads: usize,
    ) -> Result<HostExpertCache> {
        if n_slots == 0 {
            return Err(EngineError::Invalid(
                "the expert cache needs room for at least one expert".into(),
            ));
        }
        let reader = RangeReader::open(&files, if io_threads == 0 { 4 } else { io_threads })?;
        let bytes = layout
            .slot_bytes
            .checked_mul(n_slots as u64)
            .ok_or_else(|| EngineError::Invalid("expert cache size overflows".into()))?;
        // One charge for all slots, made before anything is allocated.
        budget.charge(bytes, "the expert cache")?;
        // Slots are cut from chunks of about CHUNK bytes: one mapping each (huge pages where
        // the kernel has them on), few regions to page-lock.
        let slot_bytes = layout.slot_bytes as usize;
        let per_chunk = (CHUNK / slot_bytes).clamp(1, n_slots);
        let mut slots = Vec::with_capacity(n_slots);
        let mut regions = Vec::new();
        while slots.len() < n_slots {
            let n = per_chunk.min(n_slots - slots.len());
            let pieces = AlignedBuf::zeroed(n * slot_bytes).and_then(|c| {
                regions.push((c.as_slice().as_ptr() as usize, c.len()));
                c.split(slot_bytes, n)
            });
            let Some(pieces) = pieces else {
                budget.release(bytes);
                return Err(EngineError::Invalid(
                    "allocating the expert cache's slots failed".into(),
                ));
            };
            slots.extend(pieces.into_iter().map(|buf| Slot {
                buf: Some(Arc::new(buf)),
                key: None,
                pins: 0,
                loading: false,
                speculative: false,
            }));
        }
        let n_keys = layout.n_keys();
        let sparse: Vec<usize> = (0..layout.n_layers)
            .filter(|&l| {
                layout
                    .parts
                    .get(l * layout.n_experts)
                    .is_some_and(|p| p.is_some())
            })
            .collect();
        let mut quota = vec![0; layout.n_layers];
        let ns = sparse.len().max(1);
        for (i, &l) in sparse.iter().enumerate() {
            quota[l] = n_slots / ns + usize::from(i < n_slots % ns);
        }
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                slots,
                slot_of: vec![None; n_keys],
                count: vec![0; layout.n_layers],
                quota,
                policy: policy.build(n_keys),
                stats: CacheStats {
                    hits: vec![0; layout.n_layers],
                    misses: vec![0; layout.n_layers],
                    ..Default::default()
                },
                failure: None,
            }),
            layout,
            reader,
            done: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("expert-reader".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    worker.run(job);
                }
            })
            .map_err(|e| {
                budget.release(bytes);
                EngineError::Invalid(format!("starting the expert reader thread: {e}"))
            })?;
        Ok(HostExpertCache {
            shared,
            regions,
            budget,
            n_slots,
            jobs: Some(tx),
            thread: Some(thread),
            speculative: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.shared.layout
    }

    /// Whether speculative prefetch (the next layer's experts, predicted) is on (off by
    /// default: a wrong guess costs a read and evicts an expert that may have hit).
    pub fn speculative(&self) -> bool {
        self.speculative.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_speculative(&self, on: bool) {
        self.speculative
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.n_slots
    }

    pub fn policy(&self) -> PolicyKind {
        self.shared.lock().policy.kind()
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn stats(&self) -> CacheStats {
        self.shared.lock().stats.clone()
    }

    /// Zeroes the counters (e.g. after a warm-up).
    pub fn reset_stats(&self) {
        let mut g = self.shared.lock();
        let n = self.shared.layout.n_layers;
        g.stats = CacheStats {
            hits: vec![0; n],
            misses: vec![0; n],
            ..Default::default()
        };
    }

    /// Experts of `layer` now resident (or being read).
    pub fn resident(&self, layer: usize) -> Vec<usize> {
        let g = self.shared.lock();
        let n = self.shared.layout.n_experts;
        (0..n)
            .filter(|&e| g.slot_of.get(layer * n + e).is_some_and(|s| s.is_some()))
            .collect()
    }

    /// The slot a miss in `layer` takes: a free one, else a victim chosen by the policy among
    /// unpinned, settled slots, from `layer` itself when it is at its quota, else from layers
    /// over theirs, else from any layer. `None` when every slot is pinned or being read.
    fn claim(&self, g: &mut Inner, layer: usize) -> Option<usize> {
        if let Some(s) = g
            .slots
            .iter()
            .position(|s| s.key.is_none() && s.pins == 0 && !s.loading)
        {
            return Some(s);
        }
        let n_exp = self.shared.layout.n_experts;
        let unpinned: Vec<usize> = g
            .slots
            .iter()
            .filter(|s| s.pins == 0 && !s.loading)
            .filter_map(|s| s.key)
            .collect();
        let own: Vec<usize> = unpinned
            .iter()
            .copied()
            .filter(|k| k / n_exp == layer)
            .collect();
        let over: Vec<usize> = unpinned
            .iter()
            .copied()
            .filter(|k| g.count[k / n_exp] > g.quota[k / n_exp])
            .collect();
        let pool = if g.count[layer] >= g.quota[layer] && !own.is_empty() {
            own
        } else if !over.is_empty() {
            over
        } else {
            unpinned
        };
        let victim = g.policy.victim(&pool)?;
        let s = g.slot_of[victim].take()?;
        g.count[victim / n_exp] -= 1;
        g.slots[s].key = None;
        g.slots[s].speculative = false;
        g.stats.evictions += 1;
        Some(s)
    }

    /// Starts reading `keys` into claimed slots (locked); returns how many were started (a
    /// prefix of `keys`: it stops when no slot can be claimed).
    fn start(
        &self,
        g: &mut Inner,
        layer: usize,
        keys: &[usize],
        speculative: bool,
    ) -> Result<usize> {
        let n_exp = self.shared.layout.n_experts;
        let mut job: Job = Vec::new();
        for &k in keys {
            let Some(s) = self.claim(g, layer) else {
                break;
            };
            // A settled, unpinned slot's buffer is referenced by nobody: views live only as
            // long as a lease, which pins.
            let buf = match g.slots[s].buf.take().map(Arc::try_unwrap) {
                Some(Ok(b)) => b,
                other => {
                    if let Some(Err(arc)) = other {
                        g.slots[s].buf = Some(arc);
                    }
                    self.submit(g, job)?;
                    return Err(EngineError::Invalid(
                        "expert cache: a slot being refilled is still referenced".into(),
                    ));
                }
            };
            let sl = &mut g.slots[s];
            sl.key = Some(k);
            sl.loading = true;
            sl.speculative = speculative;
            g.slot_of[k] = Some(s);
            g.count[k / n_exp] += 1;
            job.push((k, s, buf));
        }
        let n = job.len();
        if speculative {
            g.stats.prefetched += n as u64;
        }
        self.submit(g, job)?;
        Ok(n)
    }

    fn submit(&self, g: &mut Inner, job: Job) -> Result<()> {
        if job.is_empty() {
            return Ok(());
        }
        let sent = self.jobs.as_ref().map(|tx| tx.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            Some(Err(mpsc::SendError(job))) => {
                // The reader is gone: undo the claims.
                for (k, s, buf) in job {
                    let sl = &mut g.slots[s];
                    sl.buf = Some(Arc::new(buf));
                    sl.loading = false;
                    sl.key = None;
                    g.slot_of[k] = None;
                    g.count[k / self.shared.layout.n_experts] -= 1;
                }
                Err(EngineError::Invalid(
                    "the expert reader thread stopped".into(),
                ))
            }
            None => Err(EngineError::Invalid("the expert cache is shut down".into())),
        }
    }

    /// Starts reading those of `experts` (of `layer`) that are not resident, as far as
    /// unpinned slots allow, and returns at once with the experts that were already resident
    /// or being read. Used for speculative prefetch and to overlap a wave's reads with its
    /// hits' compute.
    pub fn prefetch(
        &self,
        layer: usize,
        experts: &[usize],
        speculative: bool,
    ) -> Result<Vec<usize>> {
        let keys: Vec<usize> = experts
            .iter()
            .map(|&e| self.shared.layout.key(layer, e))
            .collect::<Result<_>>()?;
        let mut g = self.shared.lock();
        let mut resident = Vec::new();
        let mut missing = Vec::new();
        for (&k, &e) in keys.iter().zip(experts) {
            if g.slot_of[k].is_some() {
                resident.push(e);
            } else if !missing.contains(&k) {
                missing.push(k);
            }
        }
        if !speculative {
            // Demand reads: these are the misses of this layer.
            for &k in &missing {
                g.policy.touch(k);
            }
            g.stats.misses[layer] += missing.len() as u64;
        }
        self.start(&mut g, layer, &missing, speculative)?;
        Ok(resident)
    }

    /// Makes `experts` of `layer` resident and pins them until the returned lease is dropped,
    /// waiting for reads in flight. At most [`capacity`](Self::capacity) experts per call.
    pub fn acquire(&self, layer: usize, experts: &[usize]) -> Result<Lease> {
        self.acquire_inner(layer, experts, false)
    }

    fn acquire_inner(&self, layer: usize, experts: &[usize], counted: bool) -> Result<Lease> {
        if experts.len() > self.n_slots {
            return Err(EngineError::Invalid(format!(
                "{} experts requested at once, the cache holds {}",
                experts.len(),
                self.n_slots
            )));
        }
        let keys: Vec<usize> = experts
            .iter()
            .map(|&e| self.shared.layout.key(layer, e))
            .collect::<Result<_>>()?;
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].contains(k) {
                return Err(EngineError::Invalid(format!(
                    "expert {} of layer {layer} requested twice",
                    experts[i]
                )));
            }
        }
        let mut g = self.shared.lock();
        // Pin what is there (so nothing below evicts it), start reads for the rest.
        let mut missing = Vec::new();
        for &k in &keys {
            if !counted {
                g.policy.touch(k);
            }
            match g.slot_of[k] {
                Some(s) => {
                    if !counted {
                        g.stats.hits[layer] += 1;
                    }
                    let sl = &mut g.slots[s];
                    sl.pins += 1;
                    if sl.speculative {
                        sl.speculative = false;
                        g.stats.prefetch_used += 1;
                    }
                }
                None => missing.push(k),
            }
        }
        if !missing.is_empty() && !counted {
            g.stats.misses[layer] += missing.len() as u64;
        }
        // Start reads for the missing ones, waiting for slots being filled to settle when
        // there is no other room.
        let mut rest: &[usize] = &missing;
        loop {
            let n = match self.start(&mut g, layer, rest, false) {
                Ok(n) => n,
                Err(e) => {
                    self.unpin(&mut g, &keys);
                    return Err(e);
                }
            };
            for &k in &rest[..n] {
                if let Some(s) = g.slot_of[k] {
                    g.slots[s].pins += 1;
                }
            }
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
            if !g.slots.iter().any(|s| s.loading) {
                self.unpin(&mut g, &keys);
                return Err(EngineError::Invalid(
                    "every expert cache slot is in use".into(),
                ));
            }
            g = self.shared.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        // Wait for every wanted expert to settle.
        let t0 = Instant::now();
        let mut waited = false;
        loop {
            let pending = keys.iter().any(|&k| match g.slot_of[k] {
                Some(s) => g.slots[s].loading,
                None => false,
            });
            let lost = keys.iter().any(|&k| g.slot_of[k].is_none());
            if lost {
                let why = g
                    .failure
                    .clone()
                    .unwrap_or_else(|| "an expert read failed".into());
                self.unpin(&mut g, &keys);
                return Err(EngineError::Invalid(format!("reading experts: {why}")));
            }
            if !pending {
                break;
            }
            waited = true;
            g = self.shared.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if waited {
            g.stats.stall += t0.elapsed();
        }
        let mut slots = Vec::with_capacity(keys.len());
        let mut tensors = Vec::with_capacity(keys.len());
        for &k in &keys {
            let s = g.slot_of[k].unwrap_or(usize::MAX);
            slots.push(s);
            match g.slots.get(s).and_then(|sl| sl.buf.as_ref()) {
                Some(buf) => tensors.push(self.views(buf, k)),
                None => tensors.push(Err(EngineError::Invalid("expert vanished".into()))),
            }
        }
        // The lease exists before `tensors` is checked, so an error still unpins (its Drop).
        let mut lease = Lease {
            shared: self.shared.clone(),
            slots,
            tensors: Vec::new(),
        };
        drop(g);
        lease.tensors = tensors.into_iter().collect::<Result<_>>()?;
        Ok(lease)
    }

    /// [`acquire`](Self::acquire) for experts whose hits and misses a [`prefetch`](Self::prefetch)
    /// call of the same wave already counted.
    pub fn acquire_counted(&self, layer: usize, experts: &[usize]) -> Result<Lease> {
        self.acquire_inner(layer, experts, true)
    }

    /// Counts `experts` of `layer` as hits (they were found resident by a `prefetch` call).
    pub fn count_hits(&self, layer: usize, experts: &[usize]) {
        let mut g = self.shared.lock();
        for &e in experts {
            if let Ok(k) = self.shared.layout.key(layer, e) {
                g.policy.touch(k);
                g.stats.hits[layer] += 1;
            }
        }
    }

    fn unpin(&self, g: &mut Inner, keys: &[usize]) {
        for &k in keys {
            if let Some(s) = g.slot_of[k] {
                g.slots[s].pins = g.slots[s].pins.saturating_sub(1);
            }
        }
    }

    fn views(&self, buf: &Arc<AlignedBuf>, k: usize) -> Result<[HostTensor; 3]> {
        let p = self.shared.layout.parts[k]
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("not a paged expert".into()))?;
        let v = |i: usize| {
            let t = &p[i].info;
            HostTensor::view(
                &t.name,
                t.dtype,
                t.shape.iter().map(|&d| d as usize).collect(),
                buf.clone(),
                p[i].at as usize,
            )
        };
        Ok([v(0)?, v(1)?, v(2)?])
    }

    /// Start address and length of the memory every slot lies in, in a few regions, for
    /// callers that page-lock it (the VRAM tier copies from the slots by DMA). It is allocated
    /// once, with the cache, and lives as long as the cache's state (leases included); a slot
    /// never moves (being read, it lends its buffer to the reader and gets the same one back).
    pub fn memory_regions(&self) -> Vec<(*const u8, usize)> {
        self.regions
            .iter()
            .map(|&(p, n)| (p as *const u8, n))
            .collect()
    }

    /// `experts` of `layer` went up to the tier above (VRAM): their slots go first when room
    /// is needed, unless they are asked for again. With [`HostExpertCache::kept_below`] this
    /// keeps the RAM tier from holding what VRAM holds (see `backend::cuda::pinned_tier`).
    pub fn demote(&self, layer: usize, experts: &[usize]) {
        let mut g = self.shared.lock();
        for &e in experts {
            if let Ok(k) = self.shared.layout.key(layer, e) {
                g.policy.demote(k);
            }
        }
    }

    /// `experts` of `layer` left the tier above: those still here become the most recently
    /// used (no hit or miss is counted).
    pub fn kept_below(&self, layer: usize, experts: &[usize]) {
        let mut g = self.shared.lock();
        for &e in experts {
            if let Ok(k) = self.shared.layout.key(layer, e) {
                if g.slot_of[k].is_some() {
                    g.policy.touch(k);
                }
            }
        }
    }

    /// Slots held by leases or being read now.
    pub fn busy_slots(&self) -> usize {
        let g = self.shared.lock();
        g.slots.iter().filter(|s| s.pins > 0 || s.loading).count()
    }
}

impl Shared {
    fn release(&self, slots: &[usize]) {
        let mut g = self.lock();
        for &s in slots {
            if let Some(sl) = g.slots.get_mut(s) {
                sl.pins = sl.pins.saturating_sub(1);
            }
        }
    }
}

impl Drop for HostExpertCache {
    fn drop(&mut self) {
        // Closing the channel ends the reader thread once its last batch is done.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.budget
            .release(self.n_slots as u64 * self.shared.layout.slot_bytes);
    }
}

/// Experts made resident and pinned by [`HostExpertCache::acquire`]; unpinned on drop. A
/// lease owns a reference to the cache's state, so it may outlive the borrow that made it
/// (the VRAM tier holds one until its copies have run).
pub struct Lease {
    shared: Arc<Shared>,
    slots: Vec<usize>,
    /// Per requested expert, in order: gate, up, down.
    pub tensors: Vec<[HostTensor; 3]>,
}

impl Lease {
    /// Experts held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Views first: a slot is refilled only when nothing references it.
        self.tensors.clear();
        self.shared.release(&self.slots);
    }
}
