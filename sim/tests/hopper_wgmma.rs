//! `lathe_sim::hopper::wgmma`: register layouts cover their tiles exactly once and match the
//! layout the probes verified; `mma` for every N against an f64 product and bit for bit
//! against the documented rounding model; register A, scale-d, negation, f16, errors, speed.

use half::{bf16, f16};
use lathe_sim::hopper::desc::{Major, MatrixDesc, operand_offset};
use lathe_sim::hopper::wgmma::{
    ASource, MmaDtype, MmaOp, a_fragment_coords, accumulator_coords, flops, gather_accumulators,
    mma, mma_chunked, scatter_accumulators,
};
use lathe_sim::tensor_map::Swizzle;
use lathe_sim::{ErrorKind, SimError};
use std::collections::HashSet;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

#[test]
fn accumulators_cover_every_tile_exactly_once() {
    for n in (8..=256).step_by(8) {
        let mut seen = HashSet::new();
        for t in 0..128 {
            for r in 0..n / 2 {
                let (row, col) = accumulator_coords(t, r);
                assert!(row < 64 && col < n, "n {n}: ({t}, {r}) -> ({row}, {col})");
                assert!(seen.insert((row, col)), "n {n}: ({row}, {col}) twice");
            }
        }
        assert_eq!(seen.len() as u32, 64 * n);
    }
}

#[test]
fn register_layouts_are_the_probed_ones() {
    // Probe README: warp w holds rows 16w..16w+15, row = 16w + lane/4 + 8*((i/2)%2),
    // col = 8*(i/4) + 2*(lane%4) + i%2. Spot values written out by hand.
    assert_eq!(accumulator_coords(0, 0), (0, 0));
    assert_eq!(accumulator_coords(0, 1), (0, 1));
    assert_eq!(accumulator_coords(0, 2), (8, 0));
    assert_eq!(accumulator_coords(0, 4), (0, 8));
    assert_eq!(accumulator_coords(37, 0), (17, 2));
    assert_eq!(accumulator_coords(127, 127), (63, 255));
    assert_eq!(accumulator_coords(96, 6), (56, 8));
    // A fragment: the mma.sync m16n8k16 A layout per warp.
    let t0: Vec<_> = (0..8).map(|e| a_fragment_coords(0, e)).collect();
    assert_eq!(
        t0,
        [
            (0, 0),
            (0, 1),
            (8, 0),
            (8, 1),
            (0, 8),
            (0, 9),
            (8, 8),
            (8, 9)
        ]
    );
    assert_eq!(a_fragment_coords(70, 5), (16 * 2 + 1, 8 + 4 + 1));
    let mut seen = HashSet::new();
    for t in 0..128 {
        for e in 0..8 {
            let (r, c) = a_fragment_coords(t, e);
            assert!(r < 64 && c < 16);
            assert!(seen.insert((r, c)));
        }
    }
    assert_eq!(seen.len(), 64 * 16);
}

#[test]
fn gather_and_scatter_are_inverse() {
    let n = 72;
    let regs: Vec<f32> = (0..128 * n / 2).map(|i| i as f32).collect();
    let mut d = vec![f32::NAN; 64 * n];
    gather_accumulators(n as u32, &regs, &mut d).unwrap();
    assert!(d.iter().all(|v| !v.is_nan()));
    let mut back = vec![0f32; regs.len()];
    scatter_accumulators(n as u32, &d, &mut back).unwrap();
    assert_eq!(back, regs);
}

/// Shared memory with A (64 x 16) and B (n x 16) placed through descriptors.
struct Operands {
    smem: Vec<u8>,
    a: Vec<u16>,
    b: Vec<u16>,
    da: MatrixDesc,
    db: MatrixDesc,
}

