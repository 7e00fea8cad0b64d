//! Fused layernorm (statistics saved) and softmax over the last dim.
//!
//! Both are fused ops with their own backward: layernorm keeps `mean` and `rstd` (f32, one per
//! row) so the backward does not recompute them; softmax keeps its output.

use rayon::prelude::*;

use crate::error::{Result, shape_err};
use crate::ops::par::{dot, max, rows_per_chunk, sum, sum_by};
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// Epsilon of GPT-2's layernorms.
pub const LAYERNORM_EPS: f64 = 1e-5;

impl<T: Scalar> Tape<T> {
    /// Layernorm over the last dim: `x` `(.., C)`, `w` and `b` `(C)`. Returns `y` `(.., C)` in
    /// the compute dtype. See [`Tape::layernorm_stats`] for the saved statistics.
    pub fn layernorm(&mut self, x: Var, w: Var, b: Var, eps: f64) -> Result<Var> {
        Ok(self.layernorm_stats(x, w, b, eps)?.0)
    }

    /// Layernorm returning `(y, mean, rstd)`; `mean` and `rstd` are `(..)` in f32 and carry no
    /// gradient.
    pub fn layernorm_stats(&mut self, x: Var, w: Var, b: Var, eps: f64) -> Result<(Var, Var, Var)> {
        let xs = self.shape(x)?.to_vec();
        let c = *xs
            .last()
            .ok_or_else(|| shape_err("layernorm", "x must have rank >= 1"))?;
        for (name, v) in [("weight", w), ("bias", b)] {
            let s = self.shape(v)?;
            if s != [c] {
                return Err(shape_err(
                    "layernorm",
                    format!("{name} {s:?}, expected [{c}]"),
                ));
            }
        }
        if eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(crate::error::invalid(
                "layernorm",
                format!("eps must be > 0, got {eps}"),
            ));
        }
        let stats = xs[..xs.len() - 1].to_vec();
        let v = self.record(
            Op::LayerNorm { eps },
            &[x, w, b],
            vec![xs, stats.clone(), stats],
        )?;
        Ok((v[0], v[1], v[2]))
    }

    /// Softmax over the last dim, output in f32.
    pub fn softmax(&mut self, x: Var) -> Result<Var> {
        let xs = self.shape(x)?.to_vec();
        if xs.is_empty() {
            return Err(shape_err("softmax", "x must have rank >= 1"));
        }
        Ok(self.record(Op::Softmax, &[x], vec![xs])?[0])
    }
}

