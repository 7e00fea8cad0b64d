//! Parsing the PTX subset Lathe's `nn` kernels (and the elementwise template) are written in.

use std::collections::HashMap;

/// Scalar types of instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    B16,
    U16,
    U32,
    S32,
    U64,
    S64,
    F16,
    Bf16,
    F32,
    F64,
    Pred,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b16" => Ty::B16,
            "u16" => Ty::U16,
            "b32" | "u32" => Ty::U32,
            "s32" => Ty::S32,
            "b64" | "u64" => Ty::U64,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "bf16" => Ty::Bf16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }

    pub fn bytes(self) -> usize {
        match self {
            Ty::B16 | Ty::U16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::U32 | Ty::S32 | Ty::F32 => 4,
            Ty::U64 | Ty::S64 | Ty::F64 => 8,
            Ty::Pred => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    Tid,
    Ntid,
    CtaidX,
    CtaidY,
    NctaidX,
    NctaidY,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
    Param,
}

#[derive(Clone, Debug)]
pub enum Operand {
    Reg(usize),
    Imm(u64),
    Vec(Vec<usize>),
    /// Base register (or none) plus a byte offset; for params the offset is the param index.
    Mem(Option<usize>, i64),
    Label(usize),
    Special(Special),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Mov,
    Add,
    Sub,
    MulLo,
    MulWide,
    Mad,
    Div,
    Rem,
    Fma,
    Min,
    Max,
    Shl,
    Shr,
    And,
    Or,
    Xor,
    Not,
    Setp(Cmp, Option<bool>), // Some(true) = .and, Some(false) = .or
    Selp,
    Cvt(Ty), // source type; `ty` is the destination
    Cvta,
    Ld(Space, usize), // vector width
    St(Space, usize),
    TestpFinite,
    TestpNan,
    Ex2,
    Lg2,
    Rcp,
    Sqrt,
    ShflBfly,
    ShflUp,
    Bar,
    Bra,
    Ret,
}

#[derive(Clone, Debug)]
pub struct Inst {
    pub guard: Option<(usize, bool)>, // (predicate register, negated)
    pub op: Op,
    pub ty: Ty,
    pub ops: Vec<Operand>,
    /// Second destination (`shfl ... d|p`).
    pub pdst: Option<usize>,
    pub text: String,
}

pub struct Kernel {
    pub name: String,
    pub params: Vec<String>,
    pub insts: Vec<Inst>,
    pub nregs: usize,
    pub static_shared: usize,
}

pub struct ModuleText {
    pub kernels: HashMap<String, Kernel>,
}

fn err(line: &str, what: &str) -> String {
    format!("emu parse: {what}: `{line}`")
}

/// Splits operands at top-level commas.
fn split_ops(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '{' | '[' => {
                depth += 1;
                cur.push(ch);
            }
            '}' | ']' => {
                depth -= 1;
                cur.push(ch);
            }
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
            }
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(|v| v as u64);
    }
    if let Some(h) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h.trim_end_matches('U'), 16).ok();
    }
    s.parse::<i64>().ok().map(|v| v as u64)
}

struct Ctx<'a> {
    regs: HashMap<String, usize>,
    shared: &'a HashMap<String, usize>,
    params: &'a [String],
}

