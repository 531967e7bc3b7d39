//! [`KvCache`]: the keys and values of every layer for one sequence.
//!
//! Storage is the backend's (`B::Kv`); this type tracks how many positions are filled and
//! refuses to overrun its capacity with a clear error. Sliding-window models still store every
//! position here; the attention mask applies the window.

use crate::backend::Backend;
use crate::error::{EngineError, Result};

pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<B::Kv>,
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
        let layers = (0..n_layers)
            .map(|_| backend.kv_alloc(n_kv_heads, head_dim, capacity))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
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
