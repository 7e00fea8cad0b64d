//! Elementwise kernels (fill, scale, axpy, casts) for f32 / bf16 / f16 storage, their
//! descriptors and their CPU twins. The PTX comes from [`crate::ptx::elementwise`].
//!
//! Every kernel: `entry(pointers..., n: u64, scalars...: f32)`, 256 threads a block, a
//! grid-stride loop of 4 elements a thread (see the template's header for the full shape).

use crate::desc::{
    Arg, ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg, div_ceil,
};
use crate::ptx::elementwise::{PtrParam, Spec, kernel};
use half::{bf16, f16};
use std::borrow::Cow;

/// Threads per block of every elementwise kernel.
pub const BLOCK: u32 = 256;
/// Blocks are capped here; the grid-stride loop covers the rest.
pub const MAX_BLOCKS: u64 = 8192;

/// Grid for `n` elements at 4 elements a thread.
pub fn geometry(p: &Problem) -> Geometry {
    let blocks = div_ceil(div_ceil(p.n, 4), BLOCK as u64).clamp(1, MAX_BLOCKS);
    Geometry {
        grid: (blocks as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

const fn p(name: &'static str, elem: Elem, read: bool, write: bool) -> PtrParam {
    PtrParam {
        name,
        elem,
        read,
        write,
    }
}

fn body_fill(_: &[String], s: &[String], o: &str) -> String {
    format!("\tmov.f32 {o}, {};\n", s[0])
}
fn body_copy(x: &[String], _: &[String], o: &str) -> String {
    format!("\tmov.f32 {o}, {};\n", x[0])
}
fn body_scale(x: &[String], s: &[String], o: &str) -> String {
    format!("\tmul.rn.f32 {o}, {}, {};\n", s[0], x[0])
}
fn body_axpy(x: &[String], s: &[String], o: &str) -> String {
    // y = alpha * x + y with one rounding (fused multiply-add), as f32::mul_add on the CPU.
    format!("\tfma.rn.f32 {o}, {}, {}, {};\n", s[0], x[0], x[1])
}

macro_rules! family {
    ($( $entry:literal : [$($ptr:expr),*], [$($sc:literal),*], $body:ident; )*) => {
        const SPECS: &[Spec] = &[
            $( Spec { entry: $entry, ptrs: &[$($ptr),*], scalars: &[$($sc),*], body: $body }, )*
        ];
    };
}

family! {
    "lathe_fill_f32": [p("out", Elem::F32, false, true)], ["value"], body_fill;
    "lathe_fill_bf16": [p("out", Elem::BF16, false, true)], ["value"], body_fill;
    "lathe_fill_f16": [p("out", Elem::F16, false, true)], ["value"], body_fill;
    "lathe_scale_f32": [p("x", Elem::F32, true, false), p("y", Elem::F32, false, true)], ["alpha"], body_scale;
    "lathe_scale_bf16": [p("x", Elem::BF16, true, false), p("y", Elem::BF16, false, true)], ["alpha"], body_scale;
    "lathe_scale_f16": [p("x", Elem::F16, true, false), p("y", Elem::F16, false, true)], ["alpha"], body_scale;
    "lathe_axpy_f32": [p("x", Elem::F32, true, false), p("y", Elem::F32, true, true)], ["alpha"], body_axpy;
    "lathe_axpy_bf16": [p("x", Elem::BF16, true, false), p("y", Elem::BF16, true, true)], ["alpha"], body_axpy;
    "lathe_axpy_f16": [p("x", Elem::F16, true, false), p("y", Elem::F16, true, true)], ["alpha"], body_axpy;
    "lathe_cast_f32_bf16": [p("x", Elem::F32, true, false), p("y", Elem::BF16, false, true)], [], body_copy;
    "lathe_cast_f32_f16": [p("x", Elem::F32, true, false), p("y", Elem::F16, false, true)], [], body_copy;
    "lathe_cast_bf16_f32": [p("x", Elem::BF16, true, false), p("y", Elem::F32, false, true)], [], body_copy;
    "lathe_cast_f16_f32": [p("x", Elem::F16, true, false), p("y", Elem::F32, false, true)], [], body_copy;
    "lathe_cast_bf16_f16": [p("x", Elem::BF16, true, false), p("y", Elem::F16, false, true)], [], body_copy;
    "lathe_cast_f16_bf16": [p("x", Elem::F16, true, false), p("y", Elem::BF16, false, true)], [], body_copy;
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    for spec in SPECS {
        s.push_str(&kernel(spec));
    }
    Cow::Owned(s)
}

/// The module holding every elementwise kernel.
pub static MODULE: Module = Module {
    name: "elementwise",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn cost_bytes(n: u64, sizes: u64, flops_per: u64) -> Cost {
    Cost {
        flops: n * flops_per,
        bytes: n * sizes,
    }
}

macro_rules! desc {
    ($name:ident, $entry:literal, [$($a:expr),*], $cost:expr, $summary:literal) => {
        pub static $name: KernelDesc = KernelDesc {
            entry: $entry,
            module: &MODULE,
            args: &[$($a),*],
            geometry,
            cost: $cost,
            summary: $summary,
        };
    };
}

const N: Arg = arg("n", ArgKind::U64);

desc!(
    FILL_F32,
    "lathe_fill_f32",
    [
        arg("out", ArgKind::Out(Elem::F32)),
        N,
        arg("value", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 4, 0),
    "out[i] = value"
);
desc!(
    FILL_BF16,
    "lathe_fill_bf16",
    [
        arg("out", ArgKind::Out(Elem::BF16)),
        N,
        arg("value", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 2, 0),
    "out[i] = bf16(value)"
);
desc!(
    FILL_F16,
    "lathe_fill_f16",
    [
        arg("out", ArgKind::Out(Elem::F16)),
        N,
        arg("value", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 2, 0),
    "out[i] = f16(value)"
);
desc!(
    SCALE_F32,
    "lathe_scale_f32",
    [
        arg("x", ArgKind::In(Elem::F32)),
        arg("y", ArgKind::Out(Elem::F32)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 8, 1),
    "y[i] = alpha * x[i] (y may be x)"
);
desc!(
    SCALE_BF16,
    "lathe_scale_bf16",
    [
        arg("x", ArgKind::In(Elem::BF16)),
        arg("y", ArgKind::Out(Elem::BF16)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 4, 1),
    "y[i] = bf16(alpha * x[i]) (y may be x)"
);
desc!(
    SCALE_F16,
    "lathe_scale_f16",
    [
        arg("x", ArgKind::In(Elem::F16)),
        arg("y", ArgKind::Out(Elem::F16)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 4, 1),
    "y[i] = f16(alpha * x[i]) (y may be x)"
);
desc!(
    AXPY_F32,
    "lathe_axpy_f32",
    [
        arg("x", ArgKind::In(Elem::F32)),
        arg("y", ArgKind::Out(Elem::F32)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 12, 2),
    "y[i] = fma(alpha, x[i], y[i])"
);
desc!(
    AXPY_BF16,
    "lathe_axpy_bf16",
    [
        arg("x", ArgKind::In(Elem::BF16)),
        arg("y", ArgKind::Out(Elem::BF16)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 6, 2),
    "y[i] = bf16(fma(alpha, x[i], y[i]))"
);
desc!(
    AXPY_F16,
    "lathe_axpy_f16",
    [
        arg("x", ArgKind::In(Elem::F16)),
        arg("y", ArgKind::Out(Elem::F16)),
        N,
        arg("alpha", ArgKind::F32)
    ],
    |p| cost_bytes(p.n, 6, 2),
    "y[i] = f16(fma(alpha, x[i], y[i]))"
);
desc!(
    CAST_F32_BF16,
    "lathe_cast_f32_bf16",
    [
        arg("x", ArgKind::In(Elem::F32)),
        arg("y", ArgKind::Out(Elem::BF16)),
        N
    ],
    |p| cost_bytes(p.n, 6, 0),
    "y[i] = bf16(x[i]), round to nearest even"
);
desc!(
    CAST_F32_F16,
    "lathe_cast_f32_f16",
    [
        arg("x", ArgKind::In(Elem::F32)),
        arg("y", ArgKind::Out(Elem::F16)),
        N
    ],
    |p| cost_bytes(p.n, 6, 0),
    "y[i] = f16(x[i]), round to nearest even"
);
desc!(
    CAST_BF16_F32,
    "lathe_cast_bf16_f32",
    [
        arg("x", ArgKind::In(Elem::BF16)),
        arg("y", ArgKind::Out(Elem::F32)),
        N
    ],
    |p| cost_bytes(p.n, 6, 0),
    "y[i] = f32(x[i]) (exact)"
);
desc!(
    CAST_F16_F32,
    "lathe_cast_f16_f32",
    [
        arg("x", ArgKind::In(Elem::F16)),
        arg("y", ArgKind::Out(Elem::F32)),
        N
    ],
    |p| cost_bytes(p.n, 6, 0),
    "y[i] = f32(x[i]) (exact)"
);
desc!(
    CAST_BF16_F16,
    "lathe_cast_bf16_f16",
    [
        arg("x", ArgKind::In(Elem::BF16)),
        arg("y", ArgKind::Out(Elem::F16)),
        N
    ],
    |p| cost_bytes(p.n, 4, 0),
    "y[i] = f16(x[i]), one rounding"
);
desc!(
    CAST_F16_BF16,
    "lathe_cast_f16_bf16",
    [
        arg("x", ArgKind::In(Elem::F16)),
        arg("y", ArgKind::Out(Elem::BF16)),
        N
    ],
    |p| cost_bytes(p.n, 4, 0),
    "y[i] = bf16(x[i]), one rounding"
);

/// Every elementwise descriptor, in module order.
pub static ALL: &[&KernelDesc] = &[
    &FILL_F32,
    &FILL_BF16,
    &FILL_F16,
    &SCALE_F32,
    &SCALE_BF16,
    &SCALE_F16,
    &AXPY_F32,
    &AXPY_BF16,
    &AXPY_F16,
    &CAST_F32_BF16,
    &CAST_F32_F16,
    &CAST_BF16_F32,
    &CAST_F16_F32,
    &CAST_BF16_F16,
    &CAST_F16_BF16,
];

/// The fill kernel for an element type (f32, bf16, f16).
pub fn fill_for(e: Elem) -> Option<&'static KernelDesc> {
    match e {
        Elem::F32 => Some(&FILL_F32),
        Elem::BF16 => Some(&FILL_BF16),
        Elem::F16 => Some(&FILL_F16),
        _ => None,
    }
}

/// The scale kernel for an element type.
pub fn scale_for(e: Elem) -> Option<&'static KernelDesc> {
    match e {
        Elem::F32 => Some(&SCALE_F32),
        Elem::BF16 => Some(&SCALE_BF16),
        Elem::F16 => Some(&SCALE_F16),
        _ => None,
    }
}

/// The axpy kernel for an element type.
pub fn axpy_for(e: Elem) -> Option<&'static KernelDesc> {
    match e {
        Elem::F32 => Some(&AXPY_F32),
        Elem::BF16 => Some(&AXPY_BF16),
        Elem::F16 => Some(&AXPY_F16),
        _ => None,
    }
}

/// The cast kernel from one float type to another, if the pair is supported.
pub fn cast_for(from: Elem, to: Elem) -> Option<&'static KernelDesc> {
    use Elem::*;
    Some(match (from, to) {
        (F32, BF16) => &CAST_F32_BF16,
        (F32, F16) => &CAST_F32_F16,
        (BF16, F32) => &CAST_BF16_F32,
        (F16, F32) => &CAST_F16_F32,
        (BF16, F16) => &CAST_BF16_F16,
        (F16, BF16) => &CAST_F16_BF16,
        _ => return None,
    })
}

/// CPU twins: the same math, element by element. Values of 16-bit types are their `half` types.
pub mod twin {
    use super::*;

    /// Element types the twins work over: f32, bf16, f16, converting through f32 exactly.
    pub trait Float: Copy {
        fn to_f32(self) -> f32;
        /// Round-to-nearest-even from f32 (NaN stays NaN, infinities stay infinite).
        fn from_f32(x: f32) -> Self;
    }
    impl Float for f32 {
        fn to_f32(self) -> f32 {
            self
        }
        fn from_f32(x: f32) -> Self {
            x
        }
    }
    impl Float for bf16 {
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
        fn from_f32(x: f32) -> Self {
            bf16::from_f32(x)
        }
    }
    impl Float for f16 {
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
        fn from_f32(x: f32) -> Self {
            f16::from_f32(x)
        }
    }

    pub fn fill<T: Float>(out: &mut [T], value: f32) {
        out.fill(T::from_f32(value));
    }

    pub fn scale<T: Float>(x: &[T], y: &mut [T], alpha: f32) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = T::from_f32(alpha * x.to_f32());
        }
    }

    pub fn axpy<T: Float>(x: &[T], y: &mut [T], alpha: f32) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = T::from_f32(alpha.mul_add(x.to_f32(), y.to_f32()));
        }
    }

    pub fn cast<A: Float, B: Float>(x: &[A], y: &mut [B]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = B::from_f32(x.to_f32());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use super::*;

    #[test]
    fn casts_round_to_nearest_even_and_keep_specials() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0).
        let x = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::NAN,
            f32::INFINITY,
            -0.0,
            3.0e38,
        ];
        let mut y = [bf16::ZERO; 6];
        cast(&x, &mut y);
        assert_eq!(y[0].to_f32(), 1.0);
        assert_eq!(y[1].to_f32(), 1.0 + 4.0 / 256.0);
        assert!(y[2].is_nan());
        assert_eq!(y[3], bf16::INFINITY);
        assert!(y[4].to_f32() == 0.0 && y[4].is_sign_negative());
        assert!(y[5].is_finite());
        let mut h = [f16::ZERO; 6];
        cast(&x, &mut h);
        assert!(h[2].is_nan());
        assert_eq!(h[5], f16::INFINITY, "3e38 overflows f16");
    }

    #[test]
    fn axpy_is_one_fma() {
        let x = [1.0f32 + f32::EPSILON];
        let mut y = [-1.0f32];
        axpy(&x, &mut y, 1.0 - f32::EPSILON);
        assert_eq!(y[0], (1.0f32 - f32::EPSILON).mul_add(x[0], -1.0));
        assert!(y[0] != 0.0);
    }

    #[test]
    fn descriptors_match_their_ptx_entries() {
        let ptx = (MODULE.ptx)();
        for d in ALL {
            let head = format!(".visible .entry {}(", d.entry);
            let start = ptx
                .find(&head)
                .unwrap_or_else(|| panic!("{} missing", d.entry));
            let params_end = start + ptx[start..].find(')').expect("param list");
            let params = &ptx[start..params_end];
            let count = params.matches(".param").count();
            assert_eq!(
                count,
                d.args.len(),
                "{}: descriptor and PTX disagree",
                d.entry
            );
            for a in d.args {
                assert!(
                    params.contains(&format!("p_{}", a.name)),
                    "{}: {}",
                    d.entry,
                    a.name
                );
            }
        }
    }

    #[test]
    fn geometry_covers_every_element() {
        for n in [1u64, 31, 1024, 1_000_003, 1 << 32] {
            let g = geometry(&Problem::elems(n));
            let threads = g.grid.0 as u64 * g.block.0 as u64;
            assert!(g.grid.0 >= 1);
            // Below the cap each thread gets at most one 4-element step; at the cap the
            // grid-stride loop covers the rest.
            if (g.grid.0 as u64) < MAX_BLOCKS {
                assert!(threads * 4 >= n, "n {n}: {threads} threads");
            } else {
                assert_eq!(g.grid.0 as u64, MAX_BLOCKS);
            }
        }
    }
}
