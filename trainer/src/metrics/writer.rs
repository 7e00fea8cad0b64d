//! The JSONL metrics writer and reader.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{MetricsError, MetricsLine, RunSummary, StepRecord, step_line, summary_line};

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> MetricsError {
    let path = path.to_path_buf();
    move |source| MetricsError::Io { path, op, source }
}

/// Appends metrics lines to a JSONL file. Each line goes to the file with one `write` of the
/// whole line and no user-space buffering, so after a crash the file is a valid prefix of lines.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    lines: u64,
}

impl MetricsWriter {
    /// Creates (or truncates) the log at `path`, creating missing parent directories.
    pub fn create(path: &Path) -> Result<Self, MetricsError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err(parent, "creating the directory"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path, "creating"))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
            lines: 0,
        })
    }

    /// Continues the log of a run resumed after optimizer step `last_step`: keeps the complete
    /// step lines with `step <= last_step`, drops later steps, summaries and a torn last line
    /// (the file is rewritten atomically through a temporary file), then appends. Creates the
    /// log if it does not exist.
    pub fn resume(path: &Path, last_step: u64) -> Result<Self, MetricsError> {
        Self::resume_before(path, last_step.saturating_add(1))
    }

    /// Continues the log of a run whose next step record is `next_step` (records are numbered
    /// from 0, so a run resumed after `n` optimizer steps writes record `n` next): keeps the
    /// complete step lines with `step < next_step` and drops the rest, as
    /// [`MetricsWriter::resume`] does.
    pub fn resume_before(path: &Path, next_step: u64) -> Result<Self, MetricsError> {
        if !path.exists() {
            return Self::create(path);
        }
        let text = fs::read_to_string(path).map_err(io_err(path, "reading"))?;
        let mut kept = String::with_capacity(text.len());
        let mut lines = 0;
        for (i, line) in complete_lines(&text).enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = MetricsLine::parse(line).map_err(|source| MetricsError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
            if let MetricsLine::Step(r) = parsed
                && r.step < next_step
            {
                kept.push_str(line);
                kept.push('\n');
                lines += 1;
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "metrics".to_string());
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
            f.write_all(kept.as_bytes())
                .map_err(io_err(&tmp, "writing"))?;
            f.sync_all().map_err(io_err(&tmp, "syncing"))?;
        }
        fs::rename(&tmp, path).map_err(io_err(path, "replacing"))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path, "opening for append"))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines in the log so far (kept ones included after [`MetricsWriter::resume`]).
    pub fn lines(&self) -> u64 {
        self.lines
    }

    fn write_line(&mut self, line: &str) -> Result<(), MetricsError> {
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path, "writing"))?;
        self.lines += 1;
        Ok(())
    }

    /// Appends one step record.
    pub fn write_step(&mut self, record: &StepRecord) -> Result<(), MetricsError> {
        let line = step_line(record).map_err(MetricsError::Serialize)?;
        self.write_line(&line)
    }

    /// Appends the final summary line.
    pub fn write_summary(&mut self, summary: &RunSummary) -> Result<(), MetricsError> {
        let line = summary_line(summary).map_err(MetricsError::Serialize)?;
        self.write_line(&line)
    }

    /// Forces the written lines to stable storage (not needed per line: a process crash keeps
    /// them; this also covers a machine crash).
    pub fn sync(&mut self) -> Result<(), MetricsError> {
        self.file.sync_data().map_err(io_err(&self.path, "syncing"))
    }
}

/// The newline-terminated lines of `text` (a torn last line without `\n` is left out).
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines()
}

/// Reads a metrics log: every complete line parsed (blank lines skipped); a torn last line
/// without a newline is ignored. A malformed complete line is an error naming its number.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, MetricsError> {
    let text = fs::read_to_string(path).map_err(io_err(path, "reading"))?;
    let mut out = Vec::new();
    for (i, line) in complete_lines(&text).enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            MetricsLine::parse(line).map_err(|source| MetricsError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?,
        );
    }
    Ok(out)
}
