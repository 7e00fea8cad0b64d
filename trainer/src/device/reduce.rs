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
//! # How a bucket is exchanged
//!
//! Through a [`DeviceComm`]: on simulated devices (and wherever NCCL is not used) the
//! host-staged communicator copies the bucket range of the device gradients into a host staging
//! buffer (waiting for the compute stream, which has queued every addition into that range),
//! averages the staging buffers over the ranks with an all-reduce (`ReduceOp::Avg`: an f32 sum
//! in rank order divided by the world size once — exactly the CPU path's arithmetic), and
//! copies the result back into the same range on the compute stream. There the "overlap" is in
//! the order of work (a bucket is exchanged before the earlier layers' backward is even
//! queued), not in time on the device: the copy waits for the queued kernels. On CUDA devices
//! with NCCL the bucket is averaged in place on the device, on NCCL's stream, ordered after the
//! bucket's last gradient by an event and before later compute by another: no host wait, and
//! the backward of the earlier layers runs while the bucket is exchanged (not yet run on a GPU).
//!
//! `--inject-nonfinite` on a multi-rank device run writes `+inf` into element 0 of rank 0's
//! gradients (a one-element fill on the compute stream) before that bucket's all-reduce, as the
//! CPU path writes it into rank 0's gradients before the reduction: the inf reaches every rank,
//! and every rank skips the step.
//!
//! [`Tape::set_grad_ready_hook`]: lathe_autograd::Tape::set_grad_ready_hook

