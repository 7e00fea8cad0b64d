//! Barriers, shuffles, `mma.sync`, mbarriers and `setmaxnreg`.

use super::block::{Block, Flow, WState};
use crate::error::{ErrorKind, SimError};
use crate::ir::*;
use half::f16;

type R<T> = Result<T, SimError>;

/// A named barrier (`bar.sync id, count`).
#[derive(Default)]
pub(crate) struct BarState {
    pub(crate) expected: u32,
    pub(crate) arrived: u32,
    /// Warps waiting, and warps that only arrived (`bar.arrive`).
    waiting: Vec<usize>,
    arrivers: Vec<usize>,
}

impl BarState {
    /// Whether warp `w` already arrived in the barrier's current phase.
    pub(crate) fn counted(&self, w: usize) -> bool {
        self.waiting.contains(&w) || self.arrivers.contains(&w)
    }
}

/// An mbarrier object in shared memory.
pub(crate) struct Mbar {
    expected: u32,
    pub(crate) pending: u32,
    pub(crate) tx: i64,
    /// Completed phases.
    pub(crate) phase: u32,
    view: Vec<u32>,
    done_view: Vec<u32>,
}

fn first(m: u32) -> u32 {
    m.trailing_zeros().min(31)
}

impl<'a> Block<'a> {
    /// A uniform operand value across `exec` (barrier ids, counts).
    fn uniform(&self, wi: usize, s: Src, exec: u32, what: &str) -> R<u64> {
        let v = self.warps[wi].get(s);
        let x = v[first(exec) as usize];
        for (l, &vl) in v.iter().enumerate() {
            if exec >> l & 1 != 0 && vl != x {
                return Err(self.fault(
                    wi,
                    l as u32,
                    ErrorKind::Barrier,
                    format!("{what} differs across the warp ({} vs {x})", v[l]),
                    None,
                ));
            }
        }
        Ok(x)
    }

