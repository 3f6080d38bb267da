//! GGUF weights, memory-mapped: the header is parsed once from the map and
//! tensors are handed out as borrowed byte ranges.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use ee_core::gguf::{names::gguf_name, GgufHeader};
use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::{RopeLayout, StoredDType, StoredTensor, WeightSource};
use crate::Error;

/// ggml's type IDs (`enum ggml_type` in ggml.h) for the types candle reads,
/// less Q8_1: an activation type, never stored in real files, which
/// candle cannot widen to f32 (its `to_float` is unimplemented and panics).
const GGML_TYPES: [(u32, GgmlDType); 13] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
];

/// ggml's ID of bf16 (`GGML_TYPE_BF16`), which candle's ggml types lack:
/// such a tensor is read as a plain float one, as safetensors' bf16.
pub(crate) const GGML_BF16: u32 = 30;

/// The candle ggml type of a ggml type ID, if candle reads it.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    GGML_TYPES.iter().find(|(i, _)| *i == id).map(|(_, d)| *d)
}

/// A ggml type's name as ggml spells it (`Q4_K`, where candle says `Q4K`).
pub fn ggml_name(dtype: GgmlDType) -> String {
    ee_core::gguf::ggml_type_name(ggml_type_id(dtype))
}

/// The ggml type ID of a candle ggml type.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    GGML_TYPES
        .iter()
        .find(|(_, d)| *d == dtype)
        .map_or(u32::MAX, |(id, _)| *id)
}

/// A GGUF file, mapped.
pub struct GgufWeights {
    path: PathBuf,
    map: Mmap,
    header: GgufHeader,
}

impl GgufWeights {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path)
            .map_err(|e| Error::Model(format!("opening {}: {e}", path.display())))?;
        // SAFETY: the map is read-only. A model file rewritten while it is
        // served is outside what we guard against; llama.cpp and candle map
        // model files the same way.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::Model(format!("mapping {}: {e}", path.display())))?;
        let header = GgufHeader::read(&mut Cursor::new(&map[..]))
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_owned(),
            map,
            header,
        })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sha256 of the whole file, as lowercase hex: the artifact's
    /// fingerprint, hashed from the map the weights are read from.
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.map[..]))
    }

    /// A tensor by its GGUF name (GGUF-only tensors such as
    /// `rope_freqs.weight`).
    pub fn gguf_tensor(&self, name: &str) -> Result<StoredTensor<'_>, Error> {
        let err =
            |what: String| Error::Model(format!("{}: tensor {name}: {what}", self.path.display()));
        let info = self
            .header
            .tensor(name)
            .ok_or_else(|| err("not in the file".into()))?;
        let dtype = match info.ggml_type {
            GGML_BF16 => StoredDType::BF16,
            id => StoredDType::Ggml(
                ggml_dtype(id).ok_or_else(|| err(format!("unsupported ggml type {id}")))?,
            ),
        };
        let n_bytes = info.n_bytes().map_err(|e| err(e.to_string()))?;
        let start = self
            .header
            .data_offset
            .checked_add(info.offset)
            .ok_or_else(|| err("offset overflows".into()))?;
        let range = usize::try_from(start)
            .ok()
            .zip(usize::try_from(n_bytes).ok())
            .and_then(|(s, n)| Some(s..s.checked_add(n)?))
            .filter(|r| r.end <= self.map.len())
            .ok_or_else(|| err(format!("the file is truncated ({} bytes)", self.map.len())))?;
        Ok(StoredTensor {
            name: name.to_owned(),
            dtype,
            // ggml lists the contiguous dimension first.
            shape: info.dims.iter().rev().map(|&d| d as usize).collect(),
            bytes: &self.map[range],
        })
    }
}

