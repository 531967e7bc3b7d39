//! GPU tests. Each returns early with "skipped: no CUDA" where no driver (or no device) is
//! present, so they pass on CI; on a GPU machine run them with `--nocapture` to see the figures.

use flowgate_cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use flowgate_cuda::{
    Blas, CacheOutcome, Cuda, CudaError, Device, DeviceAllocator, Event, HostRegistration,
    KernelCache, PinnedBuffer, Stream, VmmArena, SMOKE_CU,
};
use rand::{Rng, RngCore, SeedableRng};

fn device() -> Option<Device> {
    if !Cuda::available() {
        println!("skipped: no CUDA");
        return None;
    }
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no CUDA ({e})");
            None
        }
    }
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

const MIB: usize = 1 << 20;

#[test]
fn gpu_device_info() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let (cc, (free, total)) = (dev.compute_capability()?, dev.memory_info()?);
    println!(
        "device 0: {} cc {}.{} total {} MiB free {} MiB, {} device(s), nvrtc present: {}",
        dev.name()?,
        cc.0,
        cc.1,
        total / MIB,
        free / MIB,
        Cuda::device_count()?,
        Cuda::nvrtc_available()
    );
    assert!(cc.0 >= 5 && total > 0 && free <= total);
    Ok(())
}

#[test]
fn gpu_allocator_budget() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let stream = Stream::new(&dev)?;
    let alloc = DeviceAllocator::new(&dev, 64 * MIB as u64);
    let mut a = alloc.alloc(48 * MIB)?;
    assert_eq!(alloc.budget().in_use(), 48 * MIB as u64);
    let over = alloc.alloc(17 * MIB);
    assert!(
        matches!(over, Err(CudaError::BudgetExceeded { .. })),
        "{over:?}"
    );
    assert_eq!(
        alloc.budget().in_use(),
        48 * MIB as u64,
        "failed alloc must not charge"
    );
    let b = alloc.alloc(16 * MIB)?;
    assert_eq!(alloc.budget().in_use(), 64 * MIB as u64);
    let data = random_bytes(1, a.len());
    a.write(&stream, 0, &data)?;
    let mut back = vec![0u8; a.len()];
    a.read(&stream, 0, &mut back)?;
    assert!(back == data, "device round trip differs");
    assert!(a.write(&stream, a.len() - 1, &[1, 2]).is_err());
    drop(a);
    drop(b);
    assert_eq!(alloc.budget().in_use(), 0);
    assert_eq!(alloc.budget().peak(), 64 * MIB as u64);
    println!(
        "allocator: budget 64 MiB, 48+16 MiB ok, 48+17 MiB refused, peak {} MiB",
        alloc.budget().peak() / MIB as u64
    );
    Ok(())
}

#[test]
fn gpu_vmm_arena() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let info = VmmArena::info(&dev)?;
    println!(
        "vmm granularity: minimum {} KiB, recommended {} KiB",
        info.minimum >> 10,
        info.recommended >> 10
    );
    let stream = Stream::new(&dev)?;
    let slot_req = 5 * MIB + 123;
    let slot = slot_req.div_ceil(info.minimum) * info.minimum;
    let alloc = DeviceAllocator::new(&dev, 2 * slot as u64);
    let mut arena = VmmArena::new(&alloc, slot_req, 3)?;
    assert_eq!(arena.slot_bytes(), slot);
    assert_eq!(alloc.budget().in_use(), 0, "reservation is free");
    let p0 = arena.map(0)?;
    let p1 = arena.map(1)?;
    assert_eq!(p0, arena.base());
    assert_eq!(p1, arena.base() + slot as u64);
    assert_eq!(arena.map(1)?, p1, "re-map is idempotent");
    assert_eq!(alloc.budget().in_use(), 2 * slot as u64);
    assert!(matches!(
        arena.map(2),
        Err(CudaError::BudgetExceeded { .. })
    ));
    let d0 = random_bytes(2, slot);
    let d1 = random_bytes(3, slot);
    arena.write(&stream, 0, 0, &d0)?;
    arena.write(&stream, 1, 0, &d1)?;
    let mut back = vec![0u8; slot];
    arena.read(&stream, 0, 0, &mut back)?;
    assert!(back == d0);
    arena.unmap(0)?;
    assert!(!arena.is_mapped(0));
    assert!(arena.read(&stream, 0, 0, &mut back).is_err());
    let p2 = arena.map(2)?;
    assert_eq!(p2, arena.base() + 2 * slot as u64);
    arena.read(&stream, 1, 0, &mut back)?;
    assert!(
        back == d1,
        "slot 1 unaffected by paging slot 0 out and 2 in"
    );
    arena.unmap(1)?;
    assert_eq!(arena.map(0)?, p0, "a slot's address is fixed");
    assert_eq!(alloc.budget().in_use(), 2 * slot as u64);
    assert_eq!(alloc.budget().peak(), 2 * slot as u64);
    drop(arena);
    assert_eq!(alloc.budget().in_use(), 0);
    println!(
        "vmm: 3 slots of {} MiB, budget 2 slots: map/unmap/remap ok, 3rd map refused",
        slot / MIB
    );
    Ok(())
}

