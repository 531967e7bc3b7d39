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

use super::llama::DenseFfn;
use super::{matrix_from, TensorSource};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::residency::HostExpertCache;
use crate::weights::HostTensor;
use std::sync::Arc;

/// Where a layer's experts are: all resident, paged through a host cache, or paged by the
/// backend through its own device cache (`--vram-budget`; the layer's `device` experts).
pub(crate) enum Experts<B: Backend> {
    Resident(Vec<DenseFfn<B>>),
    Paged {
        layer: usize,
        cache: Arc<HostExpertCache>,
    },
    Device,
}

/// How tokens pick experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// The model's router (always, outside benchmarks).
    #[default]
    Router,
    /// A benchmarking aid: each token picks `k` distinct experts uniformly at random (a hash of
    /// `seed`, layer and position), with equal weights. The work per token is unchanged; what
    /// changes is which experts are needed, so expert caches can be measured under the uniform
    /// routing ANCHORS.md assumes even on synthetic files whose routers do not route uniformly.
    /// Logits are then meaningless.
    UniformRandom { seed: u64 },
}

/// `k` distinct experts of `n`, uniformly at random from a hash of (seed, layer, position).
fn uniform_route(seed: u64, layer: usize, pos: usize, n: usize, k: usize) -> Vec<(usize, f32)> {
    let mut state =
        seed ^ ((layer as u64) << 40) ^ (pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        // SplitMix64.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut ids: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = i + (next() % (n - i) as u64) as usize;
        ids.swap(i, j);
    }
    ids[..k].iter().map(|&e| (e, 1.0 / k as f32)).collect()
}

/// Per-call context of [`MoeFfn::forward`].
pub(crate) struct MoeStep<'a, B: Backend> {
    /// Position of the first token.
    pub start: usize,
    pub routing: Routing,
    /// The next sparse layer, whose experts a paging cache may prefetch.
    pub next: Option<&'a MoeFfn<B>>,
}

