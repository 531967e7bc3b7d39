//! [`Loader`]: read many byte ranges of model files into memory, choosing per region between
//! direct I/O and the page cache, and handing the bytes to a sink (host memory or a GPU).
//!
//! Three entry points: [`Loader::read`] (one [`AlignedBuf`] per request), [`Loader::load_host`]
//! (requests as [`HostView`]s of a few arenas laid out like the files: what model loads use) and
//! [`Loader::load_cuda`] (requests as [`DeviceView`]s of device arenas, every byte through
//! page-locked staging). A load goes:
//! 1. open each file twice: buffered, and `O_DIRECT` (refused on tmpfs and some network file
//!    systems with `EINVAL`: logged once, the file is then read through the cache);
//! 2. check every request lies inside its file (a clean `ShortFile` error otherwise) and
//!    allocate the destinations (per request, or per extent: see [`crate::sink`]);
//! 3. with [`Strategy::Auto`], probe which 1 MiB cells of each file are in the page cache
//!    (`cachestat`, else `mincore`) and cut each destination at cell boundaries: cached regions
//!    go to the buffered readers (several threads of `pread`: a warm load runs at memory-copy
//!    speed), the rest to the direct engine (a plan of aligned reads of 8 MiB by default, 32 in
//!    flight, so a cold load runs at the disk's speed without filling the page cache twice).
//!    Both run at once. Direct reads are aligned to the file's `stx_dio_offset_align`, and to at
//!    least [`LoaderOptions::min_align`] (4096). When direct reads land in fresh host memory and nothing is read through the cache, a
//!    helper thread faults the destinations in ahead of the reads ([`LoaderOptions::prefault`]):
//!    otherwise the kernel zeroes each fresh page inside the submission of the read that targets
//!    it, on the io_uring thread, and the disk's queue runs dry on a small machine;
//! 4. the direct engine is io_uring; where `io_uring_setup` fails (ENOSYS on old kernels,
//!    EPERM under seccomp or `kernel.io_uring_disabled`) a pool of threads doing `pread` on the
//!    `O_DIRECT` fd carries out the same plan (logged once);
//! 5. the sink finishes (the CUDA sink waits for its last copies); optionally
//!    ([`LoaderOptions::verify`]) every request is re-read through the cache and compared,
//!    failing with the first differing offset.
//!
//! [`Strategy::Direct`] and [`Strategy::Buffered`] force one path for everything (for
//! benchmarks and tests). The loader writes nothing to the terminal: progress goes to an
//! optional callback with the number of bytes delivered so far, fallbacks to `tracing::warn`
//! (once per process) and to [`LoadStats::notes`]. Each load runs in a `tracing` span `load`
//! and ends with an `info` event carrying bytes, GB/s, elapsed time and the bytes of each path
//! (direct, cached, bounced), so a server's logs show every load.

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
use crate::sink::{self, cuda::CudaSink, DeviceView, HostSink, HostView, Sink};
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
    /// Copy streams of [`Loader::load_cuda`] (at least 2).
    pub cuda_streams: usize,
    /// When direct reads go straight into fresh host memory, fault it in from a helper thread
    /// ahead of the reads (`MADV_POPULATE_WRITE`).
    pub prefault: bool,
    /// [`Loader::load_host`]: extents wholly in the page cache are mapped (private,
    /// populated for reading on all cores) instead of copied — the page cache's pages become
    /// the destination: no zeroing of fresh memory, no copy. On by default (a warm load of
    /// moe7b on the 2-core VM: 42–47 GB/s against 13–14 copying, decode as fast on the 4 KiB
    /// mappings: docs/benchmarks.md); `FLOWGATE_MAP_CACHED=0` turns it off. As with
    /// llama.cpp's mmap, a file truncated under a running model faults (SIGBUS), and the
    /// kernel may drop clean mapped pages under memory pressure and read them again later.
    /// Never under [`Strategy::Direct`].
    pub map_cached: bool,
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
            cuda_streams: 4,
            prefault: true,
            map_cached: std::env::var("FLOWGATE_MAP_CACHED").map_or(true, |v| v != "0"),
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
    /// Bytes copied out of bounce or staging buffers (for [`Loader::load_cuda`]: every byte,
    /// each by an asynchronous host→device copy).
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
    /// Where the bytes went: "host" or "cuda".
    pub sink: &'static str,
    /// Destinations read: one per request ([`Loader::read`]) or per extent (arena loads).
    pub extents: usize,
    /// Page-locked staging memory used ([`Loader::load_cuda`]).
    pub staging_bytes: usize,
    /// Fraction of the requested bytes found in the page cache.
    pub cached_fraction: f64,
    pub elapsed: Duration,
    /// Bytes of [`Loader::load_host`] served by mapping cached pages (no copy).
    pub mapped_bytes: u64,
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
        let span = tracing::info_span!(
            "load",
            sink = "host",
            files = files.len(),
            requests = requests.len()
        );
        let _enter = span.enter();
        let (open, notes) = self.open(files, requests)?;
        let total = check_requests(&open, requests)?;
        let mut bufs = Vec::with_capacity(requests.len());
        for r in requests {
            bufs.push(AlignedBuf::zeroed(r.len).ok_or(IoError::Alloc(r.len))?);
        }
        let out = {
            let sink = HostSink::new(&mut bufs);
            self.run(&open, requests, &sink, notes, 0)
        };
        if out.poisoned {
            // The kernel may still write into these buffers: never free them.
            std::mem::forget(bufs);
            return Err(out
                .error
                .unwrap_or_else(|| IoError::Engine("io_uring failed".into())));
        }
        let mut stats = out.into_result()?;
        if self.opts.verify {
            let views: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
            verify(&open, requests, &views)?;
        }
        stats.bytes = total;
        stats.elapsed = t0.elapsed();
        trace(&stats);
        Ok((bufs, stats))
    }

    /// Every request into host memory, as views of a few shared arenas laid out like the files
    /// (see [`crate::sink`]): aligned reads land in place, nothing is copied. This is what model
    /// loads use.
    pub fn load_host(
        &self,
        files: &[PathBuf],
        requests: &[ReadRequest],
    ) -> Result<(Vec<HostView>, LoadStats), IoError> {
        let t0 = Instant::now();
        let span = tracing::info_span!(
            "load",
            sink = "host arena",
            files = files.len(),
            requests = requests.len()
        );
        let _enter = span.enter();
        let (open, notes) = self.open(files, requests)?;
        let total = check_requests(&open, requests)?;
        let (ext, place) = sink::extents(&open, requests, self.opts.merge_gap)?;
        // Extents wholly in the page cache are mapped, the rest read into fresh arenas.
        let mut mapped: Vec<Option<AlignedBuf>> = Vec::with_capacity(ext.len());
        let mut mapped_bytes = 0u64;
        for e in &ext {
            let f = open.get(e.file).ok_or(IoError::BadFile(e.file))?;
            let len = (e.alloc as u64).min(f.size.saturating_sub(e.base)) as usize;
            let m = if self.opts.map_cached
                && self.opts.strategy != Strategy::Direct
                && len >= e.read
                && crate::probe::range_cached(&f.buffered, e.base, e.read as u64) == Some(true)
            {
                AlignedBuf::map_file(&f.buffered, e.base, len)
            } else {
                None
            };
            if m.is_some() {
                mapped_bytes += e.read as u64;
            }
            mapped.push(m);
        }
        let read_ext: Vec<sink::Extent> = ext
            .iter()
            .zip(&mapped)
            .filter(|(_, m)| m.is_none())
            .map(|(e, _)| *e)
            .collect();
        let mut arenas = Vec::with_capacity(read_ext.len());
        for e in &read_ext {
            arenas.push(AlignedBuf::zeroed(e.alloc).ok_or(IoError::Alloc(e.alloc))?);
        }
        let ext_reqs = extent_requests(&read_ext);
        let out = {
            let sink = HostSink::new(&mut arenas);
            // Progress counts extent bytes, as the reads do: the mapped ones first.
            self.run(&open, &ext_reqs, &sink, notes, mapped_bytes)
        };
        if out.poisoned {
            // The kernel may still write into these buffers: never free them.
            std::mem::forget(arenas);
            return Err(out
                .error
                .unwrap_or_else(|| IoError::Engine("io_uring failed".into())));
        }
        let mut stats = out.into_result()?;
        stats.mapped_bytes = mapped_bytes;
        let mut read_arenas = arenas.into_iter();
        let arenas: Vec<Arc<AlignedBuf>> = mapped
            .into_iter()
            .map(|m| m.or_else(|| read_arenas.next()).map(Arc::new))
            .collect::<Option<_>>()
            .ok_or_else(|| IoError::Plan("arena count mismatch".into()))?;
        let empty = Arc::new(AlignedBuf::zeroed(0).ok_or(IoError::Alloc(0))?);
        let mut views = Vec::with_capacity(requests.len());
        for (r, p) in requests.iter().zip(&place) {
            let v = match p {
                Some((e, off)) => arenas
                    .get(*e)
                    .and_then(|a| HostView::new(a.clone(), *off..*off + r.len)),
                None => HostView::new(empty.clone(), 0..0),
            };
            views.push(v.ok_or_else(|| IoError::Plan(format!("no arena for request {r:?}")))?);
        }
        if self.opts.verify {
            let v: Vec<&[u8]> = views.iter().map(|v| v.bytes()).collect();
            verify(&open, requests, &v)?;
        }
        stats.bytes = total;
        stats.extents = ext.len();
        stats.elapsed = t0.elapsed();
        trace(&stats);
        Ok((views, stats))
    }

    /// Every request into device memory of `alloc`'s device (arenas charged to its budget),
    /// through page-locked staging buffers and asynchronous copies on
    /// [`LoaderOptions::cuda_streams`] streams. Returns once every copy has completed.
    pub fn load_cuda(
        &self,
        files: &[PathBuf],
        requests: &[ReadRequest],
        alloc: &flowgate_cuda::DeviceAllocator,
    ) -> Result<(Vec<DeviceView>, LoadStats), IoError> {
        let t0 = Instant::now();
        let span = tracing::info_span!(
            "load",
            sink = "cuda",
            files = files.len(),
            requests = requests.len()
        );
        let _enter = span.enter();
        let (open, notes) = self.open(files, requests)?;
        let total = check_requests(&open, requests)?;
        let (ext, place) = sink::extents(&open, requests, self.opts.merge_gap)?;
        let sizes: Vec<usize> = ext.iter().map(|e| e.alloc).collect();
        let cs = CudaSink::new(alloc, &sizes, self.opts.cuda_streams)?;
        let out = self.run(&open, &extent_requests(&ext), &cs, notes, 0);
        let staging = cs.staging_bytes();
        if out.poisoned {
            // The kernel may still write into the staging pool: never free it.
            std::mem::forget(cs);
            return Err(out
                .error
                .unwrap_or_else(|| IoError::Engine("io_uring failed".into())));
        }
        let mut stats = out.into_result()?;
        let views = sink::cuda::views(cs.arenas(), &place, requests);
        drop(cs);
        if self.opts.verify {
            sink::cuda::verify(&open, requests, &views, alloc.device())?;
        }
        stats.bytes = total;
        stats.extents = ext.len();
        stats.staging_bytes = staging;
        stats.elapsed = t0.elapsed();
        trace(&stats);
        Ok((views, stats))
    }

    /// Opens every file twice (buffered, and `O_DIRECT` where used and allowed).
    fn open(
        &self,
        files: &[PathBuf],
        requests: &[ReadRequest],
    ) -> Result<(Vec<OpenFile>, Vec<String>), IoError> {
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
        Ok((open, pre_notes.into_inner().unwrap_or_default()))
    }

    /// Reads `requests` into the sink's destinations (destination `i` is request `i`).
    /// Reads `requests` into `sink`; progress counts from `already` (bytes delivered another
    /// way, e.g. mapped from the page cache).
    fn run(
        &self,
        open: &[OpenFile],
        requests: &[ReadRequest],
        sink: &dyn Sink,
        pre_notes: Vec<String>,
        already: u64,
    ) -> Outcome {
        let o = &self.opts;
        let used: Vec<bool> = (0..open.len())
            .map(|i| requests.iter().any(|r| r.file == i))
            .collect();
        let total: u64 = requests.iter().map(|r| r.len as u64).sum();

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

        // The direct plan, with chunk and bounce sizes rounded to every file's alignment. A
        // sink without host memory takes every read through its staging buffers.
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
                min_dest_direct: if sink.lands() {
                    o.min_dest_direct
                } else {
                    usize::MAX
                },
            },
        );
        let buffered_pieces = plan::split(&buffered_pieces, chunk);
        // All threads read through the cache even while direct reads are in flight: the
        // io_uring thread only submits and reaps, it sleeps most of the time.
        let buffered_threads = o.threads.max(1).min(buffered_pieces.len().max(1));
        let staged = !sink.lands();
        let eopts = EngineOpts {
            queue_depth: o.queue_depth.max(1),
            bounce_size: chunk,
            // Through staging, every read needs a buffer: as many as reads in flight.
            bounce_buffers: if staged {
                o.bounce_buffers.max(o.queue_depth).max(1)
            } else {
                o.bounce_buffers.max(1)
            },
            pool_threads: o.pool_threads.max(1),
            // The io_uring thread copies too; with buffered readers busy, leave it at that.
            copy_threads: if buffered_pieces.is_empty() {
                o.threads.saturating_sub(1)
            } else {
                0
            }
            .max(usize::from(staged)),
        };

        let progress = o.progress.as_deref();
        let ctx = Ctx::new(open, sink, o.fault.as_deref(), progress);
        ctx.start_at(already);
        if let Ok(mut v) = ctx.notes.lock() {
            v.extend(pre_notes);
        }
        if staged {
            let n_bounce = ops
                .iter()
                .filter(|op| matches!(op.target, plan::Target::Bounce(_)))
                .count();
            let direct = if n_bounce == 0 {
                0
            } else {
                eopts
                    .bounce_buffers
                    .min(eopts.queue_depth)
                    .max(eopts.pool_threads.min(eopts.queue_depth))
                    .min(n_bounce)
            };
            let bt = if buffered_pieces.is_empty() {
                0
            } else {
                buffered_threads
            };
            if let Err(e) = sink.prepare(direct, bt, chunk) {
                ctx.fail(e);
            }
        }
        let mut engine_name = "none";
        // Direct reads into fresh host memory make the kernel fault the pages in (zeroing them)
        // while it issues each read. A thread faults the destinations in ahead of the reads, in
        // their order, so the reads find them present; where it falls behind, the reads fault
        // the rest themselves (populating a present page does nothing).
        let prefault = sink.lands()
            && buffered_pieces.is_empty()
            && o.prefault
            && ops
                .iter()
                .any(|op| matches!(op.target, plan::Target::Dest { .. }));
        if !ctx.stopped() {
            std::thread::scope(|sc| {
                if !buffered_pieces.is_empty() {
                    let ctx = &ctx;
                    let pieces = &buffered_pieces;
                    sc.spawn(move || engine::run_buffered(ctx, pieces, buffered_threads));
                }
                if prefault {
                    let (ctx, ops) = (&ctx, &ops);
                    sc.spawn(move || {
                        for op in ops.iter() {
                            if ctx.stopped() {
                                break;
                            }
                            if let plan::Target::Dest { req, dst_off } = op.target {
                                if let Some(d) = sink.landing(req) {
                                    engine::populate(d, dst_off, op.len);
                                }
                            }
                        }
                    });
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
                            format!(
                                "io_uring unavailable ({e}); direct reads use a pread thread pool"
                            ),
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
        }
        let poisoned = ctx.poisoned.load(Ordering::Acquire);
        if !poisoned {
            if let Err(e) = sink.finish() {
                ctx.fail(e);
            }
        }
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
            sink: sink.name(),
            cached_fraction: if total == 0 {
                0.0
            } else if o.strategy == Strategy::Auto {
                cached_bytes as f64 / total as f64
            } else {
                f64::NAN
            },
            extents: requests.len(),
            staging_bytes: 0,
            mapped_bytes: 0,
            elapsed: Duration::ZERO,
            notes: ctx.notes.lock().map(|n| n.clone()).unwrap_or_default(),
        };
        let error = ctx.error.lock().ok().and_then(|mut e| e.take());
        Outcome {
            stats,
            error,
            poisoned,
        }
    }
}

