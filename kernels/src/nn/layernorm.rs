//! LayerNorm over the last dimension, forward and backward (a fused op with its own backward).
//!
//! Forward, per row of `C` elements: `mean = sum(x) / C`, `var = sum((x - mean)^2) / C`,
//! `rstd = 1 / sqrt(var + eps)`, `out = (x - mean) * rstd * weight + bias`; `mean` and `rstd`
//! (f32, one per row) are saved for the backward. One warp per row.
//!
//! Backward, per row: `xhat = (x - mean) * rstd`, `dn = dout * weight`,
//! `sd = sum(dn) / C`, `sdx = sum(dn * xhat) / C`, `dx = (dn - sd - xhat * sdx) * rstd`
//! (written), and `dweight += sum_rows(dout * xhat)`, `dbias += sum_rows(dout)` (f32,
//! accumulated). The weight/bias sums are deterministic: each block of the backward writes a
//! partial row for its group of rows into `partials (groups, 2C)`, then
//! [`super::colsum::COLSUM_ACC_F32`] folds the partials in a fixed order (twice: the dweight
//! half and the dbias half). PTX in `layernorm_ptx`.
//!
//! Storage: `x, weight, bias, out, dout, dx` in the activation dtype (f32 / bf16 / f16),
//! statistics and parameter gradients in f32. Any `C >= 1` (vector path when `C % 4 == 0` and
//! the buffers are aligned); the backward's shared memory is `8 C` bytes (C up to 6144 within
//! the default 48 KiB; more needs the opt-in the runtime performs).

use super::layernorm_ptx;
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Rows per 256-thread block of the forward (one warp each).
pub const FWD_ROWS_PER_BLOCK: u32 = 8;
/// Threads per block of the backward.
pub const BWD_THREADS: u32 = 128;
/// Most blocks (and partial rows) of the backward.
pub const MAX_BWD_GROUPS: u64 = 1024;

/// Blocks of the backward for `rows` rows: a function of `rows` alone (determinism). The
/// partials buffer holds `bwd_groups(rows) * 2 * C` floats.
pub fn bwd_groups(rows: u64) -> u64 {
    rows.clamp(1, MAX_BWD_GROUPS)
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    s.push_str(super::ptxgen::DYN_SMEM_DECL);
    for (i, dt) in super::ACT_DTYPES.into_iter().enumerate() {
        s.push_str(&layernorm_ptx::forward(FWD[i].entry, dt));
        s.push_str(&layernorm_ptx::backward(BWD[i].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_layernorm",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn fwd_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.batch.div_ceil(FWD_ROWS_PER_BLOCK as u64).max(1) as u32,
            1,
            1,
        ),
        block: (32 * FWD_ROWS_PER_BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

fn bwd_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (bwd_groups(p.batch) as u32, 1, 1),
        block: (BWD_THREADS, 1, 1),
        shared_bytes: (8 * p.n) as u32,
    }
}

macro_rules! ln_args {
    ($dt:expr) => {
        (
            &[
                arg("x", ArgKind::In($dt)),
                arg("weight", ArgKind::In($dt)),
                arg("bias", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("mean", ArgKind::Out(Elem::F32)),
                arg("rstd", ArgKind::Out(Elem::F32)),
                arg("rows", ArgKind::U32),
                arg("c", ArgKind::U32),
                arg("eps", ArgKind::F32),
            ],
            &[
                arg("dout", ArgKind::In($dt)),
                arg("x", ArgKind::In($dt)),
                arg("weight", ArgKind::In($dt)),
                arg("mean", ArgKind::In(Elem::F32)),
                arg("rstd", ArgKind::In(Elem::F32)),
                arg("dx", ArgKind::Out($dt)),
                arg("partials", ArgKind::Out(Elem::F32)),
                arg("rows", ArgKind::U32),
                arg("c", ArgKind::U32),
            ],
        )
    };
}

const ARGS_F32: (&[Arg], &[Arg]) = ln_args!(Elem::F32);
const ARGS_BF16: (&[Arg], &[Arg]) = ln_args!(Elem::BF16);
const ARGS_F16: (&[Arg], &[Arg]) = ln_args!(Elem::F16);

fn fwd_cost(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 8 * p.batch * p.n,
        bytes: size * (2 * p.batch * p.n + 2 * p.n) + 8 * p.batch,
    }
}

fn bwd_cost(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 12 * p.batch * p.n,
        bytes: size * (3 * p.batch * p.n + p.n) + 8 * p.batch + 8 * bwd_groups(p.batch) * p.n,
    }
}

macro_rules! ln_descs {
    ($fwd:ident, $bwd:ident, $args:ident, $sfx:literal, $size:literal) => {
        #[doc = concat!("Forward, `Problem { batch: rows, n: C }`: `x, out (rows, C) ", $sfx,
            "`, `weight, bias (C) ", $sfx, "`, `mean, rstd (rows) f32` written.")]
        pub static $fwd: KernelDesc = KernelDesc {
            entry: concat!("lathe_layernorm_fwd_", $sfx),
            module: &MODULE,
            args: $args.0,
            geometry: fwd_geometry,
            cost: |p| fwd_cost(p, $size),
            summary: "layernorm forward, one warp per row, mean/rstd saved",
        };
        #[doc = concat!("Backward, `Problem { batch: rows, n: C }`: `dout, x, dx (rows, C) ",
            $sfx, "`, `weight (C)`, `mean, rstd (rows) f32`, `partials (bwd_groups(rows), 2C) f32`",
            " written; fold with colsum into dweight/dbias.")]
        pub static $bwd: KernelDesc = KernelDesc {
            entry: concat!("lathe_layernorm_bwd_", $sfx),
            module: &MODULE,
            args: $args.1,
            geometry: bwd_geometry,
            cost: |p| bwd_cost(p, $size),
            summary: "layernorm backward: dx, and per-block dweight/dbias partials",
        };
    };
}

