//! The recovered mapping every attack writes: a JSON array indexed by
//! encrypted ID, each entry the recovered plaintext ID or `null`.

use std::path::Path;

use crate::Error;

/// `map[c]` is the plaintext ID the attack assigns to encrypted ID `c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMap(pub Vec<Option<u32>>);

impl RecoveredMap {
    /// Nothing recovered yet, for a vocabulary of `n`.
    pub fn empty(n: usize) -> Self {
        Self(vec![None; n])
    }

    /// How many encrypted IDs have a guess.
    pub fn guessed(&self) -> usize {
        self.0.iter().filter(|g| g.is_some()).count()
    }

    /// Writes the JSON array.
    ///
    /// # Errors
    /// The file cannot be written, named.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec(&self.0).map_err(|e| file(path, e))?;
        std::fs::write(path, json).map_err(|e| file(path, e))
    }

    /// Reads a JSON array as [`save`](Self::save) writes it.
    ///
    /// # Errors
    /// The file cannot be read or is not such an array, named.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| file(path, e))?;
        Ok(Self(
            serde_json::from_slice(&bytes).map_err(|e| file(path, e))?,
        ))
    }
}

fn file(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_a_json_array_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.json");
        let map = RecoveredMap(vec![Some(2), None, Some(0)]);
        map.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[2,null,0]");
        assert_eq!(RecoveredMap::load(&path).unwrap(), map);
        assert_eq!(map.guessed(), 2);
        std::fs::write(&path, "{}").unwrap();
        assert!(RecoveredMap::load(&path)
            .unwrap_err()
            .to_string()
            .contains("map.json"));
    }
}
