//! Streaming GGUF v3 writer.
//!
//! Design choices:
//! - Two phases: [`GgufWriter`] collects metadata and tensor descriptions (name, dtype, shape)
//!   and lays out every tensor's offset up front; [`GgufWriter::start`] writes the header and
//!   returns a [`GgufDataWriter`] that takes the tensor data in order. Nothing but the header
//!   is held in memory, so a 17 GB file is written with a few MiB of RAM.
//! - Tensor data can be given whole ([`GgufDataWriter::write_tensor`]), in arbitrary pieces
//!   ([`GgufDataWriter::write_chunk`]), or produced by a closure filling fixed-size chunks
//!   ([`GgufDataWriter::write_tensor_with`]). Padding between tensors is written automatically.
//! - `general.alignment` is written (as u32) exactly when the alignment is not the default 32;
//!   a user-supplied `general.alignment` entry is replaced by the writer's value.
//! - The output is byte-compatible with the python `gguf` package's reader (checked in tests).

use std::collections::HashSet;
use std::io::Write;

use super::reader::{GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_MAX_DIMS};
use super::GgufValue;
use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// A tensor laid out by the writer.
#[derive(Clone, Debug)]
struct PlannedTensor {
    name: String,
    dtype: DType,
    /// File order: innermost first.
    dims: Vec<u64>,
    /// Offset relative to the start of the data section.
    rel_offset: u64,
    nbytes: u64,
}

/// Collects a GGUF file's header; see the module docs.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PlannedTensor>,
    names: HashSet<String>,
    /// Relative offset where the next tensor would start (aligned).
    next_offset: u64,
}

fn write_err(e: std::io::Error) -> FormatError {
    FormatError::Other(format!("write failed: {e}"))
}

impl GgufWriter {
    /// A writer for GGUF v3 with this data alignment (a nonzero power of two; checked by
    /// [`GgufWriter::start`]).
    pub fn new(alignment: u64) -> Self {
        GgufWriter {
            alignment,
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            next_offset: 0,
        }
    }

    fn alignment_ok(&self) -> bool {
        self.alignment != 0 && self.alignment.is_power_of_two()
    }

