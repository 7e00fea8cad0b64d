//! The hardware probes (`probes/*.ptx`, checked on an H100) on the simulator.

mod common;
use common::*;
use half::bf16;
use lathe_sim::{Launch, Param};

/// `mma_probe`: one warp, one m16n8k16 bf16 mma with f32 accumulation from zero.
/// A (16x16) row-major, B stored as (n=8, k=16) rows, D (16x8) row-major f32.
#[test]
fn mma_probe_matches_f64_product() {
    let sim = sim();
    let m = sim
        .load_module(include_str!("probes/mma.ptx"))
        .expect("load");
    let mut rng = Rng::new(7);
    let a: Vec<bf16> = (0..256).map(|_| bf16::from_f32(rng.f32())).collect();
    let b: Vec<bf16> = (0..128).map(|_| bf16::from_f32(rng.f32())).collect();
    let pa = upload_u16(&sim, &a.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let pb = upload_u16(&sim, &b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let pd = poisoned(&sim, 128);
    let c = sim
        .launch(
            &m,
            "mma_probe",
            &Launch {
                grid: (1, 1, 1),
                block: (32, 1, 1),
                params: vec![Param::U64(pa), Param::U64(pb), Param::U64(pd)],
                ..Launch::default()
            },
        )
        .expect("launch");
    let d = download_f32(&sim, pd, 128);
    let mut max_err = 0f64;
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = (0..16)
                .map(|k| a[i * 16 + k].to_f64() * b[j * 16 + k].to_f64())
                .sum();
            max_err = max_err.max((d[i * 8 + j] as f64 - want).abs());
        }
    }
    // The H100 gives 3.0e-8 on this probe; one f32 rounding of values below 4 is at most 2.4e-7.
    assert!(max_err <= 2.4e-7, "max abs error {max_err}");
    assert_eq!(c.tensor_flops, 2 * 16 * 8 * 16);
    assert_eq!(c.warp_instructions.tensor, 1);
    assert_eq!(c.global_load_requests, 6);
    assert_eq!(c.global_store_requests, 2);
}
