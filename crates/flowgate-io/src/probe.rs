//! What the kernel knows about a file: direct-I/O alignment, page-cache residency, and a way to
//! evict a file from the page cache.
//!
//! - Alignment comes from `statx(STATX_DIOALIGN)` (Linux 6.1+: `stx_dio_offset_align` for file
//!   offsets and lengths, `stx_dio_mem_align` for buffer addresses). Where the kernel or the
//!   file system does not report it, 4096 is assumed for both, which every block device accepts.
//! - Residency uses `cachestat` (Linux 6.5+: page counts for a byte range, no mapping needed) and
//!   falls back to `mincore` over a `PROT_READ` shared mapping of the file (one byte per page).
//!   Residency is reported per *cell* (a fixed power-of-two span, 1 MiB by default): the loader
//!   only needs to know which regions are worth reading through the cache.
//! - Eviction is `fdatasync` + `posix_fadvise(POSIX_FADV_DONTNEED)` on the file (no root needed,
//!   only for clean pages, hence the sync), and `/proc/sys/vm/drop_caches` as a fallback.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Offset and memory alignment a file accepts for `O_DIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Alignment of file offsets and lengths.
    pub offset: usize,
    /// Alignment of buffer addresses.
    pub mem: usize,
    /// Whether the numbers came from `statx` (false: the 4096 fallback).
    pub reported: bool,
}

impl DioAlign {
    pub const FALLBACK: DioAlign = DioAlign {
        offset: 4096,
        mem: 4096,
        reported: false,
    };
}

/// `statx(STATX_DIOALIGN)` on an open file; [`DioAlign::FALLBACK`] where unsupported.
pub fn dio_align(f: &File) -> DioAlign {
    // SAFETY: statx is plain data; zeroed is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, NUL-terminated empty path with AT_EMPTY_PATH, st is writable.
    let r = unsafe {
        libc::statx(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return DioAlign::FALLBACK;
    }
    let ok = |v: u32| v.is_power_of_two() && v <= 1 << 20;
    let (o, m) = (st.stx_dio_offset_align, st.stx_dio_mem_align);
    if !ok(o) || !ok(m) {
        // 0 means "direct I/O not supported on this file"; the open with O_DIRECT will tell.
        return DioAlign::FALLBACK;
    }
    DioAlign {
        offset: o as usize,
        mem: m as usize,
        reported: true,
    }
}

const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Pages of `[off, off+len)` in the page cache, via `cachestat`; `None` where the syscall is
/// missing.
fn cachestat(f: &File, off: u64, len: u64) -> Option<u64> {
    let range = CachestatRange { off, len };
    let mut cs = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `cs`, both live and correctly laid out.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    (r == 0).then_some(cs.nr_cache)
}

/// Whether every page of `[off, off+len)` is in the page cache (`cachestat`); `None` where the
/// syscall is missing.
pub fn range_cached(f: &File, off: u64, len: u64) -> Option<bool> {
    if len == 0 {
        return Some(true);
    }
    let first = off / PAGE;
    let pages = (off + len).div_ceil(PAGE) - first;
    cachestat(f, first * PAGE, pages * PAGE).map(|c| c >= pages)
}

/// Which method [`residency`] used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMethod {
    Cachestat,
    Mincore,
    /// Neither worked: everything is taken as not cached.
    None,
}

/// Page-cache residency of a file, per cell of `cell` bytes (a power of two ≥ 4096): the
/// fraction of each cell's pages that are cached.
#[derive(Clone, Debug)]
pub struct Residency {
    pub cell: u64,
    pub cached: Vec<f32>,
    pub method: ProbeMethod,
}

impl Residency {
    /// Fraction of the whole file in cache.
    pub fn fraction(&self) -> f64 {
        if self.cached.is_empty() {
            return 0.0;
        }
        self.cached.iter().map(|&c| c as f64).sum::<f64>() / self.cached.len() as f64
    }

    /// Fraction cached of the cell holding byte `off`.
    pub fn at(&self, off: u64) -> f32 {
        self.cached
            .get((off / self.cell) as usize)
            .copied()
            .unwrap_or(0.0)
    }
}

const PAGE: u64 = 4096;

