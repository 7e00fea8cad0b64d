//! Index math, descriptors and problem validation. (The generated PTX itself runs on Lathe's
//! simulated device in `sim_tests`.)

use super::tile::{Ix, Operand, Tile, acc_origin, raster, swizzle};
use super::*;

fn tiles() -> [Tile; 2] {
    [V1_TILE, V2_TILE]
}

fn operands(t: &Tile) -> Vec<Operand> {
    let mut v = Vec::new();
    for op in [Op::N, Op::T] {
        v.push(Operand::a(t, op));
        v.push(Operand::b(t, op));
    }
    v
}

#[test]
fn tiles_are_valid() {
    for t in tiles() {
        t.validate().unwrap();
    }
    let bad = Tile { bm: 96, ..V2_TILE };
    assert!(bad.validate().is_err());
    let too_much_smem = Tile {
        stages: 8,
        ..V2_TILE
    };
    assert!(too_much_smem.validate().is_err());
}

#[test]
fn swizzle_matches_its_expression_form() {
    for t in tiles() {
        for o in operands(&t) {
            // load_dst is the Ix form of smem_offset at the thread's (row, chunk).
            for tid in 0..t.threads() {
                let row = o.load_row().eval(tid);
                let c = o.load_chunk().eval(tid);
                assert_eq!(
                    o.load_dst().eval(tid),
                    o.smem_offset(row, c),
                    "{o:?} tid {tid}"
                );
            }
            // The swizzle depends on row % 8 only.
            for row in 0..64 {
                assert_eq!(swizzle(row, o.chunks), swizzle(row % 8, o.chunks));
            }
        }
    }
}

#[test]
fn loads_fill_every_chunk_once_without_bank_conflicts() {
    for t in tiles() {
        for o in operands(&t) {
            let mut seen = vec![0u32; (o.rows * o.chunks) as usize];
            for tid in 0..t.threads() {
                let (row0, c) = (o.load_row().eval(tid), o.load_chunk().eval(tid));
                for u in 0..o.chunks_per_thread(&t) {
                    let row = row0 + u * o.row_step(&t);
                    // The generator adds u * threads * 16 to the chunk-0 destination.
                    let dst = o.load_dst().eval(tid) + u * t.threads() * 16;
                    assert_eq!(dst, o.smem_offset(row, c), "{o:?} tid {tid} u {u}");
                    seen[(dst / 16) as usize] += 1;
                }
            }
            assert!(
                seen.iter().all(|&n| n == 1),
                "{o:?}: chunks not covered once"
            );
            // Each quarter-warp's 16-byte stores hit 8 distinct bank groups.
            for q in 0..t.threads() / 8 {
                let mut groups: Vec<u32> = (0..8)
                    .map(|l| (o.load_dst().eval(8 * q + l) / 16) % 8)
                    .collect();
                groups.sort_unstable();
                groups.dedup();
                assert_eq!(groups.len(), 8, "{o:?} quarter {q}");
            }
        }
    }
}

/// The logical (row, chunk) lane `lane` of warp `w` addresses for `ldmatrix` `l`, from the
/// fragment definitions (independent of `ldm_lane`).
fn ldm_target(t: &Tile, o: &Operand, w: u32, lane: u32, l: &tile::Ldm) -> (u32, u32) {
    let (wm_idx, wn_idx) = (w / t.warps_n, w % t.warps_n);
    let (j, r) = (lane / 8, lane % 8);
    // Matrix j of the x4: for A the fragment registers a0..a3 = (m 0-7 | 8-15) x (k 0-7 | 8-15)
    // with m varying fastest; for B, b0, b1 of n-fragment 2p then 2p+1 (k fastest).
    match (o.which, o.op) {
        (tile::Which::A, _) => {
            let m = wm_idx * t.wm() + 16 * l.idx + 8 * (j % 2) + if o.trans { 0 } else { r };
            let k = 16 * l.ks + 8 * (j / 2) + if o.trans { r } else { 0 };
            if o.trans { (k, m / 8) } else { (m, k / 8) }
        }
        (tile::Which::B, _) => {
            let n = wn_idx * t.wn() + 16 * l.idx + 8 * (j / 2) + if o.trans { 0 } else { r };
            let k = 16 * l.ks + 8 * (j % 2) + if o.trans { r } else { 0 };
            if o.trans { (k, n / 8) } else { (n, k / 8) }
        }
    }
}

