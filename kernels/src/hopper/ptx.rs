//! The PTX template of the Hopper GEMM, filled in Rust for each (version, output type).
//!
//! One CTA of 384 threads = three warpgroups:
//!
//! - warpgroup 0, the producer: gives registers back (`setmaxnreg.dec` to [`PRODUCER_REGS`]);
//!   its thread 0 walks the CTA's tiles and, for each 64-wide K step, waits until the ring
//!   stage is empty, arms the stage's `full` mbarrier with the byte count and issues two TMA
//!   loads (A box 64 x 128, B box 64 x 256, both 128B-swizzled) that complete on it.
//! - warpgroups 1 and 2, the consumers: take registers (`setmaxnreg.inc` to
//!   [`CONSUMER_REGS`]); consumer `c` owns rows `64c .. 64c + 63` of the 128 x 256 tile and
//!   keeps its 64 x 256 f32 accumulator in 128 registers per thread. Per K step: wait on the
//!   stage's `full` barrier, four `wgmma.mma_async m64n256k16` (K = 4 x 16), commit, wait, and
//!   lane 0 of each warp arrives on the stage's `empty` barrier (count 8 = 2 consumers x 4 warps).
//!   After the last K step of a tile the accumulators go straight to global memory with
//!   bounds checks, while the producer already fills the ring for the next tile.
//!
//! Both roles walk the same tile sequence: `tile = ctaid.x, ctaid.x + nctaid.x, ...` in the
//! grouped order of [`super::tile_coords`]. With grid = tiles this is a plain grid; with
//! grid = SM count it is persistent.
//!
//! Shared memory (dynamic, base rounded up to 1024 B at run time so the 128B swizzle atoms sit on
//! 1024-B boundaries as both TMA and the wgmma descriptors assume):
//! `A[s]` at `s * 16384` (128 rows x 128 B), `B[s]` at `65536 + s * 32768` (256 rows x 128 B),
//! `full[s]` at `196608 + 8s`, `empty[s]` at `196640 + 8s`.

use super::{
    BK, BM, BN, CONSUMER_REGS, GROUP_M, PRODUCER_REGS, STAGES, Version, a_stage_bytes,
    b_stage_bytes,
};
use crate::desc::Elem;
use std::fmt::Write;

/// The shared-memory descriptor bits besides the address: 128B swizzle (bits 62-63 = 1),
/// stride byte offset 1024 B (bits 32-45 = 64), leading byte offset 16 B (bits 16-29 = 1,
/// ignored for swizzled K-major operands). The value the probes verified on the H100.
const DESC_SWIZZLE_128B: u64 = (1 << 62) | (64 << 32) | (1 << 16);

/// Offset of the mbarriers from the aligned shared base.
pub(crate) const fn barrier_offset() -> u32 {
    STAGES * (a_stage_bytes() + b_stage_bytes())
}

/// Appends one line of PTX.
macro_rules! emit {
    ($s:expr, $($t:tt)*) => {{
        let _ = writeln!($s, $($t)*);
    }};
}

/// The 128 accumulator registers as a wgmma operand list.
fn acc_list() -> String {
    let regs: Vec<String> = (0..128).map(|i| format!("%d{i}")).collect();
    format!("{{{}}}", regs.join(", "))
}

/// Tile coordinates of `%r10` into `%r15` (m tile) and `%r16` (n tile); `%r17` holds
/// `GROUP_M * tiles_n`, `%r7` tiles_m. Uses `%r18..%r23`.
fn tile_coords(s: &mut String) {
    emit!(s, "\tdiv.u32 %r18, %r10, %r17;");
    emit!(s, "\tmul.lo.u32 %r19, %r18, {GROUP_M};");
    emit!(s, "\tsub.u32 %r21, %r7, %r19;");
    emit!(s, "\tmin.u32 %r21, %r21, {GROUP_M};");
    emit!(s, "\trem.u32 %r22, %r10, %r17;");
    emit!(s, "\trem.u32 %r23, %r22, %r21;");
    emit!(s, "\tadd.u32 %r15, %r19, %r23;");
    emit!(s, "\tdiv.u32 %r16, %r22, %r21;");
}

/// The entry name of a (version, output) pair.
pub fn entry_name(v: Version, out: Elem) -> String {
    format!("lathe_hgemm_tn_bf16_{}_v{}", out.name(), v.number())
}