#[test]
fn gpu_nvrtc_axpy() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let dir = tempfile::tempdir().map_err(|e| CudaError::Io {
        path: "tmp".into(),
        source: e,
    })?;
    let t0 = std::time::Instant::now();
    let m1 = KernelCache::with_dir(&dev, dir.path()).load("smoke", SMOKE_CU, &[])?;
    let t1 = std::time::Instant::now();
    let m2 = KernelCache::with_dir(&dev, dir.path()).load("smoke", SMOKE_CU, &[])?;
    let t2 = std::time::Instant::now();
    assert_eq!(m1.outcome, CacheOutcome::Compiled);
    assert_eq!(m2.outcome, CacheOutcome::Hit);
    assert_eq!(m1.path, m2.path);
    println!(
        "nvrtc: arch {}, compile+load {:.1} ms, cache hit load {:.1} ms, {}",
        KernelCache::with_dir(&dev, dir.path()).arch()?,
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3,
        m1.path.display()
    );
    // A corrupted cache entry (truncated mid-file) is recompiled, not an error.
    let full = std::fs::read(&m2.path).map_err(|e| CudaError::Io {
        path: m2.path.clone(),
        source: e,
    })?;
    std::fs::write(&m2.path, &full[..full.len() / 2]).map_err(|e| CudaError::Io {
        path: m2.path.clone(),
        source: e,
    })?;
    let m3 = KernelCache::with_dir(&dev, dir.path()).load("smoke", SMOKE_CU, &[])?;
    assert_eq!(
        m3.outcome,
        CacheOutcome::Compiled,
        "truncated entry must be recompiled"
    );
    let m4 = KernelCache::with_dir(&dev, dir.path()).load("smoke", SMOKE_CU, &[])?;
    assert_eq!(m4.outcome, CacheOutcome::Hit);
    println!("nvrtc: truncated cache entry recompiled, then hit again");
    let axpy = m2.function("axpy")?;
    assert!(m2.function("no_such_kernel").is_err());

    let n: u32 = 1_000_003;
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let a: f32 = rng.random_range(-2.0..2.0);
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let stream = Stream::new(&dev)?;
    let alloc = DeviceAllocator::new(&dev, 64 * MIB as u64);
    let mut dx = alloc.alloc(n as usize * 4)?;
    let mut dy = alloc.alloc(n as usize * 4)?;
    dx.write(&stream, 0, &bytes(&x))?;
    dy.write(&stream, 0, &bytes(&y))?;
    let (px, py) = (dx.ptr(), dy.ptr());
    let (start, end) = (Event::new(&dev)?, Event::new(&dev)?);
    start.record(&stream)?;
    // SAFETY: axpy(n, a, x, y) reads n floats at px and writes n at py, both allocations of n*4 bytes.
    unsafe {
        stream
            .raw()
            .launch_builder(axpy.function())
            .arg(&n)
            .arg(&a)
            .arg(&px)
            .arg(&py)
            .launch(LaunchConfig::for_num_elems(n))
    }
    .map_err(|e| CudaError::Driver {
        op: "cuLaunchKernel",
        msg: e.to_string(),
    })?;
    end.record(&stream)?;
    end.synchronize()?;
    let mut out = vec![0u8; n as usize * 4];
    dy.read(&stream, 0, &mut out)?;
    let mut max_err = 0f64;
    for i in 0..n as usize {
        let got = f32::from_le_bytes([out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]]);
        let want = f64::from(a) * f64::from(x[i]) + f64::from(y[i]);
        max_err = max_err.max((f64::from(got) - want).abs());
    }
    println!(
        "axpy n={n}: max abs err vs f64 {max_err:.2e}, kernel {:.3} ms",
        start.elapsed_ms(&end)?
    );
    assert!(max_err < 1e-6, "axpy error {max_err}");
    Ok(())
}

