//! GGUF header reader: magic, version, metadata key/values, tensor infos.
//!
//! Design choices:
//! - Only the header is read (through a `BufReader`), never tensor data: a 17 GB file opens in
//!   microseconds and the engine maps or streams the data itself using [`GgufTensor::offset`].
//! - Every count and length read from the file is untrusted. Before anything is allocated or
//!   read, it is checked against the bytes that remain in the file (each element of a count
//!   takes at least a known number of bytes), so hostile input yields [`FormatError`] and
//!   never a panic, a hang or a huge allocation. Nested arrays are limited in depth so that
//!   recursion cannot overflow the stack.
//! - All tensor sizes are computed with checked arithmetic; each tensor must be aligned, lie
//!   inside the file, not overlap another, and have rows that are a whole number of blocks.
//! - Strings in metadata values are decoded lossily (some real vocabularies hold invalid
//!   UTF-8); keys and tensor names must be valid UTF-8.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::GgufValue;
use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (GGML_MAX_DIMS).
pub const GGUF_MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays accepted in metadata.
pub const GGUF_MAX_ARRAY_DEPTH: u32 = 8;

/// One tensor's description from the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    pub name: String,
    pub dtype: DType,
    /// Dimensions as stored in the file: `ne[0]` (innermost, contiguous) first.
    pub dims: Vec<u64>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Byte length of the tensor's data.
    pub nbytes: u64,
}

impl GgufTensor {
    /// Shape outermost first (PyTorch order): `dims` reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    pub path: Option<PathBuf>,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order (keys are unique).
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order (names are unique).
    pub tensors: Vec<GgufTensor>,
    /// Absolute offset of the (aligned) start of the data section.
    pub data_offset: u64,
    pub file_len: u64,
}

/// Reads little-endian values while tracking the position and the bytes left in the file.
struct HeaderReader<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> HeaderReader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, needed: u64) -> FormatError {
        FormatError::Truncated {
            offset: self.pos,
            needed,
            len: self.len,
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        if (N as u64) > self.remaining() {
            return Err(self.truncated(N as u64));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.io_err(e, N as u64))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn io_err(&self, e: std::io::Error, needed: u64) -> FormatError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.truncated(needed)
        } else {
            FormatError::Other(format!("read error at offset {}: {e}", self.pos))
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A length-prefixed byte string; the length is checked against the remaining bytes.
    fn raw_string(&mut self) -> Result<Vec<u8>> {
        let n = self.u64()?;
        if n > self.remaining() {
            return Err(self.truncated(n));
        }
        // n <= remaining <= file length, so this allocation is bounded by the file size.
        let mut buf = Vec::new();
        (&mut self.r)
            .take(n)
            .read_to_end(&mut buf)
            .map_err(|e| self.io_err(e, n))?;
        if buf.len() as u64 != n {
            return Err(self.truncated(n));
        }
        self.pos += n;
        Ok(buf)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        String::from_utf8(self.raw_string()?)
            .map_err(|_| FormatError::Metadata(format!("{what} at offset {at} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => match self.u8()? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(FormatError::Metadata(format!(
                        "bool value {b} at offset {} (must be 0 or 1)",
                        self.pos - 1
                    )))
                }
            },
            8 => GgufValue::String(String::from_utf8_lossy(&self.raw_string()?).into_owned()),
            9 => {
                if depth >= GGUF_MAX_ARRAY_DEPTH {
                    return Err(FormatError::Metadata(format!(
                        "arrays nested deeper than {GGUF_MAX_ARRAY_DEPTH} at offset {}",
                        self.pos
                    )));
                }
                let elem_type = self.u32()?;
                let min = min_value_size(elem_type).ok_or_else(|| {
                    FormatError::Metadata(format!(
                        "unknown array element type {elem_type} at offset {}",
                        self.pos - 4
                    ))
                })?;
                let count = self.u64()?;
                let max_count = self.remaining() / min;
                if count > max_count {
                    return Err(self.truncated(count.saturating_mul(min)));
                }
                // count * min <= remaining bytes; the initial capacity is also capped, since
                // a value takes more memory than its bytes in the file.
                let mut items = Vec::with_capacity(count.min(PREALLOC_CAP) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            t => {
                return Err(FormatError::Metadata(format!(
                    "unknown value type {t} at offset {}",
                    self.pos - 4
                )))
            }
        })
    }
}

