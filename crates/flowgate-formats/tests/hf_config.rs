//! `config.json` → ModelSpec, checked against what HF transformers resolves from the same files.
//!
//! Inputs are under `tests/data/hf/`: `<model>.v4.json` (transformers-4 key style, modelled on
//! the real checkpoints' files), `<model>.v5.json` (the same configs re-saved by transformers
//! 5.17, i.e. the transformers-5 key style), `defaults-<arch>.v4.json` (only `model_type`: all
//! defaults) and `edge-*.v4.json`; plus the oracle fixtures' configs under `tests/fixtures/`.
//! `expected.json` is written by `make_expected.py` from transformers' own config objects.

use std::path::{Path, PathBuf};

use flowgate_formats::hf::{parse_config, spec_from_config};
use flowgate_formats::{Arch, FormatError, ModelSpec, QkNorm, RopeScaling, RopeStyle};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf")
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn expected() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(data_dir().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["models"].as_object().unwrap().clone()
}

/// The config files describing model `name` of expected.json.
fn inputs(name: &str) -> Vec<PathBuf> {
    if let Some(arch) = name.strip_prefix("fixture-") {
        return vec![fixtures_dir().join(arch).join("config.json")];
    }
    let mut v = vec![data_dir().join(format!("{name}.v4.json"))];
    let v5 = data_dir().join(format!("{name}.v5.json"));
    if v5.exists() {
        v.push(v5);
    }
    v
}

fn opt_u64(v: &Value) -> Option<u64> {
    v.as_u64()
}

fn check(spec: &ModelSpec, e: &Value, what: &str) {
    let u = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{what}: {k}")) as usize;
    assert_eq!(
        spec.arch,
        Arch::from_hf(e["model_type"].as_str().unwrap()).unwrap(),
        "{what}"
    );
    assert_eq!(spec.vocab_size, u("vocab_size"), "{what} vocab");
    assert_eq!(spec.hidden, u("hidden"), "{what} hidden");
    assert_eq!(spec.n_layers, u("n_layers"), "{what} layers");
    assert_eq!(spec.n_heads, u("n_heads"), "{what} heads");
    assert_eq!(spec.n_kv_heads, u("n_kv_heads"), "{what} kv heads");
    assert_eq!(spec.head_dim, u("head_dim"), "{what} head_dim");
    assert_eq!(
        spec.rms_eps,
        e["rms_eps"].as_f64().unwrap() as f32,
        "{what} eps"
    );
    assert_eq!(
        spec.rope.theta,
        e["rope_theta"].as_f64().unwrap() as f32,
        "{what} theta"
    );
    assert_eq!(spec.rope.style, RopeStyle::Halves, "{what}");
    let f = |k: &str| e[k].as_f64().unwrap() as f32;
    match e["rope_type"].as_str().unwrap() {
        "default" => assert_eq!(spec.rope.scaling, None, "{what}"),
        "linear" => assert_eq!(
            spec.rope.scaling,
            Some(RopeScaling::Linear {
                factor: f("rope_factor")
            }),
            "{what}"
        ),
        "llama3" => assert_eq!(
            spec.rope.scaling,
            Some(RopeScaling::Llama3 {
                factor: f("rope_factor"),
                low_freq_factor: f("rope_low_freq_factor"),
                high_freq_factor: f("rope_high_freq_factor"),
                original_max_position: e["rope_original_max_position"].as_u64().unwrap() as u32,
            }),
            "{what}"
        ),
        other => panic!("{what}: rope type {other}"),
    }
    assert_eq!(
        spec.tied_embeddings,
        e["tied_embeddings"].as_bool().unwrap(),
        "{what} tied"
    );
    assert_eq!(spec.context_length, Some(u("context_length")), "{what} ctx");
    assert_eq!(
        spec.bos_token_id,
        opt_u64(&e["bos_token_id"]).map(|b| b as u32),
        "{what} bos"
    );
    let eos: Vec<u32> = e["eos_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(spec.eos_token_ids, eos, "{what} eos");
    assert_eq!(
        spec.qkv_bias,
        e["qkv_bias"].as_bool().unwrap(),
        "{what} qkv bias"
    );
    let window = e["sliding_window_per_layer"].as_array().unwrap();
    let first = window.first().and_then(opt_u64).map(|w| w as usize);
    assert!(window
        .iter()
        .all(|w| opt_u64(w).map(|w| w as usize) == first));
    assert_eq!(spec.sliding_window, first, "{what} window");
    let qk = match spec.arch {
        Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::Full,
        _ => QkNorm::None,
    };
    assert_eq!(spec.qk_norm, qk, "{what}");

    let sparse: Vec<bool> = e["sparse_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    let any_dense = sparse.iter().any(|s| !s);
    if any_dense {
        assert_eq!(spec.ffn, u("intermediate_size"), "{what} ffn");
    } else {
        assert_eq!(spec.ffn, 0, "{what} ffn (all layers sparse)");
    }
    if sparse.iter().any(|&s| s) {
        let m = spec
            .moe
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no moe"));
        assert_eq!(m.sparse_layers, sparse, "{what} sparse layers");
        assert_eq!(m.n_experts, u("n_experts"), "{what}");
        assert_eq!(m.n_experts_used, u("n_experts_used"), "{what}");
        assert_eq!(m.expert_ffn, u("expert_ffn"), "{what}");
        assert_eq!(
            m.norm_topk_prob,
            e["norm_topk_prob"].as_bool().unwrap(),
            "{what}"
        );
        assert_eq!(
            m.shared_expert_ffn,
            opt_u64(&e["shared_expert_ffn"]).map(|w| w as usize),
            "{what}"
        );
    } else {
        assert!(spec.moe.is_none(), "{what}");
    }
}

#[test]
fn specs_match_transformers() {
    let exp = expected();
    assert!(exp.len() >= 16, "expected.json holds {} models", exp.len());
    let mut checked = 0;
    for (name, e) in &exp {
        let window = e["sliding_window_per_layer"].as_array().unwrap();
        let mixed = window.windows(2).any(|w| w[0] != w[1]);
        for path in inputs(name) {
            let text = std::fs::read_to_string(&path).unwrap();
            let what = path.display().to_string();
            let cfg = parse_config(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
            let r = spec_from_config(&cfg);
            if mixed {
                // Per-layer mixes of sliding and full attention cannot be expressed.
                let err = r.expect_err(&what);
                assert!(matches!(err, FormatError::Config(_)), "{what}: {err}");
                assert!(err.to_string().contains("sliding"), "{what}: {err}");
            } else {
                let spec = r.unwrap_or_else(|e| panic!("{what}: {e}"));
                check(&spec, e, &what);
            }
            checked += 1;
        }
    }
    // Both key styles of every real-model sample, plus defaults, edges and fixtures.
    assert!(checked >= 36, "checked {checked} configs");
}

#[test]
fn both_key_styles_give_the_same_spec() {
    let mut pairs = 0;
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".v4.json") else {
            continue;
        };
        let v5 = data_dir().join(format!("{stem}.v5.json"));
        let a = spec_from_config(&parse_config(&std::fs::read_to_string(&p).unwrap()).unwrap());
        let b = spec_from_config(&parse_config(&std::fs::read_to_string(&v5).unwrap()).unwrap());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{stem}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{stem}: {a:?} vs {b:?}"),
        }
        pairs += 1;
    }
    assert!(pairs >= 8);
}

