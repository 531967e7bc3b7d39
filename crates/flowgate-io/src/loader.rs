//! [`Loader`]: read many byte ranges of model files into host memory, choosing per region
//! between direct I/O and the page cache.
//!
//! A load goes:
//! 1. open each file twice: buffered, and `O_DIRECT` (refused on tmpfs and some network file
//!    systems with `EINVAL`: logged once, the file is then read through the cache);
//! 2. check every request lies inside its file (a clean `ShortFile` error otherwise) and
//!    allocate its destination ([`AlignedBuf`], anonymous memory, huge pages advised);
//! 3. with [`Strategy::Auto`], probe which 1 MiB cells of each file are in the page cache
//!    (`cachestat`, else `mincore`) and cut each request at cell boundaries: cached regions go
//!    to the buffered readers (several threads of `pread` into the destination: a warm load
//!    runs at memory-copy speed), the rest to the direct engine (a plan of aligned reads of
//!    8 MiB by default, many in flight, so a cold load runs at the disk's speed without
//!    filling the page cache twice). Both run at once. Direct reads are aligned to the
//!    file's `stx_dio_offset_align`, and to at least [`LoaderOptions::min_align`] (4096);
//! 4. the direct engine is io_uring; where `io_uring_setup` fails (ENOSYS on old kernels,
//!    EPERM under seccomp or `kernel.io_uring_disabled`) a pool of threads doing `pread` on the
//!    `O_DIRECT` fd carries out the same plan (logged once);
//! 5. optionally ([`LoaderOptions::verify`]) re-read every request through the cache and
//!    compare, failing with the first differing offset.
//!
//! [`Strategy::Direct`] and [`Strategy::Buffered`] force one path for everything (for
//! benchmarks and tests). The loader writes nothing to the terminal: progress goes to an
//! optional callback with the number of bytes delivered so far, fallbacks to `tracing::warn`
//! (once per process) and to [`LoadStats::notes`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{self, Ctx, EngineOpts, OpenFile};
use crate::fault::FaultHook;
use crate::plan::{self, FileGeom, Piece, PlanParams};
use crate::probe;
use crate::{AlignedBuf, IoError, ReadRequest};

/// Which path the bytes take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Probe the page cache: cached regions buffered, the rest direct.
    #[default]
    Auto,
    /// Everything through the direct engine (`O_DIRECT` where the file system allows it).
    Direct,
    /// Everything through the page cache with `pread` threads.
    Buffered,
}

/// Which engine carries out direct reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectEngine {
    /// io_uring, else the thread pool.
    #[default]
    Auto,
    /// io_uring only (an error if it cannot be set up).
    IoUring,
    /// `pread` from a pool of threads.
    Pool,
}

/// Progress callback: bytes delivered so far (monotonic, may be called from several threads).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Clone)]
pub struct LoaderOptions {
    pub strategy: Strategy,
    pub engine: DirectEngine,
    /// Threads for buffered reads.
    pub threads: usize,
    /// Direct reads in flight (io_uring queue depth; at least 32 entries are set up).
    pub queue_depth: usize,
    /// Largest direct read, and the size of a bounce buffer (rounded to the file alignment).
    pub chunk: usize,
    /// Bounce buffers for direct reads that cannot land in their destination directly.
    pub bounce_buffers: usize,
    /// Threads of the `pread` pool when io_uring is not available.
    pub pool_threads: usize,
    /// Gaps between wanted ranges up to this size are read through rather than split.
    pub merge_gap: u64,
    /// A direct read goes straight into its destination only if at least this large.
    pub min_dest_direct: usize,
    /// Direct reads start and end on multiples of at least this (and of the file's
    /// `stx_dio_offset_align`).
    pub min_align: usize,
    /// Residency cell (bytes) and the cached fraction at which a cell is read buffered.
    pub cell: u64,
    pub cached_threshold: f32,
    /// Re-read everything through the page cache and compare.
    pub verify: bool,
    pub fault: Option<Arc<dyn FaultHook>>,
    pub progress: Option<Progress>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            strategy: Strategy::Auto,
            engine: DirectEngine::Auto,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_depth: 32,
            chunk: 8 << 20,
            bounce_buffers: 16,
            pool_threads: 16,
            merge_gap: 256 << 10,
            min_dest_direct: 256 << 10,
            min_align: 4096,
            cell: 1 << 20,
            cached_threshold: 0.5,
            verify: false,
            fault: None,
            progress: None,
        }
    }
}

