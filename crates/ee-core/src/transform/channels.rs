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

/// How an axis may move. A Hugging Face checkpoint's axes move value by
/// value ([`Granule::Value`]): its float sums run in another order, within
/// the tolerance the hidden tier states. A GGUF's move only where the
/// arithmetic stays the same: among the values of a quantized block that
/// share a scale (a run), whose integer dot product does not depend on
/// their order, while the runs keep their places and so the float sums
/// over them keep their order ([`Granule::Within`]). An axis that a float
/// matrix stores along its rows stays ([`Granule::Fixed`]). See
/// `../shared/docs/ee-design.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granule {
    /// Any permutation.
    Value,
    /// Values move only among the `n` of their run; runs stay in place.
    Within(usize),
    /// Nothing moves.
    Fixed,
}

impl Granule {
    /// The structure that suits both.
    pub fn and(self, other: Granule) -> Granule {
        use Granule::*;
        match (self, other) {
            (Fixed, _) | (_, Fixed) => Fixed,
            (Value, g) | (g, Value) => g,
            (Within(a), Within(b)) => Within(gcd(a, b)),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    match b {
        0 => a,
        _ => gcd(b, a % b),
    }
}

/// How one row of a tensor is stored: blocks of `values` values in
/// `bytes` bytes each (one value per block for plain floats), and how
/// values move inside a block, for formats where they can
/// ([`crate::gguf::blocks::move_within`]).
#[derive(Clone, Copy)]
pub struct RowLayout<'a> {
    pub values: usize,
    pub bytes: usize,
    /// `within(src, to, dst)` writes block `src` into `dst` with value `j`
    /// at `to[j]`.
    pub within: Option<&'a MoveWithin<'a>>,
}

/// Moves values inside one block: `(src, to, dst)`.
pub type MoveWithin<'a> = dyn Fn(&[u8], &[u32], &mut [u8]) -> Result<(), Error> + 'a;

impl RowLayout<'_> {
    /// Plain values of `bytes` bytes each.
    pub fn values(bytes: usize) -> Self {
        Self {
            values: 1,
            bytes,
            within: None,
        }
    }
}

/// The permutations of one key over one model, derived as tensors ask.
pub struct ChannelPermutations<'k> {
    key: &'k Key,
    vocab: Permutation,
    kv_heads: usize,
    granules: HashMap<Axis, Granule>,
    derived: HashMap<Axis, Permutation>,
}

/// The axis whose granule applies to `axis`: a layer's key/value heads and
/// query heads move together, so they share one.
pub fn granule_axis(axis: Axis) -> Axis {
    match axis {
        Axis::Heads { layer, .. } => Axis::Heads { layer, group: 0 },
        other => other,
    }
}

/// The permutation of `domain` on `n` channels in the structure `granule`
/// asks. Value by value it is the plain permutation of `domain`, so Hugging
/// Face keys are unchanged; within runs, each run has its own.
fn structured_permutation(
    key: &Key,
    domain: &str,
    n: usize,
    granule: Granule,
) -> Result<Permutation, Error> {
    let size = match granule {
        Granule::Value => return Ok(key.permutation_for(domain, n as u32)),
        Granule::Fixed => return Ok(Permutation::identity(n as u32)),
        Granule::Within(size) => size,
    };
    if size == 0 || !n.is_multiple_of(size) {
        return Err(Error::Permutation(format!(
            "{domain}: {n} channels do not split into runs of {size}"
        )));
    }
    let mut forward = Vec::with_capacity(n);
    for run in 0..n / size {
        let inner = key.permutation_for(&format!("{domain}/run-{run}-of-{size}"), size as u32);
        for j in 0..size as u32 {
            let moved = inner.encrypt(j).expect("a value below size");
            forward.push((run * size) as u32 + moved);
        }
    }
    Permutation::from_forward(forward)
}

impl<'k> ChannelPermutations<'k> {
    /// `vocab` is π; `kv_heads` the key/value heads per layer (the
    /// attention heads, without GQA).
    pub fn new(key: &'k Key, vocab: Permutation, kv_heads: usize) -> Self {
        Self {
            key,
            vocab,
            kv_heads,
            granules: HashMap::new(),
            derived: HashMap::new(),
        }
    }

