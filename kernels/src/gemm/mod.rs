//! Tensor-core GEMM: `C = act(alpha * op(A) op(B) + beta * C + bias)` with bf16 or f16 operands,
//! f32 accumulation, and C in the operand type or f32. Hand-written PTX for sm_80+
//! (`mma.sync.m16n8k16`, `ldmatrix`, `cp.async`), printed by [`ptx`] for each tile shape.
//!
//! # Storage (all row-major) and the training products
//! | op | A is stored | B is stored |
//! |---|---|---|
//! | [`Op::N`] | `(M, K)`, K contiguous | `(K, N)`, N contiguous |
//! | [`Op::T`] | `(K, M)`, M contiguous | `(N, K)`, K contiguous |
//!
//! C is `(M, N)` row-major. With a GPT-2 (Conv1D) weight `W` stored `(in, out)`:
//! - forward `Y(M, out) = X(M, in) W`: A = X, B = W, `N N`, `k = in`;
//! - input gradient `dX(M, in) = dY(M, out) W^T`: A = dY, B = W, `N T`, `n = in`, `k = out`;
//! - weight gradient `dW(in, out) += X^T dY`: A = X, B = dY, `T N`, `m = in`, `n = out`,
//!   `k = M` (the batch rows), f32 C with `beta = 1`.
//!
//! # Any shape; the fast path
//! Any `m, n, k >= 0` work (tails are zero-filled in shared memory; rows and columns past C are
//! never written). Leading dimensions are in elements and may exceed the row length (views).
//! An operand takes the 16-byte `cp.async` path when its base address is 16-byte aligned and its
//! leading dimension is a multiple of 8 ([`fast_path`]); otherwise the kernel loads it element
//! by element (correct, several times slower). C is stored in pairs when its base is aligned to
//! two elements and `ldc` is even, element by element otherwise.
//!
//! # Versions (numbered, never overwritten; see NOTES.md for the numbers)
//! - v1: 64x64x32 block tile, 4 warps of 32x32, one shared stage (load, wait, compute).
//! - v2 (shipped): 128x128x32, 8 warps of 64x32, 4-stage `cp.async` pipeline (64 KiB shared),
//!   at most 128 registers so that two blocks share an SM.
//!
//! [`batched`] is v2 over a strided batch in one launch (grid z), for the attention products;
//! the SIMT f32-FMA kernel for f32 operands is [`crate::simt_gemm`].

pub mod batched;
pub mod epilogue;
pub mod ptx;
pub mod tile;
pub mod twin;

#[cfg(test)]
mod sim_tests;

use crate::desc::{
    Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg, div_ceil,
};
use std::borrow::Cow;
use tile::Tile;

pub use epilogue::{FLAG_BIAS, FLAG_GELU};

/// How an operand is stored (see the module docs' table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A stored `(M, K)`; B stored `(K, N)`.
    N,
    /// A stored `(K, M)` (A = stored^T); B stored `(N, K)` (B = stored^T).
    T,
}

impl Op {
    pub fn letter(self) -> &'static str {
        match self {
            Op::N => "n",
            Op::T => "t",
        }
    }
}

/// A numbered kernel version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The version [`Gemm`] launches use unless told otherwise.
    pub const SHIPPED: Version = Version::V2;
    pub const ALL: [Version; 2] = [Version::V1, Version::V2];

    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }

    pub fn tile(self) -> Tile {
        match self {
            Version::V1 => V1_TILE,
            Version::V2 => V2_TILE,
        }
    }
}

/// v1: one stage, small tile — the simple reference kernel.
pub const V1_TILE: Tile = Tile {
    bm: 64,
    bn: 64,
    bk: 32,
    warps_m: 2,
    warps_n: 2,
    stages: 1,
    group_m: 8,
    min_blocks: 0,
};

/// v2: 4-stage pipeline, 128x128 tile, 8 warps of 64x32.
pub const V2_TILE: Tile = Tile {
    bm: 128,
    bn: 128,
    bk: 32,
    warps_m: 2,
    warps_n: 4,
    stages: 4,
    group_m: 8,
    min_blocks: 2,
};

/// The largest `m`, `n`, `k` or leading dimension the kernels take (their index math is 32-bit
/// with headroom for one tile).
pub const MAX_DIM: usize = (1 << 31) - 1024;

/// Whether an operand at device address `addr` with leading dimension `ld` (elements) takes the
/// 16-byte copy path: `addr % 16 == 0` and `ld % 8 == 0`.
pub fn fast_path(addr: u64, ld: usize) -> bool {
    addr.is_multiple_of(16) && ld.is_multiple_of(8)
}

