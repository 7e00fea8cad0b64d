//! [`DeviceBatch`]: token batches to the device on the copy stream, double-buffered.

use anyhow::{Context, Result, ensure};
use lathe_host::{Device, DeviceBuffer, Event, PinnedBuffer};

/// One of the two buffer sets: pinned staging memory and the device buffers it fills.
struct Slot {
    host_inputs: PinnedBuffer<u32>,
    host_targets: PinnedBuffer<u32>,
    inputs: DeviceBuffer<u32>,
    targets: DeviceBuffer<u32>,
    /// Recorded on the compute stream once the work reading this slot's previous batch was
    /// queued: the copy stream waits for it before overwriting the slot.
    released: Option<Event>,
}

/// Uploads each batch's `inputs` and `targets` (`B*T` token ids, u32) to the device.
///
/// The tokens go through pinned host memory to device buffers with copies on the device's
/// copy stream, so an upload overlaps the compute of the step before it. Ordering is by
/// events, never by a host wait: the compute stream waits for the upload's copies before the
/// kernels that follow, and the copy stream waits, before overwriting a slot, for the compute
/// work that read the slot's previous batch. Two slots alternate (double buffering).
///
/// Contract: the work that reads the buffers returned by one [`DeviceBatch::upload`] is queued
/// on the compute stream before the next call (the borrow of the returned buffers enforces
/// it). The buffers keep their contents until the call after next.
pub struct DeviceBatch {
    dev: Device,
    len: usize,
    slots: [Slot; 2],
    next: usize,
}

impl DeviceBatch {
    /// Buffers for batches of `len` tokens (`B*T`).
    pub fn new(dev: &Device, len: usize) -> Result<Self> {
        let slot = || -> Result<Slot> {
            Ok(Slot {
                host_inputs: PinnedBuffer::new(dev, len).context("pinned batch inputs")?,
                host_targets: PinnedBuffer::new(dev, len).context("pinned batch targets")?,
                inputs: dev.alloc(len).context("device batch inputs")?,
                targets: dev.alloc(len).context("device batch targets")?,
                released: None,
            })
        };
        Ok(DeviceBatch {
            dev: dev.clone(),
            len,
            slots: [slot()?, slot()?],
            next: 0,
        })
    }

    /// Tokens per batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether batches are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues the upload of one batch and returns the device buffers `(inputs, targets)`,
    /// `len` u32 each, ready for kernels queued on the compute stream after this call.
    pub fn upload(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<(&DeviceBuffer<u32>, &DeviceBuffer<u32>)> {
        ensure!(
            inputs.len() == self.len && targets.len() == self.len,
            "device batch: {} inputs and {} targets given, the batch holds {} tokens (B*T)",
            inputs.len(),
            targets.len(),
            self.len
        );
        let (compute, copy) = (self.dev.compute_stream(), self.dev.copy_stream());
        // Everything queued on the compute stream so far includes the work that read the
        // *other* slot's batch (the previous call's): that slot may be refilled after it.
        let other = 1 - self.next;
        self.slots[other].released = Some(
            compute
                .record_sync_point()
                .context("recording the batch release event")?,
        );
        let slot = &mut self.slots[self.next];
        if let Some(e) = slot.released.take() {
            copy.wait(&e)
                .context("ordering the batch upload after its last reader")?;
        }
        // `as_mut_slice` waits only for this slot's previous upload (two calls ago).
        slot.host_inputs
            .as_mut_slice()
            .context("pinned batch inputs")?
            .copy_from_slice(inputs);
        slot.host_targets
            .as_mut_slice()
            .context("pinned batch targets")?
            .copy_from_slice(targets);
        if self.len > 0 {
            slot.host_inputs
                .copy_to_device_async(&mut slot.inputs, copy)
                .context("uploading the batch inputs")?;
            slot.host_targets
                .copy_to_device_async(&mut slot.targets, copy)
                .context("uploading the batch targets")?;
        }
        let done = copy
            .record_sync_point()
            .context("recording the batch upload event")?;
        compute
            .wait(&done)
            .context("ordering the step after the batch upload")?;
        self.next = other;
        let slot = &self.slots[1 - other];
        Ok((&slot.inputs, &slot.targets))
    }
}
