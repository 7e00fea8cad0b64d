//! GEMM throughput in TFLOP/s: Lathe's tensor-core kernels next to cuBLASLt, measured in the
//! same run on the same buffers.
//!
//!     cargo bench -p lathe-benches --bench gemm [-- FILTER]
//!
//! Shapes (M, K, N): 4096^3, 8192^3 and GPT-2's (16384, 768, 2304) QKV, (16384, 768, 3072) MLP
//! up, (16384, 3072, 768) MLP down, (16384, 768, 50304) LM head; bf16 and fp16 operands, C in
//! the operand type (forward storage, `N N`). Then the two backward products of the MLP-up
//! layer (`N T` input gradient, `T N` weight gradient into f32 with beta = 1) and the forward
//! with the fused bias + GELU epilogue. Inputs are random (never zeros); every matrix but the
//! smallest is larger than L2 or close to it, so inputs are not rotated. Each figure is timed
//! with CUDA events after a warm-up; a table of medians (TFLOP/s and the ratio to cuBLASLt)
//! prints first, then criterion measures each case (throughput in elements = FLOPs).
//!
//! cuBLASLt is loaded at run time; without it the peer is skipped with a message. Peer mapping:
//! row-major `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so cuBLASLt's A is our
//! B and its B is our A, with each transpose flag set when our operand is stored `T`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use lathe_benches::cublaslt::{Peer, Plan as PeerPlan};
use lathe_benches::{device_or_skip, time_with_events};
use lathe_host::gemm_ops::{Gemm, Version};
use lathe_host::{Device, DeviceBuffer, DeviceElem, Stream};
use lathe_kernels::Elem;
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::rng::Rng;
use std::time::Duration;

/// A random matrix of `len` elements in [-1, 1), made on the host (never zeros).
fn random<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, len: usize) -> DeviceBuffer<T> {
    let v: Vec<T> = (0..len)
        .map(|_| T::from_f32(rng.range_f32(-1.0, 1.0)))
        .collect();
    dev.htod(&v).expect("upload")
}

