//! Hopper (sm_90a) tensor-core GEMM: wgmma, TMA and warp specialization.

use crate::desc::{KernelDesc, Module};

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    Vec::new()
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    Vec::new()
}
