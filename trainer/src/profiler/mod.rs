//! The Lathe profiler: host spans, counters and GPU kernel spans recorded on a step schedule, a
//! Chrome trace writer and an end-of-run summary table.
//!
//! ```
//! use lathe_trainer::profiler::{Phase, Profiler, Schedule};
//!
//! let prof = Profiler::new(Schedule::new(1, 1, 2)).expect("valid schedule");
//! for step in 0..6u64 {
//!     {
//!         let _s = prof.span("forward", Phase::Forward).arg("step", step);
//!         for block in 0..2u32 {
//!             let _b = prof.span("block", Phase::Forward).arg("block", block);
//!         }
//!     }
//!     prof.counter("allocated_bytes", 1024.0 * step as f64);
//!     prof.step();
//! }
//! let summary = prof.summary(None);
//! assert_eq!(summary.steps, vec![2, 3]);
//! ```
//!
//! A disabled profiler ([`Profiler::disabled`]) holds nothing: every call is one branch on a null
//! pointer. An enabled profiler in a wait step reads no clock and takes no lock; in warmup and active
//! steps a span costs two clock reads and one short lock (the summary prints the measured cost).
//!
//! Every method takes `&self`, so the profiler can be shared (for example in an `Arc`) with loader
//! threads; each OS thread becomes its own track in the trace. Spans of one thread must nest (close
//! in the reverse order of opening), which RAII guards give for free.

mod atomic;
mod chrome;
mod record;
mod schedule;
mod summary;
mod table;

pub(crate) use atomic::write_atomic;
pub use record::{ArgValue, Clock, KernelRecord, ManualClock, Phase, RangeSink, SimCounts};
pub use schedule::{Schedule, StepAction};
pub use summary::{
    KernelStat, Overhead, PhaseTime, Roofline, RooflineBound, SpanCost, SpanStat, Summary,
    calibrate_span_cost,
};

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use record::{CounterSample, SpanRecord, StepWindow, thread_id};

/// Errors of the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    /// The schedule cannot record anything.
    #[error("invalid profiler schedule: {0}")]
    InvalidSchedule(String),
    /// Writing the trace failed.
    #[error("cannot write trace {path}: {source}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Serialising the trace failed.
    #[error("cannot serialise trace: {0}")]
    Json(#[from] serde_json::Error),
}

/// The step profiler. See the [module documentation](self) for an example.
#[derive(Default)]
pub struct Profiler {
    inner: Option<Box<Inner>>,
}

/// Records of one or more steps.
#[derive(Default)]
pub(crate) struct Buffer {
    pub spans: Vec<SpanRecord>,
    pub counters: Vec<CounterSample>,
    pub kernels: Vec<KernelRecord>,
    /// Time spent inside record calls that stored into this buffer.
    pub overhead_ns: u64,
    /// Number of such calls.
    pub record_calls: u64,
}

impl Buffer {
    fn clear(&mut self) {
        self.spans.clear();
        self.counters.clear();
        self.kernels.clear();
        self.overhead_ns = 0;
        self.record_calls = 0;
    }

    fn append(&mut self, other: &mut Buffer) {
        self.spans.append(&mut other.spans);
        self.counters.append(&mut other.counters);
        self.kernels.append(&mut other.kernels);
        self.overhead_ns += std::mem::take(&mut other.overhead_ns);
        self.record_calls += std::mem::take(&mut other.record_calls);
    }
}

/// Everything behind the lock.
#[derive(Default)]
pub(crate) struct State {
    /// Index of the current step.
    pub step: u64,
    /// When the current step began.
    pub step_start_ns: u64,
    /// Records of the current step (kept if it is active, dropped otherwise).
    pub pending: Buffer,
    /// Records of finished active steps.
    pub committed: Buffer,
    /// Finished active steps, in order.
    pub windows: Vec<StepWindow>,
    /// Names of the threads that recorded something.
    pub threads: BTreeMap<u64, String>,
    /// What executes the kernel records ("GPU" unless set): the trace's process name and the
    /// summary's table title.
    pub device_label: Option<String>,
}

impl State {
    /// Whether `[start, end]` overlaps a finished active step.
    fn overlaps_window(&self, start: u64, end: u64) -> bool {
        let i = self.windows.partition_point(|w| w.end_ns <= start);
        self.windows
            .get(i)
            .is_some_and(|w| w.start_ns < end.max(start + 1))
    }

