//! Hugging Face model directories: `config.json` → [`ModelSpec`], safetensors headers →
//! [`TensorCatalog`] under canonical (GGUF-style) names.
//!
//! Design choices:
//! - [`HfConfig`] keeps the raw JSON object and reads keys on demand with typed accessors, so
//!   both key styles real checkpoints use are accepted wherever they can appear:
//!   transformers-4 (`rope_theta` + `rope_scaling`, `num_experts`) and transformers-5
//!   (`rope_parameters`, `num_local_experts`). Like transformers, `rope_scaling` wins over
//!   `rope_parameters`, and a `rope_theta` inside the dict wins over a top-level one.
//! - Absent keys take the defaults of transformers' own config classes (`configuration_*.py`
//!   of transformers 5, see [`ArchDefaults`]), so a config saved without a key means what it
//!   means to HF.
//! - Features a [`ModelSpec`] cannot express (a bias on `o_proj`, `clip_qkv`, partial rotary,
//!   yarn/dynamic rope, per-layer mixes of sliding and full attention, activations other than
//!   SiLU) are errors, never silently dropped.
//! - Tensor names are mapped by [`map_name`]; tensors the model does not use (rotary
//!   `inv_freq`, layers or experts past the configured counts, `lm_head` of a tied model) are
//!   skipped, as transformers skips unexpected keys. Fused transformers-5 expert tensors
//!   (`mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`) become
//!   per-expert entries that point into them (gate = first `I` rows of an expert's slice, up =
//!   the next `I`).
//! - HF checkpoints use `rotate_half` rope: [`RopeStyle::Halves`] for every architecture.

use std::path::Path;

use serde_json::{Map, Value};

use crate::catalog::{names, TensorCatalog, TensorInfo};
use crate::error::{FormatError, Result};
use crate::model::{check_catalog, ModelFile, ModelSource};
use crate::safetensors::{read_dir_headers, SafetensorsEntry};
use crate::spec::{Arch, ModelSpec, MoeSpec, QkNorm, RopeScaling, RopeSpec, RopeStyle};

/// A parsed `config.json`: the architecture plus the raw key/value object.
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub model_type: String,
    pub arch: Arch,
    pub raw: Map<String, Value>,
}

/// Parses the text of a `config.json`.
pub fn parse_config(json: &str) -> Result<HfConfig> {
    let v: Value = serde_json::from_str(json).map_err(|e| FormatError::Json {
        path: "config.json".into(),
        msg: e.to_string(),
    })?;
    let Value::Object(raw) = v else {
        return Err(FormatError::Config(
            "config.json is not a JSON object".into(),
        ));
    };
    let model_type = match raw.get("model_type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(FormatError::Config("'model_type' is not a string".into())),
        None => {
            return Err(FormatError::Config(
                "config.json has no 'model_type'".into(),
            ))
        }
    };
    let arch = Arch::from_hf(&model_type)?;
    Ok(HfConfig {
        model_type,
        arch,
        raw,
    })
}

impl HfConfig {
    /// The value of `key`; `None` when absent or `null`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn type_err(key: &str, want: &str, v: &Value) -> FormatError {
        FormatError::Config(format!("'{key}' should be {want}, found {v}"))
    }

    /// A non-negative integer (an integral float is accepted too).
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| value_u64(v).ok_or_else(|| Self::type_err(key, "a non-negative integer", v)))
            .transpose()
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| Self::type_err(key, "a number", v)))
            .transpose()
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Self::type_err(key, "a boolean", v))
            })
            .transpose()
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| Self::type_err(key, "a string", v)))
            .transpose()
    }

    /// An integer or a list of integers (e.g. `eos_token_id`).
    pub fn u64_list_opt(&self, key: &str) -> Result<Option<Vec<u64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let err = || Self::type_err(key, "an integer or a list of integers", v);
        match v {
            Value::Array(a) => a
                .iter()
                .map(|x| value_u64(x).ok_or_else(err))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            _ => value_u64(v).map(|x| Some(vec![x])).ok_or_else(err),
        }
    }

    /// The first of `keys` that is present and not null.
    fn u64_any(&self, keys: &[&str]) -> Result<Option<u64>> {
        for k in keys {
            if let Some(v) = self.u64_opt(k)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
            .map(|f| f as u64)
    })
}

