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
//! Two block tiles ([`SimtTile`]), 256 threads as 16 x 16, grid
//! `(ceil(N / bn), ceil(M / bm), batch)`, no dynamic shared memory:
//! - [`SMALL`] 64 x 64 x 16, 4 x 4 per thread (`lathe_gemm_simt_*`, every operand type);
//! - [`LARGE`] 128 x 128 x 8, 8 x 8 per thread (`lathe_gemm_simt128_*`, f32), picked by
//!   [`pick_tile`] when it still gives every SM two blocks.
//!
//! - Thread `(tx, ty) = (tid % 16, tid / 16)` owns rows `64 bi + 4 ty + i` and columns
//!   `64 bj + 4 tx + j` (`i, j < 4`; `bi < bm / 64`, `bj < bn / 64`): per k it reads each 4-run
//!   with one 128-bit shared load (SMALL: 2 loads per 16 FMAs; LARGE: 4 per 64). A warp's A
//!   reads hit 2 addresses (broadcast), its B reads 16 consecutive 16-byte words (one 128-byte
//!   row per quarter warp): conflict-free.
//! - Shared staging, f32, k-major: `s_a[bk][bm + 4]` (A^T of the tile), `s_b[bk][bn + 4]`; the
//!   pitch keeps rows 16-byte aligned and is 4 mod 32 banks. Each thread loads 4 elements of
//!   each operand per K step. An operand stored with K contiguous (`A: N`, `B: T`) is read
//!   8 consecutive k by 4 rows per warp, stored at bank `4 k + row mod 32`: 32 distinct banks.
//!   An operand stored with M / N contiguous is read 32 consecutive columns of one k per warp.
//!   (The simulator's bank counters check both tiles: zero conflicts.)
//! - Register prefetch: the next K step's global loads are issued before the current step's
//!   FMAs; one shared stage, two barriers per step.
//! - Tails: every global load is predicated (rows past M/N, k past K read as 0); rows and
//!   columns past C are never written. Any M, N, K >= 0, any alignment, any leading dimension.
//!
//! # Cost
//! `2 M N K batch` FLOPs. Bytes at least `batch (s_in (M K + K N) + s_out M N)` (+ `s_out M N`
//! when `beta != 0`); the tile re-reads A `ceil(N / bn)` times and B `ceil(M / bm)` times,
//! mostly from L2 (LARGE halves both). Shared traffic per FMA: SMALL 2 bytes, LARGE 1 byte;
//! the 8 x 8 tile is the one meant to approach the f32 FMA peak on large products. bf16 / f16
//! products belong on the tensor cores ([`crate::gemm`], [`crate::gemm::batched`]).

use crate::desc::{Arg, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target};
use crate::gemm::{Gemm, GemmError, Op};
use crate::nn::ptxgen::{Asm, emit, entry, f32_imm, ld_ptr};
use std::borrow::Cow;

/// Threads per block (16 x 16).
pub const THREADS: u32 = 256;

/// A block tile: `bm x bn` of C, K in steps of `bk`; thread `(tx, ty)` owns
/// `(bm / 16) x (bn / 16)` elements in 4 x 4 blocks 64 rows / columns apart. Shared arrays are
/// `s_a[bk][bm + 4]`, `s_b[bk][bn + 4]` f32 (rows 16-byte aligned, pitch = 4 mod 32 banks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimtTile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
}

impl SimtTile {
    /// Rows of C per thread.
    pub fn tm(&self) -> u32 {
        self.bm / 16
    }
    /// Columns of C per thread.
    pub fn tn(&self) -> u32 {
        self.bn / 16
    }
    /// Blocks of a problem: `(ceil(n / bn), ceil(m / bm), batch)`.
    pub fn grid(&self, p: &Problem) -> (u32, u32, u32) {
        (
            p.n.div_ceil(self.bn as u64).max(1) as u32,
            p.m.div_ceil(self.bm as u64).max(1) as u32,
            p.batch.max(1) as u32,
        )
    }
}

/// 64 x 64 x 16, 4 x 4 per thread: small problems and attention heads.
pub const SMALL: SimtTile = SimtTile {
    bm: 64,
    bn: 64,
    bk: 16,
};
/// 128 x 128 x 8, 8 x 8 per thread (4 shared loads per 64 FMAs): large f32 products.
pub const LARGE: SimtTile = SimtTile {
    bm: 128,
    bn: 128,
    bk: 8,
};

