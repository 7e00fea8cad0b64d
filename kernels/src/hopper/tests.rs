//! CPU-side checks of the Hopper GEMM family: the twin, the tile order, the PTX text.

use super::*;
use half::bf16;

#[test]
fn twin_matches_a_hand_computed_product() {
    // A (2, 3), B (2, 3): C = A B^T.
    let f = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let a = f(&[1.0, 2.0, 3.0, -1.0, 0.5, 2.0]);
    let b = f(&[1.0, 0.0, -1.0, 2.0, 2.0, 2.0]);
    let c = twin::gemm_tn(&a, &b, 2, 2, 3).unwrap();
    assert_eq!(c, vec![-2.0, 12.0, -3.0, 3.0]);
    let rows = twin::gemm_tn_rows(&a, &b, 2, 2, 3, &[1]).unwrap();
    assert_eq!(rows, vec![-3.0, 3.0]);
    assert!(twin::gemm_tn(&a, &b, 2, 2, 4).is_err());
}

#[test]
fn tile_order_visits_every_tile_once() {
    for (tm, tn) in [(1, 1), (3, 7), (17, 3), (32, 16), (128, 197), (33, 1)] {
        let mut seen = vec![false; (tm * tn) as usize];
        for t in 0..tm * tn {
            let (i, j) = tile_coords(t, tm, tn);
            assert!(i < tm && j < tn, "tile {t} -> ({i}, {j}) outside {tm}x{tn}");
            let idx = (i * tn + j) as usize;
            assert!(!seen[idx], "tile ({i}, {j}) visited twice");
            seen[idx] = true;
        }
    }
}

#[test]
fn shared_memory_fits_the_h100() {
    // 227 KiB is the H100's per-block opt-in limit.
    assert!(shared_bytes() <= 227 * 1024, "{}", shared_bytes());
    assert_eq!(ptx::barrier_offset() % 1024, 0);
    assert_eq!(a_stage_bytes() % 1024, 0);
    assert_eq!(b_stage_bytes() % 1024, 0);
}

#[test]
fn ptx_has_the_entries_and_instructions_it_claims() {
    for v in Version::ALL {
        let text = ptx::module(v);
        for out in [Elem::F32, Elem::BF16] {
            let k = kernel_for(v, out).unwrap();
            assert_eq!(k.entry, ptx::entry_name(v, out));
            assert!(
                text.contains(&format!(".entry {}(", k.entry)),
                "{}",
                k.entry
            );
        }
        // 4 wgmma per K step, in each of the two entries.
        assert_eq!(
            text.matches("wgmma.mma_async.sync.aligned.m64n256k16")
                .count(),
            8
        );
        assert_eq!(text.matches("cp.async.bulk.tensor.2d").count(), 4);
        assert!(text.contains("setmaxnreg.dec.sync.aligned.u32 40;"));
        assert!(text.contains("setmaxnreg.inc.sync.aligned.u32 232;"));
        let wait1 = text.contains("wgmma.wait_group.sync.aligned 1;");
        assert_eq!(wait1, v == Version::V2);
    }
}
