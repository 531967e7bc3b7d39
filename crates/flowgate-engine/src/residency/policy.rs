//! Eviction policies for expert caches: [`Lru`] (the default) and [`LfuAging`].
//!
//! Keys are dense expert ids (`layer * n_experts + expert`), so a policy keeps its state in flat
//! arrays indexed by key rather than in hash maps: with a few thousand experts a victim scan is a
//! few microseconds, negligible next to the millisecond it takes to bring an expert in.
//!
//! - **LRU** evicts the expert unused for the longest time. Good when routing drifts slowly.
//! - **LFU with aging** evicts the expert used least often, counting uses with a decay: every
//!   `n_keys` accesses all counts are halved, so an expert that was hot long ago does not stay
//!   forever. Frequencies are kept for experts that are *not* resident too, so an expert that is
//!   evicted and comes back keeps its history. It resists scans (a burst of one-off experts does
//!   not flush the hot set), which suits MoE routers with skewed expert popularity. Ties go to
//!   the *most* recently used: when a layer loops over more experts than it has slots, all with
//!   the same count (a router that always picks the same experts), evicting the newest keeps a
//!   stable subset resident, where LRU would evict each expert just before it is needed again
//!   and never hit.

use crate::error::{EngineError, Result};

/// Which policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyKind {
    #[default]
    Lru,
    LfuAging,
}

impl PolicyKind {
    /// `lru` or `lfu`.
    pub fn parse(s: &str) -> Result<PolicyKind> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "lfu" | "lfu-aging" => Ok(PolicyKind::LfuAging),
            _ => Err(EngineError::Invalid(format!(
                "unknown cache policy '{s}' (expected lru or lfu)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::LfuAging => "lfu",
        }
    }

    /// A policy of this kind over `n_keys` keys.
    pub fn build(self, n_keys: usize) -> Box<dyn Policy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new(n_keys)),
            PolicyKind::LfuAging => Box::new(LfuAging::new(n_keys)),
        }
    }
}

/// What a cache tells its policy, and what it asks.
pub trait Policy: Send {
    fn kind(&self) -> PolicyKind;
    /// `key` was accessed (a hit, or a miss that is being brought in).
    fn touch(&mut self, key: usize);
    /// The key to evict among `candidates` (resident and not in use), or `None` if empty.
    fn victim(&mut self, candidates: &[usize]) -> Option<usize>;
    /// `key` is held by the tier above now (copied up to VRAM): the next victim unless it is
    /// touched again. Keeps a RAM tier from holding what VRAM holds.
    fn demote(&mut self, key: usize);
}

/// Least recently used.
pub struct Lru {
    clock: u64,
    last: Vec<u64>,
}

impl Lru {
    pub fn new(n_keys: usize) -> Lru {
        Lru {
            clock: 0,
            last: vec![0; n_keys],
        }
    }
}

impl Policy for Lru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }

    fn touch(&mut self, key: usize) {
        self.clock += 1;
        if let Some(t) = self.last.get_mut(key) {
            *t = self.clock;
        }
    }

    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .min_by_key(|&k| (self.last.get(k).copied().unwrap_or(0), k))
    }

    fn demote(&mut self, key: usize) {
        if let Some(t) = self.last.get_mut(key) {
            *t = 0;
        }
    }
}

/// Least frequently used, counts halved every `period` accesses.
pub struct LfuAging {
    clock: u64,
    period: u64,
    freq: Vec<f32>,
    last: Vec<u64>,
}

impl LfuAging {
    pub fn new(n_keys: usize) -> LfuAging {
        LfuAging::with_period(n_keys, n_keys.max(1) as u64)
    }

    /// Ages (halves every count) each `period` accesses.
    pub fn with_period(n_keys: usize, period: u64) -> LfuAging {
        LfuAging {
            clock: 0,
            period: period.max(1),
            freq: vec![0.0; n_keys],
            last: vec![0; n_keys],
        }
    }
}

