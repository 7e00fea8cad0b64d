//! `lathe report`: one self-contained HTML page with a plot per metric and the run's summary;
//! clear errors for bad logs.

use std::fmt::Write as _;
use std::path::Path;

use clap::Parser;
use lathe_trainer::report::{PLOT_TITLES, ReportArgs, ReportError, parse_log, run_report};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ReportArgs,
}

/// A 40-step fp16 run: loss scale backs off at the skipped steps, validation every 10 steps, a
/// non-finite loss logged as null, and a summary line.
fn sample_log() -> String {
    let mut s = String::new();
    let mut scale = 65536.0;
    for step in 0..40u64 {
        let skipped = step == 5 || step == 21;
        if skipped {
            scale /= 2.0;
        }
        let loss = if step == 7 {
            "null".to_string()
        } else {
            format!("{}", 5.0 - 0.08 * step as f64)
        };
        let val = if step % 10 == 9 {
            format!(", \"val_loss\": {}", 5.1 - 0.08 * step as f64)
        } else {
            String::new()
        };
        writeln!(
            s,
            "{{\"step\": {step}, \"loss\": {loss}, \"lr\": {}, \"tokens\": {}, \"tok_s\": {}, \
             \"loss_scale\": {scale}, \"skipped\": {skipped}, \"grad_norm\": {}, \
             \"mem_peak_bytes\": {}{val}}}",
            3e-4 * (step as f64 / 40.0),
            (step + 1) * 4096,
            12000.0 + step as f64,
            1.0 + 1.0 / (step + 1) as f64,
            (1u64 << 30) + step * 1024,
        )
        .expect("write to string");
    }
    s.push_str(
        "{\"summary\": true, \"final_loss\": 1.875, \"eval_accuracy\": 0.8125, \
         \"model\": \"gpt <tiny>\"}\n",
    );
    s
}

/// The `<svg>` element inside the figure labelled `title`.
fn figure_svg<'a>(html: &'a str, title: &str) -> &'a str {
    let start = html
        .find(&format!("aria-label=\"{title}\""))
        .unwrap_or_else(|| panic!("no figure for {title:?}"));
    let fig = &html[start..];
    let fig = &fig[..fig.find("</figure>").expect("figure closes")];
    let svg = &fig[fig.find("<svg").expect("figure has an <svg>")..];
    &svg[..svg.find("</svg>").expect("svg closes") + "</svg>".len()]
}

/// The trimmed contents of the `<text>` elements of an SVG.
fn svg_texts(svg: &str) -> Vec<&str> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim())
        })
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write log");
    p
}

#[test]
fn the_page_has_every_plot_and_the_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = write(dir.path(), "run.jsonl", &sample_log());
    let cli = Cli::try_parse_from(["lathe-report", log.to_str().expect("utf-8 path")])
        .expect("arguments parse");
    assert_eq!(cli.args.out_path(), dir.path().join("run.html"));
    run_report(cli.args).expect("report");

    let mut entries: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("name"))
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["run.html", "run.jsonl"],
        "no temporary file is left behind"
    );

    let html = std::fs::read_to_string(dir.path().join("run.html")).expect("read report");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(
        html.matches("<svg").count(),
        PLOT_TITLES.len(),
        "one <svg> per plot"
    );
    assert_eq!(html.matches("</svg>").count(), PLOT_TITLES.len());
    for title in PLOT_TITLES {
        let svg = figure_svg(&html, title);
        assert!(
            svg_texts(svg).contains(&title),
            "plot title {title:?} in its SVG"
        );
    }
    // Both loss series and the skipped-step markers have legend entries.
    for legend in ["train loss", "val loss", "skipped step"] {
        assert!(html.contains(legend), "legend {legend:?}");
    }
    // The summary line's fields, escaped.
    assert!(html.contains("eval_accuracy") && html.contains("0.8125"));
    assert!(html.contains("final_loss") && html.contains("1.875"));
    assert!(html.contains("gpt &lt;tiny&gt;") && !html.contains("gpt <tiny>"));
    // Figures computed from the steps.
    assert!(html.contains("skipped steps") && html.contains("2 of 40 logged steps skipped"));
    assert!(html.contains("1.00 GiB"), "peak memory in readable units");
    // Self-contained: no scripts, stylesheets, images or links to fetch.
    for banned in [
        "<script", "<link", "<img", "src=", "href=", "@import", "url(",
    ] {
        assert!(
            !html.contains(banned),
            "page must not load anything ({banned})"
        );
    }
}

