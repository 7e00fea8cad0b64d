//! `LocalGroup`: N ranks as threads of one process, collectives on host buffers.
//!
//! # Protocol
//!
//! The group shares one slot per rank. A collective runs in two phases under one mutex and one
//! condition variable:
//!
//! 1. *Gather.* Each rank checks its own arguments, then publishes a description of the call and
//!    the addresses of its buffers in its slot. The last rank to arrive checks that all ranks
//!    called the same collective (kind, dtype, total length, reduction, root) and opens the work
//!    phase. A rank that waits longer than its timeout withdraws its slot, marks the group broken
//!    and returns [`CommError::Timeout`]; the ranks still waiting see the mark and return
//!    [`CommError::GroupBroken`].
//! 2. *Work.* Each rank copies the published addresses and does its share without holding the
//!    lock: in an all-reduce rank `r` reduces the elements `shard_range(len, world, r)` of every
//!    rank's buffer and writes the result into every rank's buffer; in a reduce-scatter it
//!    reduces its own shard; in an all-gather and a broadcast it pulls into its own output.
//!    Shares never overlap. A rank leaves only when every rank has finished its share, so no
//!    buffer is read or written after its owner returns — even when a rank panics mid-way (a
//!    guard counts it out) — and this wait needs no timeout because the work never blocks.
//!
//! # Determinism
//!
//! Every element is reduced by [`CommElement::reduce`] over the ranks in rank order, whichever
//! thread does it and however the threads are scheduled, so results are identical run to run.
//!
//! # Failure
//!
//! A timeout, a mismatched or invalid call, a panic during the work, or dropping an endpoint
//! while its peers may still call collectives marks the group broken; every later collective on
//! any endpoint of the group returns [`CommError::GroupBroken`] at once with the first reason.

use std::any::TypeId;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{CommElement, CommError, Communicator, ReduceOp, shard_range};

/// Elements one rank reduces per block: small enough that the block of every rank stays in cache.
const BLOCK: usize = 8192;

/// Builds the endpoints of a group of ranks that are threads of one process.
pub struct LocalGroup;

impl LocalGroup {
    /// How long a collective waits for its peers before failing, unless set otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// One endpoint per rank, in rank order (`world == 0` gives none). Move each into the thread
    /// that plays that rank. Collectives wait at most [`LocalGroup::DEFAULT_TIMEOUT`].
    // A group is only ever held through its endpoints, so the constructor hands those out.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<LocalComm> {
        Self::with_timeout(world, Self::DEFAULT_TIMEOUT)
    }

    /// Like [`LocalGroup::new`] with another timeout for every endpoint.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                generation: 0,
                slots: vec![None; world],
                arrived: 0,
                working: false,
                pending: 0,
                broken: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalComm {
                rank,
                timeout,
                shared: Arc::clone(&shared),
                _not_sync: PhantomData,
            })
            .collect()
    }
}

/// One rank's endpoint of a [`LocalGroup`]. `Send` (move it to its thread) but not `Sync`: a rank
/// runs one collective at a time.
///
/// Dropping an endpoint tells its peers that this rank has left: their next collective fails
/// with [`CommError::GroupBroken`] instead of waiting for the timeout.
pub struct LocalComm {
    rank: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("world", &self.shared.world)
            .field("timeout", &self.timeout)
            .finish()
    }
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// Number of collectives completed by the group.
    generation: u64,
    /// What each rank published for the collective being gathered.
    slots: Vec<Option<Slot>>,
    arrived: usize,
    /// All ranks have arrived; the work phase of `generation` is running.
    working: bool,
    /// Ranks that have not finished their share of the work phase.
    pending: usize,
    broken: Option<Broken>,
}

struct Broken {
    /// The collective in which the group broke; ranks that finished it earlier are unaffected.
    generation: u64,
    reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

/// What must agree across ranks for one collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Signature {
    kind: Kind,
    dtype: TypeId,
    dtype_name: &'static str,
    /// All-reduce, broadcast: the buffer length. Reduce-scatter: the input length.
    /// All-gather: the output length.
    total: usize,
    op: Option<ReduceOp>,
    root: usize,
}

impl Signature {
    fn new<T: CommElement>(kind: Kind, total: usize, op: Option<ReduceOp>, root: usize) -> Self {
        Signature {
            kind,
            dtype: TypeId::of::<T>(),
            dtype_name: T::DTYPE,
            total,
            op,
            root,
        }
    }

