//! SIMT GEMM with full f32 FMA, batched: for every `z < batch`,
//! `C[z] = act(alpha * op(A[z]) op(B[z]) + beta * C[z] + bias)` where `X[z]` starts
//! `z * stride_x` elements after `X`. Operands f32, bf16 or f16 (widened exactly to f32),
//! products and sums in f32 `fma.rn` (not TF32), C in f32 or in the operand type.
//! It serves `--precision fp32` training (batch 1, the three linear-layer layouts) and the
//! attention products (batch = B x n_head, one launch: `Q K^T`, `P V` and their backward).
//!
//! Storage, leading dimensions, alpha / beta / bias / GELU are those of the tensor-core GEMM
//! ([`crate::gemm::Gemm`], [`crate::gemm::Op`]): A stored `(M, K)` for `N`, `(K, M)` for `T`;
//! B stored `(K, N)` for `N`, `(N, K)` for `T`; C `(M, N)`; the bias (length N, operand type)
//! is shared by every batch. The epilogue order is the same: `v = alpha acc`, `v += beta C`
//! (C not read when `beta == 0`), `v += bias[col]` (`FLAG_BIAS`), GELU tanh form
//! (`FLAG_GELU`, `v / (1 + 2^(-2 sqrt(2/pi) log2(e) (v + 0.044715 v^3)))`), round and store.
//!
//! # Tiling
//! - Block tile 64 x 64 of C, K in steps of 16; 256 threads; grid `(ceil(N/64), ceil(M/64),
//!   batch)`, no dynamic shared memory.
//! - Thread `(tx, ty) = (tid % 16, tid / 16)` owns the 4 x 4 micro-tile at rows `4 ty + i`,
//!   columns `4 tx + j`: per k it reads its 4 A values and 4 B values with two 128-bit shared
//!   loads (16 FMAs per 2 loads). A warp's A reads hit 2 addresses (broadcast), its B reads 16
//!   consecutive 16-byte words (one 128-byte row per quarter warp): conflict-free.
//! - Shared staging, f32, k-major: `s_a[16][68]` (A^T of the tile), `s_b[16][68]`; the pitch of
//!   68 words keeps rows 16-byte aligned. Each thread loads 4 elements of each operand per K
//!   step. An operand stored with K contiguous (`A: N`, `B: T`) is read 8 consecutive k by 4
//!   rows per warp, stored at bank `4 k + row mod 32`: 32 distinct banks. An operand stored
//!   with M / N contiguous is read 32 consecutive columns of one k per warp: consecutive words.
//! - Register prefetch: the next K step's global loads are issued before the current step's
//!   16 x 16 FMAs, one shared stage, two barriers per step.
//! - Tails: every global load is predicated (rows past M/N, k past K read as 0); rows and
//!   columns past C are never written. Any M, N, K >= 0, any alignment, any leading dimension.
//!
//! # Cost
//! `2 M N K batch` FLOPs. Bytes at least `batch (s_in (M K + K N) + s_out M N)` (+ `s_out M N`
//! when `beta != 0`); the 64 x 64 tile re-reads A `ceil(N / 64)` times and B `ceil(M / 64)`
//! times, mostly from L2. Per k a thread issues 2 shared loads for 16 FMAs; with a 4 x 4
//! micro-tile the shared traffic (2 x 16 bytes per 16 FMAs) still caps it below the f32 FMA
//! peak (an 8 x 8 micro-tile halves it); bf16 / f16 products belong on [`crate::gemm`].

use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use crate::gemm::{Gemm, GemmError, Op};
use crate::nn::ptxgen::{Asm, emit, entry, f32_imm, ld_ptr};
use std::borrow::Cow;

/// Block tile rows (M).
pub const BM: u32 = 64;
/// Block tile columns (N).
pub const BN: u32 = 64;
/// K step.
pub const BK: u32 = 16;
/// Threads per block.
pub const THREADS: u32 = 256;
/// Row pitch (f32 words) of the shared staging arrays.
const PITCH: u32 = 68;

/// One kernel of the family.
struct Spec {
    entry: &'static str,
    op_a: Op,
    op_b: Op,
    input: Elem,
    output: Elem,
}

/// `%dst = (f32) h`, `h` a 16-bit register holding `e` (bf16 exactly, by shifting).
fn widen(a: &mut Asm, e: Elem, h: &str, dst: &str) {
    match e {
        Elem::BF16 => {
            emit!(a, "cvt.u32.u16 %wd, {h};");
            a.l("shl.b32 %wd, %wd, 16;");
            emit!(a, "mov.b32 {dst}, %wd;");
        }
        Elem::F16 => emit!(a, "cvt.f32.f16 {dst}, {h};"),
        _ => unreachable!("widen of a 32-bit type"),
    }
}

