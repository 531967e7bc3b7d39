//! The crate's error type. Driver errors carry the name of the operation that failed, so a
//! message reads "cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY" rather than a bare code.

use std::path::PathBuf;

/// Everything that can go wrong in flowgate-cuda.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver (or NVRTC) library could not be opened.
    #[error("CUDA {what} library not found: tried {tried} (use --device cpu)")]
    LibraryNotFound {
        /// "driver" or "NVRTC".
        what: &'static str,
        /// The file names that were tried.
        tried: String,
    },
    /// A device string that does not parse.
    #[error("bad device '{input}': {reason} (expected auto, cpu, cuda or cuda:N)")]
    BadDeviceSpec {
        /// What was given.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A device ordinal past the number of devices.
    #[error("no CUDA device {ordinal}: {count} device(s) present")]
    NoSuchDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("{op}: {msg}")]
    Driver {
        /// The driver call.
        op: &'static str,
        /// The driver's error.
        msg: String,
    },
    /// An allocation would exceed the device memory budget.
    #[error("device memory budget exceeded: {requested} B requested, {in_use} B in use, budget {budget} B")]
    BudgetExceeded {
        /// Bytes asked for.
        requested: u64,
        /// Bytes in use at the time.
        in_use: u64,
        /// The budget.
        budget: u64,
    },
    /// NVRTC rejected a source.
    #[error("NVRTC compile of '{name}' failed: {log}")]
    Compile {
        /// Program name.
        name: String,
        /// NVRTC's log (or error).
        log: String,
    },
    /// Bad argument (slot out of range, copy past the end, zero size, overflow).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Kernel cache I/O.
    #[error("kernel cache {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl CudaError {
    pub(crate) fn driver(op: &'static str, e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver {
            op,
            msg: e.to_string(),
        }
    }
}

/// Turn a raw `CUresult` into a `Result`, naming the call.
pub(crate) fn check(op: &'static str, r: cudarc::driver::sys::CUresult) -> Result<(), CudaError> {
    r.result().map_err(|e| CudaError::driver(op, e))
}