    fn note_thread(&mut self, tid: u64) {
        self.threads.entry(tid).or_insert_with(|| {
            let t = std::thread::current();
            match t.name() {
                Some(n) => n.to_string(),
                None => format!("thread {tid}"),
            }
        });
    }
}

struct Inner {
    schedule: Schedule,
    epoch: Instant,
    manual: Option<ManualClock>,
    action: AtomicU8,
    sink: Option<Box<dyn RangeSink>>,
    state: Mutex<State>,
}

impl Inner {
    fn action(&self) -> StepAction {
        StepAction::from_u8(self.action.load(Ordering::Relaxed))
    }

    /// The profiler time of the real instant `at`.
    fn time_at(&self, at: Instant) -> u64 {
        match &self.manual {
            Some(c) => c.now_ns(),
            None => at.saturating_duration_since(self.epoch).as_nanos() as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep recording.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, name: Cow<'static, str>, phase: Phase) -> SpanToken {
        let timed = self.action().records();
        let pushed = match &self.sink {
            Some(sink) => {
                sink.push_range(&name);
                true
            }
            None => false,
        };
        if !timed && !pushed {
            return SpanToken { open: None };
        }
        let (start_ns, tid) = if timed {
            (self.time_at(Instant::now()), thread_id())
        } else {
            (0, 0)
        };
        SpanToken {
            open: Some(OpenSpan {
                name,
                phase,
                start_ns,
                tid,
                args: Vec::new(),
                timed,
                pushed,
            }),
        }
    }

    fn end(&self, open: OpenSpan) {
        if open.pushed
            && let Some(sink) = &self.sink
        {
            sink.pop_range();
        }
        if !open.timed {
            return;
        }
        let enter = Instant::now();
        let end_ns = self.time_at(enter).max(open.start_ns);
        let mut st = self.lock();
        // A span reaching back into a finished active step belongs with that step's records;
        // otherwise it belongs to the current step if that one is timed.
        let into_committed = st.overlaps_window(open.start_ns, end_ns);
        if !into_committed && !self.action().records() {
            return;
        }
        st.note_thread(open.tid);
        let rec = SpanRecord {
            name: open.name,
            phase: open.phase,
            tid: open.tid,
            start_ns: open.start_ns,
            end_ns,
            args: open.args,
        };
        let buf = if into_committed {
            &mut st.committed
        } else {
            &mut st.pending
        };
        buf.spans.push(rec);
        buf.record_calls += 1;
        buf.overhead_ns += enter.elapsed().as_nanos() as u64;
    }
}

/// A span that has begun and not ended, as returned by [`Profiler::begin`]. Pass it to
/// [`Profiler::end`]; dropping it without doing so records nothing (and leaves a range open in
/// the range sink).
#[must_use = "a span token must be passed to Profiler::end"]
pub struct SpanToken {
    open: Option<OpenSpan>,
}

struct OpenSpan {
    name: Cow<'static, str>,
    phase: Phase,
    start_ns: u64,
    tid: u64,
    args: Vec<(&'static str, ArgValue)>,
    /// Whether the span is timed (the step recorded when it began).
    timed: bool,
    /// Whether the range sink received a push for it.
    pushed: bool,
}

impl SpanToken {
    /// Attaches an argument shown with the span in the trace. Free when the span is not timed.
    pub fn arg(mut self, key: &'static str, value: impl Into<ArgValue>) -> Self {
        self.push_arg(key, value);
        self
    }

    #[inline]
    fn push_arg(&mut self, key: &'static str, value: impl Into<ArgValue>) {
        if let Some(open) = &mut self.open
            && open.timed
        {
            open.args.push((key, value.into()));
        }
    }
}

/// RAII guard of a span: the span ends when the guard is dropped.
#[must_use = "the span ends as soon as the guard is dropped; bind it: `let _g = prof.span(..)`"]
pub struct SpanGuard<'a> {
    inner: Option<&'a Inner>,
    token: SpanToken,
}

impl SpanGuard<'_> {
    /// Attaches an argument shown with the span in the trace. Free when the span is not timed.
    pub fn arg(mut self, key: &'static str, value: impl Into<ArgValue>) -> Self {
        self.token.push_arg(key, value);
        self
    }
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        if let (Some(inner), Some(open)) = (self.inner, self.token.open.take()) {
            inner.end(open);
        }
    }
}

