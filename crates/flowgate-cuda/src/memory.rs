//! Device memory accounting.
//!
//! [`MemoryBudget`] is the single source of truth for "bytes in use" and "peak": a reservation
//! is taken with a compare-and-swap *before* the driver is asked for memory and given back when
//! the memory is freed, so concurrent allocators can never overshoot the budget, not even
//! transiently. [`DeviceAllocator`] makes plain `cuMemAlloc` allocations (no caching pool, so
//! the accounting is what the driver holds) and the [`crate::VmmArena`] charges the same budget
//! for each physical chunk it maps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;

use crate::device::Device;
use crate::error::{check, CudaError};
use crate::stream::Stream;

/// A byte budget with in-use and peak counters. Pure logic: usable without a GPU.
#[derive(Debug)]
pub struct MemoryBudget {
    budget: u64,
    in_use: AtomicU64,
    peak: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `budget` bytes.
    pub fn new(budget: u64) -> MemoryBudget {
        MemoryBudget {
            budget,
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Reserve `bytes`, or fail without changing anything if the budget would be exceeded.
    pub fn try_reserve(&self, bytes: u64) -> Result<(), CudaError> {
        let mut cur = self.in_use.load(Ordering::Relaxed);
        loop {
            let next = match cur.checked_add(bytes) {
                Some(n) if n <= self.budget => n,
                _ => {
                    return Err(CudaError::BudgetExceeded {
                        requested: bytes,
                        in_use: cur,
                        budget: self.budget,
                    })
                }
            };
            match self
                .in_use
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(());
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Give back `bytes` taken by [`MemoryBudget::try_reserve`]. Saturates at zero.
    pub fn release(&self, bytes: u64) {
        let _ = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(bytes))
            });
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes currently reserved.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// Highest `in_use` seen.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Bytes still available.
    pub fn available(&self) -> u64 {
        self.budget.saturating_sub(self.in_use())
    }
}

/// Makes every device allocation, charging a shared [`MemoryBudget`].
#[derive(Clone, Debug)]
pub struct DeviceAllocator {
    device: Device,
    budget: Arc<MemoryBudget>,
}

impl DeviceAllocator {
    /// An allocator on `device` with a budget of `budget_bytes`.
    pub fn new(device: &Device, budget_bytes: u64) -> DeviceAllocator {
        DeviceAllocator {
            device: device.clone(),
            budget: Arc::new(MemoryBudget::new(budget_bytes)),
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shared budget (in use, peak).
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Allocate `bytes` of device memory (uninitialised). Fails with
    /// [`CudaError::BudgetExceeded`] before touching the driver if the budget would be exceeded.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        if bytes == 0 {
            return Err(CudaError::InvalidArgument("zero-byte allocation".into()));
        }
        let b = bytes as u64;
        self.budget.try_reserve(b)?;
        let ptr = (|| {
            self.device.bind()?;
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: ptr is a valid out-pointer and the context is current.
            check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
            Ok(ptr)
        })();
        match ptr {
            Ok(ptr) => Ok(DeviceBuffer {
                device: self.device.clone(),
                budget: self.budget.clone(),
                ptr,
                len: bytes,
            }),
            Err(e) => {
                self.budget.release(b);
                Err(e)
            }
        }
    }
}

/// A device allocation made by a [`DeviceAllocator`]; freed (and un-charged) on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    device: Device,
    budget: Arc<MemoryBudget>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DeviceBuffer {
    /// Device address.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (zero-byte allocations are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy `src` to `offset` on `stream` and wait for it.
    pub fn write(&mut self, stream: &Stream, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        range_check(offset, src.len(), self.len)?;
        self.device.bind()?;
        // SAFETY: destination range checked in bounds of this allocation; src lives until the
        // stream is synchronised below, so the async copy never outlives its source.
        unsafe { copy_htod_async(stream, self.ptr + offset as u64, src) }?;
        stream.synchronize()
    }

    /// Queue a copy of `len` host bytes at `src` to `offset` of this buffer on `stream`, and
    /// return without waiting. Takes `&self` so that several threads can fill disjoint parts of
    /// one buffer at once (the I/O loader streams a model into one device arena this way).
    ///
    /// # Safety
    /// `src..src+len` must be readable host memory that stays alive and unmodified until the
    /// copy has completed on `stream` (record an [`crate::Event`] after it and wait for that);
    /// for a truly asynchronous copy it should be page-locked. No other copy or kernel may
    /// access `offset..offset+len` of this buffer until then.
    pub unsafe fn write_async_from(
        &self,
        stream: &Stream,
        offset: usize,
        src: *const u8,
        len: usize,
    ) -> Result<(), CudaError> {
        range_check(offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: the destination range is in bounds (checked above); the source's validity
        // and lifetime are the caller's contract.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.ptr + offset as u64,
                src.cast(),
                len,
                stream.cu_stream(),
            )
        })
    }