/// The module text: both output types of one version.
pub fn module(v: Version) -> String {
    let mut s = String::new();
    emit!(
        s,
        "// Lathe Hopper GEMM v{}: C(M,N) = A(M,K) B(N,K)^T, bf16 operands,",
        v.number()
    );
    emit!(
        s,
        "// f32 accumulation, 128x256x64 tiles, {STAGES}-stage TMA ring, wgmma m64n256k16."
    );
    emit!(s, ".version 8.0");
    emit!(s, ".target sm_90a");
    emit!(s, ".address_size 64");
    emit!(s, "");
    emit!(s, ".extern .shared .align 1024 .b8 lathe_hgemm_smem[];");
    for out in [Elem::F32, Elem::BF16] {
        emit!(s, "");
        entry(&mut s, v, out);
    }
    s
}

fn entry(s: &mut String, v: Version, out: Elem) {
    let name = entry_name(v, out);
    let ksteps = BK / 16;

    emit!(
        s,
        "// {name}: C {} (M, N) row-major; A via tmA (M, K) bf16; B via tmB (N, K) bf16.",
        out.name()
    );
    emit!(s, ".visible .entry {name}(");
    emit!(s, "\t.param .align 64 .b8 tmA[128],");
    emit!(s, "\t.param .align 64 .b8 tmB[128],");
    emit!(s, "\t.param .u64 pC,");
    emit!(s, "\t.param .u32 pM,");
    emit!(s, "\t.param .u32 pN,");
    emit!(s, "\t.param .u32 pK");
    emit!(s, ")");
    emit!(s, ".maxntid 384, 1, 1");
    emit!(s, ".minnctapersm 1");
    emit!(s, "{{");
    emit!(s, "\t.reg .pred %p<24>;");
    emit!(s, "\t.reg .b16 %h<4>;");
    emit!(s, "\t.reg .b32 %r<80>;");
    emit!(s, "\t.reg .b64 %rd<32>;");
    emit!(s, "\t.reg .f32 %d<128>;");
    setup(s, "lathe_hgemm_smem");

    // ---------------- producer warpgroup ----------------
    producer_stage(s);
    emit!(
        s,
        "\tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes \
         [%r31], [%rd1, {{%r30, %r24}}], [%r28];"
    );
    emit!(
        s,
        "\tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes \
         [%r32], [%rd2, {{%r30, %r25}}], [%r28];"
    );
    next_stage(s, "P_K");
    emit!(s, "\tadd.u32 %r10, %r10, %r11;");
    emit!(s, "\tbra P_TILE;");

    // ---------------- consumer warpgroups ----------------
    consumer_head(s);
    consumer_stage(s, DESC_SWIZZLE_128B, DESC_SWIZZLE_128B);
    // The first K step of a tile overwrites the accumulators (scale-d = 0).
    emit!(s, "\tsetp.ne.u32 %p8, %r14, 0;");
    emit!(s, "\twgmma.fence.sync.aligned;");
    let acc = acc_list();
    for kk in 0..ksteps {
        let scale_d = if kk == 0 { "%p8" } else { "%p7" };
        if kk > 0 {
            // +32 bytes along K inside the swizzle atom = +2 in descriptor units.
            emit!(s, "\tadd.s64 %rd10, %rd10, 2;");
            emit!(s, "\tadd.s64 %rd11, %rd11, 2;");
        }
        emit!(
            s,
            "\twgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {acc}, %rd10, %rd11, {scale_d}, 1, 1, 0, 0;"
        );
    }
    emit!(s, "\twgmma.commit_group.sync.aligned;");
    match v {
        Version::V1 => {
            // Wait for this stage's products, then hand the stage back.
            emit!(s, "\twgmma.wait_group.sync.aligned 0;");
            emit!(s, "\t@%p6 mbarrier.arrive.shared::cta.b64 _, [%r27];");
        }
        Version::V2 => {
            // Keep this stage's group in flight; the previous one is complete: release it.
            emit!(s, "\twgmma.wait_group.sync.aligned 1;");
            emit!(s, "\tand.pred %p9, %p6, %p8;");
            emit!(s, "\t@%p9 mbarrier.arrive.shared::cta.b64 _, [%r49];");
            emit!(s, "\tmov.u32 %r49, %r27;");
        }
    }
    next_stage(s, "C_K");
    if v == Version::V2 {
        emit!(s, "\twgmma.wait_group.sync.aligned 0;");
        emit!(s, "\t@%p6 mbarrier.arrive.shared::cta.b64 _, [%r49];");
    }
    epilogue(s, out);
    tile_end(s);
}

