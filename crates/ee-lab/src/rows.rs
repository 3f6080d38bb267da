//! A model's vocabulary rows as an operator holding its weights reads them:
//! the token embedding and, when untied, the output head. Rows are what the
//! vocabulary permutation moves.

use std::path::Path;

use ee_engine::ModelFiles;

use crate::Error;

/// The token embedding's name: a Llama/Mistral model's, then a BERT or
/// DistilBERT encoder's (saved alone, or under a classifier's prefix).
const EMBEDDINGS: [&str; 4] = [
    "model.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight",
    "distilbert.embeddings.word_embeddings.weight",
];
const HEAD: &str = "lm_head.weight";

/// One vocabulary-indexed matrix: its stored bytes per row and its values.
#[derive(Debug, Clone)]
pub struct RowMatrix {
    /// Stored bytes, `rows × row_bytes` (quantized blocks, or floats).
    pub bytes: Vec<u8>,
    /// Bytes per stored row.
    pub row_bytes: usize,
    /// Dequantized values, row-major `[rows, dim]`.
    pub values: Vec<f32>,
    /// Values per row (the hidden size).
    pub dim: usize,
}

impl RowMatrix {
    /// Rows (vocabulary entries).
    pub fn rows(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }

    /// Row `i` as stored.
    ///
    /// # Panics
    /// `i` out of range.
    pub fn row_stored(&self, i: usize) -> &[u8] {
        &self.bytes[i * self.row_bytes..(i + 1) * self.row_bytes]
    }

    /// Row `i`'s values.
    ///
    /// # Panics
    /// `i` out of range.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// A matrix from values alone (a simulated model); stored bytes are
    /// the little-endian f32s.
    pub fn from_values(values: Vec<f32>, dim: usize) -> Self {
        Self {
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            row_bytes: dim * 4,
            values,
            dim,
        }
    }
}

/// The vocabulary rows of a model.
#[derive(Debug, Clone)]
pub struct VocabRows {
    /// The token embedding.
    pub embedding: RowMatrix,
    /// `None` when the output head is the embedding (tied).
    pub head: Option<RowMatrix>,
}

impl VocabRows {
    /// Reads a GGUF file or a checkpoint directory, plaintext or a server
    /// artifact alike.
    ///
    /// # Errors
    /// The model cannot be opened, or has no embedding, named.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let files = ModelFiles::open(path)?;
        let weights = files.weights();
        let matrix = |name: &str| -> Result<RowMatrix, Error> {
            let t = weights.tensor(name)?;
            let [rows, dim] = t.shape[..] else {
                return Err(Error::Model(format!(
                    "{}: {name} has shape {:?}, not a matrix",
                    path.display(),
                    t.shape
                )));
            };
            if rows == 0 || t.bytes.len() % rows != 0 {
                return Err(Error::Model(format!(
                    "{}: {name} does not split into {rows} rows",
                    path.display()
                )));
            }
            let values = t.to_f32()?.flatten_all()?.to_vec1::<f32>()?;
            if values.len() != rows * dim {
                return Err(Error::Model(format!(
                    "{}: {name} holds {} values for {rows} × {dim}",
                    path.display(),
                    values.len()
                )));
            }
            Ok(RowMatrix {
                row_bytes: t.bytes.len() / rows,
                bytes: t.bytes.to_vec(),
                values,
                dim,
            })
        };
        let name = EMBEDDINGS
            .iter()
            .find(|n| weights.contains(n))
            .copied()
            .unwrap_or(EMBEDDINGS[0]);
        let embedding = matrix(name)?;
        let head = match weights.contains(HEAD) {
            true => Some(matrix(HEAD)?),
            false => None,
        };
        if let Some(h) = head.as_ref().filter(|h| h.rows() != embedding.rows()) {
            return Err(Error::Model(format!(
                "{}: {HEAD} has {} rows, {name} {}",
                path.display(),
                h.rows(),
                embedding.rows()
            )));
        }
        Ok(Self { embedding, head })
    }

    /// Rows of the embedding.
    pub fn vocab_size(&self) -> usize {
        self.embedding.rows()
    }

    /// These rows with their hidden channels (columns) permuted by `sigma`,
    /// as a hidden-channel key would leave them: what an operator would
    /// hold under that tier, simulated on the values.
    ///
    /// # Panics
    /// If `sigma`'s length is not the row width, or an entry is out of
    /// range.
    pub fn with_channels_permuted(&self, sigma: &[usize]) -> Self {
        let permute = |m: &RowMatrix| {
            assert_eq!(sigma.len(), m.dim, "σ must permute the row width");
            let values = (0..m.rows())
                .flat_map(|r| sigma.iter().map(move |&j| m.row(r)[j]))
                .collect();
            RowMatrix::from_values(values, m.dim)
        };
        Self {
            embedding: permute(&self.embedding),
            head: self.head.as_ref().map(permute),
        }
    }
}
