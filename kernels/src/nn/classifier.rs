//! The fused classifier (llm.c's): softmax cross-entropy loss and its gradient in one kernel,
//! so the `(rows, Vp)` probabilities are never stored. A fused op with its own backward.
//!
//! Per row `r` with target `t = targets[r]` over the first `V` of `Vp` (padded) columns:
//!
//! ```text
//! m         = max_{j < V} x_j,   s = sum_{j < V} exp(x_j - m)
//! loss[r]   = log(s) + m - x_t                                   (f32)
//! dlogit_j  = (exp(x_j - m) / s - [j == t]) * dloss * scale     for j < V
//! dlogit_j  = 0                                                  for V <= j < Vp (padding)
//! ```
//!
//! `scale` is the step state's loss scale (device memory: no host sync), `dloss` the host's
//! factor (typically `1 / (tokens counted * accumulation steps)`). A row whose target equals
//! `ignore_index` gets loss 0 and an all-zero gradient. A target outside `[0, V)` that is not
//! the ignore index gets a NaN loss and NaN gradients: the step's non-finite check then skips
//! the update instead of training on garbage. `dlogits` may be `logits` (in place).
//!
//! Shape: one 1024-thread block per row. Pass 1, an online max/sum (`exp` through `ex2.approx`)
//! over the real columns, 4 at a time through vector loads when `Vp % 4 == 0` and the buffers
//! are aligned; warp butterflies of `(m, s)`, then every thread folds the 32 warp results in
//! order (the same bits everywhere). Pass 2 re-reads the row (from L2 for rows up to ~100 KB)
//! and writes the gradient.

use super::amp::SCALE;
use super::ptxgen::{
    Asm, emit, entry, exp_minus, ld_ptr, ld_row, log2_size, prelude, regs, row_loop,
    softmax_combine, softmax_fold, softmax_regs, softmax_warp, st_row, vec_ok,
};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block (one block per row).
pub const THREADS: u32 = 1024;

