//! Moving values inside one quantized block of ggml's 32-value formats
//! without decoding them: a block's scale (and min) do not depend on the
//! order of its values, so its codes can move among themselves and the
//! block still holds exactly the same values, in another order
//! (`../shared/docs/ee-design.md`, "GGUF quantized layouts").
//!
//! Layouts as ggml's `ggml-common.h` defines them: after the f16 scale
//! (and, for Q4_1/Q5_1, the f16 min), value `j < 16` is the low nibble of
//! byte `j` of `qs` and value `j + 16` its high nibble; Q5_0/Q5_1 keep the
//! fifth bit of value `j` in bit `j` of the little-endian `qh` word before
//! `qs`; Q8_0's 32 codes are one byte each. K-quant super-blocks pack
//! sub-block scales across bytes and are not handled: their values move
//! only with whole super-blocks.

use crate::Error;

/// Values per block of every format here.
pub const BLOCK_VALUES: usize = 32;

/// How a format stores its 32 codes: bytes before them (scale, min) and
/// bits per code.
fn code_layout(ggml_type: u32) -> Option<(usize, u32)> {
    Some(match ggml_type {
        2 => (2, 4), // Q4_0
        3 => (4, 4), // Q4_1
        6 => (2, 5), // Q5_0
        7 => (4, 5), // Q5_1
        8 => (2, 8), // Q8_0
        _ => return None,
    })
}

/// Whether values of `ggml_type` can move within a block ([`move_within`]).
pub fn moves_within(ggml_type: u32) -> bool {
    code_layout(ggml_type).is_some()
}

fn codes(block: &[u8], head: usize, bits: u32) -> [u8; BLOCK_VALUES] {
    let mut out = [0u8; BLOCK_VALUES];
    if bits == 8 {
        out.copy_from_slice(&block[head..head + BLOCK_VALUES]);
        return out;
    }
    let (high, qs) = match bits {
        5 => {
            let qh = &block[head..head + 4];
            (u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]), head + 4)
        }
        _ => (0, head),
    };
    for (j, code) in out.iter_mut().enumerate() {
        let byte = block[qs + j % 16];
        let nibble = if j < 16 { byte & 0x0f } else { byte >> 4 };
        *code = nibble | (((high >> j) & 1) as u8) << 4;
    }
    out
}

fn put_codes(block: &mut [u8], head: usize, bits: u32, codes: &[u8; BLOCK_VALUES]) {
    if bits == 8 {
        block[head..head + BLOCK_VALUES].copy_from_slice(codes);
        return;
    }
    let qs = if bits == 5 { head + 4 } else { head };
    let mut high = 0u32;
    for j in 0..16 {
        block[qs + j] = (codes[j] & 0x0f) | (codes[j + 16] & 0x0f) << 4;
    }
    for (j, &c) in codes.iter().enumerate() {
        high |= u32::from((c >> 4) & 1) << j;
    }
    if bits == 5 {
        block[head..head + 4].copy_from_slice(&high.to_le_bytes());
    }
}

/// Writes into `dst` the block `src` of `ggml_type` with its value `j`
/// moved to position `to[j]` (`to` is a permutation of 0..32); scale and
/// min are copied.
///
/// Errors: a type whose values cannot move this way, or sizes that are not
/// one block and 32 positions.
pub fn move_within(ggml_type: u32, src: &[u8], to: &[u32], dst: &mut [u8]) -> Result<(), Error> {
    let (head, bits) = code_layout(ggml_type).ok_or_else(|| {
        Error::Gguf(format!(
            "ggml type {ggml_type}: values cannot move within its blocks"
        ))
    })?;
    // Q5's `qh` word holds the fifth bits: 32 × bits / 8 bytes either way.
    let bytes = head + BLOCK_VALUES * bits as usize / 8;
    if src.len() != bytes || dst.len() != bytes || to.len() != BLOCK_VALUES {
        return Err(Error::Gguf(format!(
            "ggml type {ggml_type}: a block is {bytes} bytes of {BLOCK_VALUES} values"
        )));
    }
    let from = codes(src, head, bits);
    let mut moved = [0u8; BLOCK_VALUES];
    for (j, &t) in to.iter().enumerate() {
        *moved.get_mut(t as usize).ok_or_else(|| {
            Error::Gguf(format!("position {t} is outside a block of {BLOCK_VALUES}"))
        })? = from[j];
    }
    dst[..head].copy_from_slice(&src[..head]);
    put_codes(dst, head, bits, &moved);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::ggml_block_layout;

    /// A block of `ggml_type` whose value `j` has code `code(j)`.
    fn block(ggml_type: u32, code: impl Fn(usize) -> u8) -> Vec<u8> {
        let (head, bits) = code_layout(ggml_type).unwrap();
        let bytes = ggml_block_layout(ggml_type).unwrap().1 as usize;
        let mut b: Vec<u8> = (0..bytes as u8).map(|i| i.wrapping_mul(37)).collect();
        let mask = if bits == 8 { 0xff } else { (1u8 << bits) - 1 };
        let codes: [u8; 32] = std::array::from_fn(|j| code(j) & mask);
        put_codes(&mut b, head, bits, &codes);
        b
    }

    #[test]
    fn every_code_moves_to_its_place_and_the_scales_stay() {
        // A shift by 5 and a reversal: every value changes place.
        let to: Vec<u32> = (0..32).map(|j| (j + 5) % 32).collect();
        let reversed: Vec<u32> = (0..32).rev().collect();
        for t in [2, 3, 6, 7, 8] {
            let (head, bits) = code_layout(t).unwrap();
            assert_eq!(
                ggml_block_layout(t).unwrap(),
                (32, block(t, |_| 0).len() as u64)
            );
            let code = |j: usize| (j as u8).wrapping_mul(29).wrapping_add(3);
            let src = block(t, code);
            for to in [&to, &reversed] {
                let mut dst = vec![0u8; src.len()];
                move_within(t, &src, to, &mut dst).unwrap();
                assert_eq!(src[..head], dst[..head], "type {t}: scales");
                let (a, b) = (codes(&src, head, bits), codes(&dst, head, bits));
                for j in 0..32 {
                    assert_eq!(b[to[j] as usize], a[j], "type {t}, value {j}");
                }
                // The identity is a byte copy.
                let id: Vec<u32> = (0..32).collect();
                move_within(t, &src, &id, &mut dst).unwrap();
                assert_eq!(src, dst, "type {t}");
            }
        }
    }

    #[test]
    fn other_types_and_sizes_are_refused() {
        let to: Vec<u32> = (0..32).collect();
        let mut dst = vec![0u8; 144];
        assert!(!moves_within(12));
        let err = move_within(12, &[0u8; 144], &to, &mut dst).unwrap_err();
        assert!(err.to_string().contains("cannot move"), "{err}");
        let err = move_within(8, &[0u8; 33], &to, &mut dst[..33]).unwrap_err();
        assert!(err.to_string().contains("34 bytes"), "{err}");
        let mut bad = to.clone();
        bad[0] = 40;
        let err = move_within(8, &[0u8; 34], &bad, &mut [0u8; 34]).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }
}
