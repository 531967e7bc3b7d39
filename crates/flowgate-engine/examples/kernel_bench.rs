// Micro benchmark of the CPU matmul kernels (no criterion).
//
//   cargo run --release -p flowgate-engine --example kernel_bench -- [threads] [quick]
//
// Reports, on a rayon pool of `threads` threads (default 2):
// - matvec (n_tokens = 1) throughput in GB/s of weight bytes for Q4_K/Q6_K/Q8_0/F16 matrices
//   shaped like Llama-3.2-1B's (8192×2048 FFN, 2048×8192 down, 128256×2048 output);
// - a matmul-only decode of a Llama-3.2-1B-shaped Q4_K model (16 layers of q,k,v,o,gate,up,
//   down, distinct weights so nothing stays in cache, plus the 128256×2048 output matrix):
//   tokens/s upper bound for decode;
// - the same model with a 64-token prompt (prefill tokens/s, matmuls only).
// Weights are random bytes with sane f16 scales; throughput does not depend on the values.
// "per busy thread-set" divides by the process's CPU time per thread instead of wall time: on
// a machine shared with other work it estimates what an idle machine would do (rayon's
// spinning workers count as busy, so it errs low).

use std::time::Instant;

use flowgate_engine::backend::cpu::kernels::{matmul_acts, simd_level, Activations, QMatrix};
use flowgate_formats::DType;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn weights(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = cols / dtype.block_size() * dtype.type_size();
    let mut v = vec![0u8; rows * rb];
    for c in v.chunks_mut(8) {
        let r = rng.next().to_le_bytes();
        c.copy_from_slice(&r[..c.len()]);
    }
    let d = half::f16::from_f32(0.01).to_le_bytes();
    let ts = dtype.type_size();
    if dtype.is_quantized() {
        for b in v.chunks_exact_mut(ts) {
            let at = if dtype == DType::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&d);
            if matches!(dtype, DType::Q4K | DType::Q5K | DType::Q4_1 | DType::Q5_1) {
                b[2..4].copy_from_slice(&d);
            }
        }
    } else if dtype == DType::F16 {
        for b in v.chunks_exact_mut(2) {
            b[1] &= 0x3b; // finite, |w| < 1
        }
    }
    v
}

fn acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// CPU seconds this process has used (user + system, from /proc; 0 where unavailable). On a
/// shared machine `bytes / cpu_seconds × threads` estimates the throughput of an idle one.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn matvec_gbs(rng: &mut Rng, dtype: DType, rows: usize, cols: usize, secs: f64) {
    let data = weights(rng, dtype, rows, cols);
    let w = QMatrix::new(dtype, rows, cols, &data).expect("shape");
    let x = acts(rng, cols);
    let mut y = vec![0f32; rows];
    let a = Activations::new(&x, cols, 1).expect("acts");
    matmul_acts(&w, &a, &mut y); // warm up, quantise
    let start = Instant::now();
    let cpu0 = cpu_secs();
    let mut iters = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        // A fresh Activations per call: quantisation is part of the measured cost.
        let a = Activations::new(&x, cols, 1).expect("acts");
        matmul_acts(&w, &a, &mut y);
        iters += 1;
    }
    let t = start.elapsed().as_secs_f64() / iters as f64;
    let cpu = (cpu_secs() - cpu0) / iters as f64 / rayon::current_num_threads() as f64;
    println!(
        "matvec {:>5} {:>6}×{:<5} {:>7.1} MB  {:>8.3} ms  {:>6.1} GB/s wall  {:>6.1} GB/s per busy thread-set",
        dtype.name(),
        rows,
        cols,
        data.len() as f64 / 1e6,
        t * 1e3,
        data.len() as f64 / t / 1e9,
        data.len() as f64 / cpu / 1e9
    );
}

/// `n`-token matmul throughput (prefill shape) in GMAC/s, quantisation included.
fn matmul_gmacs(rng: &mut Rng, dtype: DType, rows: usize, cols: usize, n: usize, secs: f64) {
    let data = weights(rng, dtype, rows, cols);
    let w = QMatrix::new(dtype, rows, cols, &data).expect("shape");
    let x = acts(rng, n * cols);
    let mut y = vec![0f32; n * rows];
    let a = Activations::new(&x, cols, n).expect("acts");
    matmul_acts(&w, &a, &mut y);
    let start = Instant::now();
    let cpu0 = cpu_secs();
    let mut iters = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        let a = Activations::new(&x, cols, n).expect("acts");
        matmul_acts(&w, &a, &mut y);
        iters += 1;
    }
    let t = start.elapsed().as_secs_f64() / iters as f64;
    let cpu = (cpu_secs() - cpu0) / iters as f64 / rayon::current_num_threads() as f64;
    let macs = (rows * cols * n) as f64;
    println!(
        "matmul {:>5} {:>6}×{:<5} n={n:<3} {:>8.3} ms  {:>6.1} GMAC/s wall  {:>6.1} GMAC/s per busy thread-set",
        dtype.name(),
        rows,
        cols,
        t * 1e3,
        macs / t / 1e9,
        macs / cpu / 1e9
    );
}

struct Layer {
    q: Vec<u8>,
    k: Vec<u8>,
    v: Vec<u8>,
    o: Vec<u8>,
    gate: Vec<u8>,
    up: Vec<u8>,
    down: Vec<u8>,
}

const HIDDEN: usize = 2048;
const FFN: usize = 8192;
const KV: usize = 512;
const VOCAB: usize = 128256;

