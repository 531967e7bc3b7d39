//! GGUF `tokenizer.ggml.model = "llama"`: a SentencePiece BPE vocabulary (pieces, scores,
//! types) rebuilt as a `tokenizers` BPE pipeline, the way HF's `LlamaConverter` does.
//!
//! - Merges are derived from the scores: every normal piece that can be split into two pieces
//!   of the vocabulary gives one merge per split point (ordered by the ids of the halves), and
//!   merges are stably sorted by the merged piece's score, highest first. SentencePiece merges
//!   the pair whose result scores highest, so the ranks agree.
//! - Only normal pieces (type 1) are merge results: control, unknown, unused and byte pieces
//!   cannot be produced from text in SentencePiece either.
//! - `byte_fallback`: characters outside the vocabulary become `<0xNN>` byte pieces.
//! - Normaliser: prepend `▁` (when `tokenizer.ggml.add_space_prefix`, default true) and
//!   replace spaces by `▁`; no pre-tokeniser (SentencePiece treats the text as one sequence).
//!   Like llama.cpp and HF's legacy Llama tokenizer, text right after a special token gets the
//!   `▁` prefix too.
//! - Decoder: `▁` → space, byte pieces → bytes, fuse, strip the one leading space.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper};

use super::{GgufVocab, TokenizerError, TOKEN_NORMAL, TOKEN_UNKNOWN};

const SPACE: &str = "\u{2581}";

/// Merges derived from piece scores (see the module doc).
pub(crate) fn merges_from_scores(v: &GgufVocab) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(v.tokens.len());
    for (i, t) in v.tokens.iter().enumerate() {
        vocab.entry(t.as_str()).or_insert(i);
    }
    // (score, piece id, left id, right id, split byte offset)
    let mut cands: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (i, piece) in v.tokens.iter().enumerate() {
        if v.token_type(i) != TOKEN_NORMAL || vocab.get(piece.as_str()) != Some(&i) {
            continue;
        }
        let score = v.scores.get(i).copied().unwrap_or(0.0);
        let start = cands.len();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                cands.push((score, i, li, ri, split));
            }
        }
        cands[start..].sort_by_key(|c| (c.2, c.3));
    }
    // Stable: equal scores keep piece order, then (left id, right id).
    cands.sort_by(|a, b| b.0.total_cmp(&a.0));
    cands
        .into_iter()
        .filter_map(|(_, i, _, _, split)| {
            let piece = v.tokens.get(i)?;
            let (l, r) = piece.split_at(split);
            Some((l.to_string(), r.to_string()))
        })
        .collect()
}

pub(super) fn build(v: &GgufVocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in v.tokens.iter().enumerate() {
        let id =
            u32::try_from(i).map_err(|_| TokenizerError::Backend("vocabulary too large".into()))?;
        vocab.entry(t.clone()).or_insert(id);
    }
    let merges = merges_from_scores(v);
    let unk = v
        .unk
        .and_then(|u| v.tokens.get(u as usize))
        .or_else(|| {
            v.tokens
                .iter()
                .enumerate()
                .find(|(i, _)| v.token_type(*i) == TOKEN_UNKNOWN)
                .map(|(_, t)| t)
        })
        .cloned();
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(u);
    }
    let bpe = b.build().map_err(TokenizerError::backend)?;

    let add_prefix = v.add_space_prefix.unwrap_or(true);
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_prefix {
        norm.push(Prepend::new(SPACE.to_string()).into());
    }
    norm.push(
        Replace::new(" ", SPACE)
            .map_err(TokenizerError::backend)?
            .into(),
    );
    let mut dec: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new(SPACE, " ").map_err(TokenizerError::backend)?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }

    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormSequence::new(norm)));
    tok.with_decoder(Some(DecoderSequence::new(dec)));
    tok.add_tokens(&v.added_tokens());
    Ok(tok)
}
