//! Batches: which samples each rank reads, and background threads that copy
//! them out of the mapped shards into caller-owned buffers.
//!
//! The caller (the Python binding) owns the output memory, typically pinned
//! torch tensors, and hands raw pointers to [`Loader::submit`]; a worker fills
//! them while the caller computes, and [`Ticket::wait`] says when it is done.
//! The caller must keep the buffers alive until then; dropping the `Loader`
//! finishes every queued job before it returns.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};

use crate::error::{Error, Result};
use crate::format::ProbeOptions;
use crate::permute::mix;
use crate::sampler::{SampleRef, Sampler};
use crate::source::Source;

#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub seq_len: usize,
    /// Samples per rank per batch (the micro-batch).
    pub batch_size: usize,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    /// Seeded random order with endless epochs; `false` reads once, in order.
    pub shuffle: bool,
    /// In sequential mode, drop a last global batch that is not full.
    pub drop_last: bool,
    pub num_threads: usize,
    /// Most shards mapped at once, per dataset.
    pub max_open_shards: usize,
    pub probe: ProbeOptions,
    /// The model's vocabulary: a batch holding a token id outside `0..vocab_size`
    /// fails, naming it, rather than reaching the embedding. `None` checks nothing.
    pub vocab_size: Option<u64>,
}

/// One rank's share of one global batch.
#[derive(Debug, Clone)]
pub struct Plan {
    pub samples: Vec<SampleRef>,
    /// Global sample positions before and after this global batch.
    pub start: u64,
    pub end: u64,
}

/// Where a batch goes. Row-major `(rows, seq_len)` arrays; `cu_seqlens` has
/// room for `rows * seq_len + 1` entries.
#[derive(Debug, Clone, Copy)]
pub struct Outputs {
    pub input_ids: *mut i64,
    pub labels: *mut i64,
    pub position_ids: Option<*mut i64>,
    pub cu_seqlens: Option<*mut i32>,
}

// SAFETY: the pointers refer to buffers the submitter keeps alive and does not
// touch until the job's ticket reports completion.
unsafe impl Send for Outputs {}

/// What a filled batch reports besides the buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Entries written to `cu_seqlens`.
    pub num_cu_seqlens: usize,
    /// Longest document segment in the batch.
    pub max_seqlen: usize,
}

struct Slot {
    result: Mutex<Option<Result<Filled>>>,
    done: Condvar,
}

pub struct Ticket(Arc<Slot>);

impl Ticket {
    /// Blocks until the job is done.
    pub fn wait(self) -> Result<Filled> {
        let mut r = self.0.result.lock().unwrap();
        loop {
            if let Some(done) = r.take() {
                return done;
            }
            r = self.0.done.wait(r).unwrap();
        }
    }
}

/// Batches handed to one worker together: one wake-up of a sleeping thread
/// costs about as much as filling a batch, so the consumer submits in groups.
struct Job {
    items: Vec<(Plan, Outputs, Arc<Slot>)>,
}

pub struct Loader {
    opts: LoaderOptions,
    shared: Arc<Shared>,
    sampler: Sampler,
    /// The datasets' weights, for the fingerprint.
    weights: Vec<f64>,
    sender: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    sources: Vec<Source>,
    seq_len: usize,
    vocab_size: Option<u64>,
}

