//! Megatron-LM's indexed dataset: a `.bin` file of raw tokens and a `.idx` file.
//!
//! ```text
//! .idx byte  0  magic            b"MMIDIDX\0\0"
//!      byte  9  version          u64 = 1
//!      byte 17  dtype code       u8: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16
//!      byte 18  sequence_count   u64 (n)
//!      byte 26  document_count   u64 (d)
//!      byte 34  sequence_lengths i32 × n      (in tokens)
//!               sequence_pointers i64 × n     (byte offsets into .bin)
//!               document_indices i64 × d
//!               [sequence_modes  i8 × n]      (multimodal files only)
//! ```
//!
//! The arrays start at byte 34, so they are read unaligned. Each sequence is one
//! item of the dataset. The loader reads the `.bin` as one token stream, so it
//! requires the sequences to be stored back to back, as Megatron's writer does.

use std::path::{Path, PathBuf};

use super::{IndexSpec, ShardSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::Format;

pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
pub const ARRAYS_OFFSET: u64 = 34;

pub fn dtype_from_code(code: u8) -> Option<DType> {
    Some(match code {
        1 => DType::U8,
        2 => DType::I8,
        3 => DType::I16,
        4 => DType::I32,
        5 => DType::I64,
        6 => DType::F64,
        7 => DType::F32,
        8 => DType::U16,
        _ => return None,
    })
}

/// `idx_path` is the `.idx` file; its `.bin` sibling holds the tokens.
pub(crate) fn probe(idx_path: &Path, head: &[u8], idx_len: u64) -> Result<ShardSpec> {
    let bad = |field, offset, detail| Error::bad_header(idx_path, field, offset, detail);
    Error::require_header(idx_path, head.len(), ARRAYS_OFFSET, idx_len)?;
    let version = u64::from_le_bytes(head[9..17].try_into().unwrap());
    if version != 1 {
        return Err(bad("version", 9, format!("version {version} is not supported (expected 1)")));
    }
    let dtype = dtype_from_code(head[17]).ok_or_else(|| bad("dtype", 17, format!("unknown dtype code {}", head[17])))?;
    let n = u64::from_le_bytes(head[18..26].try_into().unwrap());
    let d = u64::from_le_bytes(head[26..34].try_into().unwrap());
    let base = n
        .checked_mul(12)
        .and_then(|b| d.checked_mul(8)?.checked_add(b))
        .and_then(|b| b.checked_add(ARRAYS_OFFSET))
        .ok_or_else(|| bad("sequence_count", 18, format!("{n} sequences and {d} documents overflow a file size")))?;
    if idx_len != base && Some(idx_len) != base.checked_add(n) {
        return Err(Error::SizeMismatch {
            path: idx_path.to_path_buf(),
            expected: base,
            actual: idx_len,
            detail: format!("{n} sequences, {d} document indices"),
        });
    }
    let bin_path = idx_path.with_extension("bin");
    let bin_len = std::fs::metadata(&bin_path).map_err(|e| Error::io(&bin_path, e))?.len();
    if bin_len % dtype.size() as u64 != 0 {
        return Err(Error::SizeMismatch {
            path: bin_path,
            expected: bin_len / dtype.size() as u64 * dtype.size() as u64,
            actual: bin_len,
            detail: format!("not a whole number of {} tokens", dtype.numpy_name()),
        });
    }
    Ok(ShardSpec::new(
        idx_path.to_path_buf(),
        Format::Megatron,
        dtype,
        bin_len / dtype.size() as u64,
        Some(n),
        None,
        bin_path,
        0,
        IndexSpec::Megatron {
            idx_path: idx_path.to_path_buf(),
            lengths_offset: ARRAYS_OFFSET,
            pointers_offset: ARRAYS_OFFSET + 4 * n,
        },
    ))
}

/// Resolves what a user may pass for a Megatron dataset: the `.bin`, the `.idx`
/// or the common prefix. Returns the `.idx` path when the pair exists.
pub fn resolve(path: &Path) -> Option<PathBuf> {
    let ext = path.extension().and_then(|e| e.to_str());
    let candidate = match ext {
        Some("idx") => path.to_path_buf(),
        Some("bin") => path.with_extension("idx"),
        _ => {
            let mut p = path.as_os_str().to_owned();
            p.push(".idx");
            PathBuf::from(p)
        }
    };
    let bin = candidate.with_extension("bin");
    (candidate.is_file() && bin.is_file()).then_some(candidate)
}
