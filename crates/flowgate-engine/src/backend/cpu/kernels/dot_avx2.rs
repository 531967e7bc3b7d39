//! AVX2 + FMA + F16C kernels (x86-64, chosen at run time by [`super::simd_level`]).
//!
//! Same arithmetic as [`super::dot_scalar`]: integer products within a block
//! (`maddubs` of an unsigned operand by a signed one, then `madd` by scales or ones), f32
//! accumulation across blocks in 8 lanes, one horizontal sum per row. Activations are ≤127
//! in magnitude and weights ≤63 unsigned (or sign-transferred i8), so `maddubs` never saturates.
//! - Q4_0/Q5_0/Q8_0: signed weights, `sign(x)`-trick products.
//! - Q4_1/Q5_1: unsigned weights plus `m · d_y · Σq_y` (the precomputed `BlockQ8::s`).
//! - Q4_K/Q5_K: per 64 values one load of nibbles (two sub-blocks), sub-block scales by `madd`,
//!   minimums through the activation block sums (one `madd` per super-block).
//! - Q6_K: values 0..63 unsigned, the −32 offset through block sums times scales.
//! - Legacy blocks (32 values) are summed with four independent accumulators: with one, the
//!   4-cycle FMA chain per block was the bound.
//! - f16 scales are converted as 8-lane broadcasts: a scalar `vcvtph2ps` makes LLVM emit a
//!   `vpinsrw` that merges into an arbitrary register — often the accumulator — and serialised
//!   the loops (this alone was a 1.5–2× slowdown).
//! - Prefill: Q4_K/Q6_K rows are unpacked once per super-block into registers on the stack and
//!   reused by a tile of up to 16 tokens.
//!
//! Every function here is `unsafe` with `#[target_feature]`; the safe entry points check
//! [`detected`] first, so the features are present whenever the code runs.

use super::ActSrc;
use flowgate_formats::DType;

/// Whether AVX2, FMA and F16C are present (detected once).
pub fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *D.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row · one token; `None` when there is no AVX2 kernel for this pair (or no AVX2).
pub(crate) fn dot(dtype: DType, row: &[u8], x: &ActSrc) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if !detected() {
            return None;
        }
        // SAFETY: AVX2, FMA and F16C were detected just above.
        unsafe { imp::dot(dtype, row, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, row, x);
        None
    }
}

