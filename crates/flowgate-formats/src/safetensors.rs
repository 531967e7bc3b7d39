//! safetensors headers: the 8-byte little-endian header length, then a JSON object mapping each
//! tensor name to `{dtype, shape, data_offsets}` (offsets relative to the end of the header).
//!
//! Design choices:
//! - Hand-parsed with `serde_json` rather than the `safetensors` crate: only the header is
//!   needed (never the data), and this is a fuzzed surface, so every check is explicit here.
//! - The header length is capped at [`MAX_HEADER_LEN`] and at what the file holds *before*
//!   anything is allocated, so hostile bytes cannot make us allocate more than the input.
//!   `serde_json` limits nesting depth (128), so deep JSON cannot overflow the stack.
//! - Offsets are turned into absolute file offsets; every tensor must lie inside the file, its
//!   byte length must equal `numel * size_of(dtype)` (checked arithmetic throughout), and no two
//!   tensors may overlap.
//! - Only F32, F16 and BF16 are accepted; any other dtype is an error naming the tensor.
//!   `__metadata__` is ignored.
//! - [`read_index`] reads `model.safetensors.index.json` (sharded checkpoints); shard file names
//!   must be plain names inside the model directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// Largest accepted JSON header (the reference implementation uses the same 100 MB bound).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: DType,
    /// Outermost dimension first.
    pub shape: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub nbytes: u64,
}

/// A parsed safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsHeader {
    /// Length of the JSON header in bytes.
    pub header_len: u64,
    /// Absolute offset of the data section (`8 + header_len`).
    pub data_start: u64,
    /// Length of the whole file.
    pub file_len: u64,
    /// Entries sorted by name.
    pub tensors: Vec<SafetensorsEntry>,
}

impl SafetensorsHeader {
    pub fn get(&self, name: &str) -> Option<&SafetensorsEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.tensors.get(i))
    }
}

fn st_err(msg: impl Into<String>) -> FormatError {
    FormatError::Safetensors(msg.into())
}

/// The dtype names of the safetensors format flowgate reads.
fn dtype_from_st(name: &str, tensor: &str) -> Result<DType> {
    match name {
        "F32" => Ok(DType::F32),
        "F16" => Ok(DType::F16),
        "BF16" => Ok(DType::BF16),
        other => Err(FormatError::BadTensor {
            tensor: tensor.to_string(),
            msg: format!(
                "unsupported safetensors dtype '{other}' (flowgate reads F32, F16 and BF16)"
            ),
        }),
    }
}

/// Reads the 8-byte header length from the start of a file; checks it against the cap and the
/// file length. Returns the header length.
fn header_len(prefix: &[u8], file_len: u64) -> Result<u64> {
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(FormatError::Truncated {
            offset: 0,
            needed: 8,
            len: file_len,
        });
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_LEN {
        return Err(st_err(format!(
            "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    if n.checked_add(8).is_none_or(|end| end > file_len) {
        return Err(FormatError::Truncated {
            offset: 8,
            needed: n,
            len: file_len,
        });
    }
    Ok(n)
}

/// Parses a safetensors header from the beginning of a file. `bytes` is taken to be the whole
/// file: tensors must lie within it.
pub fn parse_header(bytes: &[u8]) -> Result<SafetensorsHeader> {
    let file_len = bytes.len() as u64;
    let n = header_len(bytes, file_len)?;
    // header_len checked 8 + n <= bytes.len().
    let json = bytes
        .get(8..8 + n as usize)
        .ok_or_else(|| st_err("header out of range"))?;
    parse_header_json(json, file_len)
}

/// Parses the JSON part of a header (the bytes after the 8-byte length) of a file of
/// `file_len` bytes.
pub fn parse_header_json(json: &[u8], file_len: u64) -> Result<SafetensorsHeader> {
    let header_len = json.len() as u64;
    let data_start =
        header_len
            .checked_add(8)
            .filter(|&d| d <= file_len)
            .ok_or(FormatError::Truncated {
                offset: 8,
                needed: header_len,
                len: file_len,
            })?;
    let data_len = file_len - data_start;
    if json.first() != Some(&b'{') {
        return Err(st_err("header does not start with '{'"));
    }
    let map: serde_json::Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| st_err(format!("malformed JSON header: {e}")))?;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, v) in &map {
        if name == "__metadata__" {
            continue;
        }
        tensors.push(parse_entry(name, v, data_start, data_len)?);
    }
    // Tensors must not overlap (zero-sized tensors overlap nothing).
    let mut by_offset: Vec<&SafetensorsEntry> = tensors.iter().filter(|t| t.nbytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        if let [a, b] = w {
            if a.offset + a.nbytes > b.offset {
                return Err(FormatError::BadTensor {
                    tensor: b.name.clone(),
                    msg: format!("data overlaps tensor '{}'", a.name),
                });
            }
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(SafetensorsHeader {
        header_len,
        data_start,
        file_len,
        tensors,
    })
}

fn parse_entry(name: &str, v: &Value, data_start: u64, data_len: u64) -> Result<SafetensorsEntry> {
    let bad = |msg: String| FormatError::BadTensor {
        tensor: name.to_string(),
        msg,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad("entry is not a JSON object".into()))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string 'dtype'".into()))?;
    let dtype = dtype_from_st(dtype_name, name)?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'shape'".into()))?;
    let shape = shape_v
        .iter()
        .map(|d| d.as_u64())
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("shape holds a non-integer or negative dimension".into()))?;
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'data_offsets'".into()))?;
    let (begin, end) = match offs.as_slice() {
        [b, e] => (
            b.as_u64()
                .ok_or_else(|| bad("data_offsets[0] is not an integer".into()))?,
            e.as_u64()
                .ok_or_else(|| bad("data_offsets[1] is not an integer".into()))?,
        ),
        _ => return Err(bad("data_offsets must hold exactly two integers".into())),
    };
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| FormatError::Overflow(format!("tensor '{name}': shape {shape:?}")))?;
    let nbytes = numel
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| FormatError::Overflow(format!("tensor '{name}': shape {shape:?}")))?;
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
    }
    if end > data_len {
        return Err(FormatError::OutOfBounds {
            tensor: name.to_string(),
            start: data_start.saturating_add(begin),
            end: data_start.saturating_add(end),
            len: data_start.saturating_add(data_len),
        });
    }
    if end - begin != nbytes {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] span {} bytes, but {dtype} shape {shape:?} needs {nbytes}",
            end - begin
        )));
    }
    Ok(SafetensorsEntry {
        name: name.to_string(),
        dtype,
        shape,
        // data_start + end <= file_len, so this cannot overflow.
        offset: data_start + begin,
        nbytes,
    })
}

