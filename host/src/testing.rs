//! The GPU test harness: find a device or skip with a reason; with `LATHE_REQUIRE_GPU=1`, a
//! missing device fails the test instead.

use crate::device::Device;

/// Whether `LATHE_REQUIRE_GPU=1` is set.
pub fn gpu_required() -> bool {
    std::env::var("LATHE_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Device 0 for a GPU test, or `None` after printing why the test is skipped.
///
/// # Panics
/// When no device is found and `LATHE_REQUIRE_GPU=1`: the test must fail, not skip.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if gpu_required() {
                panic!("{test}: LATHE_REQUIRE_GPU=1 but no GPU is usable: {e}");
            }
            eprintln!("{test}: skipped, no GPU: {e}");
            None
        }
    }
}

/// Sizes every elementwise test runs at: tiny, ragged around the vector width and the block,
/// and a large odd one.
pub const AWKWARD_SIZES: &[usize] = &[1, 3, 31, 255, 1000, 4099, 65_537, 1_000_003];
