//! `matmul` (with transposes, batched) and `linear` (matmul + bias, Conv1D weight layout).
//!
//! Both run on matrixmultiply's sgemm/dgemm through [`crate::ops::gemm`]. A 2-D right operand
//! against a batched left operand is folded into one tall GEMM, so a weight gradient is one
//! reduction over all rows in a fixed order.

use rayon::prelude::*;

use crate::error::{Result, shape_err};
use crate::ops::gemm::{MatRef, gemm, par_gemm};
use crate::ops::par::col_sums;
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::numel;

/// Matmul problem size: `batch` products of (m, k) x (k, n).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MmDims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Whether b has the batch dims of a (else it is 2-D and shared).
    pub b_batched: bool,
}

pub(crate) fn mm_dims(
    a: &[usize],
    b: &[usize],
    ta: bool,
    tb: bool,
) -> Result<(MmDims, Vec<usize>)> {
    if a.len() < 2 || b.len() < 2 {
        return Err(shape_err(
            "matmul",
            format!("operands need rank >= 2, got {a:?} and {b:?}"),
        ));
    }
    let (ar, br) = (a.len(), b.len());
    let (m, ka) = if ta {
        (a[ar - 1], a[ar - 2])
    } else {
        (a[ar - 2], a[ar - 1])
    };
    let (kb, n) = if tb {
        (b[br - 1], b[br - 2])
    } else {
        (b[br - 2], b[br - 1])
    };
    if ka != kb {
        return Err(shape_err(
            "matmul",
            format!(
                "inner dims differ: a {a:?}{} and b {b:?}{} give k = {ka} vs {kb}",
                if ta { " (transposed)" } else { "" },
                if tb { " (transposed)" } else { "" }
            ),
        ));
    }
    let b_batched = br > 2;
    if b_batched && a[..ar - 2] != b[..br - 2] {
        return Err(shape_err(
            "matmul",
            format!(
                "batch dims differ: a {a:?} vs b {b:?} (b must be 2-D or share a's batch dims)"
            ),
        ));
    }
    let batch = numel(&a[..ar - 2]);
    let mut out = a[..ar - 2].to_vec();
    out.extend([m, n]);
    Ok((
        MmDims {
            batch,
            m,
            k: ka,
            n,
            b_batched,
        },
        out,
    ))
}

/// op(A_i) as an (m, k) view: a_i is stored (m, k), or (k, m) when transposed.
fn amat<T>(a: &[T], i: usize, d: MmDims, ta: bool) -> MatRef<'_, T> {
    let off = i * d.m * d.k;
    if ta {
        MatRef::rm(a, off, d.m).t()
    } else {
        MatRef::rm(a, off, d.k)
    }
}

/// op(B_i) as a (k, n) view.
fn bmat<T>(b: &[T], i: usize, d: MmDims, tb: bool) -> MatRef<'_, T> {
    let off = if d.b_batched { i * d.k * d.n } else { 0 };
    if tb {
        MatRef::rm(b, off, d.k).t()
    } else {
        MatRef::rm(b, off, d.n)
    }
}

impl<T: Scalar> Tape<T> {
    /// `op(a) @ op(b)`, where `op` transposes the last two dims when `trans_a` / `trans_b`.
    ///
    /// Shapes: `a` is `(batch.., M, K)` (`(batch.., K, M)` transposed); `b` is `(K, N)`
    /// (`(N, K)` transposed), shared by every batch entry, or has `a`'s batch dims. Output:
    /// `(batch.., M, N)` in the compute dtype.
    pub fn matmul(&mut self, a: Var, b: Var, trans_a: bool, trans_b: bool) -> Result<Var> {
        let (_, out) = mm_dims(self.shape(a)?, self.shape(b)?, trans_a, trans_b)?;
        Ok(self.record(Op::Matmul { trans_a, trans_b }, &[a, b], vec![out])?[0])
    }

    /// `x @ w + b`: `x` `(.., in)`, `w` `(in, out)` (Hugging Face Conv1D layout), `b` `(out)`.
    /// Output `(.., out)` in the compute dtype, bias added in full precision before rounding.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let xs = self.shape(x)?.to_vec();
        let ws = self.shape(w)?.to_vec();
        if xs.is_empty() || ws.len() != 2 || xs[xs.len() - 1] != ws[0] || ws.contains(&0) {
            return Err(shape_err(
                "linear",
                format!("x {xs:?} and w {ws:?}: expected x (.., in) and w (in, out), in, out > 0"),
            ));
        }
        let mut inputs = vec![x, w];
        if let Some(b) = b {
            let bs = self.shape(b)?;
            if bs != [ws[1]] {
                return Err(shape_err(
                    "linear",
                    format!("bias {bs:?}, expected [{}]", ws[1]),
                ));
            }
            inputs.push(b);
        }
        let mut out = xs.clone();
        *out.last_mut().expect("rank checked") = ws[1];
        Ok(self.record(Op::Linear, &inputs, vec![out])?[0])
    }
}

