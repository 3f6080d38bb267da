//! The server artifact of a Hugging Face checkpoint: a directory with the
//! architecture's keys of `config.json` only, the shard index if there is
//! one, and the safetensors files with the rows of
//! `model.embed_tokens.weight` and `lm_head.weight` permuted. Each file's
//! header is copied verbatim (rows move, sizes and offsets do not), and
//! tensors stream one by one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde_json::{Map, Value};

use super::{permute_rows, TransformReport};
use crate::safetensors::{
    directory_fingerprint, server_config, CheckpointFiles, CONFIG_FILE, INDEX_FILE,
    VOCAB_ROW_TENSORS,
};
use crate::{Error, Permutation};

fn io(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |e| Error::Io(format!("{what}: {e}"))
}

fn map(path: &Path) -> Result<Mmap, Error> {
    let file = File::open(path).map_err(io("opening", path))?;
    // SAFETY: read-only; the transform's input is not expected to change
    // while it runs (as llama.cpp's and candle's loaders assume).
    unsafe { Mmap::map(&file) }.map_err(io("mapping", path))
}

/// `vocab_size` of a checkpoint's `config.json`: the rows the key covers.
pub fn config_vocab_size(config: &Map<String, Value>, path: &Path) -> Result<u32, Error> {
    config
        .get("vocab_size")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Io(format!("{}: no valid vocab_size", path.display())))
}

/// Reads a checkpoint's `config.json` as a JSON object.
pub fn read_config(path: &Path) -> Result<Map<String, Value>, Error> {
    let bytes = fs::read(path).map_err(io("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

/// Writes the server artifact of the checkpoint in `input` under `perm`
/// into the directory `output`, which must not exist or be empty; it is
/// written beside it first and renamed into place, so a failure leaves
/// nothing. `progress(done, total)` follows the tensor bytes written.
pub fn write_hf_server_artifact(
    input: &Path,
    output: &Path,
    perm: &Permutation,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let files = CheckpointFiles::find(input)?;
    let config = read_config(&files.config)?;
    let vocab_size = config_vocab_size(&config, &files.config)?;
    if perm.len() != vocab_size as usize {
        return Err(Error::Permutation(format!(
            "key covers {} tokens, model has {vocab_size}",
            perm.len()
        )));
    }
    if fs::read_dir(output).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Io(format!(
            "{} exists and is not empty; remove it or choose another output",
            output.display()
        )));
    }
    let name = output
        .file_name()
        .ok_or_else(|| Error::Io(format!("{} is not a directory name", output.display())))?;
    let tmp = output.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let written = write_files(&files, &config, &tmp, perm, progress);
    let permuted_tensors = match written {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if output.exists() {
        fs::remove_dir(output).map_err(io("replacing", output))?;
    }
    fs::rename(&tmp, output).map_err(io("renaming to", output))?;
    let out_files = CheckpointFiles::find(output)?;
    let maps = out_files
        .all()
        .into_iter()
        .map(|p| Ok((file_name(p), map(p)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(TransformReport {
        sha256: directory_fingerprint(maps.iter().map(|(n, m)| (n.as_str(), &m[..]))),
        bytes: maps.iter().map(|(_, m)| m.len() as u64).sum(),
        vocab_size,
        permuted_tensors,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Writes every file into `dir`; returns the names of the permuted tensors.
fn write_files(
    files: &CheckpointFiles,
    config: &Map<String, Value>,
    dir: &Path,
    perm: &Permutation,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<String>, Error> {
    let config_out =
        serde_json::to_vec_pretty(&server_config(config)).map_err(|e| Error::Io(e.to_string()))?;
    fs::write(dir.join(CONFIG_FILE), config_out).map_err(io("writing", &dir.join(CONFIG_FILE)))?;
    if let Some(index) = &files.index {
        // Only the weight map: an index has nothing else the server needs.
        let listed = read_config(index)?;
        let kept: Map<String, Value> = listed
            .into_iter()
            .filter(|(k, _)| k == "weight_map")
            .collect();
        let bytes = serde_json::to_vec(&kept).map_err(|e| Error::Io(e.to_string()))?;
        fs::write(dir.join(INDEX_FILE), bytes).map_err(io("writing", &dir.join(INDEX_FILE)))?;
    }
    let maps = files
        .shards
        .iter()
        .map(|p| map(p).map(|m| (p.clone(), m)))
        .collect::<Result<Vec<(PathBuf, Mmap)>, Error>>()?;
    let total: u64 = maps.iter().map(|(_, m)| m.len() as u64).sum();
    let (mut done, mut permuted) = (0u64, Vec::new());
    for (path, input) in &maps {
        let (header_len, metadata) = SafeTensors::read_metadata(input).map_err(|e| {
            Error::Io(format!(
                "{}: not a valid safetensors file: {e:?}",
                path.display()
            ))
        })?;
        let data_start = 8 + header_len;
        let out_path = dir.join(file_name(path));
        let mut out = BufWriter::with_capacity(
            1 << 20,
            File::create(&out_path).map_err(io("creating", &out_path))?,
        );
        let write_err = io("writing", &out_path);
        out.write_all(&input[..data_start]).map_err(&write_err)?;
        let mut tensors: Vec<(String, _)> = metadata.tensors().into_iter().collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets.0);
        for (name, info) in tensors {
            let (start, end) = info.data_offsets;
            let bytes = &input[data_start + start..data_start + end];
            if VOCAB_ROW_TENSORS.contains(&name.as_str()) {
                let rows = info.shape.first().copied().unwrap_or(0) as u64;
                out.write_all(&permute_rows(&name, bytes, rows, perm)?)
                    .map_err(&write_err)?;
                permuted.push(name);
            } else {
                out.write_all(bytes).map_err(&write_err)?;
            }
            done += bytes.len() as u64;
            progress(done, total);
        }
        out.flush().map_err(&write_err)?;
        out.get_ref().sync_all().map_err(&write_err)?;
    }
    permuted.sort();
    Ok(permuted)
}
