//! `lathe_sim::hopper::desc` and the swizzle function: the swizzle is a bijection on its atom,
//! descriptor bits round-trip, `operand_offset` equals the ISA's canonical layouts (its worked
//! examples in CuTe notation), is injective over whole operands, and reads back K-major and
//! MN-major (transposed) tiles that TMA wrote, under every swizzle mode.

use lathe_sim::ErrorKind;
use lathe_sim::hopper::desc::{self, Major, MatrixDesc, operand_offset};
use lathe_sim::hopper::tma::load_box;
use lathe_sim::tensor_map::{Swizzle, TensorMapDesc, TmaDtype};
use std::collections::HashSet;

const ALL: [Swizzle; 4] = [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128];

#[test]
fn swizzle_is_a_bijection_on_its_atom() {
    for s in ALL {
        let rep = s.repeat_bytes();
        for base in [0u32, rep * 3, 0x3_0000] {
            let block: HashSet<u32> = (base..base + rep).collect();
            let image: HashSet<u32> = (base..base + rep).map(|a| s.apply(a)).collect();
            assert_eq!(image, block, "{s:?} at {base:#x}");
            for a in base..base + rep {
                assert_eq!(s.apply(s.apply(a)), a, "{s:?} is an involution");
                assert_eq!(
                    s.apply(a) & !0x70,
                    a & !0x70,
                    "{s:?} moves only 16-byte chunks"
                );
            }
        }
    }
    assert!((0..4096).all(|a| Swizzle::None.apply(a) == a));
    // The 128B pattern of the probes: chunk ^ (row % 8) in rows of 128 bytes.
    assert_eq!(Swizzle::B128.apply(3 * 128 + 16), 3 * 128 + 2 * 16);
}

#[test]
fn swizzle_matches_the_isa_tables() {
    // The ISA's swizzling-mode tables: 128-byte shared-memory lines (rows) of eight 16-byte
    // chunks from a pattern-aligned start; entry p of row r is the chunk stored at position p.
    let t32 = [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 3, 2, 5, 4, 7, 6]];
    let t64 = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [1, 0, 3, 2, 5, 4, 7, 6],
        [2, 3, 0, 1, 6, 7, 4, 5],
        [3, 2, 1, 0, 7, 6, 5, 4],
    ];
    let t128 = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [1, 0, 3, 2, 5, 4, 7, 6],
        [2, 3, 0, 1, 6, 7, 4, 5],
        [3, 2, 1, 0, 7, 6, 5, 4],
        [4, 5, 6, 7, 0, 1, 2, 3],
        [5, 4, 7, 6, 1, 0, 3, 2],
        [6, 7, 4, 5, 2, 3, 0, 1],
        [7, 6, 5, 4, 3, 2, 1, 0],
    ];
    let tables: [(Swizzle, &[[u32; 8]]); 3] = [
        (Swizzle::B32, &t32),
        (Swizzle::B64, &t64),
        (Swizzle::B128, &t128),
    ];
    for (s, table) in tables {
        for rep in 0..3u32 {
            for (r, row) in table.iter().enumerate() {
                let line = 0x2000 + rep * s.repeat_bytes() + 128 * r as u32;
                for (p, &chunk) in row.iter().enumerate() {
                    assert_eq!(
                        s.apply(line + 16 * chunk),
                        line + 16 * p as u32,
                        "{s:?} r{r} p{p}"
                    );
                }
            }
        }
    }
}

#[test]
fn descriptor_bits_round_trip() {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for i in 0..1000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let d = MatrixDesc {
            start: (s as u32 & 0x3FFF) << 4,
            lbo: ((s >> 14) as u32 & 0x3FFF) << 4,
            sbo: ((s >> 28) as u32 & 0x3FFF) << 4,
            base_offset: 0,
            swizzle: ALL[i % 4],
        };
        assert_eq!(desc::decode(desc::encode(&d).unwrap()).unwrap(), d);
    }
    let d = MatrixDesc {
        start: 0x4_0400,
        lbo: 0x80,
        sbo: 0x400,
        base_offset: 0,
        swizzle: Swizzle::B64,
    };
    let raw = desc::encode(&d).unwrap();
    assert_eq!(
        raw,
        0x40 | (0x8 << 16) | (0x40 << 32) | (2 << 62),
        "start taken mod 2^18"
    );
    assert_eq!(desc::decode(raw).unwrap().start, 0x400);
    assert_eq!(desc::decode(3 << 62).unwrap().swizzle, Swizzle::B32);
    assert_eq!(desc::decode(1 << 62).unwrap().swizzle, Swizzle::B128);
    // Base offset: kept for no swizzle (where the ISA ignores it), not simulated otherwise.
    assert_eq!(desc::decode(5 << 49).unwrap().base_offset, 5);
    let e = desc::decode((1 << 62) | (1 << 49)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    for bad in [
        MatrixDesc { start: 0x408, ..d },
        MatrixDesc { lbo: 1 << 18, ..d },
        MatrixDesc { sbo: 24, ..d },
        MatrixDesc {
            base_offset: 8,
            ..d
        },
    ] {
        assert_eq!(desc::encode(&bad).unwrap_err().kind, ErrorKind::Unsupported);
    }
    assert_eq!(Major::from_trans(1).unwrap(), Major::MN);
    assert!(Major::from_trans(2).is_err());
}

