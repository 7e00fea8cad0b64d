//! Data parallelism on devices: `--world N` ranks, each on its own simulated device, averaging
//! their gradients bucket by bucket during the backward pass (`DeviceGradReducer`).
//!
//! Checked: N ranks at micro-batch B follow one rank at micro-batch N*B (fp32, the 64-f32-eps
//! bound of `zero_equivalence.rs`, for the same reason: the two runs average in different
//! orders); every rank ends with the same weights; a non-finite gradient injected on rank 0
//! makes every rank skip the step (fp16; ZeRO 0 and 3); the device ranks track the CPU ranks; buckets are
//! reduced while the backward pass runs and give the CPU path's all-reduce bit for bit; ZeRO
//! stages 1, 2 and 3 on the device ranks take stage 0's steps bit for bit, and stage 3
//! evaluates on rank 0 as stage 0 does; a stage-3 checkpoint resumes
//! under stages 3 and 1 bit for bit; the device peak falls with the stage. Tiny model, micro-batch 1-2, 16 tokens, a few steps:
//! the simulator interprets every lane of every kernel.

use lathe_autograd::{DType, Gpt, GptConfig, Recompute, Tape};
use lathe_host::Device;
use lathe_host::comm::{Communicator, LocalGroup, ReduceOp};
use lathe_trainer::config::{DeviceSpec, RecomputeArg, TrainArgs};
use lathe_trainer::device::{DeviceGradReducer, grad_ready_hook, lock_reducer};
use lathe_trainer::metrics::{MetricsLine, StepRecord, read_metrics};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};
use std::path::Path;

/// See `zero_equivalence.rs`: N ranks at B and one rank at N*B round their averages in
/// different orders, a few f32 ulps per step, carried into the weights by AdamW. Measured on
/// the simulated device: 1.0e-7 relative over 3 steps, 4.4e-8 with accumulation 2.
const REL_TOL: f64 = 64.0 * f32::EPSILON as f64;

/// The device against the CPU in f32: the project's f32 kernel tolerance, as in
/// `device_train.rs` (the backends sum in different orders). Measured at world 2: 5.2e-8.
const F32_TOL: f64 = 1e-5;

fn args(device: DeviceSpec, precision: Precision, world: usize, b: usize, steps: u64) -> TrainArgs {
    TrainArgs {
        device: Some(device),
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

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / y).abs())
        .fold(0.0, f64::max)
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
fn two_device_ranks_follow_one_rank_at_twice_the_batch_and_track_the_cpu() {
    let steps = 3;
    let one = run(args(DeviceSpec::Sim, Precision::Fp32, 1, 2, steps));
    let two = run(args(DeviceSpec::Sim, Precision::Fp32, 2, 1, steps));
    assert_eq!(two.losses.len(), steps as usize);
    assert_eq!(two.ranks.len(), 2);
    let e = max_rel(&one.losses, &two.losses);
    eprintln!("world 2 x B 1 vs world 1 x B 2 on the device: max relative difference {e:.2e}");
    assert!(
        e <= REL_TOL,
        "world 2 {:?} vs world 1 {:?}: {e:.2e} > {REL_TOL:.2e}",
        two.losses,
        one.losses
    );
    assert_same_weights_on_every_rank(&two, "world 2 on the device");
    assert!(two.losses[2] < two.losses[0], "{:?}", two.losses);

    let cpu = run(args(DeviceSpec::Cpu, Precision::Fp32, 2, 1, steps));
    let e = max_rel(&cpu.losses, &two.losses);
    eprintln!("world 2 on the device vs world 2 on the CPU: max relative difference {e:.2e}");
    assert!(
        e <= F32_TOL,
        "device {:?} vs cpu {:?}: {e:.2e}",
        two.losses,
        cpu.losses
    );
}

