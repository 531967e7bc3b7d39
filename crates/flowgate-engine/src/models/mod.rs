//! Models as plain Rust over the [`Backend`] trait.
//!
//! Every supported architecture (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe,
//! olmoe) is one decoder described by its [`ModelSpec`]: [`llama`] holds the attention block and
//! dense SwiGLU FFN those families share, [`moe`] the sparse FFN (router, top-k experts, shared
//! expert). [`Model::forward`] runs a batch of tokens of one sequence through all layers, using
//! and extending a [`KvCache`]: a prompt in one pass (prefill, matrix-matrix) or one token
//! (decode).
//!
//! A model may be split across two devices ([`Model::with_layer_split`], `--vram-budget` too
//! small for the dense weights): its leading layers, with the token embedding, run on the CPU
//! backend from host RAM, and the hidden states go on to the model's backend for the rest.
//! A long prompt instead runs those layers on the model's backend too, one at a time, their
//! weights copied in for the pass ([`Model::set_prefill_offload`]): a prompt's matrix products
//! are compute-bound, and the device does them far faster than the copy costs.

pub mod llama;
pub mod moe;
pub mod rope;

use std::collections::HashMap;
use std::sync::Arc;

use flowgate_formats::catalog::names;
use flowgate_formats::ModelSpec;

use crate::backend::cpu::CpuBackend;
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

/// The leading layers of a split model, on the CPU with the token embedding.
struct HostLayers {
    embd: <CpuBackend as Backend>::Weight,
    layers: Vec<Layer<CpuBackend>>,
    /// Each layer's tensors (views sharing the CPU weights' bytes), to build the layer on the
    /// model's backend for a long prompt.
    tensors: Vec<HashMap<String, HostTensor>>,
    /// Prompts of at least this many tokens run these layers on the model's backend.
    offload_min: Option<usize>,
}

/// Prompts from this many tokens run a split model's CPU layers on its backend (llama.cpp
/// offloads a CPU layer's batch to the GPU from 32 tokens too).
pub const PREFILL_OFFLOAD_MIN: usize = 32;

