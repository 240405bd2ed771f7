//! llm.c's token shards: a 256 × i32 header, then the tokens.
//!
//! ```text
//! header[0] magic   20240520 (version 1, uint16 tokens) or 20240801 (version 7, uint32 tokens)
//! header[1] version 1 or 7
//! header[2] number of tokens
//! byte 1024 tokens
//! ```
//!
//! The format stores no document boundaries. llm.c's tokenizer scripts start every
//! document with a delimiter token (GPT-2's `<|endoftext|>` = 50256, Llama 3's
//! `<|begin_of_text|>` = 128000), so documents are recovered by scanning for it,
//! lazily and only when document boundaries are needed.

use std::path::Path;

use super::{IndexSpec, ShardSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::Format;

pub const MAGIC_V1: i32 = 20240520;
pub const MAGIC_V7: i32 = 20240801;
pub const HEADER_LEN: u64 = 1024;

pub fn is_llmc(head: &[u8]) -> bool {
    head.len() >= 4 && matches!(i32::from_le_bytes(head[..4].try_into().unwrap()), MAGIC_V1 | MAGIC_V7)
}

pub(crate) fn probe(path: &Path, head: &[u8], file_len: u64, delimiter: Option<i64>) -> Result<ShardSpec> {
    let bad = |field, offset, detail| Error::bad_header(path, field, offset, detail);
    Error::require_header(path, head.len(), HEADER_LEN, file_len)?;
    let word = |i: usize| i32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
    let (dtype, default_delim) = match (word(0), word(1)) {
        (MAGIC_V1, 1) => (DType::U16, 50256),
        (MAGIC_V7, 7) => (DType::U32, 128000),
        (m, v) => return Err(bad("version", 4, format!("magic {m} with version {v}; expected 20240520 with 1 or 20240801 with 7"))),
    };
    let num_tokens = word(2);
    if num_tokens < 0 {
        return Err(bad("num_tokens", 8, format!("negative token count {num_tokens}")));
    }
    let num_tokens = num_tokens as u64;
    let expected = HEADER_LEN + num_tokens * dtype.size() as u64;
    if expected != file_len {
        return Err(Error::SizeMismatch {
            path: path.to_path_buf(),
            expected,
            actual: file_len,
            detail: format!("{num_tokens} tokens of {}", dtype.numpy_name()),
        });
    }
    Ok(ShardSpec::new(
        path.to_path_buf(),
        Format::LlmC,
        dtype,
        num_tokens,
        None,
        None,
        path.to_path_buf(),
        HEADER_LEN,
        IndexSpec::LlmC { delimiter: delimiter.unwrap_or(default_delim) },
    ))
}
