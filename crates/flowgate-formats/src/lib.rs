//! flowgate-formats: reading model files into one canonical description.
//!
//! - [`ModelSpec`] (in [`spec`]): architecture and hyperparameters, whatever the source.
//! - [`TensorCatalog`] (in [`catalog`]): canonical tensor name → dtype, shape, file, byte range.
//! - [`gguf`] — GGUF v2/v3 header parsing and a streaming writer.
//! - [`safetensors`] and [`hf`] — HF directories (`config.json`, single or sharded safetensors).
//! - [`quant`] — GGUF quant block layouts and reference dequantisation.
//! - [`model`] — [`model::open`] turns a path (GGUF file or HF directory) into a [`ModelFile`].
//!
//! Nothing here reads tensor data except [`quant`]'s pure functions on byte slices; parsers
//! validate every size and offset and return [`FormatError`] instead of panicking.

pub mod catalog;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod gguf_arch;
pub mod hf;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod spec;

pub use catalog::{ExpertProj, TensorCatalog, TensorInfo};
pub use dtype::DType;
pub use error::{FormatError, Result};
pub use model::ModelFile;
pub use spec::{Arch, ModelSpec, MoeSpec, QkNorm, RopeScaling, RopeSpec, RopeStyle};