/// A GEMM problem: shapes, storage, scalars and the activation. The bias, when used, is a
/// separate length-`n` vector in the operand type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub op_a: Op,
    pub op_b: Op,
    /// Leading dimensions in elements; `None` means contiguous rows.
    pub lda: Option<usize>,
    pub ldb: Option<usize>,
    pub ldc: Option<usize>,
    pub alpha: f32,
    /// `0` writes C without reading it; anything else reads C first (`1` accumulates).
    pub beta: f32,
    /// GELU (tanh form) after alpha, beta and bias.
    pub gelu: bool,
}

/// Why a [`Gemm`] cannot be launched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GemmError {
    #[error("gemm: {what} = {value} exceeds the kernels' limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error(
        "gemm: leading dimension {what} = {ld} is smaller than the stored row length {cols} \
         ({operand} is stored ({rows}, {cols}) row-major)"
    )]
    LeadingDim {
        what: &'static str,
        operand: &'static str,
        ld: usize,
        rows: usize,
        cols: usize,
    },
}

impl Gemm {
    /// `C(m, n) = A(m, k) B(k, n)`, both `Op::N`, contiguous, alpha 1, beta 0, no activation.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            op_a: Op::N,
            op_b: Op::N,
            lda: None,
            ldb: None,
            ldc: None,
            alpha: 1.0,
            beta: 0.0,
            gelu: false,
        }
    }
    pub fn with_ops(mut self, op_a: Op, op_b: Op) -> Self {
        self.op_a = op_a;
        self.op_b = op_b;
        self
    }
    /// Explicit leading dimensions (elements) of the stored A, B and C.
    pub fn with_ld(mut self, lda: usize, ldb: usize, ldc: usize) -> Self {
        self.lda = Some(lda);
        self.ldb = Some(ldb);
        self.ldc = Some(ldc);
        self
    }
    pub fn with_alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }
    pub fn with_beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }
    pub fn with_gelu(mut self, gelu: bool) -> Self {
        self.gelu = gelu;
        self
    }

    /// (rows, cols) of A as stored.
    pub fn a_stored(&self) -> (usize, usize) {
        match self.op_a {
            Op::N => (self.m, self.k),
            Op::T => (self.k, self.m),
        }
    }
    /// (rows, cols) of B as stored.
    pub fn b_stored(&self) -> (usize, usize) {
        match self.op_b {
            Op::N => (self.k, self.n),
            Op::T => (self.n, self.k),
        }
    }
    pub fn lda(&self) -> usize {
        self.lda.unwrap_or(self.a_stored().1)
    }
    pub fn ldb(&self) -> usize {
        self.ldb.unwrap_or(self.b_stored().1)
    }
    pub fn ldc(&self) -> usize {
        self.ldc.unwrap_or(self.n)
    }

    fn min_len((rows, cols): (usize, usize), ld: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        }
    }
    /// Elements a buffer holding A must have.
    pub fn a_len(&self) -> usize {
        Self::min_len(self.a_stored(), self.lda())
    }
    pub fn b_len(&self) -> usize {
        Self::min_len(self.b_stored(), self.ldb())
    }
    pub fn c_len(&self) -> usize {
        Self::min_len((self.m, self.n), self.ldc())
    }

    /// Checks sizes and leading dimensions.
    pub fn validate(&self) -> Result<(), GemmError> {
        let dims = [
            ("m", self.m),
            ("n", self.n),
            ("k", self.k),
            ("lda", self.lda()),
            ("ldb", self.ldb()),
            ("ldc", self.ldc()),
        ];
        for (what, value) in dims {
            if value > MAX_DIM {
                return Err(GemmError::TooLarge {
                    what,
                    value,
                    limit: MAX_DIM,
                });
            }
        }
        let checks = [
            ("lda", "A", self.a_stored(), self.lda()),
            ("ldb", "B", self.b_stored(), self.ldb()),
            ("ldc", "C", (self.m, self.n), self.ldc()),
        ];
        for (what, operand, (rows, cols), ld) in checks {
            if ld < cols {
                return Err(GemmError::LeadingDim {
                    what,
                    operand,
                    ld,
                    rows,
                    cols,
                });
            }
        }
        Ok(())
    }

    /// The launch flags of the epilogue.
    pub fn flags(&self, bias: bool) -> u32 {
        (if bias { FLAG_BIAS } else { 0 }) | (if self.gelu { FLAG_GELU } else { 0 })
    }

    /// The descriptor problem size.
    pub fn problem(&self) -> Problem {
        Problem {
            n: self.n as u64,
            m: self.m as u64,
            k: self.k as u64,
            batch: 1,
        }
    }
}

