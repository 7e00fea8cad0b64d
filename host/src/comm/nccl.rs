//! `Nccl`: a communicator over NCCL (through cudarc's bindings) on device buffers.
//!
//! NCCL is loaded at run time. Every entry point first checks that the CUDA driver and NCCL
//! libraries can be loaded ([`nccl_available`]) and returns [`CommError::LibraryMissing`]
//! otherwise, so a machine without them gets an error, not a panic from the loader.
//!
//! The communicator is driven through cudarc's `result` layer, which lets Lathe own the handle:
//! grouped calls (the uneven collectives) hold cudarc's stream-ordering records until the group
//! is closed, errors come back as values, and a hung collective can be aborted.
//!
//! Collectives are stream-ordered: they are queued on the communicator's stream and return.
//! [`Nccl::synchronize`] waits for them, polling NCCL's asynchronous error state, and aborts the
//! communicator after its timeout (a peer that died mid-collective would otherwise leave the
//! GPU spinning forever). After an abort every call returns [`CommError::Aborted`].

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::{result, sys};

use super::{CommElement, CommError, Communicator, ReduceOp, rendezvous, shard_range};

static DRIVER_PRESENT: OnceLock<bool> = OnceLock::new();
static NCCL_PRESENT: OnceLock<bool> = OnceLock::new();