#[test]
fn gpu_pinned_and_registered_copies() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let stream = Stream::new(&dev)?;
    let n = 256 * MIB;
    let alloc = DeviceAllocator::new(&dev, (2 * n) as u64);
    let mut dbuf = alloc.alloc(n)?;
    let mut pinned = PinnedBuffer::new(&dev, n)?;
    let data = random_bytes(5, n);
    pinned.as_mut_slice().copy_from_slice(&data);
    // Warm up, then time repeated uploads with events.
    pinned.upload(&stream, &mut dbuf)?;
    let (start, end) = (Event::new(&dev)?, Event::new(&dev)?);
    let mut times = Vec::new();
    for _ in 0..10 {
        start.record(&stream)?;
        // SAFETY: the stream is synchronised (end.synchronize) before pinned or dbuf are touched.
        unsafe { pinned.upload_async(&stream, 0, &mut dbuf, 0, n) }?;
        end.record(&stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)?);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let h2d = n as f64 / (f64::from(times[times.len() / 2]) * 1e-3) / 1e9;
    pinned.as_mut_slice().fill(0xAA);
    let t = std::time::Instant::now();
    pinned.download(&stream, &dbuf)?;
    let d2h = n as f64 / t.elapsed().as_secs_f64() / 1e9;
    assert!(pinned.as_slice() == &data[..], "pinned round trip differs");

    let mut pageable = random_bytes(6, 64 * MIB);
    let expect = pageable.clone();
    let mut dbuf2 = alloc.alloc(64 * MIB)?;
    {
        let reg = HostRegistration::new(&dev, &mut pageable)?;
        let t = std::time::Instant::now();
        reg.upload(&stream, &mut dbuf2)?;
        println!(
            "registered 64 MiB upload {:.1} GB/s",
            (64 * MIB) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
    let mut back = vec![0u8; 64 * MIB];
    dbuf2.read(&stream, 0, &mut back)?;
    assert!(back == expect, "registered upload differs");
    println!("pinned 256 MiB: H2D median {h2d:.1} GB/s (events, 10 reps), D2H {d2h:.1} GB/s (host clock, 1 rep)");
    Ok(())
}

#[test]
fn gpu_streams_and_events_order_work() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    let (s1, s2) = (Stream::new(&dev)?, Stream::new(&dev)?);
    let alloc = DeviceAllocator::new(&dev, 64 * MIB as u64);
    let mut buf = alloc.alloc(32 * MIB)?;
    let data = random_bytes(7, 32 * MIB);
    buf.write(&s1, 0, &data)?;
    let ev = Event::new(&dev)?;
    ev.record(&s1)?;
    s2.wait(&ev)?;
    ev.synchronize()?;
    assert!(ev.is_complete()?);
    let mut back = vec![0u8; 32 * MIB];
    buf.read(&s2, 0, &mut back)?;
    assert!(back == data);
    Ok(())
}

#[test]
fn gpu_cublas_sgemm_row_major() -> Result<(), CudaError> {
    let Some(dev) = device() else { return Ok(()) };
    if !Cuda::cublas_available() {
        println!("skipped: no cuBLAS");
        return Ok(());
    }
    let (m, n, k) = (193usize, 257usize, 131usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let stream = Stream::new(&dev)?;
    let alloc = DeviceAllocator::new(&dev, 16 * MIB as u64);
    let (mut da, mut db, mut dc) = (
        alloc.alloc(m * k * 4)?,
        alloc.alloc(k * n * 4)?,
        alloc.alloc(m * n * 4)?,
    );
    da.write(&stream, 0, &bytes(&a))?;
    db.write(&stream, 0, &bytes(&b))?;
    // Poison C so that unwritten elements show.
    dc.write(&stream, 0, &vec![0xFFu8; m * n * 4])?;
    let blas = Blas::new(&stream)?;
    blas.sgemm_row_major(m, n, k, &da, &db, &mut dc)?;
    assert!(
        blas.sgemm_row_major(m, n, k + 1, &da, &db, &mut dc)
            .is_err(),
        "A too small must be refused"
    );
    stream.synchronize()?;
    let mut out = vec![0u8; m * n * 4];
    dc.read(&stream, 0, &mut out)?;
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                .sum();
            let o = 4 * (i * n + j);
            let got = f64::from(f32::from_le_bytes([
                out[o],
                out[o + 1],
                out[o + 2],
                out[o + 3],
            ]));
            assert!(got.is_finite(), "C[{i},{j}] not written");
            num += (got - want) * (got - want);
            den += want * want;
        }
    }
    let rel = (num / den).sqrt();
    println!("cublas sgemm {m}x{n}x{k} row-major: rel err vs f64 {rel:.2e}");
    assert!(rel < 1e-5, "rel err {rel}");
    Ok(())
}