/// One kernel of the family.
struct Spec {
    entry: &'static str,
    tile: SimtTile,
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
    /// Rows of the tile along M (A) or N (B).
    extent: u32,
}

/// The `q`-th element (of 4) a thread moves per K step: its offsets `(dk, douter)` from the
/// thread's first element (k, row along M / N).
fn element_offsets(o: &Operand, bk: u32, q: u32) -> (u32, u32) {
    if o.k_contig {
        let kgroups = bk / 8;
        (8 * (q % kgroups), 32 * (q / kgroups))
    } else {
        ((THREADS / o.extent) * q, 0)
    }
}

/// Per-thread load setup: the first element's k (`%kk{x}`) and shared store address
/// (`%st{x}`), and per element a pointer at k = 0 and a row predicate. Each thread moves 4
/// elements of each operand per K step (`extent x bk = 1024`).
fn setup(a: &mut Asm, o: &Operand, size: usize, bk: u32) {
    let x = o.x;
    let (ext, pitch) = (o.extent, o.extent + 4);
    assert_eq!(ext * bk, 4 * THREADS, "4 elements per thread and operand");
    if o.k_contig {
        // 8 consecutive k x 4 consecutive rows per warp: banks 4 k + row, all distinct.
        a.l("shr.u32 %outer, %thr, 3;");
        emit!(a, "and.b32 %kk{x}, %thr, 7;");
    } else {
        // A warp reads 32 consecutive columns of one k.
        emit!(a, "and.b32 %outer, %thr, {};", ext - 1);
        emit!(a, "shr.u32 %kk{x}, %thr, {};", ext.trailing_zeros());
    }
    emit!(a, "mad.lo.u32 %st{x}, %kk{x}, {pitch}, %outer;");
    emit!(a, "shl.b32 %st{x}, %st{x}, 2;");
    emit!(a, "mov.u32 %sh, s_{x};");
    emit!(a, "add.u32 %st{x}, %st{x}, %sh;");
    for q in 0..4u32 {
        let (dk, dout) = element_offsets(o, bk, q);
        emit!(a, "add.u32 %row, {}, %outer;", o.origin);
        emit!(a, "add.u32 %row, %row, {dout};");
        emit!(a, "setp.lt.u32 %po{x}{q}, %row, {};", o.limit);
        emit!(a, "add.u32 %kq, %kk{x}, {dk};");
        if o.k_contig {
            // element (row, k): row * ld + k
            emit!(a, "mul.wide.u32 %t64, %row, {};", o.ld);
            a.l("cvt.u64.u32 %u64, %kq;");
        } else {
            // element (k, row): k * ld + row
            emit!(a, "mul.wide.u32 %t64, %kq, {};", o.ld);
            a.l("cvt.u64.u32 %u64, %row;");
        }
        a.l("add.u64 %t64, %t64, %u64;");
        emit!(a, "shl.b64 %t64, %t64, {};", size.trailing_zeros());
        emit!(a, "add.u64 %x{x}{q}, %p{x}, %t64;");
    }
    if o.k_contig {
        emit!(a, "mov.u64 %step{x}, {};", bk as usize * size);
    } else {
        emit!(
            a,
            "mul.wide.u32 %step{x}, {}, {};",
            o.ld,
            bk as usize * size
        );
    }
}

/// Loads this thread's 4 elements of the K step at `%k0` into `%v{x}0..3` (`%krem = k - k0`),
/// then advances the pointers by one K step.
fn load_step(a: &mut Asm, o: &Operand, e: Elem, bk: u32) {
    let x = o.x;
    for q in 0..4 {
        let (dk, _) = element_offsets(o, bk, q);
        emit!(a, "add.u32 %kq, %kk{x}, {dk};");
        a.l("setp.lt.u32 %pk, %kq, %krem;");
        emit!(a, "and.pred %pk, %pk, %po{x}{q};");
        ld_pred(a, e, "%pk", &format!("%x{x}{q}"), &format!("%v{x}{q}"));
        emit!(a, "add.u64 %x{x}{q}, %x{x}{q}, %step{x};");
    }
}

