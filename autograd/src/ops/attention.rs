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
//! The flash variant ([`AttentionPath::Flash`], op `flash_attention`) keeps `qkv`, the output
//! and the log-sum-exp `(B, n_head, T)` instead of `P`; its backward recomputes `P`. On a
//! device it runs the fused kernels; on the CPU it recomputes `P` with the same operations as
//! the forward, so both variants give the same bits there.
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
        if self.flash_attention(c / n_head)? {
            let outs = vec![vec![b, t, c], vec![b, n_head, t]];
            let op = Op::FlashAttention {
                n_head,
                dt: self.dtype,
            };
            return Ok(self.record(op, &[qkv], outs)?[0]);
        }
        let outs = vec![vec![b, t, c], vec![b, n_head, t, t]];
        Ok(self.record(Op::Attention { n_head }, &[qkv], outs)?[0])
    }

    /// How [`Tape::attention`] runs from now on (see [`AttentionPath`]).
    pub fn set_attention_path(&mut self, path: AttentionPath) {
        self.attention_path = path;
    }

    /// The current [`AttentionPath`].
    pub fn attention_path(&self) -> AttentionPath {
        self.attention_path
    }

    /// Whether an attention with head size `hs` records the flash variant.
    fn flash_attention(&self, hs: usize) -> Result<bool> {
        let on_device = self.dev.is_some();
        let unsupported = || crate::device::flash_attention_unsupported(self.dtype, hs);
        match self.attention_path {
            AttentionPath::Materialized => Ok(false),
            AttentionPath::Auto => Ok(on_device && unsupported().is_none()),
            AttentionPath::Flash => match unsupported() {
                Some(why) if on_device => Err(invalid(
                    "attention",
                    format!(
                        "the flash path was asked for, but the device kernels do not take {why}"
                    ),
                )),
                _ => Ok(true),
            },
        }
    }
}

/// Which attention [`Tape::attention`] records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionPath {
    /// The default: `Flash` on a device where the kernels take the shape, `Materialized`
    /// otherwise (the CPU reference).
    #[default]
    Auto,
    /// The probabilities `P (B, nh, T, T)` are an output kept for the backward (llm.c's `att`
    /// buffer); on a device, batched products around a masked softmax kernel.
    Materialized,
    /// Only the log-sum-exp `(B, nh, T)` f32 is kept and the backward recomputes the
    /// probabilities; on a device, the fused kernels (`lathe_kernels::nn::flash`), which take
    /// bf16/f16 with head sizes that are multiples of 8 up to 64 (asking for other shapes on a
    /// device is an error). On the CPU the same results as `Materialized`, bit for bit, with
    /// one `T x T` scratch per task instead of the whole tensor.
    Flash,
}

/// Rows per causal block.
pub(crate) const ROW_BLOCK: usize = 32;

/// The row blocks `(r0, r1)` of a sequence of length `t`.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(ROW_BLOCK)
        .map(move |r0| (r0, (r0 + ROW_BLOCK).min(t)))
}

/// Shape of one call: batch, sequence, width `C`, heads, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    hs: usize,
}

fn dims(qkv_shape: &[usize], n_head: usize) -> Dims {
    let (b, t, c) = (qkv_shape[0], qkv_shape[1], qkv_shape[2] / 3);
    Dims {
        b,
        t,
        c,
        hs: c / n_head,
    }
}

/// The probabilities `P (t, t)` of head `h` of the batch entry whose qkv rows start at `base`:
/// rounded to `dt`, zero above the diagonal; with `lse`, also the natural log-sum-exp of each
/// scaled score row (before rounding). Row blocks as in the module docs.
#[allow(clippy::too_many_arguments)]
fn head_probs<T: Scalar>(
    qkv: &[T],
    base: usize,
    d: Dims,
    h: usize,
    scale: T,
    dt: DType,
    p: &mut [T],
    mut lse: Option<&mut [T]>,
) {
    let (t, c3) = (d.t, 3 * d.c);
    let q = MatRef::strided(qkv, base + h * d.hs, c3, 1);
    let k = MatRef::strided(qkv, base + d.c + h * d.hs, c3, 1);
    for (r0, r1) in row_blocks(t) {
        // S[r0..r1, 0..r1] = Q[r0..r1] K[0..r1]^T
        gemm(
            r1 - r0,
            d.hs,
            r1,
            q.at(r0, 0),
            k.t(),
            p,
            r0 * t,
            t,
            1,
            false,
        );
        for i in r0..r1 {
            let row = &mut p[i * t..(i + 1) * t];
            // scale > 0, so max(x * scale) = max(x) * scale.
            let m = max(&row[..=i]) * scale;
            for x in &mut row[..=i] {
                *x = (*x * scale - m).exp();
            }
            let total = sum(&row[..=i]);
            if let Some(l) = lse.as_deref_mut() {
                l[i] = m + total.ln();
            }
            let inv = T::ONE / total;
            for x in &mut row[..=i] {
                *x = (*x * inv).round_to(dt);
            }
            row[i + 1..].fill(T::ZERO);
        }
    }
}

/// `O = P V` for head `h` into `out_b` (the batch entry's `(t, C)` output).
fn head_output<T: Scalar>(qkv: &[T], base: usize, d: Dims, h: usize, p: &[T], out_b: &mut [T]) {
    let v = MatRef::strided(qkv, base + 2 * d.c + h * d.hs, 3 * d.c, 1);
    for (r0, r1) in row_blocks(d.t) {
        // O[r0..r1] = P[r0..r1, 0..r1] V[0..r1]
        let pm = MatRef::rm(p, r0 * d.t, d.t);
        gemm(
            r1 - r0,
            r1,
            d.hs,
            pm,
            v,
            out_b,
            r0 * d.c + h * d.hs,
            d.c,
            1,
            false,
        );
    }
}

