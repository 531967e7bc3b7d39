//! `flowgate synth`: synthetic GGUF models in real models' shapes, written exactly as
//! ../shared/ANCHORS.md specifies so that flowgate and llama.cpp can be measured on one file.
//!
//! GGUF v3, alignment 32, `tokenizer.ggml.model = "none"`, `<arch>.vocab_size` set. Every 2-D and
//! 3-D weight is Q4_K: each 144-byte block gets random bytes, then its `d` is set to f16 3e-4 and
//! its `dmin` to f16 1e-4. Norm weights are F32 ones; the MoE router `ffn_gate_inp` is F32 drawn
//! from N(0, 0.02). The file is streamed tensor by tensor (at most one tensor in memory), and the
//! random bytes come from per-chunk seeded generators, so the same shape and seed always give
//! the same file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use flowgate_formats::gguf::writer::GgufWriter;
use flowgate_formats::gguf::GgufValue;
use flowgate_formats::DType;
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// Llama-3.2-1B shapes (llama).
    Dense1b,
    /// Llama-3-8B shapes (llama).
    Dense8b,
    /// OLMoE-1B-7B shapes (qwen3moe).
    Moe7b,
    /// Qwen3-30B-A3B shapes (qwen3moe).
    Moe30b,
    /// A small llama for demos and tests (not in ANCHORS.md).
    Tiny,
    /// A small qwen3moe for demos and tests (not in ANCHORS.md).
    TinyMoe,
}

/// The numbers that define a synthetic model.
#[derive(Clone, Debug)]
pub struct ShapeSpec {
    pub arch: &'static str,
    pub layers: usize,
    pub d_model: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// (experts, used)
    pub experts: Option<(usize, usize)>,
    pub vocab: usize,
    pub rope_base: f32,
}

impl Shape {
    pub fn spec(self) -> ShapeSpec {
        let llama = |layers, d_model, ffn, heads, kv_heads, head_dim, vocab| ShapeSpec {
            arch: "llama",
            layers,
            d_model,
            ffn,
            heads,
            kv_heads,
            head_dim,
            experts: None,
            vocab,
            rope_base: 500000.0,
        };
        let moe = |layers, d_model, ffn, heads, kv_heads, experts, vocab, rope_base| ShapeSpec {
            arch: "qwen3moe",
            layers,
            d_model,
            ffn,
            heads,
            kv_heads,
            head_dim: 128,
            experts: Some(experts),
            vocab,
            rope_base,
        };
        match self {
            Shape::Dense1b => llama(16, 2048, 8192, 32, 8, 64, 128256),
            Shape::Dense8b => llama(32, 4096, 14336, 32, 8, 128, 128256),
            Shape::Moe7b => moe(16, 2048, 1024, 16, 16, (64, 8), 50304, 10000.0),
            Shape::Moe30b => moe(48, 2048, 768, 32, 4, (128, 8), 151936, 1000000.0),
            Shape::Tiny => llama(4, 256, 768, 8, 4, 32, 1024),
            Shape::TinyMoe => ShapeSpec {
                head_dim: 32,
                ..moe(4, 256, 256, 8, 4, (16, 4), 1024, 10000.0)
            },
        }
    }
}

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long, value_enum)]
    pub shape: Shape,
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Copy the tokenizer (every `tokenizer.*` key, chat template included) from this GGUF file,
    /// so that the synthetic model takes and produces text (still meaningless: random weights).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// A chat template (Jinja source file) to store as `tokenizer.chat_template`.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Metadata taken from `--tokenizer-from` and `--chat-template`.
