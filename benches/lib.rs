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

/// cuBLASLt as the peer of Lathe's GEMM benchmarks, loaded at run time.
pub mod cublaslt {
    use cudarc::cublaslt::{result as lt, sys as ltsys};
    use lathe_host::{Device, DeviceBuffer};

    /// Workspace cuBLASLt may use (as PyTorch gives it on Hopper).
    pub const WORKSPACE_BYTES: usize = 32 << 20;

    /// cuBLASLt's handle and workspace.
    pub struct Peer {
        pub handle: ltsys::cublasLtHandle_t,
        pub workspace: DeviceBuffer<u32>,
    }

    impl Peer {
        /// The peer on `dev`, or why it is unavailable (e.g. no libcublasLt).
        pub fn new(dev: &Device) -> Result<Peer, String> {
            // SAFETY: only probes whether the shared library can be opened.
            if !unsafe { ltsys::is_culib_present() } {
                return Err("libcublasLt not found".into());
            }
            dev.bind().map_err(|e| e.to_string())?;
            let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?;
            let workspace = dev
                .alloc::<u32>(WORKSPACE_BYTES / 4)
                .map_err(|e| e.to_string())?;
            Ok(Peer { handle, workspace })
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            // SAFETY: the handle was created by `Peer::new` and is destroyed once.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }

    /// Formats a cuBLASLt error with the call that returned it.
    pub fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> String {
        move |e| format!("{what}: {e}")
    }

    impl Peer {
        /// cuBLASLt's first heuristic algorithm for `desc` over `layouts` (A, B, C; D = C),
        /// allowed the peer's workspace.
        ///
        /// # Safety
        /// `desc` and `layouts` must be live cuBLASLt descriptors created on this peer's
        /// context.
        pub unsafe fn best_algo(
            &self,
            desc: ltsys::cublasLtMatmulDesc_t,
            layouts: &[ltsys::cublasLtMatrixLayout_t; 3],
        ) -> Result<ltsys::cublasLtMatmulAlgo_t, String> {
            let pref =
                lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
            let ws = WORKSPACE_BYTES;
            // SAFETY: `pref` is live; the attribute takes a usize.
            let set = unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const usize).cast(),
                    size_of::<usize>(),
                )
            };
            // SAFETY: every descriptor is live and describes the buffers the plan runs on.
            let heuristic = set
                .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute"))
                .and_then(|_| {
                    unsafe {
                        lt::get_matmul_algo_heuristic(
                            self.handle,
                            desc,
                            layouts[0],
                            layouts[1],
                            layouts[2],
                            layouts[2],
                            pref,
                        )
                    }
                    .map_err(lt_err("cublasLtMatmulAlgoGetHeuristic"))
                });
            // SAFETY: created above, not used after.
            let _ = unsafe { lt::destroy_matmul_pref(pref) };
            Ok(heuristic?.algo)
        }
    }
}
