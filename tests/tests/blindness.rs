//! The dependency graph that blindness rests on: the server cannot
//! tokenize, and the key holder's library does not reach into the server.

use std::process::Command;

/// The normal dependencies of `package`, one `name version` per line.
fn dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
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
    let tree: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        tree.iter().any(|l| l.starts_with("ee-core ")),
        "unexpected cargo tree output: {tree:?}"
    );
    tree
}

fn assert_lacks(package: &str, tree: &[String], forbidden: &[&str]) {
    for f in forbidden {
        assert!(
            !tree.iter().any(|l| l.starts_with(&format!("{f} "))),
            "{package} depends on {f}"
        );
    }
}

#[test]
fn the_server_does_not_depend_on_a_tokenizer_or_template_engine() {
    let tree = dependencies("ee-server");
    assert!(tree.iter().any(|l| l.starts_with("ee-engine ")));
    assert!(tree.iter().any(|l| l.starts_with("ee-api ")));
    assert_lacks(
        "ee-server",
        &tree,
        &["tokenizers", "minijinja", "ee-client"],
    );
}

#[test]
fn the_client_library_shares_the_api_crate_not_the_server() {
    let tree = dependencies("ee-client");
    assert!(tree.iter().any(|l| l.starts_with("ee-api ")));
    assert_lacks("ee-client", &tree, &["ee-server"]);
}
