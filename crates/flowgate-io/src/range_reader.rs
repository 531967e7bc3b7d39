//! [`RangeReader`]: many small reads, again and again, into memory the caller owns — the I/O
//! under expert paging.
//!
//! The bulk [`Loader`](crate::Loader) is built for reading a whole model once: it plans merged
//! extents and allocates the destinations. Paging is the opposite: a few megabyte-sized ranges
//! per layer, thousands of times, into cache slots that already exist. So this reader keeps its
//! files open (buffered and `O_DIRECT` descriptors, alignment probed once) and reads each range
//! straight into its destination:
//!
//! - **Direct** when the range is not in the page cache and the caller left room for the aligned
//!   superset: [`RangeReader::window`] says how many bytes before and after the range a direct
//!   read covers; the caller lays out its slot so that the superset lands inside it, and the
//!   wanted bytes at the right place. No bounce buffer, no copy.
//! - **Buffered** (`pread`) when the range is already cached (a `cachestat` probe per range:
//!   copying from the page cache beats re-reading the disk), when `O_DIRECT` is refused, or when
//!   the destination has no room for the superset.
//!
//! Reads of one call run on up to `threads` threads (several requests in flight is what a
//! virtio disk or NVMe needs to reach its bandwidth). Short reads are continued and `EINTR` /
//! `EAGAIN` retried; anything else is a clean error naming the file and range.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::probe::{self, DioAlign};
use crate::read::IoError;

struct Open {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    align: DioAlign,
    size: u64,
}

/// Files kept open for repeated range reads. See the module docs.
pub struct RangeReader {
    files: Vec<Open>,
    threads: usize,
}

/// Where a direct read of `[offset, offset+len)` puts bytes: `lead` bytes before the range start
/// at a `mem`-aligned address, `total` bytes in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub lead: usize,
    pub total: usize,
    /// Alignment the window's start address needs.
    pub mem: usize,
}

/// One range to read: `len` bytes at `offset` of file `file`, into `buf[at..at + len]`. If
/// `buf` holds the whole [`Window`] around that place (`buf[at - lead .. at - lead + total]`,
/// its start aligned to `mem`), the read may overwrite all of it: the caller reserves it.
pub struct RangeRead<'a> {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
    pub buf: &'a mut [u8],
    pub at: usize,
}

/// How the bytes of one call came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeStats {
    pub direct_bytes: u64,
    pub cached_bytes: u64,
}

