//! PTX of the fused AdamW kernels (see `adamw` for the formula and the parameter contract).
//!
//! Shape: 256 threads a block, grid-stride over groups of 4 elements (16-byte loads/stores of
//! master, grads, m, v and an 8-byte store of the 16-bit working copy) when every buffer is
//! aligned for it, else one element at a time. Streams use the `.cs` (evict-first) cache hint:
//! every byte is touched once.
//!
//! Prologue, per block: every thread reads `state[FOUND_INF]` and returns at once when it is
//! set (uniform over the grid: nothing else writes the state during the launch). Thread 0 forms
//! the bias corrections `1 - beta^t` (f64 powers by repeated squaring, `t = state[STEP] + 1`)
//! and the stochastic-rounding key, and hands them to the block through shared memory.
//!
//! Weight decay: a table of sorted, disjoint, non-adjacent half-open ranges of global element
//! indices (`offset + i`) takes decay. Each thread keeps a cursor on the first range whose end
//! lies past its current element, with that range and the next one in registers; because its
//! elements only increase, the cursor only moves forward (at most `n_ranges` steps over the
//! whole launch). Two non-adjacent ranges past the cursor cannot both miss a 4-element group:
//! range k+2 starts at least 4 elements after the group's first element, so testing ranges k
//! and k+1 decides every element of the group.
//!
//! Arithmetic: every operation is the IEEE-rounded `.rn` form (`mul.rn`, `add.rn`, `div.rn`,
//! `sqrt.rn`); explicit rounding modifiers forbid contraction into FMA, so the kernel computes
//! exactly the twin's f32 operations in the twin's order and matches it bit for bit.

use super::adamw::Working;
use super::amp::{CLIP, FOUND_INF, INV_SCALE, STEP};
use super::ptxgen::{Asm, emit, entry, f64_imm, ld_ptr, prelude};

/// splitmix64 constants, as the signed decimals PTX takes for 64-bit immediates.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;
const INDEX_MUL: u64 = 0xD1B5_4A32_D192_ED03;

fn imm(x: u64) -> String {
    format!("{}", x as i64)
}

/// `z = mix64(z)` (splitmix64's output function); `y` is a u64 scratch register.
fn mix64(a: &mut Asm, z: &str, y: &str) {
    emit!(a, "shr.u64 {y}, {z}, 30;");
    emit!(a, "xor.b64 {z}, {z}, {y};");
    emit!(a, "mul.lo.s64 {z}, {z}, {};", imm(MIX1));
    emit!(a, "shr.u64 {y}, {z}, 27;");
    emit!(a, "xor.b64 {z}, {z}, {y};");
    emit!(a, "mul.lo.s64 {z}, {z}, {};", imm(MIX2));
    emit!(a, "shr.u64 {y}, {z}, 31;");
    emit!(a, "xor.b64 {z}, {z}, {y};");
}

/// `out = f32(1 - beta^t)`, the power by repeated squaring in f64 (the twin's
/// `bias_correction`). Thread 0 only; labels prefixed by `name`.
fn bias_correction(a: &mut Asm, name: &str, beta: &str, out: &str) {
    a.l("mov.f64 %dw, 0d3FF0000000000000;");
    emit!(a, "cvt.f64.f32 %db, {beta};");
    a.l("mov.u32 %de, %t;");
    a.label(&format!("$L_{name}"));
    a.l("setp.eq.u32 %pl, %de, 0;");
    emit!(a, "@%pl bra $L_{name}_done;");
    a.l("and.b32 %dbit, %de, 1;");
    a.l("setp.ne.u32 %pq, %dbit, 0;");
    a.l("@%pq mul.rn.f64 %dw, %dw, %db;");
    a.l("mul.rn.f64 %db, %db, %db;");
    a.l("shr.u32 %de, %de, 1;");
    emit!(a, "bra $L_{name};");
    a.label(&format!("$L_{name}_done"));
    emit!(a, "sub.rn.f64 %dw, {}, %dw;", f64_imm(1.0));
    emit!(a, "cvt.rn.f32.f64 {out}, %dw;");
}

