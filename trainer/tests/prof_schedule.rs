//! The profiler's schedule: wait, warmup and active steps; only active steps are kept.

use std::sync::Mutex;

use lathe_trainer::profiler::{
    Clock, ManualClock, Phase, Profiler, RangeSink, Schedule, StepAction,
};

#[test]
fn schedule_cycles_through_wait_warmup_active() {
    use StepAction::*;
    let s = Schedule::new(1, 1, 3).with_repeat(2);
    let got: Vec<StepAction> = (0..12).map(|i| s.action(i)).collect();
    assert_eq!(
        got,
        [
            Wait, Warmup, Active, Active, Active, Wait, Warmup, Active, Active, Active, Done, Done
        ]
    );
    let skip = Schedule::new(0, 2, 1).with_skip_first(3);
    let got: Vec<StepAction> = (0..8).map(|i| skip.action(i)).collect();
    assert_eq!(got, [Wait, Wait, Wait, Warmup, Warmup, Active, Done, Done]);
    // repeat 0 cycles forever.
    let forever = Schedule::new(2, 0, 1).with_repeat(0);
    assert_eq!(forever.action(3 * 1000 + 2), Active);
    assert_eq!(forever.action(3 * 1000 + 1), Wait);
    assert!(Schedule::always().action(123_456).records());
}

#[test]
fn a_schedule_without_active_steps_is_rejected() {
    let err = Profiler::new(Schedule::new(1, 1, 0)).expect_err("active = 0 must be rejected");
    assert!(err.to_string().contains("active"), "{err}");
}

/// Runs `steps` steps of one span each on a manual clock (100 ns per step); each span carries its
/// step index as an argument.
fn run(schedule: Schedule, steps: u64) -> (Profiler, ManualClock) {
    let clock = ManualClock::new();
    let prof = Profiler::with_clock(schedule, Clock::Manual(clock.clone())).expect("schedule");
    for step in 0..steps {
        assert_eq!(prof.current_step(), step);
        assert_eq!(prof.action(), schedule.action(step));
        {
            let _g = prof.span("work", Phase::Forward).arg("step", step);
            clock.advance_ns(60);
        }
        prof.counter("allocated_bytes", step as f64);
        clock.advance_ns(40);
        prof.step();
    }
    (prof, clock)
}

/// The `step` arguments of the "work" spans in the trace.
fn traced_steps(prof: &Profiler) -> Vec<u64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    prof.write_chrome_trace(&path).expect("write trace");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read trace")).expect("valid JSON");
    let mut steps: Vec<u64> = v["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["name"] == "work")
        .map(|e| e["args"]["step"].as_u64().expect("step arg"))
        .collect();
    steps.sort_unstable();
    steps
}

#[test]
fn only_active_steps_are_recorded() {
    let schedule = Schedule::new(2, 1, 2).with_repeat(2);
    let (prof, _) = run(schedule, 14);
    // Cycle of 5: wait 0,1; warmup 2; active 3,4; wait 5,6; warmup 7; active 8,9; then done.
    assert_eq!(prof.recorded_steps(), [3, 4, 8, 9]);
    assert_eq!(traced_steps(&prof), [3, 4, 8, 9]);
    let summary = prof.summary(None);
    assert_eq!(summary.steps, [3, 4, 8, 9]);
    assert_eq!(summary.measured_ns, 4 * 100);
    assert_eq!(summary.phase_ns(Phase::Forward), 4 * 60);
    assert_eq!(summary.untracked_ns, 4 * 40);
    assert_eq!(summary.overhead.spans, 4);
    assert_eq!(summary.overhead.counters, 4);
    assert_eq!(prof.action(), StepAction::Done);
    assert!(!prof.is_recording());
}

#[test]
fn warmup_steps_are_timed_then_discarded() {
    let (prof, _) = run(Schedule::new(0, 3, 1), 2);
    // Steps 0 and 1 are warmup: recording, yet nothing is kept.
    assert!(prof.is_recording());
    assert_eq!(prof.action(), StepAction::Warmup);
    assert!(prof.recorded_steps().is_empty());
    assert!(traced_steps(&prof).is_empty());
    assert!(prof.summary(None).steps.is_empty());
}

#[test]
fn a_disabled_profiler_records_nothing_and_writes_an_empty_trace() {
    let prof = Profiler::disabled();
    assert!(!prof.is_enabled());
    assert!(!prof.is_recording());
    for _ in 0..3 {
        let _g = prof.span("x", Phase::Data).arg("i", 1u32);
        let t = prof.begin("y", Phase::Other);
        prof.end(t);
        prof.counter("allocated_bytes", 1.0);
        prof.step();
    }
    assert!(prof.recorded_steps().is_empty());
    let s = prof.summary(None);
    assert!(s.steps.is_empty() && s.measured_ns == 0 && s.overhead.record_calls == 0);
    assert!(traced_steps(&prof).is_empty());
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl RangeSink for Recorder {
    fn push_range(&self, name: &str) {
        self.0.lock().expect("lock").push(format!("+{name}"));
    }
    fn pop_range(&self) {
        self.0.lock().expect("lock").push("-".into());
    }
}

#[test]
fn the_range_sink_sees_every_span_in_every_step() {
    let rec = std::sync::Arc::new(Recorder::default());
    struct Shared(std::sync::Arc<Recorder>);
    impl RangeSink for Shared {
        fn push_range(&self, name: &str) {
            self.0.push_range(name);
        }
        fn pop_range(&self) {
            self.0.pop_range();
        }
    }
    let prof = Profiler::new(Schedule::new(1, 0, 1))
        .expect("schedule")
        .with_range_sink(Box::new(Shared(rec.clone())));
    for _ in 0..3 {
        // Step 0 waits, step 1 is active, step 2 is done: the sink hears all three.
        let _outer = prof.span("step", Phase::Other);
        let t = prof.begin("fwd", Phase::Forward);
        prof.end(t);
        drop(_outer);
        prof.step();
    }
    let log = rec.0.lock().expect("lock").clone();
    let one = ["+step", "+fwd", "-", "-"];
    let want: Vec<String> = one.iter().cycle().take(12).map(|s| s.to_string()).collect();
    assert_eq!(log, want);
    assert_eq!(prof.recorded_steps(), [1]);
}
