//! Hopper (sm_90a) tensor-core GEMM: wgmma, TMA and warp specialization.
//!
//! `C(M, N) = A(M, K) B(N, K)^T`: A and B are bf16, both stored row-major with K contiguous
//! ("K-major", the layout `wgmma` reads without transposition); C is f32 or bf16, row-major
//! `(M, N)`, f32 accumulation. Operands reach the kernel as TMA tensor maps built on the host
//! (`lathe_host::hopper_ops`), which also handles the M, N and K tails (out-of-bounds boxes are
//! zero-filled); the epilogue checks M and N bounds.
//!
//! Versions 1 and 2 take one layout (both operands K-major: Lathe's `N T`, the forward
//! `x W^T` with `W (out, in)`) and no epilogue. Version 3 takes the three products of a
//! linear layer in training without transposed copies, through `wgmma`'s transpose bits
//! (MN-major operands in shared memory, loaded by 64 x 64 TMA boxes):
//!
//! | product (`Gemm` ops) | A in shared memory | B in shared memory |
//! |---|---|---|
//! | forward `Y = X W^T` (`N T`) | K-major | K-major |
//! | input gradient `dX = dY W` (`N N`) | K-major | N-major |
//! | weight gradient `dW = dY^T X` (`T N`, f32 with beta 1) | M-major | N-major |
//!
//! with bf16 or f16 operands, C in the operand type or f32, and the mma.sync GEMM's epilogue
//! (alpha, beta * C, bias, GELU, any `ldc`). `lathe_host`'s `Device::gemm` dispatches to it
//! on compute capability 9.0 for products with at least one full 128 x 256 tile.
//!
//! Versions (numbered, kept):
//! - v1: 128x256x64 tile, 4-stage TMA/mbarrier ring, 1 producer + 2 consumer warpgroups,
//!   `setmaxnreg`, persistent grid over tiles in grouped order, `wgmma.wait_group 0` after each
//!   stage (the stage is released as soon as its products are done).
//! - v2: v1 with one wgmma group kept in flight (`wait_group 1`, the previous stage released),
//!   so the tensor cores do not drain between K steps.
//! - v3: v2's pipeline for every training layout and both 16-bit types, with the epilogue
//!   ([`ptx::v3`]).

pub mod ptx;
pub mod twin;

use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;
use std::sync::OnceLock;

/// Rows of C per CTA tile (two consumer warpgroups of 64).
pub const BM: u32 = 128;
/// Columns of C per CTA tile (one m64n256 wgmma per consumer per K step of 16).
pub const BN: u32 = 256;
/// K elements per ring stage: one 128-byte swizzle row of bf16.
pub const BK: u32 = 64;
/// Ring stages.
pub const STAGES: u32 = 4;
/// Tile rows walked together before moving along N (L2 reuse of the B panel).
pub const GROUP_M: u32 = 16;
/// Threads per CTA: producer warpgroup + two consumer warpgroups.
pub const THREADS: u32 = 384;
/// Registers per thread the producer keeps after `setmaxnreg.dec`.
pub const PRODUCER_REGS: u32 = 40;
/// Registers per thread the consumers get with `setmaxnreg.inc`
/// (128 x 40 + 256 x 232 = 64512 <= 65536).
pub const CONSUMER_REGS: u32 = 232;

// The register split must fit the SM's 64K registers (checked at compile time).
const _: () = assert!(128 * PRODUCER_REGS + 256 * CONSUMER_REGS <= 65536);

/// Bytes of one A stage: `BM` rows of `BK` bf16.
pub const fn a_stage_bytes() -> u32 {
    BM * BK * 2
}

/// Bytes of one B stage: `BN` rows of `BK` bf16.
pub const fn b_stage_bytes() -> u32 {
    BN * BK * 2
}

/// Dynamic shared memory per CTA: the ring, 2 x `STAGES` mbarriers, and 1024 bytes of slack
/// for aligning the base to the 128B swizzle atom at run time.
pub const fn shared_bytes() -> u32 {
    ptx::barrier_offset() + 16 * STAGES + 1024
}

/// A kernel version. Each keeps its entry names; newer ones do not overwrite older ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// Every version, oldest first.
    pub const ALL: [Version; 2] = [Version::V1, Version::V2];
    /// The version `lathe_host::hopper_ops` uses by default.
    pub const SHIPPED: Version = Version::V2;

    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }
}

/// Tiles of a problem: `(tiles_m, tiles_n)`.
pub fn tiles(m: u64, n: u64) -> (u64, u64) {
    (m.div_ceil(BM as u64), n.div_ceil(BN as u64))
}

