//! Reductions over an f32 vector: sum and max-abs.
//!
//! One kernel, launched twice: pass 1 over the input with `G` blocks writes `G` partials
//! (`out[blockIdx.x]`), pass 2 over the partials with one block writes the result. `G` depends
//! only on `n` (see `crate::reduce::blocks_for`), and every thread accumulates a fixed set of
//! elements in a fixed order, so the result is the same bit for bit on every run and device.
//!
//! Per block (256 threads): a grid-stride loop with 16-byte loads when the input is aligned
//! (4 elements per step, folded in order), a scalar tail, then a butterfly reduction in each
//! warp (`shfl.sync.bfly`), warp results through shared memory, and warp 0 folds those.
//! max-abs uses `max.NaN.f32`, so one NaN anywhere makes the result NaN (the non-finite check
//! relies on this).
//!
//! Versions: v1 (this one).

use std::fmt::Write;

/// Which fold the kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    Sum,
    MaxAbs,
}

impl Fold {
    /// PTX lines folding the f32 register `x` into `acc`.
    fn step(self, acc: &str, x: &str) -> String {
        match self {
            Fold::Sum => format!("\tadd.f32 {acc}, {acc}, {x};\n"),
            Fold::MaxAbs => {
                format!("\tabs.f32 {x}, {x};\n\tmax.NaN.f32 {acc}, {acc}, {x};\n")
            }
        }
    }

    /// Combining two partial results (both already folded).
    fn combine(self, acc: &str, x: &str) -> String {
        match self {
            Fold::Sum => format!("\tadd.f32 {acc}, {acc}, {x};\n"),
            Fold::MaxAbs => format!("\tmax.NaN.f32 {acc}, {acc}, {x};\n"),
        }
    }
}