/// `@pred` load of one `e` element at `[addr]` into the f32 register `dst`, 0 when `pred` is
/// false.
fn ld_pred(a: &mut Asm, e: Elem, pred: &str, addr: &str, dst: &str) {
    match e {
        Elem::F32 => {
            emit!(a, "mov.f32 {dst}, 0f00000000;");
            emit!(a, "@{pred} ld.global.f32 {dst}, [{addr}];");
        }
        _ => {
            a.l("mov.b16 %h, 0;");
            emit!(a, "@{pred} ld.global.b16 %h, [{addr}];");
            widen(a, e, "%h", dst);
        }
    }
}

/// The operand-specific registers: `x` is `a` or `b`.
struct Operand {
    x: &'static str,
    /// Stored with K contiguous (A: N, B: T).
    k_contig: bool,
    ld: &'static str,
    origin: &'static str,
    limit: &'static str,
}

/// Per-thread load setup: pointers at k = 0, predicates on the row, shared store addresses.
fn setup(a: &mut Asm, o: &Operand, size: usize) {
    let x = o.x;
    emit!(a, "mov.u32 %sh, s_{x};");
    for q in 0..4u32 {
        if o.k_contig {
            // 8 consecutive k x 4 consecutive rows per warp row group.
            a.l("shr.u32 %outer, %thr, 3;");
            emit!(a, "add.u32 %outer, %outer, {};", 32 * (q >> 1));
            emit!(a, "and.b32 %kk{x}{q}, %thr, 7;");
            emit!(a, "add.u32 %kk{x}{q}, %kk{x}{q}, {};", 8 * (q & 1));
        } else {
            a.l("and.b32 %outer, %thr, 63;");
            emit!(a, "shr.u32 %kk{x}{q}, %thr, 6;");
            emit!(a, "add.u32 %kk{x}{q}, %kk{x}{q}, {};", 4 * q);
        }
        emit!(a, "add.u32 %row, {}, %outer;", o.origin);
        emit!(a, "setp.lt.u32 %po{x}{q}, %row, {};", o.limit);
        if o.k_contig {
            // element (row, kk): row * ld + kk
            emit!(a, "mul.wide.u32 %t64, %row, {};", o.ld);
            emit!(a, "cvt.u64.u32 %u64, %kk{x}{q};");
        } else {
            // element (kk, row): kk * ld + row
            emit!(a, "mul.wide.u32 %t64, %kk{x}{q}, {};", o.ld);
            a.l("cvt.u64.u32 %u64, %row;");
        }
        a.l("add.u64 %t64, %t64, %u64;");
        emit!(a, "shl.b64 %t64, %t64, {};", size.trailing_zeros());
        emit!(a, "add.u64 %x{x}{q}, %p{x}, %t64;");
        emit!(a, "mad.lo.u32 %st{x}{q}, %kk{x}{q}, {PITCH}, %outer;");
        emit!(a, "shl.b32 %st{x}{q}, %st{x}{q}, 2;");
        emit!(a, "add.u32 %st{x}{q}, %st{x}{q}, %sh;");
    }
    if o.k_contig {
        emit!(a, "mov.u64 %step{x}, {};", BK as usize * size);
    } else {
        emit!(
            a,
            "mul.wide.u32 %step{x}, {}, {};",
            o.ld,
            BK as usize * size
        );
    }
}

/// Loads this thread's 4 elements of the K step at `%k0` into `%v{x}0..3`, then advances the
/// pointers by one K step.
fn load_step(a: &mut Asm, o: &Operand, e: Elem) {
    let x = o.x;
    for q in 0..4 {
        emit!(a, "add.u32 %row, %k0, %kk{x}{q};");
        a.l("setp.lt.u32 %pk, %row, %k;");
        emit!(a, "and.pred %pk, %pk, %po{x}{q};");
        ld_pred(a, e, "%pk", &format!("%x{x}{q}"), &format!("%v{x}{q}"));
        emit!(a, "add.u64 %x{x}{q}, %x{x}{q}, %step{x};");
    }
}

