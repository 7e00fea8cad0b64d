//! Value types the profiler records: phases, span arguments, GPU kernel records, the range-sink
//! hook and the clock.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The part of a training step a host span belongs to. The summary splits the measured step time
/// between these (plus an explicit "untracked" remainder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Fetching and staging batches (waiting on the loader, host-to-device copies).
    Data,
    /// The forward pass.
    Forward,
    /// The backward pass (including recomputation of checkpointed segments).
    Backward,
    /// The optimizer update (unscale, clip, moments, master update).
    Optimizer,
    /// Collective communication (all-reduce, reduce-scatter, all-gather, broadcast, barrier).
    Communication,
    /// Anything else the caller chose to mark (logging, evaluation, checkpointing).
    Other,
}

impl Phase {
    /// Every phase, in the order the summary prints them.
    pub const ALL: [Phase; 6] = [
        Phase::Data,
        Phase::Forward,
        Phase::Backward,
        Phase::Optimizer,
        Phase::Communication,
        Phase::Other,
    ];

    /// Lower-case name used in traces and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
            Phase::Communication => "communication",
            Phase::Other => "other",
        }
    }

    /// Position in [`Phase::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value attached to a span (for example the index of a transformer block). Shown in the trace's
/// `args` of the span.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    /// Signed integer.
    Int(i64),
    /// Unsigned integer.
    UInt(u64),
    /// Floating point number (non-finite values are written as strings in the trace).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Text.
    Str(Cow<'static, str>),
}

macro_rules! arg_from {
    ($($t:ty => $variant:ident as $as:ty),* $(,)?) => {$(
        impl From<$t> for ArgValue {
            fn from(v: $t) -> Self {
                ArgValue::$variant(v as $as)
            }
        }
    )*};
}

arg_from!(
    i64 => Int as i64,
    i32 => Int as i64,
    u64 => UInt as u64,
    u32 => UInt as u64,
    usize => UInt as u64,
    f64 => Float as f64,
    f32 => Float as f64,
);

impl From<bool> for ArgValue {
    fn from(v: bool) -> Self {
        ArgValue::Bool(v)
    }
}

impl From<&'static str> for ArgValue {
    fn from(v: &'static str) -> Self {
        ArgValue::Str(Cow::Borrowed(v))
    }
}

impl From<String> for ArgValue {
    fn from(v: String) -> Self {
        ArgValue::Str(Cow::Owned(v))
    }
}

/// One GPU kernel execution, measured by the GPU runtime (typically with a pair of CUDA events
/// around the launch) and handed to [`Profiler::kernel_span`](super::Profiler::kernel_span).
///
/// Times are in the profiler's time base: nanoseconds since the profiler was created, as returned
/// by [`Profiler::now_ns`](super::Profiler::now_ns). A runtime maps CUDA event times onto it by
/// recording one reference event together with `now_ns()` and adding event elapsed times to it.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRecord {
    /// Kernel name (the PTX entry name, so it can be found in the kernel registry).
    pub name: Cow<'static, str>,
    /// Stream the kernel ran on; each stream gets its own track in the trace.
    pub stream: u32,
    /// Start time in the profiler's time base, in nanoseconds.
    pub start_ns: u64,
    /// Duration in nanoseconds.
    pub dur_ns: u64,
    /// Floating point operations the launch performs (from the kernel descriptor), 0 if unknown.
    pub flops: u64,
    /// Minimum bytes the launch must move to or from device memory, 0 if unknown.
    pub bytes: u64,
    /// On the simulated device: what the launch did. Its times are then the host time the
    /// simulation took, not device time, and the record carries no FLOPs or bytes so that no
    /// rate is computed from them.
    pub simulated: Option<SimCounts>,
}

/// The simulated device's counters of one launch (see `lathe_sim::Counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounts {
    pub warp_instructions: u64,
    pub lane_instructions: u64,
    pub global_load_sectors: u64,
    pub global_store_sectors: u64,
    pub shared_bank_conflicts: u64,
    pub tensor_flops: u64,
    /// FLOPs and bytes of the kernel's descriptor (its napkin math).
    pub flops: u64,
    pub bytes: u64,
}

/// A receiver of nested named ranges, called on every span begin and end of an enabled profiler
/// (whatever the schedule says), so that an external tool such as NVTX sees the same ranges.
///
/// Calls from one thread nest like a stack: `pop_range` closes the range most recently pushed by
/// the same thread. Implementations must be cheap; they run inside the training loop.
pub trait RangeSink: Send + Sync {
    /// Opens a range named `name` on the calling thread.
    fn push_range(&self, name: &str);
    /// Closes the innermost range open on the calling thread.
    fn pop_range(&self);
}

/// A clock the caller advances by hand; time stands still between calls. Used for replaying
/// recorded timings and for deterministic tests. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Sets the time to `ns` nanoseconds.
    pub fn set_ns(&self, ns: u64) {
        self.0.store(ns, Ordering::Release);
    }

    /// Moves the time forward by `ns` nanoseconds.
    pub fn advance_ns(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::AcqRel);
    }
}

/// Where a profiler reads the time from.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The monotonic system clock (`std::time::Instant`), zero at profiler creation.
    #[default]
    Monotonic,
    /// A clock advanced by hand.
    Manual(ManualClock),
}

/// A finished host span as stored by the profiler.
#[derive(Clone, Debug)]
pub(crate) struct SpanRecord {
    pub name: Cow<'static, str>,
    pub phase: Phase,
    pub tid: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub args: Vec<(&'static str, ArgValue)>,
}

/// One sample of a counter track.
#[derive(Clone, Debug)]
pub(crate) struct CounterSample {
    pub name: Cow<'static, str>,
    pub ts_ns: u64,
    pub value: f64,
}

/// The time span of one recorded (active) step, measured on the thread that called `step()`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepWindow {
    pub step: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Thread that closed the step; its spans are split into phases.
    pub tid: u64,
}

/// Small integer id of the calling thread, stable for the thread's life, starting at 1.
pub(crate) fn thread_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}