    pub(crate) fn sync_op(&mut self, wi: usize, op: &Op, exec: u32) -> R<Flow> {
        match op {
            Op::Bar { id, count, arrive } => self.bar(wi, *id, *count, *arrive, exec),
            Op::WarpSync { mask } => {
                let m = self.uniform(wi, *mask, exec, "bar.warp.sync mask")? as u32;
                if m & !exec & self.warps[wi].exists != 0 || exec & !m != 0 {
                    return Err(self.fault(
                        wi,
                        first(exec),
                        ErrorKind::Barrier,
                        format!("bar.warp.sync with mask {m:#010x} reached by lanes {exec:#010x}"),
                        None,
                    ));
                }
                self.clocks.barrier(&[wi]);
                Ok(Flow::Next)
            }
            Op::Shfl {
                mode,
                d,
                p,
                a,
                b,
                c,
                mask,
            } => {
                let w = &self.warps[wi];
                let mv = w.get(*mask);
                let m = mv[first(exec) as usize] as u32;
                if exec & !m != 0 || m & !exec != 0 {
                    let bad = first((exec & !m) | (m & !exec));
                    return Err(self.fault(
                        wi,
                        first(exec),
                        ErrorKind::Barrier,
                        format!("shfl.sync with member mask {m:#010x} executed by lanes {exec:#010x} (lane {bad} diverged, exited or is not a member)"),
                        None,
                    ));
                }
                let (av, bv, cv) = (w.get(*a), w.get(*b), w.get(*c));
                let mut out = [0u64; 32];
                let mut pout = [0u64; 32];
                for l in 0..32u32 {
                    if exec >> l & 1 == 0 {
                        continue;
                    }
                    let bval = (bv[l as usize] & 31) as i32;
                    let cval = (cv[l as usize] & 31) as i32;
                    let seg = ((cv[l as usize] >> 8) & 31) as i32;
                    let lane = l as i32;
                    let max_lane = (lane & seg) | (cval & !seg);
                    let min_lane = lane & seg;
                    let (j, ok) = match mode {
                        ShflMode::Up => (lane - bval, lane - bval >= max_lane),
                        ShflMode::Down => (lane + bval, lane + bval <= max_lane),
                        ShflMode::Bfly => (lane ^ bval, (lane ^ bval) <= max_lane),
                        ShflMode::Idx => {
                            let j = min_lane | (bval & !seg);
                            (j, j <= max_lane)
                        }
                    };
                    let j = if ok { j } else { lane };
                    if exec >> j & 1 == 0 {
                        return Err(self.fault(
                            wi,
                            l,
                            ErrorKind::Barrier,
                            format!("shfl.sync reads lane {j}, which does not take part"),
                            None,
                        ));
                    }
                    out[l as usize] = av[j as usize] & 0xffff_ffff;
                    pout[l as usize] = u64::from(ok);
                }
                let w = &mut self.warps[wi];
                w.put(*d, &out, exec);
                if let Some(p) = p {
                    w.put(*p, &pout, exec);
                }
                Ok(Flow::Next)
            }
            Op::Elect { d, p, mask } => {
                let m = self.warps[wi].get(*mask)[first(exec) as usize] as u32;
                if exec & !m != 0 || m & !exec != 0 {
                    return Err(self.fault(
                        wi,
                        first(exec),
                        ErrorKind::Barrier,
                        format!(
                            "elect.sync with member mask {m:#010x} executed by lanes {exec:#010x}"
                        ),
                        None,
                    ));
                }
                let leader = first(exec) as u64;
                let w = &mut self.warps[wi];
                if let Some(d) = d {
                    w.put(*d, &[leader; 32], exec);
                }
                if let Some(p) = p {
                    let mut v = [0u64; 32];
                    v[leader as usize] = 1;
                    w.put(*p, &v, exec);
                }
                Ok(Flow::Next)
            }
            Op::Vote {
                mode,
                d,
                a,
                neg,
                mask,
            } => {
                let w = &self.warps[wi];
                let m = w.get(*mask)[first(exec) as usize] as u32;
                if exec & !m != 0 || m & !exec != 0 {
                    return Err(self.fault(
                        wi,
                        first(exec),
                        ErrorKind::Barrier,
                        format!(
                            "vote.sync with member mask {m:#010x} executed by lanes {exec:#010x}"
                        ),
                        None,
                    ));
                }
                let p = (w.pred_mask(*a) ^ if *neg { u32::MAX } else { 0 }) & exec;
                let v = match mode {
                    VoteMode::All => u64::from(p == exec),
                    VoteMode::Any => u64::from(p != 0),
                    VoteMode::Uni => u64::from(p == exec || p == 0),
                    VoteMode::Ballot => p as u64,
                };
                self.warps[wi].put(*d, &[v; 32], exec);
                Ok(Flow::Next)
            }
            Op::Mma {
                k,
                bf16,
                d,
                a,
                b,
                c,
            } => {
                self.mma(wi, *k as usize, *bf16, d, a, b, c);
                Ok(Flow::Next)
            }
            Op::Mbar { op, d, addr, arg } => self.mbar(wi, *op, *d, addr, *arg, exec),
            Op::Setmaxnreg { inc, n } => {
                let w = &mut self.warps[wi];
                let cur = w.maxnreg.unwrap_or(if *inc { 0 } else { 256 });
                if (*inc && *n < cur) || (!*inc && *n > cur) {
                    return Err(self.fault(
                        wi,
                        0,
                        ErrorKind::RegisterBudget,
                        format!(
                            "setmaxnreg.{} to {n} from a budget of {cur}",
                            if *inc { "inc" } else { "dec" }
                        ),
                        None,
                    ));
                }
                w.maxnreg = Some(*n);
                // The register file of an SM is 64K registers; a block's warps must fit.
                let total: u64 = self
                    .warps
                    .iter()
                    .map(|w| w.maxnreg.unwrap_or(0) as u64 * 32)
                    .sum();
                if total > 65536 {
                    return Err(self.fault(wi, 0, ErrorKind::RegisterBudget, format!("setmaxnreg budgets of the block's warps total {total} registers, over the 65536 of an SM"), None));
                }
                Ok(Flow::Next)
            }
            _ => Err(SimError::new(
                ErrorKind::Unsupported,
                format!("internal: {op:?} reached the wrong executor"),
            )),
        }
    }

