//! Decoding of f16/bf16 arithmetic (`add/sub/mul/min/max/fma/neg/abs` on `.f16`, `.bf16`,
//! `.f16x2`, `.bf16x2`).

use crate::decode::unsupported;
use crate::decode_inst::Ctx;
use crate::error::SimError;
use crate::ir::*;
use crate::parse::{Instr, parse_err};

/// `None` when the instruction is not f16/bf16 arithmetic.
pub(crate) fn half(
    ctx: &mut Ctx,
    ins: &Instr,
    base: &str,
    mods: &[&str],
) -> Option<Result<Op, SimError>> {
    let (bf16, x2) = match *mods.last()? {
        "f16" => (false, false),
        "bf16" => (true, false),
        "f16x2" => (false, true),
        "bf16x2" => (true, true),
        _ => return None,
    };
    let op = match base {
        "add" => HOp::Add,
        "sub" => HOp::Sub,
        "mul" => HOp::Mul,
        "min" => HOp::Min,
        "max" => HOp::Max,
        "fma" => HOp::Fma,
        "neg" => HOp::Neg,
        "abs" => HOp::Abs,
        _ => return None,
    };
    Some(decode(ctx, ins, op, bf16, x2, &mods[..mods.len() - 1]))
}

fn decode(
    ctx: &mut Ctx,
    ins: &Instr,
    op: HOp,
    bf16: bool,
    x2: bool,
    rest: &[&str],
) -> Result<Op, SimError> {
    let bad = || unsupported(ins.line, format!("`{}`", ins.opcode));
    let (mut ftz, mut sat, mut rn) = (false, false, false);
    for m in rest {
        match *m {
            "rn" if !matches!(op, HOp::Min | HOp::Max | HOp::Neg | HOp::Abs) => rn = true,
            "ftz" if !bf16 => ftz = true,
            "sat" if !bf16 && matches!(op, HOp::Add | HOp::Sub | HOp::Mul | HOp::Fma) => sat = true,
            _ => return Err(bad()),
        }
    }
    if op == HOp::Fma && !rn {
        return Err(bad());
    }
    let n = match op {
        HOp::Neg | HOp::Abs => 2,
        HOp::Fma => 4,
        _ => 3,
    };
    if ins.operands.len() != n {
        return Err(parse_err(
            ins.line,
            format!("`{}` takes {n} operands", ins.opcode),
        ));
    }
    let t = if x2 { Ty::B(32) } else { Ty::B(16) };
    let d = ctx.dst(&ins.operands[0])?;
    let a = ctx.src(&ins.operands[1], t)?;
    let b = match ins.operands.get(2) {
        Some(o) => ctx.src(o, t)?,
        None => Src::Imm(0),
    };
    let c = match ins.operands.get(3) {
        Some(o) => ctx.src(o, t)?,
        None => Src::Imm(0),
    };
    Ok(Op::Half {
        op,
        bf16,
        x2,
        ftz,
        sat,
        d,
        a,
        b,
        c,
    })
}
