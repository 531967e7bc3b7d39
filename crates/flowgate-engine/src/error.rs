//! The engine's error type.

use flowgate_formats::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Io(#[from] flowgate_io::IoError),
    #[error("tensor '{tensor}': {msg}")]
    Weight { tensor: String, msg: String },
    #[error("token id {id} is out of range (vocabulary has {vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("context full: {needed} positions needed, the KV cache holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
