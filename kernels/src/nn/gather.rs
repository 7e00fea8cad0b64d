//! Row gather: the forward of an embedding lookup into one table,
//! `out[n, :] = table[ids[n], :]` for `ids (N) u32`, `table (rows, C)`, `out (N, C)`.
//! An id `>= rows` gives a NaN row instead of an out-of-bounds read. Pure copy (bit exact).
//!
//! The backward (`dtable[ids[n]] += dout[n]`, deterministic) is the token pass of
//! [`super::embedding`] (`lathe_embedding_bwd_tok_*`): it takes i32 ids and compares them
//! unsigned against the row count, so u32 ids have the same meaning bit for bit and ids
//! `>= rows` are skipped.
//!
//! # Launch
//! One 256-thread block per output row (`grid.x = N`); the threads walk the row's `C`
//! columns with stride 256, so reads of the table row and writes of the output are
//! coalesced. The id is loaded once per thread (a broadcast within the block).
//!
//! # Cost
//! No FLOPs; `2 N C size(dt) + 4 N` bytes.

use super::ptxgen::{Asm, emit, entry, ld_ptr};
use crate::desc::{ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block (one block per output row).
pub const THREADS: u32 = 256;

/// The NaN bit pattern of a dtype, as the store's register type sees it.
fn nan_bits(dt: Elem) -> &'static str {
    match dt {
        Elem::F32 => "0x7FC00000",
        Elem::BF16 => "0x7FC0",
        _ => "0x7E00",
    }
}

fn kernel(name: &str, dt: Elem) -> String {
    let (ty, sz) = if dt.size() == 4 {
        ("b32", 4)
    } else {
        ("b16", 2)
    };
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("ids", "u64"),
            ("table", "u64"),
            ("out", "u64"),
            ("n", "u32"),
            ("c", "u32"),
            ("rows", "u32"),
        ],
    );
    a.l(".reg .b64 %pid, %ptab, %pout, %src, %dst, %t64;");
    a.l(".reg .b32 %n, %c, %rows, %row, %id, %j;");
    emit!(a, ".reg .{ty} %val, %nan;");
    a.l(".reg .pred %pq, %pbad;");
    ld_ptr(&mut a, "%pid", "ids");
    ld_ptr(&mut a, "%ptab", "table");
    ld_ptr(&mut a, "%pout", "out");
    for p in ["n", "c", "rows"] {
        emit!(a, "ld.param.u32 %{p}, [p_{p}];");
    }
    emit!(a, "mov.{ty} %nan, {};", nan_bits(dt));
    a.l("mov.u32 %row, %ctaid.x;");
    a.l("setp.ge.u32 %pq, %row, %n;");
    a.l("@%pq bra $DONE;");
    a.l("mul.wide.u32 %t64, %row, 4;");
    a.l("add.u64 %t64, %pid, %t64;");
    a.l("ld.global.u32 %id, [%t64];");
    a.l("setp.ge.u32 %pbad, %id, %rows;");
    a.c("src = table + id * C (an invalid id reads nothing), dst = out + row * C");
    a.l("mul.wide.u32 %src, %id, %c;");
    emit!(a, "mul.lo.u64 %src, %src, {sz};");
    a.l("add.u64 %src, %ptab, %src;");
    a.l("mul.wide.u32 %dst, %row, %c;");
    emit!(a, "mul.lo.u64 %dst, %dst, {sz};");
    a.l("add.u64 %dst, %pout, %dst;");
    a.l("mov.u32 %j, %tid.x;");
    a.label("$LOOP");
    a.l("setp.ge.u32 %pq, %j, %c;");
    a.l("@%pq bra $DONE;");
    emit!(a, "mul.wide.u32 %t64, %j, {sz};");
    emit!(a, "mov.{ty} %val, %nan;");
    a.l("{");
    a.l(".reg .b64 %at;");
    a.l("add.u64 %at, %src, %t64;");
    emit!(a, "@!%pbad ld.global.{ty} %val, [%at];");
    a.l("add.u64 %at, %dst, %t64;");
    emit!(a, "st.global.{ty} [%at], %val;");
    a.l("}");
    emit!(a, "add.u32 %j, %j, {THREADS};");
    a.l("bra.uni $LOOP;");
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
    name: "nn_gather",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// `Problem { batch: N, n: C, k: rows }`.
fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.batch.max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! gather_desc {
    ($name:ident, $dt:expr, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem { batch: N, n: C, k: rows }`: `ids (N) u32`, ", $sfx, ".")]
        #[doc = "`table (rows, C)`, `out (N, C)`."]
        pub static $name: KernelDesc = KernelDesc {
            entry: concat!("lathe_gather_rows_", $sfx),
            module: &MODULE,
            args: &[
                arg("ids", ArgKind::In(Elem::U32)),
                arg("table", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("n", ArgKind::U32),
                arg("c", ArgKind::U32),
                arg("rows", ArgKind::U32),
            ],
            geometry,
            cost: |p| Cost {
                flops: 0,
                bytes: 2 * $size * p.batch * p.n + 4 * p.batch,
            },
            summary: "row gather out[n] = table[ids[n]] (NaN row for an invalid id)",
        };
    };
}

gather_desc!(GATHER_ROWS_F32, Elem::F32, "f32", 4);
gather_desc!(GATHER_ROWS_BF16, Elem::BF16, "bf16", 2);
gather_desc!(GATHER_ROWS_F16, Elem::F16, "f16", 2);

/// Every kernel of this module, in `ACT_DTYPES` order.
pub static ALL: &[&KernelDesc] = &[&GATHER_ROWS_F32, &GATHER_ROWS_BF16, &GATHER_ROWS_F16];

/// The gather kernel of a dtype.
pub fn kernel_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [ALL[0], ALL[1], ALL[2]])
}

/// CPU twin.
pub mod twin {
    use crate::elementwise::twin::Float;

    /// `out[n, :] = table[ids[n], :]`, NaN rows for ids `>= rows`.
    pub fn gather_rows<T: Float>(ids: &[u32], table: &[T], out: &mut [T], c: usize) {
        let rows = table.len() / c;
        for (n, &id) in ids.iter().enumerate() {
            let dst = &mut out[n * c..(n + 1) * c];
            if (id as usize) < rows {
                dst.copy_from_slice(&table[id as usize * c..(id as usize + 1) * c]);
            } else {
                dst.fill(T::from_f32(f32::NAN));
            }
        }
    }
}
