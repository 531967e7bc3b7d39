//! [`TensorCatalog`]: every tensor of a model by its canonical name, with where its bytes lie.
//!
//! Canonical names follow GGUF's (llama.cpp's) naming whatever the source format:
//! `token_embd.weight`, `blk.{i}.attn_q.weight`, `blk.{i}.ffn_gate_exps.weight`, … (see
//! [`names`]). Shapes are outermost-first (PyTorch order): a linear weight is `[out, in]`, and
//! its rows (the innermost dimension) are contiguous, so quant blocks run along rows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Canonical name.
    pub name: String,
    /// Name in the source file (for messages).
    pub source_name: String,
    pub dtype: DType,
    /// Outermost dimension first.
    pub shape: Vec<u64>,
    /// Index into [`TensorCatalog::files`].
    pub file: usize,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Byte length (equals `dtype.tensor_bytes(shape)`).
    pub nbytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The `i`-th slice along the outermost dimension (e.g. one expert of a merged 3-D tensor).
    pub fn slice_outer(&self, i: u64, name: String) -> Result<TensorInfo> {
        let outer = *self.shape.first().ok_or_else(|| FormatError::BadTensor {
            tensor: self.name.clone(),
            msg: "cannot slice a scalar".into(),
        })?;
        if i >= outer {
            return Err(FormatError::BadTensor {
                tensor: self.name.clone(),
                msg: format!("slice {i} out of range 0..{outer}"),
            });
        }
        let sub_shape = self.shape[1..].to_vec();
        let sub_bytes = self.dtype.tensor_bytes(&sub_shape)?;
        Ok(TensorInfo {
            name,
            source_name: format!("{}[{i}]", self.source_name),
            dtype: self.dtype,
            shape: sub_shape,
            file: self.file,
            offset: self.offset + i * sub_bytes,
            nbytes: sub_bytes,
        })
    }

    /// Rows `start..start+len` of the second-outermost... of a 2-D tensor, or of each outer
    /// slice: used to split fused tensors (e.g. HF `gate_up_proj`). Only for 2-D tensors.
    pub fn rows(&self, start: u64, len: u64, name: String) -> Result<TensorInfo> {
        if self.shape.len() != 2 || start.checked_add(len).is_none_or(|e| e > self.shape[0]) {
            return Err(FormatError::BadTensor {
                tensor: self.name.clone(),
                msg: format!("rows {start}..+{len} of shape {:?}", self.shape),
            });
        }
        let row = self.dtype.row_bytes(self.shape[1])?;
        Ok(TensorInfo {
            name,
            source_name: format!("{}[rows {start}..{}]", self.source_name, start + len),
            dtype: self.dtype,
            shape: vec![len, self.shape[1]],
            file: self.file,
            offset: self.offset + start * row,
            nbytes: len * row,
        })
    }
}

/// All tensors of a model.
#[derive(Clone, Debug, Default)]
pub struct TensorCatalog {
    /// Files the tensors live in.
    pub files: Vec<PathBuf>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Which projection of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertProj {
    Gate,
    Up,
    Down,
}

impl ExpertProj {
    pub fn gguf_stem(self) -> &'static str {
        match self {
            ExpertProj::Gate => "ffn_gate",
            ExpertProj::Up => "ffn_up",
            ExpertProj::Down => "ffn_down",
        }
    }
}

impl TensorCatalog {
    pub fn new(files: Vec<PathBuf>) -> Self {
        TensorCatalog {
            files,
            tensors: BTreeMap::new(),
        }
    }

    /// Adds a tensor; errors on a duplicate name.
    pub fn insert(&mut self, t: TensorInfo) -> Result<()> {
        if self.tensors.contains_key(&t.name) {
            return Err(FormatError::BadTensor {
                tensor: t.name,
                msg: "duplicate tensor name".into(),
            });
        }
        self.tensors.insert(t.name.clone(), t);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor, or a `MissingTensor` error.
    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name)
            .ok_or_else(|| FormatError::MissingTensor(name.to_string()))
    }

    /// The tensor, checking its shape.
    pub fn require_shape(&self, name: &str, shape: &[u64]) -> Result<&TensorInfo> {
        let t = self.require(name)?;
        if t.shape != shape {
            return Err(FormatError::ShapeMismatch {
                tensor: name.to_string(),
                found: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes).sum()
    }

    /// Expert `e`'s projection in layer `layer`, whether stored merged
    /// (`blk.{l}.ffn_gate_exps.weight`, shape `[n_experts, out, in]`) or per expert
    /// (`blk.{l}.ffn_gate.{e}.weight`).
    pub fn expert(&self, layer: usize, proj: ExpertProj, e: usize) -> Result<TensorInfo> {
        let stem = proj.gguf_stem();
        let merged = format!("blk.{layer}.{stem}_exps.weight");
        let name = format!("blk.{layer}.{stem}.{e}.weight");
        if let Some(t) = self.get(&merged) {
            if t.shape.len() != 3 {
                return Err(FormatError::BadTensor {
                    tensor: merged,
                    msg: format!("expected 3 dimensions, found shape {:?}", t.shape),
                });
            }
            return t.slice_outer(e as u64, name);
        }
        self.require(&name).cloned()
    }
}

/// Canonical tensor names.
pub mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";

    /// `blk.{layer}.{suffix}`, e.g. `blk(3, "attn_q.weight")`.
    pub fn blk(layer: usize, suffix: &str) -> String {
        format!("blk.{layer}.{suffix}")
    }
}
