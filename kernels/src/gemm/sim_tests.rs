//! The generated GEMM kernels, run on Lathe's simulated device (lathe-sim, through
//! [`crate::simtest`]), against the twin.
//!
//! Inputs are small integers, so every product and sum is exact in f32: without GELU the
//! kernel's output must equal the twin's rounded to the output type bit for bit. Shapes are
//! ragged on every axis, with more k-tiles than pipeline stages, and cover both copy paths.
//! Padding elements and (for `beta == 0`) C hold NaN, and nothing of C outside its `m x n`
//! block may change. The simulator's sanitizer fails a launch on a shared-memory race, a read
//! of a `cp.async` destination before its wait, or an access outside the operands' buffers.
//! The dynamic shared array starts at the base of the block's shared window (as its `.align
//! 128` declaration promises on hardware); other bases are not exercised.

use super::{Gemm, Op, Version, geometry_for, kernel_for, twin};
use crate::desc::Elem;
use crate::rng::Rng;
use crate::simtest::{Arg, Gpu};
use half::{bf16, f16};
use lathe_sim::Counters;

const OPS: [(Op, Op); 4] = [
    (Op::N, Op::N),
    (Op::N, Op::T),
    (Op::T, Op::N),
    (Op::T, Op::T),
];

/// Bits of `x` rounded to `e` (bf16, f16 or f32), as little-endian bytes.
fn encode(e: Elem, x: f32) -> Vec<u8> {
    match e {
        Elem::BF16 => bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
        Elem::F16 => f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
        Elem::F32 => x.to_le_bytes().to_vec(),
        _ => unreachable!("GEMM element types are bf16, f16, f32"),
    }
}

/// The f32 value of one element of type `e` at `bytes`.
fn decode(e: Elem, bytes: &[u8]) -> f32 {
    match e {
        Elem::BF16 => bf16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        Elem::F16 => f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        Elem::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        _ => unreachable!("GEMM element types are bf16, f16, f32"),
    }
}

/// One launch: the problem, the types, and how to lay out the buffers.
#[derive(Clone, Debug)]
struct Case {
    version: Version,
    g: Gemm,
    input: Elem,
    output: Elem,
    bias: bool,
    /// Elements the A, B and C pointers sit after their buffer's (256-byte aligned) start.
    offsets: (usize, usize, usize),
    seed: u64,
}

/// What a launch produced.
struct Outcome {
    /// C (m x n, row-major) as f64.
    got: Vec<f64>,
    /// The twin's C, and the same rounded to the output type.
    want: Vec<f64>,
    want_rounded: Vec<f64>,
    counters: Counters,
}

/// Small integers (exact in bf16 / f16 and in f32 sums of the sizes tested).
fn small_ints(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.below(7) as f32 - 3.0).collect()
}

