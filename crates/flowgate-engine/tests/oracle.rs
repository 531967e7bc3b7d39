//! Correctness against HF transformers: every architecture's random-weight fixture (made by
//! tools/oracle/make_fixtures.py with transformers on a machine with torch) must give the same
//! logits as transformers, in one prefill pass and token by token through the KV cache, and the
//! same greedy continuation. GGUF conversions of some fixtures (tools/oracle/to_gguf.py, with the
//! `gguf` package) must match too.
//!
//! Tolerances: relative error ‖ours − ref‖ / ‖ref‖ over all logits.
//! - F32 weights (HF safetensors or GGUF F32): ≤ 1e-4. Both sides compute in f32; the only
//!   differences are summation order and transcendental functions (~1e-6 observed).
//! - Q8_0 GGUF: ≤ 3e-2. Q8_0 stores each weight with 8 bits per 32-value block (relative step
//!   ≤ 1/127 of the block's largest value, uniform rounding error ~0.2% RMS of the weight), and the
//!   activations are quantised to Q8_0 too before the integer dot products; the errors of
//!   thousands of products add up as random noise, giving about 1% relative error in the logits
//!   of these small random models. The test prints the measured value.

use std::path::{Path, PathBuf};

use flowgate_engine::models::Logits;
use flowgate_engine::runtime::{self, LoadOptions};
use flowgate_engine::sampling::argmax;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Reference {
    tokens: Vec<u32>,
    greedy: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>,
}

fn reference(dir: &Path) -> Reference {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        j[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let raw = std::fs::read(dir.join("logits.f32")).unwrap();
    let logits: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let r = Reference {
        tokens: ids("tokens"),
        greedy: ids("greedy"),
        vocab: j["vocab_size"].as_u64().unwrap() as usize,
        logits,
    };
    assert!(r.tokens.len() >= 32);
    assert_eq!(r.logits.len(), r.tokens.len() * r.vocab);
    r
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    assert!(den > 0.0);
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    (num / den).sqrt()
}

/// Checks one model path against a reference; returns (prefill err, decode err, greedy).
fn check(model: &Path, r: &Reference) -> (f64, f64, Vec<u32>) {
    let loaded = runtime::load(model, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let m = &loaded.model;
    assert_eq!(m.spec.vocab_size, r.vocab);
    let n = r.tokens.len();
    let mut cache = m.new_cache(n + r.greedy.len()).unwrap();
    let prefill = m.forward(&r.tokens, &mut cache, Logits::All).unwrap();
    let e_pre = rel_err(&prefill, &r.logits);

    let mut cache = m.new_cache(n).unwrap();
    let mut decode = Vec::with_capacity(n * r.vocab);
    for &t in &r.tokens {
        decode.extend(m.forward(&[t], &mut cache, Logits::All).unwrap());
    }
    let e_dec = rel_err(&decode, &r.logits);

    // Greedy continuation: prefill the prompt, then argmax + decode.
    let mut cache = m.new_cache(n + r.greedy.len()).unwrap();
    let mut l = m.forward(&r.tokens, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..r.greedy.len() {
        let t = argmax(&l);
        out.push(t);
        l = m.forward(&[t], &mut cache, Logits::Last).unwrap();
    }
    (e_pre, e_dec, out)
}

fn hf_case(arch: &str) {
    let dir = fixtures().join(arch);
    let r = reference(&dir);
    let (e_pre, e_dec, greedy) = check(&dir, &r);
    eprintln!("{arch}: prefill rel err {e_pre:.2e}, decode rel err {e_dec:.2e}");
    assert!(e_pre <= 1e-4, "{arch}: prefill relative error {e_pre:.3e} > 1e-4");
    assert!(e_dec <= 1e-4, "{arch}: decode relative error {e_dec:.3e} > 1e-4");
    assert_eq!(greedy, r.greedy, "{arch}: greedy continuation differs");
}

#[test]
fn llama_matches_transformers() {
    hf_case("llama");
}
#[test]
fn mistral_matches_transformers() {
    hf_case("mistral");
}
#[test]
fn qwen2_matches_transformers() {
    hf_case("qwen2");
}
#[test]
fn qwen3_matches_transformers() {
    hf_case("qwen3");
}
#[test]
fn mixtral_matches_transformers() {
    hf_case("mixtral");
}
#[test]
fn qwen2_moe_matches_transformers() {
    hf_case("qwen2_moe");
}
#[test]
fn qwen3_moe_matches_transformers() {
    hf_case("qwen3_moe");
}
#[test]
fn olmoe_matches_transformers() {
    hf_case("olmoe");
}

fn gguf_case(arch: &str, kind: &str, bound: f64, exact_greedy: bool) {
    let r = reference(&fixtures().join(arch));
    let path = fixtures().join("gguf").join(format!("{arch}-{kind}.gguf"));
    let (e_pre, e_dec, greedy) = check(&path, &r);
    eprintln!("{arch} GGUF {kind}: prefill rel err {e_pre:.2e}, decode rel err {e_dec:.2e}");
    assert!(e_pre <= bound, "{arch} {kind}: prefill relative error {e_pre:.3e} > {bound:e}");
    assert!(e_dec <= bound, "{arch} {kind}: decode relative error {e_dec:.3e} > {bound:e}");
    if exact_greedy {
        assert_eq!(greedy, r.greedy, "{arch} {kind}: greedy continuation differs");
    } else {
        // Quantised weights may flip a near-tie; the first tokens must still agree.
        assert_eq!(greedy[..4], r.greedy[..4], "{arch} {kind}: greedy start differs");
    }
}

#[test]
fn llama_gguf_f32_matches_transformers() {
    gguf_case("llama", "f32", 1e-4, true);
}
#[test]
fn qwen3_moe_gguf_f32_matches_transformers() {
    gguf_case("qwen3_moe", "f32", 1e-4, true);
}
#[test]
fn llama_gguf_q8_0_close_to_transformers() {
    gguf_case("llama", "q8_0", 3e-2, false);
}
#[test]
fn qwen3_moe_gguf_q8_0_close_to_transformers() {
    gguf_case("qwen3_moe", "q8_0", 3e-2, false);
}
