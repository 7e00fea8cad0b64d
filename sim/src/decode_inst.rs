//! One PTX instruction statement to one decoded [`Inst`]. Every opcode modifier is either
//! understood or rejected as `Unsupported`, so an accepted form is one the executor implements.

use crate::decode::{parse_ty, special, unsupported};
use crate::error::SimError;
use crate::ir::*;
use crate::parse::{Instr, Operand, parse_err, parse_float, parse_int};
use std::collections::HashMap;

/// Per-entry symbol tables used while decoding its instructions.
pub(crate) struct Ctx {
    pub(crate) regs: HashMap<String, Slot>,
    pub(crate) slot_bits: Vec<u8>,
    pub(crate) specials: Vec<(Slot, Special)>,
    pub(crate) special_slots: HashMap<String, Slot>,
    /// Shared variables: name to shared-window offset.
    pub(crate) shared: HashMap<String, u32>,
    /// Parameters: name to parameter-buffer offset.
    pub(crate) params: HashMap<String, u32>,
    pub(crate) labels: HashMap<String, u32>,
    /// Branches to labels not seen yet: (instruction index, label, line).
    pub(crate) fixups: Vec<(u32, String, u32)>,
    /// Index of the instruction being decoded.
    pub(crate) ninstrs: u32,
    pub(crate) line: u32,
}

type R<T> = Result<T, SimError>;

impl Ctx {
    pub(crate) fn err(&self, msg: impl Into<String>) -> SimError {
        unsupported(self.line, msg)
    }
    pub(crate) fn perr(&self, msg: impl Into<String>) -> SimError {
        parse_err(self.line, msg)
    }

    /// A register (or special register) by name, as a slot.
    pub(crate) fn slot(&mut self, name: &str) -> R<Slot> {
        if let Some(s) = self.regs.get(name) {
            return Ok(*s);
        }
        if let Some(s) = self.special_slots.get(name) {
            return Ok(*s);
        }
        if let Some(sp) = special(name) {
            let s = self.slot_bits.len() as Slot;
            self.slot_bits.push(32);
            self.specials.push((s, sp));
            self.special_slots.insert(name.to_string(), s);
            return Ok(s);
        }
        if name.starts_with('%') {
            return Err(self.perr(format!("undeclared register `{name}`")));
        }
        Err(self.perr(format!("expected a register, found `{name}`")))
    }

    /// A destination register.
    pub(crate) fn dst(&mut self, o: &Operand) -> R<Slot> {
        match o {
            Operand::Name(n) if self.regs.contains_key(n.as_str()) => self.slot(n),
            Operand::Name(n) if special(n).is_some() => {
                Err(self.perr(format!("special register `{n}` is read-only")))
            }
            Operand::Name(n) => self.slot(n),
            _ => Err(self.perr("expected a destination register")),
        }
    }

    /// A destination register or `_`.
    pub(crate) fn dst_opt(&mut self, o: &Operand) -> R<Option<Slot>> {
        match o {
            Operand::Sink => Ok(None),
            _ => self.dst(o).map(Some),
        }
    }

    /// A source operand of type `ty` (immediates converted to it).
    pub(crate) fn src(&mut self, o: &Operand, ty: Ty) -> R<Src> {
        match o {
            Operand::Name(n) => {
                if let Some(off) = self.shared.get(n.as_str()) {
                    return Ok(Src::Imm(*off as u64));
                }
                if let Some(off) = self.params.get(n.as_str()) {
                    return Ok(Src::Imm(*off as u64));
                }
                Ok(Src::Reg(self.slot(n)?))
            }
            Operand::Num(w) => Ok(Src::Imm(self.imm(w, ty)?)),
            _ => Err(self.perr("expected a register or an immediate")),
        }
    }

