//! Checkpoints: bitwise roundtrip, atomicity against crashes, clear errors on damage, and a
//! model file any safetensors reader understands.

use std::collections::BTreeMap;
use std::fs;
use std::num::NonZeroUsize;
use std::path::Path;

use lathe_kernels::rng::Rng;
use lathe_trainer::checkpoint::{
    CheckpointError, CheckpointReader, MODEL_FILE, OPTIMIZER_FILE, OptimizerSnapshot, STATE_FILE,
    SaveRequest, latest_checkpoint, list_checkpoints, prune, save,
};
use lathe_trainer::optim::{
    Optimizer, OptimizerConfig, ParamLayout, SgdConfig, StepArgs, WorkingCopy,
};
use lathe_trainer::precision::{LossScaler, Precision};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

/// A tiny GPT-2-named model: 2 layers' worth of typical tensors.
fn gpt_layout() -> ParamLayout {
    let (v, c, t) = (11usize, 8usize, 6usize);
    let mut specs: Vec<(String, Vec<usize>, bool)> = vec![
        ("wte.weight".into(), vec![v, c], true),
        ("wpe.weight".into(), vec![t, c], true),
    ];
    for l in 0..2 {
        let h = format!("h.{l}");
        specs.push((format!("{h}.ln_1.weight"), vec![c], false));
        specs.push((format!("{h}.ln_1.bias"), vec![c], false));
        specs.push((format!("{h}.attn.c_attn.weight"), vec![c, 3 * c], true));
        specs.push((format!("{h}.attn.c_attn.bias"), vec![3 * c], false));
        specs.push((format!("{h}.mlp.c_fc.weight"), vec![c, 4 * c], true));
    }
    specs.push(("ln_f.weight".into(), vec![c], false));
    ParamLayout::packed(specs.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d))).unwrap()
}

struct Run {
    layout: ParamLayout,
    master: Vec<f32>,
    opt: Optimizer,
    scaler: LossScaler,
    rng: BTreeMap<String, [u64; 4]>,
    config: Value,
    data: Value,
    settings: Value,
    extra: Value,
}

/// A run a few steps in, with non-trivial state everywhere.
fn run(seed: u64) -> Run {
    let layout = gpt_layout();
    let n = layout.len();
    let mut r = Rng::new(seed);
    let mut master = r.vec_f32(n, -0.5, 0.5);
    let mut opt = Optimizer::new(OptimizerConfig::default(), n).unwrap();
    for _ in 0..3 {
        let g = r.vec_f32(n, -1.0, 1.0);
        opt.step(
            &mut master,
            &g,
            WorkingCopy::None,
            &layout,
            &StepArgs::new(1e-2),
        )
        .unwrap();
    }
    let mut scaler = LossScaler::for_precision(Precision::Fp16);
    scaler.update(true);
    scaler.update(false);
    let mut data_rng = Rng::new(seed ^ 1);
    data_rng.next_u64();
    Run {
        layout,
        master,
        opt,
        scaler,
        rng: BTreeMap::from([
            ("init".to_string(), Rng::new(seed).state()),
            ("data".to_string(), data_rng.state()),
        ]),
        config: json!({"n_layer": 2, "n_embd": 8, "vocab_size": 11, "block_size": 6}),
        data: json!({"shard": 3, "offset": 123456789012u64, "epoch": 1}),
        settings: json!({"lr": 6e-4, "precision": "fp16", "steps": 100, "seed": seed}),
        extra: json!({"early_stop": {"best": 2.5, "bad_evals": 1}}),
    }
}