/// A linear layer `y = x W + bias` with `W` stored `(inputs, outputs)` row-major (GPT-2's
/// Conv1D), and the three products of its training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    /// Rows of `x` (batch times sequence).
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl Linear {
    /// `y(rows, outputs) = x(rows, inputs) W(inputs, outputs)` (+ bias, GELU on request).
    pub fn forward(&self) -> Gemm {
        Gemm::new(self.rows, self.outputs, self.inputs)
    }
    /// `dx(rows, inputs) = dy(rows, outputs) W^T`: A = dy, B = W stored `(n, k)`.
    pub fn backward_input(&self) -> Gemm {
        Gemm::new(self.rows, self.inputs, self.outputs).with_ops(Op::N, Op::T)
    }
    /// `dW(inputs, outputs) (+)= x^T dy`: A = x stored `(k, m)`, B = dy; `accumulate` adds into
    /// the existing gradient (`beta = 1`).
    pub fn backward_weight(&self, accumulate: bool) -> Gemm {
        Gemm::new(self.inputs, self.outputs, self.rows)
            .with_ops(Op::T, Op::N)
            .with_beta(if accumulate { 1.0 } else { 0.0 })
    }
}

/// Grid, block and shared memory of a tile for a problem: one block per `bm x bn` tile of C.
pub fn geometry_for(t: &Tile, p: &Problem) -> Geometry {
    let blocks = div_ceil(p.m, t.bm as u64) * div_ceil(p.n, t.bn as u64);
    Geometry {
        grid: (blocks.min(u32::MAX as u64) as u32, 1, 1),
        block: (t.threads(), 1, 1),
        shared_bytes: t.shared_bytes(),
    }
}

fn geometry_v1(p: &Problem) -> Geometry {
    geometry_for(&V1_TILE, p)
}
fn geometry_v2(p: &Problem) -> Geometry {
    geometry_for(&V2_TILE, p)
}

/// `2 m n k` FLOPs; A and B read once (2 bytes an element), C written once. Reading C
/// (`beta != 0`) and the bias are not counted: the descriptor does not know about them.
fn cost(p: &Problem, out_size: u64) -> Cost {
    Cost {
        flops: 2 * p.m * p.n * p.k,
        bytes: 2 * (p.m * p.k + p.k * p.n) + out_size * p.m * p.n,
    }
}
fn cost_out16(p: &Problem) -> Cost {
    cost(p, 2)
}
fn cost_out32(p: &Problem) -> Cost {
    cost(p, 4)
}

/// The entry name: `lathe_gemm_v{version}_{op_a}{op_b}_{input}_{output}`.
pub fn entry_name(v: Version, op_a: Op, op_b: Op, input: Elem, output: Elem) -> String {
    format!(
        "lathe_gemm_v{}_{}{}_{}_{}",
        v.number(),
        op_a.letter(),
        op_b.letter(),
        input.name(),
        output.name()
    )
}

/// The two kernels of a module: C in the input type, and C in f32.
fn specs(v: Version, op_a: Op, op_b: Op, input: Elem) -> Vec<ptx::Spec> {
    [input, Elem::F32]
        .into_iter()
        .map(|output| ptx::Spec {
            entry: entry_name(v, op_a, op_b, input, output),
            tile: v.tile(),
            op_a,
            op_b,
            input,
            output,
            batched: false,
        })
        .collect()
}

const fn args(input: Elem, output: Elem) -> [Arg; 13] {
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
    ]
}
const ARGS_BF16_BF16: [Arg; 13] = args(Elem::BF16, Elem::BF16);
const ARGS_BF16_F32: [Arg; 13] = args(Elem::BF16, Elem::F32);
const ARGS_F16_F16: [Arg; 13] = args(Elem::F16, Elem::F16);
const ARGS_F16_F32: [Arg; 13] = args(Elem::F16, Elem::F32);

