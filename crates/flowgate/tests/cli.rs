//! The `flowgate` binary end to end: synth → inspect / logits / generate / bench, the fixture
//! through the command line, and bad input giving one clear error line (exit 1, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("spawn flowgate")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "flowgate {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail cleanly; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "flowgate {args:?}: expected exit 1, stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "flowgate {args:?} panicked: {err}"
    );
    assert!(err.starts_with("error: "), "flowgate {args:?}: {err}");
    err
}

/// One synthetic tiny model per test process.
fn tiny() -> &'static Path {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = P.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tiny.gguf");
        ok(&[
            "synth",
            "--shape",
            "tiny",
            "--out",
            p.to_str().unwrap(),
            "--quiet",
        ]);
        (d, p)
    });
    p
}

fn logits(model: &str, tokens: &str, mode: &str) -> Vec<Vec<f32>> {
    let out = ok(&[
        "logits", model, "--tokens", tokens, "--mode", mode, "-t", "2",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn synth_is_deterministic_and_inspectable() {
    let p = tiny();
    let d = tempfile::tempdir().unwrap();
    let p2 = d.path().join("again.gguf");
    ok(&[
        "synth",
        "--shape",
        "tiny",
        "--out",
        p2.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(std::fs::read(p).unwrap(), std::fs::read(&p2).unwrap());
    let out = ok(&["inspect", p.to_str().unwrap()]);
    assert!(out.contains("architecture  llama"), "{out}");
    assert!(out.contains("Q4_K"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(j["layers"], 4);
    assert_eq!(j["vocab_size"], 1024);
    assert_eq!(j["tensors"].as_array().unwrap().len(), 3 + 4 * 9);
}

#[test]
fn prefill_and_decode_agree_on_q4k() {
    let p = tiny().to_str().unwrap();
    let toks = "5,900,17,3,1023,44,1,250";
    let a = logits(p, toks, "prefill");
    let b = logits(p, toks, "decode");
    assert_eq!(a.len(), 8);
    assert!(a.iter().all(|r| r.len() == 1024));
    assert!(a.iter().flatten().all(|v| v.is_finite()));
    let e = rel_err(&b, &a);
    assert!(e < 1e-4, "prefill vs decode relative error {e}");
}

#[test]
fn generate_json_is_deterministic_greedy() {
    let p = tiny().to_str().unwrap();
    let args = [
        "generate",
        p,
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    let a: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let b: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(a, b);
    let toks = a["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 12);
    // The first generated token is the arg-max of the last prompt position's logits.
    let l = logits(p, "1,2,3", "prefill");
    let last = &l[2];
    let best = (0..last.len())
        .max_by(|&i, &j| last[i].total_cmp(&last[j]))
        .unwrap();
    assert_eq!(toks[0].as_u64().unwrap() as usize, best);
    // Sampling with a seed is reproducible too.
    let s = [
        "generate",
        p,
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "9",
        "--ignore-eos",
        "--json",
    ];
    assert_eq!(ok(&s), ok(&s));
}

#[test]
fn fixture_through_the_cli_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    let tokens: Vec<String> = j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let vocab = j["vocab_size"].as_u64().unwrap() as usize;
    let raw = std::fs::read(dir.join("logits.f32")).unwrap();
    let reference: Vec<Vec<f32>> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect::<Vec<_>>()
        .chunks(vocab)
        .map(|r| r.to_vec())
        .collect();
    for mode in ["prefill", "decode"] {
        let ours = logits(dir.to_str().unwrap(), &tokens.join(","), mode);
        let e = rel_err(&ours, &reference);
        assert!(e <= 1e-4, "{mode}: relative error {e}");
    }
    let greedy: serde_json::Value = serde_json::from_str(&ok(&[
        "generate",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--max-tokens",
        &j["greedy"].as_array().unwrap().len().to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]))
    .unwrap();
    assert_eq!(greedy["tokens"], j["greedy"]);
}

#[test]
fn bench_decode_reports_json() {
    let p = tiny().to_str().unwrap();
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "bench", "decode", p, "--prompt", "16", "--gen", "4", "--reps", "1", "--json", "-t", "2",
    ]))
    .unwrap();
    assert!(j["prefill_tps"].as_f64().unwrap() > 0.0);
    assert!(j["decode_tps"].as_f64().unwrap() > 0.0);
    assert!(j["memory_read_gbps"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_gives_one_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.gguf");
    let e = fails(&["inspect", missing.to_str().unwrap()]);
    assert!(e.contains("nope.gguf"), "{e}");

    let garbage = d.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model file at all").unwrap();
    let e = fails(&["inspect", garbage.to_str().unwrap()]);
    assert!(e.to_lowercase().contains("gguf"), "{e}");

    // Truncated copies of a real file.
    let full = std::fs::read(tiny()).unwrap();
    for cut in [10, 100, 1000, full.len() / 2, full.len() - 1] {
        let t = d.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&t, &full[..cut]).unwrap();
        fails(&["logits", t.to_str().unwrap(), "--tokens", "1"]);
    }

    let p = tiny().to_str().unwrap();
    let e = fails(&["logits", p, "--tokens", "1,99999"]);
    assert!(e.contains("99999"), "{e}");
    let e = fails(&["generate", p, "--tokens", "1,x", "--json"]);
    assert!(e.contains("'x'"), "{e}");
    fails(&["logits", p, "--tokens", ","]);
    let e = fails(&["run", p, "hello"]);
    assert!(e.contains("no tokenizer"), "{e}");
    fails(&["generate", p, "--tokens", "1", "--top-p", "2"]);
}

/// A tiny model that speaks text: the synthetic weights plus the BPE tokenizer and the Qwen2.5
/// chat template from the engine's tokenizer fixtures.
fn tiny_with_tokenizer(dir: &Path) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flowgate-engine/tests/data");
    let templates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("chat/templates.json")).unwrap())
            .unwrap();
    let tpl = dir.join("chatml.jinja");
    std::fs::write(&tpl, templates["qwen2.5"]["source"].as_str().unwrap()).unwrap();
    let p = dir.join("talk.gguf");
    ok(&[
        "synth",
        "--shape",
        "tiny",
        "--out",
        p.to_str().unwrap(),
        "--quiet",
        "--tokenizer-from",
        data.join("tok/bpe/bpe.gguf").to_str().unwrap(),
        "--chat-template",
        tpl.to_str().unwrap(),
    ]);
    p
}

#[test]
fn run_streams_text_with_prompt_and_in_chat() {
    let d = tempfile::tempdir().unwrap();
    let p = tiny_with_tokenizer(d.path());
    let model = p.to_str().unwrap();
    let greedy = [
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "-t",
        "2",
        "--ctx",
        "512",
    ];
    let mut args = vec!["run", model, "Hello there"];
    args.extend(greedy);
    let a = ok(&args);
    assert_eq!(a, ok(&args), "greedy run is deterministic");
    assert!(!a.trim().is_empty());
    // --raw skips the template, so the model sees other tokens and (almost surely) answers
    // differently; both must work.
    let mut raw = args.clone();
    raw.push("--raw");
    ok(&raw);
    // Interactive chat: two turns on stdin, then an empty line ends it.
    let mut cmd = bin();
    cmd.args(["run", model]).args(greedy);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"Hello there\nAnd again\n\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    // The first answer equals the one-shot answer to the same prompt; a second one follows.
    assert!(out.starts_with(&a), "{out:?} vs {a:?}");
    assert!(out.len() > a.len(), "{out:?}");
}

#[test]
fn closed_stdout_is_not_a_panic() {
    use std::io::Read;
    let p = tiny().to_str().unwrap();
    let mut child = bin()
        .args(["logits", p, "--tokens", "1,2,3,4,5,6,7,8", "-t", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is now closed: the rest of the write hits a broken pipe.
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}

#[test]
fn bench_moe_pages_experts_within_the_budget() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3_moe");
    let fx = fx.to_str().unwrap();
    // Find the dense part's size from a sweep's report, then ask for it plus two slots. The
    // sweep is also drawn (`--plot`): a PNG next to the JSON.
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("sweep.png");
    let sweep: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "moe",
        fx,
        "--steps",
        "2",
        "--gen",
        "3",
        "--prompt",
        "2",
        "--json",
        "--plot",
        png.to_str().unwrap(),
    ]))
    .unwrap();
    let bytes = std::fs::read(&png).expect("--plot wrote no file");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    assert!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()) > 0);
    // A plot that cannot be written is refused before the sweep, in one line.
    let e = fails(&["bench", "moe", fx, "--plot", "/no/such/folder/p.png"]);
    assert!(e.contains("--plot") && e.contains("does not exist"), "{e}");
    let e = fails(&["bench", "moe", fx, "--plot", "sweep.jpg"]);
    assert!(e.contains(".png"), "{e}");
    let dense = sweep["dense_bytes"].as_u64().unwrap();
    let slot = sweep["expert_slot_bytes"].as_u64().unwrap();
    let n_experts = sweep["n_experts"].as_u64().unwrap();
    assert!(dense > 0 && slot > 0 && n_experts > 2);
    let tight = (dense + 2 * slot).to_string();
    for routing in ["router", "uniform"] {
        let j: serde_json::Value = serde_json::from_str(&ok(&[
            "bench",
            "moe",
            fx,
            "--ram-budget",
            &tight,
            "--ram-budget",
            "1GiB",
            "--gen",
            "6",
            "--prompt",
            "3",
            "--routing",
            routing,
            "--policy",
            "lfu",
            "--json",
        ]))
        .unwrap();
        let runs = j["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        let (paged, all) = (&runs[0], &runs[1]);
        assert_eq!(paged["paged"], true, "{paged}");
        assert_eq!(paged["cache_slots"], 2);
        assert!(paged["budget_peak_bytes"].as_u64().unwrap() <= dense + 2 * slot);
        let hr = paged["hit_rate"].as_f64().unwrap();
        assert!(
            (0.0..1.0).contains(&hr),
            "two slots cannot hold every expert: {hr}"
        );
        assert!(paged["bytes_read_per_token"].as_f64().unwrap() > 0.0);
        assert!(paged["decode_tps"].as_f64().unwrap() > 0.0);
        assert_eq!(all["paged"], false);
        assert_eq!(all["hit_rate"], 1.0);
        assert_eq!(all["cache_slots"].as_u64().unwrap(), n_experts);
    }
    // A malformed size is a usage error (clap's exit code 2) naming the flag and the value.
    let o = run(&["bench", "moe", fx, "--ram-budget", "12XB"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--ram-budget") && e.contains("bad size '12XB'"),
        "{e}"
    );
    let e = fails(&["bench", "moe", fx, "--ram-budget", "1KiB"]);
    assert!(e.contains("too small"), "{e}");
    let dense_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let e = fails(&["bench", "moe", dense_model.to_str().unwrap()]);
    assert!(e.contains("dense model"), "{e}");
}

/// A RAM budget of `fx`'s dense part and one expert slot (as `bench moe --json` reports them):
/// every layer pages through a single slot.
fn one_slot_budget(fx: &str) -> String {
    let sweep: serde_json::Value = serde_json::from_str(&ok(&[
        "bench", "moe", fx, "--steps", "2", "--gen", "1", "--prompt", "1", "--json",
    ]))
    .unwrap();
    (sweep["dense_bytes"].as_u64().unwrap() + sweep["expert_slot_bytes"].as_u64().unwrap())
        .to_string()
}

#[test]
fn ram_budget_pages_without_changing_logits() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
    let fx = fx.to_str().unwrap();
    let toks = "5,17,3,99,42,7,64,1";
    let budget = one_slot_budget(fx);
    for mode in ["prefill", "decode"] {
        let full = logits(fx, toks, mode);
        let o = run(&[
            "logits",
            fx,
            "-t",
            "2",
            "--tokens",
            toks,
            "--mode",
            mode,
            "--ram-budget",
            &budget,
            "--cache-policy",
            "lfu",
            "--explain-placement",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("expert cache") && err.contains("1 slots"),
            "{err}"
        );
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let paged: Vec<Vec<f32>> = serde_json::from_value(j["logits"].clone()).unwrap();
        assert_eq!(paged, full, "{mode}: paging changed the logits");
    }
}

/// `--device`: `cpu` always runs; without CUDA, `auto` runs on the CPU and `cuda` fails with
/// one clear line; a malformed device is a usage error. (With CUDA present, the device paths
/// are checked by tools/device/check.sh instead.)
#[test]
fn device_flag() {
    let p = tiny().to_str().unwrap();
    let cpu = ok(&["logits", p, "--tokens", "1,2,3", "--device", "cpu"]);
    let o = run(&["logits", p, "--tokens", "1,2", "--device", "cuda:x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected auto, cpu, cuda or cuda:N"));
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("a GPU is present: the no-CUDA paths are not exercised here");
        return;
    }
    let auto = ok(&["logits", p, "--tokens", "1,2,3", "--device", "auto"]);
    assert_eq!(auto, cpu);
    for d in ["cuda", "cuda:1"] {
        let e = fails(&["generate", p, "--tokens", "1,2", "--device", d]);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains("use --device cpu"), "{e}");
    }
}

