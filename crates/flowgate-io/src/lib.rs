//! flowgate-io: move byte ranges of model files into memory, fast.
//!
//! Main types:
//! - [`ReadRequest`] and [`read_ranges`]: read many `(file, offset, len)` ranges into their own
//!   buffers with the best strategy. This is what every model load goes through.
//! - [`Loader`] with [`LoaderOptions`]: the same with knobs: [`Strategy`] (page-cache aware
//!   `Auto`, or forced `Direct` / `Buffered`), [`DirectEngine`] (io_uring or a `pread` pool),
//!   queue depth, chunk size, `verify`, a progress callback and a [`FaultHook`] for tests.
//!   Returns [`LoadStats`] (bytes per path, engine used, fallbacks taken).
//! - [`Loader::load_host`] / [`HostView`]: a model's tensors as views of a few arenas laid out
//!   like its files (aligned reads land in place, nothing is copied): what model loads use.
//! - [`Loader::load_cuda`] / [`DeviceView`]: the same into CUDA device memory, every byte
//!   through a page-locked staging pool and asynchronous copies on several streams.
//! - [`sink`] — the sink abstraction behind both (host memory, CUDA device memory).
//! - [`AlignedBuf`] — page-aligned anonymous host memory, huge pages advised.
//! - [`probe`] — `statx` direct-I/O alignment, page-cache residency (`cachestat`/`mincore`),
//!   eviction (`posix_fadvise(DONTNEED)`).
//! - [`RangeReader`] — many small reads into caller-owned memory with files kept open (direct
//!   into a reserved window where uncached, buffered where cached): the I/O under expert paging.
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
mod range_reader;
mod read;
pub mod sink;

/// The CUDA plumbing the CUDA sink uses (re-exported so callers name the same types).
pub use flowgate_cuda;

pub use aligned::{AlignedBuf, BUF_ALIGN};
pub use fault::{FaultHook, IoAttempt, IoPath};
pub use loader::{DirectEngine, LoadStats, Loader, LoaderOptions, Progress, Strategy};
pub use range_reader::{RangeRead, RangeReader, RangeStats, Window};
pub use read::{read_ranges, IoError, ReadRequest, PIECE};
pub use sink::{DeviceView, HostView};
