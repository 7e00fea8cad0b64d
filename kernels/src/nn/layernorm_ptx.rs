//! PTX of the layernorm kernels (see `layernorm` for the math and the launch contract).
//!
//! Forward, one warp per row (8 rows a 256-thread block): three passes over the row (sum,
//! sum of squared deviations, normalise), each lane taking groups of 4 columns `4 (lane + 32 k)`
//! through 16 / 8-byte vector loads when `C % 4 == 0` and the buffers are aligned, else
//! columns `lane + 32 k` one at a time. Passes 2 and 3 re-read the row (L1/L2 hits for rows
//! up to a few KB). Statistics in f32, warp butterflies (every lane ends with the same bits).
//!
//! Backward, one 128-thread block per group of consecutive rows (the grid is a function of the
//! row count alone): the block walks its rows one at a time. Thread `t` owns the same columns
//! in every row (the row loop's assignment), so it accumulates `dweight += dout * xhat` and
//! `dbias += dout` for its columns in dynamic shared memory without any other thread touching
//! them, row after row in order: deterministic, no atomics. The two row sums of the dx formula
//! are block reductions (warp butterflies, then the 4 warp values in order through a
//! double-buffered shared slot: row r uses slot r % 2, and the barrier of row r+1 keeps row r+2
//! from overwriting a slot a slow warp still reads). At the end the block writes its partial
//! `(dweight | dbias)` row of `2 C` floats; `colsum` folds the partials in a fixed order.

use super::layernorm::{BWD_THREADS, FWD_ROWS_PER_BLOCK};
use super::ptxgen::{
    Asm, DYN_SMEM, emit, entry, ld_ptr, ld_row, log2_size, prelude, regs, row_loop, st_row, vec_ok,
    warp_sum,
};
use crate::desc::Elem;

/// Registers `%{p}0..3` (width 4) or `%{p}0` (width 1).
fn lanes(p: &str, width: usize) -> Vec<String> {
    regs(&format!("%{p}"), width)
}

/// `dst = base + row * c * size(dt)` for the u32 registers `row`, `c`.
fn row_base(a: &mut Asm, dt: Elem, dst: &str, base: &str, row: &str, c: &str) {
    emit!(a, "mul.wide.u32 {dst}, {row}, {c};");
    emit!(a, "shl.b64 {dst}, {dst}, {};", log2_size(dt));
    emit!(a, "add.u64 {dst}, {base}, {dst};");
}