/// Defaults of transformers' config classes (transformers 5, `configuration_<arch>.py`), used
/// for keys a `config.json` leaves out.
#[derive(Clone, Debug)]
pub struct ArchDefaults {
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    /// `None`: same as the attention head count.
    pub num_key_value_heads: Option<u64>,
    /// `None`: hidden / heads.
    pub head_dim: Option<u64>,
    pub max_position_embeddings: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Value of `sliding_window` when the key is absent.
    pub sliding_window: Option<u64>,
    pub num_experts: u64,
    pub num_experts_per_tok: u64,
    /// `moe_intermediate_size` (qwen MoE only).
    pub moe_intermediate_size: u64,
    pub shared_expert_intermediate_size: u64,
    pub norm_topk_prob: bool,
}

/// transformers' defaults for `arch`.
pub fn defaults(arch: Arch) -> ArchDefaults {
    // Qwen2Config is the base the qwen rows share.
    let qwen = ArchDefaults {
        vocab_size: 151936,
        hidden_size: 4096,
        intermediate_size: 22016,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: Some(32),
        head_dim: None,
        max_position_embeddings: 32768,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        bos_token_id: None,
        eos_token_id: None,
        sliding_window: Some(4096),
        num_experts: 0,
        num_experts_per_tok: 0,
        moe_intermediate_size: 0,
        shared_expert_intermediate_size: 0,
        norm_topk_prob: false,
    };
    match arch {
        Arch::Llama => ArchDefaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            max_position_embeddings: 2048,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            sliding_window: None,
            ..qwen
        },
        Arch::Mistral => ArchDefaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            max_position_embeddings: 4096 * 32,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            sliding_window: Some(4096),
            ..qwen
        },
        Arch::Mixtral => ArchDefaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            sliding_window: None,
            num_experts: 8,
            num_experts_per_tok: 2,
            norm_topk_prob: true,
            ..qwen
        },
        Arch::Qwen2 => qwen,
        Arch::Qwen3 => ArchDefaults {
            head_dim: Some(128),
            ..qwen
        },
        Arch::Qwen2Moe => ArchDefaults {
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            num_experts: 60,
            num_experts_per_tok: 4,
            moe_intermediate_size: 1408,
            shared_expert_intermediate_size: 5632,
            ..qwen
        },
        Arch::Qwen3Moe => ArchDefaults {
            hidden_size: 2048,
            intermediate_size: 6144,
            num_hidden_layers: 24,
            num_attention_heads: 32,
            num_key_value_heads: Some(4),
            num_experts: 128,
            num_experts_per_tok: 8,
            moe_intermediate_size: 768,
            ..qwen
        },
        Arch::Olmoe => ArchDefaults {
            vocab_size: 50304,
            hidden_size: 2048,
            intermediate_size: 2048,
            num_hidden_layers: 16,
            num_attention_heads: 16,
            num_key_value_heads: None,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            bos_token_id: None,
            eos_token_id: Some(50279),
            sliding_window: None,
            num_experts: 64,
            num_experts_per_tok: 8,
            ..qwen
        },
    }
}

/// More layers than any real model has; larger counts are rejected before per-layer allocation.
pub const MAX_LAYERS: u64 = 1 << 16;

fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| FormatError::Config(format!("{what} {v} is too large")))
}

fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| FormatError::Config(format!("{what} {v} does not fit in 32 bits")))
}