/// Probes the residency of `f` (of `size` bytes) per `cell`.
pub fn residency(f: &File, size: u64, cell: u64) -> Residency {
    let cell = cell.max(PAGE).next_power_of_two();
    let n = size.div_ceil(cell) as usize;
    let pages_in = |i: usize| -> u64 {
        let start = i as u64 * cell;
        (size.min(start + cell) - start).div_ceil(PAGE)
    };
    if let Some(total) = cachestat(f, 0, size) {
        let all = size.div_ceil(PAGE);
        if total == 0 || total >= all {
            let v = if total == 0 { 0.0 } else { 1.0 };
            return Residency {
                cell,
                cached: vec![v; n],
                method: ProbeMethod::Cachestat,
            };
        }
        let mut cached = Vec::with_capacity(n);
        for i in 0..n {
            let c = cachestat(f, i as u64 * cell, cell).unwrap_or(0);
            cached.push((c as f64 / pages_in(i) as f64).min(1.0) as f32);
        }
        return Residency {
            cell,
            cached,
            method: ProbeMethod::Cachestat,
        };
    }
    if let Some(v) = mincore_pages(f, size) {
        let per = (cell / PAGE) as usize;
        let cached = (0..n)
            .map(|i| {
                let s = i * per;
                let e = (s + per).min(v.len());
                let hit = v
                    .get(s..e)
                    .map_or(0, |p| p.iter().filter(|&&b| b & 1 != 0).count());
                hit as f32 / pages_in(i) as f32
            })
            .collect();
        return Residency {
            cell,
            cached,
            method: ProbeMethod::Mincore,
        };
    }
    Residency {
        cell,
        cached: vec![0.0; n],
        method: ProbeMethod::None,
    }
}

/// One byte per page of the file, bit 0 set where the page is cached.
fn mincore_pages(f: &File, size: u64) -> Option<Vec<u8>> {
    if size == 0 {
        return Some(Vec::new());
    }
    let len = usize::try_from(size).ok()?;
    // SAFETY: read-only shared mapping of an open file; checked for failure, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let mut v = vec![0u8; len.div_ceil(PAGE as usize)];
    // SAFETY: p is a mapping of len bytes; v has one byte per page.
    let r = unsafe { libc::mincore(p, len, v.as_mut_ptr()) };
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p, len) };
    (r == 0).then_some(v)
}

/// Fraction of a file's pages in the page cache (cachestat, else mincore).
pub fn cached_fraction(path: &Path) -> std::io::Result<f64> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    if size == 0 {
        return Ok(0.0);
    }
    if let Some(c) = cachestat(&f, 0, size) {
        return Ok((c as f64 / size.div_ceil(PAGE) as f64).min(1.0));
    }
    Ok(residency(&f, size, 1 << 20).fraction())
}

/// How [`evict`] dropped a file from the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictMethod {
    /// `fdatasync` + `posix_fadvise(POSIX_FADV_DONTNEED)` on the file.
    Fadvise,
    /// Writing "1" to `/proc/sys/vm/drop_caches` (whole machine, needs root).
    DropCaches,
}

impl std::fmt::Display for EvictMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EvictMethod::Fadvise => "posix_fadvise(DONTNEED) per file",
            EvictMethod::DropCaches => "/proc/sys/vm/drop_caches",
        })
    }
}

/// Drops `path` from the page cache; checks the result with [`cached_fraction`] and falls back
/// to `drop_caches` when fadvise left more than 1% cached. Errors when neither works.
pub fn evict(path: &Path) -> std::io::Result<EvictMethod> {
    let f = File::open(path)?;
    // Dirty pages cannot be dropped: write them back first. Errors here only matter if the
    // eviction below then fails, which is checked.
    let _ = f.sync_data();
    // SAFETY: plain advice on an open fd.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 && cached_fraction(path)? <= 0.01 {
        return Ok(EvictMethod::Fadvise);
    }
    std::fs::write("/proc/sys/vm/drop_caches", b"1").map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot drop {} from the page cache: posix_fadvise(DONTNEED) {} and \
                 /proc/sys/vm/drop_caches: {e}",
                path.display(),
                if r == 0 {
                    "left pages cached".to_string()
                } else {
                    format!("failed ({})", std::io::Error::from_raw_os_error(r))
                }
            ),
        )
    })?;
    Ok(EvictMethod::DropCaches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn residency_follows_reads_and_eviction() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(8u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let path = f.path().to_path_buf();
        let m = evict(&path).unwrap();
        assert!(cached_fraction(&path).unwrap() <= 0.01, "{m:?}");
        let file = File::open(&path).unwrap();
        let mut buf = vec![0u8; 2 << 20];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, 4 << 20).unwrap();
        let r = residency(&file, data.len() as u64, 1 << 20);
        assert_eq!(r.cached.len(), 8);
        assert!(r.at(4 << 20) > 0.99 && r.at(5 << 20) > 0.99, "{r:?}");
        assert!(r.at(0) < 0.5, "{r:?}");
        // mincore agrees with cachestat.
        let v = mincore_pages(&file, data.len() as u64).unwrap();
        assert!(v[(4 << 20) / 4096..(6 << 20) / 4096]
            .iter()
            .all(|b| b & 1 == 1));
    }

    #[test]
    fn dio_align_is_sane() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = dio_align(f.as_file());
        assert!(a.offset.is_power_of_two() && a.mem.is_power_of_two());
    }
}