/// Evaluates a CuTe layout `(shape_mn, shape_k) : (stride_mn, stride_k)` at (mn, k), each mode
/// a flat tuple decomposed colexicographically; offsets in elements.
fn cute(
    shape_mn: &[u32],
    stride_mn: &[u32],
    shape_k: &[u32],
    stride_k: &[u32],
    mn: u32,
    k: u32,
) -> u32 {
    let eval = |shape: &[u32], stride: &[u32], mut i: u32| {
        let mut off = 0;
        for (n, (&sh, &st)) in shape.iter().zip(stride).enumerate() {
            let c = if n + 1 == shape.len() { i } else { i % sh };
            off += c * st;
            i /= sh;
        }
        off
    };
    eval(shape_mn, stride_mn, mn) + eval(shape_k, stride_k, k)
}

struct Example {
    major: Major,
    swizzle: Swizzle,
    elem: u32,
    shape_mn: [u32; 3],
    stride_mn: [u32; 3],
    shape_k: [u32; 2],
    stride_k: [u32; 2],
    lbo: u32,
    sbo: u32,
    mn: u32,
    k: u32,
}

#[test]
fn operand_offset_matches_the_isa_canonical_layouts() {
    use Major::{K, MN};
    use Swizzle::{B32, B64, B128, None as Nsw};
    // The ISA's worked examples (tf32 K-major; bf16 MN-major) and the canonical formulas at
    // T = 8 for bf16 (K-major 64B/128B, MN-major 128B), in elements; LBO/SBO in bytes.
    let ex = [
        Example {
            major: K,
            swizzle: Nsw,
            elem: 4,
            shape_mn: [8, 2, 1],
            stride_mn: [4, 32, 0],
            shape_k: [4, 4],
            stride_k: [1, 64],
            lbo: 256,
            sbo: 128,
            mn: 16,
            k: 16,
        },
        Example {
            major: K,
            swizzle: B32,
            elem: 4,
            shape_mn: [8, 2, 1],
            stride_mn: [8, 64, 0],
            shape_k: [8, 1],
            stride_k: [1, 0],
            lbo: 16,
            sbo: 256,
            mn: 16,
            k: 8,
        },
        Example {
            major: K,
            swizzle: B32,
            elem: 2,
            shape_mn: [8, 4, 1],
            stride_mn: [16, 128, 0],
            shape_k: [16, 1],
            stride_k: [1, 0],
            lbo: 16,
            sbo: 256,
            mn: 32,
            k: 16,
        },
        Example {
            major: K,
            swizzle: B64,
            elem: 2,
            shape_mn: [8, 4, 1],
            stride_mn: [32, 256, 0],
            shape_k: [16, 1],
            stride_k: [1, 0],
            lbo: 16,
            sbo: 512,
            mn: 32,
            k: 16,
        },
        Example {
            major: K,
            swizzle: B128,
            elem: 2,
            shape_mn: [8, 8, 1],
            stride_mn: [64, 512, 0],
            shape_k: [16, 1],
            stride_k: [1, 0],
            lbo: 16,
            sbo: 1024,
            mn: 64,
            k: 16,
        },
        Example {
            major: MN,
            swizzle: Nsw,
            elem: 2,
            shape_mn: [8, 1, 2],
            stride_mn: [1, 8, 64],
            shape_k: [8, 2],
            stride_k: [8, 128],
            lbo: 256,
            sbo: 128,
            mn: 16,
            k: 16,
        },
        Example {
            major: MN,
            swizzle: B32,
            elem: 2,
            shape_mn: [8, 2, 2],
            stride_mn: [1, 8, 128],
            shape_k: [8, 2],
            stride_k: [16, 256],
            lbo: 256,
            sbo: 512,
            mn: 32,
            k: 16,
        },
        Example {
            major: MN,
            swizzle: B64,
            elem: 2,
            shape_mn: [8, 4, 2],
            stride_mn: [1, 8, 256],
            shape_k: [8, 2],
            stride_k: [32, 512],
            lbo: 512,
            sbo: 1024,
            mn: 64,
            k: 16,
        },
        Example {
            major: MN,
            swizzle: B128,
            elem: 2,
            shape_mn: [8, 8, 2],
            stride_mn: [1, 8, 1024],
            shape_k: [8, 2],
            stride_k: [64, 512],
            lbo: 2048,
            sbo: 1024,
            mn: 128,
            k: 16,
        },
    ];
    let start = 0x3000;
    for e in &ex {
        let d = MatrixDesc {
            start,
            lbo: e.lbo,
            sbo: e.sbo,
            base_offset: 0,
            swizzle: e.swizzle,
        };
        for mn in 0..e.mn {
            for k in 0..e.k {
                let off = e.elem * cute(&e.shape_mn, &e.stride_mn, &e.shape_k, &e.stride_k, mn, k);
                let want = start + e.swizzle.apply(off);
                let got = operand_offset(&d, e.major, mn, k, e.elem);
                assert_eq!(
                    got, want,
                    "{:?} {:?} elem {} at ({mn}, {k})",
                    e.major, e.swizzle, e.elem
                );
            }
        }
    }
}