/// What [`Loader::run`] did.
struct Outcome {
    stats: LoadStats,
    error: Option<IoError>,
    /// The kernel may still write into the destinations or staging buffers.
    poisoned: bool,
}

impl Outcome {
    fn into_result(self) -> Result<LoadStats, IoError> {
        match (self.error, self.poisoned) {
            (Some(e), _) => Err(e),
            (None, true) => Err(IoError::Engine("io_uring failed".into())),
            (None, false) => Ok(self.stats),
        }
    }
}

/// Checks every request lies inside its file; returns the bytes requested.
fn check_requests(open: &[OpenFile], requests: &[ReadRequest]) -> Result<u64, IoError> {
    let mut total = 0u64;
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
    Ok(total)
}

/// One read request per extent (its arena is its destination).
fn extent_requests(ext: &[sink::Extent]) -> Vec<ReadRequest> {
    ext.iter()
        .map(|e| ReadRequest {
            file: e.file,
            offset: e.base,
            len: e.read,
        })
        .collect()
}

/// The figures of a finished load, as a `tracing` event (inside the load's span).
fn trace(s: &LoadStats) {
    tracing::info!(
        sink = s.sink,
        bytes = s.bytes,
        gbps = s.gbps(),
        elapsed_ms = s.elapsed.as_secs_f64() * 1e3,
        direct_bytes = s.direct_bytes,
        cached_bytes = s.buffered_bytes,
        bounced_bytes = s.copied_bytes,
        cached_fraction = s.cached_fraction,
        mapped_bytes = s.mapped_bytes,
        engine = s.engine,
        extents = s.extents,
        staging_bytes = s.staging_bytes,
        retries = s.retries,
        "load finished"
    );
}

