//! Matrices of the 32-value formats, repacked in groups of eight weight
//! rows so that one 512-bit register holds eight adjacent codes of each of
//! the eight rows (llama.cpp repacks Q4_0 this way for its x86 GEMM).
//!
//! A byte dot product of such a register with eight activation codes
//! broadcast to every row gives all eight rows' partial sums at once, and
//! the block's float scales apply to the eight rows in one vector
//! operation: a few instructions per row and block, where a row at a time
//! spends one horizontal sum and a scalar scale on each.
//!
//! Every output is defined as one chain per weight row and activation row,
//! block by block: `acc = fma(d·d_x, Σ(q − k)·x, acc)`, then, for formats
//! with a min, `acc = fma(m, s_x, acc)`, the integer sum exact. The
//! portable and SIMD builds compute exactly that, so they agree bit for bit
//! whatever the batch.

use std::marker::PhantomData;

use half::f16;

use super::legacy::{quantize_activations, ActBlock, LegacyFormat, RowBlock, BLOCK};
use super::{Isa, Kernel, ACTIVATION_TILE};
use crate::linear::by_weight_rows;
use crate::Error;

/// Weight rows per group.
pub(crate) const GROUP: usize = 8;

/// A `[rows, cols]` matrix of format `F`, in groups of [`GROUP`] rows (the
/// last one padded with zero rows).
pub(crate) struct Interleaved<F> {
    rows: usize,
    cols: usize,
    /// Per group and block (`g * blocks_per_row + b`): the rows' `d`, as
    /// f16 bits.
    d: Vec<[u16; GROUP]>,
    /// The same for `m`, for formats with a min; empty otherwise.
    m: Vec<[u16; GROUP]>,
    /// Per group and block, `CODE_BYTES` of codes in 64-byte chunks: chunk
    /// `t` holds values `8t..8t + 8` of rows 0..8, eight bytes per row (one
    /// 512-bit register, or two 256-bit ones of four rows). 4-bit formats
    /// pack chunks `t` and `t + 2` into one, as low and high nibbles.
    codes: Vec<u8>,
    format: PhantomData<F>,
}

impl<F: LegacyFormat> Interleaved<F> {
    pub(crate) const CODE_BYTES: usize = if F::NIBBLES { 128 } else { 256 };

    /// Repacks `data`, the file's `[rows, cols]` blocks.
    pub(crate) fn new(data: &[u8], rows: usize, cols: usize) -> Result<Self, Error> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(Error::Unsupported(format!(
                "{} rows of {cols} values",
                F::NAME
            )));
        }
        let nb = cols / BLOCK;
        let expected = rows * nb * F::BYTES;
        if data.len() != expected {
            return Err(Error::Model(format!(
                "{} tensor has {} bytes, expected {expected}",
                F::NAME,
                data.len()
            )));
        }
        let groups = rows.div_ceil(GROUP);
        let mut d = Vec::with_capacity(groups * nb);
        let mut m = Vec::with_capacity(if F::AFFINE { groups * nb } else { 0 });
        let mut codes = vec![0u8; groups * nb * Self::CODE_BYTES];
        let padding = RowBlock {
            d: 0,
            m: 0,
            q: [0; BLOCK],
        };
        for g in 0..groups {
            for b in 0..nb {
                let blocks: [RowBlock; GROUP] = std::array::from_fn(|r| {
                    let row = g * GROUP + r;
                    if row < rows {
                        F::unpack(&data[(row * nb + b) * F::BYTES..][..F::BYTES])
                    } else {
                        padding
                    }
                });
                d.push(blocks.each_ref().map(|x| x.d));
                if F::AFFINE {
                    m.push(blocks.each_ref().map(|x| x.m));
                }
                let out = &mut codes[(g * nb + b) * Self::CODE_BYTES..][..Self::CODE_BYTES];
                for (r, block) in blocks.iter().enumerate() {
                    for (j, &q) in block.q.iter().enumerate() {
                        let (at, shift) = code_position::<F>(r, j);
                        out[at] |= q << shift;
                    }
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            d,
            m,
            codes,
            format: PhantomData,
        })
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Group `g`'s `d`, `m` (all zero without a min) and codes, by block.
    pub(crate) fn group(&self, g: usize) -> (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]) {
        let nb = self.blocks_per_row();
        let m = if F::AFFINE {
            &self.m[g * nb..][..nb]
        } else {
            &[]
        };
        (
            &self.d[g * nb..][..nb],
            m,
            &self.codes[g * nb * Self::CODE_BYTES..][..nb * Self::CODE_BYTES],
        )
    }

    /// Group `g`'s eight outputs for each of `N` activation rows.
    fn group_dots<const N: usize>(
        &self,
        g: usize,
        a: [&[ActBlock]; N],
        isa: Isa,
    ) -> [[f32; GROUP]; N] {
        let nb = self.blocks_per_row();
        let a = a.map(|a| &a[..nb]);
        let group = self.group(g);
        // SAFETY: `isa` names instructions the CPU reports (see `Isa::detect`).
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { super::x86::group_dots_vnni::<F, N>(group, a) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { super::x86::group_dots_avx2::<F, N>(group, a) },
            Isa::Portable => group_dots_portable::<F, N>(group, a),
        }
    }
}

