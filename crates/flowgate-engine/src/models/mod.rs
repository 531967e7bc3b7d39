//! Models as plain Rust over the [`Backend`] trait.
//!
//! Every supported architecture (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe,
//! olmoe) is one decoder described by its [`ModelSpec`]: [`llama`] holds the attention block and
//! dense SwiGLU FFN those families share, [`moe`] the sparse FFN (router, top-k experts, shared
//! expert). [`Model::forward`] runs a batch of tokens of one sequence through all layers, using
//! and extending a [`KvCache`]: a prompt in one pass (prefill, matrix-matrix) or one token
//! (decode).

pub mod llama;
pub mod moe;
pub mod rope;

use std::collections::HashMap;
use std::sync::Arc;

use flowgate_formats::catalog::names;
use flowgate_formats::ModelSpec;

use crate::backend::{Backend, StepGraph};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::residency::HostExpertCache;
use crate::weights::HostTensor;
use llama::{Attention, DenseFfn};
use moe::MoeFfn;
pub use moe::Routing;

/// Which positions' logits to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every input position (the `logits` command, perplexity).
    All,
    /// Only the last (generation).
    Last,
}

pub(crate) enum Ffn<B: Backend> {
    Dense(DenseFfn<B>),
    Moe(MoeFfn<B>),
}

pub(crate) struct Layer<B: Backend> {
    attn_norm: B::Buf,
    attn: Attention<B>,
    ffn_norm: B::Buf,
    ffn: Ffn<B>,
}

/// A loaded model on backend `B`.
pub struct Model<B: Backend> {
    pub spec: ModelSpec,
    pub backend: B,
    embd: B::Weight,
    output: Option<B::Weight>,
    output_norm: B::Buf,
    layers: Vec<Layer<B>>,
    inv_freq: Vec<f32>,
    routing: Routing,
}

/// Takes tensors out of the loaded map by canonical name.
pub(crate) struct TensorSource {
    map: HashMap<String, HostTensor>,
    experts: Option<Arc<HostExpertCache>>,
}

impl TensorSource {
    /// The cache MoE layers page their experts through, if experts are paged.
    pub(crate) fn expert_cache(&self) -> Option<Arc<HostExpertCache>> {
        self.experts.clone()
    }

    pub(crate) fn take(&mut self, name: &str) -> Result<HostTensor> {
        self.map
            .remove(name)
            .ok_or_else(|| flowgate_formats::FormatError::MissingTensor(name.to_string()).into())
    }

    pub(crate) fn get(&self, name: &str) -> Option<&HostTensor> {
        self.map.get(name)
    }

    pub(crate) fn take_opt(&mut self, name: &str) -> Option<HostTensor> {
        self.map.remove(name)
    }

    pub(crate) fn vector<B: Backend>(&mut self, b: &B, name: &str, len: usize) -> Result<B::Buf> {
        let t = self.take(name)?;
        let v = t.to_f32()?;
        if v.len() != len {
            return Err(EngineError::Weight {
                tensor: name.into(),
                msg: format!("has {} values, expected {len}", v.len()),
            });
        }
        b.buf_from(&v)
    }

    pub(crate) fn matrix<B: Backend>(
        &mut self,
        b: &B,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<B::Weight> {
        let t = self.take(name)?;
        matrix_from(b, t, rows, cols)
    }
}

pub(crate) fn matrix_from<B: Backend>(
    b: &B,
    t: HostTensor,
    rows: usize,
    cols: usize,
) -> Result<B::Weight> {
    if t.shape != [rows, cols] {
        return Err(EngineError::Weight {
            tensor: t.name.clone(),
            msg: format!("shape {:?}, expected [{rows}, {cols}]", t.shape),
        });
    }
    b.weight(t)
}

impl<B: Backend> Model<B> {
    /// Builds the model from host tensors keyed by canonical name.
    pub fn new(spec: ModelSpec, backend: B, tensors: HashMap<String, HostTensor>) -> Result<Self> {
        Self::with_expert_cache(spec, backend, tensors, None)
    }

