//! Reading shard files: format detection, header validation ("probing"), and
//! the memory-mapped view of one shard's tokens and document boundaries.
//!
//! Probing reads a few hundred bytes and one `stat`, so opening a dataset of
//! 100,000 shards costs no mapping and no file handle per shard. Full index
//! validation (offsets monotonic and in bounds) is done once per shard, when
//! its document boundaries are first needed, so start-up and plain token reads
//! do not grow with the number of documents.

pub mod ember;
pub mod llmc;
pub mod megatron;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Error, Result, VocabOrigin};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ember,
    Megatron,
    LlmC,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Ember => "ember",
            Format::Megatron => "megatron",
            Format::LlmC => "llmc",
        }
    }
}

#[derive(Debug, Clone)]
pub enum IndexSpec {
    /// `num_docs + 1` u64 token offsets at this byte offset of the shard file.
    Ember { offsets_offset: u64 },
    /// i32 lengths and i64 byte pointers in the `.idx` file.
    Megatron { idx_path: PathBuf, lengths_offset: u64, pointers_offset: u64 },
    /// No stored index: documents start at each occurrence of `delimiter`.
    LlmC { delimiter: i64 },
}

/// What a shard's header says, checked against the file size.
#[derive(Debug)]
pub struct ShardSpec {
    /// The path that names the shard (for Megatron, the `.idx` file).
    pub path: PathBuf,
    pub format: Format,
    pub dtype: DType,
    pub num_tokens: u64,
    /// Unknown for llm.c shards until they are scanned.
    num_docs: OnceLock<u64>,
    pub vocab_size: Option<u64>,
    /// The file that holds the tokens, and the byte offset of token 0 in it.
    pub token_path: PathBuf,
    pub token_offset: u64,
    pub index: IndexSpec,
    /// Set once the index has been fully checked; survives unmapping.
    validated: OnceLock<()>,
    /// Document starts found by scanning an llm.c shard.
    scanned: OnceLock<Arc<Vec<u64>>>,
}

impl ShardSpec {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        path: PathBuf,
        format: Format,
        dtype: DType,
        num_tokens: u64,
        num_docs: Option<u64>,
        vocab_size: Option<u64>,
        token_path: PathBuf,
        token_offset: u64,
        index: IndexSpec,
    ) -> Self {
        let docs = OnceLock::new();
        if let Some(n) = num_docs {
            let _ = docs.set(n);
        }
        ShardSpec {
            path,
            format,
            dtype,
            num_tokens,
            num_docs: docs,
            vocab_size,
            token_path,
            token_offset,
            index,
            validated: OnceLock::new(),
            scanned: OnceLock::new(),
        }
    }

    /// The number of documents if it is known without scanning.
    pub fn num_docs_if_known(&self) -> Option<u64> {
        self.num_docs.get().copied()
    }
}

/// Options that change how files are interpreted.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// Document delimiter for llm.c shards; the format's usual one when `None`.
    pub llmc_delimiter: Option<i64>,
}

/// Detects the format of `path` and validates its header against the file size.
/// `path` may be an Ember shard, an llm.c shard, or a Megatron `.bin`, `.idx`
/// or prefix. The file's contents decide, not its extension, except for
/// Megatron's `.bin`, which has no header of its own.
pub fn probe(path: &Path, opts: &ProbeOptions) -> Result<ShardSpec> {
    if !path.exists() {
        if let Some(idx) = megatron::resolve(path) {
            return probe_file(&idx, opts);
        }
        return Err(Error::NotFound { path: path.to_path_buf() });
    }
    if path.is_dir() {
        return Err(Error::Invalid(format!("{}: is a directory; a shard file was expected", path.display())));
    }
    match probe_file(path, opts) {
        Err(Error::UnknownFormat { .. }) if path.extension().is_some_and(|e| e == "bin") => match megatron::resolve(path) {
            Some(idx) => probe_file(&idx, opts),
            None => probe_file(path, opts),
        },
        r => r,
    }
}

