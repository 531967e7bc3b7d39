//! GGUF reader and writer against the python `gguf` package (the reference implementation):
//!
//! - `reads_python_written_file`: a file written by `gguf.GGUFWriter`
//!   (`tools/quant_ref/make_gguf_ref.py`, committed under tests/data/gguf/) is read by our
//!   reader and compared with the JSON of what the script put in it: every metadata key, value
//!   type and value (floats bitwise), and every tensor's name, type, dims and bytes.
//! - `writer_roundtrip_*`: files written by our `GgufWriter` (random seeded content, all
//!   value types, several dtypes, chunked writes) are read back by our reader and, when
//!   `python3 -c 'import gguf'` works, by `gguf.GGUFReader` (`tools/quant_ref/gguf_dump.py`),
//!   and both must equal the writer's inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::{GgufFile, GgufValue};
use flowgate_formats::DType;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Same JSON shape as tools/quant_ref/gguf_dump.py.
fn value_json(v: &GgufValue) -> Value {
    let x = match v {
        GgufValue::U8(x) => json!(x),
        GgufValue::I8(x) => json!(x),
        GgufValue::U16(x) => json!(x),
        GgufValue::I16(x) => json!(x),
        GgufValue::U32(x) => json!(x),
        GgufValue::I32(x) => json!(x),
        GgufValue::F32(x) => json!(x.to_bits()),
        GgufValue::Bool(x) => json!(x),
        GgufValue::String(x) => json!(x),
        GgufValue::Array(a) => Value::Array(a.iter().map(value_json).collect()),
        GgufValue::U64(x) => json!(x),
        GgufValue::I64(x) => json!(x),
        GgufValue::F64(x) => json!(x.to_bits()),
    };
    json!({"type": v.type_id(), "value": x})
}

fn file_json(g: &GgufFile, bytes: &[u8]) -> Value {
    let meta: Vec<Value> = g
        .metadata
        .iter()
        .map(|(k, v)| json!({"key": k, "value": value_json(v)}))
        .collect();
    let tensors: Vec<Value> = g
        .tensors
        .iter()
        .map(|t| {
            let data = &bytes[t.offset as usize..(t.offset + t.nbytes) as usize];
            json!({"name": t.name, "type": t.dtype.ggml_id(), "dims": t.dims, "data": hex(data)})
        })
        .collect();
    json!({"version": g.version, "alignment": g.alignment, "metadata": meta, "tensors": tensors})
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_json_eq(ours: &Value, theirs: &Value, what: &str) {
    if ours != theirs {
        for k in ["version", "alignment", "metadata", "tensors"] {
            if ours[k] != theirs[k] {
                panic!(
                    "{what}: '{k}' differs\n ours:   {:.2000}\n theirs: {:.2000}",
                    ours[k].to_string(),
                    theirs[k].to_string()
                );
            }
        }
        panic!("{what}: JSON differs");
    }
}

#[test]
fn reads_python_written_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf");
    let path = dir.join("python_written.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("python_written.json")).unwrap()).unwrap();

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.path.as_deref(), Some(path.as_path()));
    assert_eq!(g.file_len, bytes.len() as u64);
    assert_json_eq(&file_json(&g, &bytes), &expected, "python_written.gguf");
    // The in-memory parser agrees with the file one.
    let mut g2 = GgufFile::parse_bytes(&bytes).unwrap();
    g2.path = g.path.clone();
    assert_eq!(g, g2);

    // Typed getters.
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.alignment, 64);
    assert_eq!(g.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_u64("t.u8").unwrap(), 200);
    assert!(g.get_u64("t.i8").is_err(), "negative is not a u64");
    assert!(g.get_bool("t.bool").unwrap());
    assert_eq!(g.get_str("t.str").unwrap(), "héllo ✓ 世界");
    assert_eq!(
        g.get_str_array("t.arr_str").unwrap(),
        vec!["<s>", "</s>", "▁the", "", "a b", "\n"]
    );
    assert_eq!(g.get_i32_array("t.arr_i32").unwrap().len(), 7);
    assert_eq!(g.get_f32_array("t.arr_f32").unwrap().len(), 5);
    assert!(matches!(
        g.get_u64("nope"),
        Err(flowgate_formats::FormatError::MissingKey(k)) if k == "nope"
    ));
    let e = g.get_str("t.u8").unwrap_err().to_string();
    assert!(e.contains("t.u8") && e.contains("expected a string"), "{e}");
    let t = g.tensor("cube.weight").unwrap();
    assert_eq!(t.dims, vec![4, 3, 2]);
    assert_eq!(t.shape(), vec![2, 3, 4]);
    assert_eq!(t.dtype, DType::F32);
    assert_eq!(t.nbytes, 2 * 3 * 4 * 4);
    let q = g.tensor("q4k.weight").unwrap();
    assert_eq!((q.dtype, q.shape()), (DType::Q4K, vec![2, 256]));
    assert!(g.tensors.iter().all(|t| t.offset.is_multiple_of(64)));
}

