//! The tokenizer side of a Hugging Face checkpoint, which only the client
//! keeps: `tokenizer.json` (used as it is), `tokenizer_config.json` (chat
//! template, BOS/EOS, `add_bos_token`), `chat_template.jinja` when the
//! template is saved on its own, and `generation_config.json` (the EOS
//! list), read as transformers reads them.

use std::path::Path;

use serde_json::{Map, Value};

use crate::bundle::{SpecialTokens, END_OF_TURN_MARKERS};
use crate::Error;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// What the client bundle takes from a checkpoint directory.
#[derive(Debug, Clone, PartialEq)]
pub struct HfText {
    pub tokenizer_json: Value,
    pub chat_template: Option<String>,
    pub special: SpecialTokens,
}

fn read_json(path: &Path, required: bool) -> Result<Option<Value>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display()))),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Tokenizer(format!("reading {}: {e}", path.display()))),
    }
}

/// A special token's text: a string, or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The ID of a token's text in `tokenizer.json`: its added tokens first,
/// then the model's vocabulary (a map for BPE and WordPiece, a list of
/// `[piece, score]` for Unigram).
pub fn token_id(tokenizer: &Value, text: &str) -> Option<u32> {
    let added = tokenizer["added_tokens"].as_array().and_then(|a| {
        a.iter()
            .find(|t| t["content"].as_str() == Some(text))
            .and_then(|t| t["id"].as_u64())
    });
    let vocab = || match &tokenizer["model"]["vocab"] {
        Value::Object(m) => m.get(text).and_then(Value::as_u64),
        Value::Array(a) => a
            .iter()
            .position(|p| p[0].as_str() == Some(text))
            .map(|i| i as u64),
        _ => None,
    };
    added.or_else(vocab).and_then(|id| u32::try_from(id).ok())
}

/// Whether `tokenizer.json`'s post-processor puts `bos` first in a single
/// sequence (Llama 3's does, and its tokenizer_config says nothing).
fn post_processor_adds(tokenizer: &Value, bos: &str) -> bool {
    fn starts_with(p: &Value, bos: &str) -> bool {
        match p["type"].as_str() {
            Some("TemplateProcessing") => {
                p["single"][0]["SpecialToken"]["id"].as_str() == Some(bos)
            }
            Some("Sequence") => p["processors"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| starts_with(p, bos))),
            _ => false,
        }
    }
    starts_with(&tokenizer["post_processor"], bos)
}

impl HfText {
    /// Reads the tokenizer files of the checkpoint in `dir`.
    ///
    /// Errors name the file: no `tokenizer.json`, or a file that does not
    /// parse. A missing `tokenizer_config.json` or `generation_config.json`
    /// only means fewer facts.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let tokenizer_json = read_json(&dir.join(TOKENIZER_FILE), true)?
            .expect("a required file is read or refused");
        let config = read_json(&dir.join(TOKENIZER_CONFIG_FILE), false)?
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let generation = read_json(&dir.join(GENERATION_CONFIG_FILE), false)?
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let template_file = dir.join(CHAT_TEMPLATE_FILE);
        let chat_template = match std::fs::read_to_string(&template_file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => chat_template(&config),
            Err(e) => {
                return Err(Error::Tokenizer(format!(
                    "reading {}: {e}",
                    template_file.display()
                )))
            }
        };
        let special = special_tokens(&tokenizer_json, &config, &generation);
        Ok(Self {
            tokenizer_json,
            chat_template,
            special,
        })
    }
}

/// `chat_template`: a string, or a list of named templates of which the
/// one named `default` is used (as transformers does without a name).
fn chat_template(config: &Map<String, Value>) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned),
        _ => None,
    }
}

