//! Real chat templates (Llama-3, Qwen2.5, Mistral, Qwen3) and small feature templates rendered
//! by [`ChatTemplate`] must equal jinja2's output under transformers' settings (fixtures from
//! tools/tokenizer_fixtures/make_chat.py, cross-checked there against transformers itself).

use std::path::Path;

use flowgate_engine::chat::{ChatTemplate, Message};
use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::{GgufFile, GgufValue};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn templates_match_jinja2() {
    let templates = fixture("templates.json");
    let cases = fixture("cases.json");
    let now = cases["now_unix"].as_i64().unwrap();
    let convs = &cases["conversations"];
    let mut n = 0;
    for c in cases["cases"].as_array().unwrap() {
        let name = c["template"].as_str().unwrap();
        let t = &templates[name];
        let tmpl = ChatTemplate::new(
            t["source"].as_str().unwrap(),
            t["bos"].as_str().unwrap(),
            t["eos"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let conv = c["conversation"].as_str().unwrap();
        let msgs = messages(&convs[conv]);
        let add_gen = c["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl.render_at(&msgs, add_gen, now);
        match (&c["expected"], &c["error"]) {
            (Value::String(want), _) => {
                let got = got.unwrap_or_else(|e| panic!("{name}/{conv}/{add_gen}: {e}"));
                assert_eq!(&got, want, "{name}/{conv}/gen={add_gen}");
            }
            (_, Value::String(msg)) => {
                let e = got.expect_err(&format!("{name}/{conv}: expected error {msg}"));
                assert!(
                    e.to_string().contains(msg.as_str()),
                    "{name}/{conv}: {e} vs {msg}"
                );
            }
            _ => panic!("bad case"),
        }
        n += 1;
    }
    assert!(n >= 100, "{n}");
}

#[test]
fn from_hf_dir_variants() {
    let templates = fixture("templates.json");
    let src = templates["llama3"]["source"].as_str().unwrap();
    let msgs = vec![Message::new("user", "Hi")];
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_hf_dir(dir.path()).unwrap().is_none());

    // String form, BOS given as an AddedToken object.
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|begin_of_text|>", "special": true},
        "eos_token": "<|eot_id|>",
        "chat_template": src,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    let direct = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        direct.render(&msgs, true).unwrap()
    );
    assert!(t
        .render(&msgs, true)
        .unwrap()
        .starts_with("<|begin_of_text|>"));

    // List form: "default" is taken.
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}D"}],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "<s>D");

    // chat_template.jinja when tokenizer_config.json has none.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "J</s>");
}

#[test]
fn from_gguf_uses_vocab_bos_eos() {
    let templates = fixture("templates.json");
    let src = templates["mistral"]["source"].as_str().unwrap();
    let mut w = GgufWriter::new(32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    let toks = ["<unk>", "<s>", "</s>", "a"];
    w.add_metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(
            toks.iter()
                .map(|t| GgufValue::String(t.to_string()))
                .collect(),
        ),
    );
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    w.add_metadata("tokenizer.chat_template", GgufValue::String(src.into()));
    let f = tempfile::NamedTempFile::new().unwrap();
    w.start(f.reopen().unwrap()).unwrap().finish().unwrap();
    let g = GgufFile::open(f.path()).unwrap();
    let t = ChatTemplate::from_gguf(&g).unwrap().unwrap();
    assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "</s>"));
    let msgs = vec![Message::new("user", "Hi"), Message::new("assistant", "Yo")];
    let direct = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        direct.render(&msgs, false).unwrap()
    );

    let mut w = GgufWriter::new(32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    let f2 = tempfile::NamedTempFile::new().unwrap();
    w.start(f2.reopen().unwrap()).unwrap().finish().unwrap();
    assert!(ChatTemplate::from_gguf(&GgufFile::open(f2.path()).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn bad_template_is_an_error_not_a_panic() {
    assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
    assert!(t.render(&[Message::new("user", "x")], false).is_err());
}
