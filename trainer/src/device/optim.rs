//! [`DeviceOptimizer`]: fused AdamW, gradient check, norm, clipping and dynamic loss scaling,
//! queued on the device's compute stream with no host synchronisation; or, with the optimizer
//! offloaded to the host (`--offload-optimizer`), everything but the update.

use anyhow::{Context, Result, anyhow, bail, ensure};
use lathe_host::comm::{DeviceComm, ReduceOp};
use lathe_host::nn_ops::{AdamWLaunch, DeviceDecayRanges, WorkingCopyMut};
use lathe_host::{Device, DeviceBuffer, KernelArg, PinnedBuffer};
use lathe_kernels::Problem;
use lathe_kernels::elementwise::FILL_F32;
use lathe_kernels::nn::adamw::DecayRanges;
use lathe_kernels::nn::amp::{FOUND_INF, STATE_WORDS, ScalerRule, StepState, check_blocks};
use std::ops::Range;

use crate::optim::{
    AdamWConfig, Optimizer, OptimizerConfig, OptimizerState, ParamLayout, Rounding,
};
use crate::precision::LossScaler;

/// Everything a checkpoint needs from a [`DeviceOptimizer`], in the CPU path's types: the
/// master weights, the AdamW moments and step count (as [`Optimizer::AdamW`]) and the loss
/// scaler (scale, growth tracker, skipped steps).
#[derive(Clone, Debug, PartialEq)]
pub struct HostOptimizerState {
    /// fp32 master weights, `len` elements.
    pub master: Vec<f32>,
    /// AdamW with moments `m`, `v` (`len` elements each) and the applied step count.
    pub optimizer: Optimizer,
    pub scaler: LossScaler,
}

/// AdamW with its moments, the step state and the decay table on a device.
///
/// Owns, on the device: the moments `m`, `v` (f32, one per parameter element), the step state
/// (`lathe_kernels::nn::amp`: loss scale, `1/scale`, growth tracker, clip factor, gradient norm,
/// applied and skipped step counts, the non-finite flag), a copy of that state taken before each
/// loss-scale update (what the step used: [`DeviceOptimizer::used_state`]) and the decay table.
/// The parameters themselves (master weights, working copy, gradients) belong to the caller and
/// are passed to [`DeviceOptimizer::step`].
///
/// Why no host synchronisation: the skip decision, the clip factor, the bias-correction step
/// `t` and the loss scale are all read by the kernels from the step state, so the host never
/// needs a value the device has just computed. It learns them later, a step behind, through
/// [`super::StepReadback`]. Only [`DeviceOptimizer::to_host`] (for checkpoints) waits.
///
/// The loss-scale update is the device kernel's GradScaler rule with the CPU
/// [`LossScaler`]'s floor: a backoff stops at `min(MIN_SCALE, init_scale)`.
///
/// Offloaded ([`DeviceOptimizer::offloaded`], `--offload-optimizer`): the device holds the
/// step state only. [`DeviceOptimizer::step_offloaded`] queues the same check, norm, clip
/// factor and loss-scale update, and instead of the fused AdamW a copy of the gradients into
/// pinned host memory; the host's optimizer ([`crate::zero::HostOptimizer`]) then updates with
/// the clip factor and `1/scale` the device found ([`DeviceOptimizer::used_state`]), so every
/// decision is the device's, bit for bit.
pub struct DeviceOptimizer {
    dev: Device,
    /// The scaler the optimizer was built from: its settings and whether it is enabled.
    scaler: LossScaler,
    rule: ScalerRule,
    grad_clip: f64,
    rounding: Rounding,
    /// Global index of the first element this optimizer updates (a ZeRO shard's start; 0
    /// when it updates every parameter): decay ranges and stochastic rounding follow global
    /// indices.
    offset: usize,
    len: usize,
    /// The fused AdamW's state (`None` when the optimizer is offloaded to the host).
    moments: Option<DeviceMoments>,
    state: DeviceBuffer<u32>,
    used: DeviceBuffer<u32>,
    /// The ZeRO shards of the whole parameter buffer, in rank order, over which the gradient
    /// norm is summed shard by shard (one shard, `0..len`, without ZeRO).
    norm_shards: Vec<Range<usize>>,
}