fn special_tokens(
    tokenizer: &Value,
    config: &Map<String, Value>,
    generation: &Map<String, Value>,
) -> SpecialTokens {
    let bos = token_text(config.get("bos_token"));
    let eos = token_text(config.get("eos_token"));
    let id = |t: &Option<String>| t.as_deref().and_then(|t| token_id(tokenizer, t));
    let (bos_id, eos_id) = (id(&bos), id(&eos));
    let pad_id = id(&token_text(config.get("pad_token")));
    let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        None => bos
            .as_deref()
            .is_some_and(|b| post_processor_adds(tokenizer, b)),
    };
    let add_eos = config
        .get("add_eos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // generation_config's eos_token_id (one ID or a list) ends generation,
    // as transformers' generate() and vLLM treat it; so do the
    // tokenizer's EOS and the end-of-turn markers it has as special tokens.
    // An ID too large for u32 becomes u32::MAX, which the bundle's range
    // check then refuses, rather than a different token.
    let id_of = |v: &Value| v.as_u64().map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let mut stop_ids: Vec<u32> = match generation.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(id_of).collect(),
        Some(v) => id_of(v).into_iter().collect(),
        None => Vec::new(),
    };
    stop_ids.extend(eos_id);
    let special_added = |text: &str| {
        tokenizer["added_tokens"].as_array().and_then(|a| {
            a.iter()
                .find(|t| {
                    t["content"].as_str() == Some(text) && t["special"].as_bool() == Some(true)
                })
                .and_then(|t| id_of(&t["id"]))
        })
    };
    stop_ids.extend(END_OF_TURN_MARKERS.iter().filter_map(|m| special_added(m)));
    let mut seen = Vec::new();
    stop_ids.retain(|id| {
        let new = !seen.contains(id);
        seen.push(*id);
        new
    });
    SpecialTokens {
        bos_id,
        bos,
        eos_id,
        eos,
        pad_id,
        add_bos,
        add_eos,
        stop_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokenizer() -> Value {
        json!({
            "added_tokens": [
                {"id": 0, "content": "<|begin_of_text|>", "special": true},
                {"id": 1, "content": "<|end_of_text|>", "special": true},
                {"id": 2, "content": "<|eot_id|>", "special": true},
                {"id": 3, "content": "<|eom_id|>", "special": true},
            ],
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel"},
                {"type": "TemplateProcessing", "single": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}]}]},
            "model": {"type": "BPE", "vocab": {"a": 4, "b": 5}},
        })
    }

    fn write(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    #[test]
    fn a_llama_3_style_directory_gives_bos_stops_and_template() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), TOKENIZER_FILE, &tokenizer());
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            &json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": {"content": "<|eot_id|>", "lstrip": false},
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}),
        );
        write(
            dir.path(),
            GENERATION_CONFIG_FILE,
            &json!({"eos_token_id": [1, 3]}),
        );
        let text = HfText::read(dir.path()).unwrap();
        let s = &text.special;
        assert_eq!(
            (s.bos_id, s.eos_id, s.add_bos, s.add_eos),
            (Some(0), Some(2), true, false)
        );
        assert_eq!(s.stop_ids, vec![1, 3, 2]);
        assert_eq!(text.chat_template.as_deref(), Some("D"));
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "J").unwrap();
        assert_eq!(
            HfText::read(dir.path()).unwrap().chat_template.as_deref(),
            Some("J")
        );
    }

    #[test]
    fn an_explicit_add_bos_token_wins_and_files_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = HfText::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_FILE), "{err}");
        write(dir.path(), TOKENIZER_FILE, &tokenizer());
        let bare = HfText::read(dir.path()).unwrap();
        assert_eq!(bare.special.bos_id, None);
        assert_eq!(
            bare.special.stop_ids,
            vec![2, 3],
            "end-of-turn markers still stop"
        );
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            &json!({"bos_token": "<|begin_of_text|>", "add_bos_token": false, "pad_token": "b"}),
        );
        let s = HfText::read(dir.path()).unwrap().special;
        assert!(!s.add_bos);
        assert_eq!(s.pad_id, Some(5));
        std::fs::write(dir.path().join(GENERATION_CONFIG_FILE), "{").unwrap();
        let err = HfText::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(GENERATION_CONFIG_FILE), "{err}");
    }
}