    /// Copy `dst.len()` bytes from `offset` into `dst` on `stream` and wait for it.
    pub fn read(&self, stream: &Stream, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        range_check(offset, dst.len(), self.len)?;
        self.device.bind()?;
        // SAFETY: as in write; dst is exclusively borrowed until the synchronize below.
        unsafe { copy_dtoh_async(stream, dst, self.ptr + offset as u64) }?;
        stream.synchronize()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: ptr came from cuMemAlloc and is freed once; cuMemFree waits for work using it.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
        self.budget.release(self.len as u64);
    }
}

pub(crate) fn range_check(offset: usize, n: usize, len: usize) -> Result<(), CudaError> {
    match offset.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(CudaError::InvalidArgument(format!(
            "range {offset}+{n} past the end of a {len}-byte buffer"
        ))),
    }
}

/// Async host-to-device copy.
///
/// # Safety
/// `dst..dst+src.len()` must be valid device memory, and `src` must stay alive and unmodified
/// until the stream has finished the copy.
pub(crate) unsafe fn copy_htod_async(
    stream: &Stream,
    dst: sys::CUdeviceptr,
    src: &[u8],
) -> Result<(), CudaError> {
    check(
        "cuMemcpyHtoDAsync",
        sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), stream.cu_stream()),
    )
}

/// Async device-to-host copy.
///
/// # Safety
/// `src..src+dst.len()` must be valid device memory, and `dst` must stay alive and untouched
/// until the stream has finished the copy.
pub(crate) unsafe fn copy_dtoh_async(
    stream: &Stream,
    dst: &mut [u8],
    src: sys::CUdeviceptr,
) -> Result<(), CudaError> {
    check(
        "cuMemcpyDtoHAsync",
        sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), src, dst.len(), stream.cu_stream()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn budget_is_never_exceeded() {
        let b = MemoryBudget::new(1000);
        assert!(b.try_reserve(600).is_ok());
        let e = b.try_reserve(401).err();
        assert!(matches!(
            e,
            Some(CudaError::BudgetExceeded {
                requested: 401,
                in_use: 600,
                budget: 1000
            })
        ));
        assert_eq!(b.in_use(), 600);
        assert!(b.try_reserve(400).is_ok());
        assert_eq!((b.in_use(), b.peak(), b.available()), (1000, 1000, 0));
        b.release(700);
        assert_eq!((b.in_use(), b.peak()), (300, 1000));
        assert!(b.try_reserve(u64::MAX).is_err());
        b.release(10_000);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn random_ops_match_a_model_and_stay_under_budget() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_cafe);
        let budget = 1u64 << 20;
        let b = MemoryBudget::new(budget);
        let (mut live, mut model_in_use, mut model_peak) = (Vec::new(), 0u64, 0u64);
        for _ in 0..10_000 {
            if rng.random_bool(0.55) {
                let n = rng.random_range(1..budget / 4);
                let ok = b.try_reserve(n).is_ok();
                assert_eq!(ok, model_in_use + n <= budget);
                if ok {
                    model_in_use += n;
                    model_peak = model_peak.max(model_in_use);
                    live.push(n);
                }
            } else if !live.is_empty() {
                let i = rng.random_range(0..live.len());
                let n = live.swap_remove(i);
                b.release(n);
                model_in_use -= n;
            }
            assert!(b.in_use() <= budget);
            assert_eq!((b.in_use(), b.peak()), (model_in_use, model_peak));
        }
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let b = Arc::new(MemoryBudget::new(10_000));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t + 1);
                    for _ in 0..20_000 {
                        let n = rng.random_range(1..3000);
                        if b.try_reserve(n).is_ok() {
                            assert!(b.in_use() <= 10_000);
                            b.release(n);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().is_ok());
        }
        assert_eq!(b.in_use(), 0);
        assert!(b.peak() <= 10_000);
    }

    #[test]
    fn range_checks() {
        assert!(range_check(0, 10, 10).is_ok());
        assert!(range_check(5, 6, 10).is_err());
        assert!(range_check(usize::MAX, 2, 10).is_err());
    }
}
