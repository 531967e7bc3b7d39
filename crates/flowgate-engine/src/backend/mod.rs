//! The [`Backend`] trait: the operations a transformer needs, implemented per device.
//!
//! Models (in `models/`) are plain Rust over this trait: they hold `B::Weight`s and `B::Buf`s
//! and call operations; where the bytes live and which kernels run is the backend's business.
//! Buffers hold f32 activations laid out token-major (`n_tokens × width`). The CPU backend
//! ([`cpu::CpuBackend`]) is always present; the CUDA backend ([`cuda::CudaBackend`]) plugs in
//! behind the same trait and is usable when CUDA is found at run time.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::weights::HostTensor;

/// Attention shape and masking for one call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_tokens: usize,
    /// Position of the first of the `n_tokens` queries; keys `0..start_pos + n_tokens` exist.
    pub start_pos: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window: query at position p sees keys p-w+1..=p.
    pub window: Option<usize>,
    pub scale: f32,
}

/// Shape and positions of one [`Backend::qk_rope_kv`] call.
#[derive(Clone, Copy, Debug)]
pub struct QkRope<'a> {
    pub n_tokens: usize,
    /// Position of the first token.
    pub start_pos: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub inv_freq: &'a [f32],
    pub style: flowgate_formats::RopeStyle,
}

/// [`Backend::qk_rope_kv`] as its basic operations (the default, and a fused backend's
/// fallback for shapes its kernel does not take).
pub fn qk_rope_kv_unfused<B: Backend>(
    b: &B,
    q: &mut B::Buf,
    k: &mut B::Buf,
    v: &B::Buf,
    kv: &mut B::Kv,
    norms: Option<(&B::Buf, &B::Buf, f32)>,
    r: &QkRope<'_>,
) {
    if let Some((qn, kn, eps)) = norms {
        b.rms_norm_inplace(q, qn, r.head_dim, eps);
        b.rms_norm_inplace(k, kn, r.head_dim, eps);
    }
    b.rope(q, r.n_heads, r.head_dim, r.start_pos, r.inv_freq, r.style);
    b.rope(
        k,
        r.n_kv_heads,
        r.head_dim,
        r.start_pos,
        r.inv_freq,
        r.style,
    );
    b.kv_write(kv, k, v, r.n_tokens, r.start_pos);
}

/// One SwiGLU FFN application: `down · (silu(gate · x) ⊙ (up · x))` over `n` rows of `x`.
pub struct SwiGluJob<'a, B: Backend> {
    pub gate: &'a B::Weight,
    pub up: &'a B::Weight,
    pub down: &'a B::Weight,
    pub x: &'a B::Buf,
    pub n: usize,
}

/// Device operations used by the models.
pub trait Backend: Send + Sync + Sized {
    /// Activations (f32) on the device.
    type Buf: Send + Sync;
    /// A weight matrix `rows × cols` in its storage dtype, on the device.
    type Weight: Send + Sync;
    /// One layer's key/value storage.
    type Kv: Send + Sync;
    /// A sparse layer's resident experts as the device sees them, for [`Backend::moe_decode`]
    /// (a backend without that path uses `()`).
    type Experts: Send + Sync;

    fn name(&self) -> String;

