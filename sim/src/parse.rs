//! PTX text to statements: a tokenizer and a statement parser. No meaning is given to the
//! statements here; [`crate::decode`] turns them into the decoded program.

use crate::error::{ErrorKind, SimError};

/// One token with the 1-based line it starts on and its byte range in the source.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tok {
    pub(crate) kind: TokKind,
    pub(crate) line: u32,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TokKind {
    /// Identifiers, opcodes, directives, registers, numbers: `[A-Za-z0-9_.$%]` runs (with `::`).
    Word(String),
    Punct(char),
}

pub(crate) fn parse_err(line: u32, msg: impl Into<String>) -> SimError {
    SimError::new(ErrorKind::Parse, format!("PTX line {line}: {}", msg.into()))
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'$' | b'%')
}

/// Splits PTX text into tokens, dropping comments.
pub(crate) fn tokenize(src: &str) -> Result<Vec<Tok>, SimError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let l0 = line;
            i += 2;
            loop {
                if i + 1 >= b.len() {
                    return Err(parse_err(l0, "unterminated comment"));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
        } else if is_word(c) {
            let s = i;
            while i < b.len() {
                if is_word(b[i]) {
                    i += 1;
                } else if b[i] == b':' && b.get(i + 1) == Some(&b':') {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push(Tok {
                kind: TokKind::Word(src[s..i].to_string()),
                line,
                start: s,
                end: i,
            });
        } else if b",;{}[]()+-|!@<>:=".contains(&c) {
            out.push(Tok {
                kind: TokKind::Punct(c as char),
                line,
                start: i,
                end: i + 1,
            });
            i += 1;
        } else if c == b'"' {
            let s = i;
            i += 1;
            while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                i += 1;
            }
            if i >= b.len() || b[i] != b'"' {
                return Err(parse_err(line, "unterminated string"));
            }
            i += 1;
            out.push(Tok {
                kind: TokKind::Word(src[s..i].to_string()),
                line,
                start: s,
                end: i,
            });
        } else {
            return Err(parse_err(
                line,
                format!(
                    "unexpected character `{}`",
                    src[i..].chars().next().unwrap_or('?')
                ),
            ));
        }
    }
    Ok(out)
}

/// An operand of an instruction, as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Operand {
    /// A register, special register or symbol name.
    Name(String),
    /// A numeric literal as written (`-1`, `0x1f`, `0f3F800000`, `1.5`).
    Num(String),
    /// `[base+offset]`, `[name]`, `[imm]`, or `[base, {coords}]` for tensor copies.
    Addr {
        base: Option<String>,
        offset: i64,
        coords: Vec<Operand>,
    },
    /// `{a, b, ...}`.
    Vec(Vec<Operand>),
    /// `a|b` (a second predicate destination).
    Pair(String, String),
    /// `!p`.
    Not(String),
    /// `_`.
    Sink,
}

/// One instruction statement.
#[derive(Clone, Debug)]
pub(crate) struct Instr {
    pub(crate) line: u32,
    /// The statement's text with whitespace collapsed.
    pub(crate) text: String,
    /// `@p` / `@!p`: (negated, predicate name).
    pub(crate) guard: Option<(bool, String)>,
    pub(crate) opcode: String,
    pub(crate) operands: Vec<Operand>,
}

