//! Plain row softmax (no mask), forward and backward, for the autograd tape's `softmax` op.
//!
//! Rows of `c` elements, f32 arithmetic, f32 / bf16 / f16 storage:
//!
//! ```text
//! forward:  m = max_j x_j,  s = sum_j exp(x_j - m),  y_j = exp(x_j - m) / s
//! backward: d = sum_j dy_j y_j,                        dx_j = y_j (dy_j - d)
//! ```
//!
//! # Launch
//! One 256-thread block per row (`grid.x = rows`). Pass 1 reduces the row (an online max / sum
//! with `exp` through `ex2.approx`, or the dot product), 4 elements at a time through vector
//! loads when `c % 4 == 0` and the buffers are aligned; warp butterflies, then every thread
//! folds the 8 warp results in the same order (all threads hold the same bits, run after run).
//! Pass 2 re-reads the row (from L1 / L2) and writes it. An output may alias its input.
//!
//! # Cost
//! Forward: `5 rows c` FLOPs, `2 rows c size(dt)` bytes. Backward: `4 rows c` FLOPs,
//! `3 rows c size(dt)` bytes.

use super::ptxgen::{
    Asm, SOFTMAX_EMPTY_MAX, emit, entry, exp_minus, f32_imm, ld_ptr, ld_row, log2_size, prelude,
    regs, row_loop, softmax_combine, softmax_fold, softmax_regs, softmax_warp, st_row, vec_ok,
    warp_sum,
};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block (one block per row).
pub const THREADS: u32 = 256;
const WARPS: u32 = THREADS / 32;