impl RangeReader {
    /// Opens `paths`; `threads` readers per call (at least 1).
    pub fn open(paths: &[PathBuf], threads: usize) -> Result<RangeReader, IoError> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let open_err = |source| IoError::Open {
                path: p.clone(),
                source,
            };
            let buffered = File::open(p).map_err(open_err)?;
            let size = buffered.metadata().map_err(open_err)?.len();
            let direct = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
                .ok();
            let mut align = probe::dio_align(&buffered);
            // Page-sized blocks at least, as the loader does (see loader.rs).
            align.offset = align.offset.max(4096);
            files.push(Open {
                path: p.clone(),
                buffered,
                direct,
                align,
                size,
            });
        }
        Ok(RangeReader {
            files,
            threads: threads.max(1),
        })
    }

    /// The direct-read window of a range, or `None` when direct reads are impossible for that
    /// file (then plain placement is fine).
    pub fn window(&self, file: usize, offset: u64, len: usize) -> Option<Window> {
        let f = self.files.get(file)?;
        f.direct.as_ref()?;
        let a = f.align.offset as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        Some(Window {
            lead: (offset - start) as usize,
            total: (end - start) as usize,
            mem: f.align.mem.max(f.align.offset),
        })
    }

    /// Reads every range into its buffer. See [`RangeRead`] for what may be overwritten.
    pub fn read(&self, reads: &mut [RangeRead<'_>]) -> Result<RangeStats, IoError> {
        for r in reads.iter() {
            let f = self.files.get(r.file).ok_or(IoError::BadFile(r.file))?;
            let end = r.offset.checked_add(r.len as u64);
            if end.is_none_or(|e| e > f.size)
                || r.at.checked_add(r.len).is_none_or(|e| e > r.buf.len())
            {
                return Err(IoError::ShortFile {
                    path: f.path.clone(),
                    offset: r.offset,
                    len: r.len,
                });
            }
        }
        let n = reads.len();
        if n == 0 {
            return Ok(RangeStats::default());
        }
        let threads = self.threads.min(n);
        let per = n.div_ceil(threads);
        let results: Vec<Result<RangeStats, IoError>> = std::thread::scope(|s| {
            let hs: Vec<_> = reads
                .chunks_mut(per)
                .map(|chunk| {
                    s.spawn(move || {
                        let mut st = RangeStats::default();
                        for r in chunk {
                            self.read_one(r, &mut st)?;
                        }
                        Ok(st)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(IoError::Engine("a reader thread panicked".into())))
                })
                .collect()
        });
        let mut total = RangeStats::default();
        for r in results {
            let r = r?;
            total.direct_bytes += r.direct_bytes;
            total.cached_bytes += r.cached_bytes;
        }
        Ok(total)
    }

    fn read_one(&self, r: &mut RangeRead<'_>, st: &mut RangeStats) -> Result<(), IoError> {
        let f = &self.files[r.file];
        let cached = probe::range_cached(&f.buffered, r.offset, r.len as u64).unwrap_or(false);
        if !cached {
            if let (Some(d), Some(w)) = (&f.direct, self.window(r.file, r.offset, r.len)) {
                let fits = r.at >= w.lead && r.at - w.lead + w.total <= r.buf.len();
                let start = r.at.wrapping_sub(w.lead);
                let aligned = fits && (r.buf.as_ptr() as usize + start).is_multiple_of(w.mem);
                if aligned {
                    let dst = &mut r.buf[start..start + w.total];
                    let got = read_full(d, dst, r.offset - w.lead as u64)
                        .map_err(|source| read_err(f, r, source))?;
                    // The superset may pass the end of the file; the wanted bytes may not.
                    if got < w.lead + r.len {
                        return Err(IoError::ShortFile {
                            path: f.path.clone(),
                            offset: r.offset,
                            len: r.len,
                        });
                    }
                    st.direct_bytes += r.len as u64;
                    return Ok(());
                }
            }
        }
        let dst = &mut r.buf[r.at..r.at + r.len];
        let got = read_full(&f.buffered, dst, r.offset).map_err(|source| read_err(f, r, source))?;
        if got < r.len {
            return Err(IoError::ShortFile {
                path: f.path.clone(),
                offset: r.offset,
                len: r.len,
            });
        }
        st.cached_bytes += r.len as u64;
        Ok(())
    }
}

fn read_err(f: &Open, r: &RangeRead<'_>, source: std::io::Error) -> IoError {
    IoError::Read {
        path: f.path.clone(),
        offset: r.offset,
        len: r.len,
        source,
    }
}

/// `pread` until `dst` is full or the file ends; returns the bytes read.
fn read_full(f: &File, dst: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < dst.len() {
        match f.read_at(&mut dst[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    #[test]
    fn ranges_land_byte_exact_direct_and_cached() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        // Not a multiple of 4096, so the last range's superset passes the end of the file.
        let data: Vec<u8> = (0..(3 << 20) + 1234).map(|_| rng.random()).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let path = f.path().to_path_buf();
        let rr = RangeReader::open(std::slice::from_ref(&path), 3).unwrap();
        for evict in [true, false] {
            if evict {
                let _ = crate::probe::evict(&path);
            }
            let ranges: Vec<(u64, usize)> = vec![
                (0, 1),
                (32, 4096),
                (4095, 2),
                (100_000, 1 << 20),
                (data.len() as u64 - 777, 777),
                (5, 0),
            ];
            // One slot per range, laid out as the expert cache does: window start aligned.
            let mut bufs = Vec::new();
            for &(off, len) in &ranges {
                let w = rr.window(0, off, len).unwrap_or(Window {
                    lead: 0,
                    total: len,
                    mem: 1,
                });
                bufs.push((AlignedBuf::zeroed(w.total.max(1) + 8192).unwrap(), w.lead));
            }
            let mut reads: Vec<RangeRead> = bufs
                .iter_mut()
                .zip(&ranges)
                .map(|((b, lead), &(off, len))| RangeRead {
                    file: 0,
                    offset: off,
                    len,
                    buf: b.as_mut_slice(),
                    at: *lead,
                })
                .collect();
            let st = rr.read(&mut reads).unwrap();
            drop(reads);
            let evicted = evict && crate::probe::cached_fraction(&path).unwrap() < 0.01;
            if evicted && rr.files[0].direct.is_some() {
                assert!(
                    st.direct_bytes > 0,
                    "uncached ranges should be read directly"
                );
            }
            for ((b, lead), &(off, len)) in bufs.iter().zip(&ranges) {
                assert_eq!(
                    &b[*lead..*lead + len],
                    &data[off as usize..off as usize + len],
                    "range {off}+{len}, evicted {evict}"
                );
            }
            let total: usize = ranges.iter().map(|r| r.1).sum();
            assert_eq!((st.direct_bytes + st.cached_bytes) as usize, total);
        }
    }

    #[test]
    fn past_the_end_and_bad_file_are_errors() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        f.flush().unwrap();
        let rr = RangeReader::open(&[f.path().to_path_buf()], 1).unwrap();
        let mut b = vec![0u8; 8192];
        for (file, off, len) in [(0, 4000, 1001), (0, u64::MAX, 2), (1, 0, 1)] {
            let mut r = [RangeRead {
                file,
                offset: off,
                len,
                buf: &mut b,
                at: 0,
            }];
            assert!(rr.read(&mut r).is_err(), "{file} {off} {len}");
        }
        // A destination too small for the range is refused too.
        let mut small = vec![0u8; 10];
        let mut r = [RangeRead {
            file: 0,
            offset: 0,
            len: 11,
            buf: &mut small,
            at: 0,
        }];
        assert!(rr.read(&mut r).is_err());
    }
}
