//! The GEMM epilogue: from f32 accumulators to stored C.
//!
//! Thread `(warp, lane)` holds, for each fragment `(i, j)` of its warp tile, `c0, c1` at row
//! `row + 16 i`, columns `col + 8 j + {0, 1}` and `c2, c3` eight rows further
//! ([`super::tile::acc_origin`]). In order, each phase a warp-uniform branch on the launch's
//! flags:
//! 1. `v = alpha * acc`;
//! 2. if `beta != 0`: `v += beta * C_old` (C read in the output type; never read when
//!    `beta == 0`, so C may hold garbage or NaN then);
//! 3. if `FLAG_BIAS`: `v += bias[col]` (bias in the input type, length N);
//! 4. if `FLAG_GELU`: `v = v * sigmoid(2u)`, `u = sqrt(2/pi) (v + 0.044715 v^3)`, which equals
//!    GPT-2's `0.5 v (1 + tanh(u))`, with `ex2.approx` and `rcp.approx` (relative error ~1e-7);
//! 5. round to the output type (nearest even) and store: one 4-byte (16-bit C) or 8-byte (f32 C)
//!    store per pair when C's base and `ldc` allow it and both columns exist, else one store per
//!    element; rows past M and columns past N are never touched.

use super::ptx::{Body, Regs, Spec, f32_imm};
use super::tile::acc_origin;
use crate::desc::Elem;

/// Launch flag: add `bias[col]`.
pub const FLAG_BIAS: u32 = 1;
/// Launch flag: apply GELU (tanh form) after the bias.
pub const FLAG_GELU: u32 = 2;

/// `x + 0.044715 x^3`.
const GELU_CUBIC: f32 = 0.044715;

/// `-2 sqrt(2/pi) log2(e)`: `sigmoid(2u) = 1 / (1 + 2^(u' * this))` with `u' = x + c x^3`.
fn gelu_exp2_scale() -> f32 {
    (-2.0 * (2.0f64 / std::f64::consts::PI).sqrt() * std::f64::consts::LOG2_E) as f32
}

/// Converts the 16-bit register `h` holding `elem` into the f32 register `f`.
fn widen(b: &mut Body, elem: Elem, h: &str, f: &str) {
    match elem {
        Elem::BF16 => {
            let r = b.r();
            b.i(format!("cvt.u32.u16 {r}, {h};"));
            b.i(format!("shl.b32 {r}, {r}, 16;"));
            b.i(format!("mov.b32 {f}, {r};"));
        }
        Elem::F16 => b.i(format!("cvt.f32.f16 {f}, {h};")),
        _ => unreachable!("widen of a 32-bit type"),
    }
}

/// Rounds the f32 register `f` into the 16-bit register `h`.
fn narrow(b: &mut Body, elem: Elem, f: &str, h: &str) {
    match elem {
        Elem::BF16 => b.i(format!("cvt.rn.bf16.f32 {h}, {f};")),
        Elem::F16 => b.i(format!("cvt.rn.f16.f32 {h}, {f};")),
        _ => unreachable!("narrow to a 32-bit type"),
    }
}

/// Writes the epilogue.
pub fn emit(b: &mut Body, spec: &Spec, r: &Regs) {
    let t = &spec.tile;
    b.c("epilogue: coordinates of the thread's accumulators");
    let (row_ix, col_ix) = acc_origin(t);
    let row = b.ix(&row_ix, &r.tid);
    b.i(format!("add.u32 {row}, {row}, {};", r.bm0));
    let col = b.ix(&col_ix, &r.tid);
    b.i(format!("add.u32 {col}, {col}, {};", r.bn0));
    let shape = Fragments {
        input: spec.input,
        output: spec.output,
        mt: t.mt() as usize,
        nt: t.nt() as usize,
    };
    emit_at(b, &shape, &row, &col, r);
}

/// The accumulators an epilogue stores: `mt x nt` fragments of the `m16n8` C layout per
/// thread (the layout of `mma.sync` and, with `mt = 1`, of a `wgmma` m64nN accumulator per
/// warp), and the element types.
#[derive(Clone, Copy, Debug)]
pub struct Fragments {
    pub input: Elem,
    pub output: Elem,
    pub mt: usize,
    pub nt: usize,
}

