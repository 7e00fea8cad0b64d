//! The GPU test harness. Every GPU test runs on a device from [`test_device`]: a real GPU when
//! one is usable, else Lathe's simulated GPU, so the same tests run in CI without hardware.
//!
//! - `LATHE_DEVICE=sim` forces the simulated device even where a GPU is present;
//! - `LATHE_REQUIRE_GPU=1` demands real hardware: a test that cannot open a GPU fails instead
//!   of falling back to the simulator.

use crate::device::Device;

/// Whether `LATHE_REQUIRE_GPU=1` is set.
pub fn gpu_required() -> bool {
    std::env::var("LATHE_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Whether `LATHE_DEVICE=sim` asks for the simulated device.
pub fn sim_requested() -> bool {
    std::env::var("LATHE_DEVICE").as_deref() == Ok("sim")
}

/// The device a GPU test runs on: CUDA device 0 when usable, else a fresh simulated device.
///
/// # Panics
/// When `LATHE_REQUIRE_GPU=1` and no GPU is usable (the test must fail, not fall back), or when
/// both `LATHE_REQUIRE_GPU=1` and `LATHE_DEVICE=sim` are set.
pub fn test_device(test: &str) -> Device {
    if sim_requested() {
        assert!(
            !gpu_required(),
            "{test}: LATHE_REQUIRE_GPU=1 and LATHE_DEVICE=sim contradict each other"
        );
        return sim_device(test);
    }
    match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            if gpu_required() {
                panic!("{test}: LATHE_REQUIRE_GPU=1 but no GPU is usable: {e}");
            }
            sim_device(test)
        }
    }
}

fn sim_device(test: &str) -> Device {
    match Device::sim() {
        Ok(d) => d,
        Err(e) => panic!("{test}: cannot open the simulated device: {e}"),
    }
}

/// Sizes every elementwise test runs at: tiny, ragged around the vector width and the block,
/// and a large odd one.
pub const AWKWARD_SIZES: &[usize] = &[1, 3, 31, 255, 1000, 4099, 65_537, 1_000_003];
