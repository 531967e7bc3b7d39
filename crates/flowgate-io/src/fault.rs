//! Fault injection: a hook every read completion passes through.
//!
//! The three read primitives (an io_uring completion, a `pread` on the direct fd, a `pread` on
//! the buffered fd) all end in the same place: a result (`bytes ≥ 0` or `-errno`) and the buffer
//! the kernel wrote into. A [`FaultHook`] sees both before the loader does and may change them:
//! shorten the result (and scribble over the bytes it pretends were not read), or replace it
//! with `-EIO`, `-EAGAIN`, `-ECANCELED`. The loader must then retry or fail cleanly; the tests
//! check that it never hands back a tensor with the scribbled bytes in it. In production no hook
//! is installed and the cost is one branch per completion.

/// Which primitive completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPath {
    /// io_uring read (direct fd, or the buffered fd after an `EINVAL` fallback).
    Uring,
    /// `pread` on the direct fd from the thread pool (no io_uring).
    Pool,
    /// `pread` through the page cache.
    Buffered,
}

/// One attempt at a read.
#[derive(Clone, Copy, Debug)]
pub struct IoAttempt {
    pub path: IoPath,
    pub file: usize,
    pub offset: u64,
    /// Bytes asked for in this attempt.
    pub len: usize,
    /// 0 for the first attempt of a read, then 1, 2, … for its retries and continuations.
    pub attempt: u32,
}

/// Sees every completion before the loader does.
pub trait FaultHook: Send + Sync {
    /// `buf` is what this attempt asked the kernel to fill (`len` bytes); `res` is the kernel's
    /// result. Returns the result the loader should act on.
    fn complete(&self, io: &IoAttempt, buf: &mut [u8], res: i64) -> i64;
}