pub(crate) fn attention_forward<T: Scalar>(
    dt: DType,
    n_head: usize,
    ins: &[Val<T>],
    outs: &mut [Vec<T>],
) {
    let d = dims(ins[0].shape, n_head);
    if d.b * d.t * d.c == 0 {
        return;
    }
    let qkv = ins[0].data;
    let scale = T::ONE / T::from_usize(d.hs).sqrt();
    let [out, probs] = outs else {
        unreachable!("attention has two outputs")
    };
    out.par_chunks_mut(d.t * d.c)
        .zip(probs.par_chunks_mut(n_head * d.t * d.t))
        .enumerate()
        .for_each(|(b, (out_b, probs_b))| {
            let base = b * d.t * 3 * d.c;
            for h in 0..n_head {
                let p = &mut probs_b[h * d.t * d.t..(h + 1) * d.t * d.t];
                head_probs(qkv, base, d, h, scale, dt, p, None);
                head_output(qkv, base, d, h, p, out_b);
            }
        });
}

/// The flash variant's forward: `y` and `lse (B, nh, T)`; the probabilities live one head at
/// a time in a `T x T` scratch per task.
pub(crate) fn flash_forward<T: Scalar>(
    dt: DType,
    n_head: usize,
    ins: &[Val<T>],
    outs: &mut [Vec<T>],
) {
    let d = dims(ins[0].shape, n_head);
    if d.b * d.t * d.c == 0 {
        return;
    }
    let qkv = ins[0].data;
    let scale = T::ONE / T::from_usize(d.hs).sqrt();
    let [out, lse] = outs else {
        unreachable!("flash attention has two outputs")
    };
    out.par_chunks_mut(d.t * d.c)
        .zip(lse.par_chunks_mut(n_head * d.t))
        .enumerate()
        .for_each_init(
            || vec![T::ZERO; d.t * d.t],
            |p, (b, (out_b, lse_b))| {
                let base = b * d.t * 3 * d.c;
                for h in 0..n_head {
                    let l = &mut lse_b[h * d.t..(h + 1) * d.t];
                    head_probs(qkv, base, d, h, scale, dt, p, Some(l));
                    head_output(qkv, base, d, h, p, out_b);
                }
            },
        );
}

/// The flash variant's backward: the probabilities are recomputed exactly as the forward
/// computed them (same operations, same rounding), so its gradients are the materialised
/// op's bit for bit.
pub(crate) fn flash_backward<T: Scalar>(
    dt: DType,
    n_head: usize,
    ins: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dqkv) = din[0].as_mut() else { return };
    let d = dims(ins[0].shape, n_head);
    if d.b * d.t * d.c == 0 {
        dqkv.fill(T::ZERO);
        return;
    }
    let qkv = ins[0].data;
    let scale = T::ONE / T::from_usize(d.hs).sqrt();
    dqkv.par_chunks_mut(d.t * 3 * d.c)
        .enumerate()
        .for_each_init(
            || {
                (
                    vec![T::ZERO; d.t * d.t],
                    vec![T::ZERO; ROW_BLOCK.min(d.t) * d.t],
                )
            },
            |(p, dp), (b, dq_b)| {
                let base = b * d.t * 3 * d.c;
                for row in dq_b.chunks_mut(3 * d.c) {
                    row[d.c..].fill(T::ZERO);
                }
                for h in 0..n_head {
                    head_probs(qkv, base, d, h, scale, dt, p, None);
                    head_backward(qkv, g, b, d, h, scale, p, dp, dq_b);
                }
            },
        );
}

pub(crate) fn attention_backward<T: Scalar>(
    n_head: usize,
    ins: &[Val<T>],
    outs: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dqkv) = din[0].as_mut() else { return };
    let d = dims(ins[0].shape, n_head);
    if d.b * d.t * d.c == 0 {
        dqkv.fill(T::ZERO);
        return;
    }
    let qkv = ins[0].data;
    let probs = outs[1].data;
    let scale = T::ONE / T::from_usize(d.hs).sqrt();
    let t = d.t;
    dqkv.par_chunks_mut(t * 3 * d.c).enumerate().for_each_init(
        || vec![T::ZERO; ROW_BLOCK.min(t) * t],
        |dp, (b, dq_b)| {
            // dK and dV are sums over row blocks: start from zero.
            for row in dq_b.chunks_mut(3 * d.c) {
                row[d.c..].fill(T::ZERO);
            }
            for h in 0..n_head {
                let p = &probs[(b * n_head + h) * t * t..(b * n_head + h + 1) * t * t];
                head_backward(qkv, g, b, d, h, scale, p, dp, dq_b);
            }
        },
    );
}

/// The gradient of head `h` of batch entry `b` into `dq_b` (its `(t, 3C)` rows; dQ written,
/// dK and dV added), from the head's probabilities `p (t, t)`; `dp` is a row-block scratch.
#[allow(clippy::too_many_arguments)]
fn head_backward<T: Scalar>(
    qkv: &[T],
    g: &[T],
    b: usize,
    d: Dims,
    h: usize,
    scale: T,
    p: &[T],
    dp: &mut [T],
    dq_b: &mut [T],
) {
    let (t, c, c3, hs) = (d.t, d.c, 3 * d.c, d.hs);
    let base = b * t * c3;
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
