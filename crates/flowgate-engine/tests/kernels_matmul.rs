// Kernel tests: `matmul` for every weight dtype against an f64 reference, every SIMD level
// this machine has (AVX2, AVX-512 VNNI) against scalar, and the activation-quantisation error
// against un-quantised activations. Token counts 1, 3, 15, 17 exercise every VNNI token tile
// (8, 4, 2, 1) and 2560-wide K-quant rows (10 super-blocks) its reduction slabs (8 blocks).
//
// Inputs are random (seeded): random block bytes with sane random f16 scale fields (never
// zero), random activations with a few larger outliers. The reference dequantises each weight
// row with `flowgate_formats::quant::dequantize_row` (never the kernels' own code) and multiplies in f64 with the activations
// exactly as the kernel sees them (Q8/Q8_K quantised then dequantised, or f32).
//
// Tolerances, per output element, relative to the magnitude sum `Σ_c |w_c · x_c|` (robust to
// cancellation) — and the same bound on the vector norm `‖y − ref‖ / ‖ref‖`:
// - F32/F16/BF16 vs f64 reference: 1e-5 (f32 FMA accumulation over ≤ 1k terms).
// - quantised dtypes vs f64 reference on quantised activations: 1e-4 (i32-exact block
//   products, f32 scales and accumulation).
// - AVX2 / AVX-512 VNNI vs scalar: 1e-5 (same integers, different f32 summation order).
// - quantised dtypes vs f64 reference on the *original* activations: ‖y − ref‖/‖ref‖ ≤ 2 × the
//   activation error ‖x̂ − x‖/‖x‖, itself ≤ 1e-2 for Q8 (32-element scales) and ≤ 3e-2 for Q8_K
//   (one scale per 256 elements; the test activations carry 8× outliers every 97 elements).

use flowgate_engine::backend::cpu::kernels::{
    act_format, dequantize_row_into, matmul, matmul_acts, matmul_acts_isa, matmul_isa, matmul_many,
    quantize, simd_level, ActFormat, Activations, Isa, KernelError, QMatrix,
};
use flowgate_formats::DType;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WEIGHTS: [DType; 11] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
];

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A random scale in ±[lo, hi] (sign only where `signed`).
fn scale(rng: &mut StdRng, lo: f32, hi: f32, signed: bool) -> f32 {
    let v = rng.random_range(lo..hi);
    if signed && rng.random_bool(0.5) {
        -v
    } else {
        v
    }
}

/// Random weight bytes for `rows × cols` of `dtype`.
fn random_weights(rng: &mut StdRng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    match dtype {
        DType::F32 => (0..n)
            .flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes())
            .collect(),
        DType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        _ => {
            let ts = dtype.type_size();
            let nb = n / dtype.block_size();
            let mut v: Vec<u8> = (0..nb * ts).map(|_| rng.random()).collect();
            for b in v.chunks_exact_mut(ts) {
                match dtype {
                    DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => {
                        put_f16(b, 0, scale(rng, 1e-3, 4e-2, true))
                    }
                    DType::Q4_1 | DType::Q5_1 => {
                        put_f16(b, 0, scale(rng, 1e-3, 4e-2, true));
                        put_f16(b, 2, scale(rng, 1e-3, 0.3, true));
                    }
                    DType::Q4K | DType::Q5K => {
                        put_f16(b, 0, scale(rng, 1e-4, 2e-3, false));
                        put_f16(b, 2, scale(rng, 1e-4, 2e-3, false));
                    }
                    DType::Q6K => put_f16(b, 208, scale(rng, 1e-4, 2e-3, true)),
                    _ => unreachable!(),
                }
            }
            v
        }
    }
}