    /// Adds (or replaces) a metadata entry. Entries are written in the order first added.
    pub fn add_metadata(&mut self, key: &str, value: GgufValue) {
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key.to_string(), value));
        }
    }

    /// Declares the next tensor: `shape` is outermost first.
    pub fn add_tensor(&mut self, name: &str, dtype: DType, shape: &[u64]) -> Result<()> {
        let bad = |msg: String| FormatError::BadTensor {
            tensor: name.to_string(),
            msg,
        };
        if !self.alignment_ok() {
            return Err(FormatError::Other(format!(
                "alignment {} is not a nonzero power of two",
                self.alignment
            )));
        }
        if shape.len() > GGUF_MAX_DIMS as usize {
            return Err(bad(format!(
                "{} dimensions (at most {GGUF_MAX_DIMS})",
                shape.len()
            )));
        }
        if self.names.contains(name) {
            return Err(bad("duplicate tensor name".into()));
        }
        let nbytes = dtype.tensor_bytes(shape)?;
        let rel_offset = self.next_offset;
        let end = rel_offset
            .checked_add(nbytes)
            .ok_or_else(|| FormatError::Overflow(format!("tensor '{name}' offset")))?;
        let a = self.alignment;
        self.next_offset = end
            .checked_add(a - 1)
            .map(|v| v & !(a - 1))
            .ok_or_else(|| FormatError::Overflow(format!("tensor '{name}' offset")))?;
        self.names.insert(name.to_string());
        self.tensors.push(PlannedTensor {
            name: name.to_string(),
            dtype,
            dims: shape.iter().rev().copied().collect(),
            rel_offset,
            nbytes,
        });
        Ok(())
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Serialises the header (magic, version, counts, metadata, tensor infos, padding).
    pub fn header_bytes(&self) -> Result<Vec<u8>> {
        if !self.alignment_ok() {
            return Err(FormatError::Other(format!(
                "alignment {} is not a nonzero power of two",
                self.alignment
            )));
        }
        let mut meta: Vec<(&str, GgufValue)> = self
            .metadata
            .iter()
            .filter(|(k, _)| k != "general.alignment")
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if self.alignment != GGUF_DEFAULT_ALIGNMENT {
            let a = u32::try_from(self.alignment).map_err(|_| {
                FormatError::Other(format!("alignment {} does not fit u32", self.alignment))
            })?;
            meta.push(("general.alignment", GgufValue::U32(a)));
        }

        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v).map_err(|m| FormatError::Metadata(format!("key '{k}': {m}")))?;
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&t.rel_offset.to_le_bytes());
        }
        let a = self.alignment as usize;
        let padded = out.len().div_ceil(a) * a;
        out.resize(padded, 0);
        Ok(out)
    }

    /// Writes the header and returns the writer for tensor data.
    pub fn start<W: Write>(self, mut w: W) -> Result<GgufDataWriter<W>> {
        let header = self.header_bytes()?;
        w.write_all(&header).map_err(write_err)?;
        Ok(GgufDataWriter {
            w,
            alignment: self.alignment,
            tensors: self.tensors,
            index: 0,
            written: 0,
            data_pos: 0,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> std::result::Result<(), String> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array has no element to take a type from: it is written as u8.
            let elem_type = items.first().map_or(0, GgufValue::type_id);
            if items.iter().any(|i| i.type_id() != elem_type) {
                return Err("array elements of different types".into());
            }
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

/// Takes the tensor data, in the order the tensors were added.
pub struct GgufDataWriter<W: Write> {
    w: W,
    alignment: u64,
    tensors: Vec<PlannedTensor>,
    /// Index of the tensor being written.
    index: usize,
    /// Bytes of the current tensor written so far.
    written: u64,
    /// Bytes of the data section written so far (including padding).
    data_pos: u64,
}

impl<W: Write> GgufDataWriter<W> {
    /// Name, dtype and byte size of the tensor the next bytes belong to (`None` when done).
    pub fn current(&self) -> Option<(&str, DType, u64)> {
        self.tensors
            .get(self.index)
            .map(|t| (t.name.as_str(), t.dtype, t.nbytes))
    }

    /// Writes the whole data of the next tensor; `bytes.len()` must equal its size.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.tensors.get(self.index).ok_or_else(|| {
            FormatError::Other("write_tensor: all tensors are already written".into())
        })?;
        if self.written != 0 {
            return Err(FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: "write_tensor called while the tensor is partly written".into(),
            });
        }
        if bytes.len() as u64 != t.nbytes {
            return Err(FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: format!("got {} bytes, expected {}", bytes.len(), t.nbytes),
            });
        }
        self.write_chunk(bytes)
    }

    /// Appends bytes to the current tensor; when it is complete, pads and moves to the next.
    /// A chunk may not run past the end of the current tensor.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.tensors.get(self.index).ok_or_else(|| {
            FormatError::Other("write_chunk: all tensors are already written".into())
        })?;
        let (rel_offset, nbytes) = (t.rel_offset, t.nbytes);
        let left = nbytes - self.written;
        if bytes.len() as u64 > left {
            return Err(FormatError::BadTensor {
                tensor: t.name.clone(),
                msg: format!("chunk of {} bytes but only {left} remain", bytes.len()),
            });
        }
        if self.written == 0 {
            // Pad up to this tensor's offset.
            let pad = rel_offset.saturating_sub(self.data_pos);
            self.pad(pad)?;
        }
        self.w.write_all(bytes).map_err(write_err)?;
        self.written += bytes.len() as u64;
        self.data_pos += bytes.len() as u64;
        if self.written == nbytes {
            self.index += 1;
            self.written = 0;
            // Pad after each tensor (as python gguf does), so the file ends aligned.
            let a = self.alignment;
            let pad = self.data_pos.div_ceil(a) * a - self.data_pos;
            self.pad(pad)?;
        }
        Ok(())
    }

    /// Writes the next tensor by calling `fill(offset_in_tensor, chunk)` on successive chunks
    /// of at most `chunk_size` bytes, reusing one buffer.
    pub fn write_tensor_with<F>(&mut self, chunk_size: usize, mut fill: F) -> Result<()>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        let (name, nbytes) = match self.tensors.get(self.index) {
            Some(t) => (t.name.clone(), t.nbytes),
            None => {
                return Err(FormatError::Other(
                    "write_tensor_with: all tensors are already written".into(),
                ))
            }
        };
        if self.written != 0 || chunk_size == 0 {
            return Err(FormatError::BadTensor {
                tensor: name,
                msg: "write_tensor_with: tensor partly written or chunk size 0".into(),
            });
        }
        if nbytes == 0 {
            return self.write_chunk(&[]);
        }
        let cap = usize::try_from(nbytes).map_or(chunk_size, |n| n.min(chunk_size));
        let mut buf = vec![0u8; cap];
        let mut off = 0u64;
        while off < nbytes {
            let n = usize::try_from(nbytes - off).map_or(cap, |r| r.min(cap));
            let chunk = &mut buf[..n];
            fill(off, chunk)?;
            self.write_chunk(chunk)?;
            off += n as u64;
        }
        Ok(())
    }

    fn pad(&mut self, n: u64) -> Result<()> {
        const ZEROS: [u8; 256] = [0; 256];
        let mut n = n;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.w.write_all(&ZEROS[..k]).map_err(write_err)?;
            n -= k as u64;
            self.data_pos += k as u64;
        }
        Ok(())
    }

    /// Checks that every tensor was written, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.tensors.get(self.index) {
            return Err(FormatError::MissingTensor(format!(
                "{} (and {} more) not written: {} of {} bytes",
                t.name,
                self.tensors.len() - self.index - 1,
                self.written,
                t.nbytes
            )));
        }
        self.w.flush().map_err(write_err)?;
        Ok(self.w)
    }
}
