//! Streams and events, on a GPU (CUDA streams and events) or on the simulated device.
//!
//! The simulated device runs each launch and copy to completion when it is submitted, so its
//! streams are in order by construction and its events are always complete; they keep no time
//! ([`Event::elapsed_ms`] is an error there: the simulator has no timing model).

use crate::error::{Context, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream, sys};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug)]
pub(crate) enum StreamInner {
    Cuda(Arc<CudaStream>),
    /// A simulated stream: an identity for the allocator's pools, nothing to wait for.
    Sim(u64),
}

/// A stream: work submitted to it runs in order.
#[derive(Clone, Debug)]
pub struct Stream {
    pub(crate) inner: StreamInner,
}

impl Stream {
    pub(crate) fn cuda(s: Arc<CudaStream>) -> Stream {
        Stream {
            inner: StreamInner::Cuda(s),
        }
    }

    pub(crate) fn sim() -> Stream {
        // Distinct from every CUstream value the allocator may also see (small odd numbers
        // are never valid pointers).
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Stream {
            inner: StreamInner::Sim(NEXT.fetch_add(2, Ordering::Relaxed)),
        }
    }

    /// The CUDA stream handle, for calling CUDA libraries (cuBLASLt, NCCL) on it; `None` on
    /// the simulated device.
    pub fn raw(&self) -> Option<sys::CUstream> {
        match &self.inner {
            StreamInner::Cuda(s) => Some(s.cu_stream()),
            StreamInner::Sim(_) => None,
        }
    }

    /// The raw handle for driver calls; the simulated device never reaches them.
    pub(crate) fn cu(&self) -> Result<sys::CUstream> {
        self.raw()
            .ok_or_else(|| Error::Invalid("a simulated stream has no CUDA handle".into()))
    }

    /// The allocator's key for this stream's pools.
    pub(crate) fn key(&self) -> u64 {
        match &self.inner {
            StreamInner::Cuda(s) => s.cu_stream() as usize as u64,
            StreamInner::Sim(id) => *id,
        }
    }

    /// Whether this is a simulated stream.
    pub fn is_sim(&self) -> bool {
        matches!(self.inner, StreamInner::Sim(_))
    }

    /// Blocks the host until everything submitted so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            StreamInner::Cuda(s) => s.synchronize().ctx("cuStreamSynchronize"),
            StreamInner::Sim(_) => Ok(()),
        }
    }

    /// Records an event (with timing) at the current end of the stream.
    pub fn record(&self) -> Result<Event> {
        match &self.inner {
            StreamInner::Cuda(s) => {
                let e = s
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .ctx("cuEventRecord")?;
                Ok(Event {
                    inner: EventInner::Cuda(Arc::new(e)),
                })
            }
            StreamInner::Sim(_) => Ok(Event {
                inner: EventInner::Sim,
            }),
        }
    }

    /// Records an event without timing (cheaper; for ordering only).
    pub fn record_sync_point(&self) -> Result<Event> {
        match &self.inner {
            StreamInner::Cuda(s) => {
                let e = s.record_event(None).ctx("cuEventRecord")?;
                Ok(Event {
                    inner: EventInner::Cuda(Arc::new(e)),
                })
            }
            StreamInner::Sim(_) => Ok(Event {
                inner: EventInner::Sim,
            }),
        }
    }

    /// Makes later work on this stream wait for `event` (no host blocking).
    pub fn wait(&self, event: &Event) -> Result<()> {
        match (&self.inner, &event.inner) {
            (StreamInner::Cuda(s), EventInner::Cuda(e)) => s.wait(e).ctx("cuStreamWaitEvent"),
            (StreamInner::Sim(_), EventInner::Sim) => Ok(()),
            _ => Err(Error::Invalid(
                "a stream cannot wait for an event of another kind of device".into(),
            )),
        }
    }

    /// Makes later work on this stream wait for everything submitted to `other` so far.
    pub fn join(&self, other: &Stream) -> Result<()> {
        match (&self.inner, &other.inner) {
            (StreamInner::Cuda(s), StreamInner::Cuda(o)) => s.join(o).ctx("cuStreamWaitEvent"),
            (StreamInner::Sim(_), StreamInner::Sim(_)) => Ok(()),
            _ => Err(Error::Invalid(
                "a stream cannot wait for a stream of another kind of device".into(),
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum EventInner {
    Cuda(Arc<CudaEvent>),
    /// On the simulated device the work before an event is always done.
    Sim,
}

/// A point in a stream's work.
#[derive(Clone, Debug)]
pub struct Event {
    pub(crate) inner: EventInner,
}

impl Event {
    /// Blocks the host until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            EventInner::Cuda(e) => e.synchronize().ctx("cuEventSynchronize"),
            EventInner::Sim => Ok(()),
        }
    }

    /// Whether the work before the event has finished (false on a query error).
    pub fn is_complete(&self) -> bool {
        match &self.inner {
            EventInner::Cuda(e) => e.try_is_complete().unwrap_or(false),
            EventInner::Sim => true,
        }
    }

    /// Milliseconds from `self` to `end` (both recorded with timing). An error on the
    /// simulated device, which keeps no time.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        match (&self.inner, &end.inner) {
            (EventInner::Cuda(s), EventInner::Cuda(e)) => s.elapsed_ms(e).ctx("cuEventElapsedTime"),
            _ => Err(Error::Invalid(
                "the simulated device has no timing model: events carry no time".into(),
            )),
        }
    }
}

impl crate::alloc::Pending for Event {
    fn is_complete(&self) -> bool {
        Event::is_complete(self)
    }
}
