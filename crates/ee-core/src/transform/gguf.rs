//! The server artifact of a GGUF model: rows of `token_embd.weight` (and
//! `output.weight` when the model has its own output head) move as whole
//! quantized rows, and at the hidden tier the residual and FFN channels
//! also move, among the quantized values that share a scale; every
//! `tokenizer.*` key is dropped.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::channels::{granule_axis, Axis, ChannelPermutations, Granule, MoveWithin, RowLayout};
use super::llama::gguf_llama_axes;
use super::{permute_rows, TransformReport};
use crate::gguf::blocks::{move_within, run_values};
use crate::gguf::{
    ggml_block_layout, ggml_type_name, GgufHeader, TensorInfo, Value, VOCAB_ROW_TENSORS,
};
use crate::tokenizer::TOKENIZER_KEY_PREFIX;
use crate::{Error, Key, Permutation};

/// The number of token rows in the embedding: the vocabulary the key covers.
pub fn embedding_vocab_size(header: &GgufHeader) -> Result<u32, Error> {
    let embd = header
        .tensor(VOCAB_ROW_TENSORS[0])
        .ok_or_else(|| Error::Gguf("the model has no token_embd.weight".into()))?;
    match embd.dims.as_slice() {
        [_, rows] => u32::try_from(*rows).map_err(|_| Error::Gguf("vocabulary too large".into())),
        dims => Err(Error::Gguf(format!(
            "token_embd.weight has shape {dims:?}, expected 2 dimensions"
        ))),
    }
}

/// The server artifact's header: the input's, less every tokenizer key, with
/// the vocabulary size stated explicitly (it is an architecture fact the
/// server needs once the token list is gone).
fn server_header(input: &GgufHeader, vocab_size: u32) -> Result<GgufHeader, Error> {
    let arch = input.architecture()?.to_owned();
    let vocab_key = format!("{arch}.vocab_size");
    let mut metadata: Vec<(String, Value)> = input
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with(TOKENIZER_KEY_PREFIX) && *k != vocab_key)
        .cloned()
        .collect();
    metadata.push((vocab_key, Value::U32(vocab_size)));
    Ok(GgufHeader {
        version: 3,
        metadata,
        tensors: input.tensors.clone(),
        data_offset: 0,
    })
}

/// A writer that hashes everything passing through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the server artifact for `input` under `perm` to `output`,
/// atomically (temp file then rename). `progress(done, total)` is called as
/// tensor bytes are written.
pub fn write_gguf_server_artifact(
    input: &Path,
    output: &Path,
    perm: &Permutation,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let (header, reader) = open(input)?;
    let vocab_size = embedding_vocab_size(&header)?;
    if perm.len() != vocab_size as usize {
        return Err(Error::Permutation(format!(
            "key covers {} tokens, model has {vocab_size}",
            perm.len()
        )));
    }
    let moves = |t: &TensorInfo| VOCAB_ROW_TENSORS.contains(&t.name.as_str());
    let mut move_rows = |t: &TensorInfo, data: &[u8]| permute_rows(&t.name, data, t.n_rows(), perm);
    write_artifact(
        reader,
        &header,
        output,
        vocab_size,
        &moves,
        &mut move_rows,
        progress,
    )
}

/// Writes the hidden-tier server artifact of the Llama/Mistral GGUF
/// `input` under `key` to `output`, as [`write_gguf_server_artifact`]
/// does: the vocabulary rows move, and the residual and FFN channels move
/// among the values that share a scale in every quantized tensor that
/// stores them along its rows (32 in ggml's 32-value formats and in a
/// Q4_K/Q5_K sub-block, 16 in a Q6_K one: [`Granule::Within`]), so every
/// block holds the same values and every sum runs in the same order: the
/// logits stay bit-exact. An axis that a float matrix stores along its
/// rows stays, and the report's `notes` name it; attention heads always
/// stay, since moving one reorders the blocks of `attn_output`.
///
/// Errors: those of [`write_gguf_server_artifact`], metadata without head
/// counts, or a tensor that is not a Llama/Mistral one.
pub fn write_gguf_hidden_artifact(
    input: &Path,
    output: &Path,
    key: &Key,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let (header, reader) = open(input)?;
    let vocab_size = embedding_vocab_size(&header)?;
    let HiddenPlan {
        mut perms,
        q_group,
        notes,
    } = gguf_hidden_plan(&header, key)?;
    let axes = |name: &str| gguf_llama_axes(name, q_group);
    let moves = |t: &TensorInfo| axes(&t.name).is_none_or(|a| !a.is_empty());
    let mut move_all = |t: &TensorInfo, data: &[u8]| {
        let (values, bytes) = layout(t)?;
        let within =
            |src: &[u8], to: &[u32], dst: &mut [u8]| move_within(t.ggml_type, src, to, dst);
        let rows = RowLayout {
            values: values as usize,
            bytes: bytes as usize,
            within: run_values(t.ggml_type).map(|_| &within as &MoveWithin<'_>),
        };
        // ggml's dims run from the contiguous one; rows first here.
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        perms.permute(&t.name, axes(&t.name), &shape, rows, data)
    };
    let mut report = write_artifact(
        reader,
        &header,
        output,
        vocab_size,
        &moves,
        &mut move_all,
        progress,
    )?;
    report.notes = notes;
    Ok(report)
}

/// What the hidden tier does to one GGUF.
pub struct HiddenPlan<'k> {
    /// The key's permutations, in the structure the file's formats allow.
    pub perms: ChannelPermutations<'k>,
    /// Query heads per key/value head.
    pub q_group: usize,
    /// The axes that stay in place, and the tensor that keeps each.
    pub notes: Vec<String>,
}

