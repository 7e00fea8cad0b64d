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
//! (`shard_range(len, N, rank)`) only. The non-finite check and the norm run over the full
//! averaged gradients (the same on every rank, so the skip and clip decisions are stage 0's),
//! AdamW updates the shard at its global offset (decay ranges and stochastic rounding follow
//! global indices), and the updated working-copy shards (fp32: the master shards) are
//! all-gathered into every rank's full working copy — the elementwise update of stage 0, so
//! stage 1 takes stage 0's steps bit for bit. The Device API has no copy between ranges of
//! two device buffers, so the gradient shard goes out through host staging too, and the
//! all-gather runs over [`LocalComm`](lathe_host::comm::LocalComm) host buffers: one host wait
//! per step, which an NCCL all-gather on device buffers removes on GPUs. Stages 2 and 3 are
//! not available on devices (refused when the trainer is built).
//!
//! [`Tape::bind_ids`]: lathe_autograd::Tape::bind_ids
//! [`Tape::backward_scaled`]: lathe_autograd::Tape::backward_scaled

use super::Trainer;
use crate::device::{
    DeviceBatch, DeviceGradReducer, DeviceOptimizer, HostOptimizerState, SharedReducer,
    StepReadback, StepReport, grad_ready_hook, lock_reducer,
};
use crate::metrics::StepRecord;
use crate::optim::Rounding;
use crate::profiler::Phase;
use crate::zero::mean_over_ranks;
use anyhow::{Context, Result, anyhow, bail};
use lathe_autograd::{DevBuf, WorkingMut};
use lathe_host::Device;
use lathe_host::DeviceBuffer;
use lathe_host::comm::{CommElement, Communicator, LocalComm};
use lathe_host::nn_ops::WorkingCopyMut;
use std::collections::VecDeque;
use std::ops::Range;
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
    /// ZeRO stage 1: this rank's shard of the optimizer's state (`None` in stage 0).
    shard: Option<DeviceShard>,
}

/// What a rank holds for its shard of the optimizer in stage 1 (besides the moments, which
/// are in the [`DeviceOptimizer`]).
struct DeviceShard {
    /// The rank's global range of the flat parameter buffers.
    range: Range<usize>,
    /// fp32 master weights of the shard (the optimizer updates these).
    master: DeviceBuffer<f32>,
    /// The shard of the averaged gradients (copied out of the full gradient buffer).
    grads: DeviceBuffer<f32>,
    /// The shard's bf16 / f16 working copy (`None` in fp32: the master shard is gathered).
    working: Option<DevBuf>,
    /// Host staging of the gradient shard.
    host_grads: Vec<f32>,
}

/// Every rank's `shard` (a device buffer) gathered into `full` on every rank, through host
/// memory (collective on `comm`).
fn all_gather_device<T>(
    comm: &LocalComm,
    shard: &DeviceBuffer<T>,
    full: &mut DeviceBuffer<T>,
) -> Result<()>
where
    T: CommElement + lathe_host::DeviceElem,
{
    let mine = shard
        .to_vec()
        .context("copying the updated shard to the host")?;
    let mut all = vec![T::default(); full.len()];
    comm.all_gather_uneven(&mine[..], &mut all[..])
        .map_err(anyhow::Error::new)
        .context("all-gathering the updated parameter shards")?;
    full.copy_from_host(&all)
        .context("copying the gathered parameters to the device")
}

/// Every rank's shard of a host vector, gathered to full length on every rank.
fn all_gather_host(comm: &LocalComm, shard: &[f32], len: usize, what: &str) -> Result<Vec<f32>> {
    let mut all = vec![0.0f32; len];
    comm.all_gather_uneven(shard, &mut all[..])
        .map_err(anyhow::Error::new)
        .with_context(|| format!("all-gathering the {what} shards"))?;
    Ok(all)
}

/// What the host knows of a queued step before its report arrives.
struct Queued {
    step: u64,
    lr: f64,
    tokens: u64,
    step_ms: f64,
}

