//! Pointwise kernels of the autograd tape's device backend: product, ReLU forward and
//! backward, a mixed-type accumulate (gradient accumulation across dtypes), and a fill from a
//! scalar that lives in device memory (seeding a backward from the loss scale or a loss
//! gradient without a host sync).
//!
//! The first four are bodies for the elementwise template ([`crate::ptx::elementwise`]:
//! grid-stride, 4 elements a thread through vector loads when aligned, f32 arithmetic,
//! round-to-nearest-even stores; an output may alias an input):
//!
//! ```text
//! lathe_mul_{dt}(a, b, out, n)            out = a * b
//! lathe_relu_fwd_{dt}(x, y, n)            y   = x > 0 ? x : 0        (NaN -> 0, as the CPU op)
//! lathe_relu_bwd_{dt}(y, dy, dx, n)       dx  = y > 0 ? dy : 0
//! lathe_add_into_{x}_{y}(x, y, n)         y  += x                    (x and y of any two dtypes)
//! ```
//!
//! Cost: mul 1 FLOP and `3 n size` bytes; relu forward `2 n size`, backward `3 n size`;
//! add_into 1 FLOP and `n (size(x) + 2 size(y))` bytes.
//!
//! `lathe_fill_scalar_{dt}(src, out, n, factor)`: `out[i] = src[0] * factor`, `src` one f32 in
//! device memory (the host passes a pointer to the element it wants). Grid-stride over `n`,
//! 256 threads a block, one element a thread per step, at most 8192 blocks; every thread loads
//! the scalar once. Cost: 1 FLOP, `n size + 4` bytes.

