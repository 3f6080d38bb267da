//! The key holder: a loaded client bundle with everything that turns text
//! into encrypted token IDs and back. Nothing here talks to the network.

use std::path::Path;
use std::sync::OnceLock;

use ee_core::transform::channels::{label_permutation, residual_permutation};
use ee_core::wire::token_mask::TokenMask;
use ee_core::wire::ModelCard;
use ee_core::{ClientBundle, Permutation};

use crate::model_tool::ModelText;
use crate::structured::Grammars;
use crate::template::{ChatFormat, ChatInput, ChatMessage, ChatTemplate};
use crate::text::TextCodec;
use crate::tools::ToolFormat;
use crate::Error;

pub struct KeyHolder {
    bundle: ClientBundle,
    perm: Permutation,
    codec: TextCodec,
    template: ChatTemplate,
    /// An encoder's σ (its embeddings' channels) and λ (its classes).
    encoder: Option<(Permutation, Option<Permutation>)>,
    /// Built on the first structured request: most sessions never need it.
    grammars: OnceLock<Result<Grammars, String>>,
    /// The shipped template when it renders tools, with its call format.
    tool_template: Option<(ChatTemplate, ToolFormat)>,
}

impl KeyHolder {
    pub fn load(dir: &Path, format: ChatFormat) -> Result<Self, Error> {
        let bundle = ClientBundle::load(dir)?;
        let text = ModelText::from_bundle(&bundle)?;
        let (codec, template) = text.chat(format)?;
        // A template that fails to compile only loses its tool path.
        let tool_template = text.tool_template().unwrap_or_else(|e| {
            tracing::warn!("the shipped chat template's tool path is unusable: {e}");
            None
        });
        let codec = match bundle.manifest.context_length {
            Some(context) => codec.with_token_limit(context as usize),
            None => codec,
        };
        let perm = bundle.key.vocab_permutation(bundle.manifest.vocab_size);
        let encoder = bundle.manifest.encoder.as_ref().map(|e| {
            let labels = e
                .labels
                .as_ref()
                .map(|l| label_permutation(&bundle.key, l.len() as u32));
            (residual_permutation(&bundle.key, e.hidden_size), labels)
        });
        Ok(Self {
            bundle,
            perm,
            codec,
            template,
            encoder,
            grammars: OnceLock::new(),
            tool_template,
        })
    }

    /// Whether the bundle is an encoder's (embeddings, classification).
    pub fn is_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// An embedding from the server (in the key's channel order, σ) in the
    /// model's own order.
    ///
    /// Errors: the bundle is not an encoder's, or the vector's width is
    /// not the model's.
    pub fn decrypt_embedding(&self, served: &[f32]) -> Result<Vec<f32>, Error> {
        let (sigma, _) = self.encoder.as_ref().ok_or_else(not_an_encoder)?;
        Ok(sigma.gather(served)?)
    }

    /// Class probabilities from the server (in the key's class order, λ) in
    /// the model's order, with the class names (`id2label`).
    ///
    /// Errors: the bundle is not a classifier's, or the count is wrong.
    pub fn decrypt_classes(&self, served: &[f32]) -> Result<(Vec<f32>, &[String]), Error> {
        let (_, lambda) = self.encoder.as_ref().ok_or_else(not_an_encoder)?;
        let lambda = lambda
            .as_ref()
            .ok_or_else(|| Error::Model("this encoder has no classification head".into()))?;
        let names = self
            .bundle
            .manifest
            .encoder
            .as_ref()
            .and_then(|e| e.labels.as_deref())
            .unwrap_or_default();
        Ok((lambda.gather(served)?, names))
    }

    pub fn bundle(&self) -> &ClientBundle {
        &self.bundle
    }

    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    pub fn vocab_size(&self) -> u32 {
        self.bundle.manifest.vocab_size
    }

