//! Statements to the decoded program: module directives, entries, parameters, register and
//! shared-memory declarations, labels. Instructions are decoded in [`crate::decode_inst`].

use crate::decode_inst::{Ctx, decode_instr};
use crate::error::{ErrorKind, SimError};
use crate::ir::{Kernel, ParamDecl, Program, Special, Ty};
use crate::parse::{Cursor, TokKind, instruction, parse_err, parse_int, tokenize};
use std::collections::HashMap;

pub(crate) fn unsupported(line: u32, msg: impl Into<String>) -> SimError {
    SimError::new(
        ErrorKind::Unsupported,
        format!("PTX line {line}: {}", msg.into()),
    )
}

/// Parses a type suffix such as `u32`, `bf16x2` or `pred` (without the dot).
pub(crate) fn parse_ty(s: &str) -> Option<Ty> {
    Some(match s {
        "u8" => Ty::U(8),
        "u16" => Ty::U(16),
        "u32" => Ty::U(32),
        "u64" => Ty::U(64),
        "s8" => Ty::S(8),
        "s16" => Ty::S(16),
        "s32" => Ty::S(32),
        "s64" => Ty::S(64),
        "b8" => Ty::B(8),
        "b16" => Ty::B(16),
        "b32" => Ty::B(32),
        "b64" => Ty::B(64),
        "f16" => Ty::F16,
        "bf16" => Ty::Bf16,
        "f16x2" | "bf16x2" => Ty::B(32),
        "f32" => Ty::F32,
        "f64" => Ty::F64,
        "pred" => Ty::Pred,
        _ => return None,
    })
}

/// A `.shared` variable: its name, alignment, size in bytes (None: `.extern` / unsized).
struct SharedVar {
    name: String,
    align: u32,
    size: Option<u32>,
}

/// Parses `[.extern] .shared [.align N] .type name[dims];` (the cursor is after `.shared`).
fn shared_decl(c: &mut Cursor, ext: bool) -> Result<SharedVar, SimError> {
    let line = c.line();
    let mut align = 0;
    let mut w = c.word()?;
    if w == ".align" {
        let n = c.word()?;
        align = parse_int(n)
            .filter(|a| a.is_power_of_two() && *a <= 4096)
            .ok_or_else(|| parse_err(line, format!("bad alignment `{n}`")))? as u32;
        w = c.word()?;
    }
    let ty = w
        .strip_prefix('.')
        .and_then(parse_ty)
        .filter(|t| *t != Ty::Pred)
        .ok_or_else(|| unsupported(line, format!("shared variable type `{w}`")))?;
    let elem = ty.bits().div_ceil(8);
    let name = c.word()?.to_string();
    let mut size = Some(elem);
    let mut unsized_ = false;
    while c.eat('[') {
        if c.eat(']') {
            unsized_ = true;
            continue;
        }
        let n = c.word()?;
        let n = parse_int(n).ok_or_else(|| parse_err(line, format!("bad array size `{n}`")))?;
        c.expect(']')?;
        size = size
            .and_then(|s| s.checked_mul(u32::try_from(n).ok()?))
            .filter(|s| *s <= 1 << 24);
        if size.is_none() {
            return Err(unsupported(line, "shared array over 16 MiB"));
        }
    }
    if c.is_punct('=') {
        return Err(unsupported(line, "initialised shared variables"));
    }
    c.expect(';')?;
    if ext != unsized_ {
        return Err(unsupported(
            line,
            "only `.extern .shared` unsized arrays and sized static shared variables",
        ));
    }
    Ok(SharedVar {
        name,
        align: align.max(elem),
        size: if ext { None } else { size },
    })
}

