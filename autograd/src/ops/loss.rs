//! Fused cross-entropy on logits: softmax, loss and dlogits in one op with its own backward.
//!
//! The loss is the mean of `-log softmax(logits)[target]` over the rows whose target is not the
//! ignore index. Only the first `vocab` columns take part: columns `vocab..Vp` (vocabulary
//! padding) are excluded from the softmax and get zero gradient. The op saves one logsumexp per
//! row (f32) instead of the probabilities; the backward recomputes `exp(logit - lse)`.

use rayon::prelude::*;

use crate::error::{Error, Result, shape_err};
use crate::ops::par::{max, rows_per_chunk, sum_by};
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::numel;

/// Default target value that marks a position as padding / not scored.
pub const IGNORE_INDEX: u32 = u32::MAX;

impl<T: Scalar> Tape<T> {
    /// Mean cross-entropy of `logits` `(.., Vp)` against `targets` (one per row), over the
    /// first `vocab <= Vp` columns, skipping rows whose target is `ignore_index`. Returns a
    /// rank-0 f32 loss. With no scored row the loss is 0 and so are the gradients.
    pub fn cross_entropy(
        &mut self,
        logits: Var,
        targets: &[u32],
        vocab: usize,
        ignore_index: u32,
    ) -> Result<Var> {
        let ls = self.shape(logits)?.to_vec();
        let vp = *ls
            .last()
            .ok_or_else(|| shape_err("cross_entropy", "logits must have rank >= 1"))?;
        let rows = numel(&ls[..ls.len() - 1]);
        if rows != targets.len() {
            return Err(shape_err(
                "cross_entropy",
                format!(
                    "logits {ls:?} have {rows} rows but {} targets were given",
                    targets.len()
                ),
            ));
        }
        if vocab == 0 || vocab > vp {
            return Err(Error::Invalid {
                op: "cross_entropy",
                detail: format!("vocab {vocab} must be in 1..={vp} (the logits width)"),
            });
        }
        if let Some((pos, &t)) = targets
            .iter()
            .enumerate()
            .find(|&(_, &t)| t != ignore_index && t as usize >= vocab)
        {
            return Err(Error::Invalid {
                op: "cross_entropy",
                detail: format!(
                    "target {t} at position {pos} is not < vocab {vocab} (nor the ignore index)"
                ),
            });
        }
        let op = Op::CrossEntropy {
            targets: targets.to_vec(),
            vocab,
            ignore_index,
        };
        Ok(self.record(op, &[logits], vec![vec![], vec![rows]])?[0])
    }
}

fn scored(targets: &[u32], ignore: u32) -> usize {
    targets.iter().filter(|&&t| t != ignore).count()
}

pub(crate) fn cross_entropy_forward<T: Scalar>(
    targets: &[u32],
    vocab: usize,
    ignore: u32,
    ins: &[Val<T>],
    outs: &mut [Vec<T>],
) {
    let vp = *ins[0].shape.last().expect("rank checked");
    let logits = ins[0].data;
    let [loss, lse] = outs else {
        unreachable!("cross_entropy has two outputs")
    };
    let rpc = rows_per_chunk(vp);
    lse.par_chunks_mut(rpc)
        .zip(logits.par_chunks(rpc * vp))
        .for_each(|(lse, l)| {
            for (o, row) in lse.iter_mut().zip(l.chunks(vp)) {
                let row = &row[..vocab];
                let m = max(row);
                let s = sum_by(vocab, |j| (row[j] - m).exp());
                *o = m + s.ln();
            }
        });
    let mut total = T::ZERO;
    for (r, &t) in targets.iter().enumerate() {
        if t != ignore {
            total += lse[r] - logits[r * vp + t as usize];
        }
    }
    let n = scored(targets, ignore);
    loss[0] = if n == 0 {
        T::ZERO
    } else {
        total / T::from_usize(n)
    };
}

pub(crate) fn cross_entropy_backward<T: Scalar>(
    targets: &[u32],
    vocab: usize,
    ignore: u32,
    ins: &[Val<T>],
    outs: &[Val<T>],
    g: &[T],
    din: &mut [Option<Vec<T>>],
) {
    let Some(dl) = din[0].as_mut() else { return };
    let vp = *ins[0].shape.last().expect("rank checked");
    let (logits, lse) = (ins[0].data, outs[1].data);
    let n = scored(targets, ignore);
    let k = if n == 0 {
        T::ZERO
    } else {
        g[0] / T::from_usize(n)
    };
    let rpc = rows_per_chunk(vp);
    dl.par_chunks_mut(rpc * vp).enumerate().for_each(|(ci, d)| {
        for (i, drow) in d.chunks_mut(vp).enumerate() {
            let r = ci * rpc + i;
            let t = targets[r];
            if t == ignore || n == 0 {
                drow.fill(T::ZERO);
                continue;
            }
            let row = &logits[r * vp..(r + 1) * vp];
            let l = lse[r];
            for (d, &x) in drow[..vocab].iter_mut().zip(row) {
                *d = (x - l).exp() * k;
            }
            let t = t as usize;
            drow[t] = ((row[t] - l).exp() - T::ONE) * k;
            drow[vocab..].fill(T::ZERO);
        }
    });
}