/// `%row` (exits past `rows`), `%tx`, `%lane`, `%warp`, and `%r_{p}` = row base of each
/// pointer register `%p_{p}`; `%pvec` when all are aligned and `c % 4 == 0`.
fn row_setup(a: &mut Asm, dt: Elem, ptrs: &[&str]) {
    a.l("mov.u32 %row, %ctaid.x;");
    a.l("setp.ge.u32 %pq, %row, %rows;");
    a.l("@%pq bra $DONE;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.l("mul.wide.u32 %off, %row, %c;");
    emit!(a, "shl.b64 %off, %off, {};", log2_size(dt));
    for p in ptrs {
        emit!(a, "add.u64 %r_{p}, %p_{p}, %off;");
    }
    let vw = 4 * dt.size();
    let regs: Vec<String> = ptrs.iter().map(|p| format!("%p_{p}")).collect();
    let list: Vec<(&str, usize)> = regs.iter().map(|r| (r.as_str(), vw)).collect();
    vec_ok(a, "%pvec", &list, "%c", "%t64", "%t32");
}

/// Lane 0 of each warp stores `vals` (register, shared array) and the block waits.
fn to_shared(a: &mut Asm, vals: &[(&str, &str)]) {
    a.l("setp.ne.u32 %pq, %lane, 0;");
    a.l("shl.b32 %t32, %warp, 2;");
    for (reg, arr) in vals {
        emit!(a, "mov.u32 %k, {arr};");
        a.l("add.u32 %k, %k, %t32;");
        emit!(a, "@!%pq st.shared.f32 [%k], {reg};");
    }
    a.l("bar.sync 0;");
}

fn forward(name: &str, dt: Elem) -> String {
    let nthr = format!("{THREADS}");
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[("x", "u64"), ("y", "u64"), ("rows", "u32"), ("c", "u32")],
    );
    emit!(a, ".shared .align 4 .f32 s_m[{WARPS}];");
    emit!(a, ".shared .align 4 .f32 s_s[{WARPS}];");
    prelude(&mut a);
    softmax_regs(&mut a);
    a.l(".reg .b64 %p_x, %p_y, %r_x, %r_y, %off, %t64;");
    a.l(".reg .b32 %rows, %c, %row, %tx, %lane, %warp, %t32, %k;");
    a.l(".reg .f32 %m, %s, %inv, %x<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq;");
    ld_ptr(&mut a, "%p_x", "x");
    ld_ptr(&mut a, "%p_y", "y");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %c, [p_c];");
    row_setup(&mut a, dt, &["x", "y"]);
    emit!(a, "mov.f32 %m, {};", f32_imm(SOFTMAX_EMPTY_MAX));
    a.l("mov.f32 %s, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let x = regs("%x", w);
            ld_row(a, dt, "%r_x", col, &x);
            softmax_fold(a, "%m", "%s", &x);
        },
    );
    softmax_warp(&mut a, "%m", "%s");
    to_shared(&mut a, &[("%m", "s_m"), ("%s", "s_s")]);
    a.c("every thread folds the warp results in order");
    a.l("ld.shared.f32 %m, [s_m];");
    a.l("ld.shared.f32 %s, [s_s];");
    for w in 1..WARPS {
        emit!(a, "ld.shared.f32 %smx_mo, [s_m+{}];", 4 * w);
        emit!(a, "ld.shared.f32 %smx_so, [s_s+{}];", 4 * w);
        softmax_combine(&mut a, "%m", "%s", "%smx_mo", "%smx_so");
    }
    a.l("rcp.rn.f32 %inv, %s;");
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let (x, o) = (regs("%x", w), regs("%o", w));
            ld_row(a, dt, "%r_x", col, &x);
            for l in 0..w {
                exp_minus(a, &o[l], &x[l], "%m");
                emit!(a, "mul.f32 {}, {}, %inv;", o[l], o[l]);
            }
            st_row(a, dt, "%r_y", col, &o);
        },
    );
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn backward(name: &str, dt: Elem) -> String {
    let nthr = format!("{THREADS}");
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("y", "u64"),
            ("dy", "u64"),
            ("dx", "u64"),
            ("rows", "u32"),
            ("c", "u32"),
        ],
    );
    emit!(a, ".shared .align 4 .f32 s_d[{WARPS}];");
    prelude(&mut a);
    a.l(".reg .b64 %p_y, %p_dy, %p_dx, %r_y, %r_dy, %r_dx, %off, %t64;");
    a.l(".reg .b32 %rows, %c, %row, %tx, %lane, %warp, %t32, %k;");
    a.l(".reg .f32 %d, %tmp, %y<4>, %g<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq;");
    ld_ptr(&mut a, "%p_y", "y");
    ld_ptr(&mut a, "%p_dy", "dy");
    ld_ptr(&mut a, "%p_dx", "dx");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %c, [p_c];");
    row_setup(&mut a, dt, &["y", "dy", "dx"]);
    a.l("mov.f32 %d, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let (y, g) = (regs("%y", w), regs("%g", w));
            ld_row(a, dt, "%r_y", col, &y);
            ld_row(a, dt, "%r_dy", col, &g);
            for l in 0..w {
                emit!(a, "fma.rn.f32 %d, {}, {}, %d;", y[l], g[l]);
            }
        },
    );
    warp_sum(&mut a, "%d", "%tmp");
    to_shared(&mut a, &[("%d", "s_d")]);
    a.c("every thread sums the warp results in order");
    a.l("ld.shared.f32 %d, [s_d];");
    for w in 1..WARPS {
        emit!(a, "ld.shared.f32 %tmp, [s_d+{}];", 4 * w);
        a.l("add.f32 %d, %d, %tmp;");
    }
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%tx",
        &nthr,
        "%c",
        &mut |a, col, w| {
            let (y, g, o) = (regs("%y", w), regs("%g", w), regs("%o", w));
            ld_row(a, dt, "%r_y", col, &y);
            ld_row(a, dt, "%r_dy", col, &g);
            for l in 0..w {
                emit!(a, "sub.f32 {}, {}, %d;", o[l], g[l]);
                emit!(a, "mul.f32 {}, {}, {};", o[l], o[l], y[l]);
            }
            st_row(a, dt, "%r_dx", col, &o);
        },
    );
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (i, dt) in super::ACT_DTYPES.into_iter().enumerate() {
        s.push_str(&forward(FORWARD[i].entry, dt));
        s.push_str(&backward(BACKWARD[i].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_softmax",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// `Problem { batch: rows, n: c }`: one block per row.
fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.batch.max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

const fn fwd_args(e: Elem) -> [Arg; 4] {
    [
        arg("x", ArgKind::In(e)),
        arg("y", ArgKind::Out(e)),
        arg("rows", ArgKind::U32),
        arg("c", ArgKind::U32),
    ]
}
const fn bwd_args(e: Elem) -> [Arg; 5] {
    [
        arg("y", ArgKind::In(e)),
        arg("dy", ArgKind::In(e)),
        arg("dx", ArgKind::Out(e)),
        arg("rows", ArgKind::U32),
        arg("c", ArgKind::U32),
    ]
}

const FWD_F32: [Arg; 4] = fwd_args(Elem::F32);
const FWD_BF16: [Arg; 4] = fwd_args(Elem::BF16);
const FWD_F16: [Arg; 4] = fwd_args(Elem::F16);
const BWD_F32: [Arg; 5] = bwd_args(Elem::F32);
const BWD_BF16: [Arg; 5] = bwd_args(Elem::BF16);
const BWD_F16: [Arg; 5] = bwd_args(Elem::F16);

macro_rules! softmax_descs {
    ($f:ident, $b:ident, $fa:ident, $ba:ident, $sfx:literal, $size:literal) => {
        #[doc = "`Problem { batch: rows, n: c }`: `y (rows, c) = softmax(x (rows, c))`."]
        #[doc = concat!("Storage ", $sfx, ".")]
        pub static $f: KernelDesc = KernelDesc {
            entry: concat!("lathe_softmax_fwd_", $sfx),
            module: &MODULE,
            args: &$fa,
            geometry,
            cost: |p| Cost {
                flops: 5 * p.batch * p.n,
                bytes: 2 * $size * p.batch * p.n,
            },
            summary: "row softmax forward",
        };
        #[doc = "`Problem { batch: rows, n: c }`: `dx = y (dy - sum(dy y))` per row."]
        #[doc = concat!("Storage ", $sfx, ".")]
        pub static $b: KernelDesc = KernelDesc {
            entry: concat!("lathe_softmax_bwd_", $sfx),
            module: &MODULE,
            args: &$ba,
            geometry,
            cost: |p| Cost {
                flops: 4 * p.batch * p.n,
                bytes: 3 * $size * p.batch * p.n,
            },
            summary: "row softmax backward from the output",
        };
    };
}

softmax_descs!(SOFTMAX_FWD_F32, SOFTMAX_BWD_F32, FWD_F32, BWD_F32, "f32", 4);
softmax_descs!(
    SOFTMAX_FWD_BF16,
    SOFTMAX_BWD_BF16,
    FWD_BF16,
    BWD_BF16,
    "bf16",
    2
);
softmax_descs!(SOFTMAX_FWD_F16, SOFTMAX_BWD_F16, FWD_F16, BWD_F16, "f16", 2);

const FORWARD: [&KernelDesc; 3] = [&SOFTMAX_FWD_F32, &SOFTMAX_FWD_BF16, &SOFTMAX_FWD_F16];
const BACKWARD: [&KernelDesc; 3] = [&SOFTMAX_BWD_F32, &SOFTMAX_BWD_BF16, &SOFTMAX_BWD_F16];

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &SOFTMAX_FWD_F32,
    &SOFTMAX_BWD_F32,
    &SOFTMAX_FWD_BF16,
    &SOFTMAX_BWD_BF16,
    &SOFTMAX_FWD_F16,
    &SOFTMAX_BWD_F16,
];

/// The forward kernel of a dtype.
pub fn forward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, FORWARD)
}
/// The backward kernel of a dtype.
pub fn backward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, BACKWARD)
}

