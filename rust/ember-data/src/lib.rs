//! Token shards for language-model pretraining: readers for Ember, Megatron
//! and llm.c shard files, a writer for Ember's own format, and a loader that
//! turns them into fixed-length training samples in a seeded global order.
//!
//! This crate has no Python in it; `ember-py` binds it.

pub mod dtype;
pub mod error;
pub mod format;
pub mod loader;
pub mod permute;
pub mod sampler;
pub mod source;

pub use dtype::DType;
pub use error::{Error, Result, VocabOrigin};
pub use format::ember::ShardWriter;
pub use format::{probe, Format, MappedShard, ProbeOptions, ShardSpec};
pub use loader::{Filled, Loader, LoaderOptions, Outputs, Plan, Ticket};
pub use sampler::{SampleRef, Sampler};
pub use source::Source;