/// The rope settings of a config: `rope_scaling` or `rope_parameters` (either style).
fn rope_from_config(cfg: &HfConfig, d: &ArchDefaults) -> Result<RopeSpec> {
    let dict = match (cfg.get("rope_scaling"), cfg.get("rope_parameters")) {
        (Some(Value::Object(m)), _) => Some(m),
        (Some(v), _) => {
            return Err(FormatError::Config(format!(
                "'rope_scaling' should be an object, found {v}"
            )))
        }
        (None, Some(Value::Object(m))) => Some(m),
        (None, Some(v)) => {
            return Err(FormatError::Config(format!(
                "'rope_parameters' should be an object, found {v}"
            )))
        }
        (None, None) => None,
    };
    let empty = Map::new();
    let dict = dict.unwrap_or(&empty);
    let num = |key: &str| -> Result<Option<f64>> {
        match dict.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                FormatError::Config(format!(
                    "rope parameter '{key}' should be a number, found {v}"
                ))
            }),
        }
    };
    let theta = match num("rope_theta")? {
        Some(t) => t,
        None => cfg.f64_opt("rope_theta")?.unwrap_or(d.rope_theta),
    };
    let rope_type = match dict.get("rope_type").or_else(|| dict.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(FormatError::Config(format!(
                "rope type should be a string, found {v}"
            )))
        }
    };
    if let Some(p) = num("partial_rotary_factor")?.or(cfg.f64_opt("partial_rotary_factor")?) {
        if p != 1.0 {
            return Err(FormatError::Config(format!(
                "partial_rotary_factor {p} is not supported (only 1.0)"
            )));
        }
    }
    let need = |key: &str| -> Result<f64> {
        num(key)?
            .ok_or_else(|| FormatError::Config(format!("rope type '{rope_type}' needs '{key}'")))
    };
    let scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")? as f32,
        }),
        "llama3" => {
            let omp = need("original_max_position_embeddings")?;
            if !(omp.is_finite() && omp >= 1.0 && omp <= u32::MAX as f64) {
                return Err(FormatError::Config(format!(
                    "original_max_position_embeddings {omp} is out of range"
                )));
            }
            Some(RopeScaling::Llama3 {
                factor: need("factor")? as f32,
                low_freq_factor: need("low_freq_factor")? as f32,
                high_freq_factor: need("high_freq_factor")? as f32,
                original_max_position: omp as u32,
            })
        }
        other => {
            return Err(FormatError::Config(format!(
                "rope type '{other}' is not supported (default, linear, llama3)"
            )))
        }
    };
    if let Some(RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. }) = scaling {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(FormatError::Config(format!(
                "rope scaling factor {factor} is not positive"
            )));
        }
    }
    Ok(RopeSpec {
        theta: theta as f32,
        style: RopeStyle::Halves,
        scaling,
    })
}

/// Which layers use sliding-window attention, as transformers decides it, reduced to the one
/// window [`ModelSpec`] can express.
fn sliding_window_from_config(
    cfg: &HfConfig,
    d: &ArchDefaults,
    n_layers: u64,
) -> Result<Option<usize>> {
    let window = match cfg.raw.get("sliding_window") {
        None => d.sliding_window,
        Some(Value::Null) => None,
        Some(_) => cfg.u64_opt("sliding_window")?,
    }
    .filter(|&w| w > 0);
    let arch = cfg.arch;
    let sliding: Vec<bool> = match arch {
        Arch::Llama | Arch::Olmoe => return Ok(None),
        // Mistral and Mixtral attention use `config.sliding_window` in every layer.
        Arch::Mistral | Arch::Mixtral => {
            return window.map(|w| usize_of(w, "sliding_window")).transpose()
        }
        Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe => {
            if !cfg.bool_opt("use_sliding_window")?.unwrap_or(false) {
                return Ok(None);
            }
            let Some(_) = window else {
                return Ok(None);
            };
            if let Some(v) = cfg.get("layer_types") {
                let a = v.as_array().ok_or_else(|| {
                    FormatError::Config(format!("'layer_types' should be a list, found {v}"))
                })?;
                a.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(FormatError::Config(format!(
                            "unsupported layer type {t} in 'layer_types'"
                        ))),
                    })
                    .collect::<Result<Vec<bool>>>()?
            } else {
                let mwl = cfg.u64_opt("max_window_layers")?.unwrap_or(28);
                (0..n_layers)
                    .map(|i| match arch {
                        // Qwen2MoeConfig.__post_init__.
                        Arch::Qwen2Moe => (i + 1) % 2 == 1 && i < mwl,
                        // Qwen3MoeAttention applies config.sliding_window everywhere.
                        Arch::Qwen3Moe => true,
                        // Qwen2Config / Qwen3Config.__post_init__.
                        _ => i >= mwl,
                    })
                    .collect()
            }
        }
    };
    if sliding.iter().all(|&s| s) && !sliding.is_empty() {
        window.map(|w| usize_of(w, "sliding_window")).transpose()
    } else if sliding.iter().all(|&s| !s) {
        Ok(None)
    } else {
        Err(FormatError::Config(
            "a mix of sliding-window and full-attention layers is not supported".into(),
        ))
    }
}

