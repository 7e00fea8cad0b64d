//! Executes a parsed entry over a grid, one block at a time, each warp's 32 lanes in lockstep.
//!
//! What the model enforces (any violation is an error naming the PTX line):
//! - branches are uniform across a warp; `ldmatrix`, `mma`, `bar.sync` run with all lanes;
//! - every global access is inside an allocation and naturally aligned (16 bytes for
//!   `cp.async` sources); every shared access is inside the block's dynamic shared memory and
//!   aligned; no two threads write the same global byte;
//! - `cp.async` data lands only when the issuing thread's `cp.async.wait_group`/`wait_all` lets
//!   the group complete (the latest the hardware may deliver it); a shared byte written by one
//!   thread and read or written by another without a `bar.sync` between them (counting a copy
//!   as writing from its issue to its wait) is a race;
//! - shared memory starts as 0xFF bytes (NaN in bf16 and f16), so reading an unwritten byte
//!   poisons the result.
//!
//! Bank conflicts are measured (the worst number of distinct 4-byte words one bank serves in
//! one `ldmatrix` phase or one quarter-warp of 16-byte stores), not forbidden.

use super::parse::{Arg, Entry, Inst};
use half::{bf16, f16};
use std::collections::VecDeque;

/// Simulated global memory: allocations 256 MiB apart so a stray address hits no allocation.
#[derive(Default)]
pub struct Memory {
    allocs: Vec<(u64, Vec<u8>, Vec<u32>)>,
    /// The shared-window address of the dynamic shared memory (a multiple of 16; the kernels
    /// must be correct for any such base, only bank behaviour may change).
    pub shared_base: u64,
}

const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

impl Memory {
    /// A new allocation of `bytes`, 256-byte aligned, filled with `fill`.
    pub fn alloc(&mut self, bytes: usize, fill: u8) -> u64 {
        let base = 0x1_0000_0000u64 + self.allocs.len() as u64 * 0x1000_0000;
        self.allocs
            .push((base, vec![fill; bytes], vec![NONE; bytes]));
        base
    }

    fn find(&self, addr: u64, len: usize) -> Result<(usize, usize), String> {
        for (i, (base, data, _)) in self.allocs.iter().enumerate() {
            if addr >= *base && addr + len as u64 <= base + data.len() as u64 {
                return Ok((i, (addr - base) as usize));
            }
        }
        Err(format!(
            "global access of {len} bytes at {addr:#x} is outside every allocation"
        ))
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        let (i, off) = self.find(addr, bytes.len())?;
        self.allocs[i].1[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        let (i, off) = self.find(addr, len)?;
        Ok(self.allocs[i].1[off..off + len].to_vec())
    }

    fn store(&mut self, addr: u64, bytes: &[u8], thread: u32) -> Result<(), String> {
        let (i, off) = self.find(addr, bytes.len())?;
        let a = &mut self.allocs[i];
        for (j, &b) in bytes.iter().enumerate() {
            let w = &mut a.2[off + j];
            if *w != NONE && *w != thread {
                return Err(format!(
                    "threads {} and {thread} both wrote {:#x}",
                    *w,
                    addr + j as u64
                ));
            }
            *w = thread;
            a.1[off + j] = b;
        }
        Ok(())
    }
}

/// Bank-conflict figures of a launch (1 = conflict-free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ldmatrix_ways: u32,
    pub cp_async_ways: u32,
    pub st_shared_ways: u32,
    pub ldmatrix_count: u64,
    pub mma_count: u64,
}

#[derive(Clone, Copy)]
struct Shadow {
    w_tid: u32,
    w_lo: u32,
    w_hi: u32,
    r_tid: u32,
    r_epoch: u32,
}

struct Pending {
    dst: u32,
    data: [u8; 16],
    issued: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Run,
    Barrier,
    Done,
}

struct Block<'a> {
    e: &'a Entry,
    params: &'a [u64],
    ctaid: u32,
    nregs: usize,
    smem_base: u64,
    regs: Vec<u64>,
    smem: Vec<u8>,
    shadow: Vec<Shadow>,
    epoch: u32,
    open: Vec<Vec<Pending>>,
    groups: Vec<VecDeque<Vec<Pending>>>,
    stats: Stats,
}

