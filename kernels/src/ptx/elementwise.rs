//! The elementwise family: one template, many kernels (fill, scale, axpy, casts), each for
//! f32 / bf16 / f16 storage with f32 arithmetic.
//!
//! Shape of every kernel in the family:
//! - grid-stride loop over `n` elements, 256 threads a block;
//! - when every pointer is aligned to its vector width (16 B for f32, 8 B for 16-bit types) each
//!   thread moves 4 elements per iteration with one vector load/store per buffer, then the last
//!   `n % 4` elements go through the scalar loop; otherwise the whole range takes the scalar loop;
//! - loads convert to f32 exactly (bf16: shift into the high half; f16: `cvt.f32.f16`), the body
//!   computes in f32, the store rounds to the output type with round-to-nearest-even
//!   (`cvt.rn.bf16.f32` / `cvt.rn.f16.f32`), which keeps NaN a NaN and infinities infinite.
//!
//! Versions: v1 (this one). Aliasing: an output may be the same buffer as an input (in-place
//! scale, axpy into y), so loads do not use the non-coherent path.

use crate::desc::Elem;
use std::fmt::Write;

/// Where a pointer parameter sits and how it is used.
#[derive(Clone, Copy, Debug)]
pub struct PtrParam {
    pub name: &'static str,
    pub elem: Elem,
    /// Read by the kernel (its value is loaded into lane registers).
    pub read: bool,
    /// Written by the kernel (exactly one pointer is).
    pub write: bool,
}

/// One elementwise kernel.
pub struct Spec {
    pub entry: &'static str,
    /// Pointer parameters, in PTX order (before `n` and the scalars).
    pub ptrs: &'static [PtrParam],
    /// f32 scalar parameters after `n`.
    pub scalars: &'static [&'static str],
    /// The per-lane body: given the f32 registers of the read pointers (in `ptrs` order, only
    /// those with `read`), the scalar registers and the output register, returns PTX lines.
    pub body: fn(ins: &[String], scalars: &[String], out: &str) -> String,
}

const LANES: usize = 4;

fn log2_size(e: Elem) -> u32 {
    e.size().trailing_zeros()
}

fn is_16bit(e: Elem) -> bool {
    e.size() == 2
}

/// PTX lines converting the 16-bit register `h` holding `elem` into the f32 register `f`.
fn widen(elem: Elem, h: &str, f: &str, tmp: &str) -> String {
    match elem {
        Elem::BF16 => format!("\tmov.b32 {tmp}, {{%hz, {h}}};\n\tmov.b32 {f}, {tmp};\n"),
        Elem::F16 => format!("\tcvt.f32.f16 {f}, {h};\n"),
        _ => unreachable!("widen of a 32-bit type"),
    }
}

/// PTX lines rounding the f32 register `f` into the 16-bit register `h`.
fn narrow(elem: Elem, f: &str, h: &str) -> String {
    match elem {
        Elem::BF16 => format!("\tcvt.rn.bf16.f32 {h}, {f};\n"),
        Elem::F16 => format!("\tcvt.rn.f16.f32 {h}, {f};\n"),
        _ => unreachable!("narrow to a 32-bit type"),
    }
}