impl Profiler {
    /// A profiler that records nothing and costs one branch per call.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// An enabled profiler on the monotonic clock. Step 0 begins now.
    pub fn new(schedule: Schedule) -> Result<Self, ProfilerError> {
        Self::with_clock(schedule, Clock::Monotonic)
    }

    /// An enabled profiler reading time from `clock`. Step 0 begins at the clock's current time.
    pub fn with_clock(schedule: Schedule, clock: Clock) -> Result<Self, ProfilerError> {
        schedule.validate()?;
        let manual = match clock {
            Clock::Monotonic => None,
            Clock::Manual(c) => Some(c),
        };
        let state = State {
            step_start_ns: manual.as_ref().map_or(0, ManualClock::now_ns),
            ..State::default()
        };
        Ok(Self {
            inner: Some(Box::new(Inner {
                schedule,
                epoch: Instant::now(),
                manual,
                action: AtomicU8::new(schedule.action(0).to_u8()),
                sink: None,
                state: Mutex::new(state),
            })),
        })
    }

    /// Installs a range sink (for example NVTX) called on every span begin and end. Ignored by a
    /// disabled profiler.
    pub fn set_range_sink(&mut self, sink: Box<dyn RangeSink>) {
        if let Some(inner) = &mut self.inner {
            inner.sink = Some(sink);
        }
    }

    /// Builder form of [`Profiler::set_range_sink`].
    pub fn with_range_sink(mut self, sink: Box<dyn RangeSink>) -> Self {
        self.set_range_sink(sink);
        self
    }

