//! The page-locked host tier under the VRAM expert cache: where [`super::ExpertPager`] copies
//! a missed expert from, and where the CPU share of missed experts reads its weights.
//!
//! - [`PinnedTier::Resident`] (`--vram-budget` alone): every expert stays in the loader's
//!   arenas, page-locked in place; an expert's host addresses never change and nothing has
//!   to be held while a copy runs.
//! - [`PinnedTier::Cached`] (`--vram-budget` with `--ram-budget`): experts live in a
//!   [`HostExpertCache`] of RAM slots over the model file (the SSD tier, read with flowgate-io's
//!   direct reader); every slot is page-locked once, when the tier is made, so a miss in VRAM
//!   that hits in RAM is copied by DMA straight from the slot. A miss in both waits for the
//!   read from the file, then is copied. The experts a copy reads stay pinned in the RAM cache
//!   (a [`Lease`]) until an event recorded after the copy has completed ([`PinnedTier::hold`]);
//!   the CPU share's lease travels with its job and ends when the job does.
//!
//! Both tiers count their own hits and misses: the VRAM tier's in the pager's slot map, the
//! RAM tier's in the cache (one per VRAM miss).
//!
//! The RAM tier keeps to what VRAM does not hold, without copying anything back: an expert
//! copied up is demoted in the RAM cache's policy (its slot is the next to go), and an expert
//! VRAM evicts becomes the most recently used in RAM if it is still there. Plain LRU on both
//! tiers would make RAM hold the experts most recently copied up, i.e. the ones VRAM holds:
//! measured on moe30b under uniform routing, 6 GiB of RAM under 8 GiB of VRAM hit 7.5% that
//! way (docs/benchmarks.md).

use std::sync::{Arc, Mutex};

use flowgate_cuda::{Event, HostPin, Stream};
use flowgate_io::AlignedBuf;

use super::{cuda_err, lock};
use crate::backend::cpu::{CpuBackend, CpuWeight};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::residency::{HostExpertCache, Lease};

/// Where the VRAM tier's experts come from. See the module docs.
pub(super) enum PinnedTier {
    Resident(Resident),
    Cached(Cached),
}

/// Loader arenas page-locked in place for as long as this lives: the GPU layer split's CPU
/// layers, whose weights a long prompt copies to the device (by DMA at the link's rate, where
/// pageable memory goes through the driver's staging at a fraction of it).
pub struct PinnedArenas {
    // Dropped in this order: unpin, then release the arenas.
    _pins: Vec<HostPin>,
    arenas: Vec<Arc<AlignedBuf>>,
}

impl PinnedArenas {
    /// Page-locks each distinct arena of `arenas` (by address).
    pub fn pin(backend: &super::CudaBackend, arenas: Vec<Arc<AlignedBuf>>) -> Result<PinnedArenas> {
        let mut distinct: Vec<Arc<AlignedBuf>> = Vec::new();
        for a in arenas {
            if !distinct.iter().any(|d| Arc::ptr_eq(d, &a)) {
                distinct.push(a);
            }
        }
        let mut pins = Vec::with_capacity(distinct.len());
        for a in distinct.iter().filter(|a| !a.is_empty()) {
            // SAFETY: the arena is kept alive (and never moves: it is a mapping) by `arenas`,
            // which is dropped after `pins`; each distinct arena is registered once.
            let pin = unsafe { HostPin::new(&backend.device, a.as_ptr().cast_mut(), a.len()) }
                .map_err(cuda_err)?;
            pins.push(pin);
        }
        Ok(PinnedArenas {
            _pins: pins,
            arenas: distinct,
        })
    }

    /// Bytes page-locked.
    pub fn bytes(&self) -> u64 {
        self.arenas.iter().map(|a| a.len() as u64).sum()
    }
}

/// Every expert in page-locked host memory.
pub(super) struct Resident {
    /// Per key (`layer * n_experts + expert`): host addresses of gate, up, down.
    pub host: Vec<Option<[u64; 3]>>,
    /// The same experts as CPU-backend weights (views of the same memory), per key.
    pub cpu: Vec<Option<[CpuWeight; 3]>>,
    /// Kernels can read the experts in place at their host addresses (each pin is mapped
    /// into the device's address space at its host address).
    in_place: bool,
    // Dropped in this order: unpin, then release the arenas.
    _pins: Vec<HostPin>,
    _arenas: Vec<Arc<AlignedBuf>>,
}