/// Loads the decay range `idx` (u32 register) into `(s, e)`, or `(MAX, MAX)` past the table.
fn load_range(a: &mut Asm, idx: &str, s: &str, e: &str) {
    emit!(a, "setp.lt.u32 %pr, {idx}, %nr;");
    emit!(a, "mov.u64 {s}, -1;");
    emit!(a, "mov.u64 {e}, -1;");
    emit!(a, "mul.wide.u32 %ra, {idx}, 16;");
    a.l("add.u64 %ra, %rg, %ra;");
    emit!(a, "@%pr ld.global.u64 {s}, [%ra];");
    emit!(a, "@%pr ld.global.u64 {e}, [%ra+8];");
}

/// Moves the cursor until range k ends after global index `%gi`.
fn advance(a: &mut Asm, name: &str) {
    a.label(&format!("$L_adv_{name}"));
    a.l("setp.gt.u64 %pl, %e0, %gi;");
    emit!(a, "@%pl bra $L_adv_{name}_done;");
    a.l("mov.u64 %s0, %s1;");
    a.l("mov.u64 %e0, %e1;");
    a.l("add.u32 %k, %k, 1;");
    a.l("add.u32 %kk, %k, 1;");
    load_range(a, "%kk", "%s1", "%e1");
    emit!(a, "bra $L_adv_{name};");
    a.label(&format!("$L_adv_{name}_done"));
}

/// The update of one element: `p, g, m, v` are f32 registers (updated in place: p, m, v);
/// `gl` is its global index (u64). Decay is decided from the cursor's two ranges.
fn element(a: &mut Asm, p: &str, g: &str, m: &str, v: &str, gl: &str) {
    emit!(a, "setp.ge.u64 %pa, {gl}, %s0;");
    emit!(a, "setp.lt.and.u64 %pa, {gl}, %e0, %pa;");
    emit!(a, "setp.ge.u64 %pb, {gl}, %s1;");
    emit!(a, "setp.lt.and.u64 %pb, {gl}, %e1, %pb;");
    a.l("or.pred %pd, %pa, %pb;");
    a.c("g = grad * grad_scale");
    emit!(a, "mul.rn.f32 {g}, {g}, %gs;");
    a.c("m = beta1 * m + (1 - beta1) * g");
    emit!(a, "mul.rn.f32 %ta, %beta1, {m};");
    emit!(a, "mul.rn.f32 %tb, %omb1, {g};");
    emit!(a, "add.rn.f32 {m}, %ta, %tb;");
    a.c("v = beta2 * v + (1 - beta2) * (g * g)");
    emit!(a, "mul.rn.f32 %ta, %beta2, {v};");
    emit!(a, "mul.rn.f32 %tb, {g}, {g};");
    a.l("mul.rn.f32 %tb, %omb2, %tb;");
    emit!(a, "add.rn.f32 {v}, %ta, %tb;");
    a.c("u = (m / bc1) / (sqrt(v / bc2) + eps)");
    emit!(a, "div.rn.f32 %ta, {m}, %bc1;");
    emit!(a, "div.rn.f32 %tb, {v}, %bc2;");
    a.l("sqrt.rn.f32 %tb, %tb;");
    a.l("add.rn.f32 %tb, %tb, %eps;");
    a.l("div.rn.f32 %ta, %ta, %tb;");
    a.c("decay: u = u + wd * p");
    emit!(a, "mul.rn.f32 %tb, %wd, {p};");
    a.l("add.rn.f32 %tb, %ta, %tb;");
    a.l("selp.f32 %ta, %tb, %ta, %pd;");
    a.c("p = p - lr * u");
    a.l("mul.rn.f32 %ta, %lr, %ta;");
    emit!(a, "sub.rn.f32 {p}, {p}, %ta;");
}

