//! Peers Lathe's kernels are measured against in the same run, loaded at run time: cuBLASLt
//! for the GEMM. Without the library (or on the simulated device) a peer is an `Err` with the
//! reason, never a panic.
//!
//! Mapping: row-major `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so cuBLASLt's
//! A is Lathe's B and its B is Lathe's A, each transpose flag set when Lathe's operand is
//! stored `T`.

pub mod cublaslt {
    use crate::gemm_ops::{Gemm, Op};
    use crate::{Device, DeviceBuffer, Stream};
    use cudarc::cublaslt::{result as lt, sys as ltsys};
    use lathe_kernels::Elem;
    use std::ffi::c_void;

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
            if dev.is_sim() {
                return Err("the simulated device has no cuBLASLt".into());
            }
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

    fn lt_type(e: Elem) -> ltsys::cudaDataType {
        match e {
            Elem::BF16 => ltsys::cudaDataType::CUDA_R_16BF,
            Elem::F16 => ltsys::cudaDataType::CUDA_R_16F,
            _ => ltsys::cudaDataType::CUDA_R_32F,
        }
    }

    /// One cuBLASLt problem with its chosen algorithm.
    pub struct Plan<'p> {
        peer: &'p Peer,
        desc: ltsys::cublasLtMatmulDesc_t,
        layouts: [ltsys::cublasLtMatrixLayout_t; 3],
        algo: ltsys::cublasLtMatmulAlgo_t,
        alpha: f32,
        beta: f32,
    }

    impl<'p> Plan<'p> {
        /// cuBLASLt's plan for `g` with `input` operands and `output` C (its first heuristic
        /// algorithm).
        pub fn new(peer: &'p Peer, g: &Gemm, input: Elem, output: Elem) -> Result<Self, String> {
            let err = lt_err;
            let desc = lt::create_matmul_desc(
                ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ltsys::cudaDataType::CUDA_R_32F,
            )
            .map_err(err("cublasLtMatmulDescCreate"))?;
            let set_trans = |attr, t: bool| -> Result<(), String> {
                let v: i32 = t as i32;
                // SAFETY: `desc` is live; the attribute takes a 4-byte cublasOperation_t.
                unsafe { lt::set_matmul_desc_attribute(desc, attr, (&v as *const i32).cast(), 4) }
                    .map_err(err("cublasLtMatmulDescSetAttribute"))
            };
            use ltsys::cublasLtMatmulDescAttributes_t::*;
            // Column-major view: A' = our B, B' = our A.
            set_trans(CUBLASLT_MATMUL_DESC_TRANSA, g.op_b == Op::T)?;
            set_trans(CUBLASLT_MATMUL_DESC_TRANSB, g.op_a == Op::T)?;
            let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
            let a_shape = match g.op_b {
                Op::N => (n, k),
                Op::T => (k, n),
            };
            let b_shape = match g.op_a {
                Op::N => (k, m),
                Op::T => (m, k),
            };
            let layout = |e: Elem, (r, c): (u64, u64), ld: usize| {
                lt::create_matrix_layout(lt_type(e), r, c, ld as i64)
                    .map_err(err("cublasLtMatrixLayoutCreate"))
            };
            let layouts = [
                layout(input, a_shape, g.ldb())?,
                layout(input, b_shape, g.lda())?,
                layout(output, (n, m), g.ldc())?,
            ];
            // SAFETY: `desc` and `layouts` were created just above and are live.
            let algo = unsafe { peer.best_algo(desc, &layouts) }?;
            Ok(Plan {
                peer,
                desc,
                layouts,
                algo,
                alpha: g.alpha,
                beta: g.beta,
            })
        }

        /// Launches `C = alpha op(A) op(B) + beta C` on `stream` (addresses of Lathe buffers).
        pub fn run(&self, a: u64, b: u64, c: u64, stream: &Stream) -> crate::Result<()> {
            let raw_stream = stream
                .raw()
                .ok_or_else(|| crate::Error::Invalid("cuBLASLt needs a CUDA stream".into()))?
                as ltsys::cudaStream_t;
            // SAFETY: the descriptors are live and match the buffers' shapes, types and leading
            // dimensions (built from the same Gemm); the workspace outlives the call; the stream
            // belongs to the context the handle was created in.
            unsafe {
                lt::matmul(
                    self.peer.handle,
                    self.desc,
                    (&self.alpha as *const f32).cast(),
                    (&self.beta as *const f32).cast(),
                    b as *const c_void,
                    self.layouts[0],
                    a as *const c_void,
                    self.layouts[1],
                    c as *const c_void,
                    self.layouts[2],
                    c as *mut c_void,
                    self.layouts[2],
                    &self.algo,
                    self.peer.workspace.addr() as *mut c_void,
                    WORKSPACE_BYTES,
                    raw_stream,
                )
            }
            .map_err(|e| crate::Error::Invalid(format!("cublasLtMatmul: {e}")))
        }
    }

    impl Drop for Plan<'_> {
        fn drop(&mut self) {
            // SAFETY: created in `new`, destroyed once.
            unsafe {
                for l in self.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}
