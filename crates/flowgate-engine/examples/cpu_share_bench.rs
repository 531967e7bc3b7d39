//! The CPU expert share (`--cpu-experts`) on a team of spinning workers, alone: where one job's
//! time goes (built, first chunk started, second phase started, done; medians of 60) for j =
//! 1, 2, 3, 4, 8 experts of moe30b's shape (Q4_K, 768 × 2048, random, 256 distinct experts so
//! that reads are cold), against one thread computing the same experts matrix by matrix.
//!
//! cargo run --release -p flowgate-engine --example cpu_share_bench -- [WORKERS]
//! (FLOWGATE_CPU_CHUNK_ROWS and FLOWGATE_CPU_PREFETCH change the chunking and the prefetch;
//! CSB_EXPERTS=8 reuses 8 experts, warm in the cache; CSB_J=1,2,… picks the job sizes;
//! CSB_GAP=µs sets the pause between jobs; CSB_PAR=N then also runs N threads at once, each
//! computing whole experts alone, the team's ceiling on this machine; CSB_MICRO=1 instead
//! times one thread's gate and up products whole against in 16-row calls.)
use flowgate_engine::backend::cpu::experts::ExpertSum;
use flowgate_engine::backend::cpu::kernels::{rows_dot, OwnedAct};
use flowgate_engine::backend::cpu::team::{Team, TeamJob};
use flowgate_engine::backend::cpu::{CpuBackend, CpuWeight};
use flowgate_engine::backend::Backend;
use flowgate_engine::weights::HostTensor;
use flowgate_formats::DType;
use flowgate_io::AlignedBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn weight(rows: usize, cols: usize, seed: u64) -> CpuWeight {
    let n = rows * cols / 256 * 144;
    let mut buf = AlignedBuf::zeroed(n).unwrap();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (s >> 33) as u8;
        if i % 144 < 4 {
            *b = if i % 2 == 0 { 0x10 } else { 0x0c };
        }
    }
    let t = HostTensor::new("w", DType::Q4K, vec![rows, cols], Arc::new(buf)).unwrap();
    CpuBackend.weight(t).unwrap()
}