/// A loaded model on backend `B`.
pub struct Model<B: Backend> {
    pub spec: ModelSpec,
    pub backend: B,
    /// The token embedding on `B` (`None` when only the CPU layers look it up).
    embd: Option<B::Weight>,
    output: Option<B::Weight>,
    output_norm: B::Buf,
    /// Layers `n_host..n_layers` (all of them unless split).
    layers: Vec<Layer<B>>,
    /// Layers `0..n_host` on the CPU, when split.
    host: Option<HostLayers>,
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
        Self::build(spec, backend, tensors, experts, 0)
    }

    /// Like [`Model::new`], with layers `0..n_host` and the token embedding on the CPU backend
    /// (their weights stay in host RAM) and the rest on `backend`: the GPU layer split.
    pub fn with_layer_split(
        spec: ModelSpec,
        backend: B,
        tensors: HashMap<String, HostTensor>,
        n_host: usize,
    ) -> Result<Self> {
        Self::build(spec, backend, tensors, None, n_host)
    }

    fn build(
        spec: ModelSpec,
        backend: B,
        tensors: HashMap<String, HostTensor>,
        experts: Option<Arc<HostExpertCache>>,
        n_host: usize,
    ) -> Result<Self> {
        spec.validate()?;
        if n_host > spec.n_layers {
            return Err(EngineError::Invalid(format!(
                "{n_host} layers on the CPU, but the model has {}",
                spec.n_layers
            )));
        }
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
        let (embd, host) = if n_host == 0 {
            (Some(matrix_from(b, embd_t, s.vocab_size, s.hidden)?), None)
        } else {
            // The CPU layers' tensors move to a source of their own.
            let mut host_src = TensorSource {
                map: HashMap::new(),
                experts: None,
            };
            let names: Vec<String> = src
                .map
                .keys()
                .filter(|n| crate::residency::layer_split::layer_of(n).is_some_and(|l| l < n_host))
                .cloned()
                .collect();
            for n in names {
                if let Some(t) = src.map.remove(&n) {
                    host_src.map.insert(n, t);
                }
            }
            let c = &CpuBackend;
            // Tied: the device keeps the embedding as its output projection too (the host view
            // shares its bytes).
            let embd = match output {
                Some(_) => None,
                None => Some(matrix_from(b, embd_t.clone(), s.vocab_size, s.hidden)?),
            };
            let host_embd = matrix_from(c, embd_t, s.vocab_size, s.hidden)?;
            let mut tensors = vec![HashMap::new(); n_host];
            for (name, t) in &host_src.map {
                if let Some(l) = crate::residency::layer_split::layer_of(name) {
                    tensors[l].insert(name.clone(), t.clone());
                }
            }
            let layers = (0..n_host)
                .map(|l| Layer::load(c, s, l, &mut host_src))
                .collect::<Result<Vec<_>>>()?;
            // Sparse layers stay on the CPU: copying every expert in for a prompt is not worth it.
            let dense = layers.iter().all(|l| matches!(l.ffn, Ffn::Dense(_)));
            (
                embd,
                Some(HostLayers {
                    embd: host_embd,
                    layers,
                    tensors,
                    offload_min: dense.then_some(PREFILL_OFFLOAD_MIN),
                }),
            )
        };
        let output_norm = src.vector(b, names::OUTPUT_NORM, s.hidden)?;
        let layers = (n_host..s.n_layers)
            .map(|l| Layer::load(b, s, l, &mut src))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            spec,
            backend,
            embd,
            output,
            output_norm,
            layers,
            host,
            inv_freq,
            routing: Routing::Router,
        })
    }

    /// Layers that run on the CPU (the GPU layer split; 0 unless split).
    pub fn n_host_layers(&self) -> usize {
        self.host.as_ref().map_or(0, |h| h.layers.len())
    }

    /// A split model's prompts of at least `min_tokens` run its CPU layers on the backend, one
    /// layer at a time (their weights and keys/values copied in, the new keys/values back);
    /// `None`: never. The default is [`PREFILL_OFFLOAD_MIN`] when the CPU layers are dense.
    /// The device must have room for one CPU layer and its KV cache (the split's plan keeps it).
    pub fn set_prefill_offload(&mut self, min_tokens: Option<usize>) {
        if let Some(h) = &mut self.host {
            let dense = h.layers.iter().all(|l| matches!(l.ffn, Ffn::Dense(_)));
            h.offload_min = min_tokens.filter(|_| dense);
        }
    }

    /// Sets how MoE tokens pick experts ([`Routing::UniformRandom`] is a benchmarking aid).
    pub fn set_routing(&mut self, r: Routing) {
        if r != self.routing {
            // A step recorded under the other routing must not replay.
            self.backend.forget_step_graphs();
        }
        self.routing = r;
    }

    /// The backend's name, for reports.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// A KV cache for this model holding `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        KvCache::split(
            &self.backend,
            self.n_host_layers(),
            self.layers.len(),
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

    /// Whether a one-token step runs wholly on the backend: every sparse layer's experts on
    /// the device, routed there by the model's router or by uniform routing's draw (no routes
    /// or logits read back mid-step; a backend that draws on the host declines to record).
    fn step_is_device_only(&self) -> bool {
        self.host.is_none()
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
        let step = Step {
            spec: s,
            n,
            start: cache.len(),
            inv_freq: &self.inv_freq,
            routing: self.routing,
        };
        let mut x = match (&self.host, &self.embd) {
            (Some(host), _) => {
                // The CPU layers first; their output goes on to the device.
                let c = &CpuBackend;
                let mut hx = c.buf_zeros(n * s.hidden)?;
                c.embed(&host.embd, tokens, &mut hx)?;
                if host.offload_min.is_some_and(|m| n >= m) {
                    let mut x = b.buf_from(&hx)?;
                    offload_host_layers(b, host, &mut cache.host, &mut x, &step)?;
                    x
                } else {
                    let mut hh = c.buf_zeros(n * s.hidden)?;
                    run_layers(c, &host.layers, &mut cache.host, &mut hx, &mut hh, &step)?;
                    b.buf_from(&hx)?
                }
            }
            (None, Some(embd)) => {
                let mut x = b.buf_zeros(n * s.hidden)?;
                b.embed(embd, tokens, &mut x)?;
                x
            }
            (None, None) => {
                return Err(EngineError::Invalid(
                    "the model has no token embedding on its device".into(),
                ))
            }
        };
        // The normed input of each layer, then of the output head.
        let mut h = b.buf_zeros(n * s.hidden)?;
        run_layers(b, &self.layers, &mut cache.layers, &mut x, &mut h, &step)?;
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
        let out_w = self.output.as_ref().or(self.embd.as_ref()).ok_or_else(|| {
            EngineError::Invalid("the model has no output projection on its device".into())
        })?;
        b.matmul(out_w, &h, rows, &mut logits);
        Ok(logits)
    }
}

impl<B: Backend> Layer<B> {
    fn load(b: &B, s: &ModelSpec, l: usize, src: &mut TensorSource) -> Result<Self> {
        let attn_norm = src.vector(b, &names::blk(l, "attn_norm.weight"), s.hidden)?;
        let attn = Attention::load(b, s, l, src)?;
        let ffn_norm = src.vector(b, &names::blk(l, "ffn_norm.weight"), s.hidden)?;
        let ffn = if s.is_sparse_layer(l) {
            Ffn::Moe(MoeFfn::load(b, s, l, src)?)
        } else {
            Ffn::Dense(DenseFfn::load(b, s, l, src, "")?)
        };
        Ok(Layer {
            attn_norm,
            attn,
            ffn_norm,
            ffn,
        })
    }
}

