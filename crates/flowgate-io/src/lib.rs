//! flowgate-io: move byte ranges of model files into memory, fast.
//!
//! Main types:
//! - [`AlignedBuf`]: a heap buffer aligned for SIMD and direct I/O (4096 bytes).
//! - [`ReadRequest`] and [`read_ranges`]: read many `(file, offset, len)` ranges into their own
//!   buffers with several threads doing positional reads (`pread`) in 8 MiB pieces.
//!
//! This is the simple, portable loader every model load goes through today. It knows nothing
//! about models: callers hand it byte ranges. Direct I/O, io_uring and page-cache probing build on
//! the same request shape.

mod aligned;
mod read;

pub use aligned::AlignedBuf;
pub use read::{read_ranges, IoError, ReadRequest};
