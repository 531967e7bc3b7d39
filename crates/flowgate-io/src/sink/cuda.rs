//! The CUDA sink: tensors land in device memory, every byte through page-locked staging.
//!
//! - Destinations are device arenas (one `cuMemAlloc` per extent, charged to the caller's
//!   [`DeviceAllocator`] budget before it is made), laid out like the file (see
//!   [`crate::sink`]): one contiguous host→device copy per staging buffer, no per-tensor work.
//! - The staging pool is one page-aligned anonymous mapping ([`AlignedBuf`], huge pages
//!   advised), cut into `chunk`-sized buffers and page-locked with `cuMemHostRegister` for the
//!   whole load. The direct engine reads into it with `O_DIRECT` (io_uring also registers the
//!   same buffers, `READ_FIXED`); page-cache-resident ranges are `pread` into it by the buffered
//!   threads (two buffers each, so one is read while the other is copied). No byte bound for
//!   the GPU passes through pageable memory: `CudaSink::deliver` refuses a source outside the
//!   pool.
//! - Each delivery is a `cuMemcpyHtoDAsync` on one of ≥ 2 streams (buffer `i` uses stream
//!   `i mod streams`), followed by an event record on that buffer's event (blocking-sync
//!   events, so waiting threads sleep instead of spinning); `CudaSink::reclaim` waits for
//!   that event before the buffer is read into again. Copies thus overlap the reads in flight
//!   and each other.
//! - Dropping the sink synchronises its streams before the pool is unregistered and unmapped,
//!   so an error half-way through a load never frees memory a copy still reads.

use std::sync::{Arc, Mutex, OnceLock};

use flowgate_cuda::{
    CudaError, Device, DeviceAllocator, DeviceBuffer, Event, HostRegistration, Stream,
};

use super::{Sink, Staging};
use crate::engine::Dest;
use crate::{AlignedBuf, IoError};

fn cuda(e: CudaError) -> IoError {
    IoError::Cuda(e.to_string())
}

/// One request's bytes in device memory: `len` bytes at `offset` of a shared device arena.
#[derive(Clone, Debug)]
pub struct DeviceView {
    buffer: Option<Arc<DeviceBuffer>>,
    offset: usize,
    len: usize,
}

impl DeviceView {
    /// The arena (`None` only for empty requests when nothing else was loaded).
    pub fn buffer(&self) -> Option<&Arc<DeviceBuffer>> {
        self.buffer.as_ref()
    }

    /// Byte offset in [`DeviceView::buffer`].
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of the first byte (0 when there is no buffer).
    pub fn device_ptr(&self) -> u64 {
        self.buffer
            .as_ref()
            .map_or(0, |b| b.ptr() + self.offset as u64)
    }

    /// Copies the bytes back into `dst` (of [`DeviceView::len`] bytes) and waits: for tests and
    /// `--verify`.
    pub fn read_back(&self, stream: &Stream, dst: &mut [u8]) -> Result<(), CudaError> {
        if dst.len() != self.len {
            return Err(CudaError::InvalidArgument(format!(
                "read_back into {} bytes of a {}-byte view",
                dst.len(),
                self.len
            )));
        }
        match &self.buffer {
            Some(b) if self.len > 0 => b.read(stream, self.offset, dst),
            _ => Ok(()),
        }
    }
}

/// The page-locked pool. Field order matters: the registration is dropped (unregistered)
/// before the memory is unmapped.
struct Pool {
    _reg: HostRegistration<'static>,
    _buf: AlignedBuf,
}

/// See the module docs.
pub(crate) struct CudaSink {
    device: Device,
    arenas: Vec<Arc<DeviceBuffer>>,
    streams: Vec<Stream>,
    events: OnceLock<Vec<Event>>,
    staging: OnceLock<Staging>,
    pool: Mutex<Option<Pool>>,
}

impl CudaSink {
    /// Device arenas of `sizes` bytes from `alloc`, and `streams` (at least 2) copy streams.
    pub fn new(
        alloc: &DeviceAllocator,
        sizes: &[usize],
        streams: usize,
    ) -> Result<CudaSink, IoError> {
        let device = alloc.device().clone();
        let arenas = sizes
            .iter()
            .map(|&n| alloc.alloc(n.max(1)).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cuda)?;
        let streams = (0..streams.max(2))
            .map(|_| Stream::new(&device))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cuda)?;
        Ok(CudaSink {
            device,
            arenas,
            streams,
            events: OnceLock::new(),
            staging: OnceLock::new(),
            pool: Mutex::new(None),
        })
    }

    /// The device arenas (one per extent).
    pub fn arenas(&self) -> &[Arc<DeviceBuffer>] {
        &self.arenas
    }

    /// Bytes of page-locked staging memory in use.
    pub fn staging_bytes(&self) -> usize {
        self.staging.get().map_or(0, |s| s.size * s.count)
    }
}

impl Sink for CudaSink {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn landing(&self, _dest: usize) -> Option<Dest> {
        None
    }

    fn lands(&self) -> bool {
        false
    }

