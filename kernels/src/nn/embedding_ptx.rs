//! PTX of the embedding kernels (see `embedding` for the contract and the cost notes).
//!
//! Forward: one warp per token row (8 per 256-thread block); `out = wte[token] + wpe[pos]`,
//! vector loads of 4 when `C % 4 == 0` and the buffers are aligned.
//!
//! Position backward: one thread per `(t, c)` of `dwpe (T, C)`, adding `dout[b, t, c]` over
//! `b = 0 .. B` in order (4 loads in flight), then `dwpe += sum`.
//!
//! Token backward: a block of 128 threads owns a tile of 64 vocabulary rows
//! `[v0, v0 + 64)` x 128 channels `[c0, c0 + 128)` (thread t <-> channel c0 + t) with an f32
//! accumulator tile in shared memory. It walks all tokens in chunks of 512 (thread t holds
//! tokens `base + 4t .. base + 4t + 3`, the next chunk prefetched while the current one is
//! processed), compacts the chunk's tokens that fall in its vocabulary rows into a shared list
//! in ascending token order (per-thread counts, a warp inclusive scan with `shfl.up`, the 4 warp
//! totals in order), then every thread adds `dout[n, c]` of each listed token into
//! `acc[row][t]` in list order, 4 loads in flight. Every `(v, c)` sum therefore runs over the
//! tokens in ascending order, starting from 0: the same bits on every run, no atomics. At the
//! end, rows that received any token are added to `dwte`. Two barriers per chunk: (A) after the
//! warp totals, (B) after the list; a thread reaching the next chunk's (A) implies every thread
//! finished this chunk's list, and a thread rewriting the warp totals has passed (B).

use super::embedding::{BWD_POS_THREADS, TOK_CHANNELS, TOK_CHUNK, TOK_ROWS};
use super::ptxgen::{
    Asm, emit, entry, ld_at, ld_at_if, ld_ptr, ld_row, log2_size, prelude, regs, row_loop, st_row,
    vec_ok,
};
use crate::desc::Elem;

