//! `tokenizer.ggml.model = "llama"`: SentencePiece BPE (Llama 2, Mistral 7B,
//! TinyLlama, Phi-3). The GGUF ships pieces and scores, not merges.
//!
//! llama.cpp (`llm_tokenizer_spm`) repeatedly merges the adjacent pair whose
//! concatenation is the highest-scoring piece, and spells pieces it cannot
//! form as `<0xNN>` byte tokens. The Hugging Face form of the same rule is a
//! BPE model whose merges are every split of every piece, ranked by the
//! piece's score: transformers' `SentencePieceExtractor` builds the merges
//! of its Llama tokenizers so, and we follow it.
//!
//! Spaces are `▁` (U+2581); with `add_space_prefix` one is put before the
//! text, and decoding takes it off again.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use super::GgufVocab;
use crate::Error;

/// SentencePiece's whitespace marker.
pub const SPACE_MARKER: &str = "\u{2581}";

/// Every merge `left right` whose result is a piece, highest-scoring result
/// first; the splits of one piece in the vocabulary order of their halves.
fn merges_by_score(vocab: &GgufVocab) -> Vec<String> {
    let ids: HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .rev() // the first ID of a duplicate piece wins
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (piece, &score) in vocab.tokens.iter().zip(&vocab.scores) {
        let mut local: Vec<(usize, usize, String)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, format!("{l} {r}")))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local.into_iter().map(|(l, r, m)| (score, l, r, m)));
    }
    // Stable: ties keep the vocabulary order above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, _, _, m)| m).collect()
}

/// The Hugging Face `tokenizer.json` of a `llama` (SentencePiece) vocabulary.
///
/// # Errors
/// A vocabulary without scores, or with a space in a piece (which the merge
/// list cannot spell), is refused.
pub fn tokenizer_json(vocab: &GgufVocab) -> Result<Json, Error> {
    if vocab.scores.len() != vocab.tokens.len() {
        return Err(Error::Tokenizer(
            "a SentencePiece (llama) vocabulary needs tokenizer.ggml.scores".into(),
        ));
    }
    if let Some(bad) = vocab.tokens.iter().find(|t| t.contains(' ')) {
        return Err(Error::Tokenizer(format!(
            "SentencePiece piece {bad:?} contains a space"
        )));
    }
    let unk = vocab.token(vocab.unk_token_id).unwrap_or("<unk>");
    let replace_space =
        json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARKER});
    let (normalizer, decoder) = if vocab.add_space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE_MARKER}, replace_space]}),
            json!([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]),
        )
    } else {
        (replace_space, json!([]))
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE_MARKER}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    decoders.extend(decoder.as_array().into_iter().flatten().cloned());
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab.vocab_map(),
            "merges": merges_by_score(vocab),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> GgufVocab {
        GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens: pieces.iter().map(|(p, _)| p.to_string()).collect(),
            token_types: vec![super::super::TOKEN_TYPE_NORMAL; pieces.len()],
            scores: pieces.iter().map(|&(_, s)| s).collect(),
            merges: Vec::new(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            unk_token_id: None,
            add_bos_token: false,
            add_eos_token: false,
            add_space_prefix: true,
            rstrip_specials: false,
            chat_template: None,
        }
    }

    #[test]
    fn merges_rank_by_the_merged_pieces_score() {
        let v = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("bc", -2.0),
            ("ab", -1.0),
            ("abc", -3.0),
        ]);
        // "ab" scores highest; "abc" splits two ways, ordered by the IDs of
        // their halves (a+bc before ab+c).
        assert_eq!(merges_by_score(&v), ["a b", "b c", "a bc", "ab c"]);
    }

    #[test]
    fn needs_scores_and_spells_spaces_as_the_marker() {
        let mut v = vocab(&[("<unk>", 0.0), ("\u{2581}a", -1.0)]);
        let j = tokenizer_json(&v).unwrap();
        assert_eq!(j["model"]["byte_fallback"], true);
        assert_eq!(j["normalizer"]["normalizers"][0]["prepend"], SPACE_MARKER);
        v.scores.clear();
        assert!(tokenizer_json(&v).is_err());
    }
}
