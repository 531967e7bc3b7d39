//! The sparse FFN of mixtral, qwen2_moe, qwen3_moe and olmoe.
//!
//! Per token: router logits → softmax over all experts → the top `k` → optionally renormalised
//! to sum to one (`norm_topk_prob`; mixtral and qwen3_moe do, qwen2_moe and olmoe don't) → the
//! weighted sum of those experts' SwiGLU outputs. qwen2_moe adds a shared expert scaled by
//! `sigmoid(w_gate · x)`. Tokens are grouped by expert so that each expert runs once per batch
//! as a matrix product over the tokens that chose it (prefill), or a matrix-vector product
//! (decode); experts no token chose cost nothing.

use flowgate_formats::catalog::names;
use flowgate_formats::ModelSpec;

use super::llama::{DenseFfn, Scratch};
use super::{matrix_from, TensorSource};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::weights::HostTensor;

pub(crate) struct MoeFfn<B: Backend> {
    router: B::Weight,
    experts: Vec<DenseFfn<B>>,
    shared: Option<(DenseFfn<B>, B::Weight)>,
    n_used: usize,
    norm_topk: bool,
}

/// Expert `e`'s projection: a slice of the merged 3-D tensor, or its own tensor.
fn expert_tensor(src: &mut TensorSource, l: usize, stem: &str, e: usize) -> Result<HostTensor> {
    let merged = names::blk(l, &format!("{stem}_exps.weight"));
    if let Some(t) = src.get(&merged) {
        if t.shape.len() != 3 {
            return Err(EngineError::Weight {
                tensor: merged,
                msg: format!("expected 3 dimensions, found {:?}", t.shape),
            });
        }
        return t.slice_outer(e);
    }
    src.take(&names::blk(l, &format!("{stem}.{e}.weight")))
}

impl<B: Backend> MoeFfn<B> {
    pub(crate) fn load(b: &B, s: &ModelSpec, l: usize, src: &mut TensorSource) -> Result<Self> {
        let m = s
            .moe
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("sparse layer without MoE spec".into()))?;
        let router = src.matrix(
            b,
            &names::blk(l, "ffn_gate_inp.weight"),
            m.n_experts,
            s.hidden,
        )?;
        let mut experts = Vec::with_capacity(m.n_experts);
        for e in 0..m.n_experts {
            experts.push(DenseFfn {
                gate: matrix_from(
                    b,
                    expert_tensor(src, l, "ffn_gate", e)?,
                    m.expert_ffn,
                    s.hidden,
                )?,
                up: matrix_from(
                    b,
                    expert_tensor(src, l, "ffn_up", e)?,
                    m.expert_ffn,
                    s.hidden,
                )?,
                down: matrix_from(
                    b,
                    expert_tensor(src, l, "ffn_down", e)?,
                    s.hidden,
                    m.expert_ffn,
                )?,
            });
        }
        for stem in ["ffn_gate", "ffn_up", "ffn_down"] {
            src.take_opt(&names::blk(l, &format!("{stem}_exps.weight")));
        }
        let shared = if m.shared_expert_ffn.is_some() {
            let ffn = DenseFfn::load(b, s, l, src, "_shexp")?;
            let gname = names::blk(l, "ffn_gate_inp_shexp.weight");
            let g = src.take(&gname)?;
            // HF stores [1, hidden]; GGUF a vector of `hidden`.
            let g = if g.shape.len() == 1 {
                HostTensor::from_f32(&gname, vec![1, s.hidden], &g.to_f32()?)?
            } else {
                g
            };
            Some((ffn, matrix_from(b, g, 1, s.hidden)?))
        } else {
            None
        };
        Ok(MoeFfn {
            router,
            experts,
            shared,
            n_used: m.n_experts_used,
            norm_topk: m.norm_topk_prob,
        })
    }

    pub(crate) fn forward(
        &self,
        b: &B,
        s: &ModelSpec,
        h: &B::Buf,
        n: usize,
        _sc: &mut Scratch<B>,
    ) -> Result<B::Buf> {
        let n_exp = self.experts.len();
        let mut logits = b.buf_zeros(n * n_exp)?;
        b.matmul(&self.router, h, n, &mut logits);
        let logits = b.to_host(&logits);
        // Per expert: the tokens that chose it and their weights.
        let mut chosen: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_exp];
        for t in 0..n {
            for (e, w) in route(
                &logits[t * n_exp..(t + 1) * n_exp],
                self.n_used,
                self.norm_topk,
            ) {
                chosen[e].0.push(t);
                chosen[e].1.push(w);
            }
        }
        let mut out = b.buf_zeros(n * s.hidden)?;
        let used: Vec<usize> = (0..n_exp).filter(|&e| !chosen[e].0.is_empty()).collect();
        // Inputs: every token for an expert all tokens chose, else the gathered rows.
        let gathered = used
            .iter()
            .map(|&e| {
                let idx = &chosen[e].0;
                if idx.len() == n {
                    Ok(None)
                } else {
                    b.gather_rows(h, s.hidden, idx).map(Some)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let jobs: Vec<_> = used
            .iter()
            .zip(&gathered)
            .map(|(&e, g)| self.experts[e].job(g.as_ref().unwrap_or(h), chosen[e].0.len()))
            .collect();
        let ys = b.swiglu_many(&jobs)?;
        for (&e, y) in used.iter().zip(&ys) {
            let (idx, w) = &chosen[e];
            b.scatter_add_rows(&mut out, y, s.hidden, idx, w);
        }
        if let Some((ffn, gate)) = &self.shared {
            let y = crate::backend::swiglu(b, &ffn.job(h, n))?;
            let mut g = b.buf_zeros(n)?;
            b.matmul(gate, h, n, &mut g);
            let g: Vec<f32> = b
                .to_host(&g)
                .iter()
                .map(|&v| 1.0 / (1.0 + (-v).exp()))
                .collect();
            let idx: Vec<usize> = (0..n).collect();
            b.scatter_add_rows(&mut out, &y, s.hidden, &idx, &g);
        }
        Ok(out)
    }
}

/// Softmax over `logits`, the `k` largest, optionally renormalised. Returns `(expert, weight)`.
pub fn route(logits: &[f32], k: usize, renormalise: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable sort by descending probability: ties keep the lower index first, like torch.topk.
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]));
    let mut top: Vec<(usize, f32)> = order
        .into_iter()
        .take(k)
        .map(|e| (e, exps[e] / sum))
        .collect();
    if renormalise {
        let s: f32 = top.iter().map(|(_, w)| w).sum();
        for (_, w) in top.iter_mut() {
            *w /= s;
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn route_picks_top_k_and_renormalises() {
        let logits = [0.1, 2.0, -1.0, 1.5, 0.3];
        let r = route(&logits, 2, false);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let z: f32 = logits.iter().map(|v: &f32| v.exp()).sum();
        assert!((r[0].1 - 2f32.exp() / z).abs() < 1e-6);
        let r = route(&logits, 2, true);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
        assert!((r[0].1 / r[1].1 - (0.5f32).exp()).abs() < 1e-5);
    }
}
