//! Hidden-channel permutations: what a key does to every axis of every
//! tensor when it hides a model's internal representation, not only its
//! vocabulary (`../shared/docs/ee-design.md`, "hidden-channel permutations").
//!
//! Each architecture says, per tensor name, what each axis is indexed by
//! (an [`Axis`]; `encoder.rs` for BERT-family encoders, `llama.rs` for
//! Llama/Mistral); [`ChannelPermutations`] derives one permutation per axis
//! kind from the key and moves the tensor's values, exactly (bytes are
//! copied, never decoded). The same axis kind is the same permutation in
//! every tensor, which is what keeps the permuted model's function.

use std::collections::HashMap;

use crate::{Error, Key, Permutation};

const RESIDUAL_DOMAIN: &str = "ee/v1/hidden/residual";
const HEAD_DENSE_DOMAIN: &str = "ee/v1/hidden/head-dense";
const LABELS_DOMAIN: &str = "ee/v1/hidden/labels";

/// σ: the residual-channel permutation of a model `hidden` wide. An
/// encoder's embeddings come back permuted by it.
pub fn residual_permutation(key: &Key, hidden: u32) -> Permutation {
    key.permutation_for(RESIDUAL_DOMAIN, hidden)
}

/// λ: the permutation of a classifier's `labels` classes. The server's
/// probabilities come back permuted by it.
pub fn label_permutation(key: &Key, labels: u32) -> Permutation {
    key.permutation_for(LABELS_DOMAIN, labels)
}

/// What one axis of a tensor is indexed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Not permuted (positions, token types).
    Fixed,
    /// Token IDs: π.
    Vocab,
    /// The residual stream: σ.
    Residual,
    /// Layer `l`'s feed-forward channels: τₗ.
    Ffn(usize),
    /// Layer `l`'s attention channels, moved by whole head: key/value head
    /// `g` goes where ηₗ sends it, and with it the `group` query heads that
    /// read it (GQA; `group` is 1 for keys, values and multi-head
    /// attention). Channels keep their place within a head, so RoPE pairs
    /// stay pairs.
    Heads { layer: usize, group: usize },
    /// A classification head's hidden channels (BERT's pooler,
    /// DistilBERT's `pre_classifier`): ρ.
    HeadDense,
    /// A classifier's classes: λ.
    Labels,
}

/// The permutations of one key over one model, derived as tensors ask.
pub struct ChannelPermutations<'k> {
    key: &'k Key,
    vocab: Permutation,
    kv_heads: usize,
    derived: HashMap<Axis, Permutation>,
}

impl<'k> ChannelPermutations<'k> {
    /// `vocab` is π; `kv_heads` the key/value heads per layer (the
    /// attention heads, without GQA).
    pub fn new(key: &'k Key, vocab: Permutation, kv_heads: usize) -> Self {
        Self {
            key,
            vocab,
            kv_heads,
            derived: HashMap::new(),
        }
    }

