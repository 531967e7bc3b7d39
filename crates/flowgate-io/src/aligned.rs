//! [`AlignedBuf`]: an owned, zero-initialised byte buffer with a fixed alignment.
//!
//! Small buffers come from the global allocator. Large ones (≥ [`MMAP_MIN`]) are anonymous
//! mappings: the kernel hands out zeroed pages lazily, so allocating a 3 GiB destination costs
//! nothing until it is written (the global allocator would `memset` it, since Rust's
//! `alloc_zeroed` with a 4096 alignment cannot use `calloc`, doubling the memory traffic of a
//! load). Mappings of [`HUGE_MIN`] bytes or more are advised `MADV_HUGEPAGE`, so that the first
//! write into them faults 2 MiB at a time instead of 4 KiB (512× fewer page faults while a
//! model streams in); where transparent huge pages are off the advice is simply ignored.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, enough for AVX-512 loads and O_DIRECT.
pub const BUF_ALIGN: usize = 4096;
/// Buffers at least this large are anonymous mappings.
pub const MMAP_MIN: usize = 1 << 20;
/// Mappings at least this large are advised `MADV_HUGEPAGE`.
pub const HUGE_MIN: usize = 4 << 20;

/// Owned bytes aligned to [`BUF_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    mapped: bool,
    /// A piece of a larger buffer ([`AlignedBuf::split`]): the whole, which frees the memory
    /// once its last piece is dropped, and is never read or written through this handle.
    whole: Option<std::sync::Arc<AlignedBuf>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `None` if the allocation fails or `len` is absurd.
    pub fn zeroed(len: usize) -> Option<AlignedBuf> {
        if len == 0 {
            return Some(AlignedBuf {
                // A dangling pointer that is still aligned, so every buffer honours BUF_ALIGN.
                ptr: NonNull::new(BUF_ALIGN as *mut u8)?,
                len: 0,
                mapped: false,
                whole: None,
            });
        }
        if len >= MMAP_MIN {
            return Self::mapped(len);
        }
        let layout = Layout::from_size_align(len, BUF_ALIGN).ok()?;
        // SAFETY: layout has nonzero size (len > 0) and a valid power-of-two alignment.
        let ptr = unsafe { alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| AlignedBuf {
            ptr,
            len,
            mapped: false,
            whole: None,
        })
    }

    fn mapped(len: usize) -> Option<AlignedBuf> {
        let map_len = len.checked_add(BUF_ALIGN - 1)? & !(BUF_ALIGN - 1);
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        if len >= HUGE_MIN {
            // SAFETY: advice on a mapping we own; failure (THP compiled out) is harmless.
            unsafe { libc::madvise(p, map_len, libc::MADV_HUGEPAGE) };
        }
        NonNull::new(p as *mut u8).map(|ptr| AlignedBuf {
            ptr,
            len,
            mapped: true,
            whole: None,
        })
    }

    /// `len` bytes of `file` from `offset` (a multiple of 4096), mapped privately and populated
    /// for reading from the page cache: no copy, no zeroing, the page cache's pages themselves (writes, if
    /// any, are copy-on-write and never reach the file). `len` must not pass the end of the file
    /// by a whole page (a page wholly past the end would fault). `None` on failure.
    ///
    /// The bytes are the file's as long as the file is not rewritten in place; a file truncated
    /// under the mapping makes access to the lost pages fault (SIGBUS), as with any mmap-based
    /// loader (llama.cpp's default). Callers use it only for ranges already in the page cache.
    pub fn map_file(file: &std::fs::File, offset: u64, len: usize) -> Option<AlignedBuf> {
        use std::os::fd::AsRawFd;
        if len == 0 || !offset.is_multiple_of(BUF_ALIGN as u64) {
            return None;
        }
        let map_len = len.checked_add(BUF_ALIGN - 1)? & !(BUF_ALIGN - 1);
        let off = libc::off_t::try_from(offset).ok()?;
        // SAFETY: a private mapping of an open file with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // Populate for reading (MAP_POPULATE on a writable private mapping would fault every
        // page for writing, i.e. copy it). Where MADV_POPULATE_READ (Linux 5.14) is missing,
        // pages fault in on first use instead.
        // Populating is page-table work (about 0.3 µs per 4 KiB page), so it is split over the
        // cores: pieces of 32 MiB handed out in turn.
        const MADV_POPULATE_READ: libc::c_int = 22;
        const PIECE: usize = 32 << 20;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(map_len.div_ceil(PIECE));
        let base = p as usize;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let populate = || loop {
            let at = next.fetch_add(PIECE, std::sync::atomic::Ordering::Relaxed);
            if at >= map_len {
                break;
            }
            // SAFETY: advice on a piece of the mapping just made (inside map_len).
            unsafe {
                libc::madvise(
                    (base + at) as *mut libc::c_void,
                    PIECE.min(map_len - at),
                    MADV_POPULATE_READ,
                )
            };
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(populate);
            }
            populate();
        });
        NonNull::new(p as *mut u8).map(|ptr| AlignedBuf {
            ptr,
            len,
            mapped: true,
            whole: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (allocated, zero-initialised) or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Cuts the buffer into `n` disjoint pieces of `piece` bytes each (a multiple of
    /// [`BUF_ALIGN`]; `n · piece` at most the length), each an owned [`AlignedBuf`] that can
    /// be written on its own: many equal buffers out of one allocation (one mapping, huge pages
    /// where they are on, one region to page-lock). The memory is freed with the last piece.
    /// `None` if the pieces do not fit or are not aligned.
    pub fn split(self, piece: usize, n: usize) -> Option<Vec<AlignedBuf>> {
        if piece == 0 || !piece.is_multiple_of(BUF_ALIGN) || piece.checked_mul(n)? > self.len {
            return None;
        }
        let base = self.ptr.as_ptr();
        let whole = std::sync::Arc::new(self);
        (0..n)
            .map(|i| {
                // SAFETY: i · piece + piece ≤ len (checked above), so the pointer stays inside
                // the allocation, which `whole` keeps alive.
                let p = unsafe { base.add(i * piece) };
                NonNull::new(p).map(|ptr| AlignedBuf {
                    ptr,
                    len: piece,
                    mapped: false,
                    whole: Some(whole.clone()),
                })
            })
            .collect()
    }

    /// Raw pointer to the first byte (for I/O engines writing disjoint parts from several
    /// threads).
    pub(crate) fn raw(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 || self.whole.is_some() {
            // A piece: the whole frees the memory (when its last piece lets go of it).
            return;
        }
        if self.mapped {
            let map_len = (self.len + BUF_ALIGN - 1) & !(BUF_ALIGN - 1);
            // SAFETY: the mapping was created in `mapped` with exactly this length.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, map_len) };
        } else {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, BUF_ALIGN),
                )
            }
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [1, 10_000, MMAP_MIN, HUGE_MIN + 3] {
            let mut b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b[len - 1] = 7;
            assert_eq!(b[len - 1], 7);
        }
        assert!(AlignedBuf::zeroed(0).unwrap().is_empty());
        assert!(AlignedBuf::zeroed(usize::MAX - 10).is_none());
    }

    #[test]
    fn pieces_are_disjoint_owned_and_outlive_each_other() {
        for (piece, n) in [(BUF_ALIGN, 3), (3 * BUF_ALIGN, 700)] {
            let whole = AlignedBuf::zeroed(piece * n + 5).unwrap();
            let base = whole.as_ptr() as usize;
            let mut pieces = whole.split(piece, n).unwrap();
            for (i, p) in pieces.iter_mut().enumerate() {
                assert_eq!(p.as_ptr() as usize, base + i * piece);
                assert_eq!(p.len(), piece);
                assert!(p.iter().all(|&x| x == 0));
                p.fill(i as u8);
            }
            // Pieces go to other threads and are dropped in any order; the memory stays valid
            // for the ones left.
            let last = pieces.pop().unwrap();
            let handles: Vec<_> = pieces
                .into_iter()
                .enumerate()
                .map(|(i, p)| std::thread::spawn(move || p.iter().all(|&x| x == i as u8)))
                .collect();
            assert!(handles.into_iter().all(|h| h.join().unwrap()));
            assert!(last.iter().all(|&x| x == (n - 1) as u8));
        }
        let b = AlignedBuf::zeroed(4 * BUF_ALIGN).unwrap();
        assert!(b.split(BUF_ALIGN + 1, 2).is_none(), "unaligned pieces");
        let b = AlignedBuf::zeroed(4 * BUF_ALIGN).unwrap();
        assert!(
            b.split(BUF_ALIGN, 5).is_none(),
            "more than the buffer holds"
        );
    }
}