use crate::zero::{DEFAULT_BUCKET_BYTES, bucket_ranges};
use anyhow::{Context, Result, anyhow, bail};
use lathe_autograd::{GradReadyHook, ParamStore};
use lathe_host::comm::{DeviceComm, ReduceOp};
use lathe_host::{DeviceBuffer, KernelArg};
use lathe_kernels::Problem;
use lathe_kernels::elementwise::FILL_F32;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Averages the gradients of device ranks over a [`DeviceComm`] group, in buckets. See the
/// module documentation.
pub struct DeviceGradReducer {
    /// The device communicator of the run: the hook runs inside the backward pass, while the
    /// trainer holds its own host endpoint of the same ranks. The device optimizer's exchanges
    /// and the ZeRO gathers go through it too ([`DeviceGradReducer::comm`]).
    comm: DeviceComm,
    len: usize,
    /// Elements per bucket (the last-listed bucket, which starts at 0, may be shorter).
    bucket_elems: usize,
    /// `bucket_ranges(len, bucket_elems)`: the last slice of the buffer first.
    buckets: Vec<Range<usize>>,
    /// Per bucket: elements whose gradient is not final yet in this pass.
    waiting: Vec<usize>,
    /// Per bucket: averaged in this pass.
    done: Vec<bool>,
    /// Whether a pass is in progress (between `begin` and `finish`).
    armed: bool,
    /// Write `+inf` into element 0 before its bucket's all-reduce (this pass only).
    inject: bool,
    /// Buckets reduced from the hook, during the backward pass, in this pass.
    in_backward: usize,
    /// The error a hook call hit (the tape only sees a summary of it).
    error: Option<anyhow::Error>,
    /// ZeRO stages 2-3: every rank's shard of the parameters (in rank order) and the buffer
    /// that receives the averaged gradients of this rank's shard (the rest of each averaged
    /// bucket is not kept).
    keep: Option<(Vec<Range<usize>>, DeviceBuffer<f32>)>,
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
    /// A host communicator (`HostComm`, `LocalComm`, `TcpComm`) gives the host-staged path.
    pub fn new(comm: impl Into<DeviceComm>, len: usize, bucket_elems: usize) -> Self {
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
            armed: false,
            inject: false,
            in_backward: 0,
            error: None,
            keep: None,
        }
    }

    /// ZeRO stages 2-3: from now on each averaged bucket's part inside this rank's shard
    /// (`shards[rank]`; `shards` lists every rank's, in rank order, tiling the buffer) goes into
    /// `buf` (`shards[rank].len()` elements, at `element - shard.start`) instead of back into
    /// the full gradient buffer.
    pub fn keep_shard(&mut self, shards: Vec<Range<usize>>, buf: DeviceBuffer<f32>) -> Result<()> {
        let rank = self.comm.rank();
        let fits = shards.len() == self.comm.world_size()
            && shards.iter().all(|s| s.start <= s.end && s.end <= self.len)
            && shards[rank].len() == buf.len();
        if !fits {
            bail!(
                "gradient reducer: shards {shards:?} with a buffer of {} elements on rank \
                 {rank} do not fit {} gradients over {} ranks",
                buf.len(),
                self.len,
                self.comm.world_size()
            );
        }
        self.keep = Some((shards, buf));
        Ok(())
    }

    /// The averaged gradients of the rank's shard ([`DeviceGradReducer::keep_shard`]).
    pub fn shard_grads_mut(&mut self) -> Option<&mut DeviceBuffer<f32>> {
        self.keep.as_mut().map(|(_, b)| b)
    }

    /// The averaged gradients of the rank's shard and the communicator, together (the
    /// optimizer of ZeRO stages 2-3 exchanges its norm over the same communicator).
    pub fn shard_grads_and_comm(&mut self) -> Option<(&mut DeviceBuffer<f32>, &DeviceComm)> {
        let comm = &self.comm;
        self.keep.as_mut().map(|(_, b)| (b, comm))
    }

    /// The device communicator (collective calls on it must keep the same order on every
    /// rank, like the reducer's own).
    pub fn comm(&self) -> &DeviceComm {
        &self.comm
    }

    /// ZeRO stage 3 (collective): `out` receives the parameters `range` of the flat buffer,
    /// whose pieces live on the ranks owning them (`shards[r]`, this rank's values in `mine`).
    /// Each owner sends its piece, in rank order; the values are copied, never combined, so
    /// every rank gets the owners' bits.
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

    /// Averages bucket `i` over the ranks: in place, or (ZeRO stages 2-3) into the shard.
    fn reduce_bucket(&mut self, grads: &mut DeviceBuffer<f32>, i: usize) -> Result<()> {
        let b = self.buckets[i].clone();
        if self.inject && b.start == 0 && !b.is_empty() {
            // Testing aid (`--inject-nonfinite`), as the CPU path: rank 0's first gradient,
            // written on the compute stream before the bucket is exchanged.
            let dev = grads.device().clone();
            let args = [
                grads.arg_range_mut(0..1)?,
                KernelArg::U64(1),
                KernelArg::F32(f32::INFINITY),
            ];
            dev.launch(&FILL_F32, &Problem::elems(1), &args, dev.compute_stream())
                .context("injecting +inf into the gradients")?;
        }
        let world = self.comm.world_size();
        match &mut self.keep {
            None => self
                .comm
                .all_reduce(grads, b.clone(), ReduceOp::Avg)
                .map_err(anyhow::Error::new)
                .with_context(|| format!("averaging gradient bucket {b:?} over {world} ranks"))?,
            Some((shards, buf)) => self
                .comm
                .reduce_to_shards(grads, b.clone(), ReduceOp::Avg, shards, buf)
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!("averaging gradient bucket {b:?} over {world} ranks into the shards")
                })?,
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
/// owns `shards[r]`; this rank's piece is `mine`): each owner of a piece of `range` sends it,
/// in rank order (collective over `comm`, [`DeviceComm::gather_range`]). Without a
/// communicator (one rank), a device copy.
pub fn gather_pieces<T>(
    comm: Option<&DeviceComm>,
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
    comm.gather_range(range.clone(), shards, mine, out)
        .map_err(anyhow::Error::new)
        .with_context(|| format!("gathering parameters {range:?} from their owners"))
}