/// Builds the canonical [`ModelSpec`] from a parsed config.
pub fn spec_from_config(cfg: &HfConfig) -> Result<ModelSpec> {
    let arch = cfg.arch;
    let d = defaults(arch);
    if let Some(act) = cfg.str_opt("hidden_act")? {
        if act != "silu" && act != "swish" {
            return Err(FormatError::Config(format!(
                "hidden_act '{act}' is not supported (silu)"
            )));
        }
    }
    if cfg.bool_opt("mlp_bias")?.unwrap_or(false) {
        return Err(FormatError::Config("mlp_bias=true is not supported".into()));
    }
    if let Some(c) = cfg.f64_opt("clip_qkv")? {
        return Err(FormatError::Config(format!(
            "clip_qkv={c} is not supported"
        )));
    }
    let vocab = cfg.u64_opt("vocab_size")?.unwrap_or(d.vocab_size);
    let hidden = cfg.u64_opt("hidden_size")?.unwrap_or(d.hidden_size);
    let inter = cfg
        .u64_opt("intermediate_size")?
        .unwrap_or(d.intermediate_size);
    let n_layers = cfg
        .u64_opt("num_hidden_layers")?
        .unwrap_or(d.num_hidden_layers);
    // Checked before anything is allocated per layer.
    if n_layers > MAX_LAYERS {
        return Err(FormatError::Config(format!(
            "num_hidden_layers {n_layers} is absurdly large"
        )));
    }
    let heads = cfg
        .u64_opt("num_attention_heads")?
        .unwrap_or(d.num_attention_heads);
    if heads == 0 {
        return Err(FormatError::Config("num_attention_heads is 0".into()));
    }
    let kv_heads = match cfg.raw.get("num_key_value_heads") {
        None => d.num_key_value_heads.unwrap_or(heads),
        Some(Value::Null) => heads,
        Some(_) => cfg.u64_opt("num_key_value_heads")?.unwrap_or(heads),
    };
    let head_dim = match cfg.raw.get("head_dim") {
        None => d.head_dim.unwrap_or(hidden / heads),
        Some(Value::Null) => hidden / heads,
        Some(_) => cfg.u64_opt("head_dim")?.unwrap_or(hidden / heads),
    };
    let rms_eps = cfg.f64_opt("rms_norm_eps")?.unwrap_or(d.rms_norm_eps);
    let max_pos = cfg
        .u64_opt("max_position_embeddings")?
        .unwrap_or(d.max_position_embeddings);
    let rope = rope_from_config(cfg, &d)?;
    let sliding_window = sliding_window_from_config(cfg, &d, n_layers)?;
    let tied = cfg.bool_opt("tie_word_embeddings")?.unwrap_or(false);

    // Attention biases. Qwen2 always has q/k/v biases (and none on o_proj); qwen2_moe's
    // `qkv_bias` defaults to true. Elsewhere `attention_bias` also puts a bias on o_proj, which
    // ModelSpec cannot express; Mistral and Mixtral attention have no bias at all.
    let qkv_bias = match arch {
        Arch::Qwen2 => true,
        Arch::Qwen2Moe => cfg.bool_opt("qkv_bias")?.unwrap_or(true),
        Arch::Mistral | Arch::Mixtral => false,
        Arch::Llama | Arch::Qwen3 | Arch::Qwen3Moe | Arch::Olmoe => {
            if cfg.bool_opt("attention_bias")?.unwrap_or(false) {
                return Err(FormatError::Config(format!(
                    "attention_bias=true ({arch}: biases on q, k, v and o_proj) is not supported"
                )));
            }
            false
        }
    };
    let qk_norm = match arch {
        Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::Full,
        _ => QkNorm::None,
    };

    let n_layers_us = usize_of(n_layers, "num_hidden_layers")?;
    let mut ffn = usize_of(inter, "intermediate_size")?;
    let moe = if arch.is_moe() {
        let n_experts = match arch {
            Arch::Mixtral | Arch::Qwen3Moe => cfg.u64_any(&["num_local_experts", "num_experts"])?,
            _ => cfg.u64_any(&["num_experts", "num_local_experts"])?,
        }
        .unwrap_or(d.num_experts);
        let used = cfg
            .u64_opt("num_experts_per_tok")?
            .unwrap_or(d.num_experts_per_tok);
        let (expert_ffn, norm_topk, shared) = match arch {
            // MixtralSparseMoeBlock always renormalises the top-k weights.
            Arch::Mixtral => (inter, true, None),
            Arch::Olmoe => (
                inter,
                cfg.bool_opt("norm_topk_prob")?.unwrap_or(d.norm_topk_prob),
                None,
            ),
            Arch::Qwen2Moe => (
                cfg.u64_opt("moe_intermediate_size")?
                    .unwrap_or(d.moe_intermediate_size),
                cfg.bool_opt("norm_topk_prob")?.unwrap_or(d.norm_topk_prob),
                Some(
                    cfg.u64_opt("shared_expert_intermediate_size")?
                        .unwrap_or(d.shared_expert_intermediate_size),
                )
                .filter(|&w| w > 0),
            ),
            _ => (
                cfg.u64_opt("moe_intermediate_size")?
                    .unwrap_or(d.moe_intermediate_size),
                cfg.bool_opt("norm_topk_prob")?.unwrap_or(d.norm_topk_prob),
                None,
            ),
        };
        let sparse_layers: Vec<bool> = match arch {
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let step = cfg.u64_opt("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(FormatError::Config("decoder_sparse_step is 0".into()));
                }
                let mlp_only = match cfg.get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(_) => cfg.u64_list_opt("mlp_only_layers")?.unwrap_or_default(),
                };
                (0..n_layers)
                    .map(|l| !mlp_only.contains(&l) && n_experts > 0 && (l + 1) % step == 0)
                    .collect()
            }
            _ => vec![n_experts > 0; n_layers_us],
        };
        if sparse_layers.iter().all(|&s| !s) {
            None
        } else {
            if sparse_layers.iter().all(|&s| s) {
                ffn = 0;
            }
            Some(MoeSpec {
                n_experts: usize_of(n_experts, "num_experts")?,
                n_experts_used: usize_of(used, "num_experts_per_tok")?,
                expert_ffn: usize_of(expert_ffn, "expert intermediate size")?,
                norm_topk_prob: norm_topk,
                shared_expert_ffn: shared
                    .map(|w| usize_of(w, "shared_expert_intermediate_size"))
                    .transpose()?,
                sparse_layers,
            })
        }
    } else {
        None
    };

    let bos = match cfg.raw.get("bos_token_id") {
        None => d.bos_token_id,
        Some(Value::Null) => None,
        Some(_) => cfg
            .u64_opt("bos_token_id")?
            .map(|b| u32_of(b, "bos_token_id"))
            .transpose()?,
    };
    let eos = match cfg.raw.get("eos_token_id") {
        None => d.eos_token_id.into_iter().collect(),
        Some(Value::Null) => Vec::new(),
        Some(_) => cfg
            .u64_list_opt("eos_token_id")?
            .unwrap_or_default()
            .into_iter()
            .map(|e| u32_of(e, "eos_token_id"))
            .collect::<Result<Vec<u32>>>()?,
    };

    let spec = ModelSpec {
        arch,
        vocab_size: usize_of(vocab, "vocab_size")?,
        hidden: usize_of(hidden, "hidden_size")?,
        n_layers: n_layers_us,
        n_heads: usize_of(heads, "num_attention_heads")?,
        n_kv_heads: usize_of(kv_heads, "num_key_value_heads")?,
        head_dim: usize_of(head_dim, "head_dim")?,
        ffn,
        rms_eps: rms_eps as f32,
        rope,
        sliding_window,
        qkv_bias,
        qk_norm,
        tied_embeddings: tied,
        moe,
        context_length: Some(usize_of(max_pos, "max_position_embeddings")?),
        bos_token_id: bos,
        eos_token_ids: eos,
    };
    spec.validate()?;
    Ok(spec)
}