pub(crate) struct MoeFfn<B: Backend> {
    layer: usize,
    router: B::Weight,
    n_experts: usize,
    experts: Experts<B>,
    /// The resident experts prepared for the backend's device-side decode, when it has one.
    device: Option<B::Experts>,
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
    /// Whether one token routed by the model's router runs wholly on the backend (routing
    /// and experts on the device, nothing read back; a shared expert's gate is applied by
    /// [`Backend::add_sigmoid_gated`]).
    pub(crate) fn decodes_on_device(&self) -> bool {
        self.device.is_some()
    }

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
        let paged_on_device = b.paged_experts(l)?;
        let experts = match (&paged_on_device, src.expert_cache()) {
            (Some(_), _) => {
                for stem in ["ffn_gate", "ffn_up", "ffn_down"] {
                    src.take_opt(&names::blk(l, &format!("{stem}_exps.weight")));
                }
                Experts::Device
            }
            (None, Some(cache)) => Experts::Paged { layer: l, cache },
            (None, None) => Experts::Resident(Self::load_resident(b, s, l, m.n_experts, src)?),
        };
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
        let device = match &experts {
            Experts::Resident(ex) => {
                let refs: Vec<[&B::Weight; 3]> =
                    ex.iter().map(|f| [&f.gate, &f.up, &f.down]).collect();
                b.experts(&refs)?
            }
            Experts::Paged { .. } => None,
            Experts::Device => paged_on_device,
        };
        Ok(MoeFfn {
            layer: l,
            router,
            n_experts: m.n_experts,
            experts,
            device,
            shared,
            n_used: m.n_experts_used,
            norm_topk: m.norm_topk_prob,
        })
    }

    fn load_resident(
        b: &B,
        s: &ModelSpec,
        l: usize,
        n_experts: usize,
        src: &mut TensorSource,
    ) -> Result<Vec<DenseFfn<B>>> {
        let m = s
            .moe
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("sparse layer without MoE spec".into()))?;
        let mut experts = Vec::with_capacity(n_experts);
        for e in 0..n_experts {
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
        Ok(experts)
    }

    /// Speculative prefetch (decode only): this layer's router applied to the previous layer's
    /// FFN input `h` predicts which experts the token will pick here; the paging cache starts
    /// reading those it lacks while the previous layer computes.
    fn prefetch_predicted(&self, b: &B, h: &B::Buf, n: usize) -> Result<()> {
        let Experts::Paged { layer, cache } = &self.experts else {
            return Ok(());
        };
        if n != 1 || !cache.speculative() {
            return Ok(());
        }
        let mut logits = b.buf_zeros(self.n_experts)?;
        b.matmul(&self.router, h, 1, &mut logits);
        let logits = b.to_host(&logits);
        let guess: Vec<usize> = route(&logits, self.n_used, self.norm_topk)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        cache.prefetch(*layer, &guess, true)?;
        Ok(())
    }

    pub(crate) fn forward(
        &self,
        b: &B,
        s: &ModelSpec,
        h: &B::Buf,
        n: usize,
        step: MoeStep<'_, B>,
    ) -> Result<B::Buf> {
        let MoeStep {
            start,
            routing,
            next,
        } = step;
        let n_exp = self.n_experts;
        // One token with the model's router and resident experts: routed on the device, no
        // logits come back to the host.
        if let (1, Routing::Router, Some(dev)) = (n, routing, &self.device) {
            if let Some((nd, next)) = next.and_then(|m| Some((m.device.as_ref()?, m))) {
                b.moe_predict(nd, &next.router, h, next.n_used)?;
            }
            let mut out = b.buf_zeros(0)?;
            b.moe_decode(dev, &self.router, h, self.n_used, self.norm_topk, &mut out)?;
            self.add_shared(b, h, n, &mut out)?;
            return Ok(out);
        }
        // One token under uniform routing with experts on the device (resident or paged): the
        // backend takes the draw (the CUDA backend makes it on the device when resident).
        if let (1, Routing::UniformRandom { seed }, Some(dev)) = (n, routing, &self.device) {
            let r = uniform_route(seed, self.layer, start, n_exp, self.n_used);
            let mut out = b.buf_zeros(0)?;
            b.moe_decode_uniform(dev, &r, (seed, self.layer, start), h, &mut out)?;
            self.add_shared(b, h, n, &mut out)?;
            return Ok(out);
        }
        // Routed on the device when the backend can (only ids and weights come back), else
        // the router's logits come back and are routed here. Uniform routing computes (and
        // ignores) the logits too, so that the work per token stays the same.
        let on_device = match routing {
            Routing::Router => {
                b.route_tokens(&self.router, h, n, n_exp, self.n_used, self.norm_topk)?
            }
            Routing::UniformRandom { .. } => None,
        };
        let routes = match on_device {
            Some(r) => r,
            None => {
                let mut logits = b.buf_zeros(n * n_exp)?;
                b.matmul(&self.router, h, n, &mut logits);
                let logits = b.to_host(&logits);
                (0..n)
                    .map(|t| match routing {
                        Routing::Router => route(
                            &logits[t * n_exp..(t + 1) * n_exp],
                            self.n_used,
                            self.norm_topk,
                        ),
                        Routing::UniformRandom { seed } => {
                            uniform_route(seed, self.layer, start + t, n_exp, self.n_used)
                        }
                    })
                    .collect()
            }
        };
        // Per expert: the tokens that chose it and their weights.
        let mut chosen: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_exp];
        for (t, r) in routes.into_iter().enumerate() {
            for (e, w) in r {
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
        match &self.experts {
            Experts::Resident(ex) => {
                let jobs: Vec<_> = used
                    .iter()
                    .zip(&gathered)
                    .map(|(&e, g)| ex[e].job(g.as_ref().unwrap_or(h), chosen[e].0.len()))
                    .collect();
                let ys = b.swiglu_many(&jobs)?;
                add_expert_outputs(b, &mut out, s.hidden, &used, &ys, &chosen);
            }
            Experts::Device => {
                let dev = self.device.as_ref().ok_or_else(|| {
                    EngineError::Invalid("a device-paged layer without its experts".into())
                })?;
                // In waves of the layer's quota, in the same expert order as above.
                let cap = b.paged_quota(dev).max(1);
                for (wave, inputs) in used.chunks(cap).zip(gathered.chunks(cap)) {
                    let ws = b.paged_weights(dev, wave)?;
                    let jobs: Vec<_> = wave
                        .iter()
                        .zip(inputs)
                        .zip(&ws)
                        .map(|((&e, g), [gate, up, down])| crate::backend::SwiGluJob {
                            gate,
                            up,
                            down,
                            x: g.as_ref().unwrap_or(h),
                            n: chosen[e].0.len(),
                        })
                        .collect();
                    let ys = b.swiglu_many(&jobs)?;
                    add_expert_outputs(b, &mut out, s.hidden, wave, &ys, &chosen);
                }
            }
            Experts::Paged { layer, cache } => {
                // Only the model's router can be predicted.
                if let (Some(next), Routing::Router) = (next, routing) {
                    next.prefetch_predicted(b, h, n)?;
                }
                // In waves of at most the cache's size. Per wave: start reading the misses,
                // compute the hits meanwhile, then the misses as they arrive. Results are
                // accumulated in the same expert order as above, so paging cannot change them.
                let cap = cache.capacity().max(1);
                for (wave, inputs) in used.chunks(cap).zip(gathered.chunks(cap)) {
                    let resident = cache.prefetch(*layer, wave, false)?;
                    cache.count_hits(*layer, &resident);
                    let (hits, misses): (Vec<usize>, Vec<usize>) =
                        (0..wave.len()).partition(|&i| resident.contains(&wave[i]));
                    let mut ys: Vec<Option<B::Buf>> = (0..wave.len()).map(|_| None).collect();
                    for group in [hits, misses] {
                        if group.is_empty() {
                            continue;
                        }
                        let es: Vec<usize> = group.iter().map(|&i| wave[i]).collect();
                        let lease = cache.acquire_counted(*layer, &es)?;
                        let out = {
                            let ffns = lease
                                .tensors
                                .iter()
                                .map(|[g, u, d]| {
                                    Ok(DenseFfn {
                                        gate: b.weight(g.clone())?,
                                        up: b.weight(u.clone())?,
                                        down: b.weight(d.clone())?,
                                    })
                                })
                                .collect::<Result<Vec<DenseFfn<B>>>>()?;
                            let jobs: Vec<_> = group
                                .iter()
                                .zip(&ffns)
                                .map(|(&i, f)| {
                                    let x = inputs[i].as_ref().unwrap_or(h);
                                    f.job(x, chosen[wave[i]].0.len())
                                })
                                .collect();
                            b.swiglu_many(&jobs)?
                            // The weights (views of the slots) go here, before the lease.
                        };
                        drop(lease);
                        for (&i, y) in group.iter().zip(out) {
                            ys[i] = Some(y);
                        }
                    }
                    let ys = ys.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| {
                        EngineError::Invalid("an expert of the wave was not computed".into())
                    })?;
                    add_expert_outputs(b, &mut out, s.hidden, wave, &ys, &chosen);
                }
            }
        }
        self.add_shared(b, h, n, &mut out)?;
        Ok(out)
    }

    /// qwen2_moe's shared expert: `out += sigmoid(w_gate · h) · ffn(h)` per row.
    fn add_shared(&self, b: &B, h: &B::Buf, n: usize, out: &mut B::Buf) -> Result<()> {
        if let Some((ffn, gate)) = &self.shared {
            let y = crate::backend::swiglu(b, &ffn.job(h, n))?;
            let mut g = b.buf_zeros(n)?;
            b.matmul(gate, h, n, &mut g);
            b.add_sigmoid_gated(out, &y, &g, n, b.weight_rows(&ffn.down));
        }
        Ok(())
    }
}

