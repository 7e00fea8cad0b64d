//! Ops of the CPU reference backend.
//!
//! Each file holds, for its ops, the recording method on [`crate::Tape`] (shape checks, output
//! shapes), the forward kernel and, right under it, the backward kernel. This module is the
//! dispatch table the tape calls through.
//!
//! Kernel contracts:
//! - forward: `outs[k]` has `numel(out_shape[k])` elements with unspecified contents (buffers are
//!   recycled); the kernel overwrites every element. Rounding to the storage dtype is done by the
//!   tape afterwards (see [`crate::autocast`]), except inside fused ops where a rounded
//!   intermediate feeds later math (documented at the op).
//! - backward: `din[i]` is `Some(buffer)` exactly when input `i` needs a gradient; the kernel
//!   overwrites it with this op's contribution dL/d(input i). The tape adds contributions into
//!   the gradient of the input (activation gradients are written on first use and summed after,
//!   parameter gradients are added into the parameter store). Values the op did not ask to keep
//!   (see [`saved`]) are passed with empty data.
//!
//! Parallelism: kernels split work with rayon in chunks whose boundaries depend only on the
//! shapes, and no element's reduction order depends on the split, so results are bitwise
//! identical run to run, whatever the number of threads.

pub(crate) mod attention;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod gemm;
pub(crate) mod loss;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod par;
pub(crate) mod shape;

use crate::dtype::DType;
use crate::scalar::Scalar;

/// A recorded operation and its non-tensor arguments (enough to re-run its forward).
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// An input or a parameter: no forward, no backward.
    Leaf,
    Matmul {
        trans_a: bool,
        trans_b: bool,
    },
    /// `x @ w (+ b)`, `w` in Conv1D layout (in, out).
    Linear,
    Add,
    Mul,
    Scale(f64),
    BiasAdd,
    Gelu,
    Relu,
    LayerNorm {
        eps: f64,
    },
    Softmax,
    Attention {
        n_head: usize,
    },
    /// Attention keeping only the log-sum-exp (output 1); `dt` is the tape's compute dtype
    /// (the CPU backward recomputes the probabilities rounded to it).
    FlashAttention {
        n_head: usize,
        dt: DType,
    },
    Embedding {
        ids: Vec<u32>,
    },
    CrossEntropy {
        targets: Vec<u32>,
        vocab: usize,
        ignore_index: u32,
    },
    Reshape,
    Transpose {
        d0: usize,
        d1: usize,
    },
    Split {
        dim: usize,
        sizes: Vec<usize>,
    },
    Concat {
        dim: usize,
    },
    Sum,
    Mean,
}

impl Op {
    /// The op's name, as used in errors and kernel symbols.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Leaf => "leaf",
            Op::Matmul { .. } => "matmul",
            Op::Linear => "linear",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale(_) => "scale",
            Op::BiasAdd => "bias_add",
            Op::Gelu => "gelu",
            Op::Relu => "relu",
            Op::LayerNorm { .. } => "layernorm",
            Op::Softmax => "softmax",
            Op::Attention { .. } => "attention",
            Op::FlashAttention { .. } => "flash_attention",
            Op::Embedding { .. } => "embedding",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Reshape => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Split { .. } => "split",
            Op::Concat { .. } => "concat",
            Op::Sum => "sum",
            Op::Mean => "mean",
        }
    }
}

/// A value handed to a kernel. `data` is empty for values the backward did not ask to keep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Val<'a, T> {
    pub shape: &'a [usize],
    pub data: &'a [T],
}

/// Runs the forward kernel of `op`.
pub(crate) fn forward<T: Scalar>(op: &Op, dt: DType, ins: &[Val<T>], outs: &mut [Vec<T>]) {
    match op {
        Op::Leaf => {}
        Op::Matmul { trans_a, trans_b } => {
            matmul::matmul_forward(*trans_a, *trans_b, ins, &mut outs[0])
        }
        Op::Linear => matmul::linear_forward(ins, &mut outs[0]),
        Op::Add => elementwise::add_forward(ins, &mut outs[0]),
        Op::Mul => elementwise::mul_forward(ins, &mut outs[0]),
        Op::Scale(s) => elementwise::scale_forward(T::from_f64(*s), ins, &mut outs[0]),
        Op::BiasAdd => elementwise::bias_add_forward(ins, &mut outs[0]),
        Op::Gelu => elementwise::gelu_forward(ins, &mut outs[0]),
        Op::Relu => elementwise::relu_forward(ins, &mut outs[0]),
        Op::LayerNorm { eps } => norm::layernorm_forward(T::from_f64(*eps), ins, outs),
        Op::Softmax => norm::softmax_forward(ins, &mut outs[0]),
        Op::Attention { n_head } => attention::attention_forward(dt, *n_head, ins, outs),
        Op::FlashAttention { n_head, dt } => attention::flash_forward(*dt, *n_head, ins, outs),
        Op::Embedding { ids } => embedding::embedding_forward(ids, ins, &mut outs[0]),
        Op::CrossEntropy {
            targets,
            vocab,
            ignore_index,
        } => loss::cross_entropy_forward(targets, *vocab, *ignore_index, ins, outs),
        Op::Reshape => outs[0].copy_from_slice(ins[0].data),
        Op::Transpose { d0, d1 } => shape::transpose_forward(*d0, *d1, ins, &mut outs[0]),
        Op::Split { dim, sizes } => shape::split_forward(*dim, sizes, ins, outs),
        Op::Concat { dim } => shape::concat_forward(*dim, ins, &mut outs[0]),
        Op::Sum => shape::sum_forward(ins, &mut outs[0], false),
        Op::Mean => shape::sum_forward(ins, &mut outs[0], true),
    }
}