    pub(crate) fn imm(&self, w: &str, ty: Ty) -> R<u64> {
        let bad = || self.perr(format!("bad immediate `{w}`"));
        Ok(match ty {
            Ty::F32 => (parse_float(w).ok_or_else(bad)? as f32).to_bits() as u64,
            Ty::F64 => parse_float(w).ok_or_else(bad)?.to_bits(),
            Ty::F16 | Ty::Bf16 => return Err(self.err("16-bit float immediates")),
            Ty::Pred => u64::from(parse_int(w).ok_or_else(bad)? != 0),
            t => {
                // A bit-type move may take an f32/f64 literal.
                let v = if w.contains("0f") || w.contains("0F") {
                    (parse_float(w).ok_or_else(bad)? as f32).to_bits() as u64
                } else if w.contains("0d") || w.contains("0D") {
                    parse_float(w).ok_or_else(bad)?.to_bits()
                } else {
                    parse_int(w).ok_or_else(bad)?
                };
                let b = t.bits();
                if b < 64 { v & ((1u64 << b) - 1) } else { v }
            }
        })
    }

    /// A predicate source: a register.
    pub(crate) fn pred(&mut self, o: &Operand) -> R<Slot> {
        match o {
            Operand::Name(n) => self.slot(n),
            _ => Err(self.perr("expected a predicate register")),
        }
    }

    /// An address operand.
    pub(crate) fn addr(&mut self, o: &Operand) -> R<Addr> {
        let Operand::Addr {
            base,
            offset,
            coords,
        } = o
        else {
            return Err(self.perr("expected an address `[..]`"));
        };
        if !coords.is_empty() {
            return Err(self.perr("unexpected coordinates in an address"));
        }
        let mut a = Addr {
            base: None,
            offset: *offset,
        };
        if let Some(b) = base {
            if let Some(off) = self.shared.get(b.as_str()) {
                a.offset = a.offset.wrapping_add(*off as i64);
            } else if let Some(off) = self.params.get(b.as_str()) {
                a.offset = a.offset.wrapping_add(*off as i64);
            } else {
                a.base = Some(self.slot(b)?);
            }
        }
        Ok(a)
    }

    /// A brace list of destination registers.
    pub(crate) fn dst_list(&mut self, o: &Operand) -> R<Vec<Option<Slot>>> {
        match o {
            Operand::Vec(v) => v.iter().map(|x| self.dst_opt(x)).collect(),
            _ => Err(self.perr("expected `{registers}`")),
        }
    }

    pub(crate) fn src_list(&mut self, o: &Operand, ty: Ty) -> R<Vec<Src>> {
        match o {
            Operand::Vec(v) => v.iter().map(|x| self.src(x, ty)).collect(),
            _ => Err(self.perr("expected `{registers}`")),
        }
    }
}

/// Splits `name.a.b.c` into the name and its modifiers.
fn split(op: &str) -> (&str, Vec<&str>) {
    let mut it = op.split('.');
    let base = it.next().unwrap_or("");
    (base, it.collect())
}

/// The operand count check.
fn want(ins: &Instr, n: usize) -> R<()> {
    if ins.operands.len() == n {
        Ok(())
    } else {
        Err(parse_err(
            ins.line,
            format!(
                "`{}` takes {n} operands, found {}",
                ins.opcode,
                ins.operands.len()
            ),
        ))
    }
}

fn int_bits(t: Ty) -> Option<(u8, bool)> {
    match t {
        Ty::U(b) | Ty::B(b) => Some((b, false)),
        Ty::S(b) => Some((b, true)),
        _ => None,
    }
}

fn fty(t: Ty) -> Option<FTy> {
    match t {
        Ty::F32 => Some(FTy::F32),
        Ty::F64 => Some(FTy::F64),
        _ => None,
    }
}

/// Modifier flags shared by float arithmetic: rounding (only `.rn` or none), `.ftz`, `.sat`,
/// `.approx`/`.full` (computed exactly, which is within every documented error bound).
struct FMods {
    ftz: bool,
    sat: bool,
}

