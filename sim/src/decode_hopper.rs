//! Decoding of the sm_90a instructions: `wgmma.*` and TMA tensor copies.

use crate::decode::unsupported;
use crate::decode_inst::Ctx;
use crate::error::SimError;
use crate::ir::*;
use crate::parse::{Instr, Operand, parse_err, parse_int};

type R<T> = Result<T, SimError>;

fn bad(ins: &Instr) -> SimError {
    unsupported(ins.line, format!("`{}`", ins.opcode))
}

fn imm(ins: &Instr, o: &Operand, ok: &[i64]) -> R<i64> {
    let v = match o {
        Operand::Num(w) => parse_int(w).map(|v| v as i64),
        _ => None,
    };
    v.filter(|v| ok.contains(v))
        .ok_or_else(|| parse_err(ins.line, format!("`{}`: bad immediate operand", ins.opcode)))
}

/// `wgmma.fence/commit_group/wait_group/mma_async` (all `.sync.aligned`).
pub(crate) fn wgmma(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<(Op, bool)> {
    let o = &ins.operands;
    match mods {
        ["fence", "sync", "aligned"] if o.is_empty() => Ok((Op::WgmmaFence, true)),
        ["commit_group", "sync", "aligned"] if o.is_empty() => Ok((Op::WgmmaCommit, true)),
        ["wait_group", "sync", "aligned"] if o.len() == 1 => {
            let n = imm(ins, &o[0], &(0..8).collect::<Vec<_>>())? as u32;
            Ok((Op::WgmmaWait { n }, true))
        }
        ["mma_async", "sync", "aligned", shape, "f32", ta, tb] if ta == tb => {
            let bf16 = match *ta {
                "bf16" => true,
                "f16" => false,
                _ => return Err(bad(ins)),
            };
            let n = shape
                .strip_prefix("m64n")
                .and_then(|s| s.strip_suffix("k16"))
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|n| (8..=256).contains(n) && n % 8 == 0)
                .ok_or_else(|| bad(ins))?;
            let regs_a = matches!(o.get(1), Some(Operand::Vec(_)));
            let want = if regs_a { 7 } else { 8 };
            if o.len() != want {
                return Err(parse_err(
                    ins.line,
                    format!("`{}` takes {want} operands", ins.opcode),
                ));
            }
            let d = ctx.dst_list(&o[0])?;
            if d.len() != n as usize / 2 || d.iter().any(|x| x.is_none()) {
                return Err(parse_err(
                    ins.line,
                    format!("m64n{n}k16 takes {} accumulator registers", n / 2),
                ));
            }
            let d: Vec<Slot> = d.into_iter().flatten().collect();
            let (a_desc, a_regs) = if regs_a {
                let a = ctx.dst_list(&o[1])?;
                if a.len() != 4 || a.iter().any(|x| x.is_none()) {
                    return Err(parse_err(ins.line, "A from registers takes 4 registers"));
                }
                let a: Vec<Slot> = a.into_iter().flatten().collect();
                (None, Some([a[0], a[1], a[2], a[3]]))
            } else {
                (Some(ctx.src(&o[1], Ty::U(64))?), None)
            };
            let b_desc = ctx.src(&o[2], Ty::U(64))?;
            let scale_d = ctx.src(&o[3], Ty::Pred)?;
            let scale_a = imm(ins, &o[4], &[1, -1])? as i32;
            let scale_b = imm(ins, &o[5], &[1, -1])? as i32;
            let (trans_a, trans_b) = if regs_a {
                (0, imm(ins, &o[6], &[0, 1])? as u32)
            } else {
                (
                    imm(ins, &o[6], &[0, 1])? as u32,
                    imm(ins, &o[7], &[0, 1])? as u32,
                )
            };
            Ok((
                Op::Wgmma {
                    n,
                    bf16,
                    d,
                    a_desc,
                    a_regs,
                    b_desc,
                    scale_d,
                    scale_a,
                    scale_b,
                    trans_a,
                    trans_b,
                },
                true,
            ))
        }
        _ => Err(bad(ins)),
    }
}

/// `cp.async.bulk.tensor.{1..5}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
/// [dst], [map, {coords}], [mbar]` (global to shared loads only).
pub(crate) fn tma(ctx: &mut Ctx, ins: &Instr, mods: &[&str]) -> R<(Op, bool)> {
    let dims = match mods {
        [
            "async",
            "bulk",
            "tensor",
            d,
            "shared::cluster" | "shared::cta",
            "global",
            "tile",
            "mbarrier::complete_tx::bytes",
        ] => d
            .strip_suffix('d')
            .and_then(|x| x.parse::<usize>().ok())
            .filter(|x| (1..=5).contains(x))
            .ok_or_else(|| bad(ins))?,
        _ => return Err(bad(ins)),
    };
    let o = &ins.operands;
    if o.len() != 3 {
        return Err(parse_err(
            ins.line,
            format!("`{}` takes 3 operands", ins.opcode),
        ));
    }
    let dst = ctx.addr(&o[0])?;
    let Operand::Addr {
        base: Some(m),
        offset,
        coords,
    } = &o[1]
    else {
        return Err(parse_err(
            ins.line,
            "expected `[tensor-map, {coordinates}]`",
        ));
    };
    if coords.len() != dims {
        return Err(parse_err(
            ins.line,
            format!("a {dims}-d copy takes {dims} coordinates"),
        ));
    }
    let map = ctx.addr(&Operand::Addr {
        base: Some(m.clone()),
        offset: *offset,
        coords: Vec::new(),
    })?;
    let coords = coords
        .iter()
        .map(|c| ctx.src(c, Ty::S(32)))
        .collect::<R<Vec<_>>>()?;
    let mbar = ctx.addr(&o[2])?;
    Ok((
        Op::TmaLoad {
            dst,
            map,
            coords,
            mbar,
        },
        false,
    ))
}
