//! Causal attention, version 1: a fused masked softmax (scale, causal mask, softmax over the
//! last dimension in f32) to sit between two batched GEMMs (`S = Q K^T`, then `O = P V`), with
//! its backward. A fused op with its own backward.
//!
//! Forward, for head `h` and query row `i` of `S (B*H, T, T)`:
//! `P[i, j] = exp(scale S[i, j] - m) / sum_{k <= i} exp(scale S[i, k] - m)` for `j <= i`,
//! `P[i, j] = 0` for `j > i` (written, so the next GEMM can run over full rows).
//! Backward: `dS[i, j] = scale * P[i, j] * (dP[i, j] - sum_{k <= i} P[i, k] dP[i, k])` for
//! `j <= i`, 0 above the diagonal. Outputs may alias their inputs (in place).
//!
//! Memory: `S`, `P`, `dP`, `dS` are each `B*H*T^2` elements, O(B H T^2): for GPT-2 124M at
//! B=16, T=1024, 12 heads, 201M elements = 403 MB per tensor in bf16. The forward reads the
//! lower triangle of S and writes all of P (604 MB, 0.20 ms at 3 TB/s), the backward reads the
//! lower triangles of P and dP and writes all of dS (806 MB, 0.27 ms), per layer. A
//! flash-attention kernel (no T^2 tensor) is the later version.
//!
//! Shape: one warp per row (8 rows per 256-thread block), online max/sum with `ex2.approx`,
//! vector loads of 4 when `T % 4 == 0` and the buffers are aligned; only columns `j <= i` are
//! read.

use super::ptxgen::{
    Asm, emit, entry, exp_minus, f32_imm, ld_at_if, ld_ptr, ld_row, log2_size, prelude, regs,
    row_loop, softmax_fold, softmax_regs, softmax_warp, st_row, vec_ok, warp_sum,
};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Rows (warps) per 256-thread block.
pub const ROWS_PER_BLOCK: u32 = 8;

/// Shared prologue: row, `i = row % T`, `len = i + 1`, the vector predicate, and for the
/// pointer parameter `params[k]` its row base `%rb{k}`.
fn prologue(a: &mut Asm, dt: Elem, params: &[&str]) {
    prelude(a);
    softmax_regs(a);
    a.l(".reg .b64 %t64, %rbase, %rb<3>, %pp<3>;");
    a.l(".reg .b32 %bh, %t, %tx, %lane, %row, %i, %len, %t32, %j;");
    a.l(".reg .f32 %scale, %m, %s, %inv, %dot, %zero, %tt;");
    a.l(".reg .f32 %x<4>, %y<4>, %o<4>;");
    a.l(".reg .pred %pvec, %pq, %pin, %pj;");
    a.l("ld.param.u32 %bh, [p_bh];");
    a.l("ld.param.u32 %t, [p_t];");
    a.l("ld.param.f32 %scale, [p_scale];");
    a.l("mov.f32 %zero, 0f00000000;");
    a.c("row = blockIdx.x * 8 + warp over B*H*T rows; i = row % T is the query position");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %row, %tx, 5;");
    a.l("mov.u32 %t32, %ctaid.x;");
    emit!(a, "mad.lo.u32 %row, %t32, {ROWS_PER_BLOCK}, %row;");
    a.l("mul.lo.u32 %t32, %bh, %t;");
    a.l("setp.ge.u32 %pq, %row, %t32;");
    a.l("@%pq bra $DONE;");
    a.l("rem.u32 %i, %row, %t;");
    a.l("add.u32 %len, %i, 1;");
    a.l("mul.wide.u32 %rbase, %row, %t;");
    emit!(a, "shl.b64 %rbase, %rbase, {};", log2_size(dt));
    let vw = 4 * dt.size();
    for (k, p) in params.iter().enumerate() {
        ld_ptr(a, &format!("%pp{k}"), p);
        emit!(a, "add.u64 %rb{k}, %pp{k}, %rbase;");
    }
    let regs: Vec<String> = (0..params.len()).map(|k| format!("%pp{k}")).collect();
    let list: Vec<(&str, usize)> = regs.iter().map(|r| (r.as_str(), vw)).collect();
    vec_ok(a, "%pvec", &list, "%t", "%t64", "%t32");
}

