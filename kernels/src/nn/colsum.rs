//! Deterministic column sums of per-block partials: the second pass of every parameter
//! gradient that many blocks contribute to (layernorm weight and bias, bias of a linear layer).
//!
//! `lathe_colsum_acc_f32(partials, groups, width, stride, out)`:
//! `out[c] += sum_{g < groups} partials[g * stride + c]` for `c < width`, the sum in a fixed
//! order: the groups are cut into 32 consecutive segments of `ceil(groups / 32)`; warp `w` of a
//! 1024-thread block adds segment `w` in order (lane = column, 4 loads in flight), and warp 0
//! adds the 32 segment sums in order, starting from 0. Grid: one block per 32 columns.
//! The twin follows the same tree, so the result is the same bits as [`twin::colsum_acc`].
//!
//! `lathe_colsum_acc_bf16_f32` and `lathe_colsum_acc_f16_f32` are the same kernel reading
//! 16-bit partials (widened exactly to f32; sums and `out` in f32): the bias gradient of a
//! linear layer straight from its bf16 / f16 output gradient, `dbias[c] += sum_r dY[r][c]`
//! (`groups` = rows, `stride` = the row length). Memory: `size(dt) groups width + 8 width`
//! bytes; each warp reads 32 consecutive columns of a row per load (64 bytes for 16-bit
//! types, 128 for f32), one block per 32 columns.

use super::ptxgen::{Asm, emit, entry, ld_ptr};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block (32 warps).
pub const THREADS: u32 = 1024;
/// Segments the groups are cut into (one per warp).
pub const SEGMENTS: usize = 32;

