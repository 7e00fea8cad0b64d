//! `lathe report`: turns a JSONL step log into one self-contained HTML page with SVG plots (loss
//! and validation loss, learning rate, throughput, loss scale, skipped steps, gradient norm, peak
//! memory) and a table of the run's summary. The page loads nothing from elsewhere.

mod html;
mod log;
mod plots;
mod ticks;

pub use log::{RunLog, StepRecord, parse_log};

use std::path::PathBuf;

use crate::profiler::write_atomic;

/// Errors of reading a log and writing its report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The log could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The log has no line with content.
    #[error("the log is empty")]
    Empty,
    /// The log has a summary but no step line.
    #[error("the log has no step records")]
    NoSteps,
    /// A line of the log is not a valid record.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Drawing a plot failed.
    #[error("cannot draw plot \"{plot}\": {message}")]
    Plot {
        /// Title of the plot.
        plot: String,
        /// The drawing error.
        message: String,
    },
    /// The report could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The report file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Arguments of `lathe report`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// JSONL step log written by `lathe train --log`.
    pub log: PathBuf,
    /// Where to write the HTML report [default: the log's path with extension .html].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl ReportArgs {
    /// The output path: `--out`, or the log's path with its extension replaced by `html`.
    pub fn out_path(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| self.log.with_extension("html"))
    }
}

/// Titles of the plots, in page order. Each one is an `<svg>` in the page.
pub const PLOT_TITLES: [&str; 7] = [
    "Loss",
    "Learning rate",
    "Throughput",
    "Loss scale",
    "Skipped steps",
    "Gradient norm",
    "Peak memory",
];

/// Renders the report page of `log`. `source` names the log in the page's heading.
pub fn render_report(log: &RunLog, source: &str) -> Result<String, ReportError> {
    let plots = plots::all_plots(log)?;
    Ok(html::page(log, source, &plots))
}

/// Reads `args.log`, writes the HTML report atomically, and prints where it went.
pub fn run_report(args: ReportArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.log).map_err(|source| ReportError::Read {
        path: args.log.clone(),
        source,
    })?;
    let log = parse_log(&bytes).map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot read the step log {}", args.log.display()))
    })?;
    let out = args.out_path();
    if out == args.log {
        anyhow::bail!(
            "the report would overwrite its own log {}; pass --out",
            out.display()
        );
    }
    let page = render_report(&log, &args.log.display().to_string())?;
    write_atomic(&out, page.as_bytes()).map_err(|source| ReportError::Write {
        path: out.clone(),
        source,
    })?;
    println!(
        "wrote {} ({} steps, {} plots)",
        out.display(),
        log.steps.len(),
        PLOT_TITLES.len()
    );
    Ok(())
}