/// Natural LBO/SBO for an operand of `rows` (M or N) x 16 bf16, tightly packed.
fn natural(major: Major, s: Swizzle, rows: u32) -> (u32, u32) {
    let span = s.span_bytes();
    match (major, s) {
        (Major::K, Swizzle::None) => (128, 256),
        (Major::K, _) => (16, 8 * span),
        (Major::MN, Swizzle::None) => (rows / 8 * 128, 128),
        (Major::MN, _) => (16 * span, 8 * span),
    }
}

#[test]
fn operand_addresses_are_distinct_and_aligned() {
    for major in [Major::K, Major::MN] {
        for s in ALL {
            for rows in [64u32, 8, 96, 256] {
                let (lbo, sbo) = natural(major, s, rows);
                let d = MatrixDesc {
                    start: 0x8000,
                    lbo,
                    sbo,
                    base_offset: 0,
                    swizzle: s,
                };
                // The tile's footprint: whole swizzle rows (K-major) or atoms (MN-major).
                let span = s.span_bytes();
                let foot = match (major, s) {
                    (_, Swizzle::None) => rows * 32,
                    (Major::K, _) => rows.div_ceil(8) * 8 * span,
                    (Major::MN, _) => (rows * 2).div_ceil(span) * 16 * span,
                };
                let mut seen = HashSet::new();
                for mn in 0..rows {
                    for k in 0..16 {
                        let a = operand_offset(&d, major, mn, k, 2);
                        assert_eq!(a % 2, 0);
                        assert!(
                            (0x8000..0x8000 + foot).contains(&a),
                            "{major:?} {s:?} footprint"
                        );
                        assert!(
                            seen.insert(a),
                            "{major:?} {s:?} rows {rows}: ({mn}, {k}) collides"
                        );
                    }
                }
            }
        }
    }
}

/// A matrix X (rows x cols bf16, row-major) as global bytes, values 1 + linear index.
fn matrix(rows: u32, cols: u32) -> Vec<u8> {
    (0..rows * cols)
        .flat_map(|i| (1 + i as u16).to_le_bytes())
        .collect()
}

/// Loads boxes of a row-major (rows x cols) u16 matrix into `smem` with TMA: `boxes` lists
/// (coords, shared address).
fn tma_fill(
    smem: &mut [u8],
    g: &[u8],
    rows: u32,
    cols: u32,
    bx: [u32; 2],
    s: Swizzle,
    boxes: &[([i32; 2], u32)],
) {
    let map = TensorMapDesc {
        dtype: TmaDtype::U16,
        global_addr: 0x10_0000,
        dims: vec![cols as u64, rows as u64],
        strides: vec![cols as u64 * 2],
        box_dims: bx.to_vec(),
        swizzle: s,
    };
    for &(c, addr) in boxes {
        let bytes = load_box(&map, &c, addr, &mut |a, buf| {
            let o = (a - 0x10_0000) as usize;
            buf.copy_from_slice(&g[o..o + buf.len()]);
            Ok(())
        })
        .unwrap();
        smem[addr as usize..addr as usize + bytes.len()].copy_from_slice(&bytes);
    }
}

