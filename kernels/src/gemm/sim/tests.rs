//! The generated GEMM kernels, executed by the interpreter, against the twin.
//!
//! Inputs are small integers, so every product and sum is exact in f32: without GELU the
//! kernel's output must equal the twin's rounded to the output type bit for bit. Shapes are
//! ragged on every axis, with more k-tiles than pipeline stages, and cover both copy paths.

use super::*;
use crate::gemm::Op;

const OPS: [(Op, Op); 4] = [
    (Op::N, Op::N),
    (Op::N, Op::T),
    (Op::T, Op::N),
    (Op::T, Op::T),
];

fn case(version: Version, (m, n, k): (usize, usize, usize), ops: (Op, Op)) -> Case {
    Case {
        version,
        g: Gemm::new(m, n, k).with_ops(ops.0, ops.1),
        input: Elem::BF16,
        output: Elem::F32,
        bias: false,
        offsets: (0, 0, 0),
        shared_base: 1024,
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

fn check(c: &Case) -> Stats {
    let o = run(c).unwrap_or_else(|e| panic!("{c:?}:\n{e}"));
    if c.g.gelu {
        // The interpreter's ex2 / rcp are exact to f32, so GELU differs from the f64 twin by
        // f32 arithmetic plus one rounding to the output type.
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
    if o.stats.ldmatrix_count > 0 {
        assert_eq!(o.stats.ldmatrix_ways, 1, "{c:?}: ldmatrix bank conflicts");
    }
    assert!(o.stats.cp_async_ways <= 1, "{c:?}: cp.async bank conflicts");
    assert!(
        o.stats.st_shared_ways <= 1,
        "{c:?}: st.shared bank conflicts"
    );
    o.stats
}

#[test]
fn v2_every_layout_fast_path_with_beta_and_bias() {
    for ops in OPS {
        let mut c = padded(case(Version::V2, (130, 136, 200), ops));
        c.g = c.g.with_alpha(0.5).with_beta(1.0);
        c.bias = true;
        let s = check(&c);
        assert_eq!(s.cp_async_ways, 1, "the fast path ran");
        assert_eq!(s.st_shared_ways, 0, "the slow path did not run");
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
        assert_eq!(s.st_shared_ways, 1, "the slow path ran");
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

#[test]
fn correct_at_any_shared_memory_base() {
    // 16-byte aligned but not 128: only bank behaviour may change, never a result.
    for v in Version::ALL {
        for ops in [(Op::N, Op::N), (Op::T, Op::T)] {
            let mut c = padded(case(v, (70, 40, 72), ops));
            c.shared_base = 0x4F0;
            c.bias = true;
            let o = run(&c).unwrap_or_else(|e| panic!("{c:?}:\n{e}"));
            assert_eq!(o.got, o.want_rounded, "{c:?}");
        }
    }
}
