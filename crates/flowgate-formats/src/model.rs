//! [`open`]: any model path → [`ModelFile`] (canonical [`ModelSpec`] + [`TensorCatalog`]).
//!
//! A file is read as GGUF, a directory as a Hugging Face checkpoint. Both paths end in
//! [`check_catalog`], which holds the one statement of which tensors a spec implies and with
//! which shapes (see [`expected_tensors`]), so the two formats are validated identically:
//! missing tensor → [`FormatError::MissingTensor`], wrong shape → [`FormatError::ShapeMismatch`],
//! plus dtype support, byte length and "lies inside its file" checks for every tensor.

use std::path::{Path, PathBuf};

use crate::catalog::{names, ExpertProj, TensorCatalog};
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::gguf::GgufFile;
use crate::spec::{ModelSpec, QkNorm};

/// A model, whatever its format.
#[derive(Debug)]
pub struct ModelFile {
    pub spec: ModelSpec,
    pub catalog: TensorCatalog,
    pub source: ModelSource,
    /// A display name (GGUF `general.name`, HF `_name_or_path` or the file/directory name).
    pub name: String,
}

/// Where a model came from.
#[derive(Debug)]
pub enum ModelSource {
    Gguf(Box<GgufFile>),
    HfDir(PathBuf),
}

/// Opens a GGUF file or an HF model directory.
pub fn open(path: &Path) -> Result<ModelFile> {
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if meta.is_dir() {
        return crate::hf::open_dir(path);
    }
    let g = GgufFile::open(path)?;
    let spec = crate::gguf_arch::spec_from_gguf(&g)?;
    let catalog = crate::gguf_arch::catalog_from_gguf(&g, path)?;
    check_catalog(&spec, &catalog)?;
    let name = g
        .get("general.name")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| path.display().to_string());
    Ok(ModelFile {
        spec,
        catalog,
        source: ModelSource::Gguf(Box::new(g)),
        name,
    })
}

fn mul(a: usize, b: usize, what: &str) -> Result<u64> {
    (a as u64)
        .checked_mul(b as u64)
        .ok_or_else(|| FormatError::Overflow(format!("{what}: {a} x {b}")))
}

/// Every non-expert tensor `spec` implies, with its shape (outermost first). Experts are
/// checked separately because they may be merged (`ffn_gate_exps`) or per expert.
pub fn expected_tensors(spec: &ModelSpec) -> Result<Vec<(String, Vec<u64>)>> {
    let h = spec.hidden as u64;
    let v = spec.vocab_size as u64;
    let qd = mul(spec.n_heads, spec.head_dim, "q width")?;
    let kvd = mul(spec.n_kv_heads, spec.head_dim, "kv width")?;
    let mut out = vec![
        (names::TOKEN_EMBD.to_string(), vec![v, h]),
        (names::OUTPUT_NORM.to_string(), vec![h]),
    ];
    if !spec.tied_embeddings {
        out.push((names::OUTPUT.to_string(), vec![v, h]));
    }
    for l in 0..spec.n_layers {
        let n = |s: &str| names::blk(l, s);
        out.push((n("attn_norm.weight"), vec![h]));
        out.push((n("attn_q.weight"), vec![qd, h]));
        out.push((n("attn_k.weight"), vec![kvd, h]));
        out.push((n("attn_v.weight"), vec![kvd, h]));
        out.push((n("attn_output.weight"), vec![h, qd]));
        if spec.qkv_bias {
            out.push((n("attn_q.bias"), vec![qd]));
            out.push((n("attn_k.bias"), vec![kvd]));
            out.push((n("attn_v.bias"), vec![kvd]));
        }
        match spec.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                out.push((n("attn_q_norm.weight"), vec![spec.head_dim as u64]));
                out.push((n("attn_k_norm.weight"), vec![spec.head_dim as u64]));
            }
            QkNorm::Full => {
                out.push((n("attn_q_norm.weight"), vec![qd]));
                out.push((n("attn_k_norm.weight"), vec![kvd]));
            }
        }
        out.push((n("ffn_norm.weight"), vec![h]));
        if spec.is_sparse_layer(l) {
            if let Some(m) = &spec.moe {
                out.push((n("ffn_gate_inp.weight"), vec![m.n_experts as u64, h]));
                if let Some(s) = m.shared_expert_ffn {
                    let s = s as u64;
                    out.push((n("ffn_gate_shexp.weight"), vec![s, h]));
                    out.push((n("ffn_up_shexp.weight"), vec![s, h]));
                    out.push((n("ffn_down_shexp.weight"), vec![h, s]));
                    // HF stores [1, hidden], llama.cpp [hidden]: see check_catalog.
                    out.push((n("ffn_gate_inp_shexp.weight"), vec![1, h]));
                }
            }
        } else {
            let f = spec.ffn as u64;
            out.push((n("ffn_gate.weight"), vec![f, h]));
            out.push((n("ffn_up.weight"), vec![f, h]));
            out.push((n("ffn_down.weight"), vec![h, f]));
        }
    }
    Ok(out)
}