/// One module (version, storage, input type) with its two kernels (C in the input type, C in
/// f32). Entry names are spelled out so they can be grepped; a test checks them against
/// [`entry_name`].
macro_rules! family {
    ($( $module:ident, $ptx_fn:ident, $name:literal, $ver:ident, $geom:ident, $a:ident, $b:ident,
        $in:ident: $same:ident = $same_entry:literal, $same_args:ident;
                   $wide:ident = $wide_entry:literal, $wide_args:ident; )*) => {
        $(
            fn $ptx_fn() -> Cow<'static, str> {
                Cow::Owned(ptx::module(&specs(Version::$ver, Op::$a, Op::$b, Elem::$in)))
            }
            #[doc = concat!("PTX module `", $name, "`.")]
            pub static $module: Module = Module {
                name: $name,
                target: Target::Sm80,
                ptx: $ptx_fn,
            };
            #[doc = concat!("`", $same_entry, "`: C in the input type.")]
            pub static $same: KernelDesc = KernelDesc {
                entry: $same_entry,
                module: &$module,
                args: &$same_args,
                geometry: $geom,
                cost: cost_out16,
                summary: "C = act(alpha op(A) op(B) + beta C + bias), f32 accumulation",
            };
            #[doc = concat!("`", $wide_entry, "`: C in f32.")]
            pub static $wide: KernelDesc = KernelDesc {
                entry: $wide_entry,
                module: &$module,
                args: &$wide_args,
                geometry: $geom,
                cost: cost_out32,
                summary: "C = act(alpha op(A) op(B) + beta C + bias), f32 accumulation, f32 C",
            };
        )*
        /// Every GEMM module.
        pub static MODULES: &[&Module] = &[$(&$module),*];
        /// Every GEMM kernel with its (version, op_a, op_b, input, output).
        pub static TABLE: &[(Version, Op, Op, Elem, Elem, &KernelDesc)] = &[
            $(
                (Version::$ver, Op::$a, Op::$b, Elem::$in, Elem::$in, &$same),
                (Version::$ver, Op::$a, Op::$b, Elem::$in, Elem::F32, &$wide),
            )*
        ];
    };
}

