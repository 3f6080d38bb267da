//! Where a model's weights come from: one weight source per file format,
//! behind [`WeightSource`], as candle's `VarBuilder` backends and mistral.rs'
//! per-format loaders separate them.
//!
//! Architectures ask for tensors by their Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`); a source translates to its
//! own naming and hands out the stored bytes, borrowed from a memory map, so
//! each file is read once. The model then holds its own copy in the form its
//! kernels want (quantized blocks unpacked, float weights in their stored
//! type), releasing each tensor's pages once it is made
//! ([`WeightSource::release`]), and the maps are dropped once it is built.
//! The embedding table alone stays mapped, on its own, for lookups
//! ([`WeightSource::file_range`]).

pub mod gguf;
pub mod safetensors;

use std::path::Path;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use crate::float::{FloatMatrix, FloatWeights};
use crate::linear::{Linear, LoadOptions, Stacked};
use crate::Error;

/// How a source stores the rows of the query and key projections, which
/// decides how RoPE pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`: llama.cpp reorders q/k rows this way when it
    /// converts a model to GGUF (candle's `rope_i`).
    Interleaved,
    /// Pairs `(i, i + head_dim/2)`: Hugging Face's `rotate_half` (candle's
    /// `rope`).
    HalfSplit,
}

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    /// A ggml type (GGUF): float or block-quantized.
    Ggml(GgmlDType),
    /// Little-endian IEEE floats (safetensors).
    F32,
    F16,
    BF16,
}

/// Little-endian values of `N` bytes each, read with `f`.
fn words<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks of N bytes")))
        .collect()
}