    fn barrier() -> Self {
        Signature {
            kind: Kind::Barrier,
            dtype: TypeId::of::<()>(),
            dtype_name: "none",
            total: 0,
            op: None,
            root: 0,
        }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} {} len {}",
            self.kind.name(),
            self.dtype_name,
            self.total
        );
        if let Some(op) = self.op {
            s.push_str(&format!(" op {op}"));
        }
        if self.kind == Kind::Broadcast {
            s.push_str(&format!(" root {}", self.root));
        }
        s
    }
}

/// A buffer address published to the peers.
#[derive(Clone, Copy)]
struct RawPtr(*mut u8);

// SAFETY: a `RawPtr` is dereferenced only by ranks in the work phase of the collective that
// published it, while the publishing rank is blocked inside that same collective holding the
// borrow the address came from (see the module documentation), so handing the address to
// another thread cannot outlive or race with its owner.
unsafe impl Send for RawPtr {}

#[derive(Clone, Copy)]
struct Slot {
    sig: Signature,
    input: RawPtr,
    output: RawPtr,
}

/// Shared view of `len` elements of `T` at element offset `start` of a published buffer.
///
/// # Safety
/// `p` must point to a live buffer of `T` with at least `start + len` elements that nobody
/// writes while the returned slice is used.
unsafe fn view<'a, T>(p: RawPtr, start: usize, len: usize) -> &'a [T] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts((p.0 as *const T).add(start), len) }
}

/// Exclusive view of `len` elements of `T` at element offset `start` of a published buffer.
///
/// # Safety
/// `p` must point to a live buffer of `T` with at least `start + len` elements that nobody else
/// reads or writes while the returned slice is used.
unsafe fn view_mut<'a, T>(p: RawPtr, start: usize, len: usize) -> &'a mut [T] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut((p.0 as *mut T).add(start), len) }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic, so a poisoned state is consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_for<'a>(&self, guard: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.cv
            .wait_timeout(guard, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// Counts a rank out of the work phase when dropped (also while unwinding from a panic), then
/// waits until every rank is counted out, so the rank's buffers outlive every peer's access.
struct WorkGuard<'a> {
    comm: &'a LocalComm,
    generation: u64,
    op: &'static str,
}

impl Drop for WorkGuard<'_> {
    fn drop(&mut self) {
        let shared = &self.comm.shared;
        let mut st = shared.lock();
        if std::thread::panicking() && st.broken.is_none() {
            st.broken = Some(Broken {
                generation: self.generation,
                reason: format!("rank {} panicked during {}", self.comm.rank, self.op),
            });
        }
        st.pending = st.pending.saturating_sub(1);
        if st.pending == 0 {
            st.working = false;
            st.generation += 1;
            st.slots.fill(None);
            st.arrived = 0;
            shared.cv.notify_all();
        }
        while st.generation == self.generation {
            st = shared.wait(st);
        }
    }
}

