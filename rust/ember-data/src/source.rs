//! A source is one dataset as the user names it (a shard, a Megatron prefix,
//! or a directory of shards): the concatenation of its shards' token streams.
//!
//! Shards are probed up front (header and size only) and mapped on demand
//! through a small LRU cache, so a source of 100,000 shards holds at most
//! `max_open` mappings and no open file handles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result, VocabOrigin};
use crate::format::{self, MappedShard, ProbeOptions, ShardSpec};

/// Files in a shard directory that are metadata, not shards.
const SKIPPED_EXTENSIONS: &[&str] = &["json", "yaml", "yml", "txt", "md", "lock"];

pub struct ShardCache {
    max_open: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    tick: u64,
    open: HashMap<usize, (Arc<MappedShard>, u64)>,
}

impl CacheState {
    /// Drops the least recently used eighth of the entries. Evicting in bulk keeps
    /// the cost per miss amortised O(1) however large the cache is.
    fn evict_oldest(&mut self, at_least: usize) {
        let n = (self.open.len() / 8).max(at_least).min(self.open.len());
        if n == 0 {
            return;
        }
        let mut ticks: Vec<u64> = self.open.values().map(|(_, t)| *t).collect();
        let (_, cutoff, _) = ticks.select_nth_unstable(n - 1);
        let cutoff = *cutoff;
        self.open.retain(|_, (_, t)| *t > cutoff);
    }
}

/// Most mappings a process may hold (Linux's vm.max_map_count), leaving room for
/// everything else in the process.
fn mapping_budget() -> usize {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65530);
    (limit / 4).max(16)
}

impl ShardCache {
    pub fn new(max_open: usize) -> Self {
        ShardCache { max_open: max_open.clamp(1, mapping_budget()), state: Mutex::new(CacheState::default()) }
    }

    fn get(&self, idx: usize, spec: &Arc<ShardSpec>) -> Result<Arc<MappedShard>> {
        {
            let mut st = self.state.lock().unwrap();
            st.tick += 1;
            let tick = st.tick;
            if let Some((m, used)) = st.open.get_mut(&idx) {
                *used = tick;
                return Ok(m.clone());
            }
        }
        // Map outside the lock. If the process is out of mappings (ENOMEM), give
        // back half of ours and try once more.
        let mapped = match MappedShard::open(spec.clone()) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(12) => {
                let mut st = self.state.lock().unwrap();
                let half = st.open.len() / 2;
                st.evict_oldest(half);
                drop(st);
                MappedShard::open(spec.clone())?
            }
            r => r?,
        };
        let mapped = Arc::new(mapped);
        let mut st = self.state.lock().unwrap();
        st.tick += 1;
        let tick = st.tick;
        if st.open.len() >= self.max_open {
            st.evict_oldest(1);
        }
        st.open.insert(idx, (mapped.clone(), tick));
        Ok(mapped)
    }

    pub fn num_open(&self) -> usize {
        self.state.lock().unwrap().open.len()
    }
}

pub struct Source {
    name: String,
    shards: Vec<Arc<ShardSpec>>,
    /// `cum_tokens[i]` is the stream position where shard `i` starts; one extra entry at the end.
    cum_tokens: Vec<u64>,
    cum_docs: OnceLock<Vec<u64>>,
    cache: ShardCache,
}

/// Expands one user path into shard paths: itself, or a directory's shards in name order.
pub fn shard_paths(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .filter(|p| !p.extension().is_some_and(|e| SKIPPED_EXTENSIONS.iter().any(|s| e == *s)))
        // A Megatron pair is named by its .idx; its .bin is not a shard of its own.
        .filter(|p| !(p.extension().is_some_and(|e| e == "bin") && p.with_extension("idx").is_file()))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::Invalid(format!("{}: directory holds no shard files", path.display())));
    }
    Ok(names)
}

impl Source {
    pub fn open(paths: &[PathBuf], opts: &ProbeOptions, max_open: usize) -> Result<Self> {
        let mut shards = Vec::new();
        for p in paths {
            for s in shard_paths(p)? {
                shards.push(Arc::new(format::probe(&s, opts)?));
            }
        }
        if shards.is_empty() {
            return Err(Error::Invalid("no shard paths given".into()));
        }
        let name = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(Self::from_specs(name, shards, max_open))
    }

