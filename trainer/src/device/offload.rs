//! The host half of `--offload-optimizer` on a device run (ZeRO-Offload): pinned staging for
//! the gradients going down to the host and the new weights coming back, and the host update
//! between the two copies.
//!
//! One step, per rank: [`super::DeviceOptimizer::step_offloaded`] queues the non-finite check,
//! the norm and clip factor and the loss-scale update on the device, and a copy of the rank's
//! (averaged, still scaled) gradient shard into [`OffloadStaging`]'s pinned f32 buffer. The
//! host reads the step state the device used (one wait per step) and, unless a non-finite
//! value was found, runs its optimizer ([`HostOptimizer::step_staged`]: the CPU path's AdamW or
//! SGD) with the device's `1/scale` and clip factor, writing the new working-copy shard into a
//! pinned buffer, which goes back to the device on the compute stream, so the next forward
//! reads it in order. In fp32 the new master shard itself is the new weights, copied from the
//! host optimizer's buffer.
//!
//! The host AdamW computes the fused kernel's bits (`trainer/tests/core_adamw_twins.rs`), and
//! the skip, `1/scale` and clip factor are the device's own, so an offloaded device run takes
//! the resident device run's steps bit for bit.
//!
//! What is pinned: the two buffers that cross the bus each step. The master shard and the
//! moments stay in ordinary host memory: the moments never leave the host, and page-locked
//! memory is a scarce resource of the whole machine.

use crate::optim::{ParamLayout, Rounding, StepArgs, StepOutcome, WorkingCopy};
use crate::zero::HostOptimizer;
use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use lathe_autograd::DType;
use lathe_host::{Device, DeviceBuffer, PinnedBuffer};
use lathe_kernels::nn::amp::StepState;

/// The device buffer an offloaded update writes its new weights into: the working copy of
/// the optimizer's range (bf16 / f16), or in fp32 the f32 weights the forward reads. Its
/// length is the optimizer's.
pub enum WeightsMut<'a> {
    F32(&'a mut DeviceBuffer<f32>),
    Bf16(&'a mut DeviceBuffer<bf16>),
    F16(&'a mut DeviceBuffer<f16>),
}

/// The pinned buffer the new working-copy shard goes up through.
enum PinnedWorking {
    /// fp32: the host optimizer's master shard goes up instead.
    None,
    Bf16(PinnedBuffer<bf16>),
    F16(PinnedBuffer<f16>),
}

/// Pinned host staging of one rank's offloaded optimizer step: the gradient shard (f32,
/// device to host) and the new working-copy shard (bf16 / f16, host to device; none in fp32).
pub struct OffloadStaging {
    dev: Device,
    grads: PinnedBuffer<f32>,
    working: PinnedWorking,
}

impl OffloadStaging {
    /// Staging for an optimizer over `len` elements whose working copy is in `dtype`.
    pub fn new(dev: &Device, len: usize, dtype: DType) -> Result<Self> {
        let what = "pinned staging of the offloaded optimizer";
        let working = match dtype {
            DType::BF16 => PinnedWorking::Bf16(PinnedBuffer::new(dev, len).context(what)?),
            DType::F16 => PinnedWorking::F16(PinnedBuffer::new(dev, len).context(what)?),
            _ => PinnedWorking::None,
        };
        Ok(OffloadStaging {
            dev: dev.clone(),
            grads: PinnedBuffer::new(dev, len).context(what)?,
            working,
        })
    }

    /// The buffer [`super::DeviceOptimizer::step_offloaded`] copies the gradients into.
    pub fn grads_mut(&mut self) -> &mut PinnedBuffer<f32> {
        &mut self.grads
    }

    /// Bytes of pinned host memory held.
    pub fn bytes(&self) -> u64 {
        let w = match &self.working {
            PinnedWorking::None => 0,
            PinnedWorking::Bf16(b) => 2 * b.len(),
            PinnedWorking::F16(b) => 2 * b.len(),
        };
        (4 * self.grads.len() + w) as u64
    }

    /// The host update of a step whose device half was queued: `used` is the step state the
    /// device used (`DeviceOptimizer::used_state`, read back). A step with a non-finite
    /// gradient is skipped (nothing moves). Otherwise waits for the gradients' copy, updates
    /// `host` (`lr`; `offset`: the global index of the optimizer's first element; `rounding`
    /// of a bf16 working copy) and queues the copy of the new weights into `dst` on the
    /// compute stream (fp32: a synchronous copy of the master shard).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        host: &mut HostOptimizer,
        used: &StepState,
        lr: f32,
        offset: usize,
        rounding: Rounding,
        layout: &ParamLayout,
        dst: WeightsMut<'_>,
    ) -> Result<StepOutcome> {
        if used.found_inf {
            return Ok(StepOutcome::Skipped);
        }
        let args = StepArgs {
            lr,
            // The device's own f32 values: the product the fused kernel would have formed.
            inv_scale: used.inv_scale,
            clip_factor: used.clip,
            found_inf: false,
            offset,
        };
        let grads = self
            .grads
            .as_slice()
            .context("waiting for the gradients' copy to the host")?;
        let stream = self.dev.compute_stream();
        let up = "copying the updated weights to the device";
        let outcome = match (&mut self.working, dst) {
            (PinnedWorking::None, WeightsMut::F32(d)) => {
                let o = host.step_staged(grads, WorkingCopy::None, layout, &args)?;
                d.copy_from_host(host.master()).context(up)?;
                o
            }
            (PinnedWorking::Bf16(p), WeightsMut::Bf16(d)) => {
                let buf = p.as_mut_slice()?;
                let o =
                    host.step_staged(grads, WorkingCopy::Bf16 { buf, rounding }, layout, &args)?;
                p.copy_to_device_async(d, stream).context(up)?;
                o
            }
            (PinnedWorking::F16(p), WeightsMut::F16(d)) => {
                let buf = p.as_mut_slice()?;
                let o = host.step_staged(grads, WorkingCopy::F16(buf), layout, &args)?;
                p.copy_to_device_async(d, stream).context(up)?;
                o
            }
            _ => bail!("the offload staging and the device weights differ in dtype"),
        };
        Ok(outcome)
    }
}
