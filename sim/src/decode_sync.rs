//! Decoding of synchronisation, warp-collective, tensor-core and async-copy instructions.

use crate::decode::unsupported;
use crate::decode_inst::Ctx;
use crate::error::SimError;
use crate::ir::*;
use crate::parse::{Instr, Operand, parse_err, parse_int};

type R<T> = Result<T, SimError>;

fn bad(ins: &Instr) -> SimError {
    unsupported(ins.line, format!("`{}`", ins.opcode))
}

fn nops(ins: &Instr, n: usize) -> R<()> {
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

fn regs(ctx: &mut Ctx, o: &Operand, n: usize, ins: &Instr) -> R<Vec<Slot>> {
    let v = ctx.dst_list(o)?;
    if v.len() != n || v.iter().any(|x| x.is_none()) {
        return Err(parse_err(
            ins.line,
            format!("expected {n} registers in `{{..}}`"),
        ));
    }
    Ok(v.into_iter().flatten().collect())
}

fn is_shared(m: &str) -> bool {
    m == "shared" || m == "shared::cta"
}

/// Decodes the remaining opcodes; returns the op and whether it is warp-aligned.
pub(crate) fn decode_sync(ctx: &mut Ctx, ins: &Instr, base: &str, mods: &[&str]) -> R<(Op, bool)> {
    let u32t = Ty::U(32);
    match base {
        "bar" | "barrier" => {
            let mut m: Vec<&str> = mods.iter().copied().filter(|m| *m != "cta").collect();
            let aligned = base == "bar" || m.contains(&"aligned");
            m.retain(|x| *x != "aligned");
            if m == ["warp", "sync"] && base == "bar" {
                nops(ins, 1)?;
                return Ok((
                    Op::WarpSync {
                        mask: ctx.src(&ins.operands[0], Ty::B(32))?,
                    },
                    false,
                ));
            }
            let arrive = match m.as_slice() {
                ["sync"] => false,
                ["arrive"] => true,
                _ => return Err(bad(ins)),
            };
            if !aligned {
                return Err(unsupported(ins.line, "non-aligned `barrier.sync`"));
            }
            if ins.operands.is_empty()
                || ins.operands.len() > 2
                || (arrive && ins.operands.len() != 2)
            {
                return Err(parse_err(
                    ins.line,
                    format!("`{}`: wrong operand count", ins.opcode),
                ));
            }
            let id = ctx.src(&ins.operands[0], u32t)?;
            let count = match ins.operands.get(1) {
                Some(o) => Some(ctx.src(o, u32t)?),
                None => None,
            };
            Ok((Op::Bar { id, count, arrive }, !arrive))
        }
        "shfl" => {
            let mode = match mods {
                ["sync", m, "b32"] => match *m {
                    "up" => ShflMode::Up,
                    "down" => ShflMode::Down,
                    "bfly" => ShflMode::Bfly,
                    "idx" => ShflMode::Idx,
                    _ => return Err(bad(ins)),
                },
                _ => return Err(bad(ins)),
            };
            nops(ins, 5)?;
            let (d, p) = match &ins.operands[0] {
                Operand::Pair(a, b) => (
                    ctx.dst(&Operand::Name(a.clone()))?,
                    Some(ctx.dst(&Operand::Name(b.clone()))?),
                ),
                o => (ctx.dst(o)?, None),
            };
            Ok((
                Op::Shfl {
                    mode,
                    d,
                    p,
                    a: ctx.src(&ins.operands[1], Ty::B(32))?,
                    b: ctx.src(&ins.operands[2], u32t)?,
                    c: ctx.src(&ins.operands[3], u32t)?,
                    mask: ctx.src(&ins.operands[4], Ty::B(32))?,
                },
                true,
            ))
        }
        "cp" => cp(ctx, ins, mods),
        "ldmatrix" => {
            let mut num = 0;
            let mut trans = false;
            let mut shape = false;
            let mut sh = false;
            for m in mods {
                match *m {
                    "sync" | "aligned" => {}
                    "m8n8" => shape = true,
                    "x1" => num = 1,
                    "x2" => num = 2,
                    "x4" => num = 4,
                    "trans" => trans = true,
                    "b16" => {}
                    s if is_shared(s) => sh = true,
                    _ => return Err(bad(ins)),
                }
            }
            if num == 0 || !shape || !sh || mods.last() != Some(&"b16") {
                return Err(bad(ins));
            }
            nops(ins, 2)?;
            let ds = regs(ctx, &ins.operands[0], num as usize, ins)?;
            let addr = ctx.addr(&ins.operands[1])?;
            Ok((
                Op::Ldmatrix {
                    num,
                    trans,
                    ds,
                    addr,
                },
                true,
            ))
        }
        "mma" => {
            let (k, bf16) = match mods {
                ["sync", "aligned", shape, "row", "col", "f32", t1, t2, "f32"] if t1 == t2 => {
                    let k = match *shape {
                        "m16n8k16" => 16,
                        "m16n8k8" => 8,
                        _ => return Err(bad(ins)),
                    };
                    let bf = match *t1 {
                        "bf16" => true,
                        "f16" => false,
                        _ => return Err(bad(ins)),
                    };
                    (k, bf)
                }
                _ => return Err(bad(ins)),
            };
            nops(ins, 4)?;
            let d = regs(ctx, &ins.operands[0], 4, ins)?;
            let a = regs(ctx, &ins.operands[1], if k == 16 { 4 } else { 2 }, ins)?;
            let b = regs(ctx, &ins.operands[2], if k == 16 { 2 } else { 1 }, ins)?;
            let cs = ctx.src_list(&ins.operands[3], Ty::F32)?;
            if cs.len() != 4 {
                return Err(parse_err(ins.line, "expected 4 accumulator registers"));
            }
            Ok((
                Op::Mma {
                    k,
                    bf16,
                    d: [d[0], d[1], d[2], d[3]],
                    a,
                    b,
                    c: [cs[0], cs[1], cs[2], cs[3]],
                },
                true,
            ))
        }
        "mbarrier" => mbarrier(ctx, ins, mods).map(|o| (o, false)),
        "atom" | "red" => atom(ctx, ins, base == "atom", mods).map(|o| (o, false)),
        "vote" => {
            let mode = match mods {
                ["sync", "all", "pred"] => VoteMode::All,
                ["sync", "any", "pred"] => VoteMode::Any,
                ["sync", "uni", "pred"] => VoteMode::Uni,
                ["sync", "ballot", "b32"] => VoteMode::Ballot,
                _ => return Err(bad(ins)),
            };
            nops(ins, 3)?;
            let (neg, a) = match &ins.operands[1] {
                Operand::Not(p) => (true, ctx.slot(p)?),
                Operand::Name(p) => (false, ctx.slot(p)?),
                _ => return Err(parse_err(ins.line, "expected a predicate")),
            };
            Ok((
                Op::Vote {
                    mode,
                    d: ctx.dst(&ins.operands[0])?,
                    a,
                    neg,
                    mask: ctx.src(&ins.operands[2], Ty::B(32))?,
                },
                false,
            ))
        }
        "elect" => {
            if mods != ["sync"] {
                return Err(bad(ins));
            }
            nops(ins, 2)?;
            let (d, p) = match &ins.operands[0] {
                Operand::Pair(a, b) => (
                    ctx.dst_opt(&Operand::Name(a.clone()))?,
                    Some(ctx.dst(&Operand::Name(b.clone()))?),
                ),
                o => (ctx.dst_opt(o)?, None),
            };
            let mask = ctx.src(&ins.operands[1], Ty::B(32))?;
            Ok((Op::Elect { d, p, mask }, false))
        }
        "activemask" => {
            if mods != ["b32"] {
                return Err(bad(ins));
            }
            nops(ins, 1)?;
            Ok((
                Op::Activemask {
                    d: ctx.dst(&ins.operands[0])?,
                },
                false,
            ))
        }
        "prmt" => {
            if mods != ["b32"] {
                return Err(bad(ins));
            }
            nops(ins, 4)?;
            let t = Ty::B(32);
            Ok((
                Op::Prmt {
                    d: ctx.dst(&ins.operands[0])?,
                    a: ctx.src(&ins.operands[1], t)?,
                    b: ctx.src(&ins.operands[2], t)?,
                    c: ctx.src(&ins.operands[3], t)?,
                },
                false,
            ))
        }
        "bfe" | "bfi" => {
            let ty = match mods {
                [t] => crate::decode::parse_ty(t),
                _ => None,
            }
            .ok_or_else(|| bad(ins))?;
            let bits = ty.bits() as u8;
            let u = Ty::U(32);
            if base == "bfe" {
                let signed = match ty {
                    Ty::U(32 | 64) => false,
                    Ty::S(32 | 64) => true,
                    _ => return Err(bad(ins)),
                };
                nops(ins, 4)?;
                Ok((
                    Op::Bfe {
                        signed,
                        bits,
                        d: ctx.dst(&ins.operands[0])?,
                        a: ctx.src(&ins.operands[1], ty)?,
                        b: ctx.src(&ins.operands[2], u)?,
                        c: ctx.src(&ins.operands[3], u)?,
                    },
                    false,
                ))
            } else {
                if !matches!(ty, Ty::B(32 | 64)) {
                    return Err(bad(ins));
                }
                nops(ins, 5)?;
                Ok((
                    Op::Bfi {
                        bits,
                        d: ctx.dst(&ins.operands[0])?,
                        a: ctx.src(&ins.operands[1], ty)?,
                        b: ctx.src(&ins.operands[2], ty)?,
                        c: ctx.src(&ins.operands[3], u)?,
                        e: ctx.src(&ins.operands[4], u)?,
                    },
                    false,
                ))
            }
        }
        "fence" | "membar" => {
            if mods.is_empty() {
                return Err(bad(ins));
            }
            nops(ins, 0)?;
            if mods.contains(&"proxy") && mods.contains(&"async") {
                return Ok((Op::FenceProxyAsync, false));
            }
            Ok((Op::Fence, false))
        }
        "wgmma" => crate::decode_hopper::wgmma(ctx, ins, mods),
        "setmaxnreg" => {
            let inc = match mods {
                ["inc", "sync", "aligned", "u32"] => true,
                ["dec", "sync", "aligned", "u32"] => false,
                _ => return Err(bad(ins)),
            };
            nops(ins, 1)?;
            let n = match &ins.operands[0] {
                Operand::Num(w) => parse_int(w).and_then(|v| u32::try_from(v).ok()),
                _ => None,
            }
            .filter(|n| (24..=256).contains(n) && n % 8 == 0)
            .ok_or_else(|| parse_err(ins.line, "setmaxnreg takes a multiple of 8 in 24..=256"))?;
            Ok((Op::Setmaxnreg { inc, n }, true))
        }
        _ => Err(unsupported(
            ins.line,
            format!("instruction `{}`", ins.opcode),
        )),
    }
}

fn cp(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<(Op, bool)> {
    match mods {
        ["async", "commit_group"] => {
            nops(ins, 0)?;
            Ok((Op::CpAsyncCommit, false))
        }
        ["async", "wait_all"] => {
            nops(ins, 0)?;
            Ok((Op::CpAsyncWait { n: 0, all: true }, false))
        }
        ["async", "wait_group"] => {
            nops(ins, 1)?;
            let n = match &ins.operands[0] {
                Operand::Num(w) => parse_int(w).and_then(|v| u32::try_from(v).ok()),
                _ => None,
            }
            .ok_or_else(|| parse_err(ins.line, "`cp.async.wait_group` takes an integer"))?;
            Ok((Op::CpAsyncWait { n, all: false }, false))
        }
        ["async", "bulk", "tensor", ..] => crate::decode_hopper::tma(ctx, ins, mods),
        ["async", cache, dsts, "global", rest @ ..] if is_shared(dsts) => {
            let cg = match *cache {
                "ca" => false,
                "cg" => true,
                _ => return Err(bad(ins)),
            };
            if rest.iter().any(|m| !m.starts_with("L2::")) || rest.len() > 1 {
                return Err(bad(ins));
            }
            if rest
                .first()
                .is_some_and(|m| !matches!(*m, "L2::64B" | "L2::128B" | "L2::256B"))
            {
                return Err(bad(ins));
            }
            if ins.operands.len() < 3 || ins.operands.len() > 4 {
                return Err(parse_err(ins.line, "`cp.async` takes 3 or 4 operands"));
            }
            let dst = ctx.addr(&ins.operands[0])?;
            let src = ctx.addr(&ins.operands[1])?;
            let size = match &ins.operands[2] {
                Operand::Num(w) => parse_int(w),
                _ => None,
            }
            .filter(|s| matches!(s, 4 | 8 | 16))
            .ok_or_else(|| parse_err(ins.line, "`cp.async` copies 4, 8 or 16 bytes"))?
                as u8;
            if cg && size != 16 {
                return Err(parse_err(ins.line, "`cp.async.cg` copies 16 bytes"));
            }
            let src_size = match ins.operands.get(3) {
                Some(o) => Some(ctx.src(o, Ty::U(32))?),
                None => None,
            };
            Ok((
                Op::CpAsync {
                    dst,
                    src,
                    size,
                    src_size,
                },
                false,
            ))
        }
        _ => Err(bad(ins)),
    }
}

fn mbarrier(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<Op> {
    let mut sem_ok = true;
    let mut shared = false;
    let mut words = Vec::new();
    for m in mods {
        match *m {
            "b64" => {}
            s if is_shared(s) => shared = true,
            "release" | "acquire" | "relaxed" | "cta" => {}
            "cluster" => sem_ok = false,
            w => words.push(w),
        }
    }
    if !sem_ok || mods.last() != Some(&"b64") {
        return Err(bad(ins));
    }
    let _ = shared;
    let op = match words.as_slice() {
        ["init"] => MbarOp::Init,
        ["arrive"] => MbarOp::Arrive,
        ["arrive", "expect_tx"] => MbarOp::ArriveExpectTx,
        ["expect_tx"] => MbarOp::ExpectTx,
        ["try_wait", "parity"] => MbarOp::TryWaitParity,
        ["test_wait", "parity"] => MbarOp::TestWaitParity,
        ["inval"] => MbarOp::Inval,
        _ => return Err(bad(ins)),
    };
    let o = &ins.operands;
    let u32t = Ty::U(32);
    Ok(match op {
        MbarOp::Init => {
            nops(ins, 2)?;
            Op::Mbar {
                op,
                d: None,
                addr: ctx.addr(&o[0])?,
                arg: Some(ctx.src(&o[1], u32t)?),
            }
        }
        MbarOp::Inval => {
            nops(ins, 1)?;
            Op::Mbar {
                op,
                d: None,
                addr: ctx.addr(&o[0])?,
                arg: None,
            }
        }
        MbarOp::ExpectTx => {
            nops(ins, 2)?;
            Op::Mbar {
                op,
                d: None,
                addr: ctx.addr(&o[0])?,
                arg: Some(ctx.src(&o[1], u32t)?),
            }
        }
        MbarOp::Arrive | MbarOp::ArriveExpectTx => {
            if o.len() < 2 || o.len() > 3 || (op == MbarOp::ArriveExpectTx && o.len() != 3) {
                return Err(parse_err(
                    ins.line,
                    format!("`{}`: wrong operand count", ins.opcode),
                ));
            }
            Op::Mbar {
                op,
                d: ctx.dst_opt(&o[0])?,
                addr: ctx.addr(&o[1])?,
                arg: match o.get(2) {
                    Some(x) => Some(ctx.src(x, u32t)?),
                    None => None,
                },
            }
        }
        MbarOp::TryWaitParity | MbarOp::TestWaitParity => {
            nops(ins, 3)?;
            Op::Mbar {
                op,
                d: Some(ctx.dst(&o[0])?),
                addr: ctx.addr(&o[1])?,
                arg: Some(ctx.src(&o[2], u32t)?),
            }
        }
    })
}

fn atom(ctx: &mut Ctx, ins: &Instr, has_d: bool, mods: &[&str]) -> R<Op> {
    let mut op = None;
    let mut ty = None;
    for (i, m) in mods.iter().enumerate() {
        match *m {
            "global" | "relaxed" | "gpu" | "cta" | "sys" => {}
            "add" => op = Some(AtomOp::Add),
            "min" => op = Some(AtomOp::Min),
            "max" => op = Some(AtomOp::Max),
            "and" => op = Some(AtomOp::And),
            "or" => op = Some(AtomOp::Or),
            "xor" => op = Some(AtomOp::Xor),
            "exch" if has_d => op = Some(AtomOp::Exch),
            "cas" if has_d => op = Some(AtomOp::Cas),
            "inc" => op = Some(AtomOp::Inc),
            "dec" => op = Some(AtomOp::Dec),
            t if i == mods.len() - 1 => ty = crate::decode::parse_ty(t),
            _ => return Err(bad(ins)),
        }
    }
    if !mods.contains(&"global") {
        return Err(unsupported(
            ins.line,
            format!("`{}`: only global atomics", ins.opcode),
        ));
    }
    let (Some(op), Some(ty)) = (op, ty) else {
        return Err(bad(ins));
    };
    let ok = match op {
        AtomOp::Add => matches!(ty, Ty::U(32) | Ty::S(32) | Ty::U(64) | Ty::F32 | Ty::F64),
        AtomOp::Min | AtomOp::Max => matches!(ty, Ty::U(32) | Ty::S(32) | Ty::U(64) | Ty::S(64)),
        AtomOp::And | AtomOp::Or | AtomOp::Xor | AtomOp::Exch | AtomOp::Cas => {
            matches!(ty, Ty::B(32) | Ty::B(64))
        }
        AtomOp::Inc | AtomOp::Dec => ty == Ty::U(32),
    };
    if !ok {
        return Err(bad(ins));
    }
    let o = &ins.operands;
    let n = usize::from(has_d) + 2 + usize::from(op == AtomOp::Cas);
    nops(ins, n)?;
    let k = usize::from(has_d);
    Ok(Op::Atom {
        op,
        ty,
        d: if has_d { Some(ctx.dst(&o[0])?) } else { None },
        addr: ctx.addr(&o[k])?,
        b: ctx.src(&o[k + 1], ty)?,
        c: match o.get(k + 2) {
            Some(x) => Some(ctx.src(x, ty)?),
            None => None,
        },
    })
}
