//! Structured output: OpenAI's `response_format` (`json_object`,
//! `json_schema`) and forced tool calls, decoded under a grammar that only
//! the key holder sees.
//!
//! The grammar engine is [llguidance] (what vLLM and llama.cpp use): it
//! turns a JSON schema or a Lark grammar plus this model's vocabulary into
//! the set of tokens allowed at each step. The set depends on the plaintext
//! tokens so far, so it is computed here, never by the blind server; how the
//! server is made to honour it is the optimistic protocol of
//! `docs/protocol.md` (the session validates each token and restarts from
//! the last valid one with [`Constraint::mask`] as the first token's set).
//!
//! [llguidance]: https://github.com/guidance-ai/llguidance

use std::sync::Arc;

use ee_core::wire::token_mask::TokenMask;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::proxy::request::{invalid, RequestError};
use crate::text::TextCodec;
use crate::Error;

/// The grammar compiler of one model: its vocabulary as llguidance's token
/// trie. Built once per key holder (about a second for 50k tokens).
pub struct Grammars {
    factory: ParserFactory,
    stop_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl Grammars {
    /// The compiler for `codec`'s vocabulary, padded to the model's
    /// `vocab_size`; `stop_ids` end an answer (all of them count as EOS).
    ///
    /// # Errors
    /// No stop token, or llguidance refuses the vocabulary.
    pub fn new(codec: &TextCodec, vocab_size: usize, stop_ids: &[u32]) -> Result<Self, Error> {
        let &eos = stop_ids
            .first()
            .ok_or_else(|| Error::Tokenizer("structured output needs a stop token".into()))?;
        // Special tokens are spelled with llguidance's marker byte first, so
        // that no text can match them and a grammar can name them; so are
        // IDs past the tokenizer (padding rows), which nothing may choose.
        // (The tokenizer builds its whole vocabulary to count it: once.)
        let pieces = codec.vocab_size();
        let marked = |text: &[u8]| [&[TokTrie::SPECIAL_TOKEN_MARKER][..], text].concat();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match codec.is_special(id) {
                true => marked(&codec.token_bytes(id)),
                false if (id as usize) < pieces => codec.token_bytes(id),
                false => marked(format!("<unused {id}>").as_bytes()),
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &words)
            .with_eos_tokens(stop_ids);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))
            .map_err(|e| Error::Tokenizer(format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            stop_ids: stop_ids.into(),
            vocab_size,
        })
    }

    /// A fresh constraint for one answer.
    ///
    /// # Errors
    /// A 400 naming `param` with llguidance's reason: a schema feature it
    /// does not implement, an unsatisfiable schema, a grammar that does not
    /// parse.
    pub fn constraint(
        &self,
        grammar: TopLevelGrammar,
        param: &str,
    ) -> Result<Constraint, RequestError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(param, format!("unsupported {param}: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(param, format!("unsupported {param}: {e}")));
        }
        Ok(Constraint {
            matcher,
            stop_ids: self.stop_ids.clone(),
            vocab_size: self.vocab_size,
            finished: false,
        })
    }
}

/// One answer's grammar state, over plaintext token IDs.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    stop_ids: Arc<[u32]>,
    vocab_size: usize,
    /// A stop token was accepted.
    finished: bool,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Takes `token` if the grammar allows it here and says whether it did.
    /// A stop token is allowed where the grammar may end.
    ///
    /// # Errors
    /// llguidance failed inside (its message).
    pub fn accept(&mut self, token: u32) -> Result<bool, String> {
        if self.finished {
            return Ok(false);
        }
        if self.stop_ids.contains(&token) {
            let ends = self.can_end()?;
            self.finished = ends;
            return Ok(ends);
        }
        self.matcher
            .try_consume_tokens(&[token])
            .map(|n| n == 1)
            .map_err(|e| e.to_string())
    }

    /// The tokens the grammar forces from here (a key's name and `": "`
    /// after its opening quote, say), taken into the state: the answer goes
    /// on with them without asking the model. The forced text is tokenized
    /// by `codec` and its last token left to the model, since it might
    /// merge with what follows; unless it completes the grammar.
    ///
    /// # Errors
    /// llguidance failed inside (its message).
    pub fn forced(&mut self, codec: &TextCodec) -> Result<Vec<u32>, String> {
        if self.is_complete() {
            return Ok(Vec::new());
        }
        let bytes = self.matcher.compute_ff_bytes();
        // Up to a character cut short, or a special token's marker byte.
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
        };
        let Ok(mut ids) = codec.encode_text(text) else {
            return Ok(Vec::new());
        };
        let n = self
            .matcher
            .try_consume_tokens(&ids)
            .map_err(|e| e.to_string())?;
        ids.truncate(n);
        if !ids.is_empty() && !self.matcher.is_stopped() {
            self.matcher.rollback(1).map_err(|e| e.to_string())?;
            ids.pop();
        }
        Ok(ids)
    }

    /// The grammar is complete and nothing more may follow: the answer ends
    /// here, whatever the model would add.
    pub fn is_complete(&self) -> bool {
        self.finished || self.matcher.is_stopped()
    }

    fn can_end(&mut self) -> Result<bool, String> {
        Ok(self.matcher.is_stopped() || self.matcher.is_accepting().map_err(|e| e.to_string())?)
    }

    /// The tokens allowed next, plaintext: the grammar's, plus every stop
    /// token where it may end.
    ///
    /// # Errors
    /// llguidance failed inside, or nothing is allowed (a grammar that
    /// cannot go on: a bug, since it would have stopped).
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        let mut mask = TokenMask::empty(self.vocab_size);
        if !self.matcher.is_stopped() {
            let allowed = self.matcher.compute_mask().map_err(|e| e.to_string())?;
            allowed.iter_set_entries(|id| {
                if !self.stop_ids.contains(&(id as u32)) {
                    mask.insert(id as u32);
                }
            });
        }
        if self.can_end()? {
            for &id in self.stop_ids.iter() {
                mask.insert(id);
            }
        }
        match mask.count() {
            0 => Err("the grammar allows no token here".into()),
            _ => Ok(mask),
        }
    }
}