/// `rows x cols` values at leading dimension `ld`, zero between rows.
fn stored(rows: usize, cols: usize, ld: usize, v: &[f32]) -> Vec<f32> {
    let mut s = vec![0f32; if rows == 0 { 0 } else { (rows - 1) * ld + cols }];
    for r in 0..rows {
        s[r * ld..r * ld + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
    }
    s
}

fn run(case: &Case) -> Result<Outcome, String> {
    let g = &case.g;
    g.validate().map_err(|e| e.to_string())?;
    let desc = kernel_for(case.version, g.op_a, g.op_b, case.input, case.output)
        .ok_or("no such kernel")?;
    let mut rng = Rng::new(case.seed);
    let mut gpu = Gpu::new();

    // A buffer holding `rows x cols` values at leading dimension `ld`, `off` elements into it,
    // with NaN before, between and after the rows. Returns its bytes and the pointer.
    let mut make = |rows: usize, cols: usize, ld: usize, off: usize, e: Elem, vals: &[f32]| {
        let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        let mut host = vec![f32::NAN; len.max(1) + off + ld];
        for r in 0..rows {
            for c in 0..cols {
                host[off + r * ld + c] = vals[r * cols + c];
            }
        }
        let bytes: Vec<u8> = host.iter().flat_map(|&x| encode(e, x)).collect();
        let base = gpu.upload(&bytes);
        (base, bytes, base + (off * e.size()) as u64)
    };
    let (ar, ac) = g.a_stored();
    let (br, bc) = g.b_stored();
    let av = small_ints(&mut rng, ar * ac);
    let bv = small_ints(&mut rng, br * bc);
    let cv: Vec<f32> = if g.beta != 0.0 {
        small_ints(&mut rng, g.m * g.n)
    } else {
        vec![f32::NAN; g.m * g.n]
    };
    let biasv = small_ints(&mut rng, g.n.max(1));
    let (_, _, a_ptr) = make(ar, ac, g.lda(), case.offsets.0, case.input, &av);
    let (_, _, b_ptr) = make(br, bc, g.ldb(), case.offsets.1, case.input, &bv);
    let (c_base, c_bytes, c_ptr) = make(g.m, g.n, g.ldc(), case.offsets.2, case.output, &cv);
    let (_, _, bias_ptr) = make(1, g.n, g.n, 0, case.input, &biasv);

    let geo = geometry_for(&case.version.tile(), &g.problem());
    let args = [
        Arg::Ptr(a_ptr),
        Arg::Ptr(b_ptr),
        Arg::Ptr(c_ptr),
        Arg::Ptr(if case.bias { bias_ptr } else { 0 }),
        Arg::U32(g.m as u32),
        Arg::U32(g.n as u32),
        Arg::U32(g.k as u32),
        Arg::U32(g.lda() as u32),
        Arg::U32(g.ldb() as u32),
        Arg::U32(g.ldc() as u32),
        Arg::F32(g.alpha),
        Arg::F32(g.beta),
        Arg::U32(g.flags(case.bias)),
    ];
    let counters = gpu.launch_on(desc, geo, &args)?;

    // C: the m x n block, and every other byte unchanged.
    let after: Vec<u8> = gpu.read(c_base, c_bytes.len());
    let osz = case.output.size();
    let c_off = case.offsets.2 * osz;
    let mut got = Vec::with_capacity(g.m * g.n);
    let mut inside = vec![false; c_bytes.len()];
    for r in 0..g.m {
        for c in 0..g.n {
            let at = c_off + (r * g.ldc() + c) * osz;
            got.push(decode(case.output, &after[at..at + osz]) as f64);
            inside[at..at + osz].iter_mut().for_each(|x| *x = true);
        }
    }
    for (i, (&x, &y)) in after.iter().zip(&c_bytes).enumerate() {
        if !inside[i] && x != y {
            return Err(format!("byte {i} of C outside the m x n block was written"));
        }
    }

    // The twin, on the same values (integers: exact in every input type).
    let rows: Vec<usize> = (0..g.m).collect();
    let want = twin::reference(
        g,
        &stored(ar, ac, g.lda(), &av),
        &stored(br, bc, g.ldb(), &bv),
        case.bias.then_some(&biasv[..g.n]),
        &stored(g.m, g.n, g.ldc(), &cv),
        &rows,
    );
    let want_rounded = want
        .iter()
        .map(|&x| decode(case.output, &encode(case.output, x as f32)) as f64)
        .collect();
    Ok(Outcome {
        got,
        want,
        want_rounded,
        counters,
    })
}

fn case(version: Version, (m, n, k): (usize, usize, usize), ops: (Op, Op)) -> Case {
    Case {
        version,
        g: Gemm::new(m, n, k).with_ops(ops.0, ops.1),
        input: Elem::BF16,
        output: Elem::F32,
        bias: false,
        offsets: (0, 0, 0),
        seed: (m * 1_000_003 + n * 1009 + k) as u64,
    }
}

/// Leading dimensions rounded up to a multiple of 8 plus 8 (fast path, padding in between).
fn padded(c: Case) -> Case {
    let up = |x: usize| x.div_ceil(8) * 8 + 8;
    let g = c.g;
    Case {
        g: g.with_ld(up(g.a_stored().1), up(g.b_stored().1), up(g.n)),
        ..c
    }
}

/// Odd leading dimensions and pointers off 16-byte alignment (element-wise copies, scalar
/// stores of C).
fn ragged(c: Case) -> Case {
    let g = c.g;
    Case {
        g: g.with_ld(g.a_stored().1 + 1, g.b_stored().1 + 3, g.n + 1),
        offsets: (1, 3, 1),
        ..c
    }
}

fn check(c: &Case) -> Counters {
    let o = run(c).unwrap_or_else(|e| panic!("{c:?}:\n{e}"));
    if c.g.gelu {
        // The simulator rounds `.approx` functions once from f64, so GELU differs from the f64
        // twin by f32 arithmetic plus one rounding to the output type.
        let rel = match c.output {
            Elem::F32 => 1e-5,
            Elem::F16 => 1.0 / 1024.0,
            _ => 1.0 / 256.0,
        };
        for (i, (g, w)) in o.got.iter().zip(&o.want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + 1e-6,
                "{c:?}: GELU element ({}, {}) is {g}, the twin gives {w}",
                i / c.g.n,
                i % c.g.n
            );
        }
    } else {
        for (i, (g, w)) in o.got.iter().zip(&o.want_rounded).enumerate() {
            assert!(
                g == w,
                "{c:?}: element ({}, {}) is {g}, the twin gives {w}",
                i / c.g.n,
                i % c.g.n
            );
        }
    }
    // `ldmatrix` and the slow path's `st.shared` are the kernels' only shared accesses besides
    // `cp.async`: the swizzle keeps them conflict-free.
    assert_eq!(
        o.counters.shared_bank_conflicts, 0,
        "{c:?}: shared-memory bank conflicts"
    );
    assert!(
        o.counters.tensor_flops > 0 || c.g.k == 0,
        "{c:?}: no mma ran"
    );
    o.counters
}

