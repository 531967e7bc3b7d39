//! GGUF metadata → [`ModelSpec`], GGUF tensor infos → [`TensorCatalog`].
//!
//! Design choices:
//! - Keys are llama.cpp's (`{arch}.block_count`, `{arch}.attention.head_count`, …). Supported
//!   `general.architecture` values: `llama` (and `mistral`; with `{arch}.expert_count` > 0 it
//!   is Mixtral), `qwen2`, `qwen3`, `qwen2moe`, `qwen3moe`, `olmoe`.
//! - Rope style follows llama.cpp's `llama_model_rope_type`: `llama` is "normal" rope
//!   ([`RopeStyle::Interleaved`]; its converter permutes q/k rows to make that match HF),
//!   the qwen families and olmoe are "neox" ([`RopeStyle::Halves`]).
//! - Which layers are sparse is read from the tensors (a layer with `ffn_gate_inp` is a MoE
//!   layer), which covers llama.cpp's all-sparse files and files with dense layers alike.
//! - `norm_topk_prob` comes from `{arch}.expert_weights_norm` when present, otherwise from what
//!   llama.cpp's graph hard-codes: true for llama (Mixtral) and qwen3moe, false for qwen2moe
//!   and olmoe.
//! - Llama 3 rope scaling lives in the `rope_freqs.weight` tensor in GGUF (kept in the catalog
//!   for the engine); `rope.scaling.type = linear` becomes [`RopeScaling::Linear`].
//! - GGUF names are already canonical; shapes are turned outermost-first.

use std::path::Path;

use crate::catalog::{names, TensorCatalog, TensorInfo};
use crate::error::{FormatError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::spec::{Arch, ModelSpec, MoeSpec, QkNorm, RopeScaling, RopeSpec, RopeStyle};

/// The flowgate architecture for a GGUF `general.architecture` (and whether it has experts).
fn arch_of(name: &str, has_experts: bool) -> Result<Arch> {
    Ok(match name {
        "llama" | "mistral" | "mixtral" if has_experts => Arch::Mixtral,
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "qwen2moe" => Arch::Qwen2Moe,
        "qwen3moe" => Arch::Qwen3Moe,
        "olmoe" => Arch::Olmoe,
        other => return Err(FormatError::UnknownArchitecture(other.to_string())),
    })
}

/// Reads `{arch}.*` keys with clear errors.
struct Keys<'a> {
    g: &'a GgufFile,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// An integer, or an array of equal integers (llama.cpp allows per-layer arrays for some
    /// keys; flowgate needs them uniform).
    fn u64_opt(&self, k: &str) -> Result<Option<u64>> {
        let key = self.key(k);
        let Some(v) = self.g.get(&key) else {
            return Ok(None);
        };
        let bad = || FormatError::Metadata(format!("'{key}' should be a non-negative integer"));
        match v {
            GgufValue::Array(a) => {
                let vals = a
                    .iter()
                    .map(|x| x.as_u64().ok_or_else(bad))
                    .collect::<Result<Vec<u64>>>()?;
                match vals.split_first() {
                    None => Err(FormatError::Metadata(format!("'{key}' is an empty array"))),
                    Some((first, rest)) if rest.iter().all(|x| x == first) => Ok(Some(*first)),
                    Some(_) => Err(FormatError::Metadata(format!(
                        "'{key}' differs between layers; per-layer values are not supported"
                    ))),
                }
            }
            GgufValue::Bool(_) => Err(bad()),
            _ => v.as_u64().map(Some).ok_or_else(bad),
        }
    }

    fn u64_req(&self, k: &str) -> Result<u64> {
        self.u64_opt(k)?
            .ok_or_else(|| FormatError::MissingKey(self.key(k)))
    }

    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        let key = self.key(k);
        match self.g.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| FormatError::Metadata(format!("'{key}' should be a number"))),
        }
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>> {
        let key = self.key(k);
        match self.g.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| FormatError::Metadata(format!("'{key}' should be a boolean"))),
        }
    }

    fn str_opt(&self, k: &str) -> Result<Option<&str>> {
        let key = self.key(k);
        match self.g.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| FormatError::Metadata(format!("'{key}' should be a string"))),
        }
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| FormatError::Metadata(format!("{what} {v} is too large")))
}