fn fmods(ctx: &Ctx, mods: &[&str], allow_approx: bool) -> R<FMods> {
    let mut f = FMods {
        ftz: false,
        sat: false,
    };
    for m in mods {
        match *m {
            "rn" => {}
            "ftz" => f.ftz = true,
            "sat" => f.sat = true,
            "approx" | "full" if allow_approx => {}
            "rz" | "rm" | "rp" => {
                return Err(ctx.err(format!("float arithmetic rounding `.{m}` (only `.rn`)")));
            }
            _ => return Err(ctx.err(format!("modifier `.{m}`"))),
        }
    }
    Ok(f)
}

fn class_of(base: &str) -> Class {
    match base {
        "bra" | "ret" | "exit" | "trap" => Class::Control,
        "cvt" | "cvta" => Class::Convert,
        "bar" | "barrier" | "shfl" | "vote" | "elect" | "activemask" | "mbarrier" | "fence"
        | "membar" | "setmaxnreg" => Class::Sync,
        "mma" | "ldmatrix" | "wgmma" => Class::Tensor,
        "atom" | "red" => Class::GlobalMem,
        "cp" => Class::AsyncCopy,
        _ => Class::Int,
    }
}

/// Decodes one instruction.
pub(crate) fn decode_instr(ctx: &mut Ctx, ins: &Instr) -> R<Inst> {
    let (base, mods) = split(&ins.opcode);
    let guard = match &ins.guard {
        Some((neg, p)) => Some((ctx.slot(p)?, *neg)),
        None => None,
    };
    let mut class = class_of(base);
    let mut aligned = false;
    if let Some(h) = crate::decode_half::half(ctx, ins, base, &mods) {
        return Ok(Inst {
            op: h?,
            guard,
            class: Class::Fp,
            aligned: false,
            line: ins.line,
        });
    }
    let op = match base {
        "add" | "sub" | "mul" | "min" | "max" | "div" | "rem" | "and" | "or" | "xor" | "shl"
        | "shr" => {
            let (op, c) = arith(ctx, ins, base, &mods)?;
            class = c;
            op
        }
        "mad" | "fma" => {
            let (op, c) = mad(ctx, ins, base, &mods)?;
            class = c;
            op
        }
        "not" | "cnot" | "neg" | "abs" | "popc" | "clz" | "brev" => {
            let (op, c) = unary(ctx, ins, base, &mods)?;
            class = c;
            op
        }
        "rcp" | "sqrt" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
            want(ins, 2)?;
            let ty = mods
                .last()
                .and_then(|t| parse_ty(t))
                .and_then(fty)
                .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
            let f = fmods(ctx, &mods[..mods.len() - 1], true)?;
            let approx = mods.contains(&"approx");
            let op = match base {
                "rcp" => FUnOp::Rcp,
                "sqrt" => FUnOp::Sqrt,
                "rsqrt" => FUnOp::Rsqrt,
                "ex2" => FUnOp::Ex2,
                "lg2" => FUnOp::Lg2,
                "sin" => FUnOp::Sin,
                "cos" => FUnOp::Cos,
                _ => FUnOp::Tanh,
            };
            let needs_approx = !matches!(op, FUnOp::Rcp | FUnOp::Sqrt);
            if f.sat || (!approx && (needs_approx || !mods.contains(&"rn"))) {
                return Err(ctx.err(format!("`{}`", ins.opcode)));
            }
            class = if approx { Class::Sfu } else { Class::Fp };
            Op::FUn {
                op,
                ty,
                ftz: f.ftz,
                d: ctx.dst(&ins.operands[0])?,
                a: ctx.src(&ins.operands[1], ty_of(ty))?,
            }
        }
        "setp" => {
            class = Class::Int;
            setp(ctx, ins, &mods, &mut class)?
        }
        "selp" => {
            want(ins, 4)?;
            let ty = mods
                .first()
                .and_then(|t| parse_ty(t))
                .filter(|_| mods.len() == 1)
                .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
            if ty.is_float() {
                class = Class::Fp;
            }
            Op::Selp {
                d: ctx.dst(&ins.operands[0])?,
                a: ctx.src(&ins.operands[1], ty)?,
                b: ctx.src(&ins.operands[2], ty)?,
                c: ctx.pred(&ins.operands[3])?,
            }
        }
        "testp" => {
            want(ins, 2)?;
            if mods.len() != 2 {
                return Err(ctx.err(format!("`{}`", ins.opcode)));
            }
            let p = match mods[0] {
                "finite" => TestP::Finite,
                "infinite" => TestP::Infinite,
                "number" => TestP::Number,
                "notanumber" => TestP::NotANumber,
                "normal" => TestP::Normal,
                "subnormal" => TestP::Subnormal,
                m => return Err(ctx.err(format!("testp `.{m}`"))),
            };
            let ty = parse_ty(mods[1])
                .and_then(fty)
                .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
            class = Class::Fp;
            Op::Testp {
                p,
                ty,
                d: ctx.dst(&ins.operands[0])?,
                a: ctx.src(&ins.operands[1], ty_of(ty))?,
            }
        }
        "mov" => mov(ctx, ins, &mods)?,
        "cvt" => crate::decode_mem::cvt(ctx, ins, &mods)?,
        "cvta" => crate::decode_mem::cvta(ctx, ins, &mods)?,
        "ld" | "st" => {
            let (op, c) = crate::decode_mem::ld_st(ctx, ins, base, &mods)?;
            class = c;
            op
        }
        "bra" => {
            want(ins, 1)?;
            if !mods.iter().all(|m| *m == "uni") {
                return Err(ctx.err(format!("`{}`", ins.opcode)));
            }
            let Operand::Name(l) = &ins.operands[0] else {
                return Err(ctx.perr("branch target must be a label"));
            };
            let target = match ctx.labels.get(l.as_str()) {
                Some(t) => *t,
                None => {
                    ctx.fixups.push((ctx.ninstrs, l.clone(), ctx.line));
                    0
                }
            };
            Op::Bra { target }
        }
        "ret" | "exit" => {
            want(ins, 0)?;
            if !mods.iter().all(|m| *m == "uni") {
                return Err(ctx.err(format!("`{}`", ins.opcode)));
            }
            Op::Exit
        }
        "trap" => {
            want(ins, 0)?;
            Op::Trap
        }
        _ => {
            let (op, al) = crate::decode_sync::decode_sync(ctx, ins, base, &mods)?;
            aligned = al;
            op
        }
    };
    if matches!(
        op,
        Op::Shfl { .. } | Op::Mma { .. } | Op::Ldmatrix { .. } | Op::Bar { arrive: false, .. }
    ) {
        aligned = true;
    }
    if let Op::Mov { a: Src::Reg(_), .. } = op {
        class = Class::Int;
    }
    Ok(Inst {
        op,
        guard,
        class,
        aligned,
        line: ins.line,
    })
}