/// What an HF tensor name becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HfTensor {
    /// One canonical tensor.
    Canonical(String),
    /// transformers-5 fused `model.layers.{layer}.mlp.experts.gate_up_proj` `[E, 2I, H]`.
    FusedGateUp { layer: usize },
    /// transformers-5 fused `model.layers.{layer}.mlp.experts.down_proj` `[E, H, I]`.
    FusedDown { layer: usize },
    /// Not used by the model (e.g. `rotary_emb.inv_freq`).
    Ignored,
}

/// Maps an HF tensor name to its canonical name (see [`crate::catalog::names`]).
pub fn map_name(hf: &str) -> HfTensor {
    match hf {
        "model.embed_tokens.weight" => return HfTensor::Canonical(names::TOKEN_EMBD.into()),
        "model.norm.weight" => return HfTensor::Canonical(names::OUTPUT_NORM.into()),
        "lm_head.weight" => return HfTensor::Canonical(names::OUTPUT.into()),
        _ => {}
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return HfTensor::Ignored;
    };
    let Some((idx, rest)) = rest.split_once('.') else {
        return HfTensor::Ignored;
    };
    let Some(l) = parse_index(idx) else {
        return HfTensor::Ignored;
    };
    let c = |suffix: &str| HfTensor::Canonical(names::blk(l, suffix));
    let fixed = match rest {
        "input_layernorm.weight" => Some("attn_norm.weight"),
        "post_attention_layernorm.weight" => Some("ffn_norm.weight"),
        "self_attn.q_proj.weight" => Some("attn_q.weight"),
        "self_attn.k_proj.weight" => Some("attn_k.weight"),
        "self_attn.v_proj.weight" => Some("attn_v.weight"),
        "self_attn.o_proj.weight" => Some("attn_output.weight"),
        "self_attn.q_proj.bias" => Some("attn_q.bias"),
        "self_attn.k_proj.bias" => Some("attn_k.bias"),
        "self_attn.v_proj.bias" => Some("attn_v.bias"),
        "self_attn.o_proj.bias" => Some("attn_output.bias"),
        "self_attn.q_norm.weight" => Some("attn_q_norm.weight"),
        "self_attn.k_norm.weight" => Some("attn_k_norm.weight"),
        "mlp.gate_proj.weight" => Some("ffn_gate.weight"),
        "mlp.up_proj.weight" => Some("ffn_up.weight"),
        "mlp.down_proj.weight" => Some("ffn_down.weight"),
        "mlp.gate.weight" | "block_sparse_moe.gate.weight" => Some("ffn_gate_inp.weight"),
        "mlp.shared_expert.gate_proj.weight" => Some("ffn_gate_shexp.weight"),
        "mlp.shared_expert.up_proj.weight" => Some("ffn_up_shexp.weight"),
        "mlp.shared_expert.down_proj.weight" => Some("ffn_down_shexp.weight"),
        "mlp.shared_expert_gate.weight" => Some("ffn_gate_inp_shexp.weight"),
        "mlp.experts.gate_up_proj" | "mlp.experts.gate_up_proj.weight" => {
            return HfTensor::FusedGateUp { layer: l }
        }
        "mlp.experts.down_proj" | "mlp.experts.down_proj.weight" => {
            return HfTensor::FusedDown { layer: l }
        }
        _ => None,
    };
    if let Some(s) = fixed {
        return c(s);
    }
    // Per-expert tensors: `mlp.experts.{e}.{gate,up,down}_proj.weight` (qwen MoE, olmoe) or
    // `block_sparse_moe.experts.{e}.w{1,3,2}.weight` (mixtral: w1 gate, w3 up, w2 down).
    let (experts, qwen_style) = if let Some(r) = rest.strip_prefix("mlp.experts.") {
        (r, true)
    } else if let Some(r) = rest.strip_prefix("block_sparse_moe.experts.") {
        (r, false)
    } else {
        return HfTensor::Ignored;
    };
    let Some((e, proj)) = experts.split_once('.') else {
        return HfTensor::Ignored;
    };
    let Some(e) = parse_index(e) else {
        return HfTensor::Ignored;
    };
    let stem = match (proj, qwen_style) {
        ("gate_proj.weight", true) | ("w1.weight", false) => "ffn_gate",
        ("up_proj.weight", true) | ("w3.weight", false) => "ffn_up",
        ("down_proj.weight", true) | ("w2.weight", false) => "ffn_down",
        _ => return HfTensor::Ignored,
    };
    c(&format!("{stem}.{e}.weight"))
}

