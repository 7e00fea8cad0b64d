//! A small PTX interpreter for tests: it runs the `nn` kernels' PTX on the CPU so their index
//! math, predication, shuffles and barriers are exercised against the twins before a GPU sees
//! them. It covers exactly the instruction forms the family (and the elementwise template)
//! emits, and it is strict where hardware would silently misbehave: every global access must
//! fall inside one allocation and be aligned to its width, shared accesses must be in bounds
//! and aligned, a full-warp shuffle needs all 32 lanes at the same instruction, a barrier may
//! not be reached after some threads of the block exited, and a deadlock is an error.
//!
//! Threads run one at a time up to their next shuffle or barrier (a legal interleaving for
//! race-free code); with `reverse` set, blocks and threads run in the opposite order, so a
//! result that differs between the two orders reveals a race. Floating point follows the
//! IEEE operations of the `.rn` forms; `.approx` functions use the exact library functions
//! (the GPU's are within a few ulp).

mod parse;

use crate::desc::{Geometry, KernelDesc, Problem};
use half::{bf16, f16};
use parse::{Cmp, Inst, Kernel, Op, Operand, Space, Special, Ty, parse_module};
use std::collections::HashMap;

/// A launch argument.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

const BASE: u64 = 0x1_0000_0000;
/// Instruction budget per launch (an infinite loop is an error, not a hang).
const BUDGET: u64 = 400_000_000;

/// Device memory and the interpreter.
pub(crate) struct Gpu {
    mem: Vec<u8>,
    allocs: Vec<(u64, usize)>,
    modules: HashMap<&'static str, HashMap<String, Kernel>>,
    /// Run blocks and threads in reverse order.
    pub reverse: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Run,
    Shfl,
    Bar,
    Done,
}

struct Th {
    regs: Vec<u64>,
    pc: usize,
    st: St,
}

struct Blk<'a> {
    k: &'a Kernel,
    params: &'a [u64],
    shared: Vec<u8>,
    ntid: u32,
    cta: (u32, u32),
    ncta: (u32, u32),
}

fn mask(ty: Ty, v: u64) -> u64 {
    match ty.bytes() {
        1 => v & 1,
        2 => v & 0xFFFF,
        4 => v & 0xFFFF_FFFF,
        _ => v,
    }
}

fn f(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}

fn d(v: u64) -> f64 {
    f64::from_bits(v)
}

impl Gpu {
    pub fn new() -> Self {
        Gpu {
            mem: Vec::new(),
            allocs: Vec::new(),
            modules: HashMap::new(),
            reverse: false,
        }
    }

    /// `n` bytes of fresh memory, 256-byte aligned, filled with 0xFF (NaN patterns).
    pub fn alloc_bytes(&mut self, n: usize) -> u64 {
        let start = self.mem.len().div_ceil(256) * 256 + 256;
        self.mem.resize(start + n.max(1), 0xFF);
        let addr = BASE + start as u64;
        self.allocs.push((addr, n));
        addr
    }

    pub fn upload<T: bytemuck::Pod>(&mut self, v: &[T]) -> u64 {
        let a = self.alloc_bytes(std::mem::size_of_val(v));
        self.write(a, v);
        a
    }

    pub fn write<T: bytemuck::Pod>(&mut self, addr: u64, v: &[T]) {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let o = self
            .check(addr, bytes.len(), 1)
            .expect("host write in bounds");
        self.mem[o..o + bytes.len()].copy_from_slice(bytes);
    }

