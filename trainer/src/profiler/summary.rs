//! The end-of-run summary: how the measured step time splits between phases, what each GPU kernel
//! costs and achieves against the device's roofline, the busiest host spans, and the profiler's
//! own overhead.

use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;
use std::time::Instant;

use super::record::{SpanRecord, StepWindow};
use super::{Phase, Profiler, Schedule, State};

/// The two ceilings of the device's roofline model, given by the caller (from the device's data
/// sheet or, better, from a measured copy kernel and GEMM).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Roofline {
    /// Achievable device memory bandwidth, bytes per second.
    pub copy_bandwidth_bytes_per_s: f64,
    /// Peak floating point rate for the kernels' dtype, FLOP per second.
    pub peak_flops: f64,
}

/// Which ceiling of the roofline limits a kernel, judged from its arithmetic intensity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RooflineBound {
    /// FLOPs at peak take longer than the bytes at full bandwidth.
    Compute,
    /// The bytes at full bandwidth take longer than the FLOPs at peak.
    Memory,
}

/// Measured cost of one span (begin and end) on this machine.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpanCost {
    /// Nanoseconds per span of a recording profiler (no range sink).
    pub enabled_ns: f64,
    /// Nanoseconds per span of a disabled profiler.
    pub disabled_ns: f64,
}

/// Times `iterations` empty spans on a recording profiler and on a disabled one.
pub fn calibrate_span_cost(iterations: u32) -> SpanCost {
    let n = iterations.max(1);
    let per = |t: Instant| t.elapsed().as_nanos() as f64 / f64::from(n);
    let disabled = Profiler::disabled();
    let t = Instant::now();
    for _ in 0..n {
        let g = black_box(&disabled).span("calibration", Phase::Other);
        black_box(&g);
    }
    let disabled_ns = per(t);
    let enabled_ns = match Profiler::new(Schedule::always()) {
        Ok(prof) => {
            // First spans pay for growing the buffers; keep them out of the timing.
            for _ in 0..64 {
                let _g = prof.span("calibration", Phase::Other);
            }
            let t = Instant::now();
            for _ in 0..n {
                let g = black_box(&prof).span("calibration", Phase::Other);
                black_box(&g);
            }
            per(t)
        }
        // `Schedule::always()` is valid; if that ever changes the summary just shows no cost.
        Err(_) => 0.0,
    };
    SpanCost {
        enabled_ns,
        disabled_ns,
    }
}

/// Time of one phase in the measured steps (exclusive: time inside a nested span counts for the
/// nested span's phase only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseTime {
    /// The phase.
    pub phase: Phase,
    /// Total nanoseconds over all measured steps.
    pub total_ns: u64,
}

/// Host spans of one name and phase (inclusive time, all threads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanStat {
    /// Span name.
    pub name: String,
    /// Span phase.
    pub phase: Phase,
    /// Number of spans.
    pub calls: u64,
    /// Total nanoseconds, including nested spans.
    pub total_ns: u64,
}

impl SpanStat {
    /// Mean nanoseconds per span.
    pub fn mean_ns(&self) -> f64 {
        self.total_ns as f64 / self.calls.max(1) as f64
    }
}

/// Executions of one GPU kernel (by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelStat {
    /// Kernel name.
    pub name: String,
    /// Number of executions.
    pub calls: u64,
    /// Total nanoseconds.
    pub total_ns: u64,
    /// Total FLOPs of all executions.
    pub flops: u64,
    /// Total bytes of all executions.
    pub bytes: u64,
}

impl KernelStat {
    /// Mean nanoseconds per execution.
    pub fn mean_ns(&self) -> f64 {
        self.total_ns as f64 / self.calls.max(1) as f64
    }

    fn seconds(&self) -> f64 {
        self.total_ns as f64 * 1e-9
    }

    /// Achieved TFLOP/s, if the records carried FLOPs and took measurable time.
    pub fn tflops(&self) -> Option<f64> {
        (self.flops > 0 && self.total_ns > 0).then(|| self.flops as f64 / self.seconds() / 1e12)
    }

    /// Achieved GB/s (10^9 bytes per second), if the records carried bytes.
    pub fn gbps(&self) -> Option<f64> {
        (self.bytes > 0 && self.total_ns > 0).then(|| self.bytes as f64 / self.seconds() / 1e9)
    }

    /// Which ceiling limits the kernel, if it carried FLOPs or bytes.
    pub fn bound(&self, roof: &Roofline) -> Option<RooflineBound> {
        let (tf, tb) = self.ideal_times(roof)?;
        Some(if tf >= tb {
            RooflineBound::Compute
        } else {
            RooflineBound::Memory
        })
    }

