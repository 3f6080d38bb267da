//! Hugging Face safetensors weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, each memory-mapped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::{RopeLayout, StoredDType, StoredTensor, WeightSource};
use crate::Error;

/// The single-file checkpoint's name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

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

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
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
    /// Maps the checkpoint in `dir`: the shards of `model.safetensors.index.json`
    /// when there is one, else `model.safetensors`.
    ///
    /// Errors name the file: neither present, an index that does not parse,
    /// a shard it lists that is missing or lacks a tensor it is said to
    /// hold, a truncated or corrupt file.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.exists() {
            let path = dir.join(SINGLE_FILE);
            if !path.exists() {
                return Err(Error::Model(format!(
                    "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
                    dir.display()
                )));
            }
            let shard = map_shard(&path)?;
            let index = shard
                .metadata
                .tensors()
                .into_keys()
                .map(|k| (k, 0))
                .collect();
            return Ok(Self {
                shards: vec![shard],
                index,
            });
        }
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| Error::Model(format!("reading {}: {e}", index_path.display())))?;
        let listed: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", index_path.display())))?;
        let mut files: Vec<&String> = listed.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        for file in &files {
            let path = dir.join(file);
            if file.contains('/') || file.contains('\\') || !path.exists() {
                return Err(Error::Model(format!(
                    "{}: shard {file:?} is missing from {}",
                    index_path.display(),
                    dir.display()
                )));
            }
            shards.push(map_shard(&path)?);
        }
        let mut index = HashMap::with_capacity(listed.weight_map.len());
        for (name, file) in &listed.weight_map {
            let s = files
                .binary_search(&file)
                .expect("every listed file was mapped");
            if shards[s].metadata.info(name).is_none() {
                return Err(Error::Model(format!(
                    "{}: {name} is listed in {} but {file} does not hold it",
                    dir.display(),
                    INDEX_FILE
                )));
            }
            index.insert(name.clone(), s);
        }
        Ok(Self { shards, index })
    }

    /// The mapped files, in a fixed order, with their bytes.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &[u8])> {
        self.shards.iter().map(|s| (s.path.as_path(), &s.map[..]))
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
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
