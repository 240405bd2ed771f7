//! `ember._native`: the Python face of `ember-data`. It converts types,
//! releases the GIL around work, and maps errors to exceptions; the logic lives
//! in the core crate. This module is private: `ember.data` wraps it, and
//! `python/ember/_native.pyi` declares what it exports.
//! `BpeEncoder` does the same for `ember-tok`.

mod bpe;
mod buffers;
mod loader;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_data::{self as core, Error, ProbeOptions, ShardSpec};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyIndexError, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(_native, ShardFormatError, PyValueError, "A shard file is malformed: the message names the file and the offset or field.");

pub(crate) fn to_py(e: Error) -> PyErr {
    match &e {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(e.to_string()),
        Error::Invalid(_) => PyValueError::new_err(e.to_string()),
        Error::Io { .. } => PyOSError::new_err(e.to_string()),
        _ => ShardFormatError::new_err(e.to_string()),
    }
}

pub(crate) fn probe_options(llmc_delimiter: Option<i64>) -> ProbeOptions {
    ProbeOptions { llmc_delimiter }
}

#[pyclass(module = "ember._native")]
struct ShardWriter {
    inner: Option<core::ShardWriter>,
    path: PathBuf,
}

impl ShardWriter {
    fn writer(&mut self) -> PyResult<&mut core::ShardWriter> {
        let path = self.path.display().to_string();
        self.inner.as_mut().ok_or_else(|| PyValueError::new_err(format!("{path}: the shard writer is closed")))
    }
}

#[pymethods]
impl ShardWriter {
    #[new]
    fn new(path: PathBuf, vocab_size: u64) -> PyResult<Self> {
        let inner = core::ShardWriter::create(&path, vocab_size).map_err(to_py)?;
        Ok(ShardWriter { inner: Some(inner), path })
    }

    /// Appends one document given as little-endian int64 bytes.
    fn add_document_bytes(&mut self, data: &[u8]) -> PyResult<()> {
        if data.len() % 8 != 0 {
            return Err(PyValueError::new_err("document bytes must be int64 values"));
        }
        let tokens: Vec<i64> = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        self.writer()?.add_document(&tokens).map_err(to_py)
    }

    fn finish(&mut self) -> PyResult<PathBuf> {
        match self.inner.take() {
            Some(w) => w.finish().map_err(to_py),
            None => Ok(self.path.clone()),
        }
    }

    fn abort(&mut self) {
        if let Some(w) = self.inner.take() {
            w.abort();
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }
    #[getter]
    fn num_docs(&mut self) -> PyResult<u64> {
        Ok(self.writer()?.num_docs())
    }
    #[getter]
    fn num_tokens(&mut self) -> PyResult<u64> {
        Ok(self.writer()?.num_tokens())
    }
    #[getter]
    fn dtype(&mut self) -> PyResult<&'static str> {
        Ok(self.writer()?.dtype().numpy_name())
    }
}

/// One dataset: a shard, a Megatron pair, an llm.c file, or a directory of shards.
#[pyclass(module = "ember._native", frozen)]
struct Dataset {
    source: core::Source,
}

#[pymethods]
impl Dataset {
    #[new]
    #[pyo3(signature = (paths, *, llmc_delimiter=None, max_open_shards=4096))]
    fn new(py: Python<'_>, paths: Vec<PathBuf>, llmc_delimiter: Option<i64>, max_open_shards: usize) -> PyResult<Self> {
        let opts = probe_options(llmc_delimiter);
        let source = py.detach(|| core::Source::open(&paths, &opts, max_open_shards)).map_err(to_py)?;
        Ok(Dataset { source })
    }

