//! "Legacy" GGML quants: blocks of 32 elements with one f16 scale (and a min for the `_1`
//! variants).
//!
//! Byte layouts (all little-endian; `y[j]` is the j-th of the block's 32 outputs):
//!
//! | type | bytes | layout                                              | value                |
//! |------|-------|-----------------------------------------------------|----------------------|
//! | Q4_0 | 18    | `d: f16`, `qs: [u8; 16]`                            | `d * (q - 8)`        |
//! | Q4_1 | 20    | `d: f16`, `m: f16`, `qs: [u8; 16]`                  | `d * q + m`          |
//! | Q5_0 | 22    | `d: f16`, `qh: u32`, `qs: [u8; 16]`                 | `d * (q - 16)`       |
//! | Q5_1 | 24    | `d: f16`, `m: f16`, `qh: u32`, `qs: [u8; 16]`       | `d * q + m`          |
//! | Q8_0 | 34    | `d: f16`, `qs: [i8; 32]`                            | `d * q`              |
//!
//! 4-bit quants: `qs[j] & 0x0F` is element `j` and `qs[j] >> 4` is element `j + 16` (j < 16).
//! Q5 types add a fifth (high) bit: bit `j` of the little-endian `qh` belongs to element `j`.
//!
//! Quantisers follow ggml's `quantize_row_*_ref` exactly (same float operations and order):
//! Q4_0/Q5_0 take the signed value of largest magnitude `max` and use `d = max / -8` (or `-16`)
//! and `q = min(15, trunc(x / d + 8.5))`; the `_1` types use `d = (max - min) / 15` (or `31`),
//! `m = min` and `q = trunc((x - min) / d + 0.5)`; Q8_0 uses `d = amax / 127`,
//! `q = roundf(x / d)` (halves away from zero). "`x / d`" is computed as `x * (1 / d)`.

use super::{f16_at, put_f16};

/// Elements per block.
pub const QK: usize = 32;

/// 4-bit value of element `j` (0..32) from the packed nibbles.
#[inline]
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < QK / 2 {
        qs[j] & 0x0F
    } else {
        qs[j - QK / 2] >> 4
    }
}

pub fn dequantize_block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * (nibble(qs, j) as i32 - 8) as f32;
    }
}

pub fn dequantize_block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, y) in y.iter_mut().enumerate() {
        *y = d * nibble(qs, j) as f32 + m;
    }
}

pub fn dequantize_block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, y) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) as i32 | ((((qh >> j) & 1) as i32) << 4);
        *y = d * (q - 16) as f32;
    }
}

pub fn dequantize_block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, y) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) as u32 | (((qh >> j) & 1) << 4);
        *y = d * q as f32 + m;
    }
}

pub fn dequantize_block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (q, y) in b[2..34].iter().zip(y.iter_mut()) {
        *y = *q as i8 as f32 * d;
    }
}

/// The element of largest magnitude (the first one on ties), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 quants of up to 5 bits: low nibbles into `qs` (16 bytes), fifth bits into `qh`.
fn pack(q: &[u8; QK], qs: &mut [u8], qh: Option<&mut [u8]>) {
    for j in 0..QK / 2 {
        qs[j] = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
    }
    if let Some(qh) = qh {
        let mut h = 0u32;
        for (j, &v) in q.iter().enumerate() {
            h |= ((v as u32 >> 4) & 1) << j;
        }
        qh.copy_from_slice(&h.to_le_bytes());
    }
}

pub fn quantize_block_q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inv(d);
    put_f16(b, 0, d);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
    }
    pack(&q, &mut b[2..18], None);
}

pub fn quantize_block_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (((v - min) * id + 0.5).trunc() as i32).clamp(0, 15) as u8;
    }
    pack(&q, &mut b[4..20], None);
}

pub fn quantize_block_q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inv(d);
    put_f16(b, 0, d);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id + 16.5).trunc() as i32).clamp(0, 31) as u8;
    }
    let (qh, qs) = b[2..22].split_at_mut(4);
    pack(&q, qs, Some(qh));
}

pub fn quantize_block_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (((v - min) * id + 0.5).trunc() as i32).clamp(0, 31) as u8;
    }
    let (qh, qs) = b[4..24].split_at_mut(4);
    pack(&q, qs, Some(qh));
}

pub fn quantize_block_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(b, 0, d);
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        *q = ((v * id).round() as i32).clamp(-128, 127) as i8 as u8;
    }
}
