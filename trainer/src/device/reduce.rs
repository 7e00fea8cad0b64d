//! [`DeviceGradReducer`]: data-parallel gradient averaging for device ranks, bucket by bucket
//! while the backward pass is still running.
//!
//! # What overlaps
//!
//! The flat f32 gradient buffer is cut into the CPU path's buckets
//! ([`bucket_ranges`]: slices of [`DEFAULT_BUCKET_BYTES`], last slice first). During the step's
//! last backward pass (with `--accum K`, only the K-th pass leaves final gradients) the tape's
//! gradient-ready hook ([`Tape::set_grad_ready_hook`]) reports each parameter as soon as its
//! gradient is final — the last layers first. The reducer counts, per bucket, the elements
//! still waiting; when a bucket's count reaches zero it is averaged over the ranks at once,
//! before the backward goes on to the earlier layers. [`DeviceGradReducer::finish`] then
//! reduces whatever the hook did not complete (parameters that got no gradient in this pass,
//! and gaps between parameters), in bucket order.
//!
//! Every rank runs the same model, so the hook fires in the same order on every rank and the
//! buckets are reduced in the same order everywhere: the collective calls match without any
//! coordination.
//!
//! # Where the host staging is
//!
//! Simulated devices do not share memory and [`HostComm`] reduces host slices, so one bucket's
//! reduction is: copy the bucket range of the device gradients into a host staging buffer
//! (waiting for the compute stream, which has queued every addition into that range), average
//! the staging buffers over the ranks with an all-reduce (`ReduceOp::Avg`: an f32 sum in rank
//! order divided by the world size once — exactly the CPU path's arithmetic), and copy the
//! result back into the same range on the compute stream. On GPUs these two copies and the host
//! wait are what an NCCL all-reduce on the device buffers (on a communication stream, ordered
//! after the bucket's last gradient by an event) replaces; that path is separate work, and this
//! reducer is then the fallback. With the host staging the "overlap" is in the order of work
//! (a bucket is exchanged before the earlier layers' backward is even queued), not in time on
//! the device: the copy waits for the queued kernels.
//!
//! `--inject-nonfinite` on a multi-rank device run writes `+inf` into element 0 of rank 0's
//! staged bucket before its all-reduce, as the CPU path writes it into rank 0's gradients
//! before the reduction: the inf reaches every rank, and every rank skips the step.
//!
//! [`Tape::set_grad_ready_hook`]: lathe_autograd::Tape::set_grad_ready_hook

use crate::zero::{DEFAULT_BUCKET_BYTES, bucket_ranges};
use anyhow::{Context, Result, anyhow, bail};
use lathe_autograd::{GradReadyHook, ParamStore};
use lathe_host::DeviceBuffer;
use lathe_host::comm::{Communicator, HostComm, ReduceOp};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Averages the gradients of device ranks over a [`HostComm`] group, in buckets, through
/// host staging. See the module documentation.
pub struct DeviceGradReducer {
    /// A communicator used by this reducer only: the hook runs inside the backward pass,
    /// while the trainer holds its own endpoint of the same ranks.
    comm: HostComm,
    len: usize,
    /// Elements per bucket (the last-listed bucket, which starts at 0, may be shorter).
    bucket_elems: usize,
    /// `bucket_ranges(len, bucket_elems)`: the last slice of the buffer first.
    buckets: Vec<Range<usize>>,
    /// Per bucket: elements whose gradient is not final yet in this pass.
    waiting: Vec<usize>,
    /// Per bucket: averaged in this pass.
    done: Vec<bool>,
    /// Host staging for one bucket (f32, `bucket_elems` long).
    staging: Vec<f32>,
    /// Whether a pass is in progress (between `begin` and `finish`).
    armed: bool,
    /// Write `+inf` into element 0 before its bucket's all-reduce (this pass only).
    inject: bool,
    /// Buckets reduced from the hook, during the backward pass, in this pass.
    in_backward: usize,
    /// The error a hook call hit (the tape only sees a summary of it).
    error: Option<anyhow::Error>,
    /// ZeRO stages 2-3: the rank's shard of the parameters and the buffer that receives the
    /// averaged gradients of that shard (the rest of each averaged bucket is not copied back).
    keep: Option<(Range<usize>, DeviceBuffer<f32>)>,
}

/// What one pass of a [`DeviceGradReducer`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReduceStats {
    /// Buckets averaged from the gradient-ready hook while the backward pass ran.
    pub in_backward: usize,
    /// Buckets averaged by [`DeviceGradReducer::finish`], after the backward pass.
    pub after_backward: usize,
}

impl std::fmt::Debug for DeviceGradReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGradReducer")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .field("len", &self.len)
            .field("buckets", &self.buckets.len())
            .finish_non_exhaustive()
    }
}

/// A reducer shared by the trainer and the hook it installs on the tape.
pub type SharedReducer = Arc<Mutex<DeviceGradReducer>>;

impl DeviceGradReducer {
    /// The CPU path's bucket size, in f32 elements.
    pub const DEFAULT_BUCKET_ELEMS: usize = DEFAULT_BUCKET_BYTES / std::mem::size_of::<f32>();