impl LocalComm {
    /// How long a collective of this endpoint waits for its peers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets how long this endpoint's collectives wait for their peers.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn broken_error(&self, op: &str, b: &Broken) -> CommError {
        CommError::GroupBroken {
            rank: self.rank,
            op: op.to_string(),
            reason: b.reason.clone(),
        }
    }

    /// Reports an argument error of this rank and breaks the group, so that the peers fail now
    /// instead of waiting for a collective this rank will not join.
    fn invalid(&self, op: &'static str, detail: String) -> CommError {
        let mut st = self.shared.lock();
        if st.broken.is_none() {
            let generation = st.generation;
            st.broken = Some(Broken {
                generation,
                reason: format!(
                    "rank {} called {op} with invalid arguments: {detail}",
                    self.rank
                ),
            });
        }
        self.shared.cv.notify_all();
        CommError::InvalidArgument {
            rank: self.rank,
            op: op.to_string(),
            detail,
        }
    }

    /// Runs one collective: gather, then `work` on the slots of all ranks in rank order.
    fn collective(&self, slot: Slot, work: impl FnOnce(&[Slot])) -> Result<(), CommError> {
        let shared = &*self.shared;
        let world = shared.world;
        let op = slot.sig.kind.name();
        let started = Instant::now();
        let deadline = started.checked_add(self.timeout);

        let mut st = shared.lock();
        if let Some(b) = &st.broken {
            return Err(self.broken_error(op, b));
        }
        if st.slots[self.rank].is_some() {
            // Unreachable through the public API (an endpoint is not `Sync`); kept as a check.
            return Err(CommError::InvalidArgument {
                rank: self.rank,
                op: op.to_string(),
                detail: "this rank already has a collective in flight".to_string(),
            });
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(slot);
        st.arrived += 1;

        if st.arrived == world {
            let sigs: Vec<Signature> = st.slots.iter().flatten().map(|s| s.sig).collect();
            if sigs.iter().any(|s| *s != sigs[0]) {
                let detail = sigs
                    .iter()
                    .enumerate()
                    .map(|(r, s)| format!("rank {r}: {}", s.describe()))
                    .collect::<Vec<_>>()
                    .join("; ");
                st.broken = Some(Broken {
                    generation,
                    reason: format!("mismatched collectives ({detail})"),
                });
                shared.cv.notify_all();
                return Err(CommError::Mismatch {
                    rank: self.rank,
                    op: op.to_string(),
                    detail,
                });
            }
            st.working = true;
            st.pending = world;
            shared.cv.notify_all();
        } else {
            loop {
                if st.working && st.generation == generation {
                    break;
                }
                if let Some(b) = &st.broken {
                    let err = self.broken_error(op, b);
                    st.slots[self.rank] = None;
                    st.arrived -= 1;
                    return Err(err);
                }
                let now = Instant::now();
                match deadline {
                    Some(d) if now >= d => {
                        let missing: Vec<usize> =
                            (0..world).filter(|&r| st.slots[r].is_none()).collect();
                        st.slots[self.rank] = None;
                        st.arrived -= 1;
                        st.broken = Some(Broken {
                            generation,
                            reason: format!(
                                "rank {} timed out in {op} after {:?} waiting for ranks {missing:?}",
                                self.rank, self.timeout
                            ),
                        });
                        shared.cv.notify_all();
                        return Err(CommError::Timeout {
                            rank: self.rank,
                            op: op.to_string(),
                            waited: now - started,
                            missing,
                        });
                    }
                    Some(d) => st = shared.wait_for(st, d - now),
                    None => st = shared.wait(st),
                }
            }
        }

        let slots: Vec<Slot> = st.slots.iter().flatten().copied().collect();
        drop(st);
        {
            let _guard = WorkGuard {
                comm: self,
                generation,
                op,
            };
            if slots.len() == world {
                work(&slots);
            }
        }

        let st = shared.lock();
        match &st.broken {
            Some(b) if b.generation <= generation => Err(self.broken_error(op, b)),
            _ => Ok(()),
        }
    }

    fn reduce_scatter_impl<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
        even: bool,
    ) -> Result<(), CommError> {
        let world = self.shared.world;
        let total = input.len();
        let name = if even {
            "reduce_scatter"
        } else {
            "reduce_scatter_uneven"
        };
        if even && (!total.is_multiple_of(world) || output.len() * world != total) {
            return Err(self.invalid(
                name,
                format!(
                    "input has {total} elements, output {}; reduce_scatter needs input = \
                     world size ({world}) x output (use reduce_scatter_uneven for lengths not \
                     divisible by the world size)",
                    output.len()
                ),
            ));
        }
        let mine = shard_range(total, world, self.rank);
        if output.len() != mine.len() {
            return Err(self.invalid(
                name,
                format!(
                    "output has {} elements but rank {}'s shard of {total} is {mine:?} ({} elements)",
                    output.len(),
                    self.rank,
                    mine.len()
                ),
            ));
        }
        let slot = Slot {
            sig: Signature::new::<T>(Kind::ReduceScatter, total, Some(op), 0),
            input: RawPtr(input.as_ptr() as *mut u8),
            output: RawPtr(output.as_mut_ptr() as *mut u8),
        };
        let me = self.rank;
        self.collective(slot, |slots| {
            let mut ins: Vec<&[T]> = Vec::with_capacity(slots.len());
            let mut off = 0;
            while off < mine.len() {
                let len = (mine.len() - off).min(BLOCK);
                ins.clear();
                for s in slots {
                    // SAFETY: every rank's input holds `total` elements and is only read during
                    // this collective; `mine` lies inside `0..total`.
                    ins.push(unsafe { view::<T>(s.input, mine.start + off, len) });
                }
                // SAFETY: this rank's output holds `mine.len()` elements; only this rank touches
                // it during the collective, and it never aliases an input (`&` vs `&mut`).
                let out = unsafe { view_mut::<T>(slots[me].output, off, len) };
                T::reduce(&ins, op, out);
                off += len;
            }
        })
    }

    fn all_gather_impl<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        even: bool,
    ) -> Result<(), CommError> {
        let world = self.shared.world;
        let total = output.len();
        let name = if even {
            "all_gather"
        } else {
            "all_gather_uneven"
        };
        if even && input.len() * world != total {
            return Err(self.invalid(
                name,
                format!(
                    "input has {} elements, output {total}; all_gather needs output = world \
                     size ({world}) x input (use all_gather_uneven for lengths not divisible by \
                     the world size)",
                    input.len()
                ),
            ));
        }
        let mine = shard_range(total, world, self.rank);
        if input.len() != mine.len() {
            return Err(self.invalid(
                name,
                format!(
                    "input has {} elements but rank {}'s shard of {total} is {mine:?} ({} elements)",
                    input.len(),
                    self.rank,
                    mine.len()
                ),
            ));
        }
        let slot = Slot {
            sig: Signature::new::<T>(Kind::AllGather, total, None, 0),
            input: RawPtr(input.as_ptr() as *mut u8),
            output: RawPtr(output.as_mut_ptr() as *mut u8),
        };
        let me = self.rank;
        self.collective(slot, |slots| {
            for (r, s) in slots.iter().enumerate() {
                let range = shard_range(total, world, r);
                // SAFETY: rank r's input holds exactly `range.len()` elements (checked by rank r
                // before publishing) and is only read during the collective.
                let src = unsafe { view::<T>(s.input, 0, range.len()) };
                // SAFETY: this rank's output holds `total` elements, only this rank writes it,
                // and it never aliases an input.
                let dst = unsafe { view_mut::<T>(slots[me].output, range.start, range.len()) };
                dst.copy_from_slice(src);
            }
        })
    }
}

