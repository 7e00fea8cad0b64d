//! One optimizer step on a device (a GPU, or the simulated device), without host
//! synchronisation.
//!
//! Per micro-batch: the loader's batch goes up through pinned memory on the copy stream
//! ([`DeviceBatch`]); the tape reads it there ([`Tape::bind_ids`]); forward and backward launch
//! Lathe's kernels on the compute stream, the backward seeded on the device with the step
//! state's loss scale divided by `accum` ([`Tape::backward_scaled`]); the micro-batch's loss is
//! added into a device scalar. Then [`DeviceOptimizer::step`] queues the non-finite check with
//! unscale and global norm, the clip factor, the fused AdamW (which skips itself on the device
//! when a non-finite value was found), the loss-scale update and the zeroing of the gradients.
//! Finally [`StepReadback`] queues an asynchronous copy of the step state and the loss into
//! pinned memory behind an event.
//!
//! The host learns the loss, scale, skip and norm of step `k` while step `k + 1` is queued: the
//! step returns the record of the previous step. At evaluations, checkpoints and the last step
//! the records are drained (the host waits there anyway, to read weights).
//!
//! With `--world N` (ZeRO stage 0, plain data parallel) each rank runs the above on its own
//! device with the full parameters and the full optimizer. Before the step's last backward
//! pass the trainer installs the [`DeviceGradReducer`]'s gradient-ready hook: buckets of
//! gradients are averaged over the ranks as the backward finishes them (last layers first),
//! and the rest right after it. The optimizer then sees identical averaged gradients on every
//! rank, so every rank takes (or skips) the same step and keeps the same weights. The logged
//! loss is the mean over the ranks; records are produced at the same steps on every rank, so
//! that mean is a collective every rank makes in the same order.
//!
//! ZeRO stage 1 (`--zero 1`) on devices: the gradients are averaged in full as in stage 0;
//! each rank's [`DeviceOptimizer`] holds the master weights and moments of its shard
//! (`shard_range(len, N, rank)`) only, and in bf16 / f16 the workspace's full f32 master is
//! freed on the device (the forward reads the working copy). The non-finite check and the norm run over the full
//! averaged gradients (the same on every rank, so the skip and clip decisions are stage 0's),
//! AdamW updates the shard at its global offset (decay ranges and stochastic rounding follow
//! global indices), and the updated working-copy shards (fp32: the master shards) are
//! all-gathered into every rank's full working copy — the elementwise update of stage 0, so
//! stage 1 takes stage 0's steps bit for bit. The all-gather runs over the run's
//! [`DeviceComm`]: through host memory on the host-staged communicator (one host wait per
//! step), on the device buffers over NCCL on GPUs.
//!
//! Every device collective of a multi-rank run (gradient buckets, norm exchange, the gathers
//! of stages 1-3) goes through one [`DeviceComm`], held by the [`DeviceGradReducer`]: host
//! staging on simulated devices (and wherever NCCL is not used), NCCL on CUDA devices when
//! the ranks agreed on it (`--comm`, `LATHE_COMM`; see `comm_choice`). With NCCL, the host
//! waits for step reports and checkpoints through the communicator, bounded by its timeout.
//!
//! ZeRO stage 2 (`--zero 2`) on devices: as stage 1, except that the gradient reducer keeps,
//! of each averaged bucket, only the part inside the rank's shard (in a shard-sized buffer),
//! and the non-finite check and norm run over that shard on each rank: the ranks exchange
//! their per-block norm partials (and non-finite flags) over the device communicator, and every
//! rank finishes the same norm. The norm is summed shard by shard in every stage with several
//! ranks, so stages 0, 1 and 2 take the same steps bit for bit. The tape still accumulates
//! the backward into a full-size f32 gradient buffer, so on a device stage 2 holds what
//! stage 1 holds; what it changes is what is reduced and read.
//!
//! ZeRO stage 3 (`--zero 3`) on devices: stage 2, and no rank keeps the full parameters. The
//! workspace store goes to the device sharded ([`ParamStore::to_device_sharded`]): its
//! gather hook fills a tape's parameter leaf from the owners' shards (a broadcast per owner
//! over the device communicator) the first time the forward uses the parameter, so parameters arrive
//! as the forward reaches their block. After the update each rank keeps its shard; nothing
//! is all-gathered. With `--recompute block` a block's parameters are dropped with its
//! activations after its forward and gathered again (only those a gradient reads) when the
//! backward recomputes it, so a rank holds the parameters outside the blocks plus about one
//! block's at a time; without it the gathered leaves stay on the tape until the step ends.
//! Evaluation gathers the weights to rank 0 and runs there on a temporary full copy.
//!
//! `--offload-optimizer` (any stage): the rank's master weights and optimizer state stay in
//! host memory, in the host model's `HostOptimizer`, and the [`DeviceOptimizer`] keeps only
//! the step state ([`DeviceOptimizer::offloaded`]). The step queues the same check, norm,
//! clip factor and loss-scale update, with the fused AdamW replaced by a copy of the rank's
//! gradients (the full buffer in stage 0, the shard otherwise) into pinned host memory; the
//! host then reads the step state back (one wait per step, after the collectives), updates on
//! the host with the device's `1/scale` and clip factor ([`OffloadStaging::update`]) and
//! copies the new working copy (fp32: the weights) of its range back on the compute stream,
//! before the gathers of stages 1-2. The device holds no master weights (fp32: only those
//! the forward reads) and no moments.
//!
//! [`ParamStore::to_device_sharded`]: lathe_autograd::ParamStore::to_device_sharded
//!
//! [`Tape::bind_ids`]: lathe_autograd::Tape::bind_ids
//! [`Tape::backward_scaled`]: lathe_autograd::Tape::backward_scaled

