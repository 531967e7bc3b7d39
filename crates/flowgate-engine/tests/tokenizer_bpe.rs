//! Byte-level BPE: the same trained vocabulary loaded from an HF directory (tokenizer.json) and
//! from a GGUF (tokens + merges + pre = "llama-bpe") must give the ids and decodes that the
//! python `tokenizers` package gave (fixtures from tools/tokenizer_fixtures/make_bpe.py).

#[path = "tokenizer_common/mod.rs"]
mod common;

use common::*;
use flowgate_engine::tokenizer::{GgufVocab, Tokenizer, TokenizerError};
use flowgate_formats::gguf::{GgufFile, GgufValue};

fn check_all(tok: &Tokenizer, source: &str) {
    let fx = load_cases("tok/bpe/cases.json");
    assert_eq!(
        tok.vocab_size() as u64,
        fx["vocab_size"].as_u64().unwrap(),
        "{source}"
    );
    assert_eq!(
        tok.bos_id(),
        Some(fx["bos"].as_u64().unwrap() as u32),
        "{source}"
    );
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            want,
            "{source}: encode {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["ids_bos"]),
            "{source}: encode+bos {text:?}"
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{source}: decode {text:?}"
        );
        let skip = c["decoded_skip"].as_str().unwrap();
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            skip,
            "{source}: decode skip {text:?}"
        );
        assert_eq!(stream_all(tok, &want), skip, "{source}: stream {text:?}");
    }
}

#[test]
fn hf_dir_matches_python_tokenizers() {
    let tok = Tokenizer::from_hf_dir(&data("tok/bpe")).unwrap();
    check_all(&tok, "hf");
    assert_eq!(tok.eos_ids(), &[tok.token_to_id("<|eot_id|>").unwrap()]);
}

#[test]
fn gguf_matches_python_tokenizers() {
    let g = GgufFile::open(&data("tok/bpe/bpe.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&g)
        .unwrap()
        .expect("tokenizer present");
    check_all(&tok, "gguf");
    let eot = tok.token_to_id("<|eot_id|>").unwrap();
    // EOS from metadata first, then control tokens that end generation by convention.
    let eot_text = tok.token_to_id("<|end_of_text|>").unwrap();
    assert_eq!(tok.eos_ids(), &[eot, eot_text]);
    // Control tokens are atomic and skipped by decode(skip_special); user-defined ones are kept.
    let call = tok.token_to_id("<tool_call>").unwrap();
    assert_eq!(tok.encode("<tool_call>", false).unwrap(), vec![call]);
    assert_eq!(tok.decode(&[eot, call], true).unwrap(), "<tool_call>");
}

#[test]
fn gguf_and_hf_agree_on_random_text() {
    use rand::{Rng, SeedableRng};
    let hf = Tokenizer::from_hf_dir(&data("tok/bpe")).unwrap();
    let g = GgufFile::open(&data("tok/bpe/bpe.gguf")).unwrap();
    let gg = Tokenizer::from_gguf(&g).unwrap().unwrap();
    let alphabet: Vec<char> = "aeiou xyzAEZ019 .,!?'\n\t-éüß中文😀<|>_".chars().collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let n = rng.random_range(0..40);
        let s: String = (0..n)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        let a = hf.encode(&s, true).unwrap();
        assert_eq!(a, gg.encode(&s, true).unwrap(), "{s:?}");
        assert_eq!(gg.decode(&a[1..], true).unwrap(), s);
    }
}

#[test]
fn model_none_or_absent_means_no_tokenizer() {
    let f = write_gguf(vec![(
        "tokenizer.ggml.model",
        GgufValue::String("none".into()),
    )]);
    assert!(Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap())
        .unwrap()
        .is_none());
    let f = write_gguf(vec![]);
    assert!(Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn unknown_model_and_pre_are_clear_errors() {
    let f = write_gguf(vec![
        ("tokenizer.ggml.model", GgufValue::String("t5".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![GgufValue::String("a".into())]),
        ),
    ]);
    let e = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap_err();
    assert!(
        matches!(e, TokenizerError::UnsupportedModel(ref m) if m == "t5"),
        "{e}"
    );
    let v = GgufVocab {
        model: "gpt2".into(),
        pre: Some("mystery".into()),
        tokens: vec!["a".into()],
        ..Default::default()
    };
    let e = Tokenizer::from_gguf_vocab(&v).unwrap_err();
    assert!(e.to_string().contains("mystery"), "{e}");
    // Missing vocabulary is an error, not a panic.
    let f = write_gguf(vec![(
        "tokenizer.ggml.model",
        GgufValue::String("gpt2".into()),
    )]);
    assert!(Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).is_err());
}

#[test]
fn out_of_range_ids_are_errors() {
    let tok = Tokenizer::from_hf_dir(&data("tok/bpe")).unwrap();
    let n = tok.vocab_size() as u32;
    assert!(matches!(
        tok.decode(&[1, n], false),
        Err(TokenizerError::IdOutOfRange { .. })
    ));
    assert!(tok.stream().next(n + 5).is_err());
}

#[test]
fn hf_add_bos_inferred_from_post_processor() {
    // Without tokenizer_config.json, BOS and add_bos come from tokenizer.json's post-processor
    // (the fixture's TemplateProcessing puts <|begin_of_text|> first, as Llama-3's does).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data("tok/bpe/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    assert_eq!(tok.bos_id(), Some(bos));
    assert!(tok.add_bos());
    assert_eq!(tok.encode("Hi", true).unwrap()[0], bos);
    // An explicit add_bos_token = false wins; eos ids merge config.json and generation_config.json.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": false}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [1, 4]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(!tok.add_bos());
    assert_eq!(
        tok.encode("Hi", true).unwrap(),
        tok.encode("Hi", false).unwrap()
    );
    assert_eq!(tok.eos_ids(), &[1, 4]);
}