/// Parses a whole module.
pub(crate) fn decode_module(src: &str) -> Result<Program, SimError> {
    let toks = tokenize(src)?;
    let mut c = Cursor {
        toks: &toks,
        pos: 0,
        src,
    };
    let mut module_shared = Vec::new();
    let mut kernels = Vec::new();
    while let Some(t) = c.peek() {
        let line = t.line;
        let TokKind::Word(w) = &t.kind else {
            return Err(parse_err(line, "expected a directive"));
        };
        c.pos += 1;
        match w.as_str() {
            ".version" => {
                c.word()?;
            }
            ".target" => {
                c.word()?;
                while c.eat(',') {
                    c.word()?;
                }
            }
            ".address_size" => {
                if c.word()? != "64" {
                    return Err(unsupported(line, "only `.address_size 64`"));
                }
            }
            ".visible" | ".weak" => {}
            ".entry" => {
                let k = entry(&mut c, &module_shared)?;
                kernels.push(k);
            }
            ".extern" => {
                if c.word()? != ".shared" {
                    return Err(unsupported(line, "`.extern` other than `.extern .shared`"));
                }
                module_shared.push(shared_decl(&mut c, true)?);
            }
            ".shared" => module_shared.push(shared_decl(&mut c, false)?),
            ".func" | ".global" | ".const" | ".local" | ".tex" | ".surfref" | ".texref" => {
                return Err(unsupported(line, format!("`{w}` declarations")));
            }
            _ => return Err(parse_err(line, format!("unexpected `{w}` at module scope"))),
        }
    }
    Ok(Program { kernels })
}

