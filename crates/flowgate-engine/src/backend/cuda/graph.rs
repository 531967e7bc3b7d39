//! Decode steps as CUDA graphs ([`Backend::step_graph`]).
//!
//! A decode step queues ~360 (dense) to ~700 (MoE) small launches; each costs the host a
//! `cuLaunchKernel` and the device a gap between kernels. The first step on a KV cache is
//! queued under stream capture instead of running: the captured graph is instantiated once and
//! replayed for every later token with one `cuGraphLaunch`.
//!
//! What makes a step replayable:
//! - **Per-token values come from device memory.** The step slot holds the token id and its
//!   position, written before each launch; while recording, `embed` reads the id from it,
//!   `qk_rope_kv` and the decode attention read the position from it, and the attention
//!   launches the most splits it may need (each block works out the real number from the
//!   position and the extra ones return at once).
//! - **Addresses stay fixed.** Every buffer taken from the pool during the recording (scratch,
//!   temporaries, the logits) belongs to the graph when released: it never goes back to the
//!   pool while the graph lives, so a replay finds its memory untouched by other work. Weights,
//!   norms and the rope table are the model's for its lifetime; a graph is keyed by the
//!   addresses of the KV cache it writes (a new cache records a new graph).
//! - **Nothing runs while recording**, so nothing lasting may be set up then: the attention's
//!   merge counters are sized before a capture begins, and an operation that would make
//!   lasting state (the counters, the rope table) during a recording taints it instead.
//! - **Nothing in a step needs the host.** The model records only steps that read nothing back
//!   (its router, experts on the device); the backend declines under a paging expert cache
//!   (which reads routes back) and while profiling (events around each launch). An operation
//!   that would bake a per-token value into the graph (a fallback path) taints the recording:
//!   the graph is discarded and the step queued again without one.
//!
//! Nothing else changes: the same kernels run in the same order on the same stream, so a
//! replayed step's logits equal an eager step's bit for bit (test
//! `decode_graphs_replay_eager_steps_exactly`). `FLOWGATE_CUDA_GRAPHS=0` (or
//! [`CudaBackend::set_decode_graphs`]) turns graphs off.

use std::sync::{Arc, Mutex};

use flowgate_cuda::cudarc::driver::sys;
use flowgate_cuda::DeviceBuffer;

use super::{lock, CudaBackend, CudaBuf, CudaKv, Pool};
use crate::backend::StepGraph;
use crate::error::Result;

/// Pool memory a recorded graph refers to: released buffers land here, not in the pool.
pub(super) type Held = Arc<Mutex<Vec<DeviceBuffer>>>;

/// Graphs kept at once (one per KV cache; the least recently used goes first).
const MAX_GRAPHS: usize = 8;

/// One recorded decode step.
struct DecodeGraph {
    key: u64,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    /// The logits buffer the step writes (address, floats).
    logits: (u64, usize),
    held: Held,
    pool: Arc<Pool>,
}

// SAFETY: the graph handles are used only under the backend's `graphs` lock, on the thread
// that holds it; CUDA graph objects are not tied to a thread.
unsafe impl Send for DecodeGraph {}

impl Drop for DecodeGraph {
    /// Callers make sure no launch of the graph is still queued (the stream is synchronised
    /// before graphs are dropped), so its buffers can go back to the pool.
    fn drop(&mut self) {
        // SAFETY: both handles were made by cuGraphInstantiate / cuStreamEndCapture and are
        // destroyed once, here.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
        for b in lock(&self.held).drain(..) {
            self.pool.put(b);
        }
    }
}

/// A recording in progress.
struct Recording {
    key: u64,
    held: Held,
}

/// The decode graphs of one backend.
pub(super) struct Graphs {
    on: bool,
    /// The step slot: token id and position (two `int`s).
    step: Option<DeviceBuffer>,
    recording: Option<Recording>,
    /// Most recently used last.
    graphs: Vec<DecodeGraph>,
    /// Caches whose step could not be recorded (an operation needed the host), once per
    /// failure: after two (the first may be a one-time upload) not tried again.
    declined: Vec<u64>,
    recorded: u64,
    replayed: u64,
}