#[test]
fn out_path_can_be_chosen_and_missing_fields_still_give_every_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = write(
        dir.path(),
        "tiny.jsonl",
        "{\"step\": 0, \"loss\": 3.0}\n\n{\"step\": 1}\n",
    );
    let out = dir.path().join("elsewhere.html");
    let cli = Cli::try_parse_from([
        "lathe-report",
        log.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
    ])
    .expect("arguments parse");
    run_report(cli.args).expect("report");
    let html = std::fs::read_to_string(&out).expect("read report");
    assert_eq!(html.matches("<svg").count(), PLOT_TITLES.len());
    assert!(html.contains("no step line has a &quot;lr&quot; value"));
    let lr = figure_svg(&html, "Learning rate");
    assert!(svg_texts(lr).contains(&"no data in the log"));
    assert!(html.contains("no summary line"));
}

fn report_err(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = write(dir.path(), "bad.jsonl", text);
    let err = run_report(ReportArgs { log, out: None }).expect_err("bad log must fail");
    assert!(
        !dir.path().join("bad.html").exists(),
        "nothing written on error"
    );
    format!("{err:#}")
}

#[test]
fn a_malformed_line_is_named_by_its_number() {
    let msg = report_err(
        "{\"step\": 0, \"loss\": 1.0}\n{\"step\": 1, \"loss\": 0.9}\n{\"step\": 2, \"loss\": \n",
    );
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("bad.jsonl"), "{msg}");
    match parse_log(b"{\"step\": 0}\n[1, 2]\n") {
        Err(ReportError::Line { line: 2, message }) => {
            assert!(message.contains("object"), "{message}")
        }
        other => panic!("expected a line 2 error, got {other:?}"),
    }
    match parse_log(b"{\"step\": 0}\n\n{\"step\": 1, \"loss\": \"high\"}\n") {
        Err(ReportError::Line { line: 3, message }) => {
            assert!(message.contains("loss"), "{message}")
        }
        other => panic!("expected a line 3 error, got {other:?}"),
    }
    match parse_log(b"{\"loss\": 1.0}\n") {
        Err(ReportError::Line { line: 1, message }) => {
            assert!(message.contains("step"), "{message}")
        }
        other => panic!("expected a missing-step error, got {other:?}"),
    }
    match parse_log(b"{\"step\": 0}\n\xff\xfe\n") {
        Err(ReportError::Line { line: 2, message }) => {
            assert!(message.contains("UTF-8"), "{message}")
        }
        other => panic!("expected a UTF-8 error, got {other:?}"),
    }
}

#[test]
fn empty_and_step_less_logs_are_errors() {
    assert!(report_err("").contains("empty"));
    assert!(report_err("\n  \n").contains("empty"));
    assert!(report_err("{\"summary\": true, \"final_loss\": 1.0}\n").contains("no step"));
    let dir = tempfile::tempdir().expect("tempdir");
    let err = run_report(ReportArgs {
        log: dir.path().join("missing.jsonl"),
        out: None,
    })
    .expect_err("missing file");
    assert!(format!("{err:#}").contains("missing.jsonl"), "{err:#}");
}

#[test]
fn parsed_records_keep_values_and_nulls() {
    let log = parse_log(sample_log().as_bytes()).expect("parse");
    assert_eq!(log.steps.len(), 40);
    assert_eq!(log.steps[7].loss, None, "null loss");
    assert_eq!(log.steps[5].skipped, Some(true));
    assert_eq!(
        log.steps[9].val_loss.map(|v| (v * 1e6).round()),
        Some(4_380_000.0)
    );
    assert_eq!(log.steps[39].loss_scale, Some(16384.0));
    let summary = log.summary.expect("summary line");
    assert_eq!(summary["eval_accuracy"], 0.8125);
    assert!(!summary.contains_key("summary"));
}
