//! `Loader`: the batch pipeline, and the named types that cross its boundary.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::path::PathBuf;

use ember_data::{self as core, Filled, LoaderOptions, Outputs, Ticket};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::buffers::{out_array, Element};
use crate::{probe_options, to_py};

/// The arrays one batch is written into. Python allocates them; the loader keeps
/// this object, and so the arrays, until the batch is done. Frozen, so that the
/// arrays a queued batch is written into cannot be swapped for others.
#[pyclass(module = "ember._native", frozen)]
pub struct BatchBuffers {
    #[pyo3(get)]
    input_ids: Py<PyAny>,
    #[pyo3(get)]
    labels: Py<PyAny>,
    #[pyo3(get)]
    position_ids: Option<Py<PyAny>>,
    #[pyo3(get)]
    cu_seqlens: Option<Py<PyAny>>,
}

#[pymethods]
impl BatchBuffers {
    #[new]
    #[pyo3(signature = (input_ids, labels, *, position_ids=None, cu_seqlens=None))]
    fn new(input_ids: Py<PyAny>, labels: Py<PyAny>, position_ids: Option<Py<PyAny>>, cu_seqlens: Option<Py<PyAny>>) -> Self {
        BatchBuffers { input_ids, labels, position_ids, cu_seqlens }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let describe = |a: Option<&Py<PyAny>>| match a {
            None => "None".to_owned(),
            Some(a) => {
                let a = a.bind(py);
                let kind = a.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
                match a.getattr("shape").and_then(|s| s.repr()) {
                    Ok(shape) => format!("<{kind} {shape}>"),
                    Err(_) => format!("<{kind}>"),
                }
            }
        };
        format!(
            "BatchBuffers(input_ids={}, labels={}, position_ids={}, cu_seqlens={})",
            describe(Some(&self.input_ids)),
            describe(Some(&self.labels)),
            describe(self.position_ids.as_ref()),
            describe(self.cu_seqlens.as_ref())
        )
    }
}