impl Ctx<'_> {
    fn reg(&mut self, name: &str) -> usize {
        let n = self.regs.len();
        *self.regs.entry(name.to_string()).or_insert(n)
    }

    fn operand(&mut self, s: &str, line: &str) -> Result<Operand, String> {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            let regs = split_ops(inner).iter().map(|r| self.reg(r)).collect();
            return Ok(Operand::Vec(regs));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            let (base, off) = match inner.split_once('+') {
                Some((b, o)) => (
                    b.trim(),
                    parse_int(o).ok_or_else(|| err(line, "offset"))? as i64,
                ),
                None => (inner.trim(), 0),
            };
            if base.starts_with('%') {
                return Ok(Operand::Mem(Some(self.reg(base)), off));
            }
            if let Some(&addr) = self.shared.get(base) {
                return Ok(Operand::Mem(None, addr as i64 + off));
            }
            if let Some(i) = self.params.iter().position(|p| p == base) {
                return Ok(Operand::Mem(None, i as i64));
            }
            return Err(err(line, "unknown address"));
        }
        let special = match s {
            "%tid.x" => Some(Special::Tid),
            "%ntid.x" => Some(Special::Ntid),
            "%ctaid.x" => Some(Special::CtaidX),
            "%ctaid.y" => Some(Special::CtaidY),
            "%nctaid.x" => Some(Special::NctaidX),
            "%nctaid.y" => Some(Special::NctaidY),
            _ => None,
        };
        if let Some(sp) = special {
            return Ok(Operand::Special(sp));
        }
        if s.starts_with('%') {
            if s.contains('.') {
                return Err(err(line, "unsupported special register"));
            }
            return Ok(Operand::Reg(self.reg(s)));
        }
        if let Some(&addr) = self.shared.get(s) {
            return Ok(Operand::Imm(addr as u64));
        }
        if s.starts_with('$') {
            return Ok(Operand::Label(usize::MAX)); // resolved later by name
        }
        parse_int(s)
            .map(Operand::Imm)
            .ok_or_else(|| err(line, &format!("operand `{s}`")))
    }
}

fn decode(opcode: &str, line: &str) -> Result<(Op, Ty), String> {
    let parts: Vec<&str> = opcode.split('.').collect();
    let last_ty = || {
        parts
            .iter()
            .rev()
            .find_map(|p| Ty::parse(p))
            .ok_or_else(|| err(line, "no type"))
    };
    let has = |m: &str| parts.contains(&m);
    let vec_width = || {
        if has("v4") {
            4
        } else if has("v2") {
            2
        } else {
            1
        }
    };
    let space = || {
        if has("shared") {
            Space::Shared
        } else if has("param") {
            Space::Param
        } else {
            Space::Global
        }
    };
    let op = match parts[0] {
        "mov" => Op::Mov,
        "add" => Op::Add,
        "sub" => Op::Sub,
        "mul" if has("wide") => Op::MulWide,
        "mul" => Op::MulLo,
        "mad" => Op::Mad,
        "div" => Op::Div,
        "rem" => Op::Rem,
        "fma" => Op::Fma,
        "min" => Op::Min,
        "max" => Op::Max,
        "shl" => Op::Shl,
        "shr" => Op::Shr,
        "and" => Op::And,
        "or" => Op::Or,
        "xor" => Op::Xor,
        "not" => Op::Not,
        "selp" => Op::Selp,
        "cvta" => Op::Cvta,
        "ld" => Op::Ld(space(), vec_width()),
        "st" => Op::St(space(), vec_width()),
        "ex2" => Op::Ex2,
        "lg2" => Op::Lg2,
        "rcp" => Op::Rcp,
        "sqrt" => Op::Sqrt,
        "bar" => Op::Bar,
        "bra" => Op::Bra,
        "ret" => Op::Ret,
        "testp" if has("finite") => Op::TestpFinite,
        "testp" if has("notanumber") => Op::TestpNan,
        "shfl" if has("bfly") => Op::ShflBfly,
        "shfl" if has("up") => Op::ShflUp,
        "setp" => {
            let cmp = match parts[1] {
                "eq" => Cmp::Eq,
                "ne" => Cmp::Ne,
                "lt" => Cmp::Lt,
                "le" => Cmp::Le,
                "gt" => Cmp::Gt,
                "ge" => Cmp::Ge,
                _ => return Err(err(line, "comparison")),
            };
            let combine = if has("and") {
                Some(true)
            } else if has("or") {
                Some(false)
            } else {
                None
            };
            Op::Setp(cmp, combine)
        }
        "cvt" => {
            let tys: Vec<Ty> = parts.iter().filter_map(|p| Ty::parse(p)).collect();
            if tys.len() != 2 {
                return Err(err(line, "cvt types"));
            }
            return Ok((Op::Cvt(tys[1]), tys[0]));
        }
        _ => return Err(err(line, "unsupported instruction")),
    };
    let ty = match op {
        Op::Bar | Op::Bra | Op::Ret => Ty::U32,
        _ => last_ty()?,
    };
    Ok((op, ty))
}

