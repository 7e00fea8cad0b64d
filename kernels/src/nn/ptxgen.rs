//! Small helpers the `nn` PTX templates share: an emitter, element loads and stores for the
//! activation dtypes (f32 / bf16 / f16, converted to and from f32 registers), warp reductions,
//! and the row loop every row kernel uses.
//!
//! Every kernel that uses these helpers calls [`prelude`] first: it declares the scratch
//! registers the helpers write (`%ad`, `%hz`, `%hh0..3`, `%wq0..1`, `%wt`, `%pl`).

use crate::desc::Elem;
use std::fmt::Write;

/// A PTX text being written, one instruction a line.
#[derive(Default)]
pub(crate) struct Asm {
    pub s: String,
}

impl Asm {
    /// One instruction or directive, indented.
    pub fn l(&mut self, line: impl AsRef<str>) {
        self.s.push('\t');
        self.s.push_str(line.as_ref());
        self.s.push('\n');
    }

    /// A label.
    pub fn label(&mut self, name: &str) {
        let _ = writeln!(self.s, "{name}:");
    }

    /// A comment line.
    pub fn c(&mut self, text: &str) {
        let _ = writeln!(self.s, "\t// {text}");
    }
}

/// `emit!(asm, "fmt", args...)`: one formatted instruction.
macro_rules! emit {
    ($a:expr, $($t:tt)*) => { $a.l(format!($($t)*)) };
}
pub(crate) use emit;

/// The PTX spelling of an f32 immediate (exact bit pattern).
pub(crate) fn f32_imm(x: f32) -> String {
    format!("0f{:08X}", x.to_bits())
}

/// The PTX spelling of an f64 immediate (exact bit pattern).
pub(crate) fn f64_imm(x: f64) -> String {
    format!("0d{:016X}", x.to_bits())
}

/// The module-scope dynamic shared memory array (PTX allows `.extern .shared` only at module
/// scope); modules with kernels that use dynamic shared memory append [`DYN_SMEM_DECL`].
pub(crate) const DYN_SMEM: &str = "lathe_dyn_smem";
/// The declaration of [`DYN_SMEM`].
pub(crate) const DYN_SMEM_DECL: &str = ".extern .shared .align 16 .b8 lathe_dyn_smem[];\n";

/// `log2(e)`, for `exp(x) = ex2(x * log2(e))`.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Writes `.visible .entry name(params)` and the opening brace. Each parameter is
/// `(name, ptx type)`, the name without the `p_` prefix the body uses.
pub(crate) fn entry(a: &mut Asm, name: &str, params: &[(&str, &str)]) {
    let list: Vec<String> = params
        .iter()
        .map(|(n, t)| format!("\t.param .{t} p_{n}"))
        .collect();
    let _ = write!(
        a.s,
        "\n.visible .entry {name}(\n{}\n)\n{{\n",
        list.join(",\n")
    );
}

/// Scratch registers the helpers below use; `%hz` is set to 0.
pub(crate) fn prelude(a: &mut Asm) {
    a.l(".reg .b64 %ad;");
    a.l(".reg .b16 %hz, %hh<4>;");
    a.l(".reg .b32 %wq<2>, %wt;");
    a.l(".reg .pred %pl;");
    a.l("mov.b16 %hz, 0;");
}

/// Loads a global pointer parameter into `reg` (declared by the caller) as a global address.
pub(crate) fn ld_ptr(a: &mut Asm, reg: &str, param: &str) {
    emit!(a, "ld.param.u64 {reg}, [p_{param}];");
    emit!(a, "cvta.to.global.u64 {reg}, {reg};");
}

/// `log2` of an element size, for address shifts.
pub(crate) fn log2_size(e: Elem) -> u32 {
    e.size().trailing_zeros()
}

/// `%ad = base + col * size(dt)`, with `col` a u32 register (element index in the row).
pub(crate) fn addr(a: &mut Asm, dt: Elem, base: &str, col: &str) {
    emit!(a, "mul.wide.u32 %ad, {col}, {};", dt.size());
    emit!(a, "add.u64 %ad, {base}, %ad;");
}

/// Widens the 16-bit register `h` holding a `dt` value into the f32 register `f`.
pub(crate) fn widen(a: &mut Asm, dt: Elem, h: &str, f: &str) {
    match dt {
        // bf16 is the high half of an f32: shift it in, exactly.
        Elem::BF16 => {
            emit!(a, "mov.b32 %wt, {{%hz, {h}}};");
            emit!(a, "mov.b32 {f}, %wt;");
        }
        Elem::F16 => emit!(a, "cvt.f32.f16 {f}, {h};"),
        _ => unreachable!("widen of a 32-bit type"),
    }
}

