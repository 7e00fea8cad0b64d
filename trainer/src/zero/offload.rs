//! Where a rank's fp32 master shard and optimizer state live, and the step that updates them:
//! next to the parameters ([`OptimizerShard::Resident`]) or in host memory
//! ([`HostOptimizer`], `--offload-optimizer`).

use crate::optim::{
    OptimError, Optimizer, OptimizerConfig, ParamLayout, StepArgs, StepOutcome, WorkingCopy,
};
use half::{bf16, f16};
use lathe_autograd::DType;

/// The new working-copy shard as the host writes it, before it is copied back.
#[derive(Debug)]
enum HostWorking {
    /// fp32: there is no separate working copy (the master shard is copied back instead).
    None,
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// ZeRO-Offload's half of a rank: the fp32 master shard, the optimizer state for it, and the
/// staging buffers the step moves data through, all in host memory.
///
/// A step copies the gradient shard in (device to host on a GPU), runs the fused update on the
/// host — the optimizer's CPU twin, which splits the shard into fixed chunks on the rayon pool —
/// and copies the rounded working-copy shard out (host to device). The arithmetic is exactly
/// the resident optimizer's, so offloading changes no bit of the result. On the CPU backend the
/// two copies are `memcpy`s within host memory; see the module documentation.
#[derive(Debug)]
pub struct HostOptimizer {
    master: Vec<f32>,
    optimizer: Optimizer,
    /// Staging: the gradient shard, f32, `master.len()` elements.
    grads: Vec<f32>,
    /// Staging: the working-copy shard (bf16/f16), `master.len()` elements, or none in fp32.
    working: HostWorking,
}

impl HostOptimizer {
    /// A host optimizer over `master` (the shard's fp32 weights), with fresh state, for a run
    /// whose working copy is in `dtype`.
    pub fn new(
        config: OptimizerConfig,
        master: Vec<f32>,
        dtype: DType,
    ) -> Result<Self, OptimError> {
        let n = master.len();
        let working = match dtype {
            DType::BF16 => HostWorking::Bf16(vec![bf16::ZERO; n]),
            DType::F16 => HostWorking::F16(vec![f16::ZERO; n]),
            _ => HostWorking::None,
        };
        Ok(HostOptimizer {
            optimizer: Optimizer::new(config, n)?,
            grads: vec![0.0; n],
            master,
            working,
        })
    }

    /// The fp32 master shard.
    pub fn master(&self) -> &[f32] {
        &self.master
    }

    /// The optimizer and its state.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Frees the host staging buffers: a device run stages through pinned buffers of its own
    /// (`crate::device::OffloadStaging`) and steps with [`HostOptimizer::step_staged`].
    /// [`HostOptimizer::step`] is an error afterwards.
    pub fn release_staging(&mut self) {
        self.grads = Vec::new();
        self.working = HostWorking::None;
    }

    /// One update from gradients the caller staged: `grads` (the shard's reduced gradients,
    /// still multiplied by the loss scale: `args.inv_scale` unscales them) and the new
    /// working-copy shard written into the caller's `working` (`WorkingCopy::None` in fp32,
    /// where [`HostOptimizer::master`] is the new weights). A device run passes its pinned
    /// buffers. The arithmetic of [`HostOptimizer::step`], without its copies.
    pub fn step_staged(
        &mut self,
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        if args.found_inf {
            return Ok(StepOutcome::Skipped);
        }
        self.optimizer
            .step(&mut self.master, grads, working, layout, args)
    }

    /// Bytes of the staging buffers (gradient shard and working-copy shard).
    pub fn staging_bytes(&self) -> u64 {
        let w = match &self.working {
            HostWorking::None => 0,
            HostWorking::Bf16(b) => 2 * b.len(),
            HostWorking::F16(b) => 2 * b.len(),
        };
        (4 * self.grads.len() + w) as u64
    }