struct Probe {
    inner: ExpertSum,
    t0: Instant,
    first: [AtomicU64; 2],
    end: AtomicU64,
    done: AtomicBool,
}
impl TeamJob for Probe {
    fn phases(&self) -> usize {
        self.inner.phases()
    }
    fn chunks(&self, p: usize) -> usize {
        self.inner.chunks(p)
    }
    fn run(&self, p: usize, c: usize) {
        // Only the first chunk of a phase writes (a write per chunk would pull the line the
        // main thread spins on away from it every chunk).
        let first = &self.first[p.min(1)];
        if first.load(Ordering::Relaxed) == u64::MAX {
            first.fetch_min(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        self.inner.run(p, c)
    }
    fn between(&self, p: usize) {
        self.inner.between(p)
    }
    fn finish(&self) {
        self.inner.finish();
        self.end
            .store(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
    }
    fn failed(&self, m: String) {
        self.inner.failed(m)
    }
}

/// One expert on this thread, matrix by matrix (gate, up, then down on the quantised
/// product), as the one-expert-at-a-time path computes it.
fn one_expert_alone([g, u, d]: &[CpuWeight; 3], x: &[f32]) {
    let xa = OwnedAct::new(DType::Q4K, x);
    let mut o = vec![0f32; g.matrix().rows];
    rows_dot(&g.matrix(), 0..o.len(), &xa.src(), &mut o);
    rows_dot(&u.matrix(), 0..o.len(), &xa.src(), &mut o);
    let ha = OwnedAct::new(DType::Q4K, &o);
    let mut y = vec![0f32; d.matrix().rows];
    rows_dot(&d.matrix(), 0..y.len(), &ha.src(), &mut y);
    std::hint::black_box(&y);
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // CSB_EXPERTS=N: fewer distinct experts (N ≤ 8: the same ones again, warm in cache).
    let n_exp: usize = std::env::var("CSB_EXPERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let (ffn, hidden) = (768, 2048);
    let experts: Vec<[CpuWeight; 3]> = (0..n_exp as u64)
        .map(|e| {
            [
                weight(ffn, hidden, 3 * e),
                weight(ffn, hidden, 3 * e + 1),
                weight(hidden, ffn, 3 * e + 2),
            ]
        })
        .collect();
    let x: Vec<f32> = (0..hidden)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    if std::env::var("CSB_MICRO").is_ok() {
        // One thread: gate and up of 8 experts, as whole matrices, in 16-row calls of one
        // matrix at a time, and in 16-row calls alternating gate and up (the team's chunks).
        let xa = OwnedAct::new(DType::Q4K, &x);
        let mut o = vec![0f32; ffn];
        for round in 0..3 {
            for mode in 0..3 {
                let t0 = Instant::now();
                for [g, u, _] in experts.iter().take(8) {
                    match mode {
                        0 => {
                            rows_dot(&g.matrix(), 0..ffn, &xa.src(), &mut o);
                            rows_dot(&u.matrix(), 0..ffn, &xa.src(), &mut o);
                        }
                        1 => {
                            for w in [g, u] {
                                for r in (0..ffn).step_by(16) {
                                    rows_dot(&w.matrix(), r..r + 16, &xa.src(), &mut o[r..r + 16]);
                                }
                            }
                        }
                        _ => {
                            for r in (0..ffn).step_by(16) {
                                rows_dot(&g.matrix(), r..r + 16, &xa.src(), &mut o[r..r + 16]);
                                rows_dot(&u.matrix(), r..r + 16, &xa.src(), &mut o[r..r + 16]);
                            }
                        }
                    }
                }
                std::hint::black_box(&o);
                println!(
                    "round {round} mode {}: {:.0} us for 8 experts' gate and up",
                    ["whole", "16-row calls", "16-row calls, gate/up alternating"][mode],
                    t0.elapsed().as_secs_f64() * 1e6
                );
            }
        }
        return;
    }
    let team = Team::new(threads, Duration::from_millis(5)).unwrap();
    let mut k = 0usize;
    // CSB_GAP=µs between jobs (200: the decode thread's pace; 0: back to back).
    let gap: u64 = std::env::var("CSB_GAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let js: Vec<usize> = std::env::var("CSB_J")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3, 4, 8]);
    for j in js {
        let (mut tot, mut f0, mut f1, mut build) = (vec![], vec![], vec![], vec![]);
        for _ in 0..60 {
            let ws: Vec<([CpuWeight; 3], f32)> = (0..j)
                .map(|i| (experts[(k + i) % n_exp].clone(), 0.3))
                .collect();
            k += j;
            let t0 = Instant::now();
            let inner = ExpertSum::new(ws, &x, Box::new(|_r| {}));
            let b = t0.elapsed().as_nanos() as u64;
            let p = Arc::new(Probe {
                inner,
                t0,
                first: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
                end: AtomicU64::new(0),
                done: AtomicBool::new(false),
            });
            team.submit(p.clone());
            while !p.done.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            build.push(b as f64 / 1e3);
            f0.push(p.first[0].load(Ordering::Relaxed) as f64 / 1e3);
            f1.push(p.first[1].load(Ordering::Relaxed) as f64 / 1e3);
            tot.push(p.end.load(Ordering::Relaxed) as f64 / 1e3);
            if gap > 0 {
                std::thread::sleep(Duration::from_micros(gap));
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut st = Vec::new();
        for _ in 0..10 {
            let t0 = Instant::now();
            for i in 0..j {
                one_expert_alone(&experts[(k + i) % n_exp], &x);
            }
            k += j;
            st.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        println!("j={j} team {threads}: built {:.1} us, first chunk {:.1}, phase 2 at {:.1}, done {:.1} us | one thread alone {:.0} us",
            med(&mut build), med(&mut f0), med(&mut f1), med(&mut tot), med(&mut st));
    }
    // CSB_PAR=N: N threads at once, each computing experts alone (no team), cold: how one
    // core's speed holds up as more cores compute.
    if let Some(par) = std::env::var("CSB_PAR")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let experts = Arc::new(experts);
        let x = Arc::new(x);
        let hs: Vec<_> = (0..par)
            .map(|t| {
                let (experts, x) = (experts.clone(), x.clone());
                std::thread::spawn(move || {
                    let mut times = vec![];
                    let mut k = t * 4;
                    for _ in 0..40 {
                        let t0 = Instant::now();
                        for _ in 0..4 {
                            one_expert_alone(&experts[k % n_exp], &x);
                            k += 4 * par;
                        }
                        times.push(t0.elapsed().as_secs_f64() * 1e6 / 4.0);
                    }
                    times.sort_by(f64::total_cmp);
                    times[times.len() / 2]
                })
            })
            .collect();
        let per: Vec<f64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let mean = per.iter().sum::<f64>() / per.len() as f64;
        let slowest = per.iter().fold(0f64, |a, &b| a.max(b));
        let fastest = per.iter().fold(f64::MAX, |a, &b| a.min(b));
        println!(
            "{par} threads alone at once: {mean:.0} us an expert per thread ({:.1} GB/s per thread, {:.1} GB/s in all); fastest thread {fastest:.0} us, slowest {slowest:.0} us",
            2.654e6 / mean / 1e3,
            2.654e6 / mean / 1e3 * par as f64
        );
    }
}