/// Median seconds per launch over 7 event-timed batches of 10 (after a warm-up).
fn median_seconds(stream: &Stream, mut f: impl FnMut() -> lathe_host::Result<()>) -> f64 {
    let mut v: Vec<f64> = (0..7)
        .map(|_| time_with_events(stream, 10, &mut f).as_secs_f64() / 10.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v[3]
}

/// One benchmark case: a problem, its types, and whether it fuses bias + GELU.
struct Case {
    name: String,
    g: Gemm,
    input: Elem,
    output: Elem,
    bias: bool,
    versions: Vec<Version>,
}

fn forward_cases() -> Vec<Case> {
    // (name, M, K, N)
    let shapes: [(&str, usize, usize, usize); 6] = [
        ("4096^3", 4096, 4096, 4096),
        ("8192^3", 8192, 8192, 8192),
        ("gpt2 qkv 16384x768x2304", 16384, 768, 2304),
        ("gpt2 fc 16384x768x3072", 16384, 768, 3072),
        ("gpt2 proj 16384x3072x768", 16384, 3072, 768),
        ("gpt2 lm_head 16384x768x50304", 16384, 768, 50304),
    ];
    let mut v = Vec::new();
    for input in [Elem::BF16, Elem::F16] {
        for (name, m, k, n) in shapes {
            let versions = if m * n * k <= 4096 * 4096 * 4096 {
                vec![Version::V2, Version::V1]
            } else {
                vec![Version::V2]
            };
            v.push(Case {
                name: format!("{} nn {name}", input.name()),
                g: Gemm::new(m, n, k),
                input,
                output: input,
                bias: false,
                versions,
            });
        }
    }
    // The MLP-up layer's training products, bf16: rows 16384, in 768, out 3072.
    let l = lathe_kernels::gemm::Linear {
        rows: 16384,
        inputs: 768,
        outputs: 3072,
    };
    v.push(Case {
        name: "bf16 nn fc + bias + gelu 16384x768x3072".into(),
        g: l.forward().with_gelu(true),
        input: Elem::BF16,
        output: Elem::BF16,
        bias: true,
        versions: vec![Version::V2],
    });
    v.push(Case {
        name: "bf16 nt fc dX 16384x3072x768".into(),
        g: l.backward_input(),
        input: Elem::BF16,
        output: Elem::BF16,
        bias: false,
        versions: vec![Version::V2],
    });
    v.push(Case {
        name: "bf16 tn fc dW += (f32) 768x16384x3072".into(),
        g: l.backward_weight(true),
        input: Elem::BF16,
        output: Elem::F32,
        bias: false,
        versions: vec![Version::V2],
    });
    v
}

/// Buffers of one case, typed.
struct Buffers<I: DeviceElem, O: DeviceElem> {
    a: DeviceBuffer<I>,
    b: DeviceBuffer<I>,
    bias: DeviceBuffer<I>,
    c: DeviceBuffer<O>,
}

fn buffers<I: DeviceElem + Float, O: DeviceElem + Float>(
    dev: &Device,
    rng: &mut Rng,
    g: &Gemm,
) -> Buffers<I, O> {
    Buffers {
        a: random(dev, rng, g.a_len()),
        b: random(dev, rng, g.b_len()),
        bias: random(dev, rng, g.n),
        c: random(dev, rng, g.c_len()),
    }
}

fn tflops(g: &Gemm, seconds: f64) -> f64 {
    2.0 * g.m as f64 * g.n as f64 * g.k as f64 / seconds / 1e12
}

fn run_case<I: DeviceElem + Float, O: DeviceElem + Float>(
    c: &mut Criterion,
    dev: &Device,
    peer: Option<&Peer>,
    case: &Case,
    rng: &mut Rng,
    table: &mut Vec<String>,
) {
    let s = dev.compute_stream().clone();
    let mut buf: Buffers<I, O> = buffers(dev, rng, &case.g);
    let g = case.g;
    let mut line = format!("{:<44}", case.name);
    let mut ours = Vec::new();
    for &v in &case.versions {
        let Buffers { a, b, bias, c } = &mut buf;
        let bias = case.bias.then_some(&*bias);
        let t = median_seconds(&s, || dev.gemm_with(v, &s, &g, a, b, bias, c));
        ours.push((v, tflops(&g, t)));
        line.push_str(&format!(" lathe v{} {:7.1}", v.number(), tflops(&g, t)));
    }
    let plan = peer.and_then(|p| match PeerPlan::new(p, &g, case.input, case.output) {
        Ok(plan) => Some(plan),
        Err(e) => {
            eprintln!("{}: cuBLASLt peer skipped: {e}", case.name);
            None
        }
    });
    if let Some(plan) = &plan {
        let (a, b, cc) = (buf.a.addr(), buf.b.addr(), buf.c.addr());
        let t = median_seconds(&s, || plan.run(a, b, cc, &s));
        let peer_tf = tflops(&g, t);
        line.push_str(&format!(" | cuBLASLt {peer_tf:7.1}"));
        if let Some((_, best)) = ours.first() {
            line.push_str(&format!(" | ratio {:.2}", best / peer_tf));
        }
        if case.bias {
            line.push_str(" (peer without the bias + GELU epilogue)");
        }
    }
    println!("{line}");
    table.push(line);

    let mut group = c.benchmark_group(format!("gemm/{}", case.name));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(2 * (g.m * g.n * g.k) as u64));
    for &v in &case.versions {
        let Buffers { a, b, bias, c } = &mut buf;
        let bias = case.bias.then_some(&*bias);
        group.bench_function(format!("lathe_v{}", v.number()), |bench| {
            bench.iter_custom(|iters| {
                time_with_events(&s, iters, || dev.gemm_with(v, &s, &g, a, b, bias, c))
            })
        });
    }
    if let Some(plan) = &plan {
        let (a, b, cc) = (buf.a.addr(), buf.b.addr(), buf.c.addr());
        group.bench_function("cublaslt", |bench| {
            bench.iter_custom(|iters| time_with_events(&s, iters, || plan.run(a, b, cc, &s)))
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    let Some(dev) = device_or_skip("gemm") else {
        return;
    };
    let peer = match Peer::new(&dev) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("gemm: cuBLASLt peer skipped: {e}");
            None
        }
    };
    println!(
        "gemm on {} (TFLOP/s, median of 7 x 10 launches)",
        dev.describe()
    );
    let mut rng = Rng::new(0x6E44);
    let mut table = Vec::new();
    for case in forward_cases() {
        match (case.input, case.output) {
            (Elem::BF16, Elem::BF16) => {
                run_case::<bf16, bf16>(c, &dev, peer.as_ref(), &case, &mut rng, &mut table)
            }
            (Elem::BF16, Elem::F32) => {
                run_case::<bf16, f32>(c, &dev, peer.as_ref(), &case, &mut rng, &mut table)
            }
            (Elem::F16, Elem::F16) => {
                run_case::<f16, f16>(c, &dev, peer.as_ref(), &case, &mut rng, &mut table)
            }
            _ => unreachable!("cases use bf16/bf16, bf16/f32, f16/f16"),
        }
    }
    println!("\nsummary, {}:", dev.describe());
    for l in &table {
        println!("{l}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
