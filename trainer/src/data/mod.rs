//! The data pipeline: token shards, `lathe prepare`, the batch loader, and the built-in
//! addition corpus.
//!
//! - [`shard`]: llm.c's `.bin` format (1024-byte header, u16 tokens), read through mmap with
//!   validation, written atomically.
//! - [`prepare`](mod@prepare): text files to shards (`bytes` or `gpt2` tokenizer), with a
//!   per-document validation split and a `meta.json`.
//! - [`loader`]: `B x T` batches in a deterministic (seed, epoch) order, disjoint per rank,
//!   resumable from a [`LoaderPosition`], prefetched by a worker pool into buffers from a
//!   [`BufferPool`] (plain vectors now, pinned host memory from the GPU runtime).
//! - [`addition`]: integer addition problems as text, with answer-only targets, a held-out
//!   partition and an exact-match evaluator.
//! - [`curriculum`]: short sequences first.
//! - [`pinned`]: pinned host buffers and the copy-stream feeder that overlaps uploads with
//!   compute on a GPU.
//!
//! A run picks its data with a [`Source`] (a shard directory, or the addition corpus) and reads
//! it through the same [`Loader`] either way.

pub mod addition;
pub mod buffer;
pub mod curriculum;
pub mod error;
pub mod loader;
pub mod pinned;
pub mod plan;
pub mod prepare;
pub mod shard;
pub mod source;
pub mod tokenizer;

pub use addition::{
    AdditionConfig, AdditionCorpus, AdditionSource, EvalReport, Problem, exact_match,
    try_exact_match,
};
pub use buffer::{BufferPool, TokenStorage, VecPool};
pub use curriculum::Curriculum;
pub use error::DataError;
pub use loader::{Batch, Loader, LoaderConfig, LoaderPosition};
pub use plan::mix64;
pub use prepare::{
    DatasetMeta, PrepareArgs, PrepareOptions, PrepareReport, check_complete, prepare, run_prepare,
};
pub use shard::{Shard, ShardWriter, write_shard};
pub use source::{ShardSource, Source, WindowSource};
pub use tokenizer::TokenizerKind;

use serde::{Deserialize, Serialize};

/// Target value of a position that carries no loss (the loss must skip it). Read as an `i32`
/// it is -1, llm.c's marker for masked targets.
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Which part of a dataset to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `"train"` or `"val"`, as in shard file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}
