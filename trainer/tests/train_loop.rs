//! End-to-end checks of `lathe train` on the CPU reference backend: logging, loss scaling and
//! skipped steps, resume == uninterrupted, recomputation, accumulation, early stopping, and
//! clear errors. Runs the tiny GPT on the built-in corpus at small batch sizes.

use lathe_trainer::config::{DeviceSpec, RecomputeArg, TrainArgs};
use lathe_trainer::metrics::{MetricsLine, read_metrics};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};
use std::path::Path;

fn small(steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(DeviceSpec::Cpu),
        micro_batch: Some(4),
        seq_len: Some(25),
        steps: Some(steps),
        warmup: Some(2),
        lr: Some(3e-3),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(8),
        loader_workers: Some(1),
        no_progress: true,
        seed: Some(7),
        ..Default::default()
    }
}

fn run(args: TrainArgs) -> TrainOutcome {
    run_train(args).expect("training run")
}

fn steps_of(log: &Path) -> Vec<lathe_trainer::metrics::StepRecord> {
    read_metrics(log)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Step(s) => Some(s),
            _ => None,
        })
        .collect()
}

#[test]
fn log_has_every_field_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.jsonl");
    let out = run(TrainArgs {
        log: Some(log.clone()),
        ..small(6)
    });
    assert_eq!(out.steps, 6);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "6 steps and a summary");
    for (i, l) in lines[..6].iter().enumerate() {
        for f in [
            "step",
            "loss",
            "lr",
            "tokens",
            "tok_s",
            "loss_scale",
            "skipped",
            "grad_norm",
            "mem_peak_bytes",
        ] {
            assert!(l.get(f).is_some(), "line {i} lacks {f}: {l}");
        }
        assert_eq!(l["step"], i as u64);
        assert!(l["mem_peak_bytes"].as_u64().unwrap() > 0);
    }
    let s = &lines[6];
    assert_eq!(s["summary"], true);
    assert!(
        s.get("eval_accuracy").is_some() && s.get("final_loss").is_some(),
        "{s}"
    );
    assert!(
        out.losses[5] < out.losses[0],
        "loss did not drop: {:?}",
        out.losses
    );
}

#[test]
fn fp16_skips_non_finite_steps_and_backs_off_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.jsonl");
    let out = run(TrainArgs {
        precision: Some(Precision::Fp16),
        inject_nonfinite: Some("2,4".into()),
        log: Some(log.clone()),
        ..small(6)
    });
    assert_eq!(out.skipped_steps, 2);
    let steps = steps_of(&log);
    let skipped: Vec<u64> = steps.iter().filter(|s| s.skipped).map(|s| s.step).collect();
    assert_eq!(skipped, vec![2, 4]);
    assert_eq!(steps[0].loss_scale, 65536.0);
    assert_eq!(steps[2].loss_scale, 65536.0, "step 2 ran at the old scale");
    assert_eq!(steps[3].loss_scale, 32768.0, "halved after the skip");
    assert_eq!(steps[5].loss_scale, 16384.0, "halved again after step 4");
    assert!(
        steps.iter().all(|s| s.loss.is_finite()),
        "training continued"
    );
}

#[test]
fn bf16_and_fp32_skip_and_log_non_finite_steps() {
    for p in [Precision::Bf16, Precision::Fp32] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("run.jsonl");
        run(TrainArgs {
            precision: Some(p),
            inject_nonfinite: Some("1".into()),
            log: Some(log.clone()),
            ..small(3)
        });
        let steps = steps_of(&log);
        assert!(
            steps[1].skipped && !steps[0].skipped && !steps[2].skipped,
            "{p:?}"
        );
        assert!(
            steps.iter().all(|s| s.loss_scale == 1.0),
            "{p:?}: no scaling"
        );
    }
}

fn resume_matches(precision: Precision, stochastic: bool, accum: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let base = TrainArgs {
        precision: Some(precision),
        stochastic_rounding: stochastic,
        accum: Some(accum),
        ..small(6)
    };
    let full = run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(3),
        ..base.clone()
    });
    // Resume from the step-3 checkpoint (named directly) and run to 6.
    let resumed = run(TrainArgs {
        resume: Some(ck.join("step-00000003")),
        ..base
    });
    assert_eq!(resumed.losses.len(), 3);
    for (i, (a, b)) in full.losses[3..].iter().zip(&resumed.losses).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{precision:?} step {}: {a} vs {b}",
            i + 3
        );
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bitwise() {
    resume_matches(Precision::Fp32, false, 1);
    resume_matches(Precision::Fp16, false, 2);
    resume_matches(Precision::Bf16, true, 1);
}