/// What the fused AdamW keeps on the device: its settings, the moments `m`, `v` (f32, one
/// per element the optimizer updates) and the decay table.
struct DeviceMoments {
    config: AdamWConfig,
    m: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    decay: DeviceDecayRanges,
}

/// Where the update of a step runs.
enum Update<'a> {
    /// The fused AdamW on the device, into `master` and `working` (the optimizer's range).
    Device {
        master: &'a mut DeviceBuffer<f32>,
        working: WorkingCopyMut<'a>,
        lr: f32,
    },
    /// On the host: the gradients of the range are copied into this pinned buffer.
    Host(&'a mut PinnedBuffer<f32>),
}

/// The gradients an offloaded step ([`DeviceOptimizer::step_offloaded`]) checks and hands
/// to the host: the three cases of [`DeviceOptimizer::step`],
/// [`DeviceOptimizer::step_shard`] and [`DeviceOptimizer::step_own_shard`].
pub enum OffloadGrads<'a> {
    /// The optimizer covers every parameter: the full gradient buffer itself.
    Whole,
    /// The shard copied out of the full averaged gradients (ZeRO stage 1); the check covers
    /// the full buffer.
    Shard(&'a mut DeviceBuffer<f32>),
    /// The rank's own averaged shard (ZeRO stages 2-3): checked, and the norm partials
    /// exchanged over the communicator (`None`: one rank).
    OwnShard(&'a mut DeviceBuffer<f32>, Option<&'a DeviceComm>),
}

impl std::fmt::Debug for DeviceOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOptimizer")
            .field("config", &self.moments.as_ref().map(|m| m.config))
            .field("rule", &self.rule)
            .field("grad_clip", &self.grad_clip)
            .field("rounding", &self.rounding)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn adamw_config(config: &OptimizerConfig) -> Result<AdamWConfig> {
    match config {
        OptimizerConfig::AdamW(c) => {
            c.validate().context("device AdamW settings")?;
            Ok(*c)
        }
        other => bail!(
            "the device optimizer runs AdamW only, this run asks for {}",
            other.kind()
        ),
    }
}

/// The decay table of `layout` as the fused kernel takes it (the same merged ranges the CPU
/// AdamW walks with `ParamLayout::for_each_segment`).
fn decay_table(layout: &ParamLayout) -> Result<DecayRanges> {
    let ranges = layout
        .decay_ranges()
        .iter()
        .map(|r| r.start as u64..r.end as u64);
    DecayRanges::merged(ranges).map_err(|e| anyhow!("weight-decay ranges of the layout: {e}"))
}

/// A loss scaler with `base`'s settings and the given state. `LossScaler` keeps its state
/// private and offers no setter; its serde form is its public checkpoint format, so the state
/// goes in through that, and the result is checked field by field.
fn scaler_with(
    base: &LossScaler,
    scale: f32,
    growth_tracker: u32,
    skipped: u64,
) -> Result<LossScaler> {
    let mut value = serde_json::to_value(base).context("serialising the loss scaler")?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| anyhow!("the loss scaler does not serialise as an object"))?;
    obj.insert("scale".into(), serde_json::json!(scale));
    obj.insert("growth_tracker".into(), serde_json::json!(growth_tracker));
    obj.insert("skipped_steps".into(), serde_json::json!(skipped));
    let s: LossScaler =
        serde_json::from_value(value).context("rebuilding the loss scaler from device state")?;
    ensure!(
        s.scale().to_bits() == scale.to_bits()
            && s.growth_tracker() == growth_tracker
            && s.skipped_steps() == skipped,
        "the loss scaler's serialised form changed: cannot set scale {scale}, growth tracker \
         {growth_tracker}, skipped steps {skipped}"
    );
    Ok(s)
}

