//! Our BERT-family encoders against an independent implementation,
//! candle-transformers' `bert.rs` and `distilbert.rs`: the real
//! all-MiniLM-L6-v2, and tiny generated classifiers in Hugging Face's
//! layout around its real WordPiece vocabulary.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{bert, distilbert};
use ee_e2e::encoder_path;
use ee_engine::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};
use ee_engine::{Encoder, ModelFiles};

const TEXTS: [&str; 4] = [
    "a cat sits on the mat",
    "a kitten rests on the rug",
    "The stock market fell sharply on Tuesday after the central bank raised rates.",
    "ok",
];

/// Token IDs with [CLS] … [SEP], as sentence-transformers feeds them.
fn tokenize(dir: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let mut t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    t.with_padding(None);
    t.with_truncation(None).unwrap();
    texts
        .iter()
        .map(|s| t.encode(*s, true).unwrap().get_ids().to_vec())
        .collect()
}

fn vb(dir: &Path) -> VarBuilder<'static> {
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn load_ours(dir: &Path) -> std::sync::Arc<dyn Encoder> {
    ModelFiles::open(dir).unwrap().load_encoder().unwrap()
}

/// candle's last hidden states of one sequence, unpadded: `[len, hidden]`.
fn candle_bert_states(model: &bert::BertModel, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let types = input.zeros_like().unwrap();
    model
        .forward(&input, &types, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn minilm_states_and_embeddings_agree_with_candle_bert() {
    let dir = encoder_path();
    let ours = load_ours(&dir);
    assert_eq!(
        (ours.hidden_size(), ours.max_positions(), ours.vocab_size()),
        (384, 512, 30522)
    );
    let config: bert::Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let theirs = bert::BertModel::load(vb(&dir), &config).unwrap();

    let batch = tokenize(&dir, &TEXTS);
    assert_eq!(batch[0], [101, 1037, 4937, 7719, 2006, 1996, 13523, 102]);
    let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
    let states = ours.hidden_states(&refs).unwrap();
    let embeddings = ours.embed(&refs).unwrap();
    let mut start = 0;
    for (ids, ours_embedding) in batch.iter().zip(&embeddings) {
        let theirs = candle_bert_states(&theirs, ids);
        let ours = states.narrow(0, start, ids.len()).unwrap();
        start += ids.len();
        let d = max_abs_diff(
            &ours.flatten_all().unwrap().to_vec1().unwrap(),
            &theirs.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(d < 1e-4, "token states differ by {d}");
        // sentence-transformers: mean over tokens, then L2 normalisation.
        let mean: Vec<f32> = theirs.mean(0).unwrap().to_vec1().unwrap();
        let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
        let expected: Vec<f32> = mean.iter().map(|x| x / norm).collect();
        let d = max_abs_diff(ours_embedding, &expected);
        assert!(d < 1e-5, "embeddings differ by {d}");
        let norm = ours_embedding.iter().map(|x| x * x).sum::<f32>();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // A sequence's embedding does not depend on its batch.
    for (i, ids) in batch.iter().enumerate() {
        let alone = ours.embed(&[ids.as_slice()]).unwrap();
        assert!(max_abs_diff(&alone[0], &embeddings[i]) < 1e-6);
    }
    // The two paraphrases are nearer each other than the third sentence.
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(cos(&embeddings[0], &embeddings[1]) > cos(&embeddings[0], &embeddings[2]) + 0.2);
}

/// Writes a tiny classifier of `kind` around MiniLM's real vocabulary.
fn tiny_classifier(kind: TinyEncoderKind) -> (tempfile::TempDir, TinyEncoderSpec) {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyEncoderSpec::classifier(kind, 30522);
    write_tiny_encoder(
        dir.path(),
        &spec,
        Some(&encoder_path().join("tokenizer.json")),
    )
    .unwrap();
    if kind == TinyEncoderKind::DistilBert {
        // candle's DistilBERT computes `gelu` with the tanh approximation
        // where transformers uses the exact erf form (as we do, and as
        // candle's BERT does); compare the rest of the architecture on ReLU.
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["activation"] = "relu".into();
        std::fs::write(&path, config.to_string()).unwrap();
    }
    (dir, spec)
}

/// `classifier(act(dense(h)))` on candle's first-token state, the heads of
/// transformers' `BertForSequenceClassification` (pooler, tanh) and
/// `DistilBertForSequenceClassification` (pre_classifier, ReLU).
fn candle_head(
    vb: &VarBuilder,
    dense: &str,
    tanh: bool,
    labels: usize,
    d: usize,
    first: &Tensor,
) -> Vec<f32> {
    let dense = candle_nn::linear(d, d, vb.pp(dense)).unwrap();
    let classifier = candle_nn::linear(d, labels, vb.pp("classifier")).unwrap();
    let h = candle_nn::Module::forward(&dense, first).unwrap();
    let h = if tanh {
        h.tanh().unwrap()
    } else {
        h.relu().unwrap()
    };
    let logits = candle_nn::Module::forward(&classifier, &h).unwrap();
    candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tiny_classifiers_agree_with_candle() {
    for kind in [TinyEncoderKind::Bert, TinyEncoderKind::DistilBert] {
        let (dir, spec) = tiny_classifier(kind);
        let ours = load_ours(dir.path());
        assert_eq!(ours.num_labels(), Some(3));
        let batch = tokenize(dir.path(), &TEXTS);
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let probs = ours.classify(&refs).unwrap();
        let config = std::fs::read(dir.path().join("config.json")).unwrap();
        let vb = vb(dir.path());
        for (ids, ours) in batch.iter().zip(&probs) {
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let first = match kind {
                TinyEncoderKind::Bert => {
                    let c: bert::Config = serde_json::from_slice(&config).unwrap();
                    let m = bert::BertModel::load(vb.pp("bert"), &c).unwrap();
                    m.forward(&input, &input.zeros_like().unwrap(), None)
                        .unwrap()
                }
                TinyEncoderKind::DistilBert => {
                    let c: distilbert::Config = serde_json::from_slice(&config).unwrap();
                    let m = distilbert::DistilBertModel::load(vb.pp("distilbert"), &c).unwrap();
                    // candle's mask marks the positions to hide: none.
                    let mask =
                        Tensor::zeros((ids.len(), ids.len()), DType::U8, &Device::Cpu).unwrap();
                    m.forward(&input, &mask).unwrap()
                }
            };
            let first = first.squeeze(0).unwrap().narrow(0, 0, 1).unwrap();
            let (dense, tanh) = match kind {
                TinyEncoderKind::Bert => ("bert.pooler.dense", true),
                TinyEncoderKind::DistilBert => ("pre_classifier", false),
            };
            let theirs = candle_head(&vb, dense, tanh, 3, spec.hidden, &first);
            let d = max_abs_diff(ours, &theirs);
            assert!(d < 1e-5, "{kind:?}: probabilities differ by {d}");
            assert!((ours.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!(ours.embed(&refs).is_ok());
    }
}
