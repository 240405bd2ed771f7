//! Ember's own shard format, version 1. All integers little-endian.
//!
//! ```text
//! byte  0  magic        b"EMBERTOK"
//! byte  8  version      u32 = 1
//! byte 12  dtype        u32: 1 = uint16, 2 = uint32
//! byte 16  vocab_size   u64
//! byte 24  num_docs     u64
//! byte 32  num_tokens   u64
//! byte 40  reserved     24 zero bytes
//! byte 64  tokens       num_tokens elements of dtype
//!          zero padding to a multiple of 8 bytes
//!          offsets      num_docs + 1 u64 token positions: 0, end of doc 0, ..., num_tokens
//! ```
//!
//! The offsets come last so that a writer can stream tokens without knowing the
//! document count in advance; the header is written last of all, and the file
//! only appears under its final name once it is complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{IndexSpec, ShardSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::Format;

pub const MAGIC: &[u8; 8] = b"EMBERTOK";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;

fn dtype_code(d: DType) -> u32 {
    match d {
        DType::U16 => 1,
        DType::U32 => 2,
        _ => unreachable!("Ember shards store uint16 or uint32"),
    }
}

pub fn offsets_offset(num_tokens: u64, dtype: DType) -> u64 {
    (HEADER_LEN + num_tokens * dtype.size() as u64).div_ceil(8) * 8
}

pub(crate) fn probe(path: &Path, head: &[u8], file_len: u64) -> Result<ShardSpec> {
    let bad = |field, offset, detail| Error::bad_header(path, field, offset, detail);
    Error::require_header(path, head.len(), HEADER_LEN, file_len)?;
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad("version", 8, format!("version {version} is not supported (this reader knows version {VERSION})")));
    }
    let dtype = match u32_at(12) {
        1 => DType::U16,
        2 => DType::U32,
        c => return Err(bad("dtype", 12, format!("unknown dtype code {c} (1 = uint16, 2 = uint32)"))),
    };
    let vocab_size = u64_at(16);
    let num_docs = u64_at(24);
    let num_tokens = u64_at(32);
    if vocab_size == 0 {
        return Err(bad("vocab_size", 16, "vocabulary size is 0".into()));
    }
    if vocab_size > (1u64 << (8 * dtype.size())) {
        return Err(bad("vocab_size", 16, format!("vocabulary size {vocab_size} does not fit the shard's dtype {}", dtype.numpy_name())));
    }
    // Checked arithmetic: a corrupt header must not overflow into a plausible size.
    let expected = num_tokens
        .checked_mul(dtype.size() as u64)
        .and_then(|b| b.checked_add(HEADER_LEN + 7))
        .map(|b| b / 8 * 8)
        .and_then(|o| num_docs.checked_add(1)?.checked_mul(8)?.checked_add(o));
    match expected {
        Some(e) if e == file_len => {}
        Some(e) => {
            return Err(Error::SizeMismatch {
                path: path.to_path_buf(),
                expected: e,
                actual: file_len,
                detail: format!("{num_docs} documents, {num_tokens} tokens of {}", dtype.numpy_name()),
            })
        }
        None => return Err(bad("num_tokens", 32, format!("{num_docs} documents and {num_tokens} tokens overflow a file size"))),
    }
    Ok(ShardSpec::new(
        path.to_path_buf(),
        Format::Ember,
        dtype,
        num_tokens,
        Some(num_docs),
        Some(vocab_size),
        path.to_path_buf(),
        HEADER_LEN,
        IndexSpec::Ember { offsets_offset: offsets_offset(num_tokens, dtype) },
    ))
}

/// Streams documents into a new Ember shard. The file is written under a
/// temporary name beside `path` and renamed into place by [`ShardWriter::finish`];
/// dropping an unfinished writer deletes the temporary file, so a crash never
/// leaves a half-written shard under the final name.
pub struct ShardWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    dtype: DType,
    vocab_size: u64,
    offsets: Vec<u64>,
    num_tokens: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, vocab_size: u64) -> Result<Self> {
        let dtype = DType::for_vocab(vocab_size).filter(|_| vocab_size > 0).ok_or_else(|| {
            Error::Invalid(format!("{}: vocabulary size {vocab_size} must be between 1 and 2^32", path.display()))
        })?;
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp_path = path.with_file_name(tmp_name);
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN as usize]).map_err(|e| Error::io(&tmp_path, e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp_path,
            out: Some(out),
            dtype,
            vocab_size,
            offsets: vec![0],
            num_tokens: 0,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn num_docs(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Appends one document. Every token must be in `0..vocab_size`; an
    /// out-of-range token rejects the whole document and leaves the shard as it was.
    pub fn add_document<T: Copy + Into<i64>>(&mut self, tokens: &[T]) -> Result<()> {
        let doc = self.num_docs();
        if let Some((i, t)) = tokens
            .iter()
            .map(|&t| t.into())
            .enumerate()
            .find(|&(_, t)| t < 0 || t as u64 >= self.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "{}: document {doc}, token {i}: id {t} is outside the vocabulary of size {}",
                self.path.display(),
                self.vocab_size
            )));
        }
        let out = self.out.as_mut().ok_or_else(|| Error::Invalid(format!("{}: writer is closed", self.path.display())))?;
        let mut buf = Vec::with_capacity(tokens.len() * self.dtype.size());
        match self.dtype {
            DType::U16 => tokens.iter().for_each(|&t| buf.extend_from_slice(&(t.into() as u16).to_le_bytes())),
            _ => tokens.iter().for_each(|&t| buf.extend_from_slice(&(t.into() as u32).to_le_bytes())),
        }
        out.write_all(&buf).map_err(|e| Error::io(&self.tmp_path, e))?;
        self.num_tokens += tokens.len() as u64;
        self.offsets.push(self.num_tokens);
        Ok(())
    }

    /// Writes the index and header, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let mut out = self.out.take().ok_or_else(|| Error::Invalid(format!("{}: writer is closed", self.path.display())))?;
        let tmp = self.tmp_path.clone();
        let io = |e| Error::io(&tmp, e);
        let data_end = HEADER_LEN + self.num_tokens * self.dtype.size() as u64;
        let pad = offsets_offset(self.num_tokens, self.dtype) - data_end;
        out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        let mut idx = Vec::with_capacity(self.offsets.len() * 8);
        self.offsets.iter().for_each(|o| idx.extend_from_slice(&o.to_le_bytes()));
        out.write_all(&idx).map_err(io)?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&dtype_code(self.dtype).to_le_bytes());
        header[16..24].copy_from_slice(&self.vocab_size.to_le_bytes());
        header[24..32].copy_from_slice(&self.num_docs().to_le_bytes());
        header[32..40].copy_from_slice(&self.num_tokens.to_le_bytes());
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        out.write_all(&header).map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.path.clone())
    }

    /// Abandons the shard: the temporary file is removed and nothing is renamed.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.discard();
    }
}
