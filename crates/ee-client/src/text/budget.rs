//! A token budget checked before tokenizing. The Hugging Face tokenizer
//! keeps per-byte alignments and a string per token, about 160 bytes of
//! memory per byte of text: 3.3 MB of prompt cost the proxy 530 MB, only to
//! learn that it cannot fit an 8k context. No token spells more than the
//! vocabulary's longest piece, so text longer than `limit` such pieces
//! holds more than `limit` tokens, and is refused unread. That bounds the
//! memory a prompt can cost by the context length (up to the body size:
//! with a long context and long tokens, the bound passes the proxy's 4 MiB
//! body limit, and that limit is what bounds it).
//!
//! The bound holds only when every byte of text ends up in some token's
//! spelling: nothing may drop text (a normalizer that shrinks it, a
//! pre-tokenizer that removes whitespace), no token may stand for an
//! unbounded span (an unknown token fused over unknown characters, a
//! special token that swallows the whitespace beside it). The budget is
//! set only for tokenizers that rule those out: byte-level BPE, and
//! SentencePiece-style BPE with byte fallback, which is what GGUF
//! vocabularies convert to.

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::Error;

/// The most tokens a text may hold, checked from its length alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBudget {
    limit: usize,
    /// The most bytes of text one token stands for.
    max_token_bytes: usize,
}

impl TokenBudget {
    /// A budget of `limit` tokens for `tokenizer`, whose longest token
    /// spells `max_token_bytes` bytes. `None` unless the length of a text
    /// bounds its token count (see the module docs): `strip_specials` says
    /// whether a special token takes the whitespace beside it.
    pub(crate) fn new(
        tokenizer: &Tokenizer,
        strip_specials: bool,
        max_token_bytes: usize,
        limit: usize,
    ) -> Option<Self> {
        let normalizer = serde_json::to_value(tokenizer.get_normalizer()).ok()?;
        let pre_tokenizer = serde_json::to_value(tokenizer.get_pre_tokenizer()).ok()?;
        let model = serde_json::to_value(tokenizer.get_model()).ok()?;
        let bounded = max_token_bytes > 0
            && !strip_specials
            && never_shrinks(&normalizer)
            && keeps_all_text(&pre_tokenizer)
            && spells_every_byte(&model);
        bounded.then_some(Self {
            limit,
            max_token_bytes,
        })
    }

    /// # Errors
    /// [`Error::PromptTooLong`] when `text_bytes` of text must hold more
    /// than the limit's tokens.
    pub(crate) fn check(&self, text_bytes: usize) -> Result<(), Error> {
        let at_least = text_bytes.div_ceil(self.max_token_bytes);
        match at_least > self.limit {
            true => Err(Error::PromptTooLong {
                at_least,
                limit: self.limit,
            }),
            false => Ok(()),
        }
    }
}

/// Whether a serialized normalizer can only keep or lengthen text: none,
/// `Prepend`, a `Replace` of a string by one at least as long (SentencePiece's
/// `▁` for a space), or a sequence of those.
fn never_shrinks(normalizer: &Value) -> bool {
    match normalizer["type"].as_str() {
        _ if normalizer.is_null() => true,
        Some("Prepend") => true,
        Some("Replace") => {
            let pattern = normalizer["pattern"]["String"].as_str();
            let content = normalizer["content"].as_str();
            matches!((pattern, content), (Some(p), Some(c)) if c.len() >= p.len())
        }
        Some("Sequence") => normalizer["normalizers"]
            .as_array()
            .is_some_and(|all| all.iter().all(never_shrinks)),
        _ => false,
    }
}

/// Whether a serialized pre-tokenizer only splits text, never drops any:
/// byte-level, Metaspace, digit and punctuation splits, and regex splits
/// that keep what they match (not `Removed`).
fn keeps_all_text(pre_tokenizer: &Value) -> bool {
    match pre_tokenizer["type"].as_str() {
        _ if pre_tokenizer.is_null() => true,
        Some("ByteLevel" | "Metaspace" | "Digits" | "Punctuation") => true,
        Some("Split") => pre_tokenizer["behavior"].as_str() != Some("Removed"),
        Some("Sequence") => pre_tokenizer["pretokenizers"]
            .as_array()
            .is_some_and(|all| all.iter().all(keeps_all_text)),
        _ => false,
    }
}

/// Whether a serialized model is BPE with a spelling for every byte: byte
/// fallback, or no unknown token at all (byte-level BPE), so that no token
/// stands for a span of unknown text.
fn spells_every_byte(model: &Value) -> bool {
    model["type"].as_str() == Some("BPE")
        && (model["byte_fallback"] == Value::Bool(true) || model["unk_token"].is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_normalizers_that_cannot_shrink_text_allow_a_budget() {
        let spm = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert!(never_shrinks(&Value::Null));
        assert!(never_shrinks(&spm));
        assert!(!never_shrinks(&json!({"type": "NFKC"})));
        assert!(!never_shrinks(&json!({"type": "Lowercase"})));
        assert!(!never_shrinks(
            &json!({"type": "Replace", "pattern": {"String": "  "}, "content": " "})
        ));
        assert!(!never_shrinks(
            &json!({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "})
        ));
        assert!(!never_shrinks(
            &json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "NFC"}]})
        ));
    }

    #[test]
    fn only_pre_tokenizers_and_models_that_keep_every_byte_allow_a_budget() {
        let llama3 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": false}]});
        assert!(keeps_all_text(&llama3));
        assert!(keeps_all_text(&Value::Null));
        assert!(!keeps_all_text(&json!({"type": "Whitespace"})));
        assert!(!keeps_all_text(&json!({"type": "BertPreTokenizer"})));
        assert!(!keeps_all_text(
            &json!({"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"})
        ));
        assert!(spells_every_byte(
            &json!({"type": "BPE", "unk_token": null})
        ));
        assert!(spells_every_byte(
            &json!({"type": "BPE", "unk_token": "<unk>", "byte_fallback": true})
        ));
        assert!(!spells_every_byte(
            &json!({"type": "BPE", "unk_token": "<unk>", "byte_fallback": false, "fuse_unk": true})
        ));
        assert!(!spells_every_byte(
            &json!({"type": "WordPiece", "unk_token": "[UNK]"})
        ));
    }

    #[test]
    fn a_text_is_refused_only_when_its_length_proves_it_too_long() {
        let budget = TokenBudget {
            limit: 10,
            max_token_bytes: 4,
        };
        assert!(budget.check(40).is_ok());
        match budget.check(41) {
            Err(Error::PromptTooLong { at_least, limit }) => {
                assert_eq!((at_least, limit), (11, 10))
            }
            other => panic!("{other:?}"),
        }
    }
}