/// Canonical name of an HF tensor, when it maps to exactly one.
pub fn canonical_name(hf: &str) -> Option<String> {
    match map_name(hf) {
        HfTensor::Canonical(s) => Some(s),
        _ => None,
    }
}

/// A decimal index without sign or leading zeros.
fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Layer index and (for per-expert names) expert index of a canonical name.
fn canonical_indices(name: &str) -> (Option<usize>, Option<usize>) {
    let Some(rest) = name.strip_prefix("blk.") else {
        return (None, None);
    };
    let mut parts = rest.split('.');
    let layer = parts.next().and_then(parse_index);
    let _stem = parts.next();
    let expert = match (parts.next(), parts.next()) {
        (Some(e), Some("weight")) => parse_index(e),
        _ => None,
    };
    (layer, expert)
}

fn info_from_entry(name: String, e: &SafetensorsEntry, file: usize) -> TensorInfo {
    TensorInfo {
        name,
        source_name: e.name.clone(),
        dtype: e.dtype,
        shape: e.shape.clone(),
        file,
        offset: e.offset,
        nbytes: e.nbytes,
    }
}

/// Splits a fused `[E, 2I, H]` gate_up tensor into per-expert gate and up entries.
fn split_gate_up(
    cat: &mut TensorCatalog,
    spec: &ModelSpec,
    fused: &TensorInfo,
    layer: usize,
) -> Result<()> {
    let Some(m) = &spec.moe else {
        return Ok(());
    };
    let (e, i, h) = (m.n_experts as u64, m.expert_ffn as u64, spec.hidden as u64);
    let expected = vec![e, 2 * i, h];
    if fused.shape != expected {
        if fused.shape == [e, h, 2 * i] {
            return Err(FormatError::BadTensor {
                tensor: fused.source_name.clone(),
                msg: format!(
                    "transposed fused experts [experts, hidden, 2*intermediate] = {:?} are not supported (expected {expected:?})",
                    fused.shape
                ),
            });
        }
        return Err(FormatError::ShapeMismatch {
            tensor: fused.source_name.clone(),
            found: fused.shape.clone(),
            expected,
        });
    }
    for x in 0..m.n_experts {
        let slice = fused.slice_outer(x as u64, String::new())?;
        cat.insert(slice.rows(0, i, names::blk(layer, &format!("ffn_gate.{x}.weight")))?)?;
        cat.insert(slice.rows(i, i, names::blk(layer, &format!("ffn_up.{x}.weight")))?)?;
    }
    Ok(())
}