/// Rounds the f32 register `p` (global index `gl`) into the 16-bit register `h`.
fn round_working(a: &mut Asm, w: Working, p: &str, gl: &str, h: &str) {
    match w {
        Working::None => {}
        Working::Bf16 => emit!(a, "cvt.rn.bf16.f32 {h}, {p};"),
        Working::F16 => emit!(a, "cvt.rn.f16.f32 {h}, {p};"),
        Working::Bf16Stochastic => {
            a.c("bits = mix64(key ^ (index * C)) >> 48; bf16 = (bits(p) + bits) >> 16");
            emit!(a, "mul.lo.s64 %z, {gl}, {};", imm(INDEX_MUL));
            a.l("xor.b64 %z, %z, %key;");
            mix64(a, "%z", "%y");
            a.l("shr.u64 %z, %z, 48;");
            a.l("cvt.u32.u64 %rb, %z;");
            emit!(a, "mov.b32 %pbits, {p};");
            a.l("add.u32 %pbits, %pbits, %rb;");
            a.l("shr.u32 %pbits, %pbits, 16;");
            emit!(a, "cvt.u16.u32 {h}, %pbits;");
            a.c("NaN stays NaN (quiet)");
            emit!(a, "testp.notanumber.f32 %pn, {p};");
            emit!(a, "@%pn cvt.rn.bf16.f32 {h}, {p};");
        }
    }
}

