//! Activation quantisation: f32 activations to the integer blocks the weight dot products use.
//!
//! - [`BlockQ8`]: 32 values, `q = round(x / d)` with `d = max|x| / 127` kept in f32 (llama.cpp's
//!   Q8_0/Q8_1 store an f16 `d`; f32 loses nothing and costs nothing here since these blocks are
//!   never stored), plus `s = d · Σq` for the `_1` weight types whose offset `m` multiplies Σx.
//! - [`BlockQ8K`]: 256 values with one f32 `d = max|x| / 127` and 16 sums of 16 quants, which
//!   K-quant dot products use for their sub-block minimums (Q4_K/Q5_K) and the −32 offset (Q6_K).
//!
//! These are in-memory structs, not GGUF bytes; the symmetric `/127` scale keeps |q| ≤ 127 so
//! `maddubs`-style SIMD products cannot saturate.

/// 32 quantised activations.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    /// `d · Σ qs`.
    pub s: f32,
    pub qs: [i8; 32],
}

/// 256 quantised activations with 16-element sums.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16],
        }
    }
}

fn scale_of(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// `round(v · id)` (half away from zero, as `f32::round`) clamped to ±127. Written without
/// `round`, which is a libm call on the baseline x86-64 target: the split's CPU share
/// quantised one 2048-value token in ~10 µs with it, on the decode thread.
#[inline]
fn q(v: f32, id: f32) -> i8 {
    let t = v * id;
    // |v·id| ≤ 127 up to rounding; capping at 128 keeps the integer part exact; NaN → 0, as
    // `as` made it before. `a - trunc(a)` is exact below 2^23, so the tie goes up exactly
    // where `round` takes it.
    let a = match t.abs() {
        a if a < 128.0 => a,
        a if a.is_nan() => 0.0,
        _ => 128.0,
    };
    let i = a as i32;
    let r = (i + i32::from(a - i as f32 >= 0.5)).min(127);
    (if t < 0.0 { -r } else { r }) as i8
}

/// Quantises `x` (`32 · out.len()` floats) into Q8 blocks. Extra floats or blocks are ignored.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, id) = scale_of(xb);
        let mut sum = 0i32;
        for (qv, &v) in b.qs.iter_mut().zip(xb) {
            *qv = q(v, id);
            sum += *qv as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Quantises `x` (`256 · out.len()` floats) into Q8_K blocks.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, b) in x.chunks_exact(256).zip(out.iter_mut()) {
        let (d, id) = scale_of(xb);
        for (qv, &v) in b.qs.iter_mut().zip(xb) {
            *qv = q(v, id);
        }
        for (s, qg) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qg.iter().map(|&v| v as i16).sum();
        }
        b.d = d;
    }
}

/// Dequantised values of Q8 blocks (tests, error analysis).
pub fn dequantize_q8(blocks: &[BlockQ8], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(32)) {
        for (v, &qv) in o.iter_mut().zip(&b.qs) {
            *v = b.d * qv as f32;
        }
    }
}

/// Dequantised values of Q8_K blocks (tests, error analysis).
pub fn dequantize_q8k(blocks: &[BlockQ8K], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(256)) {
        for (v, &qv) in o.iter_mut().zip(&b.qs) {
            *v = b.d * qv as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_roundtrip_within_half_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let mut b = vec![BlockQ8::default(); 2];
        quantize_q8(&x, &mut b);
        let mut y = vec![0f32; 64];
        dequantize_q8(&b, &mut y);
        for (k, (a, r)) in x.iter().zip(&y).enumerate() {
            assert!((a - r).abs() <= b[k / 32].d * 0.5 + 1e-6, "{a} {r}");
        }
        let s: i32 = b[0].qs.iter().map(|&v| v as i32).sum();
        assert_eq!(b[0].s, b[0].d * s as f32);
    }

    #[test]
    fn rounding_matches_round_half_away_from_zero() {
        use rand::{Rng, SeedableRng};
        let reference = |v: f32, id: f32| (v * id).round().clamp(-127.0, 127.0) as i8;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut values: Vec<f32> = (0..200_000)
            .map(|_| rng.random_range(-130.0f32..130.0))
            .collect();
        // Ties, the last float below each tie, both signs, the clamp's edges, odd values.
        for k in 0..=128 {
            let tie = k as f32 + 0.5;
            for v in [tie, f32::from_bits(tie.to_bits() - 1), k as f32] {
                values.extend([v, -v]);
            }
        }
        values.extend([
            0.0,
            -0.0,
            0.49999997,
            -0.49999997,
            126.5,
            127.49999,
            127.5,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ]);
        for &v in &values {
            assert_eq!(q(v, 1.0), reference(v, 1.0), "{v}");
        }
        for _ in 0..20_000 {
            let (v, id) = (
                rng.random_range(-3.0f32..3.0),
                rng.random_range(0.0f32..60.0),
            );
            assert_eq!(q(v, id), reference(v, id), "{v} · {id}");
        }
    }

    #[test]
    fn q8k_bsums() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 53 % 41) as f32 - 20.0) * 0.11)
            .collect();
        let mut b = vec![BlockQ8K::default(); 1];
        quantize_q8k(&x, &mut b);
        for g in 0..16 {
            let s: i32 = b[0].qs[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
            assert_eq!(b[0].bsums[g] as i32, s);
        }
        let mut y = vec![0f32; 256];
        dequantize_q8k(&b, &mut y);
        for (a, r) in x.iter().zip(&y) {
            assert!((a - r).abs() <= b[0].d * 0.5 + 1e-6);
        }
    }
}