/// Fewest bytes a value of this type takes in the file; `None` for unknown types.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

/// Most elements reserved up front for any count read from the file.
const PREALLOC_CAP: u64 = 4096;

/// Fewest bytes of one key/value pair: key length, one key byte, type id, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes of one tensor info: name length, n_dims, type id, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

fn align_up(x: u64, align: u64) -> Option<u64> {
    // align is a nonzero power of two.
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl GgufFile {
    /// Opens a GGUF file and reads its header (not the tensor data).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let f = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let len = f.metadata().map_err(|e| FormatError::io(path, e))?.len();
        let mut g = GgufFile::parse(f, len).map_err(|e| match e {
            FormatError::Other(msg) => FormatError::Other(format!("{}: {msg}", path.display())),
            e => e,
        })?;
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Parses a header from `r` (rewound to its start) of a file of `file_len` bytes.
    pub fn parse<R: Read + Seek>(mut r: R, file_len: u64) -> Result<GgufFile> {
        r.seek(SeekFrom::Start(0))
            .map_err(|e| FormatError::Other(format!("seek failed: {e}")))?;
        Self::parse_stream(BufReader::with_capacity(1 << 16, r), file_len)
    }

    /// Parses a whole file held in memory (tests, fuzzing).
    pub fn parse_bytes(bytes: &[u8]) -> Result<GgufFile> {
        Self::parse_stream(bytes, bytes.len() as u64)
    }

    fn parse_stream<R: Read>(r: R, file_len: u64) -> Result<GgufFile> {
        let mut h = HeaderReader {
            r,
            pos: 0,
            len: file_len,
        };
        let magic: [u8; 4] = h.bytes()?;
        if magic != GGUF_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = h.u32()?;
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let n_tensors = h.u64()?;
        let n_kv = h.u64()?;
        if n_kv > h.remaining() / MIN_KV_BYTES {
            return Err(FormatError::Other(format!(
                "GGUF header claims {n_kv} metadata entries but only {} bytes remain",
                h.remaining()
            )));
        }
        if n_tensors > h.remaining() / MIN_TENSOR_INFO_BYTES {
            return Err(FormatError::Other(format!(
                "GGUF header claims {n_tensors} tensors but only {} bytes remain",
                h.remaining()
            )));
        }

        // Both counts are bounded by the file size (checked above); vectors grow as entries
        // are actually read.
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_CAP) as usize);
        let mut keys = HashSet::new();
        for _ in 0..n_kv {
            let key = h.strict_string("metadata key")?;
            let t = h.u32()?;
            let value = h.value(t, 0).map_err(|e| match e {
                FormatError::Metadata(m) => FormatError::Metadata(format!("key '{key}': {m}")),
                e => e,
            })?;
            if !keys.insert(key.clone()) {
                return Err(FormatError::Metadata(format!("duplicate key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a != 0 && a.is_power_of_two() && !matches!(v, GgufValue::Bool(_)) => a,
                _ => {
                    return Err(FormatError::Metadata(format!(
                        "general.alignment = {v:?} is not a nonzero power of two"
                    )))
                }
            },
        };

        let mut raw = Vec::with_capacity(n_tensors.min(PREALLOC_CAP) as usize);
        let mut names = HashSet::new();
        for _ in 0..n_tensors {
            let name = h.strict_string("tensor name")?;
            let n_dims = h.u32()?;
            if n_dims > GGUF_MAX_DIMS {
                return Err(FormatError::BadTensor {
                    tensor: name,
                    msg: format!("{n_dims} dimensions (at most {GGUF_MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(h.u64()?);
            }
            let type_id = h.u32()?;
            let rel_offset = h.u64()?;
            let dtype = DType::from_ggml_id(type_id).ok_or_else(|| FormatError::UnknownDType {
                tensor: name.clone(),
                id: type_id,
            })?;
            if !names.insert(name.clone()) {
                return Err(FormatError::BadTensor {
                    tensor: name,
                    msg: "duplicate tensor name".into(),
                });
            }
            raw.push((name, dtype, dims, rel_offset));
        }

        let data_offset = align_up(h.pos, alignment)
            .ok_or_else(|| FormatError::Overflow("data section offset".into()))?;

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dtype, dims, rel_offset) in raw {
            let nbytes = tensor_nbytes(&name, dtype, &dims)?;
            if !rel_offset.is_multiple_of(alignment) {
                return Err(FormatError::BadTensor {
                    tensor: name,
                    msg: format!(
                        "data offset {rel_offset} is not a multiple of the alignment {alignment}"
                    ),
                });
            }
            let start = data_offset.checked_add(rel_offset).ok_or_else(|| {
                FormatError::Overflow(format!("tensor '{name}' offset {rel_offset}"))
            })?;
            let end = start
                .checked_add(nbytes)
                .ok_or_else(|| FormatError::Overflow(format!("tensor '{name}' end offset")))?;
            if end > file_len {
                return Err(FormatError::OutOfBounds {
                    tensor: name,
                    start,
                    end,
                    len: file_len,
                });
            }
            tensors.push(GgufTensor {
                name,
                dtype,
                dims,
                offset: start,
                nbytes,
            });
        }

        // No two tensors may share bytes.
        let mut spans: Vec<(u64, u64, usize)> = tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.nbytes > 0)
            .map(|(i, t)| (t.offset, t.offset + t.nbytes, i))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if let [(_, end_a, a), (start_b, _, b)] = *w {
                if start_b < end_a {
                    return Err(FormatError::BadTensor {
                        tensor: tensors[b].name.clone(),
                        msg: format!("data overlaps tensor '{}'", tensors[a].name),
                    });
                }
            }
        }

        Ok(GgufFile {
            path: None,
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
            file_len,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn need(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| FormatError::MissingKey(key.to_string()))
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.need(key)?;
        v.as_u64()
            .ok_or_else(|| type_err(key, v, "a non-negative integer"))
    }

    /// A float or integer value, as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.need(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| type_err(key, v, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.need(key)?;
        v.as_str().ok_or_else(|| type_err(key, v, "a string"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.need(key)?;
        v.as_bool().ok_or_else(|| type_err(key, v, "a bool"))
    }

    fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        let v = self.need(key)?;
        v.as_array().ok_or_else(|| type_err(key, v, "an array"))
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| type_err(key, v, "an array of strings"))
            })
            .collect()
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| type_err(key, v, "an array of numbers"))
            })
            .collect()
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| type_err(key, v, "an array of i32"))
            })
            .collect()
    }

    /// A tensor by its name in the file.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