/// Parses every entry of a module.
pub fn parse_module(ptx: &str) -> Result<ModuleText, String> {
    let mut kernels = HashMap::new();
    let lines: Vec<&str> = ptx.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if let Some(rest) = l.strip_prefix(".visible .entry ") {
            let name = rest.trim_end_matches('(').to_string();
            let mut params = Vec::new();
            i += 1;
            while !lines[i].trim().starts_with(')') {
                let p = lines[i].trim().trim_end_matches(',');
                let pname = p.split_whitespace().last().ok_or_else(|| err(p, "param"))?;
                params.push(pname.to_string());
                i += 1;
            }
            i += 1; // ')'
            let start = i + 1; // after '{'
            let mut depth = 0i32;
            let mut end = start;
            for (k, line) in lines.iter().enumerate().skip(i) {
                let t = line.trim();
                if t == "{" {
                    depth += 1;
                } else if t == "}" {
                    depth -= 1;
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
            }
            let k = parse_body(&name, &params, &lines[start..end])?;
            kernels.insert(name, k);
            i = end + 1;
        } else {
            i += 1;
        }
    }
    Ok(ModuleText { kernels })
}

fn parse_body(name: &str, params: &[String], lines: &[&str]) -> Result<Kernel, String> {
    // Pass 1: shared declarations and labels.
    let mut shared = HashMap::new();
    let mut size = 0usize;
    let mut labels = HashMap::new();
    let mut n_inst = 0usize;
    let stmts: Vec<String> = lines
        .iter()
        .map(|l| l.split("//").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && l != "{" && l != "}" && !l.starts_with(".reg"))
        .collect();
    for s in &stmts {
        if let Some(decl) = s.strip_prefix(".shared ") {
            let toks: Vec<&str> = decl.trim_end_matches(';').split_whitespace().collect();
            let align: usize = toks[1].parse().map_err(|_| err(s, "align"))?;
            let elem = match toks[2] {
                ".b8" => 1,
                t => Ty::parse(t.trim_start_matches('.'))
                    .ok_or_else(|| err(s, "type"))?
                    .bytes(),
            };
            let (sym, count) = toks[3].split_once('[').ok_or_else(|| err(s, "array"))?;
            let count: usize = count
                .trim_end_matches(']')
                .parse()
                .map_err(|_| err(s, "n"))?;
            size = size.div_ceil(align) * align;
            shared.insert(sym.to_string(), size);
            size += elem * count;
        } else if let Some(label) = s.strip_suffix(':') {
            labels.insert(label.to_string(), n_inst);
        } else {
            n_inst += 1;
        }
    }
    let dyn_base = size.div_ceil(16) * 16;
    shared.insert(super::super::ptxgen::DYN_SMEM.to_string(), dyn_base);
    let mut ctx = Ctx {
        regs: HashMap::new(),
        shared: &shared,
        params,
    };
    let mut insts = Vec::new();
    for s in &stmts {
        if s.starts_with(".shared") || s.ends_with(':') {
            continue;
        }
        let body = s.trim_end_matches(';').trim();
        let (guard, body) = if let Some(rest) = body.strip_prefix('@') {
            let (g, rest) = rest
                .split_once(char::is_whitespace)
                .ok_or_else(|| err(s, "guard"))?;
            let (neg, g) = match g.strip_prefix('!') {
                Some(g) => (true, g),
                None => (false, g),
            };
            (Some((ctx.reg(g), neg)), rest.trim())
        } else {
            (None, body)
        };
        let (opcode, rest) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
        let (op, ty) = decode(opcode, s)?;
        let mut ops = Vec::new();
        let mut pdst = None;
        for (k, o) in split_ops(rest).iter().enumerate() {
            if k == 0
                && let Some((d, p)) = o.split_once('|')
            {
                ops.push(ctx.operand(d, s)?);
                pdst = Some(ctx.reg(p.trim()));
                continue;
            }
            if o.starts_with('$') {
                let t = labels.get(o.as_str()).ok_or_else(|| err(s, "label"))?;
                ops.push(Operand::Label(*t));
                continue;
            }
            ops.push(ctx.operand(o, s)?);
        }
        insts.push(Inst {
            guard,
            op,
            ty,
            ops,
            pdst,
            text: s.clone(),
        });
    }
    Ok(Kernel {
        name: name.to_string(),
        params: params.to_vec(),
        insts,
        nregs: ctx.regs.len(),
        static_shared: dyn_base,
    })
}