/// The memory a batch's fill writes, by argument name.
type Regions = Vec<(&'static str, Range<usize>)>;

impl BatchBuffers {
    /// Checks each array's element type, layout, writability and length for a
    /// batch of `batch_size` rows of `seq_len` tokens, and gives their addresses.
    fn outputs(&self, py: Python<'_>, batch_size: usize, seq_len: usize) -> PyResult<(Outputs, Regions)> {
        let tokens = batch_size * seq_len;
        let shape = (batch_size, seq_len);
        let mut regions = Regions::new();
        let input_ids = sized::<i64>(self.input_ids.bind(py), "input_ids", tokens, shape, &mut regions)?;
        let labels = sized::<i64>(self.labels.bind(py), "labels", tokens, shape, &mut regions)?;
        let position_ids = match &self.position_ids {
            Some(a) => Some(sized::<i64>(a.bind(py), "position_ids", tokens, shape, &mut regions)?),
            None => None,
        };
        let cu_seqlens = match &self.cu_seqlens {
            Some(a) => Some(sized::<i32>(a.bind(py), "cu_seqlens", tokens + 1, shape, &mut regions)?),
            None => None,
        };
        Ok((Outputs { input_ids, labels, position_ids, cu_seqlens }, regions))
    }
}

/// Checks one array, which must hold exactly `needed` values, and records the memory it covers.
fn sized<T: Element>(
    obj: &Bound<'_, PyAny>,
    name: &'static str,
    needed: usize,
    (batch_size, seq_len): (usize, usize),
    regions: &mut Regions,
) -> PyResult<*mut T> {
    let a = out_array::<T>(obj, name)?;
    if a.len != needed {
        return Err(PyValueError::new_err(format!(
            "{name}: holds {} values; a batch of {batch_size} rows of {seq_len} tokens needs {needed}",
            a.len
        )));
    }
    regions.push((name, a.bytes()));
    Ok(a.ptr)
}

/// A batch `Loader.submit` queued.
#[pyclass(module = "ember._native", frozen, get_all)]
pub struct PlannedBatch {
    /// What to pass to `Loader.wait`.
    ticket: u64,
    /// Rows it fills: `batch_size`, or fewer at the end of a sequential pass.
    rows: usize,
    /// Global sample positions before and after its global batch.
    start: u64,
    end: u64,
}

#[pymethods]
impl PlannedBatch {
    fn __repr__(&self) -> String {
        format!("PlannedBatch(ticket={}, rows={}, start={}, end={})", self.ticket, self.rows, self.start, self.end)
    }
}

/// What a finished batch reports besides the arrays it filled.
#[pyclass(module = "ember._native", frozen, get_all)]
pub struct FilledBatch {
    /// Entries written to `cu_seqlens` (0 without it).
    num_cu_seqlens: usize,
    /// Longest document segment in the batch.
    max_seqlen: usize,
}

#[pymethods]
impl FilledBatch {
    fn __repr__(&self) -> String {
        format!("FilledBatch(num_cu_seqlens={}, max_seqlen={})", self.num_cu_seqlens, self.max_seqlen)
    }
}

struct Pending {
    ticket: Ticket,
    /// Holds the arrays alive while a worker writes into them.
    buffers: Py<BatchBuffers>,
    regions: Regions,
}

/// The batch pipeline. Python allocates the output arrays and passes them in
/// `BatchBuffers`; this object keeps them until their batch is done.
#[pyclass(module = "ember._native")]
pub struct Loader {
    // Declared first so it drops first: dropping it finishes every queued fill
    // before the buffers below are released.
    inner: core::Loader,
    pending: HashMap<u64, Pending>,
    next_id: u64,
}

#[pymethods]
impl Loader {
    #[new]
    #[pyo3(signature = (datasets, seq_len, batch_size, *, rank=0, world_size=1, seed=0, shuffle=true, drop_last=true, num_threads=2, max_open_shards=4096, llmc_delimiter=None, vocab_size=None))]
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
        vocab_size: Option<u64>,
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
            vocab_size,
        };
        let inner = py.detach(|| core::Loader::new(datasets, opts)).map_err(to_py)?;
        Ok(Loader { inner, pending: HashMap::new(), next_id: 0 })
    }

    /// Plans the next batches and queues them, as one group, to be written into
    /// the given buffers: one `PlannedBatch` per planned batch, fewer than given
    /// at the end of a sequential pass.
    fn submit(&mut self, py: Python<'_>, batches: Vec<Py<BatchBuffers>>) -> PyResult<Vec<PlannedBatch>> {
        let (batch_size, seq_len) = (self.inner.options().batch_size, self.inner.options().seq_len);
        // Every array is checked before any batch is planned, so a refusal leaves
        // the stream where it was.
        let mut outputs = Vec::with_capacity(batches.len());
        for b in &batches {
            outputs.push(b.get().outputs(py, batch_size, seq_len)?);
        }
        self.check_disjoint(&outputs)?;

        let mut group = Vec::with_capacity(batches.len());
        let mut planned = Vec::with_capacity(batches.len());
        for (buffers, (out, regions)) in batches.into_iter().zip(outputs) {
            let Some(plan) = self.inner.next_plan() else { break };
            planned.push((buffers, regions, plan.samples.len(), plan.start, plan.end));
            group.push((plan, out));
        }
        if group.is_empty() {
            return Ok(Vec::new());
        }
        // SAFETY: `submit_group` needs memory that stays valid, and that nothing
        // else touches, until each ticket completes.
        // What this method guarantees: `outputs` accepted only arrays whose type
        // is exactly `numpy.ndarray`, writable, C-contiguous, aligned and exactly
        // as long as a batch of `batch_size` rows of `seq_len` tokens needs, so
        // each fill stays inside memory NumPy itself lets Python write through them;
        // `check_disjoint` found no byte shared by two fills, new or queued; and
        // `pending` holds each (frozen) `BatchBuffers` until `wait`, `cancel_all`,
        // `seek` or drop has waited for its fill. An ndarray keeps its memory
        // alive while it lives: its own allocation, or its `base` (for a
        // `.numpy()` view, the tensor, which holds its storage).
        // What the caller promises, as the `BatchBuffers` docstring in
        // `python/ember/_native.pyi` and docs/data-loader.md state: until the batch
        // is waited for, the memory behind the arrays is neither resized nor
        // reallocated (`ndarray.resize(refcheck=False)`, `Tensor.resize_`,
        // `Tensor.set_`), nor read or written. NumPy's unchecked constructors
        // (`as_strided`, an ndarray over a foreign `__array_interface__`) can make
        // an array that names memory it does not hold; writing through one is as
        // unsound here as it is in NumPy.
        let tickets = unsafe { self.inner.submit_group(group) };
        let mut out = Vec::with_capacity(tickets.len());
        for (ticket, (buffers, regions, rows, start, end)) in tickets.into_iter().zip(planned) {
            let id = self.next_id;
            self.next_id += 1;
            self.pending.insert(id, Pending { ticket, buffers, regions });
            out.push(PlannedBatch { ticket: id, rows, start, end });
        }
        Ok(out)
    }

    /// Blocks, without the GIL, until batch `ticket` is written; raises its error, if it had
    /// one (a token outside `vocab_size`: `ShardFormatError`), only here, for this batch.
    fn wait(&mut self, py: Python<'_>, ticket: u64) -> PyResult<FilledBatch> {
        let p = self.pending.remove(&ticket).ok_or_else(|| PyValueError::new_err(format!("unknown batch ticket {ticket}")))?;
        let f = settle(py, vec![p]).pop().expect("one result per batch").map_err(to_py)?;
        Ok(FilledBatch { num_cu_seqlens: f.num_cu_seqlens, max_seqlen: f.max_seqlen })
    }

    /// Waits for every queued batch and forgets them.
    fn cancel_all(&mut self, py: Python<'_>) {
        settle(py, self.pending.drain().map(|(_, p)| p).collect());
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

impl Loader {
    /// Refuses arrays that share memory with each other or with a batch still
    /// queued: two fills writing the same bytes would race.
    fn check_disjoint(&self, outputs: &[(Outputs, Regions)]) -> PyResult<()> {
        let mut all: Vec<(Range<usize>, &'static str, Option<usize>)> = Vec::new();
        for p in self.pending.values() {
            all.extend(p.regions.iter().map(|(name, r)| (r.clone(), *name, None)));
        }
        for (i, (_, regions)) in outputs.iter().enumerate() {
            all.extend(regions.iter().map(|(name, r)| (r.clone(), *name, Some(i))));
        }
        all.retain(|(r, _, _)| !r.is_empty());
        all.sort_by_key(|(r, _, _)| r.start);
        let which = |name: &str, batch: Option<usize>| match batch {
            Some(i) => format!("{name} of batch {i} of this call"),
            None => format!("{name} of a batch still queued"),
        };
        for w in all.windows(2) {
            let ((a, an, ab), (b, bn, bb)) = (&w[0], &w[1]);
            if b.start < a.end {
                let (first, second) = (which(an, *ab), which(bn, *bb));
                return Err(PyValueError::new_err(format!("{second} shares memory with {first}; each batch needs arrays of its own")));
            }
        }
        Ok(())
    }
}

/// Waits for `batches`' fills without the GIL, then releases their arrays with it
/// held: a `Py` dropped without the GIL would only be queued for a later release.
fn settle(py: Python<'_>, batches: Vec<Pending>) -> Vec<core::Result<Filled>> {
    let (tickets, buffers): (Vec<Ticket>, Vec<Py<BatchBuffers>>) = batches.into_iter().map(|p| (p.ticket, p.buffers)).unzip();
    // Should a wait panic, later fills may still be writing: the arrays are then
    // leaked rather than freed under them.
    let buffers = ManuallyDrop::new(buffers);
    let results = py.detach(|| tickets.into_iter().map(Ticket::wait).collect());
    drop(ManuallyDrop::into_inner(buffers));
    results
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Buffers must outlive their fills even if Python never called `wait`.
        // Python drops a `Loader` from its deallocator, which holds the GIL, so
        // `attach` here only takes a token for the GIL already held.
        let pending: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        if !pending.is_empty() {
            Python::attach(|py| settle(py, pending));
        }
    }
}