/// The start every version shares: ids, shapes, tile counts, the aligned base of the dynamic
/// shared array `smem`, the ring's mbarriers (initialised by thread 0 and made visible to the
/// async proxy), then the branch of the consumer warpgroups to `CONSUMER`.
fn setup(s: &mut String, smem: &str) {
    let bars = barrier_offset();
    let empties = bars + 8 * STAGES;
    emit!(s, "\tmov.u32 %r0, %tid.x;");
    emit!(s, "\tshr.u32 %r1, %r0, 7;");
    emit!(s, "\tmov.u32 %r20, {smem};");
    emit!(s, "\tadd.u32 %r20, %r20, 1023;");
    emit!(s, "\tand.b32 %r2, %r20, -1024;");
    emit!(s, "\tld.param.u32 %r3, [pM];");
    emit!(s, "\tld.param.u32 %r4, [pN];");
    emit!(s, "\tld.param.u32 %r5, [pK];");
    emit!(s, "\tadd.u32 %r6, %r5, {};", BK - 1);
    emit!(s, "\tshr.u32 %r6, %r6, {};", BK.trailing_zeros());
    emit!(s, "\tadd.u32 %r7, %r3, {};", BM - 1);
    emit!(s, "\tshr.u32 %r7, %r7, {};", BM.trailing_zeros());
    emit!(s, "\tadd.u32 %r8, %r4, {};", BN - 1);
    emit!(s, "\tshr.u32 %r8, %r8, {};", BN.trailing_zeros());
    emit!(s, "\tmul.lo.u32 %r9, %r7, %r8;");
    emit!(s, "\tmov.u32 %r11, %nctaid.x;");
    emit!(s, "\tmul.lo.u32 %r17, %r8, {GROUP_M};");
    // Barrier initialisation by thread 0, made visible to the async proxy, then a CTA barrier.
    emit!(s, "\tsetp.eq.u32 %p0, %r0, 0;");
    emit!(s, "\t@!%p0 bra INIT_DONE;");
    for st in 0..STAGES {
        emit!(s, "\tadd.u32 %r24, %r2, {};", bars + 8 * st);
        emit!(s, "\tmbarrier.init.shared::cta.b64 [%r24], 1;");
        emit!(s, "\tadd.u32 %r24, %r2, {};", empties + 8 * st);
        emit!(s, "\tmbarrier.init.shared::cta.b64 [%r24], 8;");
    }
    emit!(s, "\tfence.mbarrier_init.release.cluster;");
    emit!(s, "INIT_DONE:");
    emit!(s, "\tbar.sync 0;");
    emit!(s, "\tsetp.ne.u32 %p1, %r1, 0;");
    emit!(s, "\t@%p1 bra CONSUMER;");
}

/// The producer up to its TMA loads: registers given back, thread 0's walk over its tiles, the
/// wait for an empty stage and the armed `full` barrier. Leaves the K offset in `%r30`, the
/// tile's first row and column in `%r24` / `%r25`, the stage's A and B addresses in `%r31` /
/// `%r32` and its `full` barrier in `%r28`.
fn producer_stage(s: &mut String) {
    let a_bytes = a_stage_bytes();
    let b_bytes = b_stage_bytes();
    let b_base = STAGES * a_bytes;
    let bars = barrier_offset();
    let empties = bars + 8 * STAGES;
    emit!(s, "\tsetmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGS};");
    emit!(s, "\t@!%p0 bra EXIT;");
    emit!(s, "\tmov.b64 %rd1, tmA;");
    emit!(s, "\tcvta.param.u64 %rd1, %rd1;");
    emit!(s, "\tmov.b64 %rd2, tmB;");
    emit!(s, "\tcvta.param.u64 %rd2, %rd2;");
    emit!(s, "\tmov.u32 %r12, 0;"); // stage
    emit!(s, "\tmov.u32 %r13, 0;"); // ring pass parity
    emit!(s, "\tmov.u32 %r10, %ctaid.x;");
    emit!(s, "P_TILE:");
    emit!(s, "\tsetp.ge.u32 %p2, %r10, %r9;");
    emit!(s, "\t@%p2 bra EXIT;");
    tile_coords(s);
    emit!(s, "\tshl.b32 %r24, %r15, {};", BM.trailing_zeros());
    emit!(s, "\tshl.b32 %r25, %r16, {};", BN.trailing_zeros());
    emit!(s, "\tmov.u32 %r14, 0;");
    emit!(s, "P_K:");
    emit!(s, "\tshl.b32 %r26, %r12, 3;");
    emit!(s, "\tadd.u32 %r26, %r26, %r2;");
    emit!(s, "\tadd.u32 %r27, %r26, {empties};");
    emit!(s, "\tadd.u32 %r28, %r26, {bars};");
    // A fresh barrier counts as having completed the phase before 0, so the first pass
    // (parity 1) does not wait.
    emit!(s, "\txor.b32 %r29, %r13, 1;");
    emit!(s, "P_WAIT:");
    emit!(
        s,
        "\tmbarrier.try_wait.parity.shared::cta.b64 %p3, [%r27], %r29;"
    );
    emit!(s, "\t@!%p3 bra P_WAIT;");
    emit!(
        s,
        "\tmbarrier.arrive.expect_tx.shared::cta.b64 _, [%r28], {};",
        a_bytes + b_bytes
    );
    emit!(s, "\tshl.b32 %r30, %r14, {};", BK.trailing_zeros());
    emit!(s, "\tmul.lo.u32 %r31, %r12, {a_bytes};");
    emit!(s, "\tadd.u32 %r31, %r31, %r2;");
    emit!(s, "\tmul.lo.u32 %r32, %r12, {b_bytes};");
    emit!(s, "\tadd.u32 %r32, %r32, %r2;");
    emit!(s, "\tadd.u32 %r32, %r32, {b_base};");
}

