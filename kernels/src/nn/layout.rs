//! Layout copies of the autograd tape: strided 2-D blocks (split, concat and slices along
//! any dimension) and the swap of two axes (transpose of any two dimensions). Pure copies,
//! bit exact; the PTX moves `b32` or `b16` words, so one body serves every dtype of a width
//! (f32, bf16, f16 entries).
//!
//! - `lathe_copy2d_{dt}(src, dst, rows, cols, src_ld, dst_ld)`:
//!   `dst[r dst_ld + j] = src[r src_ld + j]` for `r < rows`, `j < cols` (the host passes the
//!   block's first element as the pointers).
//! - `lathe_swap_axes_{dt}(x, y, a, d0, b, d1, c)`: `x` viewed as `[a, d0, b, d1, c]`,
//!   `y` as `[a, d1, b, d0, c]`,
//!   `y[(((ia d1 + j) b + ib) d0 + i) c + ic] = x[(((ia d0 + i) b + ib) d1 + j) c + ic]`.
//!
//! # Launch
//! One thread per destination element, 256 threads a block, `ceil(count / 256)` blocks in x;
//! index math in u32 (the host wrappers keep every index below `2^32`), addresses in u64.
//! Consecutive threads write consecutive destination elements; the copy reads runs of `cols`
//! (resp. `c`) consecutive source elements.
//!
//! # Cost
//! No FLOPs; `2 count size(dt)` bytes.

use super::ptxgen::{Asm, emit, entry, ld_ptr};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block.
pub const THREADS: u32 = 256;

fn width(dt: Elem) -> (&'static str, u32) {
    if dt.size() == 4 {
        ("b32", 4)
    } else {
        ("b16", 2)
    }
}

/// `%i = ctaid.x * 256 + tid.x`; exits when `%i >= %n`.
fn thread_index(a: &mut Asm) {
    a.l("mov.u32 %i, %ctaid.x;");
    a.l("mov.u32 %t, %tid.x;");
    emit!(a, "mad.lo.u32 %i, %i, {THREADS}, %t;");
    a.l("setp.ge.u32 %pq, %i, %n;");
    a.l("@%pq bra $DONE;");
}

