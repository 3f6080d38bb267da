//! Moving values inside one quantized ggml block without decoding them. A
//! block's scales and mins do not depend on the order of the values they
//! scale, so codes can move among the values that share them (a *run*) and
//! the block still holds exactly the same values, in another order
//! (`../shared/docs/ee-design.md`, "GGUF quantized layouts").
//!
//! Layouts as ggml's `ggml-common.h` and `dequantize_row_*` define them:
//! - Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, one run of 32: after the f16 scale (and
//!   min), value `j < 16` is the low nibble of byte `j` of `qs` and value
//!   `j + 16` its high nibble; Q5's fifth bit of value `j` is bit `j` of the
//!   little-endian `qh` word before `qs`; Q8_0's codes are one byte each.
//! - Q4_K/Q5_K, runs of 32 (a sub-block's 6-bit scale and min): after
//!   `d`, `dmin` and 12 bytes of scales (and Q5_K's 32 bytes of `qh`), byte
//!   `32c + l` of `qs` holds value `64c + l` (low nibble) and `64c + 32 + l`
//!   (high); Q5_K's fifth bit of value `v` is bit `v / 32` of `qh[v % 32]`.
//! - Q6_K, runs of 16 (an 8-bit scale each): in half `h` of 128 values,
//!   value `32m + l` has its low four bits in `ql[64h + l + 32(m % 2)]`
//!   (the high nibble when `m ≥ 2`) and its top two in bits `2m..2m+2` of
//!   `qh[32h + l]`.

use crate::gguf::ggml_block_layout;
use crate::Error;

/// How a format stores its codes.
#[derive(Clone, Copy)]
enum Codes {
    /// A 32-value format: bytes before the codes, bits per code.
    Legacy {
        head: usize,
        bits: u32,
    },
    Q4K,
    Q5K,
    Q6K,
}

fn codes_of(ggml_type: u32) -> Option<Codes> {
    use Codes::*;
    Some(match ggml_type {
        2 => Legacy { head: 2, bits: 4 }, // Q4_0
        3 => Legacy { head: 4, bits: 4 }, // Q4_1
        6 => Legacy { head: 2, bits: 5 }, // Q5_0
        7 => Legacy { head: 4, bits: 5 }, // Q5_1
        8 => Legacy { head: 2, bits: 8 }, // Q8_0
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        _ => return None,
    })
}

impl Codes {
    /// Values per run: those that share a scale.
    fn run(self) -> usize {
        match self {
            Codes::Q6K => 16,
            _ => 32,
        }
    }

    /// The nibble (byte index, high?) of a 4-bit-low code in a K-quant
    /// `qs` starting at `at`.
    fn k_nibble(at: usize, v: usize) -> (usize, bool) {
        let w = v % 64;
        (at + 32 * (v / 64) + w % 32, w >= 32)
    }

    fn get(self, b: &[u8], v: usize) -> u8 {
        let nibble = |(i, high): (usize, bool)| if high { b[i] >> 4 } else { b[i] & 0x0f };
        match self {
            Codes::Legacy { head, bits: 8 } => b[head + v],
            Codes::Legacy { head, bits } => {
                let qs = if bits == 5 { head + 4 } else { head };
                let low = nibble((qs + v % 16, v >= 16));
                let high = match bits {
                    5 => {
                        (u32::from_le_bytes([b[head], b[head + 1], b[head + 2], b[head + 3]]) >> v)
                            & 1
                    }
                    _ => 0,
                };
                low | (high as u8) << 4
            }
            Codes::Q4K => nibble(Self::k_nibble(16, v)),
            Codes::Q5K => nibble(Self::k_nibble(48, v)) | ((b[16 + v % 32] >> (v / 32)) & 1) << 4,
            Codes::Q6K => {
                let (h, m, l) = (v / 128, v % 128 / 32, v % 32);
                let low = nibble((64 * h + l + 32 * (m % 2), m >= 2));
                low | ((b[128 + 32 * h + l] >> (2 * m)) & 3) << 4
            }
        }
    }