/// Checks that the CUDA driver library and NCCL can be loaded; nothing else in this module
/// touches either library before this check passes.
pub fn nccl_available() -> Result<(), CommError> {
    let driver = *DRIVER_PRESENT.get_or_init(|| {
        // SAFETY: this only tries to open the driver library under its usual names and closes
        // it again; opening it runs the vendor's initialisers and no Lathe code.
        unsafe { cudarc::driver::sys::is_culib_present() }
    });
    if !driver {
        return Err(CommError::LibraryMissing {
            library: "the CUDA driver library (libcuda.so)",
            hint: "no NVIDIA driver is installed or it is not on the loader path; NCCL needs a \
                   GPU and its driver (use LocalGroup for CPU runs)",
        });
    }
    let nccl = *NCCL_PRESENT.get_or_init(|| {
        // SAFETY: as above, for the NCCL library.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    });
    if !nccl {
        return Err(CommError::LibraryMissing {
            library: "NCCL (libnccl.so)",
            hint: "install NCCL 2.28 or newer and make `libnccl.so` loadable through \
                   LD_LIBRARY_PATH (packages that ship only `libnccl.so.2` need a `libnccl.so` \
                   symlink next to it)",
        });
    }
    Ok(())
}

/// NCCL's unique id: created on rank 0, sent to every rank (e.g. through [`rendezvous`]), used
/// once by all ranks to build one communicator. 128 opaque bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NcclId::LEN]);

impl NcclId {
    /// Length of the serialised id in bytes.
    pub const LEN: usize = 128;

    /// A fresh id (call on rank 0 only). Fails if NCCL cannot be loaded.
    pub fn new() -> Result<Self, CommError> {
        nccl_available()?;
        let raw = result::get_uniqueid().map_err(|e| nccl_error(0, "ncclGetUniqueId", e, None))?;
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }

    /// The serialised id.
    pub fn as_bytes(&self) -> &[u8; NcclId::LEN] {
        &self.0
    }

    /// Rebuilds an id from the bytes of [`NcclId::as_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CommError> {
        let arr: [u8; NcclId::LEN] = bytes.try_into().map_err(|_| CommError::InvalidNcclId {
            expected: NcclId::LEN,
            got: bytes.len(),
        })?;
        Ok(NcclId(arr))
    }

    /// Hands rank 0's id to every rank of a `world`-rank group through a [`rendezvous`] at
    /// `addr` (`HOST:PORT`, rank 0 serves). Rank 0 passes `Some(id)`, the others `None`; every
    /// rank returns rank 0's id. Needs no NCCL library: only the id's bytes travel, so this
    /// runs (and is tested) on machines without a GPU.
    pub fn exchange(
        addr: &str,
        rank: usize,
        world: usize,
        id: Option<&NcclId>,
        timeout: Duration,
    ) -> Result<NcclId, CommError> {
        let blob = match (rank, id) {
            (0, Some(id)) => Some(id.as_bytes().to_vec()),
            (0, None) => {
                return Err(CommError::InvalidArgument {
                    rank,
                    op: "NcclId::exchange".to_string(),
                    detail: "rank 0 must provide the id it hands out".to_string(),
                });
            }
            _ => None,
        };
        let bytes = rendezvous(addr, rank, world, blob, timeout)?;
        NcclId::from_bytes(&bytes)
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

fn nccl_error(
    rank: usize,
    call: &'static str,
    e: result::NcclError,
    comm: Option<sys::ncclComm_t>,
) -> CommError {
    // SAFETY: ncclGetLastError only reads NCCL's thread-local error text (the handle is not
    // dereferenced by current NCCL); the library is loaded, since this runs after a call into it.
    let text = unsafe { sys::ncclGetLastError(comm.unwrap_or(std::ptr::null_mut())) };
    let detail = if text.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null result is a NUL-terminated string owned by NCCL, read at once.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        if s.is_empty() {
            String::new()
        } else {
            format!(": {s}")
        }
    };
    CommError::Nccl {
        rank,
        call,
        code: format!("{:?}", e.0),
        detail,
    }
}

fn driver_error(rank: usize, call: &'static str) -> impl FnOnce(DriverError) -> CommError {
    move |source| CommError::Driver { rank, call, source }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// One rank of an NCCL communicator, bound to one CUDA stream on one device.
///
/// `Send` but not `Sync`: NCCL forbids concurrent calls on one communicator. Dropping it aborts
/// the communicator, which cancels queued collectives: call [`Nccl::synchronize`] first.
pub struct Nccl {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// One element on the device for `barrier`.
    scratch: RefCell<CudaSlice<f32>>,
    /// Why the communicator was aborted, once it has been.
    aborted: RefCell<Option<String>>,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.stream.context().ordinal())
            .field("timeout", &self.timeout)
            .field("aborted", &*self.aborted.borrow())
            .finish()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `Nccl` is not `Sync`, so only the one thread that owns it can call it.
unsafe impl Send for Nccl {}

impl Nccl {
    /// How long [`Nccl::synchronize`] and [`Nccl::barrier`] wait before aborting, by default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// Rank `rank` of a `world`-rank communicator identified by `id`, queuing its work on
    /// `stream`. Blocks until all `world` ranks have called it with the same id.
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self, CommError> {
        nccl_available()?;
        if world == 0 || world > i32::MAX as usize || rank >= world {
            return Err(CommError::InvalidArgument {
                rank,
                op: "Nccl::new".to_string(),
                detail: format!("rank {rank} is not a rank of a group of {world}"),
            });
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(driver_error(rank, "cuCtxSetCurrent"))?;
        let scratch = stream
            .alloc_zeros::<f32>(1)
            .map_err(driver_error(rank, "cuMemAllocAsync"))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid place for the new handle; rank and world were checked to fit
        // NCCL's `int`; the id is 128 bytes as produced by ncclGetUniqueId.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id.raw(), rank as i32) }
            .map_err(|e| nccl_error(rank, "ncclCommInitRank", e, None))?;
        Ok(Nccl {
            comm,
            stream,
            rank,
            world,
            timeout: Self::DEFAULT_TIMEOUT,
            scratch: RefCell::new(scratch),
            aborted: RefCell::new(None),
        })
    }

    /// Like [`Nccl::new`] on the default stream of a new context for device `ordinal`.
    pub fn on_device(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self, CommError> {
        nccl_available()?;
        let ctx =
            CudaContext::new(ordinal).map_err(driver_error(rank, "cuDevicePrimaryCtxRetain"))?;
        Self::new(ctx.default_stream(), rank, world, id)
    }

    /// Builds the communicator of a multi-process run: rank 0 creates the id and serves it at
    /// `addr` through [`rendezvous`], the other ranks fetch it, then all call [`Nccl::new`].
    /// `timeout` bounds the rendezvous.
    pub fn from_rendezvous(
        stream: Arc<CudaStream>,
        addr: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        nccl_available()?;
        let mine = if rank == 0 {
            Some(NcclId::new()?)
        } else {
            None
        };
        let id = NcclId::exchange(addr, rank, world, mine.as_ref(), timeout)?;
        Self::new(stream, rank, world, &id)
    }

    /// The stream this communicator queues its collectives on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// How long [`Nccl::synchronize`] waits before aborting.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets how long [`Nccl::synchronize`] waits before aborting.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn usable(&self, op: &str) -> Result<(), CommError> {
        match &*self.aborted.borrow() {
            Some(reason) => Err(CommError::Aborted {
                rank: self.rank,
                op: op.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn abort(&self, reason: String) {
        let mut aborted = self.aborted.borrow_mut();
        if aborted.is_none() {
            // SAFETY: the handle is live (it has not been aborted before) and is not used again
            // once `aborted` is set. The result is ignored: the communicator is unusable anyway.
            let _ = unsafe { result::comm_abort(self.comm) };
            *aborted = Some(reason);
        }
    }

    fn check_device<T, B: cudarc::driver::DeviceSlice<T>>(
        &self,
        op: &str,
        buf: &B,
    ) -> Result<(), CommError> {
        let theirs = buf.stream().context().ordinal();
        let ours = self.stream.context().ordinal();
        if theirs != ours {
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: op.to_string(),
                detail: format!(
                    "buffer lives on device {theirs}, the communicator on device {ours}"
                ),
            });
        }
        Ok(())
    }

    fn invalid(&self, op: &str, detail: String) -> CommError {
        CommError::InvalidArgument {
            rank: self.rank,
            op: op.to_string(),
            detail,
        }
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    fn checked(
        &self,
        call: &'static str,
        r: Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), CommError> {
        r.map(|_| ())
            .map_err(|e| nccl_error(self.rank, call, e, Some(self.comm)))
    }

    /// In-place all-reduce of a device buffer (a `CudaSlice` or a view of one).
    pub fn all_reduce<T: CommElement, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.usable("all_reduce")?;
        self.check_device("all_reduce", buf)?;
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `count` elements of `T` on this communicator's device; NCCL
        // allows send == recv (in place); `_record` keeps cudarc's cross-stream ordering until
        // the call is queued.
        let r = unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                nccl_op(op),
                self.comm,
                self.raw_stream(),
            )
        };
        self.checked("ncclAllReduce", r)
    }

    /// Reduce-scatter with `input.len() == world * output.len()`.
    pub fn reduce_scatter<T: CommElement, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        input: &S,
        output: &mut R,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.usable("reduce_scatter")?;
        self.check_device("reduce_scatter", input)?;
        self.check_device("reduce_scatter", output)?;
        let n = output.len();
        if input.len() != n * self.world {
            return Err(self.invalid(
                "reduce_scatter",
                format!(
                    "input has {} elements, output {n}; reduce_scatter needs input = world size \
                     ({}) x output (use reduce_scatter_uneven otherwise)",
                    input.len(),
                    self.world
                ),
            ));
        }
        let (src, _rin) = input.device_ptr(&self.stream);
        let (dst, _rout) = output.device_ptr_mut(&self.stream);
        // SAFETY: `src` holds `world * n` and `dst` holds `n` elements of `T` on this device.
        let r = unsafe {
            result::reduce_scatter(
                src as *const c_void,
                dst as *mut c_void,
                n,
                T::as_nccl_type(),
                nccl_op(op),
                self.comm,
                self.raw_stream(),
            )
        };
        self.checked("ncclReduceScatter", r)
    }

    /// Reduce-scatter of any input length over [`shard_range`]: one grouped `ncclReduce` per
    /// non-empty shard, rooted at the shard's owner.
    pub fn reduce_scatter_uneven<T: CommElement, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        input: &S,
        output: &mut R,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let len = input.len();
        if len.is_multiple_of(self.world) {
            return self.reduce_scatter(input, output, op);
        }
        self.usable("reduce_scatter_uneven")?;
        self.check_device("reduce_scatter_uneven", input)?;
        self.check_device("reduce_scatter_uneven", output)?;
        let mine = shard_range(len, self.world, self.rank);
        if output.len() != mine.len() {
            return Err(self.invalid(
                "reduce_scatter_uneven",
                format!(
                    "output has {} elements but rank {}'s shard of {len} is {mine:?}",
                    output.len(),
                    self.rank
                ),
            ));
        }
        let size = std::mem::size_of::<T>() as u64;
        let (src, _rin) = input.device_ptr(&self.stream);
        let (dst, _rout) = output.device_ptr_mut(&self.stream);
        self.grouped("ncclReduce", |root| {
            let range = shard_range(len, self.world, root);
            if range.is_empty() {
                return Ok(result::NcclStatus::Success);
            }
            let recv = if root == self.rank {
                dst as *mut c_void
            } else {
                std::ptr::null_mut()
            };
            // SAFETY: `src + range.start` addresses `range.len()` elements of the input; the
            // receive buffer is used on the root only, where it holds exactly that many.
            unsafe {
                result::reduce(
                    (src + range.start as u64 * size) as *const c_void,
                    recv,
                    range.len(),
                    T::as_nccl_type(),
                    nccl_op(op),
                    root as i32,
                    self.comm,
                    self.raw_stream(),
                )
            }
        })
    }

    /// All-gather with `output.len() == world * input.len()`.
    pub fn all_gather<T: CommElement, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        input: &S,
        output: &mut R,
    ) -> Result<(), CommError> {
        self.usable("all_gather")?;
        self.check_device("all_gather", input)?;
        self.check_device("all_gather", output)?;
        let n = input.len();
        if output.len() != n * self.world {
            return Err(self.invalid(
                "all_gather",
                format!(
                    "input has {n} elements, output {}; all_gather needs output = world size \
                     ({}) x input (use all_gather_uneven otherwise)",
                    output.len(),
                    self.world
                ),
            ));
        }
        let (src, _rin) = input.device_ptr(&self.stream);
        let (dst, _rout) = output.device_ptr_mut(&self.stream);
        // SAFETY: `src` holds `n` and `dst` holds `world * n` elements of `T` on this device.
        let r = unsafe {
            result::all_gather(
                src as *const c_void,
                dst as *mut c_void,
                n,
                T::as_nccl_type(),
                self.comm,
                self.raw_stream(),
            )
        };
        self.checked("ncclAllGather", r)
    }

    /// All-gather of any output length over [`shard_range`]: one grouped `ncclBroadcast` per
    /// non-empty shard, from its owner into that range of every output.
    pub fn all_gather_uneven<T: CommElement, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        input: &S,
        output: &mut R,
    ) -> Result<(), CommError> {
        let len = output.len();
        if len.is_multiple_of(self.world) {
            return self.all_gather(input, output);
        }
        self.usable("all_gather_uneven")?;
        self.check_device("all_gather_uneven", input)?;
        self.check_device("all_gather_uneven", output)?;
        let mine = shard_range(len, self.world, self.rank);
        if input.len() != mine.len() {
            return Err(self.invalid(
                "all_gather_uneven",
                format!(
                    "input has {} elements but rank {}'s shard of {len} is {mine:?}",
                    input.len(),
                    self.rank
                ),
            ));
        }
        let size = std::mem::size_of::<T>() as u64;
        let (src, _rin) = input.device_ptr(&self.stream);
        let (dst, _rout) = output.device_ptr_mut(&self.stream);
        self.grouped("ncclBroadcast", |root| {
            let range = shard_range(len, self.world, root);
            if range.is_empty() {
                return Ok(result::NcclStatus::Success);
            }
            let send = if root == self.rank {
                src as *const c_void
            } else {
                std::ptr::null()
            };
            // SAFETY: `dst + range.start` addresses `range.len()` elements of the output; the
            // send buffer is read on the root only, where it holds exactly that many.
            unsafe {
                result::broadcast(
                    send,
                    (dst + range.start as u64 * size) as *mut c_void,
                    range.len(),
                    T::as_nccl_type(),
                    root as i32,
                    self.comm,
                    self.raw_stream(),
                )
            }
        })
    }

    /// Runs `call(root)` for every rank inside one NCCL group, closing the group even when a
    /// call fails.
    fn grouped(
        &self,
        call: &'static str,
        mut each: impl FnMut(usize) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), CommError> {
        self.checked("ncclGroupStart", result::group_start())?;
        let mut first = Ok(());
        for root in 0..self.world {
            let r = self.checked(call, each(root));
            if r.is_err() {
                first = r;
                break;
            }
        }
        let end = self.checked("ncclGroupEnd", result::group_end());
        first.and(end)
    }

    /// In-place broadcast of rank `root`'s buffer.
    pub fn broadcast<T: CommElement, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
        root: usize,
    ) -> Result<(), CommError> {
        self.usable("broadcast")?;
        self.check_device("broadcast", buf)?;
        if root >= self.world {
            return Err(self.invalid(
                "broadcast",
                format!("root {root} is not a rank of a group of {}", self.world),
            ));
        }
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `count` elements of `T` on this device; in place is allowed.
        let r = unsafe {
            result::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                root as i32,
                self.comm,
                self.raw_stream(),
            )
        };
        self.checked("ncclBroadcast", r)
    }

    /// Waits until everything queued on the communicator's stream has finished. Aborts the
    /// communicator and fails with [`CommError::Timeout`] after [`Nccl::timeout`], or with
    /// [`CommError::Nccl`] when NCCL reports an asynchronous error (a peer failed).
    pub fn synchronize(&self) -> Result<(), CommError> {
        self.usable("synchronize")?;
        let event = self
            .stream
            .record_event(None)
            .map_err(driver_error(self.rank, "cuEventRecord"))?;
        self.wait_event(
            &event,
            "synchronize (collectives queued on the NCCL stream)",
        )
    }

    /// Checks NCCL's asynchronous error state once, without waiting: a peer that failed
    /// mid-collective shows up here. On an error the communicator is aborted.
    pub fn poll(&self) -> Result<(), CommError> {
        self.usable("poll")?;
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the handle is live (checked by `usable`), `state` a valid out place.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        self.checked("ncclCommGetAsyncError", r.result())?;
        if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress {
            let err = nccl_error(
                self.rank,
                "a queued collective",
                result::NcclError(state),
                Some(self.comm),
            );
            self.abort(format!("asynchronous NCCL error: {err}"));
            return Err(err);
        }
        Ok(())
    }

    /// Waits until `event` (recorded on any stream of this device) has completed, polling
    /// NCCL's asynchronous error state meanwhile. After [`Nccl::timeout`] the communicator is
    /// aborted (so the queued collectives return) and the error names this rank and `what`.
    pub fn wait_event(
        &self,
        event: &cudarc::driver::CudaEvent,
        what: &str,
    ) -> Result<(), CommError> {
        self.usable(what)?;
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            if event
                .try_is_complete()
                .map_err(driver_error(self.rank, "cuEventQuery"))?
            {
                return Ok(());
            }
            self.poll()?;
            let waited = started.elapsed();
            if waited >= self.timeout {
                self.abort(format!("{what} timed out after {waited:?}"));
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op: what.to_string(),
                    waited,
                    missing: Vec::new(),
                });
            }
            polls += 1;
            if polls < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// All ranks meet: a one-element all-reduce, then [`Nccl::synchronize`].
    pub fn barrier(&self) -> Result<(), CommError> {
        self.usable("barrier")?;
        {
            let mut scratch = self.scratch.borrow_mut();
            self.all_reduce(&mut *scratch, ReduceOp::Sum)?;
        }
        self.synchronize()
    }
}

