//! Moving a device run's model state between the host model and the device: building the
//! device side at startup and after a resume ([`Trainer::attach_device`],
//! [`Trainer::reload_device`]; with `--offload-optimizer`, only the step state and the pinned
//! staging go to the device) and bringing it back for checkpoints and evaluation
//! ([`Trainer::sync_device_to_host`]).

use super::{
    DeviceRun, DeviceShard, ShardParams, Trainer, all_shards, gather_pieces, lock_shard,
    rounding_of,
};
use crate::device::{
    DeviceBatch, DeviceGradReducer, DeviceOptimizer, HostOptimizerState, OffloadStaging,
    SharedReducer, StepReadback, lock_reducer,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use lathe_autograd::{DType, DevBuf, ParamGatherHook, ParamStore};
use lathe_host::Device;
use lathe_host::comm::{Communicator, DeviceComm, HostComm, NcclId};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Stage 3's parameter gather hook: a leaf's values from the ranks' shards (collective over
/// the reducer's communicator; a device copy with one rank).
fn param_gather_hook(
    params: &Arc<Mutex<ShardParams>>,
    reducer: Option<&SharedReducer>,
    shards: Vec<Range<usize>>,
) -> ParamGatherHook {
    let params = Arc::clone(params);
    let reducer = reducer.cloned();
    Arc::new(move |range: Range<usize>, out: &mut DevBuf| {
        let run = || -> Result<()> {
            let p = lock_shard(&params)?;
            let red = reducer.as_ref().map(lock_reducer).transpose()?;
            macro_rules! gather {
                ($mine:expr, $out:expr) => {
                    match &red {
                        Some(r) => r.gather_range(range.clone(), &shards, $mine, $out),
                        None => gather_pieces(None, range.clone(), &shards, $mine, $out),
                    }
                };
            }
            match (out, p.working.as_ref()) {
                (DevBuf::F32(o), None) => {
                    let m = p
                        .master
                        .as_ref()
                        .ok_or_else(|| anyhow!("an fp32 shard without its weights"))?;
                    gather!(m, o)
                }
                (DevBuf::Bf16(o), Some(DevBuf::Bf16(w))) => gather!(w, o),
                (DevBuf::F16(o), Some(DevBuf::F16(w))) => gather!(w, o),
                (o, w) => bail!(
                    "a {} leaf cannot be filled from a {} shard",
                    o.dtype(),
                    w.map_or(DType::F32, |w| w.dtype())
                ),
            }
        };
        run().map_err(|e| format!("{e:#}"))
    })
}

/// Stages 1-2 in bf16 / f16, and every stage with the optimizer offloaded: the optimizer's
/// master is elsewhere (a shard, or host memory) and the forward reads the working copy, so
/// the workspace's full f32 master buffer is freed on the device.
fn release_unused_master(
    ws: &mut ParamStore,
    stage: crate::zero::ZeroStage,
    offload: bool,
) -> Result<()> {
    if (stage.shards_optimizer() || offload) && ws.working_dtype() != DType::F32 {
        ws.device_mut()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?
            .release_master()?;
    }
    Ok(())
}

/// Every rank's shard of a host vector, gathered to full length on every rank.
fn all_gather_host(comm: &HostComm, shard: &[f32], len: usize, what: &str) -> Result<Vec<f32>> {
    let mut all = vec![0.0f32; len];
    comm.all_gather_uneven(shard, &mut all[..])
        .map_err(anyhow::Error::new)
        .with_context(|| format!("all-gathering the {what} shards"))?;
    Ok(all)
}

/// Builds the device optimizer for `t` from the host state (fresh, or just restored from a
/// checkpoint). Stage 0: the master weights go into the workspace's device buffer. Stage 1:
/// the optimizer and a [`DeviceShard`] for the rank's shard; in fp32 the workspace's device
/// master (which the forward reads) gets the full working copy.
///
/// With `--offload-optimizer` the master weights and the optimizer's state stay in the host
/// model (its `HostOptimizer`): the device optimizer keeps the step state only, the device
/// holds no master weights beyond what the forward reads (fp32: the weights of the
/// optimizer's range), and the pinned staging of the host update is returned.
fn optimizer_from_host(
    t: &mut Trainer,
    dev: &Device,
) -> Result<(DeviceOptimizer, Option<DeviceShard>, Option<OffloadStaging>)> {
    let stage = t.zero.stage();
    let (len, world) = (t.zero.len(), t.cfg.world);
    let offload = t.cfg.offload_optimizer;
    let rounding = rounding_of(t);
    let grad_clip = t.cfg.grad_clip;
    let layout = t.zero.layout().clone();
    let range = t.zero.own_range();
    let wdt = t.zero.workspace()?.working_dtype();
    let offloaded = |t: &Trainer| -> Result<(DeviceOptimizer, OffloadStaging)> {
        let host = t.zero.optimizer_shard();
        ensure!(
            host.is_offloaded(),
            "--offload-optimizer, but the optimizer state is not in host memory"
        );
        let mut opt = DeviceOptimizer::offloaded(
            dev,
            host.optimizer(),
            &layout,
            range.clone(),
            &t.scaler,
            grad_clip,
        )?;
        opt.set_norm_shards(all_shards(len, world))?;
        Ok((opt, OffloadStaging::new(dev, range.len(), wdt)?))
    };
    if !stage.shards_optimizer() {
        if offload {
            let (opt, staging) = offloaded(t)?;
            if wdt == DType::F32 {
                // The forward reads the device master: the full weights (the host master).
                let full = t.zero.optimizer_shard().master().to_vec();
                let dp = t
                    .zero
                    .workspace_mut()?
                    .device_mut()
                    .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
                let (master, _, _) = dp.parts_mut();
                master
                    .copy_from_host(&full)
                    .context("uploading the weights")?;
            }
            return Ok((opt, None, Some(staging)));
        }
        // Stage 0: every rank holds the full master weights.
        let host = HostOptimizerState {
            master: t.zero.optimizer_shard().master().to_vec(),
            optimizer: t.zero.optimizer_shard().optimizer().clone(),
            scaler: t.scaler.clone(),
        };
        let dp = t
            .zero
            .workspace_mut()?
            .device_mut()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let (master, _, _) = dp.parts_mut();
        let mut opt = DeviceOptimizer::from_host(dev, &host, &layout, grad_clip, rounding, master)?;
        opt.set_norm_shards(all_shards(len, world))?;
        return Ok((opt, None, None));
    }
    let (opt, master, staging) = if offload {
        let (opt, staging) = offloaded(t)?;
        // fp32: the shard of the weights the forward reads (gathered or broadcast from here)
        // is the master shard; bf16 / f16 keep only the working copy's shard.
        let master = match wdt {
            DType::F32 => Some(
                dev.htod(t.zero.optimizer_shard().master())
                    .context("uploading the weights of the shard")?,
            ),
            _ => None,
        };
        (opt, master, Some(staging))
    } else {
        // Stages 1-3: the rank's shard of the master weights and moments.
        let host = HostOptimizerState {
            master: t.zero.optimizer_shard().master().to_vec(),
            optimizer: t.zero.optimizer_shard().optimizer().clone(),
            scaler: t.scaler.clone(),
        };
        let (mut opt, master) = DeviceOptimizer::from_host_shard(
            dev,
            &host,
            &layout,
            range.clone(),
            grad_clip,
            rounding,
        )?;
        opt.set_norm_shards(all_shards(len, world))?;
        (opt, Some(master), None)
    };
    // The shard's working copy, from the host model's (exact f32 image of its values).
    let working = match wdt {
        DType::F32 => None,
        dt => Some(DevBuf::upload(
            dev,
            dt,
            &t.zero.working_image(range.clone())?,
        )?),
    };
    if working.is_none() && !stage.shards_parameters() {
        // fp32: the forward reads the device master, which must hold the full weights (the
        // host workspace's working copy; its master buffer is not the optimizer's).
        let full_working = t.zero.working_image(0..len)?;
        let dp = t
            .zero
            .workspace_mut()?
            .device_mut()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let (master_full, _, _) = dp.parts_mut();
        master_full
            .copy_from_host(&full_working)
            .context("uploading the full weights")?;
    }
    let own_grads = stage.shards_gradients();
    let grads = if own_grads && world > 1 {
        None
    } else {
        Some(dev.alloc::<f32>(range.len()).context("gradient shard")?)
    };
    let shard = DeviceShard {
        grads,
        range,
        params: Arc::new(Mutex::new(ShardParams { master, working })),
        gather_after_step: !stage.shards_parameters(),
        own_grads,
    };
    Ok((opt, Some(shard), staging))
}

/// The device communicator of a multi-rank run on `dev`: NCCL when the ranks agreed on an
/// NCCL id before starting (see `super::comm_choice`), else host staging over `comm`.
fn device_comm(dev: &Device, comm: HostComm, nccl: Option<NcclId>) -> Result<DeviceComm> {
    let Some(id) = nccl else {
        return Ok(DeviceComm::staged(comm));
    };
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut c = DeviceComm::nccl(dev, rank, world, &id)
        .map_err(anyhow::Error::new)
        .with_context(|| {
            format!(
                "rank {rank}: creating the NCCL communicator on {}",
                dev.describe()
            )
        })?;
    c.set_timeout(crate::train::RANK_TIMEOUT);
    Ok(c)
}

impl Trainer {
    /// Moves the model state to `dev`: the workspace's parameters into device buffers (the
    /// working copy in the compute dtype) and the optimizer into a [`DeviceOptimizer`].
    pub(in crate::train) fn attach_device(&mut self, dev: Device) -> Result<()> {
        let stage = self.zero.stage();
        let offload = self.cfg.offload_optimizer;
        let (len, world) = (self.zero.len(), self.cfg.world);
        self.zero.keep_workspace()?;
        let reducer = if world > 1 {
            let comm = self
                .grad_comm
                .take()
                .ok_or_else(|| anyhow!("the gradient communicator was already taken"))?;
            let comm = device_comm(&dev, comm, self.nccl_id.take())?;
            Some(
                DeviceGradReducer::new(comm, len, DeviceGradReducer::DEFAULT_BUCKET_ELEMS).shared(),
            )
        } else {
            None
        };
        if !stage.shards_parameters() {
            // The workspace's working copy (in the compute dtype) goes up as it is; its master
            // buffer is not the optimizer's, whose master weights `optimizer_from_host`
            // uploads.
            let ws = self.zero.workspace_mut()?;
            ws.to_device(&dev)
                .with_context(|| format!("moving the model to {}", dev.describe()))?;
            release_unused_master(ws, stage, offload)?;
        }
        let (opt, shard, offload) = optimizer_from_host(self, &dev)?;
        if offload.is_some()
            && let Some(h) = self.zero.host_optimizer_mut()
        {
            // The host update stages through the pinned buffers instead.
            h.release_staging();
        }
        if let (Some(r), Some(sh)) = (&reducer, &shard)
            && sh.own_grads
        {
            let buf = dev.alloc::<f32>(sh.range.len()).context("gradient shard")?;
            lock_reducer(r)?.keep_shard(all_shards(len, world), buf)?;
        }
        self.shard_params_to_device(&dev, shard.as_ref(), reducer.as_ref())?;
        let tokens = self.cfg.micro_batch * self.seq_len;
        let loss_sum = DevBuf::zeros(&dev, lathe_autograd::DType::F32, 1)?;
        let mut readback = StepReadback::new(&dev)?;
        if let Some(r) = reducer.as_ref()
            && lock_reducer(r)?.comm().is_nccl()
        {
            // A step's report waits behind its collectives: wait with the communicator's
            // bound, so a dead peer ends the run with an error instead of a hang.
            let r = Arc::clone(r);
            readback.set_waiter(Box::new(move |event, what| {
                lock_reducer(&r)?
                    .comm()
                    .wait_event(event, what)
                    .map_err(anyhow::Error::new)
            }));
        }
        self.dev = Some(DeviceRun {
            reducer,
            shard,
            offload,
            readback,
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
    pub(in crate::train) fn reload_device(&mut self) -> Result<()> {
        let Some(dev) = self.dev.as_ref().map(|d| d.dev.clone()) else {
            return Ok(());
        };
        let stage = self.zero.stage();
        let offload = self.cfg.offload_optimizer;
        if !stage.shards_parameters() {
            let ws = self.zero.workspace_mut()?;
            ws.upload_to_device()?;
            release_unused_master(ws, stage, offload)?;
        }
        let (opt, shard, offload) = optimizer_from_host(self, &dev)?;
        let reducer = self.dev.as_ref().and_then(|d| d.reducer.clone());
        self.shard_params_to_device(&dev, shard.as_ref(), reducer.as_ref())?;
        if let Some(d) = self.dev.as_mut() {
            d.opt = opt;
            d.shard = shard;
            d.offload = offload;
        }
        Ok(())
    }

    /// Stage 3: puts the workspace on `dev` sharded, its parameter leaves gathered from the
    /// ranks' shards (`shard`'s parameters here). Other stages: nothing to do.
    fn shard_params_to_device(
        &mut self,
        dev: &Device,
        shard: Option<&DeviceShard>,
        reducer: Option<&SharedReducer>,
    ) -> Result<()> {
        if !self.zero.stage().shards_parameters() {
            return Ok(());
        }
        let sh = shard.ok_or_else(|| anyhow!("stage 3 without a parameter shard"))?;
        let shards = all_shards(self.zero.len(), self.cfg.world);
        let hook = param_gather_hook(&sh.params, reducer, shards);
        let ws = self.zero.workspace_mut()?;
        ws.to_device_sharded(dev, hook)
            .with_context(|| format!("moving the model to {} (sharded)", dev.describe()))
    }

    /// Copies the device's model and optimizer state into the host structures a checkpoint
    /// is written from (waits for the device).
    pub(in crate::train) fn sync_device_to_host(&mut self) -> Result<()> {
        let Some(d) = self.dev.as_mut() else {
            return Ok(());
        };
        if let Some(r) = d.reducer.as_ref() {
            // The copies below wait for the compute stream, which waits for the collectives:
            // wait for those first, with the communicator's bound.
            lock_reducer(r)?
                .comm()
                .synchronize()
                .map_err(anyhow::Error::new)
                .context("waiting for the device collectives")?;
        }
        let len = self.zero.len();
        self.zero.workspace_mut()?.fetch_from_device()?;
        let dp = self
            .zero
            .workspace()?
            .device()
            .ok_or_else(|| anyhow!("the parameters are not on the device"))?;
        let mut host = if d.opt.is_offloaded() {
            // The host model's optimizer holds the live state; the device, the scaler.
            let (scaler, step) = d.opt.host_scaler()?;
            let h = self.zero.optimizer_shard();
            ensure!(
                h.optimizer().step_count() == step,
                "the host optimizer applied {} steps, the device counted {step}",
                h.optimizer().step_count()
            );
            HostOptimizerState {
                master: h.master().to_vec(),
                optimizer: h.optimizer().clone(),
                scaler,
            }
        } else {
            match &d.shard {
                None => d.opt.to_host(dp.master())?,
                Some(sh) => {
                    let p = lock_shard(&sh.params)?;
                    let m = p
                        .master
                        .as_ref()
                        .ok_or_else(|| anyhow!("the shard's master weights are not here"))?;
                    d.opt.to_host(m)?
                }
            }
        };
        let (opt_state, buffers) = match &d.shard {
            None => {
                let opt_state = host.optimizer.state();
                let buffers: Vec<(&str, Vec<f32>)> = host
                    .optimizer
                    .buffers()
                    .into_iter()
                    .map(|(n, b)| (n, b.to_vec()))
                    .collect();
                (opt_state, buffers)
            }
            Some(_) => {
                // Stages 1-3 (collective): every rank assembles the full state from the
                // shards.
                host.master = all_gather_host(&self.comm, &host.master, len, "master weight")?;
                let opt_state = crate::optim::OptimizerState {
                    len,
                    ..host.optimizer.state()
                };
                let mut buffers = Vec::new();
                for (n, b) in host.optimizer.buffers() {
                    buffers.push((n, all_gather_host(&self.comm, b, len, n)?));
                }
                (opt_state, buffers)
            }
        };
        self.zero.restore(&host.master, &opt_state, &buffers)?;
        // restore() rebuilt the host working copy from the master; the device copy is the
        // same values (one rounding of the same master).
        self.scaler = host.scaler;
        Ok(())
    }
}
