//! GGUF quant block layouts and reference (de)quantisation, one row at a time.
//!
//! Design choices:
//! - These are the *correctness references*: plain scalar loops written to mirror the block
//!   layouts, with arithmetic in the same order as ggml's reference C code (and the python
//!   `gguf` package), so results are bit-identical to theirs. Fast kernels live in the engine
//!   and are tested against these.
//! - A row of `n` elements is `n / block_size` consecutive blocks; every function checks the
//!   slice lengths up front and returns [`FormatError`] instead of panicking.
//! - Families: [`float`] (F32, F16, BF16), [`legacy`] (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, blocks of
//!   32), [`kquants`] (Q4_K, Q5_K, Q6_K, Q8_K, super-blocks of 256). Each file documents its
//!   byte layouts.
//! - Quantisers exist for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml's `_ref` rounding,
//!   bit-exact) and Q8_K (the activation format, bit-exact). Q4_K has a simple quantiser of
//!   its own (bounded error, not ggml's iterative scale search, so bytes differ from
//!   llama.cpp's); Q5_K/Q6_K have none.

pub mod float;
pub mod kquants;
pub mod legacy;

use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// Checks that `src` holds exactly a row of `n` elements of `dtype`; returns blocks in the row.
fn check_row(dtype: DType, bytes: usize, n: usize) -> Result<usize> {
    let want = dtype.row_bytes(n as u64)?;
    if bytes as u64 != want {
        return Err(FormatError::Other(format!(
            "{} row of {n} elements needs {want} bytes, got {bytes}",
            dtype.name()
        )));
    }
    Ok(n / dtype.block_size())
}

/// Dequantises one row: `dst.len()` elements from `src`, which must be exactly
/// `dtype.row_bytes(dst.len())` bytes.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row(dtype, src.len(), dst.len())?;
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    let blocks = src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs));
    match dtype {
        DType::F32 => blocks.for_each(|(s, d)| float::dequantize_f32(s, d)),
        DType::F16 => blocks.for_each(|(s, d)| float::dequantize_f16(s, d)),
        DType::BF16 => blocks.for_each(|(s, d)| float::dequantize_bf16(s, d)),
        DType::Q4_0 => blocks.for_each(|(s, d)| legacy::dequantize_block_q4_0(s, d)),
        DType::Q4_1 => blocks.for_each(|(s, d)| legacy::dequantize_block_q4_1(s, d)),
        DType::Q5_0 => blocks.for_each(|(s, d)| legacy::dequantize_block_q5_0(s, d)),
        DType::Q5_1 => blocks.for_each(|(s, d)| legacy::dequantize_block_q5_1(s, d)),
        DType::Q8_0 => blocks.for_each(|(s, d)| legacy::dequantize_block_q8_0(s, d)),
        DType::Q4K => blocks.for_each(|(s, d)| kquants::dequantize_block_q4_k(s, d)),
        DType::Q5K => blocks.for_each(|(s, d)| kquants::dequantize_block_q5_k(s, d)),
        DType::Q6K => blocks.for_each(|(s, d)| kquants::dequantize_block_q6_k(s, d)),
        DType::Q8K => blocks.for_each(|(s, d)| kquants::dequantize_block_q8_k(s, d)),
    }
    Ok(())
}

/// Quantises one row to `dtype`; `dst` must be exactly `dtype.row_bytes(src.len())` bytes.
/// Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_K (all bit-exact with ggml's
/// reference quantisers) and Q4_K (a simpler quantiser than ggml's; see
/// [`kquants::quantize_block_q4_k`]).
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row(dtype, dst.len(), src.len())?;
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    let blocks = src.chunks_exact(bs).zip(dst.chunks_exact_mut(ts));
    match dtype {
        DType::F32 => blocks.for_each(|(s, d)| float::quantize_f32(s, d)),
        DType::F16 => blocks.for_each(|(s, d)| float::quantize_f16(s, d)),
        DType::BF16 => blocks.for_each(|(s, d)| float::quantize_bf16(s, d)),
        DType::Q4_0 => blocks.for_each(|(s, d)| legacy::quantize_block_q4_0(s, d)),
        DType::Q4_1 => blocks.for_each(|(s, d)| legacy::quantize_block_q4_1(s, d)),
        DType::Q5_0 => blocks.for_each(|(s, d)| legacy::quantize_block_q5_0(s, d)),
        DType::Q5_1 => blocks.for_each(|(s, d)| legacy::quantize_block_q5_1(s, d)),
        DType::Q8_0 => blocks.for_each(|(s, d)| legacy::quantize_block_q8_0(s, d)),
        DType::Q8K => blocks.for_each(|(s, d)| kquants::quantize_block_q8_k(s, d)),
        DType::Q4K => blocks.for_each(|(s, d)| kquants::quantize_block_q4_k(s, d)),
        DType::Q5K | DType::Q6K => {
            return Err(FormatError::Other(format!(
                "quantising to {} is not implemented",
                dtype.name()
            )))
        }
    }
    Ok(())
}

/// Q8_0 quantisation with ggml's reference rounding (`quantize_row_q8_0_ref`).
pub fn quantize_row_q8_0(src: &[f32], dst: &mut [u8]) -> Result<()> {
    quantize_row(DType::Q8_0, src, dst)
}

/// Q8_K quantisation as ggml's `quantize_row_q8_K_ref` (d f32, qs i8[256], bsums i16[16]).
pub fn quantize_row_q8_k(src: &[f32], dst: &mut [u8]) -> Result<()> {
    quantize_row(DType::Q8K, src, dst)
}

/// Reads a little-endian f16 at `b[0..2]` as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Writes an f32 as little-endian f16 (round to nearest even) at `b[i..i+2]`.
#[inline]
pub(crate) fn put_f16(b: &mut [u8], i: usize, x: f32) {
    b[i..i + 2].copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
}
