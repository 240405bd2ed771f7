//! One error type for the crate. Every variant names the file it is about, and
//! where it can, the byte offset or header field, so that a user looking at a
//! broken shard knows what to inspect.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    #[error("{path}: not a recognised token shard ({detail}); expected an Ember shard, a Megatron .bin/.idx pair or an llm.c .bin shard")]
    UnknownFormat { path: PathBuf, detail: String },

    /// A header field holds a value the reader cannot accept.
    #[error("{path}: header field `{field}` at byte {offset}: {detail}")]
    BadHeader {
        path: PathBuf,
        field: &'static str,
        offset: u64,
        detail: String,
    },

    #[error("{path}: file is {actual} bytes but its header implies {expected} bytes ({detail})")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
        detail: String,
    },

    /// Document boundaries that go backwards or past the token data.
    #[error("{path}: document index entry {index} at byte {offset}: {detail}")]
    BadIndex {
        path: PathBuf,
        index: u64,
        offset: u64,
        detail: String,
    },

    #[error("{path}: token {token} at token position {position} (byte {offset}) is outside the vocabulary of size {vocab_size}")]
    TokenOutOfRange {
        path: PathBuf,
        token: i64,
        position: u64,
        offset: u64,
        vocab_size: u64,
    },

    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn bad_header(path: &Path, field: &'static str, offset: u64, detail: String) -> Self {
        Error::BadHeader { path: path.to_path_buf(), field, offset, detail }
    }

    /// Fails when a file is shorter than its format's fixed header.
    pub fn require_header(path: &Path, have: usize, header_len: u64, file_len: u64) -> Result<()> {
        if (have as u64) < header_len {
            return Err(Error::SizeMismatch {
                path: path.to_path_buf(),
                expected: header_len,
                actual: file_len,
                detail: format!("truncated inside the {header_len}-byte header"),
            });
        }
        Ok(())
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path: path.to_path_buf() }
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