    fn set(self, b: &mut [u8], v: usize, code: u8) {
        let put_nibble = |b: &mut [u8], (i, high): (usize, bool), c: u8| {
            b[i] = match high {
                true => (b[i] & 0x0f) | (c & 0x0f) << 4,
                false => (b[i] & 0xf0) | (c & 0x0f),
            };
        };
        let put_bits = |b: &mut [u8], i: usize, shift: usize, width: u8, c: u8| {
            let mask = ((1u8 << width) - 1) << shift;
            b[i] = (b[i] & !mask) | ((c << shift) & mask);
        };
        match self {
            Codes::Legacy { head, bits: 8 } => b[head + v] = code,
            Codes::Legacy { head, bits } => {
                let qs = if bits == 5 { head + 4 } else { head };
                put_nibble(b, (qs + v % 16, v >= 16), code);
                if bits == 5 {
                    put_bits(b, head + v / 8, v % 8, 1, code >> 4);
                }
            }
            Codes::Q4K => put_nibble(b, Self::k_nibble(16, v), code),
            Codes::Q5K => {
                put_nibble(b, Self::k_nibble(48, v), code);
                put_bits(b, 16 + v % 32, v / 32, 1, code >> 4);
            }
            Codes::Q6K => {
                let (h, m, l) = (v / 128, v % 128 / 32, v % 32);
                put_nibble(b, (64 * h + l + 32 * (m % 2), m >= 2), code);
                put_bits(b, 128 + 32 * h + l, 2 * m, 2, code >> 4);
            }
        }
    }
}

/// The values of `ggml_type` that share their scales: they can move among
/// themselves ([`move_within`]). `None` for formats whose values cannot
/// move this way (floats, whose sums would change order; other quants).
pub fn run_values(ggml_type: u32) -> Option<usize> {
    codes_of(ggml_type).map(Codes::run)
}

