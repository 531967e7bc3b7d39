//! Plain float element types (block size 1).
//!
//! - F32: 4 bytes, little-endian IEEE binary32.
//! - F16: 2 bytes, little-endian IEEE binary16; to f32 is exact; from f32 rounds to nearest
//!   even (as numpy's `astype(float16)` and ggml's `GGML_FP32_TO_FP16`).
//! - BF16: 2 bytes, the upper half of an f32; to f32 is a shift; from f32 rounds to nearest
//!   even and turns NaNs into quiet NaNs (as ggml's `ggml_compute_fp32_to_bf16`).
//!
//! The functions take slices of equal element counts (checked by the caller in `quant`).

use super::{f16_at, put_f16};

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (i, y) in dst.iter_mut().enumerate() {
        *y = f16_at(src, 2 * i);
    }
}

pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round-to-nearest-even f32 → bf16 bits, NaN forced quiet.
pub fn f32_to_bf16(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

pub fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (i, &x) in src.iter().enumerate() {
        put_f16(dst, 2 * i, x);
    }
}

pub fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_bf16(*x).to_le_bytes());
    }
}