fn kernel(s: &Spec) -> String {
    let (isz, osz) = (s.input.size(), s.output.size());
    let mut a = Asm::default();
    entry(
        &mut a,
        s.entry,
        &[
            ("a", "u64"),
            ("b", "u64"),
            ("c", "u64"),
            ("bias", "u64"),
            ("m", "u32"),
            ("n", "u32"),
            ("k", "u32"),
            ("lda", "u32"),
            ("ldb", "u32"),
            ("ldc", "u32"),
            ("alpha", "f32"),
            ("beta", "f32"),
            ("flags", "u32"),
            ("stride_a", "u64"),
            ("stride_b", "u64"),
            ("stride_c", "u64"),
        ],
    );
    a.c("k-major f32 staging of the tile: s_a[k][m], s_b[k][n], pitch 66 words");
    emit!(a, ".shared .align 16 .f32 s_a[{}];", BK * PITCH);
    emit!(a, ".shared .align 16 .f32 s_b[{}];", BK * PITCH);
    a.l(".reg .b64 %pa, %pb, %pc, %pbias, %t64, %u64, %xa<4>, %xb<4>, %stepa, %stepb;");
    a.l(".reg .b64 %crow<4>, %ccol<4>;");
    a.l(".reg .b32 %m, %n, %k, %lda, %ldb, %ldc, %flags, %thr, %tx, %ty, %bm0, %bn0, %k0;");
    a.l(".reg .b32 %row, %outer, %sh, %wd, %rda, %rdb, %kka<4>, %kkb<4>, %sta<4>, %stb<4>;");
    a.l(".reg .f32 %alpha, %beta, %va<4>, %vb<4>, %fa<4>, %fb<4>, %acc<16>, %w, %g;");
    a.l(".reg .b16 %h;");
    a.l(".reg .pred %poa<4>, %pob<4>, %pk, %pr<4>, %pcol<4>, %pe, %pu;");
    for (r, p) in [("%pa", "a"), ("%pb", "b"), ("%pc", "c"), ("%pbias", "bias")] {
        ld_ptr(&mut a, r, p);
    }
    for p in ["m", "n", "k", "lda", "ldb", "ldc", "flags"] {
        emit!(a, "ld.param.u32 %{p}, [p_{p}];");
    }
    a.l("ld.param.f32 %alpha, [p_alpha];");
    a.l("ld.param.f32 %beta, [p_beta];");
    a.c("batch z: X += z * stride_x elements");
    a.l("mov.u32 %row, %ctaid.z;");
    a.l("cvt.u64.u32 %u64, %row;");
    for (x, size) in [("a", isz), ("b", isz), ("c", osz)] {
        emit!(a, "ld.param.u64 %t64, [p_stride_{x}];");
        a.l("mul.lo.u64 %t64, %t64, %u64;");
        emit!(a, "shl.b64 %t64, %t64, {};", size.trailing_zeros());
        emit!(a, "add.u64 %p{x}, %p{x}, %t64;");
    }
    a.l("mov.u32 %thr, %tid.x;");
    a.l("and.b32 %tx, %thr, 15;");
    a.l("shr.u32 %ty, %thr, 4;");
    a.l("mov.u32 %bn0, %ctaid.x;");
    emit!(a, "shl.b32 %bn0, %bn0, {};", BN.trailing_zeros());
    a.l("mov.u32 %bm0, %ctaid.y;");
    emit!(a, "shl.b32 %bm0, %bm0, {};", BM.trailing_zeros());
    for i in 0..16 {
        emit!(a, "mov.f32 %acc{i}, 0f00000000;");
    }
    let oa = Operand {
        x: "a",
        k_contig: s.op_a == Op::N,
        ld: "%lda",
        origin: "%bm0",
        limit: "%m",
    };
    let ob = Operand {
        x: "b",
        k_contig: s.op_b == Op::T,
        ld: "%ldb",
        origin: "%bn0",
        limit: "%n",
    };
    a.c("A loads");
    setup(&mut a, &oa, isz);
    a.c("B loads");
    setup(&mut a, &ob, isz);
    a.c("shared read bases: s_a + 4 ty, s_b + 4 tx");
    a.l("mov.u32 %sh, s_a;");
    a.l("shl.b32 %rda, %ty, 4;");
    a.l("add.u32 %rda, %rda, %sh;");
    a.l("mov.u32 %sh, s_b;");
    a.l("shl.b32 %rdb, %tx, 4;");
    a.l("add.u32 %rdb, %rdb, %sh;");

    a.l("mov.u32 %k0, 0;");
    a.l("setp.eq.u32 %pu, %k, 0;");
    a.l("@%pu bra.uni $EPILOGUE;");
    load_step(&mut a, &oa, s.input);
    load_step(&mut a, &ob, s.input);
    a.label("$KSTEP");
    a.c("the previous step's reads of shared are done: stage this step");
    a.l("bar.sync 0;");
    for x in ["a", "b"] {
        for q in 0..4 {
            emit!(a, "st.shared.f32 [%st{x}{q}], %v{x}{q};");
        }
    }
    a.l("bar.sync 0;");
    emit!(a, "add.u32 %k0, %k0, {BK};");
    a.l("setp.lt.u32 %pu, %k0, %k;");
    a.l("@!%pu bra.uni $COMPUTE;");
    a.c("prefetch the next step into registers");
    load_step(&mut a, &oa, s.input);
    load_step(&mut a, &ob, s.input);
    a.label("$COMPUTE");
    for kk in 0..BK {
        emit!(
            a,
            "ld.shared.v4.f32 {{%fa0, %fa1, %fa2, %fa3}}, [%rda+{}];",
            4 * kk * PITCH
        );
        emit!(
            a,
            "ld.shared.v4.f32 {{%fb0, %fb1, %fb2, %fb3}}, [%rdb+{}];",
            4 * kk * PITCH
        );
        for i in 0..4 {
            for j in 0..4 {
                emit!(
                    a,
                    "fma.rn.f32 %acc{}, %fa{i}, %fb{j}, %acc{};",
                    4 * i + j,
                    4 * i + j
                );
            }
        }
    }
    a.l("@%pu bra.uni $KSTEP;");

    a.label("$EPILOGUE");
    a.c("rows bm0 + 4 ty + i, columns bn0 + 4 tx + j");
    a.l("shl.b32 %ty, %ty, 2;");
    a.l("shl.b32 %tx, %tx, 2;");
    for i in 0..4 {
        emit!(a, "add.u32 %row, %bm0, %ty;");
        emit!(a, "add.u32 %row, %row, {i};");
        emit!(a, "setp.lt.u32 %pr{i}, %row, %m;");
        emit!(a, "mul.wide.u32 %crow{i}, %row, %ldc;");
        emit!(a, "shl.b64 %crow{i}, %crow{i}, {};", osz.trailing_zeros());
        emit!(a, "add.u64 %crow{i}, %crow{i}, %pc;");
    }
    for j in 0..4 {
        emit!(a, "add.u32 %row, %bn0, %tx;");
        emit!(a, "add.u32 %row, %row, {j};");
        emit!(a, "setp.lt.u32 %pcol{j}, %row, %n;");
        emit!(a, "mul.wide.u32 %ccol{j}, %row, {osz};");
    }
    let elem_pred = |a: &mut Asm, i: usize, j: usize| {
        emit!(a, "and.pred %pe, %pr{i}, %pcol{j};");
        emit!(a, "add.u64 %t64, %crow{i}, %ccol{j};");
    };
    a.c("1. v = alpha acc");
    for i in 0..16 {
        emit!(a, "mul.rn.f32 %acc{i}, %acc{i}, %alpha;");
    }
    a.c("2. v += beta C, only when beta != 0");
    a.l("setp.eq.f32 %pu, %beta, 0f00000000;");
    a.l("@%pu bra.uni $NO_BETA;");
    for i in 0..4 {
        for j in 0..4 {
            elem_pred(&mut a, i, j);
            ld_pred(&mut a, s.output, "%pe", "%t64", "%w");
            emit!(
                a,
                "fma.rn.f32 %acc{}, %beta, %w, %acc{};",
                4 * i + j,
                4 * i + j
            );
        }
    }
    a.label("$NO_BETA");
    a.c("3. v += bias[col] (FLAG_BIAS)");
    emit!(a, "and.b32 %row, %flags, {};", crate::gemm::FLAG_BIAS);
    a.l("setp.eq.u32 %pu, %row, 0;");
    a.l("@%pu bra.uni $NO_BIAS;");
    for j in 0..4 {
        emit!(a, "add.u32 %row, %bn0, %tx;");
        emit!(a, "add.u32 %row, %row, {j};");
        emit!(a, "mul.wide.u32 %t64, %row, {isz};");
        a.l("add.u64 %t64, %t64, %pbias;");
        ld_pred(
            &mut a,
            s.input,
            &format!("%pcol{j}"),
            "%t64",
            &format!("%fb{j}"),
        );
        for i in 0..4 {
            emit!(
                a,
                "add.rn.f32 %acc{}, %acc{}, %fb{j};",
                4 * i + j,
                4 * i + j
            );
        }
    }
    a.label("$NO_BIAS");
    a.c("4. GELU (FLAG_GELU): v / (1 + 2^(scale (v + 0.044715 v^3)))");
    emit!(a, "and.b32 %row, %flags, {};", crate::gemm::FLAG_GELU);
    a.l("setp.eq.u32 %pu, %row, 0;");
    a.l("@%pu bra.uni $NO_GELU;");
    let scale = (-2.0 * (2.0f64 / std::f64::consts::PI).sqrt() * std::f64::consts::LOG2_E) as f32;
    for i in 0..16 {
        emit!(a, "mul.rn.f32 %w, %acc{i}, %acc{i};");
        emit!(
            a,
            "fma.rn.f32 %w, %w, {}, {};",
            f32_imm(0.044715),
            f32_imm(1.0)
        );
        emit!(a, "mul.rn.f32 %w, %w, %acc{i};");
        emit!(a, "mul.rn.f32 %w, %w, {};", f32_imm(scale));
        a.l("ex2.approx.f32 %w, %w;");
        emit!(a, "add.rn.f32 %w, %w, {};", f32_imm(1.0));
        emit!(a, "div.rn.f32 %acc{i}, %acc{i}, %w;");
    }
    a.label("$NO_GELU");
    a.c("5. round to the output type and store inside C");
    for i in 0..4 {
        for j in 0..4 {
            elem_pred(&mut a, i, j);
            let v = format!("%acc{}", 4 * i + j);
            match s.output {
                Elem::F32 => emit!(a, "@%pe st.global.f32 [%t64], {v};"),
                Elem::BF16 => {
                    emit!(a, "cvt.rn.bf16.f32 %h, {v};");
                    a.l("@%pe st.global.b16 [%t64], %h;");
                }
                Elem::F16 => {
                    emit!(a, "cvt.rn.f16.f32 %h, {v};");
                    a.l("@%pe st.global.b16 [%t64], %h;");
                }
                _ => unreachable!(),
            }
        }
    }
    a.l("ret;");
    a.l("}");
    a.s
}