family! {
    V1_NN_BF16, ptx_v1_nn_bf16, "gemm_v1_nn_bf16", V1, geometry_v1, N, N, BF16:
        V1_NN_BF16_BF16 = "lathe_gemm_v1_nn_bf16_bf16", ARGS_BF16_BF16;
        V1_NN_BF16_F32 = "lathe_gemm_v1_nn_bf16_f32", ARGS_BF16_F32;
    V1_NT_BF16, ptx_v1_nt_bf16, "gemm_v1_nt_bf16", V1, geometry_v1, N, T, BF16:
        V1_NT_BF16_BF16 = "lathe_gemm_v1_nt_bf16_bf16", ARGS_BF16_BF16;
        V1_NT_BF16_F32 = "lathe_gemm_v1_nt_bf16_f32", ARGS_BF16_F32;
    V1_TN_BF16, ptx_v1_tn_bf16, "gemm_v1_tn_bf16", V1, geometry_v1, T, N, BF16:
        V1_TN_BF16_BF16 = "lathe_gemm_v1_tn_bf16_bf16", ARGS_BF16_BF16;
        V1_TN_BF16_F32 = "lathe_gemm_v1_tn_bf16_f32", ARGS_BF16_F32;
    V1_TT_BF16, ptx_v1_tt_bf16, "gemm_v1_tt_bf16", V1, geometry_v1, T, T, BF16:
        V1_TT_BF16_BF16 = "lathe_gemm_v1_tt_bf16_bf16", ARGS_BF16_BF16;
        V1_TT_BF16_F32 = "lathe_gemm_v1_tt_bf16_f32", ARGS_BF16_F32;
    V1_NN_F16, ptx_v1_nn_f16, "gemm_v1_nn_f16", V1, geometry_v1, N, N, F16:
        V1_NN_F16_F16 = "lathe_gemm_v1_nn_f16_f16", ARGS_F16_F16;
        V1_NN_F16_F32 = "lathe_gemm_v1_nn_f16_f32", ARGS_F16_F32;
    V1_NT_F16, ptx_v1_nt_f16, "gemm_v1_nt_f16", V1, geometry_v1, N, T, F16:
        V1_NT_F16_F16 = "lathe_gemm_v1_nt_f16_f16", ARGS_F16_F16;
        V1_NT_F16_F32 = "lathe_gemm_v1_nt_f16_f32", ARGS_F16_F32;
    V1_TN_F16, ptx_v1_tn_f16, "gemm_v1_tn_f16", V1, geometry_v1, T, N, F16:
        V1_TN_F16_F16 = "lathe_gemm_v1_tn_f16_f16", ARGS_F16_F16;
        V1_TN_F16_F32 = "lathe_gemm_v1_tn_f16_f32", ARGS_F16_F32;
    V1_TT_F16, ptx_v1_tt_f16, "gemm_v1_tt_f16", V1, geometry_v1, T, T, F16:
        V1_TT_F16_F16 = "lathe_gemm_v1_tt_f16_f16", ARGS_F16_F16;
        V1_TT_F16_F32 = "lathe_gemm_v1_tt_f16_f32", ARGS_F16_F32;
    V2_NN_BF16, ptx_v2_nn_bf16, "gemm_v2_nn_bf16", V2, geometry_v2, N, N, BF16:
        V2_NN_BF16_BF16 = "lathe_gemm_v2_nn_bf16_bf16", ARGS_BF16_BF16;
        V2_NN_BF16_F32 = "lathe_gemm_v2_nn_bf16_f32", ARGS_BF16_F32;
    V2_NT_BF16, ptx_v2_nt_bf16, "gemm_v2_nt_bf16", V2, geometry_v2, N, T, BF16:
        V2_NT_BF16_BF16 = "lathe_gemm_v2_nt_bf16_bf16", ARGS_BF16_BF16;
        V2_NT_BF16_F32 = "lathe_gemm_v2_nt_bf16_f32", ARGS_BF16_F32;
    V2_TN_BF16, ptx_v2_tn_bf16, "gemm_v2_tn_bf16", V2, geometry_v2, T, N, BF16:
        V2_TN_BF16_BF16 = "lathe_gemm_v2_tn_bf16_bf16", ARGS_BF16_BF16;
        V2_TN_BF16_F32 = "lathe_gemm_v2_tn_bf16_f32", ARGS_BF16_F32;
    V2_TT_BF16, ptx_v2_tt_bf16, "gemm_v2_tt_bf16", V2, geometry_v2, T, T, BF16:
        V2_TT_BF16_BF16 = "lathe_gemm_v2_tt_bf16_bf16", ARGS_BF16_BF16;
        V2_TT_BF16_F32 = "lathe_gemm_v2_tt_bf16_f32", ARGS_BF16_F32;
    V2_NN_F16, ptx_v2_nn_f16, "gemm_v2_nn_f16", V2, geometry_v2, N, N, F16:
        V2_NN_F16_F16 = "lathe_gemm_v2_nn_f16_f16", ARGS_F16_F16;
        V2_NN_F16_F32 = "lathe_gemm_v2_nn_f16_f32", ARGS_F16_F32;
    V2_NT_F16, ptx_v2_nt_f16, "gemm_v2_nt_f16", V2, geometry_v2, N, T, F16:
        V2_NT_F16_F16 = "lathe_gemm_v2_nt_f16_f16", ARGS_F16_F16;
        V2_NT_F16_F32 = "lathe_gemm_v2_nt_f16_f32", ARGS_F16_F32;
    V2_TN_F16, ptx_v2_tn_f16, "gemm_v2_tn_f16", V2, geometry_v2, T, N, F16:
        V2_TN_F16_F16 = "lathe_gemm_v2_tn_f16_f16", ARGS_F16_F16;
        V2_TN_F16_F32 = "lathe_gemm_v2_tn_f16_f32", ARGS_F16_F32;
    V2_TT_F16, ptx_v2_tt_f16, "gemm_v2_tt_f16", V2, geometry_v2, T, T, F16:
        V2_TT_F16_F16 = "lathe_gemm_v2_tt_f16_f16", ARGS_F16_F16;
        V2_TT_F16_F32 = "lathe_gemm_v2_tt_f16_f32", ARGS_F16_F32;
}

/// Every GEMM module.
pub fn modules() -> Vec<&'static Module> {
    MODULES.to_vec()
}

/// Every GEMM kernel.
pub fn kernels() -> Vec<&'static KernelDesc> {
    TABLE.iter().map(|row| row.5).collect()
}

/// The kernel for a version, storage and element types: `input` bf16 or f16, `output` the
/// input type or f32. `None` for any other combination.
pub fn kernel_for(
    v: Version,
    op_a: Op,
    op_b: Op,
    input: Elem,
    output: Elem,
) -> Option<&'static KernelDesc> {
    TABLE
        .iter()
        .find(|r| r.0 == v && r.1 == op_a && r.2 == op_b && r.3 == input && r.4 == output)
        .map(|r| r.5)
}

#[cfg(test)]
mod tests;
