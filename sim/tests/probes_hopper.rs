//! The sm_90a hardware probes (`probes/wgmma.ptx`, `probes/tma.ptx`, run on an H100) as PTX on
//! the simulator, with the results the H100 gave: `wg_swz128`, `wg_core_lbo128` and `tma_wg`
//! compute D = A B^T (64x64x64, bf16 in, f32 out) to within the f32 summation error, and
//! `wg_core_lbo1024` — the layout that ran WRONG on the H100 — comes out wrong here too.
//! Inputs are random bf16 (never zero); D is poisoned with NaN before each launch.

use half::bf16;
use lathe_sim::tensor_map::{Swizzle, TensorMapDesc, TmaDtype, encode};
use lathe_sim::{ErrorKind, Launch, Param, Sim, SimConfig};

/// Deterministic values in [-0.5, 0.5), never exactly zero.
fn random_bf16(seed: &mut u64, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = (*seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5;
            bf16::from_f32(if x == 0.0 { 0.25 } else { x })
        })
        .collect()
}

fn upload(sim: &Sim, v: &[bf16]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let p = sim.alloc(bytes.len() as u64).expect("alloc");
    sim.write(p, &bytes).expect("write");
    p
}

fn poisoned_d(sim: &Sim) -> u64 {
    let bytes: Vec<u8> = (0..64 * 64).flat_map(|_| f32::NAN.to_le_bytes()).collect();
    let p = sim.alloc(bytes.len() as u64).expect("alloc");
    sim.write(p, &bytes).expect("write");
    p
}

