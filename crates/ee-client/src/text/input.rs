//! An encoder's input: one text, tokenized as sentence-transformers does.

use super::TextCodec;
use crate::Error;

impl TextCodec {
    /// Special tokens the tokenizer's post-processor wraps every input in
    /// (`[CLS]` and `[SEP]` for BERT: 2).
    pub fn wrapper_tokens(&self) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false))
    }

    /// Tokenizes one input of an encoder as sentence-transformers does: the
    /// text as plain text (special-token text is text), wrapped by the
    /// tokenizer's post-processor (`[CLS] … [SEP]` for BERT). With
    /// `max_tokens`, the text's tokens are cut from the end so that the
    /// whole, wrappers included, holds at most that many (transformers'
    /// `truncation=True, max_length=…`).
    ///
    /// # Errors
    /// The tokenizer fails; `max_tokens` leaves no room for a text token
    /// beside the [`wrapper_tokens`](Self::wrapper_tokens); or (a last
    /// guard) a special token appears that the post-processor did not add.
    pub fn encode_input(&self, text: &str, max_tokens: Option<usize>) -> Result<Vec<u32>, Error> {
        let tok = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        let mut encoding = self.tokenizer.encode(text, false).map_err(tok)?;
        if let Some(max) = max_tokens {
            let wrappers = self.wrapper_tokens();
            if max <= wrappers {
                return Err(Error::Tokenizer(format!(
                    "{max} tokens leave no room for text beside the {wrappers} special tokens \
                     every input carries"
                )));
            }
            encoding.truncate(max - wrappers, 0, tokenizers::TruncationDirection::Right);
        }
        let encoding = self
            .tokenizer
            .post_process(encoding, None, true)
            .map_err(tok)?;
        let ids = encoding.get_ids().to_vec();
        let added = encoding.get_special_tokens_mask();
        if let Some((&id, _)) = ids
            .iter()
            .zip(added)
            .find(|&(&id, &added)| added == 0 && self.is_special(id))
        {
            return Err(Error::Tokenizer(format!(
                "plain text tokenized into the special token {:?}; refusing",
                self.piece(id).unwrap_or_default()
            )));
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BERT-style WordPiece tokenizer: `[CLS] $A [SEP]`.
    fn codec() -> TextCodec {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": {"max_length": 3, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"),
                special(3, "[SEP]")],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100,
                "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5,
                    "[": 6, "]": 7, "sep": 8}}
        });
        TextCodec::from_json(&json, None, false).unwrap()
    }

    #[test]
    fn inputs_are_wrapped_cut_and_never_take_special_text_as_specials() {
        let c = codec();
        assert_eq!(c.wrapper_tokens(), 2);
        // The tokenizer's own padding and truncation are off.
        assert_eq!(
            c.encode_input("hello world hello", None).unwrap(),
            [2, 4, 5, 4, 3]
        );
        // Cut from the end of the text, [CLS] and [SEP] kept.
        assert_eq!(
            c.encode_input("hello world hello", Some(3)).unwrap(),
            [2, 4, 3]
        );
        assert!(c.encode_input("hello", Some(2)).is_err());
        // "[SEP]" in the text is text.
        assert_eq!(c.encode_input("[SEP]", None).unwrap(), [2, 6, 8, 7, 3]);
    }
}
