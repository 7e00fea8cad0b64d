//! The block scheduler, warps, divergence and the per-warp run loop.

use super::alu::Lanes;
use super::launch::LaunchCtx;
use super::smem::{Clocks, Smem};
use super::sync::{BarState, Mbar};
use crate::Counters;
use crate::error::{ErrorKind, SimError, Site};
use crate::ir::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

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
    pub(crate) regs: Vec<Lanes>,
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
    pub(crate) fn lanes(&self, s: Slot) -> &Lanes {
        &self.regs[s as usize]
    }

    #[inline]
    pub(crate) fn get(&self, s: Src) -> Lanes {
        match s {
            Src::Reg(r) => self.regs[r as usize],
            Src::Imm(v) => [v; 32],
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, d: Slot, v: &Lanes, mask: u32) {
        let dst = &mut self.regs[d as usize];
        if mask == u32::MAX {
            *dst = *v;
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
    /// Done; the warp stays ready but lets the other warps run first (a failed `test_wait`
    /// polled in a loop).
    Yield,
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
    /// `fence.proxy.async` executed per warp (see `Smem::generic`).
    pub(crate) proxy_fences: Vec<u32>,
    executed: u64,
}

impl<'a> Block<'a> {
    pub(crate) fn new(l: &'a LaunchCtx<'a>, i: u64) -> Block<'a> {
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
            let mut regs = vec![[0u64; 32]; k.nslots as usize];
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
                    regs[s as usize][lane as usize] = v;
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
            proxy_fences: vec![0; nwarps],
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

    pub(crate) fn run(mut self) -> Result<Counters, SimError> {
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
                Flow::Yield => {
                    w.finish(g, pc, 0, 0);
                    return Ok(());
                }
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

    /// After a warp exits: a barrier its threads can no longer reach is an error.
    fn after_exit(&mut self, wi: usize) -> Result<(), SimError> {
        for (id, b) in self.bars.iter().enumerate() {
            // Threads that can still arrive: those of live warps not already counted.
            let could: u32 = self
                .warps
                .iter()
                .enumerate()
                .filter(|(i, w)| w.state != WState::Done && !b.counted(*i))
                .map(|(_, w)| w.exists.count_ones())
                .sum();
            if b.arrived > 0 && b.arrived + could < b.expected {
                return Err(self.fault(
                    wi,
                    0,
                    ErrorKind::Barrier,
                    format!("warp {wi} exited while other warps wait at barrier {id}, which can now never complete"),
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
