//! K-quants: super-blocks of 256 elements split into sub-blocks with their own quantised
//! scales.
//!
//! Byte layouts (little-endian; offsets in bytes):
//!
//! - **Q4_K** (144 bytes): `d: f16` @0, `dmin: f16` @2, `scales: [u8; 12]` @4, `qs: [u8; 128]`
//!   @16. Eight sub-blocks of 32, each with a 6-bit scale `sc` and 6-bit min `m` packed in
//!   `scales` (see [`scale_min_k4`]). The 256 quants are 4 chunks of 64: in chunk `c`,
//!   `qs[32c + l] & 0x0F` is element `64c + l` (sub-block `2c`) and `qs[32c + l] >> 4` is
//!   element `64c + 32 + l` (sub-block `2c + 1`). Value: `(d * sc) * q - (dmin * m)`.
//! - **Q5_K** (176 bytes): `d: f16` @0, `dmin: f16` @2, `scales: [u8; 12]` @4,
//!   `qh: [u8; 32]` @16, `qs: [u8; 128]` @48. Low 4 bits as in Q4_K; the fifth bit of element
//!   `32s + l` (sub-block `s`) is bit `s` of `qh[l]`. Value as Q4_K with `q` in 0..32.
//! - **Q6_K** (210 bytes): `ql: [u8; 128]` @0, `qh: [u8; 64]` @128, `scales: [i8; 16]` @192,
//!   `d: f16` @208. Two halves of 128 elements; in half `h`, for `l` in 0..32:
//!   element `128h + l`      = `ql[64h + l] & 0xF`      | `(qh[32h + l] >> 0) & 3` << 4,
//!   element `128h + 32 + l` = `ql[64h + 32 + l] & 0xF` | `(qh[32h + l] >> 2) & 3` << 4,
//!   element `128h + 64 + l` = `ql[64h + l] >> 4`       | `(qh[32h + l] >> 4) & 3` << 4,
//!   element `128h + 96 + l` = `ql[64h + 32 + l] >> 4`  | `(qh[32h + l] >> 6) & 3` << 4.
//!   Element `i` uses `scales[i / 16]`. Value: `(d * scale) * (q - 32)`.
//! - **Q8_K** (292 bytes): `d: f32` @0, `qs: [i8; 256]` @4, `bsums: [i16; 16]` @260 (sum of
//!   each group of 16 quants, for dot products with the K-quant mins). Value: `d * q`.
//!
//! Products are evaluated in exactly the order above (as ggml and python `gguf` do), so the
//! results are bit-identical to theirs.

use super::f16_at;

/// Elements per super-block.
pub const QK_K: usize = 256;

/// Scale and min (6 bits each) of sub-block `j` (0..8) from the 12 packed bytes `s`:
/// for `j < 4`, `sc = s[j] & 63`, `m = s[j + 4] & 63`; otherwise the low 4 bits come from
/// `s[j + 4]` (low nibble: scale, high nibble: min) and the top 2 bits from the top bits of
/// `s[j - 4]` (scale) and `s[j]` (min).
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

pub fn dequantize_block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (i, y) in y.iter_mut().enumerate() {
        let sub = i / 32;
        let l = i % 32;
        let byte = qs[32 * (sub / 2) + l];
        let q = if sub.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        let (sc, m) = scale_min_k4(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        *y = d1 * q as f32 - m1;
    }
}

pub fn dequantize_block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (i, y) in y.iter_mut().enumerate() {
        let sub = i / 32;
        let l = i % 32;
        let byte = qs[32 * (sub / 2) + l];
        let lo = if sub.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        let hi = (qh[l] >> sub) & 1;
        let q = lo | (hi << 4);
        let (sc, m) = scale_min_k4(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        *y = d1 * q as f32 - m1;
    }
}