    pub fn read<T: bytemuck::Pod>(&self, addr: u64, n: usize) -> Vec<T> {
        let len = n * std::mem::size_of::<T>();
        let o = self.check(addr, len, 1).expect("host read in bounds");
        let mut out = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&self.mem[o..o + len]);
        out
    }

    fn check(&self, addr: u64, len: usize, align: usize) -> Result<usize, String> {
        if !addr.is_multiple_of(align as u64) {
            return Err(format!(
                "global access of {len} B at {addr:#x} is misaligned"
            ));
        }
        for &(a, n) in &self.allocs {
            if addr >= a && addr + len as u64 <= a + n as u64 {
                return Ok((addr - BASE) as usize);
            }
        }
        Err(format!(
            "global access of {len} B at {addr:#x} is outside every allocation"
        ))
    }

    /// Runs `desc` for `problem` with `args`, on the geometry the descriptor gives.
    pub fn launch(
        &mut self,
        desc: &KernelDesc,
        problem: &Problem,
        args: &[Arg],
    ) -> Result<(), String> {
        let g = (desc.geometry)(problem);
        self.launch_on(desc, g, args)
    }

    /// Runs `desc` on an explicit geometry (to reach shapes the descriptor picks only for
    /// large problems).
    pub fn launch_on(
        &mut self,
        desc: &KernelDesc,
        g: Geometry,
        args: &[Arg],
    ) -> Result<(), String> {
        if !self.modules.contains_key(desc.module.name) {
            let m = parse_module(&(desc.module.ptx)())?;
            self.modules.insert(desc.module.name, m.kernels);
        }
        let kernels = self.modules.remove(desc.module.name).unwrap_or_default();
        let r = self.launch_in(&kernels, desc, g, args);
        self.modules.insert(desc.module.name, kernels);
        r
    }

    fn launch_in(
        &mut self,
        kernels: &HashMap<String, Kernel>,
        desc: &KernelDesc,
        g: Geometry,
        args: &[Arg],
    ) -> Result<(), String> {
        let k = kernels
            .get(desc.entry)
            .ok_or_else(|| format!("{} not in its module", desc.entry))?;
        if args.len() != k.params.len() || args.len() != desc.args.len() {
            return Err(format!(
                "{}: {} arguments for {} parameters",
                k.name,
                args.len(),
                k.params.len()
            ));
        }
        let params: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) | Arg::U64(p) => p,
                Arg::U32(v) => v as u64,
                Arg::F32(x) => fb(x),
            })
            .collect();
        if g.block.1 != 1 || g.block.2 != 1 || g.grid.2 != 1 {
            return Err("only 1-D blocks and 2-D grids are emulated".into());
        }
        let shared = k.static_shared + g.shared_bytes as usize;
        let mut blocks: Vec<(u32, u32)> = (0..g.grid.1)
            .flat_map(|y| (0..g.grid.0).map(move |x| (x, y)))
            .collect();
        if self.reverse {
            blocks.reverse();
        }
        let mut budget = BUDGET;
        for cta in blocks {
            let mut b = Blk {
                k,
                params: &params,
                shared: vec![0xA5; shared],
                ntid: g.block.0,
                cta,
                ncta: (g.grid.0, g.grid.1),
            };
            self.run_block(&mut b, &mut budget)
                .map_err(|e| format!("{} block {cta:?}: {e}", k.name))?;
        }
        Ok(())
    }

    fn run_block(&mut self, b: &mut Blk<'_>, budget: &mut u64) -> Result<(), String> {
        let nt = b.ntid as usize;
        let mut th: Vec<Th> = (0..nt)
            .map(|_| Th {
                regs: vec![0; b.k.nregs],
                pc: 0,
                st: St::Run,
            })
            .collect();
        let nw = nt.div_ceil(32);
        let warps: Vec<usize> = if self.reverse {
            (0..nw).rev().collect()
        } else {
            (0..nw).collect()
        };
        loop {
            let mut progressed = false;
            // Each warp runs as far as it can (to a barrier or its end) before the next one
            // starts: the schedule in which a warp races furthest ahead of the others.
            for &w in &warps {
                let lanes = w * 32..(w * 32 + 32).min(nt);
                loop {
                    let order: Vec<usize> = if self.reverse {
                        lanes.clone().rev().collect()
                    } else {
                        lanes.clone().collect()
                    };
                    for t in order {
                        if th[t].st == St::Run {
                            self.run_thread(b, t, &mut th[t], budget)?;
                            progressed = true;
                        }
                    }
                    if !th[lanes.clone()].iter().any(|t| t.st == St::Shfl) {
                        break;
                    }
                    let pc = th[w * 32].pc;
                    if lanes.len() != 32
                        || th[lanes.clone()]
                            .iter()
                            .any(|t| t.st != St::Shfl || t.pc != pc)
                    {
                        return Err(format!(
                            "warp {w}: full-warp shuffle `{}` without all 32 lanes",
                            b.k.insts[th[lanes.start].pc].text
                        ));
                    }
                    shuffle(&b.k.insts[pc], &mut th[lanes.clone()])?;
                }
            }
            if th.iter().all(|t| t.st == St::Done) {
                return Ok(());
            }
            if th.iter().all(|t| t.st == St::Bar || t.st == St::Done) {
                if th.iter().any(|t| t.st == St::Done) {
                    return Err("barrier reached after some threads of the block exited".into());
                }
                for t in th.iter_mut() {
                    t.st = St::Run;
                    t.pc += 1;
                }
                progressed = true;
            }
            if !progressed {
                return Err("deadlock: threads wait on different synchronisation points".into());
            }
        }
    }

    fn run_thread(
        &mut self,
        b: &mut Blk<'_>,
        tid: usize,
        t: &mut Th,
        budget: &mut u64,
    ) -> Result<(), String> {
        loop {
            if *budget == 0 {
                return Err("instruction budget exhausted (infinite loop?)".into());
            }
            *budget -= 1;
            let inst = &b.k.insts[t.pc];
            if let Some((p, neg)) = inst.guard
                && (t.regs[p] != 0) == neg
            {
                t.pc += 1;
                continue;
            }
            match inst.op {
                Op::Bar => {
                    t.st = St::Bar;
                    return Ok(());
                }
                Op::ShflBfly | Op::ShflUp => {
                    t.st = St::Shfl;
                    return Ok(());
                }
                Op::Ret => {
                    t.st = St::Done;
                    return Ok(());
                }
                Op::Bra => {
                    let Operand::Label(target) = inst.ops[0] else {
                        return Err(format!("bad branch `{}`", inst.text));
                    };
                    t.pc = target;
                }
                _ => {
                    self.exec(b, tid, t, inst)
                        .map_err(|e| format!("thread {tid}: `{}`: {e}", inst.text))?;
                    t.pc += 1;
                }
            }
        }
    }

    fn exec(&mut self, b: &mut Blk<'_>, tid: usize, t: &mut Th, i: &Inst) -> Result<(), String> {
        let val = |t: &Th, o: &Operand| -> Result<u64, String> {
            Ok(match o {
                Operand::Reg(r) => t.regs[*r],
                Operand::Imm(v) => *v,
                Operand::Special(s) => match s {
                    Special::Tid => tid as u64,
                    Special::Ntid => b.ntid as u64,
                    Special::CtaidX => b.cta.0 as u64,
                    Special::CtaidY => b.cta.1 as u64,
                    Special::NctaidX => b.ncta.0 as u64,
                    Special::NctaidY => b.ncta.1 as u64,
                },
                _ => return Err("operand is not a value".into()),
            })
        };
        let reg = |o: &Operand| -> Result<usize, String> {
            match o {
                Operand::Reg(r) => Ok(*r),
                _ => Err("destination is not a register".into()),
            }
        };
        let ty = i.ty;
        let src = |k: usize| val(t, &i.ops[k]);
        let out: u64 = match i.op {
            Op::Mov => match (&i.ops[0], &i.ops[1]) {
                (Operand::Vec(ds), s) => {
                    let v = val(t, s)?;
                    let w = (ty.bytes() * 8 / ds.len()) as u32;
                    for (k, &dr) in ds.iter().enumerate() {
                        t.regs[dr] = (v >> (w * k as u32)) & ((1u64 << w) - 1);
                    }
                    return Ok(());
                }
                (_, Operand::Vec(ss)) => {
                    let w = (ty.bytes() * 8 / ss.len()) as u32;
                    let mut v = 0u64;
                    for (k, &sr) in ss.iter().enumerate() {
                        v |= (t.regs[sr] & ((1u64 << w) - 1)) << (w * k as u32);
                    }
                    v
                }
                _ => src(1)?,
            },
            Op::Add | Op::Sub | Op::MulLo | Op::Div | Op::Rem | Op::Min | Op::Max => {
                let (a, c) = (src(1)?, src(2)?);
                arith(i.op, ty, a, c)?
            }
            Op::MulWide => (src(1)? as u32 as u64) * (src(2)? as u32 as u64),
            Op::Mad => {
                let (a, c, e) = (src(1)?, src(2)?, src(3)?);
                arith(Op::Add, ty, arith(Op::MulLo, ty, a, c)?, e)?
            }
            Op::Fma => fb(f(src(1)?).mul_add(f(src(2)?), f(src(3)?))),
            Op::Shl | Op::Shr => {
                let (a, s) = (src(1)?, src(2)? as u32);
                let bits = (ty.bytes() * 8) as u32;
                if s >= bits {
                    0
                } else if i.op == Op::Shl {
                    a << s
                } else {
                    mask(ty, a) >> s
                }
            }
            Op::And => src(1)? & src(2)?,
            Op::Or => src(1)? | src(2)?,
            Op::Xor => src(1)? ^ src(2)?,
            Op::Not => !src(1)?,
            Op::Setp(cmp, comb) => {
                let (a, c) = (src(1)?, src(2)?);
                let r = compare(cmp, ty, a, c);
                let r = match comb {
                    None => r,
                    Some(true) => r && src(3)? != 0,
                    Some(false) => r || src(3)? != 0,
                };
                r as u64
            }
            Op::Selp => {
                if src(3)? != 0 {
                    src(1)?
                } else {
                    src(2)?
                }
            }
            Op::Cvt(from) => convert(ty, from, src(1)?)?,
            Op::Cvta => src(1)?,
            Op::TestpFinite => f(src(1)?).is_finite() as u64,
            Op::TestpNan => f(src(1)?).is_nan() as u64,
            Op::Ex2 => fb(f(src(1)?).exp2()),
            Op::Lg2 => fb(f(src(1)?).log2()),
            Op::Sqrt => fb(f(src(1)?).sqrt()),
            Op::Rcp => match ty {
                Ty::F64 => (1.0 / d(src(1)?)).to_bits(),
                _ => fb(1.0 / f(src(1)?)),
            },
            Op::Ld(space, vw) => {
                let addr = self.address(b, t, &i.ops[1])?;
                let dsts: Vec<usize> = match &i.ops[0] {
                    Operand::Vec(v) => v.clone(),
                    o => vec![reg(o)?],
                };
                if dsts.len() != vw {
                    return Err("vector width".into());
                }
                for (k, &dr) in dsts.iter().enumerate() {
                    t.regs[dr] = self.load(b, space, addr, k, vw, ty)?;
                }
                return Ok(());
            }
            Op::St(space, vw) => {
                let addr = self.address(b, t, &i.ops[0])?;
                let vals: Vec<u64> = match &i.ops[1] {
                    Operand::Vec(v) => v.iter().map(|&r| t.regs[r]).collect(),
                    o => vec![val(t, o)?],
                };
                if vals.len() != vw {
                    return Err("vector width".into());
                }
                for (k, &v) in vals.iter().enumerate() {
                    self.store(b, space, addr, k, vw, ty, v)?;
                }
                return Ok(());
            }
            Op::Bar | Op::Bra | Op::Ret | Op::ShflBfly | Op::ShflUp => unreachable!(),
        };
        let width = if i.op == Op::MulWide { Ty::U64 } else { ty };
        t.regs[reg(&i.ops[0])?] = mask(width, out);
        Ok(())
    }

    fn address(&self, b: &Blk<'_>, t: &Th, o: &Operand) -> Result<u64, String> {
        match o {
            Operand::Mem(Some(r), off) => Ok(t.regs[*r].wrapping_add(*off as u64)),
            Operand::Mem(None, off) => Ok(*off as u64),
            _ => Err(format!("not an address ({} params)", b.params.len())),
        }
    }

    fn load(
        &self,
        b: &Blk<'_>,
        space: Space,
        addr: u64,
        k: usize,
        vw: usize,
        ty: Ty,
    ) -> Result<u64, String> {
        let n = ty.bytes();
        let bytes: &[u8] = match space {
            Space::Param => return Ok(mask(ty, b.params[addr as usize])),
            Space::Shared => {
                let o = shared_check(b, addr, n * vw)? + k * n;
                &b.shared[o..o + n]
            }
            Space::Global => {
                let o = self.check(addr, n * vw, n * vw)? + k * n;
                &self.mem[o..o + n]
            }
        };
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(v))
    }

    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        b: &mut Blk<'_>,
        space: Space,
        addr: u64,
        k: usize,
        vw: usize,
        ty: Ty,
        v: u64,
    ) -> Result<(), String> {
        let n = ty.bytes();
        let bytes = v.to_le_bytes();
        match space {
            Space::Param => return Err("store to a parameter".into()),
            Space::Shared => {
                let o = shared_check(b, addr, n * vw)? + k * n;
                b.shared[o..o + n].copy_from_slice(&bytes[..n]);
            }
            Space::Global => {
                let o = self.check(addr, n * vw, n * vw)? + k * n;
                self.mem[o..o + n].copy_from_slice(&bytes[..n]);
            }
        }
        Ok(())
    }
}

