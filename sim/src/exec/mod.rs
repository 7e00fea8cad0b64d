//! The executor: launches, blocks, warps and the per-instruction dispatch.
//!
//! Blocks are independent and run in parallel on rayon's pool. Within a block, warps run one at
//! a time: a warp runs until it waits (barrier, mbarrier phase, exit), then the next ready warp
//! runs. Within a warp, each lane has a PC; the lanes at the minimum PC run together (so a
//! divergent branch runs one side, then the other, and the lanes reconverge where they meet).
//! An instruction runs for all active lanes of a warp in one loop over 32 register lanes.

mod alu;
mod atomic;
mod block;
mod cvt;
mod dispatch;
mod half;
mod hopper;
mod hopper_hooks;
mod launch;
mod mem;
mod smem;
mod sync;

pub(crate) use launch::run_launch;

/// Generic-address window of shared memory (`cvta.shared`); the shared state space itself
/// starts at 0 as on the GPU.
pub(crate) const SHARED_WINDOW: u64 = 0x0000_1000_0000_0000;
/// Generic-address window of the kernel parameters (`cvta.param`).
pub(crate) const PARAM_WINDOW: u64 = 0x0000_2000_0000_0000;
/// Size of each window.
pub(crate) const WINDOW_BYTES: u64 = 1 << 32;