    /// A reducer for a flat gradient buffer of `len` f32 elements, `bucket_elems` per bucket
    /// (0: one bucket). Every rank of `comm`'s group must build it with the same arguments.
    pub fn new(comm: impl Into<HostComm>, len: usize, bucket_elems: usize) -> Self {
        let comm = comm.into();
        let buckets = bucket_ranges(len, bucket_elems);
        let bucket_elems = buckets.first().map_or(0, |b| b.len());
        DeviceGradReducer {
            comm,
            len,
            bucket_elems,
            waiting: buckets.iter().map(|b| b.len()).collect(),
            done: vec![true; buckets.len()],
            buckets,
            staging: vec![0.0; bucket_elems],
            armed: false,
            inject: false,
            in_backward: 0,
            error: None,
            keep: None,
        }
    }

    /// ZeRO stages 2-3: from now on each averaged bucket's part inside `shard` goes into
    /// `buf` (`shard.len()` elements, at `element - shard.start`) instead of back into the
    /// full gradient buffer.
    pub fn keep_shard(&mut self, shard: Range<usize>, buf: DeviceBuffer<f32>) -> Result<()> {
        if shard.end > self.len || shard.len() != buf.len() {
            bail!(
                "gradient reducer: shard {shard:?} with a buffer of {} elements does not fit \
                 {} gradients",
                buf.len(),
                self.len
            );
        }
        self.keep = Some((shard, buf));
        Ok(())
    }

    /// The averaged gradients of the rank's shard ([`DeviceGradReducer::keep_shard`]).
    pub fn shard_grads_mut(&mut self) -> Option<&mut DeviceBuffer<f32>> {
        self.keep.as_mut().map(|(_, b)| b)
    }

    /// ZeRO stage 3 (collective): `out` receives the parameters `range` of the flat buffer,
    /// whose pieces live on the ranks owning them (`shards[r]`, this rank's values in `mine`).
    /// Each owner broadcasts its piece through host memory, in rank order; the values are
    /// copied, never combined, so every rank gets the owners' bits.
    pub fn gather_range<T>(
        &self,
        range: Range<usize>,
        shards: &[Range<usize>],
        mine: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()>
    where
        T: lathe_host::comm::CommElement + lathe_host::DeviceElem,
    {
        gather_pieces(Some(&self.comm), range, shards, mine, out)
    }

    /// Wraps the reducer for sharing with a tape hook.
    pub fn shared(self) -> SharedReducer {
        Arc::new(Mutex::new(self))
    }

    /// The buckets, in the order a full pass reduces them when parameters finish last first.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Starts a pass: every bucket waits for all of its elements. `inject`: write `+inf` into
    /// element 0 before reducing its bucket (`--inject-nonfinite`, rank 0).
    pub fn begin(&mut self, inject: bool) {
        for (w, b) in self.waiting.iter_mut().zip(&self.buckets) {
            *w = b.len();
        }
        self.done.iter_mut().for_each(|d| *d = false);
        self.armed = true;
        self.inject = inject;
        self.in_backward = 0;
        self.error = None;
    }

    /// Index in `buckets` of the bucket holding element `e` (`e < len`).
    fn bucket_of(&self, e: usize) -> usize {
        (self.len - 1 - e) / self.bucket_elems
    }

    /// The gradients of `range` are final: count them off their buckets and average every
    /// bucket that is now complete (collective, in bucket order).
    pub fn ready(&mut self, grads: &mut DeviceBuffer<f32>, range: Range<usize>) -> Result<()> {
        if !self.armed {
            bail!("gradient reducer: a gradient was reported outside a reduction pass");
        }
        if range.end > self.len || range.start > range.end {
            bail!(
                "gradient reducer: parameter range {range:?} is outside the {} gradients",
                self.len
            );
        }
        if range.is_empty() {
            return Ok(());
        }
        // Buckets are listed last slice first, so the range's last element is in the lowest
        // index.
        let (first, last) = (self.bucket_of(range.end - 1), self.bucket_of(range.start));
        for i in first..=last {
            let b = &self.buckets[i];
            let overlap = range.end.min(b.end) - range.start.max(b.start);
            if self.done[i] || overlap > self.waiting[i] {
                bail!(
                    "gradient reducer: the gradient of {range:?} was reported after its bucket \
                     {b:?} was complete (a parameter reported twice?)"
                );
            }
            self.waiting[i] -= overlap;
            if self.waiting[i] == 0 {
                self.reduce_bucket(grads, i)?;
                self.in_backward += 1;
            }
        }
        Ok(())
    }

    /// Ends a pass: averages every bucket the hook did not complete, in bucket order.
    pub fn finish(&mut self, grads: &mut DeviceBuffer<f32>) -> Result<ReduceStats> {
        if !self.armed {
            bail!("gradient reducer: finish without begin");
        }
        if grads.len() != self.len {
            bail!(
                "gradient reducer: built for {} gradients, given {}",
                self.len,
                grads.len()
            );
        }
        let mut after = 0;
        for i in 0..self.buckets.len() {
            if !self.done[i] {
                self.reduce_bucket(grads, i)?;
                after += 1;
            }
        }
        self.armed = false;
        Ok(ReduceStats {
            in_backward: self.in_backward,
            after_backward: after,
        })
    }

    /// Device -> host staging -> all-reduce (average) -> device, for bucket `i`.
    fn reduce_bucket(&mut self, grads: &mut DeviceBuffer<f32>, i: usize) -> Result<()> {
        let b = self.buckets[i].clone();
        let stage = &mut self.staging[..b.len()];
        grads
            .copy_to_host_at(b.start, stage)
            .with_context(|| format!("copying gradient bucket {b:?} to the host"))?;
        if self.inject && b.start == 0 && !stage.is_empty() {
            // Testing aid (`--inject-nonfinite`), as the CPU path: rank 0's first gradient.
            stage[0] = f32::INFINITY;
        }
        self.comm
            .all_reduce(stage, ReduceOp::Avg)
            .map_err(anyhow::Error::new)
            .with_context(|| {
                format!(
                    "averaging gradient bucket {b:?} over {} ranks",
                    self.comm.world_size()
                )
            })?;
        match &mut self.keep {
            None => grads
                .copy_from_host_at(b.start, stage)
                .with_context(|| format!("copying averaged gradient bucket {b:?} to the device"))?,
            Some((shard, buf)) => {
                let (lo, hi) = (b.start.max(shard.start), b.end.min(shard.end));
                if lo < hi {
                    buf.copy_from_host_at(lo - shard.start, &stage[lo - b.start..hi - b.start])
                        .with_context(|| {
                            format!("copying the averaged gradients {lo}..{hi} to the shard")
                        })?;
                }
            }
        }
        self.done[i] = true;
        Ok(())
    }

    /// Takes the error the last hook call failed with, if any (with its full context; the
    /// tape's error only carries its message).
    pub fn take_error(&mut self) -> Option<anyhow::Error> {
        self.error.take()
    }
}

/// Locks a shared reducer (a poisoned lock means a hook panicked: an error, not a panic here).
pub fn lock_reducer(r: &SharedReducer) -> Result<MutexGuard<'_, DeviceGradReducer>> {
    r.lock()
        .map_err(|_| anyhow!("gradient reducer: a previous gradient-ready hook panicked"))
}

