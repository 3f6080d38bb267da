//! Adversary 1 against hidden channels: the server operator, holding the
//! artifact and the public base model, recovers the residual-channel
//! permutation σ. σ moves the *columns* of every matrix that reads the
//! residual stream and the *rows* of every matrix that writes it, values
//! unchanged (other permutations may reorder values within them), so each
//! artifact slice along σ's axis holds the values of one base slice:
//! matching slices by their sorted values recovers σ, as
//! [`crate::weight_match`] recovers π from rows.
//!
//! - An encoder's position-embedding table (`[positions, hidden]`, no other
//!   axis moved): its columns. Knowing σ puts every embedding the server
//!   returns back in the user's coordinates.
//! - A Llama's first FFN down projection (`[hidden, ffn]`, columns moved by
//!   τ₀): its rows.

use std::collections::HashMap;
use std::path::Path;

use ee_engine::ModelFiles;

use crate::Error;

/// The position embeddings of a BERT-family encoder, by its possible names.
pub const POSITION_EMBEDDINGS: [&str; 3] = [
    "embeddings.position_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "distilbert.embeddings.position_embeddings.weight",
];

/// A Llama's first FFN down projection, whose rows σ moves.
pub const DOWN_PROJECTION: &str = "model.layers.0.mlp.down_proj.weight";

/// Which axis of the matrix σ moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Along {
    Rows,
    Columns,
}

/// The tensor of the model at `path` to match σ on, with the axis σ moves
/// in it: an encoder's position embeddings (columns), else a Llama's down
/// projection (rows).
///
/// # Errors
/// The model cannot be opened, or has neither.
pub fn residual_tensor(path: &Path) -> Result<(&'static str, Along), Error> {
    let files = ModelFiles::open(path)?;
    let weights = files.weights();
    if let Some(name) = POSITION_EMBEDDINGS.iter().find(|n| weights.contains(n)) {
        return Ok((name, Along::Columns));
    }
    match weights.contains(DOWN_PROJECTION) {
        true => Ok((DOWN_PROJECTION, Along::Rows)),
        false => Err(Error::Model(format!(
            "{}: no tensor σ is known to move ({POSITION_EMBEDDINGS:?}, {DOWN_PROJECTION})",
            path.display()
        ))),
    }
}

/// The slices of matrix `name` along `along`, each as the bit patterns of
/// its sorted values.
fn slices(path: &Path, name: &str, along: Along) -> Result<Vec<Vec<u32>>, Error> {
    let files = ModelFiles::open(path)?;
    let t = files.weights().tensor(name)?;
    let [rows, cols] = t.shape[..] else {
        return Err(Error::Model(format!(
            "{}: {name} is not a matrix",
            path.display()
        )));
    };
    let values = t.to_f32()?.flatten_all()?.to_vec1::<f32>()?;
    let slice = |i: usize| -> Vec<u32> {
        let mut v: Vec<f32> = match along {
            Along::Rows => values[i * cols..(i + 1) * cols].to_vec(),
            Along::Columns => (0..rows).map(|r| values[r * cols + i]).collect(),
        };
        v.sort_by(f32::total_cmp);
        v.iter().map(|x| x.to_bits()).collect()
    };
    let n = match along {
        Along::Rows => rows,
        Along::Columns => cols,
    };
    Ok((0..n).map(slice).collect())
}

/// The recovered σ: for each artifact channel, the base channel whose
/// slice of matrix `name` (along `along`) holds the same values, or `None`
/// when no base slice or several do.
///
/// # Errors
/// Either model lacks the matrix, or their shapes differ.
pub fn recover_channels(
    base: &Path,
    artifact: &Path,
    name: &str,
    along: Along,
) -> Result<Vec<Option<u32>>, Error> {
    let (b, a) = (slices(base, name, along)?, slices(artifact, name, along)?);
    if b.len() != a.len() {
        return Err(Error::Model(format!(
            "the base has {} channels and the artifact {}",
            b.len(),
            a.len()
        )));
    }
    let mut by_slice: HashMap<&[u32], Option<u32>> = HashMap::new();
    for (i, slice) in b.iter().enumerate() {
        by_slice
            .entry(slice.as_slice())
            .and_modify(|e| *e = None)
            .or_insert(Some(i as u32));
    }
    Ok(a.iter()
        .map(|slice| by_slice.get(slice.as_slice()).copied().flatten())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ee_core::transform::channels::residual_permutation;
    use ee_core::transform::write_encoder_server_artifact;
    use ee_core::Key;
    use ee_engine::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};

    #[test]
    fn the_residual_permutation_of_a_hidden_tier_llama_is_recovered_whole() {
        use ee_engine::testing::hf::{write_tiny_hf_model, TinyHfSpec};
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf_model(
            dir.path(),
            &TinyHfSpec::llama(safetensors::tensor::Dtype::F32),
        )
        .unwrap();
        let key = Key::from_bytes([5; 32]);
        let artifact = dir.path().join("server");
        ee_core::transform::write_hf_hidden_artifact(dir.path(), &artifact, &key, &mut |_, _| {})
            .unwrap();
        let (name, along) = residual_tensor(dir.path()).unwrap();
        assert_eq!((name, along), (DOWN_PROJECTION, Along::Rows));
        let got = recover_channels(dir.path(), &artifact, name, along).unwrap();
        let sigma = residual_permutation(&key, got.len() as u32);
        assert!(!sigma.is_identity());
        for (cipher, plain) in got.iter().enumerate() {
            assert_eq!(*plain, sigma.decrypt(cipher as u32));
        }
    }

    #[test]
    fn the_residual_permutation_of_a_public_encoder_is_recovered_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyEncoderSpec::classifier(TinyEncoderKind::Bert, 64);
        write_tiny_encoder(dir.path(), &spec, None).unwrap();
        let key = Key::from_bytes([3; 32]);
        let artifact = dir.path().join("server");
        write_encoder_server_artifact(dir.path(), &artifact, &key, &mut |_, _| {}).unwrap();
        let (name, along) = residual_tensor(dir.path()).unwrap();
        assert_eq!(along, Along::Columns);
        let got = recover_channels(dir.path(), &artifact, name, along).unwrap();
        let sigma = residual_permutation(&key, spec.hidden as u32);
        assert!(!sigma.is_identity());
        for (cipher, plain) in got.iter().enumerate() {
            assert_eq!(*plain, sigma.decrypt(cipher as u32));
        }
    }
}