    fn bar(&mut self, wi: usize, id: Src, count: Option<Src>, arrive: bool, exec: u32) -> R<Flow> {
        let id = self.uniform(wi, id, exec, "barrier id")?;
        if id >= 16 {
            return Err(self.fault(
                wi,
                first(exec),
                ErrorKind::Barrier,
                format!("barrier id {id} (0..15)"),
                None,
            ));
        }
        let nthreads = self.l.nthreads;
        let expected = match count {
            Some(c) => {
                let c = self.uniform(wi, c, exec, "barrier thread count")?;
                if c == 0 || c % 32 != 0 || c > nthreads.next_multiple_of(32) as u64 {
                    return Err(self.fault(wi, first(exec), ErrorKind::Barrier, format!("barrier thread count {c} (a multiple of 32, at most the block's threads)"), None));
                }
                c as u32
            }
            None => nthreads,
        };
        if count.is_none() && self.exited_threads > 0 {
            return Err(self.fault(
                wi,
                first(exec),
                ErrorKind::Barrier,
                format!("block-wide barrier {id} reached after {} thread(s) of the block exited; it can never complete", self.exited_threads),
                None,
            ));
        }
        let b = &mut self.bars[id as usize];
        if b.arrived > 0 && b.expected != expected {
            let e = b.expected;
            return Err(self.fault(
                wi,
                first(exec),
                ErrorKind::Barrier,
                format!("barrier {id} used with {expected} threads while {e} are expected"),
                None,
            ));
        }
        b.expected = expected;
        b.arrived += self.warps[wi].exists.count_ones();
        if arrive {
            b.arrivers.push(wi);
        } else {
            b.waiting.push(wi);
            self.warps[wi].state = WState::Bar(id as u32);
        }
        if b.arrived >= b.expected {
            let waiting = std::mem::take(&mut b.waiting);
            let mut parts = std::mem::take(&mut b.arrivers);
            b.arrived = 0;
            parts.extend(&waiting);
            self.clocks.barrier(&parts);
            for w in waiting {
                self.warps[w].state = WState::Ready;
            }
        }
        Ok(Flow::NextWait)
    }

    #[allow(clippy::too_many_arguments)]
    fn mma(
        &mut self,
        wi: usize,
        k: usize,
        bf: bool,
        d: &[Slot; 4],
        a: &[Slot],
        b: &[Slot],
        c: &[Src; 4],
    ) {
        match (k, bf) {
            (16, true) => self.mma_k::<16, true>(wi, d, a, b, c),
            (16, false) => self.mma_k::<16, false>(wi, d, a, b, c),
            (_, true) => self.mma_k::<8, true>(wi, d, a, b, c),
            (_, false) => self.mma_k::<8, false>(wi, d, a, b, c),
        }
        self.c.tensor_flops += 2 * 16 * 8 * k as u64;
    }

