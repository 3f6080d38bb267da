//! GGUF requantization: llama.cpp's `llama-quantize` role, so that a user
//! can make any of the formats our kernels run from a GGUF they have (an F16
//! or BF16 conversion of their fine-tune, or another quantization), before
//! encrypting it.
//!
//! Which tensor gets which type follows `llama_tensor_get_type` in
//! llama.cpp's `src/llama-quant.cpp` for the types offered here:
//! - the output head (the token embedding, when tied) takes Q6_K, except in
//!   Q8_0 and F16 files;
//! - in Q4_K_M and Q5_K_M, `attn_v` and `ffn_down` take Q6_K in the first
//!   and last eighth of the layers and in every third layer between;
//! - a matrix whose rows are not whole 256-value super-blocks falls back as
//!   llama.cpp's does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0;
//! - a row that is not whole blocks of the fallback either is stored F16;
//! - only matrices named `*weight` are quantized; vectors (norms) stay as
//!   stored.
//!
//! Values are quantized by candle's ggml ports (`QTensor::quantize`): for
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q6_K the same reference quantizers as
//! llama.cpp's; for Q4_K and Q5_K candle ports an older search of scales
//! and mins (`make_qkx1_quants`, where llama.cpp now uses
//! `make_qkx2_quants`), so those tensors differ from llama-quantize's and
//! may be a little less accurate. No importance matrix is used. A tensor
//! already in its target type is copied byte for byte; requantizing an
//! already quantized tensor loses what its first quantization lost.
//! Metadata, including the tokenizer, is kept; `general.file_type` and
//! `general.quantization_version` are set and stale `quantize.imatrix.*`
//! keys dropped. Only the architectures the engine runs (llama, mistral)
//! are accepted: llama.cpp's rules for others (fused QKV, experts) are not
//! ported.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use ee_core::gguf::{ggml_type_name, TensorInfo, Value};
use rayon::prelude::*;

use crate::weights::gguf::{ggml_dtype, ggml_type_id, GgufWeights};
use crate::{Error, LlamaConfig};

/// A target file type, as `llama-quantize` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl FileType {
    pub const ALL: [FileType; 9] = [
        FileType::F16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q4KM,
        FileType::Q5KM,
        FileType::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F16 => "F16",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4KM => "Q4_K_M",
            FileType::Q5KM => "Q5_K_M",
            FileType::Q6K => "Q6_K",
        }
    }

    /// llama.cpp's `llama_ftype` value, for `general.file_type`.
    fn llama_ftype(self) -> u32 {
        match self {
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KM => 15,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
        }
    }

    /// The type of most matrices.
    fn base(self) -> GgmlDType {
        match self {
            FileType::F16 => GgmlDType::F16,
            FileType::Q4_0 => GgmlDType::Q4_0,
            FileType::Q4_1 => GgmlDType::Q4_1,
            FileType::Q5_0 => GgmlDType::Q5_0,
            FileType::Q5_1 => GgmlDType::Q5_1,
            FileType::Q8_0 => GgmlDType::Q8_0,
            FileType::Q4KM => GgmlDType::Q4K,
            FileType::Q5KM => GgmlDType::Q5K,
            FileType::Q6K => GgmlDType::Q6K,
        }
    }

    /// The type of matrix `name` (GGUF naming) with rows of `cols` values,
    /// in a model of `n_layers` blocks whose output head is `head`.
    pub fn tensor_type(self, name: &str, cols: usize, n_layers: usize, head: &str) -> GgmlDType {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let wanted = if name == head {
            match self {
                FileType::F16 | FileType::Q8_0 => self.base(),
                _ => GgmlDType::Q6K,
            }
        } else if matches!(self, FileType::Q4KM | FileType::Q5KM)
            && (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"))
            && layer.is_some_and(|i| more_bits(i, n_layers))
        {
            GgmlDType::Q6K
        } else {
            self.base()
        };
        if cols.is_multiple_of(wanted.block_size()) {
            return wanted;
        }
        let fallback = match wanted {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => GgmlDType::F16,
        };
        if cols.is_multiple_of(fallback.block_size()) {
            fallback
        } else {
            GgmlDType::F16
        }
    }
}