fn entry(c: &mut Cursor, module_shared: &[SharedVar]) -> Result<Kernel, SimError> {
    let line = c.line();
    let name = c.word()?.to_string();
    // Parameters.
    let mut params = Vec::new();
    let mut off = 0u32;
    if c.eat('(') && !c.eat(')') {
        loop {
            let pl = c.line();
            if c.word()? != ".param" {
                return Err(parse_err(pl, "expected `.param`"));
            }
            let mut w = c.word()?;
            let mut align = 0;
            if w == ".align" {
                align = parse_int(c.word()?)
                    .filter(|a| a.is_power_of_two() && *a <= 256)
                    .ok_or_else(|| parse_err(pl, "bad parameter alignment"))?
                    as u32;
                w = c.word()?;
            }
            if w == ".ptr" {
                return Err(unsupported(pl, "`.ptr` parameter attributes"));
            }
            let ty = w
                .strip_prefix('.')
                .and_then(parse_ty)
                .filter(|t| *t != Ty::Pred)
                .ok_or_else(|| unsupported(pl, format!("parameter type `{w}`")))?;
            let pname = c.word()?.to_string();
            let elem = ty.bits() / 8;
            let (size, array) = if c.eat('[') {
                let n = parse_int(c.word()?)
                    .filter(|n| *n > 0 && *n <= 4096)
                    .ok_or_else(|| parse_err(pl, "bad parameter array size"))?;
                c.expect(']')?;
                (elem * n as u32, true)
            } else {
                (elem, false)
            };
            let align = align.max(elem);
            off = off.next_multiple_of(align);
            params.push(ParamDecl {
                name: pname,
                offset: off,
                size,
                ty,
                array,
            });
            off += size;
            if c.eat(')') {
                break;
            }
            c.expect(',')?;
        }
    }
    // Performance directives.
    let mut reqntid = None;
    let mut maxntid = None;
    loop {
        let dl = c.line();
        match c.peek_word() {
            Some(d @ (".maxntid" | ".reqntid")) => {
                c.pos += 1;
                let mut v = [1u32; 3];
                for (i, slot) in v.iter_mut().enumerate() {
                    if i > 0 && !c.eat(',') {
                        break;
                    }
                    *slot = parse_int(c.word()?)
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| parse_err(dl, "bad thread count"))?;
                }
                let t = Some((v[0], v[1], v[2]));
                if d == ".maxntid" {
                    maxntid = t;
                } else {
                    reqntid = t;
                }
            }
            Some(".minnctapersm" | ".maxnctapersm" | ".maxnreg") => {
                c.pos += 1;
                c.word()?;
            }
            Some(".pragma") => {
                c.skip_statement()?;
            }
            _ => break,
        }
    }
    if !c.eat('{') {
        return Err(unsupported(line, format!("entry `{name}` without a body")));
    }
    // Shared memory layout: static variables first (module scope, then the entry's, found by
    // a scan of the body), then the dynamic (extern) window.
    let mut local_shared = Vec::new();
    {
        let mut scan = Cursor {
            toks: c.toks,
            pos: c.pos,
            src: c.src,
        };
        let mut depth = 1;
        while let Some(t) = scan.next() {
            match &t.kind {
                TokKind::Punct('{') => depth += 1,
                TokKind::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                TokKind::Word(w) if w == ".shared" => {
                    let prev = scan.toks.get(scan.pos.wrapping_sub(2)).map(|t| &t.kind);
                    if !matches!(prev, Some(TokKind::Word(p)) if p == ".extern") {
                        local_shared.push(shared_decl(&mut scan, false)?);
                    }
                }
                _ => {}
            }
        }
    }
    let mut shared_syms: HashMap<String, u32> = HashMap::new();
    let mut soff = 0u32;
    let mut dyn_align = 16u32;
    let mut externs = Vec::new();
    for v in module_shared.iter().chain(local_shared.iter()) {
        match v.size {
            Some(sz) => {
                soff = soff.next_multiple_of(v.align);
                shared_syms.insert(v.name.clone(), soff);
                soff += sz;
            }
            None => {
                dyn_align = dyn_align.max(v.align);
                externs.push(v.name.clone());
            }
        }
    }
    let static_shared = soff;
    let dyn_base = soff.next_multiple_of(dyn_align);
    for e in externs {
        shared_syms.insert(e, dyn_base);
    }
    let mut ctx = Ctx {
        regs: HashMap::new(),
        slot_bits: Vec::new(),
        specials: Vec::new(),
        special_slots: HashMap::new(),
        shared: shared_syms,
        params: params.iter().map(|p| (p.name.clone(), p.offset)).collect(),
        labels: HashMap::new(),
        fixups: Vec::new(),
        ninstrs: 0,
        line: 0,
    };
    // Body: declarations, scopes, labels, instructions. Registers declared in a `{ }` scope
    // shadow outer ones until the scope closes.
    let mut scopes: Vec<Vec<(String, Option<u32>)>> = vec![Vec::new()];
    let mut insts = Vec::new();
    let mut texts = Vec::new();
    loop {
        let Some(t) = c.peek() else {
            return Err(parse_err(
                line,
                format!("entry `{name}` has no closing `}}`"),
            ));
        };
        let sl = t.line;
        match &t.kind {
            TokKind::Punct('}') => {
                c.pos += 1;
                let Some(scope) = scopes.pop() else {
                    return Err(parse_err(sl, "unbalanced `}`"));
                };
                for (n, old) in scope.into_iter().rev() {
                    match old {
                        Some(s) => ctx.regs.insert(n, s),
                        None => ctx.regs.remove(&n),
                    };
                }
                if scopes.is_empty() {
                    break;
                }
            }
            TokKind::Punct('{') => {
                c.pos += 1;
                scopes.push(Vec::new());
            }
            TokKind::Word(w) if w == ".reg" => {
                c.pos += 1;
                let tw = c.word()?;
                if tw.starts_with(".v") {
                    return Err(unsupported(sl, "vector registers"));
                }
                let ty = tw
                    .strip_prefix('.')
                    .and_then(parse_ty)
                    .ok_or_else(|| unsupported(sl, format!("register type `{tw}`")))?;
                let bits = match tw {
                    ".f16x2" | ".bf16x2" => 32,
                    _ => ty.bits() as u8,
                };
                let scope = scopes.last_mut().ok_or_else(|| parse_err(sl, "no scope"))?;
                loop {
                    let rn = c.word()?.to_string();
                    if c.eat('<') {
                        let n = parse_int(c.word()?)
                            .filter(|n| *n <= 1 << 16)
                            .ok_or_else(|| parse_err(sl, "bad register count"))?;
                        c.expect('>')?;
                        for i in 0..n {
                            declare(&mut ctx, scope, format!("{rn}{i}"), bits, sl)?;
                        }
                    } else {
                        declare(&mut ctx, scope, rn, bits, sl)?;
                    }
                    if c.eat(';') {
                        break;
                    }
                    c.expect(',')?;
                }
            }
            TokKind::Word(w) if w == ".shared" => {
                c.pos += 1;
                shared_decl(c, false)?;
            }
            TokKind::Word(w) if w == ".pragma" => c.skip_statement()?,
            TokKind::Word(w) if w.starts_with('.') => {
                return Err(unsupported(sl, format!("`{w}` inside an entry")));
            }
            TokKind::Word(w) if matches!(c.toks.get(c.pos + 1), Some(t) if t.kind == TokKind::Punct(':')) =>
            {
                if ctx.labels.insert(w.clone(), insts.len() as u32).is_some() {
                    return Err(parse_err(sl, format!("label `{w}` defined twice")));
                }
                c.pos += 2;
            }
            _ => {
                let ins = instruction(c)?;
                ctx.line = ins.line;
                ctx.ninstrs = insts.len() as u32;
                insts.push(decode_instr(&mut ctx, &ins)?);
                texts.push(ins.text);
            }
        }
    }
    for (at, label, l) in std::mem::take(&mut ctx.fixups) {
        let t = *ctx
            .labels
            .get(&label)
            .ok_or_else(|| parse_err(l, format!("unknown label `{label}`")))?;
        if let Some(crate::ir::Inst {
            op: crate::ir::Op::Bra { target },
            ..
        }) = insts.get_mut(at as usize)
        {
            *target = t;
        }
    }
    // Falling off the end of the body returns.
    insts.push(crate::ir::Inst {
        op: crate::ir::Op::Exit,
        guard: None,
        class: crate::ir::Class::Control,
        aligned: false,
        line: c.toks.get(c.pos.saturating_sub(1)).map_or(line, |t| t.line),
    });
    texts.push("}".to_string());
    Ok(Kernel {
        name,
        insts,
        texts,
        nslots: ctx.slot_bits.len() as u32,
        slot_bits: ctx.slot_bits,
        specials: ctx.specials,
        params,
        param_bytes: off,
        static_shared,
        dyn_shared_base: dyn_base,
        reqntid,
        maxntid,
    })
}