    /// One step: copy `grads` (the shard's reduced gradients, `master.len()` elements) in,
    /// update on the host, copy the new working-copy shard into `working` (which must be the
    /// precision this optimizer was built for, or `None`). Skipped steps move nothing.
    pub fn step(
        &mut self,
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        let n = self.master.len();
        let mismatch = |buffer, found| OptimError::LengthMismatch {
            buffer,
            expected: n,
            found,
        };
        if grads.len() != n {
            return Err(mismatch("grads", grads.len()));
        }
        if self.grads.len() != n {
            return Err(mismatch(
                "host staging (released for a device run's pinned staging)",
                self.grads.len(),
            ));
        }
        if let Some(w) = working.buffer_len().filter(|&w| w != n) {
            return Err(mismatch("working", w));
        }
        if args.found_inf {
            return Ok(StepOutcome::Skipped);
        }
        // Device to host: the gradient shard.
        self.grads.copy_from_slice(grads);
        let (master, g, opt) = (&mut self.master, &self.grads, &mut self.optimizer);
        let outcome = match (working, &mut self.working) {
            (WorkingCopy::None, _) => opt.step(master, g, WorkingCopy::None, layout, args)?,
            (WorkingCopy::Bf16 { buf, rounding }, HostWorking::Bf16(host)) => {
                let host_copy = WorkingCopy::Bf16 {
                    buf: host,
                    rounding,
                };
                let o = opt.step(master, g, host_copy, layout, args)?;
                // Host to device: the new working-copy shard.
                buf.copy_from_slice(host);
                o
            }
            (WorkingCopy::F16(buf), HostWorking::F16(host)) => {
                let o = opt.step(master, g, WorkingCopy::F16(host), layout, args)?;
                buf.copy_from_slice(host);
                o
            }
            (w, _) => {
                return Err(mismatch(
                    "working (dtype differs from the offloaded optimizer's)",
                    w.buffer_len().unwrap_or(0),
                ));
            }
        };
        Ok(outcome)
    }
}

/// A rank's fp32 master shard with the optimizer state that updates it.
#[derive(Debug)]
pub enum OptimizerShard {
    /// Next to the parameters (in device memory, on a GPU).
    Resident {
        master: Vec<f32>,
        optimizer: Optimizer,
    },
    /// In host memory (`--offload-optimizer`).
    Offloaded(HostOptimizer),
}

impl OptimizerShard {
    /// Fresh state over `master`; `offload` puts it in a [`HostOptimizer`] whose staging
    /// matches the working-copy `dtype`.
    pub fn new(
        config: OptimizerConfig,
        master: Vec<f32>,
        offload: bool,
        dtype: DType,
    ) -> Result<Self, OptimError> {
        if offload {
            return Ok(OptimizerShard::Offloaded(HostOptimizer::new(
                config, master, dtype,
            )?));
        }
        Ok(OptimizerShard::Resident {
            optimizer: Optimizer::new(config, master.len())?,
            master,
        })
    }

    /// The fp32 master shard.
    pub fn master(&self) -> &[f32] {
        match self {
            OptimizerShard::Resident { master, .. } => master,
            OptimizerShard::Offloaded(h) => h.master(),
        }
    }

    /// The fp32 master shard, writable (loading a checkpoint).
    pub fn master_mut(&mut self) -> &mut [f32] {
        match self {
            OptimizerShard::Resident { master, .. } => master,
            OptimizerShard::Offloaded(h) => &mut h.master,
        }
    }

    /// The optimizer (its state covers the master shard).
    pub fn optimizer(&self) -> &Optimizer {
        match self {
            OptimizerShard::Resident { optimizer, .. } => optimizer,
            OptimizerShard::Offloaded(h) => h.optimizer(),
        }
    }

    /// The host optimizer when the state is offloaded.
    pub fn host_mut(&mut self) -> Option<&mut HostOptimizer> {
        match self {
            OptimizerShard::Resident { .. } => None,
            OptimizerShard::Offloaded(h) => Some(h),
        }
    }

