//! Byte-exact integrity of every load path against the file itself, for every alignment case,
//! and fault injection through [`FaultHook`]: short reads, EIO, EAGAIN, ECANCELED, EINVAL, a
//! zero-byte read, an impossible result, and a "kernel" that returns wrong bytes (caught by
//! `verify`). The reference is the file's bytes (random, seeded) read back with std.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flowgate_io::probe::{cached_fraction, evict};
use flowgate_io::{
    DirectEngine, FaultHook, IoAttempt, IoError, IoPath, Loader, LoaderOptions, ReadRequest,
    Strategy,
};
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

struct TestFile {
    _f: tempfile::NamedTempFile,
    path: PathBuf,
    data: Vec<u8>,
}

fn make_file(dir: Option<&Path>, len: usize, seed: u64) -> TestFile {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    let mut f = match dir {
        Some(d) => tempfile::NamedTempFile::new_in(d).unwrap(),
        None => tempfile::NamedTempFile::new().unwrap(),
    };
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    let path = f.path().to_path_buf();
    TestFile { _f: f, path, data }
}

/// Every alignment case on a file of `len` bytes (not a multiple of 4096).
fn cases(len: usize, seed: u64) -> Vec<ReadRequest> {
    let r = |offset: usize, l: usize| ReadRequest {
        file: 0,
        offset: offset as u64,
        len: l,
    };
    let mut v = vec![
        r(0, 1),                   // first byte
        r(len - 1, 1),             // last byte
        r(len - 5000, 5000),       // ends at a file end that is not sector aligned
        r(100, 300),               // inside one sector
        r(4000, 200),              // straddles a 4096 boundary
        r(511, 2),                 // straddles a 512 boundary
        r(1000, 3 * MIB + 777),    // mid-sector start and end, spans several chunks
        r(8192, 2 * MIB),          // page aligned both ends (goes straight to destination)
        r(512 * 3, 2 * MIB + 512), // 512 aligned both ends
        r(4096 * 5 + 32, 9 * MIB), // larger than one 8 MiB buffer, misaligned by 32
        r(6 * MIB + 5, 0),         // empty
        r(12 * MIB, MIB),          // overlaps the next two
        r(12 * MIB + 4095, MIB),   // overlapping
        r(12 * MIB + 10, 100),     // nested
        r(0, len),                 // the whole file
    ];
    // A run of adjacent tensors of assorted sizes, like a GGUF data section (32-byte aligned).
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut off = 14 * MIB + 32 * 7;
    while off < 20 * MIB {
        let l = match rng.random_range(0..4) {
            0 => rng.random_range(1..64),
            1 => rng.random_range(64..8192),
            2 => rng.random_range(8192..300_000),
            _ => rng.random_range(300_000..1_500_000),
        };
        let l = l.min(len - off);
        v.push(r(off, l));
        off += l.div_ceil(32) * 32;
    }
    v
}

fn check(data: &[u8], reqs: &[ReadRequest], bufs: &[flowgate_io::AlignedBuf], what: &str) {
    assert_eq!(bufs.len(), reqs.len(), "{what}");
    for (i, (r, b)) in reqs.iter().zip(bufs).enumerate() {
        let o = r.offset as usize;
        assert_eq!(b.len(), r.len, "{what}: request {i} length");
        if b[..] != data[o..o + r.len] {
            let at = b.iter().zip(&data[o..]).position(|(x, y)| x != y);
            panic!("{what}: request {i} ({r:?}) differs at {at:?}");
        }
        assert_eq!(b.as_ptr() as usize % 4096, 0, "{what}: alignment");
    }
}

fn opts(strategy: Strategy, engine: DirectEngine) -> LoaderOptions {
    LoaderOptions {
        strategy,
        engine,
        threads: 2,
        ..LoaderOptions::default()
    }
}

const FILE_LEN: usize = 24 * MIB + 12_345;