#[test]
fn ldmatrix_addresses_hit_the_fragment_rows_without_conflicts() {
    for t in tiles() {
        for o in operands(&t) {
            for key in o.ldm_keys(&t) {
                // The XOR trick needs the lane's chunk index to have none of the key's bits.
                for tid in 0..t.threads() {
                    let (_, c) = o.ldm_lane(&t);
                    assert_eq!(c.eval(tid) & key, 0, "{o:?} key {key} tid {tid}");
                }
            }
            for w in 0..t.warps_m * t.warps_n {
                for l in o.ldms(&t) {
                    let mut addrs = Vec::new();
                    for lane in 0..32 {
                        let tid = 32 * w + lane;
                        let addr = o.ldm_base(&t, l.key).eval(tid) + l.imm;
                        let (row, c) = ldm_target(&t, &o, w, lane, &l);
                        assert_eq!(
                            addr,
                            o.smem_offset(row, c),
                            "{o:?} {l:?} warp {w} lane {lane}"
                        );
                        addrs.push(addr);
                    }
                    for j in 0..4 {
                        let mut g: Vec<u32> = addrs[8 * j..8 * j + 8]
                            .iter()
                            .map(|a| (a / 16) % 8)
                            .collect();
                        g.sort_unstable();
                        g.dedup();
                        assert_eq!(g.len(), 8, "{o:?} {l:?} warp {w} matrix {j}: bank conflict");
                    }
                }
            }
        }
    }
}

#[test]
fn raster_visits_every_tile_once() {
    for (tm, tn, g) in [
        (1, 1, 8),
        (10, 3, 8),
        (7, 9, 8),
        (128, 393, 8),
        (3, 5, 1),
        (16, 4, 4),
    ] {
        let mut seen = vec![false; (tm * tn) as usize];
        for pid in 0..tm * tn {
            let (m, n) = raster(pid, tm, tn, g);
            assert!(m < tm && n < tn, "pid {pid} -> ({m}, {n})");
            assert!(!seen[(m * tn + n) as usize], "({m}, {n}) twice");
            seen[(m * tn + n) as usize] = true;
        }
    }
    // Consecutive blocks walk down a group of 8 tile rows first.
    assert_eq!(raster(1, 20, 20, 8), (1, 0));
    assert_eq!(raster(8, 20, 20, 8), (0, 1));
}

