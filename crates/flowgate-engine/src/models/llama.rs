//! The decoder block shared by llama, mistral, qwen2 and qwen3 (and the attention of every MoE
//! family): grouped-query attention with optional q/k/v biases (qwen2), q/k RMSNorm per head
//! (qwen3) or over the whole projection (olmoe), rotary embeddings, an optional sliding window
//! (mistral); and the dense SwiGLU FFN `down(silu(gate(x)) * up(x))`.

use flowgate_formats::catalog::names;
use flowgate_formats::{ModelSpec, QkNorm};

use super::TensorSource;
use crate::backend::{AttnParams, Backend, QkRope, SwiGluJob};
use crate::error::Result;

/// Reusable activation buffers for one forward pass.
pub(crate) struct Scratch<B: Backend> {
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    out: B::Buf,
    gate: B::Buf,
    up: B::Buf,
}

impl<B: Backend> Scratch<B> {
    /// The output of the last [`DenseFfn::forward`] (until the next forward writes it).
    pub(crate) fn ffn_out(&self) -> &B::Buf {
        &self.out
    }

    pub(crate) fn new(b: &B, _s: &ModelSpec, _n: usize) -> Result<Self> {
        Ok(Scratch {
            q: b.buf_zeros(0)?,
            k: b.buf_zeros(0)?,
            v: b.buf_zeros(0)?,
            attn: b.buf_zeros(0)?,
            out: b.buf_zeros(0)?,
            gate: b.buf_zeros(0)?,
            up: b.buf_zeros(0)?,
        })
    }
}

pub(crate) struct Attention<B: Backend> {
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    bias: Option<[B::Buf; 3]>,
    q_norm: Option<B::Buf>,
    k_norm: Option<B::Buf>,
}

impl<B: Backend> Attention<B> {
    pub(crate) fn load(b: &B, s: &ModelSpec, l: usize, src: &mut TensorSource) -> Result<Self> {
        let qd = s.n_heads * s.head_dim;
        let kvd = s.n_kv_heads * s.head_dim;
        let n = |suffix: &str| names::blk(l, suffix);
        let wq = src.matrix(b, &n("attn_q.weight"), qd, s.hidden)?;
        let wk = src.matrix(b, &n("attn_k.weight"), kvd, s.hidden)?;
        let wv = src.matrix(b, &n("attn_v.weight"), kvd, s.hidden)?;
        let wo = src.matrix(b, &n("attn_output.weight"), s.hidden, qd)?;
        let bias = if s.qkv_bias {
            Some([
                src.vector(b, &n("attn_q.bias"), qd)?,
                src.vector(b, &n("attn_k.bias"), kvd)?,
                src.vector(b, &n("attn_v.bias"), kvd)?,
            ])
        } else {
            None
        };
        let (q_norm, k_norm) = match s.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(src.vector(b, &n("attn_q_norm.weight"), s.head_dim)?),
                Some(src.vector(b, &n("attn_k_norm.weight"), s.head_dim)?),
            ),
            QkNorm::Full => (
                Some(src.vector(b, &n("attn_q_norm.weight"), qd)?),
                Some(src.vector(b, &n("attn_k_norm.weight"), kvd)?),
            ),
        };
        Ok(Attention {
            wq,
            wk,
            wv,
            wo,
            bias,
            q_norm,
            k_norm,
        })
    }

    /// Attention over `h` (normed input, `n × hidden`); returns the projected output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward<'a>(
        &self,
        b: &B,
        s: &ModelSpec,
        h: &B::Buf,
        n: usize,
        start: usize,
        kv: &mut B::Kv,
        inv_freq: &[f32],
        sc: &'a mut Scratch<B>,
    ) -> Result<&'a B::Buf> {
        let qd = s.n_heads * s.head_dim;
        let kvd = s.n_kv_heads * s.head_dim;
        b.matmul_many(
            &[&self.wq, &self.wk, &self.wv],
            h,
            n,
            &mut [&mut sc.q, &mut sc.k, &mut sc.v],
        );
        if let Some([bq, bk, bv]) = &self.bias {
            b.add_row_bias(&mut sc.q, bq);
            b.add_row_bias(&mut sc.k, bk);
            b.add_row_bias(&mut sc.v, bv);
        }
        let norms = match (s.qk_norm, &self.q_norm, &self.k_norm) {
            (QkNorm::PerHead, Some(qn), Some(kn)) => Some((qn, kn, s.rms_eps)),
            (QkNorm::Full, Some(qn), Some(kn)) => {
                b.rms_norm_inplace(&mut sc.q, qn, qd, s.rms_eps);
                b.rms_norm_inplace(&mut sc.k, kn, kvd, s.rms_eps);
                None
            }
            _ => None,
        };
        let rope = QkRope {
            n_tokens: n,
            start_pos: start,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            inv_freq,
            style: s.rope.style,
        };
        let p = AttnParams {
            n_tokens: n,
            start_pos: start,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            window: s.sliding_window,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        b.rope_attention(
            &mut sc.q,
            &mut sc.k,
            &sc.v,
            kv,
            norms,
            &rope,
            p,
            &mut sc.attn,
        );
        b.matmul(&self.wo, &sc.attn, n, &mut sc.out);
        Ok(&sc.out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub(crate) struct DenseFfn<B: Backend> {
    pub(crate) gate: B::Weight,
    pub(crate) up: B::Weight,
    pub(crate) down: B::Weight,
}

impl<B: Backend> DenseFfn<B> {
    /// Loads `blk.{l}.ffn_{gate,up,down}{suffix}.weight` (suffix `""` or `"_shexp"`).
    pub(crate) fn load(
        b: &B,
        s: &ModelSpec,
        l: usize,
        src: &mut TensorSource,
        suffix: &str,
    ) -> Result<Self> {
        let width = if suffix.is_empty() {
            s.ffn
        } else {
            s.moe
                .as_ref()
                .and_then(|m| m.shared_expert_ffn)
                .unwrap_or(0)
        };
        let n = |p: &str| names::blk(l, &format!("{p}{suffix}.weight"));
        Ok(DenseFfn {
            gate: src.matrix(b, &n("ffn_gate"), width, s.hidden)?,
            up: src.matrix(b, &n("ffn_up"), width, s.hidden)?,
            down: src.matrix(b, &n("ffn_down"), s.hidden, width)?,
        })
    }

    pub(crate) fn forward<'a>(
        &self,
        b: &B,
        h: &B::Buf,
        n: usize,
        sc: &'a mut Scratch<B>,
    ) -> Result<&'a B::Buf> {
        b.matmul_many(
            &[&self.gate, &self.up],
            h,
            n,
            &mut [&mut sc.gate, &mut sc.up],
        );
        b.silu_mul(&mut sc.gate, &sc.up);
        b.matmul(&self.down, &sc.gate, n, &mut sc.out);
        Ok(&sc.out)
    }

    /// The job of running this FFN over `n` rows of `x`.
    pub(crate) fn job<'a>(&'a self, x: &'a B::Buf, n: usize) -> SwiGluJob<'a, B> {
        SwiGluJob {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
            x,
            n,
        }
    }
}