/// Writes one reduction kernel: `entry(in: *f32, n: u64, out: *f32)`.
pub fn kernel(entry: &str, fold: Fold) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "\n.visible .entry {entry}(\n\t.param .u64 p_x,\n\t.param .u64 p_n,\n\t.param .u64 p_out\n)\n{{"
    );
    let _ = writeln!(w, "\t.shared .align 4 .f32 warp_acc[32];");
    let _ = writeln!(w, "\t.reg .pred %p<6>;");
    let _ = writeln!(w, "\t.reg .b32 %r<10>;");
    let _ = writeln!(w, "\t.reg .b64 %rd<12>;");
    let _ = writeln!(w, "\t.reg .f32 %acc, %x<4>, %t;");
    let _ = writeln!(w, "\tld.param.u64 %rd0, [p_x];");
    let _ = writeln!(w, "\tcvta.to.global.u64 %rd0, %rd0;");
    let _ = writeln!(w, "\tld.param.u64 %rd1, [p_n];");
    let _ = writeln!(w, "\tld.param.u64 %rd2, [p_out];");
    let _ = writeln!(w, "\tcvta.to.global.u64 %rd2, %rd2;");
    let _ = writeln!(w, "\tmov.u32 %r0, %ctaid.x;");
    let _ = writeln!(w, "\tmov.u32 %r1, %ntid.x;");
    let _ = writeln!(w, "\tmov.u32 %r2, %tid.x;");
    let _ = writeln!(w, "\tmov.u32 %r3, %nctaid.x;");
    let _ = writeln!(w, "\tmul.wide.u32 %rd3, %r0, %r1;");
    let _ = writeln!(w, "\tcvt.u64.u32 %rd4, %r2;");
    let _ = writeln!(w, "\tadd.u64 %rd3, %rd3, %rd4;");
    let _ = writeln!(w, "\tmul.wide.u32 %rd4, %r3, %r1;");
    // Identity: 0 for both folds (|x| >= 0).
    let _ = writeln!(w, "\tmov.f32 %acc, 0f00000000;");
    let _ = writeln!(w, "\tmov.u64 %rd5, %rd3;");
    let _ = writeln!(w, "\tand.b64 %rd6, %rd0, 15;");
    let _ = writeln!(w, "\tsetp.ne.u64 %p0, %rd6, 0;");
    let _ = writeln!(w, "\t@%p0 bra $SCALAR;");
    let _ = writeln!(w, "\tshr.u64 %rd7, %rd1, 2;");
    let _ = writeln!(w, "\tmov.u64 %rd8, %rd3;");
    let _ = writeln!(w, "$VLOOP:");
    let _ = writeln!(w, "\tsetp.ge.u64 %p1, %rd8, %rd7;");
    let _ = writeln!(w, "\t@%p1 bra $VEND;");
    let _ = writeln!(w, "\tshl.b64 %rd9, %rd8, 4;");
    let _ = writeln!(w, "\tadd.u64 %rd9, %rd0, %rd9;");
    let _ = writeln!(w, "\tld.global.v4.f32 {{%x0, %x1, %x2, %x3}}, [%rd9];");
    for l in 0..4 {
        w.push_str(&fold.step("%acc", &format!("%x{l}")));
    }
    let _ = writeln!(w, "\tadd.u64 %rd8, %rd8, %rd4;");
    let _ = writeln!(w, "\tbra.uni $VLOOP;");
    let _ = writeln!(w, "$VEND:");
    let _ = writeln!(w, "\tshl.b64 %rd5, %rd7, 2;");
    let _ = writeln!(w, "\tadd.u64 %rd5, %rd5, %rd3;");
    let _ = writeln!(w, "$SCALAR:");
    let _ = writeln!(w, "\tsetp.ge.u64 %p2, %rd5, %rd1;");
    let _ = writeln!(w, "\t@%p2 bra $WARP;");
    let _ = writeln!(w, "\tshl.b64 %rd9, %rd5, 2;");
    let _ = writeln!(w, "\tadd.u64 %rd9, %rd0, %rd9;");
    let _ = writeln!(w, "\tld.global.f32 %x0, [%rd9];");
    w.push_str(&fold.step("%acc", "%x0"));
    let _ = writeln!(w, "\tadd.u64 %rd5, %rd5, %rd4;");
    let _ = writeln!(w, "\tbra.uni $SCALAR;");
    // Warp butterfly.
    let _ = writeln!(w, "$WARP:");
    for off in [16, 8, 4, 2, 1] {
        let _ = writeln!(w, "\tshfl.sync.bfly.b32 %t, %acc, {off}, 31, -1;");
        w.push_str(&fold.combine("%acc", "%t"));
    }
    let _ = writeln!(w, "\tand.b32 %r4, %r2, 31;");
    let _ = writeln!(w, "\tshr.u32 %r5, %r2, 5;");
    let _ = writeln!(w, "\tmov.u32 %r6, warp_acc;");
    let _ = writeln!(w, "\tsetp.ne.u32 %p3, %r4, 0;");
    let _ = writeln!(w, "\t@%p3 bra $STORED;");
    let _ = writeln!(w, "\tshl.b32 %r7, %r5, 2;");
    let _ = writeln!(w, "\tadd.u32 %r7, %r6, %r7;");
    let _ = writeln!(w, "\tst.shared.f32 [%r7], %acc;");
    let _ = writeln!(w, "$STORED:");
    let _ = writeln!(w, "\tbar.sync 0;");
    let _ = writeln!(w, "\tsetp.ne.u32 %p3, %r5, 0;");
    let _ = writeln!(w, "\t@%p3 bra $DONE;");
    // Warp 0: lane l reads warp l's result (identity past the last warp).
    let _ = writeln!(w, "\tshr.u32 %r8, %r1, 5;");
    let _ = writeln!(w, "\tmov.f32 %acc, 0f00000000;");
    let _ = writeln!(w, "\tsetp.ge.u32 %p4, %r4, %r8;");
    let _ = writeln!(w, "\tshl.b32 %r7, %r4, 2;");
    let _ = writeln!(w, "\tadd.u32 %r7, %r6, %r7;");
    let _ = writeln!(w, "\t@!%p4 ld.shared.f32 %acc, [%r7];");
    for off in [16, 8, 4, 2, 1] {
        let _ = writeln!(w, "\tshfl.sync.bfly.b32 %t, %acc, {off}, 31, -1;");
        w.push_str(&fold.combine("%acc", "%t"));
    }
    let _ = writeln!(w, "\tsetp.ne.u32 %p5, %r2, 0;");
    let _ = writeln!(w, "\t@%p5 bra $DONE;");
    let _ = writeln!(w, "\tmul.wide.u32 %rd10, %r0, 4;");
    let _ = writeln!(w, "\tadd.u64 %rd10, %rd2, %rd10;");
    let _ = writeln!(w, "\tst.global.f32 [%rd10], %acc;");
    let _ = writeln!(w, "$DONE:");
    let _ = writeln!(w, "\tret;");
    let _ = writeln!(w, "}}");
    s
}
