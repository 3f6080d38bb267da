//! The `ee` binary as a user runs it, on the real model.

use std::fs::File;
use std::io::BufReader;
use std::process::Command;

use ee_core::gguf::GgufHeader;
use ee_core::transform::sha256_file;
use ee_core::ClientBundle;
use ee_e2e::{binary, model_path};

#[test]
fn generate_answers_the_capital_question_like_llama_cpp() {
    let out = Command::new(binary("ee"))
        .args(["generate", "--model"])
        .arg(model_path())
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8(out.stdout).unwrap();
    assert_eq!(answer.trim(), "The capital of France is Paris.");
}

fn embedding_rows(path: &std::path::Path) -> Vec<Vec<u8>> {
    let mut r = BufReader::new(File::open(path).unwrap());
    let h = GgufHeader::read(&mut r).unwrap();
    let t = h.tensor("token_embd.weight").unwrap().clone();
    let data = h.read_tensor_bytes(&mut r, &t).unwrap();
    data.chunks_exact(t.row_bytes().unwrap() as usize)
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn encrypt_model_writes_a_blind_artifact_and_a_private_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = (dir.path().join("server.gguf"), dir.path().join("bundle"));
    let out = Command::new(binary("ee"))
        .args(["encrypt-model", "--model"])
        .arg(model_path())
        .arg("--server-out")
        .arg(&server)
        .arg("--client-out")
        .arg(&client)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut r = BufReader::new(File::open(&server).unwrap());
    let h = GgufHeader::read(&mut r).unwrap();
    let leaked: Vec<_> = h
        .metadata
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    assert!(
        leaked.is_empty(),
        "tokenizer keys in the server artifact: {leaked:?}"
    );
    assert!(h.tensor("output.weight").is_none(), "tied model stays tied");

    let plain_rows = embedding_rows(&model_path());
    let enc_rows = embedding_rows(&server);
    assert_ne!(plain_rows, enc_rows, "rows must move");
    let bundle = ClientBundle::load(&client).unwrap();
    let perm = bundle.key.vocab_permutation(bundle.manifest.vocab_size);
    for t in [0u32, 1, 2, 1780, 49151] {
        assert_eq!(
            plain_rows[t as usize],
            enc_rows[perm.encrypt(t).unwrap() as usize]
        );
    }
    let (mut a, mut b) = (plain_rows, enc_rows);
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "the artifact's rows are a permutation of the original's"
    );

    assert_eq!(
        bundle.manifest.server_artifact.sha256,
        sha256_file(&server).unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(client.join("key.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn identity_key_is_loud_and_bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("ee"))
        .args(["encrypt-model", "--identity-key", "--model"])
        .arg(model_path())
        .arg("--server-out")
        .arg(dir.path().join("s.gguf"))
        .arg("--client-out")
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING"));

    let not_a_model = dir.path().join("junk.gguf");
    std::fs::write(&not_a_model, b"definitely not gguf").unwrap();
    for args in [
        vec![
            "generate".into(),
            "--model".into(),
            not_a_model.display().to_string(),
            "hi".into(),
        ],
        vec![
            "encrypt-model".into(),
            "--model".into(),
            "/nonexistent.gguf".into(),
            "--server-out".into(),
            "x".into(),
            "--client-out".into(),
            "y".into(),
        ],
        vec![
            "generate".into(),
            "--model".into(),
            model_path().display().to_string(),
            "--temperature=-1".into(),
            "hi".into(),
        ],
    ] {
        let out = Command::new(binary("ee")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("Error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // Where there is no default model, the error says how to get one.
    for command in ["generate", "bench"] {
        let out = Command::new(binary("ee"))
            .arg(command)
            .args(if command == "generate" {
                &["hi"][..]
            } else {
                &[]
            })
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("ee fetch-model") && stderr.contains("--model"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn fetch_model_from_a_local_path_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(binary("ee"))
            .args(["fetch-model", "--from"])
            .arg(model_path())
            .arg("--dir")
            .arg(dir.path())
            .args(["--sha256", ee_client::fetch::DEFAULT_MODEL_SHA256])
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = run();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let placed = dir.path().join(ee_client::fetch::DEFAULT_MODEL_FILE);
    assert_eq!(
        sha256_file(&placed).unwrap(),
        ee_client::fetch::DEFAULT_MODEL_SHA256
    );
}

/// A Hugging Face checkpoint through the command line: placed by
/// `fetch-model --from DIR`, encrypted into an artifact directory that
/// carries no tokenizer, template or token IDs, and refused when the
/// artifact directory is already full.
#[test]
fn a_checkpoint_is_fetched_and_encrypted_into_a_blind_directory() {
    let source = ee_e2e::hf_fixture::real_hf_checkpoint(safetensors::tensor::Dtype::BF16);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("ee"))
        .args(["fetch-model", "--from"])
        .arg(&source)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let placed = dir.path().join(source.file_name().unwrap());
    assert!(placed.join("model.safetensors").exists() && placed.join("tokenizer.json").exists());
    assert!(
        !placed.join("README.md").exists(),
        "only the checkpoint's files are placed"
    );

    let (server, client) = (dir.path().join("server"), dir.path().join("bundle"));
    let encrypt = |force: bool| {
        let mut cmd = Command::new(binary("ee"));
        cmd.args(["encrypt-model", "--model"])
            .arg(&placed)
            .arg("--server-out")
            .arg(&server)
            .arg("--client-out")
            .arg(&client);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = encrypt(false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&server)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    let config = std::fs::read_to_string(server.join("config.json")).unwrap();
    for leaked in ["bos_token_id", "eos_token_id", "im_start", "chat_template"] {
        assert!(!config.contains(leaked), "{leaked} in the server config");
    }
    let weights = std::fs::read(server.join("model.safetensors")).unwrap();
    for needle in ["<|im_start|>", "im_end", "chat_template"] {
        assert!(
            !weights
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "{needle} in the server weights"
        );
    }
    let bundle = ClientBundle::load(&client).unwrap();
    assert_eq!(
        bundle.manifest.server_artifact.sha256,
        ee_engine::ModelFiles::open(&server).unwrap().sha256()
    );
    assert_eq!(bundle.manifest.special_tokens.stop_ids, vec![2]);
    assert!(bundle.manifest.chat_template.is_some());

    // A second run would replace the key under a deployed artifact.
    let again = encrypt(false);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exist") && err.contains("--force"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let forced = encrypt(true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let replaced = ClientBundle::load(&client).unwrap();
    assert_ne!(replaced.key, bundle.key);
    assert_eq!(
        replaced.manifest.server_artifact.sha256,
        ee_engine::ModelFiles::open(&server).unwrap().sha256()
    );
}