fn random_acts(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = rng.random_range(-1f32..1.0);
            if i % 97 == 5 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

/// Reference dequantisation of one row: `flowgate_formats::quant` (itself checked against
/// the python `gguf` package), never the kernels' own code.
fn ref_dequant(w: &QMatrix, r: usize, out: &mut [f32]) {
    let rb = w.row_bytes();
    flowgate_formats::quant::dequantize_row(w.dtype, &w.data[r * rb..(r + 1) * rb], out).unwrap();
}

/// The activations as the kernel sees them (quantised then dequantised for quant dtypes).
fn seen_acts(dtype: DType, x: &[f32], cols: usize, n: usize) -> Vec<f32> {
    let acts = Activations::new(x, cols, n).unwrap();
    let mut out = vec![0f32; x.len()];
    match act_format(dtype) {
        ActFormat::F32 => out.copy_from_slice(x),
        ActFormat::Q8 => quantize::dequantize_q8(acts.q8(), &mut out),
        ActFormat::Q8K => quantize::dequantize_q8k(acts.q8k(), &mut out),
    }
    out
}

/// f64 reference `ref[t*rows + r]` and magnitude sums.
fn reference(w: &QMatrix, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut wr = vec![0f32; w.cols];
    let mut y = vec![0f64; n * w.rows];
    let mut mag = vec![0f64; n * w.rows];
    for r in 0..w.rows {
        ref_dequant(w, r, &mut wr);
        for t in 0..n {
            let xt = &x[t * w.cols..(t + 1) * w.cols];
            let (mut s, mut m) = (0f64, 0f64);
            for (&a, &b) in wr.iter().zip(xt) {
                s += a as f64 * b as f64;
                m += (a as f64 * b as f64).abs();
            }
            y[t * w.rows + r] = s;
            mag[t * w.rows + r] = m;
        }
    }
    (y, mag)
}

fn check(label: &str, y: &[f32], reference: &[f64], mag: &[f64], tol: f64) {
    assert_eq!(y.len(), reference.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (i, ((&a, &b), &m)) in y.iter().zip(reference).zip(mag).enumerate() {
        let err = (a as f64 - b).abs();
        assert!(
            err <= tol * m.max(1e-30),
            "{label}: element {i}: got {a}, reference {b}, |err| {err:e} > {tol:e} × Σ|w·x| {m:e}"
        );
        num += err * err;
        den += b * b;
    }
    assert!(den > 0.0, "{label}: reference is all zero");
    let rel = (num / den).sqrt();
    assert!(rel <= tol, "{label}: ‖y − ref‖/‖ref‖ = {rel:e} > {tol:e}");
}

fn shapes(dtype: DType) -> Vec<(usize, usize)> {
    match dtype.block_size() {
        1 => vec![(37, 40), (130, 264), (5, 1000)],
        32 => vec![(37, 64), (130, 256), (5, 992)],
        _ => vec![(37, 256), (130, 512), (5, 1024), (11, 2560)],
    }
}

fn tol(dtype: DType) -> f64 {
    if dtype.is_quantized() {
        1e-4
    } else {
        1e-5
    }
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}

#[test]
fn matmul_matches_f64_reference_on_seen_activations() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for dtype in WEIGHTS {
        for (rows, cols) in shapes(dtype) {
            let wb = random_weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &wb).unwrap();
            for n in [1usize, 3, 15, 17] {
                let x = random_acts(&mut rng, n * cols);
                let (r, mag) = reference(&w, &seen_acts(dtype, &x, cols, n), n);
                for isa in isas() {
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_isa(isa, &w, &x, n, &mut y);
                    check(
                        &format!("{dtype} {rows}x{cols} n={n} {isa}"),
                        &y,
                        &r,
                        &mag,
                        tol(dtype),
                    );
                }
            }
        }
    }
}

#[test]
fn simd_matches_scalar() {
    if !Isa::Avx2.available() {
        eprintln!("no AVX2 on this machine: nothing to compare");
        return;
    }
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    for dtype in WEIGHTS {
        for (rows, cols) in shapes(dtype) {
            let wb = random_weights(&mut rng, dtype, rows, cols);
            let w = QMatrix::new(dtype, rows, cols, &wb).unwrap();
            for n in [1usize, 3, 15, 17] {
                let x = random_acts(&mut rng, n * cols);
                let (_, mag) = reference(&w, &seen_acts(dtype, &x, cols, n), n);
                let mut ys = vec![f32::NAN; n * rows];
                matmul_isa(Isa::Scalar, &w, &x, n, &mut ys);
                let ys64: Vec<f64> = ys.iter().map(|&v| v as f64).collect();
                for isa in isas().into_iter().filter(|&i| i != Isa::Scalar) {
                    let mut ya = vec![f32::NAN; n * rows];
                    matmul_isa(isa, &w, &x, n, &mut ya);
                    check(
                        &format!("{dtype} {rows}x{cols} n={n} {isa} vs scalar"),
                        &ya,
                        &ys64,
                        &mag,
                        1e-5,
                    );
                }
            }
        }
    }
}

