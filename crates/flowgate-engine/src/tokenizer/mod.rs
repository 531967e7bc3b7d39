//! Text ↔ token ids: one [`Tokenizer`] type for every source, wrapping `tokenizers::Tokenizer`.
//!
//! Design choices:
//! - **HF directories** load `tokenizer.json` as is; `tokenizer_config.json` gives the BOS/EOS
//!   strings and `add_bos_token`, and `config.json` / `generation_config.json` add their
//!   `eos_token_id`s (instruct models often stop on several ids, e.g. Llama-3's `<|eot_id|>`).
//!   When `add_bos_token` is absent it is inferred from the file's post-processor.
//! - **GGUF files** carry no tokenizer pipeline, only the vocabulary; the equivalent
//!   `tokenizers` pipeline is rebuilt here: byte-level BPE for `tokenizer.ggml.model = "gpt2"`
//!   ([`gguf_bpe`]), SentencePiece-style BPE with byte fallback for `"llama"` ([`gguf_spm`]).
//! - The post-processor of the inner tokenizer is never used: [`Tokenizer::encode`] encodes
//!   without special tokens and prepends BOS itself when asked to and when the model wants it,
//!   so both sources behave the same and no EOS is ever appended to a prompt.
//! - Special and user-defined tokens written in the text (as chat templates do) are always
//!   recognised and never split.
//! - [`TokenStream`] turns ids into text incrementally: it decodes a small window of recent ids
//!   and emits only the new suffix once it is complete UTF-8 (no trailing U+FFFD), which also
//!   keeps SentencePiece's word-initial spaces right.

mod gguf_bpe;
mod gguf_spm;

use std::path::{Path, PathBuf};

use flowgate_formats::gguf::{GgufFile, GgufValue};
use flowgate_formats::FormatError;
use serde_json::Value as Json;

/// Errors from loading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("tokenizers: {0}")]
    Backend(String),
    #[error("unsupported tokenizer model '{0}' (supported: gpt2 = byte-level BPE, llama = SentencePiece BPE, none)")]
    UnsupportedModel(String),
    #[error("unsupported BPE pre-tokenizer '{0}' (tokenizer.ggml.pre)")]
    UnsupportedPre(String),
    #[error("GGUF key {key}: {msg}")]
    Metadata { key: String, msg: String },
    #[error("token id {id} is out of range (vocabulary has {vocab} tokens)")]
    IdOutOfRange { id: u32, vocab: usize },
}

impl TokenizerError {
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        TokenizerError::Backend(e.to_string())
    }
}

/// A tokenizer with its BOS/EOS conventions.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Json {
            path: path.to_path_buf(),
            source: e,
        })
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
pub(crate) fn special_token_str(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// `eos_token_id` of `config.json` / `generation_config.json`: an int or a list of ints.
fn json_ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn push_unique(v: &mut Vec<u32>, id: u32) {
    if !v.contains(&id) {
        v.push(id);
    }
}

/// Texts of end-of-generation tokens used by common chat models; added to the EOS list of a
/// GGUF tokenizer when present as control tokens (GGUF stores only one EOS id).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

impl Tokenizer {
    /// Loads `tokenizer.json` (required) with `tokenizer_config.json`, `config.json` and
    /// `generation_config.json` (all optional) from an HF model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tj = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| TokenizerError::Backend(format!("{}: {e}", tj.display())))?;
        let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
        let gcfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        let mut bos = special_token_str(tcfg.get("bos_token")).and_then(|s| inner.token_to_id(s));
        if bos.is_none() {
            bos = json_ids(cfg.get("bos_token_id")).first().copied();
        }
        let mut eos = Vec::new();
        if let Some(id) =
            special_token_str(tcfg.get("eos_token")).and_then(|s| inner.token_to_id(s))
        {
            push_unique(&mut eos, id);
        }
        for id in json_ids(cfg.get("eos_token_id"))
            .into_iter()
            .chain(json_ids(gcfg.get("eos_token_id")))
        {
            push_unique(&mut eos, id);
        }

        let add_bos = match tcfg.get("add_bos_token").and_then(Json::as_bool) {
            Some(b) => b,
            None => {
                // Infer from the post-processor: does it put a token in front?
                let with = inner.encode("a", true).map_err(TokenizerError::backend)?;
                let without = inner.encode("a", false).map_err(TokenizerError::backend)?;
                let (w, wo) = (with.get_ids(), without.get_ids());
                match w.first() {
                    Some(&first) if w.len() > wo.len() && w[1..].starts_with(wo) => {
                        if bos.is_none() {
                            bos = Some(first);
                        }
                        bos == Some(first)
                    }
                    _ => false,
                }
            }
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos: add_bos && bos.is_some(),
            vocab_size,
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys; `None` when
    /// `tokenizer.ggml.model` is absent or `"none"`.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Tokenizer>, TokenizerError> {
        let vocab = match GgufVocab::read(g)? {
            Some(v) => v,
            None => return Ok(None),
        };
        Self::from_gguf_vocab(&vocab).map(Some)
    }

    /// Builds from already-extracted GGUF tokenizer metadata.
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
        let (inner, default_add_bos) = match v.model.as_str() {
            "gpt2" => (gguf_bpe::build(v)?, false),
            "llama" => (gguf_spm::build(v)?, true),
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let n = v.tokens.len();
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let bos = in_range(v.bos);
        let mut eos = Vec::new();
        for id in [v.eos, v.eot, v.eom].into_iter().flatten() {
            if (id as usize) < n {
                push_unique(&mut eos, id);
            }
        }
        for (i, t) in v.tokens.iter().enumerate() {
            if v.token_type(i) == TOKEN_CONTROL && EOG_TEXTS.contains(&t.as_str()) {
                push_unique(&mut eos, i as u32);
            }
        }
        let add_bos = v.add_bos.unwrap_or(default_add_bos) && bos.is_some();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos,
            vocab_size: n,
        })
    }

    /// Encodes `text`; special/user-defined tokens written in it are recognised. With
    /// `add_special`, BOS is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::backend)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Decodes ids to text; `skip_special` drops control tokens (BOS, EOS, chat markers).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(TokenizerError::backend)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids that end generation (EOS first, then EOT/EOM-like tokens).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids (the model's vocabulary, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Streaming detokenisation (special tokens skipped).
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Incremental decoder: [`TokenStream::next`] returns text as soon as it is complete UTF-8.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    /// Ids since `prefix` (older ones are dropped).
    ids: Vec<u32>,
    /// `ids[..prefix]` is context already emitted; `ids[prefix..read]` too, decoded as a whole.
    prefix: usize,
    read: usize,
}