    /// Whether the profiler was created enabled.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether the current step is timed (warmup or active). A GPU runtime asks this before
    /// recording events around a launch.
    #[inline]
    pub fn is_recording(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.action().records())
    }

    /// What the current step does ([`StepAction::Done`] for a disabled profiler).
    pub fn action(&self) -> StepAction {
        self.inner.as_ref().map_or(StepAction::Done, |i| i.action())
    }

    /// Index of the current step (0 for a disabled profiler).
    pub fn current_step(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.lock().step)
    }

    /// Nanoseconds since the profiler was created (0 for a disabled profiler). The time base of
    /// every record, including [`KernelRecord::start_ns`].
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.time_at(Instant::now()))
    }

    /// Ends the current step and begins the next. The step time of an active step runs from the
    /// previous `step()` call (or the profiler's creation) to this one; the spans of the thread
    /// calling `step()` are split into phases in the summary. Records of a warmup step are
    /// discarded here. Returns what the new step does.
    pub fn step(&self) -> StepAction {
        let Some(inner) = self.inner.as_deref() else {
            return StepAction::Done;
        };
        let now = inner.time_at(Instant::now());
        let tid = thread_id();
        let mut guard = inner.lock();
        let st = &mut *guard;
        let finished = inner.schedule.action(st.step);
        if finished == StepAction::Active {
            st.committed.append(&mut st.pending);
            st.windows.push(StepWindow {
                step: st.step,
                start_ns: st.step_start_ns,
                end_ns: now.max(st.step_start_ns),
                tid,
            });
            st.note_thread(tid);
        } else {
            st.pending.clear();
        }
        st.step += 1;
        st.step_start_ns = now;
        let next = inner.schedule.action(st.step);
        inner.action.store(next.to_u8(), Ordering::Relaxed);
        next
    }

    /// Begins a span that ends when the returned guard is dropped. Bind it to a named variable
    /// (`let _g = ...`), not `_`, or it ends at once.
    #[inline]
    pub fn span<N: Into<Cow<'static, str>>>(&self, name: N, phase: Phase) -> SpanGuard<'_> {
        match self.inner.as_deref() {
            None => SpanGuard {
                inner: None,
                token: SpanToken { open: None },
            },
            Some(inner) => SpanGuard {
                inner: Some(inner),
                token: inner.begin(name.into(), phase),
            },
        }
    }

    /// Begins a span ended by [`Profiler::end`]. Spans of one thread must nest.
    #[inline]
    pub fn begin<N: Into<Cow<'static, str>>>(&self, name: N, phase: Phase) -> SpanToken {
        match self.inner.as_deref() {
            None => SpanToken { open: None },
            Some(inner) => inner.begin(name.into(), phase),
        }
    }

    /// Ends a span begun with [`Profiler::begin`].
    #[inline]
    pub fn end(&self, token: SpanToken) {
        if let (Some(inner), Some(open)) = (self.inner.as_deref(), token.open) {
            inner.end(open);
        }
    }

    /// Records a sample of counter `name` (for example `allocated_bytes` or `reserved_bytes`);
    /// each counter is its own track in the trace.
    #[inline]
    pub fn counter<N: Into<Cow<'static, str>>>(&self, name: N, value: f64) {
        let Some(inner) = self.inner.as_deref() else {
            return;
        };
        if !inner.action().records() {
            return;
        }
        let enter = Instant::now();
        let ts_ns = inner.time_at(enter);
        let mut st = inner.lock();
        let buf = &mut st.pending;
        buf.counters.push(CounterSample {
            name: name.into(),
            ts_ns,
            value,
        });
        buf.record_calls += 1;
        buf.overhead_ns += enter.elapsed().as_nanos() as u64;
    }

    /// Records a GPU kernel execution on the track of its stream. The kernel is kept if its start
    /// lies in an active step: the current one, or an earlier one (records may arrive after the
    /// step ended, once its events have completed). Kernels of warmup and wait steps are dropped.
    /// A runtime that runs ahead of the device should resolve its events before calling `step()`
    /// so that kernels land in the step that launched them.
    pub fn kernel_span(&self, record: KernelRecord) {
        let Some(inner) = self.inner.as_deref() else {
            return;
        };
        let enter = Instant::now();
        let mut st = inner.lock();
        let buf = if record.start_ns >= st.step_start_ns {
            if !inner.action().records() {
                return;
            }
            &mut st.pending
        } else {
            let i = st.windows.partition_point(|w| w.end_ns <= record.start_ns);
            match st.windows.get(i) {
                Some(w) if w.start_ns <= record.start_ns => &mut st.committed,
                _ => return,
            }
        };
        buf.kernels.push(record);
        buf.record_calls += 1;
        buf.overhead_ns += enter.elapsed().as_nanos() as u64;
    }

    /// Steps recorded so far (finished active steps), in order.
    pub fn recorded_steps(&self) -> Vec<u64> {
        self.inner.as_ref().map_or_else(Vec::new, |i| {
            i.lock().windows.iter().map(|w| w.step).collect()
        })
    }

    /// The summary of the finished active steps: phase split, kernel table, host span table and
    /// the profiler's overhead. `roofline` adds each kernel's fraction of the device's roofline.
    /// Calibrates the span cost (a few thousand empty spans, well under a millisecond).
    pub fn summary(&self, roofline: Option<&Roofline>) -> Summary {
        let cost = calibrate_span_cost(2000);
        match self.inner.as_deref() {
            None => summary::build(&State::default(), None, roofline, cost),
            Some(inner) => {
                let st = inner.lock();
                summary::build(&st, Some(&inner.schedule), roofline, cost)
            }
        }
    }

    /// Names what executes the kernel records (default "GPU"). The CPU backend feeds its op
    /// timings as kernel records under "CPU".
    pub fn set_device_label(&self, label: &str) {
        if let Some(inner) = self.inner.as_deref() {
            inner.lock().device_label = Some(label.to_string());
        }
    }

    /// Writes the finished active steps as a Chrome trace (Trace Event Format JSON, opens in
    /// Perfetto and chrome://tracing): a "Host" process with a track per thread that recorded
    /// spans, counter tracks, and a "GPU" process with a track per stream. The file is written to
    /// a temporary name and renamed, so a reader never sees half a trace.
    pub fn write_chrome_trace(&self, path: impl AsRef<Path>) -> Result<(), ProfilerError> {
        let path = path.as_ref();
        let bytes = match self.inner.as_deref() {
            None => chrome::render(&State::default())?,
            Some(inner) => chrome::render(&inner.lock())?,
        };
        write_atomic(path, &bytes).map_err(|source| ProfilerError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner.as_deref() {
            None => f.write_str("Profiler(disabled)"),
            Some(inner) => f
                .debug_struct("Profiler")
                .field("schedule", &inner.schedule)
                .field("action", &inner.action())
                .field("range_sink", &inner.sink.is_some())
                .finish(),
        }
    }
}