/// Advances the ring (stage `%r12`, parity `%r13`) and the K step `%r14`; loops to `k_loop`
/// while K steps remain.
fn next_stage(s: &mut String, k_loop: &str) {
    emit!(s, "\tadd.u32 %r12, %r12, 1;");
    emit!(s, "\tsetp.eq.u32 %p4, %r12, {STAGES};");
    emit!(s, "\t@%p4 mov.u32 %r12, 0;");
    emit!(s, "\t@%p4 xor.b32 %r13, %r13, 1;");
    emit!(s, "\tadd.u32 %r14, %r14, 1;");
    emit!(s, "\tsetp.lt.u32 %p5, %r14, %r6;");
    emit!(s, "\t@%p5 bra {k_loop};");
}

/// The consumer warpgroups' set-up: registers taken, consumer / warp / lane, the row and column
/// of the thread's first accumulator (`%r46`, `%r47`), the consumer's half of an A stage
/// (`%r48`) and C (`%rd3`).
fn consumer_head(s: &mut String) {
    let half_a = a_stage_bytes() / 2; // one consumer's 64 rows of A
    emit!(s, "CONSUMER:");
    emit!(s, "\tsetmaxnreg.inc.sync.aligned.u32 {CONSUMER_REGS};");
    emit!(s, "\tsub.u32 %r40, %r1, 1;"); // consumer index c
    emit!(s, "\tand.b32 %r41, %r0, 127;");
    emit!(s, "\tshr.u32 %r42, %r41, 5;"); // warp in the warpgroup
    emit!(s, "\tand.b32 %r43, %r0, 31;"); // lane
    emit!(s, "\tsetp.eq.u32 %p6, %r43, 0;"); // lane 0 arrives on `empty`
    emit!(s, "\tsetp.eq.u32 %p7, %r0, %r0;"); // always true: accumulate after the first wgmma
    emit!(s, "\tshr.u32 %r44, %r43, 2;");
    emit!(s, "\tand.b32 %r45, %r43, 3;");
    // Row of this thread's first accumulator inside the tile: 64c + 16 warp + lane / 4.
    emit!(s, "\tshl.b32 %r46, %r40, 6;");
    emit!(s, "\tshl.b32 %r47, %r42, 4;");
    emit!(s, "\tadd.u32 %r46, %r46, %r47;");
    emit!(s, "\tadd.u32 %r46, %r46, %r44;");
    emit!(s, "\tshl.b32 %r47, %r45, 1;"); // column: 2 (lane % 4)
    emit!(s, "\tmul.lo.u32 %r48, %r40, {half_a};"); // this consumer's half of A
    emit!(s, "\tld.param.u64 %rd3, [pC];");
    emit!(s, "\tcvta.to.global.u64 %rd3, %rd3;");
}

