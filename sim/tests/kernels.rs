//! Registered Lathe kernels (copied from the kernel registry's PTX dump) run on the simulator
//! against naive Rust computations, plus a self-measure of the interpreter's speed.

mod common;
use common::*;
use half::bf16;
use lathe_sim::{Launch, Param, Sim, SimConfig};
use std::time::Instant;

fn gemm_bf16(sim: &Sim, n: usize, seed: u64) -> (f64, lathe_sim::Counters, f64) {
    let m = sim
        .load_module(include_str!("data/gemm_v2_nn_bf16.ptx"))
        .expect("load");
    let mut rng = Rng::new(seed);
    let a: Vec<bf16> = (0..n * n).map(|_| bf16::from_f32(rng.f32())).collect();
    let b: Vec<bf16> = (0..n * n).map(|_| bf16::from_f32(rng.f32())).collect();
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let pa = upload_u16(sim, &bits(&a));
    let pb = upload_u16(sim, &bits(&b));
    let pc = upload_u16(sim, &vec![0x7fc0; n * n]);
    let tiles = (n / 128) * (n / 128);
    let nn = n as u32;
    let t = Instant::now();
    let c = sim
        .launch(
            &m,
            "lathe_gemm_v2_nn_bf16_bf16",
            &Launch {
                grid: (tiles as u32, 1, 1),
                block: (256, 1, 1),
                shared_bytes: 65536,
                params: vec![
                    Param::U64(pa),
                    Param::U64(pb),
                    Param::U64(pc),
                    Param::U64(pc),
                    Param::U32(nn),
                    Param::U32(nn),
                    Param::U32(nn),
                    Param::U32(nn),
                    Param::U32(nn),
                    Param::U32(nn),
                    Param::F32(1.0),
                    Param::F32(0.0),
                    Param::U32(0),
                ],
                regions: vec![],
            },
        )
        .expect("launch");
    let secs = t.elapsed().as_secs_f64();
    let out = download_u16(sim, pc, n * n);
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..n {
        for j in 0..n {
            let want: f64 = (0..n)
                .map(|k| a[i * n + k].to_f64() * b[k * n + j].to_f64())
                .sum();
            let got = bf16::from_bits(out[i * n + j]).to_f64();
            num += (got - want).powi(2);
            den += want * want;
        }
    }
    ((num / den).sqrt(), c, secs)
}

#[test]
fn gemm_v2_bf16_matches_naive_product() {
    let (rel, c, _) = gemm_bf16(&sim(), 256, 3);
    assert!(rel < 5e-3, "relative Frobenius error {rel}");
    assert_eq!(c.tensor_flops, 2 * 256 * 256 * 256);
    assert_eq!(c.blocks, 4);
    assert_eq!(c.dynamic_shared_bytes, 65536);
    assert!(c.cp_async_bytes >= 2 * 256 * 256 * 2);
}

/// Prints the interpreter's speed (lane instructions per second) on one host thread and on
/// all of them. No timing assertions: speed targets live in the benches.
#[test]
fn self_measure_speed() {
    for parallel in [false, true] {
        let sim = Sim::new(SimConfig {
            parallel_blocks: parallel,
            ..SimConfig::default()
        });
        let (rel, c, secs) = gemm_bf16(&sim, 512, 5);
        assert!(rel < 5e-3);
        println!(
            "bf16 512x512x512 gemm_v2, parallel_blocks={parallel}: {:.3} s, {} lane instructions, {:.1} M lane-instr/s",
            secs,
            c.lane_instructions,
            c.lane_instructions as f64 / secs / 1e6
        );
    }
}

fn scale(sim: &Sim, n: usize) -> (lathe_sim::Counters, f64, Option<f64>) {
    let m = sim
        .load_module(include_str!("data/elementwise.ptx"))
        .expect("load");
    let mut rng = Rng::new(11);
    let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let px = upload_f32(sim, &x);
    let py = poisoned(sim, n);
    let (c, secs, cpu) = timed(|| {
        sim.launch(
            &m,
            "lathe_scale_f32",
            &Launch {
                grid: (64, 1, 1),
                block: (256, 1, 1),
                params: vec![
                    Param::U64(px),
                    Param::U64(py),
                    Param::U64(n as u64),
                    Param::F32(-1.5),
                ],
                ..Launch::default()
            },
        )
    });
    let c = c.expect("launch");
    let y = download_f32(sim, py, n);
    for i in 0..n {
        assert_eq!(y[i].to_bits(), (-1.5 * x[i]).to_bits(), "element {i}");
    }
    (c, secs, cpu)
}