fn kernel(name: &str, dt: Elem) -> String {
    let vw = 4 * dt.size();
    let nthr = format!("{THREADS}");
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("logits", "u64"),
            ("dlogits", "u64"),
            ("losses", "u64"),
            ("targets", "u64"),
            ("state", "u64"),
            ("rows", "u32"),
            ("vp", "u32"),
            ("v", "u32"),
            ("ignore_index", "u32"),
            ("dloss", "f32"),
        ],
    );
    a.l(".shared .align 4 .f32 s_m[32];");
    a.l(".shared .align 4 .f32 s_s[32];");
    prelude(&mut a);
    softmax_regs(&mut a);
    a.l(".reg .b64 %pl_, %pd_, %ploss, %ptg, %pst, %lrow, %drow, %t64, %lossad;");
    a.l(".reg .b32 %rows, %vp, %v, %ign, %row, %tx, %lane, %warp, %tgt, %t32, %k;");
    a.l(".reg .f32 %m, %s, %xt, %loss, %dscale, %scale, %dloss, %inv, %nan, %one, %zero, %fill;");
    a.l(".reg .f32 %x<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq, %pign, %pvalid, %pj;");
    ld_ptr(&mut a, "%pl_", "logits");
    ld_ptr(&mut a, "%pd_", "dlogits");
    ld_ptr(&mut a, "%ploss", "losses");
    ld_ptr(&mut a, "%ptg", "targets");
    ld_ptr(&mut a, "%pst", "state");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %vp, [p_vp];");
    a.l("ld.param.u32 %v, [p_v];");
    a.l("ld.param.u32 %ign, [p_ignore_index];");
    a.l("ld.param.f32 %dloss, [p_dloss];");
    a.l("mov.f32 %nan, 0f7FFFFFFF;");
    a.l("mov.f32 %one, 0f3F800000;");
    a.l("mov.f32 %zero, 0f00000000;");
    a.l("mov.u32 %row, %ctaid.x;");
    a.l("setp.ge.u32 %pq, %row, %rows;");
    a.l("@%pq bra $DONE;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.c("this row's target and loss slot");
    a.l("mul.wide.u32 %t64, %row, 4;");
    a.l("add.u64 %lossad, %ploss, %t64;");
    a.l("add.u64 %ad, %ptg, %t64;");
    a.l("ld.global.u32 %tgt, [%ad];");
    a.c("ignored row: loss 0, gradient 0; a valid target is in [0, V) (unsigned compare)");
    a.l("setp.eq.u32 %pign, %tgt, %ign;");
    a.l("setp.lt.u32 %pvalid, %tgt, %v;");
    a.l("mul.wide.u32 %lrow, %row, %vp;");
    emit!(a, "shl.b64 %lrow, %lrow, {};", log2_size(dt));
    a.l("add.u64 %drow, %pd_, %lrow;");
    a.l("add.u64 %lrow, %pl_, %lrow;");
    vec_ok(
        &mut a,
        "%pvec",
        &[("%pl_", vw), ("%pd_", vw)],
        "%vp",
        "%t64",
        "%t32",
    );
    a.c("ignored row: loss 0 and zero gradient; invalid target: NaN loss and gradient");
    a.l("selp.f32 %fill, %zero, %nan, %pign;");
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
    a.l("setp.ne.u32 %pq, %tx, 0;");
    a.l("@%pq bra $DONE;");
    a.l("st.global.f32 [%lossad], %fill;");
    a.l("bra $DONE;");
    a.label("$COMPUTE");
    a.c("pass 1: online max / sum over the V real columns");
    emit!(
        a,
        "mov.f32 %m, {};",
        super::ptxgen::f32_imm(super::ptxgen::SOFTMAX_EMPTY_MAX)
    );
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
    a.c("the target logit, read before the barrier (dlogits may alias logits)");
    a.l("mov.f32 %xt, %nan;");
    a.l("setp.eq.u32 %pq, %tx, 0;");
    a.l("cvt.u64.u32 %ad, %tgt;");
    emit!(a, "shl.b64 %ad, %ad, {};", log2_size(dt));
    a.l("add.u64 %ad, %lrow, %ad;");
    super::ptxgen::ld_at_if(&mut a, dt, &["%xt".to_string()], "%pq");
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
    a.c("every thread folds the 32 warp results in order");
    a.l("ld.shared.f32 %m, [s_m];");
    a.l("ld.shared.f32 %s, [s_s];");
    for w in 1..32 {
        emit!(a, "ld.shared.f32 %smx_mo, [s_m+{}];", 4 * w);
        emit!(a, "ld.shared.f32 %smx_so, [s_s+{}];", 4 * w);
        softmax_combine(&mut a, "%m", "%s", "%smx_mo", "%smx_so");
    }
    a.c("loss = log(s) + m - x_t (thread 0)");
    a.l("setp.ne.u32 %pq, %tx, 0;");
    a.l("@%pq bra $GRAD;");
    a.l("lg2.approx.f32 %loss, %s;");
    emit!(
        a,
        "mul.f32 %loss, %loss, {};",
        super::ptxgen::f32_imm(std::f32::consts::LN_2)
    );
    a.l("add.f32 %loss, %loss, %m;");
    a.l("sub.f32 %loss, %loss, %xt;");
    a.l("st.global.f32 [%lossad], %loss;");
    a.label("$GRAD");
    a.c("pass 2: dlogit = (exp(x - m) / s - onehot) * dloss * scale; padding 0");
    emit!(a, "ld.global.f32 %scale, [%pst+{}];", 4 * SCALE);
    a.l("mul.rn.f32 %dscale, %dloss, %scale;");
    a.l("rcp.rn.f32 %inv, %s;");
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
                exp_minus(a, &o[l], &x[l], "%m");
                emit!(a, "mul.f32 {}, {}, %inv;", o[l], o[l]);
                emit!(a, "add.u32 %k, {col}, {l};");
                a.l("setp.eq.u32 %pj, %k, %tgt;");
                emit!(a, "@%pj sub.f32 {}, {}, %one;", o[l], o[l]);
                emit!(a, "mul.f32 {}, {}, %dscale;", o[l], o[l]);
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
        s.push_str(&kernel(ALL[i].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_classifier",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.batch.max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! xent_args {
    ($dt:expr) => {
        &[
            arg("logits", ArgKind::In($dt)),
            arg("dlogits", ArgKind::Out($dt)),
            arg("losses", ArgKind::Out(Elem::F32)),
            arg("targets", ArgKind::In(Elem::I32)),
            arg("state", ArgKind::In(Elem::U32)),
            arg("rows", ArgKind::U32),
            arg("vp", ArgKind::U32),
            arg("v", ArgKind::U32),
            arg("ignore_index", ArgKind::U32),
            arg("dloss", ArgKind::F32),
        ]
    };
}

const ARGS_F32: &[Arg] = xent_args!(Elem::F32);
const ARGS_BF16: &[Arg] = xent_args!(Elem::BF16);
const ARGS_F16: &[Arg] = xent_args!(Elem::F16);

fn cost(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 6 * p.batch * p.n,
        // logits read once, dlogits written once, targets and losses.
        bytes: 2 * size * p.batch * p.n + 8 * p.batch,
    }
}

macro_rules! xent_desc {
    ($name:ident, $args:ident, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem { batch: rows, n: Vp, k: V }`: `logits, dlogits (rows, Vp) ", $sfx,
            "`, `losses (rows) f32`, `targets (rows) i32`, `state (16) u32` (reads `SCALE`); ",
            "`ignore_index` is an i32 as its u32 bit pattern.")]
        pub static $name: KernelDesc = KernelDesc {
            entry: concat!("lathe_classifier_xent_", $sfx),
            module: &MODULE,
            args: $args,
            geometry,
            cost: |p| cost(p, $size),
            summary: "fused softmax cross-entropy: per-row loss and dlogits in one pass",
        };
    };
}

