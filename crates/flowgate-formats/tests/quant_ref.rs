//! Our quant blocks against reference vectors made by `tools/quant_ref/make_quant_ref.py`
//! with the python `gguf` package (ggml's numpy port; Q8_K from a numpy transcription of
//! ggml's reference C, since `gguf` lacks it).
//!
//! Comparisons are **bitwise**: every reference function evaluates the same f32 operations in
//! the same order as ggml/gguf (one multiply, or multiply then add/subtract, with no fused
//! multiply-add), so any difference at all is a layout or rounding bug, not noise.

use std::path::PathBuf;

use flowgate_formats::quant::kquants::scale_min_k4;
use flowgate_formats::quant::{dequantize_row, quantize_row, quantize_row_q8_0, quantize_row_q8_k};
use flowgate_formats::DType;

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/quant")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const DEQ: [DType; 11] = [
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
    DType::Q8K,
];

#[test]
fn dequantize_matches_gguf_bitwise() {
    for dt in DEQ {
        let src = data(&format!("deq_{}.bin", dt.name()));
        let want = f32s(&data(&format!("deq_{}.f32", dt.name())));
        assert!(want.len() >= 256, "{dt}: reference too small");
        let mut got = vec![f32::NAN; want.len()];
        dequantize_row(dt, &src, &mut got).unwrap();
        let mut nonzero = 0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{dt} element {i}: ours {g}, gguf {w}"
            );
            nonzero += (*w != 0.0) as usize;
        }
        assert!(nonzero > want.len() / 2, "{dt}: reference is mostly zeros");

        // Row by row (one block at a time) gives the same result.
        let bs = dt.block_size().max(32);
        let rb = dt.row_bytes(bs as u64).unwrap() as usize;
        for (k, (s, w)) in src.chunks(rb).zip(want.chunks(bs)).enumerate() {
            let mut out = vec![0f32; bs];
            dequantize_row(dt, s, &mut out).unwrap();
            assert!(
                out.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt} row {k}"
            );
        }
    }
}

#[test]
fn quantize_matches_gguf_bitwise() {
    for dt in [
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q8K,
    ] {
        let x = f32s(&data(&format!("q_{}.f32", dt.name())));
        let want = data(&format!("q_{}.bin", dt.name()));
        let mut got = vec![0xAAu8; want.len()];
        quantize_row(dt, &x, &mut got).unwrap();
        let bs = dt.type_size();
        for (b, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
            assert_eq!(g, w, "{dt} block {b} differs from gguf's quantisation");
        }
    }
}

#[test]
fn named_quantizers_match_generic() {
    let x = f32s(&data("q_Q8_0.f32"));
    let mut a = vec![0u8; DType::Q8_0.row_bytes(x.len() as u64).unwrap() as usize];
    quantize_row_q8_0(&x, &mut a).unwrap();
    assert_eq!(a, data("q_Q8_0.bin"));

    let x = f32s(&data("q_Q8_K.f32"));
    let mut b = vec![0u8; DType::Q8K.row_bytes(x.len() as u64).unwrap() as usize];
    quantize_row_q8_k(&x, &mut b).unwrap();
    assert_eq!(b, data("q_Q8_K.bin"));
}

#[test]
fn f32_roundtrip_is_identity() {
    let x = f32s(&data("q_Q8_0.f32"));
    let mut b = vec![0u8; x.len() * 4];
    quantize_row(DType::F32, &x, &mut b).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize_row(DType::F32, &b, &mut y).unwrap();
    assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn quantize_then_dequantize_error_is_bounded() {
    // Error bound per block: half a quantisation step (d / 2) plus f16 rounding of d; Q4_0
    // maps the largest magnitude to -8 steps, so the opposite side clamps at +7: one step.
    let x = f32s(&data("q_Q8_0.f32"));
    for dt in [DType::Q8_0, DType::Q4_0, DType::Q5_1, DType::Q8K] {
        let n = if dt == DType::Q8K {
            256 * (x.len() / 256)
        } else {
            x.len()
        };
        let x = &x[..n];
        let mut q = vec![0u8; dt.row_bytes(n as u64).unwrap() as usize];
        let mut y = vec![0f32; n];
        quantize_row(dt, x, &mut q).unwrap();
        dequantize_row(dt, &q, &mut y).unwrap();
        let levels = match dt {
            DType::Q4_0 => 8.0,
            DType::Q5_1 => 31.0,
            _ => 127.0,
        };
        for (xb, yb) in x.chunks(dt.block_size()).zip(y.chunks(dt.block_size())) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let range = if dt == DType::Q5_1 { 2.0 * amax } else { amax };
            let steps = if dt == DType::Q4_0 { 1.01 } else { 0.51 };
            let tol = range / levels * steps + amax * 2e-3 + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= tol, "{dt}: {a} -> {b} (tol {tol})");
            }
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    let mut out = vec![0f32; 32];
    assert!(dequantize_row(DType::Q8_0, &[0u8; 33], &mut out).is_err());
    assert!(dequantize_row(DType::Q4K, &[0u8; 144], &mut out).is_err());
    let mut out = vec![0f32; 33];
    assert!(dequantize_row(DType::Q8_0, &[0u8; 34], &mut out).is_err());
    let mut q = vec![0u8; 10];
    assert!(quantize_row(DType::Q8_0, &[1.0; 32], &mut q).is_err());
    let mut q = vec![0u8; 210];
    let err = quantize_row(DType::Q6K, &[1.0; 256], &mut q).unwrap_err();
    assert!(err.to_string().contains("not implemented"), "{err}");
}

#[test]
fn q4_k_quantizer_error_is_half_a_step() {
    // Our own Q4_K quantiser (not ggml's): checked through the gguf-verified dequantiser.
    // Every element is within half of its sub-block's stored step `d * sc` (+ f32 rounding),
    // and steps are not wasteful: `d * sc` is at most the sub-block range / 15 plus one unit
    // of each super-block scale.
    let x = f32s(&data("q_Q8_K.f32")); // random rows with varied scales, one zero block
    let mut q = vec![0u8; DType::Q4K.row_bytes(x.len() as u64).unwrap() as usize];
    let mut y = vec![0f32; x.len()];
    quantize_row(DType::Q4K, &x, &mut q).unwrap();
    dequantize_row(DType::Q4K, &q, &mut y).unwrap();
    for ((xb, yb), blk) in x.chunks(256).zip(y.chunks(256)).zip(q.chunks(144)) {
        let f16 = |i: usize| half::f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
        let (d, dmin) = (f16(0), f16(2));
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        for j in 0..8 {
            let (sc, _) = scale_min_k4(j, &blk[4..16]);
            let step = d * sc as f32;
            let sub = &xb[32 * j..32 * j + 32];
            let lo = sub.iter().fold(0f32, |a, &v| a.min(v));
            let hi = sub.iter().fold(f32::MIN, |a, &v| a.max(v));
            assert!(
                step <= (hi - lo) / 15.0 + d + dmin / 15.0 + 1e-30,
                "block step too big"
            );
            for (a, b) in sub.iter().zip(&yb[32 * j..32 * j + 32]) {
                let tol = 0.5 * step + amax * 1e-5 + 1e-30;
                assert!((a - b).abs() <= tol, "{a} -> {b} (step {step})");
            }
        }
    }
}
