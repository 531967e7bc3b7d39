//! [`ExpertSum`]: one token through several MoE experts on the CPU, `Σ w_e · down_e(silu(gate_e
//! x) · up_e x)`, as a [`TeamJob`] of two phases:
//!
//! 1. blocks of rows of one expert's gate and up, each chunk writing its slice of
//!    `silu(g) · u` (gate and up rows of one chunk read the same activations while they are in
//!    cache);
//! 2. after `between` quantises each expert's intermediate vector once, blocks of rows of one
//!    expert's down; `finish` sums the experts' outputs with the routing weights (experts in
//!    the order given, as the one-expert-at-a-time path sums them).
//!
//! Each chunk reads one contiguous run of one matrix: a down chunk used to take 32 rows of
//! every expert in turn (the reads hopping between matrices every 14 KB), which ran 30–50%
//! slower than the same rows read matrix by matrix on the 2-core VM (moe30b shapes, one
//! worker). `FLOWGATE_CPU_CHUNK_ROWS=gate_up,down` sets the chunk sizes (measuring).
//!
//! Two synchronisations per token and layer instead of one per matrix, and no rayon wake-ups:
//! this is what `--cpu-experts` runs while the GPU copies and computes the other experts.
//! Arithmetic matches [`super::CpuBackend`]'s `swiglu` (same quantised activations, same dot
//! kernels, same SiLU formula, same order of the weighted sum), so results are the same to the
//! last bit.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::kernels::{rows_dot, OwnedAct};
use super::team::TeamJob;
use super::CpuWeight;

/// Chunks per worker and phase that a job aims at: enough for the team to even out workers
/// of unequal speed (on the H100 box, 12 threads computing at once ran 1.5–2× apart), few
/// enough that each chunk's fixed cost stays small (single-threaded, 16-row chunks took ~30%
/// longer than 256-row ones on the same rows: each chunk starts its own streams).
const CHUNKS_PER_WORKER: usize = 4;
/// Bounds on the rows of gate (and as many of up) per chunk of phase 1, and of down per chunk
/// of phase 2.
const MIN_GATE_UP_ROWS: usize = 16;
const MIN_DOWN_ROWS: usize = 64;
/// The most rows a chunk takes (its results live on the worker's stack).
const MAX_ROWS: usize = 256;

/// Rows per chunk (gate and up, down) for `j` experts of `ffn × hidden` on the default team
/// ([`super::team::Team::default_threads`] workers): about [`CHUNKS_PER_WORKER`] chunks per
/// worker and phase, in multiples of 16 rows. On the H100 box (12 workers, moe30b) the fixed
/// 16/64 this replaces was the best of the fixed sizes for one expert, and 11–21% slower than
/// these for 2–8 (cold experts; docs/benchmarks.md, session 20).
/// `FLOWGATE_CPU_CHUNK_ROWS=gate_up,down` fixes them (measuring).
fn chunk_rows(j: usize, ffn: usize, hidden: usize) -> (usize, usize) {
    static WORKERS: OnceLock<usize> = OnceLock::new();
    let workers = *WORKERS.get_or_init(super::team::Team::default_threads);
    static FIXED: OnceLock<Option<(usize, usize)>> = OnceLock::new();
    let fixed = *FIXED.get_or_init(|| {
        std::env::var("FLOWGATE_CPU_CHUNK_ROWS")
            .ok()
            .and_then(|v| {
                let (a, b) = v.split_once(',')?;
                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
            })
            .filter(|&(a, b): &(usize, usize)| {
                (1..=MAX_ROWS).contains(&a) && (1..=MAX_ROWS).contains(&b)
            })
    });
    fixed.unwrap_or_else(|| rows_per_chunk(j, ffn, hidden, workers))
}