    /// The roofline's lower bound on the kernel's time divided by its measured time: 1.0 means
    /// the kernel runs at the ceiling that limits it.
    pub fn roofline_fraction(&self, roof: &Roofline) -> Option<f64> {
        let (tf, tb) = self.ideal_times(roof)?;
        (self.total_ns > 0).then(|| tf.max(tb) / self.seconds())
    }

    /// Seconds the FLOPs need at peak and the bytes need at full bandwidth.
    fn ideal_times(&self, roof: &Roofline) -> Option<(f64, f64)> {
        if self.flops == 0 && self.bytes == 0 {
            return None;
        }
        let tf = if roof.peak_flops > 0.0 {
            self.flops as f64 / roof.peak_flops
        } else {
            0.0
        };
        let tb = if roof.copy_bandwidth_bytes_per_s > 0.0 {
            self.bytes as f64 / roof.copy_bandwidth_bytes_per_s
        } else {
            0.0
        };
        (tf > 0.0 || tb > 0.0).then_some((tf, tb))
    }
}

/// The profiler's cost, measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overhead {
    /// Record calls that stored something in the measured steps.
    pub record_calls: u64,
    /// Spans stored.
    pub spans: u64,
    /// Counter samples stored.
    pub counters: u64,
    /// Kernel records stored.
    pub kernels: u64,
    /// Nanoseconds spent inside those record calls after their timestamp was taken (locking and
    /// storing).
    pub inside_record_ns: u64,
    /// Calibrated cost of a whole span on this machine.
    pub span_cost: SpanCost,
}

impl Overhead {
    /// Estimated total cost of the stored spans: their count times the calibrated span cost.
    pub fn estimated_span_ns(&self) -> f64 {
        self.spans as f64 * self.span_cost.enabled_ns
    }
}

/// The summary of a profiled run. Phase times plus `untracked_ns` add up to `measured_ns`
/// exactly. Print it with `{}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The schedule (None for a disabled profiler).
    pub schedule: Option<Schedule>,
    /// Indices of the measured (active) steps.
    pub steps: Vec<u64>,
    /// Total wall time of the measured steps, on the thread that called `step()`.
    pub measured_ns: u64,
    /// Exclusive time of each phase on the step thread within the measured steps, in
    /// [`Phase::ALL`] order.
    pub phases: Vec<PhaseTime>,
    /// Step time covered by no span of the step thread.
    pub untracked_ns: u64,
    /// Name of the thread that called `step()` (of the last measured step).
    pub step_thread: Option<String>,
    /// Host spans by name and phase, longest total first.
    pub host_spans: Vec<SpanStat>,
    /// What ran the kernels ("GPU", or "CPU" on the CPU backend).
    pub device_label: String,
    /// GPU kernels by name, longest total first.
    pub kernels: Vec<KernelStat>,
    /// Sum of all kernel times (streams may overlap, so this can exceed the step time).
    pub kernel_total_ns: u64,
    /// Number of GPU streams with kernels.
    pub streams: usize,
    /// The roofline the kernel table is judged against.
    pub roofline: Option<Roofline>,
    /// The profiler's own cost.
    pub overhead: Overhead,
}

impl Summary {
    /// `ns` as a fraction of the measured step time (0 when nothing was measured).
    pub fn share(&self, ns: u64) -> f64 {
        if self.measured_ns == 0 {
            0.0
        } else {
            ns as f64 / self.measured_ns as f64
        }
    }

    /// Exclusive time of `phase`.
    pub fn phase_ns(&self, phase: Phase) -> u64 {
        self.phases
            .iter()
            .find(|p| p.phase == phase)
            .map_or(0, |p| p.total_ns)
    }

    /// Share of the measured step spent in `phase`.
    pub fn phase_share(&self, phase: Phase) -> f64 {
        self.share(self.phase_ns(phase))
    }

    /// Share of the measured step covered by no span.
    pub fn untracked_share(&self) -> f64 {
        self.share(self.untracked_ns)
    }
}