#[test]
fn accumulators_cover_the_block_tile_once() {
    for t in tiles() {
        let mut seen = vec![0u8; (t.bm * t.bn) as usize];
        let (row, col) = acc_origin(&t);
        for tid in 0..t.threads() {
            let (r0, c0) = (row.eval(tid), col.eval(tid));
            for i in 0..t.mt() {
                for j in 0..t.nt() {
                    for q in 0..4 {
                        let (r, c) = (r0 + 16 * i + 8 * (q / 2), c0 + 8 * j + q % 2);
                        seen[(r * t.bn + c) as usize] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}

#[test]
fn ix_prints_what_it_evaluates() {
    let e = (Ix::tid() % 32 / 4 + (Ix::tid() / 32) * 24) ^ Ix::c(5);
    let mut out = String::new();
    let mut n = 0;
    let r = e.emit(&mut out, "%thr", &mut || {
        n += 1;
        format!("%r{n}")
    });
    assert_eq!(r, "%r6");
    assert!(out.contains("and.b32 %r1, %thr, 31;"), "{out}");
    assert!(out.contains("mul.lo.u32"), "{out}");
    assert!(out.contains("xor.b32 %r6, %r5, 5;"), "{out}");
    assert_eq!(e.eval(77), ((77 % 32 / 4) + (77 / 32) * 24) ^ 5);
}

#[test]
fn registry_table_is_complete_and_named_consistently() {
    assert_eq!(kernels().len(), 32);
    assert_eq!(modules().len(), 16);
    for &(v, a, b, i, o, d) in TABLE {
        assert_eq!(d.entry, entry_name(v, a, b, i, o));
        assert_eq!(kernel_for(v, a, b, i, o).map(|k| k.entry), Some(d.entry));
        assert!(d.module.name.starts_with(&format!("gemm_v{}", v.number())));
    }
    assert!(kernel_for(Version::V2, Op::N, Op::N, Elem::BF16, Elem::F16).is_none());
    assert!(kernel_for(Version::V2, Op::N, Op::N, Elem::F32, Elem::F32).is_none());
}

#[test]
fn descriptors_match_their_ptx_entries() {
    for m in MODULES {
        let ptx = (m.ptx)();
        for d in kernels().into_iter().filter(|d| std::ptr::eq(d.module, *m)) {
            let head = format!(".visible .entry {}(", d.entry);
            let start = ptx
                .find(&head)
                .unwrap_or_else(|| panic!("{} missing", d.entry));
            let end = start + ptx[start..].find(')').expect("param list");
            let params: Vec<&str> = ptx[start..end]
                .lines()
                .skip(1)
                .filter_map(|l| l.trim().trim_end_matches(',').split_whitespace().nth(2))
                .collect();
            let names: Vec<String> = d.args.iter().map(|a| format!("p_{}", a.name)).collect();
            assert_eq!(params, names, "{}", d.entry);
        }
    }
}

#[test]
fn geometry_and_cost() {
    let p = Gemm::new(16384, 2304, 768).problem();
    let g = (V2_NN_BF16_BF16.geometry)(&p);
    assert_eq!(g.grid, (128 * 18, 1, 1));
    assert_eq!(g.block, (256, 1, 1));
    assert_eq!(g.shared_bytes, 4 * (128 * 32 + 32 * 128) * 2);
    let g1 = (V1_NN_BF16_BF16.geometry)(&Gemm::new(65, 1, 1).problem());
    assert_eq!(
        (g1.grid, g1.block, g1.shared_bytes),
        ((2, 1, 1), (128, 1, 1), 8192)
    );
    let c = (V2_NN_BF16_F32.cost)(&p);
    assert_eq!(c.flops, 2 * 16384 * 2304 * 768);
    assert_eq!(c.bytes, 2 * (16384 * 768 + 768 * 2304) + 4 * 16384 * 2304);
}

#[test]
fn problems_validate_shapes_and_leading_dimensions() {
    let g = Gemm::new(4, 5, 6).with_ops(Op::T, Op::T);
    assert_eq!((g.a_stored(), g.b_stored()), ((6, 4), (5, 6)));
    assert_eq!((g.lda(), g.ldb(), g.ldc()), (4, 6, 5));
    assert_eq!((g.a_len(), g.b_len(), g.c_len()), (24, 30, 20));
    g.validate().unwrap();
    let e = g.with_ld(3, 6, 5).validate().unwrap_err();
    assert!(
        matches!(e, GemmError::LeadingDim { what: "lda", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("(6, 4)"), "{e}");
    let e = Gemm::new(MAX_DIM + 1, 1, 1).validate().unwrap_err();
    assert!(matches!(e, GemmError::TooLarge { what: "m", .. }));
    assert_eq!(Gemm::new(0, 3, 3).a_len(), 0);
    assert_eq!(g.with_gelu(true).flags(true), FLAG_BIAS | FLAG_GELU);
    assert_eq!(g.flags(false), 0);
    assert!(fast_path(0x1000, 768) && !fast_path(0x1002, 768) && !fast_path(0x1000, 100));
}

#[test]
fn linear_layer_products_have_the_documented_storage() {
    let l = Linear {
        rows: 8,
        inputs: 3,
        outputs: 5,
    };
    let f = l.forward();
    assert_eq!(
        (f.m, f.n, f.k, f.a_stored(), f.b_stored()),
        (8, 5, 3, (8, 3), (3, 5))
    );
    let bi = l.backward_input();
    // dy (8, 5) and W (3, 5) as stored; dx (8, 3).
    assert_eq!(
        (bi.m, bi.n, bi.k, bi.a_stored(), bi.b_stored()),
        (8, 3, 5, (8, 5), (3, 5))
    );
    let bw = l.backward_weight(true);
    // x (8, 3) and dy (8, 5) as stored; dW (3, 5) accumulated.
    assert_eq!(
        (bw.m, bw.n, bw.k, bw.a_stored(), bw.b_stored()),
        (3, 5, 8, (8, 3), (8, 5))
    );
    assert_eq!((bw.beta, l.backward_weight(false).beta), (1.0, 0.0));
}
