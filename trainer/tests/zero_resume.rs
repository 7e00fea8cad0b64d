//! Checkpoints of sharded runs: the shards are gathered into one full checkpoint, and resuming
//! it reproduces the uninterrupted run bit for bit — under the stage that wrote it or any
//! other, with or without offload — while a different world size is refused.

use lathe_autograd::{Gpt, GptConfig};
use lathe_trainer::checkpoint::CheckpointReader;
use lathe_trainer::config::{DeviceSpec, TrainArgs};
use lathe_trainer::optim::{ParamLayout, ParamView};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};
use std::path::Path;

fn base(world: usize, zero: u8, precision: Precision, steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(DeviceSpec::Cpu),
        precision: Some(precision),
        stochastic_rounding: precision == Precision::Bf16,
        world: Some(world),
        zero: Some(zero),
        micro_batch: Some(2),
        seq_len: Some(25),
        steps: Some(steps),
        warmup: Some(2),
        lr: Some(3e-3),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(2),
        loader_workers: Some(1),
        no_progress: true,
        seed: Some(11),
        ..Default::default()
    }
}

fn run(args: TrainArgs) -> TrainOutcome {
    run_train(args).expect("training run")
}

fn bits(l: &[f64]) -> Vec<u64> {
    l.iter().map(|x| x.to_bits()).collect()
}

/// The fp32 master weights stored in a checkpoint of the tiny GPT, as bits.
fn saved_master(step_dir: &Path) -> Vec<u32> {
    let r = CheckpointReader::open(step_dir).unwrap();
    let gpt = Gpt::new(GptConfig::tiny().with_vocab_size(257)).unwrap();
    let (mut views, mut offset) = (Vec::new(), 0);
    for s in gpt.param_specs() {
        views.push(ParamView::new(s.name, offset, &s.shape, s.decay));
        offset += s.shape.iter().product::<usize>();
    }
    let layout = ParamLayout::new(views, offset).unwrap();
    assert_eq!(
        r.state().optimizer.len,
        offset,
        "full optimizer state saved"
    );
    let mut master = vec![0f32; offset];
    // wte is stored with the vocabulary's 257 rows; the padding rows load as zeros.
    lathe_trainer::checkpoint::hf::load_master(&r, &layout, 257, &mut master).unwrap();
    master.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn world_2_stage_2_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let full = run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(3),
        ..base(2, 2, Precision::Bf16, 6)
    });
    let step3 = ck.join("step-00000003");
    let resumed = run(TrainArgs {
        resume: Some(step3.clone()),
        ..base(2, 2, Precision::Bf16, 6)
    });
    assert_eq!(resumed.losses.len(), 3);
    assert_eq!(
        bits(&resumed.losses),
        bits(&full.losses[3..]),
        "stage 2 resume"
    );
    // The checkpoint holds the whole model: stage 3 with offload resumes it exactly too.
    let other = run(TrainArgs {
        resume: Some(step3.clone()),
        offload_optimizer: true,
        ..base(2, 3, Precision::Bf16, 6)
    });
    assert_eq!(
        bits(&other.losses),
        bits(&full.losses[3..]),
        "stage 3 + offload resume"
    );
    // And it is the checkpoint stage 0 writes: same master weights, bit for bit.
    let ck0 = dir.path().join("ck0");
    run(TrainArgs {
        save: Some(ck0.clone()),
        ..base(2, 0, Precision::Bf16, 3)
    });
    assert_eq!(
        saved_master(&ck0.join("step-00000003")),
        saved_master(&step3)
    );
    // Another world size deals the data differently: refused, naming the setting.
    let e = run_train(TrainArgs {
        resume: Some(step3),
        ..base(1, 2, Precision::Bf16, 6)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("world"), "{e:#}");
}

#[test]
fn fp16_stage_3_resume_with_accumulation_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let args = |steps| TrainArgs {
        accum: Some(2),
        micro_batch: Some(1),
        ..base(3, 3, Precision::Fp16, steps)
    };
    let full = run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(2),
        ..args(4)
    });
    let resumed = run(TrainArgs {
        resume: Some(ck.join("step-00000002")),
        ..args(4)
    });
    assert_eq!(bits(&resumed.losses), bits(&full.losses[2..]));
}