/// OpenAI's `response_format` as a grammar: `None` for `text` (or absent).
///
/// `json_object` is any JSON object; `json_schema` takes
/// `{"json_schema": {"name", "schema", "strict"?, "description"?}}`.
///
/// # Errors
/// A 400 naming `response_format` for any other shape.
pub fn response_format_grammar(v: &Value) -> Result<Option<TopLevelGrammar>, RequestError> {
    const P: &str = "response_format";
    let Value::Object(o) = v else {
        return Err(invalid(P, "response_format must be an object"));
    };
    let kind = o.get("type").and_then(Value::as_str);
    let allowed = |keys: &[&str]| match o.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(invalid(
            &format!("{P}.{k}"),
            format!("unsupported field {k} in response_format"),
        )),
        None => Ok(()),
    };
    match kind {
        Some("text") => allowed(&["type"]).map(|()| None),
        Some("json_object") => {
            allowed(&["type"])?;
            Ok(Some(json_grammar(serde_json::json!({"type": "object"}))))
        }
        Some("json_schema") => {
            allowed(&["type", "json_schema"])?;
            let Some(Value::Object(js)) = o.get("json_schema") else {
                return Err(invalid(
                    &format!("{P}.json_schema"),
                    "response_format json_schema needs a json_schema object",
                ));
            };
            for k in js.keys() {
                if !["name", "schema", "strict", "description"].contains(&k.as_str()) {
                    return Err(invalid(
                        &format!("{P}.json_schema.{k}"),
                        format!("unsupported field {k} in json_schema"),
                    ));
                }
            }
            match js.get("name") {
                Some(Value::String(_)) => {}
                _ => {
                    return Err(invalid(
                        &format!("{P}.json_schema.name"),
                        "json_schema.name must be a string",
                    ))
                }
            }
            // OpenAI's default when no schema is given: any JSON object.
            let schema = match js.get("schema") {
                None | Some(Value::Null) => serde_json::json!({"type": "object"}),
                Some(s @ (Value::Object(_) | Value::Bool(_))) => s.clone(),
                Some(_) => {
                    return Err(invalid(
                        &format!("{P}.json_schema.schema"),
                        "json_schema.schema must be a JSON schema object",
                    ))
                }
            };
            Ok(Some(json_grammar(closed_objects(schema))))
        }
        _ => Err(invalid(
            &format!("{P}.type"),
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// The grammar of JSON that `schema` accepts, laid out as Python's
/// `json.dumps` does (`", "` and `": "`, no other whitespace), unless the
/// schema sets its own llguidance options (`x-guidance`). A fixed layout
/// keeps a small model from spending its answer on whitespace.
fn json_grammar(schema: Value) -> TopLevelGrammar {
    TopLevelGrammar::from_json_schema(json_layout(schema))
}

/// `schema` with [`json_grammar`]'s layout set, unless it sets its own.
pub(crate) fn json_layout(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ",
                               "key_separator": ": "})
        });
    }
    schema
}

/// `schema` with every object that lists its `properties` and says nothing
/// of others closed to others (`additionalProperties: false`), as OpenAI's
/// strict mode and xgrammar's default do: the answer still validates
/// against the schema as given, and a model cannot wander into keys nobody
/// asked for.
pub(crate) fn closed_objects(mut schema: Value) -> Value {
    close(&mut schema);
    schema
}

/// Keywords whose value is a schema, a list of schemas, or a map of names
/// to schemas (JSON Schema 2020-12 and draft 7); `const`, `enum`,
/// `default` and `examples` hold data and are left alone.
const SUBSCHEMA: &[&str] = &[
    "items",
    "additionalItems",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
];
const SUBSCHEMA_LISTS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems"];
const SUBSCHEMA_MAPS: &[&str] = &[
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];

fn close(schema: &mut Value) {
    let Value::Object(o) = schema else {
        return;
    };
    if o.get("properties").is_some_and(Value::is_object)
        && !o.contains_key("additionalProperties")
        && !o.contains_key("patternProperties")
    {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (k, v) in o.iter_mut() {
        let k = k.as_str();
        match v {
            _ if SUBSCHEMA.contains(&k) => close(v),
            Value::Array(list) if SUBSCHEMA_LISTS.contains(&k) => list.iter_mut().for_each(close),
            Value::Object(map) if SUBSCHEMA_MAPS.contains(&k) => map.values_mut().for_each(close),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_are_closed_where_schemas_are_and_data_is_left_alone() {
        let schema = json!({"type": "object", "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "string"}}},
            "c": {"const": {"properties": {"x": 1}}},
            "list": {"type": "array", "items": {"properties": {"b": {}}}}},
            "$defs": {"d": {"properties": {}}, "open": {"properties": {}, "additionalProperties": true}}});
        let closed = closed_objects(schema);
        assert_eq!(closed["additionalProperties"], false);
        let props = &closed["properties"];
        assert!(
            props.get("additionalProperties").is_none(),
            "a properties map is no schema"
        );
        assert_eq!(props["properties"]["additionalProperties"], false);
        assert_eq!(
            props["c"]["const"],
            json!({"properties": {"x": 1}}),
            "data untouched"
        );
        assert_eq!(props["list"]["items"]["additionalProperties"], false);
        assert_eq!(closed["$defs"]["d"]["additionalProperties"], false);
        assert_eq!(closed["$defs"]["open"]["additionalProperties"], true);
    }
}
