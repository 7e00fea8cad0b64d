//! Decoding of conversions and memory instructions (`cvt`, `cvta`, `ld`, `st`).

use crate::decode::parse_ty;
use crate::decode_inst::Ctx;
use crate::error::SimError;
use crate::ir::*;
use crate::parse::{Instr, Operand, parse_err};

type R<T> = Result<T, SimError>;

fn bad(ctx: &Ctx, ins: &Instr) -> SimError {
    crate::decode::unsupported(ctx.line, format!("`{}`", ins.opcode))
}

pub(crate) fn cvt(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<Op> {
    let n = mods.len();
    if n < 2 {
        return Err(bad(ctx, ins));
    }
    let (dname, sname) = (mods[n - 2], mods[n - 1]);
    let rest = &mods[..n - 2];
    if dname == "bf16x2" || dname == "f16x2" {
        let relu = match rest {
            ["rn"] => false,
            ["rn", "relu"] => true,
            _ => return Err(bad(ctx, ins)),
        };
        if sname != "f32" || ins.operands.len() != 3 {
            return Err(bad(ctx, ins));
        }
        return Ok(Op::CvtPack {
            bf16: dname == "bf16x2",
            relu,
            d: ctx_dst(ctx, &ins.operands[0])?,
            a: ctx_src(ctx, &ins.operands[1], Ty::F32)?,
            b: ctx_src(ctx, &ins.operands[2], Ty::F32)?,
        });
    }
    if ins.operands.len() != 2 {
        return Err(parse_err(ins.line, "`cvt` takes 2 operands"));
    }
    let dty = parse_ty(dname)
        .filter(|t| *t != Ty::Pred)
        .ok_or_else(|| bad(ctx, ins))?;
    let sty = parse_ty(sname)
        .filter(|t| *t != Ty::Pred)
        .ok_or_else(|| bad(ctx, ins))?;
    let mut rnd = None;
    let mut int_rnd = false;
    let mut sat = false;
    let mut ftz = false;
    for m in rest {
        match *m {
            "rn" | "rz" | "rm" | "rp" => {
                rnd = Some(*m);
            }
            "rni" | "rzi" | "rmi" | "rpi" => {
                rnd = Some(&m[..2]);
                int_rnd = true;
            }
            "sat" => sat = true,
            "ftz" if dty == Ty::F32 || sty == Ty::F32 => ftz = true,
            _ => return Err(bad(ctx, ins)),
        }
    }
    let r = match rnd {
        None | Some("rn") => Rnd::Rn,
        Some("rz") => Rnd::Rz,
        Some("rm") => Rnd::Rm,
        _ => Rnd::Rp,
    };
    let (df, sf) = (dty.is_float(), sty.is_float());
    // PTX requires a rounding mode exactly where a conversion can round.
    let narrowing_float = df && sf && dty.bits() < sty.bits();
    let needs_frnd = (df && !sf) || narrowing_float;
    let needs_irnd = !df && sf;
    if needs_frnd && (rnd.is_none() || int_rnd) {
        return Err(parse_err(
            ins.line,
            format!("`{}` needs a rounding mode", ins.opcode),
        ));
    }
    if needs_irnd && !int_rnd {
        return Err(parse_err(
            ins.line,
            format!("`{}` needs `.rni/.rzi/.rmi/.rpi`", ins.opcode),
        ));
    }
    if df && sf && dty.bits() == sty.bits() && dty != sty {
        return Err(bad(ctx, ins));
    }
    if df && sf && dty.bits() > sty.bits() && rnd.is_some() && !int_rnd {
        return Err(bad(ctx, ins));
    }
    if !df && !sf && rnd.is_some() {
        return Err(bad(ctx, ins));
    }
    if int_rnd && !(sf && (!df || dty == sty)) {
        return Err(bad(ctx, ins));
    }
    // Directed rounding into a float from a source f64 cannot hold exactly is not implemented.
    if df && r != Rnd::Rn && !int_rnd && matches!(sty, Ty::U(64) | Ty::S(64) | Ty::B(64)) {
        return Err(bad(ctx, ins));
    }
    // Directed rounding to f16/bf16 is not implemented.
    if matches!(dty, Ty::F16 | Ty::Bf16) && r != Rnd::Rn {
        return Err(bad(ctx, ins));
    }
    Ok(Op::Cvt {
        dty,
        sty,
        rnd: r,
        int_rnd,
        sat,
        ftz,
        d: ctx_dst(ctx, &ins.operands[0])?,
        a: ctx_src(ctx, &ins.operands[1], sty)?,
    })
}

fn ctx_dst(ctx: &mut Ctx, o: &Operand) -> R<Slot> {
    ctx.dst(o)
}

fn ctx_src(ctx: &mut Ctx, o: &Operand, ty: Ty) -> R<Src> {
    ctx.src(o, ty)
}

pub(crate) fn cvta(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<Op> {
    if ins.operands.len() != 2 {
        return Err(parse_err(ins.line, "`cvta` takes 2 operands"));
    }
    let (to, sp, ty) = match mods {
        ["to", sp, ty] => (true, *sp, *ty),
        [sp, ty] => (false, *sp, *ty),
        _ => return Err(bad(ctx, ins)),
    };
    if ty != "u64" {
        return Err(bad(ctx, ins));
    }
    let space = match sp {
        "global" => Space::Global,
        "shared" | "shared::cta" => Space::Shared,
        "param" | "param::entry" => Space::Param,
        _ => return Err(bad(ctx, ins)),
    };
    Ok(Op::Cvta {
        to_generic: !to,
        space,
        d: ctx_dst(ctx, &ins.operands[0])?,
        a: ctx_src(ctx, &ins.operands[1], Ty::U(64))?,
    })
}

/// Memory-space and cache modifiers of `ld`/`st`; returns the space, vector width and type.
pub(crate) fn ld_st(ctx: &mut Ctx, ins: &Instr, base: &str, mods: &[&str]) -> R<(Op, Class)> {
    let mut space = Space::Generic;
    let mut vec = 1u8;
    let mut ty = None;
    for (i, m) in mods.iter().enumerate() {
        match *m {
            "global" => space = Space::Global,
            "shared" | "shared::cta" => space = Space::Shared,
            "param" | "param::entry" if base == "ld" => space = Space::Param,
            "ca"
            | "cg"
            | "cs"
            | "lu"
            | "cv"
            | "wb"
            | "wt"
            | "nc"
            | "volatile"
            | "L2::64B"
            | "L2::128B"
            | "L2::256B"
            | "L1::evict_normal"
            | "L1::evict_unchanged"
            | "L1::evict_first"
            | "L1::evict_last"
            | "L1::no_allocate" => {}
            "v2" => vec = 2,
            "v4" => vec = 4,
            t if i == mods.len() - 1 => ty = parse_ty(t),
            _ => return Err(bad(ctx, ins)),
        }
    }
    let ty = ty.filter(|t| *t != Ty::Pred).ok_or_else(|| bad(ctx, ins))?;
    let size = (ty.bits() / 8) as u8;
    if size as u32 * vec as u32 > 16 {
        return Err(bad(ctx, ins));
    }
    if ins.operands.len() != 2 {
        return Err(parse_err(
            ins.line,
            format!("`{}` takes 2 operands", ins.opcode),
        ));
    }
    let class = match space {
        Space::Global | Space::Generic => Class::GlobalMem,
        Space::Shared => Class::SharedMem,
        Space::Param => Class::ParamMem,
    };
    let signed = matches!(ty, Ty::S(_));
    if base == "ld" {
        let ds = match &ins.operands[0] {
            Operand::Vec(v) => v
                .iter()
                .map(|x| match x {
                    Operand::Sink => Ok(None),
                    o => ctx_dst(ctx, o).map(Some),
                })
                .collect::<R<Vec<_>>>()?,
            o => vec![Some(ctx_dst(ctx, o)?)],
        };
        if ds.len() != vec as usize || (vec > 1) != matches!(ins.operands[0], Operand::Vec(_)) {
            return Err(parse_err(ins.line, "vector width and register list differ"));
        }
        let addr = ctx.addr(&ins.operands[1])?;
        Ok((
            Op::Ld {
                space,
                size,
                signed,
                ds,
                addr,
            },
            class,
        ))
    } else {
        let addr = ctx.addr(&ins.operands[0])?;
        let vals = match &ins.operands[1] {
            Operand::Vec(v) => v
                .iter()
                .map(|x| ctx_src(ctx, x, ty))
                .collect::<R<Vec<_>>>()?,
            o => vec![ctx_src(ctx, o, ty)?],
        };
        if vals.len() != vec as usize || (vec > 1) != matches!(ins.operands[1], Operand::Vec(_)) {
            return Err(parse_err(ins.line, "vector width and register list differ"));
        }
        Ok((
            Op::St {
                space,
                size,
                vals,
                addr,
            },
            class,
        ))
    }
}
