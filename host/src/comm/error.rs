//! The error type shared by every communicator and by the rendezvous.

use std::time::Duration;

/// What can go wrong in a collective, in communicator construction or in a rendezvous.
///
/// Every variant names the rank that reports it and the operation it was in, so that a log with
/// one line per rank says which rank failed first and why the others followed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// Some peers did not reach the operation before the deadline. `missing` lists the ranks that
    /// had not arrived when the deadline passed (empty when the reporting rank cannot know them).
    /// After a timeout the group is broken: its ranks no longer agree on which collective comes
    /// next, so every later call on any of its endpoints fails with [`CommError::GroupBroken`].
    #[error(
        "rank {rank}: {op} timed out after {waited:?}; ranks that had not arrived: {missing:?}"
    )]
    Timeout {
        rank: usize,
        op: String,
        waited: Duration,
        missing: Vec<usize>,
    },

    /// Another rank failed (timed out, passed invalid arguments, panicked or dropped its endpoint),
    /// so this collective cannot complete. `reason` is the first failure the group recorded.
    #[error("rank {rank}: {op} cannot complete because the group is broken: {reason}")]
    GroupBroken {
        rank: usize,
        op: String,
        reason: String,
    },

    /// The ranks entered the same collective slot with different arguments (another collective,
    /// another dtype, another length, reduction or root).
    #[error("rank {rank}: {op}: ranks called mismatched collectives: {detail}")]
    Mismatch {
        rank: usize,
        op: String,
        detail: String,
    },

    /// This rank's own arguments are inconsistent (a buffer length, a root or a rank out of range).
    #[error("rank {rank}: invalid argument to {op}: {detail}")]
    InvalidArgument {
        rank: usize,
        op: String,
        detail: String,
    },

    /// A shared library needed at run time could not be loaded.
    #[error("{library} could not be loaded: {hint}")]
    LibraryMissing {
        library: &'static str,
        hint: &'static str,
    },

    /// An NCCL call returned an error code.
    #[error("rank {rank}: NCCL call {call} failed with {code}{detail}")]
    Nccl {
        rank: usize,
        call: &'static str,
        code: String,
        /// NCCL's own last-error text, prefixed with ": ", or empty.
        detail: String,
    },

    /// Bytes that should hold an NCCL unique id have the wrong length.
    #[error("an NCCL unique id has {expected} bytes, got {got}")]
    InvalidNcclId { expected: usize, got: usize },

    /// A CUDA driver call made on behalf of a communicator failed.
    #[error("rank {rank}: CUDA driver call {call} failed: {source}")]
    Driver {
        rank: usize,
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// The communicator was aborted earlier (after a timeout or an asynchronous NCCL error) and
    /// cannot be used any more; build a new one.
    #[error("rank {rank}: {op}: the communicator was aborted earlier ({reason}); create a new one")]
    Aborted {
        rank: usize,
        op: String,
        reason: String,
    },

    /// A device operation around a collective failed (a copy between the device and the host
    /// staging buffer, a stream wait).
    #[error("rank {rank}: {op}: {source}")]
    Device {
        rank: usize,
        op: String,
        #[source]
        source: Box<crate::error::Error>,
    },

    /// The requested kind of communicator cannot run on this device or machine (NCCL on a
    /// simulated device, say).
    #[error("rank {rank}: {what} is not available: {reason}")]
    Unavailable {
        rank: usize,
        what: &'static str,
        reason: String,
    },

    /// A socket operation of the rendezvous failed.
    #[error("rank {rank}: rendezvous at {addr}: {context}: {source}")]
    Io {
        rank: usize,
        addr: String,
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The rendezvous peers disagreed (world size, duplicate rank) or one sent malformed data.
    #[error("rank {rank}: rendezvous at {addr}: {detail}")]
    Rendezvous {
        rank: usize,
        addr: String,
        detail: String,
    },
}

impl CommError {
    /// True for [`CommError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, CommError::Timeout { .. })
    }
}
