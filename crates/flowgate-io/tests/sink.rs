//! The sinks: loads into arenas laid out like the file ([`Loader::load_host`]) and into CUDA
//! device memory ([`Loader::load_cuda`]), byte-exact against the file itself (random, seeded
//! bytes read back with std) for every alignment case, cold and warm, on every engine, with
//! faults injected; the CUDA test is skipped, saying why, where there is no CUDA.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flowgate_io::flowgate_cuda::{Cuda, Device, DeviceAllocator, Stream};
use flowgate_io::probe::evict;
use flowgate_io::{
    DirectEngine, FaultHook, IoAttempt, IoError, Loader, LoaderOptions, ReadRequest, Strategy,
};
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

struct TestFile {
    _f: tempfile::NamedTempFile,
    path: PathBuf,
    data: Vec<u8>,
}

fn make_file(len: usize, seed: u64) -> TestFile {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    let path = f.path().to_path_buf();
    TestFile { _f: f, path, data }
}

/// Every alignment case on file `file` of `len` bytes, and a GGUF-like run of adjacent
/// 32-byte-aligned tensors of assorted sizes.
fn cases(file: usize, len: usize, seed: u64) -> Vec<ReadRequest> {
    let r = |offset: usize, l: usize| ReadRequest {
        file,
        offset: offset as u64,
        len: l,
    };
    let mut v = vec![
        r(0, 1),
        r(len - 1, 1),
        r(len - 5000, 5000),
        r(100, 300),
        r(4000, 200),
        r(511, 2),
        r(1000, 3 * MIB + 777),
        r(8192, 2 * MIB),
        r(512 * 3, 2 * MIB + 512),
        r(4096 * 5 + 32, 9 * MIB),
        r(6 * MIB + 5, 0),
        r(12 * MIB, MIB),
        r(12 * MIB + 4095, MIB),
        r(12 * MIB + 10, 100),
    ];
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

const FILE_LEN: usize = 24 * MIB + 12_345;
const SMALL_LEN: usize = 3 * MIB + 999;

/// Two files: every case of the first, a few of the second, and a range of the first far
/// from the rest (its own extent).
fn two_files(seed: u64) -> (TestFile, TestFile, Vec<ReadRequest>) {
    let a = make_file(FILE_LEN, seed);
    let b = make_file(SMALL_LEN, seed + 100);
    let mut reqs = cases(0, FILE_LEN, seed + 1);
    reqs.push(ReadRequest {
        file: 1,
        offset: 77,
        len: MIB,
    });
    reqs.push(ReadRequest {
        file: 1,
        offset: (SMALL_LEN - 3) as u64,
        len: 3,
    });
    reqs.push(ReadRequest {
        file: 0,
        offset: 22 * MIB as u64 + 1,
        len: MIB + 17,
    });
    (a, b, reqs)
}

fn expect<'a>(a: &'a TestFile, b: &'a TestFile, r: &ReadRequest) -> &'a [u8] {
    let d = if r.file == 0 { &a.data } else { &b.data };
    let o = r.offset as usize;
    &d[o..o + r.len]
}

fn opts(strategy: Strategy, engine: DirectEngine) -> LoaderOptions {
    LoaderOptions {
        strategy,
        engine,
        threads: 2,
        // Keep the sparse range of file 0 in an extent of its own.
        merge_gap: 64 << 10,
        // These tests exercise the read paths; mapping cached extents has its own test.
        map_cached: false,
        ..LoaderOptions::default()
    }
}

#[test]
fn host_arenas_are_byte_exact_and_copy_nothing() {
    let (a, b, reqs) = two_files(1);
    let files = vec![a.path.clone(), b.path.clone()];
    let total: u64 = reqs.iter().map(|r| r.len as u64).sum();
    for strategy in [Strategy::Auto, Strategy::Direct, Strategy::Buffered] {
        for engine in [DirectEngine::IoUring, DirectEngine::Pool] {
            for cold in [true, false] {
                if cold {
                    evict(&a.path).unwrap();
                    evict(&b.path).unwrap();
                }
                let what = format!("{strategy:?} {engine:?} cold={cold}");
                let (views, st) = Loader::new(opts(strategy, engine))
                    .load_host(&files, &reqs)
                    .unwrap();
                assert_eq!(views.len(), reqs.len(), "{what}");
                for (i, (r, v)) in reqs.iter().zip(&views).enumerate() {
                    assert_eq!(v.len(), r.len, "{what}: request {i}");
                    if v.bytes() != expect(&a, &b, r) {
                        panic!("{what}: request {i} ({r:?}) differs");
                    }
                    // A tensor keeps its file offset's alignment in memory.
                    if r.len > 0 {
                        assert_eq!(
                            v.bytes().as_ptr() as usize % 4096,
                            r.offset as usize % 4096,
                            "{what}: request {i}"
                        );
                    }
                }
                assert_eq!(st.bytes, total, "{what}");
                assert_eq!(st.sink, "host", "{what}");
                // Runs more than 64 KiB apart are separate extents: in file 0 [0, 9 MiB],
                // [12, 13 MiB], [14, 20 MiB], the sparse range, its last 5000 bytes; in file 1
                // its first MiB and its last 3 bytes.
                assert_eq!(st.extents, 7, "{what}");
                if strategy == Strategy::Direct {
                    // Only the two tiny extents at the ends of the files (under 256 KiB, read
                    // whole into a bounce buffer, from their aligned starts: 8249 + 999
                    // bytes) are copied; every large extent lands in place.
                    assert_eq!(st.copied_bytes, 8249 + 999, "{what}: {st:?}");
                }
            }
        }
    }
}

/// Shortens reads and fails first attempts with EAGAIN (scribbling over the buffer).
struct Flaky(AtomicU64);
impl FaultHook for Flaky {
    fn complete(&self, io: &IoAttempt, buf: &mut [u8], res: i64) -> i64 {
        let k = self.0.fetch_add(1, Ordering::Relaxed);
        if io.attempt == 0 && k.is_multiple_of(3) {
            buf.fill(0xAB);
            return -(libc::EAGAIN as i64);
        }
        if res > 1 && k % 3 == 1 {
            let n = 1 + (k as usize * 7919) % (res as usize - 1);
            buf[n..res as usize].fill(0xEE);
            return n as i64;
        }
        res
    }
}

#[test]
fn host_arenas_survive_faults_and_report_errors() {
    let (a, b, reqs) = two_files(3);
    let files = vec![a.path.clone(), b.path.clone()];
    for (strategy, engine) in [
        (Strategy::Direct, DirectEngine::IoUring),
        (Strategy::Direct, DirectEngine::Pool),
        (Strategy::Buffered, DirectEngine::Auto),
    ] {
        let l = Loader::new(LoaderOptions {
            fault: Some(Arc::new(Flaky(AtomicU64::new(0)))),
            verify: true,
            ..opts(strategy, engine)
        });
        let (views, st) = l.load_host(&files, &reqs).unwrap();
        for (r, v) in reqs.iter().zip(&views) {
            assert!(
                v.bytes() == expect(&a, &b, r),
                "{strategy:?} {engine:?} {r:?}"
            );
        }
        assert!(st.retries > 0);
    }
    let past = [ReadRequest {
        file: 1,
        offset: SMALL_LEN as u64 - 1,
        len: 2,
    }];
    let e = Loader::default().load_host(&files, &past).unwrap_err();
    assert!(matches!(e, IoError::ShortFile { .. }), "{e}");
    let (views, _) = Loader::default().load_host(&files, &[]).unwrap();
    assert!(views.is_empty());
    let empty = [ReadRequest {
        file: 0,
        offset: 5,
        len: 0,
    }];
    let (views, _) = Loader::default().load_host(&files, &empty).unwrap();
    assert!(views[0].is_empty());
}

/// Reads the first `n` bytes of `path` through the page cache, readahead off.
fn warm_first(path: &std::path::Path, n: usize) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: advice on an open fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, 0).unwrap();
}

