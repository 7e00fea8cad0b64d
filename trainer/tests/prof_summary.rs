//! The summary: phase times and the untracked remainder add up to the measured step; kernel
//! rates and roofline fractions; the overhead line.

use lathe_trainer::profiler::{
    Clock, KernelRecord, ManualClock, Phase, Profiler, Roofline, RooflineBound, Schedule, Summary,
};

/// Three steps of 1000 ns on a manual clock, with nested spans of several phases and a span that
/// crosses a step boundary; see the comments for the expected split.
fn scripted() -> Profiler {
    let c = ManualClock::new();
    let prof =
        Profiler::with_clock(Schedule::always(), Clock::Manual(c.clone())).expect("schedule");
    let at = |t: u64| c.set_ns(t);

    // Step 0: data 100, forward 250 (300 minus a nested 50 of communication), backward 320
    // (400 minus a nested 80 of communication), optimizer 100, untracked 100.
    let d = prof.begin("next batch", Phase::Data);
    at(100);
    prof.end(d);
    let f = prof.begin("forward", Phase::Forward);
    at(150);
    let b = prof.begin("block", Phase::Forward).arg("block", 0u32);
    at(250);
    prof.end(b);
    at(300);
    let g = prof.begin("all-gather", Phase::Communication);
    at(350);
    prof.end(g);
    at(400);
    prof.end(f);
    let bw = prof.begin("backward", Phase::Backward);
    at(700);
    let ar = prof.begin("all-reduce", Phase::Communication);
    at(780);
    prof.end(ar);
    at(800);
    prof.end(bw);
    let o = prof.begin("adamw", Phase::Optimizer);
    at(900);
    prof.end(o);
    prof.kernel_span(KernelRecord {
        name: "gemm".into(),
        stream: 0,
        start_ns: 150,
        dur_ns: 10_000,
        flops: 1_000_000_000,
        bytes: 1_000_000,
        simulated: None,
    });
    prof.kernel_span(KernelRecord {
        name: "gemm".into(),
        stream: 0,
        start_ns: 400,
        dur_ns: 10_000,
        flops: 1_000_000_000,
        bytes: 1_000_000,
        simulated: None,
    });
    prof.kernel_span(KernelRecord {
        name: "copy".into(),
        stream: 1,
        start_ns: 420,
        dur_ns: 1_000_000,
        flops: 0,
        bytes: 1_000_000_000,
        simulated: None,
    });
    at(1000);
    prof.step();

    // Step 1: a span of phase Other from 1500 to 2500 crosses into step 2: 500 other, 500
    // untracked here.
    at(1500);
    let x = prof.begin("checkpoint", Phase::Other);
    at(2000);
    prof.step();

    // Step 2: the rest of that span (500 other), forward 100, untracked 400.
    at(2500);
    prof.end(x);
    at(2600);
    let f = prof.begin("forward", Phase::Forward);
    at(2700);
    prof.end(f);
    at(3000);
    prof.step();
    prof
}

#[test]
fn phases_split_the_measured_step_exactly() {
    let s = scripted().summary(None);
    assert_eq!(s.steps, [0, 1, 2]);
    assert_eq!(s.measured_ns, 3000);
    let expect = [
        (Phase::Data, 100),
        (Phase::Forward, 350),
        (Phase::Backward, 320),
        (Phase::Optimizer, 100),
        (Phase::Communication, 130),
        (Phase::Other, 1000),
    ];
    for (phase, ns) in expect {
        assert_eq!(s.phase_ns(phase), ns, "{phase}");
    }
    assert_eq!(s.untracked_ns, 1000);
    let total: u64 = s.phases.iter().map(|p| p.total_ns).sum::<u64>() + s.untracked_ns;
    assert_eq!(total, s.measured_ns);
    let shares: f64 =
        Phase::ALL.iter().map(|&p| s.phase_share(p)).sum::<f64>() + s.untracked_share();
    assert!((shares - 1.0).abs() < 1e-12, "{shares}");
}

/// The rows of the printed phase table: (name, total ms, share %).
fn phase_rows(text: &str) -> Vec<(String, f64, f64)> {
    text.lines()
        .skip_while(|l| !l.starts_with("phase"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let share = cols[cols.len() - 1]
                .trim_end_matches('%')
                .parse()
                .expect("share");
            let total = cols[cols.len() - 3].parse().expect("total");
            (cols[..cols.len() - 3].join(" "), total, share)
        })
        .collect()
}

