//! Streams and events.

use crate::error::{Context, Result};
use cudarc::driver::{CudaEvent, CudaStream, sys};
use std::sync::Arc;

/// A CUDA stream: work submitted to it runs in order.
#[derive(Clone, Debug)]
pub struct Stream {
    pub(crate) inner: Arc<CudaStream>,
}

impl Stream {
    /// The raw handle, also the allocator's key for this stream's pools.
    pub fn raw(&self) -> sys::CUstream {
        self.inner.cu_stream()
    }

    pub(crate) fn key(&self) -> u64 {
        self.raw() as usize as u64
    }

    /// Blocks the host until everything submitted so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize().ctx("cuStreamSynchronize")
    }

    /// Records an event (with timing) at the current end of the stream.
    pub fn record(&self) -> Result<Event> {
        let e = self
            .inner
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("cuEventRecord")?;
        Ok(Event { inner: Arc::new(e) })
    }

    /// Records an event without timing (cheaper; for ordering only).
    pub fn record_sync_point(&self) -> Result<Event> {
        let e = self.inner.record_event(None).ctx("cuEventRecord")?;
        Ok(Event { inner: Arc::new(e) })
    }

    /// Makes later work on this stream wait for `event` (no host blocking).
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.inner.wait(&event.inner).ctx("cuStreamWaitEvent")
    }

    /// Makes later work on this stream wait for everything submitted to `other` so far.
    pub fn join(&self, other: &Stream) -> Result<()> {
        self.inner.join(&other.inner).ctx("cuStreamWaitEvent")
    }
}

/// A point in a stream's work.
#[derive(Clone, Debug)]
pub struct Event {
    pub(crate) inner: Arc<CudaEvent>,
}

impl Event {
    /// Blocks the host until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize().ctx("cuEventSynchronize")
    }

    /// Whether the work before the event has finished (false on a query error).
    pub fn is_complete(&self) -> bool {
        self.inner.try_is_complete().unwrap_or(false)
    }

    /// Milliseconds from `self` to `end` (both recorded with timing).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.inner.elapsed_ms(&end.inner).ctx("cuEventElapsedTime")
    }
}

impl crate::alloc::Pending for Event {
    fn is_complete(&self) -> bool {
        Event::is_complete(self)
    }
}