/// Forward: `entry(scores, probs, bh, t, scale)`.
fn forward(name: &str, dt: Elem) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("scores", "u64"),
            ("probs", "u64"),
            ("bh", "u32"),
            ("t", "u32"),
            ("scale", "f32"),
        ],
    );
    prologue(&mut a, dt, &["scores", "probs"]);
    a.c("pass 1: online max / sum of scale * S over j <= i");
    emit!(
        a,
        "mov.f32 %m, {};",
        f32_imm(super::ptxgen::SOFTMAX_EMPTY_MAX)
    );
    a.l("mov.f32 %s, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%lane",
        "32",
        "%len",
        &mut |a, col, w| {
            let x = regs("%x", w);
            ld_row(a, dt, "%rb0", col, &x);
            for xi in &x {
                emit!(a, "mul.f32 {xi}, {xi}, %scale;");
            }
            softmax_fold(a, "%m", "%s", &x);
        },
    );
    softmax_warp(&mut a, "%m", "%s");
    a.l("rcp.rn.f32 %inv, %s;");
    a.c("pass 2: P over the whole row, 0 above the diagonal (loads only where some j <= i)");
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%lane",
        "32",
        "%t",
        &mut |a, col, w| {
            let (x, o) = (regs("%x", w), regs("%o", w));
            emit!(a, "setp.le.u32 %pin, {col}, %i;");
            super::ptxgen::addr(a, dt, "%rb0", col);
            ld_at_if(a, dt, &x, "%pin");
            for l in 0..w {
                emit!(a, "mul.f32 {}, {}, %scale;", x[l], x[l]);
                exp_minus(a, &o[l], &x[l], "%m");
                emit!(a, "mul.f32 {}, {}, %inv;", o[l], o[l]);
                emit!(a, "add.u32 %j, {col}, {l};");
                a.l("setp.le.u32 %pj, %j, %i;");
                emit!(a, "selp.f32 {}, {}, %zero, %pj;", o[l], o[l]);
            }
            st_row(a, dt, "%rb1", col, &o);
        },
    );
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// Backward: `entry(probs, dprobs, dscores, bh, t, scale)`.
fn backward(name: &str, dt: Elem) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("probs", "u64"),
            ("dprobs", "u64"),
            ("dscores", "u64"),
            ("bh", "u32"),
            ("t", "u32"),
            ("scale", "f32"),
        ],
    );
    prologue(&mut a, dt, &["probs", "dprobs", "dscores"]);
    a.c("pass 1: dot = sum_{j <= i} P dP");
    a.l("mov.f32 %dot, 0f00000000;");
    row_loop(
        &mut a,
        "p1",
        "%pvec",
        "%lane",
        "32",
        "%len",
        &mut |a, col, w| {
            let (x, y) = (regs("%x", w), regs("%y", w));
            ld_row(a, dt, "%rb0", col, &x);
            ld_row(a, dt, "%rb1", col, &y);
            for l in 0..w {
                emit!(a, "fma.rn.f32 %dot, {}, {}, %dot;", x[l], y[l]);
            }
        },
    );
    warp_sum(&mut a, "%dot", "%tt");
    a.c("pass 2: dS = scale * (P * (dP - dot)), 0 above the diagonal");
    row_loop(
        &mut a,
        "p2",
        "%pvec",
        "%lane",
        "32",
        "%t",
        &mut |a, col, w| {
            let (x, y, o) = (regs("%x", w), regs("%y", w), regs("%o", w));
            emit!(a, "setp.le.u32 %pin, {col}, %i;");
            super::ptxgen::addr(a, dt, "%rb0", col);
            ld_at_if(a, dt, &x, "%pin");
            super::ptxgen::addr(a, dt, "%rb1", col);
            ld_at_if(a, dt, &y, "%pin");
            for l in 0..w {
                emit!(a, "sub.f32 {}, {}, %dot;", o[l], y[l]);
                emit!(a, "mul.f32 {}, {}, {};", o[l], x[l], o[l]);
                emit!(a, "mul.f32 {}, {}, %scale;", o[l], o[l]);
                emit!(a, "add.u32 %j, {col}, {l};");
                a.l("setp.le.u32 %pj, %j, %i;");
                emit!(a, "selp.f32 {}, {}, %zero, %pj;", o[l], o[l]);
            }
            st_row(a, dt, "%rb2", col, &o);
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
        s.push_str(&forward(ALL[2 * i].entry, dt));
        s.push_str(&backward(ALL[2 * i + 1].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_attention",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            (p.batch * p.n).div_ceil(ROWS_PER_BLOCK as u64).max(1) as u32,
            1,
            1,
        ),
        block: (32 * ROWS_PER_BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! attn_args {
    ($dt:expr) => {
        (
            &[
                arg("scores", ArgKind::In($dt)),
                arg("probs", ArgKind::Out($dt)),
                arg("bh", ArgKind::U32),
                arg("t", ArgKind::U32),
                arg("scale", ArgKind::F32),
            ],
            &[
                arg("probs", ArgKind::In($dt)),
                arg("dprobs", ArgKind::In($dt)),
                arg("dscores", ArgKind::Out($dt)),
                arg("bh", ArgKind::U32),
                arg("t", ArgKind::U32),
                arg("scale", ArgKind::F32),
            ],
        )
    };
}

const ARGS_F32: (&[Arg], &[Arg]) = attn_args!(Elem::F32);
const ARGS_BF16: (&[Arg], &[Arg]) = attn_args!(Elem::BF16);
const ARGS_F16: (&[Arg], &[Arg]) = attn_args!(Elem::F16);

/// Elements of the lower triangle (with the diagonal) of all `batch` T x T matrices.
fn lower(p: &Problem) -> u64 {
    p.batch * p.n * (p.n + 1) / 2
}

macro_rules! attn_descs {
    ($f:ident, $b:ident, $args:ident, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem { batch: B*H, n: T }`: scores, probs (B*H, T, T) ", $sfx, ".")]
        #[doc = "probs may be scores (in place)."]
        pub static $f: KernelDesc = KernelDesc {
            entry: concat!("lathe_attn_softmax_fwd_", $sfx),
            module: &MODULE,
            args: $args.0,
            geometry,
            cost: |p| Cost {
                flops: 5 * lower(p),
                bytes: $size * (lower(p) + p.batch * p.n * p.n),
            },
            summary: "causal masked softmax forward (scale, mask, softmax in f32)",
        };
        #[doc = concat!("`Problem { batch: B*H, n: T }`: probs, dprobs, dscores (B*H, T, T) ", $sfx, ".")]
        #[doc = "dscores may be dprobs (in place)."]
        pub static $b: KernelDesc = KernelDesc {
            entry: concat!("lathe_attn_softmax_bwd_", $sfx),
            module: &MODULE,
            args: $args.1,
            geometry,
            cost: |p| Cost {
                flops: 5 * lower(p),
                bytes: $size * (2 * lower(p) + p.batch * p.n * p.n),
            },
            summary: "causal masked softmax backward",
        };
    };
}

attn_descs!(
    ATTN_SOFTMAX_FWD_F32,
    ATTN_SOFTMAX_BWD_F32,
    ARGS_F32,
    "f32",
    4
);
attn_descs!(
    ATTN_SOFTMAX_FWD_BF16,
    ATTN_SOFTMAX_BWD_BF16,
    ARGS_BF16,
    "bf16",
    2
);
attn_descs!(
    ATTN_SOFTMAX_FWD_F16,
    ATTN_SOFTMAX_BWD_F16,
    ARGS_F16,
    "f16",
    2
);

/// Every kernel of this module: (forward, backward) per dtype in `ACT_DTYPES` order.
pub static ALL: &[&KernelDesc] = &[
    &ATTN_SOFTMAX_FWD_F32,
    &ATTN_SOFTMAX_BWD_F32,
    &ATTN_SOFTMAX_FWD_BF16,
    &ATTN_SOFTMAX_BWD_BF16,
    &ATTN_SOFTMAX_FWD_F16,
    &ATTN_SOFTMAX_BWD_F16,
];

/// The forward kernel for a dtype.
pub fn forward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[0], ALL[2], ALL[4]])
}

/// The backward kernel for a dtype.
pub fn backward_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[1], ALL[3], ALL[5]])
}

/// CPU twins (max and sums in f64, outputs rounded once).
pub mod twin {
    use crate::elementwise::twin::Float;

    /// `scores, probs: (bh, t, t)`.
    pub fn forward<T: Float>(scores: &[T], probs: &mut [T], t: usize, scale: f32) {
        for (r, (s, p)) in scores.chunks(t).zip(probs.chunks_mut(t)).enumerate() {
            let i = r % t;
            let z = |j: usize| (s[j].to_f32() * scale) as f64;
            let m = (0..=i).map(z).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..=i).map(|j| (z(j) - m).exp()).sum();
            for (j, o) in p.iter_mut().enumerate() {
                let v = if j <= i {
                    ((z(j) - m).exp() / sum) as f32
                } else {
                    0.0
                };
                *o = T::from_f32(v);
            }
        }
    }

    /// `probs, dprobs, dscores: (bh, t, t)`.
    pub fn backward<T: Float>(probs: &[T], dprobs: &[T], dscores: &mut [T], t: usize, scale: f32) {
        for r in 0..probs.len() / t {
            let i = r % t;
            let p = |j: usize| probs[r * t + j].to_f32();
            let dp = |j: usize| dprobs[r * t + j].to_f32();
            let dot = (0..=i).map(|j| p(j) as f64 * dp(j) as f64).sum::<f64>() as f32;
            for j in 0..t {
                let v = if j <= i {
                    scale * (p(j) * (dp(j) - dot))
                } else {
                    0.0
                };
                dscores[r * t + j] = T::from_f32(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use crate::rng::Rng;

    #[test]
    fn rows_are_causal_distributions() {
        let (bh, t) = (2, 5);
        let s = Rng::new(8).vec_f32(bh * t * t, -2.0, 2.0);
        let mut p = vec![f32::NAN; bh * t * t];
        forward(&s, &mut p, t, 0.5);
        for r in 0..bh * t {
            let i = r % t;
            let row = &p[r * t..(r + 1) * t];
            let sum: f32 = row[..=i].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {r}");
            assert!(row[i + 1..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let t = 4;
        let mut rng = Rng::new(9);
        let s = rng.vec_f32(t * t, -1.0, 1.0);
        let g = rng.vec_f32(t * t, -1.0, 1.0);
        let loss = |s: &[f32]| -> f64 {
            let mut p = vec![0f32; t * t];
            forward(s, &mut p, t, 0.7);
            p.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let mut p = vec![0f32; t * t];
        forward(&s, &mut p, t, 0.7);
        let mut ds = vec![0f32; t * t];
        backward(&p, &g, &mut ds, t, 0.7);
        for k in 0..t * t {
            let h = 1e-3f32;
            let (mut a, mut b) = (s.clone(), s.clone());
            a[k] += h;
            b[k] -= h;
            let fd = (loss(&a) - loss(&b)) / (2.0 * h as f64);
            assert!((ds[k] as f64 - fd).abs() < 2e-3, "{k}: {} vs {fd}", ds[k]);
        }
    }
}
