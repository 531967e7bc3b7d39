//! flowgate-cuda: the CUDA plumbing under flowgate's CUDA backend. It knows nothing of models.
//!
//! Main types:
//! - [`Cuda`]: is CUDA usable on this machine? ([`Cuda::available`] checks that the driver
//!   library can be opened *before* anything touches CUDA: cudarc panics on a missing library.)
//! - [`DeviceSpec`] / [`Resolved`] / [`resolve`]: `--device auto|cpu|cuda|cuda:N`.
//! - [`Device`]: an opened GPU (primary context) with its compute capability and memory.
//! - [`Stream`] / [`Event`]: thin wrappers over cudarc's streams and events.
//! - [`MemoryBudget`] / [`DeviceAllocator`] / [`DeviceBuffer`]: every device allocation is charged
//!   to a budget *before* it is made; bytes in use and peak come from this accounting, and an
//!   allocation that would exceed the budget is an error, never a silent overshoot.
//! - [`PinnedBuffer`] / [`HostRegistration`]: page-locked host memory, allocated or registered.
//! - [`VmmArena`]: one large reserved virtual range cut into fixed slots whose physical memory is
//!   mapped and unmapped at will (expert paging: a slot's address never moves).
//! - [`Blas`]: a cuBLAS handle on a stream (row-major SGEMM on device buffers).
//! - [`KernelCache`]: embedded CUDA C compiled by NVRTC for the device's architecture, cached
//!   on disk by a hash of source, options and architecture.
//!
//! Design choices: cudarc is used with `dynamic-loading`, so the binary links and runs without
//! CUDA and this crate's tests pass on machines with no GPU. Where cudarc has no safe wrapper
//! (virtual memory management, host registration, raw copies) the driver API is called through
//! `cudarc::driver::sys`, each call checked, each `unsafe` block explained.

mod blas;
mod device;
mod error;
mod kernels;
mod memory;
mod pinned;
mod stream;
mod vmm;

pub use blas::Blas;
pub use device::{resolve, resolve_with, Cuda, Device, DeviceSpec, Resolved};
pub use error::CudaError;
pub use kernels::{cache_key, default_cache_dir, CacheOutcome, Kernel, KernelCache, Module};
pub use memory::{DeviceAllocator, DeviceBuffer, MemoryBudget};
pub use pinned::{HostFlag, HostPin, HostRegistration, PinnedBuffer};
pub use stream::{Event, Stream};
pub use vmm::{VmmArena, VmmInfo};

/// Re-export of cudarc, for launch configuration and kernel arguments.
pub use cudarc;

/// The smoke-test kernel source (`kernels/smoke.cu`): `axpy` and `fill`, used to test the NVRTC path.
pub const SMOKE_CU: &str = include_str!("../kernels/smoke.cu");