    fn prepare(&self, direct: usize, buffered_threads: usize, size: usize) -> Result<(), IoError> {
        let count = direct + 2 * buffered_threads;
        if count == 0 || size == 0 || self.staging.get().is_some() {
            return Ok(());
        }
        let bytes = count.checked_mul(size).ok_or(IoError::Alloc(usize::MAX))?;
        let mut buf = AlignedBuf::zeroed(bytes).ok_or(IoError::Alloc(bytes))?;
        // SAFETY: the slice covers exactly the live mapping of `buf`, which is stored next to
        // the registration in `Pool` and unmapped only after the registration is dropped (field
        // order); the mapping never moves when `buf` (a pointer and a length) is moved.
        let slice: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(buf.raw(), bytes) };
        let mut reg = HostRegistration::new(&self.device, slice).map_err(cuda)?;
        // Every access to the pool from here on derives from the registration's borrow.
        let base = reg.as_mut_slice().as_mut_ptr();
        let events = (0..count)
            .map(|_| Event::blocking(&self.device))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cuda)?;
        if let Ok(mut p) = self.pool.lock() {
            *p = Some(Pool {
                _reg: reg,
                _buf: buf,
            });
        } else {
            return Err(IoError::Engine("CUDA sink: pool lock poisoned".into()));
        }
        let _ = self.events.set(events);
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
        let (Some(i), Some(st), Some(events)) = (staging, self.staging.get(), self.events.get())
        else {
            return Err(IoError::Plan(
                "CUDA sink: a delivery not from its page-locked staging pool".into(),
            ));
        };
        // The source must lie inside staging buffer i (page-locked memory).
        let inside = st.ptr(i).is_some_and(|b| {
            let (s, b) = (src.as_ptr() as usize, b as usize);
            s >= b && s + src.len() <= b + st.size
        });
        let arena = self
            .arenas
            .get(dest)
            .filter(|a| dst_off.checked_add(src.len()).is_some_and(|e| e <= a.len()));
        let (Some(arena), Some(ev), true) = (arena, events.get(i), inside) else {
            return Err(IoError::Plan(format!(
                "CUDA sink: delivery of {} bytes from staging buffer {i} to {dest}+{dst_off} out of range",
                src.len()
            )));
        };
        if src.is_empty() {
            return Ok(());
        }
        let stream = &self.streams[i % self.streams.len()];
        // SAFETY: the source is page-locked staging memory (checked above) that is not read
        // into again before `reclaim(i)` has waited for this copy (the engines' contract), and
        // the pool outlives every copy (Drop synchronises the streams first); the destination
        // range is in bounds (checked) and written by no other delivery.
        unsafe { arena.write_async_from(stream, dst_off, src.as_ptr(), src.len()) }
            .map_err(cuda)?;
        ev.record(stream).map_err(cuda)
    }

    fn reclaim(&self, staging: usize) -> Result<(), IoError> {
        match self.events.get().and_then(|e| e.get(staging)) {
            Some(ev) => ev.synchronize().map_err(cuda),
            None => Ok(()),
        }
    }

    fn finish(&self) -> Result<(), IoError> {
        for s in &self.streams {
            s.synchronize().map_err(cuda)?;
        }
        Ok(())
    }
}

impl Drop for CudaSink {
    fn drop(&mut self) {
        // No copy may still read the pool when it is unregistered and unmapped.
        for s in &self.streams {
            let _ = s.synchronize();
        }
    }
}

/// Views of the requests placed by [`super::extents`] in `arenas`.
pub(crate) fn views(
    arenas: &[Arc<DeviceBuffer>],
    place: &[super::Placement],
    requests: &[crate::ReadRequest],
) -> Vec<DeviceView> {
    place
        .iter()
        .zip(requests)
        .map(|(p, r)| match p {
            Some((e, off)) => DeviceView {
                buffer: arenas.get(*e).cloned(),
                offset: *off,
                len: r.len,
            },
            None => DeviceView {
                buffer: arenas.first().cloned(),
                offset: 0,
                len: 0,
            },
        })
        .collect()
}

/// Copies every view back from the device and compares it with a buffered re-read of the file
/// (`--verify`; not part of a timed load).
pub(crate) fn verify(
    open: &[crate::engine::OpenFile],
    requests: &[crate::ReadRequest],
    views: &[DeviceView],
    device: &Device,
) -> Result<(), IoError> {
    use std::os::unix::fs::FileExt;
    let stream = Stream::new(device).map_err(cuda)?;
    let piece = 8 << 20;
    let mut want = vec![0u8; piece];
    let mut got = vec![0u8; piece];
    for (r, v) in requests.iter().zip(views) {
        let f = open.get(r.file).ok_or(IoError::BadFile(r.file))?;
        let mut done = 0usize;
        while done < r.len {
            let n = piece.min(r.len - done);
            let off = r.offset + done as u64;
            let (w, g) = (&mut want[..n], &mut got[..n]);
            f.buffered
                .read_exact_at(w, off)
                .map_err(|source| IoError::Read {
                    path: f.path.clone(),
                    offset: off,
                    len: n,
                    source,
                })?;
            match v.buffer() {
                Some(b) => b.read(&stream, v.offset() + done, g).map_err(cuda)?,
                None => return Err(IoError::Plan("device view without a buffer".into())),
            }
            if let Some(i) = w.iter().zip(g.iter()).position(|(x, y)| x != y) {
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
