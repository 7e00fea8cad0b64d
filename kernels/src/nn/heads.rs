//! Attention head split and merge: the permutes between the token-major layout of the linear
//! layers and the head-major layout of the batched attention products.
//!
//! `packed (B, T, P, nh, hs)` <-> `P` tensors `heads_p (B, nh, T, hs)`, `P` (`parts`) 1..=3:
//! - `lathe_heads_split_{dt}(packed, h0, h1, h2, ...)`:
//!   `heads_p[b][h][t][d] = packed[b][t][p][h][d]`. With `P = 3` it splits the fused qkv
//!   projection `(B, T, 3, nh, hs)` into q, k, v; with `P = 1` it is the backward of the merge
//!   (`dy (B, T, nh hs)` -> `(B, nh, T, hs)`).
//! - `lathe_heads_merge_{dt}(h0, h1, h2, packed, ...)`: the inverse,
//!   `packed[b][t][p][h][d] = heads_p[b][h][t][d]`. With `P = 1` it merges the attention output
//!   `(B, nh, T, hs)` into `(B, T, nh hs)`; with `P = 3` it is the backward of the qkv split
//!   (dq, dk, dv -> dqkv).
//!
//! Pure copies (bit-exact, any dtype of the same width); f32, bf16, f16 entries.
//!
//! # Launch and tiling
//! One thread per element `i = ((b nh + h) T + t) hs + d` of a head tensor, looping over the `P`
//! parts; 256 threads a block, `ceil(B nh T hs / 256)` blocks in x. Consecutive threads walk
//! `d`, so both sides are read and written in contiguous runs of `hs` elements (coalesced
//! whenever `hs` spans a few 32-byte sectors; GPT-2's `hs = 64` gives 128 / 256-byte runs).
//! Index math in u32: the host wrapper keeps `B T P nh hs < 2^31`.
//!
//! # Cost
//! No FLOPs; `2 P B T nh hs size(dt)` bytes (every element read once, written once).

