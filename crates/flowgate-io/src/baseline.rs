//! Reference readers that `flowgate bench load` measures the loader against, in the same run.
//!
//! - [`sequential_direct`]: the disk's ceiling: the whole file read front to back with
//!   `O_DIRECT`, `depth` reads of `chunk` bytes in flight (io_uring; a single `pread` stream
//!   where io_uring is missing), into reused buffers, nothing copied anywhere.
//! - [`mmap_copy`]: what llama.cpp does by default: map the file, `memcpy` each tensor from the
//!   mapping into its buffer, one thread, page faults doing the reading.
//! - [`buffered_read`]: plain `read()` of each tensor in file order, one thread (llama.cpp with
//!   `--no-mmap`).
//!
//! Destinations are [`AlignedBuf`]s allocated inside the measured call, as the loader's are, so
//! every variant pays the same page-fault cost for fresh memory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::{AlignedBuf, ReadRequest};

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Reads all of `path` with `O_DIRECT`, `depth` reads of `chunk` bytes in flight; returns the
/// bytes read.
pub fn sequential_direct(path: &Path, chunk: usize, depth: usize) -> std::io::Result<u64> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let size = f.metadata()?.len();
    let chunk = chunk.max(4096) / 4096 * 4096;
    let depth = depth.clamp(1, 256);
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::zeroed(chunk).ok_or_else(|| invalid("cannot allocate".into())))
        .collect::<Result<_, _>>()?;
    let ring = match IoUring::new((depth as u32).next_power_of_two().max(8)) {
        Ok(r) => r,
        Err(_) => {
            // One synchronous stream.
            let mut off = 0u64;
            let b = bufs.get_mut(0).ok_or_else(|| invalid("no buffer".into()))?;
            while off < size {
                let n = f.read_at(b, off)?;
                if n == 0 {
                    break;
                }
                off += n as u64;
            }
            return Ok(off);
        }
    };
    let mut ring = ring;
    let mut next = 0u64;
    let mut done = 0u64;
    let mut inflight = 0usize;
    let mut free: Vec<usize> = (0..depth).collect();
    let fd = types::Fd(f.as_raw_fd());
    loop {
        while next < size {
            let Some(k) = free.pop() else { break };
            let Some(b) = bufs.get_mut(k) else { break };
            let e = opcode::Read::new(fd, b.as_mut_ptr(), chunk as u32)
                .offset(next)
                .build()
                .user_data(k as u64);
            // SAFETY: the buffer is not touched or freed until its completion is reaped below.
            if unsafe { ring.submission().push(&e) }.is_err() {
                free.push(k);
                break;
            }
            next += chunk as u64;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                // Buffers may still be written: leak them rather than free.
                std::mem::forget(bufs);
                return Err(e);
            }
        }
        let cq: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (k, r) in cq {
            inflight -= 1;
            free.push(k as usize);
            if r < 0 {
                // Drain before returning so no buffer is freed under a read.
                while inflight > 0 {
                    ring.submit_and_wait(1)?;
                    inflight -= ring.completion().count();
                }
                return Err(std::io::Error::from_raw_os_error(-r));
            }
            done += r as u64;
        }
    }
    Ok(done)
}

fn check(files: &[PathBuf], requests: &[ReadRequest], sizes: &[u64]) -> std::io::Result<()> {
    for r in requests {
        let size = sizes
            .get(r.file)
            .ok_or_else(|| invalid(format!("no file #{}", r.file)))?;
        if r.offset.checked_add(r.len as u64).is_none_or(|e| e > *size) {
            return Err(invalid(format!(
                "{}: range {}+{} past the end",
                files
                    .get(r.file)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                r.offset,
                r.len
            )));
        }
    }
    Ok(())
}

/// Maps each file and copies every request out of the mapping, one thread.
pub fn mmap_copy(files: &[PathBuf], requests: &[ReadRequest]) -> std::io::Result<Vec<AlignedBuf>> {
    struct Map(*mut libc::c_void, usize);
    impl Drop for Map {
        fn drop(&mut self) {
            if self.1 > 0 {
                // SAFETY: unmapping a mapping created below with this length.
                unsafe { libc::munmap(self.0, self.1) };
            }
        }
    }
    let mut maps = Vec::new();
    let mut sizes = Vec::new();
    for p in files {
        let f = File::open(p)?;
        let len = usize::try_from(f.metadata()?.len()).map_err(|e| invalid(e.to_string()))?;
        sizes.push(len as u64);
        if len == 0 {
            maps.push(Map(std::ptr::null_mut(), 0));
            continue;
        }
        // SAFETY: read-only private mapping of an open file; checked below.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        maps.push(Map(m, len));
    }
    check(files, requests, &sizes)?;
    let mut out = Vec::with_capacity(requests.len());
    for r in requests {
        let mut b = AlignedBuf::zeroed(r.len).ok_or_else(|| invalid("cannot allocate".into()))?;
        let m = maps.get(r.file).ok_or_else(|| invalid("no map".into()))?;
        if r.len > 0 {
            // SAFETY: checked above that [offset, offset+len) lies inside the mapping; the file
            // is not truncated while we read it (a benchmark on our own file).
            let src = unsafe {
                std::slice::from_raw_parts((m.0 as *const u8).add(r.offset as usize), r.len)
            };
            b.copy_from_slice(src);
        }
        out.push(b);
    }
    Ok(out)
}

/// Plain `read()` of every request in file order, one thread.
pub fn buffered_read(
    files: &[PathBuf],
    requests: &[ReadRequest],
) -> std::io::Result<Vec<AlignedBuf>> {
    let mut handles = Vec::new();
    let mut sizes = Vec::new();
    for p in files {
        let f = File::open(p)?;
        sizes.push(f.metadata()?.len());
        handles.push(f);
    }
    check(files, requests, &sizes)?;
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests.get(i).map(|r| (r.file, r.offset)));
    let mut out: Vec<Option<AlignedBuf>> = (0..requests.len()).map(|_| None).collect();
    for i in order {
        let Some(r) = requests.get(i) else { continue };
        let mut b = AlignedBuf::zeroed(r.len).ok_or_else(|| invalid("cannot allocate".into()))?;
        let f = handles
            .get_mut(r.file)
            .ok_or_else(|| invalid("no file".into()))?;
        f.seek(SeekFrom::Start(r.offset))?;
        f.read_exact(&mut b)?;
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(b);
        }
    }
    out.into_iter()
        .map(|b| b.ok_or_else(|| invalid("missing buffer".into())))
        .collect()
}

/// Allocates `bytes` of anonymous memory (huge pages advised), writes one byte per page and
/// frees it: afterwards the kernel's free pages are backed by real memory. Virtual machines
/// whose balloon reports free pages back to the host (virtio-balloon free page reporting) make
/// the first touch of such pages many times slower than a normal page fault; a benchmark that
/// allocates its destinations would otherwise measure the host, and penalise whichever variant
/// runs first. Returns the seconds it took.
pub fn prime_memory(bytes: usize) -> f64 {
    let t = std::time::Instant::now();
    let piece = 256 << 20;
    let mut held = Vec::new();
    let mut left = bytes;
    while left > 0 {
        let n = piece.min(left);
        let Some(mut b) = AlignedBuf::zeroed(n) else {
            break;
        };
        for i in (0..n).step_by(4096) {
            if let Some(x) = b.get_mut(i) {
                *x = 1;
            }
        }
        held.push(b);
        left -= n;
    }
    drop(held);
    t.elapsed().as_secs_f64()
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