#[test]
fn every_path_is_byte_exact_cold_and_warm() {
    let tf = make_file(None, FILE_LEN, 1);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 2);
    for strategy in [Strategy::Auto, Strategy::Direct, Strategy::Buffered] {
        for engine in [DirectEngine::IoUring, DirectEngine::Pool] {
            for cold in [true, false] {
                if cold {
                    evict(&tf.path).unwrap();
                }
                let what = format!("{strategy:?} {engine:?} cold={cold}");
                let (bufs, st) = Loader::new(opts(strategy, engine))
                    .read_with_stats(&files, &reqs)
                    .unwrap();
                check(&tf.data, &reqs, &bufs, &what);
                let total: u64 = reqs.iter().map(|r| r.len as u64).sum();
                assert_eq!(st.bytes, total, "{what}");
                if strategy == Strategy::Direct {
                    let want = if engine == DirectEngine::IoUring {
                        "io_uring"
                    } else {
                        "pread pool"
                    };
                    assert_eq!(st.engine, want, "{what}");
                    // Aligned tensors went straight to their destination, the rest was copied.
                    assert!(
                        st.copied_bytes > 0 && st.copied_bytes < total,
                        "{what}: {st:?}"
                    );
                    assert_eq!(st.buffered_bytes, 0, "{what}");
                }
                if strategy == Strategy::Buffered {
                    assert_eq!(st.buffered_bytes, total, "{what}");
                    assert_eq!(st.direct_bytes, 0, "{what}");
                }
                if strategy == Strategy::Auto && cold {
                    assert!(st.cached_fraction < 0.05, "{what}: {st:?}");
                    assert!(st.buffered_bytes < total / 10, "{what}: {st:?}");
                }
            }
        }
    }
}

#[test]
fn auto_reads_cached_regions_buffered_and_the_rest_direct() {
    let tf = make_file(None, FILE_LEN, 3);
    let files = vec![tf.path.clone()];
    evict(&tf.path).unwrap();
    // Warm the first 10 MiB only, with readahead off so the rest stays cold.
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&tf.path).unwrap();
        // SAFETY: advice on an open fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let mut buf = vec![0u8; 10 * MIB];
        f.read_exact_at(&mut buf, 0).unwrap();
    }
    let frac = cached_fraction(&tf.path).unwrap();
    assert!(frac > 0.3 && frac < 0.8, "cached fraction {frac}");
    let reqs = cases(FILE_LEN, 4);
    let (bufs, st) = Loader::new(opts(Strategy::Auto, DirectEngine::Auto))
        .read_with_stats(&files, &reqs)
        .unwrap();
    check(&tf.data, &reqs, &bufs, "mixed");
    assert!(st.buffered_bytes > 0 && st.direct_bytes > 0, "{st:?}");
    assert!(
        st.cached_fraction > 0.2 && st.cached_fraction < 0.9,
        "{st:?}"
    );
}

#[test]
fn tmpfs_files_load_whether_or_not_o_direct_is_refused() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm: skipped");
        return;
    }
    let tf = make_file(Some(shm), FILE_LEN, 5);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 6);
    // tmpfs accepts O_DIRECT since Linux 6.6; older kernels refuse it with EINVAL.
    let refused = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&tf.path)
            .is_err()
    };
    for strategy in [Strategy::Auto, Strategy::Direct] {
        let (bufs, st) = Loader::new(opts(strategy, DirectEngine::Auto))
            .read_with_stats(&files, &reqs)
            .unwrap();
        check(&tf.data, &reqs, &bufs, "tmpfs");
        assert_eq!(
            st.notes.iter().any(|n| n.contains("O_DIRECT refused")),
            refused,
            "{:?}",
            st.notes
        );
        if strategy == Strategy::Auto {
            // All of a tmpfs file is "cached": read through the cache.
            assert_eq!(st.buffered_bytes, st.bytes, "{st:?}");
        }
    }
}

/// A deterministic "random" number per attempt, so the hook behaves the same on every thread.
fn mix(io: &IoAttempt, salt: u64) -> u64 {
    let mut x = io.offset ^ (io.len as u64).rotate_left(17) ^ ((io.attempt as u64) << 50) ^ salt;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x
}

/// Returns fewer bytes than the kernel read and scribbles over the rest.
struct ShortReads;
impl FaultHook for ShortReads {
    fn complete(&self, io: &IoAttempt, buf: &mut [u8], res: i64) -> i64 {
        if res <= 1 || mix(io, 1).is_multiple_of(3) {
            return res;
        }
        let n = 1 + (mix(io, 2) % (res as u64 - 1)) as usize;
        buf[n..res as usize].fill(0xEE);
        n as i64
    }
}

