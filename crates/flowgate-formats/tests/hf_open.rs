//! HF directories → ModelFile: the oracle fixtures (written by transformers' `save_pretrained`,
//! one of them sharded) against their `ref.json` tensor lists, and directories built here
//! (single file, sharded, transformers-5 fused experts) whose bytes are checked through the
//! catalog's offsets.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flowgate_formats::hf::{canonical_name, map_name, HfTensor};
use flowgate_formats::model::{self, ModelSource};
use flowgate_formats::{ExpertProj, FormatError, TensorInfo};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[path = "../../../tests/fixtures/hf_archs.rs"]
mod hf_archs;
use hf_archs::HF_ARCHS as ARCHS;

fn read_bytes(t: &TensorInfo, files: &[PathBuf]) -> Vec<u8> {
    let mut f = std::fs::File::open(&files[t.file]).unwrap();
    f.seek(SeekFrom::Start(t.offset)).unwrap();
    let mut b = vec![0u8; t.nbytes as usize];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn fixtures_open_with_every_tensor_mapped() {
    for arch in ARCHS {
        let dir = fixtures_dir().join(arch);
        let mf = model::open(&dir).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(matches!(mf.source, ModelSource::HfDir(_)));
        assert_eq!(mf.spec.arch.hf_name(), arch);
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
        assert_eq!(mf.spec.vocab_size as u64, r["vocab_size"].as_u64().unwrap());
        let tensors = r["tensors"].as_object().unwrap();
        let mut mapped = 0;
        for (hf, info) in tensors {
            let canon = canonical_name(hf).unwrap_or_else(|| panic!("{arch}: {hf} unmapped"));
            let t = mf
                .catalog
                .get(&canon)
                .unwrap_or_else(|| panic!("{arch}: {canon} ({hf}) missing"));
            assert_eq!(&t.source_name, hf);
            let shape: Vec<u64> = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.shape, shape, "{arch} {hf}");
            let file = mf.catalog.files[t.file].file_name().unwrap();
            assert_eq!(
                file.to_str().unwrap(),
                info["file"].as_str().unwrap(),
                "{hf}"
            );
            mapped += 1;
        }
        // Nothing invented: the catalog is exactly the file's tensors.
        assert_eq!(mf.catalog.len(), mapped, "{arch}");
        // Tied qwen2 has no lm_head in the file and no output.weight in the catalog.
        assert_eq!(
            mf.spec.tied_embeddings,
            !mf.catalog.contains("output.weight")
        );
        if let Some(m) = &mf.spec.moe {
            for l in (0..mf.spec.n_layers).filter(|&l| mf.spec.is_sparse_layer(l)) {
                let t = mf.catalog.expert(l, ExpertProj::Down, 1).unwrap();
                assert_eq!(t.shape, [mf.spec.hidden as u64, m.expert_ffn as u64]);
            }
        }
    }
}

#[test]
fn fixture_bytes_are_little_endian_f32_at_the_offsets() {
    // qwen2's q bias is N(0, 0.1^2): finite, small, not all equal. A wrong offset would read
    // neighbouring data or header JSON.
    let mf = model::open(&fixtures_dir().join("qwen2")).unwrap();
    let t = mf.catalog.get("blk.1.attn_q.bias").unwrap();
    let b = read_bytes(t, &mf.catalog.files);
    let v: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(v.len(), 64);
    assert!(v.iter().all(|x| x.is_finite() && x.abs() < 1.0));
    assert!(v.windows(2).any(|w| w[0] != w[1]));
    // Norm weights are 1 + N(0, 0.1^2).
    let n = mf.catalog.get("blk.0.attn_norm.weight").unwrap();
    let b = read_bytes(n, &mf.catalog.files);
    let mean: f32 = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .sum::<f32>()
        / 64.0;
    assert!((mean - 1.0).abs() < 0.1, "mean {mean}");
}

