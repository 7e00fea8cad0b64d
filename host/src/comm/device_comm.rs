//! [`DeviceComm`]: the collectives a device run needs, on ranges of [`DeviceBuffer`]s, behind
//! one type with two implementations.
//!
//! - [`DeviceComm::Staged`] goes through host memory: the range is copied from the device into
//!   a host staging buffer (a copy that waits for the compute stream), a [`HostComm`]
//!   collective runs on it (in-process ranks or processes over TCP, folding the ranks in rank
//!   order), and the result is copied back on the compute stream. It works on every device,
//!   the simulated one included, and is bit for bit what the host collectives compute. Every
//!   call returns with the result in device memory.
//! - [`DeviceComm::Nccl`] runs NCCL on the device addresses of the buffers, on a stream of its
//!   own. Each collective is ordered after the work already queued on the device's compute
//!   stream (the NCCL stream waits for an event recorded there), and later compute work waits
//!   for the collective (the compute stream waits for an event recorded after it): no host
//!   synchronisation per call. The host learns of a failed peer through
//!   [`DeviceComm::poll`] (NCCL's asynchronous error state) and waits with a bound through
//!   [`DeviceComm::wait_event`] / [`DeviceComm::synchronize`], which abort the communicator
//!   after its timeout and name the rank. Only a CUDA device has it: on the simulated device
//!   [`DeviceComm::nccl`] is a [`CommError::Unavailable`] error. NCCL reduces in its own
//!   order, so an N-rank NCCL run is not bitwise equal to a one-rank run the way a staged run
//!   is. This path has not yet run on a GPU: it builds everywhere, and the machines without a
//!   GPU that run the tests exercise only its error paths.
//!
//! Why not the [`Communicator`] trait: a device run exchanges *ranges* of its flat buffers (a
//! gradient bucket, a ZeRO shard, the pieces of a parameter), and the owner-to-shard pieces of
//! a reduce or gather need every rank's shard; the methods here take those ranges.
//!
//! Buffer lifetimes on the NCCL path: buffers are allocated for the compute stream, and the
//! compute stream waits for every collective right after queuing it, so a buffer freed later
//! (its block reused by later compute-stream work) is never reused before the collective has
//! read or written it.

use std::cell::RefCell;
use std::ops::Range;
use std::time::Duration;

use super::nccl::RawPiece;
use super::{CommElement, CommError, Communicator, HostComm, Nccl, NcclId, ReduceOp, shard_range};
use crate::stream::EventInner;
use crate::{Device, DeviceBuffer, DeviceElem, Event, Stream};

/// Collectives on device buffers: through host staging or over NCCL. See the module docs.
///
/// Every rank of the group must call the same methods in the same order with matching ranges.
#[derive(Debug)]
pub enum DeviceComm {
    /// Device -> host copy, a [`HostComm`] collective, host -> device copy.
    Staged(StagedComm),
    /// NCCL on the device buffers (CUDA devices only).
    Nccl(NcclDeviceComm),
}

/// The host-staged implementation: a [`HostComm`] and a reusable staging buffer.
#[derive(Debug)]
pub struct StagedComm {
    comm: HostComm,
    /// Host staging, kept between calls (u64 words: aligned for every element type).
    staging: RefCell<Vec<u64>>,
}

/// The NCCL implementation: a communicator on its own stream of `dev`.
pub struct NcclDeviceComm {
    nccl: Nccl,
    dev: Device,
    /// The communicator's stream, as a Lathe stream (for joins with the compute stream).
    stream: Stream,
}

impl std::fmt::Debug for NcclDeviceComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclDeviceComm")
            .field("nccl", &self.nccl)
            .field("device", &self.dev.describe())
            .finish()
    }
}

impl From<HostComm> for DeviceComm {
    fn from(c: HostComm) -> Self {
        DeviceComm::staged(c)
    }
}

impl From<super::LocalComm> for DeviceComm {
    fn from(c: super::LocalComm) -> Self {
        DeviceComm::staged(c)
    }
}

impl From<super::TcpComm> for DeviceComm {
    fn from(c: super::TcpComm) -> Self {
        DeviceComm::staged(c)
    }
}

fn device_error(rank: usize, op: impl Into<String>) -> impl FnOnce(crate::Error) -> CommError {
    let op = op.into();
    move |e| CommError::Device {
        rank,
        op,
        source: Box::new(e),
    }
}

