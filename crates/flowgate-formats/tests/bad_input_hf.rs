//! Broken HF directories: clear errors, never panics. Each case starts from a valid copy of an
//! oracle fixture (written by transformers) and breaks one thing.

use std::path::{Path, PathBuf};

use flowgate_formats::model;
use flowgate_formats::FormatError;
use serde_json::Value;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch)
}

/// A temp copy of a fixture directory (config + safetensors + index).
fn copy_fixture(arch: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(arch)).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".safetensors") || name.ends_with(".json") {
            std::fs::copy(&p, dir.path().join(&name)).unwrap();
        }
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn copies_open_before_breaking() {
    for arch in ["llama", "qwen2_moe", "mixtral"] {
        let d = copy_fixture(arch);
        model::open(d.path()).unwrap();
    }
}

#[test]
fn missing_path_and_missing_files() {
    let e = model::open(Path::new("/nonexistent/flowgate/model")).unwrap_err();
    assert!(matches!(e, FormatError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/flowgate/model"));

    let d = tempfile::tempdir().unwrap();
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::Io { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );

    let d = copy_fixture("mistral");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = model::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let d = copy_fixture("llama");
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = model::open(d.path()).unwrap_err();
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn malformed_config_json() {
    let d = copy_fixture("qwen3");
    std::fs::write(
        d.path().join("config.json"),
        "{\"model_type\": \"qwen3\", \"hidden_size\": 64,,}",
    )
    .unwrap();
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::Json { ref path, .. } if path.ends_with("config.json")),
        "{e}"
    );
    for text in [
        "",
        "[]",
        "null",
        "{\"hidden_size\": 64}",
        "{\"model_type\": 3}",
    ] {
        std::fs::write(d.path().join("config.json"), text).unwrap();
        let e = model::open(d.path()).unwrap_err();
        assert!(!e.to_string().is_empty(), "{text}");
    }
}

#[test]
fn unknown_architecture_is_named() {
    let d = copy_fixture("llama");
    edit_config(d.path(), |v| v["model_type"] = "gemma".into());
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::UnknownArchitecture(ref a) if a == "gemma"),
        "{e}"
    );
    assert!(e.to_string().contains("gemma"));
}

#[test]
fn malformed_index_json() {
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors.index.json");
    for text in [
        "{\"weight_map\": {\"a\": 1}}",
        "{\"weight_map\": []}",
        "{\"metadata\": {}}",
        "{\"weight_map\": {}}",
        "{\"weight_map\": {\"model.norm.weight\": \"/etc/passwd\"}}",
        "{\"weight_map\": {\"model.norm.weight\": \"..\"}}",
        "not json",
    ] {
        std::fs::write(&p, text).unwrap();
        let e = model::open(d.path()).unwrap_err();
        assert!(matches!(e, FormatError::Json { .. }), "{text}: {e}");
        assert!(
            e.to_string().contains("model.safetensors.index.json"),
            "{e}"
        );
    }
}

#[test]
fn shape_disagreeing_with_config() {
    let d = copy_fixture("qwen2");
    // The file's intermediate size is 128.
    edit_config(d.path(), |v| v["intermediate_size"] = 96.into());
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::ShapeMismatch { ref tensor, .. } if tensor.starts_with("blk.0.ffn_")),
        "{e}"
    );

    let d = copy_fixture("qwen3_moe");
    edit_config(d.path(), |v| v["moe_intermediate_size"] = 16.into());
    let e = model::open(d.path()).unwrap_err();
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e}");

    let d = copy_fixture("llama");
    edit_config(d.path(), |v| v["vocab_size"] = 321.into());
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::ShapeMismatch { ref tensor, .. } if tensor == "token_embd.weight"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    // More layers or experts than the file has.
    let d = copy_fixture("mistral");
    edit_config(d.path(), |v| v["num_hidden_layers"] = 3.into());
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::MissingTensor(ref t) if t.starts_with("blk.2.")),
        "{e}"
    );

    let d = copy_fixture("olmoe");
    edit_config(d.path(), |v| v["num_experts"] = 9.into());
    let e = model::open(d.path()).unwrap_err();
    // The router's shape is checked first: [9, hidden] vs [8, hidden].
    assert!(
        matches!(
            e,
            FormatError::ShapeMismatch { .. } | FormatError::MissingTensor(_)
        ),
        "{e}"
    );

    // A tied model declared untied lacks output.weight.
    let d = copy_fixture("qwen2");
    edit_config(d.path(), |v| v["tie_word_embeddings"] = false.into());
    let e = model::open(d.path()).unwrap_err();
    assert!(
        matches!(e, FormatError::MissingTensor(ref t) if t == "output.weight"),
        "{e}"
    );

    // qwen2 needs q/k/v biases; qwen3 needs q/k norms.
    let d = copy_fixture("qwen3");
    edit_config(d.path(), |v| v["model_type"] = "qwen2".into());
    let e = model::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("attn_q.bias"), "{e}");
}

#[test]
fn absurd_config_values() {
    let d = copy_fixture("mixtral");
    for (k, v) in [
        ("num_hidden_layers", serde_json::json!(1u64 << 50)),
        ("num_local_experts", serde_json::json!(1u64 << 40)),
        ("hidden_size", serde_json::json!(u64::MAX)),
        ("num_experts_per_tok", serde_json::json!(9)),
        ("rms_norm_eps", serde_json::json!(-1.0)),
        ("num_key_value_heads", serde_json::json!(0)),
    ] {
        let d2 = copy_fixture("mixtral");
        edit_config(d2.path(), |c| c[k] = v.clone());
        let e = model::open(d2.path()).unwrap_err();
        assert!(!e.to_string().is_empty(), "{k}");
    }
    drop(d);
}

#[test]
fn corrupted_safetensors_in_a_dir() {
    let d = copy_fixture("qwen3");
    let p = d.path().join("model.safetensors");
    let full = std::fs::read(&p).unwrap();
    // Truncated data section: the last tensors lie past the end.
    std::fs::write(&p, &full[..full.len() - 100]).unwrap();
    let e = model::open(d.path()).unwrap_err();
    assert!(matches!(e, FormatError::OutOfBounds { .. }), "{e}");
    // Truncated inside the header.
    std::fs::write(&p, &full[..200]).unwrap();
    assert!(model::open(d.path()).is_err());
    // Empty file.
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        model::open(d.path()).unwrap_err(),
        FormatError::Truncated { .. }
    ));
}
