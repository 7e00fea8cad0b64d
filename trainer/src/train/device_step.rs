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
use lathe_host::nn_ops::WorkingCopyMut;
use std::collections::VecDeque;
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
}

/// What the host knows of a queued step before its report arrives.
struct Queued {
    step: u64,
    lr: f64,
    tokens: u64,
    step_ms: f64,
}

/// Builds the device optimizer for `t` from the host state (fresh, or just restored from a
/// checkpoint), with the master weights going into the workspace's device buffer.
fn optimizer_from_host(t: &mut Trainer, dev: &Device) -> Result<DeviceOptimizer> {
    if t.zero.stage().shards_optimizer() {
        bail!(
            "{} keeps a shard of the optimizer on each rank; the device optimizer is not \
             sharded (use --zero 0)",
            t.zero.stage()
        );
    }
    let host = HostOptimizerState {
        // Stage 0: every rank holds the full master weights.
        master: t.zero.optimizer_shard().master().to_vec(),
        optimizer: t.zero.optimizer_shard().optimizer().clone(),
        scaler: t.scaler.clone(),
    };
    let rounding = rounding_of(t);
    let grad_clip = t.cfg.grad_clip;
    let layout = t.zero.layout().clone();
    let ws = t.zero.workspace_mut()?;
    let dp = ws
        .device_mut()
        .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
    let (master, _, _) = dp.parts_mut();
    DeviceOptimizer::from_host(dev, &host, &layout, grad_clip, rounding, master)
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
        let opt = optimizer_from_host(self, &dev)?;
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
        let opt = optimizer_from_host(self, &dev)?;
        if let Some(d) = self.dev.as_mut() {
            d.opt = opt;
        }
        Ok(())
    }

    /// Copies the device's model and optimizer state into the host structures a checkpoint
    /// is written from (waits for the device).
    pub(super) fn sync_device_to_host(&mut self) -> Result<()> {
        let Some(d) = self.dev.as_mut() else {
            return Ok(());
        };
        let ws = self.zero.workspace_mut()?;
        ws.fetch_from_device()?;
        let dp = ws
            .device()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let host = d.opt.to_host(dp.master())?;
        let opt_state = host.optimizer.state();
        let buffers: Vec<(&str, Vec<f32>)> = host
            .optimizer
            .buffers()
            .into_iter()
            .map(|(n, b)| (n, b.to_vec()))
            .collect();
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
                if let Some(r) = reducer {
                    lock_reducer(r)?.begin(inject);
                    self.tape.set_grad_ready_hook(Some(grad_ready_hook(r)));
                }
                let state = d.opt.state();
                let res = self.tape.backward_scaled(
                    loss,
                    state,
                    (1.0 / accum as f64) as f32,
                    self.zero.workspace_mut()?,
                );
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
                    let ws = self.zero.workspace_mut()?;
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
            let working = match working {
                WorkingMut::None => WorkingCopyMut::None,
                WorkingMut::Bf16(w) if self.cfg.stochastic_rounding => {
                    WorkingCopyMut::Bf16Stochastic(w)
                }
                WorkingMut::Bf16(w) => WorkingCopyMut::Bf16(w),
                WorkingMut::F16(w) => WorkingCopyMut::F16(w),
            };
            let inject_here = inject && d.reducer.is_none();
            d.opt.step(master, grads, working, lr as f32, inject_here)?;
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
