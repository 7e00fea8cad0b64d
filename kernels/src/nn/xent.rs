//! Softmax cross-entropy with a saved logsumexp: the tape's `cross_entropy` op on the device,
//! forward and backward as two kernels (the fused [`super::classifier`] does both in one pass
//! but keeps no statistics; the tape needs the loss before it knows the gradient's scale).
//! A fused op with its own backward, written next to its forward.
//!
//! Per row `r` of `logits (rows, Vp)` with target `t = targets[r]`, over the first `V <= Vp`
//! columns:
//!
//! ```text
//! forward:  lse[r]    = log(sum_{j < V} exp(x_j))                         (f32)
//!           losses[r] = lse[r] - x_t, or 0 when t == ignore_index           (f32)
//! backward: dx_j      = (exp(x_j - lse[r]) - [j == t]) * (gscale[0] * factor)   for j < V
//!           dx_j      = 0                                                  for V <= j < Vp
//! ```
//!
//! `gscale` is a device f32 buffer whose element 0 is the incoming gradient of the loss (read
//! on the device: no host sync); `factor` is a host scalar (`1 / scored rows`). An ignored row
//! gets a zero gradient (its `lse` is still written). A target outside `[0, V)` that is not
//! the ignore index gives a NaN loss and a NaN gradient row, as the fused classifier does.
//!
//! # Launch
//! Both kernels: one 256-thread block per row (`grid.x = rows`). The forward folds an online
//! max / sum (`exp` through `ex2.approx`) over the real columns, 4 at a time through vector
//! loads when `Vp % 4 == 0` and the buffer is aligned, then warp butterflies and thread 0
//! folds the 8 warp results in order (deterministic). The backward is one pass over the row.
//!
//! # Cost
//! Forward: `4 rows V` FLOPs, `rows (V size(dt) + 12)` bytes (the padding is not read). Backward: `4 rows Vp` FLOPs,
//! `rows (2 Vp size(dt) + 8)` bytes.

use super::ptxgen::{
    Asm, SOFTMAX_EMPTY_MAX, emit, entry, exp_minus, f32_imm, ld_at_if, ld_ptr, ld_row, log2_size,
    prelude, regs, row_loop, softmax_combine, softmax_fold, softmax_regs, softmax_warp, st_row,
    vec_ok,
};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block (one block per row).
pub const THREADS: u32 = 256;
const WARPS: u32 = THREADS / 32;