/// The (m tile, n tile) of linear tile index `t`, in the order every CTA walks them: groups of
/// `GROUP_M` tile rows, m fastest inside a group. The PTX computes the same function.
pub fn tile_coords(t: u64, tiles_m: u64, tiles_n: u64) -> (u64, u64) {
    let group = GROUP_M as u64 * tiles_n;
    let first_m = (t / group) * GROUP_M as u64;
    let size = (tiles_m - first_m).min(GROUP_M as u64);
    let r = t % group;
    (first_m + r % size, r / size)
}

/// The problem of a GEMM with `C (m, n)` and inner dimension `k`.
pub fn problem(m: usize, n: usize, k: usize) -> Problem {
    Problem {
        n: n as u64,
        m: m as u64,
        k: k as u64,
        batch: 1,
    }
}

/// A plain grid (one CTA per tile). The host launches `min(tiles, SM count)` CTAs instead
/// (persistent); the kernel walks `tile += nctaid.x`, so both are correct.
fn geometry(p: &Problem) -> Geometry {
    let (tm, tn) = tiles(p.m, p.n);
    Geometry {
        grid: ((tm * tn).min(u32::MAX as u64) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: shared_bytes(),
    }
}

fn cost(p: &Problem, out: u64) -> Cost {
    Cost {
        flops: 2 * p.m * p.n * p.k,
        bytes: 2 * (p.m * p.k + p.n * p.k) + out * p.m * p.n,
    }
}
fn cost_f32(p: &Problem) -> Cost {
    cost(p, 4)
}
fn cost_bf16(p: &Problem) -> Cost {
    cost(p, 2)
}

/// Parameters, in PTX order. The tensor maps are 128-byte by-value parameters of bf16 tensors.
pub static ARGS_F32: &[Arg] = &[
    arg("tmA", ArgKind::TensorMap(Elem::BF16)),
    arg("tmB", ArgKind::TensorMap(Elem::BF16)),
    arg("c", ArgKind::Out(Elem::F32)),
    arg("m", ArgKind::U32),
    arg("n", ArgKind::U32),
    arg("k", ArgKind::U32),
];
/// As [`ARGS_F32`] with a bf16 C.
pub static ARGS_BF16: &[Arg] = &[
    arg("tmA", ArgKind::TensorMap(Elem::BF16)),
    arg("tmB", ArgKind::TensorMap(Elem::BF16)),
    arg("c", ArgKind::Out(Elem::BF16)),
    arg("m", ArgKind::U32),
    arg("n", ArgKind::U32),
    arg("k", ArgKind::U32),
];

fn text(v: Version) -> Cow<'static, str> {
    static V1: OnceLock<String> = OnceLock::new();
    static V2: OnceLock<String> = OnceLock::new();
    let cell = match v {
        Version::V1 => &V1,
        Version::V2 => &V2,
    };
    Cow::Borrowed(cell.get_or_init(|| ptx::module(v)).as_str())
}
fn ptx_v1() -> Cow<'static, str> {
    text(Version::V1)
}
fn ptx_v2() -> Cow<'static, str> {
    text(Version::V2)
}

pub static MODULE_V1: Module = Module {
    name: "hgemm_v1",
    target: Target::Sm90a,
    ptx: ptx_v1,
};
pub static MODULE_V2: Module = Module {
    name: "hgemm_v2",
    target: Target::Sm90a,
    ptx: ptx_v2,
};

macro_rules! desc {
    ($name:ident, $entry:literal, $module:ident, $args:ident, $cost:ident, $summary:literal) => {
        pub static $name: KernelDesc = KernelDesc {
            entry: $entry,
            module: &$module,
            args: $args,
            geometry,
            cost: $cost,
            summary: $summary,
        };
    };
}
desc!(
    V1_F32,
    "lathe_hgemm_tn_bf16_f32_v1",
    MODULE_V1,
    ARGS_F32,
    cost_f32,
    "C f32 (M,N) = A (M,K) B (N,K)^T, bf16 wgmma+TMA, 128x256x64, wait 0"
);
desc!(
    V1_BF16,
    "lathe_hgemm_tn_bf16_bf16_v1",
    MODULE_V1,
    ARGS_BF16,
    cost_bf16,
    "C bf16 (M,N) = A (M,K) B (N,K)^T, bf16 wgmma+TMA, 128x256x64, wait 0"
);
desc!(
    V2_F32,
    "lathe_hgemm_tn_bf16_f32_v2",
    MODULE_V2,
    ARGS_F32,
    cost_f32,
    "C f32 (M,N) = A (M,K) B (N,K)^T, bf16 wgmma+TMA, 128x256x64, one group in flight"
);
desc!(
    V2_BF16,
    "lathe_hgemm_tn_bf16_bf16_v2",
    MODULE_V2,
    ARGS_BF16,
    cost_bf16,
    "C bf16 (M,N) = A (M,K) B (N,K)^T, bf16 wgmma+TMA, 128x256x64, one group in flight"
);

