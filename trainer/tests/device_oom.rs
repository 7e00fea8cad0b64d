//! A step that does not fit in device memory fails with the allocator's message: the sizes,
//! what Lathe holds, and the settings that lower the peak. Its own test binary, because it
//! sets `LATHE_SIM_MEMORY` for the simulated devices the process opens.

use lathe_trainer::config::{DeviceSpec, TrainArgs};
use lathe_trainer::train::run_train;

#[test]
fn a_step_too_large_for_the_device_is_a_clear_error_and_writes_nothing() {
    // SAFETY: the only test of this binary; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("LATHE_SIM_MEMORY", "18M") };
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("ck");
    let err = run_train(TrainArgs {
        device: Some(DeviceSpec::Sim),
        micro_batch: Some(16),
        seq_len: Some(64),
        steps: Some(2),
        eval_every: Some(0),
        eval_problems: Some(2),
        loader_workers: Some(1),
        no_progress: true,
        save: Some(save.clone()),
        ..Default::default()
    })
    .expect_err("the step cannot fit in 18 MiB");
    let msg = format!("{err:#}");
    for needle in [
        "out of device memory on sim:",
        "tried to allocate",
        "bytes free of 18874368",
        "--micro-batch",
        "--accum",
        "--recompute",
        "--zero",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    // It names the op whose kernels ran out of memory.
    assert!(msg.contains(" on the device: "), "{msg}");
    // Nothing half-written: no checkpoint of a step that never completed.
    assert!(
        !save.exists() || std::fs::read_dir(&save).unwrap().next().is_none(),
        "a checkpoint directory was written"
    );
}