fn copy2d(name: &str, dt: Elem) -> String {
    let (ty, sz) = width(dt);
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("src", "u64"),
            ("dst", "u64"),
            ("rows", "u32"),
            ("cols", "u32"),
            ("src_ld", "u32"),
            ("dst_ld", "u32"),
        ],
    );
    a.l(".reg .b64 %ps, %pd, %as, %adst, %t64;");
    a.l(".reg .b32 %rows, %cols, %sld, %dld, %n, %i, %t, %r, %j;");
    emit!(a, ".reg .{ty} %v;");
    a.l(".reg .pred %pq;");
    ld_ptr(&mut a, "%ps", "src");
    ld_ptr(&mut a, "%pd", "dst");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %cols, [p_cols];");
    a.l("ld.param.u32 %sld, [p_src_ld];");
    a.l("ld.param.u32 %dld, [p_dst_ld];");
    a.l("mul.lo.u32 %n, %rows, %cols;");
    thread_index(&mut a);
    a.c("i = r cols + j");
    a.l("div.u32 %r, %i, %cols;");
    a.l("mul.lo.u32 %t, %r, %cols;");
    a.l("sub.u32 %j, %i, %t;");
    a.l("mul.wide.u32 %as, %r, %sld;");
    a.l("cvt.u64.u32 %t64, %j;");
    a.l("add.u64 %as, %as, %t64;");
    emit!(a, "mul.lo.u64 %as, %as, {sz};");
    a.l("add.u64 %as, %ps, %as;");
    a.l("mul.wide.u32 %adst, %r, %dld;");
    a.l("add.u64 %adst, %adst, %t64;");
    emit!(a, "mul.lo.u64 %adst, %adst, {sz};");
    a.l("add.u64 %adst, %pd, %adst;");
    emit!(a, "ld.global.{ty} %v, [%as];");
    emit!(a, "st.global.{ty} [%adst], %v;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn swap_axes(name: &str, dt: Elem) -> String {
    let (ty, sz) = width(dt);
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("x", "u64"),
            ("y", "u64"),
            ("a", "u32"),
            ("d0", "u32"),
            ("b", "u32"),
            ("d1", "u32"),
            ("c", "u32"),
        ],
    );
    a.l(".reg .b64 %px, %py, %ax, %ay;");
    a.l(".reg .b32 %a, %d0, %b, %d1, %c, %n, %i, %t, %q, %ia, %ii, %ib, %jj, %ic, %src;");
    emit!(a, ".reg .{ty} %v;");
    a.l(".reg .pred %pq;");
    ld_ptr(&mut a, "%px", "x");
    ld_ptr(&mut a, "%py", "y");
    for p in ["a", "d0", "b", "d1", "c"] {
        emit!(a, "ld.param.u32 %{p}, [p_{p}];");
    }
    a.l("mul.lo.u32 %n, %a, %d0;");
    a.l("mul.lo.u32 %n, %n, %b;");
    a.l("mul.lo.u32 %n, %n, %d1;");
    a.l("mul.lo.u32 %n, %n, %c;");
    thread_index(&mut a);
    a.c("destination index i = (((ia d1 + jj) b + ib) d0 + ii) c + ic");
    a.l("rem.u32 %ic, %i, %c;");
    a.l("div.u32 %q, %i, %c;");
    a.l("rem.u32 %ii, %q, %d0;");
    a.l("div.u32 %q, %q, %d0;");
    a.l("rem.u32 %ib, %q, %b;");
    a.l("div.u32 %q, %q, %b;");
    a.l("rem.u32 %jj, %q, %d1;");
    a.l("div.u32 %ia, %q, %d1;");
    a.c("source index (((ia d0 + ii) b + ib) d1 + jj) c + ic");
    a.l("mad.lo.u32 %src, %ia, %d0, %ii;");
    a.l("mad.lo.u32 %src, %src, %b, %ib;");
    a.l("mad.lo.u32 %src, %src, %d1, %jj;");
    a.l("mad.lo.u32 %src, %src, %c, %ic;");
    emit!(a, "mul.wide.u32 %ax, %src, {sz};");
    a.l("add.u64 %ax, %px, %ax;");
    emit!(a, "mul.wide.u32 %ay, %i, {sz};");
    a.l("add.u64 %ay, %py, %ay;");
    emit!(a, "ld.global.{ty} %v, [%ax];");
    emit!(a, "st.global.{ty} [%ay], %v;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (i, dt) in super::ACT_DTYPES.into_iter().enumerate() {
        s.push_str(&copy2d(COPY2D[i].entry, dt));
        s.push_str(&swap_axes(SWAP[i].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_layout",
    target: Target::Sm80,
    ptx: module_ptx,
};

/// `Problem { n: destination elements }`.
fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.n.div_ceil(THREADS as u64).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

const fn copy_args(e: Elem) -> [Arg; 6] {
    [
        arg("src", ArgKind::In(e)),
        arg("dst", ArgKind::Out(e)),
        arg("rows", ArgKind::U32),
        arg("cols", ArgKind::U32),
        arg("src_ld", ArgKind::U32),
        arg("dst_ld", ArgKind::U32),
    ]
}
const fn swap_args(e: Elem) -> [Arg; 7] {
    [
        arg("x", ArgKind::In(e)),
        arg("y", ArgKind::Out(e)),
        arg("a", ArgKind::U32),
        arg("d0", ArgKind::U32),
        arg("b", ArgKind::U32),
        arg("d1", ArgKind::U32),
        arg("c", ArgKind::U32),
    ]
}

const COPY_F32: [Arg; 6] = copy_args(Elem::F32);
const COPY_BF16: [Arg; 6] = copy_args(Elem::BF16);
const COPY_F16: [Arg; 6] = copy_args(Elem::F16);
const SWAP_F32: [Arg; 7] = swap_args(Elem::F32);
const SWAP_BF16: [Arg; 7] = swap_args(Elem::BF16);
const SWAP_F16: [Arg; 7] = swap_args(Elem::F16);

macro_rules! descs {
    ($( $name:ident = $entry:literal, $args:expr, $size:literal, $summary:literal; )*) => {
        $(
            #[doc = concat!("`", $entry, "`, `Problem { n: elements copied }`: ", $summary, ".")]
            pub static $name: KernelDesc = KernelDesc {
                entry: $entry,
                module: &MODULE,
                args: &$args,
                geometry,
                cost: |p| Cost { flops: 0, bytes: 2 * $size * p.n },
                summary: $summary,
            };
        )*
    };
}

descs! {
    COPY2D_F32 = "lathe_copy2d_f32", COPY_F32, 4, "strided 2-D block copy";
    COPY2D_BF16 = "lathe_copy2d_bf16", COPY_BF16, 2, "strided 2-D block copy";
    COPY2D_F16 = "lathe_copy2d_f16", COPY_F16, 2, "strided 2-D block copy";
    SWAP_AXES_F32 = "lathe_swap_axes_f32", SWAP_F32, 4, "[a, d0, b, d1, c] -> [a, d1, b, d0, c]";
    SWAP_AXES_BF16 = "lathe_swap_axes_bf16", SWAP_BF16, 2, "[a, d0, b, d1, c] -> [a, d1, b, d0, c]";
    SWAP_AXES_F16 = "lathe_swap_axes_f16", SWAP_F16, 2, "[a, d0, b, d1, c] -> [a, d1, b, d0, c]";
}

const COPY2D: [&KernelDesc; 3] = [&COPY2D_F32, &COPY2D_BF16, &COPY2D_F16];
const SWAP: [&KernelDesc; 3] = [&SWAP_AXES_F32, &SWAP_AXES_BF16, &SWAP_AXES_F16];

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &COPY2D_F32,
    &SWAP_AXES_F32,
    &COPY2D_BF16,
    &SWAP_AXES_BF16,
    &COPY2D_F16,
    &SWAP_AXES_F16,
];

/// The 2-D copy of a dtype.
pub fn copy2d_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, COPY2D)
}
/// The axis swap of a dtype.
pub fn swap_axes_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, SWAP)
}