/// `out[t] += weight · ys[i][row of t]` for every token `t` that chose expert `experts[i]`
/// (`chosen[e]`: its tokens and their weights), experts in order.
fn add_expert_outputs<B: Backend>(
    b: &B,
    out: &mut B::Buf,
    dim: usize,
    experts: &[usize],
    ys: &[B::Buf],
    chosen: &[(Vec<usize>, Vec<f32>)],
) {
    let parts: Vec<_> = experts
        .iter()
        .zip(ys)
        .map(|(&e, y)| (y, chosen[e].0.as_slice(), chosen[e].1.as_slice()))
        .collect();
    b.scatter_add_many(out, dim, &parts);
}

/// Softmax over `logits`, the `k` largest, optionally renormalised. Returns `(expert, weight)`,
/// most probable first; ties keep the lower index first, like torch.topk.
pub fn route(logits: &[f32], k: usize, renormalise: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    // The k best so far, descending; a later expert enters only if strictly better, so equal
    // probabilities keep index order. O(n·k) with k ≪ n, where a full sort per token was the
    // largest host cost of a MoE prefill (512 tokens × 128 experts per layer).
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    for (e, &v) in logits.iter().enumerate() {
        let p = (v - max).exp();
        sum += p;
        if k == 0 || (top.len() == k && top[k - 1].1 >= p) {
            continue;
        }
        let at = top.iter().position(|&(_, q)| q < p).unwrap_or(top.len());
        top.insert(at, (e, p));
        top.truncate(k);
    }
    for (_, w) in top.iter_mut() {
        *w /= sum;
    }
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
    use super::{route, uniform_route};

    #[test]
    fn uniform_routes_are_distinct_deterministic_and_spread() {
        let mut counts = [0usize; 16];
        for pos in 0..4000 {
            let r = uniform_route(9, 3, pos, 16, 4);
            assert_eq!(r, uniform_route(9, 3, pos, 16, 4));
            let mut ids: Vec<usize> = r.iter().map(|x| x.0).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 4);
            for &(e, w) in &r {
                assert_eq!(w, 0.25);
                counts[e] += 1;
            }
        }
        // 16000 picks over 16 experts: 1000 each expected; a binomial sd is ~29.
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
        assert_ne!(uniform_route(9, 3, 0, 16, 4), uniform_route(9, 4, 0, 16, 4));
    }

    /// The selection equals a stable sort by descending probability (the definition), on
    /// random logits with many exact ties, for every k.
    #[test]
    fn route_equals_a_stable_sort() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200 {
            let logits: Vec<f32> = (0..40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 9) as f32 * 0.5 - 2.0
                })
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]));
            for k in [0usize, 1, 2, 8, 40] {
                let got = route(&logits, k, false);
                let ids: Vec<usize> = got.iter().map(|x| x.0).collect();
                assert_eq!(ids, order[..k].to_vec());
                for &(e, w) in &got {
                    assert!((w - exps[e] / sum).abs() <= 1e-6 * (exps[e] / sum));
                }
            }
        }
    }

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