use super::ptxgen::{Asm, emit, entry, ld_ptr};
use crate::desc::{Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Threads per block.
pub const THREADS: u32 = 256;
/// The most parts a launch moves.
pub const MAX_PARTS: usize = 3;

/// `split`: packed -> heads; else heads -> packed.
fn kernel(name: &str, dt: Elem, split: bool) -> String {
    let mut a = Asm::default();
    let params: &[(&str, &str)] = if split {
        &[
            ("packed", "u64"),
            ("h0", "u64"),
            ("h1", "u64"),
            ("h2", "u64"),
            ("b", "u32"),
            ("t", "u32"),
            ("nh", "u32"),
            ("hs", "u32"),
            ("parts", "u32"),
        ]
    } else {
        &[
            ("h0", "u64"),
            ("h1", "u64"),
            ("h2", "u64"),
            ("packed", "u64"),
            ("b", "u32"),
            ("t", "u32"),
            ("nh", "u32"),
            ("hs", "u32"),
            ("parts", "u32"),
        ]
    };
    entry(&mut a, name, params);
    let (ty, sz) = match dt {
        Elem::F32 => ("b32", 4),
        _ => ("b16", 2),
    };
    a.l(".reg .b64 %pp, %ph0, %ph1, %ph2, %ap, %ah;");
    a.l(".reg .b32 %b, %t, %nh, %hs, %parts, %i, %n, %d, %r, %tt, %h, %bb, %pk, %span;");
    emit!(a, ".reg .{ty} %v;");
    a.l(".reg .pred %p;");
    ld_ptr(&mut a, "%pp", "packed");
    for p in 0..3 {
        ld_ptr(&mut a, &format!("%ph{p}"), &format!("h{p}"));
    }
    for p in ["b", "t", "nh", "hs", "parts"] {
        emit!(a, "ld.param.u32 %{p}, [p_{p}];");
    }
    a.c("i = ctaid.x * 256 + tid.x; n = B nh T hs");
    a.l("mov.u32 %i, %ctaid.x;");
    a.l("mov.u32 %r, %tid.x;");
    emit!(a, "mad.lo.u32 %i, %i, {THREADS}, %r;");
    a.l("mul.lo.u32 %n, %b, %nh;");
    a.l("mul.lo.u32 %n, %n, %t;");
    a.l("mul.lo.u32 %n, %n, %hs;");
    a.l("setp.ge.u32 %p, %i, %n;");
    a.l("@%p bra $DONE;");
    a.c("i = ((bb nh + h) T + tt) hs + d");
    a.l("rem.u32 %d, %i, %hs;");
    a.l("div.u32 %r, %i, %hs;");
    a.l("rem.u32 %tt, %r, %t;");
    a.l("div.u32 %r, %r, %t;");
    a.l("rem.u32 %h, %r, %nh;");
    a.l("div.u32 %bb, %r, %nh;");
    a.c("packed index of part 0: ((bb T + tt) P nh + h) hs + d; part p adds p nh hs");
    a.l("mad.lo.u32 %pk, %bb, %t, %tt;");
    a.l("mul.lo.u32 %pk, %pk, %parts;");
    a.l("mad.lo.u32 %pk, %pk, %nh, %h;");
    a.l("mad.lo.u32 %pk, %pk, %hs, %d;");
    a.l("mul.lo.u32 %span, %nh, %hs;");
    emit!(a, "mul.wide.u32 %ap, %pk, {sz};");
    a.l("add.u64 %ap, %ap, %pp;");
    emit!(a, "mul.wide.u32 %ah, %i, {sz};");
    for p in 0..3 {
        if p > 0 {
            emit!(a, "setp.le.u32 %p, %parts, {p};");
            a.l("@%p bra $DONE;");
            emit!(a, "mul.wide.u32 %ah, %span, {sz};");
            a.l("add.u64 %ap, %ap, %ah;");
            emit!(a, "mul.wide.u32 %ah, %i, {sz};");
        }
        emit!(a, "add.u64 %ah, %ah, %ph{p};");
        if split {
            emit!(a, "ld.global.{ty} %v, [%ap];");
            emit!(a, "st.global.{ty} [%ah], %v;");
        } else {
            emit!(a, "ld.global.{ty} %v, [%ah];");
            emit!(a, "st.global.{ty} [%ap], %v;");
        }
        if p == 0 {
            a.l("sub.u64 %ah, %ah, %ph0;");
        }
    }
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (dt, split, merge) in [
        (Elem::F32, "lathe_heads_split_f32", "lathe_heads_merge_f32"),
        (
            Elem::BF16,
            "lathe_heads_split_bf16",
            "lathe_heads_merge_bf16",
        ),
        (Elem::F16, "lathe_heads_split_f16", "lathe_heads_merge_f16"),
    ] {
        s.push_str(&kernel(split, dt, true));
        s.push_str(&kernel(merge, dt, false));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_heads",
    target: Target::Sm80,
    ptx: module_ptx,
};

const fn split_args(e: Elem) -> [Arg; 9] {
    [
        arg("packed", ArgKind::In(e)),
        arg("h0", ArgKind::Out(e)),
        arg("h1", ArgKind::Out(e)),
        arg("h2", ArgKind::Out(e)),
        arg("b", ArgKind::U32),
        arg("t", ArgKind::U32),
        arg("nh", ArgKind::U32),
        arg("hs", ArgKind::U32),
        arg("parts", ArgKind::U32),
    ]
}
const fn merge_args(e: Elem) -> [Arg; 9] {
    [
        arg("h0", ArgKind::In(e)),
        arg("h1", ArgKind::In(e)),
        arg("h2", ArgKind::In(e)),
        arg("packed", ArgKind::Out(e)),
        arg("b", ArgKind::U32),
        arg("t", ArgKind::U32),
        arg("nh", ArgKind::U32),
        arg("hs", ArgKind::U32),
        arg("parts", ArgKind::U32),
    ]
}

/// `Problem { n: B nh T hs (one head tensor), batch: parts }`.
fn geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (p.n.div_ceil(THREADS as u64).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}
fn cost_of(p: &Problem, size: u64) -> Cost {
    Cost {
        flops: 0,
        bytes: 2 * size * p.n * p.batch.max(1),
    }
}
fn cost4(p: &Problem) -> Cost {
    cost_of(p, 4)
}
fn cost2(p: &Problem) -> Cost {
    cost_of(p, 2)
}

macro_rules! descs {
    ($( $name:ident = $entry:literal, $args:expr, $cost:ident, $summary:literal; )*) => {
        $(
            #[doc = concat!("`", $entry, "`: ", $summary, ".")]
            pub static $name: KernelDesc = KernelDesc {
                entry: $entry,
                module: &MODULE,
                args: &$args,
                geometry,
                cost: $cost,
                summary: $summary,
            };
        )*
    };
}

const SPLIT_F32: [Arg; 9] = split_args(Elem::F32);
const SPLIT_BF16: [Arg; 9] = split_args(Elem::BF16);
const SPLIT_F16: [Arg; 9] = split_args(Elem::F16);
const MERGE_F32: [Arg; 9] = merge_args(Elem::F32);
const MERGE_BF16: [Arg; 9] = merge_args(Elem::BF16);
const MERGE_F16: [Arg; 9] = merge_args(Elem::F16);

descs! {
    HEADS_SPLIT_F32 = "lathe_heads_split_f32", SPLIT_F32, cost4,
        "(B, T, P, nh, hs) -> P x (B, nh, T, hs)";
    HEADS_SPLIT_BF16 = "lathe_heads_split_bf16", SPLIT_BF16, cost2,
        "(B, T, P, nh, hs) -> P x (B, nh, T, hs)";
    HEADS_SPLIT_F16 = "lathe_heads_split_f16", SPLIT_F16, cost2,
        "(B, T, P, nh, hs) -> P x (B, nh, T, hs)";
    HEADS_MERGE_F32 = "lathe_heads_merge_f32", MERGE_F32, cost4,
        "P x (B, nh, T, hs) -> (B, T, P, nh, hs)";
    HEADS_MERGE_BF16 = "lathe_heads_merge_bf16", MERGE_BF16, cost2,
        "P x (B, nh, T, hs) -> (B, T, P, nh, hs)";
    HEADS_MERGE_F16 = "lathe_heads_merge_f16", MERGE_F16, cost2,
        "P x (B, nh, T, hs) -> (B, T, P, nh, hs)";
}

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &HEADS_SPLIT_F32,
    &HEADS_MERGE_F32,
    &HEADS_SPLIT_BF16,
    &HEADS_MERGE_BF16,
    &HEADS_SPLIT_F16,
    &HEADS_MERGE_F16,
];

/// The split kernel of a dtype.
pub fn split_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&HEADS_SPLIT_F32, &HEADS_SPLIT_BF16, &HEADS_SPLIT_F16])
}
/// The merge kernel of a dtype.
pub fn merge_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&HEADS_MERGE_F32, &HEADS_MERGE_BF16, &HEADS_MERGE_F16])
}

