//! ggml's 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as one
//! family: every block is `w = d·(q − k) + m` with unsigned codes `q` (see
//! [`LegacyFormat`]), dotted with 8-bit activation blocks ([`ActBlock`]).
//!
//! Layouts follow ggml (`ggml-common.h`): in a 4- or 5-bit block value `j`
//! is the low nibble of byte `j` and value `j + 16` its high nibble; a 5-bit
//! block's fifth bits are one little-endian `u32`, bit `j` for value `j`.

pub(crate) const BLOCK: usize = 32;

/// One activation block quantized to 8 bits: `x ≈ d * q`, with `s = d * Σq`
/// rounded as candle's Q8_1 rounds it, and `sum = Σq` exactly.
#[derive(Clone, Copy)]
pub(crate) struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub q: [i8; BLOCK],
}

/// Quantizes activation rows block by block.
pub(crate) fn quantize_activations(x: &[f32]) -> Vec<ActBlock> {
    super::map_blocks(x, BLOCK, quantize_block)
}

/// 8-bit activation quantization exactly as candle does it (ggml's Q8_1;
/// Q8_0 is the same without the sum), scales rounded through f16, so our
/// logits match the reference implementation.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32]) -> ActBlock {
    // Eight independent maxima (max is exact in any order) so it vectorizes.
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = super::round_to_i8(v * inv);
        sum += i32::from(*qi);
    }
    let d = f16(d);
    ActBlock {
        d,
        s: f16(f16(sum as f32) * d),
        sum,
        q,
    }
}

fn f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

fn read_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// One row's block, unpacked: `w = d·(q − OFFSET) + m`, `d` and `m` as
/// the file's f16 bits.
#[derive(Clone, Copy)]
pub(crate) struct RowBlock {
    pub d: u16,
    pub m: u16,
    pub q: [u8; BLOCK],
}

/// A 32-value ggml block format.
pub(crate) trait LegacyFormat: Send + Sync + 'static {
    /// The format's name, as ggml spells it.
    const NAME: &'static str;
    /// Size of a block on disk.
    const BYTES: usize;
    /// `k` in `w = d·(q − k) + m`.
    const OFFSET: i32;
    /// Whether blocks carry a min `m` (else it is 0).
    const AFFINE: bool;
    /// Whether codes fit in 4 bits (kept packed two to a byte).
    const NIBBLES: bool;
    /// Reads one on-disk block (`BYTES` long).
    fn unpack(bytes: &[u8]) -> RowBlock;
}

/// Block `bytes[at..at + 16]`'s 4-bit codes: value `j` is byte `j`'s low
/// nibble, value `j + 16` its high nibble.
fn nibbles(b: &[u8], at: usize) -> [u8; BLOCK] {
    std::array::from_fn(|j| {
        if j < 16 {
            b[at + j] & 0x0F
        } else {
            b[at + j - 16] >> 4
        }
    })
}

/// Adds the fifth bits (a little-endian `u32` at `at`) to 4-bit codes.
fn with_fifth_bits(mut q: [u8; BLOCK], b: &[u8], at: usize) -> [u8; BLOCK] {
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    for (j, q) in q.iter_mut().enumerate() {
        *q |= (((qh >> j) & 1) << 4) as u8;
    }
    q
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;

impl LegacyFormat for Q4_0 {
    const NAME: &'static str = "Q4_0";
    const BYTES: usize = 18;
    const OFFSET: i32 = 8;
    const AFFINE: bool = false;
    const NIBBLES: bool = true;
    fn unpack(b: &[u8]) -> RowBlock {
        RowBlock {
            d: read_u16(b),
            m: 0,
            q: nibbles(b, 2),
        }
    }
}

impl LegacyFormat for Q4_1 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    const OFFSET: i32 = 0;
    const AFFINE: bool = true;
    const NIBBLES: bool = true;
    fn unpack(b: &[u8]) -> RowBlock {
        RowBlock {
            d: read_u16(b),
            m: read_u16(&b[2..]),
            q: nibbles(b, 4),
        }
    }
}

impl LegacyFormat for Q5_0 {
    const NAME: &'static str = "Q5_0";
    const BYTES: usize = 22;
    const OFFSET: i32 = 16;
    const AFFINE: bool = false;
    const NIBBLES: bool = false;
    fn unpack(b: &[u8]) -> RowBlock {
        RowBlock {
            d: read_u16(b),
            m: 0,
            q: with_fifth_bits(nibbles(b, 6), b, 2),
        }
    }
}

impl LegacyFormat for Q5_1 {
    const NAME: &'static str = "Q5_1";
    const BYTES: usize = 24;
    const OFFSET: i32 = 0;
    const AFFINE: bool = true;
    const NIBBLES: bool = false;
    fn unpack(b: &[u8]) -> RowBlock {
        RowBlock {
            d: read_u16(b),
            m: read_u16(&b[2..]),
            q: with_fifth_bits(nibbles(b, 8), b, 4),
        }
    }
}

impl LegacyFormat for Q8_0 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    /// Signed codes, stored as `q + 128`.
    const OFFSET: i32 = 128;
    const AFFINE: bool = false;
    const NIBBLES: bool = false;
    fn unpack(b: &[u8]) -> RowBlock {
        RowBlock {
            d: read_u16(b),
            m: 0,
            q: std::array::from_fn(|j| b[2 + j] ^ 0x80),
        }
    }
}