mod setup;

use super::Trainer;
use crate::device::{
    DeviceBatch, DeviceOptimizer, OffloadGrads, OffloadStaging, SharedReducer, StepReadback,
    StepReport, WeightsMut, gather_pieces, grad_ready_hook, lock_reducer,
};
use crate::metrics::StepRecord;
use crate::optim::Rounding;
use crate::profiler::Phase;
use crate::zero::mean_over_ranks;
use anyhow::{Context, Result, anyhow, bail};
use lathe_autograd::{DType, DevBuf, ParamStore, WorkingMut};
use lathe_host::Device;
use lathe_host::DeviceBuffer;
use lathe_host::comm::{CommElement, DeviceComm, shard_range};
use lathe_host::nn_ops::WorkingCopyMut;
use lathe_kernels::nn::amp::StepState;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// What a device run holds besides the parameters (which live in the workspace store's
/// device buffers).
pub(super) struct DeviceRun {
    pub dev: Device,
    pub opt: DeviceOptimizer,
    readback: StepReadback,
    batch: DeviceBatch,
    /// The step's summed micro-batch losses (one f32).
    loss_sum: DevBuf,
    /// Host-side facts of the steps queued but not yet reported, oldest first.
    queued: VecDeque<Queued>,
    /// The loss scale after the last reported step.
    scale: f32,
    /// Averages the gradients over the ranks (`--world N`; `None` with one rank).
    reducer: Option<SharedReducer>,
    /// ZeRO stages 1-3: this rank's shard of the optimizer's state (`None` in stage 0).
    shard: Option<DeviceShard>,
    /// `--offload-optimizer`: the pinned staging of the host's update (the state itself is
    /// the host model's `HostOptimizer`).
    offload: Option<OffloadStaging>,
}

/// What a rank holds for its shard in ZeRO stages 1-3 (besides the moments, which are in the
/// [`DeviceOptimizer`]).
struct DeviceShard {
    /// The rank's global range of the flat parameter buffers.
    range: Range<usize>,
    /// The shard's master weights and working copy (shared with stage 3's gather hook).
    params: Arc<Mutex<ShardParams>>,
    /// The shard of the averaged gradients, copied out of the full gradient buffer (stage 1,
    /// and stages 2-3 with one rank; with several, the reducer holds it).
    grads: Option<DeviceBuffer<f32>>,
    /// Whether the full working copy is all-gathered after each update (stages 1-2).
    gather_after_step: bool,
    /// Whether each rank holds only its shard's gradients and the ranks exchange the norm
    /// (stages 2-3).
    own_grads: bool,
}

