//! A set of token IDs as it crosses the wire: a bitset over the vocabulary,
//! little-endian bit order (bit `i % 8` of byte `i / 8` is token `i`),
//! in standard base64. The client sends one in `first_token_mask` to
//! constrain a generation's first token (structured output, see
//! `docs/protocol.md`); the IDs are encrypted like every other ID.

use base64::Engine as _;

use crate::perm::Permutation;

/// A set of token IDs below `vocab_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    bits: Vec<u8>,
    vocab_size: usize,
}

/// Why a wire mask was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("first_token_mask is not base64")]
    NotBase64,
    #[error(
        "first_token_mask has {got} bytes; a vocabulary of {vocab_size} needs {want} \
         (one bit per token)"
    )]
    WrongLength {
        got: usize,
        want: usize,
        vocab_size: usize,
    },
    #[error("first_token_mask sets bits past the vocabulary of {0}")]
    PastVocabulary(usize),
    #[error("first_token_mask allows no token")]
    Empty,
}

impl TokenMask {
    /// The empty set over `vocab_size` tokens.
    pub fn empty(vocab_size: usize) -> Self {
        Self {
            bits: vec![0; vocab_size.div_ceil(8)],
            vocab_size,
        }
    }

    /// Adds `id`; IDs past the vocabulary are ignored.
    pub fn insert(&mut self, id: u32) {
        let i = id as usize;
        if i < self.vocab_size {
            self.bits[i / 8] |= 1 << (i % 8);
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        let i = id as usize;
        i < self.vocab_size && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// How many tokens the set holds.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// The same set with every ID moved by `perm` (plaintext to encrypted).
    ///
    /// # Errors
    /// `perm` covers another vocabulary size.
    pub fn permuted(&self, perm: &Permutation) -> Result<Self, crate::Error> {
        if perm.len() != self.vocab_size {
            return Err(crate::Error::Permutation(format!(
                "a token mask over {} tokens cannot take a permutation of {}",
                self.vocab_size,
                perm.len()
            )));
        }
        let mut out = Self::empty(self.vocab_size);
        for id in 0..self.vocab_size as u32 {
            if self.contains(id) {
                out.insert(perm.encrypt(id).unwrap_or(id));
            }
        }
        Ok(out)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bits)
    }

    /// A wire mask over a vocabulary of `vocab_size`.
    ///
    /// # Errors
    /// Not base64, the wrong length, bits past the vocabulary, or no bit set.
    pub fn from_base64(text: &str, vocab_size: usize) -> Result<Self, MaskError> {
        let bits = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| MaskError::NotBase64)?;
        let want = vocab_size.div_ceil(8);
        if bits.len() != want {
            return Err(MaskError::WrongLength {
                got: bits.len(),
                want,
                vocab_size,
            });
        }
        let mask = Self { bits, vocab_size };
        let spare = want * 8 - vocab_size;
        if spare > 0 && mask.bits[want - 1] >> (8 - spare) != 0 {
            return Err(MaskError::PastVocabulary(vocab_size));
        }
        if mask.count() == 0 {
            return Err(MaskError::Empty);
        }
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_round_trips_and_moves_with_the_permutation() {
        let mut m = TokenMask::empty(13);
        for id in [0, 7, 12, 40] {
            m.insert(id);
        }
        assert_eq!(m.count(), 3);
        let back = TokenMask::from_base64(&m.to_base64(), 13).unwrap();
        assert_eq!(back, m);
        assert!(back.contains(12) && !back.contains(11) && !back.contains(40));
        let perm = Permutation::from_forward((0..13).rev().collect()).unwrap();
        let moved = m.permuted(&perm).unwrap();
        assert!(moved.contains(12) && moved.contains(5) && moved.contains(0));
        assert_eq!(moved.count(), 3);
    }

    #[test]
    fn malformed_masks_are_refused_by_name() {
        assert_eq!(TokenMask::from_base64("%%", 13), Err(MaskError::NotBase64));
        let short = base64::engine::general_purpose::STANDARD.encode([1u8]);
        assert!(matches!(
            TokenMask::from_base64(&short, 13),
            Err(MaskError::WrongLength {
                got: 1,
                want: 2,
                ..
            })
        ));
        let past = base64::engine::general_purpose::STANDARD.encode([0u8, 0b1000_0000]);
        assert_eq!(
            TokenMask::from_base64(&past, 13),
            Err(MaskError::PastVocabulary(13))
        );
        let none = base64::engine::general_purpose::STANDARD.encode([0u8, 0]);
        assert_eq!(TokenMask::from_base64(&none, 13), Err(MaskError::Empty));
    }
}