pub(crate) fn matmul_forward<T: Scalar>(ta: bool, tb: bool, ins: &[Val<T>], out: &mut [T]) {
    let (d, _) = mm_dims(ins[0].shape, ins[1].shape, ta, tb).expect("validated at record");
    let (a, b) = (ins[0].data, ins[1].data);
    if !d.b_batched && !ta {
        par_gemm(
            d.batch * d.m,
            d.k,
            d.n,
            MatRef::rm(a, 0, d.k),
            bmat(b, 0, d, tb),
            out,
            false,
        );
    } else {
        out.par_chunks_mut((d.m * d.n).max(1))
            .enumerate()
            .for_each(|(i, c)| {
                gemm(
                    d.m,
                    d.k,
                    d.n,
                    amat(a, i, d, ta),
                    bmat(b, i, d, tb),
                    c,
                    0,
                    d.n,
                    1,
                    false,
                );
            });
    }
}

pub(crate) fn matmul_backward<T: Scalar>(
    ta: bool,
    tb: bool,
    ins: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let (d, _) = mm_dims(ins[0].shape, ins[1].shape, ta, tb).expect("validated at record");
    let (a, b) = (ins[0].data, ins[1].data);
    let MmDims { batch, m, k, n, .. } = d;
    let (da, db) = din.split_at_mut(1);
    if let Some(da) = da[0].as_mut() {
        if !d.b_batched && !ta {
            // dA (batch*m, k) = dC (batch*m, n) . op(B)^T
            par_gemm(
                batch * m,
                n,
                k,
                MatRef::rm(g, 0, n),
                bmat(b, 0, d, tb).t(),
                da,
                false,
            );
        } else {
            da.par_chunks_mut((m * k).max(1))
                .enumerate()
                .for_each(|(i, dai)| {
                    let gi = MatRef::rm(g, i * m * n, n);
                    let bi = bmat(b, i, d, tb);
                    if ta {
                        // stored (k, m) = op(B_i) (k, n) . dC_i^T (n, m)
                        gemm(k, n, m, bi, gi.t(), dai, 0, m, 1, false);
                    } else {
                        gemm(m, n, k, gi, bi.t(), dai, 0, k, 1, false);
                    }
                });
        }
    }
    if let Some(db) = db[0].as_mut() {
        if d.b_batched {
            db.par_chunks_mut((k * n).max(1))
                .enumerate()
                .for_each(|(i, dbi)| {
                    let ai = amat(a, i, d, ta);
                    let gi = MatRef::rm(g, i * m * n, n);
                    if tb {
                        // stored (n, k) = dC_i^T (n, m) . op(A_i) (m, k)
                        gemm(n, m, k, gi.t(), ai, dbi, 0, k, 1, false);
                    } else {
                        gemm(k, m, n, ai.t(), gi, dbi, 0, n, 1, false);
                    }
                });
        } else if !ta {
            // One reduction over all batch*m rows.
            let (a_all, g_all) = (MatRef::rm(a, 0, k), MatRef::rm(g, 0, n));
            if tb {
                par_gemm(n, batch * m, k, g_all.t(), a_all, db, false);
            } else {
                par_gemm(k, batch * m, n, a_all.t(), g_all, db, false);
            }
        } else {
            // Shared b with a transposed a: sum over the batch in order.
            if batch == 0 {
                db.fill(T::ZERO);
            }
            for i in 0..batch {
                let ai = amat(a, i, d, ta);
                let gi = MatRef::rm(g, i * m * n, n);
                if tb {
                    par_gemm(n, m, k, gi.t(), ai, db, i > 0);
                } else {
                    par_gemm(k, m, n, ai.t(), gi, db, i > 0);
                }
            }
        }
    }
}

pub(crate) fn linear_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    let (x, w) = (ins[0], ins[1]);
    let (cin, cout) = (w.shape[0], w.shape[1]);
    let rows = x.data.len() / cin.max(1);
    par_gemm(
        rows,
        cin,
        cout,
        MatRef::rm(x.data, 0, cin),
        MatRef::rm(w.data, 0, cout),
        out,
        false,
    );
    if let Some(b) = ins.get(2) {
        let rpc = crate::ops::par::rows_per_chunk(cout);
        out.par_chunks_mut(rpc * cout).for_each(|chunk| {
            for row in chunk.chunks_mut(cout) {
                for (y, &bb) in row.iter_mut().zip(b.data) {
                    *y += bb;
                }
            }
        });
    }
}

pub(crate) fn linear_backward<T: Scalar>(ins: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    let (x, w) = (ins[0], ins[1]);
    let (cin, cout) = (w.shape[0], w.shape[1]);
    let rows = numel(x.shape) / cin.max(1);
    let gm = MatRef::rm(g, 0, cout);
    if let Some(dx) = din[0].as_mut() {
        // dx (rows, in) = dy (rows, out) . w^T
        par_gemm(
            rows,
            cout,
            cin,
            gm,
            MatRef::rm(w.data, 0, cout).t(),
            dx,
            false,
        );
    }
    if let Some(dw) = din[1].as_mut() {
        // dw (in, out) = x^T (in, rows) . dy (rows, out)
        par_gemm(
            cin,
            rows,
            cout,
            MatRef::rm(x.data, 0, cin).t(),
            gm,
            dw,
            false,
        );
    }
    if let Some(Some(db)) = din.get_mut(2) {
        col_sums(g, rows, cout, db);
    }
}