fn shared_check(b: &Blk<'_>, addr: u64, len: usize) -> Result<usize, String> {
    if !addr.is_multiple_of(len as u64) {
        return Err(format!(
            "shared access of {len} B at {addr:#x} is misaligned"
        ));
    }
    if addr as usize + len > b.shared.len() {
        return Err(format!(
            "shared access of {len} B at {addr:#x} past the block's {} B",
            b.shared.len()
        ));
    }
    Ok(addr as usize)
}

fn shuffle(i: &Inst, lanes: &mut [Th]) -> Result<(), String> {
    let reg = |o: &Operand| match o {
        Operand::Reg(r) => Ok(*r),
        _ => Err(format!("shuffle operand in `{}`", i.text)),
    };
    let imm = |o: &Operand| match o {
        Operand::Imm(v) => Ok(*v),
        _ => Err(format!("shuffle immediate in `{}`", i.text)),
    };
    let (dst, a) = (reg(&i.ops[0])?, reg(&i.ops[1])?);
    let off = imm(&i.ops[2])? as usize;
    if imm(&i.ops[4])? as u32 != u32::MAX {
        return Err("only full-warp shuffles are emulated".into());
    }
    let vals: Vec<u64> = lanes.iter().map(|t| t.regs[a]).collect();
    for (l, t) in lanes.iter_mut().enumerate() {
        let (v, ok) = match i.op {
            Op::ShflBfly => (vals[l ^ off], true),
            _ if l >= off => (vals[l - off], true),
            _ => (vals[l], false),
        };
        t.regs[dst] = v;
        if let Some(p) = i.pdst {
            t.regs[p] = ok as u64;
        }
        t.st = St::Run;
        t.pc += 1;
    }
    Ok(())
}