/// The shape of a split or merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
    /// 1..=3 tensors on the head side.
    pub parts: usize,
}

impl Heads {
    /// Elements of one head tensor `(B, nh, T, hs)`.
    pub fn head_len(&self) -> usize {
        self.b * self.nh * self.t * self.hs
    }
    /// Elements of the packed tensor `(B, T, P, nh, hs)`.
    pub fn packed_len(&self) -> usize {
        self.head_len() * self.parts
    }
    pub fn problem(&self) -> Problem {
        Problem {
            n: self.head_len() as u64,
            m: 1,
            k: 1,
            batch: self.parts as u64,
        }
    }
}

/// CPU twins.
pub mod twin {
    use super::Heads;

    /// `heads[p][((b nh + h) T + t) hs + d] = packed[(((b T + t) P + p) nh + h) hs + d]`.
    pub fn split<T: Copy>(s: &Heads, packed: &[T], heads: &mut [&mut [T]]) {
        for (p, out) in heads.iter_mut().enumerate().take(s.parts) {
            for b in 0..s.b {
                for h in 0..s.nh {
                    for t in 0..s.t {
                        for d in 0..s.hs {
                            let i = ((b * s.nh + h) * s.t + t) * s.hs + d;
                            let j = (((b * s.t + t) * s.parts + p) * s.nh + h) * s.hs + d;
                            out[i] = packed[j];
                        }
                    }
                }
            }
        }
    }

    /// The inverse of [`split`].
    pub fn merge<T: Copy>(s: &Heads, heads: &[&[T]], packed: &mut [T]) {
        for (p, src) in heads.iter().enumerate().take(s.parts) {
            for b in 0..s.b {
                for h in 0..s.nh {
                    for t in 0..s.t {
                        for d in 0..s.hs {
                            let i = ((b * s.nh + h) * s.t + t) * s.hs + d;
                            let j = (((b * s.t + t) * s.parts + p) * s.nh + h) * s.hs + d;
                            packed[j] = src[i];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_is_the_identity() {
        let s = Heads {
            b: 2,
            t: 3,
            nh: 2,
            hs: 5,
            parts: 3,
        };
        let packed: Vec<u32> = (0..s.packed_len() as u32).collect();
        let mut h: Vec<Vec<u32>> = vec![vec![0; s.head_len()]; 3];
        {
            let mut refs: Vec<&mut [u32]> = h.iter_mut().map(|v| v.as_mut_slice()).collect();
            twin::split(&s, &packed, &mut refs);
        }
        // q[b=1][h=1][t=2][d=4] = packed[b=1][t=2][p=0][h=1][d=4].
        let i = ((s.nh + 1) * s.t + 2) * s.hs + 4;
        let j = ((s.t + 2) * s.parts * s.nh + 1) * s.hs + 4;
        assert_eq!(h[0][i], j as u32);
        let mut back = vec![u32::MAX; s.packed_len()];
        let refs: Vec<&[u32]> = h.iter().map(|v| v.as_slice()).collect();
        twin::merge(&s, &refs, &mut back);
        assert_eq!(back, packed);
    }
}
