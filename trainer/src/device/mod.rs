//! The optimizer step, its bookkeeping and the batch upload on a device (a GPU or the simulated
//! device), with no host synchronisation inside a training step.
//!
//! The CPU path ([`crate::optim`], [`crate::precision`]) decides each step on the host: it
//! checks the gradients, computes the norm and the clip factor, runs AdamW and updates the loss
//! scale, all with the values in host memory. On a device that would cost one round trip per
//! step (read `found_inf` and the norm back, then launch), which stalls the GPU's queue. Here
//! every decision stays on the device, in the step state of `lathe_kernels::nn::amp`:
//!
//! * [`DeviceOptimizer`] queues the whole step on the compute stream (check + norm + clip
//!   factor, fused AdamW that skips itself on non-finite gradients, the GradScaler update,
//!   zeroing the gradients) and returns without waiting for any of it;
//! * [`StepReadback`] copies each step's state and loss into pinned host memory
//!   asynchronously; the host reads step `k`'s numbers (for logging) while step `k + 1` runs,
//!   one step behind;
//! * [`DeviceBatch`] uploads token batches on the copy stream, double-buffered, ordered before
//!   the compute that reads them by an event rather than a host wait;
//! * with `--offload-optimizer`, [`DeviceOptimizer::step_offloaded`] queues the same
//!   decisions and copies the gradients into an [`OffloadStaging`]'s pinned buffer, and the
//!   host's optimizer updates from there ([`OffloadStaging::update`]): one host wait per step;
//! * [`DeviceGradReducer`] averages the gradients of `--world N` device ranks bucket by bucket
//!   from the tape's gradient-ready hook, while the backward pass goes on, over a
//!   `DeviceComm` (host staging, or NCCL on CUDA devices; see its module).
//!
//! The numbers are the CPU path's: the kernels use the same f32 operations in the same order
//! (see `lathe_kernels::nn::adamw`). The one difference is the gradient norm, summed in f32 on
//! the device (f64 on the CPU), which moves the clip factor by an ulp or so when clipping is
//! active; `trainer/tests/device_optim.rs` states the tolerances.

mod batch;
mod offload;
mod optim;
mod readback;
mod reduce;

pub use batch::DeviceBatch;
pub use offload::{OffloadStaging, WeightsMut};
pub use optim::{DeviceOptimizer, HostOptimizerState, OffloadGrads};
pub use readback::{StepReadback, StepReport, Waiter};
pub use reduce::{
    DeviceGradReducer, ReduceStats, SharedReducer, gather_pieces, grad_ready_hook, lock_reducer,
};
