//! Hostile and broken GGUF headers: each must give the clear `FormatError`, never a panic,
//! a hang or a huge allocation. Headers are built byte by byte (see `Gguf`) so that every
//! field can be set to a bad value; valid files come from our writer with random content.

use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::{GgufFile, GgufValue};
use flowgate_formats::{DType, FormatError};
use rand::{Rng, SeedableRng};

/// A raw GGUF file under construction.
struct Gguf {
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Vec<u8>>,
    alignment: usize,
    data: Vec<u8>,
}

fn s(b: &mut Vec<u8>, x: &str) {
    b.extend_from_slice(&(x.len() as u64).to_le_bytes());
    b.extend_from_slice(x.as_bytes());
}

impl Gguf {
    fn new() -> Self {
        Gguf {
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![],
            tensors: vec![],
            alignment: 32,
            data: vec![],
        }
    }
    /// A key/value with raw value bytes.
    fn kv(mut self, key: &str, type_id: u32, value: &[u8]) -> Self {
        let mut b = vec![];
        s(&mut b, key);
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(value);
        self.kvs.push(b);
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        let mut b = vec![];
        s(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        self.tensors.push(b);
        self
    }
    fn data(mut self, n: usize) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        self.data = (0..n).map(|_| rng.random()).collect();
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let nt = self.n_tensors.unwrap_or(self.tensors.len() as u64);
        let nk = self.n_kv.unwrap_or(self.kvs.len() as u64);
        b.extend_from_slice(&nt.to_le_bytes());
        b.extend_from_slice(&nk.to_le_bytes());
        for kv in &self.kvs {
            b.extend_from_slice(kv);
        }
        for t in &self.tensors {
            b.extend_from_slice(t);
        }
        b.resize(b.len().div_ceil(self.alignment) * self.alignment, 0);
        b.extend_from_slice(&self.data);
        b
    }
    fn parse(&self) -> Result<GgufFile, FormatError> {
        GgufFile::parse_bytes(&self.bytes())
    }
}

fn err(g: &Gguf) -> FormatError {
    match g.parse() {
        Ok(f) => panic!("parsed a bad file: {f:?}"),
        Err(e) => e,
    }
}

fn assert_msg(e: &FormatError, parts: &[&str]) {
    let m = e.to_string();
    for p in parts {
        assert!(m.contains(p), "error '{m}' does not mention '{p}'");
    }
}

/// A valid small file from our writer; its last tensor fills whole alignment units so that
/// every strict prefix is invalid.
fn valid_file() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut w = GgufWriter::new(32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_metadata(
        "llama.block_count",
        GgufValue::U32(rng.random_range(1..100)),
    );
    w.add_metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(vec![
            GgufValue::String("a".into()),
            GgufValue::String("bc".into()),
        ]),
    );
    w.add_metadata("x.f64", GgufValue::F64(rng.random()));
    w.add_tensor("q", DType::Q8_0, &[2, 32]).unwrap();
    w.add_tensor("f", DType::F32, &[8]).unwrap();
    let q: Vec<u8> = (0..68).map(|_| rng.random()).collect();
    let f: Vec<u8> = (0..32).map(|_| rng.random()).collect();
    let mut dw = w.start(Vec::new()).unwrap();
    dw.write_tensor(&q).unwrap();
    dw.write_tensor(&f).unwrap();
    dw.finish().unwrap()
}

#[test]
fn valid_file_parses() {
    let b = valid_file();
    let g = GgufFile::parse_bytes(&b).unwrap();
    assert_eq!(g.tensors.len(), 2);
    let last = g.tensors.last().unwrap();
    assert_eq!(last.offset + last.nbytes, b.len() as u64);
}

#[test]
fn every_prefix_is_an_error() {
    let b = valid_file();
    let g = GgufFile::parse_bytes(&b).unwrap();
    for n in 0..b.len() {
        match GgufFile::parse_bytes(&b[..n]) {
            Ok(_) => panic!("prefix of {n} bytes parsed"),
            Err(FormatError::Truncated { len, .. }) => assert_eq!(len, n as u64),
            Err(FormatError::OutOfBounds { len, .. }) => {
                assert_eq!(len, n as u64);
                assert!(
                    n as u64 >= g.data_offset - 31,
                    "OutOfBounds inside the header at {n}"
                );
            }
            Err(FormatError::Other(m)) if m.contains("claims") => {}
            Err(e) => panic!("prefix {n}: unexpected error {e}"),
        }
    }
}

