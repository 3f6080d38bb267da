//! The key holder: a loaded client bundle with everything that turns text
//! into encrypted token IDs and back. Nothing here talks to the network.

use std::path::Path;

use ee_core::wire::ModelCard;
use ee_core::{ClientBundle, Permutation};

use crate::model_tool::ModelText;
use crate::template::{ChatFormat, ChatMessage, ChatTemplate};
use crate::text::TextCodec;
use crate::Error;

pub struct KeyHolder {
    bundle: ClientBundle,
    perm: Permutation,
    codec: TextCodec,
    template: ChatTemplate,
}

impl KeyHolder {
    pub fn load(dir: &Path, format: ChatFormat) -> Result<Self, Error> {
        let bundle = ClientBundle::load(dir)?;
        let (codec, template) = ModelText::from_bundle(&bundle)?.chat(format)?;
        let codec = match bundle.manifest.context_length {
            Some(context) => codec.with_token_limit(context as usize),
            None => codec,
        };
        let perm = bundle.key.vocab_permutation(bundle.manifest.vocab_size);
        Ok(Self {
            bundle,
            perm,
            codec,
            template,
        })
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

    pub fn encrypt(&self, plain: &[u32]) -> Result<Vec<u32>, Error> {
        Ok(self.perm.encrypt_all(plain)?)
    }

    pub fn decrypt(&self, cipher: &[u32]) -> Result<Vec<u32>, Error> {
        Ok(self.perm.decrypt_all(cipher)?)
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
