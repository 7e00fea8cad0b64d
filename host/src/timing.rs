//! Kernel timing with CUDA events, for the profiler's GPU track.
//!
//! On the simulated device there is no device time: each launch is recorded with the
//! simulator's counters instead (instructions, sectors, bank conflicts, tensor FLOPs), its
//! `start_ns` the host time it was submitted and `dur_ns` the host time the simulation took.
//!
//! When enabled ([`Device::enable_kernel_timing`]), every [`Device::launch`] records a timing
//! event on its stream before and after the kernel. [`Device::take_kernel_timings`] waits for
//! the recorded events and returns one [`KernelTiming`] per launch, with start times relative to
//! an origin event recorded at enable time and the kernel's FLOPs and bytes from its
//! descriptor, so achieved TFLOP/s and GB/s follow. Off by default: a disabled device does one
//! uncontended lock per launch.

use crate::device::Device;
use crate::error::Result;
use crate::stream::{Event, Stream};
use std::time::Instant;

/// One timed kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTiming {
    /// PTX entry name.
    pub entry: &'static str,
    /// Raw stream handle (as an integer), one track per stream.
    pub stream: u64,
    /// Start, nanoseconds after the origin event ([`KernelTimings::origin`]).
    pub start_ns: u64,
    pub dur_ns: u64,
    /// From the kernel descriptor.
    pub flops: u64,
    pub bytes: u64,
    /// What the launch did, on the simulated device (`None` on a GPU). When set, the times
    /// above are host times of the simulation, not device times.
    pub counters: Option<lathe_sim::Counters>,
}

/// Timings taken from a device, with the host time of their origin.
#[derive(Clone, Debug)]
pub struct KernelTimings {
    /// The host clock reading taken right after the origin event was recorded (the origin of
    /// `start_ns`, to within the launch latency).
    pub origin: Instant,
    pub kernels: Vec<KernelTiming>,
}

struct Pending {
    entry: &'static str,
    stream: u64,
    start: Event,
    end: Event,
    flops: u64,
    bytes: u64,
}

pub(crate) struct KernelTimer {
    origin: Event,
    origin_host: Instant,
    pending: Vec<Pending>,
    /// Simulated launches, recorded complete.
    simulated: Vec<KernelTiming>,
}

impl Device {
    /// Starts timing every launch with CUDA events (see the module documentation).
    pub fn enable_kernel_timing(&self) -> Result<()> {
        let origin = self.compute_stream().record()?;
        let t = KernelTimer {
            origin,
            origin_host: Instant::now(),
            pending: Vec::new(),
            simulated: Vec::new(),
        };
        *self.inner.timer.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(())
    }

    /// Stops timing; launches not yet taken are dropped.
    pub fn disable_kernel_timing(&self) {
        *self.inner.timer.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether launches are being timed.
    pub fn kernel_timing_enabled(&self) -> bool {
        self.inner
            .timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits for every timed launch so far and returns their timings (oldest first); timing
    /// stays enabled. `None` when timing is off.
    pub fn take_kernel_timings(&self) -> Result<Option<KernelTimings>> {
        let (origin, origin_host, pending, simulated) = {
            let mut g = self.inner.timer.lock().unwrap_or_else(|e| e.into_inner());
            let Some(t) = g.as_mut() else {
                return Ok(None);
            };
            (
                t.origin.clone(),
                t.origin_host,
                std::mem::take(&mut t.pending),
                std::mem::take(&mut t.simulated),
            )
        };
        if !simulated.is_empty() {
            return Ok(Some(KernelTimings {
                origin: origin_host,
                kernels: simulated,
            }));
        }
        let mut kernels = Vec::with_capacity(pending.len());
        for p in pending {
            p.end.synchronize()?;
            let start_ms = origin.elapsed_ms(&p.start)?.max(0.0) as f64;
            let dur_ms = p.start.elapsed_ms(&p.end)?.max(0.0) as f64;
            kernels.push(KernelTiming {
                entry: p.entry,
                stream: p.stream,
                start_ns: (start_ms * 1e6) as u64,
                dur_ns: (dur_ms * 1e6) as u64,
                flops: p.flops,
                bytes: p.bytes,
                counters: None,
            });
        }
        Ok(Some(KernelTimings {
            origin: origin_host,
            kernels,
        }))
    }

    /// Called by `launch` around a kernel when timing is on: the start event.
    pub(crate) fn timing_start(&self, stream: &Stream) -> Result<Option<Event>> {
        if !self.kernel_timing_enabled() {
            return Ok(None);
        }
        stream.record().map(Some)
    }

    /// Called by `launch` after the kernel with the start event from [`Device::timing_start`].
    pub(crate) fn timing_end(
        &self,
        start: Event,
        stream: &Stream,
        entry: &'static str,
        cost: lathe_kernels::Cost,
    ) -> Result<()> {
        let end = stream.record()?;
        let mut g = self.inner.timer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = g.as_mut() {
            t.pending.push(Pending {
                entry,
                stream: stream.key(),
                start,
                end,
                flops: cost.flops,
                bytes: cost.bytes,
            });
        }
        Ok(())
    }

    /// Records a completed simulated launch when timing is on.
    pub(crate) fn record_sim_launch(
        &self,
        entry: &'static str,
        stream: &Stream,
        submitted: Instant,
        cost: lathe_kernels::Cost,
        counters: lathe_sim::Counters,
    ) {
        let mut g = self.inner.timer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = g.as_mut() {
            let start_ns = submitted
                .saturating_duration_since(t.origin_host)
                .as_nanos() as u64;
            t.simulated.push(KernelTiming {
                entry,
                stream: stream.key(),
                start_ns,
                dur_ns: submitted.elapsed().as_nanos() as u64,
                flops: cost.flops,
                bytes: cost.bytes,
                counters: Some(counters),
            });
        }
    }
}