    /// Makes a 2-D tensor (shape `[rows, cols]`) usable as a matrix.
    fn weight(&self, t: HostTensor) -> Result<Self::Weight>;
    /// Rows of a weight.
    fn weight_rows(&self, w: &Self::Weight) -> usize;
    /// A buffer holding these values.
    fn buf_from(&self, v: &[f32]) -> Result<Self::Buf>;
    /// A zeroed buffer of `n` floats.
    fn buf_zeros(&self, n: usize) -> Result<Self::Buf>;
    /// Copies a buffer to the host.
    fn to_host(&self, b: &Self::Buf) -> Vec<f32>;
    /// Reports (and clears) the first failure of an operation that returns nothing (a device
    /// backend's failed launch or allocation). The CPU backend cannot fail there.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// `out[t] = table[ids[t]]` (rows dequantised to f32).
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// Row-wise RMSNorm of `x` (rows of width `dim`), times `w`, into `out`.
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f32, out: &mut Self::Buf);
    /// In-place RMSNorm of each `dim`-wide group of `x` (q/k norms).
    fn rms_norm_inplace(&self, x: &mut Self::Buf, w: &Self::Buf, dim: usize, eps: f32);
    /// `out[t] = W · x[t]` for `n_tokens` rows of `x`.
    fn matmul(&self, w: &Self::Weight, x: &Self::Buf, n_tokens: usize, out: &mut Self::Buf);
    /// `outs[i] = ws[i] · x` for matrices reading the same input (q/k/v, gate/up), so that a
    /// backend can prepare `x` once. The default runs them one by one.
    fn matmul_many(
        &self,
        ws: &[&Self::Weight],
        x: &Self::Buf,
        n_tokens: usize,
        outs: &mut [&mut Self::Buf],
    ) {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n_tokens, o);
        }
    }
    /// Runs independent SwiGLU FFNs (the chosen experts of one MoE layer). Backends may run
    /// them concurrently; the default runs them one after another.
    fn swiglu_many(&self, jobs: &[SwiGluJob<'_, Self>]) -> Result<Vec<Self::Buf>> {
        jobs.iter().map(|j| swiglu(self, j)).collect()
    }
    /// `x[t] += b` for every row.
    fn add_row_bias(&self, x: &mut Self::Buf, b: &Self::Buf);
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf);
    /// Rotary embedding on `x` (`n_tokens × n_heads × head_dim`), token t at position
    /// `start_pos + t`, with per-pair inverse frequencies `inv_freq` (`head_dim/2`).
    fn rope(
        &self,
        x: &mut Self::Buf,
        n_heads: usize,
        head_dim: usize,
        start_pos: usize,
        inv_freq: &[f32],
        style: flowgate_formats::RopeStyle,
    );

    /// KV storage for `capacity` positions.
    fn kv_alloc(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self::Kv>;
    /// Stores keys/values (`n_tokens × n_kv_heads × head_dim`) at positions from `start_pos`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        k: &Self::Buf,
        v: &Self::Buf,
        n_tokens: usize,
        start_pos: usize,
    );
    /// Keys and values of positions `start..start + n` (`n × n_kv_heads × head_dim` each) read
    /// back to the host, after the work queued so far.
    fn kv_read(&self, kv: &Self::Kv, start: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Causal attention of `q` (`n_tokens × n_heads × head_dim`) over `kv`, into `out`.
    fn attention(&self, q: &Self::Buf, kv: &Self::Kv, p: AttnParams, out: &mut Self::Buf);

    /// Gathers rows `idx` of `x` (width `dim`) into a new buffer.
    fn gather_rows(&self, x: &Self::Buf, dim: usize, idx: &[usize]) -> Result<Self::Buf>;
    /// `out[idx[i]] += scale[i] * y[i]` for rows of width `dim`.
    fn scatter_add_rows(
        &self,
        out: &mut Self::Buf,
        y: &Self::Buf,
        dim: usize,
        idx: &[usize],
        scale: &[f32],
    );
    /// `out[t] += sigmoid(g[t]) · y[t]` for each of the `n` rows of `dim` values: a shared
    /// expert's gate (qwen2_moe; `g` holds one logit per row). The default reads the logits
    /// back to the host; a device backend keeps it on the device (no synchronisation per
    /// layer in decode).
    fn add_sigmoid_gated(
        &self,
        out: &mut Self::Buf,
        y: &Self::Buf,
        g: &Self::Buf,
        n: usize,
        dim: usize,
    ) {
        let g: Vec<f32> = self
            .to_host(g)
            .iter()
            .take(n)
            .map(|&v| 1.0 / (1.0 + (-v).exp()))
            .collect();
        let idx: Vec<usize> = (0..g.len()).collect();
        self.scatter_add_rows(out, y, dim, &idx, &g);
    }
    /// [`Backend::scatter_add_rows`] of several `(y, idx, scale)` parts, in their order (so
    /// results equal the calls one by one); a backend may send all indices in one upload.
    fn scatter_add_many(&self, out: &mut Self::Buf, dim: usize, parts: &[ScatterPart<'_, Self>]) {
        for (y, idx, scale) in parts {
            self.scatter_add_rows(out, y, dim, idx, scale);
        }
    }
    /// Resizes a buffer to `n` floats (contents unspecified).
    fn resize(&self, b: &mut Self::Buf, n: usize) -> Result<()>;

    /// The attention block between the q/k/v products and attention: per-head RMSNorm of q
    /// and k (when `norms` = (q weight, k weight, eps) is given), RoPE of both at positions
    /// `start_pos..`, and k and v stored in `kv` there. One launch per call where fused.
    fn qk_rope_kv(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        kv: &mut Self::Kv,
        norms: Option<(&Self::Buf, &Self::Buf, f32)>,
        r: &QkRope<'_>,
    ) {
        qk_rope_kv_unfused(self, q, k, v, kv, norms, r);
    }

    /// [`Backend::qk_rope_kv`] then [`Backend::attention`] of the same tokens (`r` and `p`
    /// agree on tokens, positions and heads): a backend may fold the first into the second
    /// (one launch per decode layer where it does). `q` and `k` are left unspecified: only the
    /// cache and `out` carry results.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        kv: &mut Self::Kv,
        norms: Option<(&Self::Buf, &Self::Buf, f32)>,
        r: &QkRope<'_>,
        p: AttnParams,
        out: &mut Self::Buf,
    ) {
        self.qk_rope_kv(q, k, v, kv, norms, r);
        self.attention(q, kv, p, out);
    }

    /// `x += y`, then `out = rms_norm(x) · w` (rows of `dim`): a residual add and the norm
    /// that follows it, one pass where the backend fuses them.
    fn add_rms_norm(
        &self,
        x: &mut Self::Buf,
        y: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        out: &mut Self::Buf,
    ) {
        self.add(x, y);
        self.rms_norm(x, w, dim, eps, out);
    }

    /// Prepares a sparse layer's resident experts (`[gate, up, down]` each) for
    /// [`Backend::moe_decode`]; `None` when this backend routes on the host (the default) or
    /// cannot for these experts.
    fn experts(&self, _experts: &[[&Self::Weight; 3]]) -> Result<Option<Self::Experts>> {
        Ok(None)
    }

    /// One token through a sparse layer without leaving the device: router logits
    /// (`router · h`), softmax over all experts, the `k` largest (ties to the lower index),
    /// optionally renormalised, then `out = Σ weight_e · down_e(silu(gate_e · h) ⊙ up_e · h)`.
    /// Only called with experts this backend's [`Backend::experts`] returned.
    fn moe_decode(
        &self,
        _experts: &Self::Experts,
        _router: &Self::Weight,
        _h: &Self::Buf,
        _k: usize,
        _renormalise: bool,
        _out: &mut Self::Buf,
    ) -> Result<()> {
        Err(crate::error::EngineError::Invalid(
            "this backend has no device-side MoE decode".into(),
        ))
    }

    /// Routes `n` tokens on the device: the router's logits of `h` (`n` rows), softmax over
    /// `n_experts`, the top `k` (ties to the lower index), optionally renormalised; per token
    /// its `k` (expert, weight) pairs, most probable first, as
    /// [`crate::models::moe::route`] computes them on the host (up to the order of the
    /// softmax sum). `None` (the default) when this backend leaves routing to the host.
    fn route_tokens(
        &self,
        _router: &Self::Weight,
        _h: &Self::Buf,
        _n: usize,
        _n_experts: usize,
        _k: usize,
        _renormalise: bool,
    ) -> Result<Option<Vec<Route>>> {
        Ok(None)
    }

    /// Speculative prefetch hint, queued just before [`Backend::moe_decode`] of the layer
    /// before `next`: `next`'s router applied to this layer's FFN input `h` predicts the `k`
    /// experts the token will pick there, and a backend paging experts (CUDA under
    /// `--vram-budget`) may start copying them in. Results must not depend on it; the default
    /// does nothing.
    fn moe_predict(
        &self,
        _next: &Self::Experts,
        _next_router: &Self::Weight,
        _h: &Self::Buf,
        _k: usize,
    ) -> Result<()> {
        Ok(())
    }

    /// Like [`Backend::moe_decode`] with the routes (expert, weight) chosen on the host
    /// (`Routing::UniformRandom` in benchmarks), for experts of [`Backend::paged_experts`].
    fn moe_decode_routed(
        &self,
        _experts: &Self::Experts,
        _routes: &[(usize, f32)],
        _h: &Self::Buf,
        _out: &mut Self::Buf,
    ) -> Result<()> {
        Err(crate::error::EngineError::Invalid(
            "this backend has no device-side MoE decode".into(),
        ))
    }

    /// Uniform routing's draw for the token at `pos` of sparse layer `layer` (`routes`, as the
    /// model drew them on the host from `seed`), then [`Backend::moe_decode_routed`]. A
    /// backend may draw the same routes on the device instead, so that the step needs nothing
    /// from the host (and can replay as a graph).
    fn moe_decode_uniform(
        &self,
        experts: &Self::Experts,
        routes: &[(usize, f32)],
        _draw: (u64, usize, usize),
        h: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.moe_decode_routed(experts, routes, h, out)
    }

    /// Sparse layer `layer`'s experts paged through this backend's own expert cache (the CUDA
    /// backend under `--vram-budget`), or `None`: the layer then loads its experts from the
    /// tensors as usual.
    fn paged_experts(&self, _layer: usize) -> Result<Option<Self::Experts>> {
        Ok(None)
    }

    /// How many experts of a paged layer can be resident at once (0 if not paged).
    fn paged_quota(&self, _experts: &Self::Experts) -> usize {
        0
    }

    /// Makes `experts` (at most [`Backend::paged_quota`]) of a paged layer resident and returns
    /// their (gate, up, down) weights, valid for work queued before the layer's next call.
    fn paged_weights(
        &self,
        _experts: &Self::Experts,
        _ids: &[usize],
    ) -> Result<Vec<[Self::Weight; 3]>> {
        Err(crate::error::EngineError::Invalid(
            "this backend does not page experts".into(),
        ))
    }

    /// Decode steps as recorded graphs (CUDA graphs): one token at position `pos` of the
    /// cache whose layers are `kv`. [`StepGraph::Replayed`]: a step recorded earlier for this
    /// cache ran with `token` and `pos` read from device memory, and these are its logits.
    /// [`StepGraph::Recording`]: the caller now queues the step as usual (nothing runs yet),
    /// then must call [`Backend::step_graph_end`]. [`StepGraph::Eager`] (the default): run
    /// the step as usual. The caller guarantees the step needs no host synchronisation
    /// (resident weights, routing on the device).
    fn step_graph(&self, _kv: &[Self::Kv], _token: u32, _pos: usize) -> Result<StepGraph> {
        Ok(StepGraph::Eager)
    }

    /// Ends the recording [`Backend::step_graph`] began, with the step's logits buffer (`None`
    /// when queueing failed). True: the graph was kept and launched, and `logits` holds this
    /// step's logits once read. False: nothing of the step ran; queue it again without a
    /// graph.
    fn step_graph_end(&self, _logits: Option<&Self::Buf>) -> bool {
        false
    }

    /// Drops every recorded step: what a step does changed (the model's routing), so that
    /// none of them may replay.
    fn forget_step_graphs(&self) {}
}

