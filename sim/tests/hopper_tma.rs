//! `lathe_sim::hopper::tma`: out-of-bounds zero fill (negative, past-the-end, partial and
//! wholly outside boxes), one global read per contiguous run, the swizzle patterns written out
//! by hand, the store counterpart, and argument errors.

use lathe_sim::hopper::tma::{load_box, store_box};
use lathe_sim::tensor_map::{Swizzle, TensorMapDesc, TmaDtype};
use lathe_sim::{ErrorKind, SimError};

const GBASE: u64 = 0x7f00_0000_0000;

/// A global buffer of u16 values `1 + linear index`, in bytes.
fn global_u16(elems: usize) -> Vec<u8> {
    (0..elems)
        .flat_map(|i| (1 + i as u16).to_le_bytes())
        .collect()
}

fn map(dims: &[u64], box_dims: &[u32], swizzle: Swizzle) -> TensorMapDesc {
    // Dense rows, each padded to a multiple of 16 bytes.
    let mut strides = vec![];
    let mut s = (dims[0] * 2).div_ceil(16) * 16;
    for &d in &dims[1..] {
        strides.push(s);
        s *= d;
    }
    TensorMapDesc {
        dtype: TmaDtype::U16,
        global_addr: GBASE,
        dims: dims.to_vec(),
        strides,
        box_dims: box_dims.to_vec(),
        swizzle,
    }
}

/// Elementwise reference of an unswizzled box: each element read on its own, zero outside.
fn reference(m: &TensorMapDesc, global: &[u8], coords: &[i32]) -> Vec<u8> {
    let total: u32 = m.box_dims.iter().product();
    let mut out = vec![];
    for lin in 0..total {
        let mut rem = lin;
        let mut off = 0u64;
        let mut inside = true;
        for (i, &c0) in coords.iter().enumerate() {
            let c = c0 as i64 + (rem % m.box_dims[i]) as i64;
            rem /= m.box_dims[i];
            inside &= c >= 0 && c < m.dims[i] as i64;
            off += c.max(0) as u64 * m.stride_bytes(i);
        }
        let o = off as usize;
        out.extend_from_slice(if inside { &global[o..o + 2] } else { &[0, 0] });
    }
    out
}

/// Loads through `load_box`, counting global reads.
fn load(m: &TensorMapDesc, global: &[u8], coords: &[i32], dst: u32) -> (Vec<u8>, usize) {
    let mut reads = 0;
    let out = load_box(m, coords, dst, &mut |g, buf| {
        reads += 1;
        let o = (g - GBASE) as usize;
        buf.copy_from_slice(&global[o..o + buf.len()]);
        Ok(())
    })
    .unwrap();
    (out, reads)
}

#[test]
fn out_of_bounds_elements_are_zero_filled() {
    let m = map(&[40, 10], &[16, 4], Swizzle::None);
    let g = global_u16(40 * 10);
    // (coords, in-bounds rows = global reads)
    let cases: [([i32; 2], usize); 10] = [
        ([0, 0], 4),
        ([-8, -2], 2),
        ([32, 8], 2),
        ([30, 7], 3),
        ([-3, 3], 4),
        ([24, 6], 4),
        ([100, 0], 0),
        ([-16, 0], 0),
        ([0, 10], 0),
        ([0, -4], 0),
    ];
    for (coords, rows) in cases {
        let (out, reads) = load(&m, &g, &coords, 0x800);
        assert_eq!(out, reference(&m, &g, &coords), "box at {coords:?}");
        assert_eq!(
            reads, rows,
            "one read per in-bounds row segment at {coords:?}"
        );
    }
    // Wholly outside: all zeros.
    let (out, _) = load(&m, &g, &[-16, -4], 0);
    assert!(out.iter().all(|&b| b == 0));
    // A partial box has both real data and zeros.
    let (out, _) = load(&m, &g, &[32, 8], 0);
    assert!(out.iter().any(|&b| b != 0) && out.contains(&0));
}