impl Resident {
    /// Experts at `host` (and as `cpu` weights) in `arenas`, page-locked by `pins`.
    pub fn new(
        host: Vec<Option<[u64; 3]>>,
        cpu: Vec<Option<[CpuWeight; 3]>>,
        pins: Vec<HostPin>,
        arenas: Vec<Arc<AlignedBuf>>,
    ) -> Resident {
        let in_place = pins
            .iter()
            .all(|p| p.device_ptr().is_ok_and(|d| d == p.host_ptr()));
        Resident {
            host,
            cpu,
            in_place,
            _pins: pins,
            _arenas: arenas,
        }
    }

    /// The entries of `experts` of `layer` in a per-key table (`n_experts` keys a layer).
    fn lookup<T: Clone>(
        table: &[Option<T>],
        layer: usize,
        experts: &[usize],
        n_experts: usize,
    ) -> Result<Vec<T>> {
        experts
            .iter()
            .map(|&e| {
                let key = layer * n_experts + e;
                table
                    .get(key)
                    .and_then(|x| x.clone())
                    .ok_or_else(|| EngineError::Invalid(format!("no host copy of expert {key}")))
            })
            .collect()
    }
}

/// A RAM cache over the model file, its slots page-locked.
pub(super) struct Cached {
    /// Leases kept until the copies from them have run: (event after the copies, lease).
    held: Mutex<Vec<(Event, Lease)>>,
    // Dropped after the leases: unpin the slots, then (with the last reference) free them.
    _pins: Vec<HostPin>,
    cache: Arc<HostExpertCache>,
}

impl Drop for Cached {
    fn drop(&mut self) {
        // Copies may still read the slots: wait for them before the slots are unpinned.
        for (ev, _) in lock(&self.held).drain(..) {
            let _ = ev.synchronize();
        }
    }
}

/// Experts brought into page-locked memory for one use.
pub(super) struct Fetched {
    /// Per expert asked for, in order: host addresses of gate, up, down.
    pub addrs: Vec<[u64; 3]>,
    /// What keeps them there (the RAM cache's pins), to hand to [`PinnedTier::hold`].
    pub lease: Option<Lease>,
}

/// CPU weights of experts, with what keeps them in memory: the lease has to outlive every
/// clone of the weights (drop the weights first).
pub(super) struct CpuExpertWeights {
    pub weights: Vec<[CpuWeight; 3]>,
    pub lease: Option<Lease>,
}

impl PinnedTier {
    /// A tier over `cache`, its slots page-locked on `device`.
    pub fn cached(device: &flowgate_cuda::Device, cache: Arc<HostExpertCache>) -> Result<Self> {
        let mut pins = Vec::new();
        for (ptr, len) in cache.memory_regions() {
            // SAFETY: the slots' memory lives as long as the cache, which `Cached` holds past
            // the pins (field order), and never moves.
            let pin = unsafe { HostPin::new(device, ptr.cast_mut(), len) }.map_err(cuda_err)?;
            pins.push(pin);
        }
        Ok(PinnedTier::Cached(Cached {
            held: Mutex::new(Vec::new()),
            _pins: pins,
            cache,
        }))
    }

    /// The RAM cache, when there is one.
    pub fn cache(&self) -> Option<&Arc<HostExpertCache>> {
        match self {
            PinnedTier::Resident(_) => None,
            PinnedTier::Cached(c) => Some(&c.cache),
        }
    }

    /// Most experts one [`fetch`](Self::fetch) may ask for.
    pub fn batch(&self, k: usize) -> usize {
        match self {
            PinnedTier::Resident(_) => usize::MAX,
            PinnedTier::Cached(_) => k.max(1),
        }
    }

    /// Makes experts `experts` of `layer` (`n_experts` per layer) resident in page-locked
    /// memory, reading misses from the file (`counted`: their hits and misses were counted
    /// by a prefetch already), and returns their addresses.
    pub fn fetch(
        &self,
        layer: usize,
        experts: &[usize],
        n_experts: usize,
        counted: bool,
    ) -> Result<Fetched> {
        match self {
            PinnedTier::Resident(r) => Ok(Fetched {
                addrs: Resident::lookup(&r.host, layer, experts, n_experts)?,
                lease: None,
            }),
            PinnedTier::Cached(c) => {
                c.make_room(experts.len())?;
                let lease = if counted {
                    c.cache.acquire_counted(layer, experts)?
                } else {
                    c.cache.acquire(layer, experts)?
                };
                // Going up to VRAM: RAM need not keep them (see the module docs).
                c.cache.demote(layer, experts);
                let addrs = lease
                    .tensors
                    .iter()
                    .map(|t| t.each_ref().map(|x| x.bytes().as_ptr() as u64))
                    .collect();
                Ok(Fetched {
                    addrs,
                    lease: Some(lease),
                })
            }
        }
    }