/// Reads only the header of a safetensors file and validates it against the file's length.
pub fn read_header(path: &Path) -> Result<SafetensorsHeader> {
    let io = |e| FormatError::io(path, e);
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len_buf = [0u8; 8];
    let got = read_up_to(&mut f, &mut len_buf).map_err(io)?;
    let n = header_len(&len_buf[..got], file_len)?;
    // n <= MAX_HEADER_LEN and 8 + n <= file_len: the allocation is bounded by both.
    let mut json = vec![0u8; n as usize];
    let got = read_up_to(&mut f, &mut json).map_err(io)?;
    if got as u64 != n {
        // The file shrank under us.
        return Err(FormatError::Truncated {
            offset: 8,
            needed: n,
            len: 8 + got as u64,
        });
    }
    parse_header_json(&json, file_len).map_err(|e| match e {
        FormatError::Safetensors(m) => FormatError::Safetensors(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A sharded checkpoint's index: tensor name → shard file name.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsIndex {
    pub weight_map: BTreeMap<String, String>,
}

impl SafetensorsIndex {
    /// Distinct shard file names, sorted.
    pub fn shards(&self) -> Vec<String> {
        let mut v: Vec<String> = self.weight_map.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Parses the text of a `model.safetensors.index.json`. `path` is only used in messages.
pub fn parse_index(text: &str, path: &Path) -> Result<SafetensorsIndex> {
    let json_err = |msg: String| FormatError::Json {
        path: path.to_path_buf(),
        msg,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| json_err(e.to_string()))?;
    let wm = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| json_err("no 'weight_map' object".into()))?;
    let mut weight_map = BTreeMap::new();
    for (name, file) in wm {
        let file = file
            .as_str()
            .ok_or_else(|| json_err(format!("weight_map['{name}'] is not a string")))?;
        if !is_plain_file_name(file) {
            return Err(json_err(format!(
                "weight_map['{name}'] = '{file}' is not a plain file name in the model directory"
            )));
        }
        weight_map.insert(name.clone(), file.to_string());
    }
    if weight_map.is_empty() {
        return Err(json_err("empty weight_map".into()));
    }
    Ok(SafetensorsIndex { weight_map })
}

/// Reads and parses `model.safetensors.index.json`.
pub fn read_index(path: &Path) -> Result<SafetensorsIndex> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    parse_index(&text, path)
}

/// True for a name without directory components (no separators, not `.` or `..`).
fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.contains('\\')
        && !s.contains('\0')
}

/// The safetensors files of a model directory, with their headers: the shards named by
/// `model.safetensors.index.json` if present, else `model.safetensors`. Checks that every tensor
/// the index names is in its shard.
pub fn read_dir_headers(dir: &Path) -> Result<Vec<(PathBuf, SafetensorsHeader)>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let index = read_index(&index_path)?;
        let mut out = Vec::new();
        for shard in index.shards() {
            let p = dir.join(&shard);
            let h = read_header(&p)?;
            out.push((p, h));
        }
        for (name, shard) in &index.weight_map {
            let found = out
                .iter()
                .find(|(p, _)| p.file_name().is_some_and(|f| f == shard.as_str()))
                .is_some_and(|(_, h)| h.get(name).is_some());
            if !found {
                return Err(FormatError::Safetensors(format!(
                    "{}: tensor '{name}' is not in shard '{shard}'",
                    index_path.display()
                )));
            }
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        let h = read_header(&single)?;
        return Ok(vec![(single, h)]);
    }
    Err(FormatError::Safetensors(format!(
        "{}: neither model.safetensors nor model.safetensors.index.json found",
        dir.display()
    )))
}
