//! Pointwise layers: GELU (tanh form) forward and backward, residual add, bias add.
//!
//! GELU and the residual add are bodies for the elementwise template
//! ([`crate::ptx::elementwise`]: grid-stride, 4 elements a thread through vector loads when
//! aligned, f32 arithmetic, round-to-nearest-even stores; outputs may alias inputs):
//!
//! ```text
//! u        = K0 * (x + K1 * x^3)                 K0 = sqrt(2/pi), K1 = 0.044715
//! gelu(x)  = 0.5 * x * (1 + tanh(u))
//! gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * K0 * (1 + 3 K1 x^2)
//! dx       = dout * gelu'(x)                     (written; dx may be dout)
//! ```
//!
//! `tanh(u) = 1 - 2 / (exp(2u) + 1)` with `ex2.approx` and `rcp.approx` (a few ulp; tends to
//! +-1 for large |u|, NaN stays NaN). The twins use the library `tanh`; the two agree to
//! about 1e-7 relative, far inside the f32 tolerance.
//!
//! Bias add (`out[r, c] = x[r, c] + bias[c]`, out may be x) has its own small kernel: a
//! 2-D grid, `blockIdx.x` over 256-column slices (thread = column, the bias value kept in a
//! register), `blockIdx.y` striding over rows.

use super::ptxgen::{Asm, LOG2E, emit, entry, f32_imm, ld_ptr, log2_size, prelude};
use crate::desc::{ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use crate::ptx::elementwise::{PtrParam, Spec, kernel};
use std::borrow::Cow;

/// `sqrt(2 / pi)`.
pub const K0: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
pub const K1: f32 = 0.044_715;

/// `%t1 = tanh(%t0)` for the template's scratch registers.
fn tanh_t0_into_t1() -> String {
    let mut a = Asm::default();
    emit!(a, "mul.f32 %t1, %t0, {};", f32_imm(2.0 * LOG2E));
    a.l("ex2.approx.f32 %t1, %t1;");
    a.l("add.f32 %t1, %t1, 0f3F800000;");
    a.l("rcp.approx.f32 %t1, %t1;");
    emit!(a, "mul.f32 %t1, %t1, {};", f32_imm(-2.0));
    a.l("add.f32 %t1, %t1, 0f3F800000;");
    a.s
}

/// `%t0 = u(x)`, `%t2 = x^2`.
fn u_of(x: &str) -> String {
    let mut a = Asm::default();
    emit!(a, "mul.rn.f32 %t2, {x}, {x};");
    emit!(a, "mul.rn.f32 %t0, %t2, {x};");
    emit!(a, "mul.rn.f32 %t0, %t0, {};", f32_imm(K1));
    emit!(a, "add.rn.f32 %t0, %t0, {x};");
    emit!(a, "mul.rn.f32 %t0, %t0, {};", f32_imm(K0));
    a.s
}

fn body_gelu_fwd(x: &[String], _: &[String], o: &str) -> String {
    let x = &x[0];
    let mut s = u_of(x);
    s.push_str(&tanh_t0_into_t1());
    s.push_str(&format!(
        "\tadd.f32 %t1, %t1, 0f3F800000;\n\tmul.f32 %t1, %t1, {x};\n\tmul.f32 {o}, %t1, 0f3F000000;\n"
    ));
    s
}

fn body_gelu_bwd(ins: &[String], _: &[String], o: &str) -> String {
    let (x, dout) = (&ins[0], &ins[1]);
    let mut s = u_of(x);
    s.push_str(&tanh_t0_into_t1());
    let mut a = Asm::default();
    a.c("a = 0.5 (1 + t); b = 0.5 x (1 - t^2) K0 (1 + 3 K1 x^2)");
    a.l("add.f32 %t3, %t1, 0f3F800000;");
    a.l("mul.f32 %t3, %t3, 0f3F000000;");
    a.l("mul.f32 %t4, %t1, %t1;");
    a.l("sub.f32 %t4, 0f3F800000, %t4;");
    emit!(a, "mul.f32 %t5, %t2, {};", f32_imm(3.0 * K1));
    a.l("add.f32 %t5, %t5, 0f3F800000;");
    emit!(a, "mul.f32 %t5, %t5, {};", f32_imm(K0));
    a.l("mul.f32 %t4, %t4, %t5;");
    emit!(a, "mul.f32 %t4, %t4, {x};");
    a.l("mul.f32 %t4, %t4, 0f3F000000;");
    a.l("add.f32 %t3, %t3, %t4;");
    emit!(a, "mul.f32 {o}, %t3, {dout};");
    s.push_str(&a.s);
    s
}

fn body_add(x: &[String], _: &[String], o: &str) -> String {
    format!("\tadd.f32 {o}, {}, {};\n", x[0], x[1])
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
                entry: concat!("lathe_gelu_fwd_", $sfx),
                ptrs: &[p("x", $dt, true, false), p("out", $dt, false, true)],
                scalars: &[],
                body: body_gelu_fwd,
            },
            Spec {
                entry: concat!("lathe_gelu_bwd_", $sfx),
                ptrs: &[
                    p("x", $dt, true, false),
                    p("dout", $dt, true, false),
                    p("dx", $dt, false, true),
                ],
                scalars: &[],
                body: body_gelu_bwd,
            },
            Spec {
                entry: concat!("lathe_residual_add_", $sfx),
                ptrs: &[
                    p("a", $dt, true, false),
                    p("b", $dt, true, false),
                    p("out", $dt, false, true),
                ],
                scalars: &[],
                body: body_add,
            },
        ]
    };
}

