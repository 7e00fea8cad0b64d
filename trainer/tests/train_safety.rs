//! Issue 13, "nothing lost, nothing late": checkpoints and runs that must not be lost, failures
//! found before the first step, divergence that stops with an error, and options that work as
//! documented. Runs the tiny GPT on the CPU reference backend at small batch sizes.

use lathe_trainer::checkpoint::{CheckpointReader, STATE_FILE, list_checkpoints};
use lathe_trainer::config::{DeviceSpec, TrainArgs, TrainConfig};
use lathe_trainer::data::{PrepareArgs, TokenizerKind, run_prepare, write_shard};
use lathe_trainer::metrics::{MetricsLine, read_metrics};
use lathe_trainer::precision::{LossScaler, MIN_SCALE, Precision};
use lathe_trainer::train::{TrainOutcome, run_train};
use std::path::{Path, PathBuf};

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

fn err(args: TrainArgs) -> String {
    match run_train(args) {
        Ok(o) => panic!("expected an error, the run finished {} steps", o.steps),
        Err(e) => lathe_trainer::error_text(&e),
    }
}

fn steps_in(dir: &Path) -> Vec<u64> {
    list_checkpoints(dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn step_records(log: &Path) -> Vec<lathe_trainer::metrics::StepRecord> {
    read_metrics(log)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Step(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// A byte-level dataset of `lines` lines under `root/name`.
fn dataset(root: &Path, name: &str, val_fraction: f64) -> PathBuf {
    let text = root.join(format!("{name}.txt"));
    let mut s = String::new();
    for i in 0..300 {
        s.push_str(&format!(
            "line {i}: the quick brown fox jumps over the lazy dog.\n"
        ));
    }
    std::fs::write(&text, s).unwrap();
    let data = root.join(name);
    run_prepare(PrepareArgs {
        input: vec![text],
        out: data.clone(),
        tokenizer: TokenizerKind::Bytes,
        val_fraction,
        shard_tokens: 1 << 20,
    })
    .unwrap();
    data
}

/// Records `n` validation tokens in a dataset's `meta.json` (after replacing its val shard).
fn set_val_tokens(data: &Path, n: usize) {
    let p = data.join("meta.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["val"]["tokens"] = serde_json::json!(n);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn keep_last_after_resuming_from_an_older_step_keeps_the_new_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(2),
        keep_last: Some(3),
        ..small(8)
    });
    assert_eq!(steps_in(&ck), vec![4, 6, 8]);
    // Go back to step 4 and take another path from there.
    let out = run(TrainArgs {
        resume: Some(ck.join("step-00000004")),
        save: Some(ck.clone()),
        save_every: Some(1),
        keep_last: Some(2),
        lr: Some(3e-3),
        ..small(6)
    });
    assert_eq!(out.steps, 6);
    assert_eq!(
        steps_in(&ck),
        vec![5, 6],
        "the newest checkpoints of the run being written survive, the abandoned step 8 does not"
    );
}

#[test]
fn a_fresh_run_refuses_a_save_directory_holding_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(1),
        ..small(3)
    });
    assert_eq!(steps_in(&ck), vec![1, 2, 3]);
    let before = std::fs::read(ck.join("step-00000002").join(STATE_FILE)).unwrap();
    let e = err(TrainArgs {
        save: Some(ck.clone()),
        seed: Some(8),
        ..small(2)
    });
    assert!(
        e.contains(&ck.display().to_string()) && e.contains("3 checkpoint(s), steps 1 to 3"),
        "{e}"
    );
    assert!(e.contains("--overwrite") && e.contains("--resume"), "{e}");
    assert_eq!(
        std::fs::read(ck.join("step-00000002").join(STATE_FILE)).unwrap(),
        before,
        "nothing was replaced"
    );
    // Resuming from there is fine, however the path is spelled.
    let spelled = PathBuf::from(format!("{}/", ck.canonicalize().unwrap().display()));
    let out = run(TrainArgs {
        save: Some(ck.clone()),
        resume: Some(spelled),
        ..small(4)
    });
    assert_eq!(out.steps, 4);
    // --overwrite replaces the other run's checkpoints with this one's.
    run(TrainArgs {
        save: Some(ck.clone()),
        overwrite: true,
        seed: Some(8),
        ..small(2)
    });
    assert_eq!(steps_in(&ck), vec![2]);
}