/// Shared row setup: `%row` (exits past `rows`), `%tx`, `%lane`, `%warp`, `%tgt`, `%lrow`
/// (the logits row), `%pvec`, `%pign` (ignored row), `%pvalid` (target < V).
fn row_setup(a: &mut Asm, dt: Elem) {
    a.l("mov.u32 %row, %ctaid.x;");
    a.l("setp.ge.u32 %pq, %row, %rows;");
    a.l("@%pq bra $DONE;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.l("mul.wide.u32 %rw4, %row, 4;");
    a.l("add.u64 %ad, %ptg, %rw4;");
    a.l("ld.global.u32 %tgt, [%ad];");
    a.l("setp.eq.u32 %pign, %tgt, %ign;");
    a.l("setp.lt.u32 %pvalid, %tgt, %v;");
    a.l("mul.wide.u32 %lrow, %row, %vp;");
    emit!(a, "shl.b64 %lrow, %lrow, {};", log2_size(dt));
    a.l("add.u64 %lrow, %pl_, %lrow;");
    let vw = 4 * dt.size();
    vec_ok(a, "%pvec", &[("%pl_", vw)], "%vp", "%t64", "%t32");
}

fn forward(name: &str, dt: Elem) -> String {
    let nthr = format!("{THREADS}");
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("logits", "u64"),
            ("targets", "u64"),
            ("losses", "u64"),
            ("lse", "u64"),
            ("rows", "u32"),
            ("vp", "u32"),
            ("v", "u32"),
            ("ignore_index", "u32"),
        ],
    );
    emit!(a, ".shared .align 4 .f32 s_m[{WARPS}];");
    emit!(a, ".shared .align 4 .f32 s_s[{WARPS}];");
    prelude(&mut a);
    softmax_regs(&mut a);
    a.l(".reg .b64 %pl_, %ptg, %ploss, %plse, %lrow, %t64, %rw4;");
    a.l(".reg .b32 %rows, %vp, %v, %ign, %row, %tx, %lane, %warp, %tgt, %t32, %k;");
    a.l(".reg .f32 %m, %s, %xt, %lse, %loss;");
    a.l(".reg .f32 %x<4>;");
    a.l(".reg .pred %pvec, %pq, %pign, %pvalid;");
    ld_ptr(&mut a, "%pl_", "logits");
    ld_ptr(&mut a, "%ptg", "targets");
    ld_ptr(&mut a, "%ploss", "losses");
    ld_ptr(&mut a, "%plse", "lse");
    for p in ["rows", "vp", "v"] {
        emit!(a, "ld.param.u32 %{p}, [p_{p}];");
    }
    a.l("ld.param.u32 %ign, [p_ignore_index];");
    row_setup(&mut a, dt);
    a.c("online max / sum over the V real columns");
    emit!(a, "mov.f32 %m, {};", f32_imm(SOFTMAX_EMPTY_MAX));
    a.l("mov.f32 %s, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%tx",
        &nthr,
        "%v",
        &mut |a, col, w| {
            let x = regs("%x", w);
            ld_row(a, dt, "%lrow", col, &x);
            softmax_fold(a, "%m", "%s", &x);
        },
    );
    softmax_warp(&mut a, "%m", "%s");
    a.l("setp.ne.u32 %pq, %lane, 0;");
    a.l("shl.b32 %t32, %warp, 2;");
    a.l("mov.u32 %k, s_m;");
    a.l("add.u32 %k, %k, %t32;");
    a.l("@!%pq st.shared.f32 [%k], %m;");
    a.l("mov.u32 %k, s_s;");
    a.l("add.u32 %k, %k, %t32;");
    a.l("@!%pq st.shared.f32 [%k], %s;");
    a.l("bar.sync 0;");
    a.l("setp.ne.u32 %pq, %tx, 0;");
    a.l("@%pq bra $DONE;");
    a.c("thread 0 folds the warp results in order; lse = m + log(s)");
    a.l("ld.shared.f32 %m, [s_m];");
    a.l("ld.shared.f32 %s, [s_s];");
    for w in 1..WARPS {
        emit!(a, "ld.shared.f32 %smx_mo, [s_m+{}];", 4 * w);
        emit!(a, "ld.shared.f32 %smx_so, [s_s+{}];", 4 * w);
        softmax_combine(&mut a, "%m", "%s", "%smx_mo", "%smx_so");
    }
    a.l("lg2.approx.f32 %lse, %s;");
    emit!(
        a,
        "mul.f32 %lse, %lse, {};",
        f32_imm(std::f32::consts::LN_2)
    );
    a.l("add.f32 %lse, %lse, %m;");
    a.l("add.u64 %ad, %plse, %rw4;");
    a.l("st.global.f32 [%ad], %lse;");
    a.c("loss: 0 when ignored, NaN for a target outside [0, V), else lse - x_t");
    a.l("mov.f32 %loss, 0f7FFFFFFF;");
    a.l("@!%pvalid bra $STORE;");
    a.l("cvt.u64.u32 %ad, %tgt;");
    emit!(a, "shl.b64 %ad, %ad, {};", log2_size(dt));
    a.l("add.u64 %ad, %lrow, %ad;");
    ld_at_if(&mut a, dt, &["%xt".to_string()], "%pvalid");
    a.l("sub.f32 %loss, %lse, %xt;");
    a.label("$STORE");
    a.l("@%pign mov.f32 %loss, 0f00000000;");
    a.l("add.u64 %ad, %ploss, %rw4;");
    a.l("st.global.f32 [%ad], %loss;");
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
            ("logits", "u64"),
            ("lse", "u64"),
            ("targets", "u64"),
            ("gscale", "u64"),
            ("dlogits", "u64"),
            ("rows", "u32"),
            ("vp", "u32"),
            ("v", "u32"),
            ("ignore_index", "u32"),
            ("factor", "f32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %pl_, %plse, %ptg, %pgs, %pd_, %lrow, %drow, %t64, %rw4;");
    a.l(".reg .b32 %rows, %vp, %v, %ign, %row, %tx, %lane, %warp, %tgt, %t32, %k;");
    a.l(".reg .f32 %lse, %g, %factor, %one, %zero, %fill;");
    a.l(".reg .f32 %x<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq, %pign, %pvalid, %pj;");
    ld_ptr(&mut a, "%pl_", "logits");
    ld_ptr(&mut a, "%plse", "lse");
    ld_ptr(&mut a, "%ptg", "targets");
    ld_ptr(&mut a, "%pgs", "gscale");
    ld_ptr(&mut a, "%pd_", "dlogits");
    for p in ["rows", "vp", "v", "factor"] {
        emit!(
            a,
            "ld.param.{} %{p}, [p_{p}];",
            if p == "factor" { "f32" } else { "u32" }
        );
    }
    a.l("ld.param.u32 %ign, [p_ignore_index];");
    a.l("mov.f32 %one, 0f3F800000;");
    a.l("mov.f32 %zero, 0f00000000;");
    row_setup(&mut a, dt);
    a.l("sub.u64 %drow, %lrow, %pl_;");
    a.l("add.u64 %drow, %drow, %pd_;");
    let vw = 4 * dt.size();
    a.c("the vector path also needs dlogits aligned");
    emit!(a, "and.b64 %t64, %pd_, {};", vw - 1);
    a.l("setp.eq.and.u64 %pvec, %t64, 0, %pvec;");
    a.c("ignored row: zeros; invalid target: NaN");
    a.l("selp.f32 %fill, %zero, 0f7FFFFFFF, %pign;");
    a.l("not.pred %pq, %pvalid;");
    a.l("or.pred %pq, %pq, %pign;");
    a.l("@!%pq bra $COMPUTE;");
    row_loop(
        &mut a,
        "z",
        "%pvec",
        "%tx",
        &nthr,
        "%vp",
        &mut |a, col, w| {
            let z: Vec<String> = (0..w).map(|_| "%fill".to_string()).collect();
            st_row(a, dt, "%drow", col, &z);
        },
    );
    a.l("bra $DONE;");
    a.label("$COMPUTE");
    a.l("add.u64 %ad, %plse, %rw4;");
    a.l("ld.global.f32 %lse, [%ad];");
    a.l("ld.global.f32 %g, [%pgs];");
    a.l("mul.rn.f32 %g, %g, %factor;");
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%tx",
        &nthr,
        "%vp",
        &mut |a, col, w| {
            let (x, o) = (regs("%x", w), regs("%o", w));
            ld_row(a, dt, "%lrow", col, &x);
            for l in 0..w {
                exp_minus(a, &o[l], &x[l], "%lse");
                emit!(a, "add.u32 %k, {col}, {l};");
                a.l("setp.eq.u32 %pj, %k, %tgt;");
                emit!(a, "@%pj sub.f32 {}, {}, %one;", o[l], o[l]);
                emit!(a, "mul.f32 {}, {}, %g;", o[l], o[l]);
                a.l("setp.lt.u32 %pj, %k, %v;");
                emit!(a, "selp.f32 {}, {}, %zero, %pj;", o[l], o[l]);
            }
            st_row(a, dt, "%drow", col, &o);
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
    name: "nn_xent",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// `Problem { batch: rows, n: Vp, k: V }`: one block per row.
fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.batch.max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! fwd_args {
    ($dt:expr) => {
        &[
            arg("logits", ArgKind::In($dt)),
            arg("targets", ArgKind::In(Elem::U32)),
            arg("losses", ArgKind::Out(Elem::F32)),
            arg("lse", ArgKind::Out(Elem::F32)),
            arg("rows", ArgKind::U32),
            arg("vp", ArgKind::U32),
            arg("v", ArgKind::U32),
            arg("ignore_index", ArgKind::U32),
        ]
    };
}
macro_rules! bwd_args {
    ($dt:expr) => {
        &[
            arg("logits", ArgKind::In($dt)),
            arg("lse", ArgKind::In(Elem::F32)),
            arg("targets", ArgKind::In(Elem::U32)),
            arg("gscale", ArgKind::In(Elem::F32)),
            arg("dlogits", ArgKind::Out($dt)),
            arg("rows", ArgKind::U32),
            arg("vp", ArgKind::U32),
            arg("v", ArgKind::U32),
            arg("ignore_index", ArgKind::U32),
            arg("factor", ArgKind::F32),
        ]
    };
}

const FWD_F32: &[Arg] = fwd_args!(Elem::F32);
const FWD_BF16: &[Arg] = fwd_args!(Elem::BF16);
const FWD_F16: &[Arg] = fwd_args!(Elem::F16);
const BWD_F32: &[Arg] = bwd_args!(Elem::F32);
const BWD_BF16: &[Arg] = bwd_args!(Elem::BF16);
const BWD_F16: &[Arg] = bwd_args!(Elem::F16);

fn fwd_cost(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 4 * p.batch * p.k,
        bytes: p.batch * (size * p.k + 12),
    }
}
fn bwd_cost(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 4 * p.batch * p.n,
        bytes: p.batch * (2 * size * p.n + 8),
    }
}

