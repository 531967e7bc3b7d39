//! The VRAM tier's bookkeeping, independent of any device: which expert sits in which slot of
//! a device expert cache ([`SlotMap`]), and how a `--vram-budget` is divided ([`DevicePlan`]).
//!
//! The slots themselves (one VMM reservation cut into fixed-size slots) and the copies into
//! them belong to the backend (`backend::cuda::paging`); this module decides, for a set of
//! experts one layer needs now, which are hits, which slots the misses go to and whom they
//! evict. Each sparse layer owns a fixed share of the slots (its quota, the slots divided
//! evenly), as in Mixtral-offloading's per-layer LRU: with a router that keeps coming back to
//! the same experts, a cache shared by all layers would evict every layer's experts just before
//! the next token needs them (see `host_tier`). The experts of the current request are never
//! evicted by it, so a request holds at most the layer's quota; larger requests run in waves.

use super::budget::fmt_size;
use super::host_tier::CacheStats;
use super::policy::{Policy, PolicyKind};
use crate::error::{EngineError, Result};

/// Where each requested expert is, after [`SlotMap::assign`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub expert: usize,
    pub slot: usize,
    /// It was resident already; otherwise it must be copied into `slot` before use.
    pub hit: bool,
    /// The expert of the same layer this miss evicted from `slot`, if any.
    pub evicted: Option<usize>,
}

/// Expert → slot bookkeeping of a device expert cache with per-layer quotas.
pub struct SlotMap {
    n_experts: usize,
    /// Per layer: its slot range (empty for dense layers).
    ranges: Vec<std::ops::Range<usize>>,
    /// Per slot: the key (`layer * n_experts + expert`) it holds.
    key_of: Vec<Option<usize>>,
    /// Per key: its slot while resident.
    slot_of: Vec<Option<usize>>,
    policy: Box<dyn Policy>,
    stats: CacheStats,
}

impl SlotMap {
    /// `n_slots` slots shared out over the layers where `sparse[l]` holds, `n_experts` each.
    pub fn new(
        sparse: &[bool],
        n_experts: usize,
        n_slots: usize,
        policy: PolicyKind,
    ) -> Result<SlotMap> {
        let n_sparse = sparse.iter().filter(|&&s| s).count();
        if n_sparse == 0 || n_experts == 0 {
            return Err(EngineError::Invalid(
                "a device expert cache needs a model with experts".into(),
            ));
        }
        if n_slots < n_sparse {
            return Err(EngineError::Invalid(format!(
                "{n_slots} expert slots cannot give each of the {n_sparse} sparse layers one"
            )));
        }
        // No layer gets more slots than it has experts.
        let per = (n_slots / n_sparse).min(n_experts);
        let mut extra = (n_slots - per * n_sparse).min(n_sparse * (n_experts - per));
        let mut ranges = Vec::with_capacity(sparse.len());
        let mut next = 0;
        for &s in sparse {
            let q = if s {
                let add = usize::from(extra > 0 && per < n_experts);
                extra -= add;
                per + add
            } else {
                0
            };
            ranges.push(next..next + q);
            next += q;
        }
        let n_keys = sparse.len() * n_experts;
        Ok(SlotMap {
            n_experts,
            ranges,
            key_of: vec![None; next],
            slot_of: vec![None; n_keys],
            policy: policy.build(n_keys),
            stats: CacheStats {
                hits: vec![0; sparse.len()],
                misses: vec![0; sparse.len()],
                ..Default::default()
            },
        })
    }

    /// Slots in use by all layers (≤ the `n_slots` asked for: quotas stop at a layer's expert
    /// count).
    pub fn n_slots(&self) -> usize {
        self.key_of.len()
    }

    /// How many experts `layer` may hold at once (0 for a dense layer).
    pub fn quota(&self, layer: usize) -> usize {
        self.ranges.get(layer).map_or(0, |r| r.len())
    }

    /// Whether `expert` of `layer` is resident, and where.
    pub fn slot_of(&self, layer: usize, expert: usize) -> Option<usize> {
        if expert >= self.n_experts {
            return None;
        }
        self.slot_of
            .get(layer * self.n_experts + expert)
            .copied()
            .flatten()
    }