/// One AdamW kernel for a working-copy kind.
pub(crate) fn kernel(name: &str, w: Working) -> String {
    let mut a = Asm::default();
    let mut params: Vec<(&str, &str)> = vec![
        ("master", "u64"),
        ("grads", "u64"),
        ("m", "u64"),
        ("v", "u64"),
    ];
    if w != Working::None {
        params.push(("working", "u64"));
    }
    params.extend_from_slice(&[
        ("decay_ranges", "u64"),
        ("n_ranges", "u32"),
        ("state", "u64"),
        ("n", "u64"),
        ("offset", "u64"),
        ("seed", "u64"),
        ("lr", "f32"),
        ("beta1", "f32"),
        ("beta2", "f32"),
        ("eps", "f32"),
        ("weight_decay", "f32"),
        ("unscale", "u32"),
    ]);
    entry(&mut a, name, &params);
    a.c("bias corrections (f32 at 0, 4) and the stochastic-rounding key (u64 at 8)");
    a.l(".shared .align 8 .b8 s_step[16];");
    prelude(&mut a);
    a.l(".reg .b64 %pm, %pg, %pmm, %pv, %pwk, %rg, %st, %n, %off, %seed, %key;");
    a.l(".reg .b64 %gid, %stride, %i, %n4, %gi, %gl, %ra, %s0, %e0, %s1, %e1, %z, %y, %o;");
    a.l(".reg .b32 %tx, %nthr, %cta, %ncta, %nr, %k, %kk, %t, %found, %unscale;");
    a.l(".reg .b32 %de, %dbit, %rb, %pbits;");
    a.l(".reg .f32 %lr, %beta1, %beta2, %eps, %wd, %inv, %clip, %gs, %omb1, %omb2;");
    a.l(".reg .f32 %bc1, %bc2, %ta, %tb;");
    a.l(".reg .f32 %xp<4>, %xg<4>, %xm<4>, %xv<4>;");
    a.l(".reg .f64 %dw, %db;");
    a.l(".reg .pred %pq, %pr, %pa, %pb, %pd, %pn, %pvec;");
    ld_ptr(&mut a, "%st", "state");
    a.c("a step with non-finite gradients changes nothing");
    emit!(a, "ld.global.u32 %found, [%st+{}];", 4 * FOUND_INF);
    a.l("setp.ne.u32 %pl, %found, 0;");
    a.l("@%pl bra $DONE;");
    ld_ptr(&mut a, "%pm", "master");
    ld_ptr(&mut a, "%pg", "grads");
    ld_ptr(&mut a, "%pmm", "m");
    ld_ptr(&mut a, "%pv", "v");
    if w != Working::None {
        ld_ptr(&mut a, "%pwk", "working");
    }
    ld_ptr(&mut a, "%rg", "decay_ranges");
    a.l("ld.param.u32 %nr, [p_n_ranges];");
    a.l("ld.param.u64 %n, [p_n];");
    a.l("ld.param.u64 %off, [p_offset];");
    a.l("ld.param.u64 %seed, [p_seed];");
    a.l("ld.param.f32 %lr, [p_lr];");
    a.l("ld.param.f32 %beta1, [p_beta1];");
    a.l("ld.param.f32 %beta2, [p_beta2];");
    a.l("ld.param.f32 %eps, [p_eps];");
    a.l("ld.param.f32 %wd, [p_weight_decay];");
    a.l("ld.param.u32 %unscale, [p_unscale];");
    emit!(a, "ld.global.f32 %inv, [%st+{}];", 4 * INV_SCALE);
    emit!(a, "ld.global.f32 %clip, [%st+{}];", 4 * CLIP);
    emit!(a, "ld.global.u32 %t, [%st+{}];", 4 * STEP);
    a.l("add.u32 %t, %t, 1;");
    a.c("grad_scale = (unscale ? inv_scale : 1) * clip");
    a.l("setp.ne.u32 %pq, %unscale, 0;");
    a.l("selp.f32 %gs, %inv, 0f3F800000, %pq;");
    a.l("mul.rn.f32 %gs, %gs, %clip;");
    a.l("sub.rn.f32 %omb1, 0f3F800000, %beta1;");
    a.l("sub.rn.f32 %omb2, 0f3F800000, %beta2;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("setp.ne.u32 %pq, %tx, 0;");
    a.l("@%pq bra $SYNC;");
    bias_correction(&mut a, "pow1", "%beta1", "%bc1");
    bias_correction(&mut a, "pow2", "%beta2", "%bc2");
    a.c("key = mix64(seed ^ mix64(t + golden))");
    a.l("cvt.u64.u32 %z, %t;");
    emit!(a, "add.s64 %z, %z, {};", imm(GOLDEN));
    mix64(&mut a, "%z", "%y");
    a.l("xor.b64 %z, %z, %seed;");
    mix64(&mut a, "%z", "%y");
    a.l("st.shared.f32 [s_step], %bc1;");
    a.l("st.shared.f32 [s_step+4], %bc2;");
    a.l("st.shared.u64 [s_step+8], %z;");
    a.label("$SYNC");
    a.l("bar.sync 0;");
    a.l("ld.shared.f32 %bc1, [s_step];");
    a.l("ld.shared.f32 %bc2, [s_step+4];");
    a.l("ld.shared.u64 %key, [s_step+8];");
    a.c("decay cursor: ranges 0 and 1");
    a.l("mov.u32 %k, 0;");
    load_range(&mut a, "%k", "%s0", "%e0");
    a.l("mov.u32 %kk, 1;");
    load_range(&mut a, "%kk", "%s1", "%e1");
    a.l("mov.u32 %nthr, %ntid.x;");
    a.l("mov.u32 %cta, %ctaid.x;");
    a.l("mov.u32 %ncta, %nctaid.x;");
    a.l("mul.wide.u32 %gid, %cta, %nthr;");
    a.l("cvt.u64.u32 %o, %tx;");
    a.l("add.u64 %gid, %gid, %o;");
    a.l("mul.wide.u32 %stride, %ncta, %nthr;");
    a.c("vector path when master, grads, m, v are 16-byte and the working copy 8-byte aligned");
    a.l("or.b64 %o, %pm, %pg;");
    a.l("or.b64 %o, %o, %pmm;");
    a.l("or.b64 %o, %o, %pv;");
    a.l("and.b64 %o, %o, 15;");
    if w != Working::None {
        a.l("and.b64 %z, %pwk, 7;");
        a.l("or.b64 %o, %o, %z;");
    }
    a.l("setp.eq.u64 %pvec, %o, 0;");
    a.l("mov.u64 %i, %gid;");
    a.l("@!%pvec bra $SCALAR;");
    a.l("shr.u64 %n4, %n, 2;");
    a.label("$VLOOP");
    a.l("setp.ge.u64 %pl, %i, %n4;");
    a.l("@%pl bra $VEND;");
    a.c("group i: elements 4i .. 4i+3, global indices offset + 4i + l");
    a.l("shl.b64 %o, %i, 4;");
    for (reg, base) in [
        ("%xp", "%pm"),
        ("%xg", "%pg"),
        ("%xm", "%pmm"),
        ("%xv", "%pv"),
    ] {
        emit!(a, "add.u64 %ad, {base}, %o;");
        emit!(
            a,
            "ld.global.cs.v4.f32 {{{reg}0, {reg}1, {reg}2, {reg}3}}, [%ad];"
        );
    }
    a.l("shl.b64 %gi, %i, 2;");
    a.l("add.u64 %gi, %gi, %off;");
    advance(&mut a, "v");
    for l in 0..4 {
        emit!(a, "add.u64 %gl, %gi, {l};");
        element(
            &mut a,
            &format!("%xp{l}"),
            &format!("%xg{l}"),
            &format!("%xm{l}"),
            &format!("%xv{l}"),
            "%gl",
        );
        if w != Working::None {
            round_working(&mut a, w, &format!("%xp{l}"), "%gl", &format!("%hh{l}"));
        }
    }
    for (reg, base) in [("%xp", "%pm"), ("%xm", "%pmm"), ("%xv", "%pv")] {
        emit!(a, "add.u64 %ad, {base}, %o;");
        emit!(
            a,
            "st.global.cs.v4.f32 [%ad], {{{reg}0, {reg}1, {reg}2, {reg}3}};"
        );
    }
    if w != Working::None {
        a.l("shr.u64 %z, %o, 1;");
        a.l("add.u64 %ad, %pwk, %z;");
        a.l("mov.b32 %wq0, {%hh0, %hh1};");
        a.l("mov.b32 %wq1, {%hh2, %hh3};");
        a.l("st.global.cs.v2.b32 [%ad], {%wq0, %wq1};");
    }
    a.l("add.u64 %i, %i, %stride;");
    a.l("bra $VLOOP;");
    a.label("$VEND");
    a.l("shl.b64 %i, %n4, 2;");
    a.l("add.u64 %i, %i, %gid;");
    a.label("$SCALAR");
    a.l("setp.ge.u64 %pl, %i, %n;");
    a.l("@%pl bra $DONE;");
    a.l("shl.b64 %o, %i, 2;");
    for (reg, base) in [
        ("%xp0", "%pm"),
        ("%xg0", "%pg"),
        ("%xm0", "%pmm"),
        ("%xv0", "%pv"),
    ] {
        emit!(a, "add.u64 %ad, {base}, %o;");
        emit!(a, "ld.global.f32 {reg}, [%ad];");
    }
    a.l("add.u64 %gi, %i, %off;");
    advance(&mut a, "s");
    element(&mut a, "%xp0", "%xg0", "%xm0", "%xv0", "%gi");
    for (reg, base) in [("%xp0", "%pm"), ("%xm0", "%pmm"), ("%xv0", "%pv")] {
        emit!(a, "add.u64 %ad, {base}, %o;");
        emit!(a, "st.global.f32 [%ad], {reg};");
    }
    if w != Working::None {
        round_working(&mut a, w, "%xp0", "%gi", "%hh0");
        a.l("shl.b64 %z, %i, 1;");
        a.l("add.u64 %ad, %pwk, %z;");
        a.l("st.global.b16 [%ad], %hh0;");
    }
    a.l("add.u64 %i, %i, %stride;");
    a.l("bra $SCALAR;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}
