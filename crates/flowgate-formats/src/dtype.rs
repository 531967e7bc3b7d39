//! Tensor element types: plain floats and GGUF quantised block types.
//!
//! A quantised tensor is a sequence of blocks along its innermost (row) dimension; a row of
//! `n` elements takes `n / block_size * type_size` bytes. The numeric ids are GGML's.

use crate::error::{FormatError, Result};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// Q8_K is only an activation format (llama.cpp's dot-product partner for K-quants).
    Q8K,
}

impl DType {
    pub const ALL: [DType; 12] = [
        DType::F32,
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

    /// GGML type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::Q8K => 15,
            DType::BF16 => 30,
        }
    }

    /// From a GGML type id; `None` for ids flowgate does not support.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_id() == id)
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K | DType::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::Q8K => 292,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            DType::Q8K => "Q8_K",
        }
    }

    /// Parse a name as printed by [`DType::name`] (case-insensitive).
    pub fn from_name(s: &str) -> Result<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| FormatError::UnknownDTypeName(s.to_string()))
    }

    /// Bytes of a row of `n` elements; errors when `n` is not a multiple of the block size.
    pub fn row_bytes(self, n: u64) -> Result<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return Err(FormatError::Other(format!(
                "row of {n} elements is not a multiple of the {} block size {bs}",
                self.name()
            )));
        }
        (n / bs)
            .checked_mul(self.type_size() as u64)
            .ok_or_else(|| FormatError::Overflow(format!("{n} elements of {}", self.name())))
    }

    /// Bytes of a tensor with this shape (outermost dimension first, innermost last).
    pub fn tensor_bytes(self, shape: &[u64]) -> Result<u64> {
        let inner = *shape.last().unwrap_or(&1);
        let outer = shape[..shape.len().saturating_sub(1)]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| FormatError::Overflow(format!("shape {shape:?}")))?;
        self.row_bytes(inner)?
            .checked_mul(outer)
            .ok_or_else(|| FormatError::Overflow(format!("shape {shape:?}")))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