use super::ptxgen::{Asm, emit, entry, ld_ptr, log2_size, narrow, prelude};
use crate::desc::{ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use crate::ptx::elementwise::{PtrParam, Spec, kernel};
use std::borrow::Cow;

/// Threads per block of the scalar fill.
pub const FILL_THREADS: u32 = 256;
/// Most blocks of the scalar fill (the grid-stride loop covers the rest).
pub const FILL_MAX_BLOCKS: u64 = 8192;

fn body_mul(x: &[String], _: &[String], o: &str) -> String {
    format!("\tmul.rn.f32 {o}, {}, {};\n", x[0], x[1])
}

fn body_relu_fwd(x: &[String], _: &[String], o: &str) -> String {
    format!(
        "\t{{\n\t.reg .pred %rq;\n\tsetp.gt.f32 %rq, {x}, 0f00000000;\n\tselp.f32 {o}, {x}, 0f00000000, %rq;\n\t}}\n",
        x = x[0]
    )
}

fn body_relu_bwd(x: &[String], _: &[String], o: &str) -> String {
    format!(
        "\t{{\n\t.reg .pred %rq;\n\tsetp.gt.f32 %rq, {}, 0f00000000;\n\tselp.f32 {o}, {}, 0f00000000, %rq;\n\t}}\n",
        x[0], x[1]
    )
}

fn body_add(x: &[String], _: &[String], o: &str) -> String {
    format!("\tadd.rn.f32 {o}, {}, {};\n", x[0], x[1])
}

const fn p(name: &'static str, elem: Elem, read: bool, write: bool) -> PtrParam {
    PtrParam {
        name,
        elem,
        read,
        write,
    }
}

macro_rules! specs {
    ($dt:expr, $sfx:literal) => {
        [
            Spec {
                entry: concat!("lathe_mul_", $sfx),
                ptrs: &[
                    p("a", $dt, true, false),
                    p("b", $dt, true, false),
                    p("out", $dt, false, true),
                ],
                scalars: &[],
                body: body_mul,
            },
            Spec {
                entry: concat!("lathe_relu_fwd_", $sfx),
                ptrs: &[p("x", $dt, true, false), p("y", $dt, false, true)],
                scalars: &[],
                body: body_relu_fwd,
            },
            Spec {
                entry: concat!("lathe_relu_bwd_", $sfx),
                ptrs: &[
                    p("y", $dt, true, false),
                    p("dy", $dt, true, false),
                    p("dx", $dt, false, true),
                ],
                scalars: &[],
                body: body_relu_bwd,
            },
        ]
    };
}

const SPECS: [[Spec; 3]; 3] = [
    specs!(Elem::F32, "f32"),
    specs!(Elem::BF16, "bf16"),
    specs!(Elem::F16, "f16"),
];

macro_rules! add_spec {
    ($x:expr, $y:expr, $entry:literal) => {
        Spec {
            entry: $entry,
            ptrs: &[p("x", $x, true, false), p("y", $y, true, true)],
            scalars: &[],
            body: body_add,
        }
    };
}

/// `[x dtype][y dtype]` in `ACT_DTYPES` order.
const ADD_SPECS: [[Spec; 3]; 3] = [
    [
        add_spec!(Elem::F32, Elem::F32, "lathe_add_into_f32_f32"),
        add_spec!(Elem::F32, Elem::BF16, "lathe_add_into_f32_bf16"),
        add_spec!(Elem::F32, Elem::F16, "lathe_add_into_f32_f16"),
    ],
    [
        add_spec!(Elem::BF16, Elem::F32, "lathe_add_into_bf16_f32"),
        add_spec!(Elem::BF16, Elem::BF16, "lathe_add_into_bf16_bf16"),
        add_spec!(Elem::BF16, Elem::F16, "lathe_add_into_bf16_f16"),
    ],
    [
        add_spec!(Elem::F16, Elem::F32, "lathe_add_into_f16_f32"),
        add_spec!(Elem::F16, Elem::BF16, "lathe_add_into_f16_bf16"),
        add_spec!(Elem::F16, Elem::F16, "lathe_add_into_f16_f16"),
    ],
];

/// `entry(src, out, n: u64, factor: f32)`.
fn fill_scalar(name: &str, dt: Elem) -> String {
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("src", "u64"),
            ("out", "u64"),
            ("n", "u64"),
            ("factor", "f32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %ps, %po, %n, %i, %stride, %t64;");
    a.l(".reg .b32 %r0, %r1, %r2;");
    a.l(".reg .f32 %val, %factor;");
    a.l(".reg .pred %pq;");
    ld_ptr(&mut a, "%ps", "src");
    ld_ptr(&mut a, "%po", "out");
    a.l("ld.param.u64 %n, [p_n];");
    a.l("ld.param.f32 %factor, [p_factor];");
    a.c("i = ctaid.x * ntid.x + tid.x, stride = nctaid.x * ntid.x (64-bit)");
    a.l("mov.u32 %r0, %ctaid.x;");
    a.l("mov.u32 %r1, %ntid.x;");
    a.l("mov.u32 %r2, %tid.x;");
    a.l("mul.wide.u32 %i, %r0, %r1;");
    a.l("cvt.u64.u32 %t64, %r2;");
    a.l("add.u64 %i, %i, %t64;");
    a.l("mov.u32 %r0, %nctaid.x;");
    a.l("mul.wide.u32 %stride, %r0, %r1;");
    a.l("setp.ge.u64 %pq, %i, %n;");
    a.l("@%pq bra $DONE;");
    a.l("ld.global.f32 %val, [%ps];");
    a.l("mul.rn.f32 %val, %val, %factor;");
    if dt != Elem::F32 {
        narrow(&mut a, dt, "%val", "%hh1");
    }
    a.label("$LOOP");
    a.l("setp.ge.u64 %pq, %i, %n;");
    a.l("@%pq bra $DONE;");
    emit!(a, "shl.b64 %ad, %i, {};", log2_size(dt));
    a.l("add.u64 %ad, %po, %ad;");
    if dt == Elem::F32 {
        a.l("st.global.f32 [%ad], %val;");
    } else {
        a.l("st.global.b16 [%ad], %hh1;");
    }
    a.l("add.u64 %i, %i, %stride;");
    a.l("bra.uni $LOOP;");
    a.label("$DONE");
    a.l("ret;");
    a.l("}");
    a.s
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for (i, dt) in super::ACT_DTYPES.into_iter().enumerate() {
        for spec in &SPECS[i] {
            s.push_str(&kernel(spec));
        }
        s.push_str(&fill_scalar(FILL_SCALAR[i].entry, dt));
    }
    for row in &ADD_SPECS {
        for spec in row {
            s.push_str(&kernel(spec));
        }
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_tape_pointwise",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn fill_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.n.div_ceil(FILL_THREADS as u64).clamp(1, FILL_MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block: (FILL_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! pw_descs {
    ($mul:ident, $rf:ident, $rb:ident, $fs:ident, $dt:expr, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem::elems(n)`: `out (n) = a (n) * b (n)`, ", $sfx, ".")]
        pub static $mul: KernelDesc = KernelDesc {
            entry: concat!("lathe_mul_", $sfx),
            module: &MODULE,
            args: &[
                arg("a", ArgKind::In($dt)),
                arg("b", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost {
                flops: p.n,
                bytes: 3 * $size * p.n,
            },
            summary: "elementwise product",
        };
        #[doc = concat!("`Problem::elems(n)`: `y (n) = relu(x (n))`, ", $sfx, ".")]
        pub static $rf: KernelDesc = KernelDesc {
            entry: concat!("lathe_relu_fwd_", $sfx),
            module: &MODULE,
            args: &[
                arg("x", ArgKind::In($dt)),
                arg("y", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost {
                flops: p.n,
                bytes: 2 * $size * p.n,
            },
            summary: "ReLU forward",
        };
        #[doc = concat!("`Problem::elems(n)`: `dx (n) = y > 0 ? dy : 0`, ", $sfx, ".")]
        pub static $rb: KernelDesc = KernelDesc {
            entry: concat!("lathe_relu_bwd_", $sfx),
            module: &MODULE,
            args: &[
                arg("y", ArgKind::In($dt)),
                arg("dy", ArgKind::In($dt)),
                arg("dx", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost {
                flops: p.n,
                bytes: 3 * $size * p.n,
            },
            summary: "ReLU backward from the output",
        };
        #[doc = concat!("`Problem::elems(n)`: `out (n) ", $sfx, " = src[0] * factor`,")]
        #[doc = "`src` an f32 in device memory."]
        pub static $fs: KernelDesc = KernelDesc {
            entry: concat!("lathe_fill_scalar_", $sfx),
            module: &MODULE,
            args: &[
                arg("src", ArgKind::In(Elem::F32)),
                arg("out", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
                arg("factor", ArgKind::F32),
            ],
            geometry: fill_geometry,
            cost: |p| Cost {
                flops: p.n,
                bytes: $size * p.n + 4,
            },
            summary: "fill from a device scalar times a host factor",
        };
    };
}

pw_descs!(
    MUL_F32,
    RELU_FWD_F32,
    RELU_BWD_F32,
    FILL_SCALAR_F32,
    Elem::F32,
    "f32",
    4
);
pw_descs!(
    MUL_BF16,
    RELU_FWD_BF16,
    RELU_BWD_BF16,
    FILL_SCALAR_BF16,
    Elem::BF16,
    "bf16",
    2
);
pw_descs!(
    MUL_F16,
    RELU_FWD_F16,
    RELU_BWD_F16,
    FILL_SCALAR_F16,
    Elem::F16,
    "f16",
    2
);

const FILL_SCALAR: [&KernelDesc; 3] = [&FILL_SCALAR_F32, &FILL_SCALAR_BF16, &FILL_SCALAR_F16];

macro_rules! add_descs {
    ($( $name:ident = $entry:literal, $x:expr, $y:expr, $xs:literal, $ys:literal; )*) => {
        $(
            #[doc = concat!("`Problem::elems(n)`: `y (n) += x (n)`, `", $entry, "`.")]
            pub static $name: KernelDesc = KernelDesc {
                entry: $entry,
                module: &MODULE,
                args: &[
                    arg("x", ArgKind::In($x)),
                    arg("y", ArgKind::Out($y)),
                    arg("n", ArgKind::U64),
                ],
                geometry: crate::elementwise::geometry,
                cost: |p| Cost { flops: p.n, bytes: ($xs + 2 * $ys) * p.n },
                summary: "y += x across dtypes, one rounding",
            };
        )*
    };
}

add_descs! {
    ADD_INTO_F32_F32 = "lathe_add_into_f32_f32", Elem::F32, Elem::F32, 4, 4;
    ADD_INTO_F32_BF16 = "lathe_add_into_f32_bf16", Elem::F32, Elem::BF16, 4, 2;
    ADD_INTO_F32_F16 = "lathe_add_into_f32_f16", Elem::F32, Elem::F16, 4, 2;
    ADD_INTO_BF16_F32 = "lathe_add_into_bf16_f32", Elem::BF16, Elem::F32, 2, 4;
    ADD_INTO_BF16_BF16 = "lathe_add_into_bf16_bf16", Elem::BF16, Elem::BF16, 2, 2;
    ADD_INTO_BF16_F16 = "lathe_add_into_bf16_f16", Elem::BF16, Elem::F16, 2, 2;
    ADD_INTO_F16_F32 = "lathe_add_into_f16_f32", Elem::F16, Elem::F32, 2, 4;
    ADD_INTO_F16_BF16 = "lathe_add_into_f16_bf16", Elem::F16, Elem::BF16, 2, 2;
    ADD_INTO_F16_F16 = "lathe_add_into_f16_f16", Elem::F16, Elem::F16, 2, 2;
}

/// Every kernel of this module, in module order.
pub static ALL: &[&KernelDesc] = &[
    &MUL_F32,
    &RELU_FWD_F32,
    &RELU_BWD_F32,
    &FILL_SCALAR_F32,
    &MUL_BF16,
    &RELU_FWD_BF16,
    &RELU_BWD_BF16,
    &FILL_SCALAR_BF16,
    &MUL_F16,
    &RELU_FWD_F16,
    &RELU_BWD_F16,
    &FILL_SCALAR_F16,
    &ADD_INTO_F32_F32,
    &ADD_INTO_F32_BF16,
    &ADD_INTO_F32_F16,
    &ADD_INTO_BF16_F32,
    &ADD_INTO_BF16_BF16,
    &ADD_INTO_BF16_F16,
    &ADD_INTO_F16_F32,
    &ADD_INTO_F16_BF16,
    &ADD_INTO_F16_F16,
];

/// The product kernel of a dtype.
pub fn mul_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&MUL_F32, &MUL_BF16, &MUL_F16])
}
/// The ReLU forward kernel of a dtype.
pub fn relu_fwd_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&RELU_FWD_F32, &RELU_FWD_BF16, &RELU_FWD_F16])
}
/// The ReLU backward kernel of a dtype.
pub fn relu_bwd_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&RELU_BWD_F32, &RELU_BWD_BF16, &RELU_BWD_F16])
}
/// The scalar fill kernel of an output dtype.
pub fn fill_scalar_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, FILL_SCALAR)
}
/// The accumulate kernel `y (to) += x (from)`.
pub fn add_into_for(from: Elem, to: Elem) -> Option<&'static KernelDesc> {
    let idx = |e: Elem| super::ACT_DTYPES.iter().position(|&d| d == e);
    let (i, j) = (idx(from)?, idx(to)?);
    Some(ALL[12 + 3 * i + j])
}

/// CPU twins: f32 arithmetic, one rounding per output.
pub mod twin {
    use crate::elementwise::twin::Float;

    pub fn mul<T: Float>(a: &[T], b: &[T], out: &mut [T]) {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o = T::from_f32(a.to_f32() * b.to_f32());
        }
    }

    pub fn relu_fwd<T: Float>(x: &[T], y: &mut [T]) {
        for (y, x) in y.iter_mut().zip(x) {
            let v = x.to_f32();
            *y = T::from_f32(if v > 0.0 { v } else { 0.0 });
        }
    }

    pub fn relu_bwd<T: Float>(y: &[T], dy: &[T], dx: &mut [T]) {
        for ((d, y), g) in dx.iter_mut().zip(y).zip(dy) {
            *d = T::from_f32(if y.to_f32() > 0.0 { g.to_f32() } else { 0.0 });
        }
    }

    pub fn add_into<X: Float, Y: Float>(x: &[X], y: &mut [Y]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = Y::from_f32(y.to_f32() + x.to_f32());
        }
    }

    pub fn fill_scalar<T: Float>(src: f32, factor: f32, out: &mut [T]) {
        out.fill(T::from_f32(src * factor));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_into_table_is_indexed_by_dtype_pair() {
        for (i, &x) in super::super::ACT_DTYPES.iter().enumerate() {
            for (j, &y) in super::super::ACT_DTYPES.iter().enumerate() {
                let k = add_into_for(x, y).unwrap();
                assert_eq!(k.entry, ADD_SPECS[i][j].entry);
                assert_eq!(k.args[0].kind, ArgKind::In(x));
                assert_eq!(k.args[1].kind, ArgKind::Out(y));
            }
        }
        assert!(add_into_for(Elem::U32, Elem::F32).is_none());
    }
}
