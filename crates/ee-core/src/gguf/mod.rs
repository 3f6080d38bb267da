//! Minimal GGUF (v2/v3) reader and writer.
//!
//! We parse the header, metadata and tensor directory ourselves so the
//! transform can stream tensor bytes from one file to another, rewriting only
//! what the key touches. Tensor data is never decoded here: quantized rows are
//! moved as opaque byte ranges, which is what makes the transform exact.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};

use crate::Error;

pub mod blocks;
pub mod names;

pub use names::VOCAB_ROW_TENSORS;

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Sanity bound on any length read from a file, so a corrupt header is an
/// error rather than a multi-gigabyte allocation.
const MAX_LEN: u64 = 1 << 32;

/// A metadata value. Arrays keep their element type so they round-trip even
/// when empty.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Result<Self, Error> {
        use ValueType::*;
        Ok(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return Err(Error::Gguf(format!("unknown metadata value type {v}"))),
        })
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value that fits a u64 (GGUF writers disagree on widths).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

/// ggml's tensor element types (`enum ggml_type` in ggml.h): ID, name as
/// ggml spells it, block size in elements and in bytes.
const GGML_TYPES: [(u32, &str, u64, u64); 20] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (30, "BF16", 1, 2),
];

/// A ggml type's (block size in elements, block size in bytes).
pub fn ggml_block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == ggml_type)
        .map(|&(_, _, values, bytes)| (values, bytes))
}

/// ggml's name of a tensor element type (`F16`, `Q4_K`), or `#` and its
/// number for a type not listed.
pub fn ggml_type_name(ggml_type: u32) -> String {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == ggml_type)
        .map_or_else(|| format!("#{ggml_type}"), |t| t.1.to_owned())
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (input) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of one row (one slice along `dims[0]`).
    pub fn row_bytes(&self) -> Result<u64, Error> {
        let (block, bytes) = ggml_block_layout(self.ggml_type).ok_or_else(|| {
            Error::Gguf(format!(
                "tensor {}: unsupported ggml type {}",
                self.name, self.ggml_type
            ))
        })?;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if ne0 % block != 0 {
            return Err(Error::Gguf(format!(
                "tensor {}: row length {ne0} is not a multiple of the block size {block}",
                self.name
            )));
        }
        Ok(ne0 / block * bytes)
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    pub fn n_bytes(&self) -> Result<u64, Error> {
        self.row_bytes()?
            .checked_mul(self.n_rows())
            .ok_or_else(|| Error::Gguf(format!("tensor {}: size overflows", self.name)))
    }
}