    /// Makes `experts` (distinct, at most the layer's quota) resident in `layer`'s slots:
    /// hits stay where they are; each miss takes a free slot or evicts the policy's victim
    /// among the layer's experts not requested now. Counts hits and misses.
    pub fn assign(&mut self, layer: usize, experts: &[usize]) -> Result<Vec<Assigned>> {
        self.assign_counted(layer, experts, true)
    }

    /// Which of `experts` of `layer` are resident (their hits and misses counted, and the
    /// policy told of the use), without making any resident: for a reader that uses a missed
    /// expert where it already lies (the GPU reading host memory in place).
    pub fn lookup(&mut self, layer: usize, experts: &[usize]) -> Vec<bool> {
        experts
            .iter()
            .map(|&e| {
                let k = layer * self.n_experts + e;
                let hit = e < self.n_experts && self.slot_of.get(k).is_some_and(|s| s.is_some());
                if e < self.n_experts {
                    self.policy.touch(k);
                }
                if let Some(c) = (if hit {
                    &mut self.stats.hits
                } else {
                    &mut self.stats.misses
                })
                .get_mut(layer)
                {
                    *c += 1;
                }
                hit
            })
            .collect()
    }

    /// [`SlotMap::assign`] for experts a layer is predicted to need (speculative prefetch):
    /// the same placement and evictions, but no hits or misses are counted (the layer counts
    /// its own when it asks); the misses count as prefetched.
    pub fn prefetch(&mut self, layer: usize, experts: &[usize]) -> Result<Vec<Assigned>> {
        let out = self.assign_counted(layer, experts, false)?;
        self.stats.prefetched += out.iter().filter(|a| !a.hit).count() as u64;
        Ok(out)
    }

    fn assign_counted(
        &mut self,
        layer: usize,
        experts: &[usize],
        count: bool,
    ) -> Result<Vec<Assigned>> {
        let range = self.ranges.get(layer).cloned().unwrap_or(0..0);
        if experts.len() > range.len() {
            return Err(EngineError::Invalid(format!(
                "layer {layer} asked for {} experts at once; it holds {}",
                experts.len(),
                range.len()
            )));
        }
        for (i, &e) in experts.iter().enumerate() {
            if e >= self.n_experts || experts[..i].contains(&e) {
                return Err(EngineError::Invalid(format!(
                    "layer {layer}: expert {e} is out of range or asked for twice"
                )));
            }
        }
        let key = |e: usize| layer * self.n_experts + e;
        let wanted: Vec<usize> = experts.iter().map(|&e| key(e)).collect();
        let mut out = Vec::with_capacity(experts.len());
        for (&e, &k) in experts.iter().zip(&wanted) {
            self.policy.touch(k);
            if let Some(slot) = self.slot_of[k] {
                self.stats.hits[layer] += u64::from(count);
                out.push(Assigned {
                    expert: e,
                    slot,
                    hit: true,
                    evicted: None,
                });
                continue;
            }
            self.stats.misses[layer] += u64::from(count);
            let mut evicted = None;
            let slot = match range.clone().find(|&s| self.key_of[s].is_none()) {
                Some(s) => s,
                None => {
                    let candidates: Vec<usize> = range
                        .clone()
                        .filter_map(|s| self.key_of[s])
                        .filter(|k| !wanted.contains(k))
                        .collect();
                    let victim = self.policy.victim(&candidates).ok_or_else(|| {
                        EngineError::Invalid(format!("layer {layer}: no expert slot to evict"))
                    })?;
                    let s = self.slot_of[victim].take().ok_or_else(|| {
                        EngineError::Invalid("policy chose an expert that is not resident".into())
                    })?;
                    self.stats.evictions += 1;
                    evicted = Some(victim % self.n_experts);
                    s
                }
            };
            self.key_of[slot] = Some(k);
            self.slot_of[k] = Some(slot);
            out.push(Assigned {
                expert: e,
                slot,
                hit: false,
                evicted,
            });
        }
        Ok(out)
    }