    /// `m16n8kK`: A 16 x K (K / 4 registers, row-major fragments), B K x 8 (K / 8 registers),
    /// C/D 16 x 8; lane `4g + t` holds row `g` (+8), columns `2t, 2t + 1` (+8) of each.
    fn mma_k<const K: usize, const BF: bool>(
        &mut self,
        wi: usize,
        d: &[Slot; 4],
        a: &[Slot],
        b: &[Slot],
        c: &[Src; 4],
    ) {
        let w = &self.warps[wi];
        // f16/bf16 widen exactly to f32 (and on to f64); A stays f32 until it is used.
        let mut am = [[0f32; K]; 16];
        let mut b32 = [[0f32; 8]; K];
        for (r, s) in a[..K / 4].iter().enumerate() {
            let rv = w.lanes(*s);
            let (r0, c0) = (8 * (r % 2), 8 * (r / 2));
            for (g, row) in am[r0..r0 + 8].iter_mut().enumerate() {
                for t in 0..4 {
                    let v = rv[4 * g + t];
                    row[c0 + 2 * t] = widen::<BF>(v);
                    row[c0 + 2 * t + 1] = widen::<BF>(v >> 16);
                }
            }
        }
        for (r, s) in b[..K / 8].iter().enumerate() {
            let rv = w.lanes(*s);
            for g in 0..8 {
                for t in 0..4 {
                    let v = rv[4 * g + t];
                    b32[8 * r + 2 * t][g] = widen::<BF>(v);
                    b32[8 * r + 2 * t + 1][g] = widen::<BF>(v >> 16);
                }
            }
        }
        let mut bm = [[0f64; 8]; K];
        for (d, s) in bm.iter_mut().zip(b32.iter()) {
            for (x, y) in d.iter_mut().zip(s.iter()) {
                *x = *y as f64;
            }
        }
        let mut dm = [[0f64; 8]; 16];
        for (i, s) in c.iter().enumerate() {
            let imm;
            let v: &super::alu::Lanes = match *s {
                Src::Reg(r) => w.lanes(r),
                Src::Imm(x) => {
                    imm = [x; 32];
                    &imm
                }
            };
            let (r0, j0) = (8 * (i / 2), i % 2);
            for (g, row) in dm[r0..r0 + 8].iter_mut().enumerate() {
                for t in 0..4 {
                    row[2 * t + j0] = f32::from_bits(v[4 * g + t] as u32) as f64;
                }
            }
        }
        // Products of f16/bf16 values are exact in f64 and the k-term sum rounds far below
        // f32 precision; one final rounding to f32.
        for (row, arow) in dm.iter_mut().zip(am.iter()) {
            let mut acc = *row;
            for (&x, brow) in arow.iter().zip(bm.iter()) {
                let x = x as f64;
                for j in 0..8 {
                    acc[j] += x * brow[j];
                }
            }
            *row = acc;
        }
        let w = &mut self.warps[wi];
        for (i, s) in d.iter().enumerate() {
            let (r0, j0) = (8 * (i / 2), i % 2);
            let mut o = [0u64; 32];
            for (g, row) in dm[r0..r0 + 8].iter().enumerate() {
                for t in 0..4 {
                    o[4 * g + t] = (row[2 * t + j0] as f32).to_bits() as u64;
                }
            }
            w.put(*s, &o, u32::MAX);
        }
    }

    fn mbar_addr(&self, wi: usize, l: u32, a: u64) -> R<u32> {
        let a = if a.wrapping_sub(super::SHARED_WINDOW) < super::WINDOW_BYTES {
            a - super::SHARED_WINDOW
        } else {
            a
        };
        if !a.is_multiple_of(8) || a.saturating_add(8) > self.smem.len() as u64 {
            return Err(self.fault(
                wi,
                l,
                ErrorKind::OutOfBounds,
                format!("mbarrier at shared offset {a:#x} is misaligned or outside shared memory"),
                Some(a),
            ));
        }
        Ok(a as u32)
    }

    fn complete_phase(&mut self, a: u32) {
        if let Some(m) = self
            .mbars
            .get_mut(&a)
            .filter(|m| m.pending == 0 && m.tx == 0)
        {
            m.phase += 1;
            m.pending = m.expected;
            // The next phase starts with an empty view of the same width.
            let fresh = vec![0; m.view.len()];
            m.done_view = std::mem::replace(&mut m.view, fresh);
            for w in &mut self.warps {
                if matches!(w.state, WState::Mbar(x, _) if x == a) {
                    w.state = WState::Ready;
                }
            }
        }
    }

    /// Adds `bytes` completed by the async proxy to the mbarrier at `a` (TMA `complete_tx`).
    pub(crate) fn mbar_complete_tx(&mut self, a: u32, bytes: i64) {
        let view = self.clocks.release_async();
        if let Some(m) = self.mbars.get_mut(&a) {
            m.tx -= bytes;
            merge(&mut m.view, &view);
        }
        self.complete_phase(a);
    }