fn python_gguf_available() -> bool {
    Command::new("python3")
        .args(["-c", "import gguf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn python_dump(path: &Path) -> Option<Value> {
    if !python_gguf_available() {
        eprintln!("skipped: python gguf missing (python3 -c 'import gguf' failed)");
        return None;
    }
    let script = repo_root().join("tools/quant_ref/gguf_dump.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_dump.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn random_value(rng: &mut impl Rng, t: u32, depth: u32) -> GgufValue {
    match t {
        0 => GgufValue::U8(rng.random()),
        1 => GgufValue::I8(rng.random()),
        2 => GgufValue::U16(rng.random()),
        3 => GgufValue::I16(rng.random()),
        4 => GgufValue::U32(rng.random()),
        5 => GgufValue::I32(rng.random()),
        6 => GgufValue::F32(rng.random::<f32>() * 200.0 - 100.0),
        7 => GgufValue::Bool(rng.random()),
        8 => {
            let n = rng.random_range(0..12);
            let pool = ['a', 'Z', ' ', 'é', '✓', '世', '\n', '0', '▁', '😀'];
            GgufValue::String(
                (0..n)
                    .map(|_| pool[rng.random_range(0..pool.len())])
                    .collect(),
            )
        }
        9 => {
            // Non-empty (python's writer refuses empty arrays); nested at most once.
            let et = loop {
                let et = rng.random_range(0..13u32);
                if et != 9 || depth == 0 {
                    break et;
                }
            };
            let n = rng.random_range(1..6);
            GgufValue::Array((0..n).map(|_| random_value(rng, et, depth + 1)).collect())
        }
        10 => GgufValue::U64(rng.random()),
        11 => GgufValue::I64(rng.random()),
        _ => GgufValue::F64(rng.random::<f64>() * 1e6 - 5e5),
    }
}

struct Planned {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn roundtrip(seed: u64, alignment: u64, chunked: bool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = GgufWriter::new(alignment);
    let mut meta = vec![(
        "general.architecture".to_string(),
        GgufValue::String("llama".into()),
    )];
    for t in 0..13u32 {
        for k in 0..2 {
            meta.push((format!("test.type{t}.{k}"), random_value(&mut rng, t, 0)));
        }
    }
    for (k, v) in &meta {
        w.add_metadata(k, v.clone());
    }
    let dtypes = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];
    let mut planned = Vec::new();
    for (i, &dt) in dtypes.iter().enumerate() {
        let inner = dt.block_size() as u64 * rng.random_range(1..4);
        let shape: Vec<u64> = match i % 3 {
            0 => vec![inner],
            1 => vec![rng.random_range(1..4), inner],
            _ => vec![2, rng.random_range(1..3), inner],
        };
        let n = dt.tensor_bytes(&shape).unwrap() as usize;
        let data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let name = format!("blk.{i}.w_{}", dt.name().to_lowercase());
        w.add_tensor(&name, dt, &shape).unwrap();
        planned.push(Planned {
            name,
            dtype: dt,
            shape,
            data,
        });
    }
    assert_eq!(w.tensor_count(), planned.len());

    let mut dw = w.start(Vec::new()).unwrap();
    for p in &planned {
        if chunked {
            dw.write_tensor_with(7, |off, buf| {
                let o = off as usize;
                buf.copy_from_slice(&p.data[o..o + buf.len()]);
                Ok(())
            })
            .unwrap();
        } else {
            dw.write_tensor(&p.data).unwrap();
        }
    }
    let bytes = dw.finish().unwrap();

    // Our reader.
    let g = GgufFile::parse_bytes(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, alignment);
    let ours_meta: Vec<_> = g
        .metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .cloned()
        .collect();
    assert_eq!(ours_meta, meta);
    assert_eq!(g.tensors.len(), planned.len());
    for (t, p) in g.tensors.iter().zip(&planned) {
        assert_eq!(
            (&t.name, t.dtype, t.shape()),
            (&p.name, p.dtype, p.shape.clone())
        );
        assert_eq!(
            &bytes[t.offset as usize..(t.offset + t.nbytes) as usize],
            &p.data[..]
        );
        assert!(t.offset.is_multiple_of(alignment));
    }

    // The python reference reader.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let g_file = GgufFile::open(&path).unwrap();
    assert_eq!(g_file.tensors, g.tensors);
    if let Some(theirs) = python_dump(&path) {
        assert_json_eq(
            &file_json(&g, &bytes),
            &theirs,
            "our writer read by gguf.GGUFReader",
        );
        // And python saw exactly the writer's inputs (not just what our reader saw).
        let tensors = theirs["tensors"].as_array().unwrap();
        for (t, p) in tensors.iter().zip(&planned) {
            assert_eq!(t["name"], json!(p.name));
            assert_eq!(t["data"], json!(hex(&p.data)));
            let dims: Vec<u64> = p.shape.iter().rev().copied().collect();
            assert_eq!(t["dims"], json!(dims));
        }
    }
}

#[test]
fn writer_roundtrip_default_alignment() {
    roundtrip(1, 32, false);
}

#[test]
fn writer_roundtrip_alignment_128_chunked() {
    roundtrip(2, 128, true);
}

#[test]
fn writer_chunked_api_and_errors() {
    let mut w = GgufWriter::new(32);
    w.add_tensor("a", DType::Q8_0, &[2, 64]).unwrap();
    w.add_tensor("b", DType::F32, &[3]).unwrap();
    assert!(
        w.add_tensor("a", DType::F32, &[3]).is_err(),
        "duplicate name"
    );
    assert!(
        w.add_tensor("c", DType::Q8_0, &[3, 33]).is_err(),
        "row not whole blocks"
    );
    assert!(
        w.add_tensor("d", DType::F32, &[1, 1, 1, 1, 1]).is_err(),
        "5 dims"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let a: Vec<u8> = (0..2 * 68).map(|_| rng.random()).collect();
    let mut dw = w.start(Vec::new()).unwrap();
    assert_eq!(dw.current(), Some(("a", DType::Q8_0, 136)));
    assert!(dw.write_tensor(&a[..100]).is_err(), "wrong size");
    dw.write_chunk(&a[..50]).unwrap();
    assert!(dw.write_chunk(&a[50..]).is_ok());
    assert_eq!(dw.current().map(|c| c.0), Some("b"));
    assert!(dw.write_chunk(&[0u8; 13]).is_err(), "chunk past the end");
    let dw_err = {
        let mut dw2 = GgufWriter::new(32);
        dw2.add_tensor("x", DType::F32, &[4]).unwrap();
        dw2.start(Vec::new()).unwrap().finish()
    };
    assert!(dw_err.is_err(), "finish with a tensor missing");
    dw.write_tensor(&[1u8; 12]).unwrap();
    assert!(dw.write_tensor(&[]).is_err(), "no tensors left");
    let bytes = dw.finish().unwrap();
    let g = GgufFile::parse_bytes(&bytes).unwrap();
    let ta = g.tensor("a").unwrap();
    assert_eq!(&bytes[ta.offset as usize..][..136], &a[..]);
    assert!(
        GgufWriter::new(48).start(Vec::new()).is_err(),
        "alignment not a power of two"
    );
}
