//! `ember-tok` for `ember prepare`: `BpeEncoder` (byte-level BPE) and `jsonl_texts`.

use std::collections::HashMap;

use ember_tok::bytelevel::Alphabet;
use ember_tok::{Bpe, Encoder, PreTokenizer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// The pre-tokenizer regexes `BpeEncoder` reproduces, by name.
pub const SUPPORTED_PATTERNS: [(&str, &str); 3] = [
    ("gpt2", ember_tok::pretok::GPT2),
    ("llama3", ember_tok::pretok::LLAMA3),
    ("cl100k_single_digits", ember_tok::pretok::CL100K_SINGLE_DIGITS),
];

fn unsupported(e: ember_tok::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Little-endian bytes of `values`, as a Python `bytes`.
fn le_bytes<'py, T: Copy, const N: usize>(py: Python<'py>, values: &[T], to_le: fn(T) -> [u8; N]) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, values.len() * N, |buf| {
        for (chunk, v) in buf.chunks_exact_mut(N).zip(values) {
            chunk.copy_from_slice(&to_le(*v));
        }
        Ok(())
    })
}

/// What `BpeEncoder.encode_batch` returns. The ids come as bytes so that NumPy
/// reads them with `frombuffer`, without a Python int per token.
#[pyclass(module = "ember._native", frozen, get_all)]
pub struct EncodedBatch {
    /// Every document's ids, one after another, as little-endian uint32.
    ids: Py<PyBytes>,
    /// Each document's length in ids, as little-endian uint64.
    lengths: Py<PyBytes>,
    /// Indices of the documents left undone (length 0) because they hold an
    /// added token's text: the caller encodes those itself.
    deferred: Vec<usize>,
}

#[pymethods]
impl EncodedBatch {
    fn __repr__(&self, py: Python<'_>) -> String {
        let n = self.lengths.bind(py).as_bytes().len() / 8;
        let ids = self.ids.bind(py).as_bytes().len() / 4;
        format!("EncodedBatch(documents={n}, ids={ids}, deferred={:?})", self.deferred)
    }
}

#[pyclass(module = "ember._native", frozen)]
pub struct BpeEncoder {
    inner: Encoder,
}

impl BpeEncoder {
    fn build(
        py: Python<'_>,
        vocab: Vec<(Vec<u8>, u32)>,
        merges: Vec<(Vec<u8>, Vec<u8>)>,
        pattern: &str,
        ignore_merges: bool,
        added: Vec<String>,
    ) -> PyResult<Self> {
        let pattern = pattern.to_owned();
        let inner = py
            .detach(move || -> Result<Encoder, ember_tok::Error> {
                let pretok = PreTokenizer::new(&pattern)?;
                let bpe = Bpe::new(&vocab, &merges, ignore_merges)?;
                Encoder::new(pretok, bpe, &added)
            })
            .map_err(unsupported)?;
        Ok(Self { inner })
    }
}