fn device() -> Option<Device> {
    if !Cuda::available() {
        println!("skipped: no CUDA driver (libcuda.so) on this machine");
        return None;
    }
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: CUDA present but no usable device ({e})");
            None
        }
    }
}

#[test]
fn cuda_sink_is_byte_exact() {
    let Some(dev) = device() else { return };
    let (a, b, reqs) = two_files(5);
    let files = vec![a.path.clone(), b.path.clone()];
    let stream = Stream::new(&dev).unwrap();
    let alloc = DeviceAllocator::new(&dev, 256 << 20);
    for strategy in [Strategy::Auto, Strategy::Direct, Strategy::Buffered] {
        for engine in [DirectEngine::IoUring, DirectEngine::Pool] {
            for cold in [true, false] {
                evict(&a.path).unwrap();
                evict(&b.path).unwrap();
                if !cold {
                    // Half warm: Auto then mixes cached (pread into staging) and direct reads.
                    warm_first(&a.path, FILE_LEN / 2);
                }
                let what = format!("cuda {strategy:?} {engine:?} cold={cold}");
                let (views, st) = Loader::new(LoaderOptions {
                    cuda_streams: 2,
                    ..opts(strategy, engine)
                })
                .load_cuda(&files, &reqs, &alloc)
                .unwrap();
                for (i, (r, v)) in reqs.iter().zip(&views).enumerate() {
                    let mut back = vec![0u8; r.len];
                    v.read_back(&stream, &mut back).unwrap();
                    assert!(back == expect(&a, &b, r), "{what}: request {i} ({r:?})");
                }
                assert_eq!(st.sink, "cuda", "{what}");
                if strategy == Strategy::Auto && !cold {
                    assert!(
                        st.buffered_bytes > 0 && st.direct_bytes > 0,
                        "{what}: {st:?}"
                    );
                }
                assert!(st.staging_bytes > 0, "{what}");
                // Every byte of the extents (19.4 MB here: the requests overlap) went from the
                // page-locked staging pool to the device (reads may also cover small gaps).
                assert!(st.copied_bytes > 18 * MIB as u64, "{what}: {st:?}");
                assert!(
                    st.copied_bytes <= st.direct_bytes + st.buffered_bytes,
                    "{what}: {st:?}"
                );
                drop(views);
                assert_eq!(alloc.budget().in_use(), 0, "{what}: arenas freed");
            }
        }
    }
    // A budget too small for the arenas: a clean error, nothing left charged.
    let small = DeviceAllocator::new(&dev, MIB as u64);
    let e = Loader::default()
        .load_cuda(&files, &reqs, &small)
        .unwrap_err();
    assert!(matches!(e, IoError::Cuda(_)), "{e}");
    assert_eq!(small.budget().in_use(), 0);
    println!(
        "cuda sink: byte-exact on {}",
        dev.name().unwrap_or_default()
    );
}

