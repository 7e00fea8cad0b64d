//! Launch validation, the block scheduler, warps and the instruction dispatch loop.

use super::alu::{self, Lanes};
use super::cvt;
use super::smem::{Clocks, Smem};
use super::sync::{BarState, Mbar};
use crate::error::{ErrorKind, SimError, Site};
use crate::ir::*;
use crate::memory::Snapshot;
use crate::{Counters, Launch, Param, Region, SimConfig};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// What every block of one launch shares (read-only).
pub(crate) struct LaunchCtx<'a> {
    pub(crate) k: &'a Kernel,
    pub(crate) params: Vec<u8>,
    pub(crate) mem: Snapshot,
    pub(crate) regions: &'a [Region],
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) nthreads: u32,
    pub(crate) dyn_shared: u32,
    pub(crate) shared_size: u32,
    pub(crate) budget: u64,
    pub(crate) abort: AtomicBool,
}

fn bad_launch(msg: String) -> SimError {
    SimError::new(ErrorKind::BadLaunch, msg)
}

/// Packs the parameter values into the kernel's parameter buffer.
fn pack_params(k: &Kernel, params: &[Param]) -> Result<Vec<u8>, SimError> {
    if params.len() != k.params.len() {
        return Err(bad_launch(format!(
            "`{}` takes {} parameters, {} given",
            k.name,
            k.params.len(),
            params.len()
        )));
    }
    let mut buf = vec![0u8; k.param_bytes as usize];
    for (i, (d, p)) in k.params.iter().zip(params).enumerate() {
        let bytes: Vec<u8> = match (p, d.array, d.ty, d.size) {
            (Param::U32(v), false, Ty::U(32) | Ty::S(32) | Ty::B(32), 4) => v.to_le_bytes().into(),
            (Param::U64(v), false, Ty::U(64) | Ty::S(64) | Ty::B(64), 8) => v.to_le_bytes().into(),
            (Param::F32(v), false, Ty::F32 | Ty::B(32), 4) => v.to_le_bytes().into(),
            (Param::Bytes(b), true, _, n) if b.len() == n as usize => b.clone(),
            _ => {
                return Err(bad_launch(format!(
                    "parameter {i} (`{}`, {:?}{}) of `{}` given as {p:?}",
                    d.name,
                    d.ty,
                    if d.array { " array" } else { "" },
                    k.name
                )));
            }
        };
        let o = d.offset as usize;
        buf[o..o + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(buf)
}

/// Checks a launch and runs all its blocks.
pub(crate) fn run_launch(
    k: &Kernel,
    launch: &Launch,
    mem: Snapshot,
    config: &SimConfig,
) -> Result<Counters, SimError> {
    let (g, b) = (launch.grid, launch.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || g.0 >= 1 << 31 || g.1 > 65535 || g.2 > 65535 {
        return Err(bad_launch(format!("grid {g:?} out of range")));
    }
    let nthreads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if b.0 == 0 || b.1 == 0 || b.2 == 0 || b.0 > 1024 || b.1 > 1024 || b.2 > 64 || nthreads > 1024 {
        return Err(bad_launch(format!(
            "block {b:?} out of range (at most 1024 threads)"
        )));
    }
    if let Some(r) = k.reqntid.filter(|r| *r != b) {
        return Err(bad_launch(format!(
            "`{}` requires block {r:?}, got {b:?}",
            k.name
        )));
    }
    if let Some(m) = k
        .maxntid
        .filter(|m| nthreads > m.0 as u64 * m.1 as u64 * m.2 as u64)
    {
        return Err(bad_launch(format!(
            "`{}` allows at most {m:?} threads, got {b:?}",
            k.name
        )));
    }
    let shared_size = k.dyn_shared_base as u64 + launch.shared_bytes as u64;
    if shared_size > config.max_shared_per_block_optin as u64 {
        return Err(bad_launch(format!(
            "{} bytes of shared memory (static {} + dynamic {}) exceed the {} a block may use",
            shared_size, k.static_shared, launch.shared_bytes, config.max_shared_per_block_optin
        )));
    }
    let ctx = LaunchCtx {
        k,
        params: pack_params(k, &launch.params)?,
        mem,
        regions: &launch.regions,
        grid: g,
        block: b,
        nthreads: nthreads as u32,
        dyn_shared: launch.shared_bytes,
        shared_size: shared_size as u32,
        budget: config.instruction_budget,
        abort: AtomicBool::new(false),
    };
    let nblocks = g.0 as u64 * g.1 as u64 * g.2 as u64;
    let one = |i: u64| -> Result<Counters, SimError> {
        if ctx.abort.load(Ordering::Relaxed) {
            return Ok(Counters::default());
        }
        let r = Block::new(&ctx, i).run();
        if r.is_err() {
            ctx.abort.store(true, Ordering::Relaxed);
        }
        r
    };
    let total = if config.parallel_blocks && nblocks > 1 {
        (0..nblocks)
            .into_par_iter()
            .map(one)
            .try_reduce(Counters::default, |a, b| Ok(add(a, &b)))?
    } else {
        let mut t = Counters::default();
        for i in 0..nblocks {
            t = add(t, &one(i)?);
        }
        t
    };
    let mut total = total;
    total.blocks = nblocks;
    total.threads_per_block = nthreads as u32;
    total.static_shared_bytes = k.static_shared;
    total.dynamic_shared_bytes = launch.shared_bytes;
    Ok(total)
}

fn add(mut a: Counters, b: &Counters) -> Counters {
    let (x, y) = (&mut a.warp_instructions, &b.warp_instructions);
    x.int += y.int;
    x.fp += y.fp;
    x.sfu += y.sfu;
    x.convert += y.convert;
    x.global_mem += y.global_mem;
    x.shared_mem += y.shared_mem;
    x.param_mem += y.param_mem;
    x.control += y.control;
    x.sync += y.sync;
    x.tensor += y.tensor;
    x.async_copy += y.async_copy;
    a.lane_instructions += b.lane_instructions;
    a.global_load_requests += b.global_load_requests;
    a.global_store_requests += b.global_store_requests;
    a.global_load_sectors += b.global_load_sectors;
    a.global_store_sectors += b.global_store_sectors;
    a.global_load_bytes += b.global_load_bytes;
    a.global_store_bytes += b.global_store_bytes;
    a.global_atomics += b.global_atomics;
    a.shared_load_requests += b.shared_load_requests;
    a.shared_store_requests += b.shared_store_requests;
    a.shared_bank_conflicts += b.shared_bank_conflicts;
    a.tma_bytes += b.tma_bytes;
    a.cp_async_bytes += b.cp_async_bytes;
    a.tensor_flops += b.tensor_flops;
    a
}

/// Why a warp is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WState {
    Ready,
    /// Waiting at named barrier `id`.
    Bar(u32),
    /// Parked on an mbarrier phase (shared offset, parity).
    Mbar(u32, u32),
    /// Waiting for the other warps of warpgroup `g` at a `wgmma.mma_async`.
    Wg(u32),
    Done,
}

/// A `cp.async` copy issued but not yet waited for.
pub(crate) struct PendingCopy {
    pub(crate) lane: u8,
    pub(crate) group: u32,
    pub(crate) dst: u32,
    pub(crate) len: u8,
    pub(crate) data: [u8; 16],
}

pub(crate) struct Warp {
    pub(crate) regs: Vec<u64>,
    pc: [u32; 32],
    uniform: bool,
    upc: u32,
    pub(crate) live: u32,
    pub(crate) exists: u32,
    pub(crate) state: WState,
    pub(crate) cp: Vec<PendingCopy>,
    pub(crate) cp_committed: [u32; 32],
    pub(crate) maxnreg: Option<u32>,
    /// Accumulator slots of wgmma ops not yet committed, and of committed groups not yet
    /// retired by `wgmma.wait_group`.
    pub(crate) wg_open: Vec<Slot>,
    pub(crate) wg_groups: std::collections::VecDeque<Vec<Slot>>,
    pub(crate) wg_busy: bool,
}

impl Warp {
    #[inline]
    fn group(&self) -> (u32, u32) {
        if self.uniform {
            return (self.upc, self.live);
        }
        let mut min = u32::MAX;
        let mut mask = 0;
        let mut m = self.live;
        while m != 0 {
            let l = m.trailing_zeros();
            m &= m - 1;
            let p = self.pc[l as usize];
            if p < min {
                min = p;
                mask = 1 << l;
            } else if p == min {
                mask |= 1 << l;
            }
        }
        (min, mask)
    }

    /// Moves the lanes of group `g` (at `p`): `taken` to `target`, the others to `p + 1`.
    #[inline]
    fn finish(&mut self, g: u32, p: u32, taken: u32, target: u32) {
        if self.uniform {
            if taken == 0 {
                self.upc = p + 1;
                return;
            }
            if taken == g {
                self.upc = target;
                return;
            }
            self.pc = [p; 32];
            self.uniform = false;
        }
        let mut m = g;
        while m != 0 {
            let l = m.trailing_zeros();
            m &= m - 1;
            self.pc[l as usize] = if taken >> l & 1 != 0 { target } else { p + 1 };
        }
        self.reconverge();
    }

    fn reconverge(&mut self) {
        if self.live == 0 {
            return;
        }
        let first = self.pc[self.live.trailing_zeros() as usize];
        let mut m = self.live;
        while m != 0 {
            let l = m.trailing_zeros();
            m &= m - 1;
            if self.pc[l as usize] != first {
                return;
            }
        }
        self.uniform = true;
        self.upc = first;
    }

    #[inline]
    pub(crate) fn lanes(&self, s: Slot) -> &[u64] {
        let i = s as usize * 32;
        &self.regs[i..i + 32]
    }

    #[inline]
    pub(crate) fn get(&self, s: Src) -> Lanes {
        match s {
            Src::Reg(r) => {
                let mut o = [0u64; 32];
                o.copy_from_slice(self.lanes(r));
                o
            }
            Src::Imm(v) => [v; 32],
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, d: Slot, v: &Lanes, mask: u32) {
        let i = d as usize * 32;
        let dst = &mut self.regs[i..i + 32];
        if mask == u32::MAX {
            dst.copy_from_slice(v);
        } else {
            let mut m = mask;
            while m != 0 {
                let l = m.trailing_zeros() as usize;
                m &= m - 1;
                dst[l] = v[l];
            }
        }
    }

    #[inline]
    pub(crate) fn pred_mask(&self, s: Slot) -> u32 {
        let r = self.lanes(s);
        let mut m = 0u32;
        for (l, v) in r.iter().enumerate() {
            m |= ((*v & 1) as u32) << l;
        }
        m
    }
}

/// What an instruction does to the warp's control flow.
pub(crate) enum Flow {
    Next,
    Jump(u32, u32),
    Exit(u32),
    /// Done; the warp waits (barrier) after moving on.
    NextWait,
    /// Not done; the warp waits and runs the instruction again later.
    Retry,
}

pub(crate) struct Block<'a> {
    pub(crate) l: &'a LaunchCtx<'a>,
    pub(crate) ctaid: (u32, u32, u32),
    pub(crate) warps: Vec<Warp>,
    pub(crate) smem: Smem,
    pub(crate) clocks: Clocks,
    pub(crate) bars: Vec<BarState>,
    pub(crate) mbars: HashMap<u32, Mbar>,
    /// Warps (and the PC) that reached a `wgmma.mma_async`, per warpgroup.
    pub(crate) wg_arrived: Vec<Vec<(usize, u32)>>,
    pub(crate) c: Counters,
    pub(crate) cur_pc: u32,
    pub(crate) exited_threads: u32,
    executed: u64,
}

impl<'a> Block<'a> {
    fn new(l: &'a LaunchCtx<'a>, i: u64) -> Block<'a> {
        let g = l.grid;
        let ctaid = (
            (i % g.0 as u64) as u32,
            ((i / g.0 as u64) % g.1 as u64) as u32,
            (i / (g.0 as u64 * g.1 as u64)) as u32,
        );
        let nwarps = l.nthreads.div_ceil(32) as usize;
        let k = l.k;
        let mut warps = Vec::with_capacity(nwarps);
        for w in 0..nwarps {
            let n = (l.nthreads - w as u32 * 32).min(32);
            let exists = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
            let mut regs = vec![0u64; k.nslots as usize * 32];
            for &(s, sp) in &k.specials {
                for lane in 0..32u32 {
                    let t = w as u32 * 32 + lane;
                    let tid = [
                        t % l.block.0,
                        (t / l.block.0) % l.block.1,
                        t / (l.block.0 * l.block.1),
                    ];
                    let dims = |v: (u32, u32, u32), d: u8| [v.0, v.1, v.2][d as usize];
                    let v: u64 = match sp {
                        Special::Tid(d) => tid[d as usize] as u64,
                        Special::Ntid(d) => dims(l.block, d) as u64,
                        Special::Ctaid(d) => dims(ctaid, d) as u64,
                        Special::Nctaid(d) => dims(g, d) as u64,
                        Special::LaneId => lane as u64,
                        Special::WarpId => w as u64,
                        Special::NWarpId => nwarps as u64,
                        Special::DynSmem => l.dyn_shared as u64,
                        Special::TotalSmem => l.shared_size as u64,
                        Special::LaneMaskEq => 1u64 << lane,
                        Special::LaneMaskLt => (1u64 << lane) - 1,
                        Special::LaneMaskLe => (2u64 << lane) - 1,
                        Special::LaneMaskGt => (u32::MAX as u64) & !((2u64 << lane) - 1),
                        Special::LaneMaskGe => (u32::MAX as u64) & !((1u64 << lane) - 1),
                    };
                    regs[s as usize * 32 + lane as usize] = v;
                }
            }
            warps.push(Warp {
                regs,
                pc: [0; 32],
                uniform: true,
                upc: 0,
                live: exists,
                exists,
                state: WState::Ready,
                cp: Vec::new(),
                cp_committed: [0; 32],
                maxnreg: None,
                wg_open: Vec::new(),
                wg_groups: std::collections::VecDeque::new(),
                wg_busy: false,
            });
        }
        Block {
            l,
            ctaid,
            smem: Smem::new(l.shared_size as usize),
            clocks: Clocks::new(nwarps),
            bars: (0..16).map(|_| BarState::default()).collect(),
            mbars: HashMap::new(),
            wg_arrived: vec![Vec::new(); nwarps.div_ceil(4)],
            warps,
            c: Counters::default(),
            cur_pc: 0,
            exited_threads: 0,
            executed: 0,
        }
    }

    /// The site of the current instruction for warp `w`, lane `lane`.
    pub(crate) fn fault(
        &self,
        w: usize,
        lane: u32,
        kind: ErrorKind,
        msg: String,
        addr: Option<u64>,
    ) -> SimError {
        self.fault_at(self.cur_pc, w, lane, kind, msg, addr)
    }

    fn fault_at(
        &self,
        pc: u32,
        w: usize,
        lane: u32,
        kind: ErrorKind,
        msg: String,
        addr: Option<u64>,
    ) -> SimError {
        let k = self.l.k;
        let t = w as u32 * 32 + lane;
        let b = self.l.block;
        let pc = pc as usize;
        SimError::new(kind, msg).at(Site {
            kernel: k.name.clone(),
            block: self.ctaid,
            thread: (t % b.0, (t / b.0) % b.1, t / (b.0 * b.1)),
            line: k.insts.get(pc).map_or(0, |i| i.line),
            text: k.texts.get(pc).cloned().unwrap_or_default(),
            addr,
        })
    }

    fn run(mut self) -> Result<Counters, SimError> {
        loop {
            let mut ran = false;
            for w in 0..self.warps.len() {
                if self.warps[w].state == WState::Ready {
                    ran = true;
                    self.run_warp(w)?;
                }
                if self.l.abort.load(Ordering::Relaxed) {
                    return Ok(Counters::default());
                }
            }
            if self.warps.iter().all(|w| w.state == WState::Done) {
                return Ok(self.c);
            }
            if !ran {
                return Err(self.stuck());
            }
        }
    }

    fn run_warp(&mut self, wi: usize) -> Result<(), SimError> {
        let k = self.l.k;
        loop {
            let w = &self.warps[wi];
            if w.live == 0 {
                self.warps[wi].state = WState::Done;
                return Ok(());
            }
            let (pc, g) = w.group();
            let Some(inst) = k.insts.get(pc as usize) else {
                self.cur_pc = k.insts.len() as u32 - 1;
                return Err(self.fault(
                    wi,
                    g.trailing_zeros(),
                    ErrorKind::Trap,
                    "ran past the end of the kernel".into(),
                    None,
                ));
            };
            self.cur_pc = pc;
            let exec = match inst.guard {
                None => g,
                Some((p, neg)) => {
                    let m = w.pred_mask(p);
                    g & if neg { !m } else { m }
                }
            };
            let (live, exists) = (w.live, w.exists);
            self.count(inst.class, exec);
            self.executed += 1;
            if self.executed > self.l.budget {
                return Err(self.fault(
                    wi,
                    exec.trailing_zeros().min(31),
                    ErrorKind::Trap,
                    format!("over the instruction budget of {} warp instructions per block (an endless loop?)", self.l.budget),
                    None,
                ));
            }
            if inst.aligned && exec != 0 && (exec != live || live != exists) {
                let missing = (exists & !exec).trailing_zeros();
                return Err(self.fault(
                    wi,
                    exec.trailing_zeros(),
                    ErrorKind::Barrier,
                    format!("`.aligned` instruction reached by lanes {exec:#010x} of the warp; lane {missing} is missing (divergent, predicated off or exited)"),
                    None,
                ));
            }
            if self.warps[wi].wg_busy
                && exec != 0
                && !matches!(
                    inst.op,
                    Op::Wgmma { .. } | Op::WgmmaCommit | Op::WgmmaWait { .. } | Op::WgmmaFence
                )
            {
                self.wgmma_hazard(wi, &inst.op, exec.trailing_zeros())?;
            }
            let flow = if exec == 0 && !matches!(inst.op, Op::Exit) {
                Flow::Next
            } else {
                self.exec(wi, &inst.op, exec)?
            };
            let w = &mut self.warps[wi];
            match flow {
                Flow::Next => w.finish(g, pc, 0, 0),
                Flow::Jump(taken, t) => w.finish(g, pc, taken, t),
                Flow::Exit(m) => {
                    w.live &= !m;
                    self.exited_threads += m.count_ones();
                    w.finish(g & !m, pc, 0, 0);
                    if w.live == 0 {
                        w.state = WState::Done;
                        self.after_exit(wi)?;
                        return Ok(());
                    }
                }
                Flow::NextWait => {
                    w.finish(g, pc, 0, 0);
                    if w.state != WState::Ready {
                        return Ok(());
                    }
                }
                Flow::Retry => return Ok(()),
            }
        }
    }

    fn count(&mut self, class: Class, exec: u32) {
        let c = &mut self.c.warp_instructions;
        match class {
            Class::Int => c.int += 1,
            Class::Fp => c.fp += 1,
            Class::Sfu => c.sfu += 1,
            Class::Convert => c.convert += 1,
            Class::GlobalMem => c.global_mem += 1,
            Class::SharedMem => c.shared_mem += 1,
            Class::ParamMem => c.param_mem += 1,
            Class::Control => c.control += 1,
            Class::Sync => c.sync += 1,
            Class::Tensor => c.tensor += 1,
            Class::AsyncCopy => c.async_copy += 1,
        }
        self.c.lane_instructions += exec.count_ones() as u64;
    }

    /// Executes one instruction for the lanes in `exec`.
    fn exec(&mut self, wi: usize, op: &Op, exec: u32) -> Result<Flow, SimError> {
        let w = &mut self.warps[wi];
        match op {
            Op::Int {
                op,
                bits,
                signed,
                d,
                a,
                b,
            } => {
                let r = alu::int_op(*op, *bits, *signed, &w.get(*a), &w.get(*b));
                w.put(*d, &r, exec);
            }
            Op::IntUn { op, bits, d, a } => {
                let r = alu::int_un(*op, *bits, &w.get(*a));
                w.put(*d, &r, exec);
            }
            Op::MulWide {
                signed,
                bits,
                d,
                a,
                b,
            } => {
                let r = alu::mul_wide(*signed, *bits, &w.get(*a), &w.get(*b));
                w.put(*d, &r, exec);
            }
            Op::Mad {
                hi,
                wide,
                signed,
                bits,
                d,
                a,
                b,
                c,
            } => {
                let r = alu::mad(
                    *hi,
                    *wide,
                    *signed,
                    *bits,
                    &w.get(*a),
                    &w.get(*b),
                    &w.get(*c),
                );
                w.put(*d, &r, exec);
            }
            Op::PredBin { op, d, a, b } => {
                let (x, y) = (w.get(*a), w.get(*b));
                let r = match op {
                    BoolOp::And => alu::map2(&x, &y, |p, q| p & q & 1),
                    BoolOp::Or => alu::map2(&x, &y, |p, q| (p | q) & 1),
                    BoolOp::Xor => alu::map2(&x, &y, |p, q| (p ^ q) & 1),
                };
                w.put(*d, &r, exec);
            }
            Op::F {
                op,
                ty,
                ftz,
                sat,
                d,
                a,
                b,
            } => {
                let r = alu::fbin(*op, *ty, *ftz, *sat, &w.get(*a), &w.get(*b));
                w.put(*d, &r, exec);
            }
            Op::Fma {
                ty,
                ftz,
                sat,
                d,
                a,
                b,
                c,
            } => {
                let r = alu::fma(*ty, *ftz, *sat, &w.get(*a), &w.get(*b), &w.get(*c));
                w.put(*d, &r, exec);
            }
            Op::FUn { op, ty, ftz, d, a } => {
                let r = alu::fun(*op, *ty, *ftz, &w.get(*a));
                w.put(*d, &r, exec);
            }
            Op::Setp {
                cmp,
                ty,
                ftz,
                d,
                d2,
                a,
                b,
                comb,
            } => {
                let r = alu::setp(*cmp, *ty, *ftz, &w.get(*a), &w.get(*b));
                let (r, r2) = match comb {
                    None => (r, alu::map1(&r, |x| x ^ 1)),
                    Some((op, c, neg)) => {
                        let cv = w.get(*c);
                        let n = u64::from(*neg);
                        let f = |x: u64, y: u64| -> u64 {
                            let y = (y & 1) ^ n;
                            match op {
                                BoolOp::And => x & y,
                                BoolOp::Or => x | y,
                                BoolOp::Xor => x ^ y,
                            }
                        };
                        let r1 = alu::map2(&r, &cv, f);
                        let r2 = alu::map2(&alu::map1(&r, |x| x ^ 1), &cv, f);
                        (r1, r2)
                    }
                };
                if let Some(d) = d {
                    w.put(*d, &r, exec);
                }
                if let Some(d2) = d2 {
                    w.put(*d2, &r2, exec);
                }
            }
            Op::Selp { d, a, b, c } => {
                let r = alu::map3(&w.get(*a), &w.get(*b), &w.get(Src::Reg(*c)), |x, y, p| {
                    if p & 1 != 0 { x } else { y }
                });
                w.put(*d, &r, exec);
            }
            Op::Testp { p, ty, d, a } => {
                let r = alu::testp(*p, *ty, &w.get(*a));
                w.put(*d, &r, exec);
            }
            Op::Mov { d, a } => {
                let m = alu::mask_of(self.l.k.slot_bits[*d as usize] as u32);
                let r = alu::map1(&w.get(*a), |x| x & m);
                w.put(*d, &r, exec);
            }
            Op::Pack { d, parts, part } => {
                let pm = alu::mask_of(*part as u32);
                let mut r = [0u64; 32];
                for (i, p) in parts.iter().enumerate() {
                    let v = w.get(*p);
                    let sh = i as u32 * *part as u32;
                    r = alu::map2(&r, &v, |acc, x| acc | ((x & pm) << sh));
                }
                w.put(*d, &r, exec);
            }
            Op::Unpack { ds, a, part } => {
                let pm = alu::mask_of(*part as u32);
                let v = w.get(*a);
                for (i, d) in ds.iter().enumerate() {
                    if let Some(d) = d {
                        let sh = i as u32 * *part as u32;
                        let r = alu::map1(&v, |x| (x >> sh) & pm);
                        w.put(*d, &r, exec);
                    }
                }
            }
            Op::Cvt {
                dty,
                sty,
                rnd,
                int_rnd,
                sat,
                ftz,
                d,
                a,
            } => {
                let r = cvt::cvt(*dty, *sty, *rnd, *int_rnd, *sat, *ftz, &w.get(*a));
                // Signed results sign-extend into a wider register.
                let db = self.l.k.slot_bits[*d as usize] as u32;
                let r = if matches!(dty, Ty::S(_)) && db > dty.bits() {
                    let b = dty.bits();
                    alu::map1(&r, |x| (alu::sx(x, b) as u64) & alu::mask_of(db))
                } else {
                    r
                };
                w.put(*d, &r, exec);
            }
            Op::CvtPack {
                bf16,
                relu,
                d,
                a,
                b,
            } => {
                let r = cvt::cvt_pack(*bf16, *relu, &w.get(*a), &w.get(*b));
                w.put(*d, &r, exec);
            }
            Op::Cvta {
                to_generic,
                space,
                d,
                a,
            } => {
                let base = match space {
                    Space::Shared => super::SHARED_WINDOW,
                    Space::Param => super::PARAM_WINDOW,
                    _ => 0,
                };
                let v = w.get(*a);
                let r = if *to_generic {
                    alu::map1(&v, |x| x.wrapping_add(base))
                } else {
                    alu::map1(&v, |x| x.wrapping_sub(base))
                };
                w.put(*d, &r, exec);
            }
            Op::Bra { target } => return Ok(Flow::Jump(exec, *target)),
            Op::Exit => return Ok(Flow::Exit(exec)),
            Op::Trap => {
                return Err(self.fault(
                    wi,
                    exec.trailing_zeros(),
                    ErrorKind::Trap,
                    "`trap` executed".into(),
                    None,
                ));
            }
            Op::Fence => {}
            Op::Ld { .. } | Op::St { .. } => return self.ld_st(wi, op, exec),
            Op::CpAsync { .. }
            | Op::CpAsyncCommit
            | Op::CpAsyncWait { .. }
            | Op::Ldmatrix { .. } => return self.async_or_matrix(wi, op, exec),
            Op::Bar { .. }
            | Op::WarpSync { .. }
            | Op::Shfl { .. }
            | Op::Mma { .. }
            | Op::Mbar { .. }
            | Op::Setmaxnreg { .. } => return self.sync_op(wi, op, exec),
            Op::Atom { .. } => return self.atomic(wi, op, exec),
            Op::WgmmaFence
            | Op::WgmmaCommit
            | Op::WgmmaWait { .. }
            | Op::Wgmma { .. }
            | Op::TmaLoad { .. } => return self.hopper_op(wi, op, exec),
        }
        Ok(Flow::Next)
    }

    /// After a warp exits: a barrier its threads can no longer reach is an error.
    fn after_exit(&mut self, wi: usize) -> Result<(), SimError> {
        for (id, b) in self.bars.iter().enumerate() {
            if b.arrived > 0 && b.expected == self.l.nthreads {
                return Err(self.fault(
                    wi,
                    0,
                    ErrorKind::Barrier,
                    format!("warp {wi} exited while other warps wait at block-wide barrier {id}, which can now never complete"),
                    None,
                ));
            }
        }
        Ok(())
    }

    /// No warp can run: describe what each one waits on.
    fn stuck(&self) -> SimError {
        let mut waits = Vec::new();
        let mut first = None;
        let mut kind = ErrorKind::Deadlock;
        for (i, w) in self.warps.iter().enumerate() {
            match w.state {
                WState::Bar(id) => {
                    let b = &self.bars[id as usize];
                    waits.push(format!(
                        "warp {i} at barrier {id} ({} of {} threads arrived)",
                        b.arrived, b.expected
                    ));
                    if self.exited_threads > 0 && b.expected > self.l.nthreads - self.exited_threads
                    {
                        kind = ErrorKind::Barrier;
                    }
                    first.get_or_insert(i);
                }
                WState::Mbar(a, p) => {
                    let phase = self.mbars.get(&a).map_or(0, |m| m.phase);
                    let pend = self.mbars.get(&a).map_or(0, |m| m.pending);
                    let tx = self.mbars.get(&a).map_or(0, |m| m.tx);
                    waits.push(format!(
                        "warp {i} waits for parity {p} of the mbarrier at shared {a:#x} (completed phases {phase}, {pend} arrivals and {tx} tx bytes pending)"
                    ));
                    first.get_or_insert(i);
                }
                WState::Wg(g) => {
                    waits.push(format!(
                        "warp {i} waits for the other warps of warpgroup {g} at a wgmma.mma_async"
                    ));
                    first.get_or_insert(i);
                }
                WState::Done => waits.push(format!("warp {i} exited")),
                WState::Ready => {}
            }
        }
        let wi = first.unwrap_or(0);
        let msg = if kind == ErrorKind::Barrier {
            format!(
                "a barrier waits for threads that exited: {}",
                waits.join("; ")
            )
        } else {
            format!("no warp can make progress: {}", waits.join("; "))
        };
        let (pc, _) = self.warps[wi].group();
        let pc = match self.warps[wi].state {
            WState::Bar(_) => pc.saturating_sub(1),
            _ => pc,
        };
        self.fault_at(
            pc,
            wi,
            self.warps[wi].live.trailing_zeros().min(31),
            kind,
            msg,
            None,
        )
    }
}
