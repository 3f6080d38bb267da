//! Helpers shared by the end-to-end tests in `tests/tests/`: where the real
//! model and the built binaries are, and a one-call encrypted model pair.

use std::path::{Path, PathBuf};

use ee_client::model_tool::{encrypt_model, KeySource};
use ee_core::ClientBundle;

/// The real default model. CI fetches it first (`ee fetch-model`); a missing
/// model is a failure, not a skip, so the tests can never pass vacuously.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("EE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models").join(ee_client::fetch::DEFAULT_MODEL_FILE));
    assert!(path.exists(), "{} is missing: run `cargo run -p ee-client --bin ee -- fetch-model` first", path.display());
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

/// A binary of the workspace, built by `cargo test --workspace` next to the
/// test executables (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} is not built: run the tests with `cargo test --workspace`", path.display());
    path
}

/// The real model encrypted with a fresh key: server artifact and bundle.
pub struct EncryptedPair {
    pub dir: tempfile::TempDir,
    pub server_artifact: PathBuf,
    pub bundle: ClientBundle,
}

pub fn encrypt_real_model(key: &KeySource) -> EncryptedPair {
    let dir = tempfile::tempdir().expect("temp dir");
    let server_artifact = dir.path().join("server.gguf");
    let bundle_dir = dir.path().join("bundle");
    encrypt_model(&model_path(), &server_artifact, &bundle_dir, key, &mut |_, _| {}).expect("encrypt the real model");
    let bundle = ClientBundle::load(&bundle_dir).expect("load the bundle");
    EncryptedPair { dir, server_artifact, bundle }
}