impl std::fmt::Debug for LoaderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderOptions")
            .field("strategy", &self.strategy)
            .field("engine", &self.engine)
            .field("threads", &self.threads)
            .field("queue_depth", &self.queue_depth)
            .field("chunk", &self.chunk)
            .field("bounce_buffers", &self.bounce_buffers)
            .field("verify", &self.verify)
            .field("fault", &self.fault.is_some())
            .finish_non_exhaustive()
    }
}

/// What a load did.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    /// Bytes requested (the sum of request lengths).
    pub bytes: u64,
    /// Bytes read by the direct engine (including alignment slack).
    pub direct_bytes: u64,
    /// Of the requested bytes, those copied out of bounce buffers.
    pub copied_bytes: u64,
    /// Time spent copying out of bounce buffers (summed over threads).
    pub copy_time: Duration,
    /// Time the io_uring thread spent waiting for completions.
    pub wait_time: Duration,
    /// Bytes read through the page cache.
    pub buffered_bytes: u64,
    pub reads: u64,
    pub retries: u64,
    /// "io_uring", "pread pool" or "none".
    pub engine: &'static str,
    /// Fraction of the requested bytes found in the page cache.
    pub cached_fraction: f64,
    pub elapsed: Duration,
    /// Fallbacks taken and other facts worth a line (each also logged once per process).
    pub notes: Vec<String>,
}

impl LoadStats {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Reads byte ranges with a chosen strategy. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Loader {
    pub opts: LoaderOptions,
}

fn round_to(x: usize, a: usize) -> usize {
    (x / a).max(1) * a
}

impl Loader {
    pub fn new(opts: LoaderOptions) -> Loader {
        Loader { opts }
    }

    /// Every request into its own buffer.
    pub fn read(
        &self,
        files: &[PathBuf],
        requests: &[ReadRequest],
    ) -> Result<Vec<AlignedBuf>, IoError> {
        self.read_with_stats(files, requests).map(|(b, _)| b)
    }

