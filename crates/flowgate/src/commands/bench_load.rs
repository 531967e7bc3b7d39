//! `flowgate bench load MODEL [--device cpu|cuda] [--cold] [--json]`: how fast every tensor of a
//! model reaches host memory (`cpu`) or GPU memory (`cuda`), against what the machine and the
//! usual loaders do, all measured in the same run:
//!
//! - (a) `direct`: a raw sequential `O_DIRECT` read of every file, several large reads in
//!   flight, nothing copied: the disk's ceiling (it never uses the page cache, so it reads the
//!   disk even when the file is cached);
//! - (b) `mmap`: map the file and `memcpy` each tensor out of the mapping, one thread (what
//!   llama.cpp does by default);
//! - (c) `buffered`: plain `read()` of each tensor in file order, one thread;
//! - `flowgate`: [`flowgate_io::Loader`] (page-cache probe, io_uring + `O_DIRECT` for what is not
//!   cached, `pread` threads for what is), exactly as a model load does: `cpu` is
//!   [`Loader::load_host`] (tensors as views of arenas laid out like the file; extents wholly in
//!   the page cache are mapped, populated on all cores, not copied, unless `--copy`), `cuda` is
//!   [`Loader::load_cuda`] (device arenas, page-locked staging, asynchronous copies on several
//!   streams; timed until the last copy has completed). The baselines (a)–(c) always go to host
//!   memory: they are what the machine and the usual loaders do.
//!
//! Every variant allocates its destinations inside the measured time, and none is timed freeing
//! them (for `cuda`: the device
//! arenas and the page-locked staging pool; the CUDA context is created before, untimed, as a
//! server creates it once at start-up).
//! `--cold` evicts the model's files from the page cache before each variant
//! (`posix_fadvise(DONTNEED)` per file, `/proc/sys/vm/drop_caches` where that fails; the method
//! is printed). Without it the files are read through the cache before each variant (untimed),
//! so every variant but (a) starts warm.
//! Each variant runs once: this is a heavy benchmark on a shared machine, run it by hand.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use flowgate_io::probe::{cached_fraction, evict, EvictMethod};
use flowgate_io::{
    baseline, flowgate_cuda, DirectEngine, LoadStats, Loader, LoaderOptions, ReadRequest, Strategy,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadDevice {
    /// Host memory.
    #[value(alias = "host")]
    Cpu,
    /// Memory of CUDA device 0.
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    Auto,
    Direct,
    Buffered,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    Auto,
    IoUring,
    Pool,
}

#[derive(ClapArgs, Debug)]
pub struct LoadArgs {
    /// A GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// Evict the model's files from the page cache before each variant.
    #[arg(long)]
    pub cold: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where flowgate's load puts the tensors: host memory or CUDA device 0.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: LoadDevice,
    /// With --device cpu: one buffer per tensor (`Loader::read`) instead of arenas laid out
    /// like the file (for comparison; model loads use arenas).
    #[arg(long)]
    pub per_tensor: bool,
    /// Do not fault the host destinations in ahead of direct reads (for comparison).
    #[arg(long)]
    pub no_prefault: bool,
    /// Host loads: copy extents already in the page cache into fresh memory instead of mapping
    /// them (the loader maps them by default; for comparison).
    #[arg(long)]
    pub copy: bool,
    /// Copy streams of the CUDA sink.
    #[arg(long, default_value_t = 4)]
    pub cuda_streams: usize,
    /// Threads reading through the page cache (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Direct reads in flight.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: usize,
    /// Size of one direct read, MiB.
    #[arg(long, default_value_t = 8)]
    pub chunk_mib: usize,
    /// Reads in flight for (a), the sequential O_DIRECT ceiling.
    #[arg(long, default_value_t = 8)]
    pub direct_depth: usize,
    /// Size of one read of (a), MiB.
    #[arg(long, default_value_t = 16)]
    pub direct_chunk_mib: usize,
    /// Smallest alignment of flowgate's direct reads (bytes; the file system's own is used
    /// when larger).
    #[arg(long, default_value_t = 4096)]
    pub min_align: usize,
    /// Bounce buffers (of --chunk-mib each) for direct reads that need a copy.
    #[arg(long, default_value_t = 16)]
    pub bounce_buffers: usize,
    /// flowgate's strategy (auto probes the page cache).
    #[arg(long, value_enum, default_value = "auto")]
    pub strategy: StrategyArg,
    /// flowgate's engine for direct reads.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineArg,
    /// After flowgate's load, re-read every tensor through the cache and compare (not timed).
    #[arg(long)]
    pub verify: bool,
    /// Do not touch (and free) twice the model's size of memory before each variant. Priming
    /// keeps a virtual machine's host page faults (first touch of memory the guest gave back)
    /// out of the figures, equally for every variant.
    #[arg(long)]
    pub no_prime: bool,
    /// Run every variant this many times (interleaved) and report the median.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// Run only these variants (comma-separated: flowgate,direct,mmap,buffered).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

struct Row {
    name: &'static str,
    what: String,
    bytes: u64,
    /// One sample per repetition.
    samples: Vec<f64>,
}

impl Row {
    /// Median seconds.
    fn secs(&self) -> f64 {
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs().max(1e-9) / 1e9
    }
}

fn record(rows: &mut Vec<Row>, name: &'static str, what: String, bytes: u64, secs: f64) {
    match rows.iter_mut().find(|r| r.name == name) {
        Some(r) => r.samples.push(secs),
        None => rows.push(Row {
            name,
            what,
            bytes,
            samples: vec![secs],
        }),
    }
}

fn progress_bar(total: u64, quiet: bool) -> (indicatif::ProgressBar, flowgate_io::Progress) {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::hidden(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style);
    }
    let shown = Arc::new(AtomicBool::new(quiet));
    let start = Instant::now();
    let pb2 = pb.clone();
    let cb: flowgate_io::Progress = Arc::new(move |n| {
        // Only loads that last more than about a second get a bar.
        if !shown.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() > 1.0 {
            shown.store(true, Ordering::Relaxed);
            pb2.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        pb2.set_position(n);
    });
    (pb, cb)
}

/// Reads all of `path` through the page cache into one reused buffer.
fn warm_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// `AnonHugePages` of this process (`/proc/self/smaps_rollup`), in bytes.
fn anon_huge_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Opens CUDA device 0 for `--device cuda`, as one clear error line where it cannot be.
fn open_cuda() -> Result<(flowgate_cuda::Device, String)> {
    use flowgate_cuda::{Cuda, Device};
    if !Cuda::available() {
        bail!("--device cuda: no CUDA driver on this machine (libcuda.so not found); use --device cpu");
    }
    let t = Instant::now();
    let d = Device::open(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    let name = d.name().unwrap_or_else(|_| "CUDA device 0".into());
    let what = format!(
        "{name}: context created in {:.2} s before timing",
        t.elapsed().as_secs_f64()
    );
    Ok((d, what))
}

pub fn load(a: LoadArgs) -> Result<()> {
    let cuda = match a.device {
        LoadDevice::Cuda => Some(open_cuda()?),
        LoadDevice::Cpu => None,
    };
    let mf = flowgate_formats::model::open(&a.model)
        .with_context(|| format!("opening {}", a.model.display()))?;
    let cat = &mf.catalog;
    let files: Vec<PathBuf> = cat.files.clone();
    let mut reqs = Vec::with_capacity(cat.len());
    for t in cat.iter() {
        let len = usize::try_from(t.nbytes).context("tensor larger than the address space")?;
        reqs.push(ReadRequest {
            file: t.file,
            offset: t.offset,
            len,
        });
    }
    let bytes: u64 = reqs.iter().map(|r| r.len as u64).sum();
    let file_bytes: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()
        .context("reading file sizes")?;
    let want = |n: &str| a.only.is_empty() || a.only.iter().any(|o| o == n);

    let mut evict_method: Option<EvictMethod> = None;
    let prime_bytes = baseline::mem_available()
        .map_or(2 * bytes, |m| (2 * bytes).min(m.saturating_sub(1 << 30)))
        .min(usize::MAX as u64) as usize;
    let mut prime_secs = 0.0;
    // Warm runs read the files through the cache (untimed) before each variant, after the
    // priming: touching that much memory can make the kernel drop part of the page cache, and
    // each variant must find the files as cached as the others did. The lowest cached fraction
    // seen is reported.
    let mut warm_fraction: Option<f64> = None;
    let mut prepare = |evict_method: &mut Option<EvictMethod>| -> Result<()> {
        if !a.cold {
            for p in &files {
                warm_file(p).with_context(|| format!("reading {}", p.display()))?;
            }
        }
        if !a.no_prime {
            prime_secs += baseline::prime_memory(prime_bytes);
        }
        if a.cold {
            for p in &files {
                let m = evict(p).with_context(|| {
                    format!(
                        "--cold: cannot drop {} from the page cache (posix_fadvise needs a file \
                         you can open; /proc/sys/vm/drop_caches needs root)",
                        p.display()
                    )
                })?;
                // Report the weakest method used.
                if *evict_method != Some(EvictMethod::DropCaches) {
                    *evict_method = Some(m);
                }
            }
        } else {
            // Priming may have pushed part of the files out of the cache: read them again,
            // only then (the variant should follow the priming closely: a VM may hand freed
            // memory back to its host after a couple of seconds, and first touches of it are
            // slow again).
            let mut f = 0.0;
            for p in &files {
                let mut c = cached_fraction(p)?;
                if c < 0.999 {
                    warm_file(p).with_context(|| format!("reading {}", p.display()))?;
                    c = cached_fraction(p)?;
                }
                f += c / files.len() as f64;
            }
            warm_fraction = Some(warm_fraction.map_or(f, |w: f64| w.min(f)));
        }
        Ok(())
    };

    let mut rows: Vec<Row> = Vec::new();
    let mut notes = Vec::new();
    let mut engine = "";
    let mut per_path: Option<LoadStats> = None;
    if let Some((_, what)) = &cuda {
        notes.push(what.clone());
    }

    for rep in 0..a.reps.max(1) {
        if want("direct") {
            prepare(&mut evict_method)?;
            let t = Instant::now();
            let mut n = 0;
            for p in &files {
                n += baseline::sequential_direct(
                    p,
                    a.direct_chunk_mib.clamp(1, 256) << 20,
                    a.direct_depth,
                )
                .with_context(|| format!("O_DIRECT read of {}", p.display()))?;
            }
            let what = format!(
                "(a) sequential O_DIRECT read of the files, {} x {} MiB in flight",
                a.direct_depth, a.direct_chunk_mib
            );
            record(&mut rows, "direct", what, n, t.elapsed().as_secs_f64());
        }
        if want("flowgate") {
            prepare(&mut evict_method)?;
            let (pb, cb) = progress_bar(bytes, a.json);
            let opts = LoaderOptions {
                strategy: match a.strategy {
                    StrategyArg::Auto => Strategy::Auto,
                    StrategyArg::Direct => Strategy::Direct,
                    StrategyArg::Buffered => Strategy::Buffered,
                },
                engine: match a.engine {
                    EngineArg::Auto => DirectEngine::Auto,
                    EngineArg::IoUring => DirectEngine::IoUring,
                    EngineArg::Pool => DirectEngine::Pool,
                },
                threads: a.threads.unwrap_or(LoaderOptions::default().threads).max(1),
                queue_depth: a.queue_depth.max(1),
                chunk: a.chunk_mib.clamp(1, 256) << 20,
                bounce_buffers: a.bounce_buffers.max(1),
                min_align: a.min_align.clamp(512, 1 << 20),
                cuda_streams: a.cuda_streams.max(2),
                prefault: !a.no_prefault,
                map_cached: !a.copy,
                progress: Some(cb),
                ..LoaderOptions::default()
            };
            let loader = Loader::new(opts.clone());
            let huge_before = anon_huge_bytes();
            // What was loaded stays alive until the clock has stopped (no variant is timed
            // freeing its destinations).
            let mut keep_dev = None;
            let mut keep_host = None;
            let mut keep_bufs = None;
            let t = Instant::now();
            let st: LoadStats = match (&cuda, a.per_tensor) {
                (Some((dev, _)), _) => {
                    let (free, _) = dev.memory_info().context("cuMemGetInfo")?;
                    let alloc = flowgate_cuda::DeviceAllocator::new(dev, free as u64);
                    let (views, st) = loader
                        .load_cuda(&files, &reqs, &alloc)
                        .context("flowgate load into CUDA memory")?;
                    keep_dev = Some(views);
                    st
                }
                (None, false) => {
                    let (views, st) = loader.load_host(&files, &reqs).context("flowgate load")?;
                    keep_host = Some(views);
                    st
                }
                (None, true) => {
                    let (bufs, st) = loader
                        .read_with_stats(&files, &reqs)
                        .context("flowgate load")?;
                    keep_bufs = Some(bufs);
                    st
                }
            };
            let secs = t.elapsed().as_secs_f64();
            if rep == 0 && cuda.is_none() {
                // How the destination memory was faulted in: 2 MiB pages or 4 KiB ones.
                if let (Some(before), Some(after)) = (huge_before, anon_huge_bytes()) {
                    notes.push(format!(
                        "flowgate's destinations: {:.0}% in transparent huge pages",
                        after.saturating_sub(before) as f64 * 100.0 / bytes.max(1) as f64
                    ));
                }
            }
            drop((keep_dev, keep_host, keep_bufs));
            pb.finish_and_clear();
            engine = st.engine;
            let what = format!(
                "flowgate {:?} -> {}: {} ({:.0}% cached, {:.0}% {})",
                opts.strategy,
                match (&cuda, a.per_tensor) {
                    (Some(_), _) => "cuda",
                    (None, false) => "host arenas",
                    (None, true) => "host per tensor",
                },
                st.engine,
                st.cached_fraction * 100.0,
                st.copied_bytes as f64 * 100.0 / bytes.max(1) as f64,
                if cuda.is_some() {
                    "H2D from pinned staging"
                } else {
                    "copied from bounce buffers"
                }
            );
            record(&mut rows, "flowgate", what, bytes, secs);
            if rep == 0 {
                notes.push(format!(
                    "flowgate: {} reads into {} destination(s) ({:.2} GB direct, {:.2} GB cached, {:.2} GB bounced/staged), {:.2} s in deliveries, {:.2} s waiting on io_uring, {} retries{}",
                    st.reads,
                    st.extents,
                    st.direct_bytes as f64 / 1e9,
                    st.buffered_bytes as f64 / 1e9,
                    st.copied_bytes as f64 / 1e9,
                    st.copy_time.as_secs_f64(),
                    st.wait_time.as_secs_f64(),
                    st.retries,
                    if st.staging_bytes > 0 {
                        format!(", {} MiB page-locked staging", st.staging_bytes >> 20)
                    } else {
                        String::new()
                    }
                ));
                notes.extend(st.notes.clone());
                per_path = Some(st.clone());
            }
            if a.verify && rep == 0 {
                let o = LoaderOptions {
                    verify: true,
                    progress: None,
                    ..opts
                };
                if a.cold {
                    prepare(&mut evict_method)?;
                }
                let l = Loader::new(o);
                match &cuda {
                    Some((dev, _)) => {
                        let (free, _) = dev.memory_info().context("cuMemGetInfo")?;
                        let alloc = flowgate_cuda::DeviceAllocator::new(dev, free as u64);
                        l.load_cuda(&files, &reqs, &alloc).context("verify")?;
                        notes.push(
                            "verify: every tensor, copied back from the device, matched a buffered re-read"
                                .into(),
                        );
                    }
                    None => {
                        l.load_host(&files, &reqs).context("verify")?;
                        notes.push("verify: every tensor matched a buffered re-read".into());
                    }
                }
            }
        }
        if want("mmap") {
            prepare(&mut evict_method)?;
            let t = Instant::now();
            let out = baseline::mmap_copy(&files, &reqs).context("mmap + memcpy")?;
            let secs = t.elapsed().as_secs_f64();
            drop(out);
            let what = "(b) mmap + memcpy of every tensor, one thread".into();
            record(&mut rows, "mmap", what, bytes, secs);
        }
        if want("buffered") {
            prepare(&mut evict_method)?;
            let t = Instant::now();
            let out = baseline::buffered_read(&files, &reqs).context("buffered read")?;
            let secs = t.elapsed().as_secs_f64();
            drop(out);
            let what = "(c) buffered read() of every tensor, one thread".into();
            record(&mut rows, "buffered", what, bytes, secs);
        }
    }
    if !a.no_prime {
        notes.push(format!(
            "before each variant, {:.1} GiB of memory was touched and freed ({prime_secs:.1} s in all, untimed)",
            prime_bytes as f64 / (1u64 << 30) as f64
        ));
    }
    let gbps = |n: &str| rows.iter().find(|r| r.name == n).map(|r| r.gbps());
    if a.json {
        let j = serde_json::json!({
            "bytes": bytes,
            "file_bytes": file_bytes,
            "tensors": reqs.len(),
            "flowgate_gbps": gbps("flowgate"),
            "direct_read_gbps": gbps("direct"),
            "mmap_gbps": gbps("mmap"),
            "buffered_gbps": gbps("buffered"),
            "cold": a.cold,
            "device": if cuda.is_some() { "cuda" } else { "cpu" },
            "layout": if cuda.is_none() && a.per_tensor { "per-tensor" } else { "arena" },
            "flowgate_bytes_per_path": per_path.as_ref().map(|s| serde_json::json!({
                "direct": s.direct_bytes,
                "cached": s.buffered_bytes,
                "bounced_or_staged": s.copied_bytes,
                "mapped_from_page_cache": s.mapped_bytes,
            })),
            "destinations": per_path.as_ref().map(|s| s.extents),
            "staging_bytes": per_path.as_ref().map(|s| s.staging_bytes),
            "evict_method": evict_method.map(|m| m.to_string()),
            "warm_cached_fraction": warm_fraction,
            "primed_bytes_per_variant": if a.no_prime { 0 } else { prime_bytes },
            "engine": engine,
            "seconds": rows.iter().map(|r| (r.name.to_string(), serde_json::json!(r.samples))).collect::<serde_json::Map<_, _>>(),
            "reps": a.reps.max(1),
            "notes": notes,
        });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    outln!(
        "bench load {} -> {}: {} tensors, {:.2} GiB in {} file(s), {}",
        a.model.display(),
        if cuda.is_some() { "cuda" } else { "cpu" },
        reqs.len(),
        bytes as f64 / (1u64 << 30) as f64,
        files.len(),
        match (a.cold, evict_method, warm_fraction) {
            (true, Some(m), _) => format!("cold (page cache dropped before each variant: {m})"),
            (true, None, _) => "cold".to_string(),
            (false, _, Some(f)) => format!("warm ({:.0}% of the files cached)", f * 100.0),
            (false, _, None) => "warm".to_string(),
        }
    );
    let disk = gbps("direct");
    let mmap = gbps("mmap");
    outln!(
        "{:<74} {:>8} {:>7} {:>8} {:>8}",
        "variant",
        "seconds",
        "GB/s",
        "vs (a)",
        "vs (b)"
    );
    for r in &rows {
        let rel = |b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}x", r.gbps() / b));
        outln!(
            "{:<74} {:>8.2} {:>7.2} {:>8} {:>8}",
            r.what,
            r.secs(),
            r.gbps(),
            rel(disk),
            rel(mmap)
        );
    }
    for n in &notes {
        outln!("note: {n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_without_a_driver_is_one_clear_line() {
        if flowgate_cuda::Cuda::available() {
            println!("skipped: CUDA is present here");
            return;
        }
        let e = open_cuda().map(|_| ()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("--device cuda: "), "{msg}");
        assert!(msg.contains("--device cpu"), "{msg}");
    }
}
