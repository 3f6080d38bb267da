//! Adversary 1 against hidden channels: the server operator, holding the
//! artifact and the public base model, recovers the residual-channel
//! permutation σ. A channel permutation moves the *columns* of every
//! matrix that reads the residual stream, values unchanged, so each
//! artifact column of such a matrix is a base column: matching columns by
//! their values recovers σ, as [`crate::weight_match`] recovers π from rows.
//!
//! For an encoder, the position-embedding table is such a matrix
//! (`[positions, hidden]`, not touched by π), and knowing σ puts every
//! embedding the server returns back in the user's coordinates.

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

/// A matrix's columns, each as the bit patterns of its values.
fn columns(path: &Path, names: &[&str]) -> Result<Vec<Vec<u32>>, Error> {
    let files = ModelFiles::open(path)?;
    let weights = files.weights();
    let name = names
        .iter()
        .find(|n| weights.contains(n))
        .ok_or_else(|| Error::Model(format!("{}: none of {names:?}", path.display())))?;
    let t = weights.tensor(name)?;
    let [rows, cols] = t.shape[..] else {
        return Err(Error::Model(format!(
            "{}: {name} is not a matrix",
            path.display()
        )));
    };
    let values = t.to_f32()?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..cols)
        .map(|c| (0..rows).map(|r| values[r * cols + c].to_bits()).collect())
        .collect())
}

/// The recovered σ: for each artifact channel, the base channel whose
/// column it equals, or `None` when no base column or several do.
///
/// # Errors
/// Either model lacks the matrix, or their shapes differ.
pub fn recover_channels(
    base: &Path,
    artifact: &Path,
    names: &[&str],
) -> Result<Vec<Option<u32>>, Error> {
    let (b, a) = (columns(base, names)?, columns(artifact, names)?);
    if b.len() != a.len() {
        return Err(Error::Model(format!(
            "the base has {} channels and the artifact {}",
            b.len(),
            a.len()
        )));
    }
    let mut by_column: HashMap<&[u32], Option<u32>> = HashMap::new();
    for (i, col) in b.iter().enumerate() {
        by_column
            .entry(col.as_slice())
            .and_modify(|e| *e = None)
            .or_insert(Some(i as u32));
    }
    Ok(a.iter()
        .map(|col| by_column.get(col.as_slice()).copied().flatten())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ee_core::transform::encoder::residual_permutation;
    use ee_core::transform::write_encoder_server_artifact;
    use ee_core::Key;
    use ee_engine::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};

    #[test]
    fn the_residual_permutation_of_a_public_encoder_is_recovered_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyEncoderSpec::classifier(TinyEncoderKind::Bert, 64);
        write_tiny_encoder(dir.path(), &spec, None).unwrap();
        let key = Key::from_bytes([3; 32]);
        let artifact = dir.path().join("server");
        write_encoder_server_artifact(dir.path(), &artifact, &key, &mut |_, _| {}).unwrap();
        let got = recover_channels(dir.path(), &artifact, &POSITION_EMBEDDINGS).unwrap();
        let sigma = residual_permutation(&key, spec.hidden as u32);
        assert!(!sigma.is_identity());
        for (cipher, plain) in got.iter().enumerate() {
            assert_eq!(*plain, sigma.decrypt(cipher as u32));
        }
    }
}