fn operands(rng: &mut Rng, n: u32, dtype: MmaDtype, b_major: Major, s: Swizzle) -> Operands {
    let bits = |v: f32| match dtype {
        MmaDtype::BF16 => bf16::from_f32(v).to_bits(),
        MmaDtype::F16 => f16::from_f32(v).to_bits(),
    };
    let a: Vec<u16> = (0..64 * 16).map(|_| bits(rng.unit())).collect();
    let b: Vec<u16> = (0..n * 16).map(|_| bits(rng.unit())).collect();
    let span = s.span_bytes();
    let da = MatrixDesc {
        start: 0x400,
        lbo: 16,
        sbo: 8 * span,
        base_offset: 0,
        swizzle: s,
    };
    let (lbo, sbo) = match (b_major, s) {
        (Major::K, Swizzle::None) => (128, 256),
        (Major::K, _) => (16, 8 * span),
        (Major::MN, Swizzle::None) => (n / 8 * 128, 128),
        (Major::MN, _) => (16 * span, 8 * span),
    };
    let da = if s == Swizzle::None {
        MatrixDesc {
            lbo: 128,
            sbo: 256,
            ..da
        }
    } else {
        da
    };
    let db = MatrixDesc {
        start: 0x8000,
        lbo,
        sbo,
        base_offset: 0,
        swizzle: s,
    };
    let mut smem = vec![0u8; 0x20000];
    for (m, d, major, rows) in [(&a, &da, Major::K, 64), (&b, &db, b_major, n)] {
        for r in 0..rows {
            for k in 0..16 {
                let at = operand_offset(d, major, r, k, 2) as usize;
                smem[at..at + 2].copy_from_slice(&m[(r * 16 + k) as usize].to_le_bytes());
            }
        }
    }
    Operands { smem, a, b, da, db }
}

fn value(dtype: MmaDtype, b: u16) -> f32 {
    match dtype {
        MmaDtype::BF16 => bf16::from_bits(b).to_f32(),
        MmaDtype::F16 => f16::from_bits(b).to_f32(),
    }
}

fn run(o: &Operands, op: &MmaOp, d: &mut [f32]) -> Result<(), SimError> {
    let smem = &o.smem;
    mma(
        op,
        &mut |a| Ok(u16::from_le_bytes([smem[a as usize], smem[a as usize + 1]])),
        d,
    )
}

fn op<'a>(o: &Operands, n: u32, dtype: MmaDtype, b_major: Major) -> MmaOp<'a> {
    MmaOp {
        n,
        dtype,
        a: ASource::Shared {
            desc: o.da,
            major: Major::K,
        },
        b: o.db,
        b_major,
        scale_d: true,
        scale_a: 1,
        scale_b: 1,
    }
}

#[test]
fn every_n_matches_f64_and_the_rounding_model_bit_for_bit() {
    let mut rng = Rng(0x1234_5678);
    for n in (8..=256).step_by(8) {
        for (dtype, major, s) in [
            (MmaDtype::BF16, Major::K, Swizzle::B128),
            (MmaDtype::F16, Major::MN, Swizzle::B64),
            (MmaDtype::BF16, Major::MN, Swizzle::None),
        ] {
            let o = operands(&mut rng, n, dtype, major, s);
            let d0: Vec<f32> = (0..64 * n).map(|_| rng.unit()).collect();
            let mut d = d0.clone();
            run(&o, &op(&o, n, dtype, major), &mut d).unwrap();
            for i in 0..64 {
                for j in 0..n as usize {
                    let (mut exact, mut abs, mut seq) =
                        (d0[i * n as usize + j] as f64, 0f64, d0[i * n as usize + j]);
                    abs += exact.abs();
                    for k in 0..16 {
                        let x = value(dtype, o.a[i * 16 + k]);
                        let y = value(dtype, o.b[j * 16 + k]);
                        exact += x as f64 * y as f64;
                        abs += (x as f64 * y as f64).abs();
                        seq += x * y;
                    }
                    let got = d[i * n as usize + j];
                    // 16 adds, each rounding by at most 2^-24 of the running magnitude.
                    assert!(
                        (got as f64 - exact).abs() <= 16.0 * abs / (1u64 << 24) as f64,
                        "n {n} ({i}, {j})"
                    );
                    assert_eq!(
                        got.to_bits(),
                        seq.to_bits(),
                        "n {n} ({i}, {j}): k-order f32 sum"
                    );
                }
            }
        }
    }
}