/// A rank's shard of the parameters on its device.
struct ShardParams {
    /// fp32 master weights of the shard (the optimizer updates these; in fp32 also the
    /// working copy). `None` when the optimizer is offloaded in bf16 / f16: the host holds
    /// the master.
    master: Option<DeviceBuffer<f32>>,
    /// The shard's bf16 / f16 working copy (`None` in fp32: the master shard is the working
    /// copy).
    working: Option<DevBuf>,
}

fn lock_shard(p: &Mutex<ShardParams>) -> Result<MutexGuard<'_, ShardParams>> {
    p.lock()
        .map_err(|_| anyhow!("the parameter shard's lock was poisoned by a panic"))
}

/// The ranks' shards of `len` parameters, in rank order.
fn all_shards(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| shard_range(len, world, r)).collect()
}

/// Every rank's `shard` (a device buffer) gathered into `full` on every rank (collective on
/// `comm`: host staging or NCCL); with one rank (no communicator), a device copy.
fn all_gather_device<T>(
    comm: Option<&DeviceComm>,
    shard: &DeviceBuffer<T>,
    full: &mut DeviceBuffer<T>,
) -> Result<()>
where
    T: CommElement + lathe_host::DeviceElem,
{
    match comm.filter(|c| c.world_size() > 1) {
        Some(c) => c
            .all_gather_uneven(shard, full)
            .map_err(anyhow::Error::new)
            .context("all-gathering the updated parameter shards"),
        None => shard
            .copy_to(full)
            .context("copying the updated shard into the full copy"),
    }
}

/// What the host knows of a queued step before its report arrives.
struct Queued {
    step: u64,
    lr: f64,
    tokens: u64,
    step_ms: f64,
}

/// The step state the step just queued used, read back: the host waits for the device (for
/// the collectives first, with the communicator's bound).
fn wait_used_state(
    dev: &Device,
    opt: &DeviceOptimizer,
    reducer: Option<&SharedReducer>,
) -> Result<StepState> {
    if let Some(r) = reducer {
        lock_reducer(r)?
            .comm()
            .synchronize()
            .map_err(anyhow::Error::new)
            .context("waiting for the device collectives")?;
    }
    dev.read_step_state(opt.used_state())
        .context("reading back the step state of the offloaded step")
}

fn rounding_of(t: &Trainer) -> Rounding {
    if t.cfg.stochastic_rounding {
        Rounding::Stochastic { seed: t.cfg.seed }
    } else {
        Rounding::Nearest
    }
}

impl Trainer {
    /// A device run in ZeRO stage 3: the device on which rank 0 evaluates a temporary full
    /// copy of the weights ([`store_on_device`]); `None` otherwise (the workspace serves).
    pub(super) fn stage3_eval_device(&self) -> Option<Device> {
        self.dev
            .as_ref()
            .filter(|_| self.zero.stage().shards_parameters())
            .map(|d| d.dev.clone())
    }

    /// The loss scale the next step uses, as far as the host knows (a device run learns it
    /// a step behind).
    pub(super) fn current_scale(&self) -> f32 {
        match &self.dev {
            Some(d) => d.scale,
            None => self.scaler.scale(),
        }
    }

    /// Bytes of pinned host staging of an offloaded optimizer on a device (0 otherwise).
    pub(super) fn device_staging_bytes(&self) -> u64 {
        self.dev
            .as_ref()
            .and_then(|d| d.offload.as_ref())
            .map_or(0, OffloadStaging::bytes)
    }

    /// Peak bytes the device's caching allocator has held in tensors.
    pub(super) fn device_peak_bytes(&self) -> Option<u64> {
        self.dev
            .as_ref()
            .map(|d| d.dev.memory_stats().peak_allocated as u64)
    }

