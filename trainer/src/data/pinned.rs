//! Feeding the GPU: loader batches in pinned (page-locked) host buffers, copied to the device
//! on the copy stream so the copy of batch i+1 overlaps the compute of batch i.
//!
//! [`PinnedPool`] is a [`BufferPool`] of pinned buffers: the loader's workers write batches
//! straight into page-locked memory, so the host-to-device copy is an asynchronous DMA.
//! [`DeviceFeeder::upload`] starts the copies of a batch on the device's copy stream, records
//! an event, and returns the device batch; the compute stream waits on that event (no host
//! synchronisation). The pinned buffers go back to the pool only once their copy has completed.

use super::buffer::BufferPool;
use super::error::{DataError, Result};
use super::loader::{Batch, Loader};
use lathe_host::{Device, DeviceBuffer, Event, PinnedBuffer};
use std::collections::VecDeque;
use std::sync::Mutex;

fn host_err(what: &str, e: lathe_host::Error) -> DataError {
    DataError::Buffer(format!("{what}: {e}"))
}

/// One pinned token buffer.
pub struct PinnedTokens(PinnedBuffer<u32>);

impl AsRef<[u32]> for PinnedTokens {
    fn as_ref(&self) -> &[u32] {
        // The pool hands out, and the feeder returns, only idle buffers (no copy in flight),
        // so this is the whole buffer; an empty slice would only be seen if that invariant
        // were broken.
        self.0.idle_slice().unwrap_or(&[])
    }
}

impl AsMut<[u32]> for PinnedTokens {
    fn as_mut(&mut self) -> &mut [u32] {
        self.0.idle_slice_mut().unwrap_or(&mut [])
    }
}

/// A pool of pinned token buffers of one device.
pub struct PinnedPool {
    dev: Device,
    free: Mutex<Vec<PinnedTokens>>,
}

impl PinnedPool {
    pub fn new(dev: &Device) -> Self {
        PinnedPool {
            dev: dev.clone(),
            free: Mutex::new(Vec::new()),
        }
    }
}

impl BufferPool for PinnedPool {
    type Storage = PinnedTokens;

    fn acquire(&self, len: usize) -> Result<PinnedTokens> {
        let reused = self.free.lock().ok().and_then(|mut f| {
            let i = f.iter().position(|b| b.0.len() >= len)?;
            Some(f.swap_remove(i))
        });
        match reused {
            Some(b) => Ok(b),
            None => PinnedBuffer::new(&self.dev, len)
                .map(PinnedTokens)
                .map_err(|e| host_err("allocating a pinned batch buffer", e)),
        }
    }

    fn release(&self, mut storage: PinnedTokens) {
        if storage.0.wait_idle().is_ok()
            && let Ok(mut f) = self.free.lock()
        {
            f.push(storage);
        }
    }
}

/// A batch on the device.
pub struct DeviceBatch {
    /// `(B, T)` input token ids, u32.
    pub inputs: DeviceBuffer<u32>,
    /// `(B, T)` target token ids, u32 (`u32::MAX` where no loss is taken).
    pub targets: DeviceBuffer<u32>,
    pub b: usize,
    pub t: usize,
    /// Recorded on the copy stream after both copies: the compute stream must wait on it.
    pub ready: Event,
}

/// Uploads loader batches on the copy stream and recycles their pinned buffers when done.
pub struct DeviceFeeder {
    dev: Device,
    in_flight: VecDeque<(Batch<PinnedTokens>, Event)>,
}

impl DeviceFeeder {
    pub fn new(dev: &Device) -> Self {
        DeviceFeeder {
            dev: dev.clone(),
            in_flight: VecDeque::new(),
        }
    }

    /// Starts copying `batch` to the device and makes the compute stream wait for it; the
    /// returned buffers may be used by kernels on the compute stream right away.
    pub fn upload(
        &mut self,
        loader: &Loader<PinnedPool>,
        mut batch: Batch<PinnedTokens>,
    ) -> Result<DeviceBatch> {
        self.recycle_finished(loader);
        let n = batch.b * batch.t;
        let copy = self.dev.copy_stream().clone();
        let err = |e| host_err("uploading a batch", e);
        let mut inputs = self.dev.alloc_on::<u32>(n, &copy).map_err(err)?;
        let mut targets = self.dev.alloc_on::<u32>(n, &copy).map_err(err)?;
        copy_prefix(&mut batch.inputs.0, &mut inputs, &copy).map_err(err)?;
        copy_prefix(&mut batch.targets.0, &mut targets, &copy).map_err(err)?;
        let ready = copy.record_sync_point().map_err(err)?;
        self.dev.compute_stream().wait(&ready).map_err(err)?;
        inputs.record_stream(self.dev.compute_stream());
        targets.record_stream(self.dev.compute_stream());
        let (b, t) = (batch.b, batch.t);
        self.in_flight.push_back((batch, ready.clone()));
        Ok(DeviceBatch {
            inputs,
            targets,
            b,
            t,
            ready,
        })
    }

    /// Returns pinned buffers whose copies have completed to the loader's pool.
    pub fn recycle_finished(&mut self, loader: &Loader<PinnedPool>) {
        while let Some((_, e)) = self.in_flight.front() {
            if !e.is_complete() {
                break;
            }
            if let Some((b, _)) = self.in_flight.pop_front() {
                loader.recycle(b);
            }
        }
    }

    /// Batches whose copies have not been seen to complete yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Copies the first `dst.len()` elements of `src` (a pooled buffer may be longer).
fn copy_prefix(
    src: &mut PinnedBuffer<u32>,
    dst: &mut DeviceBuffer<u32>,
    stream: &lathe_host::Stream,
) -> lathe_host::Result<()> {
    if src.len() == dst.len() {
        return src.copy_to_device_async(dst, stream);
    }
    // A longer pooled buffer: stage through an exact-size pinned buffer (rare: the loader's
    // batches all have one size unless a curriculum is on).
    let mut exact = PinnedBuffer::<u32>::new(dst.device(), dst.len())?;
    let n = dst.len();
    let head = src.as_slice()?[..n].to_vec();
    exact.as_mut_slice()?.copy_from_slice(&head);
    exact.copy_to_device_async(dst, stream)?;
    exact.wait_idle()
}