ln_descs!(LAYERNORM_FWD_F32, LAYERNORM_BWD_F32, ARGS_F32, "f32", 4);
ln_descs!(LAYERNORM_FWD_BF16, LAYERNORM_BWD_BF16, ARGS_BF16, "bf16", 2);
ln_descs!(LAYERNORM_FWD_F16, LAYERNORM_BWD_F16, ARGS_F16, "f16", 2);

const FWD: [&KernelDesc; 3] = [&LAYERNORM_FWD_F32, &LAYERNORM_FWD_BF16, &LAYERNORM_FWD_F16];
const BWD: [&KernelDesc; 3] = [&LAYERNORM_BWD_F32, &LAYERNORM_BWD_BF16, &LAYERNORM_BWD_F16];

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &LAYERNORM_FWD_F32,
    &LAYERNORM_BWD_F32,
    &LAYERNORM_FWD_BF16,
    &LAYERNORM_BWD_BF16,
    &LAYERNORM_FWD_F16,
    &LAYERNORM_BWD_F16,
];

/// The forward kernel for an activation dtype.
pub fn forward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, FWD)
}

/// The backward kernel for an activation dtype.
pub fn backward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, BWD)
}

/// CPU twins. Statistics and row sums are formed in f64 and rounded once (a more accurate
/// reference than the GPU's f32 trees); the per-element arithmetic is the kernel's, and the
/// weight/bias gradients follow the kernel's grouping and order exactly.
pub mod twin {
    use super::bwd_groups;
    use crate::elementwise::twin::Float;
    use crate::nn::colsum::twin::colsum_acc;