fn invalid(rank: usize, op: &str, detail: String) -> CommError {
    CommError::InvalidArgument {
        rank,
        op: op.to_string(),
        detail,
    }
}

fn check_range(rank: usize, op: &str, len: usize, range: &Range<usize>) -> Result<(), CommError> {
    if range.start > range.end || range.end > len {
        return Err(invalid(
            rank,
            op,
            format!("range {range:?} is outside a buffer of {len} elements"),
        ));
    }
    Ok(())
}

/// Checks that `shards` has one range per rank, each inside `0..len`.
fn check_shards(
    rank: usize,
    world: usize,
    op: &str,
    shards: &[Range<usize>],
) -> Result<Range<usize>, CommError> {
    if shards.len() != world {
        return Err(invalid(
            rank,
            op,
            format!("{} shards for a group of {world}", shards.len()),
        ));
    }
    Ok(shards[rank].clone())
}

/// The part of `a` inside `b` (possibly empty).
fn overlap(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let lo = a.start.max(b.start);
    let hi = a.end.min(b.end).max(lo);
    lo..hi
}

impl DeviceComm {
    /// The host-staged communicator over `comm`.
    pub fn staged(comm: impl Into<HostComm>) -> Self {
        DeviceComm::Staged(StagedComm {
            comm: comm.into(),
            staging: RefCell::new(Vec::new()),
        })
    }

    /// Rank `rank` of a `world`-rank NCCL communicator identified by `id` (the same id on
    /// every rank), on a new stream of `dev`. Blocks until every rank has called it.
    ///
    /// Errors: [`CommError::Unavailable`] on the simulated device (checked first, so the
    /// message is the same with or without the NCCL library), [`CommError::LibraryMissing`]
    /// when the CUDA driver or NCCL cannot be loaded. Not yet run on a GPU.
    pub fn nccl(dev: &Device, rank: usize, world: usize, id: &NcclId) -> Result<Self, CommError> {
        if dev.is_sim() {
            return Err(CommError::Unavailable {
                rank,
                what: "NCCL",
                reason: format!(
                    "{} is simulated and NCCL needs CUDA devices; the host-staged \
                     communicator serves simulated devices (LATHE_COMM=host or auto)",
                    dev.describe()
                ),
            });
        }
        super::nccl_available()?;
        let ctx = dev
            .cudarc_context()
            .map_err(device_error(rank, "opening NCCL's stream"))?;
        dev.bind()
            .map_err(device_error(rank, "opening NCCL's stream"))?;
        let raw = ctx.new_stream().map_err(|source| CommError::Driver {
            rank,
            call: "cuStreamCreate",
            source,
        })?;
        let nccl = Nccl::new(raw.clone(), rank, world, id)?;
        Ok(DeviceComm::Nccl(NcclDeviceComm {
            nccl,
            dev: dev.clone(),
            stream: Stream::cuda(raw),
        }))
    }

    /// This endpoint's rank.
    pub fn rank(&self) -> usize {
        match self {
            DeviceComm::Staged(s) => s.comm.rank(),
            DeviceComm::Nccl(n) => n.nccl.rank(),
        }
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        match self {
            DeviceComm::Staged(s) => s.comm.world_size(),
            DeviceComm::Nccl(n) => n.nccl.world_size(),
        }
    }

