//! Data movement and reductions: reshape, transpose, split, concat, sum, mean.
//!
//! Movement ops copy (each output owns its storage, which keeps memory accounting simple) and
//! keep the input's dtype. `sum` and `mean` reduce everything to a rank-0 f32 value, in fixed
//! chunks combined in order.

use crate::error::{Result, invalid, shape_err};
use crate::ops::par::CHUNK;
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::numel;

use rayon::prelude::*;

impl<T: Scalar> Tape<T> {
    /// The same values with another shape of equal element count.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let xs = self.shape(x)?;
        if numel(xs) != numel(shape) {
            return Err(shape_err(
                "reshape",
                format!("cannot reshape {xs:?} to {shape:?}"),
            ));
        }
        Ok(self.record(Op::Reshape, &[x], vec![shape.to_vec()])?[0])
    }

    /// Swaps dims `d0` and `d1`.
    pub fn transpose(&mut self, x: Var, d0: usize, d1: usize) -> Result<Var> {
        let mut s = self.shape(x)?.to_vec();
        if d0 >= s.len() || d1 >= s.len() {
            return Err(invalid(
                "transpose",
                format!("dims ({d0}, {d1}) out of range for {s:?}"),
            ));
        }
        s.swap(d0, d1);
        let (d0, d1) = (d0.min(d1), d0.max(d1));
        Ok(self.record(Op::Transpose { d0, d1 }, &[x], vec![s])?[0])
    }

    /// Splits `x` along `dim` into pieces of `sizes` (which must add up to that dim).
    pub fn split(&mut self, x: Var, dim: usize, sizes: &[usize]) -> Result<Vec<Var>> {
        let s = self.shape(x)?.to_vec();
        if dim >= s.len() {
            return Err(invalid(
                "split",
                format!("dim {dim} out of range for {s:?}"),
            ));
        }
        if sizes.iter().sum::<usize>() != s[dim] || sizes.is_empty() {
            return Err(shape_err(
                "split",
                format!("sizes {sizes:?} do not add up to {}", s[dim]),
            ));
        }
        let outs = sizes
            .iter()
            .map(|&k| {
                let mut o = s.clone();
                o[dim] = k;
                o
            })
            .collect();
        self.record(
            Op::Split {
                dim,
                sizes: sizes.to_vec(),
            },
            &[x],
            outs,
        )
    }

    /// Concatenates `xs` along `dim`; all other dims must agree.
    pub fn concat(&mut self, xs: &[Var], dim: usize) -> Result<Var> {
        let first = self
            .shape(*xs.first().ok_or_else(|| invalid("concat", "no inputs"))?)?
            .to_vec();
        if dim >= first.len() {
            return Err(invalid(
                "concat",
                format!("dim {dim} out of range for {first:?}"),
            ));
        }
        let mut out = first.clone();
        out[dim] = 0;
        for &x in xs {
            let s = self.shape(x)?;
            let same = s.len() == first.len()
                && s.iter()
                    .zip(&first)
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !same {
                return Err(shape_err(
                    "concat",
                    format!("{s:?} does not match {first:?} off dim {dim}"),
                ));
            }
            out[dim] += s[dim];
        }
        Ok(self.record(Op::Concat { dim }, xs, vec![out])?[0])
    }

    /// Sum of all elements, rank-0 f32.
    pub fn sum(&mut self, x: Var) -> Result<Var> {
        self.shape(x)?;
        Ok(self.record(Op::Sum, &[x], vec![vec![]])?[0])
    }

    /// Mean of all elements, rank-0 f32.
    pub fn mean(&mut self, x: Var) -> Result<Var> {
        if numel(self.shape(x)?) == 0 {
            return Err(invalid("mean", "mean of an empty tensor"));
        }
        Ok(self.record(Op::Mean, &[x], vec![vec![]])?[0])
    }
}

/// (outer, dim, inner) view of `shape` around `dim`.
fn split3(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (numel(&shape[..dim]), shape[dim], numel(&shape[dim + 1..]))
}

