//! Hugging Face safetensors weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, each memory-mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ee_core::safetensors::CheckpointFiles;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::{RopeLayout, StoredDType, StoredTensor, WeightSource};
use crate::Error;

/// One mapped `.safetensors` file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where tensor data starts: after the 8-byte length and the header.
    data_start: usize,
    metadata: Metadata,
}

/// A checkpoint's safetensors files, mapped.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    /// Tensor name → shard.
    index: HashMap<String, usize>,
}

fn map_shard(path: &Path) -> Result<Shard, Error> {
    let file =
        File::open(path).map_err(|e| Error::Model(format!("opening {}: {e}", path.display())))?;
    // SAFETY: read-only, as for GGUF (see `GgufWeights::open`).
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| Error::Model(format!("mapping {}: {e}", path.display())))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        Error::Model(format!(
            "{}: not a valid safetensors file: {e:?}",
            path.display()
        ))
    })?;
    Ok(Shard {
        path: path.to_owned(),
        data_start: 8 + header_len,
        map,
        metadata,
    })
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
            .map(|p| map_shard(p))
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
}