/// A tensor as stored: its bytes (borrowed from the map), type and shape.
pub struct StoredTensor<'a> {
    /// The name in the file, for error messages.
    pub name: String,
    pub dtype: StoredDType,
    /// Row-major shape, outermost first: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl StoredTensor<'_> {
    fn qtensor(&self, dtype: GgmlDType) -> Result<QTensor, Error> {
        // candle reads the bytes in place as blocks (f16/f32 fields). A
        // GGUF's offsets are aligned (its header is checked) and the map is
        // page-aligned, so this only refuses a source that breaks that.
        if !(self.bytes.as_ptr() as usize).is_multiple_of(8) {
            return Err(Error::Model(format!(
                "tensor {}: data is not 8-byte aligned",
                self.name
            )));
        }
        qtensor_from_ggml(dtype, self.bytes, self.shape.clone(), &Device::Cpu)
            .map_err(|e| Error::Model(format!("tensor {}: {e}", self.name)))
    }

    /// The values of a float tensor, in their stored type.
    fn float_weights(&self) -> Result<FloatWeights, Error> {
        Ok(match self.dtype {
            StoredDType::F32 | StoredDType::Ggml(GgmlDType::F32) => {
                FloatWeights::F32(words(self.bytes, f32::from_le_bytes))
            }
            StoredDType::F16 | StoredDType::Ggml(GgmlDType::F16) => {
                FloatWeights::F16(words(self.bytes, f16::from_le_bytes))
            }
            StoredDType::BF16 => FloatWeights::BF16(words(self.bytes, bf16::from_le_bytes)),
            StoredDType::Ggml(t) => {
                return Err(Error::Model(format!(
                    "tensor {}: {t:?} is not a plain float type",
                    self.name
                )))
            }
        })
    }

    /// Checks the shape against what the architecture expects.
    pub fn expect_shape(self, shape: &[usize]) -> Result<Self, Error> {
        if self.shape != shape {
            return Err(Error::Model(format!(
                "tensor {} has shape {:?}; the config implies {shape:?}",
                self.name, self.shape
            )));
        }
        Ok(self)
    }

    /// The tensor as f32 values: norm weights, an embedding row, the
    /// quantizer's input, an encoder's matrices. Errors on a type candle
    /// cannot widen or bytes that are not the shape's.
    pub fn to_f32(&self) -> Result<Tensor, Error> {
        // Widened straight from the bytes: no copy in the stored type first.
        let values = match self.dtype {
            StoredDType::Ggml(t) => return Ok(self.qtensor(t)?.dequantize(&Device::Cpu)?),
            StoredDType::F32 => words(self.bytes, f32::from_le_bytes),
            StoredDType::F16 => words(self.bytes, |b| f16::from_le_bytes(b).to_f32()),
            StoredDType::BF16 => words(self.bytes, |b| bf16::from_le_bytes(b).to_f32()),
        };
        Ok(Tensor::from_vec(
            values,
            self.shape.as_slice(),
            &Device::Cpu,
        )?)
    }

    /// A weight matrix `[out, in]` ready for matmuls: block-quantized ones
    /// through our or candle's kernels, float ones (GGUF F32/F16 too, unless
    /// candle's kernels are asked for; GGUF BF16 always, which candle's
    /// types lack) through ours, kept in their stored type.
    pub fn to_linear(&self, opts: &LoadOptions) -> Result<Linear, Error> {
        match self.dtype {
            StoredDType::Ggml(t)
                if opts.candle_kernels || !matches!(t, GgmlDType::F32 | GgmlDType::F16) =>
            {
                Linear::from_qtensor(&self.name, self.qtensor(t)?, opts)
            }
            StoredDType::Ggml(_) | StoredDType::F32 | StoredDType::F16 | StoredDType::BF16 => {
                let [rows, cols] = self.shape[..] else {
                    return Err(Error::Model(format!(
                        "tensor {} has shape {:?}, not a matrix",
                        self.name, self.shape
                    )));
                };
                let matrix = FloatMatrix::new(rows, cols, self.float_weights()?)
                    .map_err(|e| Error::Model(format!("tensor {}: {e}", self.name)))?;
                Ok(Linear::Float(matrix))
            }
        }
    }

    /// The matrices `parts`, which multiply the same input, as one
    /// [`Stacked`] projection: one matrix of all their rows where they share
    /// a type and a row length (the input is then quantized once and the
    /// thread pool forks once), else, or on candle's kernels, each its own.
    pub fn to_stacked(parts: &[StoredTensor<'_>], opts: &LoadOptions) -> Result<Stacked, Error> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Model("no matrices to stack".into()))?;
        let stackable = parts.iter().all(|p| {
            p.dtype == first.dtype && p.shape.len() == 2 && p.shape[1..] == first.shape[1..]
        });
        // candle's kernels (the reference path) run each matrix as stored.
        if !stackable || parts.len() == 1 || opts.candle_kernels {
            let linears = parts.iter().map(|p| p.to_linear(opts));
            return Ok(Stacked::Separate(linears.collect::<Result<_, _>>()?));
        }
        let widths: Vec<usize> = parts.iter().map(|p| p.shape[0]).collect();
        // Rows are stored whole and in order, so the parts' bytes one after
        // another are the stacked matrix. In u64s: candle reads the blocks'
        // f16 fields in place, 8-byte aligned.
        let len: usize = parts.iter().map(|p| p.bytes.len()).sum();
        let mut words = vec![0u64; len.div_ceil(8)];
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len];
        let mut at = 0;
        for p in parts {
            bytes[at..at + p.bytes.len()].copy_from_slice(p.bytes);
            at += p.bytes.len();
        }
        let stacked = StoredTensor {
            name: parts
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(" + "),
            dtype: first.dtype,
            shape: vec![widths.iter().sum(), first.shape[1]],
            bytes,
        };
        Ok(Stacked::One(stacked.to_linear(opts)?, widths))
    }

    /// A hash of each stored row that travels with its token: the hash of
    /// the multiset of its values (a sum of their mixed bit patterns), so
    /// that neither the vocabulary permutation (rows move whole) nor a
    /// hidden-channel key (values move within a row, or within a quantized
    /// row's runs) changes it. Block-quantized rows are hashed by their
    /// dequantized values.
    pub fn row_hashes(&self) -> Result<Vec<u64>, Error> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if rows == 0 || !self.bytes.len().is_multiple_of(rows) {
            return Err(Error::Model(format!(
                "tensor {}: {} bytes do not split into {rows} rows",
                self.name,
                self.bytes.len()
            )));
        }
        let multiset =
            |bits: &mut dyn Iterator<Item = u64>| bits.fold(0u64, |h, b| h.wrapping_add(mix64(b)));
        let element = match self.dtype {
            StoredDType::F32 => 4,
            StoredDType::F16 | StoredDType::BF16 => 2,
            StoredDType::Ggml(dtype) => {
                // Dequantized a slice of rows at a time: a whole output head
                // in f32 would be gigabytes for a large vocabulary. Slices
                // of a multiple of 8 rows keep the map's 8-byte alignment.
                const ROWS: usize = 1024;
                let row_bytes = self.bytes.len() / rows;
                let mut hashes = Vec::with_capacity(rows);
                for (i, bytes) in self.bytes.chunks(ROWS * row_bytes).enumerate() {
                    let mut shape = self.shape.clone();
                    shape[0] = bytes.len() / row_bytes;
                    let slice = StoredTensor {
                        name: format!("{} (rows from {})", self.name, i * ROWS),
                        dtype: self.dtype,
                        shape,
                        bytes,
                    };
                    let values = slice
                        .qtensor(dtype)?
                        .dequantize(&Device::Cpu)
                        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                        .map_err(|e| Error::Model(format!("tensor {}: {e}", slice.name)))?;
                    let cols = values.len() / slice.shape[0];
                    hashes.extend(
                        values
                            .chunks_exact(cols.max(1))
                            .map(|row| multiset(&mut row.iter().map(|v| u64::from(v.to_bits())))),
                    );
                }
                return Ok(hashes);
            }
        };
        Ok(self
            .bytes
            .chunks_exact(self.bytes.len() / rows)
            .map(|row| {
                multiset(
                    &mut row
                        .chunks_exact(element)
                        .map(|v| v.iter().rev().fold(0u64, |x, &b| x << 8 | u64::from(b))),
                )
            })
            .collect())
    }
}