fn kernel(name: &str, dt: Elem) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("partials", "u64"),
            ("groups", "u32"),
            ("width", "u32"),
            ("stride", "u32"),
            ("out", "u64"),
        ],
    );
    a.c("segment sums, [warp][lane] padded to 33 columns");
    emit!(a, ".shared .align 4 .f32 s_seg[{}];", SEGMENTS * 33);
    a.l(".reg .b64 %pp, %po, %ad, %step, %a1;");
    a.l(".reg .b32 %groups, %width, %stride, %tx, %lane, %warp, %col, %seg, %g, %g1, %g4, %t;");
    a.l(".reg .f32 %acc, %v<4>, %total;");
    a.l(".reg .pred %pc, %pq;");
    a.l(".reg .b16 %h;");
    let (shift, size) = (dt.size().trailing_zeros(), dt.size());
    // One element at [addr] into the f32 register `dst`.
    let load = |a: &mut Asm, dst: &str, addr: &str| match dt {
        Elem::F32 => emit!(a, "ld.global.f32 {dst}, [{addr}];"),
        _ => {
            emit!(a, "ld.global.b16 %h, [{addr}];");
            widen16(a, dt, dst);
        }
    };
    ld_ptr(&mut a, "%pp", "partials");
    ld_ptr(&mut a, "%po", "out");
    a.l("ld.param.u32 %groups, [p_groups];");
    a.l("ld.param.u32 %width, [p_width];");
    a.l("ld.param.u32 %stride, [p_stride];");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.l("mov.u32 %col, %ctaid.x;");
    a.l("shl.b32 %col, %col, 5;");
    a.l("add.u32 %col, %col, %lane;");
    a.l("setp.lt.u32 %pc, %col, %width;");
    a.c("segment of this warp: [warp * seg, min((warp + 1) * seg, groups))");
    emit!(a, "add.u32 %seg, %groups, {};", SEGMENTS - 1);
    emit!(a, "shr.u32 %seg, %seg, {};", SEGMENTS.trailing_zeros());
    a.l("mul.lo.u32 %g, %warp, %seg;");
    a.l("add.u32 %g1, %g, %seg;");
    a.l("min.u32 %g1, %g1, %groups;");
    a.l("mov.f32 %acc, 0f00000000;");
    a.l("@!%pc bra $SEG_DONE;");
    a.c("%ad = partials + size * (g * stride + col); %step = size * stride");
    a.l("mul.wide.u32 %ad, %g, %stride;");
    a.l("cvt.u64.u32 %a1, %col;");
    a.l("add.u64 %ad, %ad, %a1;");
    emit!(a, "shl.b64 %ad, %ad, {shift};");
    a.l("add.u64 %ad, %pp, %ad;");
    emit!(a, "mul.wide.u32 %step, %stride, {size};");
    a.label("$QUAD");
    a.l("add.u32 %g4, %g, 4;");
    a.l("setp.gt.u32 %pq, %g4, %g1;");
    a.l("@%pq bra $ONE;");
    load(&mut a, "%v0", "%ad");
    a.l("add.u64 %a1, %ad, %step;");
    load(&mut a, "%v1", "%a1");
    a.l("add.u64 %a1, %a1, %step;");
    load(&mut a, "%v2", "%a1");
    a.l("add.u64 %a1, %a1, %step;");
    load(&mut a, "%v3", "%a1");
    for i in 0..4 {
        emit!(a, "add.rn.f32 %acc, %acc, %v{i};");
    }
    a.l("add.u64 %ad, %a1, %step;");
    a.l("mov.u32 %g, %g4;");
    a.l("bra $QUAD;");
    a.label("$ONE");
    a.l("setp.ge.u32 %pq, %g, %g1;");
    a.l("@%pq bra $SEG_DONE;");
    load(&mut a, "%v0", "%ad");
    a.l("add.rn.f32 %acc, %acc, %v0;");
    a.l("add.u64 %ad, %ad, %step;");
    a.l("add.u32 %g, %g, 1;");
    a.l("bra $ONE;");
    a.label("$SEG_DONE");
    a.l("mov.u32 %t, s_seg;");
    a.l("mad.lo.u32 %g, %warp, 33, %lane;");
    a.l("shl.b32 %g, %g, 2;");
    a.l("add.u32 %g, %g, %t;");
    a.l("st.shared.f32 [%g], %acc;");
    a.l("bar.sync 0;");
    a.l("setp.ne.u32 %pq, %warp, 0;");
    a.l("@%pq bra $DONE;");
    a.l("@!%pc bra $DONE;");
    a.c("warp 0: total = 0 + seg[0] + ... + seg[31] for its column");
    a.l("mov.f32 %total, 0f00000000;");
    a.l("shl.b32 %g, %lane, 2;");
    a.l("add.u32 %g, %g, %t;");
    for w in 0..SEGMENTS {
        emit!(a, "ld.shared.f32 %v0, [%g+{}];", 4 * 33 * w);
        a.l("add.rn.f32 %total, %total, %v0;");
    }
    a.l("mul.wide.u32 %ad, %col, 4;");
    a.l("add.u64 %ad, %po, %ad;");
    a.l("ld.global.f32 %v0, [%ad];");
    a.l("add.rn.f32 %v0, %v0, %total;");
    a.l("st.global.f32 [%ad], %v0;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// `dst = (f32) %h`, `%h` holding a bf16 (shifted in, exact) or an f16.
fn widen16(a: &mut Asm, dt: Elem, dst: &str) {
    match dt {
        Elem::BF16 => {
            a.l("cvt.u32.u16 %t, %h;");
            a.l("shl.b32 %t, %t, 16;");
            emit!(a, "mov.b32 {dst}, %t;");
        }
        Elem::F16 => emit!(a, "cvt.f32.f16 {dst}, %h;"),
        _ => unreachable!("widen of a 32-bit type"),
    }
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    s.push_str(&kernel("lathe_colsum_acc_f32", Elem::F32));
    s.push_str(&kernel("lathe_colsum_acc_bf16_f32", Elem::BF16));
    s.push_str(&kernel("lathe_colsum_acc_f16_f32", Elem::F16));
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_colsum",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// `Problem { batch: groups, n: width }`: `partials (groups, stride) f32` (first `width`
/// columns read), `out (width) f32` accumulated (`+=`).
pub static COLSUM_ACC_F32: KernelDesc = KernelDesc {
    entry: "lathe_colsum_acc_f32",
    module: &MODULE,
    args: &[
        arg("partials", ArgKind::In(Elem::F32)),
        arg("groups", ArgKind::U32),
        arg("width", ArgKind::U32),
        arg("stride", ArgKind::U32),
        arg("out", ArgKind::Out(Elem::F32)),
    ],
    geometry: |p: &Problem| Geometry {
        grid: (p.n.div_ceil(32).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    },
    cost: |p: &Problem| Cost {
        flops: p.batch * p.n,
        bytes: 4 * p.batch * p.n + 8 * p.n,
    },
    summary: "out[c] += sum over groups of partials[g][c], fixed order",
};

const fn args16(e: Elem) -> [Arg; 5] {
    [
        arg("partials", ArgKind::In(e)),
        arg("groups", ArgKind::U32),
        arg("width", ArgKind::U32),
        arg("stride", ArgKind::U32),
        arg("out", ArgKind::Out(Elem::F32)),
    ]
}
const ARGS_BF16: [Arg; 5] = args16(Elem::BF16);
const ARGS_F16: [Arg; 5] = args16(Elem::F16);

fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.n.div_ceil(32).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}
fn cost16(p: &Problem) -> Cost {
    Cost {
        flops: p.batch * p.n,
        bytes: 2 * p.batch * p.n + 8 * p.n,
    }
}

/// `Problem { batch: groups, n: width }`: bf16 partials (a bias gradient's `dY (rows, C)`),
/// f32 `out` accumulated.
pub static COLSUM_ACC_BF16_F32: KernelDesc = KernelDesc {
    entry: "lathe_colsum_acc_bf16_f32",
    module: &MODULE,
    args: &ARGS_BF16,
    geometry,
    cost: cost16,
    summary: "out[c] += sum over groups of bf16 partials[g][c], f32 sums, fixed order",
};

/// As [`COLSUM_ACC_BF16_F32`] with f16 partials.
pub static COLSUM_ACC_F16_F32: KernelDesc = KernelDesc {
    entry: "lathe_colsum_acc_f16_f32",
    module: &MODULE,
    args: &ARGS_F16,
    geometry,
    cost: cost16,
    summary: "out[c] += sum over groups of f16 partials[g][c], f32 sums, fixed order",
};

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[&COLSUM_ACC_F32, &COLSUM_ACC_BF16_F32, &COLSUM_ACC_F16_F32];

/// The column-sum kernel for partials of type `e` (f32 output).
pub fn colsum_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(
        e,
        [&COLSUM_ACC_F32, &COLSUM_ACC_BF16_F32, &COLSUM_ACC_F16_F32],
    )
}

/// Blocks a bias-gradient launch should have at least (a few per SM of a large GPU).
const BIAS_GRAD_MIN_BLOCKS: usize = 256;
/// Rows each group of the first pass sums at least.
const BIAS_GRAD_MIN_ROWS: usize = 32;

/// The row interleave `g` of a bias gradient `dbias[c] += sum_r dy[r][c]` over `(rows, c)`.
/// With `g == 1` it is one launch (`groups = rows`, one block per 32 columns). With `g > 1`
/// (narrow layers: `c / 32` blocks would leave most SMs idle) it is three launches of these
/// kernels, in this order:
/// 1. the first `rows - rows % g` rows viewed as `(rows / g, g c)`: `part[j] += sum` over
///    `rows / g` groups, `j < g c` (row `r` lands in `part[(r % g) c + col]`): `g` times the
///    blocks;
/// 2. the last `rows % g` rows (if any) into `part[0 .. c]`;
/// 3. `dbias[col] += sum_{i < g} part[i c + col]` (the f32 entry).
///
/// `part` is a zeroed f32 scratch of `g c`. Every sum keeps a fixed order, so the result is the
/// same bits every run ([`twin::bias_grad`] composes the twins the same way).
pub fn bias_grad_interleave(rows: usize, c: usize) -> usize {
    let mut g = 1;
    while g < 64
        && c.div_ceil(32) * g < BIAS_GRAD_MIN_BLOCKS
        && rows / (2 * g) >= BIAS_GRAD_MIN_ROWS
    {
        g *= 2;
    }
    g
}

/// CPU twins.
pub mod twin {
    use super::SEGMENTS;
    use crate::elementwise::twin::Float;

    /// The kernel's sum, in its order: `out[c] += sum_g partials[g * stride + c]` (16-bit
    /// partials widened exactly, sums in f32).
    pub fn colsum_acc<T: Float>(
        partials: &[T],
        groups: usize,
        width: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let seg = groups.div_ceil(SEGMENTS);
        for (c, o) in out.iter_mut().enumerate().take(width) {
            let mut total = 0f32;
            for w in 0..SEGMENTS {
                let g0 = (w * seg).min(groups);
                let g1 = (g0 + seg).min(groups);
                let mut acc = 0f32;
                for g in g0..g1 {
                    acc += partials[g * stride + c].to_f32();
                }
                total += acc;
            }
            *o += total;
        }
    }

    /// The bias gradient in the kernels' order ([`super::bias_grad_interleave`]):
    /// `out[col] += sum_r dy[r * c + col]`.
    pub fn bias_grad<T: Float>(dy: &[T], rows: usize, c: usize, out: &mut [f32]) {
        let g = super::bias_grad_interleave(rows, c);
        if g == 1 {
            colsum_acc(dy, rows, c, c, out);
            return;
        }
        let body = rows / g;
        let mut part = vec![0f32; g * c];
        colsum_acc(dy, body, g * c, g * c, &mut part);
        if !rows.is_multiple_of(g) {
            colsum_acc(&dy[body * g * c..], rows % g, c, c, &mut part[..c]);
        }
        colsum_acc(&part, g, c, c, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn bias_grad_interleave_fills_the_gpu_and_sums_every_row_once() {
        assert_eq!(bias_grad_interleave(16384, 768), 16);
        assert_eq!(bias_grad_interleave(16384, 50304), 1);
        assert_eq!(bias_grad_interleave(40, 768), 1);
        assert_eq!(bias_grad_interleave(300, 70), 8);
        let mut rng = Rng::new(4);
        for (rows, c) in [(300, 70), (301, 5), (1, 3), (4099, 33)] {
            let dy = rng.vec_f32(rows * c, -1.0, 1.0);
            let mut out = vec![0.5f32; c];
            twin::bias_grad(&dy, rows, c, &mut out);
            for col in 0..c {
                let want: f64 = 0.5 + (0..rows).map(|r| dy[r * c + col] as f64).sum::<f64>();
                assert!(
                    (out[col] as f64 - want).abs() < 1e-3,
                    "({rows}, {c}) column {col}"
                );
            }
        }
    }

    #[test]
    fn twin_sums_every_group_once() {
        let mut rng = Rng::new(3);
        for (groups, width, stride) in [(1, 1, 1), (33, 5, 7), (1024, 70, 140), (31, 3, 3)] {
            let p = rng.vec_f32(groups * stride, -1.0, 1.0);
            let mut out = rng.vec_f32(width, -1.0, 1.0);
            let before = out.clone();
            twin::colsum_acc(&p, groups, width, stride, &mut out);
            for c in 0..width {
                let want: f64 =
                    before[c] as f64 + (0..groups).map(|g| p[g * stride + c] as f64).sum::<f64>();
                assert!(
                    (out[c] as f64 - want).abs() < 1e-4,
                    "({groups},{width}) column {c}"
                );
            }
        }
    }
}
