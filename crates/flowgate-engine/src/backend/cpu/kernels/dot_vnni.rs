//! AVX-512 VNNI kernels (x86-64, chosen at run time by [`super::simd_level`])
//! for the dtypes that dominate real models: Q4_K, Q6_K and Q8_0. Other dtypes return `false`
//! and the caller uses [`super::dot_avx2`].
//!
//! Design:
//! - `vpdpbusd` (u8 × i8, four products summed into each i32 lane) replaces AVX2's
//!   `maddubs` + `madd` pair. K-quant sub-block scales cannot be folded into the u8 operand
//!   (4-bit weight × 6-bit scale overflows a byte), so two sub-blocks' `vpdpbusd` results
//!   (each lane ≤ 4·63·127 < 2¹⁵, so exact in i16) are packed to i16 with `vpackssdw` and
//!   multiplied by their scales and accumulated by one `vpdpwssd`: per 64 weights
//!   2 `vpdpbusd` + 1 pack + 1 `vpdpwssd` instead of 2 `maddubs` + 2 `madd` + 2 adds.
//! - K-quants use 512-bit vectors: this machine (Zen 5) executes 512-bit integer ops at full
//!   width, and a zmm holds two 32-element sub-blocks, halving the instruction count per
//!   weight (256-bit VNNI was ≈ 20% slower for prefill). Q4_K nibbles are broadcast to both
//!   halves and shifted by 0 / 4 so one zmm pairs with 64 contiguous activation bytes; Q6_K
//!   reads 64 bytes of low bits and broadcasts the matching 32 bytes of high bits. Q8_0 stays
//!   256-bit (one block is 32 bytes).
//! - Q4_K minimums: per activation block the 8 pair sums `d_y · (bsums[2j] + bsums[2j+1])` are
//!   precomputed once per call, so the minimum term is one FMA per token and super-block.
//! - Prefill: each row's super-block is unpacked once (nibbles, pair scales, minimums) and
//!   reused by a compile-time tile of `N` tokens (8, 4, 2 or 1), so the token loop unrolls
//!   with one accumulator register per token; the reduction dimension is walked in slabs of
//!   8 super-blocks so a tile's activations stay in L1 while every row of the chunk uses them.
//! - Exactness: integer results are the same as [`super::dot_scalar`]; only the f32 summation
//!   order differs.
//!
//! Every kernel is `unsafe` with `#[target_feature]`; [`rows_times_tokens`] checks
//! [`detected`] first, so the features are present whenever the code runs.

use super::ActSrc;
use flowgate_formats::DType;