    /// `x, out: (rows, c)`, `w, b: (c)`, `mean, rstd: (rows)`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Float>(
        x: &[T],
        w: &[T],
        b: &[T],
        out: &mut [T],
        mean: &mut [f32],
        rstd: &mut [f32],
        c: usize,
        eps: f32,
    ) {
        for (r, (xr, or)) in x.chunks(c).zip(out.chunks_mut(c)).enumerate() {
            let sum: f64 = xr.iter().map(|v| v.to_f32() as f64).sum();
            let m = (sum / c as f64) as f32;
            let var: f64 = xr
                .iter()
                .map(|v| {
                    let d = (v.to_f32() - m) as f64;
                    d * d
                })
                .sum::<f64>()
                / c as f64;
            let s = (1.0 / (var + eps as f64).sqrt()) as f32;
            for j in 0..c {
                let y = (xr[j].to_f32() - m) * s * w[j].to_f32() + b[j].to_f32();
                or[j] = T::from_f32(y);
            }
            mean[r] = m;
            rstd[r] = s;
        }
    }

    /// `dout, x, dx: (rows, c)`, `w: (c)`, `mean, rstd: (rows)`; `dx` written, `dweight,
    /// dbias: (c)` accumulated (`+=`) through the kernel's partials and column sums.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Float>(
        dout: &[T],
        x: &[T],
        w: &[T],
        mean: &[f32],
        rstd: &[f32],
        dx: &mut [T],
        dweight: &mut [f32],
        dbias: &mut [f32],
        c: usize,
    ) {
        let groups = bwd_groups(mean.len() as u64) as usize;
        backward_grouped(dout, x, w, mean, rstd, dx, dweight, dbias, c, groups);
    }

    /// [`backward`] with the rows cut into `groups` blocks (the kernel launched on a grid of
    /// `groups` blocks).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_grouped<T: Float>(
        dout: &[T],
        x: &[T],
        w: &[T],
        mean: &[f32],
        rstd: &[f32],
        dx: &mut [T],
        dweight: &mut [f32],
        dbias: &mut [f32],
        c: usize,
        groups: usize,
    ) {
        let rows = mean.len();
        for r in 0..rows {
            let (dr, xr) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
            let (m, s) = (mean[r], rstd[r]);
            let xhat = |j: usize| (xr[j].to_f32() - m) * s;
            let dn = |j: usize| dr[j].to_f32() * w[j].to_f32();
            let sd = ((0..c).map(|j| dn(j) as f64).sum::<f64>() / c as f64) as f32;
            let sdx =
                ((0..c).map(|j| dn(j) as f64 * xhat(j) as f64).sum::<f64>() / c as f64) as f32;
            for j in 0..c {
                dx[r * c + j] = T::from_f32((dn(j) - sd - xhat(j) * sdx) * s);
            }
        }
        let rpb = rows.div_ceil(groups);
        let mut partials = vec![0f32; groups * 2 * c];
        for g in 0..groups {
            let p = &mut partials[g * 2 * c..(g + 1) * 2 * c];
            for r in (g * rpb).min(rows)..((g + 1) * rpb).min(rows) {
                for j in 0..c {
                    let d = dout[r * c + j].to_f32();
                    let xh = (x[r * c + j].to_f32() - mean[r]) * rstd[r];
                    p[j] += d * xh;
                    p[c + j] += d;
                }
            }
        }
        colsum_acc(&partials, groups, c, 2 * c, dweight);
        colsum_acc(&partials[c..], groups, c, 2 * c, dbias);
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn forward_normalises_rows() {
        let (rows, c) = (5, 37);
        let x = Rng::new(1).vec_f32(rows * c, -3.0, 5.0);
        let (w, b) = (vec![1.0f32; c], vec![0.0f32; c]);
        let mut out = vec![0f32; rows * c];
        let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
        forward(&x, &w, &b, &mut out, &mut mean, &mut rstd, c, 1e-5);
        for r in 0..rows {
            let o = &out[r * c..(r + 1) * c];
            let m: f64 = o.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let v: f64 = o.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "row {r}: {m} {v}");
        }
    }

    /// The backward twin against central differences of the forward twin (f32, loose).
    #[test]
    fn backward_matches_finite_differences() {
        let (rows, c) = (3, 6);
        let mut rng = Rng::new(2);
        let x = rng.vec_f32(rows * c, -2.0, 2.0);
        let w = rng.vec_f32(c, 0.5, 1.5);
        let b = rng.vec_f32(c, -0.5, 0.5);
        let g = rng.vec_f32(rows * c, -1.0, 1.0);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let mut out = vec![0f32; rows * c];
            let (mut m, mut s) = (vec![0f32; rows], vec![0f32; rows]);
            forward(x, w, b, &mut out, &mut m, &mut s, c, 1e-5);
            out.iter()
                .zip(&g)
                .map(|(&o, &gg)| o as f64 * gg as f64)
                .sum()
        };
        let mut out = vec![0f32; rows * c];
        let (mut m, mut s) = (vec![0f32; rows], vec![0f32; rows]);
        forward(&x, &w, &b, &mut out, &mut m, &mut s, c, 1e-5);
        let mut dx = vec![0f32; rows * c];
        let (mut dw, mut db) = (vec![0.5f32; c], vec![-0.5f32; c]);
        backward(&g, &x, &w, &m, &s, &mut dx, &mut dw, &mut db, c);
        let h = 1e-2f32;
        let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * h as f64);
        for i in 0..rows * c {
            let d = fd(&|e| {
                let mut xx = x.clone();
                xx[i] += e;
                loss(&xx, &w, &b)
            });
            assert!((dx[i] as f64 - d).abs() < 2e-2, "dx[{i}] {} vs {d}", dx[i]);
        }
        for j in 0..c {
            let d = fd(&|e| {
                let mut ww = w.clone();
                ww[j] += e;
                loss(&x, &ww, &b)
            });
            assert!((dw[j] as f64 - 0.5 - d).abs() < 2e-2, "dw[{j}]");
            let d = fd(&|e| {
                let mut bb = b.clone();
                bb[j] += e;
                loss(&x, &w, &bb)
            });
            assert!((db[j] as f64 + 0.5 - d).abs() < 2e-2, "db[{j}]");
        }
    }

    #[test]
    fn backward_groups_depend_on_rows_only() {
        assert_eq!(bwd_groups(0), 1);
        assert_eq!(bwd_groups(7), 7);
        assert_eq!(bwd_groups(16384), MAX_BWD_GROUPS);
        let g = bwd_geometry(&Problem {
            batch: 16384,
            n: 768,
            ..Problem::default()
        });
        assert_eq!(g.shared_bytes, 8 * 768);
    }
}