#[test]
fn contiguous_rows_are_read_in_one_call() {
    let m = map(&[16, 8], &[16, 4], Swizzle::None);
    let g = global_u16(16 * 8);
    let mut calls = vec![];
    let out = load_box(&m, &[0, 2], 0, &mut |a, buf| {
        calls.push((a - GBASE, buf.len()));
        let o = (a - GBASE) as usize;
        buf.copy_from_slice(&g[o..o + buf.len()]);
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, vec![(64, 128)]);
    assert_eq!(out, reference(&m, &g, &[0, 2]));
    assert_eq!(load(&m, &g, &[0, 6], 0).1, 1, "rows 6 and 7 in one read");
    assert_eq!(
        load(&m, &g, &[-4, 0], 0).1,
        4,
        "clipped rows are not contiguous"
    );
}

#[test]
fn higher_ranks_match_the_elementwise_reference() {
    let m3 = map(&[24, 5, 6], &[8, 4, 3], Swizzle::None);
    let g3 = global_u16(24 * 5 * 6);
    for c in [[0, 0, 0], [-4, -2, -1], [20, 3, 5], [8, 1, 2], [16, 4, -2]] {
        assert_eq!(load(&m3, &g3, &c, 0).0, reference(&m3, &g3, &c), "{c:?}");
    }
    let m5 = map(&[8, 3, 2, 3, 2], &[8, 2, 2, 2, 2], Swizzle::None);
    let g5 = global_u16(8 * 3 * 2 * 3 * 2);
    for c in [
        [0, 0, 0, 0, 0],
        [0, 2, 1, 2, 1],
        [-8, -1, 0, -1, 0],
        [4, 1, -1, 1, 1],
    ] {
        assert_eq!(load(&m5, &g5, &c, 0).0, reference(&m5, &g5, &c), "{c:?}");
    }
    let m1 = map(&[40], &[16], Swizzle::None);
    let g1 = global_u16(40);
    for c in [[0], [-8], [32], [40], [-16]] {
        assert_eq!(load(&m1, &g1, &c, 0).0, reference(&m1, &g1, &c), "{c:?}");
    }
}

#[test]
fn swizzle_patterns_by_hand() {
    // Rows of `span` bytes, 16 rows; at a pattern-aligned destination, chunk c of row r lands
    // at chunk c ^ (r % 8) (128B), c ^ ((r / 2) % 4) (64B), c ^ ((r / 4) % 2) (32B).
    for (swizzle, span, phase) in [
        (
            Swizzle::B128,
            128usize,
            Box::new(|r: usize| r % 8) as Box<dyn Fn(usize) -> usize>,
        ),
        (Swizzle::B64, 64, Box::new(|r: usize| (r / 2) % 4)),
        (Swizzle::B32, 32, Box::new(|r: usize| (r / 4) % 2)),
    ] {
        let w = span / 2;
        let m = map(&[w as u64 * 2, 40], &[w as u32, 16], swizzle);
        let g = global_u16(w * 2 * 40);
        for coords in [[0, 0], [w as i32, 3], [-8, 30]] {
            let linear = reference(&m, &g, &coords);
            let dst = 8 * span as u32 * 5;
            let (out, _) = load(&m, &g, &coords, dst);
            for r in 0..16 {
                for c in 0..span / 16 {
                    let from = r * span + c * 16;
                    let to = r * span + (c ^ phase(r)) * 16;
                    assert_eq!(
                        out[to..to + 16],
                        linear[from..from + 16],
                        "{swizzle:?} r{r} c{c}"
                    );
                }
            }
            // A destination aligned to 128 but not to the pattern starts mid-pattern: the row
            // at absolute address A takes the phase of A.
            let odd = dst + 128;
            let (out, _) = load(&m, &g, &coords, odd);
            for r in 0..16 {
                let pr = (r * span + 128) / span;
                for c in 0..span / 16 {
                    let from = r * span + c * 16;
                    let to = r * span + (c ^ phase(pr)) * 16;
                    assert_eq!(
                        out[to..to + 16],
                        linear[from..from + 16],
                        "{swizzle:?} odd r{r}"
                    );
                }
            }
        }
    }
}

#[test]
fn store_box_writes_back_only_in_bounds_elements() {
    for swizzle in [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128] {
        let m = map(&[64, 20], &[16, 8], swizzle);
        let src = global_u16(64 * 20);
        for coords in [[0, 0], [56, 16], [-8, -4], [24, 5]] {
            let (smem, _) = load(&m, &src, &coords, 0x1000);
            let mut dst = vec![0xEEu8; src.len()];
            store_box(&m, &coords, 0x1000, &smem, &mut |a, bytes| {
                let o = (a - GBASE) as usize;
                dst[o..o + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
            .unwrap();
            for y in 0..20i32 {
                for x in 0..64i32 {
                    let o = (y * 128 + x * 2) as usize;
                    let inside = (coords[0]..coords[0] + 16).contains(&x)
                        && (coords[1]..coords[1] + 8).contains(&y);
                    let want = if inside {
                        &src[o..o + 2]
                    } else {
                        &[0xEE, 0xEE]
                    };
                    assert_eq!(&dst[o..o + 2], want, "{swizzle:?} {coords:?} ({x}, {y})");
                }
            }
        }
    }
}

#[test]
fn argument_errors() {
    let m = map(&[64, 64], &[64, 64], Swizzle::B128);
    let g = global_u16(64 * 64);
    let mut read = |a: u64, buf: &mut [u8]| -> Result<(), SimError> {
        let o = (a - GBASE) as usize;
        buf.copy_from_slice(&g[o..o + buf.len()]);
        Ok(())
    };
    let e = load_box(&m, &[0, 0], 0x440, &mut read).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Misaligned, "{e}");
    let e = load_box(&m, &[0], 0, &mut read).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TensorMap, "{e}");
    let mut bad = m.clone();
    bad.box_dims[0] = 128;
    assert_eq!(
        load_box(&bad, &[0, 0], 0, &mut read).unwrap_err().kind,
        ErrorKind::TensorMap
    );
    let e = load_box(&m, &[0, 0], 0, &mut |_, _| {
        Err(SimError::new(
            ErrorKind::OutOfBounds,
            "outside the launch's regions",
        ))
    })
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::OutOfBounds);
    // A swizzled box that is not whole pattern rows would spill past its end.
    let spill = map(&[8, 16], &[8, 9], Swizzle::B128);
    let e = load_box(&spill, &[0, 0], 0, &mut read).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    // store_box wants exactly the box's bytes.
    let e = store_box(&m, &[0, 0], 0, &[0u8; 100], &mut |_, _| Ok(())).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadLaunch);
}