/// Transient errors on first attempts (the data the kernel wrote is scribbled over).
struct Transient(AtomicU64);
impl FaultHook for Transient {
    fn complete(&self, io: &IoAttempt, buf: &mut [u8], res: i64) -> i64 {
        if io.attempt < 2 && mix(io, 3).is_multiple_of(2) {
            self.0.fetch_add(1, Ordering::Relaxed);
            buf.fill(0xAB);
            return if mix(io, 4).is_multiple_of(2) {
                -(libc::EAGAIN as i64)
            } else {
                -(libc::ECANCELED as i64)
            };
        }
        res
    }
}

/// The same error forever on every read that touches byte `at` of the file.
struct Always {
    errno: i32,
    at: u64,
}
impl FaultHook for Always {
    fn complete(&self, io: &IoAttempt, _buf: &mut [u8], res: i64) -> i64 {
        if io.offset <= self.at && self.at < io.offset + io.len as u64 {
            -(self.errno as i64)
        } else {
            res
        }
    }
}

/// EINVAL on direct reads, as a file system that refuses O_DIRECT at read time would.
struct EinvalOnDirect;
impl FaultHook for EinvalOnDirect {
    fn complete(&self, io: &IoAttempt, _buf: &mut [u8], res: i64) -> i64 {
        if io.path != IoPath::Buffered && io.attempt == 0 {
            -(libc::EINVAL as i64)
        } else {
            res
        }
    }
}

/// Reports a zero-byte read (end of file) for reads covering byte `at`.
struct Eof(u64);
impl FaultHook for Eof {
    fn complete(&self, io: &IoAttempt, _buf: &mut [u8], res: i64) -> i64 {
        if io.offset <= self.0 && self.0 < io.offset + io.len as u64 {
            0
        } else {
            res
        }
    }
}

/// Claims more bytes than were asked for.
struct TooMany;
impl FaultHook for TooMany {
    fn complete(&self, io: &IoAttempt, _buf: &mut [u8], res: i64) -> i64 {
        if res >= 0 {
            io.len as i64 + 1
        } else {
            res
        }
    }
}

/// Silently flips a byte and reports success: only `verify` can notice.
struct Corrupt;
impl FaultHook for Corrupt {
    fn complete(&self, _io: &IoAttempt, buf: &mut [u8], res: i64) -> i64 {
        if res > 100 {
            buf[100] ^= 0x5A;
        }
        res
    }
}

fn with_hook(strategy: Strategy, engine: DirectEngine, hook: Arc<dyn FaultHook>) -> Loader {
    Loader::new(LoaderOptions {
        fault: Some(hook),
        ..opts(strategy, engine)
    })
}

const PATHS: [(Strategy, DirectEngine); 3] = [
    (Strategy::Direct, DirectEngine::IoUring),
    (Strategy::Direct, DirectEngine::Pool),
    (Strategy::Buffered, DirectEngine::Auto),
];

#[test]
fn short_reads_and_transient_errors_are_retried_exactly() {
    let tf = make_file(None, FILE_LEN, 7);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 8);
    for (strategy, engine) in PATHS {
        let what = format!("short {strategy:?} {engine:?}");
        let (bufs, st) = with_hook(strategy, engine, Arc::new(ShortReads))
            .read_with_stats(&files, &reqs)
            .unwrap();
        check(&tf.data, &reqs, &bufs, &what);
        assert!(st.retries > 0, "{what}");

        let what = format!("transient {strategy:?} {engine:?}");
        let hook = Arc::new(Transient(AtomicU64::new(0)));
        let (bufs, st) = with_hook(strategy, engine, hook.clone())
            .read_with_stats(&files, &reqs)
            .unwrap();
        check(&tf.data, &reqs, &bufs, &what);
        assert!(
            hook.0.load(Ordering::Relaxed) > 0 && st.retries > 0,
            "{what}"
        );
    }
}