fn type_err(key: &str, v: &GgufValue, expected: &str) -> FormatError {
    let shown = match v {
        GgufValue::Array(a) => format!("an array of {} values", a.len()),
        GgufValue::String(s) if s.len() > 64 => "a long string".to_string(),
        v => format!("{v:?}"),
    };
    FormatError::Metadata(format!("key '{key}' is {shown}, expected {expected}"))
}

/// Byte size of a tensor from its file dims, with checked arithmetic.
fn tensor_nbytes(name: &str, dtype: DType, dims: &[u64]) -> Result<u64> {
    // The product of the dims (zeros counted as ones, so that no order of multiplication can
    // overflow) must fit ggml's int64 element count.
    let overflow = || FormatError::Overflow(format!("tensor '{name}' dims {dims:?}"));
    let numel = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d.max(1)))
        .ok_or_else(overflow)?;
    if numel > i64::MAX as u64 {
        return Err(overflow());
    }
    let row = dims.first().copied().unwrap_or(1);
    let bs = dtype.block_size() as u64;
    if !row.is_multiple_of(bs) {
        return Err(FormatError::BadTensor {
            tensor: name.to_string(),
            msg: format!(
                "row length {row} is not a multiple of the {} block size {bs}",
                dtype.name()
            ),
        });
    }
    let shape: Vec<u64> = dims.iter().rev().copied().collect();
    dtype.tensor_bytes(&shape).map_err(|e| match e {
        FormatError::Overflow(_) => FormatError::Overflow(format!("tensor '{name}' byte size")),
        e => e,
    })
}