/// Forward: `entry(x, weight, bias, out, mean, rstd, rows, c, eps)`.
pub(crate) fn forward(name: &str, dt: Elem) -> String {
    let vw = 4 * dt.size();
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("x", "u64"),
            ("weight", "u64"),
            ("bias", "u64"),
            ("out", "u64"),
            ("mean", "u64"),
            ("rstd", "u64"),
            ("rows", "u32"),
            ("c", "u32"),
            ("eps", "f32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %px, %pw, %pb, %po, %pmean, %prstd, %xrow, %orow, %t64;");
    a.l(".reg .b32 %rows, %c, %tx, %lane, %row, %t32;");
    a.l(".reg .f32 %sum, %var, %mean, %rstd, %invc, %eps, %t, %d;");
    a.l(".reg .f32 %x<4>, %w<4>, %b<4>, %y<4>;");
    a.l(".reg .pred %pvec, %pq;");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %c, [p_c];");
    a.l("ld.param.f32 %eps, [p_eps];");
    a.c("row = blockIdx.x * 8 + warp; lane = threadIdx.x % 32");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %row, %tx, 5;");
    a.l("mov.u32 %t32, %ctaid.x;");
    emit!(a, "mad.lo.u32 %row, %t32, {FWD_ROWS_PER_BLOCK}, %row;");
    a.l("setp.ge.u32 %pq, %row, %rows;");
    a.l("@%pq bra $DONE;");
    for (r, p) in [
        ("%px", "x"),
        ("%pw", "weight"),
        ("%pb", "bias"),
        ("%po", "out"),
        ("%pmean", "mean"),
        ("%prstd", "rstd"),
    ] {
        ld_ptr(&mut a, r, p);
    }
    vec_ok(
        &mut a,
        "%pvec",
        &[("%px", vw), ("%pw", vw), ("%pb", vw), ("%po", vw)],
        "%c",
        "%t64",
        "%t32",
    );
    row_base(&mut a, dt, "%xrow", "%px", "%row", "%c");
    row_base(&mut a, dt, "%orow", "%po", "%row", "%c");
    a.c("pass 1: mean");
    a.l("mov.f32 %sum, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%lane",
        "32",
        "%c",
        &mut |a, col, w| {
            let x = lanes("x", w);
            ld_row(a, dt, "%xrow", col, &x);
            for xi in &x {
                emit!(a, "add.f32 %sum, %sum, {xi};");
            }
        },
    );
    warp_sum(&mut a, "%sum", "%t");
    a.l("cvt.rn.f32.u32 %t, %c;");
    a.l("rcp.rn.f32 %invc, %t;");
    a.l("mul.rn.f32 %mean, %sum, %invc;");
    a.c("pass 2: variance about the mean");
    a.l("mov.f32 %var, 0f00000000;");
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%lane",
        "32",
        "%c",
        &mut |a, col, w| {
            let x = lanes("x", w);
            ld_row(a, dt, "%xrow", col, &x);
            for xi in &x {
                emit!(a, "sub.f32 %d, {xi}, %mean;");
                a.l("fma.rn.f32 %var, %d, %d, %var;");
            }
        },
    );
    warp_sum(&mut a, "%var", "%t");
    a.c("rstd = 1 / sqrt(var / C + eps)");
    a.l("mul.rn.f32 %var, %var, %invc;");
    a.l("add.rn.f32 %var, %var, %eps;");
    a.l("sqrt.rn.f32 %var, %var;");
    a.l("rcp.rn.f32 %rstd, %var;");
    a.c("pass 3: out = (x - mean) * rstd * weight + bias");
    row_loop(
        &mut a,
        "p3",
        "%pvec",
        "%lane",
        "32",
        "%c",
        &mut |a, col, w| {
            let (x, wt, b, y) = (lanes("x", w), lanes("w", w), lanes("b", w), lanes("y", w));
            ld_row(a, dt, "%xrow", col, &x);
            ld_row(a, dt, "%pw", col, &wt);
            ld_row(a, dt, "%pb", col, &b);
            for l in 0..w {
                emit!(a, "sub.rn.f32 {}, {}, %mean;", y[l], x[l]);
                emit!(a, "mul.rn.f32 {}, {}, %rstd;", y[l], y[l]);
                emit!(a, "mul.rn.f32 {}, {}, {};", y[l], y[l], wt[l]);
                emit!(a, "add.rn.f32 {}, {}, {};", y[l], y[l], b[l]);
            }
            st_row(a, dt, "%orow", col, &y);
        },
    );
    a.l("setp.ne.u32 %pq, %lane, 0;");
    a.l("@%pq bra $DONE;");
    a.l("mul.wide.u32 %t64, %row, 4;");
    a.l("add.u64 %ad, %pmean, %t64;");
    a.l("st.global.f32 [%ad], %mean;");
    a.l("add.u64 %ad, %prstd, %t64;");
    a.l("st.global.f32 [%ad], %rstd;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// `%sa = s_acc + 4 * (col + off)` (shared address, u32), `off` a u32 register or 0.
fn acc_addr(a: &mut Asm, col: &str, off: &str) {
    emit!(a, "add.u32 %sa, {col}, {off};");
    a.l("shl.b32 %sa, %sa, 2;");
    a.l("add.u32 %sa, %sa, %sbase;");
}

/// Loads (`st = false`) or stores the accumulator lanes `regs` at `%sa`.
fn acc_io(a: &mut Asm, regs: &[String], st: bool) {
    if regs.len() == 4 {
        let list = format!("{{{}, {}, {}, {}}}", regs[0], regs[1], regs[2], regs[3]);
        if st {
            emit!(a, "st.shared.v4.f32 [%sa], {list};");
        } else {
            emit!(a, "ld.shared.v4.f32 {list}, [%sa];");
        }
    } else if st {
        emit!(a, "st.shared.f32 [%sa], {};", regs[0]);
    } else {
        emit!(a, "ld.shared.f32 {}, [%sa];", regs[0]);
    }
}

/// Backward: `entry(dout, x, weight, mean, rstd, dx, partials, rows, c)`.
pub(crate) fn backward(name: &str, dt: Elem) -> String {
    let vw = 4 * dt.size();
    let warps = BWD_THREADS / 32;
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("dout", "u64"),
            ("x", "u64"),
            ("weight", "u64"),
            ("mean", "u64"),
            ("rstd", "u64"),
            ("dx", "u64"),
            ("partials", "u64"),
            ("rows", "u32"),
            ("c", "u32"),
        ],
    );
    a.c("row sums: [parity][sd | sdx][warp]");
    emit!(a, ".shared .align 4 .f32 s_red[{}];", 2 * 2 * warps);
    prelude(&mut a);
    a.l(".reg .b64 %pdo, %px, %pw, %pmean, %prstd, %pdx, %ppart, %drow, %xrow, %dxrow, %t64;");
    a.l(".reg .b32 %rows, %c, %tx, %lane, %warp, %cta, %ncta, %rpb, %r0, %r1, %r, %t32;");
    a.l(".reg .b32 %sbase, %sa, %red, %slot, %zero;");
    a.l(".reg .f32 %mean, %rstd, %invc, %sd, %sdx, %t, %dn, %xh, %zf;");
    a.l(".reg .f32 %d<4>, %x<4>, %w<4>, %aw<4>, %ab<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq;");
    for (r, p) in [
        ("%pdo", "dout"),
        ("%px", "x"),
        ("%pw", "weight"),
        ("%pmean", "mean"),
        ("%prstd", "rstd"),
        ("%pdx", "dx"),
        ("%ppart", "partials"),
    ] {
        ld_ptr(&mut a, r, p);
    }
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %c, [p_c];");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.l("mov.u32 %cta, %ctaid.x;");
    a.l("mov.u32 %ncta, %nctaid.x;");
    a.c("dynamic shared memory: dweight partial at [0, C), dbias partial at [C, 2C) (f32)");
    emit!(a, "mov.u32 %sbase, {DYN_SMEM};");
    a.l("mov.u32 %red, s_red;");
    a.l("mov.u32 %zero, 0;");
    a.l("mov.f32 %zf, 0f00000000;");
    a.c("rows of this block: [r0, r1), rpb = ceil(rows / gridDim.x)");
    a.l("add.u32 %rpb, %rows, %ncta;");
    a.l("sub.u32 %rpb, %rpb, 1;");
    a.l("div.u32 %rpb, %rpb, %ncta;");
    a.l("mul.lo.u32 %r0, %cta, %rpb;");
    a.l("add.u32 %r1, %r0, %rpb;");
    a.l("min.u32 %r1, %r1, %rows;");
    a.l("cvt.rn.f32.u32 %t, %c;");
    a.l("rcp.rn.f32 %invc, %t;");
    vec_ok(
        &mut a,
        "%pvec",
        &[
            ("%pdo", vw),
            ("%px", vw),
            ("%pw", vw),
            ("%pdx", vw),
            ("%ppart", 16),
        ],
        "%c",
        "%t64",
        "%t32",
    );
    a.c("zero this thread's accumulator columns");
    let nthr = format!("{BWD_THREADS}");
    row_loop(
        &mut a,
        "z",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let z: Vec<String> = (0..w).map(|_| "%zf".to_string()).collect();
            acc_addr(a, col, "%zero");
            acc_io(a, &z, true);
            acc_addr(a, col, "%c");
            acc_io(a, &z, true);
        },
    );
    a.l("mov.u32 %r, %r0;");
    a.label("$ROW");
    a.l("setp.ge.u32 %pq, %r, %r1;");
    a.l("@%pq bra $ROWS_DONE;");
    a.l("mul.wide.u32 %t64, %r, 4;");
    a.l("add.u64 %ad, %pmean, %t64;");
    a.l("ld.global.f32 %mean, [%ad];");
    a.l("add.u64 %ad, %prstd, %t64;");
    a.l("ld.global.f32 %rstd, [%ad];");
    row_base(&mut a, dt, "%drow", "%pdo", "%r", "%c");
    row_base(&mut a, dt, "%xrow", "%px", "%r", "%c");
    row_base(&mut a, dt, "%dxrow", "%pdx", "%r", "%c");
    a.c("pass 1: row sums of dn = dout * w and dn * xhat; weight/bias gradient accumulators");
    a.l("mov.f32 %sd, 0f00000000;");
    a.l("mov.f32 %sdx, 0f00000000;");
    row_loop(
        &mut a,
        "a",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let (d, x, wt, aw, ab) = (
                lanes("d", w),
                lanes("x", w),
                lanes("w", w),
                lanes("aw", w),
                lanes("ab", w),
            );
            ld_row(a, dt, "%drow", col, &d);
            ld_row(a, dt, "%xrow", col, &x);
            ld_row(a, dt, "%pw", col, &wt);
            acc_addr(a, col, "%zero");
            acc_io(a, &aw, false);
            for l in 0..w {
                emit!(a, "sub.rn.f32 %xh, {}, %mean;", x[l]);
                a.l("mul.rn.f32 %xh, %xh, %rstd;");
                emit!(a, "mul.rn.f32 %dn, {}, {};", d[l], wt[l]);
                a.l("add.f32 %sd, %sd, %dn;");
                a.l("fma.rn.f32 %sdx, %dn, %xh, %sdx;");
                emit!(a, "mul.rn.f32 %t, {}, %xh;", d[l]);
                emit!(a, "add.rn.f32 {}, {}, %t;", aw[l], aw[l]);
            }
            acc_io(a, &aw, true);
            acc_addr(a, col, "%c");
            acc_io(a, &ab, false);
            for l in 0..w {
                emit!(a, "add.rn.f32 {}, {}, {};", ab[l], ab[l], d[l]);
            }
            acc_io(a, &ab, true);
        },
    );
    warp_sum(&mut a, "%sd", "%t");
    warp_sum(&mut a, "%sdx", "%t");
    a.c("slot = s_red + 4 * 2 * warps * ((r - r0) % 2)");
    a.l("sub.u32 %slot, %r, %r0;");
    a.l("and.b32 %slot, %slot, 1;");
    emit!(a, "mul.lo.u32 %slot, %slot, {};", 4 * 2 * warps);
    a.l("add.u32 %slot, %slot, %red;");
    a.l("setp.eq.u32 %pq, %lane, 0;");
    a.l("shl.b32 %t32, %warp, 2;");
    a.l("add.u32 %t32, %t32, %slot;");
    a.l("@%pq st.shared.f32 [%t32], %sd;");
    emit!(a, "@%pq st.shared.f32 [%t32+{}], %sdx;", 4 * warps);
    a.l("bar.sync 0;");
    a.l("ld.shared.f32 %sd, [%slot];");
    emit!(a, "ld.shared.f32 %sdx, [%slot+{}];", 4 * warps);
    for k in 1..warps {
        emit!(a, "ld.shared.f32 %t, [%slot+{}];", 4 * k);
        a.l("add.f32 %sd, %sd, %t;");
        emit!(a, "ld.shared.f32 %t, [%slot+{}];", 4 * (warps + k));
        a.l("add.f32 %sdx, %sdx, %t;");
    }
    a.l("mul.rn.f32 %sd, %sd, %invc;");
    a.l("mul.rn.f32 %sdx, %sdx, %invc;");
    a.c("pass 2: dx = (dout * w - sd - xhat * sdx) * rstd");
    row_loop(
        &mut a,
        "b",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let (d, x, wt, o) = (lanes("d", w), lanes("x", w), lanes("w", w), lanes("o", w));
            ld_row(a, dt, "%drow", col, &d);
            ld_row(a, dt, "%xrow", col, &x);
            ld_row(a, dt, "%pw", col, &wt);
            for l in 0..w {
                emit!(a, "sub.rn.f32 %xh, {}, %mean;", x[l]);
                a.l("mul.rn.f32 %xh, %xh, %rstd;");
                emit!(a, "mul.rn.f32 %dn, {}, {};", d[l], wt[l]);
                emit!(a, "sub.rn.f32 {}, %dn, %sd;", o[l]);
                a.l("mul.rn.f32 %t, %xh, %sdx;");
                emit!(a, "sub.rn.f32 {}, {}, %t;", o[l], o[l]);
                emit!(a, "mul.rn.f32 {}, {}, %rstd;", o[l], o[l]);
            }
            st_row(a, dt, "%dxrow", col, &o);
        },
    );
    a.l("add.u32 %r, %r, 1;");
    a.l("bra $ROW;");
    a.label("$ROWS_DONE");
    a.c("this block's partial row: partials[blockIdx.x * 2C + j]");
    a.l("shl.b32 %t32, %c, 1;");
    a.l("mul.wide.u32 %t64, %cta, %t32;");
    a.l("shl.b64 %t64, %t64, 2;");
    a.l("add.u64 %t64, %ppart, %t64;");
    row_loop(
        &mut a,
        "w",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let aw = lanes("aw", w);
            acc_addr(a, col, "%zero");
            acc_io(a, &aw, false);
            st_f32_at(a, "%t64", col, "0", &aw);
            acc_addr(a, col, "%c");
            acc_io(a, &aw, false);
            st_f32_at(a, "%t64", col, "%c", &aw);
        },
    );
    a.l("ret;");
    a.l("}");
    a.s
}

/// Stores f32 `vals` at `base + 4 * (col + off)` in global memory.
fn st_f32_at(a: &mut Asm, base: &str, col: &str, off: &str, vals: &[String]) {
    emit!(a, "add.u32 %sa, {col}, {off};");
    a.l("mul.wide.u32 %ad, %sa, 4;");
    emit!(a, "add.u64 %ad, {base}, %ad;");
    super::ptxgen::st_at(a, Elem::F32, vals, "");
}