/// Builds the device optimizer for `t` from the host state (fresh, or just restored from a
/// checkpoint). Stage 0: the master weights go into the workspace's device buffer. Stage 1:
/// the optimizer and a [`DeviceShard`] for the rank's shard; in fp32 the workspace's device
/// master (which the forward reads) gets the full working copy.
fn optimizer_from_host(
    t: &mut Trainer,
    dev: &Device,
) -> Result<(DeviceOptimizer, Option<DeviceShard>)> {
    let stage = t.zero.stage();
    if stage.shards_gradients() {
        bail!("{stage} is not available on devices (use --zero 0 or 1, or --device cpu)");
    }
    // Stage 0: every rank holds the full master weights; stage 1: its shard.
    let host = HostOptimizerState {
        master: t.zero.optimizer_shard().master().to_vec(),
        optimizer: t.zero.optimizer_shard().optimizer().clone(),
        scaler: t.scaler.clone(),
    };
    let rounding = rounding_of(t);
    let grad_clip = t.cfg.grad_clip;
    let layout = t.zero.layout().clone();
    let range = t.zero.own_range();
    let ws = t.zero.workspace_mut()?;
    if !stage.shards_optimizer() {
        let dp = ws
            .device_mut()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let (master, _, _) = dp.parts_mut();
        let opt = DeviceOptimizer::from_host(dev, &host, &layout, grad_clip, rounding, master)?;
        return Ok((opt, None));
    }
    let (opt, master) =
        DeviceOptimizer::from_host_shard(dev, &host, &layout, range.clone(), grad_clip, rounding)?;
    let full_working = ws.working().to_vec();
    let dp = ws
        .device_mut()
        .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
    let working = match dp.working() {
        None => None,
        Some(w) => Some(DevBuf::alloc(dev, w.dtype(), range.len())?),
    };
    if working.is_none() {
        // fp32: the forward reads the device master, which must hold the full weights (the
        // host workspace's working copy; its master buffer is not the optimizer's).
        let (master_full, _, _) = dp.parts_mut();
        master_full
            .copy_from_host(&full_working)
            .context("uploading the full weights")?;
    }
    let shard = DeviceShard {
        grads: dev.alloc::<f32>(range.len()).context("gradient shard")?,
        host_grads: vec![0.0; range.len()],
        range,
        master,
        working,
    };
    Ok((opt, Some(shard)))
}

fn rounding_of(t: &Trainer) -> Rounding {
    if t.cfg.stochastic_rounding {
        Rounding::Stochastic { seed: t.cfg.seed }
    } else {
        Rounding::Nearest
    }
}

impl Trainer {
    /// Moves the model state to `dev`: the workspace's parameters into device buffers (the
    /// working copy in the compute dtype) and the optimizer into a [`DeviceOptimizer`].
    pub(super) fn attach_device(&mut self, dev: Device) -> Result<()> {
        // The workspace's working copy (in the compute dtype) goes up as it is; its master
        // buffer is not the optimizer's, whose master weights `optimizer_from_host` uploads.
        let ws = self.zero.workspace_mut()?;
        ws.to_device(&dev)
            .with_context(|| format!("moving the model to {}", dev.describe()))?;
        let (opt, shard) = optimizer_from_host(self, &dev)?;
        let tokens = self.cfg.micro_batch * self.seq_len;
        let loss_sum = DevBuf::zeros(&dev, lathe_autograd::DType::F32, 1)?;
        let reducer = if self.cfg.world > 1 {
            let comm = self
                .grad_comm
                .take()
                .ok_or_else(|| anyhow!("the gradient communicator was already taken"))?;
            let len = self.zero.len();
            Some(
                DeviceGradReducer::new(comm, len, DeviceGradReducer::DEFAULT_BUCKET_ELEMS).shared(),
            )
        } else {
            None
        };
        self.dev = Some(DeviceRun {
            reducer,
            shard,
            readback: StepReadback::new(&dev)?,
            batch: DeviceBatch::new(&dev, tokens)?,
            loss_sum,
            opt,
            queued: VecDeque::new(),
            scale: self.scaler.scale(),
            dev,
        });
        Ok(())
    }

    /// After the host state was restored (resume): pushes it to the device.
    pub(super) fn reload_device(&mut self) -> Result<()> {
        let Some(dev) = self.dev.as_ref().map(|d| d.dev.clone()) else {
            return Ok(());
        };
        let ws = self.zero.workspace_mut()?;
        ws.upload_to_device()?;
        let (opt, shard) = optimizer_from_host(self, &dev)?;
        if let Some(d) = self.dev.as_mut() {
            d.opt = opt;
            d.shard = shard;
        }
        Ok(())
    }

