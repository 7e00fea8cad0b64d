//! Training metrics: the JSONL step log, the throughput meter and the MFU estimate.
//!
//! The log holds one JSON object per line: a [`StepRecord`] per optimizer step and, at the end,
//! one [`RunSummary`] line marked `"summary": true`. Each line is written with a single write
//! of the complete line, so a crash leaves a valid prefix of lines (at most a torn last line,
//! which [`read_metrics`] ignores). Non-finite numbers are written as `null` (JSON has no NaN)
//! and read back as NaN.

mod throughput;
mod writer;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use throughput::{GptFlopsShape, Throughput, gpt_flops_per_token, mfu, peak_flops};
pub use writer::{MetricsWriter, read_metrics};

/// Errors from writing or reading a metrics log.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics log {path}: {op} failed: {source}")]
    Io {
        path: std::path::PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("metrics log {path}, line {line}: not a metrics record: {source}")]
    Parse {
        path: std::path::PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("metrics record does not serialize: {0}")]
    Serialize(serde_json::Error),
}

/// Reads a number that may be `null` (a non-finite value written by serde_json) as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One optimizer step of the log. The first nine fields are always present (the CLI contract);
/// the options appear only when set; `extra` carries any further fields flat in the object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 0-based optimizer step.
    pub step: u64,
    /// Training loss of the step (mean over its micro-batches), unscaled.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Tokens processed since the start of the run, this step included (all ranks).
    pub tokens: u64,
    /// Throughput, tokens per second (smoothed; see [`Throughput`]).
    #[serde(deserialize_with = "nan_if_null")]
    pub tok_s: f64,
    /// Loss scale the step's backward pass used (1 without scaling).
    pub loss_scale: f64,
    /// Whether the optimizer step was skipped for non-finite gradients.
    pub skipped: bool,
    /// Global gradient norm, unscaled, before clipping (NaN/inf on a skipped step).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Peak device memory allocated so far, bytes (host memory on the CPU backend).
    pub mem_peak_bytes: u64,
    /// Validation loss, on steps that evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Model FLOPs utilisation, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Wall time of the step, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    /// Further fields, written flat into the same object.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The last line of a log: `{"summary": true, ...}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Optimizer steps run (applied + skipped).
    pub steps: u64,
    /// Tokens processed.
    pub tokens: u64,
    /// Loss of the last step.
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f64,
    /// Accuracy of the final evaluation (e.g. next-token accuracy), 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// Validation loss of the final evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_val_loss: Option<f64>,
    /// Best validation loss seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_loss: Option<f64>,
    /// Steps skipped for non-finite gradients.
    pub skipped_steps: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Mean throughput over the run, tokens per second.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_tok_s: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Further fields, written flat into the same object.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One parsed line of a metrics log.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricsLine {
    Step(StepRecord),
    Summary(RunSummary),
}

impl MetricsLine {
    /// Parses one line: an object with `"summary": true` is a summary, anything else a step.
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        let mut v: Map<String, Value> = serde_json::from_str(line)?;
        if v.get("summary") == Some(&Value::Bool(true)) {
            v.remove("summary");
            Ok(MetricsLine::Summary(serde_json::from_value(
                Value::Object(v),
            )?))
        } else {
            Ok(MetricsLine::Step(serde_json::from_value(Value::Object(v))?))
        }
    }

    /// The step record, if this line is one.
    pub fn as_step(&self) -> Option<&StepRecord> {
        match self {
            MetricsLine::Step(s) => Some(s),
            MetricsLine::Summary(_) => None,
        }
    }
}

/// Serializes a step record as one line (with the trailing newline).
pub fn step_line(record: &StepRecord) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string(record)?;
    s.push('\n');
    Ok(s)
}

/// Serializes a summary as one line `{"summary":true,...}` (with the trailing newline).
pub fn summary_line(summary: &RunSummary) -> Result<String, serde_json::Error> {
    // The marker goes first so a reader sees what the line is at a glance.
    let body = serde_json::to_string(summary)?;
    let rest = body.strip_prefix('{').unwrap_or(&body);
    let sep = if rest == "}" { "" } else { "," };
    Ok(format!("{{\"summary\":true{sep}{rest}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            loss: 2.5,
            lr: 6e-4,
            tokens: 1024 * (step + 1),
            tok_s: 12345.5,
            loss_scale: 65536.0,
            skipped: false,
            grad_norm: 0.75,
            mem_peak_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn step_line_has_the_contract_fields_and_parses_back() {
        let mut r = record(3);
        r.val_loss = Some(2.75);
        r.extra.insert("accum".into(), Value::from(4));
        let line = step_line(&r).unwrap();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: Map<String, Value> = serde_json::from_str(&line).unwrap();
        for k in [
            "step",
            "loss",
            "lr",
            "tokens",
            "tok_s",
            "loss_scale",
            "skipped",
            "grad_norm",
            "mem_peak_bytes",
            "val_loss",
            "accum",
        ] {
            assert!(v.contains_key(k), "missing {k} in {line}");
        }
        assert!(!v.contains_key("mfu"));
        assert_eq!(MetricsLine::parse(&line).unwrap(), MetricsLine::Step(r));
    }

    #[test]
    fn nonfinite_values_become_null_and_read_back_as_nan() {
        let mut r = record(0);
        r.loss = f64::NAN;
        r.grad_norm = f64::INFINITY;
        r.skipped = true;
        let line = step_line(&r).unwrap();
        assert!(line.contains("\"grad_norm\":null"), "{line}");
        let back = MetricsLine::parse(&line).unwrap();
        let s = back.as_step().unwrap();
        assert!(s.loss.is_nan() && s.grad_norm.is_nan() && s.skipped);
    }

    #[test]
    fn summary_line_is_marked_and_parses_back() {
        let s = RunSummary {
            steps: 10,
            tokens: 10240,
            final_loss: 1.5,
            eval_accuracy: Some(0.42),
            skipped_steps: 1,
            wall_s: 3.5,
            mean_tok_s: 2925.7,
            ..Default::default()
        };
        let line = summary_line(&s).unwrap();
        assert!(line.starts_with("{\"summary\":true,"), "{line}");
        assert_eq!(MetricsLine::parse(&line).unwrap(), MetricsLine::Summary(s));
        assert!(MetricsLine::parse("{\"step\": 1}").is_err());
        assert!(MetricsLine::parse("[1,2]").is_err());
    }
}
