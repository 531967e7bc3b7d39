//! cuBLAS, through cudarc's handle, on flowgate's own buffers.
//!
//! Only what the backend needs first: a row-major single-precision GEMM on [`DeviceBuffer`]s.
//! cuBLAS is column-major; a row-major `C = A·B` is computed as the column-major
//! `Cᵀ = Bᵀ·Aᵀ`, which reads the same bytes with no transposition. The handle is bound to one
//! [`Stream`]; the GEMM is queued there and the caller synchronises before reading `C`.

use cudarc::cublas::{sys as bsys, CudaBlas};

use crate::device::Cuda;
use crate::error::CudaError;
use crate::memory::DeviceBuffer;
use crate::stream::Stream;

/// A cuBLAS handle bound to a stream.
#[derive(Debug)]
pub struct Blas {
    inner: CudaBlas,
}

fn blas_err(op: &'static str, e: cudarc::cublas::result::CublasError) -> CudaError {
    CudaError::Driver {
        op,
        msg: format!("{e:?}"),
    }
}

impl Blas {
    /// A handle whose work goes to `stream`. Errors (no panic) when libcublas is absent.
    pub fn new(stream: &Stream) -> Result<Blas, CudaError> {
        if !Cuda::cublas_available() {
            return Err(CudaError::LibraryNotFound {
                what: "cuBLAS",
                tried: "libcublas.so, libcublas.so.13 (CUDA toolkit lib dir on LD_LIBRARY_PATH)"
                    .into(),
            });
        }
        let inner = CudaBlas::new(stream.raw().clone()).map_err(|e| blas_err("cublasCreate", e))?;
        Ok(Blas { inner })
    }

    /// Lets later SGEMMs on this handle use TF32 tensor cores (inputs rounded to a 10-bit
    /// mantissa, f32 accumulation: about 3e-4 relative error) or keeps them in plain FP32.
    pub fn set_tf32(&self, on: bool) -> Result<(), CudaError> {
        let mode = if on {
            bsys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            bsys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live for as long as `self`; the call only sets a field of it.
        let st = unsafe { bsys::cublasSetMathMode(*self.inner.handle(), mode) };
        if st == bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(CudaError::Driver {
                op: "cublasSetMathMode",
                msg: format!("{st:?}"),
            })
        }
    }

    /// Column-major `C = op(A) · op(B)` on raw device addresses (cuBLAS's own convention:
    /// `C` is `m×n` with leading dimension `ldc`; `op(X)` is `X` or `Xᵀ`), queued on the
    /// handle's stream. For callers that address sub-matrices (tiles, strided outputs).
    ///
    /// # Safety
    /// Every operand must be live device memory of the handle's context covering the extent
    /// that `m, n, k` and the leading dimensions describe, and `c` must not be read or written
    /// by anything else until the stream has run the GEMM.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sgemm_raw(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        c: u64,
        ldc: usize,
    ) -> Result<(), CudaError> {
        let dim = |v: usize| {
            i32::try_from(v)
                .ok()
                .filter(|&d| d > 0)
                .ok_or_else(|| CudaError::InvalidArgument(format!("GEMM dimension {v}")))
        };
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        cudarc::cublas::result::sgemm(
            *self.inner.handle(),
            op(trans_a),
            op(trans_b),
            dim(m)?,
            dim(n)?,
            dim(k)?,
            &alpha,
            a as *const f32,
            dim(lda)?,
            b as *const f32,
            dim(ldb)?,
            &beta,
            c as *mut f32,
            dim(ldc)?,
        )
        .map_err(|e| blas_err("cublasSgemm", e))
    }

    /// Row-major f32 `C[m×n] = A[m×k] · B[k×n]`, queued on the handle's stream.
    pub fn sgemm_row_major(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        c: &mut DeviceBuffer,
    ) -> Result<(), CudaError> {
        let dim = |v: usize| {
            i32::try_from(v)
                .ok()
                .filter(|&d| d > 0)
                .ok_or_else(|| CudaError::InvalidArgument(format!("GEMM dimension {v}")))
        };
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        let need = |rows: usize, cols: usize, buf: &DeviceBuffer, what: &str| match rows
            .checked_mul(cols)
            .and_then(|e| e.checked_mul(4))
        {
            Some(bytes) if bytes <= buf.len() => Ok(()),
            _ => Err(CudaError::InvalidArgument(format!(
                "GEMM operand {what} ({rows}×{cols} f32) does not fit its {}-byte buffer",
                buf.len()
            ))),
        };
        need(m, k, a, "A")?;
        need(k, n, b, "B")?;
        need(m, n, c, "C")?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: dimensions are positive and each operand's extent was checked against its
        // allocation; the pointers are device addresses owned by live DeviceBuffers, and C is
        // borrowed mutably so no other host-side access aliases it during the call.
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.inner.handle(),
                bsys::cublasOperation_t::CUBLAS_OP_N,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha,
                b.ptr() as *const f32,
                ni,
                a.ptr() as *const f32,
                ki,
                &beta,
                c.ptr() as *mut f32,
                ni,
            )
        }
        .map_err(|e| blas_err("cublasSgemm", e))
    }
}