#[test]
fn with_accumulation_and_stage_3_recomputation_the_ranks_follow_one_rank() {
    // Two micro-batches per step: only the second backward's gradients are final, and the
    // reduction happens there; two ranks at B 1 x K 2 (with block recomputation) follow one
    // rank at B 2 x K 2.
    let accum = |a: TrainArgs| TrainArgs {
        accum: Some(2),
        ..a
    };
    let one = run(accum(args(DeviceSpec::Sim, Precision::Fp32, 1, 2, 2)));
    // Recomputation re-runs forward segments inside the backward pass: each parameter's
    // gradient must still be reported once, when final. At ZeRO 3 the recomputed blocks
    // also gather their parameters again (collectives inside the backward, between the
    // bucket reductions).
    let two = run(TrainArgs {
        recompute: Some(RecomputeArg::Block),
        zero: Some(3),
        ..accum(args(DeviceSpec::Sim, Precision::Fp32, 2, 1, 2))
    });
    let e = max_rel(&one.losses, &two.losses);
    eprintln!("accumulation 2: world 2 vs world 1: max relative difference {e:.2e}");
    assert!(
        e <= REL_TOL,
        "{:?} vs {:?}: {e:.2e}",
        two.losses,
        one.losses
    );
    // Stage 3's ranks hold different shards; that they hold the right ones shows in the
    // losses, which every rank's forward computes from all the shards.
    assert_eq!(two.ranks.len(), 2);
}

#[test]
fn every_zero_stage_on_devices_takes_stage_0_steps_bit_for_bit() {
    // Stage 1: each rank updates its shard of the master weights and moments, then the
    // working copy is gathered. Stage 2: each rank also keeps only its shard of the averaged
    // gradients, and the norm partials are exchanged. Stage 3: no rank holds the full
    // weights; the forward gathers each parameter from its owners. The norm is summed shard
    // by shard in every stage, so all four take the same steps. bf16 with stochastic rounding
    // (the rounding bits follow global indices, so the shard offset matters) at every stage;
    // fp32, where the master shards are the working copy and are all-gathered into the full
    // f32 weights, at stage 2 (stage 1 gathers through the same code; the f32 runs are the
    // slow ones on the simulator, and fp32 stage 3 runs in the accumulation test).
    //
    // Memory: rank 0's device peak (the allocator's, from the log) falls with the stage. At
    // world 2, stage 1 holds half the moments (-4N bytes) and a master shard instead of the
    // full master (-2N), and adds a gradient shard (+2N): at least 3N below stage 0. Stage 3
    // holds no full working copy either.
    let dir = tempfile::tempdir().unwrap();
    let bits = |o: &TrainOutcome| o.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    let peak = |log: &Path| {
        steps_of(log)
            .iter()
            .map(|s| s.mem_peak_bytes)
            .max()
            .unwrap()
    };
    for (p, sr, stages) in [
        (Precision::Bf16, true, &[1u8, 2, 3][..]),
        (Precision::Fp32, false, &[2u8][..]),
    ] {
        let base = TrainArgs {
            stochastic_rounding: sr,
            ..args(DeviceSpec::Sim, p, 2, 1, 3)
        };
        let log0 = dir.path().join(format!("{p:?}-0.jsonl"));
        let stage0 = run(TrainArgs {
            log: Some(log0.clone()),
            ..base.clone()
        });
        // Parameters: stage 0's host master holds all of them, in f32.
        let n = stage0.ranks[0].memory.master / 4;
        let mut peaks = vec![peak(&log0)];
        for &zero in stages {
            let log = dir.path().join(format!("{p:?}-{zero}.jsonl"));
            let o = run(TrainArgs {
                zero: Some(zero),
                log: Some(log.clone()),
                ..base.clone()
            });
            peaks.push(peak(&log));
            assert_eq!(
                bits(&stage0),
                bits(&o),
                "{p:?} stage {zero}: {:?} vs stage 0 {:?}",
                o.losses,
                stage0.losses
            );
            if zero < 3 {
                // Stage 3's ranks hold different shards; the others hold the full copy.
                assert_same_weights_on_every_rank(&o, &format!("{p:?} stage {zero}"));
                assert_eq!(
                    stage0.ranks[0].working_digest, o.ranks[0].working_digest,
                    "{p:?}: stage {zero} ends with other weights than stage 0"
                );
            }
        }
        eprintln!("{p:?}: {n} parameters; device peaks by stage {stages:?} after 0: {peaks:?}");
        if p == Precision::Bf16 {
            assert!(
                peaks[1] + 3 * n <= peaks[0],
                "stage 1's device peak {} is not 3N = {} below stage 0's {}",
                peaks[1],
                3 * n,
                peaks[0]
            );
            assert!(
                peaks[3] < peaks[2],
                "stage 3 {} vs stage 2 {}",
                peaks[3],
                peaks[2]
            );
        }
    }
}

