//! The Hopper GEMM (wgmma + TMA, sm_90a) against its CPU twin on the GPU: every version x
//! output type (f32, bf16) at ragged shapes (M, N and K tails, odd N for the scalar epilogue,
//! more tiles than SMs for the persistent walk). Inputs are fresh random bf16 values (never
//! zeros); C is poisoned with NaN before each launch, so an unwritten element fails. Tolerance:
//! `tolerance::rel_tolerance(BF16)`. Large shapes are compared on a sample of rows (the f64
//! twin over all of them would take minutes), and checked for unwritten elements everywhere.
//! Skips without a GPU (fails instead with `LATHE_REQUIRE_GPU=1`) and on a GPU whose compute
//! capability is not 9.0.

use half::bf16;
use lathe_host::hopper_ops::{HopperGemm, Version};
use lathe_host::testing::test_device;
use lathe_host::{Device, DeviceBuffer, DeviceElem};
use lathe_kernels::Elem;
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::hopper::twin;
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

/// (m, n, k): exact tile, tails on every axis with odd N, a square with a K tail and several
/// ring passes, and a GPT-2-like shape with more tiles (288) than an H100 has SMs.
const SHAPES: [(usize, usize, usize); 5] = [
    (128, 256, 64),
    (129, 255, 72),
    (1000, 1000, 520),
    (4096, 2304, 768),
    (300, 64, 1032),
];

/// The shapes on the simulated device, which interprets every instruction: the same tails
/// (M, N and K, odd N) and several ring passes, at sizes it runs in seconds.
const SIM_SHAPES: &[(usize, usize, usize)] = &[
    (128, 256, 64),
    (129, 255, 72),
    (300, 64, 1032),
    (260, 300, 136),
];

/// Above this many multiply-adds the twin runs on sampled rows only.
const FULL_TWIN_MACS: usize = 600_000_000;

/// Device 0 if it is an sm_90 part, else `None` after saying why.
fn hopper_or_skip(test: &str) -> Option<Device> {
    let dev = test_device(test);
    if dev.compute_capability() != (9, 0) {
        eprintln!(
            "{test}: skipped, {} is not compute capability 9.0 (the kernels are sm_90a)",
            dev.describe()
        );
        return None;
    }
    Some(dev)
}

fn random_bf16(rng: &mut Rng, len: usize) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(rng.range_f32(-1.0, 1.0)))
        .collect()
}

/// Rows compared against the twin: all of them for small problems, else the first and last
/// two of each 128-row tile edge plus a spread of others.
fn rows_to_check(m: usize, n: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    if m * n * k <= FULL_TWIN_MACS {
        return (0..m).collect();
    }
    let mut rows = vec![0, 1, 63, 64, 127, 128, m - 2, m - 1];
    rows.extend((0..24).map(|_| rng.below(m as u64) as usize));
    rows.sort_unstable();
    rows.dedup();
    rows
}

fn run_case<O: DeviceElem + Float>(
    dev: &Device,
    g: &HopperGemm,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
) {
    let what = format!(
        "hopper v{} C {} ({m}, {n}, {k})",
        g.version().number(),
        O::ELEM.name()
    );
    let a = random_bf16(rng, m * k);
    let b = random_bf16(rng, n * k);
    let da = dev.htod(&a).expect("upload A");
    let db = dev.htod(&b).expect("upload B");
    let mut dc: DeviceBuffer<O> = dev
        .htod(&vec![O::from_f32(f32::NAN); m * n])
        .expect("upload poisoned C");
    g.gemm(&da, &db, &mut dc, m, n, k)
        .unwrap_or_else(|e| panic!("{what}: launch failed: {e}"));
    dev.synchronize()
        .unwrap_or_else(|e| panic!("{what}: kernel failed: {e}"));
    let c: Vec<f64> = dc
        .to_vec()
        .expect("download C")
        .iter()
        .map(|x| x.to_f32() as f64)
        .collect();
    if let Some(i) = c.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element ({}, {}) is {} (unwritten or wrong)",
            i / n,
            i % n,
            c[i]
        );
    }
    let rows = rows_to_check(m, n, k, rng);
    let reference = twin::gemm_tn_rows(&a, &b, m, n, k, &rows).expect("twin");
    let out: Vec<f64> = rows
        .iter()
        .flat_map(|&r| c[r * n..(r + 1) * n].iter().copied())
        .collect();
    match check_close(&what, &out, &reference, rel_tolerance(Elem::BF16)) {
        Ok(err) => eprintln!("{what}: rel err {err:.2e} over {} rows", rows.len()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn hopper_gemm_matches_twin() {
    let Some(dev) = hopper_or_skip("hopper_gemm_matches_twin") else {
        return;
    };
    let mut rng = Rng::new(0x4090);
    for v in Version::ALL {
        let g = HopperGemm::new(&dev, v).expect("load the Hopper GEMM");
        let shapes: &[_] = if dev.is_sim() { SIM_SHAPES } else { &SHAPES };
        for &shape in shapes {
            run_case::<f32>(&dev, &g, &mut rng, shape);
            run_case::<bf16>(&dev, &g, &mut rng, shape);
        }
    }
}

#[test]
fn hopper_gemm_is_deterministic_and_rejects_bad_shapes() {
    let Some(dev) = hopper_or_skip("hopper_gemm_is_deterministic_and_rejects_bad_shapes") else {
        return;
    };
    let mut rng = Rng::new(0x4091);
    let g = HopperGemm::new(&dev, Version::SHIPPED).expect("load");
    let (m, n, k) = (515, 777, 200);
    let da = dev.htod(&random_bf16(&mut rng, m * k)).expect("A");
    let db = dev.htod(&random_bf16(&mut rng, n * k)).expect("B");
    let mut c1 = dev.htod(&vec![f32::NAN; m * n]).expect("C");
    let mut c2 = dev.htod(&vec![f32::NAN; m * n]).expect("C");
    g.gemm(&da, &db, &mut c1, m, n, k).expect("launch 1");
    g.gemm(&da, &db, &mut c2, m, n, k).expect("launch 2");
    let (v1, v2) = (c1.to_vec().expect("C1"), c2.to_vec().expect("C2"));
    let same = v1.iter().zip(&v2).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "two runs on the same inputs differ: a race");
    // k not a multiple of 8: TMA cannot describe the rows; a clear error, nothing launched.
    let e = g
        .gemm(&da, &db, &mut c1, m, n, 196)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k = 196"), "{e}");
    // C too short.
    let mut short = dev.alloc::<f32>(10).expect("alloc");
    let e = g
        .gemm(&da, &db, &mut short, m, n, k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("C holds 10"), "{e}");
}