pub(crate) fn layernorm_forward<T: Scalar>(eps: T, ins: &[Val<T>], outs: &mut [Vec<T>]) {
    let (x, w, b) = (ins[0].data, ins[1].data, ins[2].data);
    let c = w.len();
    let inv_c = T::ONE / T::from_usize(c);
    let rpc = rows_per_chunk(c);
    let [y, mean, rstd] = outs else {
        unreachable!("layernorm has three outputs")
    };
    y.par_chunks_mut(rpc * c)
        .zip(mean.par_chunks_mut(rpc).zip(rstd.par_chunks_mut(rpc)))
        .zip(x.par_chunks(rpc * c))
        .for_each(|((y, (mean, rstd)), x)| {
            for (r, (yr, xr)) in y.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                let m = sum(xr) * inv_c;
                let v = sum_by(c, |j| (xr[j] - m) * (xr[j] - m)) * inv_c;
                let s = T::ONE / (v + eps).sqrt();
                for (((o, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = (xv - m) * s * wv + bv;
                }
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

pub(crate) fn layernorm_backward<T: Scalar>(
    ins: &[Val<T>],
    outs: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let x = ins[0].data;
    let c = *ins[0].shape.last().expect("rank checked");
    let w = ins[1].data;
    let (mean, rstd) = (outs[1].data, outs[2].data);
    let rows = mean.len();
    let inv_c = T::ONE / T::from_usize(c);
    let rpc = rows_per_chunk(c);
    let n_chunks = rows.div_ceil(rpc);
    // Per-chunk partial sums of dw and db, reduced in chunk order below.
    let need_wb = din[1].is_some() || din[2].is_some();
    let mut partial = vec![T::ZERO; if need_wb { n_chunks * 2 * c } else { 0 }];

    let chunk = |ci: usize, mut dx: Option<&mut [T]>, part: Option<&mut [T]>| {
        let r0 = ci * rpc;
        let r1 = (r0 + rpc).min(rows);
        let mut part = part;
        for r in r0..r1 {
            let xr = &x[r * c..(r + 1) * c];
            let gr = &g[r * c..(r + 1) * c];
            let (m, s) = (mean[r], rstd[r]);
            if let Some(dx) = dx.as_deref_mut() {
                let w = &w[..c];
                let sum_d = dot(gr, w) * inv_c;
                let sum_dx = sum_by(c, |j| gr[j] * w[j] * ((xr[j] - m) * s)) * inv_c;
                let dxr = &mut dx[(r - r0) * c..(r - r0 + 1) * c];
                for j in 0..c {
                    let xhat = (xr[j] - m) * s;
                    dxr[j] = (gr[j] * w[j] - sum_d - xhat * sum_dx) * s;
                }
            }
            if let Some(p) = part.as_deref_mut() {
                let (pw, pb) = p.split_at_mut(c);
                for j in 0..c {
                    pw[j] += gr[j] * (xr[j] - m) * s;
                    pb[j] += gr[j];
                }
            }
        }
    };

    match (din[0].as_mut(), need_wb) {
        (Some(dx), true) => dx
            .par_chunks_mut(rpc * c)
            .zip(partial.par_chunks_mut(2 * c))
            .enumerate()
            .for_each(|(ci, (dx, p))| chunk(ci, Some(dx), Some(p))),
        (Some(dx), false) => dx
            .par_chunks_mut(rpc * c)
            .enumerate()
            .for_each(|(ci, dx)| chunk(ci, Some(dx), None)),
        (None, true) => partial
            .par_chunks_mut(2 * c)
            .enumerate()
            .for_each(|(ci, p)| chunk(ci, None, Some(p))),
        (None, false) => {}
    }
    if need_wb {
        let mut dw = vec![T::ZERO; c];
        let mut db = vec![T::ZERO; c];
        for p in partial.chunks(2 * c) {
            for j in 0..c {
                dw[j] += p[j];
                db[j] += p[c + j];
            }
        }
        if let Some(d) = din[1].as_mut() {
            d.copy_from_slice(&dw);
        }
        if let Some(d) = din[2].as_mut() {
            d.copy_from_slice(&db);
        }
    }
}

pub(crate) fn softmax_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    let c = *ins[0].shape.last().expect("rank checked");
    if c == 0 {
        return;
    }
    let rpc = rows_per_chunk(c);
    out.par_chunks_mut(rpc * c)
        .zip(ins[0].data.par_chunks(rpc * c))
        .for_each(|(y, x)| {
            for (yr, xr) in y.chunks_mut(c).zip(x.chunks(c)) {
                let m = max(xr);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - m).exp();
                }
                let inv = T::ONE / sum(yr);
                for o in yr.iter_mut() {
                    *o *= inv;
                }
            }
        });
}

pub(crate) fn softmax_backward<T: Scalar>(outs: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    let Some(dx) = din[0].as_mut() else { return };
    let c = *outs[0].shape.last().expect("rank checked");
    if c == 0 {
        return;
    }
    let rpc = rows_per_chunk(c);
    dx.par_chunks_mut(rpc * c)
        .zip(outs[0].data.par_chunks(rpc * c).zip(g.par_chunks(rpc * c)))
        .for_each(|(dx, (y, g))| {
            for ((dr, yr), gr) in dx.chunks_mut(c).zip(y.chunks(c)).zip(g.chunks(c)) {
                let dot = dot(yr, gr);
                for ((d, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = y * (g - dot);
                }
            }
        });
}
