//! The shell commands the README, `docs/` and `docker/README.md` give must
//! run as written: one build (`cargo build --release`, which makes `ee` and
//! `ee-server`), then the binaries by name. A `cargo run -p …` once rebuilt
//! 44 crates right after the quick start's build, since each package alone
//! has another feature set. Every `ee`/`ee-server` command's subcommand and
//! flags must be ones the binary's `--help` lists.

use std::path::Path;
use std::process::Command;

use ee_e2e::{binary, stdout_of, workspace_root};

/// The commands of every ```sh block in `path`, continuation lines and
/// multi-line quoted arguments joined, comments dropped.
fn commands(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for block in text.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap();
        let mut current = String::new();
        for line in block.lines() {
            let line = match line.find(" #") {
                Some(i) if !line[..i].contains('\'') => &line[..i],
                _ => line,
            };
            let line = line.trim();
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(part) => current.push_str(part),
                None => {
                    current.push_str(line);
                    // A quoted argument may span lines.
                    if current.matches('\'').count().is_multiple_of(2) {
                        out.push(std::mem::take(&mut current));
                    } else {
                        current.push(' ');
                    }
                }
            }
        }
    }
    out
}

/// The long flags `exe` (with `subcommand`, if any) lists in its `--help`;
/// asserts that it runs.
fn flags(exe: &str, subcommand: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(binary(exe));
    cmd.args(subcommand).arg("--help");
    let help = String::from_utf8(stdout_of(&mut cmd)).unwrap();
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn documented_commands_use_the_one_build_and_exist() {
    let root = workspace_root();
    let mut files = vec![root.join("README.md"), root.join("docker/README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        files.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for file in &files {
        for command in commands(file) {
            let words: Vec<&str> = command.split_whitespace().collect();
            let at = format!("{}: {command}", file.display());
            match words[0] {
                "cargo" => assert!(
                    ["cargo build --release", "cargo test --workspace"].contains(&command.trim())
                        || command.starts_with("cargo install --locked --path crates/"),
                    "{at}: build once with `cargo build --release`, then run the binaries"
                ),
                "ee" | "ee-server" => {
                    let sub = (words[0] == "ee").then(|| words[1]);
                    let known = flags(words[0], sub);
                    for flag in words.iter().filter(|w| w.starts_with("--")) {
                        let flag = flag.split('=').next().unwrap();
                        assert!(
                            known.iter().any(|k| k == flag),
                            "{at}: no {flag} in its --help"
                        );
                    }
                    checked += 1;
                }
                "curl" | "export" | "docker" => {}
                other => panic!("{at}: unexpected command {other}"),
            }
        }
    }
    assert!(checked >= 12, "only {checked} ee commands were found");
}