/// "wall s (on-CPU s): rate" for a speed line.
fn rate(lanes: u64, wall: f64, cpu: Option<f64>) -> String {
    let r = |s: f64| lanes as f64 / s / 1e6;
    match cpu {
        Some(c) => format!(
            "{wall:.3} s wall, {c:.3} s on a CPU: {:.1} M lane-instr/s per busy core ({:.1} by the wall clock)",
            r(c),
            r(wall)
        ),
        None => format!("{wall:.3} s: {:.1} M lane-instr/s", r(wall)),
    }
}

#[test]
fn elementwise_scale_matches_with_tail() {
    let (c, _, _) = scale(&sim(), 100_003);
    // The vector loop moves 16 bytes per lane: 4 sectors per 8 lanes, perfectly coalesced.
    assert_eq!(c.global_load_bytes, 100_003 * 4);
    assert_eq!(c.global_store_bytes, 100_003 * 4);
    assert_eq!(c.shared_bank_conflicts, 0);
}

#[test]
fn self_measure_speed_elementwise() {
    let sim = sim();
    let (c, secs, cpu) = scale(&sim, 1 << 22);
    println!(
        "scale_f32 over 4M elements, one host thread, {} lane instructions: {}",
        c.lane_instructions,
        rate(c.lane_instructions, secs, cpu)
    );
}

/// `lathe_sum_f32` / `lathe_max_abs_f32`: pass 1 writes per-block partials, pass 2 folds them
/// in one block (warp shuffles, a shared array of warp results, a barrier).
#[test]
fn reductions_two_passes() {
    let sim = sim();
    let m = sim
        .load_module(include_str!("data/reduce.ptx"))
        .expect("load");
    let n = 5000usize;
    let mut rng = Rng::new(21);
    let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let px = upload_f32(&sim, &x);
    let blocks = n.div_ceil(1024) as u32;
    let partial = poisoned(&sim, blocks as usize);
    let out = poisoned(&sim, 1);
    let launch = |entry: &str, x: u64, n: u64, out: u64, grid: u32| {
        sim.launch(
            &m,
            entry,
            &Launch {
                grid: (grid, 1, 1),
                block: (256, 1, 1),
                params: vec![Param::U64(x), Param::U64(n), Param::U64(out)],
                ..Launch::default()
            },
        )
        .expect(entry)
    };
    launch("lathe_sum_f32", px, n as u64, partial, blocks);
    launch("lathe_sum_f32", partial, blocks as u64, out, 1);
    let want: f64 = x.iter().map(|v| *v as f64).sum();
    let got = download_f32(&sim, out, 1)[0] as f64;
    assert!((got - want).abs() <= 1e-5 * x.iter().map(|v| v.abs() as f64).sum::<f64>());
    launch("lathe_max_abs_f32", px, n as u64, partial, blocks);
    launch("lathe_max_abs_f32", partial, blocks as u64, out, 1);
    let want = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(download_f32(&sim, out, 1)[0], want);
}

/// One 512^3 launch alone (no reference product), for profiling the interpreter.
#[test]
fn gemm_launch_only() {
    let sim = sim();
    let m = sim
        .load_module(include_str!("data/gemm_v2_nn_bf16.ptx"))
        .expect("load");
    let n = 512u32;
    let elems = (n * n) as usize;
    let mut rng = Rng::new(9);
    let data: Vec<u16> = (0..elems)
        .map(|_| bf16::from_f32(rng.f32()).to_bits())
        .collect();
    let pa = upload_u16(&sim, &data);
    let pc = upload_u16(&sim, &vec![0x7fc0; elems]);
    let (c, secs, cpu) = timed(|| {
        sim.launch(
            &m,
            "lathe_gemm_v2_nn_bf16_bf16",
            &Launch {
                grid: ((n / 128) * (n / 128), 1, 1),
                block: (256, 1, 1),
                shared_bytes: 65536,
                params: vec![
                    Param::U64(pa),
                    Param::U64(pa),
                    Param::U64(pc),
                    Param::U64(pc),
                    Param::U32(n),
                    Param::U32(n),
                    Param::U32(n),
                    Param::U32(n),
                    Param::U32(n),
                    Param::U32(n),
                    Param::F32(1.0),
                    Param::F32(0.0),
                    Param::U32(0),
                ],
                regions: vec![],
            },
        )
    });
    let c = c.expect("launch");
    println!(
        "gemm_v2 bf16 512^3 launch, one host thread, {} warp instructions, {} lane instructions: {}",
        c.warp_instructions.total(),
        c.lane_instructions,
        rate(c.lane_instructions, secs, cpu)
    );
    assert_eq!(c.shared_bank_conflicts, 0);
    assert_eq!(c.tensor_flops, 2 * 512 * 512 * 512);
}
