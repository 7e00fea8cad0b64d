//! Complete, atomic training checkpoints.
//!
//! A checkpoint is a directory `DIR/step-NNNNNNNN/` (the step zero-padded to 8 digits) holding:
//!
//! * `model.safetensors`: the fp32 master weights, one tensor per parameter view (names and
//!   shapes from the caller's [`ParamLayout`], e.g. GPT-2's), with `__metadata__` keys `format`
//!   (`"pt"`), `lathe_version`, `step` and `config` (the model config as a JSON string). Any
//!   safetensors reader loads it.
//! * `optimizer.safetensors`: the optimizer's flat state buffers (`m`, `v` for AdamW), 1-D f32.
//! * `state.json`: everything small, as a [`CheckpointState`]: step, optimizer step count and
//!   hyperparameters, loss scaler, RNG states, data position, full run settings, extra state
//!   (early stopping, ...), the length and digest of both tensor files, and a digest of
//!   `state.json`'s own other fields (`state_digest`).
//!
//! * any extra files of the request ([`SaveRequest::files`]): `lathe train` adds Hugging Face's
//!   `config.json` ([`hf`]), so `GPT2LMHeadModel.from_pretrained` loads a step directory.
//!
//! Saving is atomic: everything is written into `DIR/.tmp-step-NNNNNNNN-<pid>/`, every file and
//! that directory are fsynced, the directory is renamed to its final name, and `DIR` is fsynced.
//! A crash at any point leaves either the complete checkpoint under its final name or no
//! `step-*` entry at all; leftover temporary directories are never read and are removed by a
//! later save once their process is gone. One process writes checkpoints into a given `DIR`.
//!
//! Loading ([`CheckpointReader`]) checks the format version, file lengths and digests, and
//! validates every tensor's name, dtype and shape against what the caller expects, naming the
//! file and the tensor in any error.

mod digest;
pub mod hf;
mod read;
mod write;

use std::collections::BTreeMap;
use std::fs;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use safetensors::SafeTensorError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::optim::{OptimError, Optimizer, OptimizerState, ParamLayout};
use crate::precision::LossScaler;

pub use read::CheckpointReader;
pub use write::save;

/// Version of the checkpoint layout written by this Lathe.
/// Version 2 added `state_digest` to `state.json`; version 1 checkpoints (without it) still load.
pub const FORMAT_VERSION: u32 = 2;
/// Model weights file inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer buffers file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Small-state file inside a checkpoint directory (written last).
pub const STATE_FILE: &str = "state.json";

/// Errors from saving, finding or loading checkpoints. Each names the file (and tensor).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("checkpoint file {path}: invalid or unexpected JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("checkpoint file {path}: not a valid safetensors file: {source}")]
    SafeTensors {
        path: PathBuf,
        source: SafeTensorError,
    },
    #[error("checkpoint file {path} is corrupt or incomplete: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint file {path} has no tensor `{name}`, which this run expects")]
    MissingTensor { path: PathBuf, name: String },
    #[error("checkpoint file {path} holds tensor `{name}`, which this run does not expect")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("checkpoint file {path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("checkpoint file {path}: tensor `{name}` has dtype {found}, expected F32")]
    DtypeMismatch {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{what} has {found} elements, expected {expected}")]
    BufferLength {
        what: String,
        expected: usize,
        found: usize,
    },
    #[error(
        "checkpoint {path} has format version {found}; this Lathe reads versions up to {supported}"
    )]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("no checkpoint in {path} (expected step-NNNNNNNN directories holding {STATE_FILE})")]
    NoCheckpoint { path: PathBuf },
    #[error("checkpoint {path}: optimizer state does not fit this run: {source}")]
    Optimizer { path: PathBuf, source: OptimError },
    #[error("invalid checkpoint request: {0}")]
    BadRequest(String),
}

pub(crate) fn io_err(
    path: &Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { path, op, source }
}

/// The optimizer part of a save: small state plus named flat f32 buffers (1-D tensors).
#[derive(Clone, Debug)]
pub struct OptimizerSnapshot<'a> {
    pub state: OptimizerState,
    pub buffers: Vec<(String, &'a [f32])>,
}

impl<'a> OptimizerSnapshot<'a> {
    /// Snapshot of an optimizer (its `m`/`v` or momentum buffers and step count).
    pub fn of(optimizer: &'a Optimizer) -> Self {
        OptimizerSnapshot {
            state: optimizer.state(),
            buffers: optimizer
                .buffers()
                .into_iter()
                .map(|(n, b)| (n.to_string(), b))
                .collect(),
        }
    }
}

