//! The one error type of the formats crate. Every parser returns it; none panics on bad input.

use std::path::PathBuf;

/// Errors from reading model files, headers and configs.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file is truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated { offset: u64, needed: u64, len: u64 },
    #[error("unknown tensor type id {id} for tensor '{tensor}'")]
    UnknownDType { tensor: String, id: u32 },
    #[error("unknown dtype '{0}'")]
    UnknownDTypeName(String),
    #[error("tensor '{tensor}': {msg}")]
    BadTensor { tensor: String, msg: String },
    #[error("tensor '{tensor}': bytes {start}..{end} lie past the end of the file ({len} bytes)")]
    OutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("size overflow: {0}")]
    Overflow(String),
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("unknown architecture '{0}' (supported: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe)")]
    UnknownArchitecture(String),
    #[error("{path}: malformed JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("config: {0}")]
    Config(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

impl FormatError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}