impl Graphs {
    pub(super) fn new() -> Graphs {
        Graphs {
            on: super::switch_on("FLOWGATE_CUDA_GRAPHS"),
            step: None,
            recording: None,
            graphs: Vec::new(),
            declined: Vec::new(),
            recorded: 0,
            replayed: 0,
        }
    }
}

/// A key for the KV cache `kv`: its layers' addresses and capacity.
fn kv_key(kv: &[CudaKv]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for l in kv {
        (l.k.ptr(), l.v.ptr(), l.capacity, l.width).hash(&mut h);
    }
    h.finish()
}

impl Drop for CudaBackend {
    /// Graphs go first, while the stream and the kernels' modules they use still exist.
    fn drop(&mut self) {
        self.forget_graphs();
    }
}

impl CudaBackend {
    /// Whether one-token steps are recorded and replayed as CUDA graphs (on by default;
    /// `FLOWGATE_CUDA_GRAPHS=0` turns them off). Turning them off drops the graphs kept.
    pub fn set_decode_graphs(&self, on: bool) {
        let mut g = lock(&self.graphs);
        g.on = on;
        if !on {
            self.drop_graphs(&mut g);
        }
    }

    /// Decode steps recorded as graphs and replayed so far.
    pub fn decode_graph_counts(&self) -> (u64, u64) {
        let g = lock(&self.graphs);
        (g.recorded, g.replayed)
    }

    /// The step slot's address while a step is being recorded (per-token values are read from
    /// it), else `None`.
    pub(super) fn recording_step(&self) -> Option<u64> {
        let p = self.recording.load(std::sync::atomic::Ordering::Relaxed);
        (p != 0).then_some(p)
    }

    /// Marks the recording in progress (if any) as unusable: `what` would bake a per-token
    /// value into it, or needs the host.
    pub(super) fn taint_recording(&self, what: &str) {
        if self.recording_step().is_some() {
            lock(&self.graph_taint).get_or_insert_with(|| format!("{what} while recording"));
        }
    }

    /// Drops every graph (their memory may be about to change: a regrown buffer they use).
    pub(super) fn forget_graphs(&self) {
        let mut g = lock(&self.graphs);
        self.drop_graphs(&mut g);
    }

    fn drop_graphs(&self, g: &mut Graphs) {
        if !g.graphs.is_empty() {
            // Replays may still be queued.
            if let Err(e) = self.stream.synchronize() {
                self.fail(e.to_string());
            }
            g.graphs.clear();
        }
    }