/// The gradient-ready hook that feeds `reducer` from a device tape's backward pass.
pub fn grad_ready_hook(reducer: &SharedReducer) -> GradReadyHook<f32> {
    let r = Arc::clone(reducer);
    Box::new(move |store: &mut ParamStore, range: Range<usize>| {
        let fail = |msg: String| lathe_autograd::Error::Backward(msg);
        let mut red = r
            .lock()
            .map_err(|_| fail("gradient reducer: lock poisoned".into()))?;
        let Some(dp) = store.device_mut() else {
            return Err(fail(
                "gradient reducer: the parameter store is not on a device".into(),
            ));
        };
        let (_, grads, _) = dp.parts_mut();
        red.ready(grads, range).map_err(|e| {
            let msg = format!("{e:#}");
            red.error = Some(e);
            fail(msg)
        })
    })
}

/// `out` = the parameters `range` of a flat buffer split over the ranks as `shards` (rank `r`
/// owns `shards[r]`; this rank's piece is `mine`): each owner of a piece of `range`
/// broadcasts it, in rank order (collective over `comm`). Without a communicator (one rank),
/// a device copy.
pub fn gather_pieces<T>(
    comm: Option<&HostComm>,
    range: Range<usize>,
    shards: &[Range<usize>],
    mine: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> Result<()>
where
    T: lathe_host::comm::CommElement + lathe_host::DeviceElem,
{
    let rank = comm.map_or(0, |c| c.rank());
    let own = shards
        .get(rank)
        .cloned()
        .ok_or_else(|| anyhow!("gathering parameters: no shard for rank {rank}"))?;
    if out.len() != range.len() || mine.len() != own.len() {
        bail!(
            "gathering parameters {range:?}: the output holds {} elements, this rank's shard \
             {own:?} {}",
            out.len(),
            mine.len()
        );
    }
    let Some(comm) = comm.filter(|c| c.world_size() > 1) else {
        return mine
            .device()
            .copy_2d(
                mine,
                range.start - own.start,
                range.len(),
                out,
                0,
                range.len(),
                1,
                range.len(),
            )
            .context("copying the parameters out of the shard");
    };
    let mut host = vec![T::default(); range.len()];
    for (r, s) in shards.iter().enumerate() {
        let (lo, hi) = (range.start.max(s.start), range.end.min(s.end));
        if lo >= hi {
            continue;
        }
        let piece = &mut host[lo - range.start..hi - range.start];
        if r == rank {
            mine.copy_to_host_at(lo - own.start, piece)
                .context("copying this rank's parameters to the host")?;
        }
        comm.broadcast(piece, r)
            .map_err(anyhow::Error::new)
            .with_context(|| format!("broadcasting parameters {lo}..{hi} from rank {r}"))?;
    }
    out.copy_from_host(&host)
        .context("copying the gathered parameters to the device")
}
