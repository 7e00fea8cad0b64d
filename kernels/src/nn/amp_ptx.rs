//! PTX of the gradient check / unscale / norm kernels and the loss-scale update.
//!
//! Pass 1 (`lathe_grad_check_norm_f32`, `lathe_grad_unscale_check_norm_f32`), 256 threads a
//! block, grid from `n` alone (`amp::check_blocks`): a grid-stride loop, 4 elements a step
//! through one 16-byte load when `grads` is 16-byte aligned (else one at a time). Per element:
//! `testp.finite` on the value *before* scaling (a non-finite value raises the thread's flag),
//! `u = x * inv_scale` (`inv_scale` read from the step state), `acc = fma(u, u, acc)`; the
//! unscale variant stores `u` back in place. At the end each thread whose flag is up writes 1 to
//! `state[FOUND_INF]` (the same value from any number of threads: order-free), the block folds
//! `acc` (warp butterfly, then thread 0 adds the 8 warp sums in order) into
//! `partials[blockIdx.x]`. Every thread visits a fixed set of elements in a fixed order, so the
//! partials are the same bits on every run.
//!
//! Pass 2 (`lathe_grad_norm_finish_f32`): one block of 256; thread t adds partials t, t+256, ...
//! in order, then the same block fold; thread 0 writes `norm = sqrt(total)` and the clip factor
//! `min(1, max_norm / (norm + 1e-6))` (in f64, rounded to f32) into the step state.
//!
//! `lathe_amp_update`: one thread; GradScaler's rule on the state (see `amp::twin::update`).

use super::amp::{CLIP, FOUND_INF, GRAD_NORM, INV_SCALE, LAST_FOUND_INF, SCALE, SKIPPED, STEP};
use super::amp::{GROWTH_TRACKER, THREADS};
use super::ptxgen::{Asm, emit, entry, f64_imm, ld_ptr, prelude, warp_sum};

/// Byte offset of a state word.
fn w(word: usize) -> usize {
    word * 4
}

/// Folds `%acc` over the block (256 threads): warp butterflies, warp sums to shared memory,
/// thread 0 adds them in warp order. Leaves the total in thread 0's `%acc`; other threads
/// branch to `done`.
fn block_fold(a: &mut Asm, done: &str) {
    warp_sum(a, "%acc", "%t");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.l("setp.eq.u32 %pd, %lane, 0;");
    a.l("mov.u32 %r, s_warp;");
    a.l("shl.b32 %wo, %warp, 2;");
    a.l("add.u32 %r, %r, %wo;");
    a.l("@%pd st.shared.f32 [%r], %acc;");
    a.l("bar.sync 0;");
    a.l("setp.ne.u32 %pd, %tx, 0;");
    emit!(a, "@%pd bra {done};");
    a.l("ld.shared.f32 %acc, [s_warp];");
    for k in 1..THREADS / 32 {
        emit!(a, "ld.shared.f32 %t, [s_warp+{}];", 4 * k);
        a.l("add.f32 %acc, %acc, %t;");
    }
}