#[test]
fn real_model_headlines() {
    // A few properties the model cards state, independent of expected.json.
    let load = |n: &str| {
        let t = std::fs::read_to_string(data_dir().join(n)).unwrap();
        spec_from_config(&parse_config(&t).unwrap()).unwrap()
    };
    let l = load("llama-3.2-1b.v5.json");
    assert!(l.tied_embeddings && l.head_dim == 64 && l.n_kv_heads == 8);
    assert!(matches!(l.rope.scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0));
    let q = load("qwen2.5-0.5b.v4.json");
    assert!(q.qkv_bias && q.tied_embeddings && q.head_dim == 64 && q.sliding_window.is_none());
    let q3 = load("qwen3-0.6b.v5.json");
    assert_eq!((q3.head_dim, q3.qk_norm), (128, QkNorm::PerHead));
    assert_ne!(q3.head_dim * q3.n_heads, q3.hidden);
    let m = load("mistral-7b-v0.1.v4.json");
    assert_eq!(m.sliding_window, Some(4096));
    let x = load("mixtral-8x7b-v0.1.v5.json").moe.unwrap();
    assert_eq!(
        (x.n_experts, x.n_experts_used, x.norm_topk_prob),
        (8, 2, true)
    );
    let q2m = load("qwen1.5-moe-a2.7b.v5.json").moe.unwrap();
    assert_eq!(
        (q2m.n_experts, q2m.expert_ffn, q2m.shared_expert_ffn),
        (60, 1408, Some(5632))
    );
    assert!(!q2m.norm_topk_prob);
    let q3m = load("qwen3-30b-a3b.v5.json").moe.unwrap();
    assert_eq!(
        (q3m.n_experts, q3m.n_experts_used, q3m.expert_ffn),
        (128, 8, 768)
    );
    assert!(q3m.norm_topk_prob && q3m.sparse_layers.iter().all(|&s| s));
    let o = load("olmoe-1b-7b-0924.v4.json");
    assert_eq!(o.qk_norm, QkNorm::Full);
    assert_eq!(o.moe.unwrap().n_experts, 64);
}

#[test]
fn unsupported_features_are_errors() {
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("qwen3-0.6b.v4.json")).unwrap(),
    )
    .unwrap();
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        spec_from_config(&parse_config(&c.to_string()).unwrap())
    };
    let cases = [
        ("attention_bias", Value::Bool(true), "attention_bias"),
        ("hidden_act", Value::String("gelu".into()), "gelu"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        (
            "partial_rotary_factor",
            serde_json::json!(0.5),
            "partial_rotary_factor",
        ),
        (
            "num_attention_heads",
            serde_json::json!(0),
            "num_attention_heads",
        ),
        ("num_key_value_heads", serde_json::json!(3), "kv heads"),
        ("hidden_size", serde_json::json!("big"), "hidden_size"),
        ("eos_token_id", serde_json::json!([1, -2]), "eos_token_id"),
        ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
    ];
    for (k, v, needle) in cases {
        let err = with(k, v.clone()).expect_err(k);
        assert!(err.to_string().contains(needle), "{k}={v}: {err}");
    }
    let mut llama3 = base.clone();
    llama3["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    let err = spec_from_config(&parse_config(&llama3.to_string()).unwrap()).unwrap_err();
    assert!(err.to_string().contains("needs"), "{err}");
}
