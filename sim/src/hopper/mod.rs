//! Hopper (sm_90a) pieces of the simulated GPU as pure functions: TMA box copies through tensor
//! maps, wgmma shared-memory matrix descriptors and operand addressing, and the wgmma
//! `m64nNk16` product with its register layouts. The interpreter calls these at
//! `cp.async.bulk.tensor` and `wgmma.mma_async`; they are pinned to what the H100 did with
//! Lathe's probe kernels (`tests/hopper_probes.rs`).
//!
//! - [`tma`]: [`tma::load_box`] / [`tma::store_box`], global <-> shared with swizzle and
//!   out-of-bounds zero fill.
//! - [`desc`]: the 64-bit matrix descriptor and [`desc::operand_offset`], the shared address
//!   of one operand element for K-major and MN-major operands under every swizzle mode.
//! - [`wgmma`]: accumulator and A-fragment register layouts, and [`wgmma::mma`] (one 16-bit
//!   shared load per call) / [`wgmma::mma_chunked`] (one 16-byte chunk per call).
//!
//! Swizzle patterns are shared by TMA and wgmma: see [`crate::tensor_map::Swizzle`].

pub mod desc;
pub mod tma;
pub mod wgmma;