#[test]
fn name_mapping_per_architecture() {
    let cases = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.3.input_layernorm.weight",
            "blk.3.attn_norm.weight",
        ),
        (
            "model.layers.3.post_attention_layernorm.weight",
            "blk.3.ffn_norm.weight",
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
        (
            "model.layers.0.self_attn.o_proj.weight",
            "blk.0.attn_output.weight",
        ),
        (
            "model.layers.12.self_attn.q_norm.weight",
            "blk.12.attn_q_norm.weight",
        ),
        (
            "model.layers.12.self_attn.k_norm.weight",
            "blk.12.attn_k_norm.weight",
        ),
        (
            "model.layers.1.mlp.gate_proj.weight",
            "blk.1.ffn_gate.weight",
        ),
        ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"),
        (
            "model.layers.1.mlp.down_proj.weight",
            "blk.1.ffn_down.weight",
        ),
        // mixtral
        (
            "model.layers.2.block_sparse_moe.gate.weight",
            "blk.2.ffn_gate_inp.weight",
        ),
        (
            "model.layers.2.block_sparse_moe.experts.7.w1.weight",
            "blk.2.ffn_gate.7.weight",
        ),
        (
            "model.layers.2.block_sparse_moe.experts.7.w3.weight",
            "blk.2.ffn_up.7.weight",
        ),
        (
            "model.layers.2.block_sparse_moe.experts.7.w2.weight",
            "blk.2.ffn_down.7.weight",
        ),
        // qwen2_moe / qwen3_moe / olmoe (and transformers-5 mixtral's renamed router)
        (
            "model.layers.5.mlp.gate.weight",
            "blk.5.ffn_gate_inp.weight",
        ),
        (
            "model.layers.5.mlp.experts.59.gate_proj.weight",
            "blk.5.ffn_gate.59.weight",
        ),
        (
            "model.layers.5.mlp.experts.59.up_proj.weight",
            "blk.5.ffn_up.59.weight",
        ),
        (
            "model.layers.5.mlp.experts.59.down_proj.weight",
            "blk.5.ffn_down.59.weight",
        ),
        (
            "model.layers.5.mlp.shared_expert.gate_proj.weight",
            "blk.5.ffn_gate_shexp.weight",
        ),
        (
            "model.layers.5.mlp.shared_expert.up_proj.weight",
            "blk.5.ffn_up_shexp.weight",
        ),
        (
            "model.layers.5.mlp.shared_expert.down_proj.weight",
            "blk.5.ffn_down_shexp.weight",
        ),
        (
            "model.layers.5.mlp.shared_expert_gate.weight",
            "blk.5.ffn_gate_inp_shexp.weight",
        ),
    ];
    for (hf, canon) in cases {
        assert_eq!(canonical_name(hf).as_deref(), Some(canon), "{hf}");
    }
    for fused in [
        "model.layers.4.mlp.experts.gate_up_proj",
        "model.layers.4.mlp.experts.gate_up_proj.weight",
    ] {
        assert_eq!(map_name(fused), HfTensor::FusedGateUp { layer: 4 });
    }
    assert_eq!(
        map_name("model.layers.4.mlp.experts.down_proj"),
        HfTensor::FusedDown { layer: 4 }
    );
    for ignored in [
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.rotary_emb.inv_freq",
        "model.layers.x.mlp.up_proj.weight",
        "model.layers.01.mlp.up_proj.weight",
        "model.layers.-1.mlp.up_proj.weight",
        "model.layers.0.mlp.experts.+1.up_proj.weight",
        "model.layers.0.block_sparse_moe.experts.0.up_proj.weight",
        "",
    ] {
        assert_eq!(map_name(ignored), HfTensor::Ignored, "{ignored}");
    }
}

// ---- directories built here ----------------------------------------------------------------