#[test]
fn wrong_magic() {
    let mut b = valid_file();
    b[0..4].copy_from_slice(b"GGML");
    let e = GgufFile::parse_bytes(&b).unwrap_err();
    assert!(
        matches!(e, FormatError::BadMagic { found } if &found == b"GGML"),
        "{e}"
    );
    // A big-endian file reads as an absurd version.
    let mut b = valid_file();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = GgufFile::parse_bytes(&b).unwrap_err();
    assert!(
        matches!(e, FormatError::UnsupportedVersion(0x0300_0000)),
        "{e}"
    );
}

#[test]
fn unsupported_versions() {
    for v in [0, 1, 4, u32::MAX] {
        let mut g = Gguf::new();
        g.version = v;
        assert!(matches!(err(&g), FormatError::UnsupportedVersion(x) if x == v));
    }
    let mut g = Gguf::new();
    g.version = 2;
    assert!(g.parse().is_ok(), "v2 is supported");
}

#[test]
fn tensor_past_end_of_file() {
    let g = Gguf::new().tensor("w", &[8, 2], 0, 0).data(63);
    let e = err(&g);
    assert!(
        matches!(&e, FormatError::OutOfBounds { tensor, end, len, .. } if tensor == "w" && *end == *len + 1),
        "{e}"
    );
    let g = Gguf::new().tensor("w", &[8], 0, 1 << 40).data(32);
    assert!(matches!(err(&g), FormatError::OutOfBounds { .. }));
    let g = Gguf::new().tensor("w", &[8], 0, u64::MAX - 31).data(32);
    assert!(matches!(err(&g), FormatError::Overflow(_)));
}

#[test]
fn dims_product_overflow() {
    let g = Gguf::new()
        .tensor("big", &[1 << 32, 1 << 32, 4], 0, 0)
        .data(32);
    let e = err(&g);
    assert!(matches!(&e, FormatError::Overflow(_)), "{e}");
    assert_msg(&e, &["big"]);
    // Fits in u64 elements but not in bytes.
    let g = Gguf::new().tensor("b2", &[1 << 31, 1 << 31], 0, 0).data(32);
    assert!(matches!(err(&g), FormatError::Overflow(_)));
}

#[test]
fn unknown_dtype_id() {
    let g = Gguf::new().tensor("w", &[32], 99, 0).data(64);
    let e = err(&g);
    assert!(
        matches!(&e, FormatError::UnknownDType { tensor, id: 99 } if tensor == "w"),
        "{e}"
    );
    assert_msg(&e, &["99", "'w'"]);
}

#[test]
fn too_many_dims() {
    let g = Gguf::new().tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(32);
    let e = err(&g);
    assert!(matches!(&e, FormatError::BadTensor { tensor, .. } if tensor == "w"));
    assert_msg(&e, &["5 dimensions"]);
    let g = Gguf::new().tensor("w", &[1, 1, 1, 1], 0, 0).data(32);
    assert!(g.parse().is_ok(), "4 dims are fine");
}

#[test]
fn bad_alignment() {
    for (t, v) in [
        (4u32, 0u32.to_le_bytes().to_vec()),
        (4, 48u32.to_le_bytes().to_vec()),
        (4, 3u32.to_le_bytes().to_vec()),
        (7, vec![1u8]),
        (6, 32f32.to_le_bytes().to_vec()),
    ] {
        let g = Gguf::new().kv("general.alignment", t, &v);
        let e = err(&g);
        assert!(matches!(e, FormatError::Metadata(_)), "{e}");
        assert_msg(&e, &["general.alignment", "power of two"]);
    }
    let g = Gguf::new().kv("general.alignment", 4, &64u32.to_le_bytes());
    assert_eq!(g.parse().unwrap().alignment, 64);
}

#[test]
fn unaligned_tensor_offset() {
    let g = Gguf::new().tensor("w", &[4], 0, 8).data(64);
    let e = err(&g);
    assert_msg(&e, &["'w'", "not a multiple of the alignment 32"]);
}

#[test]
fn rows_not_whole_blocks() {
    let g = Gguf::new().tensor("q", &[33, 2], 8, 0).data(128);
    let e = err(&g);
    assert!(matches!(&e, FormatError::BadTensor { tensor, .. } if tensor == "q"));
    assert_msg(&e, &["33", "block size 32"]);
}

#[test]
fn duplicates() {
    let g = Gguf::new()
        .tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .data(64);
    assert_msg(&err(&g), &["'w'", "duplicate tensor name"]);
    let g = Gguf::new()
        .kv("k", 4, &[1, 0, 0, 0])
        .kv("k", 4, &[2, 0, 0, 0]);
    assert_msg(&err(&g), &["duplicate key 'k'"]);
}

#[test]
fn overlapping_tensors() {
    let g = Gguf::new()
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .data(96);
    assert_msg(&err(&g), &["overlaps"]);
}