/// CPU twins: reductions in f64, each output rounded once.
pub mod twin {
    use crate::elementwise::twin::Float;

    pub fn forward<T: Float>(x: &[T], y: &mut [T], c: usize) {
        for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
            let m = xr
                .iter()
                .map(|v| v.to_f32() as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = xr.iter().map(|v| (v.to_f32() as f64 - m).exp()).sum();
            for (o, v) in yr.iter_mut().zip(xr) {
                *o = T::from_f32(((v.to_f32() as f64 - m).exp() / s) as f32);
            }
        }
    }

    pub fn backward<T: Float>(y: &[T], dy: &[T], dx: &mut [T], c: usize) {
        for ((yr, gr), dr) in y.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
            let d: f64 = yr
                .iter()
                .zip(gr)
                .map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64)
                .sum();
            for ((o, a), b) in dr.iter_mut().zip(yr).zip(gr) {
                let a = a.to_f32() as f64;
                *o = T::from_f32((a * (b.to_f32() as f64 - d)) as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use crate::rng::Rng;

    #[test]
    fn rows_sum_to_one_and_gradients_to_zero() {
        let c = 9;
        let x = Rng::new(4).vec_f32(3 * c, -4.0, 4.0);
        let mut y = vec![0f32; 3 * c];
        forward(&x, &mut y, c);
        let dy = Rng::new(5).vec_f32(3 * c, -1.0, 1.0);
        let mut dx = vec![0f32; 3 * c];
        backward(&y, &dy, &mut dx, c);
        for r in 0..3 {
            let s: f32 = y[r * c..(r + 1) * c].iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
            let g: f32 = dx[r * c..(r + 1) * c].iter().sum();
            assert!(g.abs() < 1e-6);
        }
    }
}