/// Bytes of one UTF-8 character at most: if this many ids are pending and the text still ends
/// in U+FFFD, the sequence is invalid and is emitted as is.
const MAX_PENDING: usize = 4;

impl TokenStream<'_> {
    /// Feeds one id; returns the new text, if any is complete.
    pub fn next(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        if id as usize >= self.tok.vocab_size {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab: self.tok.vocab_size,
            });
        }
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = self.tok.decode(&self.ids[self.prefix..], true)?;
        let pending = self.ids.len() - self.read;
        if after.ends_with('\u{FFFD}') && pending < MAX_PENDING {
            return Ok(None);
        }
        let piece = match after.strip_prefix(before.as_str()) {
            Some(p) => p.to_string(),
            // The window decodes differently as a whole (decoder cleanup): emit the new
            // ids' own text rather than fail.
            None => self.tok.decode(&self.ids[self.read..], true)?,
        };
        // Keep the last emitted token as context for the next window.
        let keep_from = self.read;
        self.ids.drain(..keep_from);
        self.prefix = 0;
        self.read = self.ids.len();
        if piece.is_empty() {
            Ok(None)
        } else {
            Ok(Some(piece))
        }
    }
}

/// GGUF token types (`tokenizer.ggml.token_type`).
pub(crate) const TOKEN_NORMAL: i32 = 1;
pub(crate) const TOKEN_UNKNOWN: i32 = 2;
pub(crate) const TOKEN_CONTROL: i32 = 3;
pub(crate) const TOKEN_USER_DEFINED: i32 = 4;

/// The `tokenizer.ggml.*` metadata of a GGUF file, extracted once.
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

fn meta_err(key: &str, msg: &str) -> TokenizerError {
    TokenizerError::Metadata {
        key: key.to_string(),
        msg: msg.to_string(),
    }
}

fn arr<'a>(g: &'a GgufFile, key: &str) -> Result<Option<&'a [GgufValue]>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| meta_err(key, "expected an array")),
    }
}

impl GgufVocab {
    pub(crate) fn token_type(&self, i: usize) -> i32 {
        self.token_types.get(i).copied().unwrap_or(TOKEN_NORMAL)
    }

    /// Reads the tokenizer metadata; `None` when there is no tokenizer.
    pub fn read(g: &GgufFile) -> Result<Option<GgufVocab>, TokenizerError> {
        let model = match g.get("tokenizer.ggml.model") {
            None => return Ok(None),
            Some(v) => v
                .as_str()
                .ok_or_else(|| meta_err("tokenizer.ggml.model", "expected a string"))?,
        };
        if model == "none" || model.is_empty() {
            return Ok(None);
        }
        let str_or_err = |key: &str, v: &GgufValue| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| meta_err(key, "expected an array of strings"))
        };
        let tokens = arr(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| meta_err("tokenizer.ggml.tokens", "missing"))?
            .iter()
            .map(|v| str_or_err("tokenizer.ggml.tokens", v))
            .collect::<Result<Vec<_>, _>>()?;
        let merges = match arr(g, "tokenizer.ggml.merges")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| str_or_err("tokenizer.ggml.merges", v))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let scores = match arr(g, "tokenizer.ggml.scores")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| meta_err("tokenizer.ggml.scores", "expected numbers"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let token_types = match arr(g, "tokenizer.ggml.token_type")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(|| meta_err("tokenizer.ggml.token_type", "expected integers"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    // -1 (as i32 or wrapped u32) means "none" in some converters.
                    Some(x) if x < 0 || x == u32::MAX as i64 => Ok(None),
                    Some(x) => u32::try_from(x)
                        .map(Some)
                        .map_err(|_| meta_err(key, "token id out of range")),
                    None => Err(meta_err(key, "expected an integer")),
                },
            }
        };
        let flag = |key: &str| -> Result<Option<bool>, TokenizerError> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| meta_err(key, "expected a bool")),
            }
        };
        let pre = match g.get("tokenizer.ggml.pre") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| meta_err("tokenizer.ggml.pre", "expected a string"))?
                    .to_string(),
            ),
        };
        Ok(Some(GgufVocab {
            model: model.to_string(),
            pre,
            tokens,
            scores,
            token_types,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
        }))
    }

    /// Control and user-defined tokens as added tokens (never split; control ones are
    /// "special", i.e. dropped by `decode(_, true)`).
    pub(crate) fn added_tokens(&self) -> Vec<tokenizers::AddedToken> {
        self.tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let ty = self.token_type(i);
                if t.is_empty() || !(ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED) {
                    return None;
                }
                Some(tokenizers::AddedToken::from(t.clone(), ty == TOKEN_CONTROL).normalized(false))
            })
            .collect()
    }
}
