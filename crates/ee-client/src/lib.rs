//! `ee-client`: the key holder.
//!
//! Everything that touches plaintext lives here: the key and client bundle
//! ([`keyholder`]), the tokenizer ([`text`]), the chat template
//! ([`template`]), the model tool that makes a server artifact and a bundle
//! ([`model_tool`]), and the model fetch ([`fetch`]). [`session`] talks to a
//! blind server ([`upstream`]) and turns its encrypted answers back into
//! text ([`decode`]); [`proxy`] puts an OpenAI-compatible HTTP face on it.
//! [`structured`] holds the grammars of structured output, which only the
//! key holder can apply.
//! The `ee` binary (crate `ee-cli`) is its command line.

pub mod decode;
pub mod fetch;
pub mod keyholder;
pub mod model_tool;
pub mod proxy;
pub mod session;
pub mod structured;
pub mod template;
pub mod text;
pub mod tools;
pub mod upstream;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] ee_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    /// The template refused the conversation with `raise_exception`; the
    /// message is the template's own, as transformers reports it.
    #[error("{0}")]
    TemplateRaised(String),
    /// Message text would have become a control token through the
    /// template's own string handling; the conversation is refused.
    #[error("message text would become the control token {0:?} once the chat template has rendered it; refusing the conversation")]
    TemplateInjection(String),
    /// The text must hold more tokens than the model's context: refused
    /// before tokenizing, from its length alone.
    #[error("the text holds at least {at_least} tokens; the model's context holds {limit}")]
    PromptTooLong { at_least: usize, limit: usize },
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("model error: {0}")]
    Model(String),
}