    /// Writes the step slot (outside any capture): `token`, `pos`.
    fn write_step(&self, g: &mut Graphs, token: u32, pos: usize) -> Result<u64> {
        if g.step.is_none() {
            g.step = Some(self.alloc.alloc(256).map_err(super::cuda_err)?);
        }
        let p = g.step.as_ref().map_or(0, |s| s.ptr());
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&token.to_le_bytes());
        bytes[4..].copy_from_slice(&(pos as i32).to_le_bytes());
        self.upload(p, &bytes);
        Ok(p)
    }

    pub(super) fn graph_step(&self, kv: &[CudaKv], token: u32, pos: usize) -> Result<StepGraph> {
        // The decode attention's counters (one per head), zeroed now: zeroing them inside a
        // capture would only record it. (Before taking the lock: growing them drops graphs.)
        if self.recording_step().is_some() || self.attn_counters(4096).is_none() {
            return Ok(StepGraph::Eager);
        }
        let mut g = lock(&self.graphs);
        if !g.on
            || g.recording.is_some()
            || self.profile.is_some()
            || lock(&self.pager).is_some()
            || self.failed()
            || pos > i32::MAX as usize
        {
            return Ok(StepGraph::Eager);
        }
        let key = kv_key(kv);
        if g.declined.iter().filter(|&&k| k == key).count() >= 2 {
            return Ok(StepGraph::Eager);
        }
        // A q8 form made before this step must not be read by it (nor by a replay).
        *lock(&self.q8_fresh) = None;
        self.write_step(&mut g, token, pos)?;
        if let Some(i) = g.graphs.iter().position(|d| d.key == key) {
            let d = g.graphs.remove(i);
            self.bump();
            self.device.bind().map_err(super::cuda_err)?;
            // SAFETY: `exec` is a live instantiated graph; its buffers are held by `d`.
            let r = unsafe { sys::cuGraphLaunch(d.exec, self.stream.cu_stream()) };
            let logits = d.logits;
            g.graphs.push(d);
            g.replayed += 1;
            drop(g);
            if r != sys::CUresult::CUDA_SUCCESS {
                self.fail(format!("cuGraphLaunch: {r:?}"));
                return Ok(StepGraph::Replayed(vec![f32::NAN; logits.1]));
            }
            return Ok(StepGraph::Replayed(self.read_floats(logits.0, logits.1)));
        }
        self.device.bind().map_err(super::cuda_err)?;
        // Relaxed: the pool may allocate while recording (nothing else runs meanwhile).
        // SAFETY: the stream is live and not capturing (`recording` is None).
        let r = unsafe {
            sys::cuStreamBeginCapture_v2(
                self.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!("decode graphs off: cuStreamBeginCapture: {r:?}");
            g.on = false;
            return Ok(StepGraph::Eager);
        }
        let held: Held = Arc::default();
        *lock(&self.pool.recording) = Some(held.clone());
        *lock(&self.graph_taint) = None;
        let step = g.step.as_ref().map_or(0, |s| s.ptr());
        self.recording
            .store(step, std::sync::atomic::Ordering::Relaxed);
        g.recording = Some(Recording { key, held });
        Ok(StepGraph::Recording)
    }

    pub(super) fn graph_step_end(&self, logits: Option<&CudaBuf>) -> bool {
        let mut g = lock(&self.graphs);
        let Some(rec) = g.recording.take() else {
            return false;
        };
        *lock(&self.pool.recording) = None;
        self.recording
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let tainted = lock(&self.graph_taint).take();
        // Its buffer belongs to the graph; the next step must not take it.
        *lock(&self.q8_fresh) = None;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (begun in `graph_step`); `graph` is an out-pointer.
        let r = unsafe { sys::cuStreamEndCapture(self.stream.cu_stream(), &mut graph) };
        let why = if r != sys::CUresult::CUDA_SUCCESS {
            Some(format!("cuStreamEndCapture: {r:?}"))
        } else if let Some(t) = tainted {
            Some(t)
        } else if logits.is_none() {
            Some("the step failed while queued".into())
        } else {
            // An error recorded while capturing (a launch refused) also voids it.
            lock(&self.error).take()
        };
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        let why = why.or_else(|| {
            // SAFETY: `graph` is the captured graph; `exec` an out-pointer.
            let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
            (r != sys::CUresult::CUDA_SUCCESS).then(|| format!("cuGraphInstantiate: {r:?}"))
        });
        if let Some(why) = why {
            tracing::debug!("decode step not recorded: {why}");
            if g.declined.len() >= 128 {
                g.declined.remove(0);
            }
            g.declined.push(rec.key);
            if !graph.is_null() {
                // SAFETY: the captured graph, never instantiated.
                unsafe { sys::cuGraphDestroy(graph) };
            }
            // Nothing of the capture ran: its buffers are free.
            for b in lock(&rec.held).drain(..) {
                self.pool.put(b);
            }
            return false;
        }
        let l = logits.map_or((0, 0), |b| (b.ptr(), b.len()));
        let d = DecodeGraph {
            key: rec.key,
            graph,
            exec,
            logits: l,
            held: rec.held,
            pool: self.pool.clone(),
        };
        // SAFETY: `exec` was just instantiated; the step slot was written before the capture.
        let r = unsafe { sys::cuGraphLaunch(d.exec, self.stream.cu_stream()) };
        self.bump();
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail(format!("cuGraphLaunch: {r:?}"));
        }
        if g.graphs.len() >= MAX_GRAPHS {
            if let Err(e) = self.stream.synchronize() {
                self.fail(e.to_string());
            }
            g.graphs.remove(0);
        }
        g.graphs.push(d);
        g.recorded += 1;
        true
    }
}
