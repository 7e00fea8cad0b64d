//! The Chrome trace: valid JSON in the Trace Event Format, with a host process (a track per
//! thread), counter tracks and a GPU process (a track per stream).

use serde_json::Value;

use lathe_trainer::profiler::{Clock, KernelRecord, ManualClock, Phase, Profiler, Schedule};

fn kernel(name: &'static str, stream: u32, start_ns: u64, dur_ns: u64) -> KernelRecord {
    KernelRecord {
        name: name.into(),
        stream,
        start_ns,
        dur_ns,
        flops: 2_000_000,
        bytes: 4096,
        simulated: None,
    }
}

fn read_trace(prof: &Profiler) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trace.json");
    prof.write_chrome_trace(&path).expect("write trace");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["trace.json"], "no temporary file is left behind");
    let v: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read trace")).expect("valid JSON");
    v["traceEvents"]
        .as_array()
        .expect("traceEvents array")
        .clone()
}

fn meta<'a>(events: &'a [Value], what: &str, pid: u64) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == what && e["pid"] == pid)
        .collect()
}

/// Two recorded steps with nested spans, a loader thread, memory counters and kernels on two
/// streams; the kernels of the first step are handed over after the step ended.
fn profiled_run() -> Profiler {
    let clock = ManualClock::new();
    let prof = Profiler::with_clock(Schedule::new(0, 1, 2), Clock::Manual(clock.clone()))
        .expect("schedule");
    clock.set_ns(1_000);
    // Step 0: warmup; its kernel must be dropped even though it arrives during step 1.
    let warm_kernel = kernel("warm_kernel", 0, 500, 50);
    prof.step();
    for step in 1..3u64 {
        let base = step * 10_000;
        clock.set_ns(base);
        {
            let _fwd = prof.span("forward", Phase::Forward);
            for block in 0..2u32 {
                clock.advance_ns(100);
                let _b = prof.span("block", Phase::Forward).arg("block", block);
                clock.advance_ns(300);
            }
            prof.counter("allocated_bytes", (1000 * step) as f64);
            prof.counter("reserved_bytes", (4000 * step) as f64);
        }
        // One loader thread, busy in step 1 only (a thread spawned per step would get a track
        // per spawn: tracks follow OS threads).
        if step == 1 {
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("loader".into())
                    .spawn_scoped(s, || {
                        let _d = prof.span("load batch", Phase::Data);
                        clock.advance_ns(200);
                    })
                    .expect("spawn");
            });
        }
        let t = prof.begin("adamw", Phase::Optimizer).arg("lr", 1e-3);
        clock.advance_ns(500);
        prof.end(t);
        prof.kernel_span(kernel("gemm_bf16", 0, base + 150, 250));
        if step == 1 {
            prof.kernel_span(warm_kernel.clone());
        }
        clock.set_ns(base + 5_000);
        prof.step();
        if step == 1 {
            // Resolved late: belongs to step 1 by its start time.
            prof.kernel_span(kernel("memcpy_h2d", 1, base + 20, 80));
        }
    }
    prof
}