#[test]
fn fp16_inf_injected_on_rank_0_is_skipped_by_every_rank_at_stages_0_and_3() {
    // Stage 0: the inf reaches every rank through the all-reduce. Stage 3: it lands in rank
    // 0's shard of the averaged gradients only, and the exchanged flag makes rank 1 skip too.
    // Both take the same steps, and rank 0's validation (stage 3: on the weights gathered
    // from the shards) gives the same losses.
    let dir = tempfile::tempdir().unwrap();
    let inject = |a: TrainArgs, zero: u8, log: &str| TrainArgs {
        zero: Some(zero),
        inject_nonfinite: Some("1".into()),
        eval_every: Some(2),
        log: Some(dir.path().join(log)),
        ..a
    };
    let bits = |v: &[f64]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    let mut val = Vec::new();
    let mut losses = Vec::new();
    for zero in [0u8, 3] {
        let log = format!("zero{zero}.jsonl");
        let o = run(inject(
            args(DeviceSpec::Sim, Precision::Fp16, 2, 1, 3),
            zero,
            &log,
        ));
        assert_eq!(o.skipped_steps, 1, "stage {zero}");
        if zero == 0 {
            assert_same_weights_on_every_rank(&o, "fp16 world 2 with an injected inf");
        }
        let recs = steps_of(&dir.path().join(&log));
        let skipped: Vec<bool> = recs.iter().map(|r| r.skipped).collect();
        assert_eq!(skipped, vec![false, true, false], "stage {zero}");
        // GradScaler: the skipped step halves the scale for the next one.
        assert_eq!(recs[2].loss_scale, recs[1].loss_scale / 2.0, "stage {zero}");
        assert!(recs.iter().all(|r| r.loss.is_finite()), "stage {zero}");
        let v: Vec<f64> = recs.iter().filter_map(|r| r.val_loss).collect();
        assert!(!v.is_empty(), "stage {zero}: no validation loss logged");
        val.push(bits(&v));
        losses.push(bits(&o.losses));
    }
    assert_eq!(
        losses[0], losses[1],
        "stage 3's losses differ from stage 0's"
    );
    assert_eq!(
        val[0], val[1],
        "stage 3's validation differs from stage 0's"
    );
    // The CPU ranks skip the same step.
    let cpu = run(TrainArgs {
        inject_nonfinite: Some("1".into()),
        ..args(DeviceSpec::Cpu, Precision::Fp16, 2, 1, 3)
    });
    assert_eq!(cpu.skipped_steps, 1);
}

#[test]
fn a_sharded_device_checkpoint_resumes_bit_for_bit_under_stages_3_and_1() {
    // Saving gathers the shards (master, moments) into one full checkpoint; resuming splits
    // it again, with the parameters sharded (stage 3) or the working copy whole and the
    // device's full master released (stage 1).
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let base = |zero: u8| TrainArgs {
        zero: Some(zero),
        stochastic_rounding: true,
        ..args(DeviceSpec::Sim, Precision::Bf16, 2, 1, 4)
    };
    let full = run(TrainArgs {
        save: Some(ck.clone()),
        save_every: Some(2),
        ..base(3)
    });
    for zero in [3u8, 1] {
        let resumed = run(TrainArgs {
            resume: Some(ck.join("step-00000002")),
            ..base(zero)
        });
        assert_eq!(resumed.losses.len(), 2);
        for (a, b) in full.losses[2..].iter().zip(&resumed.losses) {
            assert_eq!(a.to_bits(), b.to_bits(), "stage {zero}: {a} vs {b}");
        }
        if zero == 3 {
            assert_eq!(
                resumed.ranks[1].working_digest, full.ranks[1].working_digest,
                "stage {zero}: the resumed run ends with other weights"
            );
        }
    }
}