const SPECS: [[Spec; 3]; 3] = [
    specs!(Elem::F32, "f32"),
    specs!(Elem::BF16, "bf16"),
    specs!(Elem::F16, "f16"),
];

/// Threads per block of the bias add.
pub const BIAS_THREADS: u32 = 256;
/// Most row-blocks of the bias add (`blockIdx.y`); each strides over the rows.
pub const BIAS_MAX_ROW_BLOCKS: u64 = 1024;

/// `entry(x, bias, out, rows, c)`.
fn bias_add(name: &str, dt: Elem) -> String {
    let sh = log2_size(dt);
    let mut a = Asm::default();
    entry(
        &mut a,
        name,
        &[
            ("x", "u64"),
            ("bias", "u64"),
            ("out", "u64"),
            ("rows", "u32"),
            ("c", "u32"),
        ],
    );
    prelude(&mut a);
    a.l(".reg .b64 %px, %pb, %po, %off, %rstride;");
    a.l(".reg .b32 %rows, %c, %col, %r, %t, %nrb;");
    a.l(".reg .f32 %bv, %xv;");
    a.l(".reg .pred %pq;");
    ld_ptr(&mut a, "%px", "x");
    ld_ptr(&mut a, "%pb", "bias");
    ld_ptr(&mut a, "%po", "out");
    a.l("ld.param.u32 %rows, [p_rows];");
    a.l("ld.param.u32 %c, [p_c];");
    a.c("column = blockIdx.x * 256 + threadIdx.x; rows blockIdx.y, + gridDim.y, ...");
    a.l("mov.u32 %col, %ctaid.x;");
    a.l("mov.u32 %t, %tid.x;");
    emit!(a, "mad.lo.u32 %col, %col, {BIAS_THREADS}, %t;");
    a.l("setp.ge.u32 %pq, %col, %c;");
    a.l("@%pq bra $DONE;");
    a.l("cvt.u64.u32 %ad, %col;");
    emit!(a, "shl.b64 %ad, %ad, {sh};");
    a.l("add.u64 %ad, %pb, %ad;");
    super::ptxgen::ld_at(&mut a, dt, &["%bv".to_string()], "");
    a.l("mov.u32 %r, %ctaid.y;");
    a.l("mov.u32 %nrb, %nctaid.y;");
    a.c("element offset r * c + col (64-bit), stepping by gridDim.y * c");
    a.l("mul.wide.u32 %off, %r, %c;");
    a.l("cvt.u64.u32 %rstride, %col;");
    a.l("add.u64 %off, %off, %rstride;");
    a.l("mul.wide.u32 %rstride, %nrb, %c;");
    a.label("$ROW");
    a.l("setp.ge.u32 %pq, %r, %rows;");
    a.l("@%pq bra $DONE;");
    emit!(a, "shl.b64 %ad, %off, {sh};");
    a.l("add.u64 %ad, %px, %ad;");
    super::ptxgen::ld_at(&mut a, dt, &["%xv".to_string()], "");
    a.l("add.f32 %xv, %xv, %bv;");
    emit!(a, "shl.b64 %ad, %off, {sh};");
    a.l("add.u64 %ad, %po, %ad;");
    super::ptxgen::st_at(&mut a, dt, &["%xv".to_string()], "");
    a.l("add.u64 %off, %off, %rstride;");
    a.l("add.u32 %r, %r, %nrb;");
    a.l("bra $ROW;");
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
        s.push_str(&bias_add(BIAS_ADD[i].entry, dt));
    }
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_pointwise",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn bias_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (
            p.n.div_ceil(BIAS_THREADS as u64).max(1) as u32,
            p.batch.clamp(1, BIAS_MAX_ROW_BLOCKS) as u32,
            1,
        ),
        block: (BIAS_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

macro_rules! pointwise_descs {
    ($gf:ident, $gb:ident, $ra:ident, $ba:ident, $dt:expr, $sfx:literal, $size:literal) => {
        #[doc = concat!("`Problem::elems(n)`: `out (n) ", $sfx, " = gelu(x (n))`.")]
        pub static $gf: KernelDesc = KernelDesc {
            entry: concat!("lathe_gelu_fwd_", $sfx),
            module: &MODULE,
            args: &[
                arg("x", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost { flops: 12 * p.n, bytes: 2 * $size * p.n },
            summary: "GELU (tanh form) forward",
        };
        #[doc = concat!("`Problem::elems(n)`: `dx (n) ", $sfx,
            " = dout * gelu'(x)` (written; dx may be dout).")]
        pub static $gb: KernelDesc = KernelDesc {
            entry: concat!("lathe_gelu_bwd_", $sfx),
            module: &MODULE,
            args: &[
                arg("x", ArgKind::In($dt)),
                arg("dout", ArgKind::In($dt)),
                arg("dx", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost { flops: 20 * p.n, bytes: 3 * $size * p.n },
            summary: "GELU (tanh form) backward",
        };
        #[doc = concat!("`Problem::elems(n)`: `out = a + b`, all (n) ", $sfx, ", out may alias.")]
        pub static $ra: KernelDesc = KernelDesc {
            entry: concat!("lathe_residual_add_", $sfx),
            module: &MODULE,
            args: &[
                arg("a", ArgKind::In($dt)),
                arg("b", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("n", ArgKind::U64),
            ],
            geometry: crate::elementwise::geometry,
            cost: |p| Cost { flops: p.n, bytes: 3 * $size * p.n },
            summary: "residual add a + b",
        };
        #[doc = concat!("`Problem { batch: rows, n: C }`: `out (rows, C) = x (rows, C) + bias (C)`, ",
            $sfx, ", out may be x.")]
        pub static $ba: KernelDesc = KernelDesc {
            entry: concat!("lathe_bias_add_", $sfx),
            module: &MODULE,
            args: &[
                arg("x", ArgKind::In($dt)),
                arg("bias", ArgKind::In($dt)),
                arg("out", ArgKind::Out($dt)),
                arg("rows", ArgKind::U32),
                arg("c", ArgKind::U32),
            ],
            geometry: bias_geometry,
            cost: |p| Cost { flops: p.batch * p.n, bytes: $size * (2 * p.batch * p.n + p.n) },
            summary: "bias add over the last dimension",
        };
    };
}

pointwise_descs!(
    GELU_FWD_F32,
    GELU_BWD_F32,
    RESIDUAL_ADD_F32,
    BIAS_ADD_F32,
    Elem::F32,
    "f32",
    4
);
pointwise_descs!(
    GELU_FWD_BF16,
    GELU_BWD_BF16,
    RESIDUAL_ADD_BF16,
    BIAS_ADD_BF16,
    Elem::BF16,
    "bf16",
    2
);
pointwise_descs!(
    GELU_FWD_F16,
    GELU_BWD_F16,
    RESIDUAL_ADD_F16,
    BIAS_ADD_F16,
    Elem::F16,
    "f16",
    2
);

const BIAS_ADD: [&KernelDesc; 3] = [&BIAS_ADD_F32, &BIAS_ADD_BF16, &BIAS_ADD_F16];

/// Every kernel of this module, in module order.
pub static ALL: &[&KernelDesc] = &[
    &GELU_FWD_F32,
    &GELU_BWD_F32,
    &RESIDUAL_ADD_F32,
    &BIAS_ADD_F32,
    &GELU_FWD_BF16,
    &GELU_BWD_BF16,
    &RESIDUAL_ADD_BF16,
    &BIAS_ADD_BF16,
    &GELU_FWD_F16,
    &GELU_BWD_F16,
    &RESIDUAL_ADD_F16,
    &BIAS_ADD_F16,
];

/// GELU forward for a dtype.
pub fn gelu_fwd_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&GELU_FWD_F32, &GELU_FWD_BF16, &GELU_FWD_F16])
}
/// GELU backward for a dtype.
pub fn gelu_bwd_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, [&GELU_BWD_F32, &GELU_BWD_BF16, &GELU_BWD_F16])
}
/// Residual add for a dtype.
pub fn residual_add_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(
        e,
        [&RESIDUAL_ADD_F32, &RESIDUAL_ADD_BF16, &RESIDUAL_ADD_F16],
    )
}
/// Bias add for a dtype.
pub fn bias_add_for(e: Elem) -> Option<&'static KernelDesc> {
    super::by_dtype(e, BIAS_ADD)
}