/// A parsed GGUF header: everything but the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset where tensor data starts.
    pub data_offset: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn alignment(&self) -> u64 {
        self.get("general.alignment")
            .and_then(Value::as_u64)
            .filter(|a| *a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    pub fn architecture(&self) -> Result<&str, Error> {
        self.get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Gguf("missing general.architecture".into()))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads the header from the start of `r`.
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<Self, Error> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(Error::Gguf("not a GGUF file (bad magic)".into()));
        }
        let version = read_u32(r)?;
        if !(2..=3).contains(&version) {
            return Err(Error::Gguf(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = read_len(r)?;
        let n_kv = read_len(r)?;
        let mut metadata = Vec::with_capacity(n_kv.min(4096) as usize);
        for _ in 0..n_kv {
            let key = read_string(r)?;
            let ty = ValueType::from_u32(read_u32(r)?)?;
            metadata.push((key, read_value(r, ty)?));
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(65536) as usize);
        for _ in 0..n_tensors {
            let name = read_string(r)?;
            let n_dims = read_u32(r)?;
            if n_dims > 4 {
                return Err(Error::Gguf(format!("tensor {name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| read_u64(r))
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = read_u32(r)?;
            let offset = read_u64(r)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let mut header = GgufHeader {
            version,
            metadata,
            tensors,
            data_offset: 0,
        };
        // The spec requires both; readers cast tensor data in place.
        let alignment = header.alignment();
        if !alignment.is_multiple_of(8) {
            return Err(Error::Gguf(format!(
                "general.alignment {alignment} is not a multiple of 8"
            )));
        }
        if let Some(t) = header.tensors.iter().find(|t| t.offset % alignment != 0) {
            return Err(Error::Gguf(format!(
                "tensor {}: offset {} is not aligned to {alignment}",
                t.name, t.offset
            )));
        }
        let pos = r.stream_position()?;
        header.data_offset = align_up(pos, alignment);
        Ok(header)
    }

    /// Writes the header, recomputing tensor offsets so they are packed in
    /// directory order at the file's alignment, and pads up to the data
    /// section. Returns the number of bytes written.
    pub fn write<W: Write>(&mut self, w: &mut W) -> Result<u64, Error> {
        let alignment = self.alignment();
        let mut offset = 0u64;
        for t in &mut self.tensors {
            t.offset = offset;
            offset = align_up(offset + t.n_bytes()?, alignment);
        }
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut buf, k);
            buf.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            write_value(&mut buf, v);
        }
        for t in &self.tensors {
            write_string(&mut buf, &t.name);
            buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            buf.extend_from_slice(&t.ggml_type.to_le_bytes());
            buf.extend_from_slice(&t.offset.to_le_bytes());
        }
        let padded = align_up(buf.len() as u64, alignment);
        buf.resize(padded as usize, 0);
        w.write_all(&buf)?;
        self.version = 3;
        self.data_offset = padded;
        Ok(padded)
    }

    /// Absolute file offset of a tensor's data.
    pub fn tensor_data_offset(&self, t: &TensorInfo) -> u64 {
        self.data_offset + t.offset
    }

    /// Reads one tensor's raw bytes.
    pub fn read_tensor_bytes<R: Read + Seek>(
        &self,
        r: &mut R,
        t: &TensorInfo,
    ) -> Result<Vec<u8>, Error> {
        let n = t.n_bytes()?;
        if n > MAX_LEN * 16 {
            return Err(Error::Gguf(format!(
                "tensor {} is implausibly large",
                t.name
            )));
        }
        r.seek(SeekFrom::Start(self.tensor_data_offset(t)))?;
        let mut data = vec![0u8; n as usize];
        r.read_exact(&mut data)?;
        Ok(data)
    }
}

/// Rounds `x` up to a multiple of `alignment`.
pub fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

fn read_exact_array<const N: usize, R: Read>(r: &mut R) -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32, Error> {
    Ok(u32::from_le_bytes(read_exact_array(r)?))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64, Error> {
    Ok(u64::from_le_bytes(read_exact_array(r)?))
}

fn read_len<R: Read>(r: &mut R) -> Result<u64, Error> {
    let n = read_u64(r)?;
    if n > MAX_LEN {
        return Err(Error::Gguf(format!("implausible length {n} in header")));
    }
    Ok(n)
}

fn read_string<R: Read>(r: &mut R) -> Result<String, Error> {
    let n = read_len(r)?;
    let mut b = Vec::new();
    r.take(n).read_to_end(&mut b)?;
    if b.len() as u64 != n {
        return Err(Error::Gguf("truncated string".into()));
    }
    String::from_utf8(b).map_err(|_| Error::Gguf("metadata string is not UTF-8".into()))
}

fn read_value<R: Read>(r: &mut R, ty: ValueType) -> Result<Value, Error> {
    Ok(match ty {
        ValueType::U8 => Value::U8(u8::from_le_bytes(read_exact_array(r)?)),
        ValueType::I8 => Value::I8(i8::from_le_bytes(read_exact_array(r)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(read_exact_array(r)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(read_exact_array(r)?)),
        ValueType::U32 => Value::U32(read_u32(r)?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(read_exact_array(r)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(read_exact_array(r)?)),
        ValueType::Bool => Value::Bool(u8::from_le_bytes(read_exact_array(r)?) != 0),
        ValueType::String => Value::String(read_string(r)?),
        ValueType::U64 => Value::U64(read_u64(r)?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(read_exact_array(r)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(read_exact_array(r)?)),
        ValueType::Array => {
            let elem = ValueType::from_u32(read_u32(r)?)?;
            if elem == ValueType::Array {
                return Err(Error::Gguf(
                    "nested metadata arrays are not supported".into(),
                ));
            }
            let n = read_len(r)?;
            let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
            for _ in 0..n {
                items.push(read_value(r, elem)?);
            }
            Value::Array(elem, items)
        }
    })
}

fn write_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn write_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => write_string(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(elem, items) => {
            buf.extend_from_slice(&(*elem as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(buf, item);
            }
        }
    }
}

/// Builds a GGUF file in memory from metadata and raw tensor bytes. Used by
/// tests and fixture generators to make tiny models.
pub fn write_gguf<W: Write>(
    w: &mut W,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
) -> Result<(), Error> {
    let mut data_by_name = BTreeMap::new();
    let mut infos = Vec::new();
    for (name, dims, ggml_type, data) in tensors {
        infos.push(TensorInfo {
            name: name.clone(),
            dims,
            ggml_type,
            offset: 0,
        });
        data_by_name.insert(name, data);
    }
    let mut header = GgufHeader {
        version: 3,
        metadata,
        tensors: infos,
        data_offset: 0,
    };
    header.write(w)?;
    let mut written = 0u64;
    for t in &header.tensors {
        let data = &data_by_name[&t.name];
        if data.len() as u64 != t.n_bytes()? {
            return Err(Error::Gguf(format!(
                "tensor {}: {} bytes given, {} expected",
                t.name,
                data.len(),
                t.n_bytes()?
            )));
        }
        let pad = t.offset - written;
        w.write_all(&vec![0u8; pad as usize])?;
        w.write_all(data)?;
        written = t.offset + data.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn header_round_trips_every_value_type() {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("a.u8".into(), Value::U8(7)),
            ("a.i8".into(), Value::I8(-7)),
            ("a.u16".into(), Value::U16(700)),
            ("a.i16".into(), Value::I16(-700)),
            ("a.u32".into(), Value::U32(70000)),
            ("a.i32".into(), Value::I32(-70000)),
            ("a.f32".into(), Value::F32(1.5)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.u64".into(), Value::U64(1 << 40)),
            ("a.i64".into(), Value::I64(-(1 << 40))),
            ("a.f64".into(), Value::F64(-2.25)),
            (
                "a.arr".into(),
                Value::Array(
                    ValueType::String,
                    vec![Value::String("x".into()), Value::String("é🙂".into())],
                ),
            ),
            ("a.empty".into(), Value::Array(ValueType::I32, vec![])),
        ];
        let tensors = vec![
            (
                "w".to_string(),
                vec![32, 3],
                8u32,
                (0..3 * 34).map(|i| i as u8).collect(),
            ),
            ("n".to_string(), vec![5], 0u32, vec![1u8; 20]),
        ];
        let mut buf = Vec::new();
        write_gguf(&mut buf, metadata.clone(), tensors).unwrap();
        let mut cur = Cursor::new(&buf);
        let h = GgufHeader::read(&mut cur).unwrap();
        assert_eq!(h.metadata, metadata);
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].offset % 32, 0);
        let w = h.tensor("w").unwrap().clone();
        assert_eq!(h.read_tensor_bytes(&mut cur, &w).unwrap()[5], 5);
        let n = h.tensor("n").unwrap().clone();
        assert_eq!(h.read_tensor_bytes(&mut cur, &n).unwrap(), vec![1u8; 20]);
    }

    #[test]
    fn corrupt_headers_are_errors_not_panics() {
        assert!(GgufHeader::read(&mut Cursor::new(b"NOPE\x03\0\0\0")).is_err());
        let mut bad = b"GGUF".to_vec();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufHeader::read(&mut Cursor::new(&bad)).is_err());
        let mut truncated = Vec::new();
        write_gguf(
            &mut truncated,
            vec![("k".into(), Value::String("value".into()))],
            vec![],
        )
        .unwrap();
        truncated.truncate(30);
        assert!(GgufHeader::read(&mut Cursor::new(&truncated)).is_err());
    }

    #[test]
    fn an_alignment_readers_cannot_cast_in_place_is_refused() {
        let write = |alignment: u32| {
            let mut buf = Vec::new();
            write_gguf(
                &mut buf,
                vec![("general.alignment".into(), Value::U32(alignment))],
                vec![
                    ("a".into(), vec![3], 0, vec![0u8; 12]),
                    ("b".into(), vec![1], 0, vec![0u8; 4]),
                ],
            )
            .unwrap();
            GgufHeader::read(&mut Cursor::new(buf))
        };
        assert!(write(16).is_ok());
        let err = write(4).unwrap_err().to_string();
        assert!(err.contains("not a multiple of 8"), "{err}");
    }

    #[test]
    fn row_bytes_follow_block_layout() {
        let t = TensorInfo {
            name: "t".into(),
            dims: vec![576, 10],
            ggml_type: 3,
            offset: 0,
        };
        assert_eq!(t.row_bytes().unwrap(), 18 * 20);
        assert_eq!(t.n_bytes().unwrap(), 18 * 20 * 10);
        let odd = TensorInfo {
            dims: vec![33, 1],
            ..t
        };
        assert!(odd.row_bytes().is_err());
    }
}