#[test]
fn buckets_are_reduced_during_backward_and_equal_the_host_all_reduce() {
    // Two ranks, each with its own simulated device, one backward each on different tokens,
    // buckets of 1000 elements: the hook completes buckets while the backward runs, and the
    // averaged gradients equal an all-reduce of the host copies, bit for bit.
    let cfg = GptConfig {
        vocab_size: 11,
        padded_vocab_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
    };
    let world = 2;
    let bucket = 1000;
    let comms = LocalGroup::new(world);
    let check = LocalGroup::new(world);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .zip(check)
            .map(|(comm, check)| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let rank = comm.rank();
                    let dev = Device::sim().unwrap();
                    let gpt = Gpt::new(cfg).unwrap();
                    let mut params = gpt.init_params(3);
                    params.to_device(&dev).unwrap();
                    let len = params.master().len();
                    let reducer = DeviceGradReducer::new(comm, len, bucket).shared();
                    let n_buckets = lock_reducer(&reducer).unwrap().buckets().len();
                    let mut tape = Tape::on_device(DType::F32, &dev);
                    let tokens: Vec<u32> =
                        (0..8).map(|i| ((i * 3 + rank * 5) % 11) as u32).collect();
                    let targets: Vec<u32> = (0..8).map(|i| ((i * 7 + rank) % 11) as u32).collect();
                    let loss = gpt
                        .loss(&mut tape, &params, &tokens, &targets, 1, 8, Recompute::None)
                        .unwrap();
                    // This rank's own gradients, from a first backward without the hook.
                    tape.backward(loss, 1.0, &mut params).unwrap();
                    let mut mine = params.device().unwrap().grads().to_vec().unwrap();
                    params.device_mut().unwrap().zero_grads().unwrap();
                    check.all_reduce(&mut mine, ReduceOp::Avg).unwrap();
                    // The same backward again, reduced through the hook.
                    tape.clear();
                    let loss = gpt
                        .loss(&mut tape, &params, &tokens, &targets, 1, 8, Recompute::None)
                        .unwrap();
                    lock_reducer(&reducer).unwrap().begin(false);
                    tape.set_grad_ready_hook(Some(grad_ready_hook(&reducer)));
                    tape.backward(loss, 1.0, &mut params).unwrap();
                    tape.set_grad_ready_hook(None);
                    let dp = params.device_mut().unwrap();
                    let (_, grads, _) = dp.parts_mut();
                    let stats = lock_reducer(&reducer).unwrap().finish(grads).unwrap();
                    let got = grads.to_vec().unwrap();
                    (n_buckets, stats, got, mine)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n_buckets, stats, got, expect) in &results {
        eprintln!("{n_buckets} buckets: {stats:?}");
        assert!(*n_buckets > 2, "{n_buckets} buckets");
        assert_eq!(stats.in_backward + stats.after_backward, *n_buckets);
        assert!(
            stats.in_backward >= n_buckets - 1,
            "only {stats:?} of {n_buckets} buckets reduced during the backward pass"
        );
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            expect.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert_eq!(results[0].2, results[1].2, "ranks hold other gradients");
}

#[test]
fn nccl_forced_on_simulated_devices_is_a_clear_error_before_training() {
    let mut a = args(DeviceSpec::Sim, Precision::Bf16, 2, 1, 1);
    a.comm = Some(lathe_trainer::config::CommArg::Nccl);
    let e = run_train(a).expect_err("NCCL on simulated devices");
    let msg = format!("{e:#}");
    assert!(msg.contains("NCCL") && msg.contains("simulated"), "{msg}");
}