/// Builds the summary from the committed records.
pub(crate) fn build(
    st: &State,
    schedule: Option<&Schedule>,
    roofline: Option<&Roofline>,
    span_cost: SpanCost,
) -> Summary {
    let rec = &st.committed;
    let windows = &st.windows;
    let measured_ns: u64 = windows.iter().map(|w| w.end_ns - w.start_ns).sum();

    let mut phase_ns = [0u64; 6];
    let mut covered = 0u64;
    for (w, spans) in windows.iter().zip(spans_per_window(windows, &rec.spans)) {
        covered += attribute(w, &spans, &mut phase_ns);
    }
    let phases = Phase::ALL
        .iter()
        .map(|&phase| PhaseTime {
            phase,
            total_ns: phase_ns[phase.index()],
        })
        .collect();

    let mut by_span: HashMap<(&str, Phase), SpanStat> = HashMap::new();
    for s in &rec.spans {
        let e = by_span
            .entry((s.name.as_ref(), s.phase))
            .or_insert_with(|| SpanStat {
                name: s.name.to_string(),
                phase: s.phase,
                calls: 0,
                total_ns: 0,
            });
        e.calls += 1;
        e.total_ns += s.end_ns - s.start_ns;
    }
    let mut host_spans: Vec<SpanStat> = by_span.into_values().collect();
    host_spans.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.name.cmp(&b.name)));

    let mut by_kernel: HashMap<&str, KernelStat> = HashMap::new();
    for k in &rec.kernels {
        let e = by_kernel
            .entry(k.name.as_ref())
            .or_insert_with(|| KernelStat {
                name: k.name.to_string(),
                calls: 0,
                total_ns: 0,
                flops: 0,
                bytes: 0,
            });
        e.calls += 1;
        e.total_ns += k.dur_ns;
        e.flops = e.flops.saturating_add(k.flops);
        e.bytes = e.bytes.saturating_add(k.bytes);
    }
    let mut kernels: Vec<KernelStat> = by_kernel.into_values().collect();
    kernels.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.name.cmp(&b.name)));
    let kernel_total_ns = kernels.iter().map(|k| k.total_ns).sum();
    let streams = rec
        .kernels
        .iter()
        .map(|k| k.stream)
        .collect::<BTreeSet<_>>()
        .len();

    Summary {
        device_label: st.device_label.clone().unwrap_or_else(|| "GPU".into()),
        schedule: schedule.copied(),
        steps: windows.iter().map(|w| w.step).collect(),
        measured_ns,
        phases,
        untracked_ns: measured_ns - covered,
        step_thread: windows.last().and_then(|w| st.threads.get(&w.tid).cloned()),
        host_spans,
        kernels,
        kernel_total_ns,
        streams,
        roofline: roofline.copied(),
        overhead: Overhead {
            record_calls: rec.record_calls,
            spans: rec.spans.len() as u64,
            counters: rec.counters.len() as u64,
            kernels: rec.kernels.len() as u64,
            inside_record_ns: rec.overhead_ns,
            span_cost,
        },
    }
}

/// For each window, the spans of its step thread that overlap it.
fn spans_per_window<'a>(
    windows: &[StepWindow],
    spans: &'a [SpanRecord],
) -> Vec<Vec<&'a SpanRecord>> {
    let mut out = vec![Vec::new(); windows.len()];
    for s in spans {
        // Windows are sorted and disjoint: start at the first one ending after the span starts.
        let first = windows.partition_point(|w| w.end_ns <= s.start_ns);
        for (i, w) in windows.iter().enumerate().skip(first) {
            if w.start_ns >= s.end_ns {
                break;
            }
            if w.tid == s.tid {
                out[i].push(s);
            }
        }
    }
    out
}

/// Adds to `phase_ns` the exclusive time of each phase inside window `w`, and returns the time
/// covered by any span. At every instant the time goes to the innermost open span: the one that
/// started last (of equal starts, the one that ends first). This needs no proper nesting to stay
/// consistent: the covered time never exceeds the window, and phases plus the uncovered rest add
/// up to the window exactly.
fn attribute(w: &StepWindow, spans: &[&SpanRecord], phase_ns: &mut [u64; 6]) -> u64 {
    let mut order: Vec<&SpanRecord> = spans.to_vec();
    order.sort_by(|a, b| a.start_ns.cmp(&b.start_ns).then(b.end_ns.cmp(&a.end_ns)));
    // (time, is_open, rank); rank = position in `order`, higher = more inner.
    let mut points: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * order.len());
    for (rank, s) in order.iter().enumerate() {
        let start = s.start_ns.max(w.start_ns);
        let end = s.end_ns.min(w.end_ns);
        if start < end {
            points.push((start, true, rank));
            points.push((end, false, rank));
        }
    }
    points.sort_unstable_by_key(|p| p.0);
    let mut open: BTreeSet<usize> = BTreeSet::new();
    let mut covered = 0;
    let mut prev = w.start_ns;
    let mut i = 0;
    while i < points.len() {
        let t = points[i].0;
        if let Some(&inner) = open.last() {
            phase_ns[order[inner].phase.index()] += t - prev;
            covered += t - prev;
        }
        while i < points.len() && points[i].0 == t {
            let (_, is_open, rank) = points[i];
            if is_open {
                open.insert(rank);
            } else {
                open.remove(&rank);
            }
            i += 1;
        }
        prev = t;
    }
    covered
}
