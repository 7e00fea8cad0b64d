//! `--offload-optimizer` on devices (ZeRO-Offload): the master weights and moments of each
//! rank's shard live in host memory, the device decides skip, loss scale and clip factor,
//! the host's optimizer updates from the gradients copied down, and the new weights go back up.
//!
//! Checked: an offloaded device run takes the resident device run's steps bit for bit (the
//! host AdamW computes the fused kernel's bits, and it is given the device's own `1/scale`
//! and clip factor: no tolerance), in fp16 with an injected non-finite step too (the same
//! skip and backoff), in bf16 at ZeRO stages 1 and 3 over two ranks, in fp32 at stage 3 (the
//! master shard goes back up as the weights); the device peak drops by at least the moments
//! of the shard; checkpoints cross between offloaded and resident runs bit for bit; SGD, which
//! the device has no kernel for, runs offloaded. `device_optim.rs` compares one offloaded
//! optimizer with the fused one step by step.
//! Tiny model, micro-batch 1-2, 16 tokens, a few steps: the simulator interprets every lane
//! of every kernel.

use lathe_trainer::config::{DeviceSpec, OptimizerArg, TrainArgs};
use lathe_trainer::metrics::{MetricsLine, StepRecord, read_metrics};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};
use std::path::Path;

fn args(precision: Precision, world: usize, b: usize, steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(DeviceSpec::Sim),
        precision: Some(precision),
        world: Some(world),
        micro_batch: Some(b),
        seq_len: Some(16),
        steps: Some(steps),
        warmup: Some(2),
        lr: Some(3e-3),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(2),
        loader_workers: Some(1),
        no_progress: true,
        seed: Some(7),
        ..Default::default()
    }
}

fn run(a: TrainArgs) -> TrainOutcome {
    run_train(a).expect("training run")
}

fn steps_of(log: &Path) -> Vec<StepRecord> {
    read_metrics(log)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Step(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|l| l.to_bits()).collect()
}

#[test]
fn fp16_offloaded_on_one_device_takes_the_resident_steps_and_skips_and_holds_no_moments() {
    // ZeRO 0, one rank: the whole model is the rank's shard. Step 1's gradients get an inf:
    // the device finds it, both runs skip it and halve the scale, and the host moves nothing.
    let dir = tempfile::tempdir().unwrap();
    let base = TrainArgs {
        inject_nonfinite: Some("1".into()),
        ..args(Precision::Fp16, 1, 2, 3)
    };
    let mut outs = Vec::new();
    let mut recs = Vec::new();
    for offload in [false, true] {
        let log = dir.path().join(format!("offload-{offload}.jsonl"));
        outs.push(run(TrainArgs {
            offload_optimizer: offload,
            log: Some(log.clone()),
            ..base.clone()
        }));
        recs.push(steps_of(&log));
    }
    let (res, off) = (&outs[0], &outs[1]);
    assert_eq!(bits(&res.losses), bits(&off.losses), "losses");
    assert_eq!(res.ranks[0].working_digest, off.ranks[0].working_digest);
    assert_eq!(off.skipped_steps, 1);
    for (a, b) in recs[0].iter().zip(&recs[1]) {
        assert_eq!(
            (a.skipped, a.loss_scale.to_bits(), a.grad_norm.to_bits()),
            (b.skipped, b.loss_scale.to_bits(), b.grad_norm.to_bits()),
            "step {}",
            a.step
        );
    }
    assert_eq!(recs[1][2].loss_scale, recs[1][1].loss_scale / 2.0);
    // The device held the f32 master and both moments (12 bytes a parameter) without
    // offload; with it, neither. At least the moments' bytes must be gone from the peak.
    let m = off.ranks[0].memory;
    assert!(m.offloaded && m.optimizer > 0, "{m:?}");
    eprintln!(
        "fp16 world 1: device peak {} resident, {} offloaded; moments {} bytes, staging {}",
        res.peak_mem_bytes, off.peak_mem_bytes, m.optimizer, m.staging
    );
    assert!(
        off.peak_mem_bytes + m.optimizer <= res.peak_mem_bytes,
        "offloaded device peak {} is not the moments' {} bytes below the resident {}",
        off.peak_mem_bytes,
        m.optimizer,
        res.peak_mem_bytes
    );
    // Pinned staging: the f32 gradients and the f16 working copy of the shard.
    assert_eq!(m.staging, 6 * m.master / 4, "{m:?}");
}