#[test]
fn an_edited_state_json_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    run(TrainArgs {
        save: Some(ck.clone()),
        ..small(2)
    });
    let state = ck.join("step-00000002").join(STATE_FILE);
    assert!(CheckpointReader::open(&ck).is_ok());
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"state_digest\""), "{text}");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["extra"]["tokens"] = serde_json::json!(12345);
    std::fs::write(&state, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let e = CheckpointReader::open(&ck).unwrap_err().to_string();
    assert!(e.contains(STATE_FILE) && e.contains("digest"), "{e}");
    let e = err(TrainArgs {
        resume: Some(ck.clone()),
        ..small(4)
    });
    assert!(e.contains("digest"), "{e}");
    // Removing the digest is caught too.
    v.as_object_mut().unwrap().remove("state_digest");
    std::fs::write(&state, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let e = CheckpointReader::open(&ck).unwrap_err().to_string();
    assert!(e.contains("no state_digest"), "{e}");
    // A checkpoint of format version 1 (written before the digest existed) still opens.
    v["format_version"] = serde_json::json!(1);
    std::fs::write(&state, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    assert!(CheckpointReader::open(&ck).is_ok());
}

#[test]
fn late_failures_are_found_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.jsonl");
    // --save and --profile below a regular file can never be written.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for (args, flag) in [
        (
            TrainArgs {
                save: Some(file.join("ck")),
                ..small(3)
            },
            "--save",
        ),
        (
            TrainArgs {
                profile: Some(file.join("trace.json")),
                ..small(3)
            },
            "--profile",
        ),
    ] {
        let e = err(TrainArgs {
            log: Some(log.clone()),
            ..args
        });
        assert!(e.contains(flag), "{e}");
        assert!(!log.exists(), "{flag}: a step ran before the failure");
    }
    // A dataset without a validation split.
    let no_val = dataset(dir.path(), "noval", 0.0);
    let e = err(TrainArgs {
        data: Some(no_val),
        log: Some(log.clone()),
        ..small(3)
    });
    assert!(
        e.contains("validation") && e.contains("--val-fraction"),
        "{e}"
    );
    assert!(!log.exists());
    // A validation shard with a token outside the vocabulary (bytes: 257 tokens).
    let data = dataset(dir.path(), "oov", 0.1);
    let val = data.join("val_000000.bin");
    let mut toks: Vec<u16> = (0..400).map(|i| (i % 250) as u16).collect();
    toks[30] = 300;
    write_shard(&val, &toks).unwrap();
    set_val_tokens(&data, toks.len());
    let e = err(TrainArgs {
        data: Some(data.clone()),
        log: Some(log.clone()),
        ..small(3)
    });
    assert!(e.contains("300") && e.contains("val_000000.bin"), "{e}");
    assert!(!log.exists());
    // A validation split smaller than one batch (4 x 25 tokens).
    write_shard(
        &val,
        &toks[..40].iter().map(|t| t % 250).collect::<Vec<_>>(),
    )
    .unwrap();
    set_val_tokens(&data, 40);
    let e = err(TrainArgs {
        data: Some(data),
        log: Some(log.clone()),
        ..small(3)
    });
    assert!(e.contains("validation") && e.contains("windows"), "{e}");
    assert!(!log.exists());
}