fn request<'a>(r: &'a Run, step: u64) -> SaveRequest<'a> {
    SaveRequest {
        step,
        layout: &r.layout,
        master: &r.master,
        model_config: &r.config,
        optimizer: OptimizerSnapshot::of(&r.opt),
        scaler: &r.scaler,
        rng: &r.rng,
        data_position: &r.data,
        settings: &r.settings,
        extra: &r.extra,
        files: Vec::new(),
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn roundtrip_is_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(1);
    let path = save(dir.path(), &request(&r, 1234)).unwrap();
    assert_eq!(path, dir.path().join("step-00001234"));

    let ck = CheckpointReader::open(dir.path()).unwrap();
    assert_eq!(ck.path(), path);
    assert_eq!(ck.step(), 1234);
    let mut master = vec![f32::NAN; r.layout.len()];
    ck.load_model(&r.layout, &mut master).unwrap();
    assert_eq!(bits(&master), bits(&r.master));

    let mut opt = Optimizer::new(OptimizerConfig::default(), r.layout.len()).unwrap();
    ck.load_optimizer(&mut opt).unwrap();
    assert_eq!(opt, r.opt);
    assert_eq!(opt.step_count(), 3);

    let s = ck.state();
    assert_eq!(s.scaler, r.scaler);
    assert_eq!(s.rng, r.rng);
    assert_eq!(s.data_position, r.data);
    assert_eq!(s.settings, r.settings);
    assert_eq!(s.extra, r.extra);
    assert_eq!(s.model_config, r.config);
    assert_eq!(s.lathe_version, env!("CARGO_PKG_VERSION"));
    // The restored RNG continues the same stream.
    let mut a = Rng::from_state(r.rng["data"]);
    let mut b = Rng::from_state(s.rng["data"]);
    assert_eq!(a.next_u64(), b.next_u64());

    // A checkpoint directory given directly, also under another name, opens as itself.
    assert_eq!(latest_checkpoint(&path).unwrap().unwrap(), path);
    let best = dir.path().join("best");
    fs::rename(&path, &best).unwrap();
    assert!(latest_checkpoint(dir.path()).unwrap().is_none());
    let ck = CheckpointReader::open(&best).unwrap();
    ck.load_model(&r.layout, &mut master).unwrap();
    assert_eq!(bits(&master), bits(&r.master));
}

#[test]
fn model_file_reads_with_safetensors_alone() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(2);
    let path = save(dir.path(), &request(&r, 7)).unwrap();
    let bytes = fs::read(path.join(MODEL_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), r.layout.views().len());
    for v in r.layout.views() {
        let t = st.tensor(&v.name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), v.shape.as_slice());
        let vals: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(bits(&vals), bits(&r.master[v.range()]), "{}", v.name);
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["step"], "7");
    assert_eq!(meta["lathe_version"], env!("CARGO_PKG_VERSION"));
    let config: Value = serde_json::from_str(&meta["config"]).unwrap();
    assert_eq!(config, r.config);
    let ck = CheckpointReader::open(&path).unwrap();
    assert_eq!(ck.model_metadata().unwrap()["step"], "7");

    let opt_bytes = fs::read(path.join(OPTIMIZER_FILE)).unwrap();
    let st = SafeTensors::deserialize(&opt_bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["m", "v"]);
    assert_eq!(st.tensor("m").unwrap().shape(), &[r.layout.len()]);
}

#[test]
fn crash_leftovers_are_ignored_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(3);
    save(dir.path(), &request(&r, 1)).unwrap();
    // A crash mid-save of step 5 by a process that no longer exists, with partial files.
    let tmp = dir.path().join(".tmp-step-00000005-99999999");
    fs::create_dir(&tmp).unwrap();
    fs::write(tmp.join(MODEL_FILE), b"partial").unwrap();
    fs::write(tmp.join(STATE_FILE), b"{\"step\": 5").unwrap();
    // A step-named directory without state.json is not a checkpoint either.
    fs::create_dir(dir.path().join("step-00000009")).unwrap();
    let latest = latest_checkpoint(dir.path()).unwrap().unwrap();
    assert_eq!(latest, dir.path().join("step-00000001"));
    assert_eq!(CheckpointReader::open(dir.path()).unwrap().step(), 1);

    save(dir.path(), &request(&r, 2)).unwrap();
    assert!(
        !tmp.exists(),
        "stale temp dir of a dead process was not removed"
    );
    assert_eq!(
        latest_checkpoint(dir.path()).unwrap().unwrap(),
        dir.path().join("step-00000002")
    );
    // Nothing temporary is left behind by a successful save.
    let hidden: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn resave_replaces_and_prune_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let a = run(4);
    let b = run(5);
    for step in [10, 20, 30, 40] {
        save(dir.path(), &request(&a, step)).unwrap();
    }
    save(dir.path(), &request(&b, 40)).unwrap();
    let mut master = vec![0.0; b.layout.len()];
    CheckpointReader::open(dir.path())
        .unwrap()
        .load_model(&b.layout, &mut master)
        .unwrap();
    assert_eq!(bits(&master), bits(&b.master));

    let removed = prune(dir.path(), NonZeroUsize::new(2).unwrap()).unwrap();
    assert_eq!(removed.len(), 2);
    let left: Vec<u64> = list_checkpoints(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, vec![30, 40]);
}

fn corrupt_reason(e: &CheckpointError) -> String {
    match e {
        CheckpointError::Corrupt { path, reason } => format!("{} {reason}", path.display()),
        other => panic!("expected a corruption error, got {other}"),
    }
}

