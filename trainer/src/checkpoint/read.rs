//! Reading and validating a checkpoint.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use super::{
    CheckpointError, CheckpointState, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
    digest, io_err, latest_checkpoint, parse_step_dir_name,
};
use crate::optim::{Optimizer, ParamLayout};

/// An opened checkpoint: `state.json` parsed and checked, tensor files present with the
/// recorded lengths. Tensor data is read (and digest-checked) by the `load_*` methods.
#[derive(Clone, Debug)]
pub struct CheckpointReader {
    dir: PathBuf,
    state: CheckpointState,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Copies little-endian f32 bytes into `dst` (`src.len() == 4 * dst.len()`, checked by the
/// caller through the tensor's shape).
fn copy_f32(dst: &mut [f32], src: &[u8]) {
    if cfg!(target_endian = "little")
        && let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(src)
    {
        dst.copy_from_slice(s);
        return;
    }
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

impl CheckpointReader {
    /// Opens the checkpoint at `path`: a `step-*` directory, or a directory of them (the newest
    /// complete one is used).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let dir = latest_checkpoint(path)?.ok_or_else(|| CheckpointError::NoCheckpoint {
            path: path.to_path_buf(),
        })?;
        let state_path = dir.join(STATE_FILE);
        let text = fs::read(&state_path).map_err(io_err(&state_path, "reading"))?;
        let json_err = |source| CheckpointError::Json {
            path: state_path.clone(),
            source,
        };
        let value: Value = serde_json::from_slice(&text).map_err(json_err)?;
        if let Some(found) = value.get("format_version").and_then(Value::as_u64)
            && found > FORMAT_VERSION as u64
        {
            return Err(CheckpointError::FormatVersion {
                path: dir.clone(),
                found: u32::try_from(found).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            });
        }
        let version = value.get("format_version").and_then(Value::as_u64);
        match value.get("state_digest") {
            Some(Value::String(recorded)) => {
                let found = digest::state_digest(&value);
                if &found != recorded {
                    return Err(corrupt(
                        &state_path,
                        format!(
                            "digest {found} does not match {recorded} recorded in it (was the \
                             file edited?)"
                        ),
                    ));
                }
            }
            Some(_) => return Err(corrupt(&state_path, "state_digest is not a string")),
            None if version.is_some_and(|v| v >= 2) => {
                return Err(corrupt(&state_path, "no state_digest"));
            }
            // Format version 1 had no digest of state.json.
            None => {}
        }
        let state: CheckpointState = serde_json::from_value(value).map_err(json_err)?;
        let dir_step = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_step_dir_name);
        if dir_step.is_some_and(|s| s != state.step) {
            return Err(corrupt(
                &state_path,
                format!(
                    "records step {} in a directory named for another step",
                    state.step
                ),
            ));
        }
        for name in [MODEL_FILE, OPTIMIZER_FILE] {
            let file = dir.join(name);
            let Some(rec) = state.files.get(name) else {
                return Err(corrupt(&state_path, format!("no entry for {name}")));
            };
            let len = match fs::metadata(&file) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(corrupt(&file, "the file is missing"));
                }
                Err(e) => return Err(io_err(&file, "reading metadata")(e)),
            };
            if len != rec.bytes {
                return Err(corrupt(
                    &file,
                    format!(
                        "{len} bytes on disk, {} recorded in {STATE_FILE}",
                        rec.bytes
                    ),
                ));
            }
        }
        Ok(CheckpointReader { dir, state })
    }

    /// The checkpoint directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The parsed `state.json`.
    pub fn state(&self) -> &CheckpointState {
        &self.state
    }

    /// Optimizer steps completed when the checkpoint was taken.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Maps a tensor file and checks its length and digest against `state.json`.
    fn map_verified(&self, name: &str) -> Result<(PathBuf, Mmap), CheckpointError> {
        let path = self.dir.join(name);
        let rec =
            self.state.files.get(name).ok_or_else(|| {
                corrupt(&self.dir.join(STATE_FILE), format!("no entry for {name}"))
            })?;
        let file = File::open(&path).map_err(io_err(&path, "opening"))?;
        let len = file
            .metadata()
            .map_err(io_err(&path, "reading metadata"))?
            .len();
        if len != rec.bytes {
            return Err(corrupt(
                &path,
                format!(
                    "{len} bytes on disk, {} recorded in {STATE_FILE}",
                    rec.bytes
                ),
            ));
        }
        // SAFETY: the map is read-only and dropped when this load returns. Checkpoint files are
        // never modified once their directory carries its final name (Lathe writes new
        // directories and deletes old ones whole); the contract excludes other programs
        // truncating the file meanwhile, which is the one way reads through the map could fault.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path, "mapping"))?;
        let found = digest::format(digest::digest_bytes(&map));
        if found != rec.digest {
            return Err(corrupt(
                &path,
                format!(
                    "digest {found} does not match {} recorded in {STATE_FILE}",
                    rec.digest
                ),
            ));
        }
        Ok((path, map))
    }

    /// The `__metadata__` of `model.safetensors` (`format`, `lathe_version`, `step`, `config`).
    pub fn model_metadata(&self) -> Result<BTreeMap<String, String>, CheckpointError> {
        let (path, map) = self.map_verified(MODEL_FILE)?;
        let (_, meta) = SafeTensors::read_metadata(&map)
            .map_err(|source| CheckpointError::SafeTensors { path, source })?;
        Ok(meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect())
    }

    /// Loads the master weights: every view of `layout` must be in `model.safetensors` as an
    /// F32 tensor of the view's shape, and the file must hold no other tensor. `master` has
    /// `layout.len()` elements; elements outside every view are left as they are. Nothing is
    /// written unless the whole file validates.
    pub fn load_model(
        &self,
        layout: &ParamLayout,
        master: &mut [f32],
    ) -> Result<(), CheckpointError> {
        if master.len() != layout.len() {
            return Err(CheckpointError::BufferLength {
                what: "master weights to load into".to_string(),
                expected: layout.len(),
                found: master.len(),
            });
        }
        let (path, map) = self.map_verified(MODEL_FILE)?;
        let st = parse(&path, &map)?;
        let expected: Vec<(&str, &[usize])> = layout
            .views()
            .iter()
            .map(|v| (v.name.as_str(), v.shape.as_slice()))
            .collect();
        let data = validate(&path, &st, &expected)?;
        for (v, bytes) in layout.views().iter().zip(data) {
            copy_f32(&mut master[v.range()], bytes);
        }
        Ok(())
    }

    /// Loads named flat optimizer buffers: each must be a 1-D F32 tensor of the buffer's
    /// length, and `optimizer.safetensors` must hold no other tensor.
    pub fn load_optimizer_buffers(
        &self,
        buffers: &mut [(&str, &mut [f32])],
    ) -> Result<(), CheckpointError> {
        let (path, map) = self.map_verified(OPTIMIZER_FILE)?;
        let st = parse(&path, &map)?;
        let shapes: Vec<[usize; 1]> = buffers.iter().map(|(_, b)| [b.len()]).collect();
        let expected: Vec<(&str, &[usize])> = buffers
            .iter()
            .zip(&shapes)
            .map(|((n, _), s)| (*n, &s[..]))
            .collect();
        let data = validate(&path, &st, &expected)?;
        for ((_, dst), bytes) in buffers.iter_mut().zip(data) {
            copy_f32(dst, bytes);
        }
        Ok(())
    }

    /// Restores an optimizer: its step count from `state.json` (kind and length must match; the
    /// hyperparameters stay the optimizer's own) and its buffers from `optimizer.safetensors`.
    /// On error the optimizer is in an unspecified state; do not train with it.
    pub fn load_optimizer(&self, optimizer: &mut Optimizer) -> Result<(), CheckpointError> {
        optimizer
            .restore_state(&self.state.optimizer)
            .map_err(|source| CheckpointError::Optimizer {
                path: self.dir.join(STATE_FILE),
                source,
            })?;
        self.load_optimizer_buffers(&mut optimizer.buffers_mut())
    }
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes).map_err(|source| CheckpointError::SafeTensors {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that `st` holds exactly the `expected` tensors, as F32 with the given shapes, and
/// returns their bytes in the order of `expected`.
fn validate<'a>(
    path: &Path,
    st: &SafeTensors<'a>,
    expected: &[(&str, &[usize])],
) -> Result<Vec<&'a [u8]>, CheckpointError> {
    let mut out = Vec::with_capacity(expected.len());
    for &(name, shape) in expected {
        let t = st.tensor(name).map_err(|e| match e {
            SafeTensorError::TensorNotFound(_) => CheckpointError::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            },
            source => CheckpointError::SafeTensors {
                path: path.to_path_buf(),
                source,
            },
        })?;
        if t.dtype() != Dtype::F32 {
            return Err(CheckpointError::DtypeMismatch {
                path: path.to_path_buf(),
                name: name.to_string(),
                found: format!("{:?}", t.dtype()),
            });
        }
        if t.shape() != shape {
            return Err(CheckpointError::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        out.push(t.data());
    }
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| *n).collect();
    let mut extra: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !wanted.contains(n))
        .collect();
    extra.sort_unstable();
    if let Some(name) = extra.first() {
        return Err(CheckpointError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    Ok(out)
}