#[test]
fn sharded_offloaded_runs_take_the_resident_steps_and_checkpoints_cross_both_ways() {
    // Two ranks, bf16 with stochastic rounding (its bits follow global indices, so the
    // shard's offset matters on the host too). The resident and the offloaded run at ZeRO 1
    // save at step 2 of 3 and agree bit for bit; the offloaded checkpoint resumes without
    // offload (stage 3), the resident one with offload (stage 3: the norm partials exchanged,
    // the shard's weights gathered by the forward), each bit for bit: the last step's loss
    // reads the restored weights, the final validation loss the update from the restored
    // moments.
    let dir = tempfile::tempdir().unwrap();
    let base = |zero: u8, offload: bool| TrainArgs {
        zero: Some(zero),
        offload_optimizer: offload,
        stochastic_rounding: true,
        ..args(Precision::Bf16, 2, 1, 3)
    };
    let mut full = Vec::new();
    for offload in [false, true] {
        full.push(run(TrainArgs {
            save: Some(dir.path().join(format!("ck-{offload}"))),
            save_every: Some(2),
            ..base(1, offload)
        }));
    }
    let (res, off) = (&full[0], &full[1]);
    assert_eq!(bits(&res.losses), bits(&off.losses), "losses");
    for (r, o) in res.ranks.iter().zip(&off.ranks) {
        assert_eq!(r.working_digest, o.working_digest, "rank {}", r.rank);
    }
    assert_eq!(off.ranks[0].working_digest, off.ranks[1].working_digest);
    let m = off.ranks[0].memory;
    eprintln!(
        "bf16 world 2 ZeRO 1: device peak {} resident, {} offloaded; moments of the shard {} \
         bytes",
        res.peak_mem_bytes, off.peak_mem_bytes, m.optimizer
    );
    assert!(
        off.peak_mem_bytes + m.optimizer <= res.peak_mem_bytes,
        "offloaded device peak {} is not the shard's moments ({} bytes) below the resident {}",
        off.peak_mem_bytes,
        m.optimizer,
        res.peak_mem_bytes
    );
    for (written_offloaded, full) in [(true, off), (false, res)] {
        let resumed = run(TrainArgs {
            resume: Some(
                dir.path()
                    .join(format!("ck-{written_offloaded}"))
                    .join("step-00000002"),
            ),
            ..base(3, !written_offloaded)
        });
        let val = |o: &TrainOutcome| o.final_val_loss.map(f64::to_bits);
        assert!(val(full).is_some());
        assert_eq!(
            (bits(&resumed.losses), val(&resumed)),
            (bits(&full.losses[2..]), val(full)),
            "a checkpoint written {} offload, resumed {} it",
            if written_offloaded { "with" } else { "without" },
            if written_offloaded { "without" } else { "with" },
        );
    }
}

#[test]
fn sgd_runs_on_a_device_with_the_optimizer_offloaded_and_not_without() {
    // The device has no SGD kernel; the host's SGD runs the offloaded update.
    let a = TrainArgs {
        optimizer: Some(OptimizerArg::Sgd),
        lr: Some(3e-2),
        ..args(Precision::Bf16, 1, 2, 3)
    };
    let e = run_train(a.clone()).expect_err("SGD without offload on a device");
    assert!(format!("{e:#}").contains("--offload-optimizer"), "{e:#}");
    let o = run(TrainArgs {
        offload_optimizer: true,
        ..a
    });
    assert!(o.losses.iter().all(|l| l.is_finite()), "{:?}", o.losses);
    assert!(o.losses[2] < o.losses[0], "{:?}", o.losses);
    assert_eq!(
        o.ranks[0].memory.optimizer, o.ranks[0].memory.master,
        "momentum"
    );
}

#[test]
fn fp32_offloaded_at_stage_3_takes_the_resident_step() {
    // fp32 has no separate working copy: the host's master shard itself goes back up, into
    // the device shard the forward's gathers read. One step, one rank (f32 GEMMs are the
    // slow ones on the simulator): the final validation loss reads the updated weights.
    let base = args(Precision::Fp32, 1, 1, 1);
    let res = run(base.clone());
    let off = run(TrainArgs {
        zero: Some(3),
        offload_optimizer: true,
        ..base
    });
    assert_eq!(bits(&res.losses), bits(&off.losses), "losses");
    let val = |o: &TrainOutcome| o.final_val_loss.expect("a final validation loss").to_bits();
    assert_eq!(val(&res), val(&off), "validation loss after the update");
    assert_eq!(off.ranks[0].memory.staging, off.ranks[0].memory.master);
}