#[test]
fn the_loss_scale_has_a_floor_and_a_run_that_skips_every_step_fails() {
    let mut s = LossScaler::for_precision(Precision::Fp16);
    for _ in 0..200 {
        s.update(true);
    }
    assert_eq!(s.scale(), MIN_SCALE);
    assert!(s.inv_scale().is_finite());

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let every: Vec<String> = (0..60).map(|s| s.to_string()).collect();
    let e = err(TrainArgs {
        precision: Some(Precision::Fp16),
        inject_nonfinite: Some(every.join(",")),
        save: Some(ck.clone()),
        ..small(60)
    });
    assert!(e.contains("diverged") && e.contains("skipped"), "{e}");
    assert!(e.contains("loss scale down to 1"), "{e}");
    assert!(steps_in(&ck).is_empty(), "no checkpoint of a diverged run");
    // A learning rate that blows the weights up stops the run too.
    let e = err(TrainArgs {
        lr: Some(1e30),
        grad_clip: Some(0.0),
        ..small(60)
    });
    assert!(e.contains("diverged"), "{e}");
}

#[test]
fn documented_options_work() {
    let dir = tempfile::tempdir().unwrap();
    // --curriculum in the spelling the help gives.
    let out = run(TrainArgs {
        curriculum: Some("seq:8:3".into()),
        ..small(4)
    });
    assert_eq!(out.steps, 4);
    assert!(
        err(TrainArgs {
            curriculum: Some("seq".into()),
            ..small(4)
        })
        .contains("seq:START_LEN:WARMUP_STEPS")
    );
    // device = "cpu" in a config file, as on the command line.
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "device = \"cpu\"\nsteps = 2\n").unwrap();
    let a = TrainArgs {
        config: Some(toml),
        ..Default::default()
    }
    .with_config_file()
    .unwrap();
    assert_eq!(a.device, Some(DeviceSpec::Cpu));
    let c = TrainConfig::resolve(a, false).unwrap();
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["device"], "cpu");
    let back: TrainConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back, c);
    // Settings recorded by earlier checkpoints still read.
    let old: DeviceSpec = serde_json::from_str("\"Cpu\"").unwrap();
    assert_eq!(old, DeviceSpec::Cpu);
    let old: DeviceSpec = serde_json::from_str("{\"Cuda\": 2}").unwrap();
    assert_eq!(old, DeviceSpec::Cuda(2));
    // --data naming one shard file.
    let data = dataset(dir.path(), "one", 0.1);
    let out = run(TrainArgs {
        data: Some(data.join("train_000000.bin")),
        ..small(3)
    });
    assert!(out.final_val_loss.is_some_and(f64::is_finite));
    // --lr beyond f32 is refused at startup.
    assert!(
        err(TrainArgs {
            lr: Some(1e308),
            ..small(3)
        })
        .contains("--lr")
    );
}

#[test]
fn resume_details_log_once_match_paths_and_say_when_there_is_nothing_to_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "d", 0.1);
    let ck = dir.path().join("ck");
    let log = dir.path().join("run.jsonl");
    // Checkpoints at steps 2 and 4; the log holds records 0..=3.
    run(TrainArgs {
        data: Some(data.clone()),
        save: Some(ck.clone()),
        save_every: Some(2),
        log: Some(log.clone()),
        ..small(4)
    });
    let recs = step_records(&log);
    assert!(
        recs[0].tok_s.is_finite() && recs[0].tok_s > 0.0,
        "first step's tok/s: {}",
        recs[0].tok_s
    );
    // The same data, spelled as an absolute path with a trailing slash.
    let spelled = PathBuf::from(format!("{}/", data.canonicalize().unwrap().display()));
    // Back to step 2 (as after a crash there): the log's later records are replaced.
    run(TrainArgs {
        data: Some(spelled),
        save: Some(ck.clone()),
        resume: Some(ck.join("step-00000002")),
        log: Some(log.clone()),
        ..small(5)
    });
    let steps: Vec<u64> = step_records(&log).iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4], "each step logged once");
    // --steps equal to the checkpoint's: nothing to train, and the log is left alone.
    let before = std::fs::read(&log).unwrap();
    let out = run(TrainArgs {
        data: Some(data.clone()),
        save: Some(ck.clone()),
        resume: Some(ck.clone()),
        log: Some(log.clone()),
        ..small(5)
    });
    assert_eq!((out.steps, out.losses.len()), (5, 0));
    assert_eq!(std::fs::read(&log).unwrap(), before);
    let e = err(TrainArgs {
        data: Some(data),
        save: Some(ck.clone()),
        resume: Some(ck),
        ..small(4)
    });
    assert!(
        e.contains("nothing to train") && e.contains("step 5"),
        "{e}"
    );
}

