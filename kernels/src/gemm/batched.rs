//! Strided-batched tensor-core GEMM: the shipped v2 kernel ([`super::ptx`], 128 x 128 x 32
//! block tile, 8 warps of 64 x 32, 4-stage `cp.async` pipeline, `mma.sync.m16n8k16`) with
//! three more parameters. For every `z < batch`,
//! `C[z] = act(alpha op(A[z]) op(B[z]) + beta C[z] + bias)`, `X[z]` starting `z * stride_x`
//! elements after `X` (a stride of 0 shares the operand). bf16 or f16 operands, f32
//! accumulation, C in the operand type or f32. One launch covers every `(batch, head)` of
//! attention: `Q K^T`, `P V` and the backward products ([`crate::simt_gemm::Batched`] has the
//! shapes).
//!
//! # Launch
//! Grid `(ceil(M / 128) ceil(N / 128), 1, batch)`: x walks the tiles of one problem in the
//! grouped raster of the unbatched kernel, z picks the problem; the only added instructions
//! offset A, B and C by `%ctaid.z * stride` before the tile setup. The 16-byte copy path is
//! decided per block from the offset base, so it needs `stride * size` to keep 16-byte
//! alignment as well (packed batches with `hs % 8 == 0` and `T % 8 == 0` do); other strides
//! take the element path, still correct.
//!
//! # Cost
//! `2 M N K batch` FLOPs; `batch (2 (M K + K N) + s_out M N)` bytes at least (+ C when
//! `beta != 0`). Attention products are small per head (`T x T x hs`), so the batch in z is
//! what fills the GPU: with `T = 1024, hs = 64`, `Q K^T` is 64 tiles per head.

use super::ptx;
use super::{Op, V2_TILE, Version, tile::Tile};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// The tile of the batched kernels (the shipped v2 tile).
pub const TILE: Tile = V2_TILE;

/// Grid `(tiles of one problem, 1, batch)`.
pub fn geometry(p: &Problem) -> Geometry {
    let g = super::geometry_for(&TILE, p);
    Geometry {
        grid: (g.grid.0.max(1), 1, p.batch.max(1) as u32),
        ..g
    }
}

fn cost(p: &Problem, osz: u64) -> Cost {
    let b = p.batch.max(1);
    Cost {
        flops: 2 * p.m * p.n * p.k * b,
        bytes: b * (2 * (p.m * p.k + p.k * p.n) + osz * p.m * p.n),
    }
}
fn cost_out16(p: &Problem) -> Cost {
    cost(p, 2)
}
fn cost_out32(p: &Problem) -> Cost {
    cost(p, 4)
}

/// The parameter list of a strided-batched GEMM (shared with the SIMT GEMM, which takes the
/// same parameters).
pub(crate) const fn args(input: Elem, output: Elem) -> [Arg; 16] {
    [
        arg("a", ArgKind::In(input)),
        arg("b", ArgKind::In(input)),
        arg("c", ArgKind::Out(output)),
        arg("bias", ArgKind::In(input)),
        arg("m", ArgKind::U32),
        arg("n", ArgKind::U32),
        arg("k", ArgKind::U32),
        arg("lda", ArgKind::U32),
        arg("ldb", ArgKind::U32),
        arg("ldc", ArgKind::U32),
        arg("alpha", ArgKind::F32),
        arg("beta", ArgKind::F32),
        arg("flags", ArgKind::U32),
        arg("stride_a", ArgKind::U64),
        arg("stride_b", ArgKind::U64),
        arg("stride_c", ArgKind::U64),
    ]
}
const ARGS_BF16_BF16: [Arg; 16] = args(Elem::BF16, Elem::BF16);
const ARGS_BF16_F32: [Arg; 16] = args(Elem::BF16, Elem::F32);
const ARGS_F16_F16: [Arg; 16] = args(Elem::F16, Elem::F16);
const ARGS_F16_F32: [Arg; 16] = args(Elem::F16, Elem::F32);

/// The entry name: `lathe_gemm_batched_v2_{op_a}{op_b}_{input}_{output}`.
pub fn entry_name(op_a: Op, op_b: Op, input: Elem, output: Elem) -> String {
    format!(
        "lathe_gemm_batched_v{}_{}{}_{}_{}",
        Version::V2.number(),
        op_a.letter(),
        op_b.letter(),
        input.name(),
        output.name()
    )
}

fn module_ptx(input: Elem) -> Cow<'static, str> {
    let mut specs = Vec::new();
    for (op_a, op_b) in [
        (Op::N, Op::N),
        (Op::N, Op::T),
        (Op::T, Op::N),
        (Op::T, Op::T),
    ] {
        for output in [input, Elem::F32] {
            specs.push(ptx::Spec {
                entry: entry_name(op_a, op_b, input, output),
                tile: TILE,
                op_a,
                op_b,
                input,
                output,
                batched: true,
            });
        }
    }
    Cow::Owned(ptx::module(&specs))
}
fn ptx_bf16() -> Cow<'static, str> {
    module_ptx(Elem::BF16)
}
fn ptx_f16() -> Cow<'static, str> {
    module_ptx(Elem::F16)
}

