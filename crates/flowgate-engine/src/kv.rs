//! [`KvCache`]: the keys and values of every layer for one sequence.
//!
//! Storage is the backend's (`B::Kv`); this type tracks how many positions are filled and
//! refuses to overrun its capacity with a clear error. Sliding-window models still store every
//! position here; the attention mask applies the window.
//!
//! Under the GPU layer split (`residency::layer_split`) the layers that run on the CPU keep
//! their keys and values in host RAM (`host`), the others on the model's backend (`layers`).

use crate::backend::cpu::{CpuBackend, CpuKv};
use crate::backend::Backend;
use crate::error::{EngineError, Result};

pub struct KvCache<B: Backend> {
    /// The layers on the model's backend.
    pub(crate) layers: Vec<B::Kv>,
    /// The leading layers that run on the CPU (empty unless the model is split).
    pub(crate) host: Vec<CpuKv>,
    capacity: usize,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(
        backend: &B,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        Self::split(backend, 0, n_layers, n_kv_heads, head_dim, capacity)
    }

    /// A cache whose first `n_host` layers live in host RAM and the next `n_device` on
    /// `backend`.
    pub fn split(
        backend: &B,
        n_host: usize,
        n_device: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        let host = (0..n_host)
            .map(|_| CpuBackend.kv_alloc(n_kv_heads, head_dim, capacity))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..n_device)
            .map(|_| backend.kv_alloc(n_kv_heads, head_dim, capacity))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            host,
            capacity,
            len: 0,
        })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the storage is reused).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Checks that `n` more positions fit.
    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(EngineError::ContextFull {
                needed: self.len + n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