macro_rules! xent_descs {
    ($f:ident, $b:ident, $fa:ident, $ba:ident, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem { batch: rows, n: Vp, k: V }`: `logits (rows, Vp) ", $sfx, "`,")]
        #[doc = "`targets (rows) u32` -> `losses (rows) f32`, `lse (rows) f32`."]
        pub static $f: KernelDesc = KernelDesc {
            entry: concat!("lathe_xent_fwd_", $sfx),
            module: &MODULE,
            args: $fa,
            geometry,
            cost: |p| fwd_cost(p, $size),
            summary: "cross-entropy forward: per-row loss and saved logsumexp",
        };
        #[doc = concat!("`Problem { batch: rows, n: Vp, k: V }`: `dlogits (rows, Vp) ", $sfx, "`")]
        #[doc = "from `logits`, `lse (rows) f32`, `targets (rows) u32`, `gscale (>= 1) f32`."]
        pub static $b: KernelDesc = KernelDesc {
            entry: concat!("lathe_xent_bwd_", $sfx),
            module: &MODULE,
            args: $ba,
            geometry,
            cost: |p| bwd_cost(p, $size),
            summary: "cross-entropy backward from the saved logsumexp",
        };
    };
}

xent_descs!(XENT_FWD_F32, XENT_BWD_F32, FWD_F32, BWD_F32, "f32", 4);
xent_descs!(XENT_FWD_BF16, XENT_BWD_BF16, FWD_BF16, BWD_BF16, "bf16", 2);
xent_descs!(XENT_FWD_F16, XENT_BWD_F16, FWD_F16, BWD_F16, "f16", 2);

const FORWARD: [&KernelDesc; 3] = [&XENT_FWD_F32, &XENT_FWD_BF16, &XENT_FWD_F16];
const BACKWARD: [&KernelDesc; 3] = [&XENT_BWD_F32, &XENT_BWD_BF16, &XENT_BWD_F16];

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &XENT_FWD_F32,
    &XENT_BWD_F32,
    &XENT_FWD_BF16,
    &XENT_BWD_BF16,
    &XENT_FWD_F16,
    &XENT_BWD_F16,
];

/// The forward kernel for a logits dtype.
pub fn forward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, FORWARD)
}
/// The backward kernel for a logits dtype.
pub fn backward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, BACKWARD)
}

/// CPU twins: sums in f64, each output rounded once.
pub mod twin {
    use crate::elementwise::twin::Float;

    /// `logits (rows, vp)`, `targets, losses, lse (rows)`.
    pub fn forward<T: Float>(
        logits: &[T],
        targets: &[u32],
        losses: &mut [f32],
        lse: &mut [f32],
        vp: usize,
        v: usize,
        ignore_index: u32,
    ) {
        for (r, &t) in targets.iter().enumerate() {
            let x = |j: usize| logits[r * vp + j].to_f32() as f64;
            let m = (0..v).map(x).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..v).map(|j| (x(j) - m).exp()).sum();
            let l = m + s.ln();
            lse[r] = l as f32;
            losses[r] = if t == ignore_index {
                0.0
            } else if (t as usize) < v {
                (l - x(t as usize)) as f32
            } else {
                f32::NAN
            };
        }
    }

    /// `dlogits (rows, vp)` from the saved `lse`; `g = gscale * factor`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Float>(
        logits: &[T],
        lse: &[f32],
        targets: &[u32],
        g: f32,
        dlogits: &mut [T],
        vp: usize,
        v: usize,
        ignore_index: u32,
    ) {
        for (r, &t) in targets.iter().enumerate() {
            let out = &mut dlogits[r * vp..(r + 1) * vp];
            if t == ignore_index {
                out.fill(T::from_f32(0.0));
                continue;
            }
            if t as usize >= v {
                out.fill(T::from_f32(f32::NAN));
                continue;
            }
            for (j, o) in out.iter_mut().enumerate() {
                let d = if j < v {
                    let p = ((logits[r * vp + j].to_f32() - lse[r]) as f64).exp() as f32;
                    (p - if j == t as usize { 1.0 } else { 0.0 }) * g
                } else {
                    0.0
                };
                *o = T::from_f32(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use crate::rng::Rng;

    #[test]
    fn forward_then_backward_match_the_definitions() {
        let (rows, vp, v) = (3, 10, 7);
        let logits = Rng::new(9).vec_f32(rows * vp, -3.0, 3.0);
        let targets = [2u32, u32::MAX, 6];
        let (mut loss, mut lse) = (vec![0f32; rows], vec![0f32; rows]);
        forward(&logits, &targets, &mut loss, &mut lse, vp, v, u32::MAX);
        assert_eq!(loss[1], 0.0);
        let mut d = vec![0f32; rows * vp];
        backward(&logits, &lse, &targets, 0.5, &mut d, vp, v, u32::MAX);
        assert!(d[vp..2 * vp].iter().all(|&x| x == 0.0));
        for r in [0usize, 2] {
            let sum: f32 = d[r * vp..r * vp + v].iter().sum();
            assert!(sum.abs() < 1e-5, "row {r}: {sum}");
            assert!(d[r * vp + v..(r + 1) * vp].iter().all(|&x| x == 0.0));
            let row = &logits[r * vp..r * vp + v];
            let want = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            assert!((lse[r] as f64 - want).abs() < 1e-5);
        }
    }
}
