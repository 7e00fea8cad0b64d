//! Data parallelism and ZeRO on in-process ranks: N ranks at micro-batch B follow one rank at
//! micro-batch N*B; stages 1-3 (with and without optimizer offload) take exactly the steps of
//! stage 0; every rank ends with the same weights; skipped steps and early stopping are decided
//! together. The tiny GPT on the built-in corpus, a few steps each.

use lathe_trainer::config::{DeviceSpec, TrainArgs};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};

fn small(steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(DeviceSpec::Cpu),
        micro_batch: Some(1),
        seq_len: Some(25),
        steps: Some(steps),
        warmup: Some(2),
        lr: Some(3e-3),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(4),
        loader_workers: Some(1),
        no_progress: true,
        seed: Some(7),
        ..Default::default()
    }
}

fn sharded(world: usize, zero: u8, offload: bool, base: TrainArgs) -> TrainArgs {
    TrainArgs {
        world: Some(world),
        zero: Some(zero),
        offload_optimizer: offload,
        ..base
    }
}

fn run(args: TrainArgs) -> TrainOutcome {
    run_train(args).expect("training run")
}

fn bits(o: &TrainOutcome) -> Vec<u64> {
    o.losses.iter().map(|l| l.to_bits()).collect()
}

/// N ranks at micro-batch B against one rank at N*B: equal in exact arithmetic, not bitwise.
/// One rank averages the loss over its N*B rows in one f32 reduction (and its gradients carry
/// that 1/(N*B) factor); N ranks average B rows each and then average the N per-rank results
/// (gradients: an f32 sum in rank order divided by N). The two orders round differently, by a
/// few f32 ulps per step, and the difference carries into the weights through each AdamW step.
/// Measured on this run: at most 3e-7 relative over 4 steps. The bound, 64 f32 epsilons
/// (7.6e-6) relative, leaves room for that drift while any real error — a missing 1/N, a
/// shard updated twice or not at all — moves the loss by 1e-3 or more.
const REL_TOL: f64 = 64.0 * f32::EPSILON as f64;

fn assert_close(reference: &TrainOutcome, got: &TrainOutcome, what: &str) {
    assert_eq!(reference.losses.len(), got.losses.len(), "{what}");
    for (i, (a, b)) in reference.losses.iter().zip(&got.losses).enumerate() {
        let rel = ((a - b) / a).abs();
        assert!(
            rel <= REL_TOL,
            "{what}, step {i}: {b} vs one rank's {a} (relative difference {rel:.2e} > {REL_TOL:.2e})"
        );
    }
}

fn assert_same_weights_on_every_rank(o: &TrainOutcome, what: &str) {
    let d0 = o.ranks[0].working_digest;
    for r in &o.ranks {
        assert_eq!(
            r.working_digest, d0,
            "{what}: rank {} holds other weights",
            r.rank
        );
    }
}

#[test]
fn n_ranks_follow_one_rank_and_every_stage_matches_stage_0() {
    for world in 1..=4usize {
        let reference = run(TrainArgs {
            micro_batch: Some(world),
            ..small(4)
        });
        assert!(
            reference.losses[3] < reference.losses[0],
            "{:?}",
            reference.losses
        );
        let stage0 = run(sharded(world, 0, false, small(4)));
        assert_eq!(stage0.ranks.len(), world);
        assert_close(&reference, &stage0, &format!("world {world} stage 0"));
        assert_same_weights_on_every_rank(&stage0, &format!("world {world} stage 0"));
        for zero in 0..=3u8 {
            for offload in [false, true] {
                if (zero, offload) == (0, false) {
                    continue;
                }
                let what = format!("world {world} stage {zero} offload {offload}");
                let o = run(sharded(world, zero, offload, small(4)));
                assert_eq!(
                    bits(&o),
                    bits(&stage0),
                    "{what}: not stage 0's losses bit for bit"
                );
                assert_close(&reference, &o, &what);
                if zero < 3 {
                    assert_same_weights_on_every_rank(&o, &what);
                    assert_eq!(
                        o.ranks[0].working_digest, stage0.ranks[0].working_digest,
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn low_precision_stages_match_bitwise_with_uneven_shards() {
    // The tiny model has 842,496 parameters: over 5 ranks, rank 0 holds 168,500, the others
    // 168,499.
    for (precision, stochastic) in [(Precision::Bf16, true), (Precision::Fp16, false)] {
        let base = TrainArgs {
            precision: Some(precision),
            stochastic_rounding: stochastic,
            ..small(3)
        };
        let stage0 = run(sharded(5, 0, false, base.clone()));
        assert_same_weights_on_every_rank(&stage0, &format!("{precision:?} stage 0"));
        for (zero, offload) in [(1, false), (2, true), (3, false), (3, true)] {
            let what = format!("{precision:?} world 5 stage {zero} offload {offload}");
            let o = run(sharded(5, zero, offload, base.clone()));
            assert_eq!(bits(&o), bits(&stage0), "{what}");
            if zero < 3 {
                assert_same_weights_on_every_rank(&o, &what);
                assert_eq!(
                    o.ranks[0].working_digest, stage0.ranks[0].working_digest,
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_skips_the_step_everywhere() {
    let base = TrainArgs {
        precision: Some(Precision::Fp16),
        inject_nonfinite: Some("1".into()),
        ..small(3)
    };
    let stage0 = run(sharded(2, 0, false, base.clone()));
    let stage3 = run(sharded(2, 3, true, base));
    assert_eq!(stage0.skipped_steps, 1);
    assert_eq!(stage3.skipped_steps, 1);
    assert_eq!(bits(&stage0), bits(&stage3));
    assert!(stage3.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn early_stopping_is_decided_by_rank_0_for_every_rank() {
    let out = run(sharded(
        3,
        3,
        false,
        TrainArgs {
            eval_every: Some(1),
            early_stop_patience: Some(2),
            // Demand an impossible improvement: every evaluation after the first counts as bad.
            early_stop_min_delta: Some(1e9),
            ..small(20)
        },
    ));
    assert!(out.stopped_early);
    assert_eq!(out.steps, 3, "best at step 1, two bad evaluations, stop");
    assert!(out.final_val_loss.is_some_and(f64::is_finite));
}
