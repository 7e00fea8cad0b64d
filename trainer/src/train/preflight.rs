//! Checks made before the first step, so that a run never fails after its training is done:
//! the launch environment, the `--save` directory (writable, and not holding another run's
//! checkpoints), the `--profile` path, and the host memory the settings need. The data's
//! validation split is checked when the trainer is built (see `eval::check_val`).

use crate::checkpoint::list_checkpoints;
use crate::config::TrainConfig;
use crate::launch::LaunchEnv;
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};

/// Everything [`check`] found that the run needs to know.
#[derive(Clone, Debug, Default)]
pub(crate) struct Preflight {
    /// `--overwrite` into a directory holding checkpoints: delete them at the first save.
    pub overwrite_existing: bool,
}

/// Runs every startup check on resolved settings.
pub(crate) fn check(cfg: &TrainConfig) -> Result<Preflight> {
    let mut out = Preflight::default();
    if let Some(save) = &cfg.save {
        out.overwrite_existing = check_save_dir(save, cfg.resume.as_deref(), cfg.overwrite)?;
    }
    if let Some(p) = &cfg.profile {
        check_output_file(p).with_context(|| format!("--profile {}", p.display()))?;
    }
    if let Some(p) = &cfg.log {
        check_output_file(p).with_context(|| format!("--log {}", p.display()))?;
    }
    Ok(out)
}

/// Refuses a CPU run started by a launcher (`lathe launch`, torchrun, Slurm) as one of several
/// processes: the CPU backend runs the ranks of a run as threads of one process (`--world N`).
/// On a device (`--device sim|cuda`) each launched process is one rank.
pub fn check_launch_env(env: Option<LaunchEnv>, on_device: bool) -> Result<()> {
    match env {
        Some(env) if env.world_size > 1 && !on_device => bail!(
            "this process was started by {} as rank {} of {} processes, but it would train on \
             the CPU, whose ranks are threads of one process: every launched process would be \
             a separate full run writing the same log and checkpoints. Run one process with \
             `lathe train --world {}`, or give each process a device (`--device sim`, \
             `--device cuda`)",
            env.source,
            env.rank,
            env.world_size,
            env.world_size
        ),
        _ => Ok(()),
    }
}

/// The same directory, whatever the spelling (relative, absolute, trailing `/`, `.`).
pub(crate) fn same_path(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.components().eq(b.components()),
    }
}

/// Whether `--resume` names `save` or a checkpoint inside it.
fn resumes_from(resume: &Path, save: &Path) -> bool {
    same_path(resume, save) || resume.parent().is_some_and(|p| same_path(p, save))
}

/// Checks `--save DIR`: it may not hold checkpoints unless the run resumes from there or
/// `--overwrite` is given, and it must be writable (it is created if missing). Returns whether
/// the checkpoints there are to be deleted at the first save.
fn check_save_dir(save: &Path, resume: Option<&Path>, overwrite: bool) -> Result<bool> {
    if save.exists() && !save.is_dir() {
        bail!("--save {}: exists and is not a directory", save.display());
    }
    let mut overwrite_existing = false;
    if save.is_dir() {
        let existing =
            list_checkpoints(save).with_context(|| format!("--save {}", save.display()))?;
        if let (Some((first, _)), Some((last, _))) = (existing.first(), existing.last()) {
            let here = resume.is_some_and(|r| resumes_from(r, save));
            let what = format!("{} checkpoint(s), steps {first} to {last}", existing.len());
            if here {
                // Resuming from an older step: the later ones are another timeline.
                let from = crate::checkpoint::latest_checkpoint(resume.unwrap_or(save))
                    .ok()
                    .flatten()
                    .and_then(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(crate::checkpoint::parse_step_dir_name)
                    });
                if let Some(from) = from.filter(|f| *f < *last) {
                    eprintln!(
                        "warning: resuming from step {from} in {}, which also holds checkpoints \
                         up to step {last}; this run replaces those it reaches and --keep-last \
                         prunes the later ones",
                        save.display()
                    );
                }
            } else if overwrite {
                eprintln!(
                    "note: --overwrite: the {what} in {} are deleted when this run saves its \
                     first checkpoint",
                    save.display()
                );
                overwrite_existing = true;
            } else {
                bail!(
                    "--save {} already holds {what} of another run; a fresh run would replace \
                     same-numbered ones and mix two runs. Continue that run with --resume {}, \
                     choose an empty --save directory, or pass --overwrite to replace them",
                    save.display(),
                    save.display()
                );
            }
        }
    }
    fs::create_dir_all(save)
        .with_context(|| format!("--save {}: cannot create the directory", save.display()))?;
    probe_dir(save).with_context(|| format!("--save {}", save.display()))?;
    Ok(overwrite_existing)
}

/// Checks that a file can be written at `path` (its directory is created if missing), without
/// touching an existing file there.
fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("is a directory");
    }
    if path.exists() {
        fs::OpenOptions::new()
            .append(true)
            .open(path)
            .context("cannot write the file")?;
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create the directory {}", parent.display()))?;
    probe_dir(&parent)
}

/// Creates and removes a file in `dir`.
fn probe_dir(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".lathe-write-test-{}", std::process::id()));
    fs::write(&probe, b"")
        .with_context(|| format!("cannot write in the directory {}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launched_ranks_are_refused_and_single_processes_run() {
        assert!(check_launch_env(None, false).is_ok());
        let env = |world| LaunchEnv {
            rank: 0,
            local_rank: 0,
            world_size: world,
            local_world_size: world,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            source: crate::launch::LaunchSource::Slurm,
        };
        assert!(check_launch_env(Some(env(1)), false).is_ok());
        assert!(check_launch_env(Some(env(2)), true).is_ok());
        let e = check_launch_env(Some(env(2)), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 0 of 2") && e.contains("--world 2") && e.contains("Slurm"),
            "{e}"
        );
    }

    #[test]
    fn paths_compare_by_what_they_name() {
        let d = tempfile::tempdir().unwrap();
        let abs = d.path().join("ckpt");
        fs::create_dir(&abs).unwrap();
        let slash = PathBuf::from(format!("{}/", abs.display()));
        let dotted = d.path().join(".").join("ckpt");
        assert!(same_path(&abs, &slash));
        assert!(same_path(&abs, &dotted));
        assert!(!same_path(&abs, d.path()));
        assert!(resumes_from(&abs.join("step-00000004"), &abs));
    }
}