/// CPU twins (f32 arithmetic, results rounded to the storage type).
pub mod twin {
    use super::{K0, K1};
    use crate::elementwise::twin::Float;

    /// GELU, tanh form.
    pub fn gelu(x: f32) -> f32 {
        let u = K0 * (x + K1 * (x * x * x));
        0.5 * x * (1.0 + u.tanh())
    }

    /// The derivative of [`gelu`].
    pub fn gelu_grad(x: f32) -> f32 {
        let u = K0 * (x + K1 * (x * x * x));
        let t = u.tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * x * x)
    }

    pub fn gelu_forward<T: Float>(x: &[T], out: &mut [T]) {
        for (o, x) in out.iter_mut().zip(x) {
            *o = T::from_f32(gelu(x.to_f32()));
        }
    }

    pub fn gelu_backward<T: Float>(x: &[T], dout: &[T], dx: &mut [T]) {
        for ((d, x), g) in dx.iter_mut().zip(x).zip(dout) {
            *d = T::from_f32(g.to_f32() * gelu_grad(x.to_f32()));
        }
    }

    pub fn residual_add<T: Float>(a: &[T], b: &[T], out: &mut [T]) {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o = T::from_f32(a.to_f32() + b.to_f32());
        }
    }

    /// `x, out: (rows, c)`, `bias: (c)`.
    pub fn bias_add<T: Float>(x: &[T], bias: &[T], out: &mut [T], c: usize) {
        for (i, (o, x)) in out.iter_mut().zip(x).enumerate() {
            *o = T::from_f32(x.to_f32() + bias[i % c].to_f32());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;

    #[test]
    fn gelu_values_and_derivative() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu(-3.0) + 0.003_637).abs() < 1e-5);
        assert_eq!(gelu(30.0), 30.0);
        for x in [-4.0f32, -1.3, -0.2, 0.0, 0.7, 2.5] {
            let h = 1e-3f64;
            let fd = (gelu((x as f64 + h) as f32) as f64 - gelu((x as f64 - h) as f32) as f64)
                / (2.0 * h);
            assert!((gelu_grad(x) as f64 - fd).abs() < 2e-3, "x {x}");
        }
    }

    #[test]
    fn bias_add_broadcasts_over_rows() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 6];
        bias_add(&x, &[10.0, 20.0, 30.0], &mut out, 3);
        assert_eq!(out, [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    }
}
