//! Hostile and broken safetensors headers: every case must give a clear error, never a panic.

use flowgate_formats::safetensors::{parse_header, read_header, MAX_HEADER_LEN};
use flowgate_formats::FormatError;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A file from a header object (as JSON) and `data_len` bytes of data.
fn file(header: &Value, data_len: usize) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    let mut rng = rand::rngs::StdRng::seed_from_u64(data_len as u64);
    out.extend((0..data_len).map(|_| rng.random::<u8>()));
    out
}

/// A small valid file: three tensors, 2*3 F32, 4 F16, 2*2 BF16.
fn small() -> Vec<u8> {
    file(
        &json!({
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
            "c": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [32, 40]},
        }),
        40,
    )
}

fn err_of(bytes: &[u8]) -> FormatError {
    parse_header(bytes).expect_err("must be rejected")
}

#[test]
fn valid_small_file_parses() {
    let b = small();
    let h = parse_header(&b).unwrap();
    assert_eq!(h.tensors.len(), 3);
    let a = h.get("a").unwrap();
    assert_eq!(
        (a.offset, a.nbytes, a.shape.clone()),
        (h.data_start, 24, vec![2, 3])
    );
    assert_eq!(h.get("c").unwrap().offset, h.data_start + 32);
    assert_eq!(h.data_start + 40, b.len() as u64);
}

#[test]
fn every_truncation_is_an_error() {
    let b = small();
    for n in 0..b.len() {
        let e = err_of(&b[..n]);
        let msg = e.to_string();
        assert!(!msg.is_empty());
        assert!(
            matches!(
                e,
                FormatError::Truncated { .. }
                    | FormatError::OutOfBounds { .. }
                    | FormatError::Safetensors(_)
            ),
            "prefix {n}: {e:?}"
        );
    }
    // And through the file reader, which must agree.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    for n in 0..b.len() {
        std::fs::write(&p, &b[..n]).unwrap();
        assert!(read_header(&p).is_err(), "prefix {n}");
    }
    std::fs::write(&p, &b).unwrap();
    assert_eq!(read_header(&p).unwrap(), parse_header(&b).unwrap());
}

#[test]
fn header_length_past_eof_or_absurd() {
    let mut b = small();
    let real = u64::from_le_bytes(b[..8].try_into().unwrap());
    b[..8].copy_from_slice(&(real + 1000).to_le_bytes());
    assert!(matches!(err_of(&b), FormatError::Truncated { .. }));
    for n in [u64::MAX, u64::MAX - 7, MAX_HEADER_LEN + 1, 1 << 40] {
        b[..8].copy_from_slice(&n.to_le_bytes());
        let e = err_of(&b);
        assert!(
            matches!(
                e,
                FormatError::Safetensors(_) | FormatError::Truncated { .. }
            ),
            "{n}: {e}"
        );
    }
    // Also from disk: the reader must not allocate the claimed length.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.safetensors");
    b[..8].copy_from_slice(&(MAX_HEADER_LEN - 1).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(
        read_header(&p).unwrap_err(),
        FormatError::Truncated { .. }
    ));
}

#[test]
fn offsets_past_the_end() {
    let b = file(
        &json!({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
        12,
    );
    let e = err_of(&b);
    assert!(
        matches!(e, FormatError::OutOfBounds { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
    let b = file(
        &json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [u64::MAX - 3, u64::MAX]}}),
        8,
    );
    assert!(matches!(err_of(&b), FormatError::OutOfBounds { .. }));
}

#[test]
fn dims_whose_product_overflows() {
    let b = file(
        &json!({"w": {"dtype": "F32", "shape": [1u64 << 32, 1u64 << 32, 16], "data_offsets": [0, 8]}}),
        8,
    );
    let e = err_of(&b);
    assert!(matches!(e, FormatError::Overflow(_)), "{e}");
    assert!(e.to_string().contains('w'));
    // numel fits but bytes do not.
    let b = file(
        &json!({"w": {"dtype": "F32", "shape": [1u64 << 62], "data_offsets": [0, 8]}}),
        8,
    );
    assert!(matches!(err_of(&b), FormatError::Overflow(_)));
}

#[test]
fn unknown_dtype_names_dtype_and_tensor() {
    for dt in ["I64", "F8_E4M3", "BOOL", "F64", "Q4_0", "f32"] {
        let b = file(
            &json!({"model.x.weight": {"dtype": dt, "shape": [1], "data_offsets": [0, 8]}}),
            8,
        );
        let msg = err_of(&b).to_string();
        assert!(msg.contains(dt) && msg.contains("model.x.weight"), "{msg}");
    }
}

#[test]
fn size_disagreements_and_malformed_entries() {
    let cases = [
        json!({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
        json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
        json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}),
        json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}),
        json!({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}),
        json!({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}),
        json!({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}),
        json!({"w": {"dtype": 1, "shape": [2], "data_offsets": [0, 8]}}),
        json!({"w": {"shape": [2], "data_offsets": [0, 8]}}),
        json!({"w": [1, 2]}),
        json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}),
        json!([1, 2, 3]),
        json!("text"),
    ];
    for c in cases {
        let b = file(&c, 8);
        let e = parse_header(&b);
        assert!(e.is_err(), "{c} accepted");
    }
    // Not JSON at all, or empty header.
    for h in [&b"not json"[..], b"", b"{\"a\":", b"{}}", b"\xff\xfe{}"] {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        assert!(parse_header(&b).is_err(), "{h:?}");
    }
    // Deeply nested JSON is refused by serde_json's depth limit, not the stack.
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let mut b = (deep.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(deep.as_bytes());
    assert!(parse_header(&b).is_err());
}

#[test]
fn random_corruption_never_panics() {
    let base = small();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        let cut = rng.random_range(0..=b.len());
        let _ = parse_header(&b[..cut]);
        let _ = parse_header(&b);
    }
}