/// The epilogue for accumulators whose fragment `(0, 0)` register 0 sits at (`row`, `col`) of C
/// (registers holding absolute coordinates). `r.tid`, `r.bm0` and `r.bn0` are not read.
pub fn emit_at(b: &mut Body, f: &Fragments, row: &str, col: &str, r: &Regs) {
    let out = f.output;
    let osize = out.size() as u32;
    let (mt, nt) = (f.mt, f.nt);
    let acc = |i: usize, j: usize, q: usize| r.acc[(i * nt + j) * 4 + q].clone();

    // Row predicates: pr[2i + h] = row + 16 i + 8 h < m; row registers likewise.
    let mut rows = Vec::new();
    let mut pr = Vec::new();
    for i in 0..mt {
        for h in 0..2 {
            let rr = b.r();
            b.i(format!("add.u32 {rr}, {row}, {};", 16 * i + 8 * h));
            let p = b.p();
            b.i(format!("setp.lt.u32 {p}, {rr}, {};", r.m));
            rows.push(rr);
            pr.push(p);
        }
    }
    // Column predicates: pc[2j + e] = col + 8 j + e < n.
    let mut pc = Vec::new();
    for j in 0..nt {
        for e in 0..2 {
            let cc = b.r();
            b.i(format!("add.u32 {cc}, {col}, {};", 8 * j + e));
            let p = b.p();
            b.i(format!("setp.lt.u32 {p}, {cc}, {};", r.n));
            pc.push(p);
        }
    }
    // Byte offset of the thread's first column in a row of C.
    let ccol = b.rd();
    b.i(format!("mul.wide.u32 {ccol}, {col}, {osize};"));
    // Row start pointers: C + (row * ldc) * osize + col * osize.
    let row_ptr = |b: &mut Body, rr: &str| -> String {
        let p = b.rd();
        b.i(format!("mul.wide.u32 {p}, {rr}, {};", r.ldc));
        b.i(format!("shl.b64 {p}, {p}, {};", osize.trailing_zeros()));
        b.i(format!("add.u64 {p}, {p}, {};", r.c));
        b.i(format!("add.u64 {p}, {p}, {ccol};"));
        p
    };

    b.c("1. v = alpha * acc");
    for a in &r.acc {
        b.i(format!("mul.f32 {a}, {a}, {};", r.alpha));
    }

    b.c("2. v += beta * C (only when beta != 0)");
    let no_beta = b.label("no_beta");
    let has_beta = b.p();
    b.i(format!("setp.neu.f32 {has_beta}, {}, 0f00000000;", r.beta));
    b.i(format!("@!{has_beta} bra.uni {no_beta};"));
    for i in 0..mt {
        for h in 0..2 {
            let ptr = row_ptr(b, &rows[2 * i + h]);
            for j in 0..nt {
                for e in 0..2 {
                    let p = b.p();
                    b.i(format!(
                        "and.pred {p}, {}, {};",
                        pr[2 * i + h],
                        pc[2 * j + e]
                    ));
                    let off = (8 * j + e) as u32 * osize;
                    let old = b.f();
                    if out == Elem::F32 {
                        b.i(format!("mov.f32 {old}, 0f00000000;"));
                        b.i(format!("@{p} ld.global.f32 {old}, [{ptr}+{off}];"));
                    } else {
                        let hh = b.h();
                        b.i(format!("mov.b16 {hh}, 0;"));
                        b.i(format!("@{p} ld.global.b16 {hh}, [{ptr}+{off}];"));
                        widen(b, out, &hh, &old);
                    }
                    let a = acc(i, j, 2 * h + e);
                    b.i(format!("fma.rn.f32 {a}, {}, {old}, {a};", r.beta));
                }
            }
        }
    }
    b.put_label(&no_beta);

    b.c("3. v += bias[col] (flag 1; bias in the input type)");
    let no_bias = b.label("no_bias");
    let fl = b.r();
    b.i(format!("and.b32 {fl}, {}, {FLAG_BIAS};", r.flags));
    let has_bias = b.p();
    b.i(format!("setp.ne.u32 {has_bias}, {fl}, 0;"));
    b.i(format!("@!{has_bias} bra.uni {no_bias};"));
    let bptr = b.rd();
    b.i(format!("mul.wide.u32 {bptr}, {col}, 2;"));
    b.i(format!("add.u64 {bptr}, {bptr}, {};", r.bias));
    for j in 0..nt {
        for e in 0..2 {
            let hh = b.h();
            b.i(format!("mov.b16 {hh}, 0;"));
            b.i(format!(
                "@{} ld.global.b16 {hh}, [{bptr}+{}];",
                pc[2 * j + e],
                2 * (8 * j + e)
            ));
            let bv = b.f();
            widen(b, f.input, &hh, &bv);
            for i in 0..mt {
                for h in 0..2 {
                    let a = acc(i, j, 2 * h + e);
                    b.i(format!("add.f32 {a}, {a}, {bv};"));
                }
            }
        }
    }
    b.put_label(&no_bias);

    b.c("4. GELU, tanh form: v * sigmoid(2 sqrt(2/pi) (v + 0.044715 v^3)) (flag 2)");
    let no_gelu = b.label("no_gelu");
    b.i(format!("and.b32 {fl}, {}, {FLAG_GELU};", r.flags));
    let has_gelu = b.p();
    b.i(format!("setp.ne.u32 {has_gelu}, {fl}, 0;"));
    b.i(format!("@!{has_gelu} bra.uni {no_gelu};"));
    for a in &r.acc {
        let x3 = b.f();
        b.i(format!("mul.f32 {x3}, {a}, {a};"));
        b.i(format!("mul.f32 {x3}, {x3}, {a};"));
        let u = b.f();
        b.i(format!(
            "fma.rn.f32 {u}, {x3}, {}, {a};",
            f32_imm(GELU_CUBIC)
        ));
        b.i(format!("mul.f32 {u}, {u}, {};", f32_imm(gelu_exp2_scale())));
        b.i(format!("ex2.approx.ftz.f32 {u}, {u};"));
        b.i(format!("add.f32 {u}, {u}, 0f3F800000;"));
        b.i(format!("rcp.approx.ftz.f32 {u}, {u};"));
        b.i(format!("mul.f32 {a}, {a}, {u};"));
    }
    b.put_label(&no_gelu);

    b.c("5. round and store; pairs as one vector store where aligned and in range");
    let c_vec = b.p();
    {
        let lo = b.r();
        b.i(format!("cvt.u32.u64 {lo}, {};", r.c));
        b.i(format!("and.b32 {lo}, {lo}, {};", 2 * osize - 1));
        let l1 = b.r();
        b.i(format!("and.b32 {l1}, {}, 1;", r.ldc));
        b.i(format!("or.b32 {lo}, {lo}, {l1};"));
        b.i(format!("setp.eq.u32 {c_vec}, {lo}, 0;"));
    }
    // pcv[j]: both columns of pair j exist and the pair may be stored as one vector.
    let pcv: Vec<String> = (0..nt)
        .map(|j| {
            let p = b.p();
            b.i(format!("and.pred {p}, {}, {c_vec};", pc[2 * j + 1]));
            p
        })
        .collect();
    for i in 0..mt {
        for h in 0..2 {
            let ptr = row_ptr(b, &rows[2 * i + h]);
            let prr = &pr[2 * i + h];
            for j in 0..nt {
                let (v0, v1) = (acc(i, j, 2 * h), acc(i, j, 2 * h + 1));
                let off = 8 * j as u32 * osize;
                let pv = b.p();
                b.i(format!("and.pred {pv}, {prr}, {};", pcv[j]));
                let npv = b.p();
                b.i(format!("not.pred {npv}, {pv};"));
                let ps0 = b.p();
                b.i(format!("and.pred {ps0}, {prr}, {};", pc[2 * j]));
                b.i(format!("and.pred {ps0}, {ps0}, {npv};"));
                let ps1 = b.p();
                b.i(format!("and.pred {ps1}, {prr}, {};", pc[2 * j + 1]));
                b.i(format!("and.pred {ps1}, {ps1}, {npv};"));
                if out == Elem::F32 {
                    b.i(format!(
                        "@{pv} st.global.v2.f32 [{ptr}+{off}], {{{v0}, {v1}}};"
                    ));
                    b.i(format!("@{ps0} st.global.f32 [{ptr}+{off}], {v0};"));
                    b.i(format!("@{ps1} st.global.f32 [{ptr}+{}], {v1};", off + 4));
                } else {
                    let (h0, h1) = (b.h(), b.h());
                    narrow(b, out, &v0, &h0);
                    narrow(b, out, &v1, &h1);
                    let w = b.r();
                    b.i(format!("mov.b32 {w}, {{{h0}, {h1}}};"));
                    b.i(format!("@{pv} st.global.b32 [{ptr}+{off}], {w};"));
                    b.i(format!("@{ps0} st.global.b16 [{ptr}+{off}], {h0};"));
                    b.i(format!("@{ps1} st.global.b16 [{ptr}+{}], {h1};", off + 2));
                }
            }
        }
    }
}
