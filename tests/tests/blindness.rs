//! Blindness of the server crate: it must not be able to tokenize.

use std::process::Command;

#[test]
fn the_server_does_not_depend_on_a_tokenizer_or_template_engine() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "ee-server",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(ee_e2e::workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.lines().any(|l| l.starts_with("ee-engine ")),
        "unexpected cargo tree output: {tree}"
    );
    for forbidden in ["tokenizers ", "minijinja ", "ee-client "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "ee-server depends on {forbidden}"
        );
    }
}