/// Forward: `entry(tokens, wte, wpe, out, n_tokens, t, c, v)`.
pub(crate) fn forward(name: &str, dt: Elem) -> String {
    let vw = 4 * dt.size();
    let sh = log2_size(dt);
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("tokens", "u64"),
            ("wte", "u64"),
            ("wpe", "u64"),
            ("out", "u64"),
            ("n_tokens", "u32"),
            ("t", "u32"),
            ("c", "u32"),
            ("v", "u32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %ptok, %pte, %ppe, %po, %erow, %prow, %orow, %t64;");
    a.l(".reg .b32 %n, %t, %c, %v, %tx, %lane, %row, %tok, %pos, %t32;");
    a.l(".reg .f32 %e<4>, %p<4>, %nan;");
    a.l(".reg .pred %pvec, %pq;");
    for (r, p) in [
        ("%ptok", "tokens"),
        ("%pte", "wte"),
        ("%ppe", "wpe"),
        ("%po", "out"),
    ] {
        ld_ptr(&mut a, r, p);
    }
    a.l("ld.param.u32 %n, [p_n_tokens];");
    a.l("ld.param.u32 %t, [p_t];");
    a.l("ld.param.u32 %c, [p_c];");
    a.l("ld.param.u32 %v, [p_v];");
    a.l("mov.f32 %nan, 0f7FFFFFFF;");
    a.c("row = blockIdx.x * 8 + warp (token index); pos = row % T");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %row, %tx, 5;");
    a.l("mov.u32 %t32, %ctaid.x;");
    a.l("mad.lo.u32 %row, %t32, 8, %row;");
    a.l("setp.ge.u32 %pq, %row, %n;");
    a.l("@%pq bra $DONE;");
    a.l("mul.wide.u32 %t64, %row, 4;");
    a.l("add.u64 %ad, %ptok, %t64;");
    a.l("ld.global.u32 %tok, [%ad];");
    a.l("rem.u32 %pos, %row, %t;");
    vec_ok(
        &mut a,
        "%pvec",
        &[("%pte", vw), ("%ppe", vw), ("%po", vw)],
        "%c",
        "%t64",
        "%t32",
    );
    for (dst, base, idx) in [
        ("%erow", "%pte", "%tok"),
        ("%prow", "%ppe", "%pos"),
        ("%orow", "%po", "%row"),
    ] {
        emit!(a, "mul.wide.u32 {dst}, {idx}, %c;");
        emit!(a, "shl.b64 {dst}, {dst}, {sh};");
        emit!(a, "add.u64 {dst}, {base}, {dst};");
    }
    a.c("a token outside [0, V) gets a NaN row (it would read out of bounds)");
    a.l("setp.lt.u32 %pq, %tok, %v;");
    a.l("@%pq bra $GOOD;");
    row_loop(
        &mut a,
        "bad",
        "%pvec",
        "%lane",
        "32",
        "%c",
        &mut |a, col, w| {
            let nan: Vec<String> = (0..w).map(|_| "%nan".to_string()).collect();
            st_row(a, dt, "%orow", col, &nan);
        },
    );
    a.l("bra $DONE;");
    a.label("$GOOD");
    row_loop(
        &mut a,
        "e",
        "%pvec",
        "%lane",
        "32",
        "%c",
        &mut |a, col, w| {
            let (e, p) = (regs("%e", w), regs("%p", w));
            ld_row(a, dt, "%erow", col, &e);
            ld_row(a, dt, "%prow", col, &p);
            for l in 0..w {
                emit!(a, "add.f32 {}, {}, {};", e[l], e[l], p[l]);
            }
            st_row(a, dt, "%orow", col, &e);
        },
    );
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// Position backward: `entry(dout, dwpe, b, t, c)`.
pub(crate) fn backward_pos(name: &str, dt: Elem) -> String {
    let sh = log2_size(dt);
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("dout", "u64"),
            ("dwpe", "u64"),
            ("b", "u32"),
            ("t", "u32"),
            ("c", "u32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %pd, %pw, %step, %a1;");
    a.l(".reg .b32 %b, %t, %c, %tc, %idx, %k, %k4, %t32;");
    a.l(".reg .f32 %acc, %x<4>, %old;");
    a.l(".reg .pred %pq;");
    ld_ptr(&mut a, "%pd", "dout");
    ld_ptr(&mut a, "%pw", "dwpe");
    a.l("ld.param.u32 %b, [p_b];");
    a.l("ld.param.u32 %t, [p_t];");
    a.l("ld.param.u32 %c, [p_c];");
    a.l("mul.lo.u32 %tc, %t, %c;");
    a.l("mov.u32 %idx, %ctaid.x;");
    a.l("mov.u32 %t32, %tid.x;");
    emit!(a, "mad.lo.u32 %idx, %idx, {BWD_POS_THREADS}, %t32;");
    a.l("setp.ge.u32 %pq, %idx, %tc;");
    a.l("@%pq bra $DONE;");
    a.c("dout[b][t][c] at element b * T * C + idx; step T * C elements");
    a.l("cvt.u64.u32 %ad, %idx;");
    emit!(a, "shl.b64 %ad, %ad, {sh};");
    a.l("add.u64 %ad, %pd, %ad;");
    a.l("cvt.u64.u32 %step, %tc;");
    emit!(a, "shl.b64 %step, %step, {sh};");
    a.l("mov.f32 %acc, 0f00000000;");
    a.l("mov.u32 %k, 0;");
    a.label("$QUAD");
    a.l("add.u32 %k4, %k, 4;");
    a.l("setp.gt.u32 %pq, %k4, %b;");
    a.l("@%pq bra $ONE;");
    for i in 0..4 {
        ld_at(&mut a, dt, &[format!("%x{i}")], "");
        a.l("add.u64 %ad, %ad, %step;");
    }
    for i in 0..4 {
        emit!(a, "add.rn.f32 %acc, %acc, %x{i};");
    }
    a.l("mov.u32 %k, %k4;");
    a.l("bra $QUAD;");
    a.label("$ONE");
    a.l("setp.ge.u32 %pq, %k, %b;");
    a.l("@%pq bra $STORE;");
    ld_at(&mut a, dt, &["%x0".to_string()], "");
    a.l("add.rn.f32 %acc, %acc, %x0;");
    a.l("add.u64 %ad, %ad, %step;");
    a.l("add.u32 %k, %k, 1;");
    a.l("bra $ONE;");
    a.label("$STORE");
    a.l("mul.wide.u32 %a1, %idx, 4;");
    a.l("add.u64 %a1, %pw, %a1;");
    a.l("ld.global.f32 %old, [%a1];");
    a.l("add.rn.f32 %old, %old, %acc;");
    a.l("st.global.f32 [%a1], %old;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// Token backward: `entry(tokens, dout, dwte, n_tokens, c, v)`.
pub(crate) fn backward_tok(name: &str, dt: Elem) -> String {
    let sh = log2_size(dt);
    let per = (TOK_CHUNK / TOK_CHANNELS) as usize; // tokens per thread per chunk
    let warps = TOK_CHANNELS / 32;
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("tokens", "u64"),
            ("dout", "u64"),
            ("dwte", "u64"),
            ("n_tokens", "u32"),
            ("c", "u32"),
            ("v", "u32"),
        ],
    );
    emit!(
        a,
        ".shared .align 16 .f32 s_acc[{}];",
        TOK_ROWS * TOK_CHANNELS
    );
    emit!(a, ".shared .align 4 .u32 s_list_n[{TOK_CHUNK}];");
    emit!(a, ".shared .align 4 .u32 s_list_r[{TOK_CHUNK}];");
    emit!(a, ".shared .align 4 .u32 s_wtot[{warps}];");
    emit!(a, ".shared .align 4 .u32 s_touched[{TOK_ROWS}];");
    prelude(&mut a);
    a.l(".reg .b64 %ptok, %pd, %pw, %t64;");
    a.l(".reg .b32 %n, %c, %v, %tx, %lane, %warp, %v0, %col, %base, %nb, %t32, %one, %zero;");
    emit!(a, ".reg .b32 %tok<{per}>, %rel<{per}>;");
    a.l(".reg .b32 %cnt, %incl, %y, %woff, %total, %pos, %k, %k4, %nj, %rj, %sa;");
    a.l(".reg .f32 %d<4>, %acc, %zf;");
    emit!(a, ".reg .pred %pm<{per}>;");
    a.l(".reg .pred %pc, %pq, %pu, %pz;");
    ld_ptr(&mut a, "%ptok", "tokens");
    ld_ptr(&mut a, "%pd", "dout");
    ld_ptr(&mut a, "%pw", "dwte");
    a.l("ld.param.u32 %n, [p_n_tokens];");
    a.l("ld.param.u32 %c, [p_c];");
    a.l("ld.param.u32 %v, [p_v];");
    a.l("mov.u32 %one, 1;");
    a.l("mov.u32 %zero, 0;");
    a.l("mov.f32 %zf, 0f00000000;");
    a.l("mov.u32 %tx, %tid.x;");
    a.l("and.b32 %lane, %tx, 31;");
    a.l("shr.u32 %warp, %tx, 5;");
    a.c("thread 0 alone marks touched rows (one writer per flag, no store race)");
    a.l("setp.eq.u32 %pz, %tx, 0;");
    a.c("tile: vocabulary rows [v0, v0 + 64), this thread's channel col = c0 + tx");
    a.l("mov.u32 %v0, %ctaid.x;");
    emit!(a, "mul.lo.u32 %v0, %v0, {TOK_ROWS};");
    a.l("mov.u32 %col, %ctaid.y;");
    emit!(a, "mad.lo.u32 %col, %col, {TOK_CHANNELS}, %tx;");
    a.l("setp.lt.u32 %pc, %col, %c;");
    a.c("zero this thread's accumulator column and (threads < 64) the touched flags");
    a.l("mov.u32 %sa, s_acc;");
    a.l("shl.b32 %t32, %tx, 2;");
    a.l("add.u32 %sa, %sa, %t32;");
    for r in 0..TOK_ROWS {
        emit!(a, "st.shared.f32 [%sa+{}], %zf;", 4 * r * TOK_CHANNELS);
    }
    emit!(a, "setp.lt.u32 %pq, %tx, {TOK_ROWS};");
    a.l("mov.u32 %sa, s_touched;");
    a.l("add.u32 %sa, %sa, %t32;");
    a.l("@%pq st.shared.u32 [%sa], %zero;");
    // Loads this thread's tokens of the chunk at `base_reg` (0xFFFFFFFF past the end).
    let load_tokens = |a: &mut Asm, base_reg: &str| {
        for i in 0..per {
            emit!(a, "mad.lo.u32 %t32, %tx, {per}, {base_reg};");
            emit!(a, "add.u32 %t32, %t32, {i};");
            a.l("setp.lt.u32 %pu, %t32, %n;");
            a.l("mul.wide.u32 %t64, %t32, 4;");
            a.l("add.u64 %t64, %ptok, %t64;");
            emit!(a, "mov.u32 %tok{i}, -1;");
            emit!(a, "@%pu ld.global.u32 %tok{i}, [%t64];");
        }
    };
    a.l("mov.u32 %base, 0;");
    load_tokens(&mut a, "%base");
    a.label("$CHUNK");
    a.l("setp.ge.u32 %pq, %base, %n;");
    a.l("@%pq bra $END;");
    a.c("matches: token in [v0, v0 + 64) and < V (rel = token - v0, unsigned)");
    a.l("mov.u32 %cnt, 0;");
    for i in 0..per {
        emit!(a, "sub.u32 %rel{i}, %tok{i}, %v0;");
        emit!(a, "setp.lt.u32 %pm{i}, %rel{i}, {TOK_ROWS};");
        emit!(a, "setp.lt.and.u32 %pm{i}, %tok{i}, %v, %pm{i};");
        emit!(a, "@%pm{i} add.u32 %cnt, %cnt, 1;");
    }
    a.c("prefetch the next chunk's tokens");
    emit!(a, "add.u32 %nb, %base, {TOK_CHUNK};");
    load_tokens(&mut a, "%nb");
    a.c("exclusive position of this thread's first match: warp scan, then earlier warps");
    a.l("mov.u32 %incl, %cnt;");
    for off in [1, 2, 4, 8, 16] {
        emit!(a, "shfl.sync.up.b32 %y|%pu, %incl, {off}, 0, -1;");
        a.l("@%pu add.u32 %incl, %incl, %y;");
    }
    a.l("setp.eq.u32 %pq, %lane, 31;");
    a.l("mov.u32 %sa, s_wtot;");
    a.l("shl.b32 %t32, %warp, 2;");
    a.l("add.u32 %sa, %sa, %t32;");
    a.l("@%pq st.shared.u32 [%sa], %incl;");
    a.l("bar.sync 0;");
    a.l("sub.u32 %pos, %incl, %cnt;");
    a.l("mov.u32 %total, 0;");
    for w in 0..warps {
        emit!(a, "ld.shared.u32 %t32, [s_wtot+{}];", 4 * w);
        a.l("add.u32 %total, %total, %t32;");
        emit!(a, "setp.gt.u32 %pq, %warp, {w};");
        a.l("@%pq add.u32 %pos, %pos, %t32;");
    }
    for i in 0..per {
        emit!(a, "mad.lo.u32 %t32, %tx, {per}, %base;");
        emit!(a, "add.u32 %t32, %t32, {i};");
        a.l("mov.u32 %sa, s_list_n;");
        a.l("shl.b32 %k, %pos, 2;");
        a.l("add.u32 %sa, %sa, %k;");
        emit!(a, "@%pm{i} st.shared.u32 [%sa], %t32;");
        a.l("mov.u32 %sa, s_list_r;");
        a.l("add.u32 %sa, %sa, %k;");
        emit!(a, "@%pm{i} st.shared.u32 [%sa], %rel{i};");
        emit!(a, "@%pm{i} add.u32 %pos, %pos, 1;");
    }
    a.l("bar.sync 0;");
    a.c("every thread adds its channel of each listed token, in list order");
    a.l("mov.u32 %k, 0;");
    a.label("$QUAD");
    a.l("add.u32 %k4, %k, 4;");
    a.l("setp.gt.u32 %pq, %k4, %total;");
    a.l("@%pq bra $ONE;");
    for j in 0..4 {
        load_listed(&mut a, dt, sh, j, &format!("%d{j}"));
    }
    for j in 0..4 {
        add_listed(&mut a, j, &format!("%d{j}"));
    }
    a.l("mov.u32 %k, %k4;");
    a.l("bra $QUAD;");
    a.label("$ONE");
    a.l("setp.ge.u32 %pq, %k, %total;");
    a.l("@%pq bra $NEXT;");
    load_listed(&mut a, dt, sh, 0, "%d0");
    add_listed(&mut a, 0, "%d0");
    a.l("add.u32 %k, %k, 1;");
    a.l("bra $ONE;");
    a.label("$NEXT");
    emit!(a, "add.u32 %base, %base, {TOK_CHUNK};");
    a.l("bra $CHUNK;");
    a.label("$END");
    a.l("bar.sync 0;");
    a.l("@!%pc bra $DONE;");
    a.c("dwte[v0 + r][col] += acc[r][tx] for every touched row inside the vocabulary");
    a.l("mov.u32 %sa, s_acc;");
    a.l("shl.b32 %t32, %tx, 2;");
    a.l("add.u32 %sa, %sa, %t32;");
    for r in 0..TOK_ROWS {
        emit!(a, "ld.shared.u32 %t32, [s_touched+{}];", 4 * r);
        a.l("setp.ne.u32 %pq, %t32, 0;");
        emit!(a, "add.u32 %rj, %v0, {r};");
        a.l("setp.lt.and.u32 %pq, %rj, %v, %pq;");
        emit!(a, "ld.shared.f32 %acc, [%sa+{}];", 4 * r * TOK_CHANNELS);
        a.l("mul.wide.u32 %t64, %rj, %c;");
        a.l("cvt.u64.u32 %ad, %col;");
        a.l("add.u64 %t64, %t64, %ad;");
        a.l("shl.b64 %t64, %t64, 2;");
        a.l("add.u64 %t64, %pw, %t64;");
        a.l("@%pq ld.global.f32 %d0, [%t64];");
        a.l("@%pq add.rn.f32 %d0, %d0, %acc;");
        a.l("@%pq st.global.f32 [%t64], %d0;");
    }
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

/// Loads `dout[list_n[k + j]][col]` into `dst` (when the channel is inside C).
fn load_listed(a: &mut Asm, dt: Elem, sh: u32, j: usize, dst: &str) {
    a.l("shl.b32 %sa, %k, 2;");
    a.l("mov.u32 %t32, s_list_n;");
    a.l("add.u32 %t32, %t32, %sa;");
    emit!(a, "ld.shared.u32 %nj, [%t32+{}];", 4 * j);
    a.l("mul.wide.u32 %t64, %nj, %c;");
    a.l("cvt.u64.u32 %ad, %col;");
    a.l("add.u64 %ad, %t64, %ad;");
    emit!(a, "shl.b64 %ad, %ad, {sh};");
    a.l("add.u64 %ad, %pd, %ad;");
    ld_at_if(a, dt, &[dst.to_string()], "%pc");
}

/// `acc[list_r[k + j]][tx] += src`; thread 0 marks the row touched.
fn add_listed(a: &mut Asm, j: usize, src: &str) {
    a.l("shl.b32 %sa, %k, 2;");
    a.l("mov.u32 %t32, s_list_r;");
    a.l("add.u32 %t32, %t32, %sa;");
    emit!(a, "ld.shared.u32 %rj, [%t32+{}];", 4 * j);
    a.l("mov.u32 %t32, s_touched;");
    a.l("shl.b32 %sa, %rj, 2;");
    a.l("add.u32 %t32, %t32, %sa;");
    a.l("@%pz st.shared.u32 [%t32], %one;");
    emit!(a, "mad.lo.u32 %sa, %rj, {TOK_CHANNELS}, %tx;");
    a.l("shl.b32 %sa, %sa, 2;");
    a.l("mov.u32 %t32, s_acc;");
    a.l("add.u32 %sa, %sa, %t32;");
    a.l("ld.shared.f32 %acc, [%sa];");
    emit!(a, "add.rn.f32 %acc, %acc, {src};");
    a.l("st.shared.f32 [%sa], %acc;");
}
