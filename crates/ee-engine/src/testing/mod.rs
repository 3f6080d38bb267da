//! Tiny generated models for fast tests of every supported architecture
//! and weight format: GGUF here, Hugging Face checkpoints in [`hf`]. Not
//! part of the public API.

pub mod encoder;
pub mod hf;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ee_core::gguf::{write_gguf, Value, ValueType};
use ee_core::rng::uniform_below;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::weights::gguf::ggml_type_id;
use crate::Error;

/// Shape and format of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub architecture: &'static str,
    pub weights: GgmlDType,
    pub embedding: GgmlDType,
    /// Separate `output.weight` instead of tied embeddings.
    pub untied_output: bool,
    pub sliding_window: Option<usize>,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_layers: usize,
    pub context_length: usize,
    pub seed: u64,
}

impl TinySpec {
    /// Llama with GQA, Q4_1 matrices and a tied Q8_0 embedding: the default
    /// model's layout in miniature.
    pub fn llama_q4_1() -> Self {
        Self {
            architecture: "llama",
            weights: GgmlDType::Q4_1,
            embedding: GgmlDType::Q8_0,
            untied_output: false,
            sliding_window: None,
            n_embd: 64,
            n_ff: 128,
            n_head: 4,
            n_kv_head: 2,
            n_layers: 2,
            context_length: 256,
            seed: 1,
        }
    }

    /// Every variant the engine supports.
    pub fn all_variants() -> Vec<(&'static str, Self)> {
        let base = Self::llama_q4_1();
        vec![
            ("llama-q4_1-tied", base.clone()),
            (
                "llama-q8_0-untied",
                Self {
                    weights: GgmlDType::Q8_0,
                    untied_output: true,
                    seed: 2,
                    ..base.clone()
                },
            ),
            // Three q-heads per kv-head, like SmolLM2 (9 / 3).
            (
                "llama-q4_1-gqa3",
                Self {
                    n_embd: 192,
                    n_head: 6,
                    n_kv_head: 2,
                    seed: 7,
                    ..base.clone()
                },
            ),
            (
                "llama-f32-mha",
                Self {
                    weights: GgmlDType::F32,
                    embedding: GgmlDType::F32,
                    n_kv_head: 4,
                    seed: 3,
                    ..base.clone()
                },
            ),
            (
                "llama-q4_0-f16-embd",
                Self {
                    weights: GgmlDType::Q4_0,
                    embedding: GgmlDType::F16,
                    seed: 4,
                    ..base.clone()
                },
            ),
            (
                "llama-q4_k",
                Self {
                    weights: GgmlDType::Q4K,
                    embedding: GgmlDType::Q6K,
                    n_embd: 256,
                    n_ff: 256,
                    n_head: 8,
                    seed: 5,
                    ..base.clone()
                },
            ),
            (
                "mistral-sliding-window",
                Self {
                    architecture: "mistral",
                    sliding_window: Some(8),
                    untied_output: true,
                    seed: 6,
                    ..base
                },
            ),
        ]
    }
}

/// The 256 byte-level BPE symbols (GPT-2's byte-to-unicode map).
fn byte_symbols() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("valid code point").to_string()
        })
        .collect()
}

/// ChatML, as SmolLM2 and Qwen use it.
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A small but real byte-level BPE vocabulary: 3 control tokens, the 256
/// byte symbols and a few merges. Plaintext IDs: `<|endoftext|>` 0,
/// `<|im_start|>` 1, `<|im_end|>` 2.
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3; 3];
    tokens.extend(byte_symbols());
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
        .map(String::from)
        .to_vec();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    types.resize(tokens.len(), 1);
    (tokens, types, merges)
}