fn declare(
    ctx: &mut Ctx,
    scope: &mut Vec<(String, Option<u32>)>,
    name: String,
    b: u8,
    line: u32,
) -> Result<(), SimError> {
    if !name.starts_with('%') {
        return Err(unsupported(
            line,
            format!("register name `{name}` without `%`"),
        ));
    }
    if scope.iter().any(|(n, _)| *n == name) {
        return Err(parse_err(line, format!("register `{name}` declared twice")));
    }
    let slot = ctx.slot_bits.len() as u32;
    ctx.slot_bits.push(b);
    let old = ctx.regs.insert(name.clone(), slot);
    scope.push((name, old));
    Ok(())
}

/// The special register a name denotes, if any.
pub(crate) fn special(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    let (base, d) = match name.split_once('.') {
        Some((b, d)) => (b, Some(dim(d)?)),
        None => (name, None),
    };
    Some(match (base, d) {
        ("%tid", Some(d)) => Special::Tid(d),
        ("%ntid", Some(d)) => Special::Ntid(d),
        ("%ctaid", Some(d)) => Special::Ctaid(d),
        ("%nctaid", Some(d)) => Special::Nctaid(d),
        ("%laneid", None) => Special::LaneId,
        ("%warpid", None) => Special::WarpId,
        ("%nwarpid", None) => Special::NWarpId,
        ("%dynamic_smem_size", None) => Special::DynSmem,
        ("%total_smem_size", None) => Special::TotalSmem,
        ("%lanemask_eq", None) => Special::LaneMaskEq,
        ("%lanemask_lt", None) => Special::LaneMaskLt,
        ("%lanemask_le", None) => Special::LaneMaskLe,
        ("%lanemask_gt", None) => Special::LaneMaskGt,
        ("%lanemask_ge", None) => Special::LaneMaskGe,
        _ => return None,
    })
}
