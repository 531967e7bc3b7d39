//! Read engines: carry out a plan's reads and hand their bytes to the load's sink
//! ([`crate::sink`]): reads land in the sink's host memory where it has some, everything else
//! goes through bounce buffers (the engine's own, or the sink's page-locked staging pool, which
//! is then reclaimed from the sink before it is read into again).
//!
//! - [`run_uring`]: one thread owns an io_uring (queue depth ≥ 32) with the files registered
//!   (`IORING_REGISTER_FILES`) and a pool of bounce buffers registered (`READ_FIXED`, so the
//!   kernel does not pin and unpin pages per read). Reads that go straight to a destination use
//!   plain `READ`. The thread keeps the queue full; completed bounce buffers go to copy
//!   workers (the thread helps when they fall behind) and come back to be refilled, so the
//!   copies overlap the reads in flight. While copies are outstanding the thread waits for
//!   completions with a 200 µs timeout (`IORING_FEAT_EXT_ARG`) so returned buffers are
//!   resubmitted promptly. With `FLOWGATE_NO_IO_URING` set, setup fails on purpose (EPERM), to
//!   exercise the fallback below.
//! - [`run_pool`]: the same reads with `pread` from a pool of threads, each with its own bounce
//!   buffer, for kernels or sandboxes without io_uring (`io_uring_setup` → ENOSYS/EPERM).
//! - [`run_buffered`]: `pread` through the page cache straight into the destinations, from
//!   several threads, for ranges that are already cached (into two staging buffers per thread
//!   when the sink has no host memory, one read while the other is delivered).
//!
//! All three end every attempt in [`Ctx::on_result`]: short reads continue (for direct I/O from
//! the last aligned byte), `EINTR`/`EAGAIN`/`ECANCELED` are retried a bounded number of times,
//! `EINVAL` on a direct read switches that read to the buffered fd (logged once), anything else
//! is an error naming the file and range. A read that returns 0 before the expected end is a
//! `ShortFile` error. No engine returns while the kernel may still write into a buffer.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use io_uring::{opcode, types, IoUring};

use crate::fault::{FaultHook, IoAttempt, IoPath};
use crate::plan::{Piece, ReadOp, Target};
use crate::probe::DioAlign;
use crate::sink::Sink;
use crate::{AlignedBuf, IoError};

/// Attempts without progress before a read is given up.
pub(crate) const MAX_TRIES: u32 = 8;

/// An open input file.
pub(crate) struct OpenFile {
    pub path: PathBuf,
    pub buffered: File,
    pub direct: Option<File>,
    pub size: u64,
    pub align: DioAlign,
}

/// A destination: `len` writable bytes at `ptr`.
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    pub ptr: *mut u8,
    pub len: usize,
}

/// Shared state of one load.
pub(crate) struct Ctx<'a> {
    pub files: &'a [OpenFile],
    pub sink: &'a dyn Sink,
    pub hook: Option<&'a dyn FaultHook>,
    pub progress: Option<&'a (dyn Fn(u64) + Send + Sync)>,
    pub delivered: AtomicU64,
    pub failed: AtomicBool,
    /// Set when the kernel may still write into buffers (the loader then leaks them).
    pub poisoned: AtomicBool,
    pub error: Mutex<Option<IoError>>,
    pub notes: Mutex<Vec<String>>,
    pub direct_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    /// Nanoseconds spent copying out of bounce buffers, and waiting for completions.
    pub copy_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    pub buffered_bytes: AtomicU64,
    pub retries: AtomicU64,
    pub reads: AtomicU64,
}

/// The read an attempt belongs to: which primitive, file, offset, bytes expected, and whether
/// it went to an `O_DIRECT` fd.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Which {
    pub path: IoPath,
    pub file: usize,
    pub offset: u64,
    pub expect: usize,
    pub direct: bool,
}

/// Progress of one read.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Attempt {
    pub done: usize,
    pub tries: u32,
    pub n: u32,
    /// Switched to the buffered fd after `EINVAL` from `O_DIRECT`.
    pub buffered: bool,
}

pub(crate) enum Next {
    Done,
    Again,
    Fail(IoError),
}