    /// Device addresses (gate, up, down) at which kernels read `experts` of `layer` in place,
    /// over the link, with nothing to hold: only every expert page-locked where the device
    /// maps it (`--vram-budget` alone); None for a RAM cache, whose slots change hands.
    pub fn in_place(
        &self,
        layer: usize,
        experts: &[usize],
        n_experts: usize,
    ) -> Option<Vec<[u64; 3]>> {
        match self {
            PinnedTier::Resident(r) if r.in_place => {
                Resident::lookup(&r.host, layer, experts, n_experts).ok()
            }
            _ => None,
        }
    }

    /// Whether [`PinnedTier::in_place`] serves.
    pub fn reads_in_place(&self) -> bool {
        matches!(self, PinnedTier::Resident(r) if r.in_place)
    }

    /// Weights of `experts` of `layer` for the CPU backend.
    pub fn cpu_weights(
        &self,
        layer: usize,
        experts: &[usize],
        n_experts: usize,
    ) -> Result<CpuExpertWeights> {
        match self {
            PinnedTier::Resident(r) => Ok(CpuExpertWeights {
                weights: Resident::lookup(&r.cpu, layer, experts, n_experts)?,
                lease: None,
            }),
            PinnedTier::Cached(c) => {
                c.make_room(experts.len())?;
                let lease = c.cache.acquire(layer, experts)?;
                let weights = lease
                    .tensors
                    .iter()
                    .map(|t| {
                        Ok([
                            CpuBackend.weight(t[0].clone())?,
                            CpuBackend.weight(t[1].clone())?,
                            CpuBackend.weight(t[2].clone())?,
                        ])
                    })
                    .collect::<Result<_>>()?;
                Ok(CpuExpertWeights {
                    weights,
                    lease: Some(lease),
                })
            }
        }
    }

    /// `experts` of `layer` were evicted from VRAM: the RAM tier keeps those it still holds.
    pub fn evicted(&self, layer: usize, experts: &[usize]) {
        if let (PinnedTier::Cached(c), false) = (self, experts.is_empty()) {
            c.cache.kept_below(layer, experts);
        }
    }

    /// Keeps `lease` until the work queued on `stream` so far (the copies from it) has run.
    pub fn hold(
        &self,
        lease: Option<Lease>,
        device: &flowgate_cuda::Device,
        stream: &Stream,
    ) -> Result<()> {
        let (Some(lease), PinnedTier::Cached(c)) = (lease, self) else {
            return Ok(());
        };
        if lease.is_empty() {
            return Ok(());
        }
        let ev = Event::new(device).map_err(cuda_err)?;
        ev.record(stream).map_err(cuda_err)?;
        lock(&c.held).push((ev, lease));
        Ok(())
    }

    /// Ends the leases whose copies have run.
    pub fn reap(&self) {
        if let PinnedTier::Cached(c) = self {
            lock(&c.held).retain(|(ev, _)| !ev.is_complete().unwrap_or(true));
        }
    }
}

impl Cached {
    /// Ends the leases whose copies have run and, when the cache would still lack `want`
    /// unpinned slots, waits for the others' copies too.
    fn make_room(&self, want: usize) -> Result<()> {
        let cap = self.cache.capacity();
        if want > cap {
            return Err(EngineError::Invalid(format!(
                "{want} experts at once from a RAM cache of {cap}"
            )));
        }
        let mut held = lock(&self.held);
        held.retain(|(ev, _)| !ev.is_complete().unwrap_or(true));
        // Counting busy slots walks them all: only worth it when there is something to wait on.
        if !held.is_empty() && self.cache.busy_slots() + want > cap {
            for (ev, _) in held.drain(..) {
                ev.synchronize().map_err(cuda_err)?;
            }
        }
        Ok(())
    }
}
