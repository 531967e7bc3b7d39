//! Choosing the next token from logits: greedy, or temperature sampling with top-k, top-p
//! (nucleus), min-p and a repeat penalty, from a seeded generator so runs are reproducible.
//!
//! Order of operations (llama.cpp's default chain): repeat penalty → top-k → top-p → min-p →
//! temperature → draw. A temperature of 0 (or below) is greedy: the arg-max after the penalty.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `p` (1.0: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely (0: off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recent tokens by this (1.0: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Arg-max decoding with no penalty.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks a token. `history` holds the tokens so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let Some(v) = l.get_mut(t as usize) {
                    if seen.insert(t) {
                        *v = if *v > 0.0 {
                            *v / c.repeat_penalty
                        } else {
                            *v * c.repeat_penalty
                        };
                    }
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&l);
        }
        // Candidates sorted by logit, descending (stable: lower id first on ties).
        let mut cand: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if cand.is_empty() {
            return argmax(&l);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.truncate(c.top_k);
        }
        let probs = softmax(&cand.iter().map(|x| x.1).collect::<Vec<_>>(), 1.0);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let probs = softmax(&cand.iter().map(|x| x.1).collect::<Vec<_>>(), 1.0);
            let floor = probs[0] * c.min_p;
            let keep = probs.iter().take_while(|&&p| p >= floor).count();
            cand.truncate(keep.max(1));
        }
        let probs = softmax(&cand.iter().map(|x| x.1).collect::<Vec<_>>(), c.temperature);
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest value (lowest index on ties; NaN never wins; 0 when nothing exceeds
/// −∞).
///
/// Greedy decoding runs it on every token over the whole vocabulary (128,256 logits for a
/// llama-3 vocabulary), while the GPU waits for the next step: a running (value, index) loop
/// is a chain of dependent compares (~107 µs on this CPU, 4% of an H100 decode step). Here
/// the maxima of 1024-value chunks come from 16 independent lanes (vectorised), then only the
/// best chunk is scanned for the first index holding its maximum.
pub fn argmax(v: &[f32]) -> u32 {
    const CHUNK: usize = 1024;
    const LANES: usize = 16;
    let chunk_max = |c: &[f32]| {
        let mut m = [f32::NEG_INFINITY; LANES];
        let mut it = c.chunks_exact(LANES);
        for block in &mut it {
            for (a, &x) in m.iter_mut().zip(block) {
                *a = a.max(x);
            }
        }
        it.remainder()
            .iter()
            .chain(&m)
            .fold(f32::NEG_INFINITY, |a, &x| a.max(x))
    };
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (k, c) in v.chunks(CHUNK).enumerate() {
        let m = chunk_max(c);
        if m > best.0 {
            best = (m, k);
        }
    }
    if best.0 == f32::NEG_INFINITY {
        return 0;
    }
    let start = best.1 * CHUNK;
    let c = &v[start..(start + CHUNK).min(v.len())];
    (start + c.iter().position(|&x| x == best.0).unwrap_or(0)) as u32
}

fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits
        .iter()
        .map(|&v| ((v - max) / temperature).exp())
        .collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: f32) -> SamplerConfig {
        SamplerConfig {
            temperature: t,
            ..SamplerConfig::greedy()
        }
    }

    /// The chunked argmax against the plain running-maximum loop, on random logits with
    /// ties, NaNs, infinities and lengths around the chunk and lane sizes.
    #[test]
    fn argmax_matches_running_maximum() {
        fn plain(v: &[f32]) -> u32 {
            let mut best = 0usize;
            let mut bv = f32::NEG_INFINITY;
            for (i, &x) in v.iter().enumerate() {
                if x > bv {
                    bv = x;
                    best = i;
                }
            }
            best as u32
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xA59);
        for len in [0usize, 1, 15, 16, 17, 1023, 1024, 1025, 3000, 128_256] {
            for case in 0..6 {
                let mut v: Vec<f32> = (0..len)
                    .map(|_| (rng.random_range(-8i32..8) as f32) * 0.5)
                    .collect();
                for x in v.iter_mut() {
                    match (case, rng.random_range(0..50)) {
                        (1, 0) => *x = f32::NAN,
                        (2, 0) => *x = f32::NEG_INFINITY,
                        (3, _) => *x = f32::NEG_INFINITY,
                        (4, 0) => *x = f32::INFINITY,
                        (5, _) => *x = f32::NAN,
                        _ => {}
                    }
                }
                assert_eq!(argmax(&v), plain(&v), "length {len}, case {case}");
            }
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_winner() {
        let mut c = SamplerConfig::greedy();
        c.repeat_penalty = 1.5;
        c.repeat_last_n = 8;
        let mut s = Sampler::new(c);
        // 3.0/1.5 = 2.0 < 2.9
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[1]), 3);
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_softmax() {
        let logits = [1.0f32, 0.0, 2.0, 0.5];
        let draw = |seed| {
            let mut c = cfg(1.0);
            c.seed = seed;
            let mut s = Sampler::new(c);
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert_ne!(a, draw(43));
        let p = softmax(&logits, 1.0);
        for (tok, &pt) in p.iter().enumerate() {
            let f = a.iter().filter(|&&t| t as usize == tok).count() as f32 / a.len() as f32;
            assert!((f - pt).abs() < 0.03, "token {tok}: {f} vs {pt}");
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_prunes() {
        let mut c = cfg(5.0);
        c.top_k = 1;
        let mut s = Sampler::new(c);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.9], &[]), 1);
        }
        let mut c = cfg(1.0);
        c.min_p = 0.5; // drops tokens with p < 0.5 * p_max
        let mut s = Sampler::new(c);
        for _ in 0..200 {
            let t = s.sample(&[5.0, 4.9, 0.0, -1.0], &[]);
            assert!(t == 0 || t == 1, "{t}");
        }
        let mut c = cfg(1.0);
        c.top_p = 0.5;
        let mut s = Sampler::new(c);
        for _ in 0..200 {
            assert_eq!(s.sample(&[3.0, 1.0, 0.5, 0.0], &[]), 0);
        }
    }
}