/// Rounds the f32 register `f` to `dt` (round to nearest even) into the 16-bit register `h`.
pub(crate) fn narrow(a: &mut Asm, dt: Elem, f: &str, h: &str) {
    match dt {
        Elem::BF16 => emit!(a, "cvt.rn.bf16.f32 {h}, {f};"),
        Elem::F16 => emit!(a, "cvt.rn.f16.f32 {h}, {f};"),
        _ => unreachable!("narrow to a 32-bit type"),
    }
}

/// Loads `dsts.len()` (1 or 4) consecutive `dt` elements at `%ad` into f32 registers. Four
/// elements take one vector load (16 B for f32, 8 B for 16-bit types): `%ad` must be aligned.
/// `cop` is a cache operator suffix such as `".cs"` or `""`.
pub(crate) fn ld_at(a: &mut Asm, dt: Elem, dsts: &[String], cop: &str) {
    match (dt, dsts.len()) {
        (Elem::F32, 1) => emit!(a, "ld.global{cop}.f32 {}, [%ad];", dsts[0]),
        (Elem::F32, 4) => emit!(
            a,
            "ld.global{cop}.v4.f32 {{{}, {}, {}, {}}}, [%ad];",
            dsts[0],
            dsts[1],
            dsts[2],
            dsts[3]
        ),
        (Elem::BF16 | Elem::F16, 1) => {
            emit!(a, "ld.global{cop}.b16 %hh0, [%ad];");
            widen(a, dt, "%hh0", &dsts[0]);
        }
        (Elem::BF16 | Elem::F16, 4) => {
            emit!(a, "ld.global{cop}.v2.b32 {{%wq0, %wq1}}, [%ad];");
            // Element 0 is the low half of the first word (little-endian).
            a.l("mov.b32 {%hh0, %hh1}, %wq0;");
            a.l("mov.b32 {%hh2, %hh3}, %wq1;");
            for (l, d) in dsts.iter().enumerate() {
                widen(a, dt, &format!("%hh{l}"), d);
            }
        }
        _ => unreachable!("load of {} x {}", dsts.len(), dt.name()),
    }
}

/// Stores `srcs.len()` (1 or 4) f32 registers as `dt` elements at `%ad` (see [`ld_at`]).
pub(crate) fn st_at(a: &mut Asm, dt: Elem, srcs: &[String], cop: &str) {
    match (dt, srcs.len()) {
        (Elem::F32, 1) => emit!(a, "st.global{cop}.f32 [%ad], {};", srcs[0]),
        (Elem::F32, 4) => emit!(
            a,
            "st.global{cop}.v4.f32 [%ad], {{{}, {}, {}, {}}};",
            srcs[0],
            srcs[1],
            srcs[2],
            srcs[3]
        ),
        (Elem::BF16 | Elem::F16, 1) => {
            narrow(a, dt, &srcs[0], "%hh0");
            emit!(a, "st.global{cop}.b16 [%ad], %hh0;");
        }
        (Elem::BF16 | Elem::F16, 4) => {
            for (l, s) in srcs.iter().enumerate() {
                narrow(a, dt, s, &format!("%hh{l}"));
            }
            a.l("mov.b32 %wq0, {%hh0, %hh1};");
            a.l("mov.b32 %wq1, {%hh2, %hh3};");
            emit!(a, "st.global{cop}.v2.b32 [%ad], {{%wq0, %wq1}};");
        }
        _ => unreachable!("store of {} x {}", srcs.len(), dt.name()),
    }
}

/// Loads `dsts.len()` elements of row `base` (a u64 register) starting at column `col`.
pub(crate) fn ld_row(a: &mut Asm, dt: Elem, base: &str, col: &str, dsts: &[String]) {
    addr(a, dt, base, col);
    ld_at(a, dt, dsts, "");
}

/// Stores `srcs.len()` elements into row `base` starting at column `col`.
pub(crate) fn st_row(a: &mut Asm, dt: Elem, base: &str, col: &str, srcs: &[String]) {
    addr(a, dt, base, col);
    st_at(a, dt, srcs, "");
}