fn ptx_v3() -> Cow<'static, str> {
    static V3: OnceLock<String> = OnceLock::new();
    Cow::Borrowed(V3.get_or_init(|| ptx::v3::module(&V3_SPECS)).as_str())
}

/// Version 3's module: every kernel of [`V3_ALL`].
pub static MODULE_V3: Module = Module {
    name: "hgemm_v3",
    target: Target::Sm90a,
    ptx: ptx_v3,
};

macro_rules! v3_args {
    ($i:expr, $o:expr) => {
        &[
            arg("tmA", ArgKind::TensorMap($i)),
            arg("tmB", ArgKind::TensorMap($i)),
            arg("c", ArgKind::Out($o)),
            arg("bias", ArgKind::In($i)),
            arg("m", ArgKind::U32),
            arg("n", ArgKind::U32),
            arg("k", ArgKind::U32),
            arg("ldc", ArgKind::U32),
            arg("alpha", ArgKind::F32),
            arg("beta", ArgKind::F32),
            arg("flags", ArgKind::U32),
        ]
    };
}

fn cost_v3(p: &Problem) -> Cost {
    // Operands 2 bytes; C written once (an f32 C read too with beta != 0 is not counted).
    cost(p, 2)
}

macro_rules! v3_desc {
    ($name:ident, $entry:literal, $i:expr, $o:expr, $summary:literal) => {
        #[doc = concat!("`", $entry, "`: ", $summary)]
        pub static $name: KernelDesc = KernelDesc {
            entry: $entry,
            module: &MODULE_V3,
            args: v3_args!($i, $o),
            geometry,
            cost: cost_v3,
            summary: $summary,
        };
    };
}

v3_desc!(
    V3_NT_BF16_BF16,
    "lathe_hgemm_v3_nt_bf16_bf16",
    Elem::BF16,
    Elem::BF16,
    "C bf16 = A (M,K) B (N,K)^T + epilogue, wgmma+TMA"
);
v3_desc!(
    V3_NT_BF16_F32,
    "lathe_hgemm_v3_nt_bf16_f32",
    Elem::BF16,
    Elem::F32,
    "C f32 = A (M,K) B (N,K)^T + epilogue, wgmma+TMA"
);
v3_desc!(
    V3_NT_F16_F16,
    "lathe_hgemm_v3_nt_f16_f16",
    Elem::F16,
    Elem::F16,
    "C f16 = A (M,K) B (N,K)^T + epilogue, wgmma+TMA"
);
v3_desc!(
    V3_NT_F16_F32,
    "lathe_hgemm_v3_nt_f16_f32",
    Elem::F16,
    Elem::F32,
    "C f32 = A (M,K) B (N,K)^T + epilogue, f16 wgmma+TMA"
);
v3_desc!(
    V3_NN_BF16_BF16,
    "lathe_hgemm_v3_nn_bf16_bf16",
    Elem::BF16,
    Elem::BF16,
    "C bf16 = A (M,K) B (K,N) + epilogue, B N-major, wgmma+TMA"
);
v3_desc!(
    V3_NN_BF16_F32,
    "lathe_hgemm_v3_nn_bf16_f32",
    Elem::BF16,
    Elem::F32,
    "C f32 = A (M,K) B (K,N) + epilogue, B N-major, wgmma+TMA"
);
v3_desc!(
    V3_NN_F16_F16,
    "lathe_hgemm_v3_nn_f16_f16",
    Elem::F16,
    Elem::F16,
    "C f16 = A (M,K) B (K,N) + epilogue, B N-major, wgmma+TMA"
);
v3_desc!(
    V3_NN_F16_F32,
    "lathe_hgemm_v3_nn_f16_f32",
    Elem::F16,
    Elem::F32,
    "C f32 = A (M,K) B (K,N) + epilogue, B N-major, f16 wgmma+TMA"
);
v3_desc!(
    V3_TN_BF16_BF16,
    "lathe_hgemm_v3_tn_bf16_bf16",
    Elem::BF16,
    Elem::BF16,
    "C bf16 = A^T (A stored (K,M)) B (K,N) + epilogue, both MN-major, wgmma+TMA"
);
v3_desc!(
    V3_TN_BF16_F32,
    "lathe_hgemm_v3_tn_bf16_f32",
    Elem::BF16,
    Elem::F32,
    "C f32 = A^T (A stored (K,M)) B (K,N) + epilogue, both MN-major, wgmma+TMA"
);
v3_desc!(
    V3_TN_F16_F16,
    "lathe_hgemm_v3_tn_f16_f16",
    Elem::F16,
    Elem::F16,
    "C f16 = A^T (A stored (K,M)) B (K,N) + epilogue, both MN-major, wgmma+TMA"
);
v3_desc!(
    V3_TN_F16_F32,
    "lathe_hgemm_v3_tn_f16_f32",
    Elem::F16,
    Elem::F32,
    "C f32 = A^T (A stored (K,M)) B (K,N) + epilogue, both MN-major, f16 wgmma+TMA"
);