impl DeviceOptimizer {
    /// A fresh optimizer (zero moments, no step taken) for the parameters of `layout`.
    ///
    /// * `config`: must be AdamW (the device has no SGD kernel);
    /// * `scaler`: its settings give the loss-scale rule; its current scale, growth tracker
    ///   and skipped count seed the step state (so a scaler mid-run carries over);
    /// * `grad_clip`: the global-norm clip (`--grad-clip`), 0 turns clipping off;
    /// * `rounding`: how a bf16 working copy is rounded (the seed of stochastic rounding).
    pub fn new(
        dev: &Device,
        config: &OptimizerConfig,
        layout: &ParamLayout,
        scaler: &LossScaler,
        grad_clip: f64,
        rounding: Rounding,
    ) -> Result<Self> {
        let optimizer =
            Optimizer::new(*config, layout.len()).context("building the host-side AdamW")?;
        Self::build(
            dev,
            &optimizer,
            layout,
            0..layout.len(),
            scaler,
            grad_clip,
            rounding,
            true,
        )
    }

    /// An optimizer resumed from host state (a checkpoint, or the CPU optimizer's state): the
    /// moments, step count and scaler state of `host`, its master weights uploaded into
    /// `master` (which must have `layout.len()` elements). Synchronous.
    pub fn from_host(
        dev: &Device,
        host: &HostOptimizerState,
        layout: &ParamLayout,
        grad_clip: f64,
        rounding: Rounding,
        master: &mut DeviceBuffer<f32>,
    ) -> Result<Self> {
        ensure!(
            host.master.len() == layout.len() && master.len() == layout.len(),
            "resuming the device optimizer: host master has {} elements, device master {}, \
             the layout {}",
            host.master.len(),
            master.len(),
            layout.len()
        );
        let opt = Self::build(
            dev,
            &host.optimizer,
            layout,
            0..layout.len(),
            &host.scaler,
            grad_clip,
            rounding,
            true,
        )?;
        master
            .copy_from_host(&host.master)
            .context("uploading the master weights")?;
        Ok(opt)
    }

    /// An optimizer for the elements `shard` of `layout` only (ZeRO stage 1: each rank updates
    /// its shard): `host` holds the shard's master weights and moments (`shard.len()` each)
    /// with the step count and scaler state. Returns the optimizer and the master shard
    /// uploaded to the device. Synchronous.
    pub fn from_host_shard(
        dev: &Device,
        host: &HostOptimizerState,
        layout: &ParamLayout,
        shard: std::ops::Range<usize>,
        grad_clip: f64,
        rounding: Rounding,
    ) -> Result<(Self, DeviceBuffer<f32>)> {
        ensure!(
            host.master.len() == shard.len(),
            "the device optimizer's shard {shard:?} has {} elements, the host master {}",
            shard.len(),
            host.master.len()
        );
        let opt = Self::build(
            dev,
            &host.optimizer,
            layout,
            shard,
            &host.scaler,
            grad_clip,
            rounding,
            true,
        )?;
        let master = dev
            .htod(&host.master)
            .context("uploading the master weights of the shard")?;
        Ok((opt, master))
    }

    /// An optimizer whose state stays on the host (`--offload-optimizer`): the device keeps
    /// the step state only, for the elements `shard` of `layout`. `host` is the host's
    /// optimizer over the shard (any kind: the device never runs it); its applied step count
    /// seeds the step state, as do `scaler`'s scale, growth tracker and skipped count.
    /// Steps go through [`DeviceOptimizer::step_offloaded`].
    pub fn offloaded(
        dev: &Device,
        host: &Optimizer,
        layout: &ParamLayout,
        shard: Range<usize>,
        scaler: &LossScaler,
        grad_clip: f64,
    ) -> Result<Self> {
        Self::build(
            dev,
            host,
            layout,
            shard,
            scaler,
            grad_clip,
            Rounding::Nearest,
            false,
        )
    }