/// Writes into `dst` the block `src` of `ggml_type` with its value `j`
/// moved to position `to[j]`; everything else (scales, mins) is copied.
///
/// Errors: a type whose values cannot move, sizes that are not one block,
/// or a `to` that is not a permutation keeping each value in its run.
pub fn move_within(ggml_type: u32, src: &[u8], to: &[u32], dst: &mut [u8]) -> Result<(), Error> {
    let codes = codes_of(ggml_type).ok_or_else(|| {
        Error::Gguf(format!(
            "ggml type {ggml_type}: values cannot move within its blocks"
        ))
    })?;
    let (values, bytes) = ggml_block_layout(ggml_type)
        .map(|(v, b)| (v as usize, b as usize))
        .expect("every type with codes has a layout");
    let run = codes.run();
    if src.len() != bytes || dst.len() != bytes || to.len() != values {
        return Err(Error::Gguf(format!(
            "ggml type {ggml_type}: a block is {bytes} bytes of {values} values"
        )));
    }
    let mut taken = vec![false; values];
    for (j, &t) in to.iter().enumerate() {
        let t = t as usize;
        if t >= values || t / run != j / run || std::mem::replace(&mut taken[t], true) {
            return Err(Error::Gguf(format!(
                "ggml type {ggml_type}: value {j} cannot move to {t} (runs of {run})"
            )));
        }
    }
    dst.copy_from_slice(src);
    for (j, &t) in to.iter().enumerate() {
        codes.set(dst, t as usize, codes.get(src, j));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (values per block, bytes per block, values per run).
    fn shape(ggml_type: u32) -> (usize, usize, usize) {
        let (values, bytes) = ggml_block_layout(ggml_type).unwrap();
        (
            values as usize,
            bytes as usize,
            run_values(ggml_type).unwrap(),
        )
    }

    const TYPES: [u32; 8] = [2, 3, 6, 7, 8, 12, 13, 14];

    /// A block of `ggml_type` with noise everywhere, then value `j` coded
    /// `code(j)`.
    fn block(ggml_type: u32, code: impl Fn(usize) -> u8) -> Vec<u8> {
        let codes = codes_of(ggml_type).unwrap();
        let (values, bytes, _) = shape(ggml_type);
        let mut b: Vec<u8> = (0..bytes)
            .map(|i| (i as u8).wrapping_mul(37) ^ 0x5a)
            .collect();
        for v in 0..values {
            codes.set(&mut b, v, code(v));
        }
        b
    }

    fn bits(ggml_type: u32) -> u32 {
        match ggml_type {
            2 | 3 | 12 => 4,
            6 | 7 | 13 => 5,
            14 => 6,
            _ => 8,
        }
    }

    /// The largest code of `ggml_type`.
    fn mask(ggml_type: u32) -> u8 {
        match bits(ggml_type) {
            8 => 0xff,
            b => (1u8 << b) - 1,
        }
    }

    #[test]
    fn codes_round_trip_and_fit_ggmls_block_sizes() {
        for t in TYPES {
            let codes = codes_of(t).unwrap();
            let (values, bytes, _) = shape(t);
            let mask = mask(t);
            // Every code's bits are its own and inside ggml's block size:
            // all codes at their largest set exactly values × bits bits.
            let mut full = vec![0u8; bytes];
            for v in 0..values {
                codes.set(&mut full, v, mask);
            }
            let set: u32 = full.iter().map(|b| b.count_ones()).sum();
            assert_eq!(set as usize, values * bits(t) as usize, "type {t}");
            let code = |j: usize| (j as u8).wrapping_mul(29).wrapping_add(3) & mask;
            let b = block(t, code);
            for v in 0..values {
                assert_eq!(codes.get(&b, v), code(v), "type {t}, value {v}");
            }
        }
    }

    #[test]
    fn every_code_moves_to_its_place_within_its_run_and_nothing_else_changes() {
        for t in TYPES {
            let codes = codes_of(t).unwrap();
            let (values, _, run) = shape(t);
            let mask = mask(t);
            let src = block(t, |j| (j as u8).wrapping_mul(29).wrapping_add(3) & mask);
            // Each run rotated by 5: every value changes place.
            let to: Vec<u32> = (0..values)
                .map(|j| (j / run * run + (j % run + 5) % run) as u32)
                .collect();
            let mut dst = vec![0u8; src.len()];
            move_within(t, &src, &to, &mut dst).unwrap();
            for (j, &t2) in to.iter().enumerate() {
                assert_eq!(codes.get(&dst, t2 as usize), codes.get(&src, j), "type {t}");
            }
            // Bytes that hold no codes (scales, mins) are untouched: moving
            // back restores the block exactly.
            let mut back = vec![0u32; values];
            for (j, &t2) in to.iter().enumerate() {
                back[t2 as usize] = j as u32;
            }
            let mut again = vec![0u8; src.len()];
            move_within(t, &dst, &back, &mut again).unwrap();
            assert_eq!(again, src, "type {t}");
            // Leaving a run is refused (a 32-value block is one run).
            if values > run {
                let mut out_of_run: Vec<u32> = (0..values as u32).collect();
                out_of_run.swap(0, run);
                let err = move_within(t, &src, &out_of_run, &mut dst).unwrap_err();
                assert!(err.to_string().contains("cannot move to"), "{err}");
            }
        }
    }

    #[test]
    fn other_types_and_sizes_are_refused() {
        let to: Vec<u32> = (0..32).collect();
        assert_eq!(run_values(0), None);
        assert_eq!(run_values(14), Some(16));
        let err = move_within(0, &[0u8; 4], &to[..1], &mut [0u8; 4]).unwrap_err();
        assert!(err.to_string().contains("cannot move"), "{err}");
        let err = move_within(8, &[0u8; 33], &to, &mut [0u8; 33]).unwrap_err();
        assert!(err.to_string().contains("34 bytes"), "{err}");
        let mut twice = to.clone();
        twice[1] = 0;
        let err = move_within(8, &[0u8; 34], &twice, &mut [0u8; 34]).unwrap_err();
        assert!(err.to_string().contains("cannot move to"), "{err}");
    }
}
