//! Helpers shared by the tokenizer tests (included with `#[path]`, not a test target itself).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flowgate_engine::tokenizer::Tokenizer;
use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::GgufValue;
use serde_json::Value;

pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

pub fn load_cases(rel: &str) -> Value {
    let text =
        std::fs::read_to_string(data(rel)).expect("fixture missing: run tools/tokenizer_fixtures");
    serde_json::from_str(&text).expect("fixture json")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Streams `ids` one at a time and concatenates the pieces.
pub fn stream_all(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut s = tok.stream();
    let mut out = String::new();
    for &id in ids {
        if let Some(p) = s.next(id).expect("stream") {
            out.push_str(&p);
        }
    }
    out
}

/// Writes a tensor-less GGUF with `meta` to a temp file.
pub fn write_gguf(meta: Vec<(&str, GgufValue)>) -> tempfile::NamedTempFile {
    let mut w = GgufWriter::new(32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    let f = tempfile::NamedTempFile::new().expect("tmp");
    let dw = w.start(f.reopen().expect("reopen")).expect("start");
    dw.finish().expect("finish");
    f
}