/// Copies `src` laid out as `(pre, a, mid, b, post)` into `dst` as `(pre, b, mid, a, post)`.
fn swap_dims<T: Copy>(src: &[T], dst: &mut [T], shape: &[usize], d0: usize, d1: usize) {
    if d0 == d1 {
        dst.copy_from_slice(src);
        return;
    }
    let pre = numel(&shape[..d0]);
    let a = shape[d0];
    let mid = numel(&shape[d0 + 1..d1]);
    let b = shape[d1];
    let post = numel(&shape[d1 + 1..]);
    for p in 0..pre {
        for j in 0..b {
            for m in 0..mid {
                for i in 0..a {
                    let s = (((p * a + i) * mid + m) * b + j) * post;
                    let d = (((p * b + j) * mid + m) * a + i) * post;
                    dst[d..d + post].copy_from_slice(&src[s..s + post]);
                }
            }
        }
    }
}

pub(crate) fn transpose_forward<T: Scalar>(d0: usize, d1: usize, ins: &[Val<T>], out: &mut [T]) {
    swap_dims(ins[0].data, out, ins[0].shape, d0, d1);
}

pub(crate) fn transpose_backward<T: Scalar>(
    d0: usize,
    d1: usize,
    outs: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    if let Some(d) = din[0].as_mut() {
        swap_dims(g, d, outs[0].shape, d0, d1);
    }
}

pub(crate) fn split_forward<T: Scalar>(
    dim: usize,
    sizes: &[usize],
    ins: &[Val<T>],
    outs: &mut [Vec<T>],
) {
    let (outer, d, inner) = split3(ins[0].shape, dim);
    let x = ins[0].data;
    let mut start = 0;
    for (o, &k) in outs.iter_mut().zip(sizes) {
        for r in 0..outer {
            let s = (r * d + start) * inner;
            o[r * k * inner..(r + 1) * k * inner].copy_from_slice(&x[s..s + k * inner]);
        }
        start += k;
    }
}

pub(crate) fn split_backward<T: Scalar>(
    dim: usize,
    sizes: &[usize],
    ins: &[Val<T>],
    gouts: &[Option<&[T]>],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dx) = din[0].as_mut() else { return };
    let (outer, d, inner) = split3(ins[0].shape, dim);
    let mut start = 0;
    for (g, &k) in gouts.iter().zip(sizes) {
        for r in 0..outer {
            let s = (r * d + start) * inner;
            let dst = &mut dx[s..s + k * inner];
            match g {
                Some(g) => dst.copy_from_slice(&g[r * k * inner..(r + 1) * k * inner]),
                None => dst.fill(T::ZERO),
            }
        }
        start += k;
    }
}

pub(crate) fn concat_forward<T: Scalar>(dim: usize, ins: &[Val<T>], out: &mut [T]) {
    let total: usize = ins.iter().map(|v| v.shape[dim]).sum();
    let (outer, _, inner) = split3(ins[0].shape, dim);
    let mut start = 0;
    for v in ins {
        let k = v.shape[dim];
        for r in 0..outer {
            let d = (r * total + start) * inner;
            out[d..d + k * inner].copy_from_slice(&v.data[r * k * inner..(r + 1) * k * inner]);
        }
        start += k;
    }
}

pub(crate) fn concat_backward<T: Scalar>(
    dim: usize,
    ins: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let total: usize = ins.iter().map(|v| v.shape[dim]).sum();
    let (outer, _, inner) = split3(ins[0].shape, dim);
    let mut start = 0;
    for (v, d) in ins.iter().zip(din.iter_mut()) {
        let k = v.shape[dim];
        if let Some(d) = d.as_mut() {
            for r in 0..outer {
                let s = (r * total + start) * inner;
                d[r * k * inner..(r + 1) * k * inner].copy_from_slice(&g[s..s + k * inner]);
            }
        }
        start += k;
    }
}

pub(crate) fn sum_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T], mean: bool) {
    let x = ins[0].data;
    let partial: Vec<T> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().copied().sum::<T>())
        .collect();
    let s: T = partial.into_iter().sum();
    out[0] = if mean { s / T::from_usize(x.len()) } else { s };
}

pub(crate) fn sum_backward<T: Scalar>(
    ins: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
    mean: bool,
) {
    if let Some(d) = din[0].as_mut() {
        let v = if mean {
            g[0] / T::from_usize(numel(ins[0].shape))
        } else {
            g[0]
        };
        d.fill(v);
    }
}