/// PTX module `gemm_batched_v2_bf16`.
pub static MODULE_BF16: Module = Module {
    name: "gemm_batched_v2_bf16",
    target: Target::Sm80,
    ptx: ptx_bf16,
};
/// PTX module `gemm_batched_v2_f16`.
pub static MODULE_F16: Module = Module {
    name: "gemm_batched_v2_f16",
    target: Target::Sm80,
    ptx: ptx_f16,
};

macro_rules! descs {
    ($( $name:ident = $entry:literal, $module:ident, $a:ident, $b:ident, $in:ident, $out:ident,
        $args:ident, $cost:ident; )*) => {
        $(
            #[doc = concat!("`", $entry, "`.")]
            pub static $name: KernelDesc = KernelDesc {
                entry: $entry,
                module: &$module,
                args: &$args,
                geometry,
                cost: $cost,
                summary: "C[z] = act(alpha op(A[z]) op(B[z]) + beta C[z] + bias), tensor cores, batched",
            };
        )*
        /// Every batched tensor-core kernel with its (op_a, op_b, input, output).
        pub static TABLE: &[(Op, Op, Elem, Elem, &KernelDesc)] = &[
            $( (Op::$a, Op::$b, Elem::$in, Elem::$out, &$name), )*
        ];
    };
}

descs! {
    NN_BF16_BF16 = "lathe_gemm_batched_v2_nn_bf16_bf16", MODULE_BF16, N, N, BF16, BF16,
        ARGS_BF16_BF16, cost_out16;
    NN_BF16_F32 = "lathe_gemm_batched_v2_nn_bf16_f32", MODULE_BF16, N, N, BF16, F32,
        ARGS_BF16_F32, cost_out32;
    NT_BF16_BF16 = "lathe_gemm_batched_v2_nt_bf16_bf16", MODULE_BF16, N, T, BF16, BF16,
        ARGS_BF16_BF16, cost_out16;
    NT_BF16_F32 = "lathe_gemm_batched_v2_nt_bf16_f32", MODULE_BF16, N, T, BF16, F32,
        ARGS_BF16_F32, cost_out32;
    TN_BF16_BF16 = "lathe_gemm_batched_v2_tn_bf16_bf16", MODULE_BF16, T, N, BF16, BF16,
        ARGS_BF16_BF16, cost_out16;
    TN_BF16_F32 = "lathe_gemm_batched_v2_tn_bf16_f32", MODULE_BF16, T, N, BF16, F32,
        ARGS_BF16_F32, cost_out32;
    TT_BF16_BF16 = "lathe_gemm_batched_v2_tt_bf16_bf16", MODULE_BF16, T, T, BF16, BF16,
        ARGS_BF16_BF16, cost_out16;
    TT_BF16_F32 = "lathe_gemm_batched_v2_tt_bf16_f32", MODULE_BF16, T, T, BF16, F32,
        ARGS_BF16_F32, cost_out32;
    NN_F16_F16 = "lathe_gemm_batched_v2_nn_f16_f16", MODULE_F16, N, N, F16, F16,
        ARGS_F16_F16, cost_out16;
    NN_F16_F32 = "lathe_gemm_batched_v2_nn_f16_f32", MODULE_F16, N, N, F16, F32,
        ARGS_F16_F32, cost_out32;
    NT_F16_F16 = "lathe_gemm_batched_v2_nt_f16_f16", MODULE_F16, N, T, F16, F16,
        ARGS_F16_F16, cost_out16;
    NT_F16_F32 = "lathe_gemm_batched_v2_nt_f16_f32", MODULE_F16, N, T, F16, F32,
        ARGS_F16_F32, cost_out32;
    TN_F16_F16 = "lathe_gemm_batched_v2_tn_f16_f16", MODULE_F16, T, N, F16, F16,
        ARGS_F16_F16, cost_out16;
    TN_F16_F32 = "lathe_gemm_batched_v2_tn_f16_f32", MODULE_F16, T, N, F16, F32,
        ARGS_F16_F32, cost_out32;
    TT_F16_F16 = "lathe_gemm_batched_v2_tt_f16_f16", MODULE_F16, T, T, F16, F16,
        ARGS_F16_F16, cost_out16;
    TT_F16_F32 = "lathe_gemm_batched_v2_tt_f16_f32", MODULE_F16, T, T, F16, F32,
        ARGS_F16_F32, cost_out32;
}

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    vec![&MODULE_BF16, &MODULE_F16]
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    TABLE.iter().map(|r| r.4).collect()
}

/// The kernel for a storage and element types (`input` bf16 / f16, `output` the input type or
/// f32).
pub fn kernel_for(op_a: Op, op_b: Op, input: Elem, output: Elem) -> Option<&'static KernelDesc> {
    TABLE
        .iter()
        .find(|r| r.0 == op_a && r.1 == op_b && r.2 == input && r.3 == output)
        .map(|r| r.4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_match_the_table_and_the_ptx() {
        for &(a, b, i, o, k) in TABLE {
            assert_eq!(k.entry, entry_name(a, b, i, o));
            let ptx = (k.module.ptx)();
            assert!(ptx.contains(&format!(".entry {}(", k.entry)), "{}", k.entry);
            assert!(ptx.contains("%ctaid.z"));
        }
        assert_eq!(TABLE.len(), 16);
        let g = geometry(&Problem {
            m: 300,
            n: 130,
            k: 7,
            batch: 12,
        });
        assert_eq!(g.grid, (6, 1, 12));
    }
}
