//! The tokenizer side of a GGUF file: what the client needs and the server
//! must never see. Builds a Hugging Face `tokenizer.json` from the GGUF
//! `tokenizer.ggml.*` metadata.

use serde_json::{json, Map, Value as Json};

use crate::gguf::{GgufHeader, Value};
use crate::Error;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Every GGUF metadata key that belongs to the tokenizer starts with this.
pub const TOKENIZER_KEY_PREFIX: &str = "tokenizer.";

/// Tokenizer facts read from GGUF metadata, in plaintext token IDs.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `gpt2`.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `smollm`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    pub fn from_header(h: &GgufHeader) -> Result<Self, Error> {
        let strings = |key: &str| -> Result<Vec<String>, Error> {
            match h.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .ok_or_else(|| Error::Tokenizer(format!("{key} is not an array")))?
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| Error::Tokenizer(format!("{key}: non-string entry")))
                    })
                    .collect(),
            }
        };
        let id = |key: &str| {
            h.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let flag =
            |key: &str, default: bool| h.get(key).and_then(Value::as_bool).unwrap_or(default);
        let model = h
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Tokenizer("the GGUF has no tokenizer.ggml.model".into()))?
            .to_owned();
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(Error::Tokenizer(
                "the GGUF has no tokenizer.ggml.tokens".into(),
            ));
        }
        let token_types = match h.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .ok_or_else(|| {
                    Error::Tokenizer("tokenizer.ggml.token_type is not an array".into())
                })?
                .iter()
                .map(|x| match *x {
                    Value::I32(t) => Ok(i64::from(t)),
                    ref other => other
                        .as_u64()
                        .map(|t| t as i64)
                        .ok_or_else(|| Error::Tokenizer("bad token type".into())),
                })
                .collect::<Result<_, _>>()?,
        };
        if token_types.len() != tokens.len() {
            return Err(Error::Tokenizer(
                "token_type and tokens differ in length".into(),
            ));
        }
        let vocab = Self {
            model,
            pre: h
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .map(str::to_owned),
            merges: strings("tokenizer.ggml.merges")?,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
            pad_token_id: id("tokenizer.ggml.padding_token_id"),
            unk_token_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos_token: flag("tokenizer.ggml.add_bos_token", false),
            add_eos_token: flag("tokenizer.ggml.add_eos_token", false),
            chat_template: h
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
            tokens,
            token_types,
        };
        for special in [
            vocab.bos_token_id,
            vocab.eos_token_id,
            vocab.pad_token_id,
            vocab.unk_token_id,
        ]
        .into_iter()
        .flatten()
        {
            if special as usize >= vocab.tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "special token ID {special} is outside the vocabulary"
                )));
            }
        }
        Ok(vocab)
    }

    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// Plaintext IDs of every control token (BOS, EOS, chat markers, ...).
    pub fn control_token_ids(&self) -> Vec<u32> {
        (0..self.tokens.len() as u32)
            .filter(|&i| self.token_types[i as usize] == TOKEN_TYPE_CONTROL)
            .collect()
    }

    /// The Hugging Face `tokenizer.json` equivalent of this vocabulary.
    pub fn to_hf_tokenizer_json(&self) -> Result<Json, Error> {
        if self.model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model {:?} is not supported yet (supported: gpt2 byte-level BPE)",
                self.model
            )));
        }
        let pre_tokenizer = byte_level_pre_tokenizer(self.pre.as_deref().unwrap_or("default"))?;
        let mut vocab = Map::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let added_tokens: Vec<Json> = self
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, &ty)| {
                json!({
                    "id": i,
                    "content": self.tokens[i],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": ty == TOKEN_TYPE_USER_DEFINED,
                    "special": ty == TOKEN_TYPE_CONTROL,
                })
            })
            .collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                // Byte-level BPE covers every byte, so it never needs <unk>.
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": self.merges,
            }
        }))
    }
}

/// The pre-tokenizer llama.cpp applies for a given `tokenizer.ggml.pre`,
/// expressed in Hugging Face terms. Unknown kinds are refused: a wrong split
/// would silently change every prompt's token IDs.
fn byte_level_pre_tokenizer(pre: &str) -> Result<Json, Error> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        // GPT-2's own regex, which ByteLevel applies when use_regex is set.
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // SmolLM / StarCoder: every digit alone, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-bpe" | "llama-v3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)
            ]
        }),
        other => {
            return Err(Error::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (supported: default, gpt2, smollm, starcoder, llama3, qwen2)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::ValueType;

    fn header(meta: Vec<(&str, Value)>) -> GgufHeader {
        GgufHeader {
            version: 3,
            metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensors: vec![],
            data_offset: 0,
        }
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(
            ValueType::String,
            v.iter().map(|s| Value::String(s.to_string())).collect(),
        )
    }

    #[test]
    fn reads_vocab_and_marks_control_tokens_special() {
        let h = header(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strs(&["<s>", "a", "b", "ab"])),
            (
                "tokenizer.ggml.token_type",
                Value::Array(
                    ValueType::I32,
                    vec![Value::I32(3), Value::I32(1), Value::I32(1), Value::I32(1)],
                ),
            ),
            ("tokenizer.ggml.merges", strs(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ]);
        let v = GgufVocab::from_header(&h).unwrap();
        assert_eq!(v.control_token_ids(), vec![0]);
        let j = v.to_hf_tokenizer_json().unwrap();
        assert_eq!(j["added_tokens"][0]["content"], "<s>");
        assert_eq!(j["added_tokens"][0]["special"], true);
        assert_eq!(j["model"]["vocab"]["ab"], 3);
        assert_eq!(j["pre_tokenizer"]["pretokenizers"][0]["type"], "Digits");
    }

    #[test]
    fn refuses_unknown_pre_tokenizer_and_bad_special_ids() {
        let base = || {
            vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", strs(&["a"])),
            ]
        };
        let mut m = base();
        m.push(("tokenizer.ggml.pre", Value::String("mystery".into())));
        assert!(GgufVocab::from_header(&header(m))
            .unwrap()
            .to_hf_tokenizer_json()
            .is_err());
        let mut m = base();
        m.push(("tokenizer.ggml.eos_token_id", Value::U32(5)));
        assert!(GgufVocab::from_header(&header(m)).is_err());
        assert!(GgufVocab::from_header(&header(vec![])).is_err());
    }
}
