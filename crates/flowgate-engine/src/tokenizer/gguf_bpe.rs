//! GGUF `tokenizer.ggml.model = "gpt2"`: byte-level BPE rebuilt as a `tokenizers` pipeline.
//!
//! The vocabulary and merges come from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`; the
//! pre-tokeniser (which GGUF does not store) is chosen by the `tokenizer.ggml.pre` label, with
//! the regexes llama.cpp associates to each label (the `(?i:...)` contraction groups written
//! out as character classes, which is equivalent). The pipeline is the one HF uses for these
//! models: `Split(regex, Isolated)` per regex, then `ByteLevel` without its own regex; decoder
//! `ByteLevel`. Like llama.cpp and Llama-3's own tokenizer.json, the Llama-3 family ignores
//! merges for a pre-token that is itself in the vocabulary (`ignore_merges`).
//!
//! When several token strings are equal (some GGUF vocabularies pad with duplicates) the first
//! id keeps the string; later duplicates decode to nothing.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{GgufVocab, TokenizerError};

const CONTRACTIONS: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Pre-tokeniser regexes (applied in sequence) and whether merges are skipped for in-vocab
/// pre-tokens, for a `tokenizer.ggml.pre` label.
fn pre_regexes(pre: Option<&str>) -> Result<(Vec<String>, bool), TokenizerError> {
    let llama3_like = |digits: &str| {
        format!(
            r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    };
    Ok(match pre.unwrap_or("default") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            (vec![llama3_like("{1,3}")], true)
        }
        "chatglm-bpe" => (vec![llama3_like("{1,3}")], false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (vec![llama3_like("")], false),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => (vec![GPT2.to_string()], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" => {
            (vec![r"\p{N}".to_string(), GPT2.to_string()], false)
        }
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+".to_string(),
                GPT2.to_string(),
                r"\p{N}+".to_string(),
                "[0-9][0-9][0-9]".to_string(),
            ],
            false,
        ),
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    })
}

pub(super) fn build(v: &GgufVocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let (regexes, ignore_merges) = pre_regexes(v.pre.as_deref())?;

    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in v.tokens.iter().enumerate() {
        let id =
            u32::try_from(i).map_err(|_| TokenizerError::Backend("vocabulary too large".into()))?;
        vocab.entry(t.clone()).or_insert(id);
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for m in &v.merges {
        let (a, b) = m.split_once(' ').ok_or_else(|| TokenizerError::Metadata {
            key: "tokenizer.ggml.merges".into(),
            msg: format!("merge '{m}' has no space"),
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(TokenizerError::backend)?;

    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for r in regexes {
        pre.push(
            Split::new(
                SplitPattern::Regex(r),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::backend)?
            .into(),
        );
    }
    pre.push(ByteLevel::new(false, false, false).into());

    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(pre)));
    tok.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    tok.add_tokens(&v.added_tokens());
    Ok(tok)
}