/// The hidden tier's permutations for the GGUF whose header is `header`
/// (the plaintext model's or its artifact's: they have the same tensors)
/// under `key`: what [`write_gguf_hidden_artifact`] applies, and what the
/// attack lab's scorer checks recovered channels against.
///
/// Errors: metadata without head counts.
pub fn gguf_hidden_plan<'k>(header: &GgufHeader, key: &'k Key) -> Result<HiddenPlan<'k>, Error> {
    let vocab_size = embedding_vocab_size(header)?;
    let arch = header.architecture()?.to_owned();
    let count = |k: &str| header.get(&format!("{arch}.{k}")).and_then(Value::as_u64);
    let heads = count("attention.head_count")
        .filter(|&h| h > 0)
        .ok_or_else(|| Error::Gguf(format!("no {arch}.attention.head_count")))?;
    let kv_heads = count("attention.head_count_kv").unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Gguf(format!(
            "{heads} attention heads do not group over {kv_heads} key/value heads"
        )));
    }
    let q_group = (heads / kv_heads) as usize;
    // Every tensor that stores an axis along its rows limits how it moves;
    // the first that stops it is named in the notes.
    let mut granules: HashMap<Axis, Granule> = HashMap::new();
    let mut stopped_by: HashMap<Axis, &TensorInfo> = HashMap::new();
    let untied = header.tensor(VOCAB_ROW_TENSORS[1]).is_some();
    for t in &header.tensors {
        let axes = gguf_llama_axes(&t.name, q_group);
        let Some(cols) = axes.filter(|a| a.len() == 2).map(|a| a[1]) else {
            continue;
        };
        let runs = run_values(t.ggml_type);
        // An untied float embedding is only looked up, never summed over:
        // any order of its values is exact.
        if t.name == VOCAB_ROW_TENSORS[0] && untied && runs.is_none() {
            continue;
        }
        let axis = granule_axis(cols);
        let g = runs.map_or(Granule::Fixed, Granule::Within);
        if g == Granule::Fixed && !matches!(axis, Axis::Heads { .. }) {
            stopped_by.entry(axis).or_insert(t);
        }
        let known = granules.entry(axis).or_insert(Granule::Value);
        *known = known.and(g);
    }
    let mut notes: Vec<String> = stopped_by
        .into_iter()
        .map(|(axis, t)| {
            let axis = match axis {
                Axis::Ffn(l) => format!("layer {l}'s FFN"),
                _ => "the residual".to_owned(),
            };
            format!(
                "{axis} channels stay in place: {} stores them as ggml type {}, whose values \
                 cannot move without changing its arithmetic",
                t.name,
                ggml_type_name(t.ggml_type)
            )
        })
        .collect();
    notes.sort();
    let perms = ChannelPermutations::new(key, key.vocab_permutation(vocab_size), kv_heads as usize)
        .with_granules(granules);
    Ok(HiddenPlan {
        perms,
        q_group,
        notes,
    })
}

/// (values, bytes) of one block of tensor `t`.
fn layout(t: &TensorInfo) -> Result<(u64, u64), Error> {
    ggml_block_layout(t.ggml_type).ok_or_else(|| {
        Error::Gguf(format!(
            "tensor {}: unsupported ggml type {}",
            t.name, t.ggml_type
        ))
    })
}

type Reader = BufReader<File>;

/// The new bytes of a tensor that moves.
type MoveTensor<'a> = dyn FnMut(&TensorInfo, &[u8]) -> Result<Vec<u8>, Error> + 'a;

/// The header of the GGUF `input`, and a reader over it.
fn open(input: &Path) -> Result<(GgufHeader, Reader), Error> {
    let file =
        File::open(input).map_err(|e| Error::Io(format!("opening {}: {e}", input.display())))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let header = GgufHeader::read(&mut reader)?;
    Ok((header, reader))
}

