//! The server artifact of a Hugging Face checkpoint: a directory with the
//! architecture's keys of `config.json` only, the shard index if there is
//! one, sentence-transformers' pooling files if there are any, and the
//! safetensors files with their tensors moved under the key: for a causal
//! LM the rows of `model.embed_tokens.weight` and `lm_head.weight`; for an
//! encoder every tensor ([`super::encoder`]). Each file's header is copied
//! verbatim (values move, sizes and offsets do not), and tensors stream one
//! by one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Map, Value};

use safetensors::tensor::TensorInfo;

use super::channels::{Axis, ChannelPermutations, RowLayout};
use super::encoder::encoder_axes;
use super::llama::llama_axes;
use super::{permute_rows, TransformReport};
use crate::safetensors::{
    config_vocab_size, directory_fingerprint, file_name, map_file, read_config, server_config,
    CheckpointFiles, MappedFile, CONFIG_FILE, INDEX_FILE, VOCAB_ROW_TENSORS,
};
use crate::{Error, Key, Permutation};

/// What becomes of one tensor: its new bytes, or `None` to copy it as is.
type MoveTensor<'a> = dyn FnMut(&str, &TensorInfo, &[u8]) -> Result<Option<Vec<u8>>, Error> + 'a;

fn io(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |e| Error::Io(format!("{what}: {e}"))
}

/// Writes the server artifact of the checkpoint in `input` under `perm`
/// into the directory `output`, which must not exist or be empty. It is
/// written into a fresh directory beside it and renamed into place, so a
/// failure leaves nothing. `progress(done, total)` follows the tensor bytes
/// written.
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
    // A checkpoint of another kind (a masked-LM BERT) has no such tensor:
    // every tensor would be copied as it is, and the "artifact" would be
    // the plaintext model.
    let embedding = VOCAB_ROW_TENSORS[0];
    let mut has_embedding = false;
    for shard in &files.shards {
        has_embedding |= MappedFile::open(shard)?.metadata.info(embedding).is_some();
    }
    if !has_embedding {
        return Err(Error::Permutation(format!(
            "{} has no tensor {embedding}: it is not a Llama/Mistral checkpoint (nor a \
             BERT-family encoder: {:?}), and encrypting it would change nothing",
            input.display(),
            super::encoder::ENCODER_ARCHITECTURES
        )));
    }
    let mut move_rows = |name: &str, info: &TensorInfo, bytes: &[u8]| {
        if !VOCAB_ROW_TENSORS.contains(&name) {
            return Ok(None);
        }
        let rows = info.shape.first().copied().unwrap_or(0) as u64;
        permute_rows(name, bytes, rows, perm).map(Some)
    };
    write_artifact(
        &files,
        &config,
        output,
        vocab_size,
        &mut move_rows,
        progress,
    )
}

/// Writes the server artifact of the BERT-family encoder checkpoint in
/// `input` under `key` into the directory `output`, as
/// [`write_hf_server_artifact`] does: every tensor moves
/// ([`super::encoder`]), and `config.json` keeps the number of classes of
/// a classifier but not their names (`id2label`).
///
/// Errors: those of [`write_hf_server_artifact`], a config without its
/// head count, or a tensor that is not part of the encoder.
pub fn write_encoder_server_artifact(
    input: &Path,
    output: &Path,
    key: &Key,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let files = CheckpointFiles::find(input)?;
    let config = read_config(&files.config)?;
    let heads = config_count(&config, &["num_attention_heads", "n_heads"], &files.config)?;
    let axes = |name: &str| encoder_axes(name);
    write_with_channels(&files, &config, output, key, heads, &axes, progress)
}

/// Writes the hidden-tier server artifact of the Llama/Mistral checkpoint
/// in `input` under `key` into the directory `output`: the vocabulary rows
/// move as in [`write_hf_server_artifact`], and so do the residual, FFN and
/// head channels of every tensor ([`super::llama`]).
///
/// Errors: those of [`write_hf_server_artifact`], a config without its
/// head counts, or a tensor that is not a Llama/Mistral one.
pub fn write_hf_hidden_artifact(
    input: &Path,
    output: &Path,
    key: &Key,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let files = CheckpointFiles::find(input)?;
    let config = read_config(&files.config)?;
    let heads = config_count(&config, &["num_attention_heads"], &files.config)?;
    let kv_heads = match config.get("num_key_value_heads") {
        Some(_) => config_count(&config, &["num_key_value_heads"], &files.config)?,
        None => heads,
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Io(format!(
            "{}: {heads} attention heads do not group over {kv_heads} key/value heads",
            files.config.display()
        )));
    }
    let q_group = heads / kv_heads;
    let axes = |name: &str| llama_axes(name, q_group);
    write_with_channels(&files, &config, output, key, kv_heads, &axes, progress)
}