    /// Renders a conversation with the model's chat template, the assistant's
    /// turn opened, and tokenizes it (plaintext IDs). Only the template's own
    /// markers become control tokens: special-token text inside a message is
    /// tokenized as text ([`ChatTemplate::prompt_ids`]).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, Error> {
        self.chat_prompt_with(messages, true)
    }

    /// [`chat_prompt`](Self::chat_prompt) with the generation prompt left
    /// to the caller.
    pub fn chat_prompt_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, Error> {
        self.template
            .prompt_ids(&self.codec, messages, add_generation_prompt)
    }

    /// A conversation offered `tools` (none: only its tool turns), rendered
    /// and tokenized (plaintext IDs), and the format the answer's calls will
    /// take: the shipped template's own where it renders tools, else the
    /// Hermes fallback, offered in a system message (merged into the first
    /// one where there is one).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<(Vec<u32>, ToolFormat), Error> {
        if let Some((template, format)) = &self.tool_template {
            let mut input = ChatInput::plain(messages, true);
            input.tools = (!tools.is_empty()).then(|| serde_json::Value::Array(tools.to_vec()));
            return Ok((template.prompt_ids_for(&self.codec, &input)?, *format));
        }
        let mut messages = fallback_tool_turns(messages);
        if !tools.is_empty() {
            let offer = crate::tools::fallback_system_text(tools);
            match messages.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{offer}", first.content)
                }
                _ => messages.insert(0, ChatMessage::new("system", &offer)),
            }
        }
        Ok((
            self.template.prompt_ids(&self.codec, &messages, true)?,
            ToolFormat::Hermes,
        ))
    }

    /// A special token's ID by its text (`[TOOL_CALLS]`).
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.codec.special_id(text)
    }

    pub fn encrypt(&self, plain: &[u32]) -> Result<Vec<u32>, Error> {
        Ok(self.perm.encrypt_all(plain)?)
    }

    pub fn decrypt(&self, cipher: &[u32]) -> Result<Vec<u32>, Error> {
        Ok(self.perm.decrypt_all(cipher)?)
    }

    /// The grammar compiler over this model's vocabulary (structured output).
    ///
    /// # Errors
    /// Why it cannot be built (no stop token, a vocabulary llguidance refuses).
    pub fn grammars(&self) -> Result<&Grammars, &str> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(
                    &self.codec,
                    self.bundle.manifest.vocab_size as usize,
                    self.stop_ids(),
                )
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The plaintext set `mask` as the server sees it (encrypted IDs).
    ///
    /// # Errors
    /// The mask covers another vocabulary than the key's.
    pub fn encrypt_mask(&self, mask: &TokenMask) -> Result<TokenMask, Error> {
        Ok(mask.permuted(&self.perm)?)
    }

    /// Tokens that end an answer (EOS, end of turn), plaintext.
    pub fn stop_ids(&self) -> &[u32] {
        &self.bundle.manifest.special_tokens.stop_ids
    }

    /// Refuses a server that hosts another artifact than this bundle's: its
    /// answers would be noise, and it may belong to someone else's key.
    pub fn check_server(&self, card: &ModelCard) -> Result<(), Error> {
        self.bundle.check_server_artifact(&card.artifact_sha256)?;
        Ok(())
    }
}

fn not_an_encoder() -> Error {
    Error::Model("this bundle is a language model's, not an encoder's".into())
}

/// Tool turns as a template without tools can show them, in the Hermes
/// format the fallback prompt describes: an assistant's calls become
/// `<tool_call>` blocks after its text, tool results a user turn of
/// `<tool_response>` blocks (results in a row share one, so that templates
/// that insist on alternating roles take them).
fn fallback_tool_turns(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut after_result = false;
    for m in messages {
        let mut m = m.clone();
        for call in std::mem::take(&mut m.tool_calls) {
            let f = &call["function"];
            let block = serde_json::json!({"name": f["name"], "arguments": f["arguments"]});
            let block = crate::template::python::dumps(&block);
            if !m.content.is_empty() {
                m.content.push('\n');
            }
            m.content
                .push_str(&format!("<tool_call>\n{block}\n</tool_call>"));
        }
        if m.role != "tool" {
            after_result = false;
            out.push(m);
            continue;
        }
        let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
        match out.last_mut() {
            Some(last) if after_result => {
                last.content.push('\n');
                last.content.push_str(&block);
            }
            _ => out.push(ChatMessage::new("user", &block)),
        }
        after_result = true;
    }
    out
}