/// Checks that `cat` holds every tensor `spec` implies, with the right shapes; that every
/// tensor's dtype is one the engine computes with, its byte length matches its shape, and its
/// bytes lie inside its file.
pub fn check_catalog(spec: &ModelSpec, cat: &TensorCatalog) -> Result<()> {
    for (name, shape) in expected_tensors(spec)? {
        let t = cat.require(&name)?;
        // A [1, n] tensor may be stored as [n] (llama.cpp drops the leading 1).
        let ok = t.shape == shape || (shape.first() == Some(&1) && t.shape == shape[1..]);
        if !ok {
            return Err(FormatError::ShapeMismatch {
                tensor: name,
                found: t.shape.clone(),
                expected: shape,
            });
        }
    }
    if let Some(m) = &spec.moe {
        let (e, f, h) = (m.n_experts as u64, m.expert_ffn as u64, spec.hidden as u64);
        for l in (0..spec.n_layers).filter(|&l| spec.is_sparse_layer(l)) {
            for proj in [ExpertProj::Gate, ExpertProj::Up, ExpertProj::Down] {
                let one = match proj {
                    ExpertProj::Down => vec![h, f],
                    _ => vec![f, h],
                };
                let merged = names::blk(l, &format!("{}_exps.weight", proj.gguf_stem()));
                if cat.contains(&merged) {
                    let mut want = vec![e];
                    want.extend_from_slice(&one);
                    cat.require_shape(&merged, &want)?;
                } else {
                    for x in 0..m.n_experts {
                        let name = names::blk(l, &format!("{}.{x}.weight", proj.gguf_stem()));
                        cat.require_shape(&name, &one)?;
                    }
                }
            }
        }
    }
    if let Some(t) = cat.get("rope_freqs.weight") {
        cat.require_shape(&t.name, &[spec.head_dim as u64 / 2])?;
    }
    check_placement(cat)
}

/// Dtype, byte length and file bounds of every tensor.
fn check_placement(cat: &TensorCatalog) -> Result<()> {
    let mut file_lens = Vec::with_capacity(cat.files.len());
    for p in &cat.files {
        let len = std::fs::metadata(p)
            .map_err(|e| FormatError::io(p, e))?
            .len();
        file_lens.push(len);
    }
    for t in cat.iter() {
        if t.dtype == DType::Q8K {
            return Err(FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: "Q8_K is an activation format, not a weight type".into(),
            });
        }
        let want = t
            .dtype
            .tensor_bytes(&t.shape)
            .map_err(|e| FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: e.to_string(),
            })?;
        if want != t.nbytes {
            return Err(FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: format!(
                    "{} bytes recorded, but {} {:?} needs {want}",
                    t.nbytes, t.dtype, t.shape
                ),
            });
        }
        let len = *file_lens
            .get(t.file)
            .ok_or_else(|| FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: format!("file index {} out of range", t.file),
            })?;
        let end = t.offset.checked_add(t.nbytes);
        if end.is_none_or(|end| end > len) {
            return Err(FormatError::OutOfBounds {
                tensor: t.name.clone(),
                start: t.offset,
                end: end.unwrap_or(u64::MAX),
                len,
            });
        }
    }
    Ok(())
}