#[pymethods]
impl BpeEncoder {
    /// `vocab`: (token bytes, id) pairs; `merges`: (left bytes, right bytes) in rank
    /// order; `pattern`: the pre-tokenizer regex; `added`: every added token's text.
    #[new]
    #[pyo3(signature = (vocab, merges, pattern, *, ignore_merges=false, added=Vec::new()))]
    fn new(
        py: Python<'_>,
        vocab: Vec<(Bound<'_, PyBytes>, u32)>,
        merges: Vec<(Bound<'_, PyBytes>, Bound<'_, PyBytes>)>,
        pattern: &str,
        ignore_merges: bool,
        added: Vec<String>,
    ) -> PyResult<Self> {
        // Copied out of the `bytes` objects at once: extracting `Vec<u8>` goes element by element.
        let vocab: Vec<(Vec<u8>, u32)> = vocab.iter().map(|(t, i)| (t.as_bytes().to_vec(), *i)).collect();
        let merges: Vec<(Vec<u8>, Vec<u8>)> = merges.iter().map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec())).collect();
        Self::build(py, vocab, merges, pattern, ignore_merges, added)
    }

    /// The same from a `tokenizer.json` BPE model as it stands: `vocab` maps tokens
    /// spelled in the byte-level alphabet to ids; `merges` holds `"left right"`
    /// strings or `[left, right]` pairs. Tokens outside the alphabet are left out of
    /// the vocabulary (no merge can produce them); a merge of such tokens is refused.
    #[staticmethod]
    #[pyo3(signature = (vocab, merges, pattern, *, ignore_merges=false, added=Vec::new()))]
    fn from_byte_level(
        py: Python<'_>,
        vocab: HashMap<String, u32>,
        merges: Vec<Bound<'_, PyAny>>,
        pattern: &str,
        ignore_merges: bool,
        added: Vec<String>,
    ) -> PyResult<Self> {
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let pair = if let Ok(s) = m.cast::<PyString>() {
                let s = s.to_str()?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| PyValueError::new_err(format!("unsupported tokenizer: merge {rank} ({s:?}) is not two tokens")))?;
                (a.to_owned(), b.to_owned())
            } else {
                match m.extract::<Vec<String>>() {
                    Ok(v) if v.len() == 2 => (v[0].clone(), v[1].clone()),
                    _ => {
                        return Err(PyValueError::new_err(format!(
                            "unsupported tokenizer: merge {rank} is neither a string nor a pair"
                        )))
                    }
                }
            };
            pairs.push(pair);
        }
        let (vocab, merges) = py
            .detach(move || -> Result<_, String> {
                let alphabet = Alphabet::default();
                let vocab: Vec<(Vec<u8>, u32)> = vocab.iter().filter_map(|(t, i)| Some((alphabet.decode(t)?, *i))).collect();
                let mut merges = Vec::with_capacity(pairs.len());
                for (rank, (a, b)) in pairs.iter().enumerate() {
                    match (alphabet.decode(a), alphabet.decode(b)) {
                        (Some(a), Some(b)) => merges.push((a, b)),
                        _ => return Err(format!("unsupported tokenizer: merge {rank} ({a:?} {b:?}) is not byte-level")),
                    }
                }
                Ok((vocab, merges))
            })
            .map_err(PyValueError::new_err)?;
        Self::build(py, vocab, merges, pattern, ignore_merges, added)
    }

    /// Encodes `texts`, each between `prefix` and `suffix`, without the GIL.
    #[pyo3(signature = (texts, prefix=Vec::new(), suffix=Vec::new()))]
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>, prefix: Vec<u32>, suffix: Vec<u32>) -> PyResult<EncodedBatch> {
        let batch = py.detach(|| self.inner.encode_batch(&texts, &prefix, &suffix));
        Ok(EncodedBatch {
            ids: le_bytes(py, &batch.ids, u32::to_le_bytes)?.unbind(),
            lengths: le_bytes(py, &batch.lengths, u64::to_le_bytes)?.unbind(),
            deferred: batch.deferred,
        })
    }

    /// The ids of one text, without special tokens (added tokens' text included as plain text).
    fn encode(&self, py: Python<'_>, text: String) -> Vec<u32> {
        let mut out = vec![];
        py.detach(|| self.inner.encode_into(&text, &mut out));
        out
    }

    /// The pre-tokens of `text` as (start, end) character offsets.
    fn pre_tokenize(&self, text: &str) -> Vec<(usize, usize)> {
        let spans = self.inner.pre_tokenize(text);
        // Byte offsets to character offsets.
        let mut chars_before = vec![0usize; text.len() + 1];
        let mut count = 0;
        for (i, _) in text.char_indices() {
            chars_before[i] = count;
            count += 1;
        }
        chars_before[text.len()] = count;
        spans.into_iter().map(|(s, e)| (chars_before[s], chars_before[e])).collect()
    }
}

/// The text field of each JSON Lines record in `lines`, with its length in UTF-8
/// bytes; `(None, 0)` for a line to be read by Python's own parser (malformed, not an
/// object, field missing or not a string, non-standard JSON). Parses without the GIL.
#[pyfunction]
pub fn jsonl_texts(py: Python<'_>, lines: Vec<Bound<'_, PyBytes>>, key: &str) -> (Vec<Option<String>>, Vec<usize>) {
    let raw: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    let texts: Vec<Option<String>> = py.detach(|| raw.iter().map(|l| ember_tok::jsonl::text_field(l, key)).collect());
    let lengths = texts.iter().map(|t| t.as_ref().map_or(0, String::len)).collect();
    (texts, lengths)
}
