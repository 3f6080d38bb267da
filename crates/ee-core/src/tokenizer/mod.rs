//! The tokenizer side of a GGUF file: what the client needs and the server
//! must never see. Builds a Hugging Face `tokenizer.json` from the GGUF
//! `tokenizer.ggml.*` metadata, one module per tokenizer kind, as llama.cpp
//! reads them (`src/llama-vocab.cpp`) and mistral.rs converts them
//! (`gguf_tokenizer.rs`):
//!
//! - [`bpe`]: `gpt2`, byte-level BPE with a pre-tokenizer per model family;
//! - [`spm`]: `llama`, SentencePiece BPE with scores and byte fallback.
//!
//! Control tokens become the tokenizer's *special* added tokens, so that
//! message text can be tokenized with special-token parsing off.

pub mod bpe;
pub mod spm;

use serde_json::{json, Map, Value as Json};

use crate::gguf::{GgufHeader, Value};
use crate::Error;

/// GGUF token type (llama.cpp's `llama_token_type`): an ordinary piece.
pub const TOKEN_TYPE_NORMAL: i64 = 1;
/// GGUF token type: the unknown token (`<unk>`).
pub const TOKEN_TYPE_UNKNOWN: i64 = 2;
/// GGUF token type: a control token (BOS, EOS, chat markers).
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type: a user-defined token, matched in any text.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Every GGUF metadata key that belongs to the tokenizer starts with this.
pub const TOKENIZER_KEY_PREFIX: &str = "tokenizer.";