/// [`tiny_vocab`] as the client reads it from a GGUF: byte-level BPE with
/// SmolLM's pre-tokenizer, BOS `<|im_start|>` (1, not added), EOS and PAD
/// `<|im_end|>` (2), and ChatML.
pub fn tiny_gguf_vocab() -> ee_core::tokenizer::GgufVocab {
    let (tokens, token_types, merges) = tiny_vocab();
    ee_core::tokenizer::GgufVocab {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        token_types: token_types.into_iter().map(i64::from).collect(),
        tokens,
        scores: Vec::new(),
        merges,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(2),
        unk_token_id: None,
        add_bos_token: false,
        add_eos_token: false,
        add_space_prefix: false,
        rstrip_specials: false,
        chat_template: Some(TINY_CHAT_TEMPLATE.into()),
    }
}

pub(crate) fn random_tensor(
    rng: &mut ChaCha20Rng,
    shape: (usize, usize),
    scale: f32,
) -> Result<Tensor, Error> {
    let n = shape.0 * shape.1;
    let data: Vec<f32> = (0..n)
        .map(|_| (uniform_below(rng, 2001) as f32 / 1000.0 - 1.0) * scale)
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn quantized(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>, Error> {
    Ok(QTensor::quantize(t, dtype)?.data()?.into_owned())
}

/// Writes a tiny random model with full tokenizer metadata and a ChatML
/// template, like a real GGUF from a model hub.
pub fn write_tiny_model(path: &Path, spec: &TinySpec) -> Result<(), Error> {
    write_tiny_model_with_text(path, spec, tiny_text_metadata())
}

/// The `tokenizer.*` metadata of [`tiny_vocab`], with ChatML.
fn tiny_text_metadata() -> Vec<(String, Value)> {
    let (tokens, types, merges) = tiny_vocab();
    let s = |v: &str| Value::String(v.into());
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                ValueType::String,
                tokens.into_iter().map(Value::String).collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                ValueType::String,
                merges.into_iter().map(Value::String).collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.padding_token_id".into(), u(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(TINY_CHAT_TEMPLATE)),
    ]
}

/// [`write_tiny_model`] around another vocabulary: `text` is the model's
/// `tokenizer.*` metadata (a real vocabulary's, with its template); the
/// embedding has a row per token.
pub fn write_tiny_model_with_text(
    path: &Path,
    spec: &TinySpec,
    text: Vec<(String, Value)>,
) -> Result<(), Error> {
    let mut rng = ChaCha20Rng::seed_from_u64(spec.seed);
    let vocab = text
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map(<[Value]>::len)
        .ok_or_else(|| Error::Model("the tokenizer metadata has no tokens".into()))?;
    let head_dim = spec.n_embd / spec.n_head;
    let arch = spec.architecture;
    let s = |v: &str| Value::String(v.into());
    let u = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("tiny test model")),
        (format!("{arch}.block_count"), u(spec.n_layers)),
        (format!("{arch}.context_length"), u(spec.context_length)),
        (format!("{arch}.embedding_length"), u(spec.n_embd)),
        (format!("{arch}.feed_forward_length"), u(spec.n_ff)),
        (format!("{arch}.attention.head_count"), u(spec.n_head)),
        (format!("{arch}.attention.head_count_kv"), u(spec.n_kv_head)),
        (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
        (format!("{arch}.rope.dimension_count"), u(head_dim)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    meta.extend(text);
    if let Some(w) = spec.sliding_window {
        meta.push((format!("{arch}.attention.sliding_window"), u(w)));
    }
    let mut tensors = Vec::new();
    let mut add = |name: String, t: Tensor, dtype: GgmlDType| -> Result<(), Error> {
        let (rows, cols) = t.dims2()?;
        tensors.push((
            name,
            vec![cols as u64, rows as u64],
            ggml_type_id(dtype),
            quantized(&t, dtype)?,
        ));
        Ok(())
    };
    let norm = |rng: &mut ChaCha20Rng| -> Result<Tensor, Error> {
        Ok((random_tensor(rng, (1, spec.n_embd), 0.2)? + 1.0)?)
    };
    add(
        "token_embd.weight".into(),
        random_tensor(&mut rng, (vocab, spec.n_embd), 1.0)?,
        spec.embedding,
    )?;
    let (d, f, kv) = (spec.n_embd, spec.n_ff, spec.n_kv_head * head_dim);
    let w = 1.0 / (d as f32).sqrt() * 1.7;
    for l in 0..spec.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        add(n("attn_norm"), norm(&mut rng)?, GgmlDType::F32)?;
        add(
            n("attn_q"),
            random_tensor(&mut rng, (d, d), w)?,
            spec.weights,
        )?;
        add(
            n("attn_k"),
            random_tensor(&mut rng, (kv, d), w)?,
            spec.weights,
        )?;
        add(
            n("attn_v"),
            random_tensor(&mut rng, (kv, d), w)?,
            spec.weights,
        )?;
        add(
            n("attn_output"),
            random_tensor(&mut rng, (d, d), w)?,
            spec.weights,
        )?;
        add(n("ffn_norm"), norm(&mut rng)?, GgmlDType::F32)?;
        add(
            n("ffn_gate"),
            random_tensor(&mut rng, (f, d), w)?,
            spec.weights,
        )?;
        add(
            n("ffn_up"),
            random_tensor(&mut rng, (f, d), w)?,
            spec.weights,
        )?;
        add(
            n("ffn_down"),
            random_tensor(&mut rng, (d, f), 1.0 / (f as f32).sqrt() * 1.7)?,
            spec.weights,
        )?;
    }
    add("output_norm.weight".into(), norm(&mut rng)?, GgmlDType::F32)?;
    if spec.untied_output {
        add(
            "output.weight".into(),
            random_tensor(&mut rng, (vocab, d), 1.0)?,
            spec.embedding,
        )?;
    }
    // 1-D norms are stored with a single dimension.
    for t in tensors.iter_mut() {
        if t.0.ends_with("norm.weight") {
            t.1 = vec![t.1[0]];
        }
    }
    let mut out = BufWriter::new(File::create(path).map_err(|e| Error::Model(e.to_string()))?);
    write_gguf(&mut out, meta, tensors)?;
    Ok(())
}

/// From a GGUF whose matrices are F32 (a [`TinySpec`] with F32 weights and
/// embedding), writes two twins: `bf16` stores every F32 matrix as BF16
/// (ggml type 30: llama.cpp's `-BF16.gguf` files; candle's types lack it),
/// `rounded` stores the same bf16-rounded values as F32. Vectors (norms)
/// stay F32 in both. Our kernels widen bf16 exactly, so the two compute
/// the same bits.
pub fn write_bf16_twins(f32_model: &Path, bf16: &Path, rounded: &Path) -> Result<(), Error> {
    use ee_core::gguf::GgufHeader;
    use half::bf16 as Bf16;
    let mut file = File::open(f32_model).map_err(|e| Error::Model(e.to_string()))?;
    let header = GgufHeader::read(&mut file)?;
    let (mut as_bf16, mut as_f32) = (Vec::new(), Vec::new());
    for t in &header.tensors {
        let bytes = header.read_tensor_bytes(&mut file, t)?;
        let f32_matrix = t.ggml_type == ggml_type_id(GgmlDType::F32) && t.dims.len() == 2;
        let values = bytes
            .chunks_exact(4)
            .map(|b| Bf16::from_f32(f32::from_le_bytes(b.try_into().expect("4 bytes"))));
        let (bf16_type, b16, f32s): (u32, Vec<u8>, Vec<u8>) = match f32_matrix {
            true => (
                crate::weights::gguf::GGML_BF16,
                values.clone().flat_map(Bf16::to_le_bytes).collect(),
                values.flat_map(|v| v.to_f32().to_le_bytes()).collect(),
            ),
            false => (t.ggml_type, bytes.clone(), bytes),
        };
        as_bf16.push((t.name.clone(), t.dims.clone(), bf16_type, b16));
        as_f32.push((t.name.clone(), t.dims.clone(), t.ggml_type, f32s));
    }
    for (path, tensors) in [(bf16, as_bf16), (rounded, as_f32)] {
        let mut out = BufWriter::new(File::create(path).map_err(|e| Error::Model(e.to_string()))?);
        write_gguf(&mut out, header.metadata.clone(), tensors)?;
    }
    Ok(())
}