/// Where row `r`'s value `j` lives in a block's codes: byte and bit shift.
fn code_position<F: LegacyFormat>(r: usize, j: usize) -> (usize, u32) {
    let (chunk, at) = (j / 8, r * 8 + j % 8);
    if F::NIBBLES {
        (chunk % 2 * 64 + at, if chunk < 2 { 0 } else { 4 })
    } else {
        (chunk * 64 + at, 0)
    }
}

/// The definition the SIMD builds reproduce.
fn group_dots_portable<F: LegacyFormat, const N: usize>(
    (d, m, codes): (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
) -> [[f32; GROUP]; N] {
    let code_bytes = Interleaved::<F>::CODE_BYTES;
    let mut acc = [[0f32; GROUP]; N];
    for (b, d) in d.iter().enumerate() {
        let codes = &codes[b * code_bytes..][..code_bytes];
        for r in 0..GROUP {
            let dw = f16::from_bits(d[r]).to_f32();
            for (acc, a) in acc.iter_mut().zip(&a) {
                let x = &a[b];
                let isum: i32 = (0..BLOCK)
                    .map(|j| {
                        let (at, shift) = code_position::<F>(r, j);
                        let q = (codes[at] >> shift) & if F::NIBBLES { 0x0F } else { 0xFF };
                        (i32::from(q) - F::OFFSET) * i32::from(x.q[j])
                    })
                    .sum();
                acc[r] = (dw * x.d).mul_add(isum as f32, acc[r]);
                if F::AFFINE {
                    acc[r] = f16::from_bits(m[b][r]).to_f32().mul_add(x.s, acc[r]);
                }
            }
        }
    }
    acc
}

impl<F: LegacyFormat> Kernel for Interleaved<F> {
    fn format(&self) -> &'static str {
        F::NAME
    }

    /// `x` `[m, cols]` times this matrix's transpose: `[m, rows]`, a group
    /// of weight rows against up to eight activation rows at a time.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.blocks_per_row();
        let acts = quantize_activations(x);
        let isa = Isa::detect();
        let act_row = |i: usize| &acts[i * nb..][..nb];
        by_weight_rows(self.rows, m, GROUP, |rows, outputs| {
            // `rows.start` is a group's first.
            let (start, end_row) = (rows.start, rows.end);
            let mut put = |g, i, outs: &[_]| outputs.put_group::<GROUP>((g, i), outs);
            // A tile of activation rows stays in cache while this task's
            // groups pass over it.
            for tile in (0..m).step_by(ACTIVATION_TILE) {
                let end = (tile + ACTIVATION_TILE).min(m);
                for g in start / GROUP..end_row.div_ceil(GROUP) {
                    let mut i = tile;
                    while i + 8 <= end {
                        let a: [_; 8] = std::array::from_fn(|k| act_row(i + k));
                        put(g, i, &self.group_dots(g, a, isa));
                        i += 8;
                    }
                    if i + 4 <= end {
                        let a: [_; 4] = std::array::from_fn(|k| act_row(i + k));
                        put(g, i, &self.group_dots(g, a, isa));
                        i += 4;
                    }
                    for i in i..end {
                        put(g, i, &self.group_dots(g, [act_row(i)], isa));
                    }
                }
            }
        })
    }

    #[cfg(test)]
    fn dots_for_test(&self, x: &[f32], r: usize, isa: Isa) -> Vec<f32> {
        let nb = self.blocks_per_row();
        let acts = quantize_activations(x);
        let row = |i: usize| &acts[i * nb..][..nb];
        let (g, k) = (r / GROUP, r % GROUP);
        match acts.len() / nb {
            1 => vec![self.group_dots(g, [row(0)], isa)[0][k]],
            4 => self
                .group_dots::<4>(g, std::array::from_fn(row), isa)
                .map(|o| o[k])
                .to_vec(),
            8 => self
                .group_dots::<8>(g, std::array::from_fn(row), isa)
                .map(|o| o[k])
                .to_vec(),
            n => panic!("{n} rows"),
        }
    }
}