/// Hidden `prepare` build directories next to `out`.
fn partials(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.partial-")))
        .collect()
}

/// Starts `lathe prepare` on a large (sparse) input and returns it once it has written a file.
// The caller waits for the child.
#[allow(clippy::zombie_processes)]
fn prepare_in_progress(input: &Path, out: &Path) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args([
            "prepare",
            "--tokenizer",
            "bytes",
            "--shard-tokens",
            "1000000",
        ])
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let started = partials(out).iter().any(|p| {
            std::fs::read_dir(out.parent().unwrap().join(p))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        });
        if started {
            return child;
        }
        assert!(t0.elapsed().as_secs() < 60, "prepare never started writing");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn an_interrupted_prepare_leaves_no_dataset_and_train_refuses_incomplete_ones() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.txt");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let out = dir.path().join("data");
    for sig in [2, 15] {
        let mut child = prepare_in_progress(&big, &out);
        lathe_trainer::signals::send(child.id(), sig);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig), "{status}");
        assert!(!out.exists(), "a half dataset under the final name");
        assert!(partials(&out).is_empty(), "{:?}", partials(&out));
    }
    // kill -9 leaves only the hidden build directory, which the next prepare removes.
    let mut child = prepare_in_progress(&big, &out);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());
    assert_eq!(partials(&out).len(), 1);
    drop(std::fs::remove_file(&big));
    let data = dataset(dir.path(), "data", 0.1);
    assert!(partials(&data).is_empty());
    lathe_trainer::data::check_complete(&data).unwrap();

    // train refuses a dataset with a listed shard missing, or an unfinished shard.
    let val = data.join("val_000000.bin");
    let kept = std::fs::read(&val).unwrap();
    std::fs::remove_file(&val).unwrap();
    let e = err(TrainArgs {
        data: Some(data.clone()),
        ..small(2)
    });
    assert!(
        e.contains("not a complete dataset") && e.contains("val_000000.bin"),
        "{e}"
    );
    std::fs::write(data.join(".val_000000.bin.tmp"), &kept).unwrap();
    std::fs::remove_file(data.join("meta.json")).unwrap();
    let e = lathe_trainer::data::check_complete(&data)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unfinished"), "{e}");
    // A complete llm.c-style directory (shards, no meta.json) is a dataset.
    std::fs::rename(data.join(".val_000000.bin.tmp"), &val).unwrap();
    lathe_trainer::data::check_complete(&data).unwrap();
}

#[test]
fn sizes_beyond_memory_are_refused_with_numbers_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "d", 0.1);
    let e = err(TrainArgs {
        data: Some(data),
        micro_batch: Some(2_000_000),
        ..small(2)
    });
    assert!(e.contains("GiB") && e.contains("--micro-batch"), "{e}");
    for (args, flag) in [
        (
            TrainArgs {
                prefetch: Some(1 << 40),
                ..small(2)
            },
            "--prefetch",
        ),
        (
            TrainArgs {
                eval_batches: Some(1 << 40),
                ..small(2)
            },
            "--eval-batches",
        ),
        (
            TrainArgs {
                eval_problems: Some(1 << 40),
                ..small(2)
            },
            "--eval-problems",
        ),
        (
            TrainArgs {
                world: Some(1 << 20),
                ..small(2)
            },
            "--world",
        ),
    ] {
        let e = err(args);
        assert!(e.contains(flag), "{e}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args([
            "bench",
            "memory",
            "--model",
            "tiny",
            "--micro-batch",
            "1000000000000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("--micro-batch") && text.contains("GiB"),
        "{text}"
    );
}

