//! The server artifact of a GGUF model: rows of `token_embd.weight` (and
//! `output.weight` when the model has its own output head) move as whole
//! quantized rows; every `tokenizer.*` key is dropped.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{permute_rows, TransformReport};
use crate::gguf::{GgufHeader, TensorInfo, Value, VOCAB_ROW_TENSORS};
use crate::tokenizer::TOKENIZER_KEY_PREFIX;
use crate::{Error, Permutation};

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
    let io = |what: &str, p: &Path| {
        let what = what.to_owned();
        let p = p.display().to_string();
        move |e: std::io::Error| Error::Io(format!("{what} {p}: {e}"))
    };
    let mut reader =
        BufReader::with_capacity(1 << 20, File::open(input).map_err(io("opening", input))?);
    let header = GgufHeader::read(&mut reader)?;
    let vocab_size = embedding_vocab_size(&header)?;
    if perm.len() != vocab_size as usize {
        return Err(Error::Permutation(format!(
            "key covers {} tokens, model has {vocab_size}",
            perm.len()
        )));
    }
    let mut out_header = server_header(&header, vocab_size)?;
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
            if VOCAB_ROW_TENSORS.contains(&src.name.as_str()) {
                let mut data = vec![0u8; n as usize];
                reader.read_exact(&mut data)?;
                w.write_all(&permute_rows(&src.name, &data, src.n_rows(), perm)?)?;
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