/// Worst number of distinct words one bank serves among `addrs` (each `width` bytes).
fn bank_ways(addrs: &[u32], width: u32) -> u32 {
    let mut words: Vec<u32> = addrs
        .iter()
        .flat_map(|&a| (0..width / 4).map(move |w| a / 4 + w))
        .collect();
    words.sort_unstable();
    words.dedup();
    let mut per_bank = [0u32; 32];
    for w in words {
        per_bank[(w % 32) as usize] += 1;
    }
    per_bank.into_iter().max().unwrap_or(0).max(1)
}

impl<'a> Block<'a> {
    fn reg(&self, t: usize, r: u16) -> u64 {
        self.regs[t * self.nregs + r as usize]
    }
    fn set(&mut self, t: usize, a: &Arg, v: u64) -> Result<(), String> {
        match a {
            Arg::Reg(r) => {
                self.regs[t * self.nregs + *r as usize] = v;
                Ok(())
            }
            _ => Err(format!("destination {a:?} is not a register")),
        }
    }
    fn val(&self, t: usize, a: &Arg) -> Result<u64, String> {
        Ok(match a {
            Arg::Reg(r) => self.reg(t, *r),
            Arg::Imm(i) => *i as u64,
            Arg::F32(b) => *b as u64,
            Arg::Tid => t as u64,
            Arg::Ctaid => self.ctaid as u64,
            Arg::Smem => self.smem_base,
            _ => return Err(format!("operand {a:?} has no value")),
        })
    }
    fn addr(&self, t: usize, a: &Arg) -> Result<u64, String> {
        match a {
            Arg::Mem(base, off) => Ok(self.val(t, base)?.wrapping_add(*off as u64)),
            _ => Err(format!("{a:?} is not an address")),
        }
    }
    fn vec_regs<'b>(&self, a: &'b Arg) -> Result<&'b [Arg], String> {
        match a {
            Arg::Vec(v) => Ok(v),
            _ => Err(format!("{a:?} is not a vector")),
        }
    }
    fn f(&self, t: usize, a: &Arg) -> Result<f32, String> {
        Ok(f32::from_bits(self.val(t, a)? as u32))
    }

    /// Checks a shared access at window address `addr`; returns its offset in the block's
    /// dynamic shared memory.
    fn smem_check(&self, addr: u64, len: usize) -> Result<usize, String> {
        if !addr.is_multiple_of(len.min(16) as u64) {
            return Err(format!(
                "shared access of {len} bytes at {addr:#x} misaligned"
            ));
        }
        let addr = addr
            .checked_sub(self.smem_base)
            .ok_or_else(|| format!("shared access at {addr:#x} below the dynamic shared memory"))?;
        if addr + len as u64 > self.smem.len() as u64 {
            return Err(format!(
                "shared access of {len} bytes at {addr:#x} past {}",
                self.smem.len()
            ));
        }
        Ok(addr as usize)
    }

    fn smem_write(&mut self, tid: u32, addr: usize, bytes: &[u8], lo: u32) -> Result<(), String> {
        let hi = self.epoch;
        for (j, &b) in bytes.iter().enumerate() {
            let s = &mut self.shadow[addr + j];
            if s.r_tid != NONE && s.r_tid != tid && s.r_epoch >= lo {
                return Err(format!(
                    "race: thread {tid} writes shared {:#x} (from epoch {lo}) that thread {} read in epoch {}",
                    addr + j,
                    s.r_tid,
                    s.r_epoch
                ));
            }
            if s.w_tid != NONE && s.w_tid != tid && s.w_hi >= lo {
                return Err(format!(
                    "race: threads {} and {tid} write shared {:#x} in one epoch",
                    s.w_tid,
                    addr + j
                ));
            }
            *s = Shadow {
                w_tid: tid,
                w_lo: lo,
                w_hi: hi,
                ..*s
            };
            self.smem[addr + j] = b;
        }
        Ok(())
    }

    fn smem_read(&mut self, tid: u32, addr: usize, len: usize) -> Result<Vec<u8>, String> {
        let e = self.epoch;
        for j in 0..len {
            let s = &mut self.shadow[addr + j];
            if s.w_tid != NONE && s.w_tid != tid && s.w_hi >= e {
                return Err(format!(
                    "race: thread {tid} reads shared {:#x} in epoch {e}, written by thread {} in epochs {}..={}",
                    addr + j,
                    s.w_tid,
                    s.w_lo,
                    s.w_hi
                ));
            }
            if s.r_epoch == e && s.r_tid != NONE && s.r_tid != tid {
                s.r_tid = MANY;
            } else if s.r_epoch != e || s.r_tid == NONE {
                s.r_tid = tid;
                s.r_epoch = e;
            }
        }
        Ok(self.smem[addr..addr + len].to_vec())
    }

    /// Completes thread `t`'s committed groups until at most `keep` remain.
    fn complete(&mut self, t: usize, keep: usize) -> Result<(), String> {
        while self.groups[t].len() > keep {
            let g = self.groups[t].pop_front().unwrap_or_default();
            for c in g {
                self.smem_write(t as u32, c.dst as usize, &c.data, c.issued)?;
            }
        }
        Ok(())
    }

    /// Runs warp `w` from `pc` until a barrier or the end; returns the new pc and state.
    fn run_warp(
        &mut self,
        w: usize,
        mut pc: usize,
        mem: &mut Memory,
    ) -> Result<(usize, State), String> {
        let lanes = w * 32..w * 32 + 32;
        loop {
            let Some(inst) = self.e.insts.get(pc) else {
                return Err("ran past the last instruction".into());
            };
            let inst: &Inst = inst;
            let at = |e: String| format!("line {} `{}`: {e}", inst.line, inst.opcode);
            let mut active = [true; 32];
            if let Some((p, neg)) = inst.guard {
                for (l, t) in lanes.clone().enumerate() {
                    active[l] = (self.reg(t, p) != 0) != neg;
                }
            }
            pc += 1;
            let op = inst.opcode.as_str();
            let a = &inst.args;
            match op {
                "bra" | "bra.uni" => {
                    let n = active.iter().filter(|&&x| x).count();
                    if n != 0 && n != 32 {
                        return Err(at("divergent branch".into()));
                    }
                    if n == 32 {
                        let Arg::Label(target) = a[0] else {
                            return Err(at("branch without label".into()));
                        };
                        pc = target;
                    }
                    continue;
                }
                "bar.sync" => return Ok((pc, State::Barrier)),
                "ret" => {
                    for t in lanes.clone() {
                        if !self.open[t].is_empty() || !self.groups[t].is_empty() {
                            return Err(at(format!("thread {t} exits with copies in flight")));
                        }
                    }
                    return Ok((pc, State::Done));
                }
                "ldmatrix.sync.aligned.m8n8.x4.shared.b16"
                | "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" => {
                    self.ldmatrix(w, a, op.contains(".trans")).map_err(at)?;
                    continue;
                }
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
                | "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" => {
                    self.mma(w, a, op.contains("bf16")).map_err(at)?;
                    continue;
                }
                _ => {}
            }
            if inst.guard.is_some() && (op.starts_with("ldmatrix") || op.starts_with("mma")) {
                return Err(at("guarded warp-wide instruction".into()));
            }
            let mut conflict_addrs: Vec<u32> = Vec::new();
            for (l, t) in lanes.clone().enumerate() {
                if active[l] {
                    self.lane(t, op, a, mem, &mut conflict_addrs).map_err(at)?;
                }
                if l % 8 == 7 && !conflict_addrs.is_empty() {
                    let ways = bank_ways(&conflict_addrs, 16);
                    let s = &mut self.stats;
                    if op.starts_with("cp.async.cg") {
                        s.cp_async_ways = s.cp_async_ways.max(ways);
                    } else {
                        s.st_shared_ways = s.st_shared_ways.max(ways);
                    }
                    conflict_addrs.clear();
                }
            }
        }
    }

    /// One lane's part of an ordinary instruction.
    fn lane(
        &mut self,
        t: usize,
        op: &str,
        a: &[Arg],
        mem: &mut Memory,
        conflicts: &mut Vec<u32>,
    ) -> Result<(), String> {
        let u = |b: &Self, i: usize| b.val(t, &a[i]).map(|v| v as u32);
        let s = |b: &Self, i: usize| b.val(t, &a[i]).map(|v| v as u32 as i32);
        let d = |v: u32| v as u64;
        let v: u64 = match op {
            "ld.param.u64" | "ld.param.u32" | "ld.param.f32" => {
                let Arg::Mem(p, _) = &a[1] else {
                    return Err("param".into());
                };
                let Arg::Param(name) = p.as_ref() else {
                    return Err("param".into());
                };
                let idx = self
                    .e
                    .params
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| format!("no parameter {name}"))?;
                self.params[idx]
            }
            "cvta.to.global.u64" | "mov.u64" | "mov.b64" => self.val(t, &a[1])?,
            "mov.u32" | "mov.f32" | "mov.b32" => match &a[1] {
                Arg::Vec(v) => {
                    (self.val(t, &v[0])? & 0xFFFF) | ((self.val(t, &v[1])? & 0xFFFF) << 16)
                }
                x => self.val(t, x)? & 0xFFFF_FFFF,
            },
            "mov.b16" => self.val(t, &a[1])? & 0xFFFF,
            "add.u32" | "add.s32" => d(u(self, 1)?.wrapping_add(u(self, 2)?)),
            "sub.u32" | "sub.s32" => d(u(self, 1)?.wrapping_sub(u(self, 2)?)),
            "mul.lo.u32" => d(u(self, 1)?.wrapping_mul(u(self, 2)?)),
            "shl.b32" => d(u(self, 1)?.checked_shl(u(self, 2)?).unwrap_or(0)),
            "shr.u32" => d(u(self, 1)?.checked_shr(u(self, 2)?).unwrap_or(0)),
            "and.b32" => d(u(self, 1)? & u(self, 2)?),
            "or.b32" => d(u(self, 1)? | u(self, 2)?),
            "xor.b32" => d(u(self, 1)? ^ u(self, 2)?),
            "div.u32" => d(u(self, 1)?
                .checked_div(u(self, 2)?)
                .ok_or("division by zero")?),
            "rem.u32" => d(u(self, 1)?
                .checked_rem(u(self, 2)?)
                .ok_or("division by zero")?),
            "min.u32" => d(u(self, 1)?.min(u(self, 2)?)),
            "min.s32" => d(s(self, 1)?.min(s(self, 2)?) as u32),
            "max.s32" => d(s(self, 1)?.max(s(self, 2)?) as u32),
            "add.u64" => self.val(t, &a[1])?.wrapping_add(self.val(t, &a[2])?),
            "shl.b64" => self.val(t, &a[1])? << u(self, 2)?,
            "mul.wide.u32" => u(self, 1)? as u64 * u(self, 2)? as u64,
            "cvt.u64.u32" => d(u(self, 1)?),
            "cvt.u32.u64" => self.val(t, &a[1])? & 0xFFFF_FFFF,
            "cvt.u32.u16" => self.val(t, &a[1])? & 0xFFFF,
            "selp.b32" | "selp.b64" => {
                if self.val(t, &a[3])? != 0 {
                    self.val(t, &a[1])?
                } else {
                    self.val(t, &a[2])?
                }
            }
            "and.pred" => ((self.val(t, &a[1])? != 0) && (self.val(t, &a[2])? != 0)) as u64,
            "not.pred" => (self.val(t, &a[1])? == 0) as u64,
            "mul.f32" => (self.f(t, &a[1])? * self.f(t, &a[2])?).to_bits() as u64,
            "add.f32" => (self.f(t, &a[1])? + self.f(t, &a[2])?).to_bits() as u64,
            "fma.rn.f32" => self
                .f(t, &a[1])?
                .mul_add(self.f(t, &a[2])?, self.f(t, &a[3])?)
                .to_bits() as u64,
            "ex2.approx.ftz.f32" => {
                let x = self.f(t, &a[1])?;
                let y = (x as f64).exp2() as f32;
                (if y.is_finite() && y.abs() < f32::MIN_POSITIVE {
                    0.0
                } else {
                    y
                })
                .to_bits() as u64
            }
            "rcp.approx.ftz.f32" => (1.0 / self.f(t, &a[1])?).to_bits() as u64,
            "cvt.rn.bf16.f32" => bf16::from_f32(self.f(t, &a[1])?).to_bits() as u64,
            "cvt.rn.f16.f32" => f16::from_f32(self.f(t, &a[1])?).to_bits() as u64,
            "cvt.f32.f16" => f16::from_bits(self.val(t, &a[1])? as u16)
                .to_f32()
                .to_bits() as u64,
            "ld.global.b16" | "ld.global.f32" | "ld.global.b32" => {
                let n = if op.ends_with("b16") { 2 } else { 4 };
                let addr = self.addr(t, &a[1])?;
                if addr % n as u64 != 0 {
                    return Err(format!("misaligned {n}-byte load at {addr:#x}"));
                }
                let b = mem.read(addr, n)?;
                b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64)
            }
            "st.global.b16" | "st.global.b32" | "st.global.f32" | "st.global.v2.f32" => {
                let addr = self.addr(t, &a[0])?;
                let bytes: Vec<u8> = match op {
                    "st.global.b16" => (self.val(t, &a[1])? as u16).to_le_bytes().to_vec(),
                    "st.global.v2.f32" => {
                        let r = self.vec_regs(&a[1])?;
                        let mut v = (self.val(t, &r[0])? as u32).to_le_bytes().to_vec();
                        v.extend((self.val(t, &r[1])? as u32).to_le_bytes());
                        v
                    }
                    _ => (self.val(t, &a[1])? as u32).to_le_bytes().to_vec(),
                };
                if addr % bytes.len() as u64 != 0 {
                    return Err(format!(
                        "misaligned {}-byte store at {addr:#x}",
                        bytes.len()
                    ));
                }
                return mem.store(addr, &bytes, self.ctaid * 100_000 + t as u32);
            }
            "st.shared.v4.b32" => {
                let addr = self.smem_check(self.addr(t, &a[0])?, 16)?;
                let r = self.vec_regs(&a[1])?;
                let mut bytes = Vec::new();
                for x in r {
                    bytes.extend((self.val(t, x)? as u32).to_le_bytes());
                }
                let e = self.epoch;
                conflicts.push((addr as u64 + self.smem_base) as u32);
                return self.smem_write(t as u32, addr, &bytes, e);
            }
            "cp.async.cg.shared.global" => {
                let dst = self.smem_check(self.addr(t, &a[0])?, 16)? as u32;
                let src = self.addr(t, &a[1])?;
                if a[2] != Arg::Imm(16) {
                    return Err("cp-size must be 16".into());
                }
                let n = self.val(t, &a[3])? as usize;
                if n > 16 {
                    return Err(format!("src-size {n} > 16"));
                }
                let mut data = [0u8; 16];
                if n > 0 {
                    if src % 16 != 0 {
                        return Err(format!("cp.async source {src:#x} not 16-byte aligned"));
                    }
                    data[..n].copy_from_slice(&mem.read(src, n)?);
                }
                conflicts.push((dst as u64 + self.smem_base) as u32);
                let issued = self.epoch;
                self.open[t].push(Pending { dst, data, issued });
                return Ok(());
            }
            "cp.async.commit_group" => {
                let g = std::mem::take(&mut self.open[t]);
                self.groups[t].push_back(g);
                return Ok(());
            }
            "cp.async.wait_group" => {
                let n = self.val(t, &a[0])? as usize;
                return self.complete(t, n);
            }
            "cp.async.wait_all" => {
                let g = std::mem::take(&mut self.open[t]);
                self.groups[t].push_back(g);
                return self.complete(t, 0);
            }
            _ if op.starts_with("setp.") => {
                let parts: Vec<&str> = op.split('.').collect();
                let (cmp, boolop, ty) = match parts.len() {
                    3 => (parts[1], None, parts[2]),
                    4 => (parts[1], Some(parts[2]), parts[3]),
                    _ => return Err("setp form".into()),
                };
                let ord = match ty {
                    "u32" => Some(u(self, 1)?.cmp(&u(self, 2)?)),
                    "s32" => Some(s(self, 1)?.cmp(&s(self, 2)?)),
                    "f32" => self.f(t, &a[1])?.partial_cmp(&self.f(t, &a[2])?),
                    _ => return Err(format!("setp type {ty}")),
                };
                use std::cmp::Ordering::*;
                let r = match (cmp, ord) {
                    ("lt", Some(o)) => o == Less,
                    ("le", Some(o)) => o != Greater,
                    ("gt", Some(o)) => o == Greater,
                    ("ge", Some(o)) => o != Less,
                    ("eq", Some(o)) => o == Equal,
                    ("ne", Some(o)) => o != Equal,
                    ("neu", o) => o != Some(Equal),
                    (_, None) => false,
                    (c, _) => return Err(format!("setp comparison {c}")),
                };
                let r = match boolop {
                    None => r,
                    Some("and") => r && self.val(t, &a[3])? != 0,
                    Some(b) => return Err(format!("setp bool op {b}")),
                };
                r as u64
            }
            _ => return Err("instruction not modelled".into()),
        };
        self.set(t, &a[0], v)
    }

    /// `ldmatrix.x4`: lanes 8j..8j+7 give the row addresses of matrix j; register j of lane t
    /// gets matrix j's row t/4, elements 2(t%4), 2(t%4)+1 — or with `.trans` its column t/4,
    /// rows 2(t%4), 2(t%4)+1.
    // Lane, matrix and register indices are the point of these two functions: index loops read
    // closer to the PTX ISA's description than iterator chains.
    #[allow(clippy::needless_range_loop)]
    fn ldmatrix(&mut self, w: usize, a: &[Arg], trans: bool) -> Result<(), String> {
        let dst = self.vec_regs(&a[0])?.to_vec();
        let mut rows = [[0u16; 8]; 32];
        for l in 0..32 {
            let t = w * 32 + l;
            let addr = self.smem_check(self.addr(t, &a[1])?, 16)?;
            let b = self.smem_read(t as u32, addr, 16)?;
            for (e, x) in rows[l].iter_mut().enumerate() {
                *x = u16::from_le_bytes([b[2 * e], b[2 * e + 1]]);
            }
        }
        for j in 0..4 {
            let addrs: Vec<u32> = (0..8)
                .map(|r| self.addr(w * 32 + 8 * j + r, &a[1]).map(|x| x as u32))
                .collect::<Result<_, _>>()?;
            self.stats.ldmatrix_ways = self.stats.ldmatrix_ways.max(bank_ways(&addrs, 16));
        }
        self.stats.ldmatrix_count += 1;
        for l in 0..32 {
            for (j, d) in dst.iter().enumerate() {
                let m = &rows[8 * j..8 * j + 8];
                let (lo, hi) = if trans {
                    (m[2 * (l % 4)][l / 4], m[2 * (l % 4) + 1][l / 4])
                } else {
                    (m[l / 4][2 * (l % 4)], m[l / 4][2 * (l % 4) + 1])
                };
                self.set(w * 32 + l, d, lo as u64 | (hi as u64) << 16)?;
            }
        }
        Ok(())
    }

    /// `mma.m16n8k16.row.col` with f32 accumulators. Lane t, g = t/4, q = t%4: A register r
    /// holds A[g + 8 (r%2)][2q + 8 (r/2) + {0,1}]; B register r holds B[2q + 8r + {0,1}][g];
    /// C/D register r holds D[g + 8 (r/2)][2q + r%2].
    #[allow(clippy::needless_range_loop)]
    fn mma(&mut self, w: usize, a: &[Arg], is_bf16: bool) -> Result<(), String> {
        let (d, ra, rb, rc) = (
            self.vec_regs(&a[0])?.to_vec(),
            self.vec_regs(&a[1])?.to_vec(),
            self.vec_regs(&a[2])?.to_vec(),
            self.vec_regs(&a[3])?.to_vec(),
        );
        let half = |x: u64| -> f64 {
            let h = x as u16;
            if is_bf16 {
                bf16::from_bits(h).to_f64()
            } else {
                f16::from_bits(h).to_f64()
            }
        };
        let mut am = [[0f64; 16]; 16];
        let mut bm = [[0f64; 8]; 16];
        let mut cm = [[0f64; 8]; 16];
        for l in 0..32 {
            let t = w * 32 + l;
            let (g, q) = (l / 4, l % 4);
            for r in 0..4 {
                let v = self.val(t, &ra[r])?;
                let (row, k) = (g + 8 * (r % 2), 2 * q + 8 * (r / 2));
                am[row][k] = half(v);
                am[row][k + 1] = half(v >> 16);
                let c = f32::from_bits(self.val(t, &rc[r])? as u32) as f64;
                cm[g + 8 * (r / 2)][2 * q + r % 2] = c;
            }
            for r in 0..2 {
                let v = self.val(t, &rb[r])?;
                let k = 2 * q + 8 * r;
                bm[k][g] = half(v);
                bm[k + 1][g] = half(v >> 16);
            }
        }
        self.stats.mma_count += 1;
        for l in 0..32 {
            let (g, q) = (l / 4, l % 4);
            for r in 0..4 {
                let (row, col) = (g + 8 * (r / 2), 2 * q + r % 2);
                let mut s = cm[row][col];
                for k in 0..16 {
                    s += am[row][k] * bm[k][col];
                }
                self.set(w * 32 + l, &d[r], (s as f32).to_bits() as u64)?;
            }
        }
        Ok(())
    }
}

