//! Run-time kernel compilation with an on-disk cache.
//!
//! Kernels are CUDA C sources embedded in the binary (`include_str!`). On first use NVRTC
//! compiles one to PTX for the device's own virtual architecture
//! (`--gpu-architecture=compute_XY` from its compute capability, so the driver's JIT then makes
//! machine code for exactly that chip); the PTX is written to
//! `$XDG_CACHE_HOME/flowgate/kernels` (or `~/.cache/flowgate/kernels`) under a file name that is
//! a hash of source, options, architecture and CUDA version, so any change recompiles and stale
//! entries are never read. Writes go to a temporary file renamed into place, so concurrent
//! processes never see half a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::device::{require_nvrtc, Device};
use crate::error::CudaError;

const KEY_VERSION: &str = "flowgate-kernels-v1;cuda-13000";

/// Where compiled kernels are cached by default.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("flowgate").join("kernels");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h)
            .join(".cache")
            .join("flowgate")
            .join("kernels");
    }
    std::env::temp_dir().join("flowgate").join("kernels")
}

fn fnv1a64(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = seed;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so that ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache key (32 hex digits) of a source compiled with `options` for `arch`.
pub fn cache_key(source: &str, options: &[String], arch: &str) -> String {
    let mut parts: Vec<&[u8]> = vec![KEY_VERSION.as_bytes(), arch.as_bytes(), source.as_bytes()];
    parts.extend(options.iter().map(|o| o.as_bytes()));
    let a = fnv1a64(0xcbf2_9ce4_8422_2325, &parts);
    let b = fnv1a64(0x6c62_272e_07bb_0142, &parts);
    format!("{a:016x}{b:016x}")
}

/// Whether a module came from the disk cache or a fresh compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache.
    Hit,
    /// Compiled by NVRTC (and written to the cache).
    Compiled,
}

/// NVRTC compiler with a disk cache, for one device.
#[derive(Debug, Clone)]
pub struct KernelCache {
    device: Device,
    dir: PathBuf,
}

/// A loaded module.
#[derive(Debug, Clone)]
pub struct Module {
    inner: Arc<CudaModule>,
    /// Where the module's PTX came from.
    pub outcome: CacheOutcome,
    /// The cache file.
    pub path: PathBuf,
}

/// A kernel function of a loaded module; launch it with `stream.raw().launch_builder(k.function())`.
#[derive(Debug, Clone)]
pub struct Kernel {
    inner: CudaFunction,
}

impl Kernel {
    /// The cudarc function.
    pub fn function(&self) -> &CudaFunction {
        &self.inner
    }

    /// Lets launches of this kernel use up to `bytes` of dynamic shared memory (above the
    /// default 48 KiB, up to the device's opt-in limit: 227 KiB on Hopper).
    pub fn allow_dynamic_shared(&self, bytes: usize) -> Result<(), CudaError> {
        let bytes = i32::try_from(bytes)
            .map_err(|_| CudaError::InvalidArgument(format!("{bytes} bytes of shared memory")))?;
        self.inner
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .map_err(|e| CudaError::driver("cuFuncSetAttribute", e))
    }
}

impl Module {
    /// Look up a `extern "C" __global__` function by name.
    pub fn function(&self, name: &str) -> Result<Kernel, CudaError> {
        if name.contains('\0') {
            return Err(CudaError::InvalidArgument(
                "kernel name contains NUL".into(),
            ));
        }
        let inner = self
            .inner
            .load_function(name)
            .map_err(|e| CudaError::driver("cuModuleGetFunction", e))?;
        Ok(Kernel { inner })
    }
}

impl KernelCache {
    /// A cache in [`default_cache_dir`].
    pub fn new(device: &Device) -> KernelCache {
        Self::with_dir(device, default_cache_dir())
    }

    /// A cache in `dir`.
    pub fn with_dir(device: &Device, dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache {
            device: device.clone(),
            dir: dir.into(),
        }
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `compute_XY` architecture of the device.
    pub fn arch(&self) -> Result<String, CudaError> {
        let (maj, min) = self.device.compute_capability()?;
        Ok(format!("compute_{maj}{min}"))
    }

    /// Compile (or fetch from the cache) `source` with extra NVRTC `options`, and load it.
    pub fn load(&self, name: &str, source: &str, options: &[String]) -> Result<Module, CudaError> {
        if source.contains('\0') || name.contains('\0') {
            return Err(CudaError::InvalidArgument(
                "kernel source or name contains NUL".into(),
            ));
        }
        let arch = self.arch()?;
        let mut opts = vec![format!("--gpu-architecture={arch}")];
        opts.extend(options.iter().cloned());
        let key = cache_key(source, &opts, &arch);
        let path = self.dir.join(format!("{name}-{arch}-{key}.ptx"));
        // A cache entry that is unreadable, truncated or rejected by the driver is treated as a
        // miss and overwritten: the cache can only ever cost a recompile, never an error.
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.contains(".entry") && !text.contains('\0') {
                if let Ok(inner) = self.device.context().load_module(Ptx::from_src(text)) {
                    return Ok(Module {
                        inner,
                        outcome: CacheOutcome::Hit,
                        path,
                    });
                }
            }
        }
        let text = self.compile(name, source, &opts)?;
        self.store(&path, &text)?;
        let inner = self
            .device
            .context()
            .load_module(Ptx::from_src(text))
            .map_err(|e| CudaError::driver("cuModuleLoadData", e))?;
        Ok(Module {
            inner,
            outcome: CacheOutcome::Compiled,
            path,
        })
    }

    fn compile(&self, name: &str, source: &str, opts: &[String]) -> Result<String, CudaError> {
        require_nvrtc()?;
        let co = CompileOptions {
            options: opts.to_vec(),
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        let ptx =
            cudarc::nvrtc::compile_ptx_with_opts(source, co).map_err(|e| CudaError::Compile {
                name: name.to_string(),
                log: format!("{e:?}"),
            })?;
        Ok(ptx.to_src())
    }

    fn store(&self, path: &Path, text: &str) -> Result<(), CudaError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CudaError::Io { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_everything() {
        let o = vec!["--use_fast_math".to_string()];
        let k = cache_key("src", &o, "compute_90");
        assert_eq!(k.len(), 32);
        assert_eq!(k, cache_key("src", &o, "compute_90"));
        assert_ne!(k, cache_key("src ", &o, "compute_90"));
        assert_ne!(k, cache_key("src", &[], "compute_90"));
        assert_ne!(k, cache_key("src", &o, "compute_89"));
        // Boundaries between parts matter.
        assert_ne!(
            cache_key("a", &["bc".to_string()], "x"),
            cache_key("ab", &["c".to_string()], "x")
        );
    }

    #[test]
    fn smoke_source_is_embedded() {
        assert!(crate::SMOKE_CU.contains("__global__ void axpy"));
        assert!(!crate::SMOKE_CU.contains('\0'));
    }
}