#[test]
fn hard_errors_fail_cleanly() {
    let tf = make_file(None, FILE_LEN, 9);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 10);
    let at = 5 * MIB as u64 + 3;
    for (strategy, engine) in PATHS {
        let what = format!("{strategy:?} {engine:?}");
        for errno in [libc::EIO, libc::EAGAIN, libc::ECANCELED] {
            let e = with_hook(strategy, engine, Arc::new(Always { errno, at }))
                .read(&files, &reqs)
                .unwrap_err();
            match &e {
                IoError::Read { source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(errno), "{what}: {e}")
                }
                other => panic!("{what}: {other}"),
            }
        }
        let e = with_hook(strategy, engine, Arc::new(Eof(at)))
            .read(&files, &reqs)
            .unwrap_err();
        assert!(matches!(e, IoError::ShortFile { .. }), "{what}: {e}");
        let e = with_hook(strategy, engine, Arc::new(TooMany))
            .read(&files, &reqs)
            .unwrap_err();
        assert!(matches!(e, IoError::Read { .. }), "{what}: {e}");
    }
}

#[test]
fn einval_on_direct_reads_falls_back_to_the_page_cache() {
    let tf = make_file(None, FILE_LEN, 11);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 12);
    for engine in [DirectEngine::IoUring, DirectEngine::Pool] {
        let (bufs, st) = with_hook(Strategy::Direct, engine, Arc::new(EinvalOnDirect))
            .read_with_stats(&files, &reqs)
            .unwrap();
        check(&tf.data, &reqs, &bufs, "einval");
        assert!(
            st.notes.iter().any(|n| n.contains("O_DIRECT read refused")),
            "{:?}",
            st.notes
        );
    }
}

#[test]
fn verify_catches_silent_corruption() {
    let tf = make_file(None, FILE_LEN, 13);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 14);
    for (strategy, engine) in PATHS {
        let what = format!("{strategy:?} {engine:?}");
        // Clean load with verify on: passes.
        let l = Loader::new(LoaderOptions {
            verify: true,
            ..opts(strategy, engine)
        });
        check(&tf.data, &reqs, &l.read(&files, &reqs).unwrap(), &what);
        // Corrupting "kernel": verify fails with the offending range.
        let l = Loader::new(LoaderOptions {
            verify: true,
            fault: Some(Arc::new(Corrupt)),
            ..opts(strategy, engine)
        });
        let e = l.read(&files, &reqs).unwrap_err();
        assert!(matches!(e, IoError::Verify { .. }), "{what}: {e}");
    }
}

#[test]
fn progress_reaches_the_total_and_bad_requests_are_errors() {
    let tf = make_file(None, FILE_LEN, 15);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 16);
    let total: u64 = reqs.iter().map(|r| r.len as u64).sum();
    for strategy in [Strategy::Direct, Strategy::Buffered] {
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let l = Loader::new(LoaderOptions {
            progress: Some(Arc::new(move |n| {
                s2.fetch_max(n, Ordering::Relaxed);
            })),
            ..opts(strategy, DirectEngine::Auto)
        });
        l.read(&files, &reqs).unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), total);
    }
    let l = Loader::default();
    let past = [ReadRequest {
        file: 0,
        offset: FILE_LEN as u64 - 10,
        len: 11,
    }];
    assert!(matches!(
        l.read(&files, &past),
        Err(IoError::ShortFile { .. })
    ));
    let bad = [ReadRequest {
        file: 3,
        offset: 0,
        len: 1,
    }];
    assert!(matches!(l.read(&files, &bad), Err(IoError::BadFile(3))));
    let missing = vec![PathBuf::from("/nonexistent/flowgate-io-test")];
    assert!(matches!(l.read(&missing, &[]), Err(IoError::Open { .. })));
}

#[test]
fn baselines_match_the_file() {
    let tf = make_file(None, FILE_LEN, 17);
    let files = vec![tf.path.clone()];
    let reqs = cases(FILE_LEN, 18);
    let b = flowgate_io::baseline::mmap_copy(&files, &reqs).unwrap();
    check(&tf.data, &reqs, &b, "mmap");
    let b = flowgate_io::baseline::buffered_read(&files, &reqs).unwrap();
    check(&tf.data, &reqs, &b, "buffered");
    let n = flowgate_io::baseline::sequential_direct(&tf.path, 4 * MIB, 4).unwrap();
    assert_eq!(n, FILE_LEN as u64);
}