    #[getter]
    fn num_tokens(&self) -> u64 {
        self.source.num_tokens()
    }
    #[getter]
    fn num_shards(&self) -> usize {
        self.source.num_shards()
    }
    #[getter]
    fn num_open(&self) -> usize {
        self.source.num_open()
    }
    fn num_docs(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.source.num_docs()).map_err(to_py)
    }
    /// One `ShardInfo` per shard, in stream order.
    fn shards(&self) -> Vec<ShardInfo> {
        (0..self.source.num_shards()).map(|i| ShardInfo { spec: self.source.spec(i).clone() }).collect()
    }
    /// Where document `i` lies, for a zero-copy view of the mapped file.
    fn doc_location(&self, i: u64) -> PyResult<DocLocation> {
        let n = self.source.num_docs().map_err(to_py)?;
        if i >= n {
            return Err(PyIndexError::new_err(format!("document index {i} is out of range for {n} documents")));
        }
        let (si, start, length) = self.source.doc_location(i).map_err(to_py)?;
        let spec = self.source.spec(si).clone();
        let offset = spec.token_offset + start * spec.dtype.size() as u64;
        Ok(DocLocation { spec, offset, length })
    }
    #[pyo3(signature = (check_tokens=false, vocab_size=None))]
    fn validate(&self, py: Python<'_>, check_tokens: bool, vocab_size: Option<u64>) -> PyResult<()> {
        py.detach(|| self.source.validate(check_tokens, vocab_size)).map_err(to_py)
    }
    /// Stream tokens `start .. start + count`, widened to int.
    fn read_tokens(&self, py: Python<'_>, start: u64, count: usize) -> PyResult<Vec<i64>> {
        let mut out = vec![0i64; count];
        py.detach(|| self.source.read_tokens(start, &mut out)).map_err(to_py)?;
        Ok(out)
    }
}

/// `path` as Python's `repr` writes a string.
fn quoted(py: Python<'_>, path: &Path) -> PyResult<String> {
    Ok(path.into_pyobject(py)?.str()?.repr()?.to_string())
}

/// One shard of a `Dataset`, as its header describes it.
#[pyclass(module = "ember._native", frozen)]
struct ShardInfo {
    spec: Arc<ShardSpec>,
}

#[pymethods]
impl ShardInfo {
    /// The path that names the shard (for Megatron, the `.idx` file).
    #[getter]
    fn path(&self) -> &PathBuf {
        &self.spec.path
    }
    #[getter]
    fn format(&self) -> &'static str {
        self.spec.format.name()
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.spec.dtype.numpy_name()
    }
    #[getter]
    fn num_tokens(&self) -> u64 {
        self.spec.num_tokens
    }
    /// The tokenizer vocabulary size the shard records; None where the format has none.
    #[getter]
    fn vocab_size(&self) -> Option<u64> {
        self.spec.vocab_size
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = &self.spec;
        let vocab = s.vocab_size.map_or_else(|| "None".to_owned(), |v| v.to_string());
        Ok(format!(
            "ShardInfo(path={}, format='{}', dtype='{}', num_tokens={}, vocab_size={vocab})",
            quoted(py, &s.path)?,
            s.format.name(),
            s.dtype.numpy_name(),
            s.num_tokens
        ))
    }
}

/// Where one document's tokens lie: `length` values of `dtype` from byte `offset` of `path`.
// Built for every `TokenDataset[i]`: it shares the shard's description rather
// than copying the path, and converts fields only when Python reads them.
#[pyclass(module = "ember._native", frozen)]
struct DocLocation {
    spec: Arc<ShardSpec>,
    offset: u64,
    length: u64,
}

#[pymethods]
impl DocLocation {
    /// The file that holds the tokens (for Megatron, the `.bin` file), as a `str`:
    /// building a `pathlib.Path` would double the cost of `TokenDataset[i]`.
    #[getter(path)]
    fn token_path(&self) -> &OsStr {
        self.spec.token_path.as_os_str()
    }
    /// Byte offset of the document's first token in `path`.
    #[getter]
    fn offset(&self) -> u64 {
        self.offset
    }
    /// Length in tokens.
    #[getter]
    fn length(&self) -> u64 {
        self.length
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.spec.dtype.numpy_name()
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "DocLocation(path={}, offset={}, length={}, dtype='{}')",
            quoted(py, &self.spec.token_path)?,
            self.offset,
            self.length,
            self.spec.dtype.numpy_name()
        ))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardWriter>()?;
    m.add_class::<Dataset>()?;
    m.add_class::<ShardInfo>()?;
    m.add_class::<DocLocation>()?;
    m.add_class::<loader::Loader>()?;
    m.add_class::<loader::BatchBuffers>()?;
    m.add_class::<loader::PlannedBatch>()?;
    m.add_class::<loader::FilledBatch>()?;
    m.add_class::<bpe::BpeEncoder>()?;
    m.add_class::<bpe::EncodedBatch>()?;
    m.add_function(wrap_pyfunction!(bpe::jsonl_texts, m)?)?;
    m.add("SUPPORTED_PRETOKENIZER_PATTERNS", bpe::SUPPORTED_PATTERNS.to_vec())?;
    m.add("ShardFormatError", m.py().get_type::<ShardFormatError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