impl FromStr for FileType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = FileType::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "no quantization type {s:?}; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers,
/// and every third layer between.
fn more_bits(layer: usize, n_layers: usize) -> bool {
    let eighth = n_layers / 8;
    match layer.checked_sub(eighth) {
        None => true,
        Some(past) => layer >= 7 * n_layers / 8 || past % 3 == 2,
    }
}

/// What happened to one tensor, types as ggml spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorChange {
    pub name: String,
    pub from: String,
    pub to: String,
}

/// Writes `input`'s weights to `output` as `file_type`: a temporary file
/// beside it, renamed when complete, with the input's permissions. Tensors
/// are quantized in parallel a few at a time and written in file order, so
/// memory holds a window of tensors, not the model. Returns each tensor's
/// change, in file order. Errors name the file and tensor; the input is
/// never modified (`output` may be `input`: the rename replaces it whole).
pub fn quantize_gguf(
    input: &Path,
    output: &Path,
    file_type: FileType,
) -> Result<Vec<TensorChange>, Error> {
    let weights = GgufWeights::open(input)?;
    let header = weights.header();
    // The engine's own reading of the config: it refuses architectures the
    // engine does not run, and gives the layer count.
    let n_layers = LlamaConfig::from_gguf(&weights)
        .map_err(|e| Error::Model(format!("{}: {e}", input.display())))?
        .n_layers;
    let head = if header.tensor("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    // Every tensor's type, decided up front: the header needs the sizes.
    let mut out = header.clone();
    let mut changes = Vec::with_capacity(header.tensors.len());
    for t in &mut out.tensors {
        let from = ggml_type_name(t.ggml_type);
        let cols = t.dims.first().copied().unwrap_or(1) as usize;
        // llama.cpp quantizes matrices named `*weight`; vectors stay.
        if t.dims.len() >= 2 && t.name.ends_with("weight") {
            t.ggml_type = ggml_type_id(file_type.tensor_type(&t.name, cols, n_layers, head));
        }
        changes.push(TensorChange {
            name: t.name.clone(),
            from,
            to: ggml_type_name(t.ggml_type),
        });
    }
    out.metadata
        .retain(|(k, _)| !k.starts_with("quantize.imatrix"));
    set_u32(
        &mut out.metadata,
        "general.file_type",
        file_type.llama_ftype(),
    );
    set_u32(&mut out.metadata, "general.quantization_version", 2);

    let io =
        |what: &str, e: std::io::Error| Error::Model(format!("{what} {}: {e}", output.display()));
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty());
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| io("creating a file beside", e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        out.write(&mut w)
            .map_err(|e| Error::Model(format!("writing {}: {e}", output.display())))?;
        let mut written = 0u64;
        let window = rayon::current_num_threads().max(1) * 2;
        for infos in out.tensors.chunks(window) {
            let datas: Vec<Vec<u8>> = infos
                .par_iter()
                .map(|info| convert(&weights, info))
                .collect::<Result<_, Error>>()?;
            for (info, data) in infos.iter().zip(datas) {
                let pad = info.offset - written;
                w.write_all(&vec![0u8; pad as usize])
                    .and_then(|()| w.write_all(&data))
                    .map_err(|e| io("writing", e))?;
                written = info.offset + data.len() as u64;
            }
        }
        w.flush().map_err(|e| io("writing", e))?;
    }
    let permissions = std::fs::metadata(input)
        .map_err(|e| Error::Model(format!("reading {}: {e}", input.display())))?
        .permissions();
    std::fs::set_permissions(tmp.path(), permissions)
        .map_err(|e| io("setting the permissions of", e))?;
    tmp.persist(output).map_err(|e| io("writing", e.error))?;
    Ok(changes)
}