#[test]
fn trace_is_valid_json_with_host_gpu_and_counter_tracks() {
    let prof = profiled_run();
    assert_eq!(prof.recorded_steps(), [1, 2]);
    let ev = read_trace(&prof);

    // Processes.
    let host = meta(&ev, "process_name", 1);
    assert_eq!(host.len(), 1);
    assert_eq!(host[0]["args"]["name"], "Host");
    let gpu = meta(&ev, "process_name", 2);
    assert_eq!(gpu.len(), 1);
    assert_eq!(gpu[0]["args"]["name"], "GPU");

    // A host track per thread that recorded something, named.
    let threads = meta(&ev, "thread_name", 1);
    let names: Vec<&str> = threads
        .iter()
        .filter_map(|t| t["args"]["name"].as_str())
        .collect();
    assert!(names.contains(&"loader"), "{names:?}");
    assert!(names.contains(&"steps"), "{names:?}");
    assert_eq!(
        threads.len(),
        3,
        "steps, the main test thread and the loader: {names:?}"
    );
    let loader_tid = threads
        .iter()
        .find(|t| t["args"]["name"] == "loader")
        .map(|t| t["tid"].clone())
        .expect("loader tid");

    // A GPU track per stream.
    let streams = meta(&ev, "thread_name", 2);
    let mut stream_names: Vec<&str> = streams
        .iter()
        .filter_map(|t| t["args"]["name"].as_str())
        .collect();
    stream_names.sort_unstable();
    assert_eq!(stream_names, ["stream 0", "stream 1"]);

    // Every event has the fields its phase needs.
    for e in &ev {
        let ph = e["ph"].as_str().expect("ph");
        assert!(["X", "C", "M"].contains(&ph), "unexpected phase {ph}");
        assert!(e["pid"].is_u64() && e["name"].is_string(), "{e}");
        if ph == "X" {
            assert!(
                e["ts"].is_number() && e["dur"].as_f64().expect("dur") >= 0.0,
                "{e}"
            );
        }
    }

    let x = |name: &str| -> Vec<&Value> {
        ev.iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name)
            .collect()
    };
    assert_eq!(x("step 1").len(), 1);
    assert_eq!(x("step 1")[0]["tid"], 0, "step markers on their own track");
    assert_eq!(
        x("step 1")[0]["dur"],
        14.0,
        "step 1 runs from 1 us to 15 us"
    );
    assert_eq!(x("step 2").len(), 1);
    assert_eq!(x("step 0").len(), 0, "warmup step is not traced");
    assert_eq!(x("forward").len(), 2);
    let blocks = x("block");
    assert_eq!(blocks.len(), 4);
    assert!(
        blocks
            .iter()
            .all(|b| b["cat"] == "forward" && b["pid"] == 1)
    );
    assert_eq!(blocks[0]["args"]["block"], 0);
    assert!(
        (blocks[0]["dur"].as_f64().expect("dur") - 0.3).abs() < 1e-9,
        "300 ns = 0.3 us"
    );
    let adamw = x("adamw");
    assert_eq!(adamw.len(), 2);
    assert_eq!(adamw[0]["args"]["lr"], 1e-3);
    let loads = x("load batch");
    assert_eq!(loads.len(), 1);
    assert!(
        loads
            .iter()
            .all(|l| l["tid"] == loader_tid && l["cat"] == "data")
    );

    // Kernels on the GPU process, the warmup kernel dropped, the late one kept.
    let gemm = x("gemm_bf16");
    assert_eq!(gemm.len(), 2);
    assert!(
        gemm.iter()
            .all(|k| k["pid"] == 2 && k["tid"] == 0 && k["cat"] == "kernel")
    );
    assert_eq!(gemm[0]["args"]["flops"], 2_000_000);
    assert_eq!(x("memcpy_h2d").len(), 1);
    assert_eq!(x("memcpy_h2d")[0]["tid"], 1);
    assert!(x("warm_kernel").is_empty());

    // Counter tracks.
    let counters: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "C").collect();
    let alloc: Vec<f64> = counters
        .iter()
        .filter(|c| c["name"] == "allocated_bytes")
        .map(|c| c["args"]["allocated_bytes"].as_f64().expect("value"))
        .collect();
    assert_eq!(alloc, [1000.0, 2000.0]);
    assert_eq!(
        counters
            .iter()
            .filter(|c| c["name"] == "reserved_bytes")
            .count(),
        2
    );

    // Timestamps are non-decreasing after the metadata.
    let ts: Vec<f64> = ev
        .iter()
        .filter(|e| e["ph"] != "M")
        .map(|e| e["ts"].as_f64().expect("ts"))
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn writing_into_a_missing_directory_names_the_path() {
    let prof = profiled_run();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no such dir").join("trace.json");
    let err = prof
        .write_chrome_trace(&path)
        .expect_err("missing directory");
    assert!(err.to_string().contains("no such dir"), "{err}");
}

#[test]
fn a_trace_on_the_real_clock_is_valid_too() {
    let prof = Profiler::new(Schedule::always()).expect("schedule");
    for _ in 0..3 {
        let _s = prof.span("step body", Phase::Other);
        let _f = prof.span("forward", Phase::Forward);
        prof.counter("allocated_bytes", f64::NAN); // not representable in JSON: skipped
        prof.counter("allocated_bytes", 1.0);
        drop(_f);
        drop(_s);
        prof.step();
    }
    let ev = read_trace(&prof);
    assert_eq!(ev.iter().filter(|e| e["name"] == "forward").count(), 3);
    assert_eq!(ev.iter().filter(|e| e["ph"] == "C").count(), 3);
    assert!(
        meta(&ev, "process_name", 2).is_empty(),
        "no kernels: no GPU process"
    );
}
