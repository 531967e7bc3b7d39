//! GGUF files → ModelFile. The oracle's GGUF fixtures (converted from the HF fixtures with the
//! python `gguf` package, llama.cpp's conventions) must describe the same model as the HF
//! directories they came from; small files written here cover the other architectures,
//! merged and per-expert experts, tied embeddings and bad metadata.

use std::path::{Path, PathBuf};

use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::GgufValue;
use flowgate_formats::model::{self, ModelSource};
use flowgate_formats::{Arch, DType, ExpertProj, FormatError, QkNorm, RopeScaling, RopeStyle};
use rand::{Rng, SeedableRng};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn gguf_fixtures_match_their_hf_sources() {
    for (gguf, hf) in [
        ("llama-f32.gguf", "llama"),
        ("llama-q8_0.gguf", "llama"),
        ("qwen3_moe-f32.gguf", "qwen3_moe"),
        ("qwen3_moe-q8_0.gguf", "qwen3_moe"),
    ] {
        let g = model::open(&fixtures().join("gguf").join(gguf))
            .unwrap_or_else(|e| panic!("{gguf}: {e}"));
        let h = model::open(&fixtures().join(hf)).unwrap();
        assert!(matches!(g.source, ModelSource::Gguf(_)));
        let (gs, hs) = (&g.spec, &h.spec);
        assert_eq!(gs.arch, hs.arch, "{gguf}");
        assert_eq!(
            (
                gs.vocab_size,
                gs.hidden,
                gs.n_layers,
                gs.n_heads,
                gs.n_kv_heads,
                gs.head_dim
            ),
            (
                hs.vocab_size,
                hs.hidden,
                hs.n_layers,
                hs.n_heads,
                hs.n_kv_heads,
                hs.head_dim
            ),
            "{gguf}"
        );
        assert_eq!(
            (gs.rms_eps, gs.rope.theta),
            (hs.rms_eps, hs.rope.theta),
            "{gguf}"
        );
        assert_eq!(
            (gs.qkv_bias, gs.qk_norm, gs.tied_embeddings),
            (hs.qkv_bias, hs.qk_norm, hs.tied_embeddings)
        );
        assert_eq!(gs.moe, hs.moe, "{gguf}");
        assert_eq!(gs.ffn, hs.ffn, "{gguf}");
        assert_eq!(gs.sliding_window, hs.sliding_window);
        assert_eq!(gs.context_length, hs.context_length);
        match gs.arch {
            Arch::Llama => {
                // llama.cpp's llama: q/k rows permuted, "normal" rope, llama3 factors in a tensor.
                assert_eq!(gs.rope.style, RopeStyle::Interleaved);
                assert!(matches!(hs.rope.scaling, Some(RopeScaling::Llama3 { .. })));
                assert_eq!(gs.rope.scaling, None);
                let rf = g.catalog.get("rope_freqs.weight").expect("rope_freqs kept");
                assert_eq!(rf.shape, [gs.head_dim as u64 / 2]);
            }
            _ => assert_eq!(gs.rope.style, RopeStyle::Halves),
        }
        // Every HF tensor has a GGUF counterpart of the same shape (experts via the merged
        // tensors), and the GGUF has nothing else but rope_freqs.
        let mut matched = 0;
        for t in h.catalog.iter() {
            if let Some(gt) = g.catalog.get(&t.name) {
                assert_eq!(gt.shape, t.shape, "{gguf} {}", t.name);
                matched += 1;
            }
        }
        if let Some(m) = &gs.moe {
            for l in (0..gs.n_layers).filter(|&l| gs.is_sparse_layer(l)) {
                for p in [ExpertProj::Gate, ExpertProj::Up, ExpertProj::Down] {
                    for e in 0..m.n_experts {
                        let a = g.catalog.expert(l, p, e).unwrap();
                        let b = h.catalog.expert(l, p, e).unwrap();
                        assert_eq!(a.shape, b.shape);
                        matched += 1;
                    }
                }
            }
        }
        assert_eq!(matched, h.catalog.len(), "{gguf}");
        let q8 = gguf.contains("q8_0");
        assert_eq!(
            g.catalog.iter().any(|t| t.dtype == DType::Q8_0),
            q8,
            "{gguf}"
        );
    }
}

