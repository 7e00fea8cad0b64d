//! Reductions over f32 vectors: sum and max-abs, two passes of one kernel (see
//! [`crate::ptx::reduce`]). Deterministic: the grid is a function of `n` alone.

use crate::desc::{ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use crate::ptx::reduce::{Fold, kernel};
use std::borrow::Cow;

pub const BLOCK: u32 = 256;
/// Most partials pass 1 writes; pass 2 folds them in one block.
pub const MAX_BLOCKS: u64 = 1024;

/// Blocks of pass 1 for `n` elements (each thread takes about 4 or more).
pub fn blocks_for(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64 * 4).clamp(1, MAX_BLOCKS)
}

fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (blocks_for(p.n) as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

fn cost(p: &Problem) -> Cost {
    Cost {
        flops: p.n,
        bytes: p.n * 4,
    }
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    s.push_str(&kernel("lathe_sum_f32", Fold::Sum));
    s.push_str(&kernel("lathe_max_abs_f32", Fold::MaxAbs));
    Cow::Owned(s)
}

pub static MODULE: Module = Module {
    name: "reduce",
    target: Target::Sm80,
    ptx: module_ptx,
};

const ARGS: &[crate::desc::Arg] = &[
    arg("x", ArgKind::In(Elem::F32)),
    arg("n", ArgKind::U64),
    arg("out", ArgKind::Out(Elem::F32)),
];

/// `out[blockIdx] = sum of this block's share of x`; launched again over the partials with
/// one block to finish.
pub static SUM_F32: KernelDesc = KernelDesc {
    entry: "lathe_sum_f32",
    module: &MODULE,
    args: ARGS,
    geometry,
    cost,
    summary: "sum of x (two passes: partials, then one block)",
};

/// Like [`SUM_F32`] with `max(|x|)`; NaN anywhere gives NaN.
pub static MAX_ABS_F32: KernelDesc = KernelDesc {
    entry: "lathe_max_abs_f32",
    module: &MODULE,
    args: ARGS,
    geometry,
    cost,
    summary: "max |x| with NaN propagation (two passes)",
};

pub static ALL: &[&KernelDesc] = &[&SUM_F32, &MAX_ABS_F32];

/// CPU twins.
pub mod twin {
    /// The sum in f64 (the reference the GPU's f32 tree is compared with).
    pub fn sum(x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64).sum()
    }

    /// Sum of |x| in f64: the scale of the rounding error a sum may carry.
    pub fn sum_abs(x: &[f32]) -> f64 {
        x.iter().map(|&v| (v as f64).abs()).sum()
    }

    /// max |x|, NaN if any element is NaN, 0 for an empty slice.
    pub fn max_abs(x: &[f32]) -> f32 {
        let mut m = 0f32;
        for &v in x {
            if v.is_nan() {
                return f32::NAN;
            }
            m = m.max(v.abs());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_propagates_nan_and_inf() {
        assert_eq!(twin::max_abs(&[1.0, -3.0, 2.0]), 3.0);
        assert!(twin::max_abs(&[1.0, f32::NAN, 2.0]).is_nan());
        assert_eq!(twin::max_abs(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
        assert_eq!(twin::max_abs(&[]), 0.0);
    }

    #[test]
    fn pass_two_fits_one_block() {
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(1 << 40), MAX_BLOCKS);
        // Pass 2 runs over at most MAX_BLOCKS partials: one block.
        assert_eq!(blocks_for(MAX_BLOCKS), 1);
    }
}