    /// Forgets what `slot` holds (its copy failed): the next request for it is a miss.
    pub fn invalidate(&mut self, slot: usize) {
        if let Some(k) = self.key_of.get_mut(slot).and_then(|k| k.take()) {
            self.slot_of[k] = None;
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn stats_mut(&mut self) -> &mut CacheStats {
        &mut self.stats
    }

    /// Zeroes the counters (benchmarks reset them after warm-up); residency is kept.
    pub fn reset_stats(&mut self) {
        let n = self.stats.hits.len();
        self.stats = CacheStats {
            hits: vec![0; n],
            misses: vec![0; n],
            ..Default::default()
        };
    }
}

/// How a `--vram-budget` is divided: the dense weights first, a reserve for the KV cache and
/// activations, and what is left as expert slots.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    pub budget: u64,
    /// Dense weights as placed on the device (measured after loading them).
    pub dense_bytes: u64,
    /// Kept free for the KV cache, activations and prefill tiles.
    pub reserve_bytes: u64,
    /// One device slot (an expert's gate, up and down, each 256-byte aligned).
    pub slot_bytes: u64,
    pub n_slots: usize,
    /// Experts of the model, and their bytes.
    pub n_experts_total: usize,
    pub experts_bytes: u64,
    pub policy: PolicyKind,
    /// The host tier under the device cache when it is a RAM cache over the model file
    /// (`--ram-budget`); `None`: every expert in page-locked RAM.
    pub ram_cache: Option<RamCachePlan>,
}

/// A RAM cache of experts under the device cache.
#[derive(Clone, Debug)]
pub struct RamCachePlan {
    pub ram_budget: u64,
    pub n_slots: usize,
    pub slot_bytes: u64,
}

impl DevicePlan {
    /// Slots that fit once `dense_bytes` are placed and `reserve_bytes` kept, at most one per
    /// expert; an error naming the numbers if not even one slot per sparse layer fits.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        budget: u64,
        dense_bytes: u64,
        reserve_bytes: u64,
        slot_bytes: u64,
        n_sparse_layers: usize,
        n_experts_total: usize,
        experts_bytes: u64,
        policy: PolicyKind,
    ) -> Result<DevicePlan> {
        let need = dense_bytes + reserve_bytes + n_sparse_layers as u64 * slot_bytes;
        if need > budget || slot_bytes == 0 {
            return Err(EngineError::Invalid(format!(
                "--vram-budget {} is too small: the dense weights take {}, the KV cache and \
                 activations {} and one expert slot per sparse layer {} × {} (at least {} in \
                 all)",
                fmt_size(budget),
                fmt_size(dense_bytes),
                fmt_size(reserve_bytes),
                n_sparse_layers,
                fmt_size(slot_bytes),
                fmt_size(need)
            )));
        }
        let fit = ((budget - dense_bytes - reserve_bytes) / slot_bytes) as usize;
        Ok(DevicePlan {
            budget,
            dense_bytes,
            reserve_bytes,
            slot_bytes,
            n_slots: fit.min(n_experts_total),
            n_experts_total,
            experts_bytes,
            policy,
            ram_cache: None,
        })
    }

    /// The fraction of all experts the cache holds.
    pub fn fraction(&self) -> f64 {
        self.n_slots as f64 / self.n_experts_total.max(1) as f64
    }

