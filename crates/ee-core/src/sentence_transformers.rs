//! sentence-transformers' files beside a Hugging Face checkpoint:
//! `modules.json`, which lists the modules an embedding passes through
//! (`Transformer`, then `Pooling`, then optionally `Normalize`), and the
//! `Pooling` module's `config.json`. The server needs them (they say how
//! token states become an embedding) and an artifact keeps them.

use std::path::{Path, PathBuf};

use crate::safetensors::CONFIG_FILE;
use crate::Error;

/// The module list, beside `config.json`.
pub const MODULES_FILE: &str = "modules.json";

/// The module types we run; any other (`Dense`, `LayerNorm`, ...) changes
/// the embedding in a way we would silently skip, so it is refused.
const KNOWN_MODULES: [&str; 3] = ["Transformer", "Pooling", "Normalize"];

/// `modules.json`'s entries: a module's directory and its type.
#[derive(serde::Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// What `modules.json` says of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Modules {
    /// The files the server needs, by path relative to the model directory:
    /// `modules.json` and the `Pooling` module's `config.json`.
    pub files: Vec<(String, PathBuf)>,
    /// The `Pooling` module's `config.json`, if one is listed.
    pub pooling_config: Option<PathBuf>,
    /// Whether a `Normalize` module is listed (L2 normalisation).
    pub normalize: bool,
}

/// Reads `dir/modules.json`; `None` when there is none.
///
/// Errors (naming the file): it does not parse, lists a module type other
/// than Transformer, Pooling and Normalize, or a pooling directory that is
/// not a plain name inside `dir` or lacks its `config.json`.
pub fn read_modules(dir: &Path) -> Result<Option<Modules>, Error> {
    let path = dir.join(MODULES_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let at = |e: String| Error::Io(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| at(e.to_string()))?;
    let listed: Vec<Module> = serde_json::from_slice(&bytes).map_err(|e| at(e.to_string()))?;
    let mut modules = Modules {
        files: vec![(MODULES_FILE.to_owned(), path.clone())],
        pooling_config: None,
        normalize: false,
    };
    for m in &listed {
        let kind = m.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Normalize" => modules.normalize = true,
            "Pooling" => {
                // One plain directory name: nothing may point outside the model.
                let plain = !m.path.is_empty()
                    && Path::new(&m.path)
                        .file_name()
                        .is_some_and(|n| n == m.path.as_str());
                let name = format!("{}/{CONFIG_FILE}", m.path);
                if !plain || !dir.join(&name).is_file() {
                    return Err(at(format!(
                        "the pooling module's {name:?} is missing from {}",
                        dir.display()
                    )));
                }
                modules.pooling_config = Some(dir.join(&name));
                modules.files.push((name.clone(), dir.join(name)));
            }
            _ => {
                return Err(at(format!(
                    "module {:?} is not supported (supported: {KNOWN_MODULES:?})",
                    m.kind
                )))
            }
        }
    }
    Ok(Some(modules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_read_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_modules(dir.path()).unwrap(), None);
        let write = |json: &str| std::fs::write(dir.path().join(MODULES_FILE), json).unwrap();
        write(
            r#"[{"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#,
        );
        let err = read_modules(dir.path()).unwrap_err().to_string();
        assert!(err.contains("1_Pooling/config.json"), "{err}");
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), "{}").unwrap();
        let m = read_modules(dir.path()).unwrap().unwrap();
        assert!(m.normalize);
        assert_eq!(
            m.pooling_config,
            Some(dir.path().join("1_Pooling/config.json"))
        );
        assert_eq!(m.files.len(), 2);
        for bad in [
            r#"[{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#,
            r#"[{"path": "../x", "type": "sentence_transformers.models.Pooling"}]"#,
        ] {
            write(bad);
            assert!(read_modules(dir.path()).is_err(), "{bad}");
        }
    }
}