/// Everything a checkpoint stores, borrowed from the training loop.
#[derive(Clone, Debug)]
pub struct SaveRequest<'a> {
    /// Optimizer steps completed; the directory is named after it.
    pub step: u64,
    /// Parameter views (names, shapes) over `master`; every view is stored, as f32.
    pub layout: &'a ParamLayout,
    /// fp32 master weights, `layout.len()` elements.
    pub master: &'a [f32],
    /// Model configuration (stored in `state.json` and as a string in the safetensors metadata).
    pub model_config: &'a Value,
    pub optimizer: OptimizerSnapshot<'a>,
    pub scaler: &'a LossScaler,
    /// Named RNG states (e.g. `"init"`, `"data"`, `"dropout"`).
    pub rng: &'a BTreeMap<String, [u64; 4]>,
    /// Where the data pipeline stands (opaque to the checkpoint).
    pub data_position: &'a Value,
    /// The full run settings.
    pub settings: &'a Value,
    /// Anything else to restore (early-stopping state, best loss, ...); `Value::Null` if none.
    pub extra: &'a Value,
    /// Small extra files written into the checkpoint directory (name, contents), such as
    /// Hugging Face's `config.json`. Names must be plain file names other than the three
    /// checkpoint files.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Length and digest of one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub digest: String,
}

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    pub lathe_version: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub model_config: Value,
    pub optimizer: OptimizerState,
    pub scaler: LossScaler,
    pub rng: BTreeMap<String, [u64; 4]>,
    pub data_position: Value,
    pub settings: Value,
    #[serde(default)]
    pub extra: Value,
    /// Tensor files of the checkpoint, by file name.
    pub files: BTreeMap<String, FileDigest>,
    /// Digest of the rest of `state.json` (every other field, as compact JSON with sorted
    /// keys), so an edited step count, data position or scale is caught like a damaged tensor
    /// file. Required from format version 2 on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
}

/// Directory name of the checkpoint of `step`: `step-` and the step zero-padded to 8 digits.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint directory name, if it is one (`step-` then at least 8 digits).
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Complete checkpoints in `dir` (named `step-*`, holding `state.json`), ascending by step.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing the directory"))? {
        let entry = entry.map_err(io_err(dir, "listing the directory"))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir_name) else {
            continue;
        };
        let path = entry.path();
        if path.join(STATE_FILE).is_file() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The checkpoint to resume from: `path` itself when it is a checkpoint directory (it holds
/// `state.json`; normally a `step-*` directory, but a copy under another name works too),
/// else the newest complete `step-*` checkpoint inside `path`. `Ok(None)` when there is none;
/// an error when `path` cannot be read (e.g. does not exist).
pub fn latest_checkpoint(path: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    if path.join(STATE_FILE).is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    Ok(list_checkpoints(path)?.pop().map(|(_, p)| p))
}

/// Deletes all but the newest `keep_last` complete checkpoints in `dir`; returns the removed
/// paths. Each is first renamed out of the `step-*` namespace, so a crash mid-delete never
/// leaves a partial directory under a checkpoint name.
pub fn prune(dir: &Path, keep_last: NonZeroUsize) -> Result<Vec<PathBuf>, CheckpointError> {
    let all = list_checkpoints(dir)?;
    let n_remove = all.len().saturating_sub(keep_last.get());
    remove_checkpoints(dir, all.into_iter().take(n_remove))
}

/// Pruning for a run that has just written the checkpoint of step `newest`: keeps the newest
/// `keep_last` checkpoints of that run's timeline (the steps up to `newest`; the one just
/// written always survives) and deletes the rest, including any checkpoint of a later step,
/// which belongs to a timeline abandoned by resuming from an older step. Returns the removed
/// paths.
pub fn prune_run(
    dir: &Path,
    keep_last: NonZeroUsize,
    newest: u64,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let all = list_checkpoints(dir)?;
    let (ours, abandoned): (Vec<_>, Vec<_>) = all.into_iter().partition(|(s, _)| *s <= newest);
    let n_remove = ours.len().saturating_sub(keep_last.get());
    remove_checkpoints(dir, ours.into_iter().take(n_remove).chain(abandoned))
}

/// Deletes every complete checkpoint in `dir` but `keep` (the way [`prune`] does: renamed out
/// of the `step-*` namespace first); returns the removed paths.
pub fn remove_all_but(dir: &Path, keep: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let doomed = list_checkpoints(dir)?
        .into_iter()
        .filter(|(_, p)| p != keep);
    remove_checkpoints(dir, doomed)
}

fn remove_checkpoints(
    dir: &Path,
    doomed: impl Iterator<Item = (u64, PathBuf)>,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for (step, path) in doomed {
        let doomed = dir.join(format!(
            ".del-{}-{}",
            step_dir_name(step),
            std::process::id()
        ));
        fs::rename(&path, &doomed).map_err(io_err(&path, "renaming for deletion"))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed, "deleting"))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        write::sync_dir(dir)?;
    }
    Ok(removed)
}
