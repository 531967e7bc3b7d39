//! Finding and opening a GPU.
//!
//! `Cuda::available()` asks cudarc whether `libcuda` can be opened (a dlopen, nothing else); only
//! then is any driver entry point touched, because cudarc's lazily loaded library panics when it
//! is missing. Device strings (`auto|cpu|cuda|cuda:N`) parse without touching CUDA at all, and
//! [`resolve_with`] is the pure decision so that it is testable on machines without a GPU.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use crate::error::CudaError;

/// Process-wide questions about CUDA.
pub struct Cuda;

impl Cuda {
    /// True when the CUDA driver library can be loaded. Safe to call anywhere, any number of times.
    pub fn available() -> bool {
        // SAFETY: is_culib_present only tries to dlopen candidate library names and closes them.
        unsafe { sys::is_culib_present() }
    }

    /// True when the NVRTC library can be loaded.
    pub fn nvrtc_available() -> bool {
        // SAFETY: as above, a dlopen probe of libnvrtc.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }

    /// True when the cuBLAS library can be loaded.
    pub fn cublas_available() -> bool {
        // SAFETY: as above, a dlopen probe of libcublas.
        unsafe { cudarc::cublas::sys::is_culib_present() }
    }

    /// Number of CUDA devices; an error when the driver is absent or fails to initialise.
    pub fn device_count() -> Result<usize, CudaError> {
        require_driver()?;
        cudarc::driver::result::init().map_err(|e| CudaError::driver("cuInit", e))?;
        let n =
            CudaContext::device_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

fn require_driver() -> Result<(), CudaError> {
    if Cuda::available() {
        Ok(())
    } else {
        Err(CudaError::LibraryNotFound {
            what: "driver",
            tried: "libcuda.so, libcuda.so.1 (from the NVIDIA driver)".into(),
        })
    }
}

pub(crate) fn require_nvrtc() -> Result<(), CudaError> {
    if Cuda::nvrtc_available() {
        Ok(())
    } else {
        Err(CudaError::LibraryNotFound {
            what: "NVRTC",
            tried: "libnvrtc.so, libnvrtc.so.13 (CUDA toolkit lib dir on LD_LIBRARY_PATH)".into(),
        })
    }
}

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when CUDA is present, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// A CUDA device by ordinal (`cuda` means `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = CudaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let bad = |reason: &str| CudaError::BadDeviceSpec {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        match t.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "" => Err(bad("empty")),
            _ => {
                let rest = t
                    .strip_prefix("cuda:")
                    .ok_or_else(|| bad("unknown device kind"))?;
                if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("ordinal must be a non-negative integer"));
                }
                let n: usize = rest.parse().map_err(|_| bad("ordinal too large"))?;
                Ok(DeviceSpec::Cuda(n))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where work will run after resolving a [`DeviceSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The CPU backend.
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

/// Pure resolution: `cuda_devices` is `None` when CUDA is absent, else the device count.
pub fn resolve_with(spec: DeviceSpec, cuda_devices: Option<usize>) -> Result<Resolved, CudaError> {
    match spec {
        DeviceSpec::Cpu => Ok(Resolved::Cpu),
        DeviceSpec::Auto => Ok(match cuda_devices {
            Some(n) if n > 0 => Resolved::Cuda(0),
            _ => Resolved::Cpu,
        }),
        DeviceSpec::Cuda(ordinal) => match cuda_devices {
            None => Err(CudaError::LibraryNotFound {
                what: "driver",
                tried: "libcuda.so, libcuda.so.1 (from the NVIDIA driver)".into(),
            }),
            Some(count) if ordinal >= count => Err(CudaError::NoSuchDevice { ordinal, count }),
            Some(_) => Ok(Resolved::Cuda(ordinal)),
        },
    }
}

/// Resolve against this machine. `auto` never fails: a driver that is present but cannot be
/// initialised (no device, broken install) resolves to the CPU.
pub fn resolve(spec: DeviceSpec) -> Result<Resolved, CudaError> {
    let count = if spec == DeviceSpec::Cpu || !Cuda::available() {
        None
    } else {
        match Cuda::device_count() {
            Ok(n) => Some(n),
            Err(_) if spec == DeviceSpec::Auto => None,
            Err(e) => return Err(e),
        }
    };
    resolve_with(spec, count)
}

/// An opened CUDA device (its primary context). Cheap to clone.
#[derive(Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

impl Device {
    /// Open device `ordinal`. A clear error, never a panic, when CUDA is absent.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        let count = Cuda::device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("cuCtxCreate", e))?;
        Ok(Device { ctx })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))
    }

    /// Compute capability (major, minor), e.g. (9, 0) on Hopper.
    pub fn compute_capability(&self) -> Result<(u32, u32), CudaError> {
        let (a, b) = self
            .ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        Ok((a.max(0) as u32, b.max(0) as u32))
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<usize, CudaError> {
        self.ctx
            .total_mem()
            .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))
    }

    /// (free, total) device memory in bytes, as the driver sees it.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// Wait for all work on the device's context.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.ctx
            .synchronize()
            .map_err(|e| CudaError::driver("cuCtxSynchronize", e))
    }

    /// Make this device's context current on the calling thread (needed before raw driver calls).
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    /// The underlying cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The raw `CUdevice`.
    pub fn cu_device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Auto));
        assert_eq!(" CPU ".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cuda(0)));
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().ok(),
            Some(DeviceSpec::Cuda(3))
        );
        for bad in [
            "",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:1:2",
            "metal",
            "cuda:+1",
            "cuda:99999999999999999999999",
        ] {
            let e = bad.parse::<DeviceSpec>().err();
            assert!(
                matches!(e, Some(CudaError::BadDeviceSpec { .. })),
                "{bad:?} -> {e:?}"
            );
        }
        for s in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(7)] {
            assert_eq!(s.to_string().parse::<DeviceSpec>().ok(), Some(s));
        }
    }

    #[test]
    fn resolves() {
        assert_eq!(
            resolve_with(DeviceSpec::Auto, None).ok(),
            Some(Resolved::Cpu)
        );
        assert_eq!(
            resolve_with(DeviceSpec::Auto, Some(0)).ok(),
            Some(Resolved::Cpu)
        );
        assert_eq!(
            resolve_with(DeviceSpec::Auto, Some(2)).ok(),
            Some(Resolved::Cuda(0))
        );
        assert_eq!(
            resolve_with(DeviceSpec::Cpu, Some(2)).ok(),
            Some(Resolved::Cpu)
        );
        assert_eq!(
            resolve_with(DeviceSpec::Cuda(1), Some(2)).ok(),
            Some(Resolved::Cuda(1))
        );
        let e = resolve_with(DeviceSpec::Cuda(2), Some(2)).err();
        assert!(matches!(
            e,
            Some(CudaError::NoSuchDevice {
                ordinal: 2,
                count: 2
            })
        ));
        let e = resolve_with(DeviceSpec::Cuda(0), None)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("use --device cpu")));
    }

    #[test]
    fn open_without_cuda_is_an_error_not_a_panic() {
        if Cuda::available() {
            println!("CUDA present; absent-CUDA path not exercised");
            return;
        }
        let e = Device::open(0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("CUDA driver library not found"), "{e}");
        assert!(e.contains("(use --device cpu)"), "{e}");
        assert_eq!(resolve(DeviceSpec::Auto).ok(), Some(Resolved::Cpu));
        assert!(resolve(DeviceSpec::Cuda(0)).is_err());
    }
}