/// Runs `op` with the 16-byte chunk loader, checking every address is 16-byte aligned.
fn run_chunked(o: &Operands, op: &MmaOp, d: &mut [f32]) -> Result<(), SimError> {
    let smem = &o.smem;
    mma_chunked(
        op,
        &mut |a| {
            assert_eq!(a % 16, 0, "chunk address {a:#x}");
            let mut c = [0u8; 16];
            c.copy_from_slice(&smem[a as usize..a as usize + 16]);
            Ok(c)
        },
        d,
    )
}

#[test]
fn chunked_loads_give_the_same_result_bit_for_bit() {
    let mut rng = Rng(0xabcdef);
    let swizzles = [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128];
    for (i, s) in swizzles.into_iter().enumerate() {
        for b_major in [Major::K, Major::MN] {
            for a_major in [Major::K, Major::MN] {
                let n = [8, 40, 128, 256][i];
                let mut o = operands(&mut rng, n, MmaDtype::BF16, b_major, s);
                if a_major == Major::MN {
                    // Re-place A MN-major, with the same natural strides as B.
                    let span = s.span_bytes();
                    let (lbo, sbo) = if s == Swizzle::None {
                        (64 / 8 * 128, 128)
                    } else {
                        (16 * span, 8 * span)
                    };
                    o.da = MatrixDesc { lbo, sbo, ..o.da };
                    for r in 0..64 {
                        for k in 0..16 {
                            let at = operand_offset(&o.da, Major::MN, r, k, 2) as usize;
                            o.smem[at..at + 2]
                                .copy_from_slice(&o.a[(r * 16 + k) as usize].to_le_bytes());
                        }
                    }
                }
                let op = MmaOp {
                    a: ASource::Shared {
                        desc: o.da,
                        major: a_major,
                    },
                    ..op(&o, n, MmaDtype::BF16, b_major)
                };
                let d0: Vec<f32> = (0..64 * n).map(|_| rng.unit()).collect();
                let (mut d1, mut d2) = (d0.clone(), d0.clone());
                run(&o, &op, &mut d1).unwrap();
                run_chunked(&o, &op, &mut d2).unwrap();
                assert!(
                    d1.iter().zip(&d2).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{s:?} A {a_major:?} B {b_major:?}"
                );
                // And both are the product of the matrices placed in shared memory.
                for (i, j) in [(0usize, 0usize), (63, n as usize - 1), (17, 5)] {
                    let mut want = d0[i * n as usize + j];
                    for k in 0..16 {
                        want += value(MmaDtype::BF16, o.a[i * 16 + k])
                            * value(MmaDtype::BF16, o.b[j * 16 + k]);
                    }
                    assert_eq!(
                        d1[i * n as usize + j],
                        want,
                        "{s:?} A {a_major:?} B {b_major:?} ({i}, {j})"
                    );
                }
            }
        }
    }
}