    /// Every request into its own buffer, and what it took.
    pub fn read_with_stats(
        &self,
        files: &[PathBuf],
        requests: &[ReadRequest],
    ) -> Result<(Vec<AlignedBuf>, LoadStats), IoError> {
        let t0 = Instant::now();
        let o = &self.opts;
        let pre_notes = std::sync::Mutex::new(Vec::new());
        let used: Vec<bool> = (0..files.len())
            .map(|i| requests.iter().any(|r| r.file == i))
            .collect();
        let mut open = Vec::with_capacity(files.len());
        for (i, p) in files.iter().enumerate() {
            let f = File::open(p).map_err(|source| IoError::Open {
                path: p.clone(),
                source,
            })?;
            let size = f
                .metadata()
                .map_err(|source| IoError::Open {
                    path: p.clone(),
                    source,
                })?
                .len();
            let want_direct = o.strategy != Strategy::Buffered && used.get(i) == Some(&true);
            let direct = if want_direct {
                match OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(p)
                {
                    Ok(d) => Some(d),
                    Err(e) => {
                        engine::note(
                            &pre_notes,
                            &format!("odirect-open:{}", p.display()),
                            format!(
                                "{}: O_DIRECT refused ({e}); reading it buffered",
                                p.display()
                            ),
                        );
                        None
                    }
                }
            } else {
                None
            };
            let mut align = probe::dio_align(&f);
            // Plan on at least page-sized blocks even where the device takes 512-byte ones: a
            // read that straddles 4 KiB blocks can cost the device (or a VM's host) a bounce
            // or a read-modify cycle, and a few extra bytes cost nothing.
            align.offset = align.offset.max(o.min_align.next_power_of_two());
            open.push(OpenFile {
                path: p.clone(),
                buffered: f,
                direct,
                size,
                align,
            });
        }
        let mut total = 0u64;
        let mut bufs = Vec::with_capacity(requests.len());
        for r in requests {
            let f = open.get(r.file).ok_or(IoError::BadFile(r.file))?;
            let end = r.offset.checked_add(r.len as u64);
            if end.is_none_or(|e| e > f.size) {
                return Err(IoError::ShortFile {
                    path: f.path.clone(),
                    offset: r.offset,
                    len: r.len,
                });
            }
            total += r.len as u64;
        }
        for r in requests {
            bufs.push(AlignedBuf::zeroed(r.len).ok_or(IoError::Alloc(r.len))?);
        }

        // Classify: which pieces go direct, which buffered.
        let mut direct_pieces = Vec::new();
        let mut buffered_pieces = Vec::new();
        let mut cached_bytes = 0u64;
        let residency: Vec<Option<probe::Residency>> = open
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (o.strategy == Strategy::Auto && f.direct.is_some() && used.get(i) == Some(&true))
                    .then(|| probe::residency(&f.buffered, f.size, o.cell))
            })
            .collect();
        for (req, r) in requests.iter().enumerate() {
            if r.len == 0 {
                continue;
            }
            let whole = Piece {
                req,
                file: r.file,
                off: r.offset,
                len: r.len,
                dst_off: 0,
            };
            let has_direct = open.get(r.file).is_some_and(|f| f.direct.is_some());
            match (o.strategy, residency.get(r.file).and_then(|x| x.as_ref())) {
                (Strategy::Direct, _) => direct_pieces.push(whole),
                (Strategy::Buffered, _) => buffered_pieces.push(whole),
                (Strategy::Auto, None) if has_direct => direct_pieces.push(whole),
                (Strategy::Auto, None) => buffered_pieces.push(whole),
                (Strategy::Auto, Some(res)) => {
                    // Cut at cell boundaries, merge runs of one class.
                    let end = r.offset + r.len as u64;
                    let mut s = r.offset;
                    while s < end {
                        let hot = res.at(s) >= o.cached_threshold;
                        let mut e = s;
                        while e < end && (res.at(e) >= o.cached_threshold) == hot {
                            e = ((e / res.cell) + 1) * res.cell;
                        }
                        let e = e.min(end);
                        let pc = Piece {
                            off: s,
                            len: (e - s) as usize,
                            dst_off: (s - r.offset) as usize,
                            ..whole
                        };
                        if hot {
                            cached_bytes += pc.len as u64;
                            buffered_pieces.push(pc);
                        } else {
                            direct_pieces.push(pc);
                        }
                        s = e;
                    }
                }
            }
        }

        // The direct plan, with chunk and bounce sizes rounded to every file's alignment.
        let max_align = open.iter().map(|f| f.align.offset).max().unwrap_or(4096);
        let chunk = round_to(o.chunk.max(max_align), max_align);
        let geom: Vec<FileGeom> = open
            .iter()
            .map(|f| FileGeom {
                size: f.size,
                align: f.align,
            })
            .collect();
        let ops = plan::direct_plan(
            &direct_pieces,
            &geom,
            &PlanParams {
                chunk,
                bounce: chunk,
                merge_gap: o.merge_gap,
                min_dest_direct: o.min_dest_direct,
            },
        );
        let buffered_pieces = plan::split(&buffered_pieces, chunk);

