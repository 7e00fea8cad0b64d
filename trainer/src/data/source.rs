//! Where the loader's windows come from: a directory of shards, or the built-in addition corpus.
//!
//! A source is a list of *groups* (a shard, or a block of generated problems), each holding a
//! number of *windows* of `seq_len + 1` tokens. The loader decides the order in which windows
//! are visited; the source only reads window `w` of group `g` on request, from any thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Split;
use super::addition::{AdditionConfig, AdditionSource};
use super::error::{DataError, Result};
use super::prepare::DatasetMeta;
use super::shard::{Shard, find_shards};

/// Random-access windows for the loader.
///
/// Window `w` of a group covers that group's tokens `w * seq_len ..= w * seq_len + seq_len`
/// (consecutive windows share one token, so every token but the first is a target exactly once
/// per epoch). Inputs are the window's first `seq_len` tokens, targets the last `seq_len`.
pub trait WindowSource: Send + Sync {
    /// The full sequence length `T` (windows hold `T + 1` tokens).
    fn seq_len(&self) -> usize;

    /// Number of windows in each group, in group order. Each count fits a `u32`.
    fn group_windows(&self) -> &[u64];

    /// Writes window `window` of group `group`, truncated to its first `len <= seq_len()`
    /// positions: `inputs[i] = token[i]`, `targets[i] = token[i + 1]` for `i < len`, or
    /// [`IGNORE_INDEX`](super::IGNORE_INDEX) where a target carries no loss. Both slices are
    /// exactly `len` long. Called concurrently from the loader's workers.
    fn read_window(
        &self,
        group: usize,
        window: u64,
        len: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> Result<()>;

    /// Every token is below this, when known.
    fn vocab_size(&self) -> Option<u32>;

    /// A short description for messages, e.g. the directory and split.
    fn describe(&self) -> String;
}

/// Which data a run trains on; the CLI builds one from `--data` (or picks the built-in corpus).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// llm.c shards: a directory (split files chosen by name, see
    /// [`is_split_shard_name`](super::shard::is_split_shard_name)) or a single `.bin` file.
    /// `vocab_size` overrides the directory's `meta.json`; with neither, tokens are not checked.
    Shards {
        path: PathBuf,
        vocab_size: Option<u32>,
    },
    /// The built-in integer-addition corpus.
    Addition(AdditionConfig),
}

impl Source {
    /// Shards under `path`, vocabulary from `meta.json` if present.
    pub fn shards(path: impl Into<PathBuf>) -> Self {
        Source::Shards {
            path: path.into(),
            vocab_size: None,
        }
    }

    /// Opens the `split` windows of length `seq_len + 1`.
    pub fn open(&self, split: Split, seq_len: usize) -> Result<Arc<dyn WindowSource>> {
        Ok(match self {
            Source::Shards { path, vocab_size } => {
                Arc::new(ShardSource::open(path, split, seq_len, *vocab_size)?)
            }
            Source::Addition(cfg) => Arc::new(AdditionSource::new(cfg.clone(), split, seq_len)?),
        })
    }
}

/// Windows over the memory-mapped shards of one split.
#[derive(Debug)]
pub struct ShardSource {
    shards: Vec<Shard>,
    /// Shard index of each group (shards too short for one window are not groups).
    group_shard: Vec<usize>,
    windows: Vec<u64>,
    seq_len: usize,
    vocab: Option<u32>,
    what: String,
}

impl ShardSource {
    /// Opens and validates (header and length) every `split` shard under `path`.
    /// `vocab` overrides `path/meta.json`'s vocabulary size; tokens are checked against it as
    /// windows are read.
    pub fn open(path: &Path, split: Split, seq_len: usize, vocab: Option<u32>) -> Result<Self> {
        if seq_len == 0 {
            return Err(DataError::Config(
                "sequence length must be at least 1".into(),
            ));
        }
        let files = find_shards(path, split)?;
        let vocab = match vocab {
            Some(v) => Some(v),
            None if path.is_dir() => DatasetMeta::read(path)?.map(|m| m.vocab_size),
            None => None,
        };
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            shards.push(Shard::open(f)?);
        }
        let mut group_shard = Vec::new();
        let mut windows = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            let w = (s.len().saturating_sub(1) / seq_len) as u64;
            if w > 0 {
                group_shard.push(i);
                windows.push(w);
            }
        }
        Ok(ShardSource {
            shards,
            group_shard,
            windows,
            seq_len,
            vocab,
            what: format!("{} ({} split)", path.display(), split.name()),
        })
    }

    /// The opened shards, in file-name order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
}

impl WindowSource for ShardSource {
    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn group_windows(&self) -> &[u64] {
        &self.windows
    }

    fn read_window(
        &self,
        group: usize,
        window: u64,
        len: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> Result<()> {
        let Some(&si) = self.group_shard.get(group) else {
            return Err(DataError::Config(format!(
                "no group {group} in {}",
                self.what
            )));
        };
        let shard = &self.shards[si];
        if len == 0 {
            return Ok(());
        }
        let start = window as usize * self.seq_len;
        if len > self.seq_len || start + len >= shard.len() {
            return Err(DataError::Config(format!(
                "window {window} of length {len} is outside {}",
                shard.path().display()
            )));
        }
        shard.read_u32(start, &mut inputs[..len]);
        shard.read_u32(start + 1, &mut targets[..len]);
        if let Some(vocab) = self.vocab {
            let bad_input = inputs[..len].iter().position(|&t| t >= vocab);
            let bad = match bad_input {
                Some(i) => Some((i, inputs[i])),
                None if targets[len - 1] >= vocab => Some((len, targets[len - 1])),
                None => None,
            };
            if let Some((i, tok)) = bad {
                return Err(shard.out_of_vocab((start + i) as u64, tok, vocab));
            }
        }
        Ok(())
    }

    fn vocab_size(&self) -> Option<u32> {
        self.vocab
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}