    pub fn from_specs(name: String, shards: Vec<Arc<ShardSpec>>, max_open: usize) -> Self {
        let mut cum_tokens = Vec::with_capacity(shards.len() + 1);
        let mut total = 0u64;
        cum_tokens.push(0);
        for s in &shards {
            total += s.num_tokens;
            cum_tokens.push(total);
        }
        Source { name, shards, cum_tokens, cum_docs: OnceLock::new(), cache: ShardCache::new(max_open) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn num_tokens(&self) -> u64 {
        *self.cum_tokens.last().unwrap()
    }
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }
    pub fn spec(&self, i: usize) -> &Arc<ShardSpec> {
        &self.shards[i]
    }
    pub fn num_open(&self) -> usize {
        self.cache.num_open()
    }

    pub fn shard(&self, i: usize) -> Result<Arc<MappedShard>> {
        self.cache.get(i, &self.shards[i])
    }

    /// The shard holding stream position `pos` and the position within it.
    pub fn locate(&self, pos: u64) -> (usize, u64) {
        // The last shard whose start is <= pos; empty shards are skipped over.
        let i = self.cum_tokens.partition_point(|&c| c <= pos) - 1;
        (i.min(self.shards.len() - 1), pos - self.cum_tokens[i.min(self.shards.len() - 1)])
    }

    /// Copies stream tokens `start .. start + out.len()` into `out`, widened to i64.
    pub fn read_tokens(&self, start: u64, out: &mut [i64]) -> Result<()> {
        self.read_tokens_checked(start, out, None)
    }

    /// [`Source::read_tokens`] that, given a `vocab_size`, also fails on the first id
    /// outside `0..vocab_size`, naming its file, document and position. Ids are checked
    /// as they are copied ([`DType::widen_checked`]), so the check costs little.
    pub fn read_tokens_checked(&self, start: u64, out: &mut [i64], vocab_size: Option<u64>) -> Result<()> {
        let end = start + out.len() as u64;
        if end > self.num_tokens() {
            return Err(Error::Invalid(format!("{}: token range {start}..{end} is past the end ({} tokens)", self.name, self.num_tokens())));
        }
        let mut pos = start;
        let mut written = 0usize;
        while written < out.len() {
            let (si, local) = self.locate(pos);
            let shard = self.shard(si)?;
            let take = ((shard.spec.num_tokens - local) as usize).min(out.len() - written);
            let dtype = shard.spec.dtype;
            let bytes = &shard.token_bytes()[local as usize * dtype.size()..][..take * dtype.size()];
            let chunk = &mut out[written..written + take];
            match vocab_size {
                None => dtype.widen_into(bytes, chunk),
                Some(v) => {
                    if let Some(i) = dtype.widen_checked(bytes, chunk, v) {
                        return Err(shard.token_out_of_range(local + i as u64, chunk[i], v, VocabOrigin::Given));
                    }
                }
            }
            written += take;
            pos += take as u64;
        }
        Ok(())
    }

    /// Calls `f(offset)` for each offset in `1..len` at which a new document
    /// begins within stream range `start .. start + len`, in increasing order.
    pub fn doc_breaks(&self, start: u64, len: u64, mut f: impl FnMut(u64)) -> Result<()> {
        let end = start + len;
        let mut pos = start;
        let mut last = 0u64;
        let mut emit = |off: u64, f: &mut dyn FnMut(u64)| {
            if off > last && off < len {
                f(off);
                last = off;
            }
        };
        while pos < end {
            let (si, local) = self.locate(pos);
            let shard = self.shard(si)?;
            shard.validate_index()?;
            let shard_end_local = shard.spec.num_tokens.min(local + (end - pos));
            if pos > start {
                emit(pos - start, &mut f); // a shard boundary starts a document
            }
            let mut d = shard.doc_of(local);
            loop {
                let next = shard.doc_start(d + 1);
                if next >= shard_end_local || d + 1 >= shard.num_docs() {
                    break;
                }
                emit(pos + (next - local) - start, &mut f);
                d += 1;
            }
            pos += shard_end_local - local;
        }
        Ok(())
    }

    /// Cumulative document counts over shards (scans llm.c shards on first use).
    fn cum_docs(&self) -> Result<&Vec<u64>> {
        if let Some(c) = self.cum_docs.get() {
            return Ok(c);
        }
        let mut cum = Vec::with_capacity(self.shards.len() + 1);
        let mut total = 0u64;
        cum.push(0);
        for (i, s) in self.shards.iter().enumerate() {
            total += match s.num_docs_if_known() {
                Some(n) => n,
                None => {
                    let shard = self.shard(i)?;
                    shard.validate_index()?;
                    shard.num_docs()
                }
            };
            cum.push(total);
        }
        Ok(self.cum_docs.get_or_init(|| cum))
    }

    pub fn num_docs(&self) -> Result<u64> {
        Ok(*self.cum_docs()?.last().unwrap())
    }

    /// Where document `i` lives: (shard index, first token within the shard, length).
    pub fn doc_location(&self, i: u64) -> Result<(usize, u64, u64)> {
        let cum = self.cum_docs()?;
        let total = *cum.last().unwrap();
        if i >= total {
            return Err(Error::Invalid(format!("{}: document index {i} is out of range for {total} documents", self.name)));
        }
        let si = cum.partition_point(|&c| c <= i) - 1;
        let shard = self.shard(si)?;
        shard.validate_index()?;
        let d = i - cum[si];
        let a = shard.doc_start(d);
        Ok((si, a, shard.doc_start(d + 1) - a))
    }

    /// Maps every shard and checks its document index; with `check_tokens`, also
    /// checks every token against `vocab_size` (or the shard's own vocabulary size).
    pub fn validate(&self, check_tokens: bool, vocab_size: Option<u64>) -> Result<()> {
        for i in 0..self.shards.len() {
            let shard = self.shard(i)?;
            shard.validate_index()?;
            if !check_tokens {
                continue;
            }
            match (vocab_size, shard.spec.vocab_size) {
                (Some(v), _) => shard.check_tokens(v, VocabOrigin::Given)?,
                (None, Some(v)) => shard.check_tokens(v, VocabOrigin::Recorded)?,
                (None, None) => {
                    return Err(Error::Invalid(format!(
                        "{}: the shard does not record its vocabulary size; pass vocab_size to check tokens",
                        shard.spec.path.display()
                    )))
                }
            }
        }
        Ok(())
    }

    /// A hash of what determines the sample stream: formats, dtypes and sizes of
    /// every shard, in order. Paths are left out so a dataset can move.
    pub fn fingerprint(&self) -> u64 {
        let mut h = crate::permute::mix(self.shards.len() as u64);
        for s in &self.shards {
            h = crate::permute::mix(h ^ s.num_tokens);
            h = crate::permute::mix(h ^ ((s.format as u64) << 8 | s.dtype.size() as u64));
            h = crate::permute::mix(h ^ s.num_docs_if_known().unwrap_or(u64::MAX));
        }
        h
    }
}
