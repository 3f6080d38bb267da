//! A real-weight Hugging Face checkpoint, made from the default GGUF: no
//! Llama safetensors model ships in a package we can reach, so the test
//! data is the real SmolLM2 dequantized (in f32 exactly: every stored value;
//! the bf16 copy rounds them) with
//! llama.cpp's q/k row reordering undone, its `config.json`, and
//! `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`
//! from the GGUF metadata. Made once into `models/hf/` (git-ignored) and
//! reused; a half-written one is never seen (it is renamed into place).

use std::path::{Path, PathBuf};

use ee_core::gguf::names::hf_name;
use ee_core::gguf::Value;
use ee_core::tokenizer::GgufVocab;
use ee_engine::weights::gguf::GgufWeights;
use ee_engine::LlamaConfig;
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::{model_path, workspace_root};

/// The real checkpoint in `dtype` (F32 or BF16), made on first use.
pub fn real_hf_checkpoint(dtype: Dtype) -> PathBuf {
    let tag = match dtype {
        Dtype::BF16 => "bf16",
        _ => "f32",
    };
    let root = workspace_root().join("models").join("hf");
    let dir = root.join(format!("SmolLM2-135M-Instruct-{tag}"));
    if dir.join("config.json").exists() {
        return dir;
    }
    std::fs::create_dir_all(&root).expect("models/hf");
    let tmp = tempfile::tempdir_in(&root).expect("a temp dir beside the checkpoint");
    convert(&model_path(), tmp.path(), dtype);
    // Another test process may have won the race; its copy is as good.
    if std::fs::rename(tmp.path(), &dir).is_err() {
        assert!(
            dir.join("config.json").exists(),
            "{} was not made",
            dir.display()
        );
    }
    dir
}

/// llama.cpp's converter interleaves the two RoPE halves of each head's q/k
/// rows (`permute` in `convert_hf_to_gguf.py`); this puts them back:
/// HF row `j·hd/2 + i` of a head is GGUF row `2i + j`.
fn unpermute_rows(values: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let hd = rows / n_heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (hf, gguf) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                out[hf * cols..][..cols].copy_from_slice(&values[gguf * cols..][..cols]);
            }
        }
    }
    out
}

fn convert(gguf: &Path, dir: &Path, dtype: Dtype) {
    let weights = GgufWeights::open(gguf).expect("the GGUF");
    let header = weights.header();
    let c = LlamaConfig::from_gguf(&weights).expect("its config");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for info in &header.tensors {
        let Some(name) = hf_name(&info.name) else {
            continue;
        };
        let stored = weights.gguf_tensor(&info.name).expect("a tensor");
        let shape = stored.shape.clone();
        let mut values: Vec<f32> = stored
            .to_f32()
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("dequantized");
        let cols = *shape.last().expect("a shape");
        if name.ends_with("q_proj.weight") {
            values = unpermute_rows(&values, c.n_head, cols);
        } else if name.ends_with("k_proj.weight") {
            values = unpermute_rows(&values, c.n_kv_head, cols);
        }
        let bytes = match dtype {
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        tensors.push((name, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(dtype, s.clone(), b).expect("a view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).expect("weights");

    let vocab = GgufVocab::from_header(header).expect("the vocabulary");
    let tied = header.tensor("output.weight").is_none();
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(&v).expect("JSON")).expect(name)
    };
    write(
        "config.json",
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": c.n_embd, "intermediate_size": c.n_ff,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "vocab_size": c.vocab_size,
            "max_position_embeddings": c.context_length, "rms_norm_eps": c.rms_eps,
            "rope_theta": c.rope_freq_base, "hidden_act": "silu", "tie_word_embeddings": tied,
            "torch_dtype": if dtype == Dtype::BF16 { "bfloat16" } else { "float32" },
            "bos_token_id": vocab.bos_token_id, "eos_token_id": vocab.eos_token_id,
        }),
    );
    write(
        "tokenizer.json",
        vocab.to_hf_tokenizer_json().expect("tokenizer.json"),
    );
    write(
        "tokenizer_config.json",
        json!({
            "bos_token": vocab.token(vocab.bos_token_id), "eos_token": vocab.token(vocab.eos_token_id),
            "add_bos_token": vocab.add_bos_token, "chat_template": vocab.chat_template,
        }),
    );
    write(
        "generation_config.json",
        json!({"eos_token_id": vocab.eos_token_id}),
    );
    let name = header
        .get("general.name")
        .and_then(Value::as_str)
        .unwrap_or("model");
    std::fs::write(
        dir.join("README.md"),
        format!("{name}, converted from {} by ee's tests.\n", gguf.display()),
    )
    .expect("README");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute`, written from its numpy:
    /// `w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)`.
    fn llama_cpp_permute(hf: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
        let hd = hf.len() / cols / n_head;
        let mut out = vec![0f32; hf.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    // Element (h, a, b) moves to (h, b, a) of the swapped axes.
                    let src = (h * 2 + a) * (hd / 2) + b;
                    let dst = (h * (hd / 2) + b) * 2 + a;
                    out[dst * cols..][..cols].copy_from_slice(&hf[src * cols..][..cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermuting_undoes_llama_cpps_permute() {
        let (n_head, hd, cols) = (3, 6, 2);
        let hf: Vec<f32> = (0..n_head * hd * cols).map(|i| i as f32).collect();
        let gguf = llama_cpp_permute(&hf, n_head, cols);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, n_head, cols), hf);
    }
}