impl Policy for LfuAging {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LfuAging
    }

    fn touch(&mut self, key: usize) {
        self.clock += 1;
        if self.clock.is_multiple_of(self.period) {
            for f in &mut self.freq {
                *f *= 0.5;
            }
        }
        if let (Some(f), Some(t)) = (self.freq.get_mut(key), self.last.get_mut(key)) {
            *f += 1.0;
            *t = self.clock;
        }
    }

    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        let f = |k: usize| self.freq.get(k).copied().unwrap_or(0.0);
        let t = |k: usize| self.last.get(k).copied().unwrap_or(0);
        candidates
            .iter()
            .copied()
            .min_by(|&a, &b| f(a).total_cmp(&f(b)).then(t(b).cmp(&t(a))).then(a.cmp(&b)))
    }

    fn demote(&mut self, key: usize) {
        // No uses, and first among equals (ties go to the most recent).
        if let (Some(f), Some(t)) = (self.freq.get_mut(key), self.last.get_mut(key)) {
            *f = 0.0;
            *t = u64::MAX;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demoted_key_goes_first_until_touched_again() {
        for mut p in [PolicyKind::Lru.build(8), PolicyKind::LfuAging.build(8)] {
            for k in [1, 2, 3, 1, 2, 3, 4] {
                p.touch(k);
            }
            let name = p.kind().name();
            let v = p.victim(&[1, 2, 3, 4]).unwrap();
            assert_ne!(v, 3, "{name}");
            p.demote(3);
            assert_eq!(p.victim(&[1, 2, 3, 4]), Some(3), "{name}");
            p.touch(3);
            p.touch(3);
            assert_eq!(p.victim(&[1, 2, 3, 4]), Some(v), "{name}: touched again");
        }
    }

    /// Runs an access stream through a cache of `cap` keys managed by `p`; returns the hits.
    fn simulate(p: &mut dyn Policy, cap: usize, stream: &[usize]) -> usize {
        let mut resident: Vec<usize> = Vec::new();
        let mut hits = 0;
        for &k in stream {
            if resident.contains(&k) {
                hits += 1;
            } else {
                if resident.len() == cap {
                    let v = p.victim(&resident).unwrap();
                    resident.retain(|&r| r != v);
                }
                resident.push(k);
            }
            p.touch(k);
        }
        hits
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut p = Lru::new(8);
        for k in [1, 2, 3, 1] {
            p.touch(k);
        }
        assert_eq!(p.victim(&[1, 2, 3]), Some(2));
        p.touch(2);
        assert_eq!(p.victim(&[1, 2, 3]), Some(3));
        assert_eq!(p.victim(&[]), None);
        // A key never touched is the oldest.
        assert_eq!(p.victim(&[1, 5]), Some(5));
    }

    #[test]
    fn lfu_keeps_the_hot_set_through_a_scan() {
        // Keys 0..4 are hot; a one-off scan of 10..40 passes through a 4-key cache.
        let mut stream = Vec::new();
        for _ in 0..20 {
            stream.extend(0..4);
        }
        stream.extend(10..40);
        for _ in 0..5 {
            stream.extend(0..4);
        }
        let lru_hits = simulate(&mut Lru::new(64), 4, &stream);
        let lfu_hits = simulate(&mut LfuAging::new(64), 4, &stream);
        // Both: 4 cold misses, then 76 hits, then 30 scan misses. LRU loses the whole hot set in
        // the scan and misses its 4 keys once more after it (16 of the last 20 hit). LFU gives
        // up one hot key to the first scanned key, then cycles the scan through that one slot
        // (a scanned key has count 1, the hot ones ~12), so only that key misses after the scan.
        assert_eq!(lru_hits, 76 + 16);
        assert_eq!(lfu_hits, 76 + 19);
        assert!(lfu_hits > lru_hits);
    }

    #[test]
    fn lfu_aging_lets_an_old_favourite_go() {
        let mut p = LfuAging::with_period(8, 4);
        for _ in 0..40 {
            p.touch(0);
        }
        // Key 0 goes cold; key 1 is used steadily. After enough periods 0's count decays below.
        for _ in 0..40 {
            p.touch(1);
        }
        assert_eq!(p.victim(&[0, 1]), Some(0));
        // Without aging (a huge period) key 0 would still be kept.
        let mut q = LfuAging::with_period(8, u64::MAX);
        for _ in 0..40 {
            q.touch(0);
        }
        for _ in 0..39 {
            q.touch(1);
        }
        assert_eq!(q.victim(&[0, 1]), Some(1));
    }

    #[test]
    fn lfu_keeps_a_stable_subset_of_a_loop_lru_cycles() {
        // 8 keys accessed in a loop through a 6-key cache (a router that always picks the same
        // 8 experts of a layer with 6 slots). After the first pass LRU hits nothing; LFU keeps
        // 5 of the 8 resident (one slot turns over) and hits 5 per pass.
        let stream: Vec<usize> = (0..10).flat_map(|_| 0..8).collect();
        assert_eq!(simulate(&mut Lru::new(8), 6, &stream), 0);
        let lfu = simulate(&mut LfuAging::with_period(8, u64::MAX), 6, &stream);
        assert_eq!(lfu, 9 * 5);
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!(PolicyKind::parse("LRU").unwrap(), PolicyKind::Lru);
        assert_eq!(PolicyKind::parse("lfu").unwrap(), PolicyKind::LfuAging);
        assert!(PolicyKind::parse("arc").is_err());
        for k in [PolicyKind::Lru, PolicyKind::LfuAging] {
            assert_eq!(k.build(4).kind(), k);
            assert_eq!(PolicyKind::parse(k.name()).unwrap(), k);
        }
    }
}
