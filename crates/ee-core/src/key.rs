//! The secret key and everything derived from it.
//!
//! A key is 256 bits from the OS CSPRNG. Each permutation is derived from it
//! deterministically: SHA-256 of a domain label and the key seeds a ChaCha20
//! stream, which drives a Fisher–Yates shuffle. Separate labels give
//! independent permutations from one key.

use std::fs;
use std::io::Write;
use std::path::Path;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rng::uniform_below;
use crate::{Error, Permutation};

const KEY_FORMAT: &str = "ee-key/1";
const VOCAB_DOMAIN: &str = "ee/v1/vocab";

/// The user's secret. `Debug` never prints the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    /// The identity key encrypts nothing. It exists for plaintext baselines
    /// and tests, and is marked as such in its file.
    identity: bool,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    /// Hex of the 32 key bytes.
    key: String,
    #[serde(default)]
    identity: bool,
}

impl Key {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        Ok(Self {
            bytes: crate::rng::os_random_bytes()?,
            identity: false,
        })
    }

    /// A key from known bytes (tests, reproducible fixtures).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            bytes,
            identity: false,
        }
    }

    /// The insecure identity key: every permutation it derives is the identity.
    pub fn identity() -> Self {
        Self {
            bytes: [0; 32],
            identity: true,
        }
    }

    pub fn is_identity(&self) -> bool {
        self.identity
    }

    /// A short public fingerprint of the key (not reversible), for logs and
    /// for matching a bundle to its key without printing the key.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"ee/v1/fingerprint")
            .chain_update(self.bytes)
            .finalize();
        hex::encode(&digest[..8])
    }

    /// The vocabulary permutation π for a vocabulary of `n` tokens.
    pub fn vocab_permutation(&self, n: u32) -> Permutation {
        if self.identity {
            return Permutation::identity(n);
        }
        self.derive_permutation(VOCAB_DOMAIN, n)
    }

    /// The permutation of `n` items the key derives for `domain`, a label
    /// naming what it permutes (`ee/v1/hidden/residual`): the identity for the
    /// identity key.
    pub fn permutation_for(&self, domain: &str, n: u32) -> Permutation {
        if self.identity {
            return Permutation::identity(n);
        }
        self.derive_permutation(domain, n)
    }

    fn derive_permutation(&self, domain: &str, n: u32) -> Permutation {
        let seed: [u8; 32] = Sha256::new()
            .chain_update(domain.as_bytes())
            .chain_update(n.to_le_bytes())
            .chain_update(self.bytes)
            .finalize()
            .into();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut forward: Vec<u32> = (0..n).collect();
        // Fisher–Yates with unbiased bounded draws; our own rather than
        // rand's `shuffle`, so the mapping can never change with a crate
        // upgrade.
        for i in (1..forward.len()).rev() {
            let j = uniform_below(&mut rng, i as u64 + 1) as usize;
            forward.swap(i, j);
        }
        Permutation::from_forward(forward).expect("a shuffle of 0..n is a bijection")
    }

    /// Writes the key atomically (temp file, fsync, rename) with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let file = KeyFile {
            format: KEY_FORMAT.into(),
            key: hex::encode(self.bytes),
            identity: self.identity,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Key(e.to_string()))?;
        write_private_atomically(path, &json)
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = fs::read(path)
            .map_err(|e| Error::Io(format!("reading key {}: {e}", path.display())))?;
        let file: KeyFile = serde_json::from_slice(&text)
            .map_err(|e| Error::Key(format!("{}: not a key file: {e}", path.display())))?;
        if file.format != KEY_FORMAT {
            return Err(Error::Key(format!(
                "{}: unknown key format {:?}",
                path.display(),
                file.format
            )));
        }
        let raw = hex::decode(file.key.trim())
            .map_err(|_| Error::Key(format!("{}: key is not hex", path.display())))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| Error::Key(format!("{}: key is not 32 bytes", path.display())))?;
        Ok(Self {
            bytes,
            identity: file.identity,
        })
    }
}

/// Writes `data` to `path` so that a reader sees either the old file or the
/// whole new one, and nobody but the owner can read it.
pub fn write_private_atomically(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let io = |e: std::io::Error| Error::Io(format!("writing {}: {e}", path.display()));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    #[cfg(unix)]
    {
        // `mode` only applies to newly created files; force it on a stale one.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_deterministic() {
        let k = Key::from_bytes([7; 32]);
        assert_eq!(k.vocab_permutation(1000), k.vocab_permutation(1000));
        assert!(!k.vocab_permutation(1000).is_identity());
    }

    #[test]
    fn different_keys_give_different_permutations() {
        let a = Key::from_bytes([1; 32]).vocab_permutation(49152);
        let b = Key::from_bytes([2; 32]).vocab_permutation(49152);
        assert_ne!(a, b);
        let fixed = (0..49152).filter(|&t| a.encrypt(t) == b.encrypt(t)).count();
        assert!(fixed < 10, "{fixed} tokens map alike under two keys");
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key::generate().unwrap(), Key::generate().unwrap());
    }

    #[test]
    fn identity_key_is_identity() {
        assert!(Key::identity().vocab_permutation(50).is_identity());
    }

    #[test]
    fn save_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        let k = Key::generate().unwrap();
        k.save(&path).unwrap();
        assert_eq!(Key::load(&path).unwrap(), k);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Overwrite keeps the mode and leaves no temp file behind.
        Key::identity().save(&path).unwrap();
        assert!(Key::load(&path).unwrap().is_identity());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn malformed_key_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        for bad in [
            "",
            "{}",
            r#"{"format":"ee-key/1","key":"zz"}"#,
            r#"{"format":"ee-key/1","key":"abcd"}"#,
        ] {
            fs::write(&path, bad).unwrap();
            assert!(Key::load(&path).is_err(), "{bad:?} loaded");
        }
    }

    #[test]
    fn debug_does_not_leak_key_bytes() {
        let k = Key::from_bytes([0xab; 32]);
        assert!(!format!("{k:?}").contains("ab"));
    }
}