#[test]
fn checkpoints_are_ready_for_hugging_face() {
    use lathe_trainer::checkpoint::hf::{Gpt2Shape, gpt2_tensors};
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "d", 0.1);
    let ck = dir.path().join("ck");
    run(TrainArgs {
        data: Some(data.clone()),
        save: Some(ck.clone()),
        ..small(2)
    });
    let step = ck.join("step-00000002");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step.join("config.json")).unwrap()).unwrap();
    // The fields transformers' GPT2Config reads, with GPT-2's architecture.
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(
        cfg["vocab_size"], 257,
        "the bytes tokenizer's vocabulary, not the padding"
    );
    assert_eq!(cfg["activation_function"], "gelu_new");
    assert_eq!(cfg["layer_norm_epsilon"], 1e-5);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["eos_token_id"], 256);
    let n = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("{k}: {cfg}")) as usize;
    let shape = Gpt2Shape {
        vocab_size: n("vocab_size"),
        n_positions: n("n_positions"),
        n_embd: n("n_embd"),
        n_layer: n("n_layer"),
        n_head: n("n_head"),
    };
    assert_eq!(n("n_ctx"), shape.n_positions);
    assert_eq!(shape.n_embd % shape.n_head, 0);
    // model.safetensors holds exactly the tensors GPT2LMHeadModel expects for that config.
    let bytes = std::fs::read(step.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut found: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.shape().to_vec()))
        .collect();
    found.sort();
    let mut expected = gpt2_tensors(&shape);
    expected.sort();
    assert_eq!(found, expected);
    // Resuming restores the padding rows and continues exactly.
    let whole = run(TrainArgs {
        data: Some(data.clone()),
        ..small(4)
    });
    let resumed = run(TrainArgs {
        data: Some(data),
        resume: Some(ck.clone()),
        save: Some(ck),
        ..small(4)
    });
    let bits = |l: &[f64]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed.losses), bits(&whole.losses[2..]));

    // Where Python has numpy and safetensors (LATHE_PYTHON, default python3), an independent
    // GPT-2 forward with transformers' semantics, reading only config.json and
    // model.safetensors, gives the loss `lathe eval` gives.
    let python = std::env::var("LATHE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = |modules: &str| {
        std::process::Command::new(&python)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "line 12: the quick brown fox jumps over the lazy dog.\n",
    )
    .unwrap();
    if has("numpy, safetensors") {
        let out = std::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/hf_gpt2_reference.py"
            ))
            .arg(&step)
            .arg(&text)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let ours = lathe_trainer::train::run_eval(lathe_trainer::train::EvalArgs {
            checkpoint: step.clone(),
            text: Some(text.clone()),
            // One window over the whole text, as the reference reads it.
            seq_len: Some(64),
            ..Default::default()
        })
        .unwrap();
        assert!(
            (ours.loss - reference).abs() < 1e-4,
            "lathe {} vs reference {reference}",
            ours.loss
        );
    } else {
        eprintln!("skipping the NumPy GPT-2 reference: no {python} with numpy and safetensors");
    }
    // Where Python has transformers and torch, load the step directory as it is.
    if !has("transformers, torch") {
        eprintln!("skipping the transformers load: no python3 with transformers and torch");
        return;
    }
    let script = "import sys, torch, transformers\n\
        m = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1])\n\
        x = torch.tensor([[256, 104, 105, 33]])\n\
        out = m(x, labels=x)\n\
        assert out.logits.shape[-1] == 257, out.logits.shape\n\
        assert torch.isfinite(out.loss), out.loss\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(&step)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lathe_eval_scores_a_checkpoint_on_data_text_and_the_built_in_corpus() {
    use lathe_trainer::train::{EvalArgs, run_eval};
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "d", 0.1);
    let ck = dir.path().join("ck");
    run(TrainArgs {
        data: Some(data.clone()),
        save: Some(ck.clone()),
        steps: Some(20),
        ..small(20)
    });
    let on_data = |b| {
        run_eval(EvalArgs {
            checkpoint: ck.clone(),
            data: Some(data.clone()),
            micro_batch: Some(b),
            ..Default::default()
        })
        .unwrap()
    };
    let (a, b) = (on_data(4), on_data(7));
    assert_eq!(a.step, 20);
    assert!(a.loss.is_finite() && a.loss > 0.0, "{a:?}");
    assert!((a.perplexity - a.loss.exp()).abs() < 1e-9);
    assert_eq!(a.tokens, b.tokens, "every window is scored once");
    assert!((a.loss - b.loss).abs() < 1e-4 * a.loss, "{a:?} {b:?}");
    assert_eq!(a.exact_match, None);
    // A text file like the training data scores better than noise.
    let like = dir.path().join("like.txt");
    std::fs::write(
        &like,
        "line 7: the quick brown fox jumps over the lazy dog.\n".repeat(5),
    )
    .unwrap();
    let noise = dir.path().join("noise.txt");
    let n: String = (0..265u32)
        .map(|i| char::from(b'!' + (i * 37 % 90) as u8))
        .collect();
    std::fs::write(&noise, &n).unwrap();
    let text = |p: &Path| {
        run_eval(EvalArgs {
            checkpoint: ck.join("step-00000020"),
            text: Some(p.to_path_buf()),
            ..Default::default()
        })
        .unwrap()
    };
    let (l, z) = (text(&like), text(&noise));
    assert_eq!(
        l.tokens,
        265 - 1,
        "bytes tokenizer: every byte but the first is predicted"
    );
    assert!(l.loss < z.loss, "{l:?} {z:?}");
    // The built-in corpus: validation loss and exact match.
    let ck2 = dir.path().join("ck2");
    run(TrainArgs {
        save: Some(ck2.clone()),
        ..small(3)
    });
    let r = run_eval(EvalArgs {
        checkpoint: ck2,
        eval_problems: Some(5),
        ..Default::default()
    })
    .unwrap();
    assert!(r.loss.is_finite() && r.exact_match.is_some(), "{r:?}");
}

