//! OpenAI-shaped answers in plaintext, built from decoded choices: full
//! responses, stream chunks, and both logprobs shapes.

use ee_core::wire::{FinishReason, Usage};
use serde_json::{json, Value};

use crate::decode::{ChoiceDecoder, ChoiceDelta, PlainLogprob, PlainTopLogprob};
use crate::proxy::request::LogprobsShape;
use crate::session::Generation;
use crate::tools::parse::{ParsedAnswer, ToolCall};
use crate::upstream::Endpoint;

/// What every response and chunk of one answer shares.
pub struct AnswerMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    pub logprobs: LogprobsShape,
    pub trace: bool,
}

impl AnswerMeta {
    pub fn of(generation: &Generation<'_>, id: String) -> Self {
        let r = generation.request;
        Self {
            id,
            created: generation.created,
            model: generation.model.clone(),
            endpoint: r.endpoint,
            logprobs: r.logprobs,
            trace: r.trace,
        }
    }

    fn envelope(&self, object: &str, choices: Vec<Value>, usage: Option<&Usage>) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        })
    }

    /// A streamed chunk for one choice.
    pub fn chunk(&self, index: usize, delta: &ChoiceDelta, first: bool) -> Value {
        let logprobs = self.logprobs_json(&delta.logprobs);
        let mut choice = match self.endpoint {
            Endpoint::Chat => {
                let mut d = json!({"content": delta.text});
                if first {
                    d["role"] = json!("assistant");
                }
                json!({"index": index, "delta": d, "logprobs": logprobs, "finish_reason": delta.finish})
            }
            Endpoint::Completion => json!({
                "index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish,
            }),
        };
        if self.trace {
            choice["encrypted_token_ids"] = json!(delta.encrypted_ids);
        }
        self.envelope(self.chunk_object(), vec![choice], None)
    }

    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The last chunk when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        self.envelope(self.chunk_object(), Vec::new(), Some(usage))
    }

    /// The first chunk of a traced stream: what the server was sent.
    pub fn trace_chunk(&self, encrypted_prompts: &[Vec<u32>]) -> Value {
        let mut v = self.envelope(self.chunk_object(), Vec::new(), None);
        v["encrypted_prompt_ids"] = json!(encrypted_prompts);
        v
    }

    /// A streamed choice's tool calls, whole, each under its `index`, and
    /// the choice's end (`finish_reason: "tool_calls"`).
    pub fn tool_calls_chunk(&self, index: usize, calls: &[ToolCall]) -> Value {
        let delta = json!({"tool_calls": calls_json(calls, true)});
        let choice = json!({"index": index, "delta": delta, "logprobs": null,
                            "finish_reason": "tool_calls"});
        self.envelope(self.chunk_object(), vec![choice], None)
    }

    /// The whole answer of a non-streamed request; `tool_answers` holds the
    /// choices whose answer parsed as tool calls.
    pub fn response(
        &self,
        decoders: &[ChoiceDecoder<'_>],
        usage: &Usage,
        tool_answers: &[Option<ParsedAnswer>],
    ) -> Value {
        let choices = decoders
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let finish = d.finish.unwrap_or(FinishReason::Length);
                let logprobs = self.logprobs_json(&d.logprobs);
                let called = tool_answers.get(index).and_then(Option::as_ref);
                let mut choice = match (self.endpoint, called) {
                    (Endpoint::Chat, Some(p)) => json!({
                        "index": index,
                        "message": {"role": "assistant",
                                    "content": (!p.content.is_empty()).then_some(&p.content),
                                    "tool_calls": calls_json(&p.calls, false)},
                        "logprobs": logprobs,
                        "finish_reason": "tool_calls",
                    }),
                    (Endpoint::Chat, None) => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": d.output},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    (Endpoint::Completion, _) => json!({
                        "index": index, "text": d.output, "logprobs": logprobs, "finish_reason": finish,
                    }),
                };
                if self.trace {
                    choice["encrypted_token_ids"] = json!(d.encrypted_ids);
                }
                choice
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        };
        self.envelope(object, choices, Some(usage))
    }

    fn logprobs_json(&self, entries: &[PlainLogprob]) -> Value {
        match self.logprobs {
            LogprobsShape::None => Value::Null,
            LogprobsShape::Chat => json!({"content": entries.iter().map(|e| {
                let mut v = top_json(&e.chosen);
                v["top_logprobs"] = e.top.iter().map(top_json).collect();
                v
            }).collect::<Vec<_>>()}),
            LogprobsShape::Completion => {
                json!({
                    "tokens": entries.iter().map(|e| &e.chosen.token).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.chosen.logprob).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(|e| {
                        e.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": entries.iter().map(|e| e.text_offset).collect::<Vec<_>>(),
                })
            }
        }
    }
}

/// Calls in OpenAI's shape; a streamed delta also numbers them (`index`).
fn calls_json(calls: &[ToolCall], with_index: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}});
            if with_index {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

fn top_json(t: &PlainTopLogprob) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}
