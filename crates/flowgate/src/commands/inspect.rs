//! `flowgate inspect`: architecture, hyperparameters, tensor table, bytes per dtype.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flowgate_formats::model::ModelSource;

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// Print every tensor (default: the first 40).
    #[arg(long)]
    pub all: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

pub fn main(a: Args) -> Result<()> {
    let f = flowgate_formats::model::open(&a.model)
        .with_context(|| format!("opening {}", a.model.display()))?;
    let s = &f.spec;
    let mut per_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in f.catalog.iter() {
        let e = per_dtype.entry(t.dtype.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.nbytes;
    }
    let format = match &f.source {
        ModelSource::Gguf(g) => format!("GGUF v{}", g.version),
        ModelSource::HfDir(_) => "HF safetensors".to_string(),
    };
    if a.json {
        let tensors: Vec<_> = f
            .catalog
            .iter()
            .map(|t| {
                serde_json::json!({"name": t.name, "source_name": t.source_name, "dtype": t.dtype.name(),
                    "shape": t.shape, "file": t.file, "offset": t.offset, "bytes": t.nbytes})
            })
            .collect();
        let out = serde_json::json!({
            "name": f.name, "format": format, "architecture": s.arch.hf_name(),
            "vocab_size": s.vocab_size, "hidden": s.hidden, "layers": s.n_layers,
            "heads": s.n_heads, "kv_heads": s.n_kv_heads, "head_dim": s.head_dim, "ffn": s.ffn,
            "rms_eps": s.rms_eps, "rope_theta": s.rope.theta, "rope_style": format!("{:?}", s.rope.style),
            "rope_scaling": s.rope.scaling.map(|r| format!("{r:?}")),
            "sliding_window": s.sliding_window, "qkv_bias": s.qkv_bias, "qk_norm": format!("{:?}", s.qk_norm),
            "tied_embeddings": s.tied_embeddings,
            "moe": s.moe.as_ref().map(|m| serde_json::json!({"experts": m.n_experts, "used": m.n_experts_used,
                "expert_ffn": m.expert_ffn, "norm_topk_prob": m.norm_topk_prob, "shared_expert_ffn": m.shared_expert_ffn,
                "sparse_layers": m.sparse_layers.iter().filter(|&&x| x).count()})),
            "total_bytes": f.catalog.total_bytes(),
            "bytes_per_dtype": per_dtype.iter().map(|(k, v)| (k.clone(), v.1)).collect::<BTreeMap<_, _>>(),
            "tensors": tensors,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    outln!("model         {}", f.name);
    outln!("format        {format}");
    outln!("architecture  {}", s.arch);
    outln!("vocab         {}", s.vocab_size);
    outln!("hidden        {}", s.hidden);
    outln!("layers        {}", s.n_layers);
    outln!(
        "attention     {} heads, {} kv heads, head dim {}{}{}",
        s.n_heads,
        s.n_kv_heads,
        s.head_dim,
        if s.qkv_bias { ", qkv bias" } else { "" },
        match s.qk_norm {
            flowgate_formats::QkNorm::None => "",
            flowgate_formats::QkNorm::PerHead => ", q/k norm per head",
            flowgate_formats::QkNorm::Full => ", q/k norm full width",
        }
    );
    if let Some(w) = s.sliding_window {
        outln!("window        {w}");
    }
    outln!(
        "rope          theta {} ({:?}){}",
        s.rope.theta,
        s.rope.style,
        s.rope
            .scaling
            .map(|r| format!(", scaling {r:?}"))
            .unwrap_or_default()
    );
    if s.ffn > 0 {
        outln!("ffn           {}", s.ffn);
    }
    if let Some(m) = &s.moe {
        outln!(
            "experts       {} ({} used per token), width {}, {} sparse layers{}{}",
            m.n_experts,
            m.n_experts_used,
            m.expert_ffn,
            m.sparse_layers.iter().filter(|&&x| x).count(),
            if m.norm_topk_prob {
                ", top-k renormalised"
            } else {
                ""
            },
            m.shared_expert_ffn
                .map(|w| format!(", shared expert width {w}"))
                .unwrap_or_default()
        );
    }
    outln!("rms eps       {}", s.rms_eps);
    outln!("tied embd     {}", s.tied_embeddings);
    if let Some(c) = s.context_length {
        outln!("context       {c}");
    }
    outln!();
    outln!("{:<8} {:>8} {:>14}", "dtype", "tensors", "bytes");
    for (k, (n, b)) in &per_dtype {
        outln!("{k:<8} {n:>8} {:>14}", human(*b));
    }
    outln!(
        "{:<8} {:>8} {:>14}",
        "total",
        f.catalog.len(),
        human(f.catalog.total_bytes())
    );
    outln!();
    outln!(
        "{:<40} {:<6} {:<22} {:>12}",
        "tensor",
        "dtype",
        "shape",
        "bytes"
    );
    let limit = if a.all { usize::MAX } else { 40 };
    for t in f.catalog.iter().take(limit) {
        outln!(
            "{:<40} {:<6} {:<22} {:>12}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.nbytes
        );
    }
    if f.catalog.len() > limit {
        outln!("... {} more (--all)", f.catalog.len() - limit);
    }
    Ok(())
}
