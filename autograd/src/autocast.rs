//! The autocast policy: in which dtype each op stores its outputs.
//!
//! The tape has a compute dtype (`f32`, `bf16` or `f16`). On the GPU, tensors that feed matmuls
//! or make up the residual stream are stored in that dtype; numerically delicate results stay in
//! f32. The CPU reference computes everything in f32 (or f64) and rounds outputs to the storage
//! dtype below, so it produces what the GPU stores. This table is the only place the policy is
//! decided; the tape applies it when an op's outputs are written.
//!
//! | op                                   | output(s)                       | stored as       |
//! |--------------------------------------|---------------------------------|-----------------|
//! | matmul, linear (bias fused)          | product                         | compute dtype   |
//! | add, mul, scale, bias_add            | result (residual stream)        | compute dtype   |
//! | gelu, relu                           | activation                      | compute dtype   |
//! | layernorm                            | y                               | compute dtype   |
//! | layernorm                            | mean, rstd (statistics)         | f32             |
//! | softmax                              | probabilities                   | f32             |
//! | attention (fused)                    | output                          | compute dtype   |
//! | attention (fused)                    | probabilities P                 | compute dtype * |
//! | embedding                            | rows of the table               | table's dtype   |
//! | cross_entropy (fused)                | loss, per-row logsumexp         | f32             |
//! | sum, mean                            | scalar                          | f32             |
//! | reshape, transpose, split, concat    | moved values                    | input's dtype   |
//!
//! \* P is computed in f32 and rounded before it multiplies V, as a fused attention kernel casts
//! P to the operand type of its second matmul; the backward reads the same rounded P.
//!
//! Gradients are stored in the dtype of the value they belong to (an activation gradient of a
//! bf16 activation is bf16), except parameter gradients, which accumulate in f32.
//!
//! In f64 mode (gradient checks) "f32" storage is exact: see [`crate::scalar`].

use crate::dtype::DType;
use crate::ops::Op;

/// Storage class of one op output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// The tape's compute dtype.
    Compute,
    /// Always f32.
    F32,
    /// The dtype of the op's first input (data movement keeps the type).
    Input,
}

/// The storage class of output `k` of `op` (the table above).
pub(crate) fn output_store(op: &Op, k: usize) -> Store {
    match op {
        Op::Leaf => Store::Input,
        Op::Matmul { .. }
        | Op::Linear
        | Op::Add
        | Op::Mul
        | Op::Scale(_)
        | Op::BiasAdd
        | Op::Gelu
        | Op::Relu => Store::Compute,
        Op::LayerNorm { .. } => {
            if k == 0 {
                Store::Compute
            } else {
                Store::F32
            }
        }
        Op::Softmax => Store::F32,
        Op::Attention { .. } => Store::Compute,
        Op::FlashAttention { .. } => {
            if k == 0 {
                Store::Compute
            } else {
                Store::F32
            }
        }
        Op::Embedding { .. } => Store::Input,
        Op::CrossEntropy { .. } | Op::Sum | Op::Mean => Store::F32,
        Op::Reshape | Op::Transpose { .. } | Op::Split { .. } | Op::Concat { .. } => Store::Input,
    }
}

/// Resolves a storage class to a dtype.
pub(crate) fn resolve(store: Store, compute: DType, first_input: DType) -> DType {
    match store {
        Store::Compute => compute,
        Store::F32 => DType::F32,
        Store::Input => first_input,
    }
}