fn assert_table_adds_up(s: &Summary) {
    let text = s.to_string();
    let rows = phase_rows(&text);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "data",
            "forward",
            "backward",
            "optimizer",
            "communication",
            "other",
            "untracked",
            "step total"
        ],
        "{text}"
    );
    let (body, total) = rows.split_at(rows.len() - 1);
    let share: f64 = body.iter().map(|r| r.2).sum();
    assert!(
        (share - total[0].2).abs() < 1e-6,
        "shares add to {share}:\n{text}"
    );
    assert!((total[0].2 - 100.0).abs() < 1e-9, "{text}");
    let ms: f64 = body.iter().map(|r| r.1).sum();
    assert!(
        (ms - total[0].1).abs() < 1e-6,
        "totals add to {ms}:\n{text}"
    );
}

#[test]
fn the_printed_phase_table_adds_up_to_the_step() {
    let prof = scripted();
    let s = prof.summary(None);
    assert_table_adds_up(&s);
    let text = s.to_string();
    assert!(text.contains("measured 3 step(s)"), "{text}");
    assert!(text.contains("profiler overhead"), "{text}");
    assert!(text.contains("calibrated span cost"), "{text}");
}

#[test]
fn kernel_rates_and_roofline() {
    let roof = Roofline {
        copy_bandwidth_bytes_per_s: 2e12,
        peak_flops: 200e12,
    };
    let s = scripted().summary(Some(&roof));
    assert_eq!(s.streams, 2);
    let names: Vec<&str> = s.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["copy", "gemm"], "longest total first");
    let gemm = &s.kernels[1];
    assert_eq!(
        (gemm.calls, gemm.total_ns, gemm.flops),
        (2, 20_000, 2_000_000_000)
    );
    // 2e9 FLOP in 20 us = 100 TFLOP/s; at 200 TFLOP/s peak the ideal is 10 us: 50%.
    assert!((gemm.tflops().expect("flops") - 100.0).abs() < 1e-9);
    assert_eq!(gemm.bound(&roof), Some(RooflineBound::Compute));
    assert!((gemm.roofline_fraction(&roof).expect("fraction") - 0.5).abs() < 1e-12);
    let copy = &s.kernels[0];
    // 1e9 bytes in 1 ms = 1000 GB/s; at 2 TB/s the ideal is 0.5 ms: 50%.
    assert!((copy.gbps().expect("bytes") - 1000.0).abs() < 1e-9);
    assert_eq!(copy.tflops(), None);
    assert_eq!(copy.bound(&roof), Some(RooflineBound::Memory));
    assert!((copy.roofline_fraction(&roof).expect("fraction") - 0.5).abs() < 1e-12);

    let text = s.to_string();
    for needle in [
        "gemm", "copy", "compute", "memory", "50.0%", "100.00", "1000.0",
    ] {
        assert!(text.contains(needle), "missing {needle:?}:\n{text}");
    }
    let no_roof = scripted().summary(None).to_string();
    assert!(!no_roof.contains("compute"), "{no_roof}");
}

#[test]
fn a_cpu_run_has_no_kernel_table_and_still_adds_up() {
    let prof = Profiler::new(Schedule::new(1, 1, 3)).expect("schedule");
    let spin = |n: u64| {
        let mut x = 0u64;
        for i in 0..n {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        x
    };
    for _ in 0..5 {
        {
            let _d = prof.span("data", Phase::Data);
            spin(2_000);
        }
        {
            let _f = prof.span("forward", Phase::Forward);
            for block in 0..3u32 {
                let _b = prof.span("block", Phase::Forward).arg("block", block);
                spin(1_000);
            }
        }
        // Spans that do not nest (begin/end in crossing order) still split without overlap.
        let a = prof.begin("a", Phase::Backward);
        spin(500);
        let b = prof.begin("b", Phase::Optimizer);
        spin(500);
        prof.end(a);
        spin(500);
        prof.end(b);
        prof.counter("allocated_bytes", 1.0);
        spin(300);
        prof.step();
    }
    let s = prof.summary(None);
    assert_eq!(s.steps, [2, 3, 4]);
    assert!(s.measured_ns > 0);
    assert_eq!(
        s.phases.iter().map(|p| p.total_ns).sum::<u64>() + s.untracked_ns,
        s.measured_ns
    );
    assert!(s.phase_ns(Phase::Forward) > 0 && s.phase_ns(Phase::Data) > 0);
    assert!(s.kernels.is_empty());
    // 3 steps x (1 data + 1 forward + 3 blocks + a + b) spans and 1 counter.
    assert_eq!(s.overhead.spans, 21);
    assert_eq!(s.overhead.counters, 3);
    assert_eq!(s.overhead.record_calls, 24);
    assert!(s.overhead.span_cost.enabled_ns > 0.0);
    assert!(s.overhead.span_cost.disabled_ns < s.overhead.span_cost.enabled_ns);
    let blocks = s
        .host_spans
        .iter()
        .find(|h| h.name == "block")
        .expect("block stat");
    assert_eq!(blocks.calls, 9);
    let text = s.to_string();
    assert!(text.contains("GPU kernels: none recorded"), "{text}");
    assert_table_adds_up(&s);
}