#[test]
fn v2_every_layout_fast_path_with_beta_and_bias() {
    for ops in OPS {
        let mut c = padded(case(Version::V2, (130, 136, 200), ops));
        c.g = c.g.with_alpha(0.5).with_beta(1.0);
        c.bias = true;
        let s = check(&c);
        assert!(s.cp_async_bytes > 0, "{c:?}: the fast path ran");
        assert_eq!(
            s.shared_store_requests, 0,
            "{c:?}: the slow path did not run"
        );
    }
}

#[test]
fn v2_every_layout_slow_path_with_gelu() {
    for ops in OPS {
        let mut c = ragged(case(Version::V2, (129, 140, 77), ops));
        c.output = Elem::BF16;
        c.g = c.g.with_gelu(true);
        c.bias = true;
        let s = check(&c);
        assert!(s.shared_store_requests > 0, "{c:?}: the slow path ran");
    }
}

#[test]
fn v1_every_layout_both_paths() {
    for ops in OPS {
        let mut c = padded(case(Version::V1, (70, 72, 100), ops));
        c.g = c.g.with_beta(-2.0);
        check(&c);
        let mut c = ragged(case(Version::V1, (65, 63, 33), ops));
        c.output = Elem::BF16;
        c.bias = true;
        check(&c);
    }
}

#[test]
fn f16_kernels() {
    for v in Version::ALL {
        let mut c = padded(case(v, (40, 24, 48), (Op::N, Op::T)));
        c.input = Elem::F16;
        c.output = Elem::F16;
        c.bias = true;
        check(&c);
        c.output = Elem::F32;
        c.g = c.g.with_gelu(true);
        check(&c);
    }
}

#[test]
fn tiny_and_empty_k() {
    for v in Version::ALL {
        check(&case(v, (1, 1, 1), (Op::N, Op::N)));
        // k = 0: C = beta C + bias.
        let mut c = case(v, (3, 5, 0), (Op::T, Op::N));
        c.g = c.g.with_beta(1.0);
        c.bias = true;
        check(&c);
        check(&ragged(case(v, (1, 200, 33), (Op::N, Op::T))));
    }
}

#[test]
fn grouped_raster_covers_every_tile() {
    // 10 tile rows (more than group_m = 8) by 3 tile columns.
    check(&padded(case(Version::V1, (600, 130, 8), (Op::N, Op::N))));
}
