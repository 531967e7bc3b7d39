//! Streams and events: thin wrappers over cudarc's, with errors mapped to [`CudaError`].
//! Events are created with timing enabled so that the same type serves ordering and timing.

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use crate::device::Device;
use crate::error::CudaError;

/// A CUDA stream (non-default, created on a [`Device`]).
#[derive(Clone, Debug)]
pub struct Stream {
    inner: Arc<CudaStream>,
}

impl Stream {
    /// A new stream on `device`.
    pub fn new(device: &Device) -> Result<Stream, CudaError> {
        let inner = device
            .context()
            .new_stream()
            .map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        Ok(Stream { inner })
    }

    /// Block the host until all work queued on the stream is done.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.inner
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    /// Whether all work queued on the stream is done (`cuStreamQuery`; the context must be
    /// current on this thread); an error the stream's work ran into comes back as `Err`.
    pub fn is_idle(&self) -> Result<bool, CudaError> {
        // SAFETY: the stream handle is alive (held by self).
        match unsafe { sys::cuStreamQuery(self.cu_stream()) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(CudaError::Driver {
                op: "cuStreamQuery",
                msg: format!("{r:?}"),
            }),
        }
    }

    /// Make later work on this stream wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<(), CudaError> {
        self.inner
            .wait(&event.inner)
            .map_err(|e| CudaError::driver("cuStreamWaitEvent", e))
    }

    /// The cudarc stream (for kernel launches through cudarc's launch builder).
    pub fn raw(&self) -> &Arc<CudaStream> {
        &self.inner
    }

    /// The raw `CUstream`.
    pub fn cu_stream(&self) -> sys::CUstream {
        self.inner.cu_stream()
    }
}

/// A CUDA event (timing enabled).
#[derive(Debug)]
pub struct Event {
    inner: CudaEvent,
}

impl Event {
    /// A new event on `device`.
    pub fn new(device: &Device) -> Result<Event, CudaError> {
        let inner = device
            .context()
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        Ok(Event { inner })
    }

    /// A new event on `device` whose [`Event::synchronize`] puts the waiting thread to sleep
    /// instead of spinning (`CU_EVENT_BLOCKING_SYNC`): for threads that wait on many copies
    /// while other threads need the CPU (the I/O loader's staging buffers).
    pub fn blocking(device: &Device) -> Result<Event, CudaError> {
        let inner = device
            .context()
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        Ok(Event { inner })
    }

    /// Record the event at the current end of `stream`.
    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        self.inner
            .record(&stream.inner)
            .map_err(|e| CudaError::driver("cuEventRecord", e))
    }

    /// Block until the recorded work is done.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.inner
            .synchronize()
            .map_err(|e| CudaError::driver("cuEventSynchronize", e))
    }

    /// Has the recorded work completed?
    pub fn is_complete(&self) -> Result<bool, CudaError> {
        self.inner
            .try_is_complete()
            .map_err(|e| CudaError::driver("cuEventQuery", e))
    }

    /// Milliseconds from `self` to `end` (both recorded and complete).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, CudaError> {
        self.inner
            .elapsed_ms(&end.inner)
            .map_err(|e| CudaError::driver("cuEventElapsedTime", e))
    }
}