    /// Restricts how axes move: `granules` is keyed by [`granule_axis`];
    /// an axis not in it moves value by value. Attention heads move only
    /// where their granule is [`Granule::Value`]: moving a whole head
    /// reorders the runs of the output projection.
    pub fn with_granules(mut self, granules: HashMap<Axis, Granule>) -> Self {
        self.granules = granules;
        self
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
        let granule = self
            .granules
            .get(&granule_axis(axis))
            .copied()
            .unwrap_or(Granule::Value);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(axis) {
            let perm = match axis {
                Axis::Residual => structured_permutation(key, RESIDUAL_DOMAIN, n, granule)?,
                Axis::Labels => structured_permutation(key, LABELS_DOMAIN, n, granule)?,
                Axis::HeadDense => structured_permutation(key, HEAD_DENSE_DOMAIN, n, granule)?,
                Axis::Ffn(l) => {
                    structured_permutation(key, &format!("ee/v1/hidden/ffn/{l}"), n, granule)?
                }
                Axis::Heads { layer, group } => {
                    let heads = kv_heads * group;
                    if heads == 0 || !n.is_multiple_of(heads) {
                        return Err(Error::Permutation(format!(
                            "{n} attention channels do not split into {heads} heads"
                        )));
                    }
                    let width = n / heads;
                    // Heads move whole, which reorders a quantized
                    // projection's blocks: on GGUF they stay.
                    if granule == Granule::Value {
                        let by_kv_head = key.permutation_for(
                            &format!("ee/v1/hidden/heads/{layer}"),
                            kv_heads as u32,
                        );
                        // Channel j of head h (of kv group h / group) moves
                        // to channel j of the same head of group η(h / group).
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
                    } else {
                        Permutation::identity(n as u32)
                    }
                }
                Axis::Fixed | Axis::Vocab => unreachable!("returned above"),
            };
            slot.insert(perm);
        }
        Ok(self.derived.get(&axis))
    }

    /// The bytes of tensor `name` (row-major `shape` in values, each row
    /// stored as `layout` says) with each of its `axes` moved:
    /// `out[p₀(i)][p₁(j)] = in[i][j]`. `axes` is `None` for a tensor the
    /// architecture does not have.
    ///
    /// Errors: such a tensor (copying it unmoved would leave the model
    /// broken, or leak it), a shape its axes do not fit, or a column
    /// permutation that would split a block (the axis's [`Granule`] was
    /// not declared with [`Self::with_granules`]).
    pub fn permute(
        &mut self,
        name: &str,
        axes: Option<Vec<Axis>>,
        shape: &[usize],
        layout: RowLayout<'_>,
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
        let n_cols = shape.get(1).copied().unwrap_or(1);
        let block = layout.values.max(1);
        let fits = shape.len() == axes.len() && axes.len() <= 2 && n_cols.is_multiple_of(block);
        if !fits || bytes.len() != shape[0] * (n_cols / block) * layout.bytes {
            return Err(misfit());
        }
        let rows = self.of(axes[0], shape[0])?.cloned();
        let cols = match axes.get(1) {
            Some(&a) => self.of(a, shape[1])?.cloned(),
            None => None,
        };
        let row_bytes = n_cols / block * layout.bytes;
        if row_bytes == 0 {
            return Ok(Vec::new()); // no values: nothing to move
        }
        // Where each block of a row goes, and where its values go inside it.
        let moves = match &cols {
            None => None,
            Some(p) => Some(block_moves(name, p, block, layout.within.is_some())?),
        };
        let mut out = vec![0u8; bytes.len()];
        for (r, src) in bytes.chunks_exact(row_bytes).enumerate() {
            let r2 = rows
                .as_ref()
                .map_or(Some(r as u32), |p| p.encrypt(r as u32));
            let r2 = r2.ok_or_else(misfit)? as usize;
            let dst = &mut out[r2 * row_bytes..(r2 + 1) * row_bytes];
            let Some(moves) = &moves else {
                dst.copy_from_slice(src);
                continue;
            };
            for (from, (to, inside)) in src.chunks_exact(layout.bytes).zip(moves) {
                let at = &mut dst[to * layout.bytes..(to + 1) * layout.bytes];
                match (inside, layout.within) {
                    (Some(inside), Some(within)) => within(from, inside, at)?,
                    _ => at.copy_from_slice(from),
                }
            }
        }
        Ok(out)
    }
}

/// A source block's destination block, and where its values go inside it
/// (`None`: in order).
type BlockMove = (usize, Option<Vec<u32>>);

