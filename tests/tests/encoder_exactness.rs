//! The encrypted encoder computes the plaintext one's function: on the real
//! all-MiniLM-L6-v2 and on tiny BERT and DistilBERT classifiers, the
//! server artifact's outputs on encrypted IDs, mapped back with the key,
//! match the plaintext model's within the stated tolerance (the order of
//! float sums changes under σ, nothing else does).

use std::path::Path;
use std::sync::Arc;

use ee_core::transform::channels::{label_permutation, residual_permutation};
use ee_core::transform::write_encoder_server_artifact;
use ee_core::Key;
use ee_e2e::encoder_path;
use ee_engine::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};
use ee_engine::{Encoder, ModelFiles};

const TEXTS: [&str; 4] = [
    "a cat sits on the mat",
    "a kitten rests on the rug",
    "[CLS] [SEP] [MASK] [PAD] are encrypted like any token.",
    "ok",
];

fn tokenize(dir: &Path) -> Vec<Vec<u32>> {
    let mut t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    t.with_padding(None);
    t.with_truncation(None).unwrap();
    TEXTS
        .iter()
        .map(|s| t.encode(*s, true).unwrap().get_ids().to_vec())
        .collect()
}

fn load(dir: &Path) -> Arc<dyn Encoder> {
    ModelFiles::open(dir).unwrap().load_encoder().unwrap()
}

/// (plaintext model, encrypted artifact, the artifact's directory).
fn encrypt(dir: &Path, key: &Key) -> (Arc<dyn Encoder>, Arc<dyn Encoder>, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let artifact = out.path().join("server");
    write_encoder_server_artifact(dir, &artifact, key, &mut |_, _| {}).unwrap();
    (load(dir), load(&artifact), out)
}

fn encrypted_batch(key: &Key, vocab: u32, batch: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let pi = key.vocab_permutation(vocab);
    batch
        .iter()
        .map(|ids| pi.encrypt_all(ids).unwrap())
        .collect()
}

fn refs(batch: &[Vec<u32>]) -> Vec<&[u32]> {
    batch.iter().map(Vec::as_slice).collect()
}

#[test]
fn minilm_encrypted_embeddings_equal_the_plaintext_ones() {
    let dir = encoder_path();
    let key = Key::from_bytes([42; 32]);
    let (plain, encrypted, out) = encrypt(&dir, &key);
    let batch = tokenize(&dir);
    let cipher = encrypted_batch(&key, 30522, &batch);
    assert_ne!(cipher[0][0], 101, "[CLS] is encrypted");
    let expected = plain.embed(&refs(&batch)).unwrap();
    let served = encrypted.embed(&refs(&cipher)).unwrap();
    let sigma = residual_permutation(&key, 384);
    let (mut worst_cos, mut worst_abs) = (1f64, 0f32);
    for (e, s) in expected.iter().zip(&served) {
        // What the server holds is not the embedding in the user's order.
        let cos_as_sent = e.iter().zip(s).map(|(a, b)| (a * b) as f64).sum::<f64>();
        assert!(
            cos_as_sent < 0.5,
            "the served vector is permuted: {cos_as_sent}"
        );
        let got = sigma.gather(s).unwrap();
        let dot = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let cos = dot(e, &got) / (dot(e, e) * dot(&got, &got)).sqrt();
        let abs = e
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst_cos = worst_cos.min(cos);
        worst_abs = worst_abs.max(abs);
    }
    eprintln!("MiniLM encrypted vs plaintext: min cosine {worst_cos:.9}, max |Δ| {worst_abs:e}");
    assert!(worst_cos >= 0.999999, "cosine {worst_cos}");
    assert!(worst_abs <= 1e-5, "max abs {worst_abs}");
    // The artifact keeps no plaintext token IDs and no tokenizer.
    let config = std::fs::read_to_string(out.path().join("server/config.json")).unwrap();
    assert!(!config.contains("pad_token_id"), "{config}");
    assert!(!out.path().join("server/tokenizer.json").exists());
    assert!(out.path().join("server/1_Pooling/config.json").exists());
}

#[test]
fn encrypted_classifiers_give_the_plaintext_label_and_probabilities() {
    // A key whose label permutation is not the identity (1 in 6 of 3
    // classes' are), so a label mapped back wrongly would show.
    let key = (0u8..)
        .map(|b| Key::from_bytes([b; 32]))
        .find(|k| !label_permutation(k, 3).is_identity())
        .unwrap();
    for kind in [TinyEncoderKind::Bert, TinyEncoderKind::DistilBert] {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyEncoderSpec::classifier(kind, 30522);
        let tokenizer = encoder_path().join("tokenizer.json");
        write_tiny_encoder(dir.path(), &spec, Some(&tokenizer)).unwrap();
        let (plain, encrypted, out) = encrypt(dir.path(), &key);
        let batch = tokenize(dir.path());
        let expected = plain.classify(&refs(&batch)).unwrap();
        let served = encrypted
            .classify(&refs(&encrypted_batch(&key, 30522, &batch)))
            .unwrap();
        let lambda = label_permutation(&key, 3);
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        for (e, s) in expected.iter().zip(&served) {
            let got = lambda.gather(s).unwrap();
            assert_eq!(argmax(e), argmax(&got), "{kind:?}");
            let d = e
                .iter()
                .zip(&got)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-6, "{kind:?}: probabilities differ by {d}");
        }
        let config = std::fs::read_to_string(out.path().join("server/config.json")).unwrap();
        assert!(config.contains("\"num_labels\": 3"), "{config}");
        for name in ["negative", "positive", "id2label", "label2id"] {
            assert!(!config.contains(name), "{kind:?} artifact holds {name}");
        }
    }
}

#[test]
fn a_bert_checkpoint_of_another_kind_is_refused_not_copied_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyEncoderSpec::classifier(TinyEncoderKind::Bert, 30522);
    write_tiny_encoder(
        dir.path(),
        &spec,
        Some(&encoder_path().join("tokenizer.json")),
    )
    .unwrap();
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    std::fs::write(&path, config.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = ee_client::model_tool::encrypt_model(
        dir.path(),
        &out.path().join("server"),
        &out.path().join("bundle"),
        &ee_client::model_tool::KeySource::Generate,
        &mut |_, _| {},
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("would change nothing"), "{err}");
    assert!(!out.path().join("server").exists());
}