/// splitmix64's finaliser: spreads a value's bits over the whole word, so
/// that a sum of mixed values identifies their multiset.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A model's weights, by Hugging Face tensor name.
pub trait WeightSource {
    /// Whether the model stores this tensor (an untied `lm_head.weight`).
    fn contains(&self, name: &str) -> bool;

    /// The stored tensor. Errors name the tensor and the file.
    fn tensor(&self, name: &str) -> Result<StoredTensor<'_>, Error>;

    /// How q/k rows are laid out for RoPE.
    fn rope_layout(&self) -> RopeLayout;

    /// Where `bytes`, a tensor's data from this source, lie in a file: its
    /// path and their offset, to map them on their own. `None` for bytes
    /// this source does not map.
    fn file_range(&self, bytes: &[u8]) -> Option<(&Path, u64)>;

    /// Says that the model has taken what it needs of `bytes`, a tensor's
    /// data from this source (repacked or copied them): their pages leave
    /// this process's memory, and are read from the file again if asked.
    /// Loading otherwise holds the whole file in memory on top of the
    /// weights it makes, until the source is dropped.
    fn release(&self, bytes: &[u8]);
}

/// The offset of `bytes` in `map`, where it lies wholly inside.
pub(crate) fn offset_in(map: &[u8], bytes: &[u8]) -> Option<u64> {
    let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
    (start.checked_add(bytes.len())? <= map.len()).then_some(start as u64)
}

/// [`WeightSource::release`] for a file mapped whole: the pages wholly
/// inside `bytes` (in 64 KiB, a multiple of every page size) leave this
/// process's resident set.
pub(crate) fn release_in(map: &memmap2::Mmap, bytes: &[u8]) {
    const ALIGN: usize = 64 << 10;
    let Some(start) = offset_in(map, bytes) else {
        return;
    };
    // The map starts on a page; offsets from it align as addresses do.
    let start = start as usize;
    let (first, end) = (
        start.next_multiple_of(ALIGN),
        (start + bytes.len()) / ALIGN * ALIGN,
    );
    if end > first {
        // SAFETY: the map is shared and read-only (`Mmap::map`): a dropped
        // page reads back from the file unchanged, so borrows of it still
        // see the same bytes. Failure only leaves the pages resident.
        #[cfg(unix)]
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// A `[rows, 64]` matrix of `dtype`'s bytes, and a stored view of it.
    fn matrix(rows: usize, dtype: GgmlDType, seed: usize) -> Vec<u8> {
        let values: Vec<f32> = (0..rows * 64)
            .map(|i| (((i * 7 + seed * 13) % 97) as f32 - 48.0) / 50.0)
            .collect();
        let t = Tensor::from_vec(values, (rows, 64), &Device::Cpu).unwrap();
        match dtype {
            GgmlDType::F32 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => QTensor::quantize(&t, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec(),
        }
    }

    fn stored<'a>(name: &str, dtype: GgmlDType, rows: usize, bytes: &'a [u8]) -> StoredTensor<'a> {
        StoredTensor {
            name: name.into(),
            dtype: StoredDType::Ggml(dtype),
            shape: vec![rows, 64],
            bytes,
        }
    }

    #[test]
    fn stacked_matrices_give_each_part_the_bits_it_gives_alone() {
        let opts = LoadOptions::default();
        let x = Tensor::from_vec(
            (0..5 * 64)
                .map(|i| ((i % 23) as f32 - 11.0) / 7.0)
                .collect::<Vec<_>>(),
            (5, 64),
            &Device::Cpu,
        )
        .unwrap();
        for (types, stacks) in [
            ([GgmlDType::Q4_0; 3], true),
            ([GgmlDType::F32; 3], true),
            ([GgmlDType::Q4_0, GgmlDType::Q4_0, GgmlDType::Q8_0], false),
        ] {
            let bytes: Vec<Vec<u8>> = [24, 8, 16]
                .iter()
                .zip(types)
                .enumerate()
                .map(|(i, (&rows, t))| matrix(rows, t, i))
                .collect();
            let parts: Vec<StoredTensor> = [24, 8, 16]
                .iter()
                .zip(types)
                .zip(&bytes)
                .map(|((&rows, t), b)| stored("part", t, rows, b))
                .collect();
            let stacked = StoredTensor::to_stacked(&parts, &opts).unwrap();
            assert_eq!(matches!(stacked, Stacked::One(..)), stacks, "{types:?}");
            let outs = stacked.forward(&x).unwrap();
            for (part, out) in parts.iter().zip(&outs) {
                let alone = part.to_linear(&opts).unwrap().forward(&x).unwrap();
                assert_eq!(out.dims(), alone.dims());
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(out), bits(&alone), "{types:?}");
            }
        }
    }
}