pub(crate) fn ty_of(t: FTy) -> Ty {
    match t {
        FTy::F32 => Ty::F32,
        FTy::F64 => Ty::F64,
    }
}

fn arith(ctx: &mut Ctx, ins: &Instr, base: &str, mods: &[&str]) -> R<(Op, Class)> {
    want(ins, 3)?;
    let tyname = mods.last().copied().unwrap_or("");
    let ty = parse_ty(tyname).ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let mut rest = &mods[..mods.len().saturating_sub(1)];
    if let Some(ft) = fty(ty) {
        let nan = rest.first() == Some(&"NaN");
        if nan {
            rest = &rest[1..];
        }
        let op = match (base, nan) {
            ("min", true) => FOp::MinNan,
            ("max", true) => FOp::MaxNan,
            (_, true) => return Err(ctx.err(format!("`{}`", ins.opcode))),
            _ => match base {
                "add" => FOp::Add,
                "sub" => FOp::Sub,
                "mul" => FOp::Mul,
                "div" => FOp::Div,
                "min" => FOp::Min,
                "max" => FOp::Max,
                _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
            },
        };
        if op == FOp::Div
            && ft == FTy::F32
            && !rest.iter().any(|m| matches!(*m, "rn" | "approx" | "full"))
        {
            return Err(ctx.err("`div.f32` needs `.rn`, `.approx` or `.full`"));
        }
        let f = fmods(ctx, rest, op == FOp::Div)?;
        if f.sat && ft == FTy::F64 {
            return Err(ctx.err("`.sat` on f64"));
        }
        let d = ctx.dst(&ins.operands[0])?;
        let a = ctx.src(&ins.operands[1], ty)?;
        let b = ctx.src(&ins.operands[2], ty)?;
        return Ok((
            Op::F {
                op,
                ty: ft,
                ftz: f.ftz,
                sat: f.sat,
                d,
                a,
                b,
            },
            Class::Fp,
        ));
    }
    if ty == Ty::Pred {
        let op = match (base, rest) {
            ("and", []) => BoolOp::And,
            ("or", []) => BoolOp::Or,
            ("xor", []) => BoolOp::Xor,
            _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
        };
        let d = ctx.dst(&ins.operands[0])?;
        let a = ctx.src(&ins.operands[1], ty)?;
        let b = ctx.src(&ins.operands[2], ty)?;
        return Ok((Op::PredBin { op, d, a, b }, Class::Int));
    }
    let (bits, signed) = int_bits(ty).ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let is_bit = matches!(ty, Ty::B(_));
    let d = ctx.dst(&ins.operands[0])?;
    let a = ctx.src(&ins.operands[1], ty)?;
    // Shift amounts are always .u32.
    let bty = if matches!(base, "shl" | "shr") {
        Ty::U(32)
    } else {
        ty
    };
    let b = ctx.src(&ins.operands[2], bty)?;
    if base == "mul" && rest == ["wide"] {
        if bits > 32 || is_bit {
            return Err(ctx.err(format!("`{}`", ins.opcode)));
        }
        return Ok((
            Op::MulWide {
                signed,
                bits,
                d,
                a,
                b,
            },
            Class::Int,
        ));
    }
    let op = match (base, rest) {
        ("add", []) => IntOp::Add,
        ("add", ["sat"]) if ty == Ty::S(32) => IntOp::AddSat,
        ("sub", []) => IntOp::Sub,
        ("sub", ["sat"]) if ty == Ty::S(32) => IntOp::SubSat,
        ("mul", ["lo"]) => IntOp::MulLo,
        ("mul", ["hi"]) => IntOp::MulHi,
        ("min", []) => IntOp::Min,
        ("max", []) => IntOp::Max,
        ("div", []) => IntOp::Div,
        ("rem", []) => IntOp::Rem,
        ("and", []) if is_bit => IntOp::And,
        ("or", []) if is_bit => IntOp::Or,
        ("xor", []) if is_bit => IntOp::Xor,
        ("shl", []) if is_bit => IntOp::Shl,
        ("shr", []) => IntOp::Shr,
        _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
    };
    if is_bit
        && !matches!(
            op,
            IntOp::And | IntOp::Or | IntOp::Xor | IntOp::Shl | IntOp::Shr
        )
    {
        return Err(ctx.err(format!("`{}` on a bit type", ins.opcode)));
    }
    if bits == 8 {
        return Err(ctx.err(format!("`{}` on 8-bit operands", ins.opcode)));
    }
    Ok((
        Op::Int {
            op,
            bits,
            signed,
            d,
            a,
            b,
        },
        Class::Int,
    ))
}