    /// A human-readable account (`--explain-placement`).
    pub fn explain(&self) -> String {
        let mut s = format!("placement under --vram-budget {}\n", fmt_size(self.budget));
        s += &format!(
            "  dense weights   {:>12}  resident in VRAM\n",
            fmt_size(self.dense_bytes)
        );
        s += &format!(
            "  reserve         {:>12}  KV cache, activations, prefill tiles\n",
            fmt_size(self.reserve_bytes)
        );
        s += &format!(
            "  expert cache    {:>12}  {} slots of {} in one VMM reservation ({:.1}% of {} \
             experts), per-layer quotas, policy {}\n",
            fmt_size(self.n_slots as u64 * self.slot_bytes),
            self.n_slots,
            fmt_size(self.slot_bytes),
            100.0 * self.fraction(),
            self.n_experts_total,
            self.policy.name()
        );
        match &self.ram_cache {
            None => {
                s += &format!(
                    "  host RAM        {:>12}  every expert, page-locked, copied in on a miss\n",
                    fmt_size(self.experts_bytes)
                );
            }
            Some(r) => {
                s += &format!(
                    "  RAM cache       {:>12}  {} slots of {} ({:.1}% of {} experts) under \
                     --ram-budget {}, page-locked, copied in on a miss in VRAM, policy {}\n",
                    fmt_size(r.n_slots as u64 * r.slot_bytes),
                    r.n_slots,
                    fmt_size(r.slot_bytes),
                    100.0 * r.n_slots as f64 / self.n_experts_total.max(1) as f64,
                    self.n_experts_total,
                    fmt_size(r.ram_budget),
                    self.policy.name()
                );
                s += &format!(
                    "  on disk         {:>12}  experts read from the model file on a miss in RAM\n",
                    fmt_size(self.experts_bytes)
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_split_slots_evenly_over_sparse_layers() {
        let m = SlotMap::new(&[false, true, true, true], 8, 10, PolicyKind::Lru).unwrap();
        assert_eq!(m.quota(0), 0);
        assert_eq!(
            (m.quota(1), m.quota(2), m.quota(3)),
            (4, 3, 3),
            "remainder to the first layers"
        );
        assert_eq!(m.n_slots(), 10);
        // A layer never holds more slots than experts.
        let m = SlotMap::new(&[true, true], 4, 100, PolicyKind::Lru).unwrap();
        assert_eq!((m.quota(0), m.quota(1), m.n_slots()), (4, 4, 8));
        assert!(SlotMap::new(&[true, true, true], 8, 2, PolicyKind::Lru).is_err());
        assert!(SlotMap::new(&[false], 8, 2, PolicyKind::Lru).is_err());
    }

    #[test]
    fn hits_stay_misses_evict_outside_the_request() {
        let mut m = SlotMap::new(&[true, true], 6, 6, PolicyKind::Lru).unwrap();
        let a = m.assign(0, &[1, 2, 3]).unwrap();
        assert!(a.iter().all(|x| !x.hit));
        let slots: Vec<usize> = a.iter().map(|x| x.slot).collect();
        assert!(slots.iter().all(|&s| s < 3), "layer 0 owns slots 0..3");
        // 2 is a hit in the same slot; 4 evicts the least recently used of {1, 3} not
        // requested now: 1 (3 was touched after it).
        let b = m.assign(0, &[2, 4]).unwrap();
        assert_eq!(
            b[0],
            Assigned {
                expert: 2,
                slot: a[1].slot,
                hit: true,
                evicted: None,
            }
        );
        assert!(!b[1].hit);
        assert_eq!(b[1].evicted, Some(1), "the miss says whom it evicted");
        assert!(
            a.iter().all(|x| x.evicted.is_none()),
            "free slots evict nobody"
        );
        assert_eq!(b[1].slot, a[0].slot);
        assert_eq!(m.slot_of(0, 1), None);
        assert_eq!(m.slot_of(0, 4), Some(a[0].slot));
        assert_eq!(m.slot_of(0, 3), Some(a[2].slot));
        // Layer 1 is untouched by layer 0's traffic.
        let c = m.assign(1, &[1]).unwrap();
        assert!(!c[0].hit && (3..6).contains(&c[0].slot));
        let s = m.stats();
        assert_eq!((s.hits[0], s.misses[0], s.misses[1]), (1, 4, 1));
        assert_eq!(s.evictions, 1);
        m.reset_stats();
        assert_eq!(m.stats().total_misses(), 0);
        assert_eq!(m.slot_of(0, 2), Some(a[1].slot), "reset keeps residency");
    }

    #[test]
    fn a_lookup_counts_and_touches_but_places_nothing() {
        let mut m = SlotMap::new(&[true, true], 6, 6, PolicyKind::Lru).unwrap();
        m.assign(0, &[1, 2, 3]).unwrap();
        m.reset_stats();
        // Layer 0 holds 1, 2, 3 and has no free slot; 4 and 5 stay out, nothing moves.
        assert_eq!(m.lookup(0, &[4, 2, 5, 1]), vec![false, true, false, true]);
        assert_eq!(m.slot_of(0, 4), None);
        assert_eq!(m.slot_of(0, 5), None);
        // A free slot does not take a looked-up miss either (layer 1 is empty).
        assert_eq!(m.lookup(1, &[0]), vec![false]);
        assert_eq!(m.slot_of(1, 0), None);
        let s = m.stats();
        assert_eq!((s.hits[0], s.misses[0], s.misses[1]), (2, 2, 1));
        assert_eq!(s.evictions, 0);
        // The lookup told the policy: 2 and 1 were used after 3, so 3 goes first.
        let b = m.assign(0, &[4]).unwrap();
        assert_eq!(b[0].evicted, Some(3));
        // Out of range is a miss, not a panic.
        assert_eq!(m.lookup(0, &[6, 99]), vec![false, false]);
    }

    #[test]
    fn a_prefetch_places_without_counting_and_the_layer_then_hits() {
        let mut m = SlotMap::new(&[true], 8, 3, PolicyKind::Lru).unwrap();
        m.assign(0, &[0, 1, 2]).unwrap();
        // Predicted {2, 5}: 2 is resident; 5 evicts the least recently used of {0, 1}.
        let p = m.prefetch(0, &[2, 5]).unwrap();
        assert!(p[0].hit && !p[1].hit);
        assert_eq!(m.slot_of(0, 0), None);
        let s = m.stats();
        assert_eq!(
            (s.hits[0], s.misses[0], s.prefetched, s.evictions),
            (0, 3, 1, 1)
        );
        // The layer asks for {5, 1}: 5 hits in the slot the prefetch gave it.
        let a = m.assign(0, &[5, 1]).unwrap();
        assert_eq!((a[0].hit, a[0].slot), (true, p[1].slot));
        assert!(a[1].hit);
        assert_eq!((m.stats().hits[0], m.stats().misses[0]), (2, 3));
        assert!(m.prefetch(0, &[0, 1, 2, 3]).is_err(), "more than the quota");
    }

    #[test]
    fn requests_are_checked() {
        let mut m = SlotMap::new(&[true], 8, 2, PolicyKind::LfuAging).unwrap();
        assert!(m.assign(0, &[0, 1, 2]).is_err(), "more than the quota");
        assert!(m.assign(0, &[3, 3]).is_err(), "duplicate");
        assert!(m.assign(0, &[8]).is_err(), "out of range");
        assert!(m.assign(1, &[0]).is_err(), "no such layer");
        m.assign(0, &[0, 1]).unwrap();
        m.invalidate(m.slot_of(0, 1).unwrap());
        assert_eq!(m.slot_of(0, 1), None);
        assert!(!m.assign(0, &[1]).unwrap()[0].hit);
    }

    #[test]
    fn every_expert_of_a_long_random_run_is_where_the_map_says() {
        // A model of the slot contents checked against the map after every request.
        let (layers, n, slots) = (3, 16, 11);
        for kind in [PolicyKind::Lru, PolicyKind::LfuAging] {
            let mut m = SlotMap::new(&vec![true; layers], n, slots, kind).unwrap();
            let mut content: Vec<Option<(usize, usize)>> = vec![None; m.n_slots()];
            let mut state = 0x1234_5678_9abc_def0u64;
            for _ in 0..2000 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let l = (state % layers as u64) as usize;
                let k = 1 + (state >> 8) as usize % m.quota(l);
                let mut want: Vec<usize> = Vec::new();
                let mut s = state >> 16;
                while want.len() < k {
                    let e = (s % n as u64) as usize;
                    s = s.rotate_left(7) ^ 0x9E37_79B9_7F4A_7C15;
                    if !want.contains(&e) {
                        want.push(e);
                    }
                }
                for a in m.assign(l, &want).unwrap() {
                    if a.hit {
                        assert_eq!(content[a.slot], Some((l, a.expert)));
                    }
                    content[a.slot] = Some((l, a.expert));
                }
                for (slot, c) in content.iter().enumerate() {
                    if let Some((cl, ce)) = *c {
                        assert_eq!(m.slot_of(cl, ce), Some(slot));
                    }
                }
            }
        }
    }

    #[test]
    fn plan_refuses_budgets_below_one_slot_per_layer() {
        let gib = 1u64 << 30;
        let p = DevicePlan::new(
            8 * gib,
            gib,
            gib / 2,
            3 << 20,
            48,
            6144,
            16 * gib,
            PolicyKind::Lru,
        )
        .unwrap();
        assert_eq!(p.n_slots, ((6 * gib + gib / 2) / (3 << 20)) as usize);
        assert!(p.explain().contains("expert cache"));
        let e = DevicePlan::new(gib, gib, 0, 3 << 20, 48, 6144, 16 * gib, PolicyKind::Lru)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small"), "{e}");
        // Never more slots than experts.
        let p =
            DevicePlan::new(64 * gib, gib, 0, 3 << 20, 2, 16, 48 << 20, PolicyKind::Lru).unwrap();
        assert_eq!(p.n_slots, 16);
    }
}