fn read_d(sim: &Sim, p: u64) -> Vec<f32> {
    let mut bytes = vec![0u8; 64 * 64 * 4];
    sim.read(p, &mut bytes).expect("read");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Inputs {
    a: Vec<bf16>,
    b: Vec<bf16>,
    /// D = A B^T in f64, and the sum of |a b| per element (for the error bound).
    want: Vec<f64>,
    magnitude: Vec<f64>,
}

fn inputs(seed: u64) -> Inputs {
    let mut s = seed;
    let a = random_bf16(&mut s, 64 * 64);
    let b = random_bf16(&mut s, 64 * 64);
    let mut want = vec![0f64; 64 * 64];
    let mut magnitude = vec![0f64; 64 * 64];
    for i in 0..64 {
        for j in 0..64 {
            for k in 0..64 {
                let p = a[i * 64 + k].to_f64() * b[j * 64 + k].to_f64();
                want[i * 64 + j] += p;
                magnitude[i * 64 + j] += p.abs();
            }
        }
    }
    Inputs {
        a,
        b,
        want,
        magnitude,
    }
}

/// Max abs error and whether every element is within f32 summation error of the f64 product
/// (64 products summed in f32: at most 64 * 2^-24 * sum |a b|), with no NaN left.
fn compare(d: &[f32], x: &Inputs) -> (f64, bool) {
    let mut max = 0f64;
    let mut ok = true;
    for ((&got, &want), &mag) in d.iter().zip(&x.want).zip(&x.magnitude) {
        if got.is_nan() {
            return (f64::INFINITY, false);
        }
        let e = (got as f64 - want).abs();
        max = max.max(e);
        ok &= e <= 64.0 * f64::powi(2.0, -24) * mag;
    }
    (max, ok)
}

fn run_wgmma(entry: &str) -> (f64, bool) {
    let sim = Sim::new(SimConfig::default());
    let m = sim
        .load_module(include_str!("probes/wgmma.ptx"))
        .expect("load wgmma.ptx");
    let x = inputs(12345);
    let (pa, pb, pd) = (upload(&sim, &x.a), upload(&sim, &x.b), poisoned_d(&sim));
    sim.launch(
        &m,
        entry,
        &Launch {
            grid: (1, 1, 1),
            block: (128, 1, 1),
            params: vec![Param::U64(pa), Param::U64(pb), Param::U64(pd)],
            ..Launch::default()
        },
    )
    .unwrap_or_else(|e| panic!("{entry}: {e}"));
    compare(&read_d(&sim, pd), &x)
}

#[test]
fn wgmma_with_128b_swizzle_matches_the_product() {
    let (max, ok) = run_wgmma("wg_swz128");
    assert!(ok, "wg_swz128: max abs err {max:e} (the H100 gave 2.7e-7)");
    assert!(max < 1e-5, "wg_swz128: max abs err {max:e}");
}

#[test]
fn wgmma_core_matrices_with_lbo_128_match_the_product() {
    let (max, ok) = run_wgmma("wg_core_lbo128");
    assert!(
        ok,
        "wg_core_lbo128: max abs err {max:e} (the H100 gave 2.7e-7)"
    );
}

#[test]
fn wgmma_core_matrices_with_lbo_and_sbo_swapped_are_wrong_as_on_the_h100() {
    let (max, ok) = run_wgmma("wg_core_lbo1024");
    assert!(
        !ok && max > 0.1,
        "wg_core_lbo1024 ran WRONG on the H100 but matches here (max abs err {max:e})"
    );
}

fn tensor_map(addr: u64) -> Vec<u8> {
    encode(&TensorMapDesc {
        dtype: TmaDtype::BF16,
        global_addr: addr,
        dims: vec![64, 64],
        strides: vec![128],
        box_dims: vec![64, 64],
        swizzle: Swizzle::B128,
    })
    .expect("encode")
    .to_vec()
}

#[test]
fn tma_mbarrier_and_wgmma_match_the_product() {
    let sim = Sim::new(SimConfig::default());
    let m = sim
        .load_module(include_str!("probes/tma.ptx"))
        .expect("load tma.ptx");
    let x = inputs(777);
    let (pa, pb, pd) = (upload(&sim, &x.a), upload(&sim, &x.b), poisoned_d(&sim));
    let counters = sim
        .launch(
            &m,
            "tma_wg",
            &Launch {
                grid: (1, 1, 1),
                block: (128, 1, 1),
                params: vec![
                    Param::Bytes(tensor_map(pa)),
                    Param::Bytes(tensor_map(pb)),
                    Param::U64(pd),
                ],
                ..Launch::default()
            },
        )
        .unwrap_or_else(|e| panic!("tma_wg: {e}"));
    let (max, ok) = compare(&read_d(&sim, pd), &x);
    assert!(ok, "tma_wg: max abs err {max:e} (the H100 gave 2.7e-7)");
    assert_eq!(counters.tma_bytes, 2 * 64 * 64 * 2, "two 8 KiB boxes");
    assert_eq!(counters.tensor_flops, 2 * 64 * 64 * 64, "4 x m64n64k16");
}

#[test]
fn tma_through_a_corrupted_tensor_map_is_an_error() {
    let sim = Sim::new(SimConfig::default());
    let m = sim
        .load_module(include_str!("probes/tma.ptx"))
        .expect("load tma.ptx");
    let x = inputs(778);
    let (pa, pb, pd) = (upload(&sim, &x.a), upload(&sim, &x.b), poisoned_d(&sim));
    let mut bad = tensor_map(pa);
    bad[40] ^= 1;
    let e = sim
        .launch(
            &m,
            "tma_wg",
            &Launch {
                grid: (1, 1, 1),
                block: (128, 1, 1),
                params: vec![
                    Param::Bytes(bad),
                    Param::Bytes(tensor_map(pb)),
                    Param::U64(pd),
                ],
                ..Launch::default()
            },
        )
        .expect_err("a corrupted tensor map must not launch");
    assert_eq!(e.kind, ErrorKind::TensorMap, "{e}");
    assert!(e.site.is_some(), "the error names where: {e}");
}

#[test]
fn wgmma_reading_ordinary_stores_without_a_proxy_fence_is_an_error() {
    // wg_swz128 with its `fence.proxy.async` removed: the H100 may read stale shared memory
    // through the async proxy; the simulator refuses the launch.
    let ptx = include_str!("probes/wgmma.ptx");
    assert!(ptx.contains("fence.proxy.async.shared::cta;"));
    let unfenced = ptx.replace("\tfence.proxy.async.shared::cta;\n", "");
    let sim = Sim::new(SimConfig::default());
    let m = sim.load_module(&unfenced).expect("load");
    let x = inputs(99);
    let (pa, pb, pd) = (upload(&sim, &x.a), upload(&sim, &x.b), poisoned_d(&sim));
    let e = sim
        .launch(
            &m,
            "wg_swz128",
            &Launch {
                grid: (1, 1, 1),
                block: (128, 1, 1),
                params: vec![Param::U64(pa), Param::U64(pb), Param::U64(pd)],
                ..Launch::default()
            },
        )
        .expect_err("no fence.proxy.async: must not launch cleanly");
    assert_eq!(e.kind, ErrorKind::AsyncProxy, "{e}");
    assert!(e.to_string().contains("fence.proxy.async"), "{e}");
}