/// Runs a split model's CPU layers on `b` for one prompt: each layer's weights are copied in
/// and its keys and values of the positions before the prompt, the layer runs, and the
/// prompt's keys and values go back to the layer's host cache; the device copy is then freed
/// before the next layer's is made (so one layer's room is all it takes).
fn offload_host_layers<B: Backend>(
    b: &B,
    host: &HostLayers,
    kv: &mut [<CpuBackend as Backend>::Kv],
    x: &mut B::Buf,
    p: &Step<'_>,
) -> Result<()> {
    let s = p.spec;
    if kv.len() != host.layers.len() {
        return Err(EngineError::Invalid(format!(
            "a KV cache of {} CPU layers for {} (made for another model?)",
            kv.len(),
            host.layers.len()
        )));
    }
    let c = &CpuBackend;
    let mut h = b.buf_zeros(p.n * s.hidden)?;
    // Where the pass's time goes (`--log debug`): weights in, the layer's work and its keys
    // and values back (the read waits for the work), and freeing.
    let (mut t_load, mut t_run, mut t_free) = (0f64, 0f64, 0f64);
    for (l, host_kv) in kv.iter_mut().enumerate() {
        let t0 = std::time::Instant::now();
        let mut src = TensorSource {
            map: host.tensors[l].clone(),
            experts: None,
        };
        let layer = Layer::load(b, s, l, &mut src)?;
        let mut dkv = b.kv_alloc(s.n_kv_heads, s.head_dim, p.start + p.n)?;
        if p.start > 0 {
            let (k, v) = c.kv_read(host_kv, 0, p.start)?;
            b.kv_write(&mut dkv, &b.buf_from(&k)?, &b.buf_from(&v)?, p.start, 0);
        }
        let t1 = std::time::Instant::now();
        run_layers(
            b,
            std::slice::from_ref(&layer),
            std::slice::from_mut(&mut dkv),
            x,
            &mut h,
            p,
        )?;
        let (k, v) = b.kv_read(&dkv, p.start, p.n)?;
        c.kv_write(host_kv, &k, &v, p.n, p.start);
        let t2 = std::time::Instant::now();
        drop(layer);
        drop(dkv);
        t_load += (t1 - t0).as_secs_f64();
        t_run += (t2 - t1).as_secs_f64();
        t_free += t2.elapsed().as_secs_f64();
    }
    tracing::debug!(
        layers = kv.len(),
        tokens = p.n,
        load_ms = 1e3 * t_load,
        run_ms = 1e3 * t_run,
        free_ms = 1e3 * t_free,
        "CPU layers run on the device for a prompt"
    );
    Ok(())
}

/// What every layer of one forward step shares.
struct Step<'a> {
    spec: &'a ModelSpec,
    n: usize,
    /// Position of the first token.
    start: usize,
    inv_freq: &'a [f32],
    routing: Routing,
}

/// Runs the residual stream `x` (`n` rows) through `layers` on `b`, with their KV caches
/// `kv` (one per layer), and leaves every layer's output added to `x`; `h` (`n` rows) holds
/// each layer's normed input.
fn run_layers<B: Backend>(
    b: &B,
    layers: &[Layer<B>],
    kv: &mut [B::Kv],
    x: &mut B::Buf,
    h: &mut B::Buf,
    p: &Step<'_>,
) -> Result<()> {
    let (s, n, start) = (p.spec, p.n, p.start);
    if kv.len() != layers.len() {
        return Err(EngineError::Invalid(format!(
            "a KV cache of {} layers for {} layers (made for another model?)",
            kv.len(),
            layers.len()
        )));
    }
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
    for (l, (layer, kv)) in layers.iter().zip(kv.iter_mut()).enumerate() {
        let (norm, eps) = (&layer.attn_norm, s.rms_eps);
        match std::mem::replace(&mut pending, Pending::Nothing) {
            Pending::Nothing => b.rms_norm(x, norm, s.hidden, eps, h),
            Pending::Dense => b.add_rms_norm(x, scratch.ffn_out(), norm, s.hidden, eps, h),
            Pending::Moe(y) => b.add_rms_norm(x, &y, norm, s.hidden, eps, h),
        }
        let attn_out = layer
            .attn
            .forward(b, s, h, n, start, kv, p.inv_freq, &mut scratch)?;
        b.add_rms_norm(x, attn_out, &layer.ffn_norm, s.hidden, s.rms_eps, h);
        match &layer.ffn {
            Ffn::Dense(f) => {
                f.forward(b, h, n, &mut scratch)?;
                pending = Pending::Dense;
            }
            Ffn::Moe(m) => {
                // The next sparse layer (dense ones may sit between), for prefetching.
                let next = layers[l + 1..].iter().find_map(|x| match &x.ffn {
                    Ffn::Moe(nm) => Some(nm),
                    Ffn::Dense(_) => None,
                });
                let step = moe::MoeStep {
                    start,
                    routing: p.routing,
                    next,
                };
                pending = Pending::Moe(m.forward(b, s, h, n, step)?);
            }
        }
    }
    match pending {
        Pending::Nothing => {}
        Pending::Dense => b.add(x, scratch.ffn_out()),
        Pending::Moe(y) => b.add(x, &y),
    }
    Ok(())
}