#[test]
fn vram_budget_needs_a_gpu_and_a_valid_size() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
    let fx = fx.to_str().unwrap();
    let e = fails(&[
        "logits",
        fx,
        "--tokens",
        "1,2",
        "--device",
        "cpu",
        "--vram-budget",
        "1GiB",
    ]);
    assert!(
        e.contains("--vram-budget needs a GPU") && e.contains("--ram-budget"),
        "{e}"
    );
    let o = run(&["logits", fx, "--tokens", "1", "--vram-budget", "lots"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--vram-budget") && e.contains("lots"), "{e}");
    let o = run(&[
        "bench",
        "moe",
        fx,
        "--vram-budget",
        "1GiB",
        "--cpu-experts",
        "some",
    ]);
    assert_eq!(o.status.code(), Some(2));
    // The miss path is one of two words, on the commands that run a model and on bench moe.
    for cmd in [
        vec![
            "bench",
            "moe",
            fx,
            "--vram-budget",
            "1GiB",
            "--miss-path",
            "zero-copy",
        ],
        vec!["logits", fx, "--tokens", "1", "--miss-path", "zero-copy"],
    ] {
        let o = run(&cmd);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains("expected copy or in-place"), "{e}");
    }
    // Three tiers take one RAM budget under the VRAM sweep, and --cold only with it; both
    // refused before anything is loaded (no GPU needed to say so).
    for (args, want) in [
        (
            vec!["--ram-budget", "1GiB", "--ram-budget", "2GiB"],
            "one --ram-budget at most",
        ),
        (
            vec!["--cold"],
            "--cold under --vram-budget needs a --ram-budget",
        ),
    ] {
        let mut cmd = vec!["bench", "moe", fx, "--vram-budget", "1GiB"];
        cmd.extend(args);
        let e = fails(&cmd);
        assert!(e.contains(want), "{e}");
    }
}

