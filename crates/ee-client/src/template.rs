//! Chat templates: the Jinja template shipped in the GGUF, rendered with
//! minijinja and Python-compatible string methods, as transformers does.

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::text::TextCodec;
use crate::Error;

/// One chat message with plain-text content.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a conversation becomes a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ChatFormat {
    /// As llama.cpp's built-in formatter does by default: a ChatML model is
    /// rendered as plain ChatML, without a default system prompt a shipped
    /// template may inject; other models use their shipped template.
    #[default]
    LlamaCpp,
    /// The GGUF's Jinja template exactly as shipped (as vLLM renders it).
    Gguf,
}

impl ChatFormat {
    /// The template source to render for a model that ships `shipped`.
    pub fn template_source(self, shipped: Option<&str>) -> &str {
        match (self, shipped) {
            (ChatFormat::Gguf, Some(t)) => t,
            (ChatFormat::LlamaCpp, Some(t)) if !t.contains("<|im_start|>") => t,
            _ => CHATML_TEMPLATE,
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Used when a model ships no template: ChatML, the most common format.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().into(),
            eos_token: eos_token.unwrap_or_default().into(),
        })
    }

    /// Renders a conversation, ending with the assistant's turn opened when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// Renders a conversation and tokenizes it (plaintext IDs) so that only
    /// the template's own markers become control tokens: special-token text
    /// inside a message is defused first ([`TextCodec::defuse_specials`])
    /// and costs the tokens of plain text. vLLM and llama.cpp parse it as
    /// control tokens, which lets a message forge turns.
    pub fn prompt_ids(
        &self,
        codec: &TextCodec,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, Error> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: codec.defuse_specials(&m.role).into_owned(),
                content: codec.defuse_specials(&m.content).into_owned(),
            })
            .collect();
        codec.encode(&self.render(&messages, add_generation_prompt)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, None, None).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hey ")], false)
                .unwrap(),
            "HEY"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"));
    }

    #[test]
    fn broken_templates_are_errors() {
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
