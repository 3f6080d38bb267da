//! Permutations of token IDs (and, later, of hidden channels).

use crate::Error;

/// A bijection on `0..n`, stored with its inverse so both directions are O(1).
///
/// For the vocabulary: `encrypt(t) = π(t)` is what travels on the wire, and
/// `decrypt(c) = π⁻¹(c)` recovers the plaintext token.
#[derive(Clone, PartialEq, Eq)]
pub struct Permutation {
    forward: Vec<u32>,
    inverse: Vec<u32>,
}

impl std::fmt::Debug for Permutation {
    // Never print the mapping itself: it is key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permutation")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Permutation {
    pub fn identity(n: u32) -> Self {
        let forward: Vec<u32> = (0..n).collect();
        Self {
            inverse: forward.clone(),
            forward,
        }
    }

    /// Builds a permutation from its forward table, checking it is a bijection.
    pub fn from_forward(forward: Vec<u32>) -> Result<Self, Error> {
        let n = forward.len();
        let mut inverse = vec![u32::MAX; n];
        for (i, &f) in forward.iter().enumerate() {
            let slot = inverse
                .get_mut(f as usize)
                .ok_or_else(|| Error::Permutation(format!("image {f} out of range 0..{n}")))?;
            if *slot != u32::MAX {
                return Err(Error::Permutation(format!("image {f} appears twice")));
            }
            *slot = i as u32;
        }
        Ok(Self { forward, inverse })
    }

    pub fn len(&self) -> usize {
        self.forward.len()
    }

    pub fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }

    pub fn is_identity(&self) -> bool {
        self.forward.iter().enumerate().all(|(i, &f)| i as u32 == f)
    }

    /// π(t); `None` when `t` is outside the domain.
    pub fn encrypt(&self, t: u32) -> Option<u32> {
        self.forward.get(t as usize).copied()
    }

    /// π⁻¹(c); `None` when `c` is outside the domain.
    pub fn decrypt(&self, c: u32) -> Option<u32> {
        self.inverse.get(c as usize).copied()
    }

    /// Encrypts a whole sequence, failing on the first out-of-range ID.
    pub fn encrypt_all(&self, tokens: &[u32]) -> Result<Vec<u32>, Error> {
        tokens
            .iter()
            .map(|&t| self.encrypt(t).ok_or(Error::TokenOutOfRange(t, self.len())))
            .collect()
    }

    /// Decrypts a whole sequence, failing on the first out-of-range ID.
    pub fn decrypt_all(&self, tokens: &[u32]) -> Result<Vec<u32>, Error> {
        tokens
            .iter()
            .map(|&c| self.decrypt(c).ok_or(Error::TokenOutOfRange(c, self.len())))
            .collect()
    }

    /// Reorders `values` indexed by plaintext ID into ciphertext order:
    /// `out[π(t)] = values[t]`. This is how embedding rows move.
    pub fn scatter<T: Clone>(&self, values: &[T]) -> Result<Vec<T>, Error> {
        if values.len() != self.len() {
            return Err(Error::Permutation(format!(
                "{} values for a permutation of {}",
                values.len(),
                self.len()
            )));
        }
        Ok(self
            .inverse
            .iter()
            .map(|&t| values[t as usize].clone())
            .collect())
    }

    /// The inverse of [`scatter`](Self::scatter): `out[t] = values[π(t)]`.
    /// This is how a client un-permutes a logit vector.
    pub fn gather<T: Clone>(&self, values: &[T]) -> Result<Vec<T>, Error> {
        if values.len() != self.len() {
            return Err(Error::Permutation(format!(
                "{} values for a permutation of {}",
                values.len(),
                self.len()
            )));
        }
        Ok(self
            .forward
            .iter()
            .map(|&c| values[c as usize].clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_forward_rejects_non_bijections() {
        assert!(Permutation::from_forward(vec![0, 0]).is_err());
        assert!(Permutation::from_forward(vec![0, 2]).is_err());
        assert!(Permutation::from_forward(vec![1, 0]).is_ok());
    }

    #[test]
    fn scatter_and_gather_are_inverse() {
        let p = Permutation::from_forward(vec![2, 0, 3, 1]).unwrap();
        let v = vec!['a', 'b', 'c', 'd'];
        let s = p.scatter(&v).unwrap();
        // token 0 ('a') now sits at row π(0) = 2
        assert_eq!(s, vec!['b', 'd', 'a', 'c']);
        assert_eq!(p.gather(&s).unwrap(), v);
        assert_eq!(
            p.decrypt_all(&p.encrypt_all(&[3, 1, 0]).unwrap()).unwrap(),
            vec![3, 1, 0]
        );
        assert!(p.encrypt_all(&[4]).is_err());
        assert!(!p.is_identity());
        assert!(Permutation::identity(4).is_identity());
    }

    #[test]
    fn debug_does_not_leak_the_mapping() {
        let p = Permutation::from_forward(vec![2, 0, 3, 1]).unwrap();
        assert!(!format!("{p:?}").contains('3'));
    }
}