/// Re-reads every request through the page cache (plain `pread`, no hooks) and compares.
pub(crate) fn verify(
    open: &[OpenFile],
    requests: &[ReadRequest],
    bufs: &[&[u8]],
) -> Result<(), IoError> {
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
            if got.len() != n {
                return Err(IoError::Verify {
                    path: f.path.clone(),
                    offset: r.offset,
                    len: r.len,
                    at: off,
                });
            }
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

#[cfg(test)]
mod tests {
    //! The staged path (what the CUDA sink uses: no landing, everything through the sink's
    //! staging pool, reclaimed before reuse) exercised on any machine with a host-memory sink
    //! that behaves like the CUDA one: its copies are *deferred* until the buffer is reclaimed
    //! (or the load finishes), like an asynchronous DMA that has not run yet, so an engine that
    //! refilled a staging buffer before reclaiming it would deliver the wrong bytes.
    use super::*;
    use crate::sink::{Sink, Staging};
    use std::sync::{Mutex, OnceLock};

    /// (dest, dst_off, src address, len)
    type Copy = (usize, usize, usize, usize);

    struct DeferredHost {
        dests: Vec<crate::engine::Dest>,
        pool: Mutex<Option<AlignedBuf>>,
        staging: OnceLock<Staging>,
        queued: OnceLock<Vec<Mutex<Vec<Copy>>>>,
    }
    // SAFETY: as HostSink: disjoint deliveries into the destinations.
    unsafe impl Sync for DeferredHost {}

    impl DeferredHost {
        fn run(&self, i: usize) {
            let Some(q) = self.queued.get().and_then(|q| q.get(i)) else {
                return;
            };
            for (dest, off, src, len) in q.lock().unwrap().drain(..) {
                let d = self.dests[dest];
                assert!(off + len <= d.len);
                // SAFETY: in bounds; disjoint per the plan; src lies in the staging pool.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, d.ptr.add(off), len) };
            }
        }
    }

    impl Sink for DeferredHost {
        fn name(&self) -> &'static str {
            "deferred host (test)"
        }
        fn landing(&self, _dest: usize) -> Option<crate::engine::Dest> {
            None
        }
        fn lands(&self) -> bool {
            false
        }
        fn prepare(&self, direct: usize, bt: usize, size: usize) -> Result<(), IoError> {
            let count = direct + 2 * bt;
            let mut b = AlignedBuf::zeroed(count * size).ok_or(IoError::Alloc(0))?;
            let base = b.raw();
            *self.pool.lock().unwrap() = Some(b);
            let _ = self
                .queued
                .set((0..count).map(|_| Mutex::new(Vec::new())).collect());
            let _ = self.staging.set(Staging {
                base,
                size,
                count,
                direct,
            });
            Ok(())
        }
        fn staging(&self) -> Option<&Staging> {
            self.staging.get()
        }
        fn deliver(
            &self,
            staging: Option<usize>,
            dest: usize,
            dst_off: usize,
            src: &[u8],
        ) -> Result<(), IoError> {
            let i = staging.ok_or_else(|| IoError::Plan("not from staging".into()))?;
            let st = self.staging.get().unwrap();
            let b = st.ptr(i).unwrap() as usize;
            let s = src.as_ptr() as usize;
            assert!(
                s >= b && s + src.len() <= b + st.size,
                "source outside buffer {i}"
            );
            self.queued.get().unwrap()[i]
                .lock()
                .unwrap()
                .push((dest, dst_off, s, src.len()));
            Ok(())
        }
        fn reclaim(&self, staging: usize) -> Result<(), IoError> {
            self.run(staging);
            Ok(())
        }
        fn finish(&self) -> Result<(), IoError> {
            for i in 0..self.staging.get().map_or(0, |s| s.count) {
                self.run(i);
            }
            Ok(())
        }
    }

    #[test]
    fn staged_sink_reclaims_before_refilling_on_every_engine() {
        use rand::{Rng, SeedableRng};
        use std::io::Write;
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let len = (19 << 20) + 4321;
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let files = vec![f.path().to_path_buf()];
        let mut reqs = Vec::new();
        let mut off = 32 * 3;
        while off < len {
            let l = rng.random_range(1..3_000_000).min(len - off);
            reqs.push(ReadRequest {
                file: 0,
                offset: off as u64,
                len: l,
            });
            // Every third tensor is followed by a gap wider than merge_gap: a new extent.
            let gap = if reqs.len() % 3 == 0 { 400_000 } else { 0 };
            off += l.div_ceil(32) * 32 + gap;
        }
        for strategy in [Strategy::Auto, Strategy::Direct, Strategy::Buffered] {
            for engine in [DirectEngine::IoUring, DirectEngine::Pool] {
                for cold in [true, false] {
                    probe::evict(f.path()).unwrap();
                    if !cold {
                        // Half warm, readahead off: Auto mixes cached and direct reads.
                        use std::os::fd::AsRawFd;
                        use std::os::unix::fs::FileExt;
                        let g = File::open(f.path()).unwrap();
                        // SAFETY: advice on an open fd.
                        unsafe {
                            libc::posix_fadvise(g.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM)
                        };
                        let mut b = vec![0u8; len / 2];
                        g.read_exact_at(&mut b, 0).unwrap();
                    }
                    let l = Loader::new(LoaderOptions {
                        strategy,
                        engine,
                        threads: 3,
                        chunk: 1 << 20,
                        merge_gap: 64 << 10,
                        // Few staging buffers, so that each is refilled many times.
                        queue_depth: 4,
                        bounce_buffers: 4,
                        pool_threads: 2,
                        ..LoaderOptions::default()
                    });
                    let (open, notes) = l.open(&files, &reqs).unwrap();
                    let (ext, place) = sink::extents(&open, &reqs, l.opts.merge_gap).unwrap();
                    let mut arenas: Vec<AlignedBuf> = ext
                        .iter()
                        .map(|e| AlignedBuf::zeroed(e.alloc).unwrap())
                        .collect();
                    let dests = arenas
                        .iter_mut()
                        .map(|b| crate::engine::Dest {
                            len: b.len(),
                            ptr: b.raw(),
                        })
                        .collect();
                    let sink = DeferredHost {
                        dests,
                        pool: Mutex::new(None),
                        staging: OnceLock::new(),
                        queued: OnceLock::new(),
                    };
                    let out = l.run(&open, &extent_requests(&ext), &sink, notes, 0);
                    let st = out.into_result().unwrap();
                    let what = format!("{strategy:?} {engine:?} cold={cold}");
                    assert!(sink.staging().is_some(), "{what}");
                    assert!(st.copied_bytes > 0, "{what}");
                    assert!(ext.len() > 1, "{what}");
                    if strategy == Strategy::Auto && !cold {
                        assert!(
                            st.buffered_bytes > 0 && st.direct_bytes > 0,
                            "{what}: {st:?}"
                        );
                    }
                    for (r, p) in reqs.iter().zip(&place) {
                        let (e, o) = p.unwrap();
                        let got = &arenas[e][o..o + r.len];
                        let want = &data[r.offset as usize..r.offset as usize + r.len];
                        assert!(got == want, "{what}: {r:?}");
                    }
                }
            }
        }
    }
}