fn module_ptx(specs: &[&Spec]) -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for sp in specs {
        s.push_str(&kernel(sp));
    }
    Cow::Owned(s)
}

/// Grid `(ceil(n / 64), ceil(m / 64), batch)`, 256 threads.
pub fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.n.div_ceil(BN as u64).max(1) as u32,
            p.m.div_ceil(BM as u64).max(1) as u32,
            p.batch.max(1) as u32,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn cost(p: &Problem, isz: u64, osz: u64) -> Cost {
    let b = p.batch.max(1);
    Cost {
        flops: 2 * p.m * p.n * p.k * b,
        bytes: b * (isz * (p.m * p.k + p.k * p.n) + osz * p.m * p.n),
    }
}
fn cost_f32(p: &Problem) -> Cost {
    cost(p, 4, 4)
}
fn cost_16_16(p: &Problem) -> Cost {
    cost(p, 2, 2)
}
fn cost_16_32(p: &Problem) -> Cost {
    cost(p, 2, 4)
}

const fn args(input: Elem, output: Elem) -> [Arg; 16] {
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
const ARGS_F32: [Arg; 16] = args(Elem::F32, Elem::F32);
const ARGS_BF16_BF16: [Arg; 16] = args(Elem::BF16, Elem::BF16);
const ARGS_BF16_F32: [Arg; 16] = args(Elem::BF16, Elem::F32);
const ARGS_F16_F16: [Arg; 16] = args(Elem::F16, Elem::F16);
const ARGS_F16_F32: [Arg; 16] = args(Elem::F16, Elem::F32);

/// Declares the modules (one per operand type) and their kernels.
macro_rules! family {
    ($( $module:ident, $mname:literal, $ptx_fn:ident: [
        $( $kd:ident, $spec:ident = $entry:literal, $a:ident, $b:ident, $in:ident, $out:ident,
           $args:ident, $cost:ident; )* ] )*) => {
        $(
            $(
                static $spec: Spec = Spec {
                    entry: $entry,
                    op_a: Op::$a,
                    op_b: Op::$b,
                    input: Elem::$in,
                    output: Elem::$out,
                };
            )*
            fn $ptx_fn() -> Cow<'static, str> {
                module_ptx(&[$(&$spec),*])
            }
            #[doc = concat!("PTX module `", $mname, "`.")]
            pub static $module: Module = Module {
                name: $mname,
                target: Target::Sm80,
                ptx: $ptx_fn,
            };
            $(
                #[doc = concat!("`", $entry, "`.")]
                pub static $kd: KernelDesc = KernelDesc {
                    entry: $entry,
                    module: &$module,
                    args: &$args,
                    geometry,
                    cost: $cost,
                    summary: "C[z] = act(alpha op(A[z]) op(B[z]) + beta C[z] + bias), f32 FMA, batched",
                };
            )*
        )*
        /// Every module of this family.
        pub static MODULES: &[&Module] = &[$(&$module),*];
        /// Every kernel with its (op_a, op_b, input, output).
        pub static TABLE: &[(Op, Op, Elem, Elem, &KernelDesc)] = &[
            $( $( (Op::$a, Op::$b, Elem::$in, Elem::$out, &$kd), )* )*
        ];
    };
}