/// Pass 1 of the gradient check: `entry(grads, n, state, partials)`.
pub(crate) fn check_norm(name: &str, unscale: bool) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("grads", "u64"),
            ("n", "u64"),
            ("state", "u64"),
            ("partials", "u64"),
        ],
    );
    emit!(a, ".shared .align 4 .f32 s_warp[{}];", THREADS / 32);
    prelude(&mut a);
    a.l(".reg .b64 %g, %st, %part, %n, %gid, %stride, %i, %n4, %off;");
    a.l(".reg .b32 %tx, %cta, %nthr, %ncta, %lane, %warp, %wo, %bad, %r, %one;");
    a.l(".reg .f32 %inv, %acc, %x<4>, %u<4>, %t;");
    a.l(".reg .pred %pv, %pf, %pd;");
    ld_ptr(&mut a, "%g", "grads");
    ld_ptr(&mut a, "%st", "state");
    ld_ptr(&mut a, "%part", "partials");
    a.l("ld.param.u64 %n, [p_n];");
    emit!(a, "ld.global.f32 %inv, [%st+{}];", w(INV_SCALE));
    a.l("mov.u32 %tx, %tid.x;");
    a.l("mov.u32 %cta, %ctaid.x;");
    a.l("mov.u32 %nthr, %ntid.x;");
    a.l("mov.u32 %ncta, %nctaid.x;");
    a.c("gid = blockIdx * blockDim + threadIdx; stride = gridDim * blockDim (64-bit)");
    a.l("mul.wide.u32 %gid, %cta, %nthr;");
    a.l("cvt.u64.u32 %off, %tx;");
    a.l("add.u64 %gid, %gid, %off;");
    a.l("mul.wide.u32 %stride, %ncta, %nthr;");
    a.l("mov.f32 %acc, 0f00000000;");
    a.l("mov.u32 %bad, 0;");
    a.l("mov.u32 %one, 1;");
    a.l("mov.u64 %i, %gid;");
    a.l("and.b64 %off, %g, 15;");
    a.l("setp.ne.u64 %pv, %off, 0;");
    a.l("@%pv bra $SCALAR;");
    a.c("vector loop: group i holds elements 4i .. 4i+3");
    a.l("shr.u64 %n4, %n, 2;");
    a.label("$VLOOP");
    a.l("setp.ge.u64 %pl, %i, %n4;");
    a.l("@%pl bra $VEND;");
    a.l("shl.b64 %ad, %i, 4;");
    a.l("add.u64 %ad, %g, %ad;");
    a.l("ld.global.cs.v4.f32 {%x0, %x1, %x2, %x3}, [%ad];");
    for l in 0..4 {
        elem(&mut a, &format!("%x{l}"), &format!("%u{l}"));
    }
    if unscale {
        a.l("st.global.cs.v4.f32 [%ad], {%u0, %u1, %u2, %u3};");
    }
    a.l("add.u64 %i, %i, %stride;");
    a.l("bra $VLOOP;");
    a.label("$VEND");
    a.c("the scalar tail starts after the last whole group");
    a.l("shl.b64 %i, %n4, 2;");
    a.l("add.u64 %i, %i, %gid;");
    a.label("$SCALAR");
    a.l("setp.ge.u64 %pl, %i, %n;");
    a.l("@%pl bra $SEND;");
    a.l("shl.b64 %ad, %i, 2;");
    a.l("add.u64 %ad, %g, %ad;");
    a.l("ld.global.f32 %x0, [%ad];");
    elem(&mut a, "%x0", "%u0");
    if unscale {
        a.l("st.global.f32 [%ad], %u0;");
    }
    a.l("add.u64 %i, %i, %stride;");
    a.l("bra $SCALAR;");
    a.label("$SEND");
    a.c("found_inf: every thread that saw a non-finite value writes the same 1");
    a.l("setp.ne.u32 %pd, %bad, 0;");
    emit!(a, "@%pd st.global.u32 [%st+{}], %one;", w(FOUND_INF));
    block_fold(&mut a, "$DONE");
    a.l("mul.wide.u32 %off, %cta, 4;");
    a.l("add.u64 %off, %part, %off;");
    a.l("st.global.f32 [%off], %acc;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// One element: flag a non-finite `x`, `u = x * inv`, `acc += u * u`.
fn elem(a: &mut Asm, x: &str, u: &str) {
    emit!(a, "testp.finite.f32 %pf, {x};");
    a.l("@!%pf mov.u32 %bad, 1;");
    emit!(a, "mul.rn.f32 {u}, {x}, %inv;");
    emit!(a, "fma.rn.f32 %acc, {u}, {u}, %acc;");
}

/// Pass 2: `entry(partials, count, state, max_norm)`.
pub(crate) fn norm_finish(name: &str) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("partials", "u64"),
            ("count", "u32"),
            ("state", "u64"),
            ("max_norm", "f32"),
        ],
    );
    emit!(a, ".shared .align 4 .f32 s_warp[{}];", THREADS / 32);
    prelude(&mut a);
    a.l(".reg .b64 %part, %st;");
    a.l(".reg .b32 %tx, %count, %j, %lane, %warp, %wo, %r;");
    a.l(".reg .f32 %acc, %t, %maxn, %norm, %clip;");
    a.l(".reg .f64 %dn, %dm, %dq;");
    a.l(".reg .pred %pd, %pn, %pm;");
    ld_ptr(&mut a, "%part", "partials");
    ld_ptr(&mut a, "%st", "state");
    a.l("ld.param.u32 %count, [p_count];");
    a.l("ld.param.f32 %maxn, [p_max_norm];");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("mov.f32 %acc, 0f00000000;");
    a.c("thread t adds partials t, t + 256, ... in order");
    a.l("mov.u32 %j, %tx;");
    a.label("$LOOP");
    a.l("setp.ge.u32 %pl, %j, %count;");
    a.l("@%pl bra $LEND;");
    a.l("mul.wide.u32 %ad, %j, 4;");
    a.l("add.u64 %ad, %part, %ad;");
    a.l("ld.global.f32 %t, [%ad];");
    a.l("add.f32 %acc, %acc, %t;");
    emit!(a, "add.u32 %j, %j, {THREADS};");
    a.l("bra $LOOP;");
    a.label("$LEND");
    block_fold(&mut a, "$DONE");
    a.l("sqrt.rn.f32 %norm, %acc;");
    a.c("clip = min(1, max_norm / (norm + 1e-6)) in f64 when both are finite and max_norm > 0");
    a.l("testp.finite.f32 %pn, %norm;");
    a.l("testp.finite.f32 %pm, %maxn;");
    a.l("setp.gt.and.f32 %pm, %maxn, 0f00000000, %pm;");
    a.l("and.pred %pn, %pn, %pm;");
    a.l("mov.f32 %clip, 0f3F800000;");
    a.l("cvt.f64.f32 %dn, %norm;");
    emit!(a, "add.rn.f64 %dn, %dn, {};", f64_imm(1e-6));
    a.l("cvt.f64.f32 %dm, %maxn;");
    a.l("@%pn div.rn.f64 %dq, %dm, %dn;");
    emit!(a, "@%pn min.f64 %dq, %dq, {};", f64_imm(1.0));
    a.l("@%pn cvt.rn.f32.f64 %clip, %dq;");
    emit!(a, "st.global.f32 [%st+{}], %norm;", w(GRAD_NORM));
    emit!(a, "st.global.f32 [%st+{}], %clip;", w(CLIP));
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// The loss-scale update: `entry(state, dynamic, growth_interval, growth_factor, backoff,
/// min_scale)`, factors as f64 bit patterns; a backoff stops at `min_scale`. One thread.
pub(crate) fn update(name: &str) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("state", "u64"),
            ("dynamic", "u32"),
            ("growth_interval", "u32"),
            ("growth_factor", "u64"),
            ("backoff_factor", "u64"),
            ("min_scale", "f32"),
        ],
    );
    a.l(".reg .b64 %st, %bits;");
    a.l(".reg .b32 %tx, %found, %step, %skipped, %dyn, %interval, %tr, %s, %zero;");
    a.l(".reg .f32 %scale, %inv, %grown, %min;");
    a.l(".reg .f64 %growth, %backoff, %d;");
    a.l(".reg .pred %pf, %p, %pfin;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("setp.ne.u32 %p, %tx, 0;");
    a.l("@%p bra $DONE;");
    ld_ptr(&mut a, "%st", "state");
    a.l("ld.param.u32 %dyn, [p_dynamic];");
    a.l("ld.param.u32 %interval, [p_growth_interval];");
    a.l("ld.param.u64 %bits, [p_growth_factor];");
    a.l("mov.b64 %growth, %bits;");
    a.l("ld.param.u64 %bits, [p_backoff_factor];");
    a.l("mov.b64 %backoff, %bits;");
    a.l("mov.u32 %zero, 0;");
    emit!(a, "ld.global.u32 %found, [%st+{}];", w(FOUND_INF));
    emit!(a, "ld.global.u32 %step, [%st+{}];", w(STEP));
    emit!(a, "ld.global.u32 %skipped, [%st+{}];", w(SKIPPED));
    a.l("setp.ne.u32 %pf, %found, 0;");
    a.l("@%pf add.u32 %skipped, %skipped, 1;");
    a.l("@!%pf add.u32 %step, %step, 1;");
    emit!(a, "st.global.u32 [%st+{}], %step;", w(STEP));
    emit!(a, "st.global.u32 [%st+{}], %skipped;", w(SKIPPED));
    a.l("setp.eq.u32 %p, %dyn, 0;");
    a.l("@%p bra $CLEAR;");
    emit!(a, "ld.global.f32 %scale, [%st+{}];", w(SCALE));
    emit!(a, "ld.global.u32 %tr, [%st+{}];", w(GROWTH_TRACKER));
    a.l("@%pf bra $BACKOFF;");
    a.c("clean step: the tracker counts; at the interval the scale grows (if still finite)");
    a.l("add.u32 %s, %tr, 1;");
    a.l("setp.lt.u32 %p, %s, %interval;");
    a.l("@%p bra $KEEP;");
    a.l("cvt.f64.f32 %d, %scale;");
    a.l("mul.rn.f64 %d, %d, %growth;");
    a.l("cvt.rn.f32.f64 %grown, %d;");
    a.l("testp.finite.f32 %pfin, %grown;");
    a.l("@%pfin mov.f32 %scale, %grown;");
    a.l("mov.u32 %tr, 0;");
    a.l("bra $STORE;");
    a.label("$KEEP");
    a.l("mov.u32 %tr, %s;");
    a.l("bra $STORE;");
    a.label("$BACKOFF");
    a.l("cvt.f64.f32 %d, %scale;");
    a.l("mul.rn.f64 %d, %d, %backoff;");
    a.l("cvt.rn.f32.f64 %scale, %d;");
    a.l("ld.param.f32 %min, [p_min_scale];");
    a.l("max.f32 %scale, %scale, %min;");
    a.l("mov.u32 %tr, 0;");
    a.label("$STORE");
    a.c("inv_scale = 1 / scale in f64, rounded to f32 (as GradScaler)");
    a.l("cvt.f64.f32 %d, %scale;");
    a.l("rcp.rn.f64 %d, %d;");
    a.l("cvt.rn.f32.f64 %inv, %d;");
    emit!(a, "st.global.f32 [%st+{}], %scale;", w(SCALE));
    emit!(a, "st.global.f32 [%st+{}], %inv;", w(INV_SCALE));
    emit!(a, "st.global.u32 [%st+{}], %tr;", w(GROWTH_TRACKER));
    a.label("$CLEAR");
    emit!(a, "st.global.u32 [%st+{}], %found;", w(LAST_FOUND_INF));
    emit!(a, "st.global.u32 [%st+{}], %zero;", w(FOUND_INF));
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}