/// One piece of a grouped rooted collective on raw device addresses (see
/// [`Nccl::grouped_broadcasts_raw`], [`Nccl::grouped_reduces_raw`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawPiece {
    /// The rank the piece comes from (broadcast) or goes to (reduce).
    pub root: usize,
    /// Device address of the piece's source: read on the root only for a broadcast, on every
    /// rank for a reduce.
    pub send: u64,
    /// Device address of the piece's destination: written on every rank for a broadcast, on
    /// the root only for a reduce.
    pub recv: u64,
    /// Elements in the piece.
    pub count: usize,
}

/// Collectives on raw device addresses, for `DeviceBuffer`s of Lathe's own allocator
/// ([`super::DeviceComm`]). The caller orders them against its other streams; each call only
/// queues work on [`Nccl::stream`].
impl Nccl {
    /// In-place all-reduce of `count` elements at `ptr`.
    ///
    /// # Safety
    /// `ptr` addresses `count` live elements of `T` on this communicator's device, and stays
    /// allocated until the communicator's stream has passed the collective.
    pub(crate) unsafe fn all_reduce_raw<T: CommElement>(
        &self,
        ptr: u64,
        count: usize,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.usable("all_reduce")?;
        // SAFETY: the caller's contract; NCCL allows send == recv (in place).
        let r = unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                nccl_op(op),
                self.comm,
                self.raw_stream(),
            )
        };
        self.checked("ncclAllReduce", r)
    }

    /// One NCCL group of `ncclBroadcast`s: piece `p` goes from `p.root`'s `p.send` to every
    /// rank's `p.recv`. Every rank passes the same roots and counts in the same order.
    ///
    /// # Safety
    /// On the root of each piece, `send` addresses `count` live elements of `T`; on every
    /// rank, `recv` addresses room for `count` elements; all on this communicator's device and
    /// allocated until its stream has passed the group.
    pub(crate) unsafe fn grouped_broadcasts_raw<T: CommElement>(
        &self,
        pieces: &[RawPiece],
    ) -> Result<(), CommError> {
        self.usable("broadcast")?;
        if let Some(p) = pieces.iter().find(|p| p.root >= self.world) {
            return Err(self.invalid(
                "broadcast",
                format!("root {} is not a rank of a group of {}", p.root, self.world),
            ));
        }
        let mut i = 0;
        self.grouped_each(pieces.len(), "ncclBroadcast", || {
            let p = pieces[i];
            i += 1;
            let send = if p.root == self.rank {
                p.send as *const c_void
            } else {
                std::ptr::null()
            };
            // SAFETY: the caller's contract for this piece.
            unsafe {
                result::broadcast(
                    send,
                    p.recv as *mut c_void,
                    p.count,
                    T::as_nccl_type(),
                    p.root as i32,
                    self.comm,
                    self.raw_stream(),
                )
            }
        })
    }

    /// One NCCL group of `ncclReduce`s: piece `p` is reduced over every rank's `p.send` into
    /// `p.root`'s `p.recv`. Every rank passes the same roots and counts in the same order.
    ///
    /// # Safety
    /// On every rank `send` addresses `count` live elements of `T`; on the root `recv`
    /// addresses room for `count` elements; all on this communicator's device and allocated
    /// until its stream has passed the group.
    pub(crate) unsafe fn grouped_reduces_raw<T: CommElement>(
        &self,
        pieces: &[RawPiece],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.usable("reduce")?;
        if let Some(p) = pieces.iter().find(|p| p.root >= self.world) {
            return Err(self.invalid(
                "reduce",
                format!("root {} is not a rank of a group of {}", p.root, self.world),
            ));
        }
        let mut i = 0;
        self.grouped_each(pieces.len(), "ncclReduce", || {
            let p = pieces[i];
            i += 1;
            let recv = if p.root == self.rank {
                p.recv as *mut c_void
            } else {
                std::ptr::null_mut()
            };
            // SAFETY: the caller's contract for this piece.
            unsafe {
                result::reduce(
                    p.send as *const c_void,
                    recv,
                    p.count,
                    T::as_nccl_type(),
                    nccl_op(op),
                    p.root as i32,
                    self.comm,
                    self.raw_stream(),
                )
            }
        })
    }

    /// Runs `call` `n` times inside one NCCL group, closing the group even when a call fails.
    fn grouped_each(
        &self,
        n: usize,
        call: &'static str,
        mut each: impl FnMut() -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), CommError> {
        self.checked("ncclGroupStart", result::group_start())?;
        let mut first = Ok(());
        for _ in 0..n {
            let r = self.checked(call, each());
            if r.is_err() {
                first = r;
                break;
            }
        }
        let end = self.checked("ncclGroupEnd", result::group_end());
        first.and(end)
    }
}

impl Communicator for Nccl {
    type Buf<T: CommElement> = CudaSlice<T>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce<T: CommElement>(
        &self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        Nccl::all_reduce(self, buf, op)
    }

    fn reduce_scatter<T: CommElement>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        Nccl::reduce_scatter(self, input, output, op)
    }

    fn reduce_scatter_uneven<T: CommElement>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        Nccl::reduce_scatter_uneven(self, input, output, op)
    }

    fn all_gather<T: CommElement>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
    ) -> Result<(), CommError> {
        Nccl::all_gather(self, input, output)
    }

    fn all_gather_uneven<T: CommElement>(
        &self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
    ) -> Result<(), CommError> {
        Nccl::all_gather_uneven(self, input, output)
    }

    fn broadcast<T: CommElement>(
        &self,
        buf: &mut CudaSlice<T>,
        root: usize,
    ) -> Result<(), CommError> {
        Nccl::broadcast(self, buf, root)
    }

    fn barrier(&self) -> Result<(), CommError> {
        Nccl::barrier(self)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for queued work, which never finishes if a
        // peer is gone; abort always returns.
        self.abort("dropped".to_string());
    }
}
