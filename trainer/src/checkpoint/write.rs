//! Writing a checkpoint atomically.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};

use super::{
    CheckpointError, CheckpointState, FORMAT_VERSION, FileDigest, MODEL_FILE, OPTIMIZER_FILE,
    STATE_FILE, SaveRequest, digest, io_err, step_dir_name,
};

/// A borrowed f32 tensor for the safetensors writer (stored little-endian).
struct F32Tensor<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for F32Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }

    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

/// fsyncs a directory so a rename inside it is durable (no-op where directories cannot be
/// opened, i.e. off Unix).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "syncing the directory"))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path, "syncing"))
}

fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, F32Tensor<'_>)>,
    metadata: HashMap<String, String>,
) -> Result<FileDigest, CheckpointError> {
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|source| {
        CheckpointError::SafeTensors {
            path: path.to_path_buf(),
            source,
        }
    })?;
    sync_file(path)?;
    let (bytes, d) = digest::digest_file(path).map_err(io_err(path, "reading back"))?;
    Ok(FileDigest {
        bytes,
        digest: digest::format(d),
    })
}

/// Removes the temporary directory on drop unless disarmed (a failed save leaves nothing).
struct TempDir {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover is ignored by readers and removed by a later save.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The pid of a leftover `.tmp-…-PID` / `.old-…-PID` / `.del-…-PID` entry.
fn leftover_pid(name: &str) -> Option<u32> {
    let rest = [".tmp-step-", ".old-step-", ".del-step-"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    let (_, pid) = rest.rsplit_once('-')?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        // Our own leftovers are from an earlier failed save (one writer per directory).
        return false;
    }
    let proc_dir = Path::new("/proc");
    // Without /proc we cannot tell: assume alive and leave the entry alone.
    !proc_dir.is_dir() || proc_dir.join(pid.to_string()).exists()
}

/// Removes temporary entries left by crashed saves (best effort).
fn clean_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(leftover_pid) else {
            continue;
        };
        if !process_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn check_request(req: &SaveRequest<'_>) -> Result<(), CheckpointError> {
    for (name, _) in &req.files {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\'])
            && ![MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].contains(&name.as_str());
        if !plain {
            return Err(CheckpointError::BadRequest(format!(
                "extra file name `{name}` is not a plain, free file name"
            )));
        }
    }
    if req.master.len() != req.layout.len() {
        return Err(CheckpointError::BufferLength {
            what: "master weights to save".to_string(),
            expected: req.layout.len(),
            found: req.master.len(),
        });
    }
    let mut names = HashSet::new();
    for (name, buf) in &req.optimizer.buffers {
        if name.is_empty() || !names.insert(name.as_str()) {
            return Err(CheckpointError::BadRequest(format!(
                "optimizer buffer name `{name}` is empty or repeated"
            )));
        }
        if buf.len() != req.optimizer.state.len {
            return Err(CheckpointError::BufferLength {
                what: format!("optimizer buffer `{name}`"),
                expected: req.optimizer.state.len,
                found: buf.len(),
            });
        }
    }
    Ok(())
}

/// Saves a complete checkpoint as `dir/step-NNNNNNNN/` atomically (see the module doc) and
/// returns its path. `dir` is created if needed. An existing checkpoint of the same step is
/// replaced (it stays intact until the new one is complete).
pub fn save(dir: &Path, req: &SaveRequest<'_>) -> Result<PathBuf, CheckpointError> {
    check_request(req)?;
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(io_err(dir, "creating the directory"))?;
        // Make the new directory's own entry durable too.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    clean_leftovers(dir);

    let name = step_dir_name(req.step);
    let pid = std::process::id();
    let final_path = dir.join(&name);
    let mut tmp = TempDir {
        path: dir.join(format!(".tmp-{name}-{pid}")),
        armed: true,
    };
    if tmp.path.exists() {
        fs::remove_dir_all(&tmp.path).map_err(io_err(&tmp.path, "removing a stale temp"))?;
    }
    fs::create_dir(&tmp.path).map_err(io_err(&tmp.path, "creating"))?;

    let version = env!("CARGO_PKG_VERSION").to_string();
    let mut files = BTreeMap::new();

    let config_json =
        serde_json::to_string(req.model_config).map_err(|source| CheckpointError::Json {
            path: tmp.path.join(MODEL_FILE),
            source,
        })?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lathe_version".to_string(), version.clone()),
        ("step".to_string(), req.step.to_string()),
        ("config".to_string(), config_json),
    ]);
    let model: Vec<(String, F32Tensor<'_>)> = req
        .layout
        .views()
        .iter()
        .map(|v| {
            let t = F32Tensor {
                shape: v.shape.clone(),
                data: &req.master[v.range()],
            };
            (v.name.clone(), t)
        })
        .collect();
    let model_path = tmp.path.join(MODEL_FILE);
    files.insert(
        MODEL_FILE.to_string(),
        write_safetensors(&model_path, model, meta)?,
    );

    let meta = HashMap::from([
        ("lathe_version".to_string(), version.clone()),
        ("step".to_string(), req.step.to_string()),
        (
            "optimizer".to_string(),
            req.optimizer.state.config.kind().to_string(),
        ),
    ]);
    let opt: Vec<(String, F32Tensor<'_>)> = req
        .optimizer
        .buffers
        .iter()
        .map(|(n, b)| {
            let t = F32Tensor {
                shape: vec![b.len()],
                data: b,
            };
            (n.clone(), t)
        })
        .collect();
    let opt_path = tmp.path.join(OPTIMIZER_FILE);
    files.insert(
        OPTIMIZER_FILE.to_string(),
        write_safetensors(&opt_path, opt, meta)?,
    );

    for (name, bytes) in &req.files {
        let p = tmp.path.join(name);
        let mut f = File::create(&p).map_err(io_err(&p, "creating"))?;
        f.write_all(bytes).map_err(io_err(&p, "writing"))?;
        f.sync_all().map_err(io_err(&p, "syncing"))?;
    }

    let state = CheckpointState {
        format_version: FORMAT_VERSION,
        lathe_version: version,
        step: req.step,
        model_config: req.model_config.clone(),
        optimizer: req.optimizer.state,
        scaler: req.scaler.clone(),
        rng: req.rng.clone(),
        data_position: req.data_position.clone(),
        settings: req.settings.clone(),
        extra: req.extra.clone(),
        files,
        state_digest: None,
    };
    let state_path = tmp.path.join(STATE_FILE);
    let json_err = |source| CheckpointError::Json {
        path: state_path.clone(),
        source,
    };
    let mut value = serde_json::to_value(&state).map_err(json_err)?;
    let d = digest::state_digest(&value);
    if let Some(m) = value.as_object_mut() {
        m.insert("state_digest".into(), serde_json::Value::String(d));
    }
    let json = serde_json::to_vec_pretty(&value).map_err(json_err)?;
    {
        let mut f = File::create(&state_path).map_err(io_err(&state_path, "creating"))?;
        f.write_all(&json).map_err(io_err(&state_path, "writing"))?;
        f.sync_all().map_err(io_err(&state_path, "syncing"))?;
    }
    sync_dir(&tmp.path)?;

    // Commit. rename(2) cannot replace a non-empty directory, so an existing checkpoint of this
    // step moves aside first and is deleted once the new one carries the name.
    let old = dir.join(format!(".old-{name}-{pid}"));
    let replaced = final_path.exists();
    if replaced {
        fs::rename(&final_path, &old).map_err(io_err(&final_path, "moving aside"))?;
    }
    if let Err(e) = fs::rename(&tmp.path, &final_path) {
        if replaced {
            // Put the previous checkpoint back under its name.
            let _ = fs::rename(&old, &final_path);
        }
        return Err(io_err(&final_path, "renaming into place")(e));
    }
    tmp.armed = false;
    sync_dir(dir)?;
    if replaced {
        fs::remove_dir_all(&old).map_err(io_err(&old, "deleting the replaced checkpoint"))?;
    }
    Ok(final_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names() {
        assert_eq!(leftover_pid(".tmp-step-00000012-4242"), Some(4242));
        assert_eq!(leftover_pid(".old-step-00000012-7"), Some(7));
        assert_eq!(leftover_pid(".del-step-00000012-7"), Some(7));
        assert_eq!(leftover_pid("step-00000012"), None);
        assert_eq!(leftover_pid(".tmp-step-00000012-x"), None);
        assert!(!process_alive(std::process::id()));
    }
}
