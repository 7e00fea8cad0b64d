//! Data parallelism and ZeRO sharding (stages 0-3, optional optimizer offload) for ranks that
//! are threads of one process, on the CPU reference backend.
//!
//! Every rank runs the same model on its own slice of the global batch (the loader deals rank
//! `r` of `N` the sequence positions `(i*N + r)*B ..`, so `N` ranks at micro-batch `B` see
//! the windows one rank sees at `N*B`). Parameters, gradients and optimizer state live in flat
//! buffers (autograd's [`ParamStore`](lathe_autograd::ParamStore) layout), so a ZeRO shard is
//! one contiguous range per rank, [`shard_range`]`(len, N, rank)` — no padding, sizes differing
//! by at most one, any parameter count and any world size.
//!
//! # What each rank holds between steps (`ShardedModel`)
//!
//! | stage | fp32 master + optimizer state | working copy (compute dtype) | gradients (f32) |
//! |-------|-------------------------------|------------------------------|-----------------|
//! | 0     | full                          | full                         | full            |
//! | 1     | own shard                     | full                         | full            |
//! | 2     | own shard                     | full                         | own shard       |
//! | 3     | own shard                     | own shard                    | own shard       |
//!
//! One step, per stage:
//!
//! - **0 (plain data parallel).** Backward accumulates the rank's gradients into the full
//!   buffer; the buffer is all-reduced (average) in buckets — slices of the flat buffer of
//!   [`DEFAULT_BUCKET_BYTES`] (25 MiB, PyTorch DDP's default), last slice first. Every rank then
//!   runs the whole optimizer step on identical inputs. **No overlap on the CPU backend:** the
//!   buckets are reduced after the backward pass has finished (its backward and the
//!   reduction would compete for the same cores). Device ranks reduce the same buckets from
//!   the tape's gradient-ready hook while the backward pass goes on: see
//!   [`crate::device::DeviceGradReducer`].
//! - **1 (optimizer state).** Gradients as in stage 0. Each rank keeps the fp32 master weights
//!   and AdamW/SGD state for its shard only (the ZeRO paper counts the fp32 master as optimizer
//!   state), updates that shard, and the updated working-copy shards are all-gathered (in fp32,
//!   where the working copy *is* the master, the master shards).
//! - **2 (+ gradients).** After backward the full gradient buffer is reduce-scattered in one
//!   call: each rank keeps only its averaged shard, and the full buffer is released. (A bucketed
//!   reduce-scatter whose pieces land in each rank's global shard needs per-rank partitioned
//!   buckets; with no overlap to gain on the CPU they would change nothing, so there is one.)
//! - **3 (+ parameters).** Each rank persistently owns only its shard of the working copy too.
//!   Before the forward pass the shards are all-gathered into a full working copy; after the
//!   gradient reduce-scatter that copy is released. See "Released" below.
//!
//! In every stage the inf/NaN check and the gradient norm look at the rank's shard only: each
//! rank checks its shard and the flags are all-reduced with `Max`; each rank sums the squares
//! of its shard ([`grad_sq_partials`](crate::optim::grad_sq_partials) at the shard's global
//! offset) and the per-rank sums are combined in rank order. Stages 0 and 1 compute the norm
//! the same way (over the same shards of their full, identical buffers), so stages 0-3 at one
//! world size take bit-identical steps: the optimizer is elementwise and is called with the
//! shard's global offset (`StepArgs::offset`), so decay flags and stochastic-rounding bits
//! follow global indices. The reported loss is the mean of the ranks' losses.
//!
//! # Released (stages 2 and 3 on the CPU backend)
//!
//! Autograd's tape reads parameters from, and writes gradients into, a full-size
//! [`ParamStore`](lathe_autograd::ParamStore): its f32 working buffer, f32 gradient buffer and
//! an f32 master buffer this module never writes (the trainer keeps its own master shard). In
//! stages 0-1 that store lives for the whole run (its gradient buffer *is* the rank's full
//! gradient buffer). In stages 2-3 it is the step's workspace: built before the forward pass
//! (in stage 3 from the all-gathered shards), dropped right after the reduce-scatter. So during
//! a step every stage holds full-size buffers, as ZeRO-3 holds a gathered layer while it
//! computes — only at the granularity of the whole model rather than a layer, because the tape
//! cannot fetch a parameter on demand. "Released" means the `Vec`s are freed back to the
//! allocator between steps; [`RankMemory::workspace_step`] reports what a step holds
//! meanwhile. The tape's own pool of recycled buffers (activations and its per-op copies of
//! parameters) is activation memory and is not counted here.
//!
//! # Offload (`--offload-optimizer`)
//!
//! The master shard and optimizer state live in a separate [`HostOptimizer`]: each step copies
//! the gradient shard into its staging buffer, runs the fused update there (rayon-parallel over
//! fixed chunks, bit-identical to the resident update) and copies the new working-copy shard
//! back. On the CPU backend "host" and "device" are the same memory, so those copies are plain
//! `memcpy`s. A device run (`crate::device::OffloadStaging`) releases these staging buffers
//! and moves the shards through pinned buffers of its own instead, device to host and back,
//! with the device deciding skip, loss scale and clip factor
//! ([`HostOptimizer::step_staged`] takes them as they are).
//!
//! Initialisation builds the full model on every rank and keeps the shard (DeepSpeed's
//! `zero.Init` would build each shard in place); resuming likewise reads the full checkpoint on
//! every rank, keeps its shard and frees the rest.