#[test]
fn absurd_counts() {
    for (nt, nk) in [(u64::MAX, 0), (0, u64::MAX), (1 << 40, 0), (0, 1 << 40)] {
        let mut g = Gguf::new().data(64);
        g.n_tensors = Some(nt);
        g.n_kv = Some(nk);
        let e = err(&g);
        assert!(matches!(&e, FormatError::Other(_)), "{e}");
        assert_msg(&e, &["claims", "bytes remain"]);
    }
    // Counts that are plausible for the length but wrong: plain truncation.
    let mut g = Gguf::new().data(256);
    g.n_kv = Some(5);
    assert!(matches!(
        err(&g),
        FormatError::Truncated { .. } | FormatError::Metadata(_)
    ));
}

#[test]
fn long_strings_and_arrays() {
    // Key length far beyond the file.
    let mut b = Gguf::new().bytes();
    b.truncate(24);
    b[16..24].copy_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    b.extend_from_slice(&[0; 40]);
    let e = GgufFile::parse_bytes(&b).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    // String value too long.
    let mut v = (1u64 << 50).to_le_bytes().to_vec();
    v.extend_from_slice(b"abc");
    assert!(matches!(
        err(&Gguf::new().kv("k", 8, &v)),
        FormatError::Truncated { .. }
    ));
    // Array count too large for the remaining bytes (u64 elements: 8 bytes each).
    let mut v = 10u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u64 << 60).to_le_bytes());
    v.extend_from_slice(&[0; 64]);
    assert!(matches!(
        err(&Gguf::new().kv("k", 9, &v)),
        FormatError::Truncated { .. }
    ));
    // Deeply nested arrays are refused before they can exhaust the stack.
    let mut v = vec![];
    for _ in 0..10_000 {
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    let e = err(&Gguf::new().kv("k", 9, &v));
    assert_msg(&e, &["nested deeper"]);
}

#[test]
fn bad_values() {
    assert_msg(
        &err(&Gguf::new().kv("k", 13, &[0; 8])),
        &["unknown value type 13"],
    );
    assert_msg(&err(&Gguf::new().kv("k", 7, &[2])), &["bool value 2"]);
    let mut v = 77u32.to_le_bytes().to_vec();
    v.extend_from_slice(&1u64.to_le_bytes());
    assert_msg(
        &err(&Gguf::new().kv("k", 9, &v)),
        &["unknown array element type 77"],
    );
    let mut g = Gguf::new();
    let mut kv = vec![];
    kv.extend_from_slice(&2u64.to_le_bytes());
    kv.extend_from_slice(&[0xff, 0xfe]);
    kv.extend_from_slice(&4u32.to_le_bytes());
    kv.extend_from_slice(&[0; 4]);
    g.kvs.push(kv);
    assert_msg(&err(&g), &["not valid UTF-8"]);
}

#[test]
fn missing_file_is_io_error() {
    let e = GgufFile::open(std::path::Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e, FormatError::Io { .. }), "{e}");
}

#[test]
fn random_mutations_never_panic() {
    // A small in-test fuzzer (the real one is fuzz/): byte flips, truncations, and u64 field
    // overwrites of a valid file.
    let base = valid_file();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let mut ok = 0;
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            match rng.random_range(0..3) {
                0 => b[i] = rng.random(),
                1 => {
                    let end = (i + 8).min(b.len());
                    let v: u64 = rng.random();
                    b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
                _ => b.truncate(i),
            }
            if b.is_empty() {
                break;
            }
        }
        if let Ok(g) = GgufFile::parse_bytes(&b) {
            ok += 1;
            for t in &g.tensors {
                assert!(t.offset + t.nbytes <= b.len() as u64);
            }
        }
    }
    assert!(ok > 0, "some mutations (of data bytes) must stay valid");
}

#[test]
fn fuzz_regressions() {
    // Inputs that once failed the fuzz target's checks (fuzz/README.md); each must parse to a
    // consistent result or an error.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let b = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(g) = GgufFile::parse_bytes(&b) {
            for t in &g.tensors {
                assert_eq!(t.dtype.tensor_bytes(&t.shape()).ok(), Some(t.nbytes));
                assert!(t.offset + t.nbytes <= b.len() as u64);
            }
        }
        n += 1;
    }
    assert!(n > 0);
}

#[test]
fn zero_sized_dims() {
    // A zero dim makes an empty tensor; other dims may not overflow even then.
    let g = Gguf::new().tensor("e", &[32, 0], 8, 0).data(32);
    let f = g.parse().unwrap();
    assert_eq!(f.tensors[0].nbytes, 0);
    let g = Gguf::new()
        .tensor("e", &[0, 1 << 40, 1 << 40], 0, 0)
        .data(32);
    assert!(matches!(err(&g), FormatError::Overflow(_)));
}
