//! Elementwise kernels in GB/s (bytes read + written), next to a device-to-device copy
//! (`cuMemcpyDtoD`, the bandwidth ceiling) measured in the same run.
//!
//!     cargo bench -p lathe-benches --bench elementwise
//!
//! Inputs are random (never zeros); each kernel is timed with CUDA events over many launches.
//! Sizes: 64M elements (256 MB of f32), far larger than L2.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use lathe_benches::{device_or_skip, time_with_events};
use lathe_kernels::rng::Rng;

const N: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let Some(dev) = device_or_skip("elementwise") else {
        return;
    };
    let s = dev.compute_stream().clone();
    let x32 = dev
        .htod(&Rng::new(1).vec_f32(N, -1.0, 1.0))
        .expect("upload");
    let mut y32 = dev
        .htod(&Rng::new(2).vec_f32(N, -1.0, 1.0))
        .expect("upload");
    let mut xb = dev.alloc::<bf16>(N).expect("alloc");
    dev.cast(&x32, &mut xb).expect("cast");
    let mut yb = dev.alloc::<bf16>(N).expect("alloc");
    let mut yh = dev.alloc::<f16>(N).expect("alloc");
    let mut g = c.benchmark_group(format!("elementwise/{}", dev.name()));
    g.sample_size(20);

    g.throughput(Throughput::Bytes((N * 8) as u64));
    g.bench_function("copy_d2d_f32 (peer: cuMemcpyDtoD)", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || x32.copy_to(&mut y32)))
    });
    g.bench_function("scale_f32", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.scale(&x32, &mut y32, 0.5)))
    });
    g.throughput(Throughput::Bytes((N * 12) as u64));
    g.bench_function("axpy_f32", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.axpy(0.5, &x32, &mut y32)))
    });
    g.throughput(Throughput::Bytes((N * 6) as u64));
    g.bench_function("cast_f32_bf16", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.cast(&x32, &mut yb)))
    });
    g.bench_function("cast_f32_f16", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.cast(&x32, &mut yh)))
    });
    g.bench_function("cast_bf16_f32", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.cast(&xb, &mut y32)))
    });
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function("fill_f32", |b| {
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.fill(&mut y32, 1.5)))
    });
    g.bench_function("sum_f32", |b| {
        let mut out = dev.alloc::<f32>(1).expect("alloc");
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.sum_into(&x32, &mut out)))
    });
    g.bench_function("max_abs_f32", |b| {
        let mut out = dev.alloc::<f32>(1).expect("alloc");
        b.iter_custom(|iters| time_with_events(&s, iters, || dev.max_abs_into(&x32, &mut out)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
