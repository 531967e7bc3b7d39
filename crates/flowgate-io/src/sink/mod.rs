//! Sinks: where the bytes of a load end up.
//!
//! The read engines (io_uring, the `pread` pool, the buffered `pread` threads) do not write
//! into destinations themselves; they hand bytes to a `Sink`:
//!
//! - a read may *land* straight in a destination when the sink has host memory there
//!   (`Sink::landing`): the host sink (`HostSink`) does, so an aligned direct read or a
//!   buffered `pread` writes the destination with no copy at all;
//! - every other read goes into a *staging buffer* (the engines' bounce buffers, or the sink's
//!   own pool, `Sink::staging`) and is then `Sink::deliver`ed: the host sink copies it, the
//!   CUDA sink (`cuda::CudaSink`) queues an asynchronous host→device copy out of its
//!   page-locked staging pool and records an event;
//! - before an engine refills a staging buffer it calls `Sink::reclaim`, which for the CUDA
//!   sink waits for that buffer's last copy (a no-op for the host sink, whose copies are
//!   synchronous).
//!
//! Loads that go through a sink read *extents*, not tensors (`extents`): the wanted ranges of
//! a file are sorted and merged (through gaps of up to `merge_gap` bytes) into runs, each widened
//! to the file's direct-I/O alignment `A`, and each run gets one destination (an *arena*) laid
//! out like the file: byte `o` of the file lives at `arena + (o - base)` with `base` a multiple
//! of `A`. Since the arena is page aligned, every aligned read of the run lands at an aligned
//! address: nothing bounces (except the last partial block of a file), nothing is copied, and a
//! tensor is a view `(arena, o - base, len)`. GGUF tensors (32-byte aligned) keep their file
//! alignment inside the arena.

pub mod cuda;
mod host;

pub use cuda::DeviceView;
pub(crate) use host::HostSink;
pub use host::HostView;

use crate::engine::{Dest, OpenFile};
use crate::{IoError, ReadRequest};

/// Staging buffers owned by a sink: `count` buffers of `size` bytes at `base + i * size`. The
/// first `direct` are for the direct engines (io_uring slots, or one per `pread` pool thread);
/// buffered reader thread `t` uses `direct + 2t` and `direct + 2t + 1`.
pub(crate) struct Staging {
    pub base: *mut u8,
    pub size: usize,
    pub count: usize,
    pub direct: usize,
}

// SAFETY: the buffers are plain host memory owned by the sink for the whole load; each is used
// by one party at a time (an engine hands a buffer over through a mutex-protected free list,
// and reclaims it from the sink before refilling it).
unsafe impl Send for Staging {}
// SAFETY: as above.
unsafe impl Sync for Staging {}

impl Staging {
    /// Address of buffer `i`.
    pub fn ptr(&self, i: usize) -> Option<*mut u8> {
        (i < self.count).then(|| {
            // SAFETY: i < count, so the offset is inside the pool of count * size bytes.
            unsafe { self.base.add(i * self.size) }
        })
    }

    /// Staging buffers of buffered reader thread `t`.
    pub fn buffered(&self, t: usize) -> Option<[(usize, *mut u8); 2]> {
        let a = self.direct + 2 * t;
        Some([(a, self.ptr(a)?), (a + 1, self.ptr(a + 1)?)])
    }
}

/// Where loaded bytes go. See the module docs.
pub(crate) trait Sink: Sync {
    /// "host" or "cuda".
    fn name(&self) -> &'static str;
    /// Host memory of destination `dest` that reads may write directly, if the sink has any.
    fn landing(&self, dest: usize) -> Option<Dest>;
    /// Whether reads may land in destinations at all (else everything goes through staging).
    fn lands(&self) -> bool;
    /// Set up the sink's staging pool before the engines start: `direct` buffers for the direct
    /// engine and two for each of `buffered_threads`, `size` bytes each. Sinks that land reads
    /// directly have none (the engines allocate their own bounce buffers).
    fn prepare(
        &self,
        _direct: usize,
        _buffered_threads: usize,
        _size: usize,
    ) -> Result<(), IoError> {
        Ok(())
    }
    /// The staging pool set up by [`Sink::prepare`], if any.
    fn staging(&self) -> Option<&Staging> {
        None
    }
    /// Deliver `src` (inside staging buffer `staging`, or an engine's own bounce buffer when
    /// `None`) to destination `dest` at `dst_off`.
    fn deliver(
        &self,
        staging: Option<usize>,
        dest: usize,
        dst_off: usize,
        src: &[u8],
    ) -> Result<(), IoError>;
    /// Wait until staging buffer `staging` may be overwritten.
    fn reclaim(&self, _staging: usize) -> Result<(), IoError> {
        Ok(())
    }
    /// Wait until every delivery has completed.
    fn finish(&self) -> Result<(), IoError> {
        Ok(())
    }
}