#[test]
fn activation_quantisation_error_is_small() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    for dtype in WEIGHTS.into_iter().filter(|d| d.is_quantized()) {
        let (rows, cols) = (64, 1024);
        let wb = random_weights(&mut rng, dtype, rows, cols);
        let w = QMatrix::new(dtype, rows, cols, &wb).unwrap();
        for n in [1usize, 3] {
            let x = random_acts(&mut rng, n * cols);
            let (r, _) = reference(&w, &x, n);
            let mut y = vec![f32::NAN; n * rows];
            matmul(&w, &x, n, &mut y);
            let num: f64 = y
                .iter()
                .zip(&r)
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum();
            let den: f64 = r.iter().map(|b| b * b).sum();
            let rel = (num / den).sqrt();
            // The output error tracks the activation error ‖x̂ − x‖/‖x‖ (random weights).
            let xs = seen_acts(dtype, &x, cols, n);
            let xe: f64 = xs
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            let xn: f64 = x.iter().map(|&b| (b as f64).powi(2)).sum();
            let act_rel = (xe / xn).sqrt();
            let act_bound = if act_format(dtype) == ActFormat::Q8 {
                1e-2
            } else {
                3e-2
            };
            assert!(
                act_rel <= act_bound,
                "{dtype}: activation error {act_rel:e} > {act_bound:e}"
            );
            assert!(
                rel > 0.0 && rel <= 2.0 * act_rel,
                "{dtype} n={n}: ‖y − ref(x)‖/‖ref(x)‖ = {rel:e}, activation error {act_rel:e}"
            );
            eprintln!("{dtype} n={n}: output error {rel:.2e}, activation error {act_rel:.2e}");
        }
    }
}

#[test]
fn shared_activations_give_the_same_result_and_threads_do_not_matter() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let cols = 512;
    let n = 3;
    let x = random_acts(&mut rng, n * cols);
    let acts = Activations::new(&x, cols, n).unwrap();
    for dtype in [DType::Q4K, DType::Q6K, DType::Q8_0, DType::Q4_0, DType::F16] {
        let rows = 203;
        let wb = random_weights(&mut rng, dtype, rows, cols);
        let w = QMatrix::new(dtype, rows, cols, &wb).unwrap();
        let mut y1 = vec![0f32; n * rows];
        matmul(&w, &x, n, &mut y1);
        let mut y2 = vec![1f32; n * rows];
        matmul_acts(&w, &acts, &mut y2);
        assert_eq!(y1, y2, "{dtype}: matmul_acts != matmul");
        for threads in [1usize, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y3 = vec![2f32; n * rows];
            pool.install(|| matmul_acts_isa(Isa::Scalar, &w, &acts, &mut y3));
            let mut y4 = vec![2f32; n * rows];
            matmul_isa(Isa::Scalar, &w, &x, n, &mut y4);
            assert_eq!(y3, y4, "{dtype}: {threads} threads");
        }
        // Several matrices over one x.
        let wb2 = random_weights(&mut rng, DType::Q6K, 64, cols);
        let w2 = QMatrix::new(DType::Q6K, 64, cols, &wb2).unwrap();
        let mut y5 = vec![0f32; n * 64];
        matmul(&w2, &x, n, &mut y5);
        let (mut m1, mut m2) = (vec![0f32; n * rows], vec![0f32; n * 64]);
        matmul_many(&[w, w2], &x, n, &mut [&mut m1, &mut m2]);
        assert_eq!((m1, m2), (y1.clone(), y5), "{dtype}: matmul_many");
        // A subset of rows equals the same rows of the whole product.
        let sub = w.rows_slice(50..121);
        let mut ys = vec![0f32; n * sub.rows];
        matmul_acts(&sub, &acts, &mut ys);
        for t in 0..n {
            assert_eq!(
                &ys[t * sub.rows..(t + 1) * sub.rows],
                &y1[t * rows + 50..t * rows + 121]
            );
        }
    }
}

#[test]
fn dequantize_row_into_matches_reference() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0005);
    for dtype in WEIGHTS {
        let (rows, cols) = shapes(dtype)[1];
        let wb = random_weights(&mut rng, dtype, rows, cols);
        let w = QMatrix::new(dtype, rows, cols, &wb).unwrap();
        let (mut a, mut b) = (vec![0f32; cols], vec![1f32; cols]);
        for r in [0, rows / 2, rows - 1] {
            dequantize_row_into(&w, r, &mut a);
            ref_dequant(&w, r, &mut b);
            assert_eq!(a, b, "{dtype} row {r}");
        }
    }
}