    /// One optimizer step on the device; returns the records the host has learned meanwhile:
    /// the previous step's, or (with `drain`) every queued step's, this one included.
    pub(super) fn train_step_device(&mut self, drain: bool) -> Result<Vec<StepRecord>> {
        let t0 = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr_at(step);
        let accum = self.cfg.accum;
        let (b, t) = (self.cfg.micro_batch, self.seq_len);
        let d = self.dev.as_mut().expect("device run");
        d.loss_sum.fill(&d.dev, 0.0)?;
        // Rank 0 poisons its gradients at chosen steps (testing aid): with several ranks the
        // reducer does it before the all-reduce, so the inf reaches every rank.
        let inject = self.is_root() && self.inject.should_inject(step);
        for micro in 0..accum {
            let batch = {
                let _s = self.prof.span("data", Phase::Data);
                self.loader.next_batch()?
            };
            let d = self.dev.as_mut().expect("device run");
            let (inputs, targets) = d.batch.upload(batch.inputs(), batch.targets())?;
            self.tape.clear();
            self.tape.bind_ids(batch.inputs(), inputs)?;
            self.tape.bind_ids(batch.targets(), targets)?;
            let fwd = self.prof.begin("forward", Phase::Forward);
            let loss = self.model.loss(
                &mut self.tape,
                self.zero.workspace()?,
                batch.inputs(),
                batch.targets(),
                batch.b,
                batch.t,
                self.recompute,
            )?;
            {
                let d = self.dev.as_mut().expect("device run");
                d.loss_sum
                    .add_assign(&d.dev, self.tape.device_value(loss)?)?;
            }
            self.prof.end(fwd);
            {
                let _s = self.prof.span("backward", Phase::Backward);
                let d = self.dev.as_ref().expect("device run");
                // The last micro-batch's backward leaves final gradients: reduce them in
                // buckets as it produces them.
                let reducer = d.reducer.as_ref().filter(|_| micro + 1 == accum);
                let ws = self.zero.workspace_mut()?;
                if let Some(r) = reducer {
                    lock_reducer(r)?.begin(inject);
                    self.tape.set_grad_ready_hook(Some(grad_ready_hook(r)));
                }
                let state = d.opt.state();
                let res = self
                    .tape
                    .backward_scaled(loss, state, (1.0 / accum as f64) as f32, ws);
                if let Some(r) = reducer {
                    self.tape.set_grad_ready_hook(None);
                    let mut red = lock_reducer(r)?;
                    if let Err(e) = res {
                        // The reducer's own error keeps its cause (a broken group, say).
                        return Err(match red.take_error() {
                            Some(inner) => inner.context("backward pass"),
                            None => anyhow::Error::new(e).context("backward pass"),
                        });
                    }
                    let _c = self.prof.span("reduce_gradients", Phase::Communication);
                    let dp = ws
                        .device_mut()
                        .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
                    let (_, grads, _) = dp.parts_mut();
                    red.finish(grads)?;
                } else {
                    res?;
                }
            }
            self.record_op_timings();
            self.loader.recycle(batch);
        }
        self.tokens += (accum * b * t * self.cfg.world) as u64;
        {
            let _s = self.prof.span("optimizer", Phase::Optimizer);
            let rounding = rounding_of(self);
            let lr32 = lr as f32;
            let d = self.dev.as_mut().expect("device run");
            let (ws, host, layout) = self.zero.workspace_and_host_optimizer()?;
            let dp = ws
                .device_mut()
                .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
            let (master, grads, working) = dp.parts_mut();
            let inject_here = inject && d.reducer.is_none();
            // Offloaded (`--offload-optimizer`): the host optimizer and its pinned staging.
            let mut offload = match (d.offload.as_mut(), host) {
                (Some(st), Some(h)) => Some((st, h)),
                (None, _) => None,
                (Some(_), None) => bail!("offload staging without a host optimizer"),
            };
            match d.shard.as_mut() {
                None => match offload.as_mut() {
                    Some((st, host)) => {
                        d.opt.step_offloaded(
                            grads,
                            OffloadGrads::Whole,
                            st.grads_mut(),
                            inject_here,
                        )?;
                        let used = wait_used_state(&d.dev, &d.opt, d.reducer.as_ref())?;
                        let dst = match working {
                            WorkingMut::None => WeightsMut::F32(master),
                            WorkingMut::Bf16(w) => WeightsMut::Bf16(w),
                            WorkingMut::F16(w) => WeightsMut::F16(w),
                        };
                        st.update(host, &used, lr32, 0, rounding, layout, dst)?;
                    }
                    None => {
                        let working = match working {
                            WorkingMut::None => WorkingCopyMut::None,
                            WorkingMut::Bf16(w) if self.cfg.stochastic_rounding => {
                                WorkingCopyMut::Bf16Stochastic(w)
                            }
                            WorkingMut::Bf16(w) => WorkingCopyMut::Bf16(w),
                            WorkingMut::F16(w) => WorkingCopyMut::F16(w),
                        };
                        d.opt.step(master, grads, working, lr32, inject_here)?
                    }
                },
                Some(sh) => {
                    let stochastic = self.cfg.stochastic_rounding;
                    let mut p = lock_shard(&sh.params)?;
                    let ShardParams {
                        master: shard_master,
                        working: shard_w,
                    } = &mut *p;
                    // The averaged gradients of the shard: kept by the reducer (stages 2-3
                    // with several ranks), else copied out of the full buffer on the device.
                    let mut red = match (&d.reducer, sh.own_grads) {
                        (Some(r), true) => Some(lock_reducer(r)?),
                        _ => None,
                    };
                    let (grad_shard, shard_comm): (&mut DeviceBuffer<f32>, _) = match red.as_mut() {
                        Some(r) => r
                            .shard_grads_and_comm()
                            .map(|(g, c)| (g, Some(c)))
                            .ok_or_else(|| anyhow!("the reducer holds no gradient shard"))?,
                        None => {
                            let n = sh.range.len();
                            let g = sh
                                .grads
                                .as_mut()
                                .ok_or_else(|| anyhow!("no gradient shard buffer"))?;
                            d.dev
                                .copy_2d(&*grads, sh.range.start, n, g, 0, n, 1, n)
                                .context("copying the gradient shard")?;
                            (g, None)
                        }
                    };
                    match offload.as_mut() {
                        Some((st, host)) => {
                            let source = if sh.own_grads {
                                OffloadGrads::OwnShard(grad_shard, shard_comm)
                            } else {
                                OffloadGrads::Shard(grad_shard)
                            };
                            d.opt
                                .step_offloaded(grads, source, st.grads_mut(), inject_here)?;
                            drop(red);
                            let used = wait_used_state(&d.dev, &d.opt, d.reducer.as_ref())?;
                            let dst = match (shard_w.as_mut(), shard_master.as_mut()) {
                                (Some(DevBuf::Bf16(w)), _) => WeightsMut::Bf16(w),
                                (Some(DevBuf::F16(w)), _) => WeightsMut::F16(w),
                                (None, Some(m)) => WeightsMut::F32(m),
                                _ => bail!("the shard holds no weights of the run's dtype"),
                            };
                            st.update(host, &used, lr32, sh.range.start, rounding, layout, dst)?;
                        }
                        None => {
                            let shard_master = shard_master.as_mut().ok_or_else(|| {
                                anyhow!("the shard's master weights are not here")
                            })?;
                            let shard_working = match shard_w.as_mut() {
                                None => WorkingCopyMut::None,
                                Some(DevBuf::Bf16(w)) if stochastic => {
                                    WorkingCopyMut::Bf16Stochastic(w)
                                }
                                Some(DevBuf::Bf16(w)) => WorkingCopyMut::Bf16(w),
                                Some(DevBuf::F16(w)) => WorkingCopyMut::F16(w),
                                Some(DevBuf::F32(_)) => WorkingCopyMut::None,
                            };
                            if sh.own_grads {
                                d.opt.step_own_shard(
                                    shard_master,
                                    grads,
                                    grad_shard,
                                    shard_working,
                                    lr32,
                                    inject_here,
                                    shard_comm,
                                )?;
                            } else {
                                d.opt.step_shard(
                                    shard_master,
                                    grads,
                                    grad_shard,
                                    shard_working,
                                    lr32,
                                    inject_here,
                                )?;
                            }
                            drop(red);
                        }
                    }
                    if sh.gather_after_step {
                        let _g = self.prof.span("gather_params", Phase::Communication);
                        let red = d.reducer.as_ref().map(lock_reducer).transpose()?;
                        let comm = red.as_deref().map(|r| r.comm());
                        match (working, shard_w.as_ref()) {
                            (WorkingMut::None, _) => {
                                let m = shard_master
                                    .as_ref()
                                    .ok_or_else(|| anyhow!("an fp32 shard without its weights"))?;
                                all_gather_device(comm, m, master)?
                            }
                            (WorkingMut::Bf16(full), Some(DevBuf::Bf16(w))) => {
                                all_gather_device(comm, w, full)?
                            }
                            (WorkingMut::F16(full), Some(DevBuf::F16(w))) => {
                                all_gather_device(comm, w, full)?
                            }
                            _ => {
                                bail!("the working copy's shard and the full copy differ in dtype")
                            }
                        }
                    }
                }
            }
            let DevBuf::F32(loss_sum) = &d.loss_sum else {
                unreachable!("allocated as f32")
            };
            d.readback.record(&d.opt, loss_sum)?;
            d.queued.push_back(Queued {
                step,
                lr,
                tokens: self.tokens,
                step_ms: t0.elapsed().as_secs_f64() * 1e3,
            });
        }
        self.step += 1;
        if self.prof.is_recording() {
            // Profiling waits for this step's timing events (the one host synchronisation a
            // profiled step adds).
            let d = self.dev.as_ref().expect("device run");
            if let Some(t) = d.dev.take_kernel_timings()? {
                crate::profiler::record_kernel_timings(&self.prof, &t);
            }
        } else if let Some(d) = self.dev.as_ref()
            && d.dev.kernel_timing_enabled()
        {
            // Outside the profiler's active window: drop what was timed.
            d.dev.take_kernel_timings()?;
        }
        let d = self.dev.as_mut().expect("device run");
        if let Some(r) = d.reducer.as_ref() {
            // A peer that failed inside a queued collective shows up here (NCCL; nothing to
            // check on the host-staged path).
            lock_reducer(r)?
                .comm()
                .poll()
                .map_err(anyhow::Error::new)
                .context("device collectives")?;
        }
        let reports = if drain {
            d.readback.finish()?
        } else {
            d.readback.previous()?.into_iter().collect()
        };
        let peak = d.dev.memory_stats().peak_allocated as u64;
        let mut out = Vec::new();
        for r in reports {
            let q = d
                .queued
                .pop_front()
                .ok_or_else(|| anyhow!("a step report without a queued step"))?;
            d.scale = r.next_scale;
            out.push(record_of(&q, &r, accum, peak));
        }
        // The logged loss is the mean over the ranks (every rank has the same records).
        for rec in &mut out {
            rec.loss = mean_over_ranks(&self.comm, rec.loss)?;
        }
        Ok(out)
    }
}

/// A full copy of `p`'s working weights on `dev` (stage 3's evaluation on rank 0: the weights
/// were gathered to the host).
pub(super) fn store_on_device(p: &ParamStore, dev: &Device) -> Result<ParamStore> {
    let mut s = ParamStore::new(&p.specs()).context("a store for evaluation")?;
    s.working_mut().copy_from_slice(p.working());
    if p.working_dtype() == DType::F32 {
        // In fp32 the device forward reads the master buffer (no separate working copy).
        s.master_mut().copy_from_slice(p.working());
    }
    s.set_working_dtype(p.working_dtype());
    s.to_device(dev)
        .with_context(|| format!("copying the weights to {} for evaluation", dev.describe()))?;
    Ok(s)
}

fn record_of(q: &Queued, r: &StepReport, accum: usize, peak: u64) -> StepRecord {
    StepRecord {
        step: q.step,
        loss: r.loss as f64 / accum as f64,
        lr: q.lr,
        tokens: q.tokens,
        tok_s: f64::NAN,
        loss_scale: r.scale as f64,
        skipped: r.skipped,
        grad_norm: r.grad_norm as f64,
        mem_peak_bytes: peak,
        step_ms: Some(q.step_ms),
        ..Default::default()
    }
}
