//! [`ModelSpec`]: the one canonical description of a model's architecture, whatever file it
//! came from (GGUF metadata or HF `config.json`).

use crate::error::{FormatError, Result};

/// Architecture family. Each maps to a set of options below; the engine runs them all with
/// one decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Arch {
    /// HF `model_type` name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
        }
    }

    /// From an HF `model_type`.
    pub fn from_hf(s: &str) -> Result<Arch> {
        Ok(match s {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            other => return Err(FormatError::UnknownArchitecture(other.to_string())),
        })
    }

    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe
        )
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGML's "normal" rope. GGUF `llama` checkpoints are converted with
    /// q/k rows permuted so that this style reproduces HF's results.
    Interleaved,
    /// Pairs `(i, i + d/2)`: HF's `rotate_half`, GGML's "neox" rope.
    Halves,
}

/// Frequency scaling of rotary embeddings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3's piecewise scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: u32,
    },
    /// Plain position interpolation: positions divided by `factor`.
    Linear { factor: f32 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    pub style: RopeStyle,
    pub scaling: Option<RopeScaling>,
}

/// RMSNorm applied to queries and keys before rope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` values, one weight of `[head_dim]` (qwen3).
    PerHead,
    /// Over the whole projected vector, weights `[n_heads*head_dim]` / `[n_kv_heads*head_dim]`
    /// (olmoe).
    Full,
}

/// Sparse (mixture-of-experts) FFN options.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeSpec {
    pub n_experts: usize,
    pub n_experts_used: usize,
    /// Hidden width of each expert.
    pub expert_ffn: usize,
    /// Renormalise the chosen experts' softmax weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Width of the shared expert (qwen2_moe), gated by `sigmoid(x · w_gate)`.
    pub shared_expert_ffn: Option<usize>,
    /// Per layer: true when the layer's FFN is sparse; dense layers use `ModelSpec::ffn`.
    pub sparse_layers: Vec<bool>,
}

/// Canonical architecture description.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dense FFN hidden width (0 when every layer is sparse).
    pub ffn: usize,
    pub rms_eps: f32,
    pub rope: RopeSpec,
    /// Mistral-style sliding window: a query at position p attends keys at p-w+1..=p.
    pub sliding_window: Option<usize>,
    /// Biases on q, k, v projections (qwen2).
    pub qkv_bias: bool,
    pub qk_norm: QkNorm,
    /// Output projection shares the token embedding.
    pub tied_embeddings: bool,
    pub moe: Option<MoeSpec>,
    /// Training context length, if known.
    pub context_length: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelSpec {
    /// True when layer `l` has a sparse FFN.
    pub fn is_sparse_layer(&self, l: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.sparse_layers.get(l).copied().unwrap_or(false))
    }

    /// Checks internal consistency (head counts divide, widths nonzero, …).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FormatError::Config(m));
        if self.vocab_size == 0 || self.hidden == 0 || self.n_layers == 0 {
            return bad(format!(
                "vocab_size ({}), hidden size ({}) and layer count ({}) must be positive",
                self.vocab_size, self.hidden, self.n_layers
            ));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return bad("head counts and head_dim must be positive".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd", self.head_dim));
        }
        const LIMIT: usize = 1 << 24;
        for (what, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden size", self.hidden),
            ("layer count", self.n_layers),
            ("head count", self.n_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
        ] {
            if v > LIMIT {
                return bad(format!("{what} {v} is absurdly large"));
            }
        }
        if let Some(m) = &self.moe {
            if m.n_experts == 0 || m.n_experts_used == 0 || m.n_experts_used > m.n_experts {
                return bad(format!(
                    "experts used ({}) must be in 1..={} (experts)",
                    m.n_experts_used, m.n_experts
                ));
            }
            if m.n_experts > 1 << 16 || m.expert_ffn == 0 || m.expert_ffn > LIMIT {
                return bad("expert count or expert width out of range".into());
            }
            if m.sparse_layers.len() != self.n_layers {
                return bad("sparse layer list does not match the layer count".into());
            }
            if m.sparse_layers.iter().any(|s| !s) && self.ffn == 0 {
                return bad("dense layers present but dense FFN width is 0".into());
            }
        } else if self.ffn == 0 {
            return bad("FFN width is 0".into());
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            return bad(format!("rope theta {} is not positive", self.rope.theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("rms eps {} is invalid", self.rms_eps));
        }
        Ok(())
    }
}