/// A run of one file read into one arena: the file bytes `[base, base + read)` land at
/// `[0, read)` of an arena of `alloc ≥ read` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub file: usize,
    pub base: u64,
    /// Bytes to read (up to the aligned end of the run, or the end of the file).
    pub read: usize,
    /// Bytes of the arena (the run's end rounded up to the alignment).
    pub alloc: usize,
}

/// Where request `i` lives: extent `extent` at byte `offset`; `None` for empty requests.
pub(crate) type Placement = Option<(usize, usize)>;

/// Groups `requests` (checked to lie inside their files) into extents.
pub(crate) fn extents(
    open: &[OpenFile],
    requests: &[ReadRequest],
    merge_gap: u64,
) -> Result<(Vec<Extent>, Vec<Placement>), IoError> {
    let mut order: Vec<usize> = (0..requests.len())
        .filter(|&i| requests.get(i).is_some_and(|r| r.len > 0))
        .collect();
    order.sort_by_key(|&i| requests.get(i).map(|r| (r.file, r.offset)));
    // (file, start, end) of each run, in bytes of the file.
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    let mut member = vec![usize::MAX; requests.len()];
    for &i in &order {
        let Some(r) = requests.get(i) else { continue };
        let end = r.offset + r.len as u64;
        let join = match runs.last() {
            Some(&(f, _, e)) => f == r.file && r.offset <= e.saturating_add(merge_gap),
            None => false,
        };
        if join {
            if let Some(last) = runs.last_mut() {
                last.2 = last.2.max(end);
            }
        } else {
            runs.push((r.file, r.offset, end));
        }
        if let Some(m) = member.get_mut(i) {
            *m = runs.len() - 1;
        }
    }
    let mut ext = Vec::with_capacity(runs.len());
    for &(file, start, end) in &runs {
        let f = open.get(file).ok_or(IoError::BadFile(file))?;
        let a = f.align.offset.max(1) as u64;
        let base = start / a * a;
        let aligned_end = end.div_ceil(a) * a;
        let read_end = aligned_end.min(f.size);
        let conv = |x: u64| usize::try_from(x).map_err(|_| IoError::Alloc(usize::MAX));
        ext.push(Extent {
            file,
            base,
            read: conv(read_end - base)?,
            alloc: conv(aligned_end - base)?,
        });
    }
    let place = requests
        .iter()
        .zip(&member)
        .map(|(r, &m)| {
            let e = ext.get(m)?;
            Some((m, (r.offset - e.base) as usize))
        })
        .collect();
    Ok((ext, place))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::DioAlign;
    use rand::{Rng, SeedableRng};

    fn open_fake(size: u64, a: usize) -> OpenFile {
        let f = tempfile::tempfile().unwrap();
        OpenFile {
            path: "fake".into(),
            buffered: f,
            direct: None,
            size,
            align: DioAlign {
                offset: a,
                mem: a,
                reported: true,
            },
        }
    }

    #[test]
    fn extents_cover_every_request_aligned() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for case in 0..200 {
            let a = [512usize, 4096, 65536][case % 3];
            let size = rng.random_range(1..5_000_000u64);
            let open = vec![open_fake(size, a), open_fake(size / 2 + 1, a)];
            let gap = rng.random_range(0..100_000u64);
            let reqs: Vec<ReadRequest> = (0..rng.random_range(0..30))
                .map(|_| {
                    let file = rng.random_range(0..2usize);
                    let sz = open[file].size;
                    let offset = rng.random_range(0..sz);
                    let len = rng.random_range(0..=(sz - offset).min(300_000)) as usize;
                    ReadRequest { file, offset, len }
                })
                .collect();
            let (ext, place) = extents(&open, &reqs, gap).unwrap();
            for (r, p) in reqs.iter().zip(&place) {
                match p {
                    None => assert_eq!(r.len, 0),
                    Some((e, off)) => {
                        let e = ext[*e];
                        assert_eq!(e.file, r.file);
                        assert_eq!(e.base % a as u64, 0);
                        assert_eq!(e.base + *off as u64, r.offset);
                        assert!(off + r.len <= e.read && e.read <= e.alloc);
                        assert_eq!(e.alloc % a, 0);
                        assert!(e.base + e.read as u64 <= open[r.file].size);
                    }
                }
            }
            // Extents of one file never overlap.
            for (i, x) in ext.iter().enumerate() {
                for y in &ext[i + 1..] {
                    if x.file == y.file {
                        let (xe, ye) = (x.base + x.alloc as u64, y.base + y.alloc as u64);
                        assert!(xe <= y.base + a as u64 || ye <= x.base + a as u64);
                    }
                }
            }
        }
    }
}