    /// The optimizer, writable (loading a checkpoint).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        match self {
            OptimizerShard::Resident { optimizer, .. } => optimizer,
            OptimizerShard::Offloaded(h) => &mut h.optimizer,
        }
    }

    /// Whether the state lives in host memory.
    pub fn is_offloaded(&self) -> bool {
        matches!(self, OptimizerShard::Offloaded(_))
    }

    /// Bytes of optimizer state (moments), excluding the master.
    pub fn state_bytes(&self) -> u64 {
        let o = self.optimizer();
        o.buffers().iter().map(|(_, b)| 4 * b.len() as u64).sum()
    }

    /// Bytes of offload staging buffers (0 when resident).
    pub fn staging_bytes(&self) -> u64 {
        match self {
            OptimizerShard::Resident { .. } => 0,
            OptimizerShard::Offloaded(h) => h.staging_bytes(),
        }
    }

    /// One fused update of the shard (see [`Optimizer::step`]; `args.offset` is the shard's
    /// global start).
    pub fn step(
        &mut self,
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        match self {
            OptimizerShard::Resident { master, optimizer } => {
                optimizer.step(master, grads, working, layout, args)
            }
            OptimizerShard::Offloaded(h) => h.step(grads, working, layout, args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamWConfig, ParamView, Rounding};
    use lathe_kernels::rng::Rng;

    #[test]
    fn offloaded_step_is_bitwise_the_resident_step() {
        let n = 70_001;
        let layout = ParamLayout::new(
            vec![
                ParamView::new("w", 0, &[50_000], true),
                ParamView::new("b", 50_000, &[20_001], false),
            ],
            n,
        )
        .unwrap();
        let master = Rng::new(3).vec_f32(n, -1.0, 1.0);
        let grads = Rng::new(4).vec_f32(n, -1.0, 1.0);
        let cfg = OptimizerConfig::AdamW(AdamWConfig::default());
        let (lo, hi) = (10_000, 60_000);
        let mut res =
            OptimizerShard::new(cfg, master[lo..hi].to_vec(), false, DType::BF16).unwrap();
        let mut off = OptimizerShard::new(cfg, master[lo..hi].to_vec(), true, DType::BF16).unwrap();
        assert!(off.is_offloaded() && !res.is_offloaded());
        let (mut wr, mut wo) = (vec![bf16::ZERO; hi - lo], vec![bf16::ZERO; hi - lo]);
        for step in 0..3 {
            let args = StepArgs {
                offset: lo,
                found_inf: step == 1,
                ..StepArgs::new(1e-2)
            };
            let rounding = Rounding::Stochastic { seed: 5 };
            let a = res
                .step(
                    &grads[lo..hi],
                    WorkingCopy::Bf16 {
                        buf: &mut wr,
                        rounding,
                    },
                    &layout,
                    &args,
                )
                .unwrap();
            let b = off
                .step(
                    &grads[lo..hi],
                    WorkingCopy::Bf16 {
                        buf: &mut wo,
                        rounding,
                    },
                    &layout,
                    &args,
                )
                .unwrap();
            assert_eq!(a, b);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(res.master()), bits(off.master()));
        assert_eq!(wr, wo);
        assert_ne!(
            bits(res.master()),
            bits(&master[lo..hi]),
            "the steps did something"
        );
        assert_eq!(res.optimizer().step_count(), 2);
        assert_eq!(off.staging_bytes(), (6 * (hi - lo)) as u64);
        let e = off
            .step(
                &grads[..5],
                WorkingCopy::None,
                &layout,
                &StepArgs::new(1e-2),
            )
            .unwrap_err();
        assert!(matches!(e, OptimError::LengthMismatch { .. }), "{e}");
    }

    #[test]
    fn a_staged_step_is_the_staging_step_and_released_staging_refuses_the_other() {
        let n = 3_001;
        let layout = ParamLayout::new(vec![ParamView::new("w", 0, &[n], true)], n).unwrap();
        let master = Rng::new(6).vec_f32(n, -1.0, 1.0);
        let cfg = OptimizerConfig::AdamW(AdamWConfig::default());
        let mut a = HostOptimizer::new(cfg, master.clone(), DType::F16).unwrap();
        let mut b = HostOptimizer::new(cfg, master, DType::F16).unwrap();
        b.release_staging();
        assert_eq!(b.staging_bytes(), 0);
        let (mut wa, mut wb) = (vec![f16::ZERO; n], vec![f16::ZERO; n]);
        for step in 0..3u64 {
            let grads = Rng::new(10 + step).vec_f32(n, -1.0, 1.0);
            let args = StepArgs {
                inv_scale: 0.5,
                clip_factor: 0.75,
                found_inf: step == 1,
                ..StepArgs::new(1e-2)
            };
            let x = a
                .step(&grads, WorkingCopy::F16(&mut wa), &layout, &args)
                .unwrap();
            let y = b
                .step_staged(&grads, WorkingCopy::F16(&mut wb), &layout, &args)
                .unwrap();
            assert_eq!(x, y, "step {step}");
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a.master()), bits(b.master()));
        assert_eq!(a.optimizer(), b.optimizer());
        assert_eq!(wa, wb);
        let e = b
            .step(
                &vec![0.0; n],
                WorkingCopy::F16(&mut wb),
                &layout,
                &StepArgs::new(1e-2),
            )
            .unwrap_err();
        assert!(matches!(e, OptimError::LengthMismatch { .. }), "{e}");
    }
}
