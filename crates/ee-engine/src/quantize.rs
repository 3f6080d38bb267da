//! GGUF requantization: llama.cpp's `llama-quantize` role, so that a user
//! can make any of the formats our kernels run from a GGUF they have (an F16
//! conversion of their fine-tune, or another quantization), before
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
//! - vectors (norms) stay as stored.
//!
//! Values are quantized by candle's ggml ports (`QTensor::quantize`); a
//! tensor already in its target type is copied byte for byte. Metadata,
//! including the tokenizer, is kept; `general.file_type` is set.

use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use ee_core::gguf::{write_gguf, Value};
use rayon::prelude::*;

use crate::weights::gguf::{ggml_type_id, GgufWeights};
use crate::weights::StoredDType;
use crate::Error;

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
        match wanted {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            _ => GgmlDType::Q8_0,
        }
    }
}

impl FromStr for FileType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = FileType::ALL.iter().map(|t| t.name()).collect();
                Error::Unsupported(format!(
                    "quantization type {s:?}; choose one of {}",
                    names.join(", ")
                ))
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

/// A ggml type's name as ggml spells it (`Q4_K`, where candle says `Q4K`).
pub fn ggml_name(dtype: GgmlDType) -> String {
    let name = format!("{dtype:?}");
    match name.strip_suffix('K') {
        Some(bits) if !bits.contains('_') => format!("{bits}_K"),
        _ => name,
    }
}

/// What happened to one tensor, types as ggml spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorChange {
    pub name: String,
    pub from: String,
    pub to: String,
}

/// Writes `input`'s weights to `output` as `file_type` (atomically: a
/// temporary file beside it, renamed). Returns each tensor's change, in file
/// order. Errors name the file and tensor; the input is never modified.
pub fn quantize_gguf(
    input: &Path,
    output: &Path,
    file_type: FileType,
) -> Result<Vec<TensorChange>, Error> {
    let weights = GgufWeights::open(input)?;
    let header = weights.header();
    let arch = header.architecture()?;
    let n_layers = header
        .get(&format!("{arch}.block_count"))
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Model(format!("{}: no {arch}.block_count", input.display())))?
        as usize;
    let head = if header.tensor("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let converted: Vec<_> = header
        .tensors
        .par_iter()
        .map(|info| {
            let stored = weights.gguf_tensor(&info.name)?;
            let StoredDType::Ggml(from) = stored.dtype else {
                return Err(Error::Model(format!("{}: not a ggml type", info.name)));
            };
            let cols = info.dims.first().copied().unwrap_or(1) as usize;
            let to = if info.dims.len() < 2 {
                from
            } else {
                file_type.tensor_type(&info.name, cols, n_layers, head)
            };
            let bytes = if to == from {
                stored.bytes.to_vec()
            } else {
                let values = stored.to_f32()?;
                QTensor::quantize(&values, to)
                    .and_then(|q| q.data().map(|d| d.to_vec()))
                    .map_err(|e| Error::Model(format!("quantizing {}: {e}", info.name)))?
            };
            let change = TensorChange {
                name: info.name.clone(),
                from: ggml_name(from),
                to: ggml_name(to),
            };
            Ok((
                (
                    info.name.clone(),
                    info.dims.clone(),
                    ggml_type_id(to),
                    bytes,
                ),
                change,
            ))
        })
        .collect::<Result<_, Error>>()?;
    let (tensors, changes): (Vec<_>, Vec<_>) = converted.into_iter().unzip();
    let mut metadata = header.metadata.clone();
    let ftype = Value::U32(file_type.llama_ftype());
    match metadata.iter_mut().find(|(k, _)| k == "general.file_type") {
        Some((_, v)) => *v = ftype,
        None => metadata.push(("general.file_type".into(), ftype)),
    }
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty());
    let io =
        |what: &str, e: std::io::Error| Error::Model(format!("{what} {}: {e}", output.display()));
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| io("creating a file beside", e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write_gguf(&mut w, metadata, tensors)?;
        std::io::Write::flush(&mut w).map_err(|e| io("writing", e))?;
    }
    tmp.persist(output).map_err(|e| io("writing", e.error))?;
    Ok(changes)
}