        let progress = o.progress.as_deref();
        let ctx = Ctx::new(&open, &mut bufs, o.fault.as_deref(), progress);
        if let (Ok(mut v), Ok(pre)) = (ctx.notes.lock(), pre_notes.into_inner()) {
            v.extend(pre);
        }
        let eopts = EngineOpts {
            queue_depth: o.queue_depth.max(1),
            bounce_size: chunk,
            bounce_buffers: o.bounce_buffers.max(1),
            pool_threads: o.pool_threads.max(1),
            // The io_uring thread copies too; with buffered readers busy, leave it at that.
            copy_threads: if buffered_pieces.is_empty() {
                o.threads.saturating_sub(1)
            } else {
                0
            },
        };
        let mut engine_name = "none";
        std::thread::scope(|sc| {
            if !buffered_pieces.is_empty() {
                let threads = if ops.is_empty() {
                    o.threads
                } else {
                    o.threads.saturating_sub(1).max(1)
                };
                let ctx = &ctx;
                let pieces = &buffered_pieces;
                sc.spawn(move || engine::run_buffered(ctx, pieces, threads));
            }
            if ops.is_empty() {
                return;
            }
            let uring = match o.engine {
                DirectEngine::Pool => None,
                _ => Some(engine::run_uring(&ctx, &ops, &eopts)),
            };
            match uring {
                Some(Ok(())) => engine_name = "io_uring",
                Some(Err(engine::SetupError(e))) if o.engine == DirectEngine::IoUring => {
                    ctx.fail(IoError::Engine(format!("io_uring_setup: {e}")));
                }
                Some(Err(engine::SetupError(e))) => {
                    engine::note(
                        &ctx.notes,
                        "uring-setup",
                        format!("io_uring unavailable ({e}); direct reads use a pread thread pool"),
                    );
                    engine_name = "pread pool";
                    engine::run_pool(&ctx, &ops, &eopts);
                }
                None => {
                    engine_name = "pread pool";
                    engine::run_pool(&ctx, &ops, &eopts);
                }
            }
        });
        let poisoned = ctx.poisoned.load(Ordering::Acquire);
        let stats = LoadStats {
            bytes: total,
            direct_bytes: ctx.direct_bytes.load(Ordering::Relaxed),
            copied_bytes: ctx.copied_bytes.load(Ordering::Relaxed),
            copy_time: Duration::from_nanos(ctx.copy_ns.load(Ordering::Relaxed)),
            wait_time: Duration::from_nanos(ctx.wait_ns.load(Ordering::Relaxed)),
            buffered_bytes: ctx.buffered_bytes.load(Ordering::Relaxed),
            reads: ctx.reads.load(Ordering::Relaxed),
            retries: ctx.retries.load(Ordering::Relaxed),
            engine: engine_name,
            cached_fraction: if total == 0 {
                0.0
            } else if o.strategy == Strategy::Auto {
                cached_bytes as f64 / total as f64
            } else {
                f64::NAN
            },
            elapsed: Duration::ZERO,
            notes: ctx.notes.lock().map(|n| n.clone()).unwrap_or_default(),
        };
        let err = ctx.error.lock().ok().and_then(|mut e| e.take());
        drop(ctx);
        if poisoned {
            // The kernel may still write into these buffers: never free them.
            std::mem::forget(bufs);
            return Err(err.unwrap_or_else(|| IoError::Engine("io_uring failed".into())));
        }
        if let Some(e) = err {
            return Err(e);
        }
        if o.verify {
            verify(&open, requests, &bufs)?;
        }
        let mut stats = stats;
        stats.elapsed = t0.elapsed();
        Ok((bufs, stats))
    }
}

/// Re-reads every request through the page cache (plain `pread`, no hooks) and compares.
fn verify(open: &[OpenFile], requests: &[ReadRequest], bufs: &[AlignedBuf]) -> Result<(), IoError> {
    let mut scratch = vec![0u8; 8 << 20];
    for (r, b) in requests.iter().zip(bufs) {
        let Some(f) = open.get(r.file) else {
            return Err(IoError::BadFile(r.file));
        };
        let mut done = 0usize;
        while done < r.len {
            let n = scratch.len().min(r.len - done);
            let s = scratch.get_mut(..n).unwrap_or_default();
            let off = r.offset + done as u64;
            f.buffered
                .read_exact_at(s, off)
                .map_err(|source| IoError::Read {
                    path: f.path.clone(),
                    offset: off,
                    len: n,
                    source,
                })?;
            let got = b.get(done..done + n).unwrap_or_default();
            if let Some(i) = s.iter().zip(got).position(|(x, y)| x != y) {
                return Err(IoError::Verify {
                    path: f.path.clone(),
                    offset: r.offset,
                    len: r.len,
                    at: off + i as u64,
                });
            }
            done += n;
        }
    }
    Ok(())
}