fn probe_file(path: &Path, opts: &ProbeOptions) -> Result<ShardSpec> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = Vec::with_capacity(llmc::HEADER_LEN as usize);
    (&mut f).take(llmc::HEADER_LEN).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
    if head.starts_with(ember::MAGIC) {
        ember::probe(path, &head, len)
    } else if head.starts_with(megatron::MAGIC) {
        megatron::probe(path, &head, len)
    } else if llmc::is_llmc(&head) {
        llmc::probe(path, &head, len, opts.llmc_delimiter)
    } else {
        let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            detail: if head.is_empty() { "the file is empty".into() } else { format!("it starts with bytes {}", shown.join(" ")) },
        })
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: shards are read-only inputs. A file truncated by another process
    // while mapped would fault; that is the same contract as np.memmap.
    let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    // Training reads random windows: read-ahead of the whole file would mostly be wasted.
    #[cfg(unix)]
    let _ = m.advise(memmap2::Advice::Random);
    Ok(m)
}

/// One shard, mapped. The file handles are closed once mapped; the mappings
/// are released when the last `Arc<MappedShard>` goes.
pub struct MappedShard {
    pub spec: Arc<ShardSpec>,
    tokens: Option<Mmap>,
    index: Option<Mmap>,
}

impl MappedShard {
    pub fn open(spec: Arc<ShardSpec>) -> Result<Self> {
        // Mapping a zero-length file fails on some platforms; an empty shard has nothing to map.
        let tokens = if spec.num_tokens > 0 || matches!(spec.index, IndexSpec::Ember { .. }) {
            let m = map(&spec.token_path)?;
            let need = spec.token_offset + spec.num_tokens * spec.dtype.size() as u64;
            if (m.len() as u64) < need {
                return Err(Error::SizeMismatch {
                    path: spec.token_path.clone(),
                    expected: need,
                    actual: m.len() as u64,
                    detail: "the file shrank after it was opened".into(),
                });
            }
            Some(m)
        } else {
            None
        };
        let index = match &spec.index {
            IndexSpec::Megatron { idx_path, .. } => Some(map(idx_path)?),
            _ => None,
        };
        Ok(MappedShard { spec, tokens, index })
    }

    /// The raw little-endian token bytes.
    pub fn token_bytes(&self) -> &[u8] {
        let start = self.spec.token_offset as usize;
        let n = self.spec.num_tokens as usize * self.spec.dtype.size();
        match &self.tokens {
            Some(m) => &m[start..start + n],
            None => &[],
        }
    }

    pub fn token(&self, pos: u64) -> i64 {
        self.spec.dtype.read(self.token_bytes(), pos as usize)
    }

    pub fn num_docs(&self) -> u64 {
        *self.spec.num_docs.get_or_init(|| self.llmc_starts().len() as u64)
    }

    fn llmc_starts(&self) -> &Arc<Vec<u64>> {
        self.spec.scanned.get_or_init(|| {
            let delim = match self.spec.index {
                IndexSpec::LlmC { delimiter } => delimiter,
                _ => unreachable!(),
            };
            let n = self.spec.num_tokens;
            let mut starts = Vec::new();
            if n > 0 {
                starts.push(0);
            }
            let bytes = self.token_bytes();
            let dt = self.spec.dtype;
            starts.extend((1..n).filter(|&p| dt.read(bytes, p as usize) == delim));
            Arc::new(starts)
        })
    }

    /// Token position where document `i` starts; `doc_start(num_docs)` is `num_tokens`.
    pub fn doc_start(&self, i: u64) -> u64 {
        let n = self.num_docs();
        if i >= n {
            return self.spec.num_tokens;
        }
        match &self.spec.index {
            IndexSpec::Ember { offsets_offset } => {
                let o = (*offsets_offset + 8 * i) as usize;
                let m = self.tokens.as_ref().unwrap();
                u64::from_le_bytes(m[o..o + 8].try_into().unwrap())
            }
            IndexSpec::Megatron { pointers_offset, .. } => {
                let o = (*pointers_offset + 8 * i) as usize;
                let m = self.index.as_ref().unwrap();
                i64::from_le_bytes(m[o..o + 8].try_into().unwrap()) as u64 / self.spec.dtype.size() as u64
            }
            IndexSpec::LlmC { .. } => self.llmc_starts()[i as usize],
        }
    }