/// Writes a safetensors file: tensors (name, shape, f32 data) in the given order.
fn write_st(path: &Path, tensors: &[(String, Vec<u64>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, shape, data) in tensors {
        let n = data.len() as u64 * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, out).unwrap();
}

fn rand_tensor(
    rng: &mut rand::rngs::StdRng,
    name: &str,
    shape: &[u64],
) -> (String, Vec<u64>, Vec<f32>) {
    let n: u64 = shape.iter().product();
    let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    (name.to_string(), shape.to_vec(), data)
}

/// A small qwen3_moe: 2 layers, 4 experts, hidden 16, expert width 8, dense layer 1.
fn qwen3_moe_config() -> Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
        "mlp_only_layers": [1], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": false, "eos_token_id": 7
    })
}

fn qwen3_moe_tensors(
    rng: &mut rand::rngs::StdRng,
    fused: bool,
) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    let mut t = vec![
        rand_tensor(rng, "model.embed_tokens.weight", &[40, 16]),
        rand_tensor(rng, "model.norm.weight", &[16]),
        rand_tensor(rng, "lm_head.weight", &[40, 16]),
        rand_tensor(rng, "model.rotary_emb.inv_freq", &[4]),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("input_layernorm.weight", vec![16]),
            ("post_attention_layernorm.weight", vec![16]),
            ("self_attn.q_proj.weight", vec![16, 16]),
            ("self_attn.k_proj.weight", vec![8, 16]),
            ("self_attn.v_proj.weight", vec![8, 16]),
            ("self_attn.o_proj.weight", vec![16, 16]),
            ("self_attn.q_norm.weight", vec![8]),
            ("self_attn.k_norm.weight", vec![8]),
        ] {
            t.push(rand_tensor(rng, &format!("{p}{n}"), &s));
        }
        if l == 1 {
            t.push(rand_tensor(
                rng,
                &format!("{p}mlp.gate_proj.weight"),
                &[24, 16],
            ));
            t.push(rand_tensor(
                rng,
                &format!("{p}mlp.up_proj.weight"),
                &[24, 16],
            ));
            t.push(rand_tensor(
                rng,
                &format!("{p}mlp.down_proj.weight"),
                &[16, 24],
            ));
            continue;
        }
        t.push(rand_tensor(rng, &format!("{p}mlp.gate.weight"), &[4, 16]));
        if fused {
            t.push(rand_tensor(
                rng,
                &format!("{p}mlp.experts.gate_up_proj"),
                &[4, 16, 16],
            ));
            t.push(rand_tensor(
                rng,
                &format!("{p}mlp.experts.down_proj"),
                &[4, 16, 8],
            ));
        } else {
            for e in 0..4 {
                t.push(rand_tensor(
                    rng,
                    &format!("{p}mlp.experts.{e}.gate_proj.weight"),
                    &[8, 16],
                ));
                t.push(rand_tensor(
                    rng,
                    &format!("{p}mlp.experts.{e}.up_proj.weight"),
                    &[8, 16],
                ));
                t.push(rand_tensor(
                    rng,
                    &format!("{p}mlp.experts.{e}.down_proj.weight"),
                    &[16, 8],
                ));
            }
        }
    }
    t
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn single_file_dir_bytes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        qwen3_moe_config().to_string(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let tensors = qwen3_moe_tensors(&mut rng, false);
    write_st(&dir.path().join("model.safetensors"), &tensors);
    let mf = model::open(dir.path()).unwrap();
    assert_eq!(mf.spec.moe.as_ref().unwrap().sparse_layers, [true, false]);
    assert_eq!(mf.spec.ffn, 24);
    assert!(!mf.catalog.contains("rotary_emb.inv_freq"));
    for (name, shape, data) in &tensors {
        let Some(canon) = canonical_name(name) else {
            continue;
        };
        let t = mf.catalog.get(&canon).unwrap();
        assert_eq!(&t.shape, shape);
        assert_eq!(read_bytes(t, &mf.catalog.files), f32_bytes(data), "{name}");
    }
}