    /// `moments_here`: upload `optimizer`'s moments for the fused AdamW (which it must be);
    /// otherwise the device keeps the step state only.
    #[allow(clippy::too_many_arguments)]
    fn build(
        dev: &Device,
        optimizer: &Optimizer,
        layout: &ParamLayout,
        shard: std::ops::Range<usize>,
        scaler: &LossScaler,
        grad_clip: f64,
        rounding: Rounding,
        moments_here: bool,
    ) -> Result<Self> {
        ensure!(
            grad_clip.is_finite() && grad_clip >= 0.0,
            "--grad-clip must be finite and >= 0 (got {grad_clip})"
        );
        ensure!(
            shard.start <= shard.end && shard.end <= layout.len(),
            "the optimizer's range {shard:?} is outside the {} parameters",
            layout.len()
        );
        let len = shard.len();
        ensure!(
            optimizer.len() == len,
            "the optimizer state has {} elements, its range of the parameters {len}",
            optimizer.len()
        );
        let step = u32::try_from(optimizer.step_count()).map_err(|_| {
            anyhow!(
                "step count {} does not fit the device step state (u32)",
                optimizer.step_count()
            )
        })?;
        let skipped = u32::try_from(scaler.skipped_steps()).map_err(|_| {
            anyhow!(
                "skipped-step count {} does not fit the device step state (u32)",
                scaler.skipped_steps()
            )
        })?;
        let moments = if moments_here {
            let config = adamw_config(&optimizer.config())?;
            let buffers = optimizer.buffers();
            let host_buffer = |name: &str| {
                buffers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, b)| *b)
                    .ok_or_else(|| anyhow!("the AdamW state has no `{name}` buffer"))
            };
            let m = dev
                .htod(host_buffer("m")?)
                .context("uploading the AdamW first moment")?;
            let v = dev
                .htod(host_buffer("v")?)
                .context("uploading the AdamW second moment")?;
            let decay = dev
                .upload_decay_ranges(&decay_table(layout)?)
                .context("uploading the weight-decay ranges")?;
            Some(DeviceMoments {
                config,
                m,
                v,
                decay,
            })
        } else {
            None
        };
        let sc = scaler.config();
        let rule = ScalerRule {
            dynamic: scaler.is_enabled(),
            growth_interval: sc.growth_interval,
            growth_factor: sc.growth_factor,
            backoff_factor: sc.backoff_factor,
            // The host scaler's floor (it never backs off below min(MIN_SCALE, init_scale)).
            min_scale: crate::precision::MIN_SCALE.min(sc.init_scale),
        };
        let init = StepState {
            found_inf: false,
            scale: scaler.scale(),
            inv_scale: scaler.inv_scale(),
            growth_tracker: scaler.growth_tracker(),
            clip: 1.0,
            grad_norm: 0.0,
            step,
            skipped,
            last_found_inf: false,
        };
        let state = dev.step_state(&init).context("uploading the step state")?;
        let used = dev
            .step_state(&init)
            .context("allocating the used-state copy")?;
        Ok(DeviceOptimizer {
            dev: dev.clone(),
            scaler: scaler.clone(),
            rule,
            grad_clip,
            rounding,
            offset: shard.start,
            len,
            moments,
            state,
            used,
            norm_shards: std::iter::once(0..layout.len()).collect(),
        })
    }

    /// Sums the gradient norm shard by shard over `shards` (the ranks' ZeRO shards of the
    /// whole parameter buffer, in rank order, tiling it): per-shard partials, then one
    /// finish over them in shard order. A run whose ranks each hold only their shard's
    /// gradients ([`DeviceOptimizer::step_own_shard`]) computes the same partials on
    /// different ranks, so every ZeRO stage finds the same norm bit for bit.
    pub fn set_norm_shards(&mut self, shards: Vec<Range<usize>>) -> Result<()> {
        let mut at = 0;
        for r in &shards {
            ensure!(
                r.start == at && r.start <= r.end,
                "norm shards {shards:?} do not tile the parameters from 0 in order"
            );
            at = r.end;
        }
        let whole = self.norm_shards.last().map_or(0, |r| r.end);
        ensure!(
            at == whole,
            "norm shards {shards:?} cover {at} parameters, the layout has {whole}"
        );
        self.norm_shards = shards;
        Ok(())
    }

    /// Parameter elements this optimizer updates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it updates no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fused AdamW's hyperparameters (`None` when offloaded: the host's optimizer has
    /// them).
    pub fn config(&self) -> Option<&AdamWConfig> {
        self.moments.as_ref().map(|m| &m.config)
    }

    /// Whether the optimizer's state is on the host ([`DeviceOptimizer::offloaded`]).
    pub fn is_offloaded(&self) -> bool {
        self.moments.is_none()
    }

    /// The live step state (`STATE_WORDS` u32): its `SCALE` word seeds the next backward pass.
    pub fn state(&self) -> &DeviceBuffer<u32> {
        &self.state
    }

    /// The step state as the last step used it, copied just before the loss-scale update:
    /// `FOUND_INF`, the `SCALE` the step's gradients carry, `GRAD_NORM`, `CLIP`.
    pub fn used_state(&self) -> &DeviceBuffer<u32> {
        &self.used
    }

    /// One optimizer step, queued on the compute stream; returns before the device runs it.
    ///
    /// * `master`: fp32 master weights, `len` elements, updated;
    /// * `grads`: f32 gradients still multiplied by the loss scale, `len` elements; zeroed
    ///   at the end of the step, ready to accumulate the next one;
    /// * `working`: the bf16 / f16 working copy (`len` elements) rewritten from the master, or
    ///   `None` in fp32; `Bf16Stochastic` needs `Rounding::Stochastic`, `Bf16` needs
    ///   `Rounding::Nearest`;
    /// * `lr`: this step's learning rate (finite, >= 0);
    /// * `inject_nonfinite`: write `+inf` into `grads[0]` first (`--inject-nonfinite`).
    ///
    /// Launches, in order: (inject) -> non-finite check and norm partials -> norm and clip
    /// factor -> fused AdamW (it returns at once on the device when `FOUND_INF`) -> copy of the
    /// state ([`DeviceOptimizer::used_state`]) -> GradScaler update -> `grads = 0`.
    pub fn step(
        &mut self,
        master: &mut DeviceBuffer<f32>,
        grads: &mut DeviceBuffer<f32>,
        working: WorkingCopyMut<'_>,
        lr: f32,
        inject_nonfinite: bool,
    ) -> Result<()> {
        ensure!(
            self.offset == 0,
            "device optimizer: built for a shard starting at {}; use step_shard",
            self.offset
        );
        let update = Update::Device {
            master,
            working,
            lr,
        };
        self.queue_step(grads, None, update, inject_nonfinite, None)
    }

    /// One step of a shard optimizer ([`DeviceOptimizer::from_host_shard`]), queued on the
    /// compute stream: the non-finite check, the norm and the clip factor over `grads`, the
    /// full averaged gradients (identical on every rank, so every rank finds the same norm and
    /// skip decision as one unsharded optimizer would), then AdamW over the shard: `master`,
    /// `grad_shard` (the shard's gradients, copied out of `grads`) and `working` have the
    /// shard's length. Then the loss-scale update, and `grads = 0`. `inject_nonfinite` writes
    /// `+inf` into `grads[0]` first, as [`DeviceOptimizer::step`] does.
    pub fn step_shard(
        &mut self,
        master: &mut DeviceBuffer<f32>,
        grads: &mut DeviceBuffer<f32>,
        grad_shard: &mut DeviceBuffer<f32>,
        working: WorkingCopyMut<'_>,
        lr: f32,
        inject_nonfinite: bool,
    ) -> Result<()> {
        ensure!(
            grads.len() >= self.offset + self.len,
            "device optimizer: the gradients have {} elements, the shard ends at {}",
            grads.len(),
            self.offset + self.len
        );
        let update = Update::Device {
            master,
            working,
            lr,
        };
        self.queue_step(grads, Some(grad_shard), update, inject_nonfinite, None)
    }

    /// One step of a shard optimizer whose rank holds the averaged gradients of its shard
    /// only (ZeRO stages 2 and 3): the non-finite check and the norm partials run over
    /// `grad_shard`, and the ranks exchange them over `comm` (collective: a sum of the
    /// partials, each rank's slots non-zero on that rank only, and a max of the non-finite
    /// flag; through host memory on the host-staged communicator — one host wait per step —
    /// on the device over NCCL), so every rank finishes the same global norm and skip
    /// decision. `None`: one rank, nothing to exchange. Then AdamW over the shard and the
    /// loss-scale update; `grads`, the tape's full-size accumulation buffer, is zeroed.
    /// `inject_nonfinite` writes `+inf` into `grad_shard[0]` first.
    #[allow(clippy::too_many_arguments)]
    pub fn step_own_shard(
        &mut self,
        master: &mut DeviceBuffer<f32>,
        grads: &mut DeviceBuffer<f32>,
        grad_shard: &mut DeviceBuffer<f32>,
        working: WorkingCopyMut<'_>,
        lr: f32,
        inject_nonfinite: bool,
        comm: Option<&DeviceComm>,
    ) -> Result<()> {
        let world = comm.map_or(1, |c| c.world_size());
        ensure!(
            self.norm_shards.len() == world,
            "device optimizer: {} norm shards for {world} ranks",
            self.norm_shards.len(),
        );
        let update = Update::Device {
            master,
            working,
            lr,
        };
        self.queue_step(
            grads,
            Some(grad_shard),
            update,
            inject_nonfinite,
            Some(comm),
        )
    }

    /// One step of an offloaded optimizer ([`DeviceOptimizer::offloaded`]), queued on the
    /// compute stream: (inject) -> non-finite check and norm partials over the gradients
    /// `source` names (exchanged between the ranks for [`OffloadGrads::OwnShard`]) -> norm
    /// and clip factor -> copy of this optimizer's gradients (still multiplied by the loss
    /// scale, `len()` elements) into `staging` -> copy of the state
    /// ([`DeviceOptimizer::used_state`]) -> GradScaler update -> `grads = 0`. The same
    /// launches as [`DeviceOptimizer::step`] and its shard forms, with the fused AdamW
    /// replaced by the copy to the host.
    ///
    /// The host then reads `used_state()` (`FOUND_INF`, `INV_SCALE`, `CLIP`) and, unless a
    /// non-finite value was found, updates from `staging` once its copy has landed
    /// ([`PinnedBuffer::as_slice`] waits for it). `inject_nonfinite` writes `+inf` into the
    /// checked buffer's element 0 first.
    pub fn step_offloaded(
        &mut self,
        grads: &mut DeviceBuffer<f32>,
        source: OffloadGrads<'_>,
        staging: &mut PinnedBuffer<f32>,
        inject_nonfinite: bool,
    ) -> Result<()> {
        ensure!(
            self.is_offloaded(),
            "device optimizer: step_offloaded on an optimizer that updates on the device"
        );
        let update = Update::Host(staging);
        match source {
            OffloadGrads::Whole => {
                ensure!(
                    self.offset == 0,
                    "device optimizer: built for a shard starting at {}; pass its gradients",
                    self.offset
                );
                self.queue_step(grads, None, update, inject_nonfinite, None)
            }
            OffloadGrads::Shard(g) => {
                ensure!(
                    grads.len() >= self.offset + self.len,
                    "device optimizer: the gradients have {} elements, the shard ends at {}",
                    grads.len(),
                    self.offset + self.len
                );
                self.queue_step(grads, Some(g), update, inject_nonfinite, None)
            }
            OffloadGrads::OwnShard(g, comm) => {
                let world = comm.map_or(1, |c| c.world_size());
                ensure!(
                    self.norm_shards.len() == world,
                    "device optimizer: {} norm shards for {world} ranks",
                    self.norm_shards.len(),
                );
                self.queue_step(grads, Some(g), update, inject_nonfinite, Some(comm))
            }
        }
    }

    /// Non-finite check and norm over `grads`, the whole buffer, shard by shard.
    fn check_whole(&mut self, grads: &DeviceBuffer<f32>) -> Result<()> {
        let total: usize = self
            .norm_shards
            .iter()
            .map(|r| check_blocks(r.len() as u64) as usize)
            .sum();
        let mut partials = self.dev.alloc::<f32>(total)?;
        let mut at = 0;
        for r in &self.norm_shards {
            at += self.dev.grad_check_partials(
                grads,
                r.clone(),
                &mut self.state,
                &mut partials,
                at,
            )?;
        }
        // max_norm <= 0 turns clipping off in the finish kernel, as `--grad-clip 0` does.
        self.dev
            .grad_norm_finish(&partials, total, &mut self.state, self.grad_clip as f32)?;
        Ok(())
    }

    /// Non-finite check and norm partials over this rank's `shard`, exchanged with the
    /// other ranks over `comm` (none: one rank), then the finish over every rank's partials.
    fn check_exchanged(
        &mut self,
        shard: &DeviceBuffer<f32>,
        comm: Option<&DeviceComm>,
    ) -> Result<()> {
        let counts: Vec<usize> = self
            .norm_shards
            .iter()
            .map(|r| check_blocks(r.len() as u64) as usize)
            .collect();
        let total: usize = counts.iter().sum();
        let rank = comm.map_or(0, |c| c.rank());
        let at: usize = counts[..rank].iter().sum();
        let mut partials = self.dev.alloc::<f32>(total)?;
        // Every slot but this rank's stays zero, so the sum over ranks is each partial exactly
        // (in any order of summation).
        self.dev
            .fill(&mut partials, 0.0)
            .context("zeroing the norm partials")?;
        self.dev
            .grad_check_partials(shard, 0..shard.len(), &mut self.state, &mut partials, at)?;
        if let Some(comm) = comm {
            comm.all_reduce(&mut partials, 0..total, ReduceOp::Sum)
                .map_err(anyhow::Error::new)
                .context("exchanging the gradient norm partials")?;
            // The flag is 0 or 1 on every rank: the max is 1 when any rank found a
            // non-finite value.
            comm.all_reduce(&mut self.state, FOUND_INF..FOUND_INF + 1, ReduceOp::Max)
                .map_err(anyhow::Error::new)
                .context("exchanging the non-finite flag")?;
        }
        self.dev
            .grad_norm_finish(&partials, total, &mut self.state, self.grad_clip as f32)?;
        Ok(())
    }

    fn queue_step(
        &mut self,
        grads: &mut DeviceBuffer<f32>,
        grad_shard: Option<&mut DeviceBuffer<f32>>,
        update: Update<'_>,
        inject_nonfinite: bool,
        exchange: Option<Option<&DeviceComm>>,
    ) -> Result<()> {
        let mut grad_shard = grad_shard;
        self.check_step(grad_shard.as_deref().unwrap_or(&*grads), &update)?;
        // The buffer the check covers: the shard when ranks exchange partials, else the
        // whole gradients.
        let checked: &mut DeviceBuffer<f32> = match (exchange.is_some(), grad_shard.as_deref_mut())
        {
            (true, Some(s)) => s,
            (true, None) => bail!("device optimizer: an exchanged check needs the gradient shard"),
            (false, _) => &mut *grads,
        };
        if inject_nonfinite && !checked.is_empty() {
            // One-element fill of [0]: a kernel on the compute stream, no host copy.
            let args = [
                checked.arg_mut(),
                KernelArg::U64(1),
                KernelArg::F32(f32::INFINITY),
            ];
            let dev = &self.dev;
            dev.launch(&FILL_F32, &Problem::elems(1), &args, dev.compute_stream())
                .context("injecting +inf into the gradients")?;
        }
        match exchange {
            Some(comm) => {
                let shard = grad_shard
                    .as_deref()
                    .ok_or_else(|| anyhow!("device optimizer: no gradient shard"))?;
                self.check_exchanged(shard, comm)
            }
            None => self.check_whole(grads),
        }
        .context("gradient check and norm")?;
        let dev = &self.dev;
        let mine = grad_shard.as_deref().unwrap_or(&*grads);
        match update {
            Update::Device {
                master,
                working,
                lr,
            } => {
                let mo = self.moments.as_mut().ok_or_else(|| {
                    anyhow!("device optimizer: offloaded, the host runs the update")
                })?;
                let launch = AdamWLaunch {
                    lr,
                    beta1: mo.config.beta1,
                    beta2: mo.config.beta2,
                    eps: mo.config.eps,
                    weight_decay: mo.config.weight_decay,
                    offset: self.offset as u64,
                    seed: match self.rounding {
                        Rounding::Stochastic { seed } => seed,
                        Rounding::Nearest => 0,
                    },
                    // The gradients stay scaled; AdamW multiplies by INV_SCALE * CLIP (one
                    // f32 product, as the CPU AdamW's `grad_scale`).
                    unscale: true,
                };
                dev.adamw_step(
                    master,
                    mine,
                    &mut mo.m,
                    &mut mo.v,
                    working,
                    &mo.decay,
                    &self.state,
                    &launch,
                )
                .context("fused AdamW")?;
            }
            Update::Host(staging) => {
                // Ordered after the check on the compute stream, and before the zeroing
                // below (without ZeRO, `mine` is `grads`).
                staging
                    .copy_from_device_async(mine, dev.compute_stream())
                    .context("copying the gradients to the host")?;
            }
        }
        self.state
            .copy_to(&mut self.used)
            .context("copying the step state the step used")?;
        dev.amp_update(&mut self.state, &self.rule)
            .context("loss-scale update")?;
        dev.fill(grads, 0.0).context("zeroing the gradients")?;
        Ok(())
    }

    fn check_step(&self, grads: &DeviceBuffer<f32>, update: &Update<'_>) -> Result<()> {
        let n = self.len;
        ensure!(
            grads.len() == n,
            "device optimizer: gradients have {} elements, expected {n}",
            grads.len()
        );
        let (master, working, lr) = match update {
            Update::Device {
                master,
                working,
                lr,
            } => (&**master, working, *lr),
            Update::Host(staging) => {
                ensure!(
                    staging.len() == n,
                    "device optimizer: the host staging has {} elements, expected {n}",
                    staging.len()
                );
                return Ok(());
            }
        };
        ensure!(
            master.len() == n,
            "device optimizer: master has {} elements, expected {n}",
            master.len()
        );
        let (wlen, stochastic) = match working {
            WorkingCopyMut::None => (None, None),
            WorkingCopyMut::Bf16(w) => (Some(w.len()), Some(false)),
            WorkingCopyMut::Bf16Stochastic(w) => (Some(w.len()), Some(true)),
            WorkingCopyMut::F16(w) => (Some(w.len()), None),
        };
        if let Some(w) = wlen {
            ensure!(
                w == n,
                "device optimizer: working copy has {w} elements, expected {n}"
            );
        }
        let configured = matches!(self.rounding, Rounding::Stochastic { .. });
        if let Some(s) = stochastic {
            ensure!(
                s == configured,
                "device optimizer: the bf16 working copy is passed for {} rounding but the \
                 optimizer was built for {:?}",
                if s { "stochastic" } else { "nearest" },
                self.rounding
            );
        }
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "device optimizer: learning rate {lr} must be finite and >= 0"
        );
        Ok(())
    }

    /// The loss scaler as the device's step state has it now, with the number of applied
    /// steps (synchronous: waits for the compute stream).
    pub fn host_scaler(&self) -> Result<(LossScaler, u64)> {
        let st = self
            .dev
            .read_step_state(&self.state)
            .context("downloading the step state")?;
        let scaler = scaler_with(&self.scaler, st.scale, st.growth_tracker, st.skipped as u64)?;
        Ok((scaler, st.step as u64))
    }

    /// Downloads everything a checkpoint needs (synchronous: waits for the compute stream).
    /// `master`: the fp32 master weights this optimizer updates. A shard optimizer returns
    /// its shard (`len()` elements of master weights and moments).
    pub fn to_host(&self, master: &DeviceBuffer<f32>) -> Result<HostOptimizerState> {
        let mo = self.moments.as_ref().ok_or_else(|| {
            anyhow!("device optimizer: offloaded, its state is in the host's optimizer")
        })?;
        ensure!(
            master.len() == self.len,
            "device optimizer: master has {} elements, expected {}",
            master.len(),
            self.len
        );
        let master = master.to_vec().context("downloading the master weights")?;
        let m =
            mo.m.to_vec()
                .context("downloading the AdamW first moment")?;
        let v =
            mo.v.to_vec()
                .context("downloading the AdamW second moment")?;
        let (scaler, step) = self.host_scaler()?;
        let config = OptimizerConfig::AdamW(mo.config);
        let mut optimizer = Optimizer::new(config, self.len).context("host-side AdamW")?;
        for (name, buf) in optimizer.buffers_mut() {
            let src = if name == "m" { &m } else { &v };
            buf.copy_from_slice(src);
        }
        optimizer
            .restore_state(&OptimizerState {
                config,
                step,
                len: self.len,
            })
            .context("restoring the AdamW step count")?;
        Ok(HostOptimizerState {
            master,
            optimizer,
            scaler,
        })
    }
}

/// The device step state has `STATE_WORDS` words; the readback copies that many.
pub(super) const STATE_LEN: usize = STATE_WORDS;