    /// "host-staged" or "nccl", for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceComm::Staged(_) => "host-staged",
            DeviceComm::Nccl(_) => "nccl",
        }
    }

    /// Whether collectives run over NCCL.
    pub fn is_nccl(&self) -> bool {
        matches!(self, DeviceComm::Nccl(_))
    }

    /// How long an NCCL wait lasts before the communicator is aborted (the staged path's
    /// timeout is its [`HostComm`]'s, set when that was built).
    pub fn set_timeout(&mut self, timeout: Duration) {
        if let DeviceComm::Nccl(n) = self {
            n.nccl.set_timeout(timeout);
        }
    }

    /// In place: `buf[range]` becomes the `op`-reduction over the ranks of their `buf[range]`.
    pub fn all_reduce<T: CommElement + DeviceElem>(
        &self,
        buf: &mut DeviceBuffer<T>,
        range: Range<usize>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let rank = self.rank();
        check_range(rank, "all_reduce", buf.len(), &range)?;
        if range.is_empty() {
            return Ok(());
        }
        match self {
            DeviceComm::Staged(s) => s.with_staging(range.len(), |host: &mut [T]| {
                buf.copy_to_host_at(range.start, host)
                    .map_err(device_error(rank, "all_reduce: copying to the host"))?;
                s.comm.all_reduce(host, op)?;
                buf.copy_from_host_at(range.start, host)
                    .map_err(device_error(rank, "all_reduce: copying to the device"))
            }),
            DeviceComm::Nccl(n) => {
                n.check_device("all_reduce", buf.device())?;
                let ptr = addr_of(buf, range.start);
                n.ordered("all_reduce", |nccl| {
                    // SAFETY: `ptr` addresses `range.len()` elements inside `buf` (range
                    // checked); the compute stream waits for the collective before any later
                    // work, so the buffer outlives it (see the module docs).
                    unsafe { nccl.all_reduce_raw::<T>(ptr, range.len(), op) }
                })
            }
        }
    }

    /// Reduce-scatter of a range onto the ZeRO shards: every rank contributes `buf[range]`;
    /// `shards[r]` is rank `r`'s range of the flat buffer (one per rank); this rank receives
    /// the `op`-reduction of the part of `range` inside its own shard, written into `keep`
    /// (`shards[rank].len()` elements) at `element - shards[rank].start`. The rest of `keep` is
    /// left as it is. `buf` itself is not changed.
    pub fn reduce_to_shards<T: CommElement + DeviceElem>(
        &self,
        buf: &DeviceBuffer<T>,
        range: Range<usize>,
        op: ReduceOp,
        shards: &[Range<usize>],
        keep: &mut DeviceBuffer<T>,
    ) -> Result<(), CommError> {
        let (rank, world) = (self.rank(), self.world_size());
        let op_name = "reduce_to_shards";
        check_range(rank, op_name, buf.len(), &range)?;
        let own = check_shards(rank, world, op_name, shards)?;
        if keep.len() != own.len() {
            return Err(invalid(
                rank,
                op_name,
                format!(
                    "the shard buffer has {} elements, rank {rank}'s shard {own:?}",
                    keep.len()
                ),
            ));
        }
        if range.is_empty() {
            return Ok(());
        }
        match self {
            DeviceComm::Staged(s) => s.with_staging(range.len(), |host: &mut [T]| {
                buf.copy_to_host_at(range.start, host)
                    .map_err(device_error(rank, "reduce_to_shards: copying to the host"))?;
                s.comm.all_reduce(host, op)?;
                let mine = overlap(&range, &own);
                if mine.is_empty() {
                    return Ok(());
                }
                let part = &host[mine.start - range.start..mine.end - range.start];
                keep.copy_from_host_at(mine.start - own.start, part)
                    .map_err(device_error(rank, "reduce_to_shards: copying to the shard"))
            }),
            DeviceComm::Nccl(n) => {
                n.check_device(op_name, buf.device())?;
                n.check_device(op_name, keep.device())?;
                let mut pieces = Vec::new();
                for (r, s) in shards.iter().enumerate() {
                    let part = overlap(&range, s);
                    if part.is_empty() {
                        continue;
                    }
                    let recv = if r == rank {
                        addr_of(keep, part.start - own.start)
                    } else {
                        0
                    };
                    pieces.push(RawPiece {
                        root: r,
                        send: addr_of(buf, part.start),
                        recv,
                        count: part.len(),
                    });
                }
                n.ordered(op_name, |nccl| {
                    // SAFETY: every `send` lies inside `buf[range]` (range checked), this
                    // rank's `recv` inside `keep` (its length is the shard's); both outlive
                    // the collective (module docs).
                    unsafe { nccl.grouped_reduces_raw::<T>(&pieces, op) }
                })
            }
        }
    }

    /// `out` (`range.len()` elements) receives the elements `range` of a flat buffer split over
    /// the ranks as `shards` (rank `r` owns `shards[r]`; this rank's piece is `mine`): each
    /// owner of a piece of `range` sends it to every rank, in rank order. Values are copied,
    /// never combined, so every rank gets the owners' bits.
    pub fn gather_range<T: CommElement + DeviceElem>(
        &self,
        range: Range<usize>,
        shards: &[Range<usize>],
        mine: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<(), CommError> {
        let (rank, world) = (self.rank(), self.world_size());
        let op_name = "gather_range";
        let own = check_shards(rank, world, op_name, shards)?;
        if out.len() != range.len() || mine.len() != own.len() {
            return Err(invalid(
                rank,
                op_name,
                format!(
                    "gathering {range:?}: the output holds {} elements, this rank's shard \
                     {own:?} {}",
                    out.len(),
                    mine.len()
                ),
            ));
        }
        match self {
            DeviceComm::Staged(s) => s.with_staging(range.len(), |host: &mut [T]| {
                for (r, sh) in shards.iter().enumerate() {
                    let part = overlap(&range, sh);
                    if part.is_empty() {
                        continue;
                    }
                    let piece = &mut host[part.start - range.start..part.end - range.start];
                    if r == rank {
                        mine.copy_to_host_at(part.start - own.start, piece)
                            .map_err(device_error(rank, "gather_range: copying to the host"))?;
                    }
                    s.comm.broadcast(piece, r)?;
                }
                out.copy_from_host(host)
                    .map_err(device_error(rank, "gather_range: copying to the device"))
            }),
            DeviceComm::Nccl(n) => {
                n.check_device(op_name, mine.device())?;
                n.check_device(op_name, out.device())?;
                let mut pieces = Vec::new();
                for (r, sh) in shards.iter().enumerate() {
                    let part = overlap(&range, sh);
                    if part.is_empty() {
                        continue;
                    }
                    let send = if r == rank {
                        addr_of(mine, part.start - own.start)
                    } else {
                        0
                    };
                    pieces.push(RawPiece {
                        root: r,
                        send,
                        recv: addr_of(out, part.start - range.start),
                        count: part.len(),
                    });
                }
                n.ordered(op_name, |nccl| {
                    // SAFETY: this rank's `send` lies inside `mine` (its piece of its own
                    // shard), every `recv` inside `out` (`range.len()` long); both outlive the
                    // collective (module docs).
                    unsafe { nccl.grouped_broadcasts_raw::<T>(&pieces) }
                })
            }
        }
    }

    /// Every rank's `shard` (its [`shard_range`] of `full.len()` elements) gathered into
    /// `full` on every rank.
    pub fn all_gather_uneven<T: CommElement + DeviceElem>(
        &self,
        shard: &DeviceBuffer<T>,
        full: &mut DeviceBuffer<T>,
    ) -> Result<(), CommError> {
        let (rank, world) = (self.rank(), self.world_size());
        let op_name = "all_gather_uneven";
        let own = shard_range(full.len(), world, rank);
        if shard.len() != own.len() {
            return Err(invalid(
                rank,
                op_name,
                format!(
                    "the shard has {} elements but rank {rank}'s shard of {} is {own:?}",
                    shard.len(),
                    full.len()
                ),
            ));
        }
        match self {
            DeviceComm::Staged(s) => {
                let mine = shard.to_vec().map_err(device_error(
                    rank,
                    "all_gather: copying the shard to the host",
                ))?;
                s.with_staging(full.len(), |all: &mut [T]| {
                    s.comm.all_gather_uneven(&mine[..], all)?;
                    full.copy_from_host(all)
                        .map_err(device_error(rank, "all_gather: copying to the device"))
                })
            }
            DeviceComm::Nccl(n) => {
                n.check_device(op_name, shard.device())?;
                n.check_device(op_name, full.device())?;
                let pieces: Vec<RawPiece> = (0..world)
                    .map(|r| (r, shard_range(full.len(), world, r)))
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(r, s)| RawPiece {
                        root: r,
                        send: if r == rank { addr_of(shard, 0) } else { 0 },
                        recv: addr_of(full, s.start),
                        count: s.len(),
                    })
                    .collect();
                n.ordered(op_name, |nccl| {
                    // SAFETY: this rank's `send` is its whole shard (length checked), every
                    // `recv` a shard range inside `full`; both outlive the collective.
                    unsafe { nccl.grouped_broadcasts_raw::<T>(&pieces) }
                })
            }
        }
    }

    /// In place: `buf[range]` on every rank becomes rank `root`'s `buf[range]`.
    pub fn broadcast<T: CommElement + DeviceElem>(
        &self,
        buf: &mut DeviceBuffer<T>,
        range: Range<usize>,
        root: usize,
    ) -> Result<(), CommError> {
        let rank = self.rank();
        check_range(rank, "broadcast", buf.len(), &range)?;
        if range.is_empty() {
            return Ok(());
        }
        match self {
            DeviceComm::Staged(s) => s.with_staging(range.len(), |host: &mut [T]| {
                if rank == root {
                    buf.copy_to_host_at(range.start, host)
                        .map_err(device_error(rank, "broadcast: copying to the host"))?;
                }
                s.comm.broadcast(host, root)?;
                if rank != root {
                    buf.copy_from_host_at(range.start, host)
                        .map_err(device_error(rank, "broadcast: copying to the device"))?;
                }
                Ok(())
            }),
            DeviceComm::Nccl(n) => {
                n.check_device("broadcast", buf.device())?;
                let at = addr_of(buf, range.start);
                let piece = RawPiece {
                    root,
                    send: at,
                    recv: at,
                    count: range.len(),
                };
                n.ordered("broadcast", |nccl| {
                    // SAFETY: `at` addresses `range.len()` elements inside `buf` (checked);
                    // in place is allowed; the buffer outlives the collective.
                    unsafe { nccl.grouped_broadcasts_raw::<T>(&[piece]) }
                })
            }
        }
    }

    /// Returns once every rank has entered the barrier (bounded by the timeout).
    pub fn barrier(&self) -> Result<(), CommError> {
        match self {
            DeviceComm::Staged(s) => s.comm.barrier(),
            DeviceComm::Nccl(n) => n.nccl.barrier(),
        }
    }

    /// Checks, without waiting, that no collective has failed asynchronously (a peer died).
    /// Nothing to check on the staged path, whose collectives complete before returning.
    pub fn poll(&self) -> Result<(), CommError> {
        match self {
            DeviceComm::Staged(_) => Ok(()),
            DeviceComm::Nccl(n) => n.nccl.poll(),
        }
    }

    /// Waits for every queued collective, bounded by the timeout (aborting the communicator
    /// and naming the rank when it passes). Nothing to wait for on the staged path.
    pub fn synchronize(&self) -> Result<(), CommError> {
        match self {
            DeviceComm::Staged(_) => Ok(()),
            DeviceComm::Nccl(n) => n.nccl.synchronize(),
        }
    }

    /// Waits for `event` (recorded on a stream of this rank's device). The staged path waits
    /// as [`Event::synchronize`] does; the NCCL path polls the event and NCCL's asynchronous
    /// errors, and aborts after the timeout: work queued behind a collective whose peer died
    /// would otherwise never finish. `what` names the wait in the error.
    pub fn wait_event(&self, event: &Event, what: &str) -> Result<(), CommError> {
        let rank = self.rank();
        match (self, &event.inner) {
            (DeviceComm::Nccl(n), EventInner::Cuda(e)) => n.nccl.wait_event(e, what),
            _ => event.synchronize().map_err(device_error(rank, what)),
        }
    }
}

