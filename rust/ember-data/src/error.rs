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

    /// A token id that is negative or not below the vocabulary size: the model's
    /// embedding lookup would fail on it. `path` is the file that holds the tokens,
    /// `position` and `document` count from 0 within it (as `open_dataset` of that
    /// file numbers them), `offset` is the token's byte in it.
    #[error(
        "{path}: token {token} at token position {position} (byte {offset}), in document {document} of this file (counting from 0), \
         is outside the vocabulary of size {vocab_size}; {}",
        .origin.advice()
    )]
    TokenOutOfRange {
        path: PathBuf,
        token: i64,
        position: u64,
        offset: u64,
        document: u64,
        vocab_size: u64,
        origin: VocabOrigin,
    },

    #[error("{0}")]
    Invalid(String),
}

/// Where the vocabulary size that tokens were checked against came from; it
/// decides what a user should do about a token outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabOrigin {
    /// The shard's own header: the file contradicts itself.
    Recorded,
    /// The caller, standing for the model's embedding table.
    Given,
}

impl VocabOrigin {
    fn advice(self) -> &'static str {
        match self {
            VocabOrigin::Recorded => "the header records a vocabulary its tokens exceed, so the file was written wrongly: re-create it",
            VocabOrigin::Given => {
                "the data was tokenized with a larger vocabulary than the model's (or a header is wrong): \
                 set model.vocab_size to the tokenizer's vocabulary size, or re-tokenize the data with the model's tokenizer"
            }
        }
    }
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
