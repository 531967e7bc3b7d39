//! Running llama.cpp's `llama-bench` next to flowgate, so that comparisons come from the same
//! run on the same machine and file (build it with tools/llamacpp/build.sh). llama-bench is run
//! with its defaults otherwise (mmap on, its own warm-up run), `-o json`, and its mean tok/s
//! (`avg_ts`) taken for each test.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::memlimit::MemCgroup;

/// llama-bench's figures: prefill (pp) and decode (tg) tok/s, where asked for.
pub struct LlamaBench {
    pub pp_tps: Option<f64>,
    pub tg_tps: f64,
}

/// Runs `llama-bench -m model -p pp -n tg -t threads -r 1 -o json [extra…]` (inside `cg` if
/// given). `pp` = 0 skips the prompt test.
pub fn bench(
    bin: &Path,
    model: &Path,
    pp: usize,
    tg: usize,
    threads: usize,
    extra: &[&str],
    cg: Option<&MemCgroup>,
) -> Result<LlamaBench> {
    let mut args = vec![
        "-m".to_string(),
        model.display().to_string(),
        "-p".into(),
        pp.to_string(),
        "-n".into(),
        tg.to_string(),
        "-t".into(),
        threads.to_string(),
        "-r".into(),
        "1".into(),
        "-o".into(),
        "json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = child(bin, &args, cg)?;
    let j: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("llama-bench printed no JSON: {out}"))?;
    let rows = j.as_array().context("llama-bench JSON is not a list")?;
    let find = |n_prompt: usize, n_gen: usize| {
        rows.iter()
            .find(|x| {
                x["n_prompt"].as_u64() == Some(n_prompt as u64)
                    && x["n_gen"].as_u64() == Some(n_gen as u64)
            })
            .and_then(|r| r["avg_ts"].as_f64())
    };
    let tg_tps =
        find(0, tg).with_context(|| format!("no tg{tg} result from llama-bench: {out}"))?;
    let pp_tps = if pp > 0 {
        Some(find(pp, 0).with_context(|| format!("no pp{pp} result from llama-bench: {out}"))?)
    } else {
        None
    };
    Ok(LlamaBench { pp_tps, tg_tps })
}

/// Runs `bin args` (inside `cg` if given: the child moves itself in before `exec`) and returns
/// its stdout; a failure carries its stderr.
pub fn child(bin: &Path, args: &[String], cg: Option<&MemCgroup>) -> Result<String> {
    let mut cmd = match cg {
        Some(cg) => {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(cg.procs_file())
                .arg(bin)
                .args(args);
            c
        }
        None => {
            let mut c = std::process::Command::new(bin);
            c.args(args);
            c
        }
    };
    let o = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !o.status.success() {
        bail!(
            "{} failed ({}): {}",
            bin.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