#[test]
fn fused_experts_split_into_per_expert_views() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        qwen3_moe_config().to_string(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let tensors = qwen3_moe_tensors(&mut rng, true);
    write_st(&dir.path().join("model.safetensors"), &tensors);
    let mf = model::open(dir.path()).unwrap();
    let by_name: BTreeMap<&str, &Vec<f32>> =
        tensors.iter().map(|(n, _, d)| (n.as_str(), d)).collect();
    let gu = by_name["model.layers.0.mlp.experts.gate_up_proj"]; // [4, 16, 16]: gate rows 0..8, up 8..16
    let down = by_name["model.layers.0.mlp.experts.down_proj"]; // [4, 16, 8]
    for e in 0..4usize {
        let slab = &gu[e * 256..(e + 1) * 256];
        let gate = mf.catalog.expert(0, ExpertProj::Gate, e).unwrap();
        let up = mf.catalog.expert(0, ExpertProj::Up, e).unwrap();
        let dn = mf.catalog.expert(0, ExpertProj::Down, e).unwrap();
        assert_eq!(
            (gate.shape.clone(), up.shape.clone(), dn.shape.clone()),
            (vec![8, 16], vec![8, 16], vec![16, 8])
        );
        assert_eq!(
            read_bytes(&gate, &mf.catalog.files),
            f32_bytes(&slab[..128])
        );
        assert_eq!(read_bytes(&up, &mf.catalog.files), f32_bytes(&slab[128..]));
        assert_eq!(
            read_bytes(&dn, &mf.catalog.files),
            f32_bytes(&down[e * 128..(e + 1) * 128])
        );
    }
    // Transposed fused layout ([E, hidden, 2I]) is refused with a clear error.
    let mut t2 = tensors.clone();
    for t in &mut t2 {
        if t.0 == "model.layers.0.mlp.experts.down_proj" {
            t.1 = vec![4, 8, 16];
        }
    }
    write_st(&dir.path().join("model.safetensors"), &t2);
    let err = model::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("transposed"), "{err}");
}

#[test]
fn sharded_dir_with_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        qwen3_moe_config().to_string(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let tensors = qwen3_moe_tensors(&mut rng, false);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_st(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_st(&dir.path().join("model-00002-of-00002.safetensors"), b);
    let mut wm = serde_json::Map::new();
    for (n, _, _) in a {
        wm.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, _, _) in b {
        wm.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": wm});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let mf = model::open(dir.path()).unwrap();
    assert_eq!(mf.catalog.files.len(), 2);
    for (name, _, data) in &tensors {
        if let Some(c) = canonical_name(name) {
            let t = mf.catalog.get(&c).unwrap();
            let want_file = if a.iter().any(|x| &x.0 == name) { 0 } else { 1 };
            assert_eq!(t.file, want_file, "{name}");
            assert_eq!(read_bytes(t, &mf.catalog.files), f32_bytes(data), "{name}");
        }
    }
    // The index naming a tensor its shard does not hold is an error.
    let mut wm2 = wm.clone();
    wm2.insert(
        "model.layers.0.mlp.gate.weight".into(),
        json!(
            if a.iter().any(|x| x.0 == "model.layers.0.mlp.gate.weight") {
                "model-00002-of-00002.safetensors"
            } else {
                "model-00001-of-00002.safetensors"
            }
        ),
    );
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"weight_map": wm2}).to_string(),
    )
    .unwrap();
    let err = model::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("model.layers.0.mlp.gate.weight"),
        "{err}"
    );
    // A shard path that leaves the directory is refused.
    let mut wm3 = wm.clone();
    wm3.insert(
        "model.norm.weight".into(),
        json!("../model-00001-of-00002.safetensors"),
    );
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"weight_map": wm3}).to_string(),
    )
    .unwrap();
    let err = model::open(dir.path()).unwrap_err();
    assert!(matches!(err, FormatError::Json { .. }), "{err}");
}
