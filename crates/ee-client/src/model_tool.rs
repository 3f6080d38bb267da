//! The model tool: turns a model into its EE pair, the server artifact
//! (weights only, vocabulary rows permuted, no tokenizer) and the client
//! bundle (key, tokenizer, template, fingerprint of the artifact). A model
//! is a GGUF file or a Hugging Face checkpoint directory.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use ee_core::bundle::{ArtifactFingerprint, EncoderFacts, SpecialTokens, Tier, BUNDLE_FORMAT};
use ee_core::gguf::{GgufHeader, Value};
use ee_core::hf_text::{HfText, TOKENIZER_FILE};
use ee_core::safetensors::{config_vocab_size, read_config, CONFIG_FILE, SERVER_CONFIG_KEYS};
use ee_core::tokenizer::{GgufVocab, TOKENIZER_KEY_PREFIX};
use ee_core::transform::encoder::{classifier_labels, is_encoder_config};
use ee_core::transform::{
    embedding_vocab_size, write_encoder_server_artifact, write_gguf_hidden_artifact,
    write_hf_hidden_artifact, write_server_artifact, TransformReport,
};
use ee_core::{BundleManifest, ClientBundle, Key, Permutation};

use crate::template::{ChatFormat, ChatTemplate};
use crate::text::TextCodec;
use crate::tools::ToolFormat;
use crate::Error;

/// Which key to encrypt with.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A fresh key from the OS CSPRNG.
    Generate,
    /// An existing key file (from `ee keygen`).
    File(PathBuf),
    /// The insecure identity key: for plaintext baselines and tests only.
    Identity,
}

/// Plaintext tokenizer facts of a model, checked to load as a tokenizer.
pub struct ModelText {
    pub tokenizer_json: serde_json::Value,
    pub chat_template: Option<String>,
    pub special: SpecialTokens,
}

/// What a model is, besides its text side: the facts the bundle records.
struct ModelFacts {
    name: Option<String>,
    architecture: String,
    vocab_size: u32,
    context_length: Option<u64>,
}

impl ModelText {
    /// Reads the tokenizer side of a GGUF file (a vocabulary-only one too)
    /// or a checkpoint directory.
    pub fn read(path: &Path) -> Result<Self, Error> {
        if path.is_dir() {
            return Ok(Self::from_hf_dir(path)?.0);
        }
        Self::from_vocab(&Self::read_gguf_vocab(path)?.1)
    }

    /// The tokenizer side a client bundle keeps.
    pub fn from_bundle(bundle: &ClientBundle) -> Result<Self, Error> {
        let path = bundle.tokenizer_path();
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::Tokenizer(format!("reading {}: {e}", path.display())))?;
        let tokenizer_json = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            tokenizer_json,
            chat_template: bundle.manifest.chat_template.clone(),
            special: bundle.manifest.special_tokens.clone(),
        })
    }

    fn from_vocab(vocab: &GgufVocab) -> Result<Self, Error> {
        Ok(Self {
            tokenizer_json: vocab.to_hf_tokenizer_json()?,
            chat_template: vocab.chat_template.clone(),
            special: SpecialTokens::from_vocab(vocab),
        })
    }

    fn read_gguf_vocab(path: &Path) -> Result<(GgufHeader, GgufVocab), Error> {
        let file = File::open(path)
            .map_err(|e| Error::Model(format!("opening {}: {e}", path.display())))?;
        let header = GgufHeader::read(&mut BufReader::new(file))
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        if !header
            .metadata
            .iter()
            .any(|(k, _)| k.starts_with(TOKENIZER_KEY_PREFIX))
        {
            return Err(already_an_artifact(path));
        }
        let vocab = GgufVocab::from_header(&header)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok((header, vocab))
    }

    fn read_with_facts(path: &Path) -> Result<(Self, ModelFacts), Error> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        let (header, vocab) = Self::read_gguf_vocab(path)?;
        let arch = header.architecture()?.to_owned();
        let facts = ModelFacts {
            name: header
                .get("general.name")
                .and_then(Value::as_str)
                .map(str::to_owned),
            context_length: header
                .get(&format!("{arch}.context_length"))
                .and_then(Value::as_u64),
            architecture: arch,
            vocab_size: embedding_vocab_size(&header)?,
        };
        Ok((Self::from_vocab(&vocab)?, facts))
    }

    fn from_hf_dir(dir: &Path) -> Result<(Self, ModelFacts), Error> {
        let config_path = dir.join(ee_core::safetensors::CONFIG_FILE);
        let config = read_config(&config_path)?;
        let stripped = config
            .keys()
            .all(|k| SERVER_CONFIG_KEYS.contains(&k.as_str()));
        if stripped && !dir.join(TOKENIZER_FILE).exists() {
            return Err(already_an_artifact(dir));
        }
        let facts = ModelFacts {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            architecture: config
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_owned(),
            vocab_size: config_vocab_size(&config, &config_path)?,
            context_length: config
                .get("max_position_embeddings")
                .and_then(|v| v.as_u64()),
        };
        let text = HfText::read(dir)?;
        let text = Self {
            tokenizer_json: text.tokenizer_json,
            chat_template: text.chat_template,
            special: text.special,
        };
        Ok((text, facts))
    }

    /// The tokenizer alone (`ee tokenize`).
    pub fn codec(&self) -> Result<TextCodec, Error> {
        TextCodec::from_json(
            &self.tokenizer_json,
            self.special.bos_id,
            self.special.add_bos,
        )
    }

    /// The shipped template, when it renders `tools`, and the call format
    /// it asks its model for. `None`: tool requests take the fallback.
    pub fn tool_template(&self) -> Result<Option<(ChatTemplate, ToolFormat)>, Error> {
        let Some(source) = self.chat_template.as_deref() else {
            return Ok(None);
        };
        let Some(format) = ToolFormat::of_template(source) else {
            return Ok(None);
        };
        let template = ChatTemplate::new(
            source,
            self.special.bos.as_deref(),
            self.special.eos.as_deref(),
        )?;
        Ok(Some((template, format)))
    }

    /// The tokenizer and template for chats in `format`
    /// ([`TextCodec::from_json_for_template`]).
    pub fn chat(&self, format: ChatFormat) -> Result<(TextCodec, ChatTemplate), Error> {
        let source = format.template_source(self.chat_template.as_deref());
        let codec = TextCodec::from_json_for_template(
            &self.tokenizer_json,
            self.special.bos_id,
            self.special.add_bos,
            Some(source),
        )?;
        let template = ChatTemplate::new(
            source,
            self.special.bos.as_deref(),
            self.special.eos.as_deref(),
        )?;
        Ok((codec, template))
    }
}