/// The consumers' tile walk up to a full stage: waits on its `full` barrier and builds the A
/// and B descriptors (`%rd10`, `%rd11`) with the layout bits `a_desc` / `b_desc`.
fn consumer_stage(s: &mut String, a_desc: u64, b_desc: u64) {
    let a_bytes = a_stage_bytes();
    let b_bytes = b_stage_bytes();
    let b_base = STAGES * a_bytes;
    let bars = barrier_offset();
    let empties = bars + 8 * STAGES;
    emit!(s, "\tmov.u32 %r12, 0;");
    emit!(s, "\tmov.u32 %r13, 0;");
    emit!(s, "\tmov.u32 %r10, %ctaid.x;");
    emit!(s, "C_TILE:");
    emit!(s, "\tsetp.ge.u32 %p2, %r10, %r9;");
    emit!(s, "\t@%p2 bra EXIT;");
    tile_coords(s);
    emit!(s, "\tmov.u32 %r14, 0;");
    emit!(s, "C_K:");
    emit!(s, "\tshl.b32 %r26, %r12, 3;");
    emit!(s, "\tadd.u32 %r26, %r26, %r2;");
    emit!(s, "\tadd.u32 %r27, %r26, {empties};");
    emit!(s, "\tadd.u32 %r28, %r26, {bars};");
    emit!(s, "C_WAIT:");
    emit!(
        s,
        "\tmbarrier.try_wait.parity.shared::cta.b64 %p3, [%r28], %r13;"
    );
    emit!(s, "\t@!%p3 bra C_WAIT;");
    // Descriptors of this stage: A rows 64c.., B rows 0..255.
    emit!(s, "\tmul.lo.u32 %r31, %r12, {a_bytes};");
    emit!(s, "\tadd.u32 %r31, %r31, %r2;");
    emit!(s, "\tadd.u32 %r31, %r31, %r48;");
    emit!(s, "\tmul.lo.u32 %r32, %r12, {b_bytes};");
    emit!(s, "\tadd.u32 %r32, %r32, %r2;");
    emit!(s, "\tadd.u32 %r32, %r32, {b_base};");
    emit!(s, "\tand.b32 %r31, %r31, 262143;");
    emit!(s, "\tshr.u32 %r31, %r31, 4;");
    emit!(s, "\tcvt.u64.u32 %rd10, %r31;");
    emit!(s, "\tor.b64 %rd10, %rd10, {a_desc};");
    emit!(s, "\tand.b32 %r32, %r32, 262143;");
    emit!(s, "\tshr.u32 %r32, %r32, 4;");
    emit!(s, "\tcvt.u64.u32 %rd11, %r32;");
    emit!(s, "\tor.b64 %rd11, %rd11, {b_desc};");
}

/// The end of a consumer tile and of the kernel.
fn tile_end(s: &mut String) {
    emit!(s, "\tadd.u32 %r10, %r10, %r11;");
    emit!(s, "\tbra C_TILE;");
    emit!(s, "EXIT:");
    emit!(s, "\tret;");
    emit!(s, "}}");
}