impl WeightSource for GgufWeights {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.header.tensor(&g).is_some())
    }

    fn tensor(&self, name: &str) -> Result<StoredTensor<'_>, Error> {
        let g = gguf_name(name).ok_or_else(|| {
            Error::Model(format!(
                "{}: GGUF has no name for {name}",
                self.path.display()
            ))
        })?;
        self.gguf_tensor(&g)
    }

    fn file_range(&self, bytes: &[u8]) -> Option<(&Path, u64)> {
        Some((&self.path, super::offset_in(&self.map, bytes)?))
    }

    fn release(&self, bytes: &[u8]) {
        super::release_in(&self.map, bytes);
    }

    fn rope_layout(&self) -> RopeLayout {
        RopeLayout::Interleaved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{write_tiny_model, TinySpec};

    #[test]
    fn tensors_come_by_hf_name_and_the_hash_is_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_model(&path, &TinySpec::llama_q4_1()).unwrap();
        let w = GgufWeights::open(&path).unwrap();
        assert_eq!(w.sha256(), ee_core::transform::sha256_file(&path).unwrap());
        let q = w.tensor("model.layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.name, "blk.1.attn_q.weight");
        assert_eq!(q.shape, vec![64, 64]);
        assert_eq!(q.dtype, StoredDType::Ggml(GgmlDType::Q4_1));
        assert_eq!(q.bytes.len(), 64 * 2 * 20);
        assert!(w.contains("model.embed_tokens.weight"));
        assert!(!w.contains("lm_head.weight"), "the tiny model is tied");
        let err = w.tensor("model.layers.9.mlp.up_proj.weight").err().unwrap();
        assert!(err.to_string().contains("blk.9.ffn_up.weight"), "{err}");
    }

    #[test]
    fn names_follow_ggml() {
        assert_eq!(ggml_name(GgmlDType::Q4K), "Q4_K");
        assert_eq!(ggml_name(GgmlDType::Q8_0), "Q8_0");
        assert_eq!(ggml_name(GgmlDType::F16), "F16");
    }

    /// llama.cpp's BF16 GGUFs load, through our float kernels, and compute
    /// exactly what F32 weights holding the same values compute.
    #[test]
    fn bf16_matrices_compute_what_their_f32_values_compute() {
        let dir = tempfile::tempdir().unwrap();
        let [f32_path, bf16_path, rounded_path] =
            ["f32", "bf16", "rounded"].map(|n| dir.path().join(format!("{n}.gguf")));
        let spec = TinySpec {
            weights: GgmlDType::F32,
            embedding: GgmlDType::F32,
            untied_output: true,
            ..TinySpec::llama_q4_1()
        };
        write_tiny_model(&f32_path, &spec).unwrap();
        crate::testing::write_bf16_twins(&f32_path, &bf16_path, &rounded_path).unwrap();
        let w = GgufWeights::open(&bf16_path).unwrap();
        let q = w.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!((q.dtype, q.bytes.len()), (StoredDType::BF16, 64 * 64 * 2));
        // Its place in the file, to map it on its own.
        let (path, offset) = w.file_range(q.bytes).unwrap();
        let file = std::fs::read(path).unwrap();
        assert_eq!(&file[offset as usize..][..q.bytes.len()], q.bytes);
        assert!(w.file_range(&[0u8; 4]).is_none());
        // Released pages read back from the file unchanged (the whole map,
        // so that whole 64 KiB runs are dropped).
        assert!(file.len() > 2 * (64 << 10), "{} bytes", file.len());
        w.release(&w.map);
        assert_eq!(&file[offset as usize..][..q.bytes.len()], q.bytes);
        assert_eq!(&w.map[..], &file[..]);
        let [f32_model, bf16_model, rounded_model] =
            [&f32_path, &bf16_path, &rounded_path].map(|p| crate::load(p).unwrap());
        assert_eq!(bf16_model.weight_types(), "BF16");
        let tokens = [1, 40, 77, 3, 250, 9];
        let logits = |m: &std::sync::Arc<dyn crate::CausalLm>| {
            let l = m.forward_one(&tokens, &mut m.new_cache()).unwrap();
            l.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(logits(&bf16_model), logits(&rounded_model));
        assert_ne!(logits(&bf16_model), logits(&f32_model), "bf16 rounds");
    }

    #[test]
    fn a_truncated_file_names_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_model(&path, &TinySpec::llama_q4_1()).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        let w = GgufWeights::open(&path).unwrap();
        let err = w.tensor("model.norm.weight").err().unwrap().to_string();
        assert!(
            err.contains("m.gguf")
                && err.contains("output_norm.weight")
                && err.contains("truncated"),
            "{err}"
        );
        let err = crate::load(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
