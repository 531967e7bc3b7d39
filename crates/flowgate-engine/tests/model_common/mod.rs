//! Helpers shared by the CPU model tests (`residency.rs`, `layer_split.rs`): the fixture
//! directory, a reference's prompt tokens, prefill and token-by-token decode logits, and a
//! bit-for-bit comparison.

use std::path::{Path, PathBuf};

use flowgate_engine::backend::cpu::CpuBackend;
use flowgate_engine::models::{Logits, Model};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[path = "../../../../tests/fixtures/hf_archs.rs"]
mod hf_archs;
/// The Hugging Face fixtures (tests/fixtures/NAME). Not every test crate that includes this
/// module uses it.
#[allow(unused_imports)]
pub use hf_archs::HF_ARCHS;

/// (model directory, reference json) of the Hugging Face fixture `name`.
pub fn hf_case(name: &str) -> (PathBuf, PathBuf) {
    let dir = fixtures().join(name);
    let json = dir.join("ref.json");
    (dir, json)
}

/// The prompt tokens of a reference json.
pub fn tokens(json: &Path) -> Vec<u32> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every position: the prompt in one pass, then token by token in a fresh cache.
pub fn prefill_and_decode(m: &Model<CpuBackend>, toks: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut c = m.new_cache(toks.len()).unwrap();
    let pre = m.forward(toks, &mut c, Logits::All).unwrap();
    assert_eq!(c.len(), toks.len());
    let mut c = m.new_cache(toks.len()).unwrap();
    let mut dec = Vec::new();
    for t in toks {
        dec.extend(m.forward(&[*t], &mut c, Logits::All).unwrap());
    }
    (pre, dec)
}

/// Asserts `a` equals `b` bit for bit (with the relative error in the message if not).
pub fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let diff = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert_eq!(
        diff,
        0,
        "{what}: {diff} of {} logits differ (relative error {:.2e})",
        a.len(),
        (num / den).sqrt()
    );
}
