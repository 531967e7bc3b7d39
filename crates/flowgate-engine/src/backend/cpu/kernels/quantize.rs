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
///
/// With AVX2 the same values come from 8-lane code (`avx2::quantize_q8k`): the split's CPU
/// share quantises its token on the decode thread, and each expert's intermediate vector
/// between its two phases while the other workers wait. With the scalar code a job's set-up,
/// mostly this, took 8–13 µs on the H100 box's Xeon (2.1 GHz), on the path of every layer the
/// CPU shares; with this, 3–7 µs.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_level() != super::Isa::Scalar {
        // SAFETY: simd_level() is above Scalar only where AVX2, FMA and F16C were detected.
        unsafe { avx2::quantize_q8k(x, out) };
        return;
    }
    quantize_q8k_scalar(x, out);
}

/// [`quantize_q8k`] one value at a time: the definition the vector code must match.
pub fn quantize_q8k_scalar(x: &[f32], out: &mut [BlockQ8K]) {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BlockQ8K;
    use std::arch::x86_64::*;

    /// [`super::quantize_q8k_scalar`] 8 values at a time, with the same operations on each
    /// value: the maximum of |x| (exact in any order; NaN ignored as `f32::max` does), the
    /// same `d` and `1/d`, then for `t = x · (1/d)`: |t| (NaN → 0, capped at 128), its
    /// truncation plus one where the fraction is ≥ 0.5, capped at 127, with t's sign.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let zero = _mm256_setzero_ps();
        // packs_epi32 then packs_epi16 leave 4-byte groups in the order 0 2 4 6 1 3 5 7 of
        // the four vectors' halves; this puts them back in value order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (xb, b) in x.chunks_exact(256).zip(out.iter_mut()) {
            let p = xb.as_ptr();
            let mut m = zero;
            for i in 0..32 {
                // SAFETY: xb holds 256 floats.
                let v = unsafe { _mm256_loadu_ps(p.add(8 * i)) };
                // max_ps returns its second operand when either is NaN: m stays.
                m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
            }
            let mut lanes = [0f32; 8];
            // SAFETY: 8 floats into an 8-float array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
            let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            // SAFETY: AVX2 is present (this function's contract); i < 32 keeps each load of
            // 8 floats inside xb.
            let q = |i: usize| unsafe { quantize8(p.add(8 * i), idv) };
            let mut sums = [0i32; 8];
            for g in 0..8 {
                let r = [q(4 * g), q(4 * g + 1), q(4 * g + 2), q(4 * g + 3)];
                let bytes = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(
                        _mm256_packs_epi32(r[0], r[1]),
                        _mm256_packs_epi32(r[2], r[3]),
                    ),
                    order,
                );
                // Two bsums: values 32g..32g+16 and 32g+16..32g+32.
                let halves = [_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3])];
                // SAFETY: 32 bytes at 32·g of the block's 256 quants; 8 i32 into an 8-i32
                // array.
                unsafe {
                    _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * g) as *mut __m256i, bytes);
                    for (h, v) in halves.into_iter().enumerate() {
                        _mm256_storeu_si256(sums.as_mut_ptr() as *mut __m256i, v);
                        b.bsums[2 * g + h] = sums.iter().sum::<i32>() as i16;
                    }
                }
            }
            b.d = d;
        }
    }

    /// The 8 floats at `p` times `id`, rounded as [`super::q`] rounds, as i32 lanes.
    ///
    /// # Safety
    /// AVX2 must be present and 8 floats readable at `p`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize8(p: *const f32, idv: __m256) -> __m256i {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // SAFETY: the caller's contract.
        let v = unsafe { _mm256_loadu_ps(p) };
        let t = _mm256_mul_ps(v, idv);
        let a = _mm256_and_ps(t, abs_mask);
        // NaN → 0, then at most 128 (min_ps keeps a where a < 128).
        let a = _mm256_and_ps(a, _mm256_cmp_ps::<_CMP_ORD_Q>(a, a));
        let a = _mm256_min_ps(a, _mm256_set1_ps(128.0));
        let n = _mm256_cvttps_epi32(a);
        // All ones (−1) where the fraction is ≥ 0.5: subtracting adds one.
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(
            _mm256_sub_ps(a, _mm256_cvtepi32_ps(n)),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_min_epi32(_mm256_sub_epi32(n, up), _mm256_set1_epi32(127));
        let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(t, _mm256_setzero_ps()));
        _mm256_sub_epi32(_mm256_xor_si256(r, neg), neg)
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

    /// The AVX2 quantiser gives the scalar one's blocks bit for bit: random blocks of several
    /// magnitudes, a block of ties (values landing on k + 0.5 after scaling), blocks with NaN
    /// and signed zeros, a huge value, or infinities, and an all-zero block.
    #[test]
    fn q8k_vector_code_matches_scalar_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut x: Vec<f32> = Vec::new();
        for scale in [1e-3f32, 0.7, 40.0, 3e4] {
            for _ in 0..4 {
                x.extend((0..256).map(|_| rng.random_range(-1.0f32..1.0) * scale));
            }
        }
        // amax = 127 makes d = 1: every k + 0.5 is a tie.
        x.extend((0..256).map(|i| {
            let v = if i == 0 {
                127.0
            } else {
                (i % 127) as f32 + 0.5
            };
            if i % 3 == 0 {
                -v
            } else {
                v
            }
        }));
        // Odd values among random ones, a block for each kind that changes the scale:
        // NaN (ignored by the maximum, quantised to 0) with zeros of both signs, a huge
        // value, and infinities (the scale becomes infinite, every quant 0).
        for odd in [
            &[f32::NAN, 0.0, -0.0][..],
            &[1e30, -1e-30],
            &[f32::INFINITY, f32::NEG_INFINITY],
        ] {
            let mut block: Vec<f32> = (0..256).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            for (i, &v) in odd.iter().enumerate() {
                block[37 * i + 5] = v;
            }
            x.extend(block);
        }
        x.extend(std::iter::repeat_n(0.0, 256));
        let n = x.len() / 256;
        let mut a = vec![BlockQ8K::default(); n];
        let mut b = vec![BlockQ8K::default(); n];
        quantize_q8k(&x, &mut a);
        quantize_q8k_scalar(&x, &mut b);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}: d");
            assert_eq!(a.qs, b.qs, "block {i}: quants");
            assert_eq!(a.bsums, b.bsums, "block {i}: sums");
        }
        // Not all zero: the test compares something.
        assert!(b.iter().any(|b| b.qs.iter().any(|&q| q != 0)));
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