#[test]
fn recomputation_changes_nothing_but_memory() {
    let a = run(TrainArgs {
        recompute: Some(RecomputeArg::None),
        ..small(3)
    });
    let b = run(TrainArgs {
        recompute: Some(RecomputeArg::Block),
        ..small(3)
    });
    let bits = |o: &TrainOutcome| o.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    assert!(
        b.peak_mem_bytes < a.peak_mem_bytes,
        "{} vs {}",
        b.peak_mem_bytes,
        a.peak_mem_bytes
    );
}

#[test]
fn same_seed_same_losses() {
    let a = run(small(3));
    let b = run(small(3));
    assert_eq!(a.losses, b.losses);
    let c = run(TrainArgs {
        seed: Some(8),
        ..small(3)
    });
    assert_ne!(a.losses, c.losses);
}

#[test]
fn early_stopping_ends_the_run() {
    let out = run(TrainArgs {
        eval_every: Some(1),
        early_stop_patience: Some(2),
        // Demand an impossible improvement: every evaluation after the first counts as bad.
        early_stop_min_delta: Some(1e9),
        ..small(20)
    });
    assert!(out.stopped_early);
    assert_eq!(out.steps, 3, "best at step 1, two bad evaluations, stop");
}

#[test]
fn bad_settings_and_missing_gpu_are_clear_errors() {
    let e = run_train(TrainArgs {
        accum: Some(0),
        ..small(1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("--accum"), "{e:#}");
    let e = run_train(TrainArgs {
        model: Some("gpt5".into()),
        ..small(1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("gpt5"), "{e:#}");
    if !lathe_host::driver::driver_present() {
        let e = run_train(TrainArgs {
            device: Some(DeviceSpec::Cuda(0)),
            ..small(1)
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("no CUDA driver found"), "{e:#}");
    }
    // The simulated device opens everywhere; what its step does not have yet is refused.
    let e = run_train(TrainArgs {
        device: Some("sim".parse().unwrap()),
        optimizer: Some(lathe_trainer::config::OptimizerArg::Sgd),
        ..small(1)
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("--optimizer sgd"), "{msg}");
    assert!(
        "simulator"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("sim")
    );
    let e = run_train(TrainArgs {
        resume: Some("/nonexistent/lathe-ck".into()),
        ..small(1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/lathe-ck"), "{e:#}");
}

#[test]
fn profile_writes_a_trace_with_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    run(TrainArgs {
        profile: Some(trace.clone()),
        profile_wait: Some(1),
        profile_warmup: Some(1),
        profile_active: Some(2),
        ..small(5)
    });
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().expect("traceEvents");
    for name in ["data", "forward", "backward", "optimizer"] {
        let n = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name)
            .count();
        assert_eq!(n, 2, "{name}: one span in each of the 2 active steps");
    }
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "C" && e["name"] == "allocated_bytes"),
        "memory counter track missing"
    );
    // The CPU backend's op timings form the trace's kernel track.
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "M" && e["args"]["name"] == "CPU"),
        "no CPU kernel process"
    );
    for op in ["linear", "linear (backward)", "attention", "cross_entropy"] {
        assert!(
            events.iter().any(|e| e["ph"] == "X" && e["name"] == op),
            "no `{op}` op span"
        );
    }
}

#[test]
fn trains_on_prepared_shards() {
    use lathe_trainer::data::{PrepareArgs, TokenizerKind, run_prepare};
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    let mut s = String::new();
    for i in 0..400 {
        s.push_str(&format!(
            "line {i}: the quick brown fox jumps over the lazy dog.\n"
        ));
    }
    std::fs::write(&text, s).unwrap();
    let data = dir.path().join("data");
    run_prepare(PrepareArgs {
        input: vec![text],
        out: data.clone(),
        tokenizer: TokenizerKind::Bytes,
        val_fraction: 0.1,
        shard_tokens: 4096,
    })
    .unwrap();
    let out = run(TrainArgs {
        data: Some(data),
        eval_every: Some(3),
        ..small(6)
    });
    assert_eq!(out.steps, 6);
    assert_eq!(
        out.eval_accuracy, None,
        "exact match is for the built-in corpus only"
    );
    assert!(out.final_val_loss.is_some_and(f64::is_finite));
    assert!(out.losses[5] < out.losses[0], "{:?}", out.losses);
}