/// The device address of element `at` of `buf`.
fn addr_of<T: DeviceElem>(buf: &DeviceBuffer<T>, at: usize) -> u64 {
    buf.addr() + (at * size_of::<T>()) as u64
}

impl StagedComm {
    /// Runs `f` on `n` zeroed elements of the reusable host staging buffer.
    fn with_staging<T: DeviceElem, R>(&self, n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        let bytes = n * size_of::<T>();
        let mut words = self.staging.borrow_mut();
        let need = bytes.div_ceil(size_of::<u64>());
        if words.len() < need {
            words.resize(need, 0);
        }
        let used = &mut words[..need];
        used.fill(0);
        let raw: &mut [u8] = bytemuck::cast_slice_mut(used);
        // The words are 8-byte aligned and every element type's size divides `bytes`.
        f(bytemuck::cast_slice_mut(&mut raw[..bytes]))
    }
}

impl NcclDeviceComm {
    /// Queues `f`'s collective on the NCCL stream after the compute stream's queued work, and
    /// makes later compute work wait for it. No host wait.
    fn ordered<R>(
        &self,
        op: &str,
        f: impl FnOnce(&Nccl) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let rank = self.nccl.rank();
        self.dev.bind().map_err(device_error(rank, op))?;
        let compute = self.dev.compute_stream();
        self.stream.join(compute).map_err(device_error(
            rank,
            format!("{op}: ordering after the compute stream"),
        ))?;
        let r = f(&self.nccl)?;
        compute.join(&self.stream).map_err(device_error(
            rank,
            format!("{op}: ordering the compute stream after"),
        ))?;
        Ok(r)
    }

    fn check_device(&self, op: &str, dev: &Device) -> Result<(), CommError> {
        if dev.is_sim() || dev.ordinal() != self.dev.ordinal() {
            return Err(invalid(
                self.nccl.rank(),
                op,
                format!(
                    "the buffer lives on {}, the communicator on {}",
                    dev.describe(),
                    self.dev.describe()
                ),
            ));
        }
        Ok(())
    }
}