fn mad(ctx: &mut Ctx, ins: &Instr, base: &str, mods: &[&str]) -> R<(Op, Class)> {
    want(ins, 4)?;
    let ty = mods
        .last()
        .and_then(|t| parse_ty(t))
        .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let rest = &mods[..mods.len() - 1];
    if let Some(ft) = fty(ty) {
        if !rest.contains(&"rn") {
            return Err(ctx.err(format!("`{}` (only `.rn`)", ins.opcode)));
        }
        let f = fmods(ctx, rest, false)?;
        return Ok((
            Op::Fma {
                ty: ft,
                ftz: f.ftz,
                sat: f.sat,
                d: ctx.dst(&ins.operands[0])?,
                a: ctx.src(&ins.operands[1], ty)?,
                b: ctx.src(&ins.operands[2], ty)?,
                c: ctx.src(&ins.operands[3], ty)?,
            },
            Class::Fp,
        ));
    }
    let (bits, signed) = match ty {
        Ty::U(b) => (b, false),
        Ty::S(b) => (b, true),
        _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
    };
    if base != "mad" || bits < 16 {
        return Err(ctx.err(format!("`{}`", ins.opcode)));
    }
    let (hi, wide) = match rest {
        ["lo"] => (false, false),
        ["hi"] => (true, false),
        ["wide"] if bits <= 32 => (false, true),
        _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
    };
    let cty = if wide {
        if signed {
            Ty::S(bits * 2)
        } else {
            Ty::U(bits * 2)
        }
    } else {
        ty
    };
    Ok((
        Op::Mad {
            hi,
            wide,
            signed,
            bits,
            d: ctx.dst(&ins.operands[0])?,
            a: ctx.src(&ins.operands[1], ty)?,
            b: ctx.src(&ins.operands[2], ty)?,
            c: ctx.src(&ins.operands[3], cty)?,
        },
        Class::Int,
    ))
}