/// CPU twins.
pub mod twin {
    /// `dst[dst_off + r dst_ld + j] = src[src_off + r src_ld + j]`.
    #[allow(clippy::too_many_arguments)]
    pub fn copy2d<T: Copy>(
        src: &[T],
        src_off: usize,
        src_ld: usize,
        dst: &mut [T],
        dst_off: usize,
        dst_ld: usize,
        rows: usize,
        cols: usize,
    ) {
        for r in 0..rows {
            let s = src_off + r * src_ld;
            let d = dst_off + r * dst_ld;
            dst[d..d + cols].copy_from_slice(&src[s..s + cols]);
        }
    }

    /// `x [a, d0, b, d1, c] -> y [a, d1, b, d0, c]`.
    pub fn swap_axes<T: Copy>(x: &[T], y: &mut [T], dims: [usize; 5]) {
        let [a, d0, b, d1, c] = dims;
        for ia in 0..a {
            for i in 0..d0 {
                for ib in 0..b {
                    for j in 0..d1 {
                        for ic in 0..c {
                            y[(((ia * d1 + j) * b + ib) * d0 + i) * c + ic] =
                                x[(((ia * d0 + i) * b + ib) * d1 + j) * c + ic];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;

    #[test]
    fn swapping_twice_is_the_identity() {
        let dims = [2, 3, 2, 4, 3];
        let n: usize = dims.iter().product();
        let x: Vec<u32> = (0..n as u32).collect();
        let mut y = vec![0; n];
        swap_axes(&x, &mut y, dims);
        let mut back = vec![0; n];
        swap_axes(&y, &mut back, [2, 4, 2, 3, 3]);
        assert_eq!(back, x);
        // y[ia=1][j=2][ib=0][i=1][ic=2] = x[ia=1][i=1][ib=0][j=2][ic=2].
        assert_eq!(
            y[(((4 + 2) * 2) * 3 + 1) * 3 + 2],
            x[(((3 + 1) * 2) * 4 + 2) * 3 + 2]
        );
    }
}