/// What re-encrypting a server artifact gets: it has nothing to make a
/// bundle from.
fn already_an_artifact(path: &Path) -> Error {
    Error::Model(format!(
        "{} is already a server artifact (it has no tokenizer); encrypt the original model",
        path.display()
    ))
}

pub struct EncryptSummary {
    pub report: TransformReport,
    pub bundle_dir: PathBuf,
    pub identity_key: bool,
}

/// Writes the server artifact and the client bundle of `model`, a GGUF file
/// (the artifact is a `.gguf`) or a checkpoint directory (the artifact is a
/// directory, which must not exist or be empty), at the vocabulary tier
/// (an encoder's at the hidden tier, always). `progress(done, total)`
/// follows the tensor bytes written.
pub fn encrypt_model(
    model: &Path,
    server_out: &Path,
    client_out: &Path,
    key_source: &KeySource,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EncryptSummary, Error> {
    encrypt_model_at(
        model,
        server_out,
        client_out,
        key_source,
        Tier::Vocab,
        progress,
    )
}

/// [`encrypt_model`] at `tier`. At [`Tier::Hidden`] a Hugging Face
/// checkpoint's channels move value by value, a GGUF's in the block
/// structure its quantized tensors allow (`write_gguf_hidden_artifact`).
pub fn encrypt_model_at(
    model: &Path,
    server_out: &Path,
    client_out: &Path,
    key_source: &KeySource,
    tier: Tier,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EncryptSummary, Error> {
    let (text, facts) = ModelText::read_with_facts(model)?;
    // Refuse a model whose tokenizer we cannot rebuild before writing anything.
    let tokens = text.codec()?.vocab_size();
    if tokens > facts.vocab_size as usize {
        return Err(Error::Model(format!(
            "the tokenizer has {tokens} tokens but the embedding only {} rows",
            facts.vocab_size
        )));
    }
    let special = &text.special;
    let ids = special
        .stop_ids
        .iter()
        .chain(&special.bos_id)
        .chain(&special.eos_id);
    if let Some(bad) = ids.copied().find(|&id| id >= facts.vocab_size) {
        return Err(Error::Model(format!(
            "{}: special token ID {bad} is outside the vocabulary of {} (check eos_token_id in \
             generation_config.json and the special tokens in tokenizer_config.json)",
            model.display(),
            facts.vocab_size
        )));
    }
    let key = match key_source {
        KeySource::Generate => Key::generate()?,
        KeySource::File(path) => Key::load(path)?,
        KeySource::Identity => Key::identity(),
    };
    let config = match model.is_dir() {
        true => Some(read_config(&model.join(CONFIG_FILE))?),
        false => None,
    };
    let encoder = config.as_ref().filter(|c| is_encoder_config(c));
    // Checked before anything is written.
    let encoder_facts = encoder
        .map(|c| -> Result<EncoderFacts, Error> {
            let hidden = ["hidden_size", "dim"]
                .iter()
                .find_map(|k| c.get(*k).and_then(|v| v.as_u64()))
                .ok_or_else(|| Error::Model(format!("{}: no hidden_size", model.display())))?;
            Ok(EncoderFacts {
                hidden_size: hidden as u32,
                labels: classifier_labels(c),
            })
        })
        .transpose()?;
    let mut text = text;
    let tier = match encoder {
        Some(_) => Tier::Hidden,
        None => tier,
    };
    let report = match encoder {
        Some(_) => {
            // An encoder's inputs are single texts, cut by the proxy, never
            // padded: its tokenizer's own padding and truncation (MiniLM's
            // pads to 128) would change what it embeds.
            if let Some(t) = text.tokenizer_json.as_object_mut() {
                t.insert("padding".into(), serde_json::Value::Null);
                t.insert("truncation".into(), serde_json::Value::Null);
            }
            text.chat_template = None;
            write_encoder_server_artifact(model, server_out, &key, progress)?
        }
        None if tier == Tier::Hidden && model.is_dir() => {
            write_hf_hidden_artifact(model, server_out, &key, progress)?
        }
        None if tier == Tier::Hidden => {
            write_gguf_hidden_artifact(model, server_out, &key, progress)?
        }
        None => {
            let perm: Permutation = key.vocab_permutation(facts.vocab_size);
            write_server_artifact(model, server_out, &perm, progress)?
        }
    };
    let manifest = BundleManifest {
        format: BUNDLE_FORMAT.into(),
        model_name: facts.name,
        context_length: facts.context_length,
        architecture: facts.architecture,
        vocab_size: facts.vocab_size,
        server_artifact: ArtifactFingerprint {
            sha256: report.sha256.clone(),
            bytes: report.bytes,
        },
        key_fingerprint: key.fingerprint(),
        identity_key: key.is_identity(),
        chat_template: text.chat_template.clone(),
        special_tokens: text.special.clone(),
        tier,
        encoder: encoder_facts,
    };
    ClientBundle::write(client_out, &manifest, &key, &text.tokenizer_json)?;
    Ok(EncryptSummary {
        report,
        bundle_dir: client_out.to_owned(),
        identity_key: key.is_identity(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ee_core::gguf::GgufHeader;
    use ee_engine::testing::{write_tiny_model, TinySpec};

    #[test]
    fn writes_a_blind_artifact_and_a_loadable_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
        let (server, client) = (dir.path().join("server.gguf"), dir.path().join("bundle"));
        let summary = encrypt_model(
            &model,
            &server,
            &client,
            &KeySource::Generate,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(!summary.identity_key);

        let h = GgufHeader::read(&mut BufReader::new(File::open(&server).unwrap())).unwrap();
        assert!(h.metadata.iter().all(|(k, _)| !k.starts_with("tokenizer.")));
        let bytes = std::fs::read(&server).unwrap();
        for needle in ["<|im_start|>", "im_end", "chat_template", "Ġt"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "server artifact contains {needle}"
            );
        }

        let bundle = ClientBundle::load(&client).unwrap();
        bundle
            .check_server_artifact(&summary.report.sha256)
            .unwrap();
        assert_eq!(bundle.manifest.special_tokens.stop_ids, vec![2]);
        assert!(bundle.manifest.chat_template.is_some());
        let codec = TextCodec::from_file(&bundle.tokenizer_path(), None, false).unwrap();
        assert_eq!(codec.encode("<|im_start|>").unwrap(), vec![1]);
    }

    #[test]
    fn an_artifact_or_a_truncated_file_is_named_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
        let server = dir.path().join("server.gguf");
        let run = |input: &Path, n: &str| {
            let (s, b) = (dir.path().join(format!("{n}.gguf")), dir.path().join(n));
            encrypt_model(input, &s, &b, &KeySource::Generate, &mut |_, _| {})
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            encrypt_model(
                &model,
                &server,
                &dir.path().join("b"),
                &KeySource::Generate,
                &mut |_, _| {}
            )
            .err()
            .map(|e| e.to_string()),
            None
        );
        let err = run(&server, "again").unwrap();
        assert!(
            err.contains("already a server artifact") && err.contains("server.gguf"),
            "{err}"
        );
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &std::fs::read(&model).unwrap()[..100]).unwrap();
        let err = run(&cut, "cut-out").unwrap();
        assert!(err.contains("cut.gguf"), "{err}");
    }

    #[test]
    fn a_key_file_and_the_identity_key_are_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
        let key_path = dir.path().join("k.json");
        let key = Key::generate().unwrap();
        key.save(&key_path).unwrap();
        encrypt_model(
            &model,
            &dir.path().join("s.gguf"),
            &dir.path().join("b"),
            &KeySource::File(key_path),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(ClientBundle::load(&dir.path().join("b")).unwrap().key, key);

        let id = encrypt_model(
            &model,
            &dir.path().join("i.gguf"),
            &dir.path().join("ib"),
            &KeySource::Identity,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(id.identity_key);
        assert!(
            ClientBundle::load(&dir.path().join("ib"))
                .unwrap()
                .manifest
                .identity_key
        );
    }
}