fn unary(ctx: &mut Ctx, ins: &Instr, base: &str, mods: &[&str]) -> R<(Op, Class)> {
    want(ins, 2)?;
    let ty = mods
        .last()
        .and_then(|t| parse_ty(t))
        .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let rest = &mods[..mods.len() - 1];
    if let Some(ft) = fty(ty) {
        let op = match base {
            "neg" => FUnOp::Neg,
            "abs" => FUnOp::Abs,
            _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
        };
        let f = fmods(ctx, rest, false)?;
        if f.sat || rest.contains(&"rn") {
            return Err(ctx.err(format!("`{}`", ins.opcode)));
        }
        return Ok((
            Op::FUn {
                op,
                ty: ft,
                ftz: f.ftz,
                d: ctx.dst(&ins.operands[0])?,
                a: ctx.src(&ins.operands[1], ty)?,
            },
            Class::Fp,
        ));
    }
    if !rest.is_empty() {
        return Err(ctx.err(format!("`{}`", ins.opcode)));
    }
    let d = ctx.dst(&ins.operands[0])?;
    let a = ctx.src(&ins.operands[1], ty)?;
    if ty == Ty::Pred {
        if base != "not" {
            return Err(ctx.err(format!("`{}`", ins.opcode)));
        }
        return Ok((
            Op::PredBin {
                op: BoolOp::Xor,
                d,
                a,
                b: Src::Imm(1),
            },
            Class::Int,
        ));
    }
    let (bits, signed) = int_bits(ty).ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let is_bit = matches!(ty, Ty::B(_));
    let op = match base {
        "not" if is_bit => IntUnOp::Not,
        "cnot" if is_bit => IntUnOp::Cnot,
        "popc" if is_bit && bits >= 32 => IntUnOp::Popc,
        "clz" if is_bit && bits >= 32 => IntUnOp::Clz,
        "brev" if is_bit && bits >= 32 => IntUnOp::Brev,
        "neg" if signed => IntUnOp::Neg,
        "abs" if signed => IntUnOp::Abs,
        _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
    };
    Ok((Op::IntUn { op, bits, d, a }, Class::Int))
}

