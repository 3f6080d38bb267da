//! Token embedding tables kept in their stored type (a GGUF's Q8_0 or Q6_K
//! blocks, f16, bf16, f32), each looked-up row widened to f32 as llama.cpp's
//! `get_rows` does. Widened whole, SmolLM2's 49152 x 576 Q8_0 table took
//! 113 MB instead of 30, and Llama 3's 128256 x 4096 would take 2.1 GB.
//!
//! The table is mapped from the model file on its own, as llama.cpp maps
//! its weights: only the pages of rows looked up are read into memory, and
//! the kernel may drop them again. (Loading reads the whole file once,
//! through the weight source's own map, which is dropped after.)

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use candle_core::{Device, Tensor};
use memmap2::{Mmap, MmapOptions};

use crate::weights::{StoredDType, StoredTensor};
use crate::Error;

/// A table's stored rows: mapped from its file, or copied where the
/// source has none.
enum Rows {
    Mapped(Mmap),
    Copied(Vec<u8>),
}

impl Deref for Rows {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Rows::Mapped(map) => map,
            Rows::Copied(bytes) => bytes,
        }
    }
}

impl Rows {
    /// `len` bytes at `offset` of the file at `path`, mapped read-only.
    fn map(path: &Path, offset: u64, len: usize) -> Result<Self, Error> {
        let err = |e: std::io::Error| {
            Error::Model(format!("mapping the embedding of {}: {e}", path.display()))
        };
        let file = File::open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(Error::Model(format!(
                "mapping the embedding of {}: the file is now {size} bytes",
                path.display()
            )));
        }
        // SAFETY: read-only, as the weight sources map their files; a model
        // file rewritten in place while it is served is outside what we
        // guard against (the configuration says to rename over it).
        let map = unsafe { MmapOptions::new().offset(offset).len(len).map(&file) }.map_err(err)?;
        // Rows are looked up at random: no read-ahead around them. Only a
        // hint, so a refusal changes nothing.
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Rows::Mapped(map))
    }
}

/// A `[vocab, dim]` embedding table in its stored type.
pub(crate) struct Embedding {
    /// The tensor's name in its file, for errors.
    name: String,
    dtype: StoredDType,
    /// Values per row: the model's hidden size.
    dim: usize,
    /// Stored bytes per row.
    row_bytes: usize,
    /// The rows as stored, `vocab · row_bytes` bytes.
    bytes: Rows,
}

impl Embedding {
    /// The stored rows of `t`, mapped from `file` (its path and their
    /// offset in it) where given, else copied. Errors when `t` is not a
    /// matrix of whole rows, or the file cannot be mapped.
    pub(crate) fn new(t: &StoredTensor<'_>, file: Option<(&Path, u64)>) -> Result<Self, Error> {
        let (rows, dim) = match t.shape[..] {
            [rows, dim] if rows > 0 && t.bytes.len().is_multiple_of(rows) => (rows, dim),
            _ => {
                return Err(Error::Model(format!(
                    "tensor {}: {} bytes are not the rows of a {:?} table",
                    t.name,
                    t.bytes.len(),
                    t.shape
                )))
            }
        };
        Ok(Self {
            name: t.name.clone(),
            dtype: t.dtype,
            dim,
            row_bytes: t.bytes.len() / rows,
            bytes: match file {
                Some((path, offset)) => Rows::map(path, offset, t.bytes.len())?,
                None => Rows::Copied(t.bytes.to_vec()),
            },
        })
    }

    /// Rows `ids` as f32 `[ids.len(), dim]`, each the bits that widening
    /// the whole table gives (the same per-block dequantization). Errors
    /// on an id past the table.
    pub(crate) fn forward(&self, ids: &[u32]) -> Result<Tensor, Error> {
        let mut values = Vec::with_capacity(ids.len() * self.dim);
        // candle reads blocks in place, from an 8-byte-aligned start; a
        // row of the table starts at any multiple of its size.
        let mut aligned = vec![0u64; self.row_bytes.div_ceil(8)];
        for &id in ids {
            let row = (id as usize)
                .checked_mul(self.row_bytes)
                .and_then(|at| self.bytes.get(at..at.checked_add(self.row_bytes)?))
                .ok_or_else(|| {
                    Error::Model(format!("token {id} is past the embedding {}", self.name))
                })?;
            let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..self.row_bytes];
            bytes.copy_from_slice(row);
            let view = StoredTensor {
                name: self.name.clone(),
                dtype: self.dtype,
                shape: vec![1, self.dim],
                bytes,
            };
            values.extend(view.to_f32()?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Tensor::from_vec(
            values,
            (ids.len(), self.dim),
            &Device::Cpu,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    /// Every stored type gives each row the bits of the whole table
    /// widened, whatever the row's offset: rows of 96 values make rows of
    /// bytes that are not multiples of 8 in the 32-value formats (Q8_0:
    /// 102 bytes), rows of 256 those of the K-quants. The table copied and
    /// mapped from a file, at an odd offset, give the same rows.
    #[test]
    fn rows_are_the_whole_tables_rows_in_every_type() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 7;
        let ggml = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::F32,
        ];
        let mut cases: Vec<(usize, StoredDType, Vec<u8>)> = Vec::new();
        for cols in [96, 256] {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 2001) as f32 / 1000.0 - 1.0) * 0.3)
                .collect();
            let table = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
            for t in ggml
                .into_iter()
                .filter(|t| cols.is_multiple_of(t.block_size()))
            {
                let q = QTensor::quantize(&table, t).unwrap();
                cases.push((cols, StoredDType::Ggml(t), q.data().unwrap().into_owned()));
            }
            let bf16 = values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes());
            cases.push((cols, StoredDType::BF16, bf16.collect()));
        }
        // 96: the five 32-value formats, F16, F32, BF16; 256: all thirteen.
        assert_eq!(cases.len(), 8 + 13);
        for (cols, dtype, bytes) in cases {
            // The whole table, widened from an aligned copy.
            let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..bytes.len()]
                .copy_from_slice(&bytes);
            let stored = StoredTensor {
                name: "token_embd.weight".into(),
                dtype,
                shape: vec![rows, cols],
                bytes: &bytemuck::cast_slice::<u64, u8>(&aligned)[..bytes.len()],
            };
            let whole: Vec<Vec<f32>> = stored.to_f32().unwrap().to_vec2().unwrap();
            let path = dir.path().join("table.bin");
            std::fs::write(&path, [&[7u8; 5][..], &bytes].concat()).unwrap();
            let copied = Embedding::new(&stored, None).unwrap();
            let mapped = Embedding::new(&stored, Some((&path, 5))).unwrap();
            assert!(matches!(mapped.bytes, Rows::Mapped(_)));
            for embedding in [copied, mapped] {
                let ids = [3, 0, 6, 3, 5];
                let got: Vec<Vec<f32>> = embedding.forward(&ids).unwrap().to_vec2().unwrap();
                for (row, &id) in got.iter().zip(&ids) {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(row),
                        bits(&whole[id as usize]),
                        "{dtype:?} x {cols}, row {id}"
                    );
                }
                let err = embedding.forward(&[7]).unwrap_err().to_string();
                assert!(
                    err.contains("token 7") && err.contains("token_embd"),
                    "{err}"
                );
            }
        }
        let gone = dir.path().join("gone.gguf");
        let stored = StoredTensor {
            name: "token_embd.weight".into(),
            dtype: StoredDType::F32,
            shape: vec![1, 2],
            bytes: &[0; 8],
        };
        let err = Embedding::new(&stored, Some((&gone, 0)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gone.gguf"), "{err}");
    }
}