/// A token id key (`tokenizer.ggml.*_token_id`), if present.
fn token_id(g: &GgufFile, key: &str) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| FormatError::Metadata(format!("'{key}' is not a valid token id"))),
    }
}

/// Builds the [`ModelSpec`] of a GGUF file from its metadata (and, for a few properties such
/// as tied embeddings and sparse layers, from which tensors exist).
pub fn spec_from_gguf(g: &GgufFile) -> Result<ModelSpec> {
    let arch_name = g.architecture()?;
    let k = Keys { g, arch: arch_name };
    let n_experts = k.u64_opt("expert_count")?.unwrap_or(0);
    let arch = arch_of(arch_name, n_experts > 0)?;

    let n_layers = k.u64_req("block_count")?;
    if n_layers > crate::hf::MAX_LAYERS {
        return Err(FormatError::Metadata(format!(
            "block count {n_layers} is absurdly large"
        )));
    }
    let hidden = k.u64_req("embedding_length")?;
    let heads = k.u64_req("attention.head_count")?;
    if heads == 0 {
        return Err(FormatError::Metadata(format!(
            "'{}' is 0",
            k.key("attention.head_count")
        )));
    }
    let kv_heads = k.u64_opt("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = k.u64_opt("attention.key_length")?.unwrap_or(hidden / heads);
    if let Some(vl) = k.u64_opt("attention.value_length")? {
        if vl != head_dim {
            return Err(FormatError::Metadata(format!(
                "value head size {vl} differs from key head size {head_dim}; not supported"
            )));
        }
    }
    if let Some(rd) = k.u64_opt("rope.dimension_count")? {
        if rd != head_dim {
            return Err(FormatError::Metadata(format!(
                "rope over {rd} of {head_dim} head dimensions (partial rotary) is not supported"
            )));
        }
    }
    let rms_eps = k
        .f64_opt("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| FormatError::MissingKey(k.key("attention.layer_norm_rms_epsilon")))?;
    let theta = k.f64_opt("rope.freq_base")?.unwrap_or(10000.0);
    let scaling = match k.str_opt("rope.scaling.type")? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = k
                .f64_opt("rope.scaling.factor")?
                .ok_or_else(|| FormatError::MissingKey(k.key("rope.scaling.factor")))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(FormatError::Metadata(format!(
                    "rope scaling factor {factor} is not positive"
                )));
            }
            // A factor of 1 is no scaling at all.
            (factor != 1.0).then_some(RopeScaling::Linear {
                factor: factor as f32,
            })
        }
        Some(other) => {
            return Err(FormatError::Metadata(format!(
                "rope scaling type '{other}' is not supported (none, linear)"
            )))
        }
    };
    let style = match arch {
        Arch::Llama | Arch::Mistral | Arch::Mixtral => RopeStyle::Interleaved,
        _ => RopeStyle::Halves,
    };

    let vocab = match k.u64_opt("vocab_size")? {
        Some(v) => v,
        None => match g.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
            Some(a) => a.len() as u64,
            None => g
                .tensor(names::TOKEN_EMBD)
                .map(|t| t.shape().first().copied().unwrap_or(0))
                .ok_or_else(|| {
                    FormatError::Metadata(
                        "vocabulary size unknown: no vocab_size, tokens or token_embd".into(),
                    )
                })?,
        },
    };

    let has = |name: &str| g.tensor(name).is_some();
    let qkv_bias = match arch {
        Arch::Qwen2 | Arch::Qwen2Moe => true,
        _ => has("blk.0.attn_q.bias"),
    };
    if has("blk.0.attn_output.bias") {
        return Err(FormatError::Metadata(
            "an attention output bias (attn_output.bias) is not supported".into(),
        ));
    }
    let qk_norm = match arch {
        Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::Full,
        _ => QkNorm::None,
    };
    let sliding_window = k
        .u64_opt("attention.sliding_window")?
        .filter(|&w| w > 0)
        .map(|w| to_usize(w, "sliding window"))
        .transpose()?;

    let n_layers_us = to_usize(n_layers, "block count")?;
    let ffn_key = k.u64_opt("feed_forward_length")?;
    let mut ffn = 0u64;
    let moe = if n_experts > 0 {
        if let Some(f) = k.u64_opt("expert_gating_func")? {
            // llama.cpp: 1 = softmax, 2 = sigmoid.
            if f != 1 {
                return Err(FormatError::Metadata(format!(
                    "expert gating function {f} is not supported (softmax)"
                )));
            }
        }
        let used = k.u64_req("expert_used_count")?;
        let expert_ffn = match k.u64_opt("expert_feed_forward_length")? {
            Some(f) => f,
            None => match arch {
                // Mixtral and OLMoE GGUFs carry the expert width as feed_forward_length.
                Arch::Mixtral | Arch::Olmoe => {
                    ffn_key.ok_or_else(|| FormatError::MissingKey(k.key("feed_forward_length")))?
                }
                _ => return Err(FormatError::MissingKey(k.key("expert_feed_forward_length"))),
            },
        };
        let sparse_layers: Vec<bool> = (0..n_layers_us)
            .map(|l| has(&names::blk(l, "ffn_gate_inp.weight")))
            .collect();
        if !sparse_layers.iter().any(|&s| s) {
            return Err(FormatError::MissingTensor(names::blk(
                0,
                "ffn_gate_inp.weight",
            )));
        }
        if sparse_layers.iter().any(|&s| !s) {
            ffn = ffn_key.ok_or_else(|| FormatError::MissingKey(k.key("feed_forward_length")))?;
        }
        let norm_topk_prob = match k.bool_opt("expert_weights_norm")? {
            Some(b) => b,
            None => matches!(arch, Arch::Mixtral | Arch::Qwen3Moe),
        };
        let shared = match arch {
            Arch::Qwen2Moe => match k.u64_opt("expert_shared_feed_forward_length")? {
                Some(s) => Some(s),
                None => {
                    let first = sparse_layers.iter().position(|&s| s).unwrap_or(0);
                    g.tensor(&names::blk(first, "ffn_up_shexp.weight"))
                        .and_then(|t| t.shape().first().copied())
                }
            },
            _ => None,
        }
        .filter(|&s| s > 0);
        Some(MoeSpec {
            n_experts: to_usize(n_experts, "expert count")?,
            n_experts_used: to_usize(used, "experts used")?,
            expert_ffn: to_usize(expert_ffn, "expert width")?,
            norm_topk_prob,
            shared_expert_ffn: shared
                .map(|s| to_usize(s, "shared expert width"))
                .transpose()?,
            sparse_layers,
        })
    } else {
        ffn = ffn_key.ok_or_else(|| FormatError::MissingKey(k.key("feed_forward_length")))?;
        None
    };

    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token_id(g, key)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }

    let spec = ModelSpec {
        arch,
        vocab_size: to_usize(vocab, "vocab size")?,
        hidden: to_usize(hidden, "embedding length")?,
        n_layers: n_layers_us,
        n_heads: to_usize(heads, "head count")?,
        n_kv_heads: to_usize(kv_heads, "kv head count")?,
        head_dim: to_usize(head_dim, "head size")?,
        ffn: to_usize(ffn, "feed-forward length")?,
        rms_eps: rms_eps as f32,
        rope: RopeSpec {
            theta: theta as f32,
            style,
            scaling,
        },
        sliding_window,
        qkv_bias,
        qk_norm,
        tied_embeddings: !has(names::OUTPUT),
        moe,
        context_length: k
            .u64_opt("context_length")?
            .map(|c| to_usize(c, "context length"))
            .transpose()?,
        bos_token_id: token_id(g, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids: eos,
    };
    spec.validate()?;
    Ok(spec)
}

/// The catalog of a GGUF file: every tensor under its own (already canonical) name.
pub fn catalog_from_gguf(g: &GgufFile, path: &Path) -> Result<TensorCatalog> {
    let mut cat = TensorCatalog::new(vec![path.to_path_buf()]);
    for t in &g.tensors {
        cat.insert(TensorInfo {
            name: t.name.clone(),
            source_name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape(),
            file: 0,
            offset: t.offset,
            nbytes: t.nbytes,
        })?;
    }
    Ok(cat)
}