    /// The document that holds token `pos` (the last one that starts at or before it).
    pub fn doc_of(&self, pos: u64) -> u64 {
        let (mut lo, mut hi) = (0u64, self.num_docs());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.doc_start(mid) <= pos {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Checks the document index once per shard (the result outlives the mapping).
    /// Everything that reads document boundaries calls this first; reading tokens
    /// needs only the header, which was checked when the shard was probed.
    pub fn validate_index(&self) -> Result<()> {
        if self.spec.validated.get().is_some() {
            return Ok(());
        }
        let spec = &self.spec;
        let n = self.num_docs();
        match &spec.index {
            IndexSpec::Ember { offsets_offset } => {
                let m = self.tokens.as_ref().unwrap();
                let base = *offsets_offset as usize;
                let mut prev = 0u64;
                for i in 0..=n {
                    let o = base + 8 * i as usize;
                    let v = u64::from_le_bytes(m[o..o + 8].try_into().unwrap());
                    let detail = if i == 0 && v != 0 {
                        Some(format!("first offset is {v}, expected 0"))
                    } else if v < prev {
                        Some(format!("offset {v} is less than the previous offset {prev}"))
                    } else if v > spec.num_tokens {
                        Some(format!("offset {v} is past the end of the {} tokens", spec.num_tokens))
                    } else if i == n && v != spec.num_tokens {
                        Some(format!("last offset is {v}, expected num_tokens = {}", spec.num_tokens))
                    } else {
                        None
                    };
                    if let Some(detail) = detail {
                        return Err(Error::BadIndex { path: spec.path.clone(), index: i, offset: o as u64, detail });
                    }
                    prev = v;
                }
            }
            IndexSpec::Megatron { lengths_offset, pointers_offset, .. } => {
                let m = self.index.as_ref().unwrap();
                let size = spec.dtype.size() as u64;
                let mut expect = 0u64;
                for i in 0..n {
                    let lo = (*lengths_offset + 4 * i) as usize;
                    let po = (*pointers_offset + 8 * i) as usize;
                    let len = i32::from_le_bytes(m[lo..lo + 4].try_into().unwrap());
                    let ptr = i64::from_le_bytes(m[po..po + 8].try_into().unwrap());
                    if len < 0 {
                        return Err(Error::BadIndex { path: spec.path.clone(), index: i, offset: lo as u64, detail: format!("negative sequence length {len}") });
                    }
                    if ptr < 0 || ptr as u64 != expect {
                        return Err(Error::BadIndex {
                            path: spec.path.clone(),
                            index: i,
                            offset: po as u64,
                            detail: format!("pointer {ptr} should be {expect}: sequences must be stored back to back in the .bin"),
                        });
                    }
                    expect += len as u64 * size;
                    if expect > spec.num_tokens * size {
                        return Err(Error::BadIndex {
                            path: spec.path.clone(),
                            index: i,
                            offset: lo as u64,
                            detail: format!("sequence ends at byte {expect}, past the end of {} ({} bytes)", spec.token_path.display(), spec.num_tokens * size),
                        });
                    }
                }
                if expect != spec.num_tokens * size {
                    return Err(Error::SizeMismatch {
                        path: spec.token_path.clone(),
                        expected: expect,
                        actual: spec.num_tokens * size,
                        detail: format!("the sequence lengths in {} add up to {expect} bytes", spec.path.display()),
                    });
                }
            }
            IndexSpec::LlmC { .. } => {}
        }
        let _ = spec.validated.set(());
        Ok(())
    }

    /// Checks every token against `0..vocab_size`.
    pub fn check_tokens(&self, vocab_size: u64, origin: VocabOrigin) -> Result<()> {
        let bytes = self.token_bytes();
        let dt = self.spec.dtype;
        if dt.all_below(bytes, vocab_size) {
            return Ok(());
        }
        let p = (0..self.spec.num_tokens).find(|&p| dt.read(bytes, p as usize) as u64 >= vocab_size).expect("all_below found an id out of range");
        Err(self.token_out_of_range(p, dt.read(bytes, p as usize), vocab_size, origin))
    }

    /// The error for `token`, found at position `pos` of this shard outside `0..vocab_size`:
    /// it names the document too, which costs an index check (and for llm.c, a scan)
    /// paid only here, when a run is about to stop anyway.
    pub fn token_out_of_range(&self, pos: u64, token: i64, vocab_size: u64, origin: VocabOrigin) -> Error {
        if let Err(e) = self.validate_index() {
            return e;
        }
        Error::TokenOutOfRange {
            path: self.spec.token_path.clone(),
            token,
            position: pos,
            offset: self.spec.token_offset + pos * self.spec.dtype.size() as u64,
            document: self.doc_of(pos),
            vocab_size,
            origin,
        }
    }
}