/// Splits the column permutation `p` into blocks of `block` values: for
/// each source block, its destination block and, when the values do not
/// keep their order inside it, where each goes.
///
/// Errors: a block whose values land in more than one block, or move
/// inside it where `within` says they cannot.
fn block_moves(
    name: &str,
    p: &Permutation,
    block: usize,
    within: bool,
) -> Result<Vec<BlockMove>, Error> {
    let split = || {
        Error::Permutation(format!(
            "tensor {name}: its column permutation splits its blocks of {block} values"
        ))
    };
    (0..p.len() / block)
        .map(|b| {
            let to: Vec<u32> = (b * block..(b + 1) * block)
                .map(|c| p.encrypt(c as u32).ok_or_else(split))
                .collect::<Result<_, _>>()?;
            let dst = to[0] as usize / block;
            if to.iter().any(|&c| c as usize / block != dst) {
                return Err(split());
            }
            let inside: Vec<u32> = to.iter().map(|&c| c - (dst * block) as u32).collect();
            let kept = inside.iter().enumerate().all(|(j, &c)| c as usize == j);
            match (kept, within) {
                (true, _) => Ok((dst, None)),
                (false, true) => Ok((dst, Some(inside))),
                (false, false) => Err(split()),
            }
        })
        .collect()
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
            .permute("q", axes.clone(), &[4, 3], RowLayout::values(1), &values)
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
            .permute(
                "q",
                axes.clone(),
                &[4, 2],
                RowLayout::values(1),
                &values[..8],
            )
            .unwrap_err();
        assert!(err.to_string().contains("elsewhere"), "{err}");
        let err = perms
            .permute(
                "b",
                Some(vec![heads(1)]),
                &[5],
                RowLayout::values(1),
                &values[..4],
            )
            .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = perms
            .permute("x", None, &[1], RowLayout::values(1), &[0])
            .unwrap_err();
        assert!(err.to_string().contains("unencrypted"), "{err}");
        // A tensor with no values moves nothing, and does not panic.
        let mut fresh = ChannelPermutations::new(&key, Permutation::identity(1), 2);
        assert_eq!(
            fresh
                .permute("empty", axes, &[4, 0], RowLayout::values(1), &[])
                .unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn gguf_granules_move_values_only_inside_their_runs() {
        let key = Key::from_bytes([3; 32]);
        let d = "ee/v1/hidden/residual";
        let plain = structured_permutation(&key, d, 64, Granule::Value).unwrap();
        assert_eq!(plain, residual_permutation(&key, 64));
        let within = structured_permutation(&key, d, 64, Granule::Within(32)).unwrap();
        assert!(!within.is_identity());
        for c in 0..64 {
            assert_eq!(
                within.encrypt(c).unwrap() / 32,
                c / 32,
                "channel {c} left its run"
            );
        }
        assert!(structured_permutation(&key, d, 64, Granule::Fixed)
            .unwrap()
            .is_identity());
        assert!(structured_permutation(&key, d, 48, Granule::Within(32)).is_err());
        assert_eq!(
            Granule::Within(32).and(Granule::Within(16)),
            Granule::Within(16)
        );
        assert_eq!(Granule::Value.and(Granule::Within(32)), Granule::Within(32));
        assert_eq!(Granule::Within(32).and(Granule::Fixed), Granule::Fixed);

        // Rows of 2 blocks of 32 one-byte values: blocks stay, values move
        // inside them through `within`; heads stay.
        let granules = HashMap::from([
            (Axis::Residual, Granule::Within(32)),
            (granule_axis(heads(1)), Granule::Within(32)),
        ]);
        let mut perms =
            ChannelPermutations::new(&key, Permutation::identity(1), 2).with_granules(granules);
        assert!(perms.of(heads(1), 4).unwrap().unwrap().is_identity());
        let reverse = |src: &[u8], to: &[u32], dst: &mut [u8]| {
            for (j, &t) in to.iter().enumerate() {
                dst[t as usize] = src[j];
            }
            Ok(())
        };
        let layout = RowLayout {
            values: 32,
            bytes: 32,
            within: Some(&reverse),
        };
        let values: Vec<u8> = (0..128).collect();
        let out = perms
            .permute(
                "w",
                Some(vec![Axis::Fixed, Axis::Residual]),
                &[2, 64],
                layout,
                &values,
            )
            .unwrap();
        for c in 0..64u32 {
            let c2 = within.encrypt(c).unwrap() as usize;
            assert_eq!(out[64 + c2], values[64 + c as usize]);
        }
        // Without a way to move values inside a block, a split is an error.
        let err = perms
            .permute(
                "w",
                Some(vec![Axis::Fixed, Axis::Residual]),
                &[2, 64],
                RowLayout {
                    within: None,
                    ..layout
                },
                &values,
            )
            .unwrap_err();
        assert!(err.to_string().contains("splits its blocks"), "{err}");
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
                perms
                    .permute("t", Some(axes), &[4, 4], RowLayout::values(2), &values)
                    .unwrap(),
                values
            );
        }
    }
}