/// Writes `header`'s model to `output` with every tensor for which
/// `moves` holds replaced by what `move_tensor` makes of its bytes; other
/// tensors stream through. Atomic: a temp file, then a rename.
fn write_artifact(
    mut reader: Reader,
    header: &GgufHeader,
    output: &Path,
    vocab_size: u32,
    moves: &dyn Fn(&TensorInfo) -> bool,
    move_tensor: &mut MoveTensor<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    let io = |what: &str, p: &Path| {
        let what = what.to_owned();
        let p = p.display().to_string();
        move |e: std::io::Error| Error::Io(format!("{what} {p}: {e}"))
    };
    let mut out_header = server_header(header, vocab_size)?;
    let total: u64 = header
        .tensors
        .iter()
        .map(TensorInfo::n_bytes)
        .sum::<Result<u64, _>>()?;

    let tmp = output.with_extension("gguf.tmp");
    let file = File::create(&tmp).map_err(io("creating", &tmp))?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        written: 0,
    };
    let result = (|| -> Result<Vec<String>, Error> {
        out_header.write(&mut w)?;
        let mut permuted = Vec::new();
        let mut done = 0u64;
        for (src, dst) in header.tensors.iter().zip(&out_header.tensors) {
            let pad = out_header.data_offset + dst.offset - w.written;
            w.write_all(&vec![0u8; pad as usize])?;
            reader.seek(SeekFrom::Start(header.tensor_data_offset(src)))?;
            let n = src.n_bytes()?;
            if moves(src) {
                let mut data = vec![0u8; n as usize];
                reader.read_exact(&mut data)?;
                w.write_all(&move_tensor(src, &data)?)?;
                permuted.push(src.name.clone());
            } else {
                let copied = std::io::copy(&mut (&mut reader).take(n), &mut w)?;
                if copied != n {
                    return Err(Error::Gguf(format!("{}: file truncated", src.name)));
                }
            }
            done += n;
            progress(done, total);
        }
        w.flush()?;
        w.inner.get_ref().sync_all()?;
        Ok(permuted)
    })();
    let permuted_tensors = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let sha256 = hex::encode(w.hasher.finalize_reset());
    let bytes = w.written;
    drop(w);
    fs::rename(&tmp, output).map_err(io("renaming to", output))?;
    Ok(TransformReport {
        sha256,
        bytes,
        vocab_size,
        permuted_tensors,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write_gguf, ValueType};
    use crate::transform::sha256_file;
    use crate::Key;

    fn tiny_model(path: &Path) {
        let vocab = 8u64;
        let row = 34usize; // one Q8_0 block of 32 values
        let embd: Vec<u8> = (0..vocab as usize * row)
            .map(|i| (i / row) as u8 * 10 + (i % 7) as u8)
            .collect();
        let mut f = File::create(path).unwrap();
        write_gguf(
            &mut f,
            vec![
                ("general.architecture".into(), Value::String("llama".into())),
                ("llama.embedding_length".into(), Value::U32(32)),
                ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
                (
                    "tokenizer.ggml.tokens".into(),
                    Value::Array(
                        ValueType::String,
                        (0..8).map(|i| Value::String(format!("t{i}"))).collect(),
                    ),
                ),
                (
                    "tokenizer.chat_template".into(),
                    Value::String("{{ x }}".into()),
                ),
            ],
            vec![
                ("token_embd.weight".into(), vec![32, vocab], 8, embd),
                ("output_norm.weight".into(), vec![32], 0, vec![3u8; 128]),
            ],
        )
        .unwrap();
    }

    #[test]
    fn artifact_has_no_tokenizer_keys_and_permuted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in.gguf"), dir.path().join("out.gguf"));
        tiny_model(&input);
        let perm = Key::from_bytes([9; 32]).vocab_permutation(8);
        let mut calls = 0;
        let report =
            write_gguf_server_artifact(&input, &output, &perm, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, 2);
        assert_eq!(report.permuted_tensors, vec!["token_embd.weight"]);

        let mut r_in = BufReader::new(File::open(&input).unwrap());
        let mut r_out = BufReader::new(File::open(&output).unwrap());
        let h_in = GgufHeader::read(&mut r_in).unwrap();
        let h_out = GgufHeader::read(&mut r_out).unwrap();
        assert!(h_out
            .metadata
            .iter()
            .all(|(k, _)| !k.starts_with("tokenizer.")));
        assert_eq!(h_out.get("llama.vocab_size"), Some(&Value::U32(8)));

        let e_in = h_in
            .read_tensor_bytes(&mut r_in, h_in.tensor("token_embd.weight").unwrap())
            .unwrap();
        let e_out = h_out
            .read_tensor_bytes(&mut r_out, h_out.tensor("token_embd.weight").unwrap())
            .unwrap();
        assert_ne!(e_in, e_out);
        for t in 0..8u32 {
            let c = perm.encrypt(t).unwrap() as usize;
            assert_eq!(e_in[t as usize * 34..][..34], e_out[c * 34..][..34]);
        }
        let n_in = h_in
            .read_tensor_bytes(&mut r_in, h_in.tensor("output_norm.weight").unwrap())
            .unwrap();
        let n_out = h_out
            .read_tensor_bytes(&mut r_out, h_out.tensor("output_norm.weight").unwrap())
            .unwrap();
        assert_eq!(n_in, n_out);

        assert_eq!(sha256_file(&output).unwrap(), report.sha256);
        assert_eq!(fs::metadata(&output).unwrap().len(), report.bytes);
    }

    #[test]
    fn mismatched_key_size_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in.gguf"), dir.path().join("out.gguf"));
        tiny_model(&input);
        let perm = Key::from_bytes([9; 32]).vocab_permutation(9);
        assert!(write_gguf_server_artifact(&input, &output, &perm, &mut |_, _| {}).is_err());
        assert!(!output.exists());
    }
}
