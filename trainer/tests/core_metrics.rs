//! The JSONL metrics log: lines parse back, a torn tail is ignored, resume trims the log.

use std::fs::{self, OpenOptions};
use std::io::Write;

use lathe_trainer::metrics::{MetricsLine, MetricsWriter, RunSummary, StepRecord, read_metrics};
use serde_json::{Map, Value};

fn record(step: u64) -> StepRecord {
    StepRecord {
        step,
        loss: 4.0 - step as f64 * 0.1,
        lr: 6e-4,
        tokens: 4096 * (step + 1),
        tok_s: 50_000.0 + step as f64,
        loss_scale: 65536.0,
        skipped: step == 2,
        grad_norm: if step == 2 { f64::INFINITY } else { 0.5 },
        mem_peak_bytes: 123_456_789,
        val_loss: step.is_multiple_of(2).then_some(3.9),
        mfu: Some(0.41),
        step_ms: None,
        extra: Map::new(),
    }
}

#[test]
fn written_lines_parse_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/run.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    for s in 0..4 {
        w.write_step(&record(s)).unwrap();
    }
    let summary = RunSummary {
        steps: 4,
        tokens: 4 * 4096,
        final_loss: 3.7,
        eval_accuracy: Some(0.31),
        skipped_steps: 1,
        wall_s: 1.25,
        mean_tok_s: 50_001.5,
        ..Default::default()
    };
    w.write_summary(&summary).unwrap();
    assert_eq!(w.lines(), 5);

    // Every line is a standalone JSON object with the contract fields.
    let text = fs::read_to_string(&path).unwrap();
    for line in text.lines().take(4) {
        let v: Map<String, Value> = serde_json::from_str(line).unwrap();
        for k in [
            "step",
            "loss",
            "lr",
            "tokens",
            "tok_s",
            "loss_scale",
            "skipped",
        ] {
            assert!(v.contains_key(k), "{k} missing from {line}");
        }
        assert!(v.contains_key("grad_norm") && v.contains_key("mem_peak_bytes"));
    }
    let lines = read_metrics(&path).unwrap();
    assert_eq!(lines.len(), 5);
    for (s, line) in lines.iter().take(4).enumerate() {
        let got = line.as_step().unwrap();
        let want = record(s as u64);
        if s == 2 {
            assert!(got.grad_norm.is_nan() && got.skipped);
        } else {
            assert_eq!(got, &want);
        }
    }
    assert_eq!(lines[4], MetricsLine::Summary(summary));
}

#[test]
fn a_torn_last_line_is_ignored_and_resume_trims() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let mut w = MetricsWriter::create(&path).unwrap();
    for s in 0..6 {
        w.write_step(&record(s)).unwrap();
    }
    w.write_summary(&RunSummary::default()).unwrap();
    drop(w);
    // A crash in the middle of a write.
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"step\": 6, \"loss\"")
        .unwrap();
    assert_eq!(read_metrics(&path).unwrap().len(), 7);

    // Resuming after step 3 keeps steps 0..=3 and continues from there.
    let mut w = MetricsWriter::resume(&path, 3).unwrap();
    assert_eq!(w.lines(), 4);
    w.write_step(&record(4)).unwrap();
    let steps: Vec<u64> = read_metrics(&path)
        .unwrap()
        .iter()
        .map(|l| l.as_step().unwrap().step)
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4]);

    // Resume on a missing log creates it.
    let fresh = dir.path().join("new.jsonl");
    let w = MetricsWriter::resume(&fresh, 10).unwrap();
    assert_eq!(w.lines(), 0);
    assert!(fresh.exists());
}

#[test]
fn a_malformed_line_is_reported_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let good = serde_json::to_string(&record(0)).unwrap();
    fs::write(&path, format!("{good}\nnot json\n")).unwrap();
    let e = read_metrics(&path).unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}