    /// The permutation of an axis `n` long. An axis is as long in every
    /// tensor that has it: a tensor that disagrees is an error, not a
    /// second, different permutation.
    pub fn of(&mut self, axis: Axis, n: usize) -> Result<Option<&Permutation>, Error> {
        let (key, kv_heads) = (self.key, self.kv_heads);
        match axis {
            Axis::Fixed => return Ok(None),
            Axis::Vocab if self.vocab.len() != n => {
                return Err(Error::Permutation(format!(
                    "{n} embedding rows, but the vocabulary has {}",
                    self.vocab.len()
                )))
            }
            Axis::Vocab => return Ok(Some(&self.vocab)),
            _ => {}
        }
        if let Some(known) = self.derived.get(&axis).filter(|p| p.len() != n) {
            return Err(Error::Permutation(format!(
                "{axis:?} is {n} long here but {} elsewhere",
                known.len()
            )));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(axis) {
            let perm = match axis {
                Axis::Residual => residual_permutation(key, n as u32),
                Axis::Labels => label_permutation(key, n as u32),
                Axis::HeadDense => key.permutation_for(HEAD_DENSE_DOMAIN, n as u32),
                Axis::Ffn(l) => key.permutation_for(&format!("ee/v1/hidden/ffn/{l}"), n as u32),
                Axis::Heads { layer, group } => {
                    let heads = kv_heads * group;
                    if heads == 0 || !n.is_multiple_of(heads) {
                        return Err(Error::Permutation(format!(
                            "{n} attention channels do not split into {heads} heads"
                        )));
                    }
                    let by_kv_head = key
                        .permutation_for(&format!("ee/v1/hidden/heads/{layer}"), kv_heads as u32);
                    let width = n / heads;
                    // Channel j of head h (of kv group h / group) moves to
                    // channel j of the same head of group η(h / group).
                    let forward = (0..n)
                        .map(|c| {
                            let head = c / width;
                            let g = by_kv_head
                                .encrypt((head / group) as u32)
                                .expect("a group below kv_heads")
                                as usize;
                            ((g * group + head % group) * width + c % width) as u32
                        })
                        .collect();
                    Permutation::from_forward(forward)?
                }
                Axis::Fixed | Axis::Vocab => unreachable!("returned above"),
            };
            slot.insert(perm);
        }
        Ok(self.derived.get(&axis))
    }

    /// The bytes of tensor `name` (row-major `shape`, `element` bytes per
    /// value) with each of its `axes` moved: `out[p₀(i)][p₁(j)] = in[i][j]`.
    /// `axes` is `None` for a tensor the architecture does not have.
    ///
    /// Errors: such a tensor (copying it unmoved would leave the model
    /// broken, or leak it), or a shape its axes do not fit.
    pub fn permute(
        &mut self,
        name: &str,
        axes: Option<Vec<Axis>>,
        shape: &[usize],
        element: usize,
        bytes: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let axes = axes.ok_or_else(|| {
            Error::Permutation(format!(
                "tensor {name} is not one this architecture has; refusing to copy it unencrypted"
            ))
        })?;
        if axes.is_empty() {
            return Ok(bytes.to_vec());
        }
        let misfit = || {
            Error::Permutation(format!(
                "tensor {name} has shape {shape:?}, not the {} axes of {axes:?}",
                axes.len()
            ))
        };
        let fits = shape.len() == axes.len() && axes.len() <= 2;
        if !fits || bytes.len() != shape.iter().product::<usize>() * element {
            return Err(misfit());
        }
        let rows = self.of(axes[0], shape[0])?.cloned();
        let cols = match axes.get(1) {
            Some(&a) => self.of(a, shape[1])?.cloned(),
            None => None,
        };
        let n_cols = shape.get(1).copied().unwrap_or(1);
        let row_bytes = n_cols * element;
        if row_bytes == 0 {
            return Ok(Vec::new()); // no values: nothing to move
        }
        let mut out = vec![0u8; bytes.len()];
        for (r, src) in bytes.chunks_exact(row_bytes).enumerate() {
            let r2 = rows
                .as_ref()
                .map_or(Some(r as u32), |p| p.encrypt(r as u32));
            let r2 = r2.ok_or_else(misfit)? as usize;
            let dst = &mut out[r2 * row_bytes..(r2 + 1) * row_bytes];
            match &cols {
                None => dst.copy_from_slice(src),
                Some(p) => {
                    for (c, value) in src.chunks_exact(element).enumerate() {
                        let c2 = p.encrypt(c as u32).ok_or_else(misfit)? as usize;
                        dst[c2 * element..(c2 + 1) * element].copy_from_slice(value);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(group: usize) -> Axis {
        Axis::Heads { layer: 0, group }
    }

    /// A key that swaps layer 0's two heads (half of keys do).
    fn key_swapping_heads() -> Key {
        (0u8..)
            .map(|b| Key::from_bytes([b; 32]))
            .find(|k| !k.permutation_for("ee/v1/hidden/heads/0", 2).is_identity())
            .unwrap()
    }

    #[test]
    fn values_move_whole_and_heads_move_in_blocks() {
        let key = key_swapping_heads();
        let mut perms = ChannelPermutations::new(&key, Permutation::identity(1), 2);
        // A [4, 3] projection of 2 heads × 2 channels over 3 residual
        // channels: value (i, j) lands at (η-block(i), σ(j)).
        let values: Vec<u8> = (0..12u8).collect();
        let axes = Some(vec![heads(1), Axis::Residual]);
        let out = perms
            .permute("q", axes.clone(), &[4, 3], 1, &values)
            .unwrap();
        let sigma = residual_permutation(&key, 3);
        let eta = perms.of(heads(1), 4).unwrap().unwrap().clone();
        assert!(!eta.is_identity());
        for i in 0..4u32 {
            // Channels keep their place within a head.
            assert_eq!(eta.encrypt(i).unwrap() % 2, i % 2);
            for j in 0..3u32 {
                let (i2, j2) = (eta.encrypt(i).unwrap(), sigma.encrypt(j).unwrap());
                assert_eq!(out[(i2 * 3 + j2) as usize], values[(i * 3 + j) as usize]);
            }
        }
        let err = perms
            .permute("q", axes.clone(), &[4, 2], 1, &values[..8])
            .unwrap_err();
        assert!(err.to_string().contains("elsewhere"), "{err}");
        let err = perms
            .permute("b", Some(vec![heads(1)]), &[5], 1, &values[..4])
            .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = perms.permute("x", None, &[1], 1, &[0]).unwrap_err();
        assert!(err.to_string().contains("unencrypted"), "{err}");
        // A tensor with no values moves nothing, and does not panic.
        let mut fresh = ChannelPermutations::new(&key, Permutation::identity(1), 2);
        assert_eq!(
            fresh.permute("empty", axes, &[4, 0], 1, &[]).unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn query_heads_follow_their_key_value_head() {
        let key = key_swapping_heads();
        // 2 kv heads, 3 query heads each, head_dim 2: q has 12 channels.
        let mut perms = ChannelPermutations::new(&key, Permutation::identity(1), 2);
        let kv = perms.of(heads(1), 4).unwrap().unwrap().clone();
        let q = perms.of(heads(3), 12).unwrap().unwrap().clone();
        for c in 0..12u32 {
            let (head, within) = (c / 2, c % 2);
            let moved = q.encrypt(c).unwrap();
            // The query head stays in its place in the group, and the group
            // goes where its kv head goes.
            assert_eq!(moved % 2, within);
            assert_eq!((moved / 2) % 3, head % 3);
            assert_eq!(moved / 6, kv.encrypt(head / 3 * 2).unwrap() / 2);
        }
    }

    #[test]
    fn the_identity_key_moves_nothing() {
        let key = Key::identity();
        let mut perms = ChannelPermutations::new(&key, Permutation::identity(4), 2);
        let values: Vec<u8> = (0..32).collect();
        for axes in [
            vec![Axis::Vocab, Axis::Residual],
            vec![heads(1), Axis::Residual],
        ] {
            assert_eq!(
                perms.permute("t", Some(axes), &[4, 4], 2, &values).unwrap(),
                values
            );
        }
    }
}
