//! `flowgate bench load MODEL [--cold] [--json]`: how fast every tensor of a model reaches host
//! memory, against what the machine and the usual loaders do, all measured in the same run:
//!
//! - (a) `direct`: a raw sequential `O_DIRECT` read of every file, several large reads in
//!   flight, nothing copied: the disk's ceiling (it never uses the page cache, so it reads the
//!   disk even when the file is cached);
//! - (b) `mmap`: map the file and `memcpy` each tensor out of the mapping, one thread (what
//!   llama.cpp does by default);
//! - (c) `buffered`: plain `read()` of each tensor in file order, one thread;
//! - `flowgate`: [`flowgate_io::Loader`] (page-cache probe, io_uring + `O_DIRECT` for what is not
//!   cached, `pread` threads for what is).
//!
//! Every variant allocates its destinations inside the measured time, the same way.
//! `--cold` evicts the model's files from the page cache before each variant
//! (`posix_fadvise(DONTNEED)` per file, `/proc/sys/vm/drop_caches` where that fails; the method
//! is printed). Without it the files are read once first, so every variant but (a) starts warm.
//! Each variant runs once: this is a heavy benchmark on a shared machine, run it by hand.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use flowgate_io::probe::{cached_fraction, evict, EvictMethod};
use flowgate_io::{baseline, DirectEngine, Loader, LoaderOptions, ReadRequest, Strategy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadDevice {
    Host,
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
    /// Where the tensors go (only host memory so far).
    #[arg(long, value_enum, default_value = "host")]
    pub device: LoadDevice,
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

pub fn load(a: LoadArgs) -> Result<()> {
    if a.device == LoadDevice::Cuda {
        bail!(
            "--device cuda: not yet. `bench load` measures loads into host memory only for now \
             (run it without --device)"
        );
    }
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
    let mut prepare = |evict_method: &mut Option<EvictMethod>| -> Result<()> {
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
        }
        Ok(())
    };
    let mut warm_fraction = None;
    if !a.cold {
        // Warm the cache: read every file once, untimed.
        let whole: Vec<ReadRequest> = files
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(ReadRequest {
                    file: i,
                    offset: 0,
                    len: usize::try_from(std::fs::metadata(p)?.len()).unwrap_or(0),
                })
            })
            .collect::<std::io::Result<_>>()?;
        drop(baseline::buffered_read(&files, &whole)?);
        let mut f = 0.0;
        for p in &files {
            f += cached_fraction(p)? / files.len() as f64;
        }
        warm_fraction = Some(f);
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut notes = Vec::new();
    let mut engine = "";

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
                progress: Some(cb),
                ..LoaderOptions::default()
            };
            let t = Instant::now();
            let (bufs, st) = Loader::new(opts.clone())
                .read_with_stats(&files, &reqs)
                .context("flowgate load")?;
            let secs = t.elapsed().as_secs_f64();
            pb.finish_and_clear();
            drop(bufs);
            engine = st.engine;
            let what = format!(
                "flowgate {:?}: {} ({:.0}% cached, {:.0}% copied from bounce buffers)",
                opts.strategy,
                st.engine,
                st.cached_fraction * 100.0,
                st.copied_bytes as f64 * 100.0 / bytes.max(1) as f64
            );
            record(&mut rows, "flowgate", what, bytes, secs);
            if rep == 0 {
                notes.push(format!(
            "flowgate: {} reads ({:.2} GB direct, {:.2} GB buffered), {:.2} s copying out of bounce buffers, {:.2} s waiting on io_uring, {} retries",
            st.reads,
            st.direct_bytes as f64 / 1e9,
            st.buffered_bytes as f64 / 1e9,
            st.copy_time.as_secs_f64(),
            st.wait_time.as_secs_f64(),
            st.retries
        ));
                notes.extend(st.notes);
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
                Loader::new(o).read(&files, &reqs).context("verify")?;
                notes.push("verify: every tensor matched a buffered re-read".into());
            }
        }
        if want("mmap") {
            prepare(&mut evict_method)?;
            let t = Instant::now();
            drop(baseline::mmap_copy(&files, &reqs).context("mmap + memcpy")?);
            let what = "(b) mmap + memcpy of every tensor, one thread".into();
            record(&mut rows, "mmap", what, bytes, t.elapsed().as_secs_f64());
        }
        if want("buffered") {
            prepare(&mut evict_method)?;
            let t = Instant::now();
            drop(baseline::buffered_read(&files, &reqs).context("buffered read")?);
            let what = "(c) buffered read() of every tensor, one thread".into();
            record(
                &mut rows,
                "buffered",
                what,
                bytes,
                t.elapsed().as_secs_f64(),
            );
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
        "bench load {}: {} tensors, {:.2} GiB in {} file(s), {}",
        a.model.display(),
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