#[test]
fn messages_count_steps_from_one_and_say_each_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let lathe = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(args)
            .output()
            .unwrap()
    };
    // The third step (record 2 of the log) is skipped: "step 3", as the progress lines count.
    let out = lathe(&[
        "train",
        "--device",
        "cpu",
        "--precision",
        "fp16",
        "--inject-nonfinite",
        "2",
        "--steps",
        "3",
        "--micro-batch",
        "2",
        "--seq-len",
        "25",
        "--eval-batches",
        "1",
        "--eval-problems",
        "2",
        "--no-progress",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step 3: non-finite gradients"), "{err}");
    assert!(!err.contains("NaN tok/s"), "{err}");
    // An OS error is said once.
    let missing = dir.path().join("missing");
    let out = lathe(&[
        "train",
        "--device",
        "cpu",
        "--resume",
        missing.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let os = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    assert_eq!(err.matches("No such file").count(), 1, "{err} ({os})");
}

#[test]
fn a_failure_after_a_step_saves_the_checkpoint_first() {
    // Writing the log fails (a full disk) after the first step: the step is not lost.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let e = err(TrainArgs {
        log: Some(PathBuf::from("/dev/full")),
        save: Some(ck.clone()),
        ..small(5)
    });
    assert!(e.contains("checkpoint of step 1 was saved first"), "{e}");
    assert_eq!(steps_in(&ck), vec![1]);
    let out = run(TrainArgs {
        save: Some(ck.clone()),
        resume: Some(ck),
        ..small(5)
    });
    assert_eq!(out.steps, 5);
}
