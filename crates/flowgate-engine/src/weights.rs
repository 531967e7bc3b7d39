//! Loading a model's tensors into host memory: [`HostTensor`] and [`load_all`].
//!
//! Every tensor of the catalog is read with [`flowgate_io::Loader::load_host`]: each run of
//! wanted tensors of a file lands in one arena laid out like the file (aligned direct reads
//! straight into place, nothing copied), and each tensor is a view of its arena. A
//! [`HostTensor`] shares its bytes (an `Arc` of the buffer and a range); its views
//! (`slice_outer`) share them too, so merged expert tensors are read once and handed to experts
//! as zero-copy slices. Loaded tensors keep their file alignment in memory (32 bytes for GGUF).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use flowgate_formats::{DType, TensorCatalog, TensorInfo};
use flowgate_io::{AlignedBuf, ReadRequest};

use crate::error::{EngineError, Result};

/// A tensor's bytes in host memory (possibly a view into a larger read).
#[derive(Clone)]
pub struct HostTensor {
    pub name: String,
    pub dtype: DType,
    /// Outermost first.
    pub shape: Vec<usize>,
    buf: Arc<AlignedBuf>,
    range: Range<usize>,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostTensor({} {} {:?})",
            self.name, self.dtype, self.shape
        )
    }
}

impl HostTensor {
    /// Wraps owned bytes.
    pub fn new(name: &str, dtype: DType, shape: Vec<usize>, buf: Arc<AlignedBuf>) -> Result<Self> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let need = dtype.tensor_bytes(&dims)? as usize;
        if need != buf.len() {
            return Err(EngineError::Weight {
                tensor: name.into(),
                msg: format!(
                    "{} bytes for shape {shape:?} {dtype}, expected {need}",
                    buf.len()
                ),
            });
        }
        let len = buf.len();
        Ok(HostTensor {
            name: name.into(),
            dtype,
            shape,
            buf,
            range: 0..len,
        })
    }

    /// A view of `shape` at byte `offset` of a shared buffer (e.g. an expert cache slot).
    pub fn view(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        buf: Arc<AlignedBuf>,
        offset: usize,
    ) -> Result<Self> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let need = dtype.tensor_bytes(&dims)? as usize;
        let end = offset.checked_add(need).filter(|&e| e <= buf.len());
        let Some(end) = end else {
            return Err(EngineError::Weight {
                tensor: name.into(),
                msg: format!(
                    "view of {need} bytes at {offset} past a {}-byte buffer",
                    buf.len()
                ),
            });
        };
        Ok(HostTensor {
            name: name.into(),
            dtype,
            shape,
            buf,
            range: offset..end,
        })
    }

    /// A tensor of f32 values (tests, derived tensors).
    pub fn from_f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Result<Self> {
        let mut b = AlignedBuf::zeroed(v.len() * 4)
            .ok_or_else(|| EngineError::Invalid("allocation failed".into()))?;
        for (d, x) in b.chunks_exact_mut(4).zip(v) {
            d.copy_from_slice(&x.to_le_bytes());
        }
        HostTensor::new(name, DType::F32, shape, Arc::new(b))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }

    /// The buffer holding the bytes (shared by the views of one loader arena).
    pub fn storage(&self) -> &Arc<AlignedBuf> {
        &self.buf
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Slice `i` along the outermost dimension, sharing the bytes.
    pub fn slice_outer(&self, i: usize) -> Result<HostTensor> {
        let outer = *self.shape.first().unwrap_or(&0);
        if i >= outer {
            return Err(EngineError::Weight {
                tensor: self.name.clone(),
                msg: format!("slice {i} of {outer}"),
            });
        }
        let step = self.range.len() / outer;
        Ok(HostTensor {
            name: format!("{}[{i}]", self.name),
            dtype: self.dtype,
            shape: self.shape[1..].to_vec(),
            buf: self.buf.clone(),
            range: self.range.start + i * step..self.range.start + (i + 1) * step,
        })
    }

    /// All values as f32 (norm weights, biases, routers: small tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel()];
        flowgate_formats::quant::dequantize_row(self.dtype, self.bytes(), &mut out)?;
        Ok(out)
    }
}

/// Reads every tensor of `catalog` into host memory with flowgate-io's loader; `progress`, if
/// given, is called with the bytes delivered so far.
pub fn load_all(
    catalog: &TensorCatalog,
    threads: usize,
    progress: Option<flowgate_io::Progress>,
) -> Result<HashMap<String, HostTensor>> {
    load_selected(catalog, |_| true, threads, progress)
}

/// Like [`load_all`], for the tensors `keep` accepts (e.g. all but the paged experts), in
/// anonymous memory (budgeted loads: what `--ram-budget` counts stays resident, never page
/// cache the kernel may drop).
pub fn load_selected(
    catalog: &TensorCatalog,
    keep: impl Fn(&TensorInfo) -> bool,
    threads: usize,
    progress: Option<flowgate_io::Progress>,
) -> Result<HashMap<String, HostTensor>> {
    let infos: Vec<&TensorInfo> = catalog.iter().filter(|t| keep(t)).collect();
    load_views(catalog, infos, threads, progress, Some(false))
}

/// Like [`load_all`], always copying into fresh anonymous memory (never mapping the page
/// cache): for host memory that will be page-locked (`cuMemHostRegister`), where a private
/// file mapping would be copied page by page on registration, if accepted at all.
pub fn load_all_anonymous(
    catalog: &TensorCatalog,
    threads: usize,
    progress: Option<flowgate_io::Progress>,
) -> Result<HashMap<String, HostTensor>> {
    load_views(
        catalog,
        catalog.iter().collect(),
        threads,
        progress,
        Some(false),
    )
}

fn load_views(
    catalog: &TensorCatalog,
    infos: Vec<&TensorInfo>,
    threads: usize,
    progress: Option<flowgate_io::Progress>,
    map_cached: Option<bool>,
) -> Result<HashMap<String, HostTensor>> {
    let reqs: Vec<ReadRequest> = infos
        .iter()
        .map(|t| ReadRequest {
            file: t.file,
            offset: t.offset,
            len: t.nbytes as usize,
        })
        .collect();
    let defaults = flowgate_io::LoaderOptions::default();
    let loader = flowgate_io::Loader::new(flowgate_io::LoaderOptions {
        threads,
        progress,
        map_cached: map_cached.unwrap_or(defaults.map_cached),
        ..defaults
    });
    let (views, _) = loader.load_host(&catalog.files, &reqs)?;
    let mut out = HashMap::with_capacity(infos.len());
    for (t, v) in infos.into_iter().zip(views) {
        let shape = t.shape.iter().map(|&d| d as usize).collect();
        out.insert(
            t.name.clone(),
            HostTensor::view(&t.name, t.dtype, shape, v.arena().clone(), v.range().start)?,
        );
    }
    Ok(out)
}