/// A cursor over tokens.
pub(crate) struct Cursor<'a> {
    pub(crate) toks: &'a [Tok],
    pub(crate) pos: usize,
    pub(crate) src: &'a str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos)
    }
    pub(crate) fn line(&self) -> u32 {
        self.peek()
            .or(self.toks.last())
            .map(|t| t.line)
            .unwrap_or(1)
    }
    pub(crate) fn next(&mut self) -> Option<&'a Tok> {
        let t = self.toks.get(self.pos);
        self.pos += 1;
        t
    }
    pub(crate) fn is_punct(&self, c: char) -> bool {
        matches!(self.peek(), Some(Tok { kind: TokKind::Punct(p), .. }) if *p == c)
    }
    pub(crate) fn eat(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    pub(crate) fn expect(&mut self, c: char) -> Result<(), SimError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(parse_err(self.line(), format!("expected `{c}`")))
        }
    }
    pub(crate) fn word(&mut self) -> Result<&'a str, SimError> {
        let line = self.line();
        match self.next() {
            Some(Tok {
                kind: TokKind::Word(w),
                ..
            }) => Ok(w),
            _ => Err(parse_err(line, "expected a name or number")),
        }
    }
    pub(crate) fn peek_word(&self) -> Option<&'a str> {
        match self.peek() {
            Some(Tok {
                kind: TokKind::Word(w),
                ..
            }) => Some(w),
            _ => None,
        }
    }
    /// Skips to just after the next `;`.
    pub(crate) fn skip_statement(&mut self) -> Result<(), SimError> {
        let line = self.line();
        while let Some(t) = self.next() {
            if t.kind == TokKind::Punct(';') {
                return Ok(());
            }
        }
        Err(parse_err(line, "statement without `;`"))
    }
    /// The collapsed source text between token positions `from` and `to` (exclusive).
    pub(crate) fn text(&self, from: usize, to: usize) -> String {
        let (Some(a), Some(b)) = (self.toks.get(from), self.toks.get(to.saturating_sub(1))) else {
            return String::new();
        };
        self.src[a.start..b.end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn is_number(w: &str) -> bool {
    w.as_bytes()[0].is_ascii_digit()
}

/// Parses one operand.
fn operand(c: &mut Cursor) -> Result<Operand, SimError> {
    let line = c.line();
    if c.eat('{') {
        let mut items = Vec::new();
        if !c.eat('}') {
            loop {
                items.push(operand(c)?);
                if c.eat('}') {
                    break;
                }
                c.expect(',')?;
            }
        }
        return Ok(Operand::Vec(items));
    }
    if c.eat('[') {
        let mut base = None;
        let mut offset = 0i64;
        let mut coords = Vec::new();
        let mut first = true;
        loop {
            let neg = if first || c.eat('+') {
                c.eat('-')
            } else if c.eat('-') {
                true
            } else {
                break;
            };
            let w = c.word()?;
            if is_number(w) {
                let v = parse_int(w).ok_or_else(|| parse_err(line, format!("bad offset `{w}`")))?;
                let v = if neg { v.wrapping_neg() } else { v };
                offset = offset.wrapping_add(v as i64);
            } else if base.is_none() && !neg {
                base = Some(w.to_string());
            } else {
                return Err(parse_err(
                    line,
                    "an address has at most one register or symbol",
                ));
            }
            first = false;
        }
        if c.eat(',') {
            match operand(c)? {
                Operand::Vec(v) => coords = v,
                _ => return Err(parse_err(line, "expected `{coordinates}` in an address")),
            }
        }
        c.expect(']')?;
        return Ok(Operand::Addr {
            base,
            offset,
            coords,
        });
    }
    if c.eat('!') {
        return Ok(Operand::Not(c.word()?.to_string()));
    }
    if c.eat('-') {
        let w = c.word()?;
        if !is_number(w) {
            return Err(parse_err(line, "`-` before a non-number"));
        }
        return Ok(Operand::Num(format!("-{w}")));
    }
    let w = c.word()?;
    if w == "_" {
        return Ok(Operand::Sink);
    }
    if is_number(w) {
        return Ok(Operand::Num(w.to_string()));
    }
    if c.eat('|') {
        let w2 = c.word()?;
        return Ok(Operand::Pair(w.to_string(), w2.to_string()));
    }
    Ok(Operand::Name(w.to_string()))
}

/// Parses an instruction statement (the cursor is at its first token, after any label).
pub(crate) fn instruction(c: &mut Cursor) -> Result<Instr, SimError> {
    let start = c.pos;
    let line = c.line();
    let mut guard = None;
    if c.eat('@') {
        let neg = c.eat('!');
        guard = Some((neg, c.word()?.to_string()));
    }
    let opcode = c.word()?.to_string();
    let mut operands = Vec::new();
    if !c.eat(';') {
        loop {
            operands.push(operand(c)?);
            if c.eat(';') {
                break;
            }
            if !c.eat(',') {
                return Err(parse_err(line, format!("malformed operands of `{opcode}`")));
            }
        }
    }
    Ok(Instr {
        line,
        text: c.text(start, c.pos),
        guard,
        opcode,
        operands,
    })
}

/// Parses an unsigned or signed integer literal (decimal, `0x` hex, `0b` binary, octal with a
/// leading 0, optional `U` suffix) into its 64-bit two's-complement pattern.
pub(crate) fn parse_int(w: &str) -> Option<u64> {
    let (neg, w) = match w.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, w),
    };
    let w = w.strip_suffix('U').unwrap_or(w);
    let v = if let Some(h) = w.strip_prefix("0x").or(w.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if let Some(b) = w.strip_prefix("0b").or(w.strip_prefix("0B")) {
        u64::from_str_radix(b, 2).ok()?
    } else if w.len() > 1 && w.starts_with('0') {
        u64::from_str_radix(&w[1..], 8).ok()?
    } else {
        w.parse::<u64>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Parses a float literal: `0fXXXXXXXX` (f32 bits), `0dXXXXXXXXXXXXXXXX` (f64 bits) or a
/// decimal. Returns the value as f64 (exact for all three forms).
pub(crate) fn parse_float(w: &str) -> Option<f64> {
    let (neg, w) = match w.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, w),
    };
    let v = if let Some(h) = w.strip_prefix("0f").or(w.strip_prefix("0F")) {
        if h.len() != 8 {
            return None;
        }
        f32::from_bits(u32::from_str_radix(h, 16).ok()?) as f64
    } else if let Some(h) = w.strip_prefix("0d").or(w.strip_prefix("0D")) {
        if h.len() != 16 {
            return None;
        }
        f64::from_bits(u64::from_str_radix(h, 16).ok()?)
    } else if w.contains(['.', 'e', 'E']) && !w.starts_with("0x") {
        w.parse::<f64>().ok()?
    } else {
        parse_int(w)? as f64
    };
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_int("42"), Some(42));
        assert_eq!(parse_int("-1"), Some(u64::MAX));
        assert_eq!(parse_int("0x1F"), Some(31));
        assert_eq!(parse_int("017"), Some(15));
        assert_eq!(parse_int("0b101"), Some(5));
        assert_eq!(parse_int("7U"), Some(7));
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_float("0f3F800000"), Some(1.0));
        assert_eq!(parse_float("-0f3F800000"), Some(-1.0));
        assert_eq!(parse_float("0d3FF0000000000000"), Some(1.0));
        assert_eq!(parse_float("1.5"), Some(1.5));
        assert_eq!(parse_float("0f3F80"), None);
    }

    #[test]
    fn statements_and_operands() {
        let src = "@!%p1 ld.global.v2.f32 {%f1, _}, [%rd2+-8]; // c\n/* x */ bra L;";
        let toks = tokenize(src).unwrap();
        let mut c = Cursor {
            toks: &toks,
            pos: 0,
            src,
        };
        let i = instruction(&mut c).unwrap();
        assert_eq!(i.guard, Some((true, "%p1".to_string())));
        assert_eq!(i.opcode, "ld.global.v2.f32");
        assert_eq!(
            i.operands[0],
            Operand::Vec(vec![Operand::Name("%f1".into()), Operand::Sink])
        );
        assert_eq!(
            i.operands[1],
            Operand::Addr {
                base: Some("%rd2".into()),
                offset: -8,
                coords: vec![]
            }
        );
        assert_eq!(i.text, "@!%p1 ld.global.v2.f32 {%f1, _}, [%rd2+-8];");
        let j = instruction(&mut c).unwrap();
        assert_eq!((j.opcode.as_str(), j.line), ("bra", 2));
        assert!(tokenize("/* open").is_err());
        assert!(tokenize("add # 1").is_err());
    }
}