/// `map_cached`: extents already in the page cache are mapped, not copied, and the views are
/// still byte-exact; uncached extents are read as before.
#[test]
fn mapped_cached_extents_are_byte_exact() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let data: Vec<u8> = (0..(5 << 20) + 321).map(|_| rng.random()).collect();
    let mut f = tempfile::NamedTempFile::new_in(std::env::current_dir().unwrap()).unwrap();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    let path = f.path().to_path_buf();
    // Bring the file into the page cache.
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let reqs: Vec<ReadRequest> = [
        (0u64, 1000usize),
        (4096 + 32, 1 << 20),
        (3 << 20, (2 << 20) + 321),
    ]
    .iter()
    .map(|&(offset, len)| ReadRequest {
        file: 0,
        offset,
        len,
    })
    .collect();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    let loader = Loader::new(LoaderOptions {
        map_cached: true,
        progress: Some(Arc::new(move |n| {
            s2.fetch_max(n, Ordering::Relaxed);
        })),
        ..Default::default()
    });
    let (views, stats) = loader
        .load_host(std::slice::from_ref(&path), &reqs)
        .unwrap();
    for (v, r) in views.iter().zip(&reqs) {
        assert_eq!(
            v.bytes(),
            &data[r.offset as usize..r.offset as usize + r.len]
        );
    }
    if flowgate_io::probe::cached_fraction(&path).unwrap() > 0.99 {
        assert!(
            stats.mapped_bytes > 0,
            "a cached file should be mapped: {stats:?}"
        );
    }
    // Progress counts the mapped bytes too: at least every requested byte, at most the file.
    let total: u64 = reqs.iter().map(|r| r.len as u64).sum();
    let n = seen.load(Ordering::Relaxed);
    assert!(
        n >= total && n <= data.len() as u64,
        "progress {n} of {total}"
    );
}
