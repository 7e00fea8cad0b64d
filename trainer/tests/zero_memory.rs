//! Per-rank memory under ZeRO: the bytes each rank measures it holds between steps match the
//! layout's prediction exactly and shrink as each stage says; the model-state table for
//! GPT-2 124M next to the ZeRO paper's formulas (shown with `--nocapture`).

use lathe_autograd::GptConfig;
use lathe_trainer::config::{DeviceSpec, TrainArgs};
use lathe_trainer::precision::Precision;
use lathe_trainer::train::{TrainOutcome, run_train};
use lathe_trainer::zero::{RankMemory, StateWidths, ZeroStage, memory_table};

fn one_step(world: usize, zero: u8, offload: bool, precision: Precision) -> TrainOutcome {
    run_train(TrainArgs {
        device: Some(DeviceSpec::Cpu),
        precision: Some(precision),
        world: Some(world),
        zero: Some(zero),
        offload_optimizer: offload,
        micro_batch: Some(1),
        seq_len: Some(25),
        steps: Some(1),
        eval_every: Some(0),
        eval_batches: Some(1),
        eval_problems: Some(1),
        loader_workers: Some(1),
        no_progress: true,
        ..Default::default()
    })
    .expect("training run")
}

/// Parameters of the tiny GPT on the built-in corpus (vocabulary 257, padded to 320).
fn tiny_params() -> usize {
    GptConfig::tiny().with_vocab_size(257).num_params()
}

#[test]
fn gpt2_124m_model_state_table() {
    let params = GptConfig::gpt2_124m().num_params();
    let table = memory_table("gpt2-124m", params, Precision::Bf16, 2, &[1, 2, 4, 8]);
    println!("{table}");
    assert_eq!(table.rows.len(), 16);
    let row = |stage: ZeroStage, world: usize| {
        table
            .rows
            .iter()
            .find(|r| r.stage == stage && r.world == world)
            .expect("row")
    };
    // The paper's figures: 16, 4 + 12/N, 2 + 14/N, 16/N bytes per parameter.
    assert_eq!(row(ZeroStage::DataParallel, 8).paper_per_param, 16.0);
    assert_eq!(row(ZeroStage::OptimizerState, 4).paper_per_param, 7.0);
    assert_eq!(row(ZeroStage::Gradients, 2).paper_per_param, 9.0);
    assert_eq!(row(ZeroStage::Parameters, 8).paper_per_param, 2.0);
    // Lathe keeps f32 gradients: 18, 6 + 12/N, 2 + 16/N, 18/N.
    assert_eq!(row(ZeroStage::DataParallel, 1).lathe_per_param, 18.0);
    assert_eq!(row(ZeroStage::OptimizerState, 4).lathe_per_param, 9.0);
    assert_eq!(row(ZeroStage::Gradients, 8).lathe_per_param, 4.0);
    assert_eq!(row(ZeroStage::Parameters, 8).lathe_per_param, 2.25);
    // Rank 0's exact bytes: 124,475,904 parameters divide by 8.
    assert_eq!(
        row(ZeroStage::DataParallel, 1).lathe_bytes,
        18 * params as u64
    );
    assert_eq!(
        row(ZeroStage::Parameters, 8).lathe_bytes,
        18 * params as u64 / 8
    );
}

#[test]
fn measured_bytes_match_the_layout_and_shrink_by_stage() {
    let n = tiny_params();
    for (world, precision, offload) in [
        (4, Precision::Bf16, false),
        // 842,496 parameters over 5 ranks: uneven shards.
        (5, Precision::Fp32, true),
    ] {
        let widths = StateWidths::lathe(precision, 2);
        let mut rank0 = Vec::new();
        for stage in ZeroStage::ALL {
            let out = one_step(world, stage.number(), offload, precision);
            assert_eq!(out.ranks.len(), world);
            for r in &out.ranks {
                let want = RankMemory::predict(n, world, r.rank, stage, &widths, offload);
                assert_eq!(r.memory, want, "{stage} N={world} rank {}", r.rank);
            }
            rank0.push(out.ranks[0].memory);
        }
        let [s0, s1, s2, s3] = [rank0[0], rank0[1], rank0[2], rank0[3]];
        let shard = n.div_ceil(world) as u64;
        let what = format!("N={world} {precision:?}");
        // Stage 0: everything in full.
        assert_eq!(s0.master, 4 * n as u64, "{what}");
        assert_eq!(s0.optimizer, 8 * n as u64, "{what}");
        assert_eq!(s0.grads, 4 * n as u64, "{what}");
        assert_eq!(s0.working, widths.working * n as u64, "{what}");
        // Stage 1: master and optimizer state shrink to the shard.
        assert_eq!((s1.master, s1.optimizer), (4 * shard, 8 * shard), "{what}");
        assert_eq!((s1.grads, s1.working), (s0.grads, s0.working), "{what}");
        // Stage 2: gradients too.
        assert_eq!(s2.grads, 4 * shard, "{what}");
        assert_eq!(
            (s2.master, s2.optimizer, s2.working),
            (s1.master, s1.optimizer, s1.working)
        );
        // Stage 3: the working copy too.
        assert_eq!(s3.working, widths.working * shard, "{what}");
        assert_eq!((s3.master, s3.grads), (s2.master, s2.grads), "{what}");
        assert!(s0.model_state() > s1.model_state() && s1.model_state() > s2.model_state());
        assert!(s2.model_state() > s3.model_state(), "{what}");
        // The full-size autograd store stays between steps only in stages 0-1.
        assert!(s0.workspace_idle > 0 && s1.workspace_idle > 0, "{what}");
        assert_eq!((s2.workspace_idle, s3.workspace_idle), (0, 0), "{what}");
        // A stage-3 step gathers a 2-byte copy before imaging it into the f32 store; fp32
        // gathers straight into the store.
        let gathered = if widths.working == 2 { 2 * n as u64 } else { 0 };
        assert_eq!(s3.workspace_step, 12 * n as u64 + gathered, "{what}");
        // Offload: master, moments and staging in host memory; the rest stays.
        assert_eq!(s3.offloaded, offload);
        if offload {
            assert_eq!(s3.staging, 4 * shard, "{what}: an f32 gradient shard");
            assert_eq!(s3.device_resident(), s3.working + s3.grads);
        }
    }
}
