//! A token budget checked before tokenizing. The Hugging Face tokenizer
//! keeps per-byte alignments and a string per token, about 160 bytes of
//! memory per byte of text: 3.3 MB of prompt cost the proxy 530 MB, only to
//! learn that it cannot fit an 8k context. No token spells more than the
//! vocabulary's longest piece, so text longer than `limit` such pieces
//! holds more than `limit` tokens, and is refused unread. That bounds the
//! memory a prompt can cost by the context length, not by the body size.

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
    /// spells `max_token_bytes` bytes. `None` when its normalizer may
    /// shrink text (NFKC, a lowercasing or stripping step, a shortening
    /// replacement): then length says nothing about the token count.
    pub(crate) fn new(tokenizer: &Tokenizer, max_token_bytes: usize, limit: usize) -> Option<Self> {
        let normalizer = serde_json::to_value(tokenizer.get_normalizer()).ok()?;
        (max_token_bytes > 0 && never_shrinks(&normalizer)).then_some(Self {
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
