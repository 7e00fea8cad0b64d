//! The report page: a heading, the summary tables and the plots, with inline CSS. Nothing is
//! loaded from elsewhere, so the file can be mailed or archived as it is.

use std::fmt::Write as _;

use serde_json::Value;

use super::log::RunLog;
use super::plots::{Plot, fmt_num};

const CSS: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 0;
       background: #f6f7f9; color: #1d2330; }
main { max-width: 1210px; margin: 0 auto; padding: 20px 16px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 0 0 10px; }
.source { color: #5b6475; margin: 0 0 18px; font-family: ui-monospace, monospace; font-size: 13px;
          word-break: break-all; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 16px; margin-bottom: 18px; }
.card { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 12px 14px; }
.tables .card { flex: 1 1 380px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceff3; vertical-align: top; }
th { font-weight: 600; color: #3a4254; white-space: nowrap; }
td.num { font-variant-numeric: tabular-nums; }
tr:last-child th, tr:last-child td { border-bottom: none; }
.empty { color: #7a8292; font-style: italic; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #5b6475; margin-top: 6px; min-height: 1em; }
footer { margin-top: 20px; font-size: 12px; color: #7a8292; }
";

/// Escapes text for HTML element content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.50 GiB`, `12.0 MiB`, `512 bytes`.
fn bytes_human(b: f64) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("TiB", 1099511627776.0),
        ("GiB", 1073741824.0),
        ("MiB", 1048576.0),
        ("KiB", 1024.0),
    ];
    for (u, d) in UNITS {
        if b.abs() >= d {
            return format!("{:.2} {u}", b / d);
        }
    }
    format!("{b:.0} bytes")
}

/// A number as a reader wants it: integers in full, others with up to six significant digits.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e9) {
        format!("{v:.4e}")
    } else {
        let digits = (5 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

fn json_cell(key: &str, v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if key.ends_with("bytes") => {
                format!("{} ({})", number(f), bytes_human(f))
            }
            Some(f) => number(f),
            None => n.to_string(),
        },
        Value::String(s) => escape(s),
        Value::Null => "<span class=\"empty\">null</span>".into(),
        other => escape(&other.to_string()),
    }
}

fn row(out: &mut String, key: &str, value_html: &str) {
    let _ = writeln!(
        out,
        "<tr><th>{}</th><td class=\"num\">{value_html}</td></tr>",
        escape(key)
    );
}

/// The last finite value of `f` in the log, with its step.
fn last(log: &RunLog, f: impl Fn(&super::StepRecord) -> Option<f64>) -> Option<(u64, f64)> {
    log.steps
        .iter()
        .rev()
        .find_map(|s| f(s).filter(|v| v.is_finite()).map(|v| (s.step, v)))
}

/// Extreme finite value of `f` (`pick` returns true when `a` should replace `b`), with its step.
fn extreme(
    log: &RunLog,
    f: impl Fn(&super::StepRecord) -> Option<f64>,
    pick: impl Fn(f64, f64) -> bool,
) -> Option<(u64, f64)> {
    log.steps
        .iter()
        .filter_map(|s| f(s).filter(|v| v.is_finite()).map(|v| (s.step, v)))
        .fold(None, |best, cur| match best {
            Some(b) if !pick(cur.1, b.1) => Some(b),
            _ => Some(cur),
        })
}

fn at_step((step, v): (u64, f64), show: impl Fn(f64) -> String) -> String {
    format!("{} <span class=\"empty\">(step {step})</span>", show(v))
}

