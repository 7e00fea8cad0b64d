//! Communicators: collectives among the ranks of a data-parallel or ZeRO-sharded run.
//!
//! One trait, [`Communicator`], with three kinds of endpoint:
//!
//! - [`LocalComm`] (from [`LocalGroup::new`]): N ranks as threads of one process, on host
//!   buffers (`[T]`). Reductions are deterministic — each element folds the ranks in rank order —
//!   so an N-rank run reproduces bit for bit. A missing peer is a [`CommError::Timeout`], a
//!   dropped or panicking peer a [`CommError::GroupBroken`], never a hang.
//! - [`Nccl`]: one rank per process (or per thread) and GPU, over NCCL through cudarc, on device
//!   buffers (`cudarc::driver::CudaSlice<T>`; its inherent methods also take cudarc views, so a
//!   bucket or a ZeRO shard of a flat buffer can be passed without a copy).
//! - [`TcpComm`]: one rank per process, on host buffers, over TCP through rank 0, with
//!   [`LocalComm`]'s arithmetic (so N processes reproduce N threads bit for bit). [`HostComm`]
//!   holds either of the two host-buffer communicators.
//! - The rendezvous ([`rendezvous`], [`RendezvousServer`]): a small TCP exchange that rank 0
//!   serves, used to hand NCCL's unique id to every rank ([`NcclId::exchange`],
//!   [`TcpComm::connect_group_sharing`]) and as a process-level barrier.
//! - [`DeviceComm`]: what a device training run uses, on ranges of Lathe's `DeviceBuffer`s —
//!   either through host staging over a [`HostComm`] (every device, bit for bit the host
//!   collectives) or over NCCL on the device buffers (CUDA devices).
//!
//! # Buffers: why the trait has an associated type
//!
//! [`Communicator::Buf`] names the memory a communicator works on (`Buf<T> = [T]` for host
//! memory, `CudaSlice<T>` for NCCL). Training code generic over `C: Communicator` moves whatever
//! its backend holds; a future "N ranks on one GPU" group implements the trait with device
//! buffers and changes nothing for its callers.
//!
//! # Uneven lengths
//!
//! ZeRO shards flat buffers whose length rarely divides by the world size. The `_uneven`
//! collectives use the split of [`shard_range`] (contiguous, sizes differ by at most one, no
//! padding); the even ones demand exact division and say so when it fails.
//!
//! # Completion
//!
//! `LocalComm`'s collectives are synchronous: on return the result is in the buffers. `Nccl`'s
//! are stream-ordered, like NCCL's: on return the work is queued on the communicator's stream;
//! later work on that stream sees the result, and [`Nccl::synchronize`] waits for it with the
//! communicator's timeout. `barrier` is synchronous for both.

mod device_comm;
mod element;
mod error;
mod host_comm;
mod local;
mod nccl;
mod rendezvous;
mod shard;
mod tcp;

pub use device_comm::{DeviceComm, NcclDeviceComm, StagedComm};
pub use element::{CommElement, ReduceOp};
pub use error::CommError;
pub use host_comm::HostComm;
pub use local::{LocalComm, LocalGroup};
pub use nccl::{Nccl, NcclId, nccl_available};
pub use rendezvous::{RendezvousServer, rendezvous, rendezvous_join};
pub use shard::{padded_shard_len, shard_range, shard_ranges};
pub use tcp::TcpComm;

/// Collectives among the `world_size()` ranks of a group; this endpoint is rank `rank()`.
///
/// Every rank of the group must call the same collectives in the same order with matching
/// arguments (same dtype, same total length, same reduction, same root). Lengths below are in
/// elements of `T`.
pub trait Communicator {
    /// The buffer one collective reads or writes, for elements of type `T`: `[T]` for host
    /// memory ([`LocalComm`]), `cudarc::driver::CudaSlice<T>` for device memory ([`Nccl`]).
    type Buf<T: CommElement>: ?Sized;

    /// This endpoint's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Reduces `buf` across ranks, in place: afterwards every rank holds the same
    /// `op`-reduction of all ranks' `buf`. Lengths must match across ranks.
    fn all_reduce<T: CommElement>(
        &self,
        buf: &mut Self::Buf<T>,
        op: ReduceOp,
    ) -> Result<(), CommError>;

    /// `input` has `world_size() * n` elements on every rank; rank `r` receives in `output`
    /// (`n` elements) the `op`-reduction over ranks of `input[r*n .. (r+1)*n]`.
    fn reduce_scatter<T: CommElement>(
        &self,
        input: &Self::Buf<T>,
        output: &mut Self::Buf<T>,
        op: ReduceOp,
    ) -> Result<(), CommError>;

    /// Like [`Communicator::reduce_scatter`] for any input length `len`: rank `r` receives the
    /// reduction of `input[shard_range(len, world, r)]`, so `output` must have
    /// `shard_range(len, world, r).len()` elements.
    fn reduce_scatter_uneven<T: CommElement>(
        &self,
        input: &Self::Buf<T>,
        output: &mut Self::Buf<T>,
        op: ReduceOp,
    ) -> Result<(), CommError>;

    /// Every rank contributes `input` (`n` elements); every rank receives in `output`
    /// (`world_size() * n` elements) the ranks' inputs concatenated in rank order.
    fn all_gather<T: CommElement>(
        &self,
        input: &Self::Buf<T>,
        output: &mut Self::Buf<T>,
    ) -> Result<(), CommError>;

    /// Like [`Communicator::all_gather`] for any output length `len`: rank `r` contributes
    /// `shard_range(len, world, r).len()` elements, placed at that range of every `output`.
    fn all_gather_uneven<T: CommElement>(
        &self,
        input: &Self::Buf<T>,
        output: &mut Self::Buf<T>,
    ) -> Result<(), CommError>;

    /// Copies rank `root`'s `buf` into every other rank's `buf` (same length on all ranks).
    fn broadcast<T: CommElement>(
        &self,
        buf: &mut Self::Buf<T>,
        root: usize,
    ) -> Result<(), CommError>;

    /// Returns once every rank has entered the barrier (or fails after the timeout).
    fn barrier(&self) -> Result<(), CommError>;
}