/// Splits a fused `[E, H, I]` down tensor into per-expert entries.
fn split_down(
    cat: &mut TensorCatalog,
    spec: &ModelSpec,
    fused: &TensorInfo,
    layer: usize,
) -> Result<()> {
    let Some(m) = &spec.moe else {
        return Ok(());
    };
    let (e, i, h) = (m.n_experts as u64, m.expert_ffn as u64, spec.hidden as u64);
    let expected = vec![e, h, i];
    if fused.shape != expected {
        if fused.shape == [e, i, h] {
            return Err(FormatError::BadTensor {
                tensor: fused.source_name.clone(),
                msg: format!(
                    "transposed fused experts [experts, intermediate, hidden] = {:?} are not supported (expected {expected:?})",
                    fused.shape
                ),
            });
        }
        return Err(FormatError::ShapeMismatch {
            tensor: fused.source_name.clone(),
            found: fused.shape.clone(),
            expected,
        });
    }
    for x in 0..m.n_experts {
        cat.insert(
            fused.slice_outer(x as u64, names::blk(layer, &format!("ffn_down.{x}.weight")))?,
        )?;
    }
    Ok(())
}

/// Builds the canonical catalog of safetensors files (already parsed headers) for `spec`.
pub fn catalog_from_headers(
    spec: &ModelSpec,
    files: &[(std::path::PathBuf, crate::safetensors::SafetensorsHeader)],
) -> Result<TensorCatalog> {
    let mut cat = TensorCatalog::new(files.iter().map(|(p, _)| p.clone()).collect());
    let n_experts = spec.moe.as_ref().map_or(0, |m| m.n_experts);
    for (fi, (_, h)) in files.iter().enumerate() {
        for e in &h.tensors {
            match map_name(&e.name) {
                HfTensor::Ignored => {}
                HfTensor::Canonical(name) => {
                    if name == names::OUTPUT && spec.tied_embeddings {
                        continue;
                    }
                    let (layer, expert) = canonical_indices(&name);
                    if layer.is_some_and(|l| l >= spec.n_layers)
                        || expert.is_some_and(|x| x >= n_experts)
                    {
                        continue;
                    }
                    cat.insert(info_from_entry(name, e, fi))?;
                }
                HfTensor::FusedGateUp { layer } if layer < spec.n_layers => split_gate_up(
                    &mut cat,
                    spec,
                    &info_from_entry(e.name.clone(), e, fi),
                    layer,
                )?,
                HfTensor::FusedDown { layer } if layer < spec.n_layers => split_down(
                    &mut cat,
                    spec,
                    &info_from_entry(e.name.clone(), e, fi),
                    layer,
                )?,
                HfTensor::FusedGateUp { .. } | HfTensor::FusedDown { .. } => {}
            }
        }
    }
    Ok(cat)
}