fn extra_metadata(a: &Args, vocab: usize) -> Result<Vec<(String, GgufValue)>> {
    let mut out = Vec::new();
    if let Some(p) = &a.tokenizer_from {
        let g = flowgate_formats::gguf::GgufFile::open(p)
            .with_context(|| format!("reading the tokenizer of {}", p.display()))?;
        let n = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .with_context(|| format!("{} has no tokenizer.ggml.tokens", p.display()))?;
        anyhow::ensure!(
            n <= vocab,
            "the tokenizer of {} has {n} tokens, more than the {vocab} of this shape",
            p.display()
        );
        out.extend(
            g.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned(),
        );
    }
    if let Some(p) = &a.chat_template {
        let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        out.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(out)
}

pub fn main(a: Args) -> Result<()> {
    crate::common::init_threads(None)?;
    let extra = extra_metadata(&a, a.shape.spec().vocab)?;
    let bytes = write(a.shape, &a.out, a.seed, &extra, !a.quiet)?;
    eprintln!(
        "wrote {} ({:?}, {:.2} GiB, random weights)",
        a.out.display(),
        a.shape,
        bytes as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

enum Fill {
    Q4KRandom,
    Ones,
    Normal(f32),
}

struct TensorPlan {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    fill: Fill,
}

fn plan(s: &ShapeSpec) -> Vec<TensorPlan> {
    let (d, v) = (s.d_model as u64, s.vocab as u64);
    let qd = (s.heads * s.head_dim) as u64;
    let kvd = (s.kv_heads * s.head_dim) as u64;
    let q4 = |name: String, shape: Vec<u64>| TensorPlan {
        name,
        dtype: DType::Q4K,
        shape,
        fill: Fill::Q4KRandom,
    };
    let ones = |name: String, n: u64| TensorPlan {
        name,
        dtype: DType::F32,
        shape: vec![n],
        fill: Fill::Ones,
    };
    let mut t = vec![
        q4("token_embd.weight".into(), vec![v, d]),
        ones("output_norm.weight".into(), d),
        q4("output.weight".into(), vec![v, d]),
    ];
    for l in 0..s.layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        t.push(ones(n("attn_norm.weight"), d));
        t.push(q4(n("attn_q.weight"), vec![qd, d]));
        t.push(q4(n("attn_k.weight"), vec![kvd, d]));
        t.push(q4(n("attn_v.weight"), vec![kvd, d]));
        t.push(q4(n("attn_output.weight"), vec![d, qd]));
        t.push(ones(n("ffn_norm.weight"), d));
        let f = s.ffn as u64;
        match s.experts {
            None => {
                t.push(q4(n("ffn_gate.weight"), vec![f, d]));
                t.push(q4(n("ffn_up.weight"), vec![f, d]));
                t.push(q4(n("ffn_down.weight"), vec![d, f]));
            }
            Some((e, _)) => {
                let e = e as u64;
                t.push(ones(n("attn_q_norm.weight"), s.head_dim as u64));
                t.push(ones(n("attn_k_norm.weight"), s.head_dim as u64));
                t.push(TensorPlan {
                    name: n("ffn_gate_inp.weight"),
                    dtype: DType::F32,
                    shape: vec![e, d],
                    fill: Fill::Normal(0.02),
                });
                t.push(q4(n("ffn_gate_exps.weight"), vec![e, f, d]));
                t.push(q4(n("ffn_up_exps.weight"), vec![e, f, d]));
                t.push(q4(n("ffn_down_exps.weight"), vec![e, d, f]));
            }
        }
    }
    t
}

fn metadata(s: &ShapeSpec, shape: Shape) -> Vec<(String, GgufValue)> {
    let a = s.arch;
    let k = |x: &str| format!("{a}.{x}");
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut m = vec![
        ("general.architecture".into(), GgufValue::String(a.into())),
        (
            "general.name".into(),
            GgufValue::String(format!("flowgate synthetic {shape:?} (random weights)")),
        ),
        ("general.file_type".into(), GgufValue::U32(14)),
        (k("vocab_size"), u(s.vocab)),
        (
            k("context_length"),
            u(if s.experts.is_some() { 4096 } else { 8192 }),
        ),
        (k("embedding_length"), u(s.d_model)),
        (k("block_count"), u(s.layers)),
        (k("feed_forward_length"), u(s.ffn)),
        (k("attention.head_count"), u(s.heads)),
        (k("attention.head_count_kv"), u(s.kv_heads)),
        (k("rope.freq_base"), GgufValue::F32(s.rope_base)),
        (k("rope.dimension_count"), u(s.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(if s.experts.is_some() { 1e-6 } else { 1e-5 }),
        ),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("none".into()),
        ),
    ];
    if let Some((e, used)) = s.experts {
        m.push((k("attention.key_length"), u(s.head_dim)));
        m.push((k("attention.value_length"), u(s.head_dim)));
        m.push((k("expert_count"), u(e)));
        m.push((k("expert_used_count"), u(used)));
        m.push((k("expert_feed_forward_length"), u(s.ffn)));
    }
    m
}

/// Fills `out` (a whole tensor) deterministically from `seed`, in parallel 1 MiB chunks.
fn fill(f: &Fill, out: &mut [u8], seed: u64) {
    const CHUNK: usize = 1 << 20; // a multiple of 144 * 4 is not needed: blocks are fixed below
    match f {
        Fill::Q4KRandom => {
            let d = f16::from_f32(3e-4).to_le_bytes();
            let dmin = f16::from_f32(1e-4).to_le_bytes();
            // Chunks of whole blocks so block headers never straddle two chunks.
            let chunk = CHUNK / 144 * 144;
            out.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| {
                let mut rng =
                    StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                rng.fill_bytes(c);
                for b in c.chunks_exact_mut(144) {
                    b[0..2].copy_from_slice(&d);
                    b[2..4].copy_from_slice(&dmin);
                }
            });
        }
        Fill::Ones => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&1f32.to_le_bytes());
            }
        }
        Fill::Normal(std) => {
            let mut rng = StdRng::seed_from_u64(seed);
            for c in out.chunks_exact_mut(4) {
                // Box-Muller.
                let u1: f64 = rng.random::<f64>().max(1e-300);
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                c.copy_from_slice(&((z as f32) * std).to_le_bytes());
            }
        }
    }
}

/// Writes the model; returns the file size.
pub fn write(
    shape: Shape,
    path: &Path,
    seed: u64,
    extra: &[(String, GgufValue)],
    progress: bool,
) -> Result<u64> {
    let s = shape.spec();
    let tensors = plan(&s);
    let mut w = GgufWriter::new(32);
    let mut meta = metadata(&s, shape);
    for (k, v) in extra {
        meta.retain(|(mk, _)| mk != k);
        meta.push((k.clone(), v.clone()));
    }
    for (k, v) in meta {
        w.add_metadata(&k, v);
    }
    let mut total = 0u64;
    for t in &tensors {
        w.add_tensor(&t.name, t.dtype, &t.shape)?;
        total += t.dtype.tensor_bytes(&t.shape)?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut dw = w.start(BufWriter::with_capacity(8 << 20, file))?;
    let bar = if progress {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let n = t.dtype.tensor_bytes(&t.shape)? as usize;
        buf.clear();
        buf.resize(n, 0u8);
        fill(&t.fill, &mut buf, seed.wrapping_add((i as u64) << 32));
        dw.write_tensor(&buf)?;
        bar.inc(n as u64);
    }
    let mut out = dw.finish()?;
    out.flush()?;
    bar.finish_and_clear();
    Ok(std::fs::metadata(path)?.len())
}