/// Runs the backward kernel of `op` (see the module doc for the contract).
pub(crate) fn backward<T: Scalar>(
    op: &Op,
    ins: &[Val<T>],
    outs: &[Val<T>],
    gouts: &[Option<&[T]>],
    din: &mut [Option<Vec<T>>],
) {
    let g0 = || gouts[0].expect("backward of a single-output op without its output gradient");
    match op {
        Op::Leaf => {}
        Op::Matmul { trans_a, trans_b } => {
            matmul::matmul_backward(*trans_a, *trans_b, ins, g0(), din)
        }
        Op::Linear => matmul::linear_backward(ins, g0(), din),
        Op::Add => elementwise::add_backward(g0(), din),
        Op::Mul => elementwise::mul_backward(ins, g0(), din),
        Op::Scale(s) => elementwise::scale_backward(T::from_f64(*s), g0(), din),
        Op::BiasAdd => elementwise::bias_add_backward(ins, g0(), din),
        Op::Gelu => elementwise::gelu_backward(ins, g0(), din),
        Op::Relu => elementwise::relu_backward(outs, g0(), din),
        Op::LayerNorm { .. } => norm::layernorm_backward(ins, outs, g0(), din),
        Op::Softmax => norm::softmax_backward(outs, g0(), din),
        Op::Attention { n_head } => attention::attention_backward(*n_head, ins, outs, g0(), din),
        Op::FlashAttention { n_head, dt } => {
            attention::flash_backward(*dt, *n_head, ins, g0(), din)
        }
        Op::Embedding { ids } => embedding::embedding_backward(ids, ins, g0(), din),
        Op::CrossEntropy {
            targets,
            vocab,
            ignore_index,
        } => loss::cross_entropy_backward(targets, *vocab, *ignore_index, ins, outs, g0(), din),
        Op::Reshape => {
            if let Some(d) = din[0].as_mut() {
                d.copy_from_slice(g0())
            }
        }
        Op::Transpose { d0, d1 } => shape::transpose_backward(*d0, *d1, outs, g0(), din),
        Op::Split { dim, sizes } => shape::split_backward(*dim, sizes, ins, gouts, din),
        Op::Concat { dim } => shape::concat_backward(*dim, ins, g0(), din),
        Op::Sum => shape::sum_backward(ins, g0(), din, false),
        Op::Mean => shape::sum_backward(ins, g0(), din, true),
    }
}

/// Which inputs and which outputs the backward of `op` reads, given which inputs need a
/// gradient. Everything else may be freed (or dropped for recomputation) before the backward.
pub(crate) fn saved(op: &Op, in_rg: &[bool], n_out: usize) -> (Vec<bool>, Vec<bool>) {
    let n_in = in_rg.len();
    let mut ins = vec![false; n_in];
    let mut outs = vec![false; n_out];
    match op {
        Op::Matmul { .. } | Op::Mul => {
            ins[0] = in_rg[1];
            ins[1] = in_rg[0];
        }
        Op::Linear => {
            ins[0] = in_rg[1];
            ins[1] = in_rg[0];
        }
        Op::Gelu => ins[0] = true,
        Op::Relu | Op::Softmax => outs[0] = true,
        Op::LayerNorm { .. } => {
            ins[0] = true;
            ins[1] = in_rg[0];
            outs[1] = true;
            outs[2] = true;
        }
        Op::Attention { .. } => {
            ins[0] = true;
            outs[1] = true;
        }
        Op::FlashAttention { .. } => {
            // The CPU backward needs only qkv; the device's reads y and the lse too.
            ins[0] = true;
            outs[0] = true;
            outs[1] = true;
        }
        Op::CrossEntropy { .. } => {
            ins[0] = true;
            outs[1] = true;
        }
        Op::Leaf
        | Op::Add
        | Op::Scale(_)
        | Op::BiasAdd
        | Op::Embedding { .. }
        | Op::Reshape
        | Op::Transpose { .. }
        | Op::Split { .. }
        | Op::Concat { .. }
        | Op::Sum
        | Op::Mean => {}
    }
    (ins, outs)
}

/// Whether output `k` of `op` carries gradients. Saved statistics (layernorm mean/rstd,
/// attention probabilities, the cross-entropy logsumexp) do not: using them downstream does
/// not differentiate through them.
pub(crate) fn differentiable_output(op: &Op, k: usize) -> bool {
    match op {
        Op::LayerNorm { .. }
        | Op::Attention { .. }
        | Op::FlashAttention { .. }
        | Op::CrossEntropy { .. } => k == 0,
        _ => true,
    }
}