/// Version 3's kernels, in [`V3_SPECS`] order: layouts `nt`, `nn`, `tn` (Lathe's `Op` of A
/// and B), each with (bf16, bf16), (bf16, f32), (f16, f16), (f16, f32) operands and output.
pub static V3_ALL: [&KernelDesc; 12] = [
    &V3_NT_BF16_BF16,
    &V3_NT_BF16_F32,
    &V3_NT_F16_F16,
    &V3_NT_F16_F32,
    &V3_NN_BF16_BF16,
    &V3_NN_BF16_F32,
    &V3_NN_F16_F16,
    &V3_NN_F16_F32,
    &V3_TN_BF16_BF16,
    &V3_TN_BF16_F32,
    &V3_TN_F16_F16,
    &V3_TN_F16_F32,
];

const fn v3_spec(a_mn: bool, b_mn: bool, input: Elem, output: Elem) -> ptx::v3::Spec {
    ptx::v3::Spec {
        a_mn,
        b_mn,
        input,
        output,
    }
}

/// The specs behind [`V3_ALL`], same order.
pub static V3_SPECS: [ptx::v3::Spec; 12] = [
    v3_spec(false, false, Elem::BF16, Elem::BF16),
    v3_spec(false, false, Elem::BF16, Elem::F32),
    v3_spec(false, false, Elem::F16, Elem::F16),
    v3_spec(false, false, Elem::F16, Elem::F32),
    v3_spec(false, true, Elem::BF16, Elem::BF16),
    v3_spec(false, true, Elem::BF16, Elem::F32),
    v3_spec(false, true, Elem::F16, Elem::F16),
    v3_spec(false, true, Elem::F16, Elem::F32),
    v3_spec(true, true, Elem::BF16, Elem::BF16),
    v3_spec(true, true, Elem::BF16, Elem::F32),
    v3_spec(true, true, Elem::F16, Elem::F16),
    v3_spec(true, true, Elem::F16, Elem::F32),
];

/// The version-3 kernel for A stored M-major (`a_mn`: Lathe's `Op::T` A), B stored N-major
/// (`b_mn`: `Op::N` B), and the element types; `None` where no kernel exists (A M-major with
/// B K-major, operands other than bf16/f16, outputs other than the operand type or f32).
pub fn v3_kernel(a_mn: bool, b_mn: bool, input: Elem, output: Elem) -> Option<&'static KernelDesc> {
    V3_SPECS
        .iter()
        .position(|s| s.a_mn == a_mn && s.b_mn == b_mn && s.input == input && s.output == output)
        .map(|i| V3_ALL[i])
}

/// The kernel of a version and output type (f32 or bf16); `None` for other outputs.
pub fn kernel_for(v: Version, out: Elem) -> Option<&'static KernelDesc> {
    match (v, out) {
        (Version::V1, Elem::F32) => Some(&V1_F32),
        (Version::V1, Elem::BF16) => Some(&V1_BF16),
        (Version::V2, Elem::F32) => Some(&V2_F32),
        (Version::V2, Elem::BF16) => Some(&V2_BF16),
        _ => None,
    }
}

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    vec![&MODULE_V1, &MODULE_V2, &MODULE_V3]
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    let mut v: Vec<&'static KernelDesc> = vec![&V1_F32, &V1_BF16, &V2_F32, &V2_BF16];
    v.extend(V3_ALL);
    v
}

#[cfg(test)]
mod tests;