    /// Copies the device's model and optimizer state into the host structures a checkpoint
    /// is written from (waits for the device).
    pub(super) fn sync_device_to_host(&mut self) -> Result<()> {
        let Some(d) = self.dev.as_mut() else {
            return Ok(());
        };
        let len = self.zero.len();
        let ws = self.zero.workspace_mut()?;
        ws.fetch_from_device()?;
        let dp = ws
            .device()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let (host, opt_state, buffers) = match &d.shard {
            None => {
                let host = d.opt.to_host(dp.master())?;
                let opt_state = host.optimizer.state();
                let buffers: Vec<(&str, Vec<f32>)> = host
                    .optimizer
                    .buffers()
                    .into_iter()
                    .map(|(n, b)| (n, b.to_vec()))
                    .collect();
                (host, opt_state, buffers)
            }
            Some(sh) => {
                // Stage 1 (collective): every rank assembles the full state from the shards.
                let mut host = d.opt.to_host(&sh.master)?;
                host.master = all_gather_host(&self.comm, &host.master, len, "master weight")?;
                let opt_state = crate::optim::OptimizerState {
                    len,
                    ..host.optimizer.state()
                };
                let mut buffers = Vec::new();
                for (n, b) in host.optimizer.buffers() {
                    buffers.push((n, all_gather_host(&self.comm, b, len, n)?));
                }
                (host, opt_state, buffers)
            }
        };
        self.zero.restore(&host.master, &opt_state, &buffers)?;
        // restore() rebuilt the host working copy from the master; the device copy is the
        // same values (one rounding of the same master).
        self.scaler = host.scaler;
        Ok(())
    }

    /// The loss scale the next step uses, as far as the host knows (a device run learns it
    /// a step behind).
    pub(super) fn current_scale(&self) -> f32 {
        match &self.dev {
            Some(d) => d.scale,
            None => self.scaler.scale(),
        }
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
            let d = self.dev.as_mut().expect("device run");
            let ws = self.zero.workspace_mut()?;
            let dp = ws
                .device_mut()
                .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
            let (master, grads, working) = dp.parts_mut();
            let inject_here = inject && d.reducer.is_none();
            match d.shard.as_mut() {
                None => {
                    let working = match working {
                        WorkingMut::None => WorkingCopyMut::None,
                        WorkingMut::Bf16(w) if self.cfg.stochastic_rounding => {
                            WorkingCopyMut::Bf16Stochastic(w)
                        }
                        WorkingMut::Bf16(w) => WorkingCopyMut::Bf16(w),
                        WorkingMut::F16(w) => WorkingCopyMut::F16(w),
                    };
                    d.opt.step(master, grads, working, lr as f32, inject_here)?
                }
                Some(sh) => {
                    // Stage 1: the shard of the averaged gradients, through host staging.
                    grads
                        .copy_to_host_at(sh.range.start, &mut sh.host_grads)
                        .context("copying the gradient shard to the host")?;
                    sh.grads
                        .copy_from_host(&sh.host_grads)
                        .context("copying the gradient shard to the device")?;
                    let stochastic = self.cfg.stochastic_rounding;
                    let shard_working = match sh.working.as_mut() {
                        None => WorkingCopyMut::None,
                        Some(DevBuf::Bf16(w)) if stochastic => WorkingCopyMut::Bf16Stochastic(w),
                        Some(DevBuf::Bf16(w)) => WorkingCopyMut::Bf16(w),
                        Some(DevBuf::F16(w)) => WorkingCopyMut::F16(w),
                        Some(DevBuf::F32(_)) => WorkingCopyMut::None,
                    };
                    d.opt.step_shard(
                        &mut sh.master,
                        grads,
                        &sh.grads,
                        shard_working,
                        lr as f32,
                        inject_here,
                    )?;
                    let _g = self.prof.span("gather_params", Phase::Communication);
                    match (working, sh.working.as_ref()) {
                        (WorkingMut::None, _) => all_gather_device(&self.comm, &sh.master, master)?,
                        (WorkingMut::Bf16(full), Some(DevBuf::Bf16(w))) => {
                            all_gather_device(&self.comm, w, full)?
                        }
                        (WorkingMut::F16(full), Some(DevBuf::F16(w))) => {
                            all_gather_device(&self.comm, w, full)?
                        }
                        _ => bail!("the working copy's shard and the full copy differ in dtype"),
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