impl Loader {
    /// `datasets`: each a list of paths (files, prefixes or directories) with its weight.
    pub fn new(datasets: Vec<(Vec<PathBuf>, f64)>, opts: LoaderOptions) -> Result<Self> {
        if opts.seq_len == 0 || opts.batch_size == 0 {
            return Err(Error::Invalid(format!("seq_len ({}) and batch_size ({}) must be positive", opts.seq_len, opts.batch_size)));
        }
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(Error::Invalid(format!("rank {} is not in 0..world_size ({})", opts.rank, opts.world_size)));
        }
        if opts.vocab_size == Some(0) {
            return Err(Error::Invalid("vocab_size must be positive, got 0".into()));
        }
        let mut sources = Vec::new();
        let mut weights = Vec::new();
        let mut sizes = Vec::new();
        for (paths, w) in datasets {
            let src = Source::open(&paths, &opts.probe, opts.max_open_shards)?;
            let n = src.num_tokens().saturating_sub(1) / opts.seq_len as u64;
            if n == 0 {
                return Err(Error::Invalid(format!(
                    "{}: {} tokens is fewer than one sample of seq_len + 1 = {} tokens",
                    src.name(),
                    src.num_tokens(),
                    opts.seq_len + 1
                )));
            }
            sizes.push(n);
            weights.push(w);
            sources.push(src);
        }
        let sampler = Sampler::new(sizes, weights.clone(), opts.seed, opts.shuffle)?;
        let shared = Arc::new(Shared { sources, seq_len: opts.seq_len, vocab_size: opts.vocab_size });
        let (sender, receiver) = unbounded::<Job>();
        let workers = (0..opts.num_threads.max(1))
            .map(|i| {
                let rx = receiver.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ember-loader-{i}"))
                    .spawn(move || {
                        // Drains the queue even after the sender is gone, so that
                        // every submitted buffer is finished before the Loader drops.
                        for job in rx.iter() {
                            for (plan, out, slot) in job.items {
                                let r = shared.fill(&plan, out);
                                *slot.result.lock().unwrap() = Some(r);
                                slot.done.notify_all();
                            }
                        }
                    })
                    .expect("spawning a loader thread")
            })
            .collect();
        Ok(Loader { opts, shared, sampler, weights, sender: Some(sender), workers })
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }
    pub fn sources(&self) -> &[Source] {
        &self.shared.sources
    }
    pub fn global_batch(&self) -> u64 {
        (self.opts.batch_size * self.opts.world_size) as u64
    }
    /// Global samples drawn by `next_plan` so far.
    pub fn planned_position(&self) -> u64 {
        self.sampler.position()
    }
    /// Samples per dataset.
    pub fn sizes(&self) -> Vec<u64> {
        self.shared.sources.iter().map(|s| s.num_tokens().saturating_sub(1) / self.opts.seq_len as u64).collect()
    }
    /// Batches per rank in one sequential pass; `None` when shuffling.
    pub fn num_batches(&self) -> Option<u64> {
        let total = self.sampler.len()?;
        let g = self.global_batch();
        Some(if self.opts.drop_last { total / g } else { total.div_ceil(g) })
    }

    pub fn seek(&mut self, position: u64) {
        self.sampler.seek(position);
    }

    /// Identifies the sample stream: the datasets, their weights, `seq_len` and seed.
    pub fn fingerprint(&self) -> u64 {
        let mut h = mix(self.opts.seq_len as u64 ^ (self.opts.shuffle as u64) << 63);
        let total: f64 = self.weights.iter().sum();
        for (src, w) in self.shared.sources.iter().zip(&self.weights) {
            h = mix(h ^ src.fingerprint());
            h = mix(h ^ (w / total).to_bits());
        }
        h
    }

    /// This rank's slice of the next global batch; `None` at the end of a sequential pass.
    pub fn next_plan(&mut self) -> Option<Plan> {
        let start = self.sampler.position();
        let g = self.global_batch();
        if let Some(total) = self.sampler.len() {
            let left = total.saturating_sub(start);
            if left == 0 || (self.opts.drop_last && left < g) {
                return None;
            }
        }
        let lo = (self.opts.rank * self.opts.batch_size) as u64;
        let hi = lo + self.opts.batch_size as u64;
        let mut samples = Vec::with_capacity(self.opts.batch_size);
        for i in 0..g {
            let Some(s) = self.sampler.next_sample() else { break };
            if (lo..hi).contains(&i) {
                samples.push(s);
            }
        }
        Some(Plan { samples, start, end: self.sampler.position() })
    }

    /// Queues `plan` to be written into `out` by a worker thread.
    ///
    /// # Safety
    /// The buffers behind `out` must be large enough for `plan` and stay valid,
    /// and untouched by the caller, until the ticket completes.
    pub unsafe fn submit(&self, plan: Plan, out: Outputs) -> Ticket {
        self.submit_group(vec![(plan, out)]).pop().unwrap()
    }

    /// Queues several batches for one worker, filled in order.
    ///
    /// # Safety
    /// As for [`Loader::submit`], for every item.
    pub unsafe fn submit_group(&self, batches: Vec<(Plan, Outputs)>) -> Vec<Ticket> {
        let mut tickets = Vec::with_capacity(batches.len());
        let items = batches
            .into_iter()
            .map(|(plan, out)| {
                let slot = Arc::new(Slot { result: Mutex::new(None), done: Condvar::new() });
                tickets.push(Ticket(slot.clone()));
                (plan, out, slot)
            })
            .collect();
        self.sender.as_ref().unwrap().send(Job { items }).expect("loader threads are running");
        tickets
    }

    /// Fills `out` on the calling thread.
    ///
    /// # Safety
    /// As for [`Loader::submit`].
    pub unsafe fn fill_now(&self, plan: &Plan, out: Outputs) -> Result<Filled> {
        self.shared.fill(plan, out)
    }

    /// Reads one sample's `seq_len + 1` tokens (for tests and inspection).
    pub fn sample_tokens(&self, s: SampleRef) -> Result<Vec<i64>> {
        let mut v = vec![0; self.opts.seq_len + 1];
        self.shared.sources[s.dataset as usize].read_tokens(s.id * self.opts.seq_len as u64, &mut v)?;
        Ok(v)
    }
}