mod collectives;
mod memory;
mod model;
mod offload;

pub use collectives::{
    DEFAULT_BUCKET_BYTES, all_reduce_buckets, any_rank, bucket_ranges, gather_to_root,
    mean_over_ranks, sum_over_ranks,
};
pub use lathe_host::comm::{HostComm, LocalComm, LocalGroup, shard_range};
pub use memory::{
    MemoryRow, MemoryTable, RankMemory, StateWidths, memory_table, paper_bytes_per_param,
    rank_report,
};
pub use model::{ShardedModel, ZeroOptions};
pub use offload::{HostOptimizer, OptimizerShard};

use crate::optim::{LayoutError, OptimError};
use lathe_host::comm::CommError;

/// How much model state is sharded (the `--zero` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ZeroStage {
    /// 0: plain data parallelism, every rank holds everything.
    DataParallel,
    /// 1: fp32 master weights and optimizer state sharded.
    OptimizerState,
    /// 2: gradients sharded too.
    Gradients,
    /// 3: parameters (the working copy) sharded too.
    Parameters,
}

impl ZeroStage {
    /// The stage numbered `n` (0-3).
    pub fn new(n: u8) -> Result<Self, ZeroError> {
        Ok(match n {
            0 => ZeroStage::DataParallel,
            1 => ZeroStage::OptimizerState,
            2 => ZeroStage::Gradients,
            3 => ZeroStage::Parameters,
            _ => return Err(ZeroError::BadStage(n)),
        })
    }

    /// The stage's number, 0-3.
    pub fn number(self) -> u8 {
        match self {
            ZeroStage::DataParallel => 0,
            ZeroStage::OptimizerState => 1,
            ZeroStage::Gradients => 2,
            ZeroStage::Parameters => 3,
        }
    }

    /// All stages, in order.
    pub const ALL: [ZeroStage; 4] = [
        ZeroStage::DataParallel,
        ZeroStage::OptimizerState,
        ZeroStage::Gradients,
        ZeroStage::Parameters,
    ];

    /// Whether the master weights and optimizer state are sharded.
    pub fn shards_optimizer(self) -> bool {
        self >= ZeroStage::OptimizerState
    }
    /// Whether the gradients are sharded (reduce-scatter instead of all-reduce).
    pub fn shards_gradients(self) -> bool {
        self >= ZeroStage::Gradients
    }
    /// Whether the working copy is sharded (gathered for each step).
    pub fn shards_parameters(self) -> bool {
        self >= ZeroStage::Parameters
    }
}

impl std::fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeRO-{}", self.number())
    }
}

/// What can go wrong in a sharded step.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error("ZeRO stage {0} does not exist (stages are 0, 1, 2 and 3)")]
    BadStage(u8),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Autograd(#[from] lathe_autograd::Error),
    #[error("parameter layout: {0}")]
    Layout(#[from] LayoutError),
    /// A step phase called out of order (e.g. reducing gradients with no workspace).
    #[error("sharded step out of order: {0}")]
    OutOfOrder(&'static str),
    /// Checkpointed state that does not fit this run.
    #[error("cannot restore the sharded state: {0}")]
    Restore(String),
}