/// Adds `generation_config.json`'s end-of-sequence ids (and its bos id when the config has
/// none): HF `generate` stops on those. A missing or unreadable file changes nothing.
fn merge_generation_config(dir: &Path, spec: &mut ModelSpec) {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return;
    };
    let Ok(Value::Object(raw)) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let g = HfConfig {
        model_type: String::new(),
        arch: spec.arch,
        raw,
    };
    if let Ok(Some(eos)) = g.u64_list_opt("eos_token_id") {
        for e in eos {
            if let Ok(e) = u32::try_from(e) {
                if !spec.eos_token_ids.contains(&e) {
                    spec.eos_token_ids.push(e);
                }
            }
        }
    }
    if spec.bos_token_id.is_none() {
        if let Ok(Some(b)) = g.u64_opt("bos_token_id") {
            spec.bos_token_id = u32::try_from(b).ok();
        }
    }
}

/// Opens an HF model directory: `config.json` plus `model.safetensors` or a sharded set with
/// `model.safetensors.index.json`.
pub fn open_dir(dir: &Path) -> Result<ModelFile> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| FormatError::io(&config_path, e))?;
    let cfg = parse_config(&text).map_err(|e| match e {
        FormatError::Json { msg, .. } => FormatError::Json {
            path: config_path.clone(),
            msg,
        },
        other => other,
    })?;
    let mut spec = spec_from_config(&cfg)?;
    merge_generation_config(dir, &mut spec);
    let files = read_dir_headers(dir)?;
    let catalog = catalog_from_headers(&spec, &files)?;
    check_catalog(&spec, &catalog)?;
    let name = cfg
        .str_opt("_name_or_path")
        .ok()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| dir.display().to_string());
    Ok(ModelFile {
        spec,
        catalog,
        source: ModelSource::HfDir(dir.to_path_buf()),
        name,
    })
}