/// Stores the 4 staged elements into shared memory.
fn store_step(a: &mut Asm, o: &Operand, bk: u32) {
    let x = o.x;
    for q in 0..4 {
        let (dk, dout) = element_offsets(o, bk, q);
        let off = 4 * (dk * (o.extent + 4) + dout);
        emit!(a, "st.shared.f32 [%st{x}+{off}], %v{x}{q};");
    }
}

fn kernel(s: &Spec) -> String {
    let t = s.tile;
    let (tm, tn) = (t.tm() as usize, t.tn() as usize);
    let (pa_, pb_) = (t.bm + 4, t.bn + 4);
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
    a.c(&format!(
        "k-major f32 staging of the {}x{}x{} tile: s_a[k][m] pitch {pa_}, s_b[k][n] pitch {pb_}",
        t.bm, t.bn, t.bk
    ));
    emit!(a, ".shared .align 16 .f32 s_a[{}];", t.bk * pa_);
    emit!(a, ".shared .align 16 .f32 s_b[{}];", t.bk * pb_);
    a.l(".reg .b64 %pa, %pb, %pc, %pbias, %t64, %u64, %xa<4>, %xb<4>, %stepa, %stepb;");
    emit!(a, ".reg .b64 %crow<{tm}>, %ccol<{tn}>;");
    a.l(".reg .b32 %m, %n, %k, %lda, %ldb, %ldc, %flags, %thr, %tx, %ty, %bm0, %bn0, %k0;");
    a.l(".reg .b32 %row, %outer, %sh, %wd, %rda, %rdb, %kka, %kkb, %sta, %stb, %kq, %krem;");
    a.l(".reg .f32 %alpha, %beta, %va<4>, %vb<4>, %w;");
    emit!(a, ".reg .f32 %fa<{tm}>, %fb<{tn}>, %acc<{}>;", tm * tn);
    a.l(".reg .b16 %h;");
    a.l(".reg .pred %poa<4>, %pob<4>, %pk, %pe, %pu;");
    emit!(a, ".reg .pred %pr<{tm}>, %pcol<{tn}>;");
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
    emit!(a, "shl.b32 %bn0, %bn0, {};", t.bn.trailing_zeros());
    a.l("mov.u32 %bm0, %ctaid.y;");
    emit!(a, "shl.b32 %bm0, %bm0, {};", t.bm.trailing_zeros());
    for i in 0..tm * tn {
        emit!(a, "mov.f32 %acc{i}, 0f00000000;");
    }
    let oa = Operand {
        x: "a",
        k_contig: s.op_a == Op::N,
        ld: "%lda",
        origin: "%bm0",
        limit: "%m",
        extent: t.bm,
    };
    let ob = Operand {
        x: "b",
        k_contig: s.op_b == Op::T,
        ld: "%ldb",
        origin: "%bn0",
        limit: "%n",
        extent: t.bn,
    };
    a.c("A loads");
    setup(&mut a, &oa, isz, t.bk);
    a.c("B loads");
    setup(&mut a, &ob, isz, t.bk);
    a.c("shared read bases: s_a + 4 ty, s_b + 4 tx (words)");
    a.l("mov.u32 %sh, s_a;");
    a.l("shl.b32 %rda, %ty, 4;");
    a.l("add.u32 %rda, %rda, %sh;");
    a.l("mov.u32 %sh, s_b;");
    a.l("shl.b32 %rdb, %tx, 4;");
    a.l("add.u32 %rdb, %rdb, %sh;");

    a.l("mov.u32 %k0, 0;");
    a.l("mov.u32 %krem, %k;");
    a.l("setp.eq.u32 %pu, %k, 0;");
    a.l("@%pu bra.uni $EPILOGUE;");
    load_step(&mut a, &oa, s.input, t.bk);
    load_step(&mut a, &ob, s.input, t.bk);
    a.label("$KSTEP");
    a.c("the previous step's reads of shared are done: stage this step");
    a.l("bar.sync 0;");
    store_step(&mut a, &oa, t.bk);
    store_step(&mut a, &ob, t.bk);
    a.l("bar.sync 0;");
    emit!(a, "add.u32 %k0, %k0, {};", t.bk);
    a.l("setp.lt.u32 %pu, %k0, %k;");
    a.l("@!%pu bra.uni $COMPUTE;");
    a.c("prefetch the next step into registers");
    a.l("sub.u32 %krem, %k, %k0;");
    load_step(&mut a, &oa, s.input, t.bk);
    load_step(&mut a, &ob, s.input, t.bk);
    a.label("$COMPUTE");
    for kk in 0..t.bk {
        for blk in 0..tm / 4 {
            let f = |q: usize| format!("%fa{}", 4 * blk + q);
            emit!(
                a,
                "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [%rda+{}];",
                f(0),
                f(1),
                f(2),
                f(3),
                4 * (kk * pa_ + 64 * blk as u32)
            );
        }
        for blk in 0..tn / 4 {
            let f = |q: usize| format!("%fb{}", 4 * blk + q);
            emit!(
                a,
                "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [%rdb+{}];",
                f(0),
                f(1),
                f(2),
                f(3),
                4 * (kk * pb_ + 64 * blk as u32)
            );
        }
        for i in 0..tm {
            for j in 0..tn {
                let c = tn * i + j;
                emit!(a, "fma.rn.f32 %acc{c}, %fa{i}, %fb{j}, %acc{c};");
            }
        }
    }
    a.l("@%pu bra.uni $KSTEP;");

    a.label("$EPILOGUE");
    a.c("row i: bm0 + 64 (i / 4) + 4 ty + i % 4; column j likewise with bn0 and tx");
    a.l("shl.b32 %ty, %ty, 2;");
    a.l("shl.b32 %tx, %tx, 2;");
    let off = |i: usize| 64 * (i / 4) + i % 4;
    for i in 0..tm {
        emit!(a, "add.u32 %row, %bm0, %ty;");
        emit!(a, "add.u32 %row, %row, {};", off(i));
        emit!(a, "setp.lt.u32 %pr{i}, %row, %m;");
        emit!(a, "mul.wide.u32 %crow{i}, %row, %ldc;");
        emit!(a, "shl.b64 %crow{i}, %crow{i}, {};", osz.trailing_zeros());
        emit!(a, "add.u64 %crow{i}, %crow{i}, %pc;");
    }
    for j in 0..tn {
        emit!(a, "add.u32 %row, %bn0, %tx;");
        emit!(a, "add.u32 %row, %row, {};", off(j));
        emit!(a, "setp.lt.u32 %pcol{j}, %row, %n;");
        emit!(a, "mul.wide.u32 %ccol{j}, %row, {osz};");
    }
    let elem_pred = |a: &mut Asm, i: usize, j: usize| {
        emit!(a, "and.pred %pe, %pr{i}, %pcol{j};");
        emit!(a, "add.u64 %t64, %crow{i}, %ccol{j};");
    };
    a.c("1. v = alpha acc");
    for i in 0..tm * tn {
        emit!(a, "mul.rn.f32 %acc{i}, %acc{i}, %alpha;");
    }
    a.c("2. v += beta C, only when beta != 0");
    a.l("setp.eq.f32 %pu, %beta, 0f00000000;");
    a.l("@%pu bra.uni $NO_BETA;");
    for i in 0..tm {
        for j in 0..tn {
            elem_pred(&mut a, i, j);
            ld_pred(&mut a, s.output, "%pe", "%t64", "%w");
            let c = tn * i + j;
            emit!(a, "fma.rn.f32 %acc{c}, %beta, %w, %acc{c};");
        }
    }
    a.label("$NO_BETA");
    a.c("3. v += bias[col] (FLAG_BIAS)");
    emit!(a, "and.b32 %row, %flags, {};", crate::gemm::FLAG_BIAS);
    a.l("setp.eq.u32 %pu, %row, 0;");
    a.l("@%pu bra.uni $NO_BIAS;");
    for j in 0..tn {
        emit!(a, "add.u32 %row, %bn0, %tx;");
        emit!(a, "add.u32 %row, %row, {};", off(j));
        emit!(a, "mul.wide.u32 %t64, %row, {isz};");
        a.l("add.u64 %t64, %t64, %pbias;");
        ld_pred(
            &mut a,
            s.input,
            &format!("%pcol{j}"),
            "%t64",
            &format!("%fb{j}"),
        );
        for i in 0..tm {
            let c = tn * i + j;
            emit!(a, "add.rn.f32 %acc{c}, %acc{c}, %fb{j};");
        }
    }
    a.label("$NO_BIAS");
    a.c("4. GELU (FLAG_GELU): v / (1 + 2^(scale (v + 0.044715 v^3)))");
    emit!(a, "and.b32 %row, %flags, {};", crate::gemm::FLAG_GELU);
    a.l("setp.eq.u32 %pu, %row, 0;");
    a.l("@%pu bra.uni $NO_GELU;");
    let scale = (-2.0 * (2.0f64 / std::f64::consts::PI).sqrt() * std::f64::consts::LOG2_E) as f32;
    for i in 0..tm * tn {
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
    for i in 0..tm {
        for j in 0..tn {
            elem_pred(&mut a, i, j);
            let v = format!("%acc{}", tn * i + j);
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
    // 256 threads; the 8 x 8 tile asks for two blocks per SM (at most 128 registers).
    let perf = if t == LARGE {
        ".maxntid 256, 1, 1\n.minnctapersm 2\n"
    } else {
        ".maxntid 256, 1, 1\n"
    };
    a.s.replacen("\n)\n{\n", &format!("\n)\n{perf}{{\n"), 1)
}

fn module_ptx(specs: &[&Spec]) -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for sp in specs {
        s.push_str(&kernel(sp));
    }
    Cow::Owned(s)
}

fn geometry_of(t: &SimtTile, p: &Problem) -> Geometry {
    Geometry {
        grid: t.grid(p),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}
/// [`SMALL`]: grid `(ceil(n / 64), ceil(m / 64), batch)`, 256 threads.
pub fn geometry(p: &Problem) -> Geometry {
    geometry_of(&SMALL, p)
}
/// [`LARGE`]: grid `(ceil(n / 128), ceil(m / 128), batch)`, 256 threads.
pub fn geometry_large(p: &Problem) -> Geometry {
    geometry_of(&LARGE, p)
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

use crate::gemm::batched::args;

const ARGS_F32: [Arg; 16] = args(Elem::F32, Elem::F32);
const ARGS_BF16_BF16: [Arg; 16] = args(Elem::BF16, Elem::BF16);
const ARGS_BF16_F32: [Arg; 16] = args(Elem::BF16, Elem::F32);
const ARGS_F16_F16: [Arg; 16] = args(Elem::F16, Elem::F16);
const ARGS_F16_F32: [Arg; 16] = args(Elem::F16, Elem::F32);

/// Declares the modules (one per operand type) and their kernels.
macro_rules! family {
    ($( $module:ident, $mname:literal, $ptx_fn:ident, $tile:ident, $geom:ident: [
        $( $kd:ident, $spec:ident = $entry:literal, $a:ident, $b:ident, $in:ident, $out:ident,
           $args:ident, $cost:ident; )* ] )*) => {
        $(
            $(
                static $spec: Spec = Spec {
                    entry: $entry,
                    tile: $tile,
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
                    geometry: $geom,
                    cost: $cost,
                    summary: "C[z] = act(alpha op(A[z]) op(B[z]) + beta C[z] + bias), f32 FMA, batched",
                };
            )*
        )*
        /// Every module of this family.
        pub static MODULES: &[&Module] = &[$(&$module),*];
        /// Every kernel with its (tile, op_a, op_b, input, output).
        pub static TABLE: &[(SimtTile, Op, Op, Elem, Elem, &KernelDesc)] = &[
            $( $( ($tile, Op::$a, Op::$b, Elem::$in, Elem::$out, &$kd), )* )*
        ];
    };
}

family! {
    SIMT_F32, "gemm_simt_f32", ptx_f32, SMALL, geometry: [
        NN_F32, S_NN_F32 = "lathe_gemm_simt_nn_f32_f32", N, N, F32, F32, ARGS_F32, cost_f32;
        NT_F32, S_NT_F32 = "lathe_gemm_simt_nt_f32_f32", N, T, F32, F32, ARGS_F32, cost_f32;
        TN_F32, S_TN_F32 = "lathe_gemm_simt_tn_f32_f32", T, N, F32, F32, ARGS_F32, cost_f32;
        TT_F32, S_TT_F32 = "lathe_gemm_simt_tt_f32_f32", T, T, F32, F32, ARGS_F32, cost_f32;
    ]
    SIMT_BF16, "gemm_simt_bf16", ptx_bf16, SMALL, geometry: [
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
    SIMT_F16, "gemm_simt_f16", ptx_f16, SMALL, geometry: [
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
    SIMT128_F32, "gemm_simt128_f32", ptx128_f32, LARGE, geometry_large: [
        NN128_F32, S128_NN_F32 = "lathe_gemm_simt128_nn_f32_f32", N, N, F32, F32, ARGS_F32,
            cost_f32;
        NT128_F32, S128_NT_F32 = "lathe_gemm_simt128_nt_f32_f32", N, T, F32, F32, ARGS_F32,
            cost_f32;
        TN128_F32, S128_TN_F32 = "lathe_gemm_simt128_tn_f32_f32", T, N, F32, F32, ARGS_F32,
            cost_f32;
        TT128_F32, S128_TT_F32 = "lathe_gemm_simt128_tt_f32_f32", T, T, F32, F32, ARGS_F32,
            cost_f32;
    ]
}

/// Every module of this family.
pub fn modules() -> Vec<&'static Module> {
    MODULES.to_vec()
}

/// Every kernel of this family.
pub fn kernels() -> Vec<&'static KernelDesc> {
    TABLE.iter().map(|r| r.5).collect()
}

/// The [`SMALL`]-tile kernel for a storage and element types: `input` f32 (output f32), or
/// bf16 / f16 (output the input type or f32).
pub fn kernel_for(op_a: Op, op_b: Op, input: Elem, output: Elem) -> Option<&'static KernelDesc> {
    kernel_for_tile(SMALL, op_a, op_b, input, output)
}

/// The kernel of a tile ([`LARGE`] exists for f32 operands and output only).
pub fn kernel_for_tile(
    tile: SimtTile,
    op_a: Op,
    op_b: Op,
    input: Elem,
    output: Elem,
) -> Option<&'static KernelDesc> {
    TABLE
        .iter()
        .find(|r| r.0 == tile && r.1 == op_a && r.2 == op_b && r.3 == input && r.4 == output)
        .map(|r| r.5)
}

/// The tile for a problem on a GPU with `sms` multiprocessors: [`LARGE`] when it still gives
/// every SM two blocks, else [`SMALL`] (more, smaller blocks for narrow products and heads).
pub fn pick_tile(p: &Problem, sms: u32) -> SimtTile {
    let (x, y, z) = LARGE.grid(p);
    if x as u64 * y as u64 * z as u64 >= 2 * sms as u64 {
        LARGE
    } else {
        SMALL
    }
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
        if self.gemm.m.div_ceil(SMALL.bm as usize) > MAX_BATCH {
            return Err(GemmError::TooLarge {
                what: "m",
                value: self.gemm.m,
                limit: MAX_BATCH * SMALL.bm as usize,
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

    /// Every tile, layout and operand width on whole tiles (K = two steps, two batches) on the
    /// simulated device: the result matches the twin and shared memory has no bank conflict.
    #[test]
    fn whole_tiles_are_bank_conflict_free_on_the_simulator() {
        use crate::rng::Rng;
        use crate::simtest::{Arg as A, Gpu};
        use crate::tolerance::{check_close, rel_tolerance};
        use half::bf16;
        let mut rng = Rng::new(0x51);
        let cases = [
            (SMALL, &[Elem::F32, Elem::BF16][..]),
            (LARGE, &[Elem::F32][..]),
        ];
        let ops = [
            (Op::N, Op::N),
            (Op::N, Op::T),
            (Op::T, Op::N),
            (Op::T, Op::T),
        ];
        for (tile, op_a, op_b, inputs) in cases
            .iter()
            .flat_map(|&(t, i)| ops.iter().map(move |&(a, b)| (t, a, b, i)))
        {
            let g = Gemm::new(tile.bm as usize, tile.bn as usize, 2 * tile.bk as usize);
            let bg = Batched::packed(g.with_ops(op_a, op_b), 2);
            let a = rng.vec_f32(bg.a_len(), -1.0, 1.0);
            let b = rng.vec_f32(bg.b_len(), -1.0, 1.0);
            let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            for &input in inputs {
                let mut gpu = Gpu::new();
                let (pa, pb) = match input {
                    Elem::F32 => (gpu.upload(&a), gpu.upload(&b)),
                    _ => (gpu.upload(&a16), gpu.upload(&b16)),
                };
                let pc = gpu.alloc_bytes(4 * bg.c_len());
                let k = kernel_for_tile(tile, op_a, op_b, input, Elem::F32).unwrap();
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