/// Writes one kernel of the family.
pub fn kernel(spec: &Spec) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "\n.visible .entry {}(", spec.entry);
    let mut params: Vec<String> = spec
        .ptrs
        .iter()
        .map(|p| format!("\t.param .u64 p_{}", p.name))
        .collect();
    params.push("\t.param .u64 p_n".to_string());
    for sc in spec.scalars {
        params.push(format!("\t.param .f32 p_{sc}"));
    }
    let _ = writeln!(w, "{}\n)\n{{", params.join(",\n"));
    let _ = writeln!(w, "\t.reg .pred %p<4>;");
    let _ = writeln!(w, "\t.reg .b32 %r<4>;");
    let _ = writeln!(w, "\t.reg .b64 %rd<12>;");
    let _ = writeln!(w, "\t.reg .b64 %ptr<{}>;", spec.ptrs.len());
    let _ = writeln!(w, "\t.reg .b64 %adr<{}>;", spec.ptrs.len());
    let _ = writeln!(w, "\t.reg .f32 %v<{}>;", spec.ptrs.len() * LANES);
    let _ = writeln!(w, "\t.reg .f32 %o<{LANES}>;");
    let _ = writeln!(w, "\t.reg .f32 %s<{}>;", spec.scalars.len().max(1));
    let _ = writeln!(w, "\t.reg .f32 %t<8>;");
    let _ = writeln!(w, "\t.reg .b16 %h<{LANES}>;");
    let _ = writeln!(w, "\t.reg .b16 %hz;");
    let _ = writeln!(w, "\t.reg .b32 %q<4>;");
    let _ = writeln!(w, "\t.reg .b32 %wt;");
    let _ = writeln!(w);
    for (i, p) in spec.ptrs.iter().enumerate() {
        let _ = writeln!(w, "\tld.param.u64 %ptr{i}, [p_{}];", p.name);
        let _ = writeln!(w, "\tcvta.to.global.u64 %ptr{i}, %ptr{i};");
    }
    let _ = writeln!(w, "\tld.param.u64 %rd0, [p_n];");
    for (j, sc) in spec.scalars.iter().enumerate() {
        let _ = writeln!(w, "\tld.param.f32 %s{j}, [p_{sc}];");
    }
    let _ = writeln!(w, "\tmov.b16 %hz, 0;");
    // gid = ctaid.x * ntid.x + tid.x (64-bit); stride = nctaid.x * ntid.x
    let _ = writeln!(w, "\tmov.u32 %r0, %ctaid.x;");
    let _ = writeln!(w, "\tmov.u32 %r1, %ntid.x;");
    let _ = writeln!(w, "\tmov.u32 %r2, %tid.x;");
    let _ = writeln!(w, "\tmov.u32 %r3, %nctaid.x;");
    let _ = writeln!(w, "\tmul.wide.u32 %rd1, %r0, %r1;");
    let _ = writeln!(w, "\tcvt.u64.u32 %rd2, %r2;");
    let _ = writeln!(w, "\tadd.u64 %rd1, %rd1, %rd2;");
    let _ = writeln!(w, "\tmul.wide.u32 %rd2, %r3, %r1;");
    // Alignment of every pointer to its vector width.
    let _ = writeln!(w, "\tmov.u64 %rd3, 0;");
    for (i, p) in spec.ptrs.iter().enumerate() {
        let mask = p.elem.size() * LANES - 1;
        let _ = writeln!(w, "\tand.b64 %rd4, %ptr{i}, {mask};");
        let _ = writeln!(w, "\tor.b64 %rd3, %rd3, %rd4;");
    }
    let _ = writeln!(w, "\tmov.u64 %rd5, %rd1;");
    let _ = writeln!(w, "\tsetp.ne.u64 %p0, %rd3, 0;");
    let _ = writeln!(w, "\t@%p0 bra $SCALAR;");
    // Vector loop.
    let _ = writeln!(w, "\tshr.u64 %rd6, %rd0, 2;");
    let _ = writeln!(w, "\tmov.u64 %rd7, %rd1;");
    let _ = writeln!(w, "$VLOOP:");
    let _ = writeln!(w, "\tsetp.ge.u64 %p1, %rd7, %rd6;");
    let _ = writeln!(w, "\t@%p1 bra $VEND;");
    for (i, p) in spec.ptrs.iter().enumerate() {
        let shift = log2_size(p.elem) + 2;
        let _ = writeln!(w, "\tshl.b64 %rd8, %rd7, {shift};");
        let _ = writeln!(w, "\tadd.u64 %adr{i}, %ptr{i}, %rd8;");
    }
    let mut ins = Vec::new();
    for (i, p) in spec.ptrs.iter().enumerate() {
        if !p.read {
            continue;
        }
        let v = |l: usize| format!("%v{}", i * LANES + l);
        if is_16bit(p.elem) {
            let _ = writeln!(w, "\tld.global.v2.b32 {{%q0, %q1}}, [%adr{i}];");
            let _ = writeln!(w, "\tmov.b32 {{%h0, %h1}}, %q0;");
            let _ = writeln!(w, "\tmov.b32 {{%h2, %h3}}, %q1;");
            for l in 0..LANES {
                w.push_str(&widen(p.elem, &format!("%h{l}"), &v(l), "%wt"));
            }
        } else {
            let _ = writeln!(
                w,
                "\tld.global.v4.f32 {{{}, {}, {}, {}}}, [%adr{i}];",
                v(0),
                v(1),
                v(2),
                v(3)
            );
        }
        ins.push(i);
    }
    let scalars: Vec<String> = (0..spec.scalars.len()).map(|j| format!("%s{j}")).collect();
    for l in 0..LANES {
        let lane_ins: Vec<String> = ins.iter().map(|i| format!("%v{}", i * LANES + l)).collect();
        w.push_str(&(spec.body)(&lane_ins, &scalars, &format!("%o{l}")));
    }
    let (oi, op) = output(spec);
    if is_16bit(op.elem) {
        for l in 0..LANES {
            w.push_str(&narrow(op.elem, &format!("%o{l}"), &format!("%h{l}")));
        }
        let _ = writeln!(w, "\tmov.b32 %q0, {{%h0, %h1}};");
        let _ = writeln!(w, "\tmov.b32 %q1, {{%h2, %h3}};");
        let _ = writeln!(w, "\tst.global.v2.b32 [%adr{oi}], {{%q0, %q1}};");
    } else {
        let _ = writeln!(w, "\tst.global.v4.f32 [%adr{oi}], {{%o0, %o1, %o2, %o3}};");
    }
    let _ = writeln!(w, "\tadd.u64 %rd7, %rd7, %rd2;");
    let _ = writeln!(w, "\tbra.uni $VLOOP;");
    let _ = writeln!(w, "$VEND:");
    // The tail starts right after the vector part.
    let _ = writeln!(w, "\tshl.b64 %rd5, %rd6, 2;");
    let _ = writeln!(w, "\tadd.u64 %rd5, %rd5, %rd1;");
    // Scalar loop.
    let _ = writeln!(w, "$SCALAR:");
    let _ = writeln!(w, "\tsetp.ge.u64 %p2, %rd5, %rd0;");
    let _ = writeln!(w, "\t@%p2 bra $DONE;");
    for (i, p) in spec.ptrs.iter().enumerate() {
        let _ = writeln!(w, "\tshl.b64 %rd8, %rd5, {};", log2_size(p.elem));
        let _ = writeln!(w, "\tadd.u64 %adr{i}, %ptr{i}, %rd8;");
    }
    for &i in &ins {
        let p = spec.ptrs[i];
        let v = format!("%v{}", i * LANES);
        if is_16bit(p.elem) {
            let _ = writeln!(w, "\tld.global.b16 %h0, [%adr{i}];");
            w.push_str(&widen(p.elem, "%h0", &v, "%wt"));
        } else {
            let _ = writeln!(w, "\tld.global.f32 {v}, [%adr{i}];");
        }
    }
    let lane_ins: Vec<String> = ins.iter().map(|i| format!("%v{}", i * LANES)).collect();
    w.push_str(&(spec.body)(&lane_ins, &scalars, "%o0"));
    if is_16bit(op.elem) {
        w.push_str(&narrow(op.elem, "%o0", "%h0"));
        let _ = writeln!(w, "\tst.global.b16 [%adr{oi}], %h0;");
    } else {
        let _ = writeln!(w, "\tst.global.f32 [%adr{oi}], %o0;");
    }
    let _ = writeln!(w, "\tadd.u64 %rd5, %rd5, %rd2;");
    let _ = writeln!(w, "\tbra.uni $SCALAR;");
    let _ = writeln!(w, "$DONE:");
    let _ = writeln!(w, "\tret;");
    let _ = writeln!(w, "}}");
    s
}

fn output(spec: &Spec) -> (usize, PtrParam) {
    let mut outs = spec.ptrs.iter().enumerate().filter(|(_, p)| p.write);
    let (i, p) = outs
        .next()
        .unwrap_or_else(|| panic!("{}: no output pointer", spec.entry));
    assert!(outs.next().is_none(), "{}: two output pointers", spec.entry);
    (i, *p)
}