/// Runs `entry` over `grid` blocks of `threads` threads with `smem` bytes of dynamic shared
/// memory. `params` are the raw parameter values in order (f32 as bits).
pub fn launch(
    entry: &Entry,
    grid: u32,
    threads: u32,
    smem: u32,
    params: &[u64],
    mem: &mut Memory,
) -> Result<Stats, String> {
    if !threads.is_multiple_of(32) || threads > entry.max_threads {
        return Err(format!("bad block size {threads}"));
    }
    if params.len() != entry.params.len() {
        return Err(format!(
            "{} params given, entry takes {}",
            params.len(),
            entry.params.len()
        ));
    }
    let mut total = Stats::default();
    for ctaid in 0..grid {
        let nt = threads as usize;
        let mut b = Block {
            e: entry,
            params,
            ctaid,
            nregs: entry.regs,
            smem_base: mem.shared_base,
            regs: vec![0; nt * entry.regs],
            smem: vec![0xFF; smem as usize],
            shadow: vec![
                Shadow {
                    w_tid: NONE,
                    w_lo: 0,
                    w_hi: 0,
                    r_tid: NONE,
                    r_epoch: 0,
                };
                smem as usize
            ],
            epoch: 0,
            open: (0..nt).map(|_| Vec::new()).collect(),
            groups: (0..nt).map(|_| VecDeque::new()).collect(),
            stats: Stats::default(),
        };
        let warps = nt / 32;
        let mut pcs = vec![0usize; warps];
        let mut states = vec![State::Run; warps];
        loop {
            for w in 0..warps {
                if states[w] == State::Run {
                    let (pc, st) = b
                        .run_warp(w, pcs[w], mem)
                        .map_err(|e| format!("{} block {ctaid} warp {w}: {e}", entry.name))?;
                    pcs[w] = pc;
                    states[w] = st;
                }
            }
            if states.iter().all(|s| *s == State::Done) {
                break;
            }
            if states.contains(&State::Done) {
                return Err(format!(
                    "{}: some warps exited while others wait at a barrier",
                    entry.name
                ));
            }
            b.epoch += 1;
            states.iter_mut().for_each(|s| *s = State::Run);
        }
        let s = b.stats;
        total.ldmatrix_ways = total.ldmatrix_ways.max(s.ldmatrix_ways);
        total.cp_async_ways = total.cp_async_ways.max(s.cp_async_ways);
        total.st_shared_ways = total.st_shared_ways.max(s.st_shared_ways);
        total.ldmatrix_count += s.ldmatrix_count;
        total.mma_count += s.mma_count;
    }
    Ok(total)
}