fn setp(ctx: &mut Ctx, ins: &Instr, mods: &[&str], class: &mut Class) -> R<Op> {
    let (cmp_s, rest) = mods.split_first().ok_or_else(|| ctx.err("`setp`"))?;
    let cmp = match *cmp_s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" => Cmp::Lt,
        "le" => Cmp::Le,
        "gt" => Cmp::Gt,
        "ge" => Cmp::Ge,
        "lo" => Cmp::Lo,
        "ls" => Cmp::Ls,
        "hi" => Cmp::Hi,
        "hs" => Cmp::Hs,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        m => return Err(ctx.err(format!("comparison `.{m}`"))),
    };
    let mut rest = rest.to_vec();
    let ty = rest
        .pop()
        .and_then(parse_ty)
        .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let mut ftz = false;
    let mut bop = None;
    for m in rest {
        match m {
            "and" => bop = Some(BoolOp::And),
            "or" => bop = Some(BoolOp::Or),
            "xor" => bop = Some(BoolOp::Xor),
            "ftz" if ty == Ty::F32 => ftz = true,
            _ => return Err(ctx.err(format!("`{}`", ins.opcode))),
        }
    }
    if matches!(ty, Ty::F16 | Ty::Bf16 | Ty::Pred) || ty.bits() == 8 {
        return Err(ctx.err(format!("`{}`", ins.opcode)));
    }
    let float_cmp = matches!(
        cmp,
        Cmp::Equ | Cmp::Neu | Cmp::Ltu | Cmp::Leu | Cmp::Gtu | Cmp::Geu | Cmp::Num | Cmp::Nan
    );
    let uns_cmp = matches!(cmp, Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs);
    if (float_cmp && !ty.is_float()) || (uns_cmp && (ty.is_float() || matches!(ty, Ty::S(_)))) {
        return Err(ctx.err(format!("`{}`", ins.opcode)));
    }
    if matches!(ty, Ty::B(_)) && !matches!(cmp, Cmp::Eq | Cmp::Ne) {
        return Err(ctx.err(format!("`{}`", ins.opcode)));
    }
    if ty.is_float() {
        *class = Class::Fp;
    }
    want(ins, if bop.is_some() { 4 } else { 3 })?;
    let (d, d2) = match &ins.operands[0] {
        Operand::Pair(p, q) => (
            ctx.dst_opt(&Operand::Name(p.clone()))?,
            Some(ctx.dst(&Operand::Name(q.clone()))?),
        ),
        o => (ctx.dst_opt(o)?, None),
    };
    let a = ctx.src(&ins.operands[1], ty)?;
    let b = ctx.src(&ins.operands[2], ty)?;
    let comb = match bop {
        Some(op) => {
            let (neg, p) = match &ins.operands[3] {
                Operand::Not(p) => (true, p.clone()),
                Operand::Name(p) => (false, p.clone()),
                _ => return Err(ctx.perr("expected a predicate")),
            };
            Some((op, Src::Reg(ctx.slot(&p)?), neg))
        }
        None => None,
    };
    Ok(Op::Setp {
        cmp,
        ty,
        ftz,
        d,
        d2,
        a,
        b,
        comb,
    })
}

fn mov(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<Op> {
    want(ins, 2)?;
    let ty = match mods {
        [t] => parse_ty(t),
        _ => None,
    }
    .ok_or_else(|| ctx.err(format!("`{}`", ins.opcode)))?;
    let bits = ty.bits();
    match (&ins.operands[0], &ins.operands[1]) {
        (Operand::Vec(_), s) => {
            let ds = ctx.dst_list(&ins.operands[0])?;
            let n = ds.len() as u32;
            if !matches!(ty, Ty::B(32) | Ty::B(64)) || !(n == 2 || n == 4) || bits / n < 8 {
                return Err(ctx.err("this unpacking `mov`"));
            }
            let a = ctx.src(s, ty)?;
            Ok(Op::Unpack {
                ds,
                a,
                part: (bits / n) as u8,
            })
        }
        (d, Operand::Vec(_)) => {
            let n = match &ins.operands[1] {
                Operand::Vec(v) => v.len() as u32,
                _ => 0,
            };
            if !matches!(ty, Ty::B(32) | Ty::B(64)) || !(n == 2 || n == 4) || bits / n < 8 {
                return Err(ctx.err("this packing `mov`"));
            }
            let pty = Ty::B((bits / n) as u8);
            let parts = ctx.src_list(&ins.operands[1], pty)?;
            Ok(Op::Pack {
                d: ctx.dst(d)?,
                parts,
                part: (bits / n) as u8,
            })
        }
        (d, s) => Ok(Op::Mov {
            d: ctx.dst(d)?,
            a: ctx.src(s, ty)?,
        }),
    }
}