/// Runs the matmuls of one forward pass over `n` tokens; returns (wall seconds, CPU seconds
/// per thread).
fn forward(dtype: DType, layers: &[Layer], out: &[u8], x: &[f32], n: usize) -> (f64, f64) {
    fn mat(dtype: DType, rows: usize, cols: usize, data: &[u8]) -> QMatrix<'_> {
        QMatrix::new(dtype, rows, cols, data).expect("shape")
    }
    let m = |rows, cols, data| mat(dtype, rows, cols, data);
    let mut q = vec![0f32; n * HIDDEN];
    let mut k = vec![0f32; n * KV];
    let mut v = vec![0f32; n * KV];
    let mut g = vec![0f32; n * FFN];
    let mut u = vec![0f32; n * FFN];
    let mut logits = vec![0f32; n.min(1) * VOCAB];
    let start = Instant::now();
    let cpu0 = cpu_secs();
    for l in layers {
        let a = Activations::new(x, HIDDEN, n).expect("acts");
        matmul_acts(&m(HIDDEN, HIDDEN, &l.q), &a, &mut q);
        matmul_acts(&m(KV, HIDDEN, &l.k), &a, &mut k);
        matmul_acts(&m(KV, HIDDEN, &l.v), &a, &mut v);
        let a = Activations::new(&q, HIDDEN, n).expect("acts");
        let mut o = vec![0f32; n * HIDDEN];
        matmul_acts(&m(HIDDEN, HIDDEN, &l.o), &a, &mut o);
        let a = Activations::new(&o, HIDDEN, n).expect("acts");
        matmul_acts(&m(FFN, HIDDEN, &l.gate), &a, &mut g);
        matmul_acts(&m(FFN, HIDDEN, &l.up), &a, &mut u);
        let a = Activations::new(&g, FFN, n).expect("acts");
        matmul_acts(&m(HIDDEN, FFN, &l.down), &a, &mut o);
    }
    // Logits for the last token only (as the engine does).
    let a = Activations::new(&x[(n - 1) * HIDDEN..], HIDDEN, 1).expect("acts");
    matmul_acts(&m(VOCAB, HIDDEN, out), &a, &mut logits);
    (
        start.elapsed().as_secs_f64(),
        (cpu_secs() - cpu0) / rayon::current_num_threads() as f64,
    )
}

fn model(rng: &mut Rng, dtype: DType, quick: bool) {
    let n_layers = if quick { 4 } else { 16 };
    let layers: Vec<Layer> = (0..n_layers)
        .map(|_| Layer {
            q: weights(rng, dtype, HIDDEN, HIDDEN),
            k: weights(rng, dtype, KV, HIDDEN),
            v: weights(rng, dtype, KV, HIDDEN),
            o: weights(rng, dtype, HIDDEN, HIDDEN),
            gate: weights(rng, dtype, FFN, HIDDEN),
            up: weights(rng, dtype, FFN, HIDDEN),
            down: weights(rng, dtype, HIDDEN, FFN),
        })
        .collect();
    let out = weights(rng, dtype, VOCAB, HIDDEN);
    let bytes: usize = layers
        .iter()
        .map(|l| {
            l.q.len() + l.k.len() + l.v.len() + l.o.len() + l.gate.len() + l.up.len() + l.down.len()
        })
        .sum::<usize>()
        + out.len();
    let x1 = acts(rng, HIDDEN);
    forward(dtype, &layers, &out, &x1, 1);
    let reps = if quick { 5 } else { 20 };
    let (mut wall, mut cpu) = (0.0, 0.0);
    for _ in 0..reps {
        let (w, c) = forward(dtype, &layers, &out, &x1, 1);
        wall += w / reps as f64;
        cpu += c / reps as f64;
    }
    println!(
        "decode  {} {n_layers} layers: {:.1} MB/token, {:.2} ms/token → {:.1} tok/s wall, {:.1} tok/s per busy thread-set (matmuls only, {:.1} GB/s wall)",
        dtype.name(),
        bytes as f64 / 1e6,
        wall * 1e3,
        1.0 / wall,
        1.0 / cpu,
        bytes as f64 / wall / 1e9
    );
    let n = 64;
    let xn = acts(rng, n * HIDDEN);
    let (wall, cpu) = forward(dtype, &layers, &out, &xn, n);
    println!(
        "prefill {} {n_layers} layers, {n} tokens: {:.1} ms → {:.1} tok/s wall, {:.1} tok/s per busy thread-set (matmuls only)",
        dtype.name(),
        wall * 1e3,
        n as f64 / wall,
        n as f64 / cpu
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let quick = args.next().is_some_and(|a| a == "quick");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    println!("kernels: {}, {threads} threads", simd_level());
    let mut rng = Rng(0x9e3779b97f4a7c15);
    pool.install(|| {
        let secs = if quick { 0.3 } else { 1.0 };
        for (dtype, rows, cols) in [
            (DType::Q4K, 8192, 2048),
            (DType::Q4K, 2048, 8192),
            (DType::Q4K, 128256, 2048),
            (DType::Q6K, 8192, 2048),
            (DType::Q8_0, 8192, 2048),
            (DType::Q4_0, 8192, 2048),
            (DType::F16, 8192, 2048),
        ] {
            matvec_gbs(&mut rng, dtype, rows, cols, secs);
        }
        for (dtype, rows, cols) in [
            (DType::Q4K, 8192, 2048),
            (DType::Q4K, 2048, 8192),
            (DType::Q6K, 8192, 2048),
            (DType::Q8_0, 8192, 2048),
        ] {
            matmul_gmacs(&mut rng, dtype, rows, cols, 64, secs);
        }
        if std::env::var_os("KERNEL_BENCH_MATMUL_ONLY").is_some() {
            return;
        }
        model(&mut rng, DType::Q4K, quick);
    });
}
