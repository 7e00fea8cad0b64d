//! Reading the JSONL step log written by `lathe train --log`.
//!
//! One JSON object per line. Step lines carry `step` (required) and any of `loss`, `lr`, `tokens`,
//! `tok_s`, `loss_scale`, `skipped`, `grad_norm`, `mem_peak_bytes`, `val_loss`; a value may be
//! `null` (a non-finite number is logged as `null`). A line with `"summary": true` carries the
//! run's summary (any fields). Blank lines are ignored; unknown fields are ignored.

use serde_json::{Map, Value};

use super::ReportError;

/// One step of the log. Absent and `null` fields are `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepRecord {
    /// Optimizer step index.
    pub step: u64,
    /// Training loss.
    pub loss: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Tokens processed so far (or in the step, as the trainer logs it).
    pub tokens: Option<f64>,
    /// Throughput, tokens per second.
    pub tok_s: Option<f64>,
    /// Loss scale of fp16 training (1 when unscaled).
    pub loss_scale: Option<f64>,
    /// Whether the optimizer step was skipped (inf/nan gradients).
    pub skipped: Option<bool>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Peak device memory, bytes.
    pub mem_peak_bytes: Option<f64>,
    /// Validation loss, on steps that evaluated.
    pub val_loss: Option<f64>,
}

/// A parsed log: the step lines in file order and the summary line's fields (without the
/// `summary` key itself), if there was one (the last one wins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunLog {
    /// Step records, in file order.
    pub steps: Vec<StepRecord>,
    /// Fields of the summary line.
    pub summary: Option<Map<String, Value>>,
}

fn line_err(line: usize, message: impl Into<String>) -> ReportError {
    ReportError::Line {
        line,
        message: message.into(),
    }
}

/// A number field: absent or `null` gives `None`; anything but a number is an error.
fn number(obj: &Map<String, Value>, key: &str, line: usize) -> Result<Option<f64>, ReportError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(line_err(
            line,
            format!(
                "field \"{key}\" must be a number or null, found {}",
                kind(other)
            ),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_step(obj: &Map<String, Value>, line: usize) -> Result<StepRecord, ReportError> {
    let step = match obj.get("step") {
        None => return Err(line_err(line, "missing field \"step\"")),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(s), _) => s,
            // A float with an integral value (e.g. 12.0) is accepted.
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 2f64.powi(53) => f as u64,
            _ => {
                return Err(line_err(
                    line,
                    format!("field \"step\" must be a non-negative integer, found {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(line_err(
                line,
                format!(
                    "field \"step\" must be a non-negative integer, found {}",
                    kind(other)
                ),
            ));
        }
    };
    let skipped = match obj.get("skipped") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        // Some writers log flags as 0/1.
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Some(false),
        Some(Value::Number(n)) if n.as_f64() == Some(1.0) => Some(true),
        Some(other) => {
            return Err(line_err(
                line,
                format!("field \"skipped\" must be a boolean (or 0/1), found {other}"),
            ));
        }
    };
    Ok(StepRecord {
        step,
        loss: number(obj, "loss", line)?,
        lr: number(obj, "lr", line)?,
        tokens: number(obj, "tokens", line)?,
        tok_s: number(obj, "tok_s", line)?,
        loss_scale: number(obj, "loss_scale", line)?,
        skipped,
        grad_norm: number(obj, "grad_norm", line)?,
        mem_peak_bytes: number(obj, "mem_peak_bytes", line)?,
        val_loss: number(obj, "val_loss", line)?,
    })
}

/// Parses the log's bytes. Line numbers in errors are 1-based.
pub fn parse_log(bytes: &[u8]) -> Result<RunLog, ReportError> {
    let mut log = RunLog::default();
    let mut any_line = false;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|e| line_err(line, format!("not valid UTF-8 ({e})")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        any_line = true;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            // serde_json counts lines within the one line it was given; keep only the column.
            let msg = e.to_string();
            let what = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(w, _)| w);
            line_err(
                line,
                format!("malformed JSON at column {}: {what}", e.column()),
            )
        })?;
        let Value::Object(mut obj) = value else {
            return Err(line_err(
                line,
                format!("expected a JSON object, found {}", kind(&value)),
            ));
        };
        match obj.get("summary") {
            Some(Value::Bool(true)) => {
                obj.remove("summary");
                log.summary = Some(obj);
            }
            None | Some(Value::Bool(false)) | Some(Value::Null) => {
                log.steps.push(parse_step(&obj, line)?);
            }
            Some(other) => {
                return Err(line_err(
                    line,
                    format!("field \"summary\" must be a boolean, found {}", kind(other)),
                ));
            }
        }
    }
    if !any_line {
        return Err(ReportError::Empty);
    }
    if log.steps.is_empty() {
        return Err(ReportError::NoSteps);
    }
    Ok(log)
}