family! {
    SIMT_F32, "gemm_simt_f32", ptx_f32: [
        NN_F32, S_NN_F32 = "lathe_gemm_simt_nn_f32_f32", N, N, F32, F32, ARGS_F32, cost_f32;
        NT_F32, S_NT_F32 = "lathe_gemm_simt_nt_f32_f32", N, T, F32, F32, ARGS_F32, cost_f32;
        TN_F32, S_TN_F32 = "lathe_gemm_simt_tn_f32_f32", T, N, F32, F32, ARGS_F32, cost_f32;
        TT_F32, S_TT_F32 = "lathe_gemm_simt_tt_f32_f32", T, T, F32, F32, ARGS_F32, cost_f32;
    ]
    SIMT_BF16, "gemm_simt_bf16", ptx_bf16: [
        NN_BF16_BF16, S_NN_BF16_BF16 = "lathe_gemm_simt_nn_bf16_bf16", N, N, BF16, BF16,
            ARGS_BF16_BF16, cost_16_16;
        NT_BF16_BF16, S_NT_BF16_BF16 = "lathe_gemm_simt_nt_bf16_bf16", N, T, BF16, BF16,
            ARGS_BF16_BF16, cost_16_16;
        TN_BF16_BF16, S_TN_BF16_BF16 = "lathe_gemm_simt_tn_bf16_bf16", T, N, BF16, BF16,
            ARGS_BF16_BF16, cost_16_16;
        TT_BF16_BF16, S_TT_BF16_BF16 = "lathe_gemm_simt_tt_bf16_bf16", T, T, BF16, BF16,
            ARGS_BF16_BF16, cost_16_16;
        NN_BF16_F32, S_NN_BF16_F32 = "lathe_gemm_simt_nn_bf16_f32", N, N, BF16, F32,
            ARGS_BF16_F32, cost_16_32;
        NT_BF16_F32, S_NT_BF16_F32 = "lathe_gemm_simt_nt_bf16_f32", N, T, BF16, F32,
            ARGS_BF16_F32, cost_16_32;
        TN_BF16_F32, S_TN_BF16_F32 = "lathe_gemm_simt_tn_bf16_f32", T, N, BF16, F32,
            ARGS_BF16_F32, cost_16_32;
        TT_BF16_F32, S_TT_BF16_F32 = "lathe_gemm_simt_tt_bf16_f32", T, T, BF16, F32,
            ARGS_BF16_F32, cost_16_32;
    ]
    SIMT_F16, "gemm_simt_f16", ptx_f16: [
        NN_F16_F16, S_NN_F16_F16 = "lathe_gemm_simt_nn_f16_f16", N, N, F16, F16,
            ARGS_F16_F16, cost_16_16;
        NT_F16_F16, S_NT_F16_F16 = "lathe_gemm_simt_nt_f16_f16", N, T, F16, F16,
            ARGS_F16_F16, cost_16_16;
        TN_F16_F16, S_TN_F16_F16 = "lathe_gemm_simt_tn_f16_f16", T, N, F16, F16,
            ARGS_F16_F16, cost_16_16;
        TT_F16_F16, S_TT_F16_F16 = "lathe_gemm_simt_tt_f16_f16", T, T, F16, F16,
            ARGS_F16_F16, cost_16_16;
        NN_F16_F32, S_NN_F16_F32 = "lathe_gemm_simt_nn_f16_f32", N, N, F16, F32,
            ARGS_F16_F32, cost_16_32;
        NT_F16_F32, S_NT_F16_F32 = "lathe_gemm_simt_nt_f16_f32", N, T, F16, F32,
            ARGS_F16_F32, cost_16_32;
        TN_F16_F32, S_TN_F16_F32 = "lathe_gemm_simt_tn_f16_f32", T, N, F16, F32,
            ARGS_F16_F32, cost_16_32;
        TT_F16_F32, S_TT_F16_F32 = "lathe_gemm_simt_tt_f16_f32", T, T, F16, F32,
            ARGS_F16_F32, cost_16_32;
    ]
}

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    MODULES.to_vec()
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    TABLE.iter().map(|r| r.4).collect()
}

