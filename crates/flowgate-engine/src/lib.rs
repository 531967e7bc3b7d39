//! flowgate-engine: running models.
//!
//! - [`backend`] — the [`backend::Backend`] trait and the CPU backend with its SIMD kernels.
//! - [`models`] — [`models::Model`], one decoder for every supported architecture
//!   (`llama.rs` for the dense block, `moe.rs` for sparse FFNs).
//! - [`kv`] — [`kv::KvCache`].
//! - [`residency`] — budgets, placement, and MoE experts paged through a RAM cache.
//! - [`weights`] — loading tensors into host memory through `flowgate-io`.
//! - [`sampling`] — greedy / temperature / top-k / top-p / min-p / repeat penalty.
//! - [`tokenizer`] and [`chat`] — text in and out, chat templates.
//! - [`runtime`] — [`runtime::load`] opens a model path and builds all of the above.

pub mod backend;
pub mod chat;
pub mod error;
pub mod kv;
pub mod models;
pub mod residency;
pub mod runtime;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};