/// Stores the 64 x 256 accumulator of one consumer with bounds checks.
///
/// Register `i` of thread (warp w, lane l) holds row `16w + l/4 + 8((i/2)%2)` and column
/// `8(i/4) + 2(l%4) + i%2` of the consumer's 64 x 256 block. With N even, each pair of
/// neighbouring columns is one aligned 8-byte (f32) or 4-byte (bf16x2) store; with N odd the
/// elements go one by one.
fn epilogue(s: &mut String, out: Elem) {
    let esize = out.size() as u32;
    emit!(s, "\tshl.b32 %r50, %r15, {};", BM.trailing_zeros());
    emit!(s, "\tadd.u32 %r50, %r50, %r46;"); // row0
    emit!(s, "\tshl.b32 %r51, %r16, {};", BN.trailing_zeros());
    emit!(s, "\tadd.u32 %r51, %r51, %r47;"); // col0
    emit!(s, "\tsetp.lt.u32 %p10, %r50, %r3;");
    emit!(s, "\tadd.u32 %r52, %r50, 8;");
    emit!(s, "\tsetp.lt.u32 %p11, %r52, %r3;");
    emit!(s, "\tsub.s32 %r53, %r4, %r51;"); // columns left from col0 (may be <= 0)
    emit!(s, "\tmul.wide.u32 %rd12, %r50, %r4;");
    emit!(s, "\tcvt.u64.u32 %rd13, %r51;");
    emit!(s, "\tadd.u64 %rd12, %rd12, %rd13;");
    emit!(s, "\tshl.b64 %rd12, %rd12, {};", esize.trailing_zeros());
    emit!(s, "\tadd.u64 %rd12, %rd3, %rd12;"); // (row0, col0)
    emit!(s, "\tmul.wide.u32 %rd13, %r4, {};", 8 * esize);
    emit!(s, "\tadd.u64 %rd14, %rd12, %rd13;"); // (row0 + 8, col0)
    emit!(s, "\tand.b32 %r54, %r4, 1;");
    emit!(s, "\tsetp.ne.u32 %p12, %r54, 0;");
    emit!(s, "\t@%p12 bra EPI_ODD;");
    // N even: col0 even, so col0 < N implies col0 + 1 < N and the pair is aligned.
    for j in 0..32u32 {
        let off = 8 * j * esize;
        emit!(s, "\tsetp.gt.s32 %p13, %r53, {};", 8 * j);
        emit!(s, "\tand.pred %p14, %p13, %p10;");
        emit!(s, "\tand.pred %p15, %p13, %p11;");
        let (d0, d1, d2, d3) = (4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3);
        match out {
            Elem::F32 => {
                emit!(
                    s,
                    "\t@%p14 st.global.v2.f32 [%rd12+{off}], {{%d{d0}, %d{d1}}};"
                );
                emit!(
                    s,
                    "\t@%p15 st.global.v2.f32 [%rd14+{off}], {{%d{d2}, %d{d3}}};"
                );
            }
            _ => {
                emit!(s, "\tcvt.rn.bf16x2.f32 %r55, %d{d1}, %d{d0};");
                emit!(s, "\tcvt.rn.bf16x2.f32 %r56, %d{d3}, %d{d2};");
                emit!(s, "\t@%p14 st.global.b32 [%rd12+{off}], %r55;");
                emit!(s, "\t@%p15 st.global.b32 [%rd14+{off}], %r56;");
            }
        }
    }
    emit!(s, "\tbra EPI_DONE;");
    emit!(s, "EPI_ODD:");
    for j in 0..32u32 {
        for e in 0..2u32 {
            let col = 8 * j + e;
            let off = col * esize;
            emit!(s, "\tsetp.gt.s32 %p13, %r53, {col};");
            emit!(s, "\tand.pred %p14, %p13, %p10;");
            emit!(s, "\tand.pred %p15, %p13, %p11;");
            let (lo, hi) = (4 * j + e, 4 * j + 2 + e);
            match out {
                Elem::F32 => {
                    emit!(s, "\t@%p14 st.global.f32 [%rd12+{off}], %d{lo};");
                    emit!(s, "\t@%p15 st.global.f32 [%rd14+{off}], %d{hi};");
                }
                _ => {
                    emit!(s, "\tcvt.rn.bf16.f32 %h0, %d{lo};");
                    emit!(s, "\tcvt.rn.bf16.f32 %h1, %d{hi};");
                    emit!(s, "\t@%p14 st.global.b16 [%rd12+{off}], %h0;");
                    emit!(s, "\t@%p15 st.global.b16 [%rd14+{off}], %h1;");
                }
            }
        }
    }
    emit!(s, "EPI_DONE:");
}

/// Version 3: every training layout, f16 or bf16 operands, the GEMM epilogue.
///
/// Differences from v2, per operand stored MN-major (an `Op::T` A stored `(k, m)`, an `Op::N` B
/// stored `(k, n)`): the producer loads it in 64 x 64 boxes (64 M/N elements = one 128-byte
/// swizzle row, 64 K rows), two per A stage (one per consumer) and four per B stage, and the
/// consumers read it with `imm-trans = 1` and an MN-major descriptor: `k % 8` rows 128 B
/// apart, `k / 8` at SBO = 1024 B, 64-wide M/N panels at LBO = 8192 B, +2048 B per k16 step.
/// K-major operands are loaded and described as in v2. The epilogue is the mma.sync GEMM's
/// ([`crate::gemm::epilogue`]): `alpha`, `beta * C`, bias, GELU, rounding to the output type,
/// any `ldc`.
pub mod v3 {
    use super::super::{BK, BM, BN, STAGES};
    use super::{
        DESC_SWIZZLE_128B, acc_list, consumer_head, consumer_stage, next_stage, producer_stage,
        setup, tile_end,
    };
    use crate::desc::Elem;
    use crate::gemm::epilogue::{Fragments, emit_at};
    use crate::gemm::ptx::{Body, Regs};
    use std::fmt::Write;

    macro_rules! emit {
        ($s:expr, $($t:tt)*) => {{
            let _ = writeln!($s, $($t)*);
        }};
    }

    /// MN-major descriptor bits: 128B swizzle, SBO 1024 B, LBO 8192 B (the next 64-wide panel).
    const DESC_MN_128B: u64 = (1 << 62) | (64 << 32) | (512 << 16);
    /// Bytes of one 64 (M/N) x 64 (K) box.
    const PANEL: u32 = 64 * 64 * 2;