pub fn dequantize_block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (i, y) in y.iter_mut().enumerate() {
        let h = i / 128;
        let r = i % 128;
        let quarter = r / 32; // 0..4
        let l = r % 32;
        let ql_byte = ql[64 * h + 32 * (quarter % 2) + l];
        let lo = if quarter < 2 {
            ql_byte & 0x0F
        } else {
            ql_byte >> 4
        };
        let hi = (qh[32 * h + l] >> (2 * quarter)) & 3;
        let q = (lo | (hi << 4)) as i32 - 32;
        let sc = scales[i / 16] as i8;
        *y = d * sc as f32 * q as f32;
    }
}

pub fn dequantize_block_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (q, y) in b[4..260].iter().zip(y.iter_mut()) {
        *y = d * (*q as i8) as f32;
    }
}

/// ggml's `quantize_row_q8_K_ref` for one block: `iscale = -127 / max` (max = the signed
/// element of largest magnitude), `q = min(127, round_half_even(iscale * x))`,
/// `d = 1 / iscale`, and the 16 group sums. An all-zero block gives all zeros.
pub fn quantize_block_q8_k(x: &[f32], b: &mut [u8]) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        b.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut q = [0i8; QK_K];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).clamp(-128, 127) as i8;
    }
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (dst, &v) in b[4..260].iter_mut().zip(q.iter()) {
        *dst = v as u8;
    }
    for (g, dst) in b[260..292].chunks_exact_mut(2).enumerate() {
        let s: i16 = q[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
        dst.copy_from_slice(&s.to_le_bytes());
    }
}

/// Packs eight 6-bit scales and mins into the 12-byte layout read by [`scale_min_k4`].
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8], s: &mut [u8]) {
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
}

/// A simple Q4_K quantiser (for making test models; **not** ggml's iterative
/// `quantize_row_q4_K_ref`, so its bytes differ from llama.cpp's, but the format is the same).
///
/// Per sub-block `j` of 32: `mins_j = max(0, -min(x))` and the needed step
/// `(max(x) + m1_j) / 15`. The super-block scales are `dmin = max(mins) / 63` and
/// `d = max(step) / 63` (stored as f16); the 6-bit `m_j` and `sc_j` are rounded *up* so that
/// `[-m1_j, 15 * d1_j - m1_j]` covers the sub-block (`m1 = dmin * m`, `d1 = d * sc`), and each
/// quant is `round((x + m1) / d1)` in 0..=15. The error is at most half a step `d1_j / 2`
/// (plus f16 rounding of the super-block scales).
pub fn quantize_block_q4_k(x: &[f32], b: &mut [u8]) {
    let half_to_f32 = |v: f32| half::f16::from_f32(v).to_f32();
    let mut mins = [0f32; 8];
    let mut maxs = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let (lo, hi) = sub
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        mins[j] = (-lo).max(0.0);
        maxs[j] = hi;
    }
    let ceil_6bit = |v: f32, unit: f32| -> u8 {
        if unit > 0.0 {
            (v / unit).ceil().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let dmin = half_to_f32(mins.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let mut m = [0u8; 8];
    let mut step = [0f32; 8];
    for j in 0..8 {
        m[j] = ceil_6bit(mins[j], dmin);
        step[j] = ((maxs[j] + dmin * m[j] as f32) / 15.0).max(0.0);
    }
    let d = half_to_f32(step.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let mut sc = [0u8; 8];
    for j in 0..8 {
        sc[j] = ceil_6bit(step[j], d);
    }
    super::put_f16(b, 0, d);
    super::put_f16(b, 2, dmin);
    pack_scale_min_k4(&sc, &m, &mut b[4..16]);
    let mut q = [0u8; QK_K];
    for (i, (q, &v)) in q.iter_mut().zip(x).enumerate() {
        let j = i / 32;
        let d1 = d * sc[j] as f32;
        let m1 = dmin * m[j] as f32;
        *q = if d1 > 0.0 {
            ((v + m1) / d1).round().clamp(0.0, 15.0) as u8
        } else {
            0
        };
    }
    for c in 0..4 {
        for l in 0..32 {
            b[16 + 32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
        }
    }
}