/// Writes a GGUF with `meta` and random-filled tensors (name, dtype, shape outermost first).
fn write_gguf(path: &Path, meta: &[(&str, GgufValue)], tensors: &[(String, Vec<u64>)]) {
    let mut w = GgufWriter::new(32);
    for (k, v) in meta {
        w.add_metadata(k, v.clone());
    }
    for (n, s) in tensors {
        w.add_tensor(n, DType::F32, s).unwrap();
    }
    let f = std::fs::File::create(path).unwrap();
    let mut d = w.start(std::io::BufWriter::new(f)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (_, s) in tensors {
        let n: u64 = s.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
            .collect();
        d.write_tensor(&bytes).unwrap();
    }
    d.finish().unwrap();
}

struct Shape {
    arch: &'static str,
    layers: usize,
    hidden: u64,
    heads: u64,
    kv: u64,
    hd: u64,
    ffn: u64,
    vocab: u64,
    experts: u64,
    eff: u64,
    merged: bool,
    tied: bool,
    bias: bool,
    qk: QkNorm,
    shexp: u64,
}

type Meta = Vec<(String, GgufValue)>;

fn meta_for(s: &Shape) -> Meta {
    let a = s.arch;
    let mut m = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(a.into()),
        ),
        (
            "general.name".to_string(),
            GgufValue::String(format!("test-{a}")),
        ),
        (format!("{a}.block_count"), GgufValue::U32(s.layers as u32)),
        (format!("{a}.context_length"), GgufValue::U32(256)),
        (
            format!("{a}.embedding_length"),
            GgufValue::U32(s.hidden as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            GgufValue::U32(s.ffn as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            GgufValue::U32(s.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            GgufValue::U32(s.kv as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            GgufValue::U32(s.hd as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), GgufValue::F32(10000.0)),
        ("tokenizer.ggml.bos_token_id".to_string(), GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(2)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(
                (0..s.vocab)
                    .map(|i| GgufValue::String(format!("t{i}")))
                    .collect(),
            ),
        ),
    ];
    if s.experts > 0 {
        m.push((
            format!("{a}.expert_count"),
            GgufValue::U32(s.experts as u32),
        ));
        m.push((format!("{a}.expert_used_count"), GgufValue::U32(2)));
        if a != "llama" && a != "olmoe" {
            m.push((
                format!("{a}.expert_feed_forward_length"),
                GgufValue::U32(s.eff as u32),
            ));
        }
        if s.shexp > 0 {
            m.push((
                format!("{a}.expert_shared_feed_forward_length"),
                GgufValue::U32(s.shexp as u32),
            ));
        }
    }
    m
}

fn tensors_for(s: &Shape) -> Vec<(String, Vec<u64>)> {
    let (h, qd, kvd) = (s.hidden, s.heads * s.hd, s.kv * s.hd);
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![s.vocab, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    if !s.tied {
        t.push(("output.weight".into(), vec![s.vocab, h]));
    }
    for l in 0..s.layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        t.push((n("attn_norm.weight"), vec![h]));
        t.push((n("attn_q.weight"), vec![qd, h]));
        t.push((n("attn_k.weight"), vec![kvd, h]));
        t.push((n("attn_v.weight"), vec![kvd, h]));
        t.push((n("attn_output.weight"), vec![h, qd]));
        if s.bias {
            t.push((n("attn_q.bias"), vec![qd]));
            t.push((n("attn_k.bias"), vec![kvd]));
            t.push((n("attn_v.bias"), vec![kvd]));
        }
        match s.qk {
            QkNorm::PerHead => {
                t.push((n("attn_q_norm.weight"), vec![s.hd]));
                t.push((n("attn_k_norm.weight"), vec![s.hd]));
            }
            QkNorm::Full => {
                t.push((n("attn_q_norm.weight"), vec![qd]));
                t.push((n("attn_k_norm.weight"), vec![kvd]));
            }
            QkNorm::None => {}
        }
        t.push((n("ffn_norm.weight"), vec![h]));
        if s.experts == 0 {
            t.push((n("ffn_gate.weight"), vec![s.ffn, h]));
            t.push((n("ffn_up.weight"), vec![s.ffn, h]));
            t.push((n("ffn_down.weight"), vec![h, s.ffn]));
            continue;
        }
        t.push((n("ffn_gate_inp.weight"), vec![s.experts, h]));
        if s.merged {
            t.push((n("ffn_gate_exps.weight"), vec![s.experts, s.eff, h]));
            t.push((n("ffn_up_exps.weight"), vec![s.experts, s.eff, h]));
            t.push((n("ffn_down_exps.weight"), vec![s.experts, h, s.eff]));
        } else {
            for e in 0..s.experts {
                t.push((n(&format!("ffn_gate.{e}.weight")), vec![s.eff, h]));
                t.push((n(&format!("ffn_up.{e}.weight")), vec![s.eff, h]));
                t.push((n(&format!("ffn_down.{e}.weight")), vec![h, s.eff]));
            }
        }
        if s.shexp > 0 {
            t.push((n("ffn_gate_inp_shexp.weight"), vec![h]));
            t.push((n("ffn_gate_shexp.weight"), vec![s.shexp, h]));
            t.push((n("ffn_up_shexp.weight"), vec![s.shexp, h]));
            t.push((n("ffn_down_shexp.weight"), vec![h, s.shexp]));
        }
    }
    t
}

fn base(arch: &'static str) -> Shape {
    Shape {
        arch,
        layers: 2,
        hidden: 32,
        heads: 4,
        kv: 2,
        hd: 8,
        ffn: 48,
        vocab: 50,
        experts: 0,
        eff: 16,
        merged: true,
        tied: false,
        bias: false,
        qk: QkNorm::None,
        shexp: 0,
    }
}

fn build(dir: &Path, s: &Shape) -> PathBuf {
    let p = dir.join(format!("{}-{}.gguf", s.arch, s.merged));
    let meta = meta_for(s);
    let meta: Vec<(&str, GgufValue)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_gguf(&p, &meta, &tensors_for(s));
    p
}

#[test]
fn every_gguf_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let cases = vec![
        (
            Shape {
                tied: true,
                ..base("llama")
            },
            Arch::Llama,
            RopeStyle::Interleaved,
        ),
        (base("mistral"), Arch::Mistral, RopeStyle::Interleaved),
        (
            Shape {
                experts: 4,
                eff: 48,
                ..base("llama")
            },
            Arch::Mixtral,
            RopeStyle::Interleaved,
        ),
        (
            Shape {
                experts: 4,
                eff: 48,
                merged: false,
                ..base("llama")
            },
            Arch::Mixtral,
            RopeStyle::Interleaved,
        ),
        (
            Shape {
                bias: true,
                tied: true,
                ..base("qwen2")
            },
            Arch::Qwen2,
            RopeStyle::Halves,
        ),
        (
            Shape {
                qk: QkNorm::PerHead,
                hd: 16,
                ..base("qwen3")
            },
            Arch::Qwen3,
            RopeStyle::Halves,
        ),
        (
            Shape {
                bias: true,
                experts: 4,
                shexp: 40,
                ..base("qwen2moe")
            },
            Arch::Qwen2Moe,
            RopeStyle::Halves,
        ),
        (
            Shape {
                qk: QkNorm::PerHead,
                experts: 8,
                ..base("qwen3moe")
            },
            Arch::Qwen3Moe,
            RopeStyle::Halves,
        ),
        (
            Shape {
                qk: QkNorm::Full,
                experts: 8,
                eff: 48,
                ..base("olmoe")
            },
            Arch::Olmoe,
            RopeStyle::Halves,
        ),
    ];
    for (s, arch, style) in cases {
        let p = build(dir.path(), &s);
        let mf = model::open(&p).unwrap_or_else(|e| panic!("{}: {e}", s.arch));
        let sp = &mf.spec;
        assert_eq!(mf.name, format!("test-{}", s.arch));
        assert_eq!(
            (sp.arch, sp.rope.style, sp.qk_norm),
            (arch, style, s.qk),
            "{}",
            s.arch
        );
        assert_eq!(sp.vocab_size as u64, s.vocab);
        assert_eq!(sp.head_dim as u64, s.hd);
        assert_eq!(sp.tied_embeddings, s.tied);
        assert_eq!(sp.qkv_bias, s.bias);
        assert_eq!(
            (sp.bos_token_id, sp.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert_eq!(sp.context_length, Some(256));
        match &sp.moe {
            None => {
                assert_eq!(s.experts, 0);
                assert_eq!(sp.ffn as u64, s.ffn);
            }
            Some(m) => {
                assert_eq!(m.n_experts as u64, s.experts);
                assert_eq!(m.expert_ffn as u64, s.eff);
                assert_eq!(sp.ffn, 0);
                assert_eq!(
                    m.norm_topk_prob,
                    matches!(arch, Arch::Mixtral | Arch::Qwen3Moe),
                    "{}",
                    s.arch
                );
                assert_eq!(
                    m.shared_expert_ffn.map(|x| x as u64),
                    (s.shexp > 0).then_some(s.shexp)
                );
                assert!(m.sparse_layers.iter().all(|&x| x));
                let d = mf.catalog.expert(1, ExpertProj::Down, 3).unwrap();
                assert_eq!(d.shape, [s.hidden, s.eff]);
            }
        }
    }
}

#[test]
fn gguf_bad_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let s = base("llama");
    let good = meta_for(&s);
    let tensors = tensors_for(&s);
    let try_meta = |edit: &dyn Fn(&mut Meta)| {
        let mut m = good.clone();
        edit(&mut m);
        let p = dir.path().join("bad.gguf");
        let mm: Vec<(&str, GgufValue)> = m.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        write_gguf(&p, &mm, &tensors);
        model::open(&p).unwrap_err()
    };
    let set = |key: &'static str, v: GgufValue| {
        move |m: &mut Meta| {
            m.retain(|(k, _)| k != key);
            m.push((key.to_string(), v.clone()));
        }
    };
    let e = try_meta(&set(
        "general.architecture",
        GgufValue::String("gemma".into()),
    ));
    assert!(
        matches!(e, FormatError::UnknownArchitecture(ref a) if a == "gemma"),
        "{e}"
    );
    let e = try_meta(&|m| m.retain(|(k, _)| k != "llama.block_count"));
    assert!(
        matches!(e, FormatError::MissingKey(ref k) if k == "llama.block_count"),
        "{e}"
    );
    let e = try_meta(&set("llama.block_count", GgufValue::U64(1 << 40)));
    assert!(e.to_string().contains("block count"), "{e}");
    let e = try_meta(&set("llama.block_count", GgufValue::U32(3)));
    assert!(
        matches!(e, FormatError::MissingTensor(ref t) if t.starts_with("blk.2.")),
        "{e}"
    );
    let e = try_meta(&set("llama.embedding_length", GgufValue::U32(64)));
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e}");
    let e = try_meta(&set(
        "llama.attention.head_count",
        GgufValue::String("4".into()),
    ));
    assert!(matches!(e, FormatError::Metadata(_)), "{e}");
    let e = try_meta(&set(
        "llama.rope.scaling.type",
        GgufValue::String("yarn".into()),
    ));
    assert!(e.to_string().contains("yarn"), "{e}");
    let e = try_meta(&set("llama.rope.dimension_count", GgufValue::U32(4)));
    assert!(e.to_string().contains("partial"), "{e}");
    let e = try_meta(&set(
        "llama.attention.head_count_kv",
        GgufValue::Array(vec![GgufValue::U32(2), GgufValue::U32(4)]),
    ));
    assert!(e.to_string().contains("per-layer"), "{e}");
    let e = try_meta(&set("llama.expert_count", GgufValue::U32(4)));
    assert!(
        matches!(
            e,
            FormatError::MissingKey(_) | FormatError::MissingTensor(_)
        ),
        "{e}"
    );

    // Linear rope scaling is read; a uniform per-layer kv-head array is accepted.
    let mut m = good.clone();
    m.push((
        "llama.rope.scaling.type".into(),
        GgufValue::String("linear".into()),
    ));
    m.push(("llama.rope.scaling.factor".into(), GgufValue::F32(4.0)));
    m.retain(|(k, _)| k != "llama.attention.head_count_kv");
    m.push((
        "llama.attention.head_count_kv".into(),
        GgufValue::Array(vec![GgufValue::U32(2); 2]),
    ));
    let p = dir.path().join("ok.gguf");
    let mm: Vec<(&str, GgufValue)> = m.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_gguf(&p, &mm, &tensors);
    let mf = model::open(&p).unwrap();
    assert_eq!(
        mf.spec.rope.scaling,
        Some(RopeScaling::Linear { factor: 4.0 })
    );
    assert_eq!(mf.spec.n_kv_heads, 2);
}

#[test]
fn non_gguf_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"this is not a gguf file at all").unwrap();
    assert!(matches!(
        model::open(&p).unwrap_err(),
        FormatError::BadMagic { .. }
    ));
    std::fs::write(&p, b"").unwrap();
    assert!(model::open(&p).is_err());
}