/// Feeds kernel timings measured on a GPU with CUDA events ([`lathe_host::timing`]) into the
/// profiler's GPU track, converting their origin to the profiler's time base.
pub fn record_kernel_timings(prof: &Profiler, timings: &lathe_host::timing::KernelTimings) {
    if !prof.is_recording() {
        return;
    }
    let since_origin = timings.origin.elapsed().as_nanos() as u64;
    let origin_ns = prof.now_ns().saturating_sub(since_origin);
    for k in &timings.kernels {
        let simulated = k.counters.as_ref().map(|c| SimCounts {
            warp_instructions: c.warp_instructions.total(),
            lane_instructions: c.lane_instructions,
            global_load_sectors: c.global_load_sectors,
            global_store_sectors: c.global_store_sectors,
            shared_bank_conflicts: c.shared_bank_conflicts,
            tensor_flops: c.tensor_flops,
            flops: k.flops,
            bytes: k.bytes,
        });
        // A simulated launch has no device time: no rate may be computed from its duration.
        let (flops, bytes) = if simulated.is_some() {
            (0, 0)
        } else {
            (k.flops, k.bytes)
        };
        prof.kernel_span(KernelRecord {
            name: Cow::Borrowed(k.entry),
            // Streams become tracks 0, 1, ... by their raw handle's low bits.
            stream: (k.stream & 0xffff_ffff) as u32,
            start_ns: origin_ns + k.start_ns,
            dur_ns: k.dur_ns,
            flops,
            bytes,
            simulated,
        });
    }
}

#[cfg(test)]
mod feed_tests {
    use super::*;
    use lathe_host::timing::{KernelTiming, KernelTimings};

    #[test]
    fn gpu_timings_land_in_the_kernel_table() {
        let prof = Profiler::new(Schedule::new(0, 0, 1)).unwrap();
        let timings = KernelTimings {
            origin: Instant::now(),
            kernels: vec![
                KernelTiming {
                    entry: "lathe_adamw_f32",
                    stream: 7,
                    start_ns: 1_000,
                    dur_ns: 2_000_000,
                    flops: 0,
                    bytes: 4_000_000_000,
                    counters: None,
                },
                KernelTiming {
                    entry: "lathe_adamw_f32",
                    stream: 7,
                    start_ns: 3_000_000,
                    dur_ns: 2_000_000,
                    flops: 0,
                    bytes: 4_000_000_000,
                    counters: None,
                },
            ],
        };
        record_kernel_timings(&prof, &timings);
        prof.step();
        let s = prof.summary(None);
        assert_eq!(s.kernels.len(), 1);
        assert_eq!(s.kernels[0].calls, 2);
        let gbps = s.kernels[0].gbps().unwrap();
        assert!((gbps - 2000.0).abs() < 1.0, "{gbps} GB/s");
    }

    #[test]
    fn simulated_launches_carry_counts_and_no_rates() {
        let dev = lathe_host::Device::sim().unwrap();
        let x = dev.htod(&vec![0.5f32; 1000]).unwrap();
        let mut y = dev.alloc::<f32>(1000).unwrap();
        dev.enable_kernel_timing().unwrap();
        dev.gelu_forward(&x, &mut y).unwrap();
        let timings = dev.take_kernel_timings().unwrap().unwrap();
        assert_eq!(timings.kernels.len(), 1);
        let prof = Profiler::new(Schedule::new(0, 0, 1)).unwrap();
        record_kernel_timings(&prof, &timings);
        prof.step();
        let s = prof.summary(None);
        assert_eq!(s.kernels.len(), 1);
        assert_eq!(s.kernels[0].gbps(), None, "no rate from a simulated launch");
        assert_eq!(s.kernels[0].tflops(), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        prof.write_chrome_trace(&path).unwrap();
        let trace = std::fs::read_to_string(&path).unwrap();
        assert!(trace.contains("\"simulated\":true"), "{trace}");
        assert!(trace.contains("lane_instructions"), "{trace}");
        assert!(trace.contains("lathe_gelu_fwd_f32"), "{trace}");
    }
}