fn arith(op: Op, ty: Ty, a: u64, c: u64) -> Result<u64, String> {
    Ok(match ty {
        Ty::F32 => {
            let (x, y) = (f(a), f(c));
            fb(match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::MulLo => x * y,
                Op::Div => x / y,
                Op::Min => x.min(y),
                Op::Max => x.max(y),
                _ => return Err("f32 op".into()),
            })
        }
        Ty::F64 => {
            let (x, y) = (d(a), d(c));
            (match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::MulLo => x * y,
                Op::Div => x / y,
                Op::Min => x.min(y),
                Op::Max => x.max(y),
                _ => return Err("f64 op".into()),
            })
            .to_bits()
        }
        Ty::U32 | Ty::S32 | Ty::U16 | Ty::B16 => {
            let (x, y) = (a as u32, c as u32);
            (match op {
                Op::Add => x.wrapping_add(y),
                Op::Sub => x.wrapping_sub(y),
                Op::MulLo => x.wrapping_mul(y),
                Op::Div if y != 0 => x / y,
                Op::Rem if y != 0 => x % y,
                Op::Min => x.min(y),
                Op::Max => x.max(y),
                _ => return Err("u32 op (division by zero?)".into()),
            }) as u64
        }
        Ty::U64 | Ty::S64 => match op {
            Op::Add => a.wrapping_add(c),
            Op::Sub => a.wrapping_sub(c),
            Op::MulLo => a.wrapping_mul(c),
            Op::Div if c != 0 => a / c,
            Op::Rem if c != 0 => a % c,
            Op::Min => a.min(c),
            Op::Max => a.max(c),
            _ => return Err("u64 op".into()),
        },
        _ => return Err("arithmetic type".into()),
    })
}