/// [`chunk_rows`] without the override: for `workers`.
fn rows_per_chunk(j: usize, ffn: usize, hidden: usize, workers: usize) -> (usize, usize) {
    let per = |rows: usize, min: usize| {
        (rows * j)
            .div_ceil(CHUNKS_PER_WORKER * workers.max(1))
            .next_multiple_of(16)
            .clamp(min, MAX_ROWS)
    };
    (per(ffn, MIN_GATE_UP_ROWS), per(hidden, MIN_DOWN_ROWS))
}

/// What to do with the sum (or the first failure) once the job is done.
pub type Done = Box<dyn Fn(Result<Vec<f32>, String>) + Send + Sync>;

/// One token through `experts` (gate, up, down; routing weight) on a [`super::team::Team`].
pub struct ExpertSum {
    experts: Vec<([CpuWeight; 3], f32)>,
    ffn: usize,
    hidden: usize,
    /// The token in gate/up's activation format.
    x: OwnedAct,
    /// `silu(gate · x) · (up · x)` per expert (`ffn` each), f32 bits.
    h: Vec<AtomicU32>,
    /// `h` quantised for each expert's down matrix (set between the phases).
    hq: OnceLock<Vec<OwnedAct>>,
    /// Each expert's output (`hidden` each), f32 bits.
    ys: Vec<AtomicU32>,
    /// Rows per chunk: gate and up, down.
    rows: (usize, usize),
    failure: Mutex<Option<String>>,
    /// Declared after `experts`, so dropped after them: what the completion captures (a
    /// lease on the memory the weights view) outlives the weights.
    done: Done,
}

impl ExpertSum {
    /// `x` (`hidden` floats) through `experts`; every expert's gate and up are `ffn × hidden`
    /// and its down `hidden × ffn` (the caller checked the shapes when it made the weights).
    pub fn new(experts: Vec<([CpuWeight; 3], f32)>, x: &[f32], done: Done) -> ExpertSum {
        let (ffn, hidden) = experts
            .first()
            .map_or((0, x.len()), |([g, _, _], _)| (g.rows, g.cols));
        let dtype = experts
            .first()
            .map_or(flowgate_formats::DType::F32, |e| e.0[0].t.dtype);
        ExpertSum {
            x: OwnedAct::new(dtype, x),
            h: (0..experts.len() * ffn)
                .map(|_| AtomicU32::new(0))
                .collect(),
            hq: OnceLock::new(),
            ys: (0..experts.len() * hidden)
                .map(|_| AtomicU32::new(0))
                .collect(),
            rows: chunk_rows(experts.len(), ffn, hidden),
            experts,
            ffn,
            hidden,
            failure: Mutex::new(None),
            done,
        }
    }

    /// The same job in chunks of `gate_up` and `down` rows (at most [`MAX_ROWS`]).
    #[cfg(test)]
    fn with_rows(mut self, gate_up: usize, down: usize) -> ExpertSum {
        self.rows = (gate_up.clamp(1, MAX_ROWS), down.clamp(1, MAX_ROWS));
        self
    }

    /// Chunks of one expert in phase 1 (gate and up) and in phase 2 (down).
    fn per_expert(&self) -> (usize, usize) {
        (
            self.ffn.div_ceil(self.rows.0),
            self.hidden.div_ceil(self.rows.1),
        )
    }
}

fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

impl TeamJob for ExpertSum {
    fn phases(&self) -> usize {
        2
    }

    fn chunks(&self, phase: usize) -> usize {
        let (gu, down) = self.per_expert();
        match phase {
            0 => self.experts.len() * gu,
            _ => self.experts.len() * down,
        }
    }

