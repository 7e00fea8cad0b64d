//! Fused causal self-attention (a fused op with its own backward).
//!
//! Input `qkv` `(B, T, 3C)` is the output of the `c_attn` projection: for head `h`, queries are
//! columns `h*hs ..`, keys `C + h*hs ..`, values `2C + h*hs ..` (`hs = C / n_head`), read in place
//! through strided GEMMs. Per (b, h):
//!
//! ```text
//! S = Q K^T / sqrt(hs)                  (T, T)
//! P = softmax(S masked to j <= t)       (T, T) computed in f32, stored rounded (see autocast)
//! O = P V                               (T, hs) -> out[b, :, h*hs ..]
//! ```
//!
//! Saved for the backward: `qkv` and `P` (B, n_head, T, T), as llm.c's `att` buffer. Work is
//! split over the batch, one task per b, so every element has one fixed summation order.
//!
//! Causality is used to skip work: rows are processed in blocks of [`ROW_BLOCK`], and a block of
//! rows `r0..r1` only multiplies against keys/values `0..r1` (about half the FLOPs of the full
//! square for long sequences). In the backward, dK and dV sum the row blocks' contributions in
//! block order.

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Result, invalid, shape_err};
use crate::ops::gemm::{MatRef, gemm};
use crate::ops::par::{dot, max, sum};
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

impl<T: Scalar> Tape<T> {
    /// Causal multi-head self-attention on a fused `qkv` `(B, T, 3C)`; returns `(B, T, C)` in
    /// the compute dtype. `C` must be divisible by `n_head`.
    pub fn attention(&mut self, qkv: Var, n_head: usize) -> Result<Var> {
        let s = self.shape(qkv)?.to_vec();
        if s.len() != 3 || s[2] % 3 != 0 {
            return Err(shape_err(
                "attention",
                format!("qkv {s:?}, expected (B, T, 3C)"),
            ));
        }
        let (b, t, c) = (s[0], s[1], s[2] / 3);
        if n_head == 0 || c % n_head != 0 {
            return Err(invalid(
                "attention",
                format!("n_head {n_head} must be > 0 and divide the width {c}"),
            ));
        }
        let outs = vec![vec![b, t, c], vec![b, n_head, t, t]];
        Ok(self.record(Op::Attention { n_head }, &[qkv], outs)?[0])
    }
}

/// Rows per causal block.
pub(crate) const ROW_BLOCK: usize = 32;

/// The row blocks `(r0, r1)` of a sequence of length `t`.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(ROW_BLOCK)
        .map(move |r0| (r0, (r0 + ROW_BLOCK).min(t)))
}

pub(crate) fn attention_forward<T: Scalar>(
    dt: DType,
    n_head: usize,
    ins: &[Val<T>],
    outs: &mut [Vec<T>],
) {
    let (bsz, t, c3) = (ins[0].shape[0], ins[0].shape[1], ins[0].shape[2]);
    let c = c3 / 3;
    let hs = c / n_head;
    if bsz * t * c == 0 {
        return;
    }
    let qkv = ins[0].data;
    let scale = T::ONE / T::from_usize(hs).sqrt();
    let [out, probs] = outs else {
        unreachable!("attention has two outputs")
    };
    out.par_chunks_mut(t * c)
        .zip(probs.par_chunks_mut(n_head * t * t))
        .enumerate()
        .for_each(|(b, (out_b, probs_b))| {
            let base = b * t * c3;
            for h in 0..n_head {
                let p = &mut probs_b[h * t * t..(h + 1) * t * t];
                let q = MatRef::strided(qkv, base + h * hs, c3, 1);
                let k = MatRef::strided(qkv, base + c + h * hs, c3, 1);
                let v = MatRef::strided(qkv, base + 2 * c + h * hs, c3, 1);
                for (r0, r1) in row_blocks(t) {
                    // S[r0..r1, 0..r1] = Q[r0..r1] K[0..r1]^T
                    gemm(r1 - r0, hs, r1, q.at(r0, 0), k.t(), p, r0 * t, t, 1, false);
                    for i in r0..r1 {
                        let row = &mut p[i * t..(i + 1) * t];
                        // scale > 0, so max(x * scale) = max(x) * scale.
                        let m = max(&row[..=i]) * scale;
                        for x in &mut row[..=i] {
                            *x = (*x * scale - m).exp();
                        }
                        let inv = T::ONE / sum(&row[..=i]);
                        for x in &mut row[..=i] {
                            *x = (*x * inv).round_to(dt);
                        }
                        row[i + 1..].fill(T::ZERO);
                    }
                    // O[r0..r1] = P[r0..r1, 0..r1] V[0..r1]
                    let pm = MatRef::rm(&p[..], r0 * t, t);
                    gemm(r1 - r0, r1, hs, pm, v, out_b, r0 * c + h * hs, c, 1, false);
                }
            }
        });
}

