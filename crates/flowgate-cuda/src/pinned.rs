//! Page-locked host memory, which the copy engines can read and write directly (full PCIe/NVLink
//! bandwidth, truly asynchronous copies).
//!
//! [`PinnedBuffer`] allocates with `cuMemHostAlloc(PORTABLE | DEVICEMAP)` (not write-combined: the I/O loader
//! reads file data into it and tests read it back). [`HostRegistration`] pins an existing host
//! buffer in place with `cuMemHostRegister`, for buffers the I/O layer already owns (e.g. its
//! O_DIRECT-aligned pool); it borrows the buffer mutably so it cannot be freed while registered.
//! [`HostFlag`] is a page-locked counter a stream can wait on (`cuStreamWaitValue32`).

use cudarc::driver::sys;

use crate::device::Device;
use crate::error::{check, CudaError};
use crate::memory::{copy_dtoh_async, copy_htod_async, range_check, DeviceBuffer};
use crate::stream::Stream;

/// A page-locked host buffer, zero-initialised.
#[derive(Debug)]
pub struct PinnedBuffer {
    device: Device,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned exclusively by this value.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocate `len` bytes of page-locked host memory.
    pub fn new(device: &Device, len: usize) -> Result<PinnedBuffer, CudaError> {
        if len == 0 || len > isize::MAX as usize {
            return Err(CudaError::InvalidArgument(format!(
                "pinned buffer of {len} bytes"
            )));
        }
        device.bind()?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: p is a valid out-pointer; the context is current.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(
                &mut p,
                len,
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
            )
        })?;
        if p.is_null() {
            return Err(CudaError::InvalidArgument(
                "cuMemHostAlloc returned null".into(),
            ));
        }
        // SAFETY: p points to len writable bytes just allocated; zero them so no read sees
        // uninitialised memory.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
        Ok(PinnedBuffer {
            device: device.clone(),
            ptr: p.cast(),
            len,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live, initialised allocation owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The address at which kernels reach these bytes (the memory is device-mapped): device
    /// writes there land in host memory, over the link.
    pub fn device_ptr(&self) -> Result<sys::CUdeviceptr, CudaError> {
        // SAFETY: ptr is page-locked host memory from cuMemHostAlloc(DEVICEMAP), alive with self.
        unsafe { mapped_device_ptr(&self.device, self.ptr) }
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue a copy of `self[src_offset..src_offset+n]` to `dst` at `dst_offset` on `stream`
    /// *without waiting*. `&mut self` and `&mut dst` are held for the call only, so the caller
    /// must synchronise `stream` before touching either again; use [`PinnedBuffer::upload`] for
    /// the waiting form.
    ///
    /// # Safety
    /// Neither buffer may be modified or dropped until the copy has completed on `stream`.
    pub unsafe fn upload_async(
        &self,
        stream: &Stream,
        src_offset: usize,
        dst: &mut DeviceBuffer,
        dst_offset: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        range_check(src_offset, n, self.len)?;
        range_check(dst_offset, n, dst.len())?;
        self.device.bind()?;
        copy_htod_async(
            stream,
            dst.ptr() + dst_offset as u64,
            &self.as_slice()[src_offset..src_offset + n],
        )
    }

    /// Copy all of `self` to the start of `dst` and wait.
    pub fn upload(&self, stream: &Stream, dst: &mut DeviceBuffer) -> Result<(), CudaError> {
        // SAFETY: the stream is synchronised before either borrow ends.
        unsafe { self.upload_async(stream, 0, dst, 0, self.len) }?;
        stream.synchronize()
    }

    /// Copy the start of `src` into all of `self` and wait.
    pub fn download(&mut self, stream: &Stream, src: &DeviceBuffer) -> Result<(), CudaError> {
        range_check(0, self.len, src.len())?;
        self.device.bind()?;
        let len = self.len;
        // SAFETY: range checked; both borrows outlive the synchronize below.
        unsafe { copy_dtoh_async(stream, &mut self.as_mut_slice()[..len], src.ptr()) }?;
        stream.synchronize()
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: ptr came from cuMemHostAlloc and is freed once.
            let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// The device address of page-locked, device-mapped host memory at `ptr`.
///
/// # Safety
/// `ptr` must lie in host memory allocated or registered with the DEVICEMAP flag, still so.
unsafe fn mapped_device_ptr(device: &Device, ptr: *mut u8) -> Result<u64, CudaError> {
    device.bind()?;
    let mut dev: sys::CUdeviceptr = 0;
    // SAFETY: the caller's contract; `dev` is a valid out-pointer.
    check("cuMemHostGetDevicePointer", unsafe {
        sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr.cast(), 0)
    })?;
    Ok(dev)
}

/// An existing host buffer pinned in place with `cuMemHostRegister`; unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration<'a> {
    device: Device,
    buf: &'a mut [u8],
}

impl<'a> HostRegistration<'a> {
    /// Page-lock `buf` (portable across contexts). For best results `buf` should be page-aligned
    /// and a whole number of pages; the driver pins the pages it touches either way.
    pub fn new(device: &Device, buf: &'a mut [u8]) -> Result<HostRegistration<'a>, CudaError> {
        if buf.is_empty() {
            return Err(CudaError::InvalidArgument(
                "registering an empty buffer".into(),
            ));
        }
        device.bind()?;
        // SAFETY: buf is a live, exclusively borrowed host range; it stays borrowed (cannot be
        // freed or moved) until Drop unregisters it.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(
                buf.as_mut_ptr().cast(),
                buf.len(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        })?;
        Ok(HostRegistration {
            device: device.clone(),
            buf,
        })
    }

    /// The registered bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf
    }

    /// The registered bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
    }

    /// Copy all of it to the start of `dst` and wait.
    pub fn upload(&self, stream: &Stream, dst: &mut DeviceBuffer) -> Result<(), CudaError> {
        range_check(0, self.buf.len(), dst.len())?;
        self.device.bind()?;
        // SAFETY: range checked; self.buf outlives the synchronize below.
        unsafe { copy_htod_async(stream, dst.ptr(), self.buf) }?;
        stream.synchronize()
    }
}