/// `out[r * n + t] = row_r · token_t` for all rows of `rows` (`rb` bytes each); `false` when
/// this dtype has no AVX2 kernel (the caller then runs the generic loop).
pub(crate) fn rows_times_tokens(
    dtype: DType,
    rows: &[u8],
    rb: usize,
    src: &ActSrc,
    n: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !detected() || !imp::supported(dtype) {
            return false;
        }
        // SAFETY: AVX2, FMA and F16C were detected just above.
        unsafe { imp::rows_times_tokens(dtype, rows, rb, src, n, out) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, rows, rb, src, n, out);
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod imp {
    use std::arch::x86_64::*;

    use super::super::dot_scalar::scale_min_k4;
    use super::super::quantize::{BlockQ8, BlockQ8K};
    use super::ActSrc;
    use flowgate_formats::DType;

    pub(super) fn supported(dtype: DType) -> bool {
        dtype != DType::Q8K
    }

    /// Calls the kernel for `dtype` if `x` is its activation format.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot(dtype: DType, row: &[u8], x: &ActSrc) -> Option<f32> {
        let ts = dtype.type_size();
        // The kernels read whole blocks through raw pointers: bound them by both inputs.
        Some(match (dtype, *x) {
            (DType::F32 | DType::F16 | DType::BF16, ActSrc::F32(x)) => {
                let n = (row.len() / ts).min(x.len());
                // SAFETY: n elements of row (ts bytes each) and of x are in bounds.
                unsafe {
                    match dtype {
                        DType::F32 => dot_f32(row.as_ptr(), x.as_ptr(), n),
                        DType::F16 => dot_f16(row.as_ptr(), x.as_ptr(), n),
                        _ => dot_bf16(row.as_ptr(), x.as_ptr(), n),
                    }
                }
            }
            (
                DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0,
                ActSrc::Q8(y),
            ) => {
                let nb = (row.len() / ts).min(y.len());
                // SAFETY: nb blocks of row and of y are in bounds.
                unsafe {
                    match dtype {
                        DType::Q4_0 => dot_q4_0(row.as_ptr(), y.as_ptr(), nb),
                        DType::Q4_1 => dot_q4_1(row.as_ptr(), y.as_ptr(), nb),
                        DType::Q5_0 => dot_q5_0(row.as_ptr(), y.as_ptr(), nb),
                        DType::Q5_1 => dot_q5_1(row.as_ptr(), y.as_ptr(), nb),
                        _ => dot_q8_0(row.as_ptr(), y.as_ptr(), nb),
                    }
                }
            }
            (DType::Q4K | DType::Q5K | DType::Q6K, ActSrc::Q8K(y)) => {
                let nb = (row.len() / ts).min(y.len());
                // SAFETY: nb blocks of row and of y are in bounds.
                unsafe {
                    match dtype {
                        DType::Q4K => dot_q4k(row.as_ptr(), y.as_ptr(), nb),
                        DType::Q5K => dot_q5k(row.as_ptr(), y.as_ptr(), nb),
                        _ => dot_q6k(row.as_ptr(), y.as_ptr(), nb),
                    }
                }
            }
            _ => return None,
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rows_times_tokens(
        dtype: DType,
        rows: &[u8],
        rb: usize,
        src: &ActSrc,
        n: usize,
        out: &mut [f32],
    ) {
        if n == 1 {
            let pf = super::super::prefetch_distance();
            for (row, o) in rows.chunks_exact(rb).zip(out.iter_mut()) {
                if pf > 0 {
                    // The weights `pf` bytes ahead (a prefetch never faults: past the end of
                    // the slice it is a hint about nothing).
                    let ahead = row.as_ptr().wrapping_add(pf);
                    for off in (0..rb).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                    }
                }
                *o = dot(dtype, row, src).unwrap_or(f32::NAN);
            }
            return;
        }
        // K-quants: each weight super-block is unpacked once per tile of TILE tokens.
        if let (DType::Q4K | DType::Q6K, ActSrc::Q8K(y)) = (dtype, *src) {
            let nb = rb / dtype.type_size();
            if nb > 0 && y.len() == nb * n {
                let mut res = [0f32; TILE];
                for t0 in (0..n).step_by(TILE) {
                    let tn = TILE.min(n - t0);
                    let ys = &y[t0 * nb..(t0 + tn) * nb];
                    for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
                        // SAFETY: the row has nb blocks (rb bytes), ys holds tn·nb blocks.
                        unsafe {
                            if dtype == DType::Q4K {
                                dot_q4k_tile(row.as_ptr(), ys.as_ptr(), nb, &mut res[..tn]);
                            } else {
                                dot_q6k_tile(row.as_ptr(), ys.as_ptr(), nb, &mut res[..tn]);
                            }
                        }
                        o[t0..t0 + tn].copy_from_slice(&res[..tn]);
                    }
                }
                return;
            }
        }
        for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
            for (t, v) in o.iter_mut().enumerate() {
                *v = dot(dtype, row, &src.token(t, n)).unwrap_or(f32::NAN);
            }
        }
    }

    /// Tokens per tile in multi-token products: their activations (≈ 2.3 KB per token for a
    /// 2048-wide row) stay in L1 while a row's super-blocks are unpacked once for all of them.
    const TILE: usize = 16;

    /// One Q4_K row · `out.len()` tokens (token t's blocks at `y[t·nb..]`): each super-block is
    /// unpacked once into 8×32 bytes plus 8 scale vectors on the stack, then every token runs
    /// a load–maddubs–madd–add loop over them.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4k_tile(w: *const u8, y: *const BlockQ8K, nb: usize, out: &mut [f32]) {
        let n = out.len();
        let mut acc = [_mm256_setzero_ps(); TILE];
        let m4 = _mm256_set1_epi8(0x0f);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut sc16 = [_mm256_setzero_si256(); 8];
        for i in 0..nb {
            // SAFETY: block i < nb of the row and of each of the n tokens is in bounds (caller).
            unsafe {
                let b = w.add(144 * i);
                let d = _mm256_cvtph_ps(_mm_set1_epi16((b as *const u16).read_unaligned() as i16));
                let dmin = _mm256_cvtph_ps(_mm_set1_epi16(
                    (b.add(2) as *const u16).read_unaligned() as i16,
                ));
                let (sc, m) = k4_scales(&*(b.add(4) as *const [u8; 12]));
                let qs = b.add(16);
                for j in 0..4 {
                    let v = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    q[2 * j] = _mm256_and_si256(v, m4);
                    q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                let m16 = mins16(&m);
                let scw = scale_words(&sc);
                for (k, s) in sc16.iter_mut().enumerate() {
                    *s = scale_word(scw, k);
                }
                for (t, a) in acc.iter_mut().enumerate().take(n) {
                    let yb = &*y.add(t * nb + i);
                    let yq = yb.qs.as_ptr();
                    let mut sumi = _mm256_setzero_si256();
                    for k in 0..8 {
                        let yv = _mm256_loadu_si256(yq.add(32 * k) as *const __m256i);
                        sumi = _mm256_add_epi32(
                            sumi,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], yv), sc16[k]),
                        );
                    }
                    let yd = _mm256_set1_ps(yb.d);
                    let prod = mins16_dot_bsums(m16, &yb.bsums);
                    *a = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), _mm256_cvtepi32_ps(sumi), *a);
                    *a = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, yd), _mm256_cvtepi32_ps(prod), *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
    }

    /// One Q6_K row · `out.len()` tokens, unpacked once per super-block like [`dot_q4k_tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6k_tile(w: *const u8, y: *const BlockQ8K, nb: usize, out: &mut [f32]) {
        let n = out.len();
        let mut acc = [_mm256_setzero_ps(); TILE];
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        let base = _mm_set_epi64x(0x0101010101010101, 0);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s16 = [_mm256_setzero_si256(); 8];
        for i in 0..nb {
            // SAFETY: block i < nb of the row and of each of the n tokens is in bounds (caller).
            unsafe {
                let b = w.add(210 * i);
                let d = _mm256_cvtph_ps(_mm_set1_epi16(
                    (b.add(208) as *const u16).read_unaligned() as i16,
                ));
                let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
                let sc16 = _mm256_cvtepi8_epi16(scales);
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                    q[4 * h] = _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    );
                    q[4 * h + 1] = _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    );
                    q[4 * h + 2] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    );
                    q[4 * h + 3] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    );
                }
                for (k, s) in s16.iter_mut().enumerate() {
                    let mask = _mm_add_epi8(base, _mm_set1_epi8(2 * k as i8));
                    *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, mask));
                }
                for (t, a) in acc.iter_mut().enumerate().take(n) {
                    let yb = &*y.add(t * nb + i);
                    let yq = yb.qs.as_ptr();
                    let bs = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                    let mut sumi = _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5),
                    );
                    for k in 0..8 {
                        let yv = _mm256_loadu_si256(yq.add(32 * k) as *const __m256i);
                        sumi = _mm256_add_epi32(
                            sumi,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], yv), s16[k]),
                        );
                    }
                    *a = _mm256_fmadd_ps(
                        _mm256_mul_ps(d, _mm256_set1_ps(yb.d)),
                        _mm256_cvtepi32_ps(sumi),
                        *a,
                    );
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// f16 at `p` (unaligned) to f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
    }

    /// f16 at `p` broadcast to 8 f32 lanes, times `y`.
    ///
    /// Converting all 8 lanes matters: for a scalar conversion LLVM emits a `vpinsrw` that
    /// merges into (and so waits on) whatever register it picks — often the accumulator,
    /// which serialises the whole loop.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16x8_times(p: *const u8, y: f32) -> __m256 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_set1_epi16(bits as i16)),
            _mm256_set1_ps(y),
        )
    }

    /// 32 signed bytes · 32 signed bytes → 8 i32 partial sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    }

    /// 32 unsigned bytes (≤127) · 32 signed bytes → 8 i32 partial sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_u8(x: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles (elements 0..16), then high nibbles.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibbles32(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// 32 bits at `p` → 32 bytes, byte i = 0x10 if bit i is set, else 0.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 4 readable bytes at p.
        let bits = unsafe { (p as *const u32).read_unaligned() };
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
        // Every bit but bit (i % 8) set in byte i: equal to all-ones iff that bit is set.
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64));
        let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32(w: *const u8, x: *const f32, n: usize) -> f32 {
        let w = w as *const f32;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (all loads below): i + width ≤ n, the caller guarantees n floats at w and x.
        unsafe {
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(o)), _mm256_loadu_ps(x.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i)), _mm256_loadu_ps(x.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                s += w.add(i).read_unaligned() * *x.add(i);
                i += 1;
            }
            s
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16(w: *const u8, x: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY (all loads below): i + width ≤ n, the caller guarantees n halves at w, n floats at x.
        unsafe {
            while i + 16 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * o) as *const __m128i));
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(o)), *a);
                }
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
            while i < n {
                s += f16_at(w.add(2 * i)) * *x.add(i);
                i += 1;
            }
            s
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_bf16(w: *const u8, x: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY (all loads below): i + width ≤ n, the caller guarantees n bf16s at w, n floats at x.
        unsafe {
            while i + 16 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(2 * o) as *const __m128i));
                    let wv = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(o)), *a);
                }
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
            while i < n {
                let b = (w.add(2 * i) as *const u16).read_unaligned();
                s += f32::from_bits((b as u32) << 16) * *x.add(i);
                i += 1;
            }
            s
        }
    }

    /// Sums `nb` legacy blocks: `$body` (with `$i` the block index) yields the block's
    /// `(d_x·d_y, integer partial sums, offset term)`; four accumulators keep the FMA latency
    /// off the critical path (with one, a 4-cycle chain per 18-byte Q4_0 block bounds speed).
    macro_rules! sum_blocks {
        ($nb:expr, |$i:ident| $body:expr) => {{
            let nb = $nb;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut accm = [_mm256_setzero_ps(); 4];
            let mut base = 0;
            while base + 4 <= nb {
                for k in 0..4 {
                    let $i = base + k;
                    let (d, s, m): (__m256, __m256i, __m256) = $body;
                    acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[k]);
                    accm[k] = _mm256_add_ps(accm[k], m);
                }
                base += 4;
            }
            for $i in base..nb {
                let (d, s, m): (__m256, __m256i, __m256) = $body;
                acc[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[0]);
                accm[0] = _mm256_add_ps(accm[0], m);
            }
            let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let m = _mm256_add_ps(
                _mm256_add_ps(accm[0], accm[1]),
                _mm256_add_ps(accm[2], accm[3]),
            );
            // Every lane of an offset term holds the same value.
            hsum(a) + _mm256_cvtss_f32(m)
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_0(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        sum_blocks!(nb, |i| {
            // SAFETY: block i < nb of both inputs is in bounds (caller).
            unsafe {
                let b = w.add(18 * i);
                let yb = &*y.add(i);
                let q = _mm256_sub_epi8(nibbles32(b.add(2)), _mm256_set1_epi8(8));
                let s = dot_i8(q, _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                (f16x8_times(b, yb.d), s, _mm256_setzero_ps())
            }
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        sum_blocks!(nb, |i| {
            // SAFETY: block i < nb of both inputs is in bounds (caller).
            unsafe {
                let b = w.add(20 * i);
                let yb = &*y.add(i);
                let s = dot_u8(
                    nibbles32(b.add(4)),
                    _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i),
                );
                (f16x8_times(b, yb.d), s, f16x8_times(b.add(2), yb.s))
            }
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_0(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        sum_blocks!(nb, |i| {
            // SAFETY: block i < nb of both inputs is in bounds (caller).
            unsafe {
                let b = w.add(22 * i);
                let yb = &*y.add(i);
                let q = _mm256_or_si256(nibbles32(b.add(6)), fifth_bits(b.add(2)));
                let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
                let s = dot_i8(q, _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                (f16x8_times(b, yb.d), s, _mm256_setzero_ps())
            }
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5_1(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        sum_blocks!(nb, |i| {
            // SAFETY: block i < nb of both inputs is in bounds (caller).
            unsafe {
                let b = w.add(24 * i);
                let yb = &*y.add(i);
                let q = _mm256_or_si256(nibbles32(b.add(8)), fifth_bits(b.add(4)));
                let s = dot_u8(q, _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                (f16x8_times(b, yb.d), s, f16x8_times(b.add(2), yb.s))
            }
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        sum_blocks!(nb, |i| {
            // SAFETY: block i < nb of both inputs is in bounds (caller).
            unsafe {
                let b = w.add(34 * i);
                let yb = &*y.add(i);
                let q = _mm256_loadu_si256(b.add(2) as *const __m256i);
                let s = dot_i8(q, _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                (f16x8_times(b, yb.d), s, _mm256_setzero_ps())
            }
        })
    }

    /// Q4_K/Q5_K packed 6-bit scales and mins → (8 scales, 8 mins) as bytes.
    #[inline(always)]
    pub(crate) fn k4_scales(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
        let a = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let b = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
        let c = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let sc_lo = a & 0x3f3f3f3f;
        let m_lo = b & 0x3f3f3f3f;
        let sc_hi = (c & 0x0f0f0f0f) | (((a >> 6) & 0x03030303) << 4);
        let m_hi = ((c >> 4) & 0x0f0f0f0f) | (((b >> 6) & 0x03030303) << 4);
        let sc = (sc_lo as u64 | ((sc_hi as u64) << 32)).to_le_bytes();
        let m = (m_lo as u64 | ((m_hi as u64) << 32)).to_le_bytes();
        debug_assert!((0..8).all(|j| scale_min_k4(j, s) == (sc[j], m[j])));
        (sc, m)
    }

    /// The 8 sub-block scales as words, in both 128-bit lanes (for [`scale_word`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn scale_words(sc: &[u8; 8]) -> __m256i {
        let v = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(*sc)));
        _mm256_broadcastsi128_si256(v)
    }

    /// Word `k` of `w` (from [`scale_words`]) in all 16 lanes: one `vpshufb`, where a
    /// broadcast from a general register costs two instructions.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn scale_word(w: __m256i, k: usize) -> __m256i {
        let lo = (2 * k) as i16;
        _mm256_shuffle_epi8(w, _mm256_set1_epi16(lo | ((lo + 1) << 8)))
    }

    /// `Σ_j m_j · (bsums[2j] + bsums[2j+1])` as 8 i32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn mins_dot_bsums(m: &[u8; 8], bsums: &[i16; 16]) -> __m256i {
        mins16_dot_bsums(mins16(m), bsums)
    }

    /// The 8 minimums as 16 words, each twice (pairs with the 16 block sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn mins16(m: &[u8; 8]) -> __m256i {
        let mv = _mm_cvtsi64_si128(i64::from_le_bytes(*m));
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn mins16_dot_bsums(m16: __m256i, bsums: &[i16; 16]) -> __m256i {
        // SAFETY: 32 readable bytes.
        let bs = unsafe { _mm256_loadu_si256(bsums.as_ptr() as *const __m256i) };
        _mm256_madd_epi16(bs, m16)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4k(w: *const u8, y: *const BlockQ8K, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0f);
        for i in 0..nb {
            // SAFETY: block i < nb of both inputs is in bounds (caller); 144-byte blocks.
            unsafe {
                let b = w.add(144 * i);
                let yb = &*y.add(i);
                let d = f16x8_times(b, yb.d);
                let dmin = f16x8_times(b.add(2), yb.d);
                let (sc, m) = k4_scales(&*(b.add(4) as *const [u8; 12]));
                let prod = mins_dot_bsums(&m, &yb.bsums);
                accm = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), accm);
                let scw = scale_words(&sc);
                let qs = b.add(16);
                let yq = yb.qs.as_ptr();
                let mut sumi = _mm256_setzero_si256();
                for j in 0..4 {
                    let v = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    let y0 = _mm256_loadu_si256(yq.add(64 * j) as *const __m256i);
                    let y1 = _mm256_loadu_si256(yq.add(64 * j + 32) as *const __m256i);
                    let p0 =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), scale_word(scw, 2 * j));
                    let p1 =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), scale_word(scw, 2 * j + 1));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
                }
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
            }
        }
        hsum(acc) - hsum(accm)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q5k(w: *const u8, y: *const BlockQ8K, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        for i in 0..nb {
            // SAFETY: block i < nb of both inputs is in bounds (caller); 176-byte blocks.
            unsafe {
                let b = w.add(176 * i);
                let yb = &*y.add(i);
                let d = f16x8_times(b, yb.d);
                let dmin = f16x8_times(b.add(2), yb.d);
                let (sc, m) = k4_scales(&*(b.add(4) as *const [u8; 12]));
                let prod = mins_dot_bsums(&m, &yb.bsums);
                accm = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), accm);
                let scw = scale_words(&sc);
                let mut qh = _mm256_loadu_si256(b.add(16) as *const __m256i);
                let qs = b.add(48);
                let yq = yb.qs.as_ptr();
                let mut sumi = _mm256_setzero_si256();
                for j in 0..4 {
                    let v = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
                    qh = _mm256_srli_epi16(qh, 2);
                    let lo = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
                    let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
                    let y0 = _mm256_loadu_si256(yq.add(64 * j) as *const __m256i);
                    let y1 = _mm256_loadu_si256(yq.add(64 * j + 32) as *const __m256i);
                    let p0 =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), scale_word(scw, 2 * j));
                    let p1 =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), scale_word(scw, 2 * j + 1));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
                }
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
            }
        }
        hsum(acc) - hsum(accm)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6k(w: *const u8, y: *const BlockQ8K, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        // Byte shuffle picking scale 2k for the first 8 i16 lanes and 2k+1 for the last 8.
        let base = _mm_set_epi64x(0x0101010101010101, 0);
        for i in 0..nb {
            // SAFETY: block i < nb of both inputs is in bounds (caller); 210-byte blocks.
            unsafe {
                let b = w.add(210 * i);
                let yb = &*y.add(i);
                let d = f16x8_times(b.add(208), yb.d);
                let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
                // −32 offset: Σ_g sc_g · 32 · bsums_g.
                let off = _mm256_madd_epi16(
                    _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i),
                    _mm256_cvtepi8_epi16(scales),
                );
                let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
                let yq = yb.qs.as_ptr();
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(b.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(b.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(b.add(128 + 32 * n) as *const __m256i);
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, m4),
                            _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, m4),
                            _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            _mm256_and_si256(qh, m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                        ),
                    ];
                    for (c, qc) in q.iter().enumerate() {
                        let k = 4 * n + c;
                        let mask = _mm_add_epi8(base, _mm_set1_epi8(2 * k as i8));
                        let s16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, mask));
                        let yv = _mm256_loadu_si256(yq.add(32 * k) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*qc, yv), s16);
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                }
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
            }
        }
        hsum(acc)
    }
}
