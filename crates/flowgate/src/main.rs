//! The `flowgate` command line: a thin layer over the library crates.
//!
//! Commands: `run` (chat or complete, streaming), `inspect`, `logits`, `generate`, `synth`
//! (synthetic GGUF models of real shapes), `demo` and `bench`. Each lives in `commands/`.

#[macro_use]
mod common;
mod commands;
mod llamacpp;
mod memlimit;
mod plot;
mod synth;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Run models bigger than your GPU and your RAM"
)]
struct Cli {
    /// Log filter (e.g. info, debug); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chat with a model, or complete one prompt, streaming the answer.
    Run(commands::run::Args),
    /// Show a model's architecture, hyperparameters and tensors.
    Inspect(commands::inspect::Args),
    /// Print the logits of every input position as JSON.
    Logits(commands::logits::Args),
    /// Generate token ids from token ids.
    Generate(commands::generate::Args),
    /// Write a synthetic GGUF model in a real model's shapes (random Q4_K weights).
    Synth(synth::Args),
    /// Make a small random-weight model and run it: a smoke test of the whole path.
    Demo(commands::demo::Args),
    /// Measure performance.
    #[command(subcommand)]
    Bench(commands::bench::BenchCmd),
}

fn main() {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Run(a) => commands::run::main(a),
        Cmd::Inspect(a) => commands::inspect::main(a),
        Cmd::Logits(a) => commands::logits::main(a),
        Cmd::Generate(a) => commands::generate::main(a),
        Cmd::Synth(a) => synth::main(a),
        Cmd::Demo(a) => commands::demo::main(a),
        Cmd::Bench(b) => commands::bench::main(b),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
