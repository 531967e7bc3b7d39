//! Portable kernels: one weight row times one token's activations, and row dequantisation.
//!
//! Each quantised block is decoded to small integers and dotted with the activation quants in
//! i32, then scaled in f32 — the same arithmetic as the SIMD kernels, so the two agree to f32
//! rounding. Block layouts are GGML's (facts from ggml-common.h):
//! - Q4_0 `{d f16, qs[16]}`: element j = low nibble of qs[j] − 8, element j+16 = high nibble − 8.
//! - Q4_1 `{d, m f16, qs[16]}`: d·q + m. Q5_0 `{d, qh u32, qs[16]}`: bit j of qh is bit 4 of
//!   element j; −16. Q5_1 `{d, m, qh, qs}`. Q8_0 `{d, qs[32] i8}`.
//! - Q4_K `{d, dmin f16, scales[12], qs[128]}`: 8 sub-blocks of 32 with 6-bit scale/min; each
//!   32 bytes of qs hold two sub-blocks (low nibbles, then high nibbles).
//! - Q5_K `{d, dmin, scales[12], qh[32], qs[128]}`: as Q4_K, bit 2j/2j+1 of qh[l] extends
//!   sub-block 2j/2j+1.
//! - Q6_K `{ql[128], qh[64], scales[16] i8, d}`: 16 sub-blocks of 16, values 0..63 − 32.
//!
//! Rows and activations are walked with `chunks_exact`/`zip`, so a short input truncates
//! instead of panicking (callers check shapes).

use half::{bf16, f16};

use super::quantize::{BlockQ8, BlockQ8K};
use super::ActSrc;
use flowgate_formats::DType;

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One weight row · one token.
pub fn dot(dtype: DType, row: &[u8], x: &ActSrc) -> f32 {
    match (dtype, *x) {
        (DType::F32, ActSrc::F32(x)) => dot_f32(row, x),
        (DType::F16, ActSrc::F32(x)) => row
            .chunks_exact(2)
            .zip(x)
            .map(|(b, &v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        (DType::BF16, ActSrc::F32(x)) => row
            .chunks_exact(2)
            .zip(x)
            .map(|(b, &v)| bf16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        (DType::Q4_0, ActSrc::Q8(y)) => dot_q4_0(row, y),
        (DType::Q4_1, ActSrc::Q8(y)) => dot_q4_1(row, y),
        (DType::Q5_0, ActSrc::Q8(y)) => dot_q5_0(row, y),
        (DType::Q5_1, ActSrc::Q8(y)) => dot_q5_1(row, y),
        (DType::Q8_0, ActSrc::Q8(y)) => dot_q8_0(row, y),
        (DType::Q4K, ActSrc::Q8K(y)) => dot_q4k(row, y),
        (DType::Q5K, ActSrc::Q8K(y)) => dot_q5k(row, y),
        (DType::Q6K, ActSrc::Q8K(y)) => dot_q6k(row, y),
        // `ActSrc::of` always pairs a dtype with its format; Q8K is no weight dtype.
        _ => f32::NAN,
    }
}

fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, xs) in row.chunks_exact(32).zip(x.chunks_exact(8)) {
        for k in 0..8 {
            let w = f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]);
            acc[k] = w.mul_add(xs[k], acc[k]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    let done = row.len() / 32 * 8;
    for (b, &v) in row[done * 4..].chunks_exact(4).zip(&x[done.min(x.len())..]) {
        s += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v;
    }
    s
}

fn idot32(q: &[i32; 32], y: &[i8; 32]) -> i32 {
    q.iter().zip(y).map(|(&a, &b)| a * b as i32).sum()
}

fn nibbles(qs: &[u8]) -> [i32; 32] {
    let mut q = [0i32; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) as i32;
        q[j + 16] = (qs[j] >> 4) as i32;
    }
    q
}

fn fifth_bits(q: &mut [i32; 32], qh: u32) {
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) << 4) as i32;
    }
}

fn dot_q4_0(row: &[u8], y: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(18).zip(y) {
        let mut q = nibbles(&b[2..18]);
        q.iter_mut().for_each(|v| *v -= 8);
        acc += f16_at(b, 0) * yb.d * idot32(&q, &yb.qs) as f32;
    }
    acc
}

fn dot_q4_1(row: &[u8], y: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(20).zip(y) {
        let q = nibbles(&b[4..20]);
        acc += f16_at(b, 0) * yb.d * idot32(&q, &yb.qs) as f32 + f16_at(b, 2) * yb.s;
    }
    acc
}