/// The kernel for a storage and element types: `input` f32 (output f32), or bf16 / f16 (output
/// the input type or f32).
pub fn kernel_for(op_a: Op, op_b: Op, input: Elem, output: Elem) -> Option<&'static KernelDesc> {
    TABLE
        .iter()
        .find(|r| r.0 == op_a && r.1 == op_b && r.2 == input && r.3 == output)
        .map(|r| r.4)
}

/// The largest batch one launch takes (grid z).
pub const MAX_BATCH: usize = 65_535;

/// A strided batch of the same [`Gemm`]: problem `z` reads A at `z * stride_a`, B at
/// `z * stride_b` and writes C at `z * stride_c` (elements). A stride of 0 shares the operand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Batched {
    pub gemm: Gemm,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Batched {
    /// One problem (batch 1).
    pub fn single(gemm: Gemm) -> Self {
        Batched {
            gemm,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// Packed contiguous batches: strides are the sizes of the stored matrices.
    pub fn packed(gemm: Gemm, batch: usize) -> Self {
        let (ar, ac) = gemm.a_stored();
        let (br, bc) = gemm.b_stored();
        Batched {
            gemm,
            batch,
            stride_a: ar * gemm.lda().max(ac),
            stride_b: br * gemm.ldb().max(bc),
            stride_c: gemm.m * gemm.ldc(),
        }
    }

    /// Attention scores `S[z] (t, t) = scale Q[z] (t, hs) K[z]^T` for `bh = B n_head` heads
    /// with q, k stored `(bh, t, hs)`: `N T`, `m = n = t`, `k = hs`.
    pub fn attention_scores(bh: usize, t: usize, hs: usize, scale: f32) -> Self {
        Self::packed(
            Gemm::new(t, t, hs).with_ops(Op::N, Op::T).with_alpha(scale),
            bh,
        )
    }
    /// Attention output `O[z] (t, hs) = P[z] (t, t) V[z] (t, hs)`: `N N`.
    pub fn attention_values(bh: usize, t: usize, hs: usize) -> Self {
        Self::packed(Gemm::new(t, hs, t), bh)
    }
    /// `dP[z] (t, t) = dO[z] (t, hs) V[z]^T`: `N T`.
    pub fn attention_dprobs(bh: usize, t: usize, hs: usize) -> Self {
        Self::packed(Gemm::new(t, t, hs).with_ops(Op::N, Op::T), bh)
    }
    /// `dV[z] (t, hs) = P[z]^T dO[z]`: `T N` (P stored `(t, t)`).
    pub fn attention_dvalues(bh: usize, t: usize, hs: usize) -> Self {
        Self::packed(Gemm::new(t, hs, t).with_ops(Op::T, Op::N), bh)
    }
    /// `dQ[z] (t, hs) = scale dS[z] (t, t) K[z]`: `N N`.
    pub fn attention_dquery(bh: usize, t: usize, hs: usize, scale: f32) -> Self {
        Self::packed(Gemm::new(t, hs, t).with_alpha(scale), bh)
    }
    /// `dK[z] (t, hs) = scale dS[z]^T Q[z]`: `T N`.
    pub fn attention_dkeys(bh: usize, t: usize, hs: usize, scale: f32) -> Self {
        Self::packed(
            Gemm::new(t, hs, t).with_ops(Op::T, Op::N).with_alpha(scale),
            bh,
        )
    }

    fn span(batch: usize, stride: usize, one: usize) -> usize {
        if batch == 0 || one == 0 {
            0
        } else {
            (batch - 1) * stride + one
        }
    }
    /// Elements a buffer holding every A must have.
    pub fn a_len(&self) -> usize {
        Self::span(self.batch, self.stride_a, self.gemm.a_len())
    }
    pub fn b_len(&self) -> usize {
        Self::span(self.batch, self.stride_b, self.gemm.b_len())
    }
    pub fn c_len(&self) -> usize {
        Self::span(self.batch, self.stride_c, self.gemm.c_len())
    }

    /// Checks the GEMM, the batch count and that the index math fits.
    pub fn validate(&self) -> Result<(), GemmError> {
        self.gemm.validate()?;
        if self.batch > MAX_BATCH {
            return Err(GemmError::TooLarge {
                what: "batch",
                value: self.batch,
                limit: MAX_BATCH,
            });
        }
        if self.gemm.m.div_ceil(BM as usize) > MAX_BATCH {
            return Err(GemmError::TooLarge {
                what: "m",
                value: self.gemm.m,
                limit: MAX_BATCH * BM as usize,
            });
        }
        Ok(())
    }

    /// The descriptor problem size.
    pub fn problem(&self) -> Problem {
        Problem {
            n: self.gemm.n as u64,
            m: self.gemm.m as u64,
            k: self.gemm.k as u64,
            batch: self.batch as u64,
        }
    }
}

/// CPU twins.
pub mod twin {
    use super::Batched;
    use crate::elementwise::twin::Float;

    /// The reference of every batch, `batch x m x n` values (f64, unrounded), from the GEMM
    /// twin ([`crate::gemm::twin::reference`]) applied to each batch's slices.
    pub fn reference<T: Float, O: Float>(
        bg: &Batched,
        a: &[T],
        b: &[T],
        bias: Option<&[T]>,
        c_old: &[O],
    ) -> Vec<f64> {
        let g = &bg.gemm;
        let rows: Vec<usize> = (0..g.m).collect();
        let mut out = Vec::with_capacity(bg.batch * g.m * g.n);
        for z in 0..bg.batch {
            let c = if g.beta != 0.0 {
                &c_old[z * bg.stride_c..]
            } else {
                c_old
            };
            out.extend(crate::gemm::twin::reference(
                g,
                &a[z * bg.stride_a..],
                &b[z * bg.stride_b..],
                bias,
                c,
                &rows,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete_and_names_follow_the_convention() {
        for (a, b) in [
            (Op::N, Op::N),
            (Op::N, Op::T),
            (Op::T, Op::N),
            (Op::T, Op::T),
        ] {
            for (i, o) in [
                (Elem::F32, Elem::F32),
                (Elem::BF16, Elem::BF16),
                (Elem::BF16, Elem::F32),
                (Elem::F16, Elem::F16),
                (Elem::F16, Elem::F32),
            ] {
                let k = kernel_for(a, b, i, o).expect("kernel");
                let want = format!(
                    "lathe_gemm_simt_{}{}_{}_{}",
                    a.letter(),
                    b.letter(),
                    i.name(),
                    o.name()
                );
                assert_eq!(k.entry, want);
                assert!((k.module.ptx)().contains(&format!(".entry {want}(")));
            }
        }
        assert!(kernel_for(Op::N, Op::N, Elem::F32, Elem::BF16).is_none());
    }

    /// Every layout and operand width on whole tiles (64 x 64, K = 32, two batches) on the
    /// simulated device: the result matches the twin and shared memory has no bank conflict.
    #[test]
    fn whole_tiles_are_bank_conflict_free_on_the_simulator() {
        use crate::rng::Rng;
        use crate::simtest::{Arg as A, Gpu};
        use crate::tolerance::{check_close, rel_tolerance};
        use half::bf16;
        let mut rng = Rng::new(0x51);
        for (op_a, op_b) in [
            (Op::N, Op::N),
            (Op::N, Op::T),
            (Op::T, Op::N),
            (Op::T, Op::T),
        ] {
            let bg = Batched::packed(Gemm::new(64, 64, 32).with_ops(op_a, op_b), 2);
            let a = rng.vec_f32(bg.a_len(), -1.0, 1.0);
            let b = rng.vec_f32(bg.b_len(), -1.0, 1.0);
            let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            for input in [Elem::F32, Elem::BF16] {
                let mut gpu = Gpu::new();
                let (pa, pb) = match input {
                    Elem::F32 => (gpu.upload(&a), gpu.upload(&b)),
                    _ => (gpu.upload(&a16), gpu.upload(&b16)),
                };
                let pc = gpu.alloc_bytes(4 * bg.c_len());
                let k = kernel_for(op_a, op_b, input, Elem::F32).unwrap();
                let g = &bg.gemm;
                let u = |x: usize| A::U32(x as u32);
                let args = [
                    A::Ptr(pa),
                    A::Ptr(pb),
                    A::Ptr(pc),
                    A::Ptr(0),
                    u(g.m),
                    u(g.n),
                    u(g.k),
                    u(g.lda()),
                    u(g.ldb()),
                    u(g.ldc()),
                    A::F32(1.0),
                    A::F32(0.0),
                    A::U32(0),
                    A::U64(bg.stride_a as u64),
                    A::U64(bg.stride_b as u64),
                    A::U64(bg.stride_c as u64),
                ];
                let counters = gpu
                    .launch(k, &bg.problem(), &args)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(counters.shared_bank_conflicts, 0, "{}", k.entry);
                let got: Vec<f64> = gpu
                    .read::<f32>(pc, bg.c_len())
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let want = match input {
                    Elem::F32 => twin::reference::<f32, f32>(&bg, &a, &b, None, &[]),
                    _ => twin::reference::<bf16, f32>(&bg, &a16, &b16, None, &[]),
                };
                check_close(k.entry, &got, &want, rel_tolerance(input))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn packed_strides_and_lengths() {
        let s = Batched::attention_scores(6, 17, 5, 0.5);
        assert_eq!((s.stride_a, s.stride_b, s.stride_c), (85, 85, 289));
        assert_eq!(s.a_len(), 6 * 85);
        assert_eq!(s.c_len(), 6 * 289);
        let v = Batched::attention_dvalues(3, 7, 4);
        assert_eq!((v.gemm.m, v.gemm.n, v.gemm.k), (7, 4, 7));
        assert_eq!((v.stride_a, v.stride_b, v.stride_c), (49, 28, 28));
        assert!(
            Batched::packed(Gemm::new(1, 1, 1), MAX_BATCH + 1)
                .validate()
                .is_err()
        );
    }
}