/// What [`Backend::step_graph`] did.
#[derive(Debug)]
pub enum StepGraph {
    Replayed(Vec<f32>),
    Recording,
    Eager,
}

/// One [`SwiGluJob`] with the backend's basic operations.
/// One token's route: its chosen experts and their weights, most probable first.
pub type Route = Vec<(usize, f32)>;

/// One part of [`Backend::scatter_add_many`]: rows `y`, their destination rows and scales.
pub type ScatterPart<'a, B> = (&'a <B as Backend>::Buf, &'a [usize], &'a [f32]);

pub fn swiglu<B: Backend>(b: &B, j: &SwiGluJob<'_, B>) -> Result<B::Buf> {
    let mut gate = b.buf_zeros(0)?;
    let mut up = b.buf_zeros(0)?;
    let mut out = b.buf_zeros(0)?;
    b.matmul_many(&[j.gate, j.up], j.x, j.n, &mut [&mut gate, &mut up]);
    b.silu_mul(&mut gate, &up);
    b.matmul(j.down, &gate, j.n, &mut out);
    Ok(out)
}

/// [`Backend::kv_read`]'s range check: positions `start..start + n` of a cache of `capacity`.
pub(crate) fn kv_range(start: usize, n: usize, capacity: usize) -> Result<()> {
    if start.checked_add(n).is_none_or(|end| end > capacity) {
        return Err(crate::EngineError::Invalid(format!(
            "kv_read: positions {start}..{} of a cache of {capacity}",
            start.saturating_add(n)
        )));
    }
    Ok(())
}
