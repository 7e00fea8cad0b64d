//! Typed launches of the GEMM kernels.