impl Drop for HostRegistration<'_> {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: the range was registered by new() and is unregistered once.
            let _ = unsafe { sys::cuMemHostUnregister(self.buf.as_mut_ptr().cast()) };
        }
    }
}

/// A host range page-locked with `cuMemHostRegister` by address, for memory the caller owns
/// through some other handle (an `Arc` of a loader arena); unregistered on drop. Unlike
/// [`HostRegistration`] it borrows nothing, so the caller must keep the memory alive and in
/// place for as long as this value lives (drop this first).
#[derive(Debug)]
pub struct HostPin {
    device: Device,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: HostPin only holds the address to unregister it; it never reads or writes through it.
unsafe impl Send for HostPin {}
// SAFETY: as above; no method touches the memory.
unsafe impl Sync for HostPin {}

impl HostPin {
    /// Page-locks `len` bytes at `ptr` (portable across contexts, and mapped into the device's
    /// address space: kernels may read it in place, see [`HostPin::device_ptr`]).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a live host allocation that stays mapped at that address until
    /// this value is dropped, and must not already be registered.
    pub unsafe fn new(device: &Device, ptr: *mut u8, len: usize) -> Result<HostPin, CudaError> {
        if len == 0 || ptr.is_null() {
            return Err(CudaError::InvalidArgument(
                "registering an empty host range".into(),
            ));
        }
        device.bind()?;
        // SAFETY: the caller guarantees a live range that outlives this value.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(
                ptr.cast(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
            )
        })?;
        Ok(HostPin {
            device: device.clone(),
            ptr,
            len,
        })
    }

    /// Bytes pinned.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address pinned.
    pub fn host_ptr(&self) -> u64 {
        self.ptr as u64
    }

    /// The device address kernels read the pinned range at (over the link). With unified
    /// addressing, and where the device can use host pointers for registered memory, it is
    /// the host address itself.
    pub fn device_ptr(&self) -> Result<u64, CudaError> {
        // SAFETY: the range is registered with DEVICEMAP (new) and stays so while self lives.
        unsafe { mapped_device_ptr(&self.device, self.ptr) }
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: registered by new() and unregistered once; the range is still live
            // (the caller's contract).
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        }
    }
}

/// A 32-bit counter in page-locked host memory that the host raises and a stream waits on
/// (`cuStreamWaitValue32`): the GPU's front end polls it over the link, so a stream can wait
/// for work done on the host's own threads without a host-function callback (whose thread has
/// to be scheduled, and is late when every core is busy).
#[derive(Debug)]
pub struct HostFlag {
    buf: PinnedBuffer,
    dev: sys::CUdeviceptr,
}

impl HostFlag {
    /// A flag at 0.
    pub fn new(device: &Device) -> Result<HostFlag, CudaError> {
        // One cache line of its own.
        let buf = PinnedBuffer::new(device, 64)?;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `buf` is page-locked host memory from cuMemHostAlloc; dev is an out-pointer.
        check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dev, buf.ptr.cast(), 0)
        })?;
        Ok(HostFlag { buf, dev })
    }

    fn atomic(&self) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: the buffer is 64 bytes, page-aligned (so aligned for u32), lives as long as
        // `self`, and is only ever accessed through this atomic (the device reads it).
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.buf.ptr.cast()) }
    }

    /// Sets the flag to `v`; writes made before it are visible to whatever waited for `v`.
    pub fn set(&self, v: u32) {
        self.atomic().store(v, std::sync::atomic::Ordering::Release);
    }

    /// The flag's value now.
    pub fn get(&self) -> u32 {
        self.atomic().load(std::sync::atomic::Ordering::Acquire)
    }

    /// The flag's device address, for a kernel that raises it.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.dev
    }

    /// Queues a wait on `stream` until the flag reaches `v` (compared cyclically, so the
    /// counter may wrap). Fails where the device cannot wait on memory; then nothing is queued.
    ///
    /// # Safety
    /// Something must set the flag to `v` or beyond, or the stream (and whoever synchronises
    /// it) waits forever; `self` must outlive the wait.
    pub unsafe fn wait_on(&self, stream: &Stream, v: u32) -> Result<(), CudaError> {
        self.buf.device.bind()?;
        // SAFETY: `dev` is the device address of the flag's page-locked word.
        check("cuStreamWaitValue32", unsafe {
            sys::cuStreamWaitValue32_v2(
                stream.cu_stream(),
                self.dev,
                v,
                sys::CUstreamWaitValue_flags_enum::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        })
    }
}