/// Figures computed from the step lines.
fn derived_table(log: &RunLog) -> String {
    let mut t = String::new();
    let steps = &log.steps;
    row(&mut t, "step lines", &steps.len().to_string());
    if let (Some(first), Some(lastl)) = (steps.first(), steps.last()) {
        row(
            &mut t,
            "steps",
            &format!("{} to {}", first.step, lastl.step),
        );
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "<span class=\"empty\">-</span>".into());
    row(
        &mut t,
        "final loss",
        &opt(last(log, |s| s.loss).map(|p| at_step(p, number))),
    );
    row(
        &mut t,
        "lowest loss",
        &opt(extreme(log, |s| s.loss, |a, b| a < b).map(|p| at_step(p, number))),
    );
    if steps.iter().any(|s| s.val_loss.is_some()) {
        row(
            &mut t,
            "final val loss",
            &opt(last(log, |s| s.val_loss).map(|p| at_step(p, number))),
        );
        row(
            &mut t,
            "lowest val loss",
            &opt(extreme(log, |s| s.val_loss, |a, b| a < b).map(|p| at_step(p, number))),
        );
    }
    row(
        &mut t,
        "final lr",
        &opt(last(log, |s| s.lr).map(|p| at_step(p, number))),
    );
    // The first step pays for compilation, allocation and warm caches; leave it out when there
    // is more than one.
    let tok: Vec<f64> = steps
        .iter()
        .skip(usize::from(steps.len() > 1))
        .filter_map(|s| s.tok_s)
        .filter(|v| v.is_finite())
        .collect();
    if !tok.is_empty() {
        let mean = tok.iter().sum::<f64>() / tok.len() as f64;
        let label = if steps.len() > 1 {
            "mean tok/s (after the first step)"
        } else {
            "tok/s"
        };
        row(&mut t, label, &fmt_num(mean));
    }
    if let Some(p) = last(log, |s| s.tokens) {
        row(&mut t, "tokens (last step line)", &at_step(p, number));
    }
    if steps.iter().any(|s| s.skipped.is_some()) {
        let n = steps.iter().filter(|s| s.skipped == Some(true)).count();
        row(&mut t, "skipped steps", &n.to_string());
    }
    if let Some(p) = last(log, |s| s.loss_scale) {
        row(&mut t, "final loss scale", &at_step(p, number));
    }
    if let Some(p) = extreme(log, |s| s.grad_norm, |a, b| a > b) {
        row(&mut t, "largest grad norm", &at_step(p, number));
    }
    if let Some(p) = extreme(log, |s| s.mem_peak_bytes, |a, b| a > b) {
        row(&mut t, "peak memory", &at_step(p, bytes_human));
    }
    t
}

/// The page.
pub(crate) fn page(log: &RunLog, source: &str, plots: &[Plot]) -> String {
    let mut h = String::with_capacity(64 * 1024 + plots.iter().map(|p| p.svg.len()).sum::<usize>());
    let src = escape(source);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Lathe run report: {src}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
         <h1>Lathe run report</h1>\n<p class=\"source\">{src}</p>\n"
    );

    h.push_str(
        "<section class=\"tables\" id=\"summary\">\n<div class=\"card\">\n<h2>Run summary</h2>\n",
    );
    match &log.summary {
        Some(fields) if !fields.is_empty() => {
            h.push_str("<table class=\"run-summary\">\n");
            for (k, v) in fields {
                row(&mut h, k, &json_cell(k, v));
            }
            h.push_str("</table>\n");
        }
        Some(_) => h.push_str("<p class=\"empty\">The summary line has no fields.</p>\n"),
        None => h.push_str(
            "<p class=\"empty\">The log has no summary line (the run may not have finished).</p>\n",
        ),
    }
    h.push_str(
        "</div>\n<div class=\"card\">\n<h2>From the step log</h2>\n<table class=\"derived\">\n",
    );
    h.push_str(&derived_table(log));
    h.push_str("</table>\n</div>\n</section>\n");

    h.push_str("<section class=\"plots\">\n");
    for p in plots {
        let id: String = p
            .title
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let _ = write!(
            h,
            "<figure class=\"card plot\" id=\"plot-{id}\" aria-label=\"{}\">\n{}\n<figcaption>{}</figcaption>\n</figure>\n",
            escape(p.title),
            p.svg,
            p.note.as_deref().map(escape).unwrap_or_default()
        );
    }
    h.push_str("</section>\n");
    let _ = write!(
        h,
        "<footer>Written by lathe report from {} step line(s){}.</footer>\n</main>\n</body>\n</html>\n",
        log.steps.len(),
        if log.summary.is_some() {
            " and a summary line"
        } else {
            ""
        }
    );
    h
}