/// A positive count from `config.json`, under the first of `keys` present.
fn config_count(config: &Map<String, Value>, keys: &[&str], path: &Path) -> Result<usize, Error> {
    keys.iter()
        .find_map(|k| config.get(*k).and_then(Value::as_u64))
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            Error::Io(format!(
                "{}: no positive integer {}",
                path.display(),
                keys.join(" or ")
            ))
        })
}

/// Writes the artifact with every tensor moved by the key's channel
/// permutations, along the axes `axes` gives each tensor.
fn write_with_channels(
    files: &CheckpointFiles,
    config: &Map<String, Value>,
    output: &Path,
    key: &Key,
    kv_heads: usize,
    axes: &dyn Fn(&str) -> Option<Vec<Axis>>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let vocab_size = config_vocab_size(config, &files.config)?;
    let mut perms = ChannelPermutations::new(key, key.vocab_permutation(vocab_size), kv_heads);
    let mut move_all = |name: &str, info: &TensorInfo, bytes: &[u8]| match axes(name) {
        // A tensor no key touches (position IDs, RoPE buffers): as it is.
        Some(a) if a.is_empty() => Ok(None),
        a => perms
            .permute(
                name,
                a,
                &info.shape,
                RowLayout::values(info.dtype.size()),
                bytes,
            )
            .map(Some),
    };
    write_artifact(files, config, output, vocab_size, &mut move_all, progress)
}

/// Writes the artifact of `files` into `output` (fresh or empty), moving
/// each tensor with `move_tensor`.
fn write_artifact(
    files: &CheckpointFiles,
    config: &Map<String, Value>,
    output: &Path,
    vocab_size: u32,
    move_tensor: &mut MoveTensor<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let usable = match fs::read_dir(output) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !output.exists(),
    };
    if !usable {
        return Err(Error::Io(format!(
            "{} exists and is not an empty directory; remove it or choose another output",
            output.display()
        )));
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".ee-artifact-")
        .tempdir_in(parent)
        .map_err(io("creating a directory in", parent))?;
    let permuted_tensors = write_files(files, config, tmp.path(), move_tensor, progress)?;
    if output.exists() {
        fs::remove_dir(output).map_err(io("replacing", output))?;
    }
    fs::rename(tmp.path(), output).map_err(io("renaming to", output))?;
    // The fingerprint is read back from what was written, as the server
    // will read it.
    let written = CheckpointFiles::find(output)?;
    let contents = written
        .named()
        .into_iter()
        .map(|(n, p)| Ok((n, map_file(p)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(TransformReport {
        sha256: directory_fingerprint(contents.iter().map(|(n, m)| (n.as_str(), &m[..]))),
        bytes: contents.iter().map(|(_, m)| m.len() as u64).sum(),
        vocab_size,
        permuted_tensors,
        notes: Vec::new(),
    })
}

/// Writes every file into `dir`; returns the names of the moved tensors.
fn write_files(
    files: &CheckpointFiles,
    config: &Map<String, Value>,
    dir: &Path,
    move_tensor: &mut MoveTensor<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<String>, Error> {
    let config_out =
        serde_json::to_vec_pretty(&server_config(config)).map_err(|e| Error::Io(e.to_string()))?;
    let config_path = dir.join(CONFIG_FILE);
    fs::write(&config_path, config_out).map_err(io("writing", &config_path))?;
    if let Some(index) = &files.index {
        // Only the weight map: an index has nothing else the server needs.
        let kept: Map<String, Value> = read_config(index)?
            .into_iter()
            .filter(|(k, _)| k == "weight_map")
            .collect();
        let bytes = serde_json::to_vec(&kept).map_err(|e| Error::Io(e.to_string()))?;
        let index_path = dir.join(INDEX_FILE);
        fs::write(&index_path, bytes).map_err(io("writing", &index_path))?;
    }
    for (name, path) in &files.pooling {
        let to = dir.join(name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        fs::copy(path, &to).map_err(io("copying to", &to))?;
    }
    let shards = files
        .shards
        .iter()
        .map(|p| MappedFile::open(p))
        .collect::<Result<Vec<_>, Error>>()?;
    let total: u64 = shards
        .iter()
        .map(|s| (s.map.len() - s.data_start) as u64)
        .sum();
    let (mut done, mut permuted) = (0u64, Vec::new());
    for shard in &shards {
        let out_path = dir.join(file_name(&shard.path));
        let mut out = BufWriter::with_capacity(
            1 << 20,
            File::create(&out_path).map_err(io("creating", &out_path))?,
        );
        let write_err = io("writing", &out_path);
        out.write_all(&shard.header_without_metadata()?)
            .map_err(&write_err)?;
        for (name, info, bytes) in shard.tensors() {
            match move_tensor(&name, info, bytes)? {
                Some(moved) => {
                    out.write_all(&moved).map_err(&write_err)?;
                    permuted.push(name);
                }
                None => out.write_all(bytes).map_err(&write_err)?,
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
