//! Hugging Face safetensors weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, each memory-mapped.

use std::collections::HashMap;
use std::path::Path;

use ee_core::safetensors::{CheckpointFiles, MappedFile};
use safetensors::tensor::Dtype;

use super::{RopeLayout, StoredDType, StoredTensor, WeightSource};
use crate::Error;

/// A checkpoint's safetensors files, mapped.
pub struct SafetensorsWeights {
    shards: Vec<MappedFile>,
    /// Tensor name → shard.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Maps the weight files of a checkpoint.
    ///
    /// Errors name the file: a truncated or corrupt one, or a tensor held
    /// by two shards.
    pub fn open(files: &CheckpointFiles) -> Result<Self, Error> {
        let shards = files
            .shards
            .iter()
            .map(|p| MappedFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().into_keys() {
                if index.insert(name.clone(), s).is_some() {
                    return Err(Error::Model(format!(
                        "{}: tensor {name} is also in another shard",
                        shard.path.display()
                    )));
                }
            }
        }
        Ok(Self { shards, index })
    }

    /// The mapped files with their bytes.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &[u8])> {
        self.shards.iter().map(|s| (s.path.as_path(), &s.map[..]))
    }
}

impl WeightSource for SafetensorsWeights {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<StoredTensor<'_>, Error> {
        let shard = self
            .index
            .get(name)
            .map(|&s| &self.shards[s])
            .ok_or_else(|| Error::Model(format!("the checkpoint has no tensor {name}")))?;
        let err =
            |what: String| Error::Model(format!("{}: tensor {name}: {what}", shard.path.display()));
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| err("not in the file".into()))?;
        let dtype = match info.dtype {
            Dtype::F32 => StoredDType::F32,
            Dtype::F16 => StoredDType::F16,
            Dtype::BF16 => StoredDType::BF16,
            other => return Err(err(format!("dtype {other:?} (supported: F32, F16, BF16)"))),
        };
        let (start, end) = info.data_offsets;
        Ok(StoredTensor {
            name: name.to_owned(),
            dtype,
            shape: info.shape.clone(),
            // `read_metadata` checked that the offsets tile the data exactly.
            bytes: &shard.map[shard.data_start + start..shard.data_start + end],
        })
    }

    fn rope_layout(&self) -> RopeLayout {
        RopeLayout::HalfSplit
    }

    fn file_range(&self, bytes: &[u8]) -> Option<(&Path, u64)> {
        self.shards
            .iter()
            .find_map(|s| Some((s.path.as_path(), super::offset_in(&s.map, bytes)?)))
    }

    fn release(&self, bytes: &[u8]) {
        for shard in &self.shards {
            super::release_in(&shard.map, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::hf::{write_tiny_hf_model, TinyHfSpec};

    /// A tensor's bytes are found in their shard, at their offset, to map
    /// the embedding on its own.
    #[test]
    fn a_tensor_is_located_in_its_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf_model(dir.path(), &TinyHfSpec::llama(Dtype::F16)).unwrap();
        let weights =
            SafetensorsWeights::open(&CheckpointFiles::find(dir.path()).unwrap()).unwrap();
        let t = weights.tensor("model.embed_tokens.weight").unwrap();
        let (path, offset) = weights.file_range(t.bytes).unwrap();
        let file = std::fs::read(path).unwrap();
        assert_eq!(&file[offset as usize..][..t.bytes.len()], t.bytes);
        assert!(weights.file_range(&[0u8; 4]).is_none());
    }
}