/// One TMA box: its coordinates and its shared address.
type TmaBox = ([i32; 2], u32);

fn read(smem: &[u8], a: u32) -> u16 {
    u16::from_le_bytes([smem[a as usize], smem[a as usize + 1]])
}

#[test]
fn k_major_tiles_written_by_tma_read_back() {
    const BASE: u32 = 0x4000;
    const KTOT: u32 = 64;
    for s in ALL {
        for rows in [64u32, 128] {
            let g = matrix(rows, KTOT);
            let mut smem = vec![0u8; 0x20000];
            let span = s.span_bytes();
            // Swizzled: boxes (span/2 K) x rows, K-block b at BASE + b * rows * span; SBO 8 rows.
            // No swizzle: 8 x 8 core matrices, K-adjacent 128 B apart, 8-row groups KTOT/8 * 128.
            let (boxes, bx, lbo, sbo): (Vec<TmaBox>, [u32; 2], u32, u32) = if s == Swizzle::None {
                let b = (0..rows / 8)
                    .flat_map(|i| {
                        (0..KTOT / 8).map(move |j| {
                            (
                                [8 * j as i32, 8 * i as i32],
                                BASE + (i * KTOT / 8 + j) * 128,
                            )
                        })
                    })
                    .collect();
                (b, [8, 8], 128, KTOT / 8 * 128)
            } else {
                let per = span / 2;
                let b = (0..KTOT / per)
                    .map(|b| ([(b * per) as i32, 0], BASE + b * rows * span))
                    .collect();
                (b, [per, rows], 16, 8 * span)
            };
            tma_fill(&mut smem, &g, rows, KTOT, bx, s, &boxes);
            for step in 0..KTOT / 16 {
                let start = if s == Swizzle::None {
                    BASE + step * 256
                } else {
                    BASE + (32 * step / span) * rows * span + (32 * step) % span
                };
                let d = MatrixDesc {
                    start,
                    lbo,
                    sbo,
                    base_offset: 0,
                    swizzle: s,
                };
                for mn in 0..rows {
                    for k in 0..16 {
                        let want = 1 + (mn * KTOT + 16 * step + k) as u16;
                        let got = read(&smem, operand_offset(&d, Major::K, mn, k, 2));
                        assert_eq!(got, want, "{s:?} rows {rows} step {step} ({mn}, {k})");
                    }
                }
            }
        }
    }
}

#[test]
fn mn_major_operands_reproduce_the_transposed_matrix() {
    // X is (mn x 16); shared memory holds X^T (16 x mn, MN contiguous) as TMA writes it from a
    // row-major global X^T. The MN-major operand must read X[mn][k].
    const BASE: u32 = 0x8000;
    for s in ALL {
        for rows in [64u32, 256] {
            let gt = matrix(16, rows); // X^T: 16 rows (k) x `rows` columns (mn)
            let mut smem = vec![0u8; 0x20000];
            let span = s.span_bytes();
            let (boxes, bx): (Vec<TmaBox>, [u32; 2]) = if s == Swizzle::None {
                // Core matrices of 8 k-rows x 8 mn; mn-adjacent 128 B apart (SBO), k-adjacent
                // rows/8 * 128 apart (LBO).
                let b = (0..2u32)
                    .flat_map(|j| {
                        (0..rows / 8).map(move |i| {
                            (
                                [8 * i as i32, 8 * j as i32],
                                BASE + i * 128 + j * rows / 8 * 128,
                            )
                        })
                    })
                    .collect();
                (b, [8, 8])
            } else {
                // Atoms of 16 k-rows x span bytes of mn, mn-adjacent atoms 16 * span apart.
                let per = span / 2;
                let b = (0..rows / per)
                    .map(|i| ([(i * per) as i32, 0], BASE + i * 16 * span))
                    .collect();
                (b, [per, 16])
            };
            tma_fill(&mut smem, &gt, 16, rows, bx, s, &boxes);
            let (lbo, sbo) = natural(Major::MN, s, rows);
            let d = MatrixDesc {
                start: BASE,
                lbo,
                sbo,
                base_offset: 0,
                swizzle: s,
            };
            for mn in 0..rows {
                for k in 0..16 {
                    let want = 1 + (k * rows + mn) as u16; // X[mn][k] = X^T[k][mn]
                    let got = read(&smem, operand_offset(&d, Major::MN, mn, k, 2));
                    assert_eq!(got, want, "{s:?} rows {rows} ({mn}, {k})");
                }
            }
        }
    }
}