impl Shared {
    fn fill(&self, plan: &Plan, out: Outputs) -> Result<Filled> {
        let l = self.seq_len;
        let rows = plan.samples.len();
        // SAFETY: `submit`'s contract: the caller owns these buffers and sized them for `rows`.
        let input = unsafe { std::slice::from_raw_parts_mut(out.input_ids, rows * l) };
        let labels = unsafe { std::slice::from_raw_parts_mut(out.labels, rows * l) };
        let mut position_ids = out.position_ids.map(|p| unsafe { std::slice::from_raw_parts_mut(p, rows * l) });
        let mut cu = out.cu_seqlens.map(|p| unsafe { std::slice::from_raw_parts_mut(p, rows * l + 1) });
        let mut filled = Filled::default();
        if let Some(cu) = cu.as_deref_mut() {
            cu[0] = 0;
            filled.num_cu_seqlens = 1;
        }
        let mut breaks = Vec::new();
        for (r, s) in plan.samples.iter().enumerate() {
            let src = &self.sources[s.dataset as usize];
            let start = s.id * l as u64;
            let row = r * l..(r + 1) * l;
            // Every id handed out is read here once: the row, then the one label past it.
            src.read_tokens_checked(start, &mut input[row.clone()], self.vocab_size)?;
            labels[row.start..row.end - 1].copy_from_slice(&input[row.start + 1..row.end]);
            src.read_tokens_checked(start + l as u64, &mut labels[row.end - 1..row.end], self.vocab_size)?;
            if position_ids.is_none() && cu.is_none() {
                continue;
            }
            breaks.clear();
            src.doc_breaks(start, l as u64, |b| breaks.push(b as usize))?;
            breaks.push(l);
            if let Some(pos) = position_ids.as_deref_mut() {
                let mut from = 0;
                for &b in &breaks {
                    for (j, p) in pos[row.start + from..row.start + b].iter_mut().enumerate() {
                        *p = j as i64;
                    }
                    from = b;
                }
            }
            let mut from = 0;
            for &b in &breaks {
                filled.max_seqlen = filled.max_seqlen.max(b - from);
                if let Some(cu) = cu.as_deref_mut() {
                    cu[filled.num_cu_seqlens] = (row.start + b) as i32;
                    filled.num_cu_seqlens += 1;
                }
                from = b;
            }
        }
        Ok(filled)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.sender.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
