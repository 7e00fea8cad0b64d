//! Chrome trace writer (the Trace Event Format read by Perfetto and chrome://tracing).
//!
//! Layout: process 1 "Host" has a "steps" track with a marker per measured step, a track per
//! host thread with its spans ("X" complete events, category = phase) and one counter track per
//! counter ("C" events); process 2 "GPU" has a track per stream with the kernel executions.
//! Times are microseconds with nanosecond resolution.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::{ArgValue, ProfilerError, State};

/// Process id of the host process in the trace.
pub(crate) const HOST_PID: u32 = 1;
/// Process id of the GPU process in the trace.
pub(crate) const GPU_PID: u32 = 2;
/// Host track of the step markers (thread ids of real threads start at 1).
const STEPS_TID: u64 = 0;

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn arg_json(v: &ArgValue) -> Value {
    match v {
        ArgValue::Int(i) => json!(i),
        ArgValue::UInt(u) => json!(u),
        ArgValue::Float(f) if f.is_finite() => json!(f),
        ArgValue::Float(f) => json!(f.to_string()),
        ArgValue::Bool(b) => json!(b),
        ArgValue::Str(s) => json!(s),
    }
}

/// One event with its sort key: metadata first, then by start time, longer events first so that
/// an enclosing event precedes the events it contains.
struct Ev {
    key: (u8, u64, Reverse<u64>),
    value: Value,
}

/// Renders the committed records of `st` as trace JSON.
pub(crate) fn render(st: &State) -> Result<Vec<u8>, ProfilerError> {
    let rec = &st.committed;
    let mut events: Vec<Ev> = Vec::with_capacity(
        rec.spans.len() + rec.counters.len() + rec.kernels.len() + st.windows.len() + 16,
    );
    let meta = |value: Value| Ev {
        key: (0, 0, Reverse(0)),
        value,
    };

    events.push(meta(
        json!({"name": "process_name", "ph": "M", "pid": HOST_PID, "tid": 0,
        "args": {"name": "Host"}}),
    ));
    events.push(meta(
        json!({"name": "process_sort_index", "ph": "M", "pid": HOST_PID, "tid": 0,
        "args": {"sort_index": 0}}),
    ));
    if !st.windows.is_empty() {
        // Step markers get a track of their own: a span crossing a step boundary would not nest
        // inside them on its thread's track.
        events.push(meta(
            json!({"name": "thread_name", "ph": "M", "pid": HOST_PID,
            "tid": STEPS_TID, "args": {"name": "steps"}}),
        ));
        events.push(meta(
            json!({"name": "thread_sort_index", "ph": "M", "pid": HOST_PID,
            "tid": STEPS_TID, "args": {"sort_index": STEPS_TID}}),
        ));
    }
    for (tid, name) in &st.threads {
        events.push(meta(
            json!({"name": "thread_name", "ph": "M", "pid": HOST_PID, "tid": tid,
            "args": {"name": name}}),
        ));
        events.push(meta(
            json!({"name": "thread_sort_index", "ph": "M", "pid": HOST_PID,
            "tid": tid, "args": {"sort_index": tid}}),
        ));
    }

    let streams: BTreeSet<u32> = rec.kernels.iter().map(|k| k.stream).collect();
    if !streams.is_empty() {
        events.push(meta(
            json!({"name": "process_name", "ph": "M", "pid": GPU_PID, "tid": 0,
            "args": {"name": st.device_label.as_deref().unwrap_or("GPU")}}),
        ));
        events.push(meta(
            json!({"name": "process_sort_index", "ph": "M", "pid": GPU_PID,
            "tid": 0, "args": {"sort_index": 1}}),
        ));
        for s in &streams {
            events.push(meta(
                json!({"name": "thread_name", "ph": "M", "pid": GPU_PID, "tid": s,
                "args": {"name": format!("stream {s}")}}),
            ));
            events.push(meta(
                json!({"name": "thread_sort_index", "ph": "M", "pid": GPU_PID,
                "tid": s, "args": {"sort_index": s}}),
            ));
        }
    }

    for w in &st.windows {
        events.push(Ev {
            key: (1, w.start_ns, Reverse(w.end_ns - w.start_ns)),
            value: json!({"name": format!("step {}", w.step), "cat": "step", "ph": "X",
                "ts": us(w.start_ns), "dur": us(w.end_ns - w.start_ns),
                "pid": HOST_PID, "tid": STEPS_TID, "args": {"step": w.step}}),
        });
    }

    for s in &rec.spans {
        let mut args = Map::new();
        for (k, v) in &s.args {
            args.insert((*k).to_string(), arg_json(v));
        }
        events.push(Ev {
            key: (1, s.start_ns, Reverse(s.end_ns - s.start_ns)),
            value: json!({"name": s.name, "cat": s.phase.as_str(), "ph": "X",
                "ts": us(s.start_ns), "dur": us(s.end_ns - s.start_ns),
                "pid": HOST_PID, "tid": s.tid, "args": args}),
        });
    }

    for c in &rec.counters {
        // JSON has no NaN or infinity; a viewer would choke on a null sample.
        if !c.value.is_finite() {
            continue;
        }
        let mut args = Map::new();
        args.insert(c.name.to_string(), json!(c.value));
        events.push(Ev {
            key: (1, c.ts_ns, Reverse(0)),
            value: json!({"name": c.name, "cat": "counter", "ph": "C", "ts": us(c.ts_ns),
                "pid": HOST_PID, "tid": 0, "args": args}),
        });
    }

    for k in &rec.kernels {
        let args = match &k.simulated {
            None => json!({"stream": k.stream, "flops": k.flops, "bytes": k.bytes}),
            Some(c) => json!({"stream": k.stream, "simulated": true,
                "time": "host time of the simulation, not device time",
                "warp_instructions": c.warp_instructions,
                "lane_instructions": c.lane_instructions,
                "global_load_sectors": c.global_load_sectors,
                "global_store_sectors": c.global_store_sectors,
                "shared_bank_conflicts": c.shared_bank_conflicts,
                "tensor_flops": c.tensor_flops,
                "descriptor_flops": c.flops, "descriptor_bytes": c.bytes}),
        };
        events.push(Ev {
            key: (1, k.start_ns, Reverse(k.dur_ns)),
            value: json!({"name": k.name, "cat": "kernel", "ph": "X", "ts": us(k.start_ns),
                "dur": us(k.dur_ns), "pid": GPU_PID, "tid": k.stream, "args": args}),
        });
    }

    // Stable, so metadata keeps its order.
    events.sort_by_key(|e| e.key);

    let mut out = Vec::with_capacity(128 * events.len() + 64);
    out.extend_from_slice(b"{\"displayTimeUnit\":\"ns\",\"otherData\":{\"producer\":\"lathe\"},");
    out.extend_from_slice(b"\"traceEvents\":[\n");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        serde_json::to_writer(&mut out, &e.value)?;
    }
    out.extend_from_slice(b"\n]}\n");
    Ok(out)
}
