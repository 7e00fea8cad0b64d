//! Tensor-core GEMM kernels.

use crate::desc::{KernelDesc, Module};

/// Every GEMM module.
pub fn modules() -> Vec<&'static Module> {
    Vec::new()
}

/// Every GEMM kernel.
pub fn kernels() -> Vec<&'static KernelDesc> {
    Vec::new()
}
