//! Parses the PTX subset the GEMM generator prints: one instruction per line, labels on their
//! own line, `.reg` declarations (ignored: registers are numbered on first use).

use std::collections::HashMap;

/// A decoded operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Reg(u16),
    Imm(i64),
    /// An `0fXXXXXXXX` f32 immediate (its bits).
    F32(u32),
    Vec(Vec<Arg>),
    /// `[base + off]` where base is a register, or a parameter name.
    Mem(Box<Arg>, i64),
    Param(String),
    /// The dynamic shared-memory symbol (its address is 0).
    Smem,
    Tid,
    Ctaid,
    Label(usize),
}

/// One instruction.
#[derive(Clone, Debug)]
pub struct Inst {
    /// `@%p` (false) or `@!%p` (true).
    pub guard: Option<(u16, bool)>,
    pub opcode: String,
    pub args: Vec<Arg>,
    /// Source line, for error messages.
    pub line: usize,
}

/// One `.entry`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// (name, bytes) in order.
    pub params: Vec<(String, usize)>,
    pub insts: Vec<Inst>,
    pub regs: usize,
    pub max_threads: u32,
}

/// Splits `s` at top-level commas (not inside `{}` or `[]`).
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ => {}
        }
        if ch == ',' && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(ch);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

struct Names<'a> {
    regs: &'a mut HashMap<String, u16>,
    labels: &'a HashMap<String, usize>,
    smem: &'a str,
}

fn operand(s: &str, n: &mut Names) -> Result<Arg, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
        return split_args(inner)
            .iter()
            .map(|x| operand(x, n))
            .collect::<Result<_, _>>()
            .map(Arg::Vec);
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let (base, off) = match inner.split_once('+') {
            Some((b, o)) => (
                b.trim(),
                o.trim().parse::<i64>().map_err(|e| e.to_string())?,
            ),
            None => (inner.trim(), 0),
        };
        let b = if base.starts_with('%') {
            operand(base, n)?
        } else {
            Arg::Param(base.to_string())
        };
        return Ok(Arg::Mem(Box::new(b), off));
    }
    if s == "%tid.x" {
        return Ok(Arg::Tid);
    }
    if s == "%ctaid.x" {
        return Ok(Arg::Ctaid);
    }
    if let Some(name) = s.strip_prefix('%') {
        let len = n.regs.len();
        let id = *n.regs.entry(name.to_string()).or_insert(len as u16);
        return Ok(Arg::Reg(id));
    }
    if let Some(hex) = s.strip_prefix("0f") {
        return u32::from_str_radix(hex, 16)
            .map(Arg::F32)
            .map_err(|e| format!("{s}: {e}"));
    }
    if s.starts_with('$') {
        return n
            .labels
            .get(s)
            .map(|&i| Arg::Label(i))
            .ok_or_else(|| format!("unknown label {s}"));
    }
    if s == n.smem {
        return Ok(Arg::Smem);
    }
    s.parse::<i64>()
        .map(Arg::Imm)
        .map_err(|_| format!("cannot parse operand `{s}`"))
}

/// Parses every entry of a module.
pub fn parse_module(text: &str) -> Result<Vec<Entry>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let smem = lines
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix(".extern .shared")
                .and_then(|r| r.split_whitespace().last())
                .map(|n| n.trim_end_matches(';').trim_end_matches("[]").to_string())
        })
        .unwrap_or_default();
    let mut entries = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        let Some(rest) = l.strip_prefix(".visible .entry ") else {
            i += 1;
            continue;
        };
        let name = rest.trim_end_matches('(').to_string();
        let mut params = Vec::new();
        i += 1;
        while !lines[i].trim().starts_with(')') {
            let p = lines[i].trim().trim_end_matches(',');
            let parts: Vec<&str> = p.split_whitespace().collect();
            let bytes = match parts[1] {
                ".u64" => 8,
                ".u32" | ".f32" => 4,
                t => return Err(format!("param type {t}")),
            };
            params.push((parts[2].to_string(), bytes));
            i += 1;
        }
        let mut max_threads = 1024;
        // Body: from `{` to the matching `}` at column 0.
        let start = i;
        while lines[i] != "{" {
            if let Some(v) = lines[i].trim().strip_prefix(".maxntid ") {
                max_threads = v
                    .split(',')
                    .next()
                    .unwrap_or("1024")
                    .trim()
                    .parse()
                    .unwrap_or(1024);
            }
            i += 1;
        }
        let body_start = i + 1;
        let mut end = body_start;
        while lines[end] != "}" {
            end += 1;
        }
        let _ = start;
        // Labels first (they index instructions).
        let mut labels = HashMap::new();
        let mut count = 0;
        for l in &lines[body_start..end] {
            let t = l.trim();
            if t.is_empty() || t.starts_with("//") || t.starts_with(".reg") {
                continue;
            }
            if let Some(lab) = t.strip_suffix(':') {
                labels.insert(lab.to_string(), count);
            } else {
                count += 1;
            }
        }
        let mut regs = HashMap::new();
        let mut insts = Vec::new();
        for (ln, l) in lines[body_start..end].iter().enumerate() {
            let t = l.trim();
            if t.is_empty() || t.starts_with("//") || t.starts_with(".reg") || t.ends_with(':') {
                continue;
            }
            let line = body_start + ln + 1;
            let t = t
                .strip_suffix(';')
                .ok_or_else(|| format!("line {line}: no `;`: {t}"))?;
            let mut names = Names {
                regs: &mut regs,
                labels: &labels,
                smem: &smem,
            };
            let (guard, t) = if let Some(g) = t.strip_prefix('@') {
                let (p, rest) = g.split_once(char::is_whitespace).ok_or("guard")?;
                let (neg, p) = match p.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, p),
                };
                let Arg::Reg(r) = operand(p, &mut names)? else {
                    return Err(format!("line {line}: bad guard"));
                };
                (Some((r, neg)), rest.trim())
            } else {
                (None, t)
            };
            let (opcode, rest) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
            let args = split_args(rest)
                .iter()
                .map(|a| operand(a, &mut names))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("line {line}: {e}"))?;
            insts.push(Inst {
                guard,
                opcode: opcode.to_string(),
                args,
                line,
            });
        }
        entries.push(Entry {
            name,
            params,
            insts,
            regs: regs.len(),
            max_threads,
        });
        i = end + 1;
    }
    Ok(entries)
}