/// Paging statistics reach the logs: `generate --ram-budget` with one expert slot logs the
/// host tier's hit rate, misses and bytes per token.
#[test]
fn expert_cache_statistics_are_logged() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
    let fx = fx.to_str().unwrap();
    let budget = one_slot_budget(fx);
    // The statistics line of `generate --ram-budget` (with `extra` flags), without the
    // terminal colours the log may carry (ESC [ ... m).
    let stats = |extra: &[&str]| -> String {
        let mut args = vec![
            "--log",
            "info",
            "generate",
            fx,
            "--tokens",
            "5,17,3",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--ram-budget",
            &budget,
        ];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        let line = e
            .lines()
            .find(|l| l.contains("expert cache statistics"))
            .unwrap_or_else(|| panic!("no statistics logged: {e}"));
        let mut plain = String::new();
        let mut esc = false;
        for c in line.chars() {
            match (esc, c) {
                (false, '\u{1b}') => esc = true,
                (true, 'm') => esc = false,
                (false, c) => plain.push(c),
                _ => {}
            }
        }
        plain
    };
    let line = stats(&[]);
    for field in [
        "tier",
        "\"ram\"",
        "hit_rate",
        "misses",
        "bytes_per_token",
        "stall_ms_per_token",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    // Speculative prefetch is off unless asked for; --expert-prefetch turns it on.
    let prefetched = |line: &str| -> u64 {
        line.split("prefetched=")
            .nth(1)
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of prefetched experts: {line}"))
    };
    assert_eq!(prefetched(&line), 0, "{line}");
    let line = stats(&["--expert-prefetch"]);
    assert!(
        prefetched(&line) > 0,
        "--expert-prefetch prefetched nothing: {line}"
    );
}