/// Whether AVX2, FMA, F16C, AVX-512 F/BW/VL and AVX-512 VNNI are all present (detected once).
pub fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *D.get_or_init(|| {
            super::dot_avx2::detected()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r * n + t] = row_r · token_t` for all rows of `rows` (`rb` bytes each); `false` when
/// this dtype/activation pair has no VNNI kernel (the caller then uses the AVX2 code).
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
        if !detected() {
            return false;
        }
        // SAFETY: every feature the kernels enable was detected just above.
        unsafe { imp::rows_times_tokens(dtype, rows, rb, src, n, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, rows, rb, src, n, out);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use super::super::dot_avx2::imp::{hsum, k4_scales};
    use super::super::quantize::{BlockQ8, BlockQ8K};
    use super::ActSrc;
    use flowgate_formats::DType;

    /// Largest compile-time tile of tokens: 8 accumulators stay in registers and the token
    /// loop unrolls (16 was 20–30% slower: spilled accumulators, activations out of L1).
    const TILE: usize = 8;

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) fn rows_times_tokens(
        dtype: DType,
        rows: &[u8],
        rb: usize,
        src: &ActSrc,
        n: usize,
        out: &mut [f32],
    ) -> bool {
        let ts = dtype.type_size();
        let nb = rb / ts;
        if nb == 0 || !rb.is_multiple_of(ts) || out.len() != rows.len() / rb * n {
            return false;
        }
        match (dtype, *src) {
            (DType::Q4K | DType::Q6K, ActSrc::Q8K(y)) if y.len() == nb * n => {
                // Q6_K does not read them.
                let bp = if dtype == DType::Q4K {
                    pair_bsums(y)
                } else {
                    Vec::new()
                };
                let mut t0 = 0;
                while t0 < n {
                    let left = n - t0;
                    let ys = &y[t0 * nb..];
                    let bps = bp.get(8 * t0 * nb..).unwrap_or(&[]);
                    // SAFETY: each row has nb blocks (rb bytes); ys holds (n − t0)·nb ≥ N·nb blocks and
                    // bps (Q4_K) 8 pair sums per block.
                    let tn = unsafe {
                        if dtype == DType::Q4K {
                            match left {
                                TILE.. => tile::<TILE>(
                                    q4k_row_z::<TILE>,
                                    rows,
                                    rb,
                                    ys,
                                    bps,
                                    nb,
                                    n,
                                    t0,
                                    out,
                                ),
                                4.. => tile::<4>(q4k_row_z::<4>, rows, rb, ys, bps, nb, n, t0, out),
                                2.. => tile::<2>(q4k_row_z::<2>, rows, rb, ys, bps, nb, n, t0, out),
                                _ => tile::<1>(q4k_row_z::<1>, rows, rb, ys, bps, nb, n, t0, out),
                            }
                        } else {
                            match left {
                                TILE.. => tile::<TILE>(
                                    q6k_row_z::<TILE>,
                                    rows,
                                    rb,
                                    ys,
                                    bps,
                                    nb,
                                    n,
                                    t0,
                                    out,
                                ),
                                4.. => tile::<4>(q6k_row_z::<4>, rows, rb, ys, bps, nb, n, t0, out),
                                2.. => tile::<2>(q6k_row_z::<2>, rows, rb, ys, bps, nb, n, t0, out),
                                _ => tile::<1>(q6k_row_z::<1>, rows, rb, ys, bps, nb, n, t0, out),
                            }
                        }
                    };
                    t0 += tn;
                }
                true
            }
            (DType::Q8_0, ActSrc::Q8(y)) if y.len() == nb * n => {
                for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
                    for (t, v) in o.iter_mut().enumerate() {
                        // SAFETY: the row has nb blocks and token t's nb blocks are in y.
                        *v = unsafe { dot_q8_0(row.as_ptr(), y[t * nb..].as_ptr(), nb) };
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Per activation block, `d · (bsums[2j] + bsums[2j+1])` for j in 0..8: the Q4_K minimum
    /// term of a block is then one 8-lane FMA with `dmin · m_j` (instead of an integer
    /// multiply-add, a conversion and a scale per token and block).
    fn pair_bsums(y: &[BlockQ8K]) -> Vec<f32> {
        let mut out = vec![0f32; 8 * y.len()];
        for (o, b) in out.chunks_exact_mut(8).zip(y) {
            for (j, v) in o.iter_mut().enumerate() {
                *v = b.d * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as f32;
            }
        }
        out
    }

    /// `(row blocks, token 0's activation blocks, token 0's pair sums, blocks, token stride in
    /// blocks)` → one result per token.
    type RowFn<const N: usize> =
        unsafe fn(*const u8, *const BlockQ8K, *const f32, usize, usize) -> [f32; N];

    /// Super-blocks per slab of the reduction dimension: a slab of `N` ≤ 8 tokens' activations
    /// (8 · 8 · 292 bytes) stays in L1 while every row of the chunk runs over it; without
    /// slabs, 8192-wide rows (the FFN down projection) streamed the activations from L2.
    const SLAB: usize = 8;

    /// Runs `f` (one row · N tokens) over every row for tokens `t0..t0 + N`; returns N.
    ///
    /// # Safety
    /// `rows` holds whole rows of `nb` blocks (`rb` bytes); `ys` holds ≥ N·nb blocks and `bp`
    /// ≥ 8·N·nb pair sums where `f` reads them (Q4_K).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const N: usize>(
        f: RowFn<N>,
        rows: &[u8],
        rb: usize,
        ys: &[BlockQ8K],
        bp: &[f32],
        nb: usize,
        n: usize,
        t0: usize,
        out: &mut [f32],
    ) -> usize {
        debug_assert!(ys.len() >= N * nb && (bp.is_empty() || bp.len() >= 8 * N * nb));
        let ts = rb / nb;
        // One token (decode) is bound by streaming the weights: keep each row contiguous.
        let slab = if N == 1 { nb } else { SLAB };
        let pf = if N == 1 {
            super::super::prefetch_distance()
        } else {
            0
        };
        for k0 in (0..nb).step_by(slab) {
            let cnt = slab.min(nb - k0);
            for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(n)) {
                if pf > 0 {
                    // The weights `pf` bytes ahead, one row's worth (a prefetch never faults:
                    // past the end of the slice it is a hint about nothing).
                    let ahead = row.as_ptr().wrapping_add(pf);
                    for off in (0..rb).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                    }
                }
                // SAFETY: see the function's contract; blocks k0..k0 + cnt of the row and of
                // each token are in bounds. `bp` is only offset, never read, when empty.
                let r = unsafe {
                    f(
                        row.as_ptr().add(k0 * ts),
                        ys.as_ptr().add(k0),
                        bp.as_ptr().wrapping_add(8 * k0),
                        cnt,
                        nb,
                    )
                };
                let o = &mut o[t0..t0 + N];
                if k0 == 0 {
                    o.copy_from_slice(&r);
                } else {
                    for (a, b) in o.iter_mut().zip(r) {
                        *a += b;
                    }
                }
            }
        }
        N
    }

    /// f16 at `p` broadcast to 8 f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }

    /// f16 at `p` broadcast to 16 f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn f16x16(p: *const u8) -> __m512 {
        // SAFETY: the caller guarantees two readable bytes at p.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm512_cvtph_ps(_mm256_set1_epi16(bits as i16))
    }

    /// One Q4_K row · N tokens with 512-bit vectors: each 32-byte chunk of nibbles is
    /// broadcast to both halves of a zmm and shifted by 0 / 4, so one zmm holds sub-blocks
    /// (2j, 2j+1) and pairs with 64 contiguous activation bytes.
    ///
    /// # Safety
    /// `nb` blocks at `w`; for each token t < N, `nb` blocks at `y + t·stride` and (Q4_K)
    /// `8·nb` pair sums at `bp + 8·t·stride` are readable; the CPU has the features.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4k_row_z<const N: usize>(
        w: *const u8,
        y: *const BlockQ8K,
        bp: *const f32,
        nb: usize,
        stride: usize,
    ) -> [f32; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        let m4 = _mm512_set1_epi8(0x0f);
        let zero = _mm512_setzero_si512();
        let shifts = _mm512_inserti64x4(zero, _mm256_set1_epi16(4), 1);
        // After packing dpbusd results of chunks (2c, 2c+1), 128-bit lane L holds sub-blocks
        // (4c + L/2·1 … ): lanes 0,1 → (4c, 4c+2), lanes 2,3 → (4c+1, 4c+3).
        const fn q4_lane(s: i64, l: i64) -> i64 {
            (s + l) * 0x0101_0101 + (s + 2 + l) * 0x0101_0101_0000_0000
        }
        let masks = [
            _mm256_set_epi64x(q4_lane(0, 1), q4_lane(0, 1), q4_lane(0, 0), q4_lane(0, 0)),
            _mm256_set_epi64x(q4_lane(4, 1), q4_lane(4, 1), q4_lane(4, 0), q4_lane(4, 0)),
        ];
        for i in 0..nb {
            // SAFETY: block i < nb of the row and of each of the N tokens is in bounds.
            unsafe {
                let b = w.add(144 * i);
                let d = f16x16(b);
                let dmin = _mm256_sub_ps(_mm256_setzero_ps(), f16x8(b.add(2)));
                let (sc, m) = k4_scales(&*(b.add(4) as *const [u8; 12]));
                let scv = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128(i64::from_le_bytes(sc)));
                let sp = [
                    _mm512_cvtepu8_epi16(_mm256_shuffle_epi8(scv, masks[0])),
                    _mm512_cvtepu8_epi16(_mm256_shuffle_epi8(scv, masks[1])),
                ];
                // −dmin · m_j as f32 (upper 8 lanes 0), against the pair sums from `pair_bsums`.
                let mf = _mm512_zextps256_ps512(_mm256_mul_ps(
                    dmin,
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(
                        i64::from_le_bytes(m),
                    ))),
                ));
                let qs = b.add(16);
                let mut q = [zero; 4];
                for (j, qj) in q.iter_mut().enumerate() {
                    let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        qs.add(32 * j) as *const __m256i
                    ));
                    *qj = _mm512_and_si512(_mm512_srlv_epi16(v, shifts), m4);
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let yb = &*y.add(t * stride + i);
                    let yq = yb.qs.as_ptr();
                    let mut s = [zero; 4];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let yv = _mm512_loadu_si512(yq.add(64 * j) as *const __m512i);
                        *sj = _mm512_dpbusd_epi32(zero, q[j], yv);
                    }
                    let sumi = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(s[0], s[1]), sp[0]);
                    let sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(s[2], s[3]), sp[1]);
                    *a = _mm512_fmadd_ps(
                        _mm512_mul_ps(d, _mm512_set1_ps(yb.d)),
                        _mm512_cvtepi32_ps(sumi),
                        *a,
                    );
                    // Upper 8 lanes: 0 · 0.
                    let pb = _mm512_zextps256_ps512(_mm256_loadu_ps(bp.add(8 * (t * stride + i))));
                    *a = _mm512_fmadd_ps(mf, pb, *a);
                }
            }
        }
        let mut out = [0f32; N];
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = _mm512_reduce_add_ps(*a);
        }
        out
    }

    /// One Q6_K row · N tokens with 512-bit vectors: 64 bytes of low bits plus the matching
    /// 32 bytes of high bits (broadcast, shifted per half) give two zmm of 6-bit values.
    ///
    /// # Safety
    /// As [`q4k_row_z`] (without the pair sums).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q6k_row_z<const N: usize>(
        w: *const u8,
        y: *const BlockQ8K,
        _bp: *const f32,
        nb: usize,
        stride: usize,
    ) -> [f32; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        let m4 = _mm512_set1_epi8(0x0f);
        let m30 = _mm512_set1_epi8(0x30);
        let zero = _mm512_setzero_si512();
        // qh shifts: left 4 | left 2 for the low nibbles, right 0 | right 2 for the high ones.
        let shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
        let shr = _mm512_inserti64x4(zero, _mm256_set1_epi16(2), 1);
        // Zmm k holds 16-element sub-blocks 4k..4k+4, one per 128-bit lane L; after packing
        // (zmm 2c, zmm 2c+1), lane L holds sub-blocks (8c + L, 8c + 4 + L).
        const fn q6_lane(s: i64, l: i64) -> i64 {
            (s + l) * 0x0101_0101 + (s + 4 + l) * 0x0101_0101_0000_0000
        }
        let masks = [
            _mm256_set_epi64x(q6_lane(0, 3), q6_lane(0, 2), q6_lane(0, 1), q6_lane(0, 0)),
            _mm256_set_epi64x(q6_lane(8, 3), q6_lane(8, 2), q6_lane(8, 1), q6_lane(8, 0)),
        ];
        for i in 0..nb {
            // SAFETY: block i < nb of the row and of each of the N tokens is in bounds.
            unsafe {
                let b = w.add(210 * i);
                let d = f16x16(b.add(208));
                let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
                // −32 · scales, for the −32 offset through the block sums.
                let nsc32 = _mm256_sub_epi16(
                    _mm256_setzero_si256(),
                    _mm256_slli_epi16(_mm256_cvtepi8_epi16(scales), 5),
                );
                let scv = _mm256_broadcastsi128_si256(scales);
                let sp = [
                    _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(scv, masks[0])),
                    _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(scv, masks[1])),
                ];
                let mut q = [zero; 4];
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(b.add(64 * h) as *const __m512i);
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        b.add(128 + 32 * h) as *const __m256i
                    ));
                    q[2 * h] = _mm512_or_si512(
                        _mm512_and_si512(ql, m4),
                        _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30),
                    );
                    q[2 * h + 1] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30),
                    );
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let yb = &*y.add(t * stride + i);
                    let yq = yb.qs.as_ptr();
                    let mut s = [zero; 4];
                    for (k, sk) in s.iter_mut().enumerate() {
                        let yv = _mm512_loadu_si512(yq.add(64 * k) as *const __m512i);
                        *sk = _mm512_dpbusd_epi32(zero, q[k], yv);
                    }
                    let bs = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                    let off = _mm512_zextsi256_si512(_mm256_madd_epi16(bs, nsc32));
                    let sumi = _mm512_dpwssd_epi32(off, _mm512_packs_epi32(s[0], s[1]), sp[0]);
                    let sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(s[2], s[3]), sp[1]);
                    *a = _mm512_fmadd_ps(
                        _mm512_mul_ps(d, _mm512_set1_ps(yb.d)),
                        _mm512_cvtepi32_ps(sumi),
                        *a,
                    );
                }
            }
        }
        let mut out = [0f32; N];
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = _mm512_reduce_add_ps(*a);
        }
        out
    }

    /// One Q8_0 row · one token: `vpdpbusd` of |w| by sign(w)·y, four accumulators.
    ///
    /// # Safety
    /// `nb` blocks at `w` (34 bytes each) and at `y` are readable; the CPU has the features.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_q8_0(w: *const u8, y: *const BlockQ8, nb: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 4 <= nb {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: block i + k < nb of both inputs (caller).
                let (d, s) = unsafe { q8_0_block(w, y, i + k) };
                *a = _mm256_fmadd_ps(d, s, *a);
            }
            i += 4;
        }
        while i < nb {
            // SAFETY: block i < nb of both inputs (caller).
            let (d, s) = unsafe { q8_0_block(w, y, i) };
            acc[0] = _mm256_fmadd_ps(d, s, acc[0]);
            i += 1;
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }

    /// Block `i` of a Q8_0 row and its activations: (d_w·d_y, integer dot as f32).
    ///
    /// # Safety
    /// Block `i` of `w` (34-byte blocks) and of `y` is readable; the CPU has the features.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn q8_0_block(w: *const u8, y: *const BlockQ8, i: usize) -> (__m256, __m256) {
        // SAFETY: see the function's contract.
        unsafe {
            let b = w.add(34 * i);
            let yb = &*y.add(i);
            let q = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let yv = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            let s = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_abs_epi8(q),
                _mm256_sign_epi8(yv, q),
            );
            let d = _mm256_mul_ps(f16x8(b), _mm256_set1_ps(yb.d));
            (d, _mm256_cvtepi32_ps(s))
        }
    }
}
