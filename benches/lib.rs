//! Shared helpers for Lathe's criterion benchmarks.

use lathe_host::{Device, Stream};
use std::time::Duration;

/// Device 0, or `None` after printing why the benchmark is skipped.
pub fn device_or_skip(bench: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{bench}: skipped, no GPU: {e}");
            None
        }
    }
}

/// Times `iters` runs of `f` on `stream` with CUDA events (for criterion's `iter_custom`).
/// One warm-up call runs first, outside the timed region.
pub fn time_with_events(
    stream: &Stream,
    iters: u64,
    mut f: impl FnMut() -> lathe_host::Result<()>,
) -> Duration {
    let mut run = || -> lathe_host::Result<Duration> {
        f()?;
        let start = stream.record()?;
        for _ in 0..iters {
            f()?;
        }
        let end = stream.record()?;
        end.synchronize()?;
        Ok(Duration::from_secs_f64(
            start.elapsed_ms(&end)? as f64 / 1e3,
        ))
    };
    match run() {
        Ok(d) => d,
        Err(e) => panic!("benchmark launch failed: {e}"),
    }
}

/// cuBLASLt as the peer of Lathe's GEMM benchmarks (lives in `lathe_host::peer` so that
/// `lathe bench gemm` measures it in the same run).
pub use lathe_host::peer::cublaslt;