pub(crate) fn attention_backward<T: Scalar>(
    n_head: usize,
    ins: &[Val<T>],
    outs: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dqkv) = din[0].as_mut() else { return };
    let (bsz, t, c3) = (ins[0].shape[0], ins[0].shape[1], ins[0].shape[2]);
    let c = c3 / 3;
    let hs = c / n_head;
    if bsz * t * c == 0 {
        dqkv.fill(T::ZERO);
        return;
    }
    let qkv = ins[0].data;
    let probs = outs[1].data;
    let scale = T::ONE / T::from_usize(hs).sqrt();
    dqkv.par_chunks_mut(t * c3).enumerate().for_each_init(
        || vec![T::ZERO; ROW_BLOCK.min(t) * t],
        |dp, (b, dq_b)| {
            let base = b * t * c3;
            // dK and dV are sums over row blocks: start from zero.
            for row in dq_b.chunks_mut(c3) {
                row[c..].fill(T::ZERO);
            }
            for h in 0..n_head {
                let p = &probs[(b * n_head + h) * t * t..(b * n_head + h + 1) * t * t];
                let q = MatRef::strided(qkv, base + h * hs, c3, 1);
                let k = MatRef::strided(qkv, base + c + h * hs, c3, 1);
                let v = MatRef::strided(qkv, base + 2 * c + h * hs, c3, 1);
                let dout = MatRef::strided(g, b * t * c + h * hs, c, 1);
                for (r0, r1) in row_blocks(t) {
                    let rows = r1 - r0;
                    // dP = dO[r0..r1] V[0..r1]^T, in dp (rows, r1) with row stride t
                    gemm(rows, hs, r1, dout.at(r0, 0), v.t(), dp, 0, t, 1, false);
                    // dS = P * (dP - rowsum(P * dP)) / sqrt(hs), zero above the diagonal
                    for i in r0..r1 {
                        let pr = &p[i * t..i * t + r1];
                        let dr = &mut dp[(i - r0) * t..(i - r0) * t + r1];
                        let dot = dot(&pr[..=i], &dr[..=i]);
                        for (d, &pv) in dr[..=i].iter_mut().zip(&pr[..=i]) {
                            *d = pv * (*d - dot) * scale;
                        }
                        dr[i + 1..].fill(T::ZERO);
                    }
                    let ds = MatRef::rm(&dp[..], 0, t);
                    let pb = MatRef::rm(p, r0 * t, t);
                    // dQ[r0..r1] = dS K[0..r1]
                    gemm(rows, r1, hs, ds, k, dq_b, r0 * c3 + h * hs, c3, 1, false);
                    // dK[0..r1] += dS^T Q[r0..r1];  dV[0..r1] += P[r0..r1, 0..r1]^T dO[r0..r1]
                    gemm(
                        r1,
                        rows,
                        hs,
                        ds.t(),
                        q.at(r0, 0),
                        dq_b,
                        c + h * hs,
                        c3,
                        1,
                        true,
                    );
                    gemm(
                        r1,
                        rows,
                        hs,
                        pb.t(),
                        dout.at(r0, 0),
                        dq_b,
                        2 * c + h * hs,
                        c3,
                        1,
                        true,
                    );
                }
            }
        },
    );
}
