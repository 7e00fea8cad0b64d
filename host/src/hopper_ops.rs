//! Typed launches of the Hopper GEMM, with TMA tensor maps built on the host.