    /// Like [`Model::new`]; with `experts`, the MoE layers page their experts through that
    /// cache instead of taking them from `tensors` (which then need not hold them).
    pub fn with_expert_cache(
        spec: ModelSpec,
        backend: B,
        tensors: HashMap<String, HostTensor>,
        experts: Option<Arc<HostExpertCache>>,
    ) -> Result<Self> {
        spec.validate()?;
        let mut src = TensorSource {
            map: tensors,
            experts,
        };
        let s = &spec;
        let b = &backend;
        let freq_factors = match src.get("rope_freqs.weight") {
            Some(t) => Some(t.to_f32()?),
            None => None,
        };
        let inv_freq = rope::inv_freq(&s.rope, s.head_dim, freq_factors.as_deref());
        let embd_t = src.take(names::TOKEN_EMBD)?;
        // No `output.weight` means the output projection is the embedding (tied); whether that
        // is allowed for this model was checked against the spec when the catalog was built.
        let output = match src.take_opt(names::OUTPUT) {
            Some(t) => Some(matrix_from(b, t, s.vocab_size, s.hidden)?),
            None => None,
        };
        let embd = matrix_from(b, embd_t, s.vocab_size, s.hidden)?;
        let output_norm = src.vector(b, names::OUTPUT_NORM, s.hidden)?;
        let mut layers = Vec::with_capacity(s.n_layers);
        for l in 0..s.n_layers {
            let attn_norm = src.vector(b, &names::blk(l, "attn_norm.weight"), s.hidden)?;
            let attn = Attention::load(b, s, l, &mut src)?;
            let ffn_norm = src.vector(b, &names::blk(l, "ffn_norm.weight"), s.hidden)?;
            let ffn = if s.is_sparse_layer(l) {
                Ffn::Moe(MoeFfn::load(b, s, l, &mut src)?)
            } else {
                Ffn::Dense(DenseFfn::load(b, s, l, &mut src, "")?)
            };
            layers.push(Layer {
                attn_norm,
                attn,
                ffn_norm,
                ffn,
            });
        }
        Ok(Model {
            spec,
            backend,
            embd,
            output,
            output_norm,
            layers,
            inv_freq,
            routing: Routing::Router,
        })
    }

    /// Sets how MoE tokens pick experts ([`Routing::UniformRandom`] is a benchmarking aid).
    pub fn set_routing(&mut self, r: Routing) {
        self.routing = r;
    }

