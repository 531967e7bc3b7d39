//! flowgate-io: move byte ranges of model files into memory, fast.
//!
//! Main types:
//! - [`ReadRequest`] and [`read_ranges`]: read many `(file, offset, len)` ranges into their own
//!   buffers with the best strategy. This is what every model load goes through.
//! - [`Loader`] with [`LoaderOptions`]: the same with knobs: [`Strategy`] (page-cache aware
//!   `Auto`, or forced `Direct` / `Buffered`), [`DirectEngine`] (io_uring or a `pread` pool),
//!   queue depth, chunk size, `verify`, a progress callback and a [`FaultHook`] for tests.
//!   Returns [`LoadStats`] (bytes per path, engine used, fallbacks taken).
//! - [`AlignedBuf`] — the host sink: page-aligned anonymous memory, huge pages advised.
//! - [`probe`] — `statx` direct-I/O alignment, page-cache residency (`cachestat`/`mincore`),
//!   eviction (`posix_fadvise(DONTNEED)`).
//! - [`baseline`] — the reference readers benchmarks compare against (sequential `O_DIRECT`,
//!   mmap + memcpy, plain `read`).
//!
//! Internals: `plan` turns wanted ranges into aligned, merged reads (to-destination or through
//! bounce buffers); `engine` carries them out (io_uring with registered files and buffers, a
//! `pread` pool, buffered `pread` threads), every completion going through one state machine
//! that continues short reads, retries `EAGAIN`/`ECANCELED`/`EINTR` and fails cleanly otherwise.
//! This crate knows nothing about models: callers hand it byte ranges.

mod aligned;
pub mod baseline;
mod engine;
mod fault;
mod loader;
mod plan;
pub mod probe;
mod read;

pub use aligned::{AlignedBuf, BUF_ALIGN};
pub use fault::{FaultHook, IoAttempt, IoPath};
pub use loader::{DirectEngine, LoadStats, Loader, LoaderOptions, Progress, Strategy};
pub use read::{read_ranges, IoError, ReadRequest, PIECE};
