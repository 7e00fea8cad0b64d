//! The simulated GPU's own speed: lane-instructions per second (instructions times active
//! lanes, from the simulator's counters) on the launches Lathe's GPU tests make. This measures
//! the interpreter on the host CPU, not any GPU; it says how large a problem the simulated
//! device can run in a test.
//!
//!     cargo bench -p lathe-benches --bench sim
//!
//! Each launch runs on one host thread (`parallel_blocks: false`, the per-core figure) and on
//! all of them. Criterion's "elements" are lane-instructions, so its throughput line reads in
//! lane-instructions per second. Launches: a bf16 mma.sync GEMM 256x256x256 (f32 out), the
//! Hopper wgmma + TMA GEMM at the same shape, LayerNorm forward over 256 rows of 768, GELU
//! over 1M bf16, and fused AdamW over 1M parameters.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use lathe_host::hopper_ops::{HopperGemm, Version as HVersion};
use lathe_host::nn_ops::{AdamWLaunch, WorkingCopyMut};
use lathe_host::{Device, DeviceBuffer, SimConfig};
use lathe_kernels::gemm::Gemm;
use lathe_kernels::nn::adamw::DecayRanges;
use lathe_kernels::nn::amp::StepState;
use lathe_kernels::rng::Rng;

fn upload_bf16(dev: &Device, rng: &mut Rng, n: usize) -> DeviceBuffer<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.range_f32(-1.0, 1.0)))
        .collect();
    dev.htod(&v).expect("upload")
}

/// Lane-instructions of one call of `f` (from the simulator's counters).
fn lane_instructions(dev: &Device, f: &mut dyn FnMut() -> lathe_host::Result<()>) -> u64 {
    dev.enable_kernel_timing().expect("timing");
    f().expect("launch on the simulated device");
    let t = dev
        .take_kernel_timings()
        .expect("timings")
        .expect("enabled");
    dev.disable_kernel_timing();
    t.kernels
        .iter()
        .filter_map(|k| k.counters.as_ref())
        .map(|c| c.lane_instructions)
        .sum()
}

type Launch<'a> = Box<dyn FnMut() -> lathe_host::Result<()> + 'a>;

fn bench(c: &mut Criterion) {
    for parallel in [false, true] {
        let dev = Device::sim_with(SimConfig {
            parallel_blocks: parallel,
            ..SimConfig::default()
        });
        let mut rng = Rng::new(0x51);
        let (m, n, k) = (256, 256, 256);
        let a = upload_bf16(&dev, &mut rng, m * k);
        let b = upload_bf16(&dev, &mut rng, n * k);
        let mut c32 = dev.alloc::<f32>(m * n).expect("alloc");
        let mut c32h = dev.alloc::<f32>(m * n).expect("alloc");
        let hopper = HopperGemm::new(&dev, HVersion::SHIPPED).expect("hopper gemm");
        let (rows, ch) = (256, 768);
        let x = upload_bf16(&dev, &mut rng, rows * ch);
        let w = upload_bf16(&dev, &mut rng, ch);
        let bias = upload_bf16(&dev, &mut rng, ch);
        let mut y = dev.alloc::<bf16>(rows * ch).expect("alloc");
        let mut mean = dev.alloc::<f32>(rows).expect("alloc");
        let mut rstd = dev.alloc::<f32>(rows).expect("alloc");
        let big = 1 << 20;
        let gx = upload_bf16(&dev, &mut rng, big);
        let mut gy = dev.alloc::<bf16>(big).expect("alloc");
        let up = |rng: &mut Rng, lo, hi| dev.htod(&rng.vec_f32(big, lo, hi)).expect("upload");
        let mut master = up(&mut rng, -0.1, 0.1);
        let grads = up(&mut rng, -1.0, 1.0);
        let mut mom = up(&mut rng, -0.01, 0.01);
        let mut var = up(&mut rng, 1e-8, 1e-4);
        let mut working = dev.alloc::<bf16>(big).expect("alloc");
        let ranges = dev
            // Two decayed ranges (matrices) around an undecayed one (biases and gains).
            .upload_decay_ranges(
                &DecayRanges::new(vec![0..big as u64 / 2, 3 * big as u64 / 4..big as u64])
                    .expect("ranges"),
            )
            .expect("ranges");
        let state = dev.step_state(&StepState::new(1.0)).expect("state");
        let adamw = AdamWLaunch {
            lr: 6e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            offset: 0,
            seed: 7,
            unscale: true,
        };

        let mut launches: Vec<(&str, Launch<'_>)> = vec![
            (
                "gemm_v2_bf16_256",
                Box::new(|| dev.gemm(&Gemm::new(m, n, k), &a, &b, None, &mut c32)),
            ),
            (
                "hgemm_bf16_256",
                Box::new(|| hopper.gemm(&a, &b, &mut c32h, m, n, k)),
            ),
            (
                "layernorm_fwd_bf16_256x768",
                Box::new(|| {
                    dev.layernorm_forward(&x, &w, &bias, &mut y, &mut mean, &mut rstd, ch, 1e-5)
                }),
            ),
            (
                "gelu_fwd_bf16_1m",
                Box::new(|| dev.gelu_forward(&gx, &mut gy)),
            ),
            (
                "adamw_bf16_1m",
                Box::new(|| {
                    dev.adamw_step(
                        &mut master,
                        &grads,
                        &mut mom,
                        &mut var,
                        WorkingCopyMut::Bf16(&mut working),
                        &ranges,
                        &state,
                        &adamw,
                    )
                }),
            ),
        ];
        let mut g = c.benchmark_group(if parallel {
            "sim_all_threads"
        } else {
            "sim_one_thread"
        });
        g.sample_size(10);
        for (name, f) in launches.iter_mut() {
            let lanes = lane_instructions(&dev, f.as_mut());
            g.throughput(Throughput::Elements(lanes));
            g.bench_function(*name, |bch| bch.iter(|| f().expect("launch")));
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
