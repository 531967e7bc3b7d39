//! The GPU layer split is invisible to results: on every fixture (dense and MoE, tied and
//! untied embeddings), a model whose leading layers run on a second backend gives the same
//! logits, bit for bit, as the model in one piece, in one prefill pass and token by token.
//!
//! Both halves run on the CPU backend here (CI has no GPU), so any difference would come from
//! the split itself: layers taken out of order, a KV cache of the wrong layer, the residual
//! stream not handed over whole, the embedding or output head lost. The CUDA half is checked
//! on a GPU by `cuda_parity.rs` (`layer_split_under_a_vram_budget_matches_transformers`).

#[path = "model_common/mod.rs"]
mod model_common;

use std::path::{Path, PathBuf};

use flowgate_engine::backend::cpu::CpuBackend;
use flowgate_engine::models::{Logits, Model};
use flowgate_engine::residency::layer_split::{layer_bytes, LayerSplit};
use flowgate_engine::residency::SplitInput;
use model_common::{assert_same, fixtures, hf_case, prefill_and_decode, tokens, HF_ARCHS};

/// (model path, reference json with the prompt tokens)
fn all_fixtures() -> Vec<(PathBuf, PathBuf)> {
    let f = fixtures();
    let mut v: Vec<(PathBuf, PathBuf)> = HF_ARCHS.iter().map(|n| hf_case(n)).collect();
    for m in ["llama", "qwen3_moe"] {
        v.push((
            f.join(format!("gguf/{m}-q8_0.gguf")),
            f.join(format!("gguf/{m}-q8_0.ref.json")),
        ));
    }
    v
}

fn load(path: &Path, n_host: Option<usize>) -> Model<CpuBackend> {
    let file = flowgate_formats::model::open(path).unwrap();
    let tensors = flowgate_engine::weights::load_all(&file.catalog, 2, None).unwrap();
    match n_host {
        None => Model::new(file.spec.clone(), CpuBackend, tensors).unwrap(),
        Some(k) => Model::with_layer_split(file.spec.clone(), CpuBackend, tensors, k).unwrap(),
    }
}

#[test]
fn splitting_layers_does_not_change_logits() {
    for (path, json) in all_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let toks = tokens(&json);
        let whole = load(&path, None);
        assert_eq!(whole.n_host_layers(), 0);
        let (pre_ref, dec_ref) = prefill_and_decode(&whole, &toks);
        assert!(pre_ref.iter().all(|v| v.is_finite()));
        let n = whole.spec.n_layers;
        let mut ks = vec![1, n / 2, n];
        ks.dedup();
        let vocab = whole.spec.vocab_size;
        let half = toks.len() / 2;
        for k in ks {
            let mut split = load(&path, Some(k));
            assert_eq!(split.n_host_layers(), k, "{name}");
            // The CPU layers on the CPU for every step.
            split.set_prefill_offload(None);
            let (pre, dec) = prefill_and_decode(&split, &toks);
            assert_same(
                &pre,
                &pre_ref,
                &format!("{name}, {k} of {n} layers split, prefill"),
            );
            assert_same(
                &dec,
                &dec_ref,
                &format!("{name}, {k} of {n} layers split, decode"),
            );
            // Every step through the offload path (the CPU layers built on the model's
            // backend for the pass, keys and values copied over and back), the prompt in two
            // pieces so that the second finds keys and values to copy in.
            split.set_prefill_offload(Some(1));
            let what = format!("{name}, {k} of {n} layers split, offloaded");
            let (pre, dec) = prefill_and_decode(&split, &toks);
            assert_same(&pre, &pre_ref, &format!("{what}, prefill"));
            assert_same(&dec, &dec_ref, &format!("{what}, decode"));
            let mut c = split.new_cache(toks.len()).unwrap();
            let a = split.forward(&toks[..half], &mut c, Logits::All).unwrap();
            let b = split.forward(&toks[half..], &mut c, Logits::All).unwrap();
            assert_same(
                &a,
                &pre_ref[..half * vocab],
                &format!("{what}, first piece"),
            );
            assert_same(
                &b,
                &pre_ref[half * vocab..],
                &format!("{what}, second piece"),
            );
        }
    }
}

#[test]
fn a_split_past_the_last_layer_is_refused() {
    let path = fixtures().join("llama");
    let file = flowgate_formats::model::open(&path).unwrap();
    let tensors = flowgate_engine::weights::load_all(&file.catalog, 2, None).unwrap();
    let n = file.spec.n_layers;
    let e = Model::with_layer_split(file.spec.clone(), CpuBackend, tensors, n + 1)
        .err()
        .expect("a split of more layers than the model has must fail")
        .to_string();
    assert!(e.contains("layers on the CPU"), "{e}");
}

#[test]
fn a_cache_of_another_split_is_refused() {
    let path = fixtures().join("llama");
    let a = load(&path, Some(1));
    let b = load(&path, None);
    let mut c = b.new_cache(8).unwrap();
    let e = a
        .forward(&[1, 2], &mut c, Logits::Last)
        .expect_err("a KV cache with its layers elsewhere must be refused")
        .to_string();
    assert!(e.contains("KV cache"), "{e}");
}

/// The planner on real files: per-layer bytes add up to the file, and a budget one byte short
/// of the whole model moves exactly one layer (with the embedding, when it has its own).
#[test]
fn the_planner_reads_layers_from_the_catalog() {
    for (path, _) in all_fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let file = flowgate_formats::model::open(&path).unwrap();
        let (layers, head, embd) = layer_bytes(&file.spec, &file.catalog);
        assert_eq!(layers.len(), file.spec.n_layers);
        assert!(layers.iter().all(|&b| b > 0), "{name}");
        let listed: u64 = layers.iter().sum::<u64>() + head + embd;
        // Every tensor once, vectors as f32 (how a device holds them).
        let expected: u64 = file
            .catalog
            .iter()
            .filter(|t| t.name != "rope_freqs.weight")
            .map(|t| {
                if t.shape.len() == 1 {
                    4 * t.numel()
                } else {
                    t.nbytes
                }
            })
            .sum();
        assert_eq!(listed, expected, "{name}: every tensor counted once");
        let input = |budget| SplitInput {
            budget,
            layer_bytes: layers.clone(),
            kv_layer_bytes: 1000,
            head_bytes: head,
            embd_bytes: embd,
            act_bytes: 5000,
            staging: false,
        };
        let whole = listed + file.spec.n_layers as u64 * 1000 + 5000;
        assert_eq!(LayerSplit::plan(&input(whole)).unwrap().n_host, 0, "{name}");
        let p = LayerSplit::plan(&input(whole - 1)).unwrap();
        assert_eq!(p.n_host, 1, "{name}");
        assert_eq!(p.host_bytes, layers[0] + embd, "{name}");
        assert!(
            p.device_bytes + p.kv_device_bytes + p.act_bytes < whole,
            "{name}"
        );
    }
}
