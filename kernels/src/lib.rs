//! lathe-kernels: hand-written PTX kernels, their descriptors and CPU twins. No CUDA dependency.

pub mod rng;