fn compare(cmp: Cmp, ty: Ty, a: u64, c: u64) -> bool {
    use std::cmp::Ordering::*;
    let ord = match ty {
        Ty::F32 => f(a).partial_cmp(&f(c)),
        Ty::F64 => d(a).partial_cmp(&d(c)),
        Ty::S32 => Some((a as i32).cmp(&(c as i32))),
        Ty::S64 => Some((a as i64).cmp(&(c as i64))),
        _ => Some(mask(ty, a).cmp(&mask(ty, c))),
    };
    // Float comparisons are ordered: any NaN makes every comparison false.
    match (cmp, ord) {
        (_, None) => false,
        (Cmp::Eq, Some(o)) => o == Equal,
        (Cmp::Ne, Some(o)) => o != Equal,
        (Cmp::Lt, Some(o)) => o == Less,
        (Cmp::Le, Some(o)) => o != Greater,
        (Cmp::Gt, Some(o)) => o == Greater,
        (Cmp::Ge, Some(o)) => o != Less,
    }
}

fn convert(to: Ty, from: Ty, v: u64) -> Result<u64, String> {
    Ok(match (to, from) {
        (Ty::U64, Ty::U32) => v & 0xFFFF_FFFF,
        (Ty::U32, Ty::U64) | (Ty::U16, Ty::U32) => v,
        (Ty::F32, Ty::F16) => fb(f16::from_bits(v as u16).to_f32()),
        (Ty::Bf16, Ty::F32) => bf16::from_f32(f(v)).to_bits() as u64,
        (Ty::F16, Ty::F32) => f16::from_f32(f(v)).to_bits() as u64,
        (Ty::F64, Ty::F32) => (f(v) as f64).to_bits(),
        (Ty::F32, Ty::F64) => fb(d(v) as f32),
        (Ty::F32, Ty::U32) => fb(v as u32 as f32),
        _ => return Err(format!("cvt {to:?} <- {from:?}")),
    })
}