    /// The backend's name, for reports.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// A KV cache for this model holding `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        KvCache::new(
            &self.backend,
            self.spec.n_layers,
            self.spec.n_kv_heads,
            self.spec.head_dim,
            capacity,
        )
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending to the cache.
    /// Returns logits, `vocab_size` per requested position, row-major.
    ///
    /// A single token whose step needs nothing from the host (the model's router, experts on
    /// the device) goes through [`Backend::step_graph`]: recorded once per cache, then
    /// replayed with its token and position read from device memory (CUDA graphs).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: Logits,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        cache.check_room(tokens.len())?;
        let t0 = std::time::Instant::now();
        let b = &self.backend;
        let n = tokens.len();
        if n == 1 && self.step_is_device_only() {
            let (token, start) = (tokens[0], cache.len());
            if token as usize >= self.spec.vocab_size {
                return Err(EngineError::TokenOutOfRange {
                    id: token,
                    vocab: self.spec.vocab_size,
                });
            }
            match b.step_graph(&cache.layers, token, start)? {
                StepGraph::Replayed(out) => {
                    b.check()?;
                    cache.advance(1);
                    return Ok(out);
                }
                StepGraph::Recording => {
                    let queued = self.queue(tokens, cache, which);
                    if b.step_graph_end(queued.as_ref().ok()) {
                        return self.finish(queued?, cache, n, t0);
                    }
                    // Nothing ran: queue the step again without a graph.
                }
                StepGraph::Eager => {}
            }
        }
        let logits = self.queue(tokens, cache, which)?;
        self.finish(logits, cache, n, t0)
    }

    /// Whether a one-token step runs wholly on the backend: the model's router and every
    /// sparse layer's experts on the device (no routes or logits read back mid-step).
    fn step_is_device_only(&self) -> bool {
        self.routing == Routing::Router
            && self.layers.iter().all(|l| match &l.ffn {
                Ffn::Dense(_) => true,
                Ffn::Moe(m) => m.decodes_on_device(),
            })
    }

    /// Reads the logits of a queued step and counts its tokens into the cache.
    fn finish(
        &self,
        logits: B::Buf,
        cache: &mut KvCache<B>,
        n: usize,
        t0: std::time::Instant,
    ) -> Result<Vec<f32>> {
        let b = &self.backend;
        // On an asynchronous backend the work is only queued so far: the two times tell
        // whether the host (queueing) or the device bounds a step.
        let queued = t0.elapsed();
        let out = b.to_host(&logits);
        tracing::trace!(
            tokens = n,
            queued_us = queued.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "forward"
        );
        b.check()?;
        cache.advance(n);
        Ok(out)
    }

    /// Queues `tokens` (positions `cache.len()..`) through every layer, writing their keys
    /// and values into the cache (its length is not advanced); returns the logits buffer.
    fn queue(&self, tokens: &[u32], cache: &mut KvCache<B>, which: Logits) -> Result<B::Buf> {
        let b = &self.backend;
        let s = &self.spec;
        let n = tokens.len();
        let start = cache.len();
        let mut x = b.buf_zeros(n * s.hidden)?;
        b.embed(&self.embd, tokens, &mut x)?;
        let mut h = b.buf_zeros(n * s.hidden)?;
        let mut scratch = llama::Scratch::new(b, s, n)?;
        // The last FFN output not yet added to the residual stream: it is added by the next
        // layer's fused add + attention norm.
        // (`Dense`: it is still in the scratch buffers.)
        enum Pending<Buf> {
            Nothing,
            Dense,
            Moe(Buf),
        }
        let mut pending = Pending::Nothing;
        for (l, layer) in self.layers.iter().enumerate() {
            let (norm, eps) = (&layer.attn_norm, s.rms_eps);
            match std::mem::replace(&mut pending, Pending::Nothing) {
                Pending::Nothing => b.rms_norm(&x, norm, s.hidden, eps, &mut h),
                Pending::Dense => {
                    b.add_rms_norm(&mut x, scratch.ffn_out(), norm, s.hidden, eps, &mut h)
                }
                Pending::Moe(y) => b.add_rms_norm(&mut x, &y, norm, s.hidden, eps, &mut h),
            }
            let attn_out = layer.attn.forward(
                b,
                s,
                &h,
                n,
                start,
                &mut cache.layers[l],
                &self.inv_freq,
                &mut scratch,
            )?;
            b.add_rms_norm(
                &mut x,
                attn_out,
                &layer.ffn_norm,
                s.hidden,
                s.rms_eps,
                &mut h,
            );
            match &layer.ffn {
                Ffn::Dense(f) => {
                    f.forward(b, &h, n, &mut scratch)?;
                    pending = Pending::Dense;
                }
                Ffn::Moe(m) => {
                    // The next sparse layer (dense ones may sit between), for prefetching.
                    let next = self.layers[l + 1..].iter().find_map(|x| match &x.ffn {
                        Ffn::Moe(nm) => Some(nm),
                        Ffn::Dense(_) => None,
                    });
                    let step = moe::MoeStep {
                        start,
                        routing: self.routing,
                        next,
                    };
                    pending = Pending::Moe(m.forward(b, s, &h, n, step)?);
                }
            }
        }
        match pending {
            Pending::Nothing => {}
            Pending::Dense => b.add(&mut x, scratch.ffn_out()),
            Pending::Moe(y) => b.add(&mut x, &y),
        }
        let (rows, last) = match which {
            Logits::All => (n, 0),
            Logits::Last => (1, n - 1),
        };
        let xs = if rows == n {
            x
        } else {
            b.gather_rows(&x, s.hidden, &[last])?
        };
        b.rms_norm(&xs, &self.output_norm, s.hidden, s.rms_eps, &mut h);
        let mut logits = b.buf_zeros(rows * s.vocab_size)?;
        let out_w = self.output.as_ref().unwrap_or(&self.embd);
        b.matmul(out_w, &h, rows, &mut logits);
        Ok(logits)
    }
}
