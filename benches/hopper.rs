//! Hopper GEMM (wgmma + TMA, sm_90a) throughput in TFLOP/s next to cuBLASLt, measured in the
//! same run on the same buffers.
//!
//!     cargo bench -p lathe-benches --bench hopper [-- FILTER]
//!
//! `C(M, N) = A(M, K) B(N, K)^T`, bf16 operands, bf16 C, f32 accumulation. Shapes (M, K, N):
//! 4096^3, 8192^3 and GPT-2's (16384, 768, 2304) QKV, (16384, 768, 3072) MLP up,
//! (16384, 3072, 768) MLP down, (16384, 768, 50304) LM head. Inputs are random (never zeros).
//! A table of medians (7 event-timed batches of 10 launches after a warm-up) prints first, with
//! the ratio to cuBLASLt; then criterion measures each case (throughput in elements = FLOPs).
//!
//! The peer runs the same product: row-major `C = A B^T` is column-major `C^T = B A^T`, i.e.
//! cuBLASLt with `TRANSA = T` on our B (column-major `(K, N)`) and `TRANSB = N` on our A
//! (column-major `(K, M)`). cuBLASLt is loaded at run time; without it the peer is skipped.
//! Skips entirely without a GPU or on a GPU that is not compute capability 9.0.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use lathe_benches::cublaslt::{Peer, Plan};
use lathe_benches::{device_or_skip, time_with_events};
use lathe_host::gemm_ops::{Gemm, Op};
use lathe_host::hopper_ops::{HopperGemm, Version};
use lathe_host::{Device, DeviceBuffer, Stream};
use lathe_kernels::Elem;
use lathe_kernels::rng::Rng;
use std::time::Duration;

fn random(dev: &Device, rng: &mut Rng, len: usize) -> DeviceBuffer<bf16> {
    let v: Vec<bf16> = (0..len)
        .map(|_| bf16::from_f32(rng.range_f32(-1.0, 1.0)))
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

/// (name, M, K, N)
const SHAPES: [(&str, usize, usize, usize); 6] = [
    ("4096^3", 4096, 4096, 4096),
    ("8192^3", 8192, 8192, 8192),
    ("gpt2 qkv 16384x768x2304", 16384, 768, 2304),
    ("gpt2 fc 16384x768x3072", 16384, 768, 3072),
    ("gpt2 proj 16384x3072x768", 16384, 3072, 768),
    ("gpt2 lm_head 16384x768x50304", 16384, 768, 50304),
];

fn bench(c: &mut Criterion) {
    let Some(dev) = device_or_skip("hopper") else {
        return;
    };
    if dev.compute_capability() != (9, 0) {
        eprintln!(
            "hopper: skipped, {} is not compute capability 9.0",
            dev.describe()
        );
        return;
    }
    let gemms: Vec<HopperGemm> = Version::ALL
        .iter()
        .map(|&v| HopperGemm::new(&dev, v).expect("load the Hopper GEMM"))
        .collect();
    let peer = match Peer::new(&dev) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("hopper: cuBLASLt peer skipped: {e}");
            None
        }
    };
    println!(
        "hopper gemm on {} (bf16 C = A B^T, TFLOP/s, median of 7 x 10 launches)",
        dev.describe()
    );
    let s = dev.compute_stream().clone();
    let mut rng = Rng::new(0x4090);
    for (name, m, k, n) in SHAPES {
        let a = random(&dev, &mut rng, m * k);
        let b = random(&dev, &mut rng, n * k);
        let mut cbuf = random(&dev, &mut rng, m * n);
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let mut line = format!("{name:<32}");
        let mut best = 0f64;
        for g in &gemms {
            let t = median_seconds(&s, || g.gemm_on(&s, &a, &b, &mut cbuf, m, n, k));
            let tf = flops / t / 1e12;
            best = best.max(tf);
            line.push_str(&format!(" v{} {tf:7.1}", g.version().number()));
        }
        let plan = peer.as_ref().and_then(|p| {
            // C = A B^T with B stored (N, K): Lathe's `N T`.
            let g = Gemm::new(m, n, k).with_ops(Op::N, Op::T);
            Plan::new(p, &g, Elem::BF16, Elem::BF16)
                .map_err(|e| eprintln!("{name}: cuBLASLt peer skipped: {e}"))
                .ok()
        });
        if let Some(plan) = &plan {
            let (pa, pb, pc) = (a.addr(), b.addr(), cbuf.addr());
            let t = median_seconds(&s, || plan.run(pa, pb, pc, &s));
            let peer_tf = flops / t / 1e12;
            line.push_str(&format!(
                " | cuBLASLt {peer_tf:7.1} | best/cuBLASLt {:.2}",
                best / peer_tf
            ));
        }
        println!("{line}");

        let mut group = c.benchmark_group(format!("hopper/{name}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        for g in &gemms {
            group.bench_function(format!("lathe_v{}", g.version().number()), |bench| {
                bench.iter_custom(|iters| {
                    time_with_events(&s, iters, || g.gemm_on(&s, &a, &b, &mut cbuf, m, n, k))
                })
            });
        }
        if let Some(plan) = &plan {
            let (pa, pb, pc) = (a.addr(), b.addr(), cbuf.addr());
            group.bench_function("cublaslt", |bench| {
                bench.iter_custom(|iters| time_with_events(&s, iters, || plan.run(pa, pb, pc, &s)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
