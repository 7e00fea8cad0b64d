//! [`StepReadback`]: each step's numbers reach the host one step late, without a host wait
//! inside a step.

use std::collections::VecDeque;

use anyhow::{Context, Result, anyhow, ensure};
use lathe_host::{Device, DeviceBuffer, Event, PinnedBuffer};
use lathe_kernels::nn::amp::StepState;

use super::optim::{DeviceOptimizer, STATE_LEN};

/// What the host learns about one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Index of the step among those recorded by this readback (0 for the first).
    pub step: u64,
    /// The caller's loss buffer as it was after the step (the step's summed loss).
    pub loss: f32,
    /// The loss scale the step's gradients carried.
    pub scale: f32,
    /// The loss scale for the next step (after the GradScaler update).
    pub next_scale: f32,
    /// The gradients held inf/NaN.
    pub found_inf: bool,
    /// The step was skipped (equals `found_inf`, in every precision).
    pub skipped: bool,
    /// Global L2 norm of the unscaled gradients (f32, non-finite when `found_inf`).
    pub grad_norm: f32,
    /// The clip factor the step applied (1 when clipping is off or the step is skipped).
    pub clip: f32,
    /// Optimizer steps applied so far, this one included when it was applied.
    pub applied_total: u32,
    /// Steps skipped so far, this one included when it was skipped.
    pub skipped_total: u32,
}

/// Pinned host memory for one step's copies, and the event after them.
struct Slot {
    used: PinnedBuffer<u32>,
    after: PinnedBuffer<u32>,
    loss: PinnedBuffer<f32>,
    event: Option<Event>,
    step: u64,
}

impl Slot {
    fn new(dev: &Device) -> Result<Self> {
        Ok(Slot {
            used: PinnedBuffer::new(dev, STATE_LEN).context("pinned step-state buffer")?,
            after: PinnedBuffer::new(dev, STATE_LEN).context("pinned step-state buffer")?,
            loss: PinnedBuffer::new(dev, 1).context("pinned loss buffer")?,
            event: None,
            step: 0,
        })
    }

    /// Waits for this slot's copies (queued a step or more ago) and decodes them.
    fn read(&mut self, waiter: Option<&Waiter>) -> Result<StepReport> {
        if let Some(e) = self.event.take() {
            let what = format!("waiting for step {}'s readback", self.step);
            match waiter {
                Some(w) => w(&e, &what),
                None => e.synchronize().map_err(anyhow::Error::new),
            }
            .with_context(|| what.clone())?;
        }
        let decode = |b: &PinnedBuffer<u32>| -> Result<StepState> {
            let words = b.as_slice().context("reading the pinned step state")?;
            StepState::from_words(words).ok_or_else(|| anyhow!("short step state"))
        };
        let used = decode(&self.used)?;
        let after = decode(&self.after)?;
        let loss = self.loss.as_slice().context("reading the pinned loss")?[0];
        Ok(StepReport {
            step: self.step,
            loss,
            scale: used.scale,
            next_scale: after.scale,
            found_inf: used.found_inf,
            skipped: used.found_inf,
            grad_norm: used.grad_norm,
            clip: used.clip,
            applied_total: after.step,
            skipped_total: after.skipped,
        })
    }
}

/// How the host waits for a readback's event: given the event and what the wait is for.
/// A run whose steps end behind NCCL collectives waits through its communicator, with a bound
/// (see `DeviceComm::wait_event`); by default the host waits on the event.
pub type Waiter = Box<dyn Fn(&Event, &str) -> Result<()> + Send>;

/// Asynchronous, one-step-behind readback of the step state and the loss.
///
/// After each step the caller calls [`StepReadback::record`]: it queues copies of the step
/// state (as the step used it and as the update left it) and of the loss into pinned host
/// memory on the compute stream, behind the step's kernels, and records an event. Nothing
/// waits. [`StepReadback::previous`] then returns the *previous* step's report, waiting on
/// that step's event only: by the time step `k + 1` has been queued, step `k` has usually
/// finished on the device, so the wait is short or nil, and the device queue never drains for
/// the host's sake. The last step is read by [`StepReadback::finish`].
///
/// Two slots of pinned memory alternate. If the caller records a third step before reading the
/// first, the first is read then (a wait on an event two steps old) and kept until asked for.
pub struct StepReadback {
    dev: Device,
    slots: [Slot; 2],
    /// Slots with copies queued and not yet read, oldest first.
    pending: VecDeque<usize>,
    /// Reports read (because a slot was needed) and not yet returned, oldest first.
    ready: VecDeque<StepReport>,
    next_slot: usize,
    next_step: u64,
    waiter: Option<Waiter>,
}

impl StepReadback {
    pub fn new(dev: &Device) -> Result<Self> {
        Ok(StepReadback {
            dev: dev.clone(),
            slots: [Slot::new(dev)?, Slot::new(dev)?],
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            next_slot: 0,
            next_step: 0,
            waiter: None,
        })
    }

    /// Waits for the readback events through `waiter` instead of on the event itself.
    pub fn set_waiter(&mut self, waiter: Waiter) {
        self.waiter = Some(waiter);
    }

    /// Queues the readback of the step `opt` has just queued, and of `loss` (one f32: the
    /// step's summed loss, on the device). Call once per step, after
    /// [`DeviceOptimizer::step`]. Does not wait for the device.
    pub fn record(&mut self, opt: &DeviceOptimizer, loss: &DeviceBuffer<f32>) -> Result<()> {
        ensure!(
            loss.len() == 1,
            "step readback: the loss buffer has {} elements, expected 1",
            loss.len()
        );
        if self.pending.len() == self.slots.len()
            && let Some(oldest) = self.pending.pop_front()
        {
            let r = self.slots[oldest].read(self.waiter.as_ref())?;
            self.ready.push_back(r);
        }
        let i = self.next_slot;
        let s = self.dev.compute_stream();
        let slot = &mut self.slots[i];
        slot.used
            .copy_from_device_async(opt.used_state(), s)
            .context("queueing the step-state readback")?;
        slot.after
            .copy_from_device_async(opt.state(), s)
            .context("queueing the step-state readback")?;
        slot.loss
            .copy_from_device_async(loss, s)
            .context("queueing the loss readback")?;
        slot.event = Some(
            s.record_sync_point()
                .context("recording the readback event")?,
        );
        slot.step = self.next_step;
        self.pending.push_back(i);
        self.next_slot = (i + 1) % self.slots.len();
        self.next_step += 1;
        Ok(())
    }

    /// The report of the step before the last recorded one, once per step: `None` until a
    /// second step has been recorded (the newest step is never read here, so the host never
    /// waits for the step it has just queued).
    pub fn previous(&mut self) -> Result<Option<StepReport>> {
        if let Some(r) = self.ready.pop_front() {
            return Ok(Some(r));
        }
        if self.pending.len() < 2 {
            return Ok(None);
        }
        match self.pending.pop_front() {
            Some(oldest) => self.slots[oldest].read(self.waiter.as_ref()).map(Some),
            None => Ok(None),
        }
    }

    /// At the end of training: every report not yet returned, the last step's included,
    /// oldest first (waits for the device).
    pub fn finish(&mut self) -> Result<Vec<StepReport>> {
        let mut out: Vec<StepReport> = self.ready.drain(..).collect();
        while let Some(i) = self.pending.pop_front() {
            out.push(self.slots[i].read(self.waiter.as_ref())?);
        }
        Ok(out)
    }
}