/// Tokenizer facts read from GGUF metadata, in plaintext token IDs.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `gpt2`.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `smollm`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: each ID's piece.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: each ID's type (`TOKEN_TYPE_*`).
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.scores`: SentencePiece piece scores (merge priority).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`: BPE merges, `left right`, by rank.
    pub merges: Vec<String>,
    /// Special-token IDs (plaintext), where the GGUF has them (or, for
    /// SentencePiece, llama.cpp's defaults).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    /// Whether prompts start with BOS / end with EOS.
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// `tokenizer.ggml.add_space_prefix`: SentencePiece's dummy prefix, a
    /// space before the text (llama.cpp's default: on for `llama` only).
    pub add_space_prefix: bool,
    /// Special tokens take the whitespace after them (`rstrip`), as
    /// llama.cpp sets for Phi-3 models (by `general.name`).
    pub rstrip_specials: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads the `tokenizer.*` metadata of a GGUF header, with llama.cpp's
    /// defaults where it is silent.
    ///
    /// # Errors
    /// No `tokenizer.ggml.model` or tokens, malformed arrays, or a special
    /// ID outside the vocabulary, named by key.
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
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(v) => v
                .as_array()
                .ok_or_else(|| {
                    Error::Tokenizer("tokenizer.ggml.token_type is not an array".into())
                })?
                .iter()
                .enumerate()
                .map(|(i, x)| match *x {
                    Value::I32(t) => Ok(i64::from(t)),
                    ref other => other.as_u64().map(|t| t as i64).ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "tokenizer.ggml.token_type[{i}] is not an integer"
                        ))
                    }),
                })
                .collect::<Result<_, _>>()?,
        };
        if token_types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        let scores: Vec<f32> = match h.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| Error::Tokenizer("tokenizer.ggml.scores is not an array".into()))?
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_f64().map(|f| f as f32).ok_or_else(|| {
                        Error::Tokenizer(format!("tokenizer.ggml.scores[{i}] is not a number"))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        if !scores.is_empty() && scores.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let pre = h
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // llama.cpp's defaults where the GGUF is silent: SentencePiece
        // starts prompts with BOS and a space, and its BOS, EOS and UNK are
        // 1, 2 and 0; BPE per family.
        let sentencepiece = model == "llama";
        let sentencepiece_id = |key: &str, default: u32| match sentencepiece {
            true => id(key).or(Some(default)),
            false => id(key),
        };
        let name = h
            .get("general.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_lowercase();
        let bos_default = sentencepiece || bpe::adds_bos_by_default(pre.as_deref());
        let vocab = Self {
            model,
            pre,
            merges: strings("tokenizer.ggml.merges")?,
            bos_token_id: sentencepiece_id("tokenizer.ggml.bos_token_id", 1),
            eos_token_id: sentencepiece_id("tokenizer.ggml.eos_token_id", 2),
            pad_token_id: id("tokenizer.ggml.padding_token_id"),
            unk_token_id: sentencepiece_id("tokenizer.ggml.unknown_token_id", 0),
            add_bos_token: flag("tokenizer.ggml.add_bos_token", bos_default),
            add_eos_token: flag("tokenizer.ggml.add_eos_token", false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", sentencepiece),
            rstrip_specials: name.contains("phi-3") || name.contains("phi3"),
            chat_template: h
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
            tokens,
            token_types,
            scores,
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

    /// The piece of `id`, if it is one.
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
    ///
    /// # Errors
    /// A tokenizer kind or pre-tokenizer we do not implement is refused,
    /// named: a near miss would silently change every prompt's token IDs.
    pub fn to_hf_tokenizer_json(&self) -> Result<Json, Error> {
        match self.model.as_str() {
            "gpt2" => bpe::tokenizer_json(self),
            "llama" => spm::tokenizer_json(self),
            other => Err(Error::Tokenizer(format!(
                "tokenizer model {other:?} is not supported (supported: \
                 gpt2, byte-level BPE; llama, SentencePiece)"
            ))),
        }
    }

    /// Token text → ID, for the model's `vocab` map.
    fn vocab_map(&self) -> Map<String, Json> {
        let mut vocab = Map::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            // A duplicate piece keeps its first ID, as llama.cpp's
            // `text_to_token` does.
            vocab.entry(t.clone()).or_insert_with(|| json!(i));
        }
        vocab
    }

    /// Control, unknown and user-defined tokens as Hugging Face added tokens
    /// (the ones llama.cpp's special-token partition looks for).
    /// Control and unknown tokens are `special`, as llama.cpp's
    /// `parse_special` treats them: with special-token parsing off they are
    /// text.
    /// They match the raw text (`normalized: false`), as llama.cpp's
    /// special-token partition does.
    fn added_tokens(&self) -> Vec<Json> {
        self.token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| {
                matches!(
                    ty,
                    TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED
                )
            })
            .map(|(i, &ty)| {
                let content = &self.tokens[i];
                let rstrip = self.rstrip_specials
                    && !["<unk>", "<s>", "<|endoftext|>"].contains(&content.as_str());
                json!({
                    "id": i,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": rstrip,
                    "normalized": false,
                    "special": ty != TOKEN_TYPE_USER_DEFINED,
                })
            })
            .collect()
    }
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
        // SmolLM splits every digit alone before GPT-2's split.
        let steps = &j["pre_tokenizer"]["pretokenizers"];
        assert_eq!(steps[0]["pattern"]["Regex"], r"\p{N}");
        assert_eq!(steps[1]["pattern"]["Regex"], bpe::GPT2);
        assert_eq!(steps[2]["type"], "ByteLevel");
    }

    #[test]
    fn follows_llama_cpps_defaults_where_the_gguf_is_silent() {
        let spm = header(vec![
            ("general.name", Value::String("Phi3 mini".into())),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                strs(&["<unk>", "<s>", "</s>", "a"]),
            ),
        ]);
        let v = GgufVocab::from_header(&spm).unwrap();
        assert_eq!(
            (v.bos_token_id, v.eos_token_id, v.unk_token_id),
            (Some(1), Some(2), Some(0))
        );
        assert!(v.add_bos_token && v.add_space_prefix && v.rstrip_specials);
        let gpt2 = header(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
        ]);
        let v = GgufVocab::from_header(&gpt2).unwrap();
        assert_eq!(
            (v.bos_token_id, v.add_bos_token, v.add_space_prefix),
            (None, false, false)
        );
        // No pre-tokenizer named: llama.cpp's default sequence of splits.
        let j = v.to_hf_tokenizer_json().unwrap();
        assert_eq!(
            j["pre_tokenizer"]["pretokenizers"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
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
        let err = GgufVocab::from_header(&header(m))
            .unwrap()
            .to_hf_tokenizer_json()
            .unwrap_err();
        assert!(err.to_string().contains("\"mystery\""), "{err}");
        let mut m = base();
        m[0].1 = Value::String("bert".into());
        let err = GgufVocab::from_header(&header(m))
            .unwrap()
            .to_hf_tokenizer_json()
            .unwrap_err();
        assert!(err.to_string().contains("\"bert\""), "{err}");
        let mut m = base();
        m.push(("tokenizer.ggml.eos_token_id", Value::U32(5)));
        assert!(GgufVocab::from_header(&header(m)).is_err());
        assert!(GgufVocab::from_header(&header(vec![])).is_err());
    }
}