xent_desc!(CLASSIFIER_XENT_F32, ARGS_F32, "f32", 4);
xent_desc!(CLASSIFIER_XENT_BF16, ARGS_BF16, "bf16", 2);
xent_desc!(CLASSIFIER_XENT_F16, ARGS_F16, "f16", 2);

/// Every kernel of this module, in `ACT_DTYPES` order.
pub static ALL: &[&KernelDesc] = &[
    &CLASSIFIER_XENT_F32,
    &CLASSIFIER_XENT_BF16,
    &CLASSIFIER_XENT_F16,
];

/// The kernel for a logits dtype.
pub fn kernel_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[0], ALL[1], ALL[2]])
}

/// CPU twin: max and sum in f64, each output rounded once.
pub mod twin {
    use crate::elementwise::twin::Float;

    /// `logits, dlogits: (rows, vp)`, `targets, losses: (rows)`.
    #[allow(clippy::too_many_arguments)]
    pub fn classifier<T: Float>(
        logits: &[T],
        dlogits: &mut [T],
        losses: &mut [f32],
        targets: &[i32],
        vp: usize,
        v: usize,
        ignore_index: i32,
        dloss: f32,
        scale: f32,
    ) {
        let dscale = dloss * scale;
        for (r, &t) in targets.iter().enumerate() {
            let x = |j: usize| logits[r * vp + j].to_f32() as f64;
            let out = &mut dlogits[r * vp..(r + 1) * vp];
            if t == ignore_index {
                losses[r] = 0.0;
                out.fill(T::from_f32(0.0));
                continue;
            }
            if t < 0 || t as usize >= v {
                losses[r] = f32::NAN;
                out.fill(T::from_f32(f32::NAN));
                continue;
            }
            let m = (0..v).map(x).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..v).map(|j| (x(j) - m).exp()).sum();
            losses[r] = (s.ln() + m - x(t as usize)) as f32;
            for (j, o) in out.iter_mut().enumerate() {
                let g = if j < v {
                    let p = ((x(j) - m).exp() / s) as f32;
                    (p - if j == t as usize { 1.0 } else { 0.0 }) * dscale
                } else {
                    0.0
                };
                *o = T::from_f32(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use crate::rng::Rng;

    #[test]
    fn loss_and_gradient_match_definitions() {
        let (rows, vp, v) = (4, 12, 10);
        let logits = Rng::new(5).vec_f32(rows * vp, -3.0, 3.0);
        let targets = [3, -100, 9, 0];
        let mut d = vec![0f32; rows * vp];
        let mut loss = vec![0f32; rows];
        classifier(&logits, &mut d, &mut loss, &targets, vp, v, -100, 0.5, 2.0);
        assert_eq!(loss[1], 0.0);
        assert!(d[vp..2 * vp].iter().all(|&g| g == 0.0));
        for r in [0usize, 2, 3] {
            let row = &logits[r * vp..r * vp + v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let want = lse - row[targets[r] as usize] as f64;
            assert!((loss[r] as f64 - want).abs() < 1e-5, "row {r}");
            // Gradient rows sum to zero over the real columns; padding is zero.
            let sum: f32 = d[r * vp..r * vp + v].iter().sum();
            assert!(sum.abs() < 1e-5, "row {r}: {sum}");
            assert!(d[r * vp + v..(r + 1) * vp].iter().all(|&g| g == 0.0));
            assert!(d[r * vp + targets[r] as usize] < 0.0);
        }
        // An out-of-range target poisons its row.
        classifier(
            &logits,
            &mut d,
            &mut loss,
            &[10, 0, 0, 0],
            vp,
            v,
            -100,
            1.0,
            1.0,
        );
        assert!(loss[0].is_nan() && d[0].is_nan());
    }
}