    /// One kernel of the family.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Spec {
        /// A stored `(k, m)` (M-major) instead of `(m, k)`.
        pub a_mn: bool,
        /// B stored `(k, n)` (N-major) instead of `(n, k)`.
        pub b_mn: bool,
        pub input: Elem,
        pub output: Elem,
    }

    impl Spec {
        /// `lathe_hgemm_v3_{op_a}{op_b}_{in}_{out}` with Lathe's `Op` letters (`n`: A `(m, k)`
        /// / B `(k, n)`; `t`: A `(k, m)` / B `(n, k)`).
        pub fn entry(&self) -> String {
            format!(
                "lathe_hgemm_v3_{}{}_{}_{}",
                if self.a_mn { "t" } else { "n" },
                if self.b_mn { "n" } else { "t" },
                self.input.name(),
                self.output.name()
            )
        }
    }

    fn mma_ty(e: Elem) -> &'static str {
        match e {
            Elem::F16 => "f16",
            _ => "bf16",
        }
    }

    /// The module text for `specs` (one entry each).
    pub fn module(specs: &[Spec]) -> String {
        let mut s = String::new();
        emit!(
            s,
            "// Lathe Hopper GEMM v3: C = act(alpha op(A) op(B) + beta C + bias), bf16/f16"
        );
        emit!(
            s,
            "// operands K- or MN-major, f32 accumulation, 128x256x64 tiles, {STAGES}-stage TMA ring."
        );
        emit!(s, ".version 8.0");
        emit!(s, ".target sm_90a");
        emit!(s, ".address_size 64");
        emit!(s, "");
        emit!(s, ".extern .shared .align 1024 .b8 lathe_hgemm3_smem[];");
        for spec in specs {
            emit!(s, "");
            entry(&mut s, spec);
        }
        s
    }

    fn entry(s: &mut String, spec: &Spec) {
        let name = spec.entry();
        let ksteps = BK / 16;
        let ty = mma_ty(spec.input);

        emit!(
            s,
            "// {name}: C {} (M, N) row-major, leading dimension ldc; A via tmA ({}), B via tmB \
             ({}), {} operands.",
            spec.output.name(),
            if spec.a_mn {
                "(K, M), M contiguous"
            } else {
                "(M, K), K contiguous"
            },
            if spec.b_mn {
                "(K, N), N contiguous"
            } else {
                "(N, K), K contiguous"
            },
            spec.input.name()
        );
        emit!(s, ".visible .entry {name}(");
        emit!(s, "\t.param .align 64 .b8 tmA[128],");
        emit!(s, "\t.param .align 64 .b8 tmB[128],");
        emit!(s, "\t.param .u64 pC,");
        emit!(s, "\t.param .u64 pBias,");
        emit!(s, "\t.param .u32 pM,");
        emit!(s, "\t.param .u32 pN,");
        emit!(s, "\t.param .u32 pK,");
        emit!(s, "\t.param .u32 pLdc,");
        emit!(s, "\t.param .f32 pAlpha,");
        emit!(s, "\t.param .f32 pBeta,");
        emit!(s, "\t.param .u32 pFlags");
        emit!(s, ")");
        emit!(s, ".maxntid 384, 1, 1");
        emit!(s, ".minnctapersm 1");
        emit!(s, "{{");
        emit!(s, "\t.reg .pred %p<24>;");
        emit!(s, "\t.reg .b16 %h<4>;");
        emit!(s, "\t.reg .b32 %r<80>;");
        emit!(s, "\t.reg .b64 %rd<32>;");
        emit!(s, "\t.reg .f32 %d<128>;");
        emit!(s, "\t.reg .f32 %alpha, %beta;");
        // The epilogue body (its own registers and labels) is printed first to know them.
        let (epi_decl, epi_text) = epilogue(spec);
        s.push_str(&epi_decl);
        setup(s, "lathe_hgemm3_smem");

        // ---------------- producer ----------------
        producer_stage(s);
        let tma =
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes";
        if spec.a_mn {
            // Two 64 (M) x 64 (K) boxes at (m0 + 64 c, k0).
            for c in 0..2u32 {
                emit!(s, "\tadd.u32 %r33, %r24, {};", 64 * c);
                emit!(s, "\tadd.u32 %r34, %r31, {};", c * PANEL);
                emit!(s, "\t{tma} [%r34], [%rd1, {{%r33, %r30}}], [%r28];");
            }
        } else {
            emit!(s, "\t{tma} [%r31], [%rd1, {{%r30, %r24}}], [%r28];");
        }
        if spec.b_mn {
            // Four 64 (N) x 64 (K) boxes at (n0 + 64 j, k0).
            for j in 0..4u32 {
                emit!(s, "\tadd.u32 %r33, %r25, {};", 64 * j);
                emit!(s, "\tadd.u32 %r34, %r32, {};", j * PANEL);
                emit!(s, "\t{tma} [%r34], [%rd2, {{%r33, %r30}}], [%r28];");
            }
        } else {
            emit!(s, "\t{tma} [%r32], [%rd2, {{%r30, %r25}}], [%r28];");
        }
        next_stage(s, "P_K");
        emit!(s, "\tadd.u32 %r10, %r10, %r11;");
        emit!(s, "\tbra P_TILE;");

        // ---------------- consumers ----------------
        consumer_head(s);
        emit!(s, "\tld.param.u64 %rd4, [pBias];");
        emit!(s, "\tcvta.to.global.u64 %rd4, %rd4;");
        emit!(s, "\tld.param.u32 %r60, [pLdc];");
        emit!(s, "\tld.param.u32 %r61, [pFlags];");
        emit!(s, "\tld.param.f32 %alpha, [pAlpha];");
        emit!(s, "\tld.param.f32 %beta, [pBeta];");
        let (a_desc, a_step) = if spec.a_mn {
            (DESC_MN_128B, 2048 / 16)
        } else {
            (DESC_SWIZZLE_128B, 2)
        };
        let (b_desc, b_step) = if spec.b_mn {
            (DESC_MN_128B, 2048 / 16)
        } else {
            (DESC_SWIZZLE_128B, 2)
        };
        consumer_stage(s, a_desc, b_desc);
        emit!(s, "\tsetp.ne.u32 %p8, %r14, 0;");
        emit!(s, "\twgmma.fence.sync.aligned;");
        let acc = acc_list();
        let (ta, tb) = (spec.a_mn as u32, spec.b_mn as u32);
        for kk in 0..ksteps {
            let scale_d = if kk == 0 { "%p8" } else { "%p7" };
            if kk > 0 {
                emit!(s, "\tadd.s64 %rd10, %rd10, {a_step};");
                emit!(s, "\tadd.s64 %rd11, %rd11, {b_step};");
            }
            emit!(
                s,
                "\twgmma.mma_async.sync.aligned.m64n256k16.f32.{ty}.{ty} {acc}, %rd10, %rd11, {scale_d}, 1, 1, {ta}, {tb};"
            );
        }
        emit!(s, "\twgmma.commit_group.sync.aligned;");
        emit!(s, "\twgmma.wait_group.sync.aligned 1;");
        emit!(s, "\tand.pred %p9, %p6, %p8;");
        emit!(s, "\t@%p9 mbarrier.arrive.shared::cta.b64 _, [%r49];");
        emit!(s, "\tmov.u32 %r49, %r27;");
        next_stage(s, "C_K");
        emit!(s, "\twgmma.wait_group.sync.aligned 0;");
        emit!(s, "\t@%p6 mbarrier.arrive.shared::cta.b64 _, [%r49];");
        // Absolute coordinates of register 0: row tile*128 + 64c + 16w + lane/4, column
        // tile*256 + 2 (lane % 4).
        emit!(s, "\tshl.b32 %r50, %r15, {};", BM.trailing_zeros());
        emit!(s, "\tadd.u32 %r50, %r50, %r46;");
        emit!(s, "\tshl.b32 %r51, %r16, {};", BN.trailing_zeros());
        emit!(s, "\tadd.u32 %r51, %r51, %r47;");
        s.push_str(&epi_text);
        tile_end(s);
    }

    /// The epilogue's declarations and text: the mma.sync GEMM's epilogue over one consumer's
    /// 64 x 256 accumulator (per warp one m16 row block of 32 n8 fragments: the same register
    /// layout as `mma.sync`'s C fragments).
    fn epilogue(spec: &Spec) -> (String, String) {
        let mut b = Body::with_prefix("e");
        let regs = Regs {
            tid: "%r0".into(),
            m: "%r3".into(),
            n: "%r4".into(),
            ldc: "%r60".into(),
            c: "%rd3".into(),
            bias: "%rd4".into(),
            alpha: "%alpha".into(),
            beta: "%beta".into(),
            flags: "%r61".into(),
            bm0: String::new(),
            bn0: String::new(),
            acc: (0..128).map(|i| format!("%d{i}")).collect(),
        };
        let f = Fragments {
            input: spec.input,
            output: spec.output,
            mt: 1,
            nt: 32,
        };
        emit_at(&mut b, &f, "%r50", "%r51", &regs);
        (b.declarations(), b.text)
    }
}