#[test]
fn damaged_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(6);
    let path = save(dir.path(), &request(&r, 3)).unwrap();
    let model = path.join(MODEL_FILE);
    let pristine = fs::read(&model).unwrap();
    let mut master = vec![0.0; r.layout.len()];

    // One flipped bit in the tensor data.
    let mut bad = pristine.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x10;
    fs::write(&model, &bad).unwrap();
    let e = CheckpointReader::open(&path)
        .unwrap()
        .load_model(&r.layout, &mut master)
        .unwrap_err();
    let msg = corrupt_reason(&e);
    assert!(msg.contains(MODEL_FILE) && msg.contains("digest"), "{msg}");
    assert!(
        master.iter().all(|&x| x == 0.0),
        "nothing is loaded from a corrupt file"
    );

    // Truncated.
    fs::write(&model, &pristine[..pristine.len() / 2]).unwrap();
    let e = CheckpointReader::open(&path).unwrap_err();
    assert!(corrupt_reason(&e).contains("bytes on disk"), "{e}");

    // Missing optimizer file.
    fs::write(&model, &pristine).unwrap();
    fs::remove_file(path.join(OPTIMIZER_FILE)).unwrap();
    let e = CheckpointReader::open(&path).unwrap_err();
    let msg = corrupt_reason(&e);
    assert!(
        msg.contains(OPTIMIZER_FILE) && msg.contains("missing"),
        "{msg}"
    );

    // Unparseable state.json.
    fs::write(path.join(STATE_FILE), b"{\"format_version\": 1, ").unwrap();
    let e = CheckpointReader::open(&path).unwrap_err();
    assert!(matches!(e, CheckpointError::Json { .. }), "{e}");
    assert!(e.to_string().contains(STATE_FILE), "{e}");

    // A newer format.
    fs::write(path.join(STATE_FILE), b"{\"format_version\": 99}").unwrap();
    let e = CheckpointReader::open(&path).unwrap_err();
    assert!(
        matches!(e, CheckpointError::FormatVersion { found: 99, .. }),
        "{e}"
    );

    // Nothing there at all.
    let empty = tempfile::tempdir().unwrap();
    let e = CheckpointReader::open(empty.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::NoCheckpoint { .. }), "{e}");
    assert!(latest_checkpoint(&empty.path().join("absent")).is_err());
}

#[test]
fn mismatched_expectations_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(7);
    let path = save(dir.path(), &request(&r, 1)).unwrap();
    let ck = CheckpointReader::open(&path).unwrap();
    let check = |views: &[(String, Vec<usize>)]| {
        let layout =
            ParamLayout::packed(views.iter().map(|(n, s)| (n.as_str(), s.as_slice(), true)))
                .unwrap();
        let mut m = vec![0.0; layout.len()];
        ck.load_model(&layout, &mut m).unwrap_err()
    };
    let mut views: Vec<(String, Vec<usize>)> = r
        .layout
        .views()
        .iter()
        .map(|v| (v.name.clone(), v.shape.clone()))
        .collect();

    views[2].1 = vec![4, 2];
    let e = check(&views);
    assert!(
        matches!(&e, CheckpointError::ShapeMismatch { name, found, .. }
            if name == "h.0.ln_1.weight" && found == &vec![8]),
        "{e}"
    );
    assert!(e.to_string().contains(MODEL_FILE));
    views[2].1 = vec![8];

    views.push(("lm_head.weight".into(), vec![3]));
    let e = check(&views);
    assert!(matches!(&e, CheckpointError::MissingTensor { name, .. } if name == "lm_head.weight"));
    views.pop();

    let dropped = views.remove(0);
    let e = check(&views);
    assert!(
        matches!(&e, CheckpointError::UnexpectedTensor { name, .. } if *name == dropped.0),
        "{e}"
    );

    let mut short = vec![0.0; 3];
    assert!(matches!(
        ck.load_model(&r.layout, &mut short),
        Err(CheckpointError::BufferLength { .. })
    ));

    let mut sgd =
        Optimizer::new(OptimizerConfig::Sgd(SgdConfig::default()), r.layout.len()).unwrap();
    let e = ck.load_optimizer(&mut sgd).unwrap_err();
    assert!(matches!(e, CheckpointError::Optimizer { .. }), "{e}");
    let mut wrong_len = [0.0f32; 5];
    let e = ck
        .load_optimizer_buffers(&mut [("m", &mut wrong_len[..])])
        .unwrap_err();
    assert!(matches!(e, CheckpointError::ShapeMismatch { .. }), "{e}");
}

#[test]
fn bad_requests_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(8);
    let mut req = request(&r, 1);
    req.master = &r.master[1..];
    assert!(matches!(
        save(dir.path(), &req),
        Err(CheckpointError::BufferLength { .. })
    ));
    let empty = |p: &Path| {
        fs::read_dir(p)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    };
    assert!(empty(dir.path()));
}