    fn run(&self, phase: usize, chunk: usize) {
        let (gu, down) = self.per_expert();
        if phase == 0 {
            let (e, c) = (chunk / gu, chunk % gu);
            let r = c * self.rows.0..((c + 1) * self.rows.0).min(self.ffn);
            let [g, u, _] = &self.experts[e].0;
            let n = r.len();
            let (mut gv, mut uv) = ([0f32; MAX_ROWS], [0f32; MAX_ROWS]);
            let src = self.x.src();
            rows_dot(&g.matrix(), r.clone(), &src, &mut gv[..n]);
            rows_dot(&u.matrix(), r.clone(), &src, &mut uv[..n]);
            for (i, row) in r.enumerate() {
                let v = silu_mul(gv[i], uv[i]);
                self.h[e * self.ffn + row].store(v.to_bits(), Ordering::Relaxed);
            }
        } else {
            let Some(hq) = self.hq.get() else {
                self.failed("the intermediate vectors were not quantised".into());
                return;
            };
            let (e, c) = (chunk / down, chunk % down);
            let r = c * self.rows.1..((c + 1) * self.rows.1).min(self.hidden);
            let mut out = [0f32; MAX_ROWS];
            let n = r.len();
            rows_dot(
                &self.experts[e].0[2].matrix(),
                r.clone(),
                &hq[e].src(),
                &mut out[..n],
            );
            for (row, &v) in r.zip(&out[..n]) {
                self.ys[e * self.hidden + row].store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }

    fn between(&self, _phase: usize) {
        let hq = self
            .experts
            .iter()
            .enumerate()
            .map(|(e, (w, _))| {
                let h: Vec<f32> = self.h[e * self.ffn..(e + 1) * self.ffn]
                    .iter()
                    .map(|v| f32::from_bits(v.load(Ordering::Relaxed)))
                    .collect();
                OwnedAct::new(w[2].t.dtype, &h)
            })
            .collect();
        let _ = self.hq.set(hq);
    }

    fn finish(&self) {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        (self.done)(match failure {
            Some(f) => Err(f),
            None => {
                // Σ w_e · y_e, experts in order (as the one-at-a-time path adds them).
                // SAFETY: every chunk has completed (the team runs `finish` after the last
                // one, ordered by its AcqRel counter), so nothing writes `ys` any more; an
                // AtomicU32 has u32's (and so f32's) size and alignment. Read as plain floats,
                // the sum vectorises (per-element atomic loads do not).
                let ys: &[f32] = unsafe {
                    std::slice::from_raw_parts(self.ys.as_ptr().cast::<f32>(), self.ys.len())
                };
                let mut y = vec![0f32; self.hidden];
                for (e, (_, w)) in self.experts.iter().enumerate() {
                    let ye = &ys[e * self.hidden..(e + 1) * self.hidden];
                    for (a, v) in y.iter_mut().zip(ye) {
                        *a += w * v;
                    }
                }
                Ok(y)
            }
        });
    }

    fn failed(&self, msg: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::super::team::Team;
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{swiglu, Backend, SwiGluJob};
    use crate::weights::HostTensor;
    use flowgate_formats::DType;
    use flowgate_io::AlignedBuf;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    /// Random `rows × cols` weights of `dtype` (random block bytes with sane nonzero scales).
    fn weight(name: &str, dtype: DType, rows: usize, cols: usize, seed: u64) -> CpuWeight {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rows * cols;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => (0..n)
                .flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes())
                .collect(),
            DType::F16 => (0..n)
                .flat_map(|_| half::f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
                .collect(),
            _ => {
                let ts = dtype.type_size();
                let mut v: Vec<u8> = (0..n / dtype.block_size() * ts)
                    .map(|_| rng.random())
                    .collect();
                for b in v.chunks_exact_mut(ts) {
                    let mut f16 = |at: usize, v: f32| {
                        b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
                    };
                    match dtype {
                        DType::Q8_0 => f16(0, rng.random_range(1e-3..4e-2)),
                        DType::Q4K => {
                            f16(0, rng.random_range(1e-4..2e-3));
                            f16(2, rng.random_range(1e-4..2e-3));
                        }
                        _ => unreachable!("not used here"),
                    }
                }
                v
            }
        };
        let mut buf = AlignedBuf::zeroed(bytes.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(&bytes);
        let t = HostTensor::new(name, dtype, vec![rows, cols], Arc::new(buf)).unwrap();
        CpuBackend.weight(t).unwrap()
    }

    /// About four chunks per worker and phase, in multiples of 16 rows, within the bounds
    /// (moe30b's experts, 768 × 2048, on 12 workers and on 1).
    #[test]
    fn chunks_follow_the_experts_and_the_team() {
        assert_eq!(rows_per_chunk(1, 768, 2048, 12), (16, 64));
        assert_eq!(rows_per_chunk(2, 768, 2048, 12), (32, 96));
        assert_eq!(rows_per_chunk(4, 768, 2048, 12), (64, 176));
        assert_eq!(rows_per_chunk(8, 768, 2048, 12), (128, 256));
        assert_eq!(rows_per_chunk(1, 768, 2048, 1), (192, 256));
        // Never below the floor, never above MAX_ROWS, whatever the team.
        for j in 1..=16 {
            for w in [1, 2, 12, 64] {
                let (a, b) = rows_per_chunk(j, 768, 2048, w);
                assert!((MIN_GATE_UP_ROWS..=MAX_ROWS).contains(&a), "{j} {w}: {a}");
                assert!((MIN_DOWN_ROWS..=MAX_ROWS).contains(&b), "{j} {w}: {b}");
                assert!(a % 16 == 0 && b % 16 == 0);
            }
        }
    }

    /// The team's fused sum equals the one-expert-at-a-time path bit for bit, for K-quant,
    /// Q8_0 and float experts, in the chunk layouts of a large and a one-worker team, the
    /// smallest chunks, and a ragged layout (row counts that do not divide ffn or hidden).
    #[test]
    fn expert_sum_matches_swiglu_exactly() {
        let team = Team::new(3, Duration::from_millis(1)).unwrap();
        for (dtype, ffn, hidden) in [
            (DType::Q4K, 768, 512),
            (DType::Q8_0, 96, 320),
            (DType::F32, 40, 72),
            (DType::F16, 72, 40),
        ] {
            let experts: Vec<([CpuWeight; 3], f32)> = (0..3)
                .map(|e| {
                    let s = 10 * e as u64;
                    (
                        [
                            weight("g", dtype, ffn, hidden, s + 1),
                            weight("u", dtype, ffn, hidden, s + 2),
                            weight("d", dtype, hidden, ffn, s + 3),
                        ],
                        0.2 + 0.3 * e as f32,
                    )
                })
                .collect();
            let x: Vec<f32> = (0..hidden)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0)
                .collect();
            let mut want = vec![0f32; hidden];
            for ([g, u, d], w) in &experts {
                let y = swiglu(
                    &CpuBackend,
                    &SwiGluJob {
                        gate: g,
                        up: u,
                        down: d,
                        x: &x,
                        n: 1,
                    },
                )
                .unwrap();
                for (a, v) in want.iter_mut().zip(&y) {
                    *a += w * v;
                }
            }
            assert!(want.iter().any(|v| *v != 0.0), "{dtype}: a zero reference");
            for (gate_up, down) in [
                rows_per_chunk(3, ffn, hidden, 12),
                rows_per_chunk(3, ffn, hidden, 1),
                (MIN_GATE_UP_ROWS, MIN_DOWN_ROWS),
                (7, 5),
            ] {
                let slot = Arc::new((Mutex::new(None), Condvar::new()));
                let s2 = slot.clone();
                let job = ExpertSum::new(
                    experts.clone(),
                    &x,
                    Box::new(move |r| {
                        *s2.0.lock().unwrap() = Some(r);
                        s2.1.notify_all();
                    }),
                )
                .with_rows(gate_up, down);
                team.submit(Arc::new(job));
                let mut g = slot.0.lock().unwrap();
                while g.is_none() {
                    g = slot.1.wait(g).unwrap();
                }
                let got = g.take().unwrap().unwrap();
                assert_eq!(got, want, "{dtype}, chunks of {gate_up}/{down} rows");
            }
        }
    }
}