impl Communicator for LocalComm {
    type Buf<T: CommElement> = [T];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce<T: CommElement>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let world = self.shared.world;
        let total = buf.len();
        let ptr = RawPtr(buf.as_mut_ptr() as *mut u8);
        let slot = Slot {
            sig: Signature::new::<T>(Kind::AllReduce, total, Some(op), 0),
            input: ptr,
            output: ptr,
        };
        let chunk = shard_range(total, world, self.rank);
        self.collective(slot, |slots| {
            if world == 1 {
                // Sum, average and maximum over one rank are the identity.
                return;
            }
            let mut scratch = vec![T::default(); chunk.len().min(BLOCK)];
            let mut ins: Vec<&[T]> = Vec::with_capacity(world);
            let mut start = chunk.start;
            while start < chunk.end {
                let len = (chunk.end - start).min(BLOCK);
                ins.clear();
                for s in slots {
                    // SAFETY: every buffer holds `total` elements; during the work phase the
                    // elements of `chunk` are touched by this rank only, and these shared views
                    // are dead before the exclusive ones below are made.
                    ins.push(unsafe { view::<T>(s.input, start, len) });
                }
                T::reduce(&ins, op, &mut scratch[..len]);
                ins.clear();
                for s in slots {
                    // SAFETY: as above; no view of this range is alive.
                    let out = unsafe { view_mut::<T>(s.output, start, len) };
                    out.copy_from_slice(&scratch[..len]);
                }
                start += len;
            }
        })
    }

    fn reduce_scatter<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.reduce_scatter_impl(input, output, op, true)
    }

    fn reduce_scatter_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        self.reduce_scatter_impl(input, output, op, false)
    }

    fn all_gather<T: CommElement>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        self.all_gather_impl(input, output, true)
    }

    fn all_gather_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), CommError> {
        self.all_gather_impl(input, output, false)
    }

    fn broadcast<T: CommElement>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let world = self.shared.world;
        if root >= world {
            return Err(self.invalid(
                "broadcast",
                format!("root {root} is not a rank of a group of {world}"),
            ));
        }
        let total = buf.len();
        let ptr = RawPtr(buf.as_mut_ptr() as *mut u8);
        let slot = Slot {
            sig: Signature::new::<T>(Kind::Broadcast, total, None, root),
            input: ptr,
            output: ptr,
        };
        let me = self.rank;
        self.collective(slot, |slots| {
            if me == root {
                return;
            }
            // SAFETY: the root's buffer holds `total` elements and only peers read it during
            // the collective; this rank's buffer is a different allocation written only here.
            let src = unsafe { view::<T>(slots[root].output, 0, total) };
            // SAFETY: see above.
            let dst = unsafe { view_mut::<T>(slots[me].output, 0, total) };
            dst.copy_from_slice(src);
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let null = RawPtr(std::ptr::null_mut());
        let slot = Slot {
            sig: Signature::barrier(),
            input: null,
            output: null,
        };
        self.collective(slot, |_| {})
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.broken.is_none() {
            let how = if std::thread::panicking() {
                "panicked and dropped its endpoint"
            } else {
                "dropped its endpoint"
            };
            let generation = st.generation;
            st.broken = Some(Broken {
                generation,
                reason: format!("rank {} {how}", self.rank),
            });
        }
        self.shared.cv.notify_all();
    }
}