/// Our activation quantisers against the reference GGUF quantisers: same integers wherever
/// the f32 scale and the reference's (f16 for Q8_0) scale round the same way.
#[test]
fn activation_quants_match_reference_quantisers() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0006);
    let n = 1024;
    let x = random_acts(&mut rng, n);
    let acts = Activations::new(&x, n, 1).unwrap();
    // Q8_0: reference stores d as f16 and rounds x/d; allow ±1 where the scales differ.
    let mut r = vec![0u8; n / 32 * 34];
    flowgate_formats::quant::quantize_row_q8_0(&x, &mut r).unwrap();
    let mut differ = 0;
    for (b, rb) in acts.q8().iter().zip(r.chunks_exact(34)) {
        let rd = f16::from_le_bytes([rb[0], rb[1]]).to_f32();
        assert!(
            (b.d - rd).abs() <= rd.abs() * 1e-3,
            "Q8 scale {} vs {rd}",
            b.d
        );
        for (&q, &rq) in b.qs.iter().zip(&rb[2..]) {
            let d = (q as i32 - rq as i8 as i32).abs();
            assert!(d <= 1, "Q8 quant {q} vs {}", rq as i8);
            differ += d;
        }
    }
    assert!(differ < n as i32 / 10, "{differ} of {n} Q8 quants differ");
    // Q8_K: the reference uses d = -max/128 signed; compare dequantised values instead.
    let mut r = vec![0u8; n / 256 * 292];
    flowgate_formats::quant::quantize_row_q8_k(&x, &mut r).unwrap();
    let mut rv = vec![0f32; n];
    flowgate_formats::quant::dequantize_row(DType::Q8K, &r, &mut rv).unwrap();
    let mut ours = vec![0f32; n];
    quantize::dequantize_q8k(acts.q8k(), &mut ours);
    for (i, (&a, &b)) in ours.iter().zip(&rv).enumerate() {
        let step = acts.q8k()[i / 256].d;
        assert!(
            (a - b).abs() <= 1.01 * step,
            "Q8_K element {i}: {a} vs {b} (step {step})"
        );
        assert!(
            (a - x[i]).abs() <= 0.51 * step,
            "Q8_K element {i}: {a} vs x {}",
            x[i]
        );
    }
}

#[test]
fn qmatrix_rejects_bad_shapes() {
    let data = vec![1u8; 144 * 2];
    assert!(QMatrix::new(DType::Q4K, 2, 256, &data).is_ok());
    assert!(matches!(
        QMatrix::new(DType::Q4K, 2, 128, &data),
        Err(KernelError::Cols { .. })
    ));
    assert!(matches!(
        QMatrix::new(DType::Q4K, 3, 256, &data),
        Err(KernelError::Bytes { .. })
    ));
    assert!(matches!(
        QMatrix::new(DType::Q4K, usize::MAX, 256, &data),
        Err(KernelError::Bytes { .. })
    ));
    let q8k = vec![1u8; 292];
    assert!(matches!(
        QMatrix::new(DType::Q8K, 1, 256, &q8k),
        Err(KernelError::NotAWeight(_))
    ));
    assert!(Activations::new(&[1.0; 10], 4, 3).is_err());
}

#[test]
fn empty_shapes_do_not_panic() {
    for dtype in [DType::F32, DType::Q4K, DType::Q8_0] {
        let w = QMatrix::new(dtype, 3, 0, &[]).unwrap();
        let mut y = vec![f32::NAN; 6];
        matmul(&w, &[], 2, &mut y);
        assert_eq!(y, vec![0.0; 6]);
        let w = QMatrix::new(dtype, 0, dtype.block_size(), &[]).unwrap();
        let x = vec![1.0; 2 * dtype.block_size()];
        matmul(&w, &x, 2, &mut []);
    }
}

/// The run-time choice: the best level this machine has (the VNNI kernels are only ever
/// picked when every feature they enable was detected).
#[test]
fn simd_level_is_the_best_available() {
    if std::env::var_os("FLOWGATE_FORCE_SCALAR").is_some()
        || std::env::var_os("FLOWGATE_FORCE_AVX2").is_some()
    {
        return;
    }
    let best = [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar]
        .into_iter()
        .find(|i| i.available())
        .unwrap();
    assert_eq!(simd_level(), best);
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512Vnni.available() {
        use std::arch::is_x86_feature_detected as has;
        assert!(has!("avx2") && has!("fma") && has!("f16c"));
        assert!(has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni"));
    }
    eprintln!("simd level: {best}");
}
