//! `ember._native`: the Python face of `ember-data`. It converts types,
//! releases the GIL around work, and maps errors to exceptions; the logic lives
//! in the core crate. This module is private: `ember.data` wraps it.
//! `BpeEncoder` does the same for `ember-tok`.

mod bpe;

use std::collections::HashMap;
use std::path::PathBuf;

use ember_data::{self as core, Error, LoaderOptions, Outputs, ProbeOptions, Ticket};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyIndexError, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(_native, ShardFormatError, PyValueError, "A shard file is malformed: the message names the file and the offset or field.");

fn to_py(e: Error) -> PyErr {
    match &e {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(e.to_string()),
        Error::Invalid(_) => PyValueError::new_err(e.to_string()),
        Error::Io { .. } => PyOSError::new_err(e.to_string()),
        _ => ShardFormatError::new_err(e.to_string()),
    }
}

fn probe_options(llmc_delimiter: Option<i64>) -> ProbeOptions {
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
    /// Per shard: (path, format, dtype, num_tokens, vocab_size or None).
    fn shards(&self) -> Vec<(PathBuf, &'static str, &'static str, u64, Option<u64>)> {
        (0..self.source.num_shards())
            .map(|i| {
                let s = self.source.spec(i);
                (s.path.clone(), s.format.name(), s.dtype.numpy_name(), s.num_tokens, s.vocab_size)
            })
            .collect()
    }
    /// Document `i`: (file holding its tokens, byte offset, length in tokens, dtype).
    fn doc_location(&self, i: u64) -> PyResult<(PathBuf, u64, u64, &'static str)> {
        let n = self.source.num_docs().map_err(to_py)?;
        if i >= n {
            return Err(PyIndexError::new_err(format!("document index {i} is out of range for {n} documents")));
        }
        let (si, start, len) = self.source.doc_location(i).map_err(to_py)?;
        let spec = self.source.spec(si);
        Ok((spec.token_path.clone(), spec.token_offset + start * spec.dtype.size() as u64, len, spec.dtype.numpy_name()))
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

/// The batch pipeline. Python allocates the output tensors and passes their
/// addresses; this object keeps a reference to them until their batch is done.
#[pyclass(module = "ember._native")]
struct Loader {
    // Declared first so it drops first: dropping it finishes every queued fill
    // before the buffers below are released.
    inner: core::Loader,
    pending: HashMap<u64, (Ticket, Py<PyAny>)>,
    next_id: u64,
}

#[pymethods]
impl Loader {
    #[new]
    #[pyo3(signature = (datasets, seq_len, batch_size, *, rank=0, world_size=1, seed=0, shuffle=true, drop_last=true, num_threads=2, max_open_shards=4096, llmc_delimiter=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        datasets: Vec<(Vec<PathBuf>, f64)>,
        seq_len: usize,
        batch_size: usize,
        rank: usize,
        world_size: usize,
        seed: u64,
        shuffle: bool,
        drop_last: bool,
        num_threads: usize,
        max_open_shards: usize,
        llmc_delimiter: Option<i64>,
    ) -> PyResult<Self> {
        let opts = LoaderOptions {
            seq_len,
            batch_size,
            rank,
            world_size,
            seed,
            shuffle,
            drop_last,
            num_threads,
            max_open_shards,
            probe: probe_options(llmc_delimiter),
        };
        let inner = py.detach(|| core::Loader::new(datasets, opts)).map_err(to_py)?;
        Ok(Loader { inner, pending: HashMap::new(), next_id: 0 })
    }

    /// Plans the next batches and queues them, as one group, to be written into
    /// the given buffers. Each entry is (keepalive, input_ids, labels,
    /// position_ids, cu_seqlens): addresses of int64 / int32 memory sized for
    /// `batch_size` rows, and an object holding that memory. Returns
    /// (ticket, rows, start, end) per planned batch: fewer than given at the end
    /// of a sequential pass.
    #[allow(clippy::type_complexity)]
    fn submit(&mut self, batches: Vec<(Py<PyAny>, usize, usize, Option<usize>, Option<usize>)>) -> Vec<(u64, usize, u64, u64)> {
        let mut group = Vec::with_capacity(batches.len());
        let mut planned = Vec::with_capacity(batches.len());
        for (keepalive, input_ids, labels, position_ids, cu_seqlens) in batches {
            let Some(plan) = self.inner.next_plan() else { break };
            let out = Outputs {
                input_ids: input_ids as *mut i64,
                labels: labels as *mut i64,
                position_ids: position_ids.map(|p| p as *mut i64),
                cu_seqlens: cu_seqlens.map(|p| p as *mut i32),
            };
            planned.push((keepalive, plan.samples.len(), plan.start, plan.end));
            group.push((plan, out));
        }
        if group.is_empty() {
            return Vec::new();
        }
        // SAFETY: the Python wrapper allocates these buffers for batch_size rows,
        // and `pending` holds each keepalive until `wait` or drop.
        let tickets = unsafe { self.inner.submit_group(group) };
        let mut out = Vec::with_capacity(tickets.len());
        for (ticket, (keepalive, rows, start, end)) in tickets.into_iter().zip(planned) {
            let id = self.next_id;
            self.next_id += 1;
            self.pending.insert(id, (ticket, keepalive));
            out.push((id, rows, start, end));
        }
        out
    }

    /// Blocks, without the GIL, until batch `ticket` is written.
    /// Returns (entries written to cu_seqlens, longest document segment).
    fn wait(&mut self, py: Python<'_>, ticket: u64) -> PyResult<(usize, usize)> {
        let (t, keep) = self.pending.remove(&ticket).ok_or_else(|| PyValueError::new_err(format!("unknown batch ticket {ticket}")))?;
        let r = py.detach(|| t.wait());
        drop(keep);
        let f = r.map_err(to_py)?;
        Ok((f.num_cu_seqlens, f.max_seqlen))
    }

    /// Waits for every queued batch and forgets them.
    fn cancel_all(&mut self, py: Python<'_>) {
        let pending: Vec<_> = self.pending.drain().collect();
        py.detach(|| pending.into_iter().for_each(|(_, (t, _))| drop(t.wait())));
    }

    /// Repositions the stream at global sample `position`; queued batches are dropped.
    fn seek(&mut self, py: Python<'_>, position: u64) {
        self.cancel_all(py);
        self.inner.seek(position);
    }

    #[getter]
    fn fingerprint(&self) -> String {
        format!("{:016x}", self.inner.fingerprint())
    }
    #[getter]
    fn planned_position(&self) -> u64 {
        self.inner.planned_position()
    }
    #[getter]
    fn num_batches(&self) -> Option<u64> {
        self.inner.num_batches()
    }
    #[getter]
    fn sizes(&self) -> Vec<u64> {
        self.inner.sizes()
    }
    #[getter]
    fn num_tokens(&self) -> Vec<u64> {
        self.inner.sources().iter().map(|s| s.num_tokens()).collect()
    }
    /// Shards mapped right now, over all datasets.
    #[getter]
    fn num_open(&self) -> usize {
        self.inner.sources().iter().map(|s| s.num_open()).sum()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Buffers must outlive their fills even if Python never called `wait`.
        for (_, (t, _)) in self.pending.drain() {
            let _ = t.wait();
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardWriter>()?;
    m.add_class::<Dataset>()?;
    m.add_class::<Loader>()?;
    m.add_class::<bpe::BpeEncoder>()?;
    m.add_function(wrap_pyfunction!(bpe::jsonl_texts, m)?)?;
    m.add("SUPPORTED_PRETOKENIZER_PATTERNS", bpe::SUPPORTED_PATTERNS.to_vec())?;
    m.add("ShardFormatError", m.py().get_type::<ShardFormatError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
