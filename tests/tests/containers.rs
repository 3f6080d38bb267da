//! The client image's entrypoint, `docker/proxy-entrypoint.sh`, run here
//! without Docker (no engine runs on the CI machine). It configures the
//! proxy from the image's `EE_*` variables alone, and, started as root as
//! the image starts it, serves a bundle whose key file its unprivileged
//! user cannot read: the documented compose path once failed with
//! "Permission denied". As root, the user is `nobody`, standing in for the
//! image's uid 10001.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use ee_client::model_tool::KeySource;
use ee_e2e::{binary, encrypt_real_model, free_addr, stdout_of, workspace_root, ServerProcess};

#[test]
fn the_proxy_entrypoint_is_configured_by_its_variables_and_reads_a_private_bundle() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let key = pair.bundle.dir.join("key.json");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is private to its maker");
    let server = ServerProcess::start(&pair.server_artifact, &[]);

    let scratch = tempfile::tempdir().unwrap();
    // `nobody` must reach the private directory inside it.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = stdout_of(Command::new("id").arg("-u")) == b"0\n";
    let ee_dir = binary("ee").parent().unwrap().to_owned();
    let addr = free_addr();
    let mut cmd = Command::new("sh");
    cmd.arg(workspace_root().join("docker/proxy-entrypoint.sh"))
        .env(
            "PATH",
            format!("{}:{}", ee_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env("EE_BUNDLE", &pair.bundle.dir)
        .env("EE_SERVER_URL", server.url())
        .env("EE_PROXY_LISTEN", addr.to_string())
        .env("EE_RUN_AS", "nobody")
        .env("EE_PRIVATE_DIR", scratch.path().join("run"));
    let proxy = ServerProcess::spawn(cmd, addr);

    let answer = ee_e2e::answer_text(
        &proxy,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                            "temperature": 0, "max_tokens": 12}),
    );
    assert!(answer.contains("Paris"), "{answer}");
    if !root {
        // The privilege drop needs root; as another user the key is the
        // test's own, and only the variables are proven here.
        eprintln!("not root: the entrypoint's privilege drop is not exercised");
    }
    if root {
        // It dropped to the unprivileged user, and the copy it reads is
        // that user's alone.
        let owner = stdout_of(Command::new("ps").args([
            "-o",
            "user=",
            "-p",
            &proxy.child.id().to_string(),
        ]));
        assert_eq!(String::from_utf8_lossy(&owner).trim(), "nobody");
        let copy = scratch.path().join("run/bundle/key.json");
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