    fn mbar(
        &mut self,
        wi: usize,
        op: MbarOp,
        d: Option<Slot>,
        addr: &Addr,
        arg: Option<Src>,
        exec: u32,
    ) -> R<Flow> {
        let addrs = self.addrs(wi, addr);
        let argv = arg.map(|s| self.warps[wi].get(s));
        let mut result = [0u64; 32];
        let mut all_ok = true;
        for l in 0..32u32 {
            if exec >> l & 1 == 0 {
                continue;
            }
            let a = self.mbar_addr(wi, l, addrs[l as usize])?;
            let v = argv.as_ref().map_or(1, |x| x[l as usize] & 0xffff_ffff);
            if op != MbarOp::Init && !self.mbars.contains_key(&a) {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::Barrier,
                    format!("mbarrier at shared offset {a:#x} used before mbarrier.init"),
                    Some(a as u64),
                ));
            }
            match op {
                MbarOp::Init => {
                    if v == 0 || v >= 1 << 20 {
                        return Err(self.fault(
                            wi,
                            l,
                            ErrorKind::Barrier,
                            format!("mbarrier.init count {v}"),
                            Some(a as u64),
                        ));
                    }
                    let n = self.clocks.width();
                    self.mbars.insert(
                        a,
                        Mbar {
                            expected: v as u32,
                            pending: v as u32,
                            tx: 0,
                            phase: 0,
                            view: vec![0; n],
                            done_view: vec![0; n],
                        },
                    );
                }
                MbarOp::Inval => {
                    self.mbars.remove(&a);
                }
                MbarOp::ExpectTx => {
                    if let Some(m) = self.mbars.get_mut(&a) {
                        m.tx += v as i64;
                    }
                }
                MbarOp::Arrive | MbarOp::ArriveExpectTx => {
                    let view = self.clocks.release(wi);
                    let (cnt, tx) = if op == MbarOp::ArriveExpectTx {
                        (1, v as i64)
                    } else {
                        (v as u32, 0)
                    };
                    let Some(m) = self.mbars.get_mut(&a) else {
                        continue;
                    };
                    if cnt > m.pending {
                        let p = m.pending;
                        return Err(self.fault(wi, l, ErrorKind::Barrier, format!("mbarrier arrive of {cnt} with only {p} arrivals pending in the phase"), Some(a as u64)));
                    }
                    m.tx += tx;
                    m.pending -= cnt;
                    merge(&mut m.view, &view);
                    result[l as usize] = m.phase as u64;
                    self.complete_phase(a);
                }
                MbarOp::TryWaitParity | MbarOp::TestWaitParity => {
                    let Some(m) = self.mbars.get(&a) else {
                        continue;
                    };
                    let ok = (m.phase & 1) as u64 != (v & 1);
                    if ok {
                        let view = m.done_view.clone();
                        self.clocks.acquire(wi, &view);
                    } else {
                        all_ok = false;
                        if op == MbarOp::TryWaitParity {
                            self.warps[wi].state = WState::Mbar(a, (v & 1) as u32);
                        }
                    }
                    result[l as usize] = u64::from(ok);
                }
            }
        }
        if op == MbarOp::TryWaitParity && !all_ok {
            // Park the warp; it runs the wait again when a phase completes.
            return Ok(Flow::Retry);
        }
        if let Some(d) = d {
            self.warps[wi].put(d, &result, exec);
        }
        if op == MbarOp::TestWaitParity && !all_ok {
            return Ok(Flow::Yield);
        }
        Ok(Flow::Next)
    }
}

/// A 16-bit float (bf16 when `BF`, else f16) widened exactly to f32.
#[inline(always)]
fn widen<const BF: bool>(x: u64) -> f32 {
    if BF {
        f32::from_bits((x as u32 & 0xffff) << 16)
    } else {
        f16::from_bits(x as u16).to_f32()
    }
}

fn merge(a: &mut [u32], b: &[u32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = (*x).max(*y);
    }
}