/// Tensor `info` (whose type is the target) as the output's bytes: the
/// input's bytes when the type is unchanged, else dequantized to f32 and
/// quantized again.
fn convert(weights: &GgufWeights, info: &TensorInfo) -> Result<Vec<u8>, Error> {
    let stored = weights.gguf_tensor(&info.name)?;
    let unchanged = weights
        .header()
        .tensor(&info.name)
        .is_some_and(|t| t.ggml_type == info.ggml_type);
    let bytes = if unchanged {
        stored.bytes.to_vec()
    } else {
        let to = ggml_dtype(info.ggml_type).ok_or_else(|| {
            Error::Model(format!(
                "tensor {}: ggml type {}",
                info.name, info.ggml_type
            ))
        })?;
        let values = stored.to_f32()?;
        QTensor::quantize(&values, to)
            .and_then(|q| q.data().map(|d| d.to_vec()))
            .map_err(|e| Error::Model(format!("quantizing {}: {e}", info.name)))?
    };
    let expected = info.n_bytes()?;
    if bytes.len() as u64 != expected {
        return Err(Error::Model(format!(
            "tensor {}: {} bytes made, {expected} expected",
            info.name,
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn set_u32(metadata: &mut Vec<(String, Value)>, key: &str, value: u32) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = Value::U32(value),
        None => metadata.push((key.to_owned(), Value::U32(value))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's shapes (30 layers, rows of 576 and 1536): the types
    /// llama-quantize 0.3.36 chose for it, layer by layer.
    #[test]
    fn the_mix_is_llama_cpps_for_smollm2() {
        let more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
        let head = "token_embd.weight";
        for (file_type, base, fallback, small) in [
            (
                FileType::Q4KM,
                GgmlDType::Q4K,
                GgmlDType::Q5_0,
                GgmlDType::Q5_0,
            ),
            (
                FileType::Q5KM,
                GgmlDType::Q5K,
                GgmlDType::Q5_1,
                GgmlDType::Q5_1,
            ),
        ] {
            let t = |name: &str, cols| file_type.tensor_type(name, cols, 30, head);
            assert_eq!(t(head, 576), GgmlDType::Q8_0, "Q6_K head falls back");
            for layer in 0..30 {
                let more_bits = more.contains(&layer);
                let down = t(&format!("blk.{layer}.ffn_down.weight"), 1536);
                let v = t(&format!("blk.{layer}.attn_v.weight"), 576);
                let q = t(&format!("blk.{layer}.attn_q.weight"), 576);
                assert_eq!(
                    down,
                    if more_bits { GgmlDType::Q6K } else { base },
                    "{layer}"
                );
                assert_eq!(
                    v,
                    if more_bits { GgmlDType::Q8_0 } else { fallback },
                    "{layer}"
                );
                assert_eq!(q, small, "{layer}");
            }
        }
        assert_eq!(
            FileType::Q4_0.tensor_type(head, 576, 30, head),
            GgmlDType::Q8_0
        );
        assert_eq!(
            FileType::F16.tensor_type(head, 576, 30, head),
            GgmlDType::F16
        );
        assert_eq!(
            FileType::Q8_0.tensor_type("blk.0.ffn_up.weight", 576, 30, head),
            GgmlDType::Q8_0
        );
    }

    #[test]
    fn rows_that_fit_no_block_fall_back_to_f16() {
        let head = "output.weight";
        for file_type in FileType::ALL {
            assert_eq!(
                file_type.tensor_type("blk.3.attn_q.weight", 40, 8, head),
                GgmlDType::F16,
                "{}",
                file_type.name()
            );
        }
        assert_eq!(
            FileType::Q6K.tensor_type("blk.3.attn_q.weight", 96, 8, head),
            GgmlDType::Q8_0
        );
    }

    #[test]
    fn an_unknown_type_lists_the_choices() {
        assert!("q3_k_xl"
            .parse::<FileType>()
            .unwrap_err()
            .contains("Q4_K_M"));
    }
}