#[test]
fn a_from_registers_equals_a_from_shared() {
    let mut rng = Rng(77);
    let n = 128;
    let o = operands(&mut rng, n, MmaDtype::BF16, Major::K, Swizzle::B128);
    let mut regs = [[0u32; 4]; 128];
    for (t, tr) in regs.iter_mut().enumerate() {
        for e in 0..8 {
            let (r, c) = a_fragment_coords(t as u32, e);
            tr[(e / 2) as usize] |= (o.a[(r * 16 + c) as usize] as u32) << (16 * (e % 2));
        }
    }
    let mut d1 = vec![0f32; 64 * n as usize];
    let mut d2 = d1.clone();
    run(&o, &op(&o, n, MmaDtype::BF16, Major::K), &mut d1).unwrap();
    let reg_op = MmaOp {
        a: ASource::Registers(&regs),
        ..op(&o, n, MmaDtype::BF16, Major::K)
    };
    run(&o, &reg_op, &mut d2).unwrap();
    assert!(d1.iter().zip(&d2).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(d1.iter().any(|&v| v != 0.0));
}

#[test]
fn scale_d_and_negation() {
    let mut rng = Rng(5);
    let n = 64;
    let o = operands(&mut rng, n, MmaDtype::BF16, Major::K, Swizzle::B32);
    let base = op(&o, n, MmaDtype::BF16, Major::K);
    let mut want = vec![0f32; 64 * n as usize];
    run(&o, &base, &mut want).unwrap();
    // scale-d false overwrites D (NaN poison gone).
    let mut d = vec![f32::NAN; want.len()];
    run(
        &o,
        &MmaOp {
            scale_d: false,
            ..base
        },
        &mut d,
    )
    .unwrap();
    assert_eq!(d, want);
    // imm-scale-a = -1 negates exactly; both negated give the product back.
    let mut neg = vec![0f32; want.len()];
    run(
        &o,
        &MmaOp {
            scale_a: -1,
            ..base
        },
        &mut neg,
    )
    .unwrap();
    assert!(neg.iter().zip(&want).all(|(x, y)| *x == -*y));
    let mut both = vec![0f32; want.len()];
    run(
        &o,
        &MmaOp {
            scale_a: -1,
            scale_b: -1,
            ..base
        },
        &mut both,
    )
    .unwrap();
    assert_eq!(both, want);
    // scale-d true accumulates: running twice gives about twice the product.
    let mut twice = want.clone();
    run(&o, &base, &mut twice).unwrap();
    assert!(
        twice
            .iter()
            .zip(&want)
            .all(|(x, y)| (x - 2.0 * y).abs() <= 1e-5 * (1.0 + y.abs()))
    );
    assert!(twice.iter().zip(&want).any(|(x, y)| x != y));
}

#[test]
fn errors() {
    let mut rng = Rng(9);
    let o = operands(&mut rng, 64, MmaDtype::BF16, Major::K, Swizzle::B128);
    let base = op(&o, 64, MmaDtype::BF16, Major::K);
    for n in [0, 4, 12, 264] {
        let mut d = vec![0f32; 64 * n as usize];
        let e = run(&o, &MmaOp { n, ..base }, &mut d).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported, "n {n}");
    }
    let mut short = vec![0f32; 64 * 63];
    assert_eq!(
        run(&o, &base, &mut short).unwrap_err().kind,
        ErrorKind::BadLaunch
    );
    let mut d = vec![1f32; 64 * 64];
    assert_eq!(
        run(&o, &MmaOp { scale_b: 2, ..base }, &mut d)
            .unwrap_err()
            .kind,
        ErrorKind::Parse
    );
    // A failing shared load is returned and D is left alone.
    let mut calls = 0;
    let e = mma(
        &base,
        &mut |_| {
            calls += 1;
            if calls == 1500 {
                Err(SimError::new(ErrorKind::AsyncProxy, "not fenced"))
            } else {
                Ok(0x3f80)
            }
        },
        &mut d,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AsyncProxy);
    assert!(d.iter().all(|&v| v == 1.0));
    assert_eq!(flops(256), 2 * 64 * 256 * 16);
    assert_eq!(flops(8), 16384);
}

#[test]
fn m64n256k16_runs_in_microseconds() {
    let mut rng = Rng(3);
    let o = operands(&mut rng, 256, MmaDtype::BF16, Major::K, Swizzle::B128);
    let base = op(&o, 256, MmaDtype::BF16, Major::K);
    let mut d = vec![0f32; 64 * 256];
    let reps = 200;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        run(&o, &base, &mut d).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        run_chunked(&o, &base, &mut d).unwrap();
    }
    let chunked = t.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "m64n256k16: {:.1} us per call ({:.1} us chunked)",
        per * 1e6,
        chunked * 1e6
    );
    assert!(
        chunked < 2e-3,
        "chunked m64n256k16 took {:.1} us",
        chunked * 1e6
    );
    // Generous for a shared, loaded machine: the budget is microseconds, not milliseconds.
    assert!(per < 2e-3, "m64n256k16 took {:.1} us", per * 1e6);
}
