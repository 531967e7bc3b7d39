//! `flowgate run MODEL [PROMPT]`: stream an answer, or chat interactively without a prompt.
//!
//! The model's chat template is applied unless `--raw`. In a chat, the KV cache is kept
//! between turns: only the tokens after the longest common prefix with what is cached are run.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flowgate_engine::backend::Backend;
use flowgate_engine::chat::Message;
use flowgate_engine::kv::KvCache;
use flowgate_engine::runtime::{self, Loaded};
use flowgate_engine::sampling::Sampler;

use crate::common::{ModelArgs, SampleArgs};

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; without it, an interactive chat starts.
    pub prompt: Option<String>,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Print timing after the answer.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sample: SampleArgs,
}

struct Chat<'a, B: Backend> {
    loaded: &'a Loaded<B>,
    cache: KvCache<B>,
    cached: Vec<u32>,
    sampler: Sampler,
    args: &'a Args,
}

impl<B: Backend> Chat<'_, B> {
    /// Runs `prompt` tokens (reusing the cached prefix) and streams the answer to stdout.
    fn answer(&mut self, prompt: &[u32]) -> Result<Vec<u32>> {
        let tok = self
            .loaded
            .tokenizer
            .as_ref()
            .context("model has no tokenizer")?;
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // Keep at least one new token to produce logits from.
        let reuse = if common == self.cached.len() && common < prompt.len() {
            common
        } else {
            0
        };
        if reuse == 0 {
            self.cache.clear();
            self.cached.clear();
        }
        let need = prompt.len() + self.args.max_tokens;
        if need > self.cache.capacity() {
            bail!(
                "prompt ({} tokens) plus --max-tokens {} exceed the context of {} (--ctx)",
                prompt.len(),
                self.args.max_tokens,
                self.cache.capacity()
            );
        }
        let mut stream = tok.stream();
        let stdout = std::io::stdout();
        let mut err = None;
        let (out, stats) = runtime::generate(
            &self.loaded.model,
            &mut self.cache,
            &prompt[reuse..],
            self.args.max_tokens,
            &mut self.sampler,
            tok.eos_ids(),
            |id| {
                if tok.eos_ids().contains(&id) {
                    return false;
                }
                match stream.next(id) {
                    Ok(Some(piece)) => {
                        let mut o = stdout.lock();
                        if o.write_all(piece.as_bytes())
                            .and_then(|_| o.flush())
                            .is_err()
                        {
                            // stdout closed (e.g. piped into `head`): stop generating.
                            return false;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => err = Some(e),
                }
                err.is_none()
            },
        )?;
        if let Some(e) = err {
            bail!("detokenising: {e}");
        }
        self.loaded
            .log_expert_stats(stats.prompt_tokens + stats.generated);
        outln!();
        self.cached = prompt.to_vec();
        self.cached.extend(&out);
        // The last sampled token was never run through the model: drop it from the cache view.
        self.cached.pop();
        if self.args.verbose {
            eprintln!(
                "[prompt {} tokens ({} reused) {:.1} tok/s, {} generated {:.1} tok/s]",
                prompt.len(),
                reuse,
                stats.prefill_tps(),
                stats.generated,
                stats.decode_tps()
            );
        }
        Ok(out)
    }
}

fn render<B: Backend>(loaded: &Loaded<B>, args: &Args, messages: &[Message]) -> Result<Vec<u32>> {
    let tok = loaded
        .tokenizer
        .as_ref()
        .context("model has no tokenizer")?;
    match (&loaded.chat, args.raw) {
        (Some(t), false) => {
            let text = t.render(messages, true)?;
            // The template writes BOS itself when the model wants one.
            Ok(tok.encode(&text, false)?)
        }
        _ => {
            let text: String = messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            Ok(tok.encode(&text, true)?)
        }
    }
}

pub fn main(a: Args) -> Result<()> {
    let sampler = Sampler::new(a.sample.config()?);
    let loaded = a.model.load()?;
    flowgate_engine::with_loaded!(loaded, l => chat(&a, sampler, &l))
}

fn chat<B: Backend>(a: &Args, sampler: Sampler, loaded: &Loaded<B>) -> Result<()> {
    if loaded.tokenizer.is_none() {
        bail!(
            "{} has no tokenizer (tokenizer.ggml.model is none or tokenizer.json is missing): \
             use `flowgate generate --tokens ...` instead",
            a.model.model.display()
        );
    }
    let cache = loaded.model.new_cache(a.model.ctx)?;
    let mut chat = Chat {
        loaded,
        cache,
        cached: Vec::new(),
        sampler,
        args: a,
    };
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message {
            role: "system".into(),
            content: s.clone(),
        });
    }
    if let Some(p) = &a.prompt {
        messages.push(Message {
            role: "user".into(),
            content: p.clone(),
        });
        let toks = render(loaded, a, &messages)?;
        chat.answer(&toks)?;
        return Ok(());
    }
    eprintln!(
        "flowgate chat with {} ({}). Empty line or Ctrl-D ends.",
        loaded.file.name, loaded.file.spec.arch
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let toks = render(loaded, a, &messages)?;
        let out = chat.answer(&toks)?;
        let text = loaded
            .tokenizer
            .as_ref()
            .map(|t| t.decode(&out, true))
            .transpose()?
            .unwrap_or_default();
        messages.push(Message {
            role: "assistant".into(),
            content: text,
        });
    }
    Ok(())
}