fn dot_q5_0(row: &[u8], y: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(22).zip(y) {
        let mut q = nibbles(&b[6..22]);
        fifth_bits(&mut q, u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
        q.iter_mut().for_each(|v| *v -= 16);
        acc += f16_at(b, 0) * yb.d * idot32(&q, &yb.qs) as f32;
    }
    acc
}

fn dot_q5_1(row: &[u8], y: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(24).zip(y) {
        let mut q = nibbles(&b[8..24]);
        fifth_bits(&mut q, u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        acc += f16_at(b, 0) * yb.d * idot32(&q, &yb.qs) as f32 + f16_at(b, 2) * yb.s;
    }
    acc
}

fn dot_q8_0(row: &[u8], y: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(34).zip(y) {
        let s: i32 = b[2..34]
            .iter()
            .zip(&yb.qs)
            .map(|(&a, &c)| a as i8 as i32 * c as i32)
            .sum();
        acc += f16_at(b, 0) * yb.d * s as f32;
    }
    acc
}

fn dot_q4k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(144).zip(y) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs = &b[16..144];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let q = &qs[32 * j..32 * j + 32];
            let y8 = &yb.qs[64 * j..64 * j + 64];
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                s1 += (q[l] & 0x0f) as i32 * y8[l] as i32;
                s2 += (q[l] >> 4) as i32 * y8[32 + l] as i32;
            }
            sumi += sc1 as i32 * s1 + sc2 as i32 * s2;
            let bs = &yb.bsums[4 * j..4 * j + 4];
            summ += m1 as i32 * (bs[0] as i32 + bs[1] as i32)
                + m2 as i32 * (bs[2] as i32 + bs[3] as i32);
        }
        acc += yb.d * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

fn dot_q5k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(176).zip(y) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let q = &qs[32 * j..32 * j + 32];
            let y8 = &yb.qs[64 * j..64 * j + 64];
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                let lo = (q[l] & 0x0f) as i32 | ((((qh[l] >> (2 * j)) & 1) as i32) << 4);
                let hi = (q[l] >> 4) as i32 | ((((qh[l] >> (2 * j + 1)) & 1) as i32) << 4);
                s1 += lo * y8[l] as i32;
                s2 += hi * y8[32 + l] as i32;
            }
            sumi += sc1 as i32 * s1 + sc2 as i32 * s2;
            let bs = &yb.bsums[4 * j..4 * j + 4];
            summ += m1 as i32 * (bs[0] as i32 + bs[1] as i32)
                + m2 as i32 * (bs[2] as i32 + bs[3] as i32);
        }
        acc += yb.d * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// Q6_K block to its 256 signed values (−32..31).
fn q6k_values(b: &[u8]) -> [i8; 256] {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut q = [0i8; 256];
    for n in 0..2 {
        let (ql, qh, o) = (&ql[64 * n..], &qh[32 * n..], 128 * n);
        for l in 0..32 {
            let h = qh[l];
            q[o + l] = ((ql[l] & 0x0f) | ((h & 3) << 4)) as i8 - 32;
            q[o + l + 32] = ((ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) as i8 - 32;
            q[o + l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            q[o + l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

fn dot_q6k(row: &[u8], y: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, yb) in row.chunks_exact(210).zip(y) {
        let q = q6k_values(b);
        let sc = &b[192..208];
        let mut sumi = 0i32;
        for g in 0..16 {
            let s: i32 = q[16 * g..16 * g + 16]
                .iter()
                .zip(&yb.qs[16 * g..16 * g + 16])
                .map(|(&a, &c)| a as i32 * c as i32)
                .sum();
            sumi += sc[g] as i8 as i32 * s;
        }
        acc += yb.d * f16_at(b, 208) * sumi as f32;
    }
    acc
}

/// Dequantises one row (`out.len()` elements) of `dtype`.
pub fn dequantize(dtype: DType, row: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
            let ts = dtype.type_size();
            for (b, o) in row.chunks_exact(ts).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let (m, qs_off, qh) = match dtype {
                    DType::Q4_0 => (-8.0 * d, 2, None),
                    DType::Q4_1 => (f16_at(b, 2), 4, None),
                    DType::Q5_0 => (
                        -16.0 * d,
                        6,
                        Some(u32::from_le_bytes([b[2], b[3], b[4], b[5]])),
                    ),
                    _ => (
                        f16_at(b, 2),
                        8,
                        Some(u32::from_le_bytes([b[4], b[5], b[6], b[7]])),
                    ),
                };
                let mut q = nibbles(&b[qs_off..qs_off + 16]);
                if let Some(qh) = qh {
                    fifth_bits(&mut q, qh);
                }
                for (o, &v) in o.iter_mut().zip(&q) {
                    *o = d * v as f32 + m;
                }
            }
        }
        DType::Q8_0 => {
            for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (o, &v) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * v as i8 as f32;
                }
            }
        }
        DType::Q4K | DType::Q5K => {
            let k5 = dtype == DType::Q5K;
            let ts = dtype.type_size();
            for (b, o) in row.chunks_exact(ts).zip(out.chunks_exact_mut(256)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if k5 {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                for j in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        let mut lo = (qs[32 * j + l] & 0x0f) as i32;
                        let mut hi = (qs[32 * j + l] >> 4) as i32;
                        if k5 {
                            lo |= (((qh[l] >> (2 * j)) & 1) as i32) << 4;
                            hi |= (((qh[l] >> (2 * j + 1)) & 1) as i32) << 4;
                        }
                        o[64 * j + l] = d1 * lo as f32 - mm1;
                        o[64 * j + 32 + l] = d2 * hi as f32 - mm2;
                    }
                }
            }
        }
        DType::Q6K => {
            for (b, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let q = q6k_values(b);
                let d = f16_at(b, 208);
                for (i, o) in o.iter_mut().enumerate() {
                    *o = d * (b[192 + i / 16] as i8) as f32 * q[i] as f32;
                }
            }
        }
        DType::Q8K => out.fill(f32::NAN),
    }
}
