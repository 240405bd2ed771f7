//! Byte-level BPE encoding for corpus preparation.
//!
//! Reproduces, id for id, what Hugging Face `tokenizers` gives for byte-level BPE
//! tokenizers of the GPT-2 and Llama 3 families (see [`pretok::SUPPORTED`]), several
//! times faster: the library tracks character alignments through every step and
//! builds offsets and token strings; this does only what the ids need, and caches
//! the ids of frequent pre-tokens.
//!
//! Documents holding the text of an added token (which the library matches before
//! pre-tokenizing) are not encoded here; [`Encoder::encode_batch`] names them so that
//! the caller can hand them to the library.

pub mod bpe;
pub mod bytelevel;
pub mod jsonl;
pub mod pretok;

use std::sync::Mutex;

use aho_corasick::AhoCorasick;
use rustc_hash::FxHashMap;

pub use bpe::Bpe;
pub use pretok::PreTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
}

/// Pieces longer than this are not cached (long runs of one symbol, say).
const CACHE_PIECE_BYTES: usize = 64;
/// A cache is emptied when its entries would take more than about this much memory.
const CACHE_BYTES: usize = 32 << 20;
/// What one entry costs beyond its bytes and ids: two boxes, their allocations, the table slot.
const CACHE_ENTRY_OVERHEAD: usize = 80;

/// The ids of pre-tokens seen before, within a memory budget.
#[derive(Default)]
struct Cache {
    ids: FxHashMap<Box<[u8]>, Box<[u32]>>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, piece: &[u8], ids: &[u32]) {
        let cost = piece.len() + 4 * ids.len() + CACHE_ENTRY_OVERHEAD;
        if self.bytes + cost > CACHE_BYTES {
            self.ids.clear();
            self.bytes = 0;
        }
        self.ids.insert(piece.into(), ids.into());
        self.bytes += cost;
    }
}

pub struct Encoder {
    pretok: PreTokenizer,
    bpe: Bpe,
    added: Option<AhoCorasick>,
    /// One cache per concurrent caller (at most about 32 MB each), taken for the length of a call.
    caches: Mutex<Vec<Cache>>,
}

/// The ids of a batch of documents.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    /// Every encoded document's ids, back to back.
    pub ids: Vec<u32>,
    /// Each document's number of ids; 0 for a document left to the caller.
    pub lengths: Vec<u64>,
    /// The documents left to the caller: they contain an added token's text.
    pub deferred: Vec<usize>,
}

impl Encoder {
    /// `added`: the text of every added token (special or not) of the tokenizer.
    pub fn new(pretok: PreTokenizer, bpe: Bpe, added: &[String]) -> Result<Self, Error> {
        let added: Vec<&String> = added.iter().filter(|t| !t.is_empty()).collect();
        let added = if added.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(added).map_err(|e| Error::Unsupported(format!("added tokens: {e}")))?)
        };
        Ok(Self {
            pretok,
            bpe,
            added,
            caches: Mutex::new(Vec::new()),
        })
    }

    /// Appends the ids of `text`, without special tokens, to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut cache = self.take_cache();
        self.encode_cached(text, out, &mut cache);
        self.return_cache(cache);
    }

    /// Encodes every document as `prefix + ids + suffix`, except those containing an
    /// added token's text (see [`Batch::deferred`]).
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], prefix: &[u32], suffix: &[u32]) -> Batch {
        let mut cache = self.take_cache();
        let total: usize = texts.iter().map(|t| t.as_ref().len()).sum();
        let mut batch = Batch {
            ids: Vec::with_capacity(total / 3 + 16),
            ..Default::default()
        };
        for (i, text) in texts.iter().enumerate() {
            let text = text.as_ref();
            if self.added.as_ref().is_some_and(|a| a.is_match(text)) {
                batch.deferred.push(i);
                batch.lengths.push(0);
                continue;
            }
            let start = batch.ids.len();
            batch.ids.extend_from_slice(prefix);
            self.encode_cached(text, &mut batch.ids, &mut cache);
            batch.ids.extend_from_slice(suffix);
            batch.lengths.push((batch.ids.len() - start) as u64);
        }
        self.return_cache(cache);
        batch
    }

    /// The pre-tokens of `text` as byte ranges.
    pub fn pre_tokenize(&self, text: &str) -> Vec<(usize, usize)> {
        let mut out = vec![];
        let base = text.as_ptr() as usize;
        self.pretok.split(text, |p| {
            let start = p.as_ptr() as usize - base;
            out.push((start, start + p.len()));
        });
        out
    }

    fn encode_cached(&self, text: &str, out: &mut Vec<u32>, cache: &mut Cache) {
        self.pretok.split(text, |piece| {
            let bytes = piece.as_bytes();
            if bytes.len() > CACHE_PIECE_BYTES {
                self.bpe.encode(bytes, out);
                return;
            }
            if let Some(ids) = cache.ids.get(bytes) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            self.bpe.encode(bytes, out);
            cache.insert(bytes, &out[start..]);
        });
    }

    fn take_cache(&self) -> Cache {
        self.caches.lock().map(|mut c| c.pop()).unwrap_or(None).unwrap_or_default()
    }

    fn return_cache(&self, cache: Cache) {
        if let Ok(mut c) = self.caches.lock() {
            c.push(cache);
        }
    }
}