/// Register names `prefix0 .. prefix{n-1}`.
pub(crate) fn regs(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Butterfly sum over the warp: afterwards every lane holds the same bits (each level adds the
/// same two values, and f32 addition is commutative). `tmp` is an f32 scratch register.
pub(crate) fn warp_sum(a: &mut Asm, reg: &str, tmp: &str) {
    for off in [16, 8, 4, 2, 1] {
        emit!(a, "shfl.sync.bfly.b32 {tmp}, {reg}, {off}, 31, -1;");
        emit!(a, "add.f32 {reg}, {reg}, {tmp};");
    }
}

/// The row loop: threads `tid, tid + nthr, ...` of a row of `len` elements (u32 registers or
/// immediates). When the predicate `vec` is true the row is walked in groups of 4 consecutive
/// elements (`body(a, col, 4)` with `col` the group's first column, a multiple of 4) and the
/// last `len % 4` elements one at a time; otherwise every element goes one at a time
/// (`body(a, col, 1)`). `name` makes the labels unique within the entry. Registers
/// `%{name}_g`, `%{name}_j`, `%{name}_n4` are declared here.
pub(crate) fn row_loop(
    a: &mut Asm,
    name: &str,
    vec: &str,
    tid: &str,
    nthr: &str,
    len: &str,
    body: &mut dyn FnMut(&mut Asm, &str, usize),
) {
    let g = format!("%{name}_g");
    let j = format!("%{name}_j");
    let n4 = format!("%{name}_n4");
    emit!(a, ".reg .b32 {g}, {j}, {n4};");
    emit!(a, "mov.u32 {j}, {tid};");
    emit!(a, "@!{vec} bra $L_{name}_scalar;");
    // Groups of 4: g indexes groups, column = 4 g.
    emit!(a, "shr.u32 {n4}, {len}, 2;");
    emit!(a, "mov.u32 {g}, {tid};");
    a.label(&format!("$L_{name}_vloop"));
    emit!(a, "setp.ge.u32 %pl, {g}, {n4};");
    emit!(a, "@%pl bra $L_{name}_vend;");
    let col = format!("%{name}_col");
    emit!(a, "{{");
    emit!(a, ".reg .b32 {col};");
    emit!(a, "shl.b32 {col}, {g}, 2;");
    body(a, &col, 4);
    emit!(a, "}}");
    emit!(a, "add.u32 {g}, {g}, {nthr};");
    emit!(a, "bra $L_{name}_vloop;");
    a.label(&format!("$L_{name}_vend"));
    // The tail starts after the last whole group.
    emit!(a, "shl.b32 {j}, {n4}, 2;");
    emit!(a, "add.u32 {j}, {j}, {tid};");
    a.label(&format!("$L_{name}_scalar"));
    emit!(a, "setp.ge.u32 %pl, {j}, {len};");
    emit!(a, "@%pl bra $L_{name}_send;");
    body(a, &j, 1);
    emit!(a, "add.u32 {j}, {j}, {nthr};");
    emit!(a, "bra $L_{name}_scalar;");
    a.label(&format!("$L_{name}_send"));
}

/// Sets the predicate `pred` when every u64 register in `ptrs` is a multiple of `align` bytes
/// and `len` (a u32 register) is a multiple of 4: the condition for [`row_loop`]'s vector path
/// over rows of `len` elements. `tmp64` is a u64 scratch register, `tmp32` a u32 one.
pub(crate) fn vec_ok(
    a: &mut Asm,
    pred: &str,
    ptrs: &[(&str, usize)],
    len: &str,
    tmp64: &str,
    tmp32: &str,
) {
    emit!(a, "and.b32 {tmp32}, {len}, 3;");
    emit!(a, "cvt.u64.u32 {tmp64}, {tmp32};");
    for (p, align) in ptrs {
        emit!(a, "{{");
        a.l(".reg .b64 %va;");
        emit!(a, "and.b64 %va, {p}, {};", align - 1);
        emit!(a, "or.b64 {tmp64}, {tmp64}, %va;");
        emit!(a, "}}");
    }
    emit!(a, "setp.eq.u64 {pred}, {tmp64}, 0;");
}

/// `dst = exp(x - m)` through `ex2((x - m) * log2(e))` (about 2 ulp). No guard for
/// `-inf - (-inf)`: softmax states start from `m = -FLT_MAX` ([`SOFTMAX_EMPTY_MAX`]) instead of
/// `-inf`, so `m` is always finite and `exp(-inf - m) = 0`.
pub(crate) fn exp_minus(a: &mut Asm, dst: &str, x: &str, m: &str) {
    emit!(a, "sub.f32 {dst}, {x}, {m};");
    emit!(a, "mul.f32 {dst}, {dst}, {};", f32_imm(LOG2E));
    emit!(a, "ex2.approx.f32 {dst}, {dst};");
}

/// The running max of an empty online softmax: `-FLT_MAX`, finite, so `exp(m - m')` never
/// meets `-inf - (-inf)`; an empty state `(-FLT_MAX, 0)` combines with anything as identity.
pub(crate) const SOFTMAX_EMPTY_MAX: f32 = f32::MIN;

/// Registers the online-softmax helpers below use.
pub(crate) fn softmax_regs(a: &mut Asm) {
    a.l(".reg .f32 %smx_mn, %smx_mg, %smx_ea, %smx_eb, %smx_mo, %smx_so;");
}

/// Online softmax: folds the values `xs` into the running `(m, s)` (max, sum of
/// `exp(x - m)`): `m' = max(m, max xs)`, `s = s exp(m - m') + sum exp(x - m')`. An empty state is
/// `(SOFTMAX_EMPTY_MAX, 0)`; `-inf` values contribute 0.
pub(crate) fn softmax_fold(a: &mut Asm, m: &str, s: &str, xs: &[String]) {
    emit!(a, "mov.f32 %smx_mg, {};", xs[0]);
    for x in &xs[1..] {
        emit!(a, "max.f32 %smx_mg, %smx_mg, {x};");
    }
    emit!(a, "max.f32 %smx_mn, {m}, %smx_mg;");
    exp_minus(a, "%smx_ea", m, "%smx_mn");
    emit!(a, "mul.f32 {s}, {s}, %smx_ea;");
    for x in xs {
        exp_minus(a, "%smx_eb", x, "%smx_mn");
        emit!(a, "add.f32 {s}, {s}, %smx_eb;");
    }
    emit!(a, "mov.f32 {m}, %smx_mn;");
}

/// Combines `(m, s)` with `(mo, so)`. Symmetric in its two operands bit for bit (the two
/// products are added, and addition commutes), so a butterfly leaves every lane equal.
pub(crate) fn softmax_combine(a: &mut Asm, m: &str, s: &str, mo: &str, so: &str) {
    emit!(a, "max.f32 %smx_mn, {m}, {mo};");
    exp_minus(a, "%smx_ea", m, "%smx_mn");
    exp_minus(a, "%smx_eb", mo, "%smx_mn");
    emit!(a, "mul.f32 %smx_ea, %smx_ea, {s};");
    emit!(a, "mul.f32 %smx_eb, %smx_eb, {so};");
    emit!(a, "add.f32 {s}, %smx_ea, %smx_eb;");
    emit!(a, "mov.f32 {m}, %smx_mn;");
}

/// Butterfly of [`softmax_combine`] over the warp.
pub(crate) fn softmax_warp(a: &mut Asm, m: &str, s: &str) {
    for off in [16, 8, 4, 2, 1] {
        emit!(a, "shfl.sync.bfly.b32 %smx_mo, {m}, {off}, 31, -1;");
        emit!(a, "shfl.sync.bfly.b32 %smx_so, {s}, {off}, 31, -1;");
        softmax_combine(a, m, s, "%smx_mo", "%smx_so");
    }
}

/// Like [`ld_at`] but only when the predicate `pred` holds (the registers keep undefined
/// values otherwise; callers select them away).
pub(crate) fn ld_at_if(a: &mut Asm, dt: Elem, dsts: &[String], pred: &str) {
    let mut b = Asm::default();
    ld_at(&mut b, dt, dsts, "");
    for line in b.s.lines() {
        let t = line.trim_start();
        if t.starts_with("ld.") {
            emit!(a, "@{pred} {t}");
        } else {
            a.l(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediates_are_exact_bit_patterns() {
        assert_eq!(f32_imm(1.0), "0f3F800000");
        assert_eq!(f32_imm(f32::NEG_INFINITY), "0fFF800000");
        assert_eq!(f64_imm(1.0), "0d3FF0000000000000");
    }

    #[test]
    fn row_loop_has_both_paths_and_unique_labels() {
        let mut a = Asm::default();
        row_loop(
            &mut a,
            "p1",
            "%pv",
            "%tid",
            "32",
            "%len",
            &mut |a, col, w| {
                emit!(a, "// body {col} {w}");
            },
        );
        assert!(a.s.contains("// body %p1_col 4"));
        assert!(a.s.contains("// body %p1_j 1"));
        assert_eq!(a.s.matches("$L_p1_vloop:").count(), 1);
        assert_eq!(a.s.matches("$L_p1_scalar:").count(), 1);
    }
}