/// Logs `msg` once per process for `key` (tracing::warn), and records it in the load's notes.
pub(crate) fn note(ctx_notes: &Mutex<Vec<String>>, key: &str, msg: String) {
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if let Ok(mut s) = SEEN.lock() {
        if !s.iter().any(|k| k == key) {
            s.push(key.to_string());
            tracing::warn!("{msg}");
        }
    }
    if let Ok(mut n) = ctx_notes.lock() {
        if !n.contains(&msg) {
            n.push(msg);
        }
    }
}

fn neg_errno() -> i64 {
    -(std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO) as i64)
}

/// `pread` returning bytes or `-errno`.
fn pread(fd: i32, buf: &mut [u8], off: u64) -> i64 {
    // SAFETY: buf is a valid writable slice of buf.len() bytes.
    let r = unsafe {
        libc::pread64(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            off as libc::off64_t,
        )
    };
    if r < 0 {
        neg_errno()
    } else {
        r as i64
    }
}

impl<'a> Ctx<'a> {
    pub fn new(
        files: &'a [OpenFile],
        sink: &'a dyn Sink,
        hook: Option<&'a dyn FaultHook>,
        progress: Option<&'a (dyn Fn(u64) + Send + Sync)>,
    ) -> Ctx<'a> {
        Ctx {
            files,
            sink,
            hook,
            progress,
            delivered: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            error: Mutex::new(None),
            notes: Mutex::new(Vec::new()),
            direct_bytes: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            copy_ns: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Records the first error and tells every engine to stop issuing reads.
    pub fn fail(&self, e: IoError) {
        if let Ok(mut g) = self.error.lock() {
            g.get_or_insert(e);
        }
        self.failed.store(true, Ordering::Release);
    }

    pub fn stopped(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Counts `n` bytes as delivered before any read (and reports them, if non-zero).
    pub fn start_at(&self, n: u64) {
        if n > 0 {
            self.progress(n);
        }
    }

    fn progress(&self, n: u64) {
        let t = self.delivered.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = self.progress {
            p(t);
        }
    }

    /// `len` bytes of request `req` at `off` where reads land directly, checked against the
    /// destination's length; `None` if out of range or the sink has no host memory there.
    ///
    /// # Safety
    /// No other live reference may cover the same bytes (the plan delivers each byte once).
    #[allow(clippy::mut_from_ref)]
    unsafe fn dest_mut(&self, req: usize, off: usize, len: usize) -> Option<&mut [u8]> {
        let d = self.sink.landing(req)?;
        if off.checked_add(len)? > d.len {
            return None;
        }
        if len == 0 {
            return Some(&mut []);
        }
        // SAFETY: in bounds of an allocation of d.len bytes; exclusivity per the caller.
        Some(unsafe { std::slice::from_raw_parts_mut(d.ptr.add(off), len) })
    }

    fn read_err(&self, op_file: usize, offset: u64, len: usize, errno: i32) -> IoError {
        IoError::Read {
            path: self.path(op_file),
            offset,
            len,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    fn path(&self, file: usize) -> PathBuf {
        self.files
            .get(file)
            .map(|f| f.path.clone())
            .unwrap_or_default()
    }

    /// Acts on the result of one attempt at `op`. `buf` is the attempt's buffer (what was asked
    /// for); `direct` says whether it went to an `O_DIRECT` fd.
    pub fn on_result(&self, r: Which, st: &mut Attempt, buf: &mut [u8], res: i64) -> Next {
        let Which {
            path,
            file: op_file,
            offset: op_offset,
            expect: op_expect,
            direct,
        } = r;
        let asked = buf.len();
        let res = match self.hook {
            Some(h) => h.complete(
                &IoAttempt {
                    path,
                    file: op_file,
                    offset: op_offset + st.done as u64,
                    len: asked,
                    attempt: st.n,
                },
                buf,
                res,
            ),
            None => res,
        };
        st.n += 1;
        let whole = (op_offset, op_expect);
        if res < 0 {
            let errno = (-res) as i32;
            match errno {
                libc::EINTR | libc::EAGAIN | libc::ECANCELED | libc::EBUSY => {
                    st.tries += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    if st.tries >= MAX_TRIES {
                        return Next::Fail(self.read_err(op_file, whole.0, whole.1, errno));
                    }
                    Next::Again
                }
                libc::EINVAL | libc::EOPNOTSUPP if direct && !st.buffered => {
                    let p = self.path(op_file);
                    note(
                        &self.notes,
                        &format!("dio-einval:{}", p.display()),
                        format!(
                            "{}: O_DIRECT read refused ({}); reading it through the page cache",
                            p.display(),
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    );
                    st.buffered = true;
                    Next::Again
                }
                _ => Next::Fail(self.read_err(op_file, whole.0, whole.1, errno)),
            }
        } else {
            let n = res as usize;
            if n > asked {
                return Next::Fail(IoError::Read {
                    path: self.path(op_file),
                    offset: whole.0,
                    len: whole.1,
                    source: std::io::Error::other(format!(
                        "read returned {n} bytes of {asked} asked"
                    )),
                });
            }
            st.done += n;
            if st.done >= op_expect {
                return Next::Done;
            }
            if n == 0 {
                return Next::Fail(IoError::ShortFile {
                    path: self.path(op_file),
                    offset: whole.0,
                    len: whole.1,
                });
            }
            // A short read: continue where it stopped. A direct read can only continue on an
            // aligned offset; rather than re-read the unaligned part, the rest of this read goes
            // through the buffered fd (short direct reads are rare outside the end of a file).
            if direct && !st.buffered {
                let a = self.files.get(op_file).map_or(4096, |f| f.align.offset);
                if !st.done.is_multiple_of(a) {
                    st.buffered = true;
                }
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            Next::Again
        }
    }

    /// Hands a completed read's bytes to the sink (bounce reads: every delivery out of
    /// `bounce`, which is staging buffer `staging` when the sink owns it); counts progress.
    fn deliver(&self, op: &ReadOp, bounce: &[u8], staging: Option<usize>) -> Result<(), IoError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.direct_bytes
            .fetch_add(op.expect as u64, Ordering::Relaxed);
        match &op.target {
            Target::Dest { .. } => self.progress(op.len as u64),
            Target::Bounce(dl) => {
                let t0 = std::time::Instant::now();
                let mut n = 0u64;
                for d in dl {
                    let src = d
                        .src_off
                        .checked_add(d.len)
                        .filter(|&e| e <= op.expect)
                        .and_then(|e| bounce.get(d.src_off..e))
                        .ok_or_else(|| IoError::Plan(format!("delivery {d:?} outside its read")))?;
                    self.sink.deliver(staging, d.req, d.dst_off, src)?;
                    n += d.len as u64;
                }
                self.copied_bytes.fetch_add(n, Ordering::Relaxed);
                self.copy_ns
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                self.progress(n);
            }
        }
        Ok(())
    }

    fn fd(&self, file: usize, buffered: bool) -> (i32, bool) {
        match self.files.get(file) {
            Some(f) => match (&f.direct, buffered) {
                (Some(d), false) => (d.as_raw_fd(), true),
                _ => (f.buffered.as_raw_fd(), false),
            },
            None => (-1, false),
        }
    }
}

/// Faults in `len` bytes of host destination `d` at `off` for writing
/// (`MADV_POPULATE_WRITE`, Linux 5.14+; a no-op on older kernels, where the reads fault them).
/// Only page-table work: the contents of pages already present are untouched.
pub(crate) fn populate(d: Dest, off: usize, len: usize) {
    const MADV_POPULATE_WRITE: i32 = 23;
    let Some(end) = off.checked_add(len).filter(|&e| e <= d.len) else {
        return;
    };
    // Whole pages inside the destination (it is page aligned: AlignedBuf).
    let start = off & !4095;
    let end = end.div_ceil(4096) * 4096;
    let end = end.min(d.len.div_ceil(4096) * 4096);
    if end <= start {
        return;
    }
    // SAFETY: advice on pages of a mapping this load owns; POPULATE_WRITE only faults pages in
    // (zero-filled if absent) and never changes the contents of present ones, so it cannot
    // disturb a read that is writing them.
    unsafe {
        libc::madvise(
            d.ptr.add(start) as *mut libc::c_void,
            end - start,
            MADV_POPULATE_WRITE,
        )
    };
}

/// Options of the direct engines.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EngineOpts {
    pub queue_depth: usize,
    pub bounce_size: usize,
    pub bounce_buffers: usize,
    pub pool_threads: usize,
    /// Threads copying out of bounce buffers besides the io_uring thread.
    pub copy_threads: usize,
}

/// What [`run_uring`] could not set up (the caller falls back to [`run_pool`]).
pub(crate) struct SetupError(pub std::io::Error);

struct Slot {
    op: usize,
    bounce: Option<usize>,
    st: Attempt,
}

/// Reads `ops` with io_uring. `Err(SetupError)` only when the ring itself cannot be created:
/// read errors are recorded in `ctx`.
pub(crate) fn run_uring(ctx: &Ctx, ops: &[ReadOp], o: &EngineOpts) -> Result<(), SetupError> {
    let qd = o.queue_depth.clamp(1, 4096);
    let entries = (qd as u32).max(32).next_power_of_two();
    if std::env::var_os("FLOWGATE_NO_IO_URING").is_some() {
        return Err(SetupError(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "disabled by FLOWGATE_NO_IO_URING",
        )));
    }
    let mut ring = IoUring::new(entries).map_err(SetupError)?;
    let ext_arg = ring.params().is_feature_ext_arg();
    ctx.notes
        .lock()
        .map(|mut n| n.push(format!("io_uring: {entries} entries, {qd} reads in flight")))
        .ok();

    // Registered files: the direct fd of each file (its buffered fd where O_DIRECT was refused).
    let fds: Vec<i32> = (0..ctx.files.len()).map(|i| ctx.fd(i, false).0).collect();
    let fixed_files = match ring.submitter().register_files(&fds) {
        Ok(()) => true,
        Err(e) => {
            note(
                &ctx.notes,
                "uring-files",
                format!("io_uring: registering files failed ({e}); using plain fds"),
            );
            false
        }
    };

    // No more buffers than bounce reads, none larger than the largest of them.
    let bounce_lens = ops.iter().filter_map(|op| match op.target {
        Target::Bounce(_) => Some(op.len),
        Target::Dest { .. } => None,
    });
    let n_bounce = bounce_lens.clone().count();
    let widest = bounce_lens.max().unwrap_or(0);
    // The sink's own (page-locked) staging buffers when it has them, else our own.
    let staged = ctx.sink.staging();
    let (bsize, nb) = match staged {
        Some(st) => (st.size, st.direct.min(qd).min(n_bounce)),
        None => (
            widest.div_ceil(4096) * 4096,
            o.bounce_buffers.clamp(1, qd).min(n_bounce),
        ),
    };
    if staged.is_some() && widest > bsize {
        ctx.fail(IoError::Plan(format!(
            "a read of {widest} bytes does not fit a {bsize}-byte staging buffer"
        )));
        return Ok(());
    }
    let mut bounce = Vec::new();
    let bounce_ptrs: Vec<*mut u8> = match staged {
        Some(st) => (0..nb).filter_map(|i| st.ptr(i)).collect(),
        None => {
            for _ in 0..nb {
                match AlignedBuf::zeroed(bsize) {
                    Some(b) => bounce.push(b),
                    None => {
                        ctx.fail(IoError::Alloc(bsize));
                        return Ok(());
                    }
                }
            }
            bounce.iter_mut().map(|b| b.raw()).collect()
        }
    };
    let nb = bounce_ptrs.len();
    let iovecs: Vec<libc::iovec> = bounce_ptrs
        .iter()
        .map(|&p| libc::iovec {
            iov_base: p as *mut libc::c_void,
            iov_len: bsize,
        })
        .collect();
    // SAFETY: the buffers outlive the ring (dropped after it, below) and are not moved.
    let registered = (nb > 0).then(|| unsafe { ring.submitter().register_buffers(&iovecs) });
    let fixed_bufs = match registered {
        None => false,
        Some(Ok(())) => true,
        Some(Err(e)) => {
            note(
                &ctx.notes,
                "uring-bufs",
                format!("io_uring: registering buffers failed ({e}); using plain reads"),
            );
            false
        }
    };

    let mut free_bounce: Vec<usize> = (0..nb).rev().collect();
    let mut slots: Vec<Option<Slot>> = (0..qd).map(|_| None).collect();
    let mut free_slots: Vec<usize> = (0..qd).rev().collect();
    let mut next = 0usize;
    let mut inflight = 0usize;

    // Base pointer of a slot's read.
    let base = |s: &Slot| -> Option<*mut u8> {
        let op = ops.get(s.op)?;
        match (&op.target, s.bounce) {
            (Target::Bounce(_), Some(b)) => bounce_ptrs.get(b).copied(),
            (Target::Dest { req, dst_off }, _) => {
                let d = ctx.sink.landing(*req)?;
                (dst_off.checked_add(op.len)? <= d.len).then(|| {
                    // SAFETY: in bounds, checked above.
                    unsafe { d.ptr.add(*dst_off) }
                })
            }
            _ => None,
        }
    };

    let push = |ring: &mut IoUring, k: usize, s: &Slot| -> bool {
        let Some(op) = ops.get(s.op) else {
            return false;
        };
        let Some(p) = base(s) else { return false };
        let (fd, _) = ctx.fd(op.file, s.st.buffered);
        // SAFETY: st.done < op.len, so the pointer stays inside the buffer.
        let ptr = unsafe { p.add(s.st.done) };
        let len = (op.len - s.st.done) as u32;
        let off = op.offset + s.st.done as u64;
        let entry = match (fixed_files && !s.st.buffered, fixed_bufs, s.bounce) {
            (true, true, Some(b)) => {
                opcode::ReadFixed::new(types::Fixed(op.file as u32), ptr, len, b as u16)
                    .offset(off)
                    .build()
            }
            (true, _, _) => opcode::Read::new(types::Fixed(op.file as u32), ptr, len)
                .offset(off)
                .build(),
            (false, true, Some(b)) => opcode::ReadFixed::new(types::Fd(fd), ptr, len, b as u16)
                .offset(off)
                .build(),
            (false, _, _) => opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(off)
                .build(),
        }
        .user_data(k as u64);
        // SAFETY: the buffer stays valid and untouched until this entry's completion is reaped:
        // bounce buffers return to the free list, and the loop drains every read before
        // returning.
        unsafe { ring.submission().push(&entry).is_ok() }
    };

    // Completed bounce reads are copied out by `o.copy_threads` workers, and by this thread
    // whenever it has nothing to submit or reap, so copies overlap the reads in flight.
    let q = CopyQueue {
        jobs: Mutex::new(VecDeque::new()),
        cv: Condvar::new(),
        freed: Mutex::new(Vec::new()),
        outstanding: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
    };
    let table = BufTable(bounce_ptrs.clone());
    let do_copy = |(op_i, b): (usize, usize)| {
        if let (Some(op), Some(p)) = (ops.get(op_i), table.get(b)) {
            // SAFETY: the read into bounce buffer `b` has completed, and `b` is not submitted
            // again until it is handed back through `freed` below.
            let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, bsize) };
            if let Err(e) = ctx.deliver(op, bytes, staged.map(|_| b)) {
                ctx.fail(e);
            }
            // The buffer may be read into again only when the sink is done with it.
            if staged.is_some() {
                if let Err(e) = ctx.sink.reclaim(b) {
                    ctx.fail(e);
                }
            }
        }
        if let Ok(mut f) = q.freed.lock() {
            f.push(b);
        }
        q.outstanding.fetch_sub(1, Ordering::AcqRel);
    };
    let mut poisoned = None;
    std::thread::scope(|sc| {
        let workers = if nb > 0 { o.copy_threads } else { 0 };
        for _ in 0..workers {
            sc.spawn(|| loop {
                let job = {
                    let Ok(mut g) = q.jobs.lock() else { break };
                    loop {
                        if let Some(j) = g.pop_front() {
                            break Some(j);
                        }
                        if q.closed.load(Ordering::Acquire) {
                            break None;
                        }
                        g = match q.cv.wait(g) {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                };
                match job {
                    Some(j) => do_copy(j),
                    None => break,
                }
            });
        }
        let pop = || q.jobs.lock().ok().and_then(|mut g| g.pop_front());
        loop {
            if let Ok(mut f) = q.freed.lock() {
                free_bounce.append(&mut f);
            }
            while inflight < qd && next < ops.len() && !ctx.stopped() {
                let Some(op) = ops.get(next) else { break };
                let b = match op.target {
                    Target::Bounce(_) => match free_bounce.pop() {
                        Some(b) => Some(b),
                        None => break,
                    },
                    Target::Dest { .. } => None,
                };
                let Some(k) = free_slots.pop() else { break };
                let s = Slot {
                    op: next,
                    bounce: b,
                    st: Attempt::default(),
                };
                if !push(&mut ring, k, &s) {
                    ctx.fail(IoError::Plan(format!("cannot queue read {next}")));
                    free_slots.push(k);
                    if let Some(b) = b {
                        free_bounce.push(b);
                    }
                    break;
                }
                if let Some(x) = slots.get_mut(k) {
                    *x = Some(s);
                }
                next += 1;
                inflight += 1;
            }
            if inflight == 0 {
                if q.outstanding.load(Ordering::Acquire) == 0 {
                    break;
                }
                match pop() {
                    Some(j) => do_copy(j),
                    None => std::thread::sleep(std::time::Duration::from_micros(50)),
                }
                continue;
            }
            let tw = std::time::Instant::now();
            let mut submitted = ring.submit();
            if submitted.is_ok() && ring.completion().is_empty() {
                // Help copying only when the copiers fall behind: a copy here delays reaping
                // and resubmitting.
                let backlog = q.jobs.lock().map_or(0, |g| g.len());
                if backlog > 2 * workers {
                    if let Some(j) = pop() {
                        do_copy(j);
                        continue;
                    }
                }
                // Copiers hand buffers back while we sleep: with copies outstanding, wake up
                // after a short while to resubmit into them instead of waiting for the next
                // completion (needs IORING_FEAT_EXT_ARG, Linux 5.11; else a plain wait).
                submitted = if q.outstanding.load(Ordering::Acquire) > 0 && ext_arg {
                    let ts = types::Timespec::new().nsec(200_000);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    match ring.submitter().submit_with_args(1, &args) {
                        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
                        r => r,
                    }
                } else {
                    ring.submit_and_wait(1)
                };
            }
            ctx.wait_ns
                .fetch_add(tw.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match submitted {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    poisoned = Some(e);
                    break;
                }
            }
            let cqes: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                let k = ud as usize;
                let Some(mut s) = slots.get_mut(k).and_then(|x| x.take()) else {
                    continue;
                };
                let Some(op) = ops.get(s.op) else { continue };
                let Some(p) = base(&s) else { continue };
                let direct = ctx.fd(op.file, s.st.buffered).1;
                // SAFETY: the kernel finished with this buffer (its completion is in hand), and
                // [p+done, p+len) lies inside it.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(p.add(s.st.done), op.len - s.st.done) };
                let which = Which {
                    path: IoPath::Uring,
                    file: op.file,
                    offset: op.offset,
                    expect: op.expect,
                    direct,
                };
                let retry = match ctx.on_result(which, &mut s.st, buf, res as i64) {
                    Next::Done => {
                        match s.bounce {
                            Some(b) => {
                                // Handed to the copiers; they return the buffer.
                                q.outstanding.fetch_add(1, Ordering::AcqRel);
                                if let Ok(mut g) = q.jobs.lock() {
                                    g.push_back((s.op, b));
                                }
                                q.cv.notify_one();
                                s.bounce = None;
                            }
                            None => {
                                if let Err(e) = ctx.deliver(op, &[], None) {
                                    ctx.fail(e);
                                }
                            }
                        }
                        false
                    }
                    Next::Again if !ctx.stopped() => true,
                    Next::Again => false,
                    Next::Fail(e) => {
                        ctx.fail(e);
                        false
                    }
                };
                if retry && push(&mut ring, k, &s) {
                    if let Some(x) = slots.get_mut(k) {
                        *x = Some(s);
                    }
                    continue;
                }
                if retry {
                    ctx.fail(IoError::Plan("cannot requeue a read".into()));
                }
                inflight -= 1;
                free_slots.push(k);
                if let Some(b) = s.bounce {
                    free_bounce.push(b);
                }
            }
        }
        // Let the copiers finish what is queued, then stop them.
        while poisoned.is_none() && q.outstanding.load(Ordering::Acquire) > 0 {
            match pop() {
                Some(j) => do_copy(j),
                None => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        }
        q.closed.store(true, Ordering::Release);
        q.cv.notify_all();
    });
    if let Some(e) = poisoned {
        // Reads may still be in flight into our buffers: never free them.
        ctx.fail(IoError::Engine(format!("io_uring_enter failed: {e}")));
        ctx.poisoned.store(true, Ordering::Release);
        std::mem::forget(bounce);
        std::mem::forget(ring);
        return Ok(());
    }
    drop(ring);
    drop(bounce);
    Ok(())
}

/// Completed bounce reads waiting to be copied out, and buffers handed back.
struct CopyQueue {
    jobs: Mutex<VecDeque<(usize, usize)>>,
    cv: Condvar,
    freed: Mutex<Vec<usize>>,
    outstanding: AtomicUsize,
    closed: AtomicBool,
}

/// Bounce buffer addresses, shared with the copy workers.
struct BufTable(Vec<*mut u8>);
// SAFETY: each buffer is accessed by one party at a time: the kernel while its read is in
// flight, then one copier, then the ring thread again (hand-offs go through mutexes).
unsafe impl Sync for BufTable {}

impl BufTable {
    fn get(&self, b: usize) -> Option<*mut u8> {
        self.0.get(b).copied()
    }
}

/// Reads `ops` with `pread` from `o.pool_threads` threads, each with its own bounce buffer
/// (staging buffer `t` of the sink for thread `t` when the sink owns its staging).
pub(crate) fn run_pool(ctx: &Ctx, ops: &[ReadOp], o: &EngineOpts) {
    let next = AtomicUsize::new(0);
    let staged = ctx.sink.staging();
    let mut threads = o.pool_threads.clamp(1, ops.len().max(1));
    if let Some(st) = staged {
        threads = threads.min(st.direct.max(1));
    }
    let next = &next;
    std::thread::scope(|sc| {
        for t in 0..threads {
            sc.spawn(move || {
                let mut bounce: Option<AlignedBuf> = None;
                let own = staged.and_then(|st| Some((t, st.ptr(t)?, st.size)));
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(op) = ops.get(k) else { break };
                    if ctx.stopped() {
                        break;
                    }
                    let base: *mut u8 = match (&op.target, own) {
                        (Target::Bounce(_), Some((_, p, size))) if size >= op.len => p,
                        (Target::Bounce(_), Some(_)) => {
                            ctx.fail(IoError::Plan("read larger than a staging buffer".into()));
                            break;
                        }
                        (Target::Bounce(_), None) => {
                            if bounce.is_none() {
                                bounce = AlignedBuf::zeroed(o.bounce_size);
                            }
                            match bounce.as_mut() {
                                Some(b) if b.len() >= op.len => b.raw(),
                                _ => {
                                    ctx.fail(IoError::Alloc(o.bounce_size));
                                    break;
                                }
                            }
                        }
                        (Target::Dest { req, dst_off }, _) => {
                            // SAFETY: this read is the only writer of these bytes.
                            match unsafe { ctx.dest_mut(*req, *dst_off, op.len) } {
                                Some(d) => d.as_mut_ptr(),
                                None => {
                                    ctx.fail(IoError::Plan("read outside destination".into()));
                                    break;
                                }
                            }
                        }
                    };
                    let mut st = Attempt::default();
                    let ok = loop {
                        let (fd, direct) = ctx.fd(op.file, st.buffered);
                        // SAFETY: [base+done, base+len) is inside the buffer chosen above,
                        // which only this thread touches.
                        let buf = unsafe {
                            std::slice::from_raw_parts_mut(base.add(st.done), op.len - st.done)
                        };
                        let res = pread(fd, buf, op.offset + st.done as u64);
                        let which = Which {
                            path: IoPath::Pool,
                            file: op.file,
                            offset: op.offset,
                            expect: op.expect,
                            direct,
                        };
                        match ctx.on_result(which, &mut st, buf, res) {
                            Next::Done => break true,
                            Next::Again if !ctx.stopped() => continue,
                            Next::Again => break false,
                            Next::Fail(e) => {
                                ctx.fail(e);
                                break false;
                            }
                        }
                    };
                    if !ok {
                        break;
                    }
                    let (bytes, staging): (&[u8], Option<usize>) = match (&op.target, own) {
                        (Target::Dest { .. }, _) => (&[], None),
                        // SAFETY: the read into this staging buffer has completed; only this
                        // thread uses it.
                        (_, Some((i, p, size))) => (
                            unsafe { std::slice::from_raw_parts(p as *const u8, size) },
                            Some(i),
                        ),
                        (_, None) => (bounce.as_ref().map(|b| b.as_slice()).unwrap_or(&[]), None),
                    };
                    let done = ctx
                        .deliver(op, bytes, staging)
                        .and_then(|()| staging.map_or(Ok(()), |i| ctx.sink.reclaim(i)));
                    if let Err(e) = done {
                        ctx.fail(e);
                        break;
                    }
                }
            });
        }
    });
}

/// Reads `pieces` through the page cache from `threads` threads: straight into destinations
/// where the sink has host memory, else into two staging buffers per thread (one is read
/// into while the other's delivery completes).
pub(crate) fn run_buffered(ctx: &Ctx, pieces: &[Piece], threads: usize) {
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, pieces.len().max(1));
    let staged = ctx.sink.staging();
    let work = |t: usize| {
        let bufs = staged.and_then(|st| st.buffered(t));
        let mut turn = 0usize;
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(pc) = pieces.get(k) else { break };
            if ctx.stopped() {
                break;
            }
            // Where the bytes go first: the destination itself, or a staging buffer.
            let landing = if ctx.sink.lands() {
                // SAFETY: pieces are disjoint parts of their destinations.
                unsafe { ctx.dest_mut(pc.req, pc.dst_off, pc.len) }.map(|d| (d, None))
            } else {
                match (bufs, staged) {
                    (Some(b), Some(st)) if pc.len <= st.size => {
                        let (i, p) = b[turn % 2];
                        turn += 1;
                        // The previous delivery out of this buffer must be complete.
                        if let Err(e) = ctx.sink.reclaim(i) {
                            ctx.fail(e);
                            break;
                        }
                        // SAFETY: staging buffer i (size bytes) belongs to this thread, and its
                        // last delivery has completed (reclaimed above).
                        Some((
                            unsafe { std::slice::from_raw_parts_mut(p, pc.len) },
                            Some(i),
                        ))
                    }
                    _ => None,
                }
            };
            let Some((dst, staging)) = landing else {
                ctx.fail(IoError::Plan("piece outside destination or staging".into()));
                break;
            };
            let fd = ctx.fd(pc.file, true).0;
            let mut st = Attempt::default();
            let ok = loop {
                let Some(buf) = dst.get_mut(st.done..) else {
                    break false;
                };
                let res = pread(fd, buf, pc.off + st.done as u64);
                let which = Which {
                    path: IoPath::Buffered,
                    file: pc.file,
                    offset: pc.off,
                    expect: pc.len,
                    direct: false,
                };
                match ctx.on_result(which, &mut st, buf, res) {
                    Next::Done => break true,
                    Next::Again if !ctx.stopped() => continue,
                    Next::Again => break false,
                    Next::Fail(e) => {
                        ctx.fail(e);
                        break false;
                    }
                }
            };
            if !ok {
                break;
            }
            if staging.is_some() {
                let t0 = std::time::Instant::now();
                if let Err(e) = ctx.sink.deliver(staging, pc.req, pc.dst_off, dst) {
                    ctx.fail(e);
                    break;
                }
                ctx.copied_bytes.fetch_add(pc.len as u64, Ordering::Relaxed);
                ctx.copy_ns
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            ctx.reads.fetch_add(1, Ordering::Relaxed);
            ctx.buffered_bytes
                .fetch_add(pc.len as u64, Ordering::Relaxed);
            ctx.progress(pc.len as u64);
        }
    };
    if threads == 1 {
        work(0);
        return;
    }
    std::thread::scope(|sc| {
        for t in 0..threads {
            sc.spawn(move || work(t));
        }
    });
}
