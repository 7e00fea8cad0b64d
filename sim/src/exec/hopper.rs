//! The engine side of sm_90a: warpgroup rendezvous and group bookkeeping for `wgmma`, the
//! register hazard check on in-flight accumulators, and TMA copies that complete bytes on an
//! mbarrier and write shared memory as the async proxy.

use super::block::{Block, Flow, WState};
use super::hopper_hooks::{self, WgmmaCall};
use super::smem::{ASYNC_TID, Hazard};
use crate::error::{ErrorKind, SimError};
use crate::ir::*;

type R<T> = Result<T, SimError>;

impl<'a> Block<'a> {
    /// Gives a hook's error the current site unless it has one.
    fn sited(&self, wi: usize, lane: u32, e: SimError) -> SimError {
        if e.site.is_some() {
            return e;
        }
        let f = self.fault(wi, lane, e.kind, e.message.clone(), None);
        SimError { site: f.site, ..e }
    }

    pub(crate) fn hopper_op(&mut self, wi: usize, op: &Op, exec: u32) -> R<Flow> {
        match op {
            Op::WgmmaFence => Ok(Flow::Next),
            Op::WgmmaCommit => {
                let w = &mut self.warps[wi];
                let open = std::mem::take(&mut w.wg_open);
                w.wg_groups.push_back(open);
                Ok(Flow::Next)
            }
            Op::WgmmaWait { n } => {
                let w = &mut self.warps[wi];
                while w.wg_groups.len() > *n as usize {
                    w.wg_groups.pop_front();
                }
                w.wg_busy = w.wg_groups.iter().any(|g| !g.is_empty()) || !w.wg_open.is_empty();
                Ok(Flow::Next)
            }
            Op::Wgmma { .. } => self.wgmma(wi, op),
            Op::TmaLoad { .. } => self.tma(wi, op, exec),
            _ => Err(SimError::new(
                ErrorKind::Unsupported,
                format!("internal: {op:?} reached the wrong executor"),
            )),
        }
    }

    /// The register hazard check: an instruction touching accumulators of a wgmma that no
    /// `wgmma.wait_group` has retired yet.
    pub(crate) fn wgmma_hazard(&self, wi: usize, op: &Op, lane: u32) -> R<()> {
        let mut used = Vec::new();
        op.slots(&mut used);
        let w = &self.warps[wi];
        let busy = w.wg_open.iter().chain(w.wg_groups.iter().flatten());
        for s in busy {
            if used.contains(s) {
                return Err(self.fault(
                    wi,
                    lane,
                    ErrorKind::WgmmaHazard,
                    format!("register slot {s} is an accumulator of a wgmma.mma_async not yet retired by wgmma.wait_group"),
                    None,
                ));
            }
        }
        Ok(())
    }

    fn wgmma(&mut self, wi: usize, op: &Op) -> R<Flow> {
        let Op::Wgmma {
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
        } = op
        else {
            return Ok(Flow::Next);
        };
        let g = wi / 4;
        if self.warps.len() < 4 * g + 4
            || self.warps[4 * g..4 * g + 4]
                .iter()
                .any(|w| w.exists != u32::MAX)
        {
            return Err(self.fault(
                wi,
                0,
                ErrorKind::Barrier,
                "wgmma.mma_async needs a whole warpgroup of 128 threads".into(),
                None,
            ));
        }
        let pc = self.cur_pc;
        if self.wg_arrived[g].first().is_some_and(|x| x.1 != pc) {
            return Err(self.fault(
                wi,
                0,
                ErrorKind::Barrier,
                "the warps of a warpgroup reached different wgmma.mma_async instructions".into(),
                None,
            ));
        }
        self.wg_arrived[g].push((wi, pc));
        if self.wg_arrived[g].len() < 4 {
            self.warps[wi].state = WState::Wg(g as u32);
            return Ok(Flow::NextWait);
        }
        let ws: Vec<usize> = std::mem::take(&mut self.wg_arrived[g])
            .into_iter()
            .map(|x| x.0)
            .collect();
        self.clocks.barrier(&ws);
        let w0 = &self.warps[4 * g];
        let val = |s: &Src| match s {
            Src::Reg(r) => w0.lanes(*r)[0],
            Src::Imm(v) => *v,
        };
        let per = (*n / 2) as usize;
        let mut call = WgmmaCall {
            n: *n,
            bf16: *bf16,
            a_desc: a_desc.as_ref().map(val),
            trans_a: *trans_a,
            a_regs: None,
            b_desc: val(b_desc),
            trans_b: *trans_b,
            scale_d: val(scale_d) & 1 != 0,
            scale_a: *scale_a,
            scale_b: *scale_b,
        };
        let mut regs = vec![0f32; 128 * per];
        let mut ar = Box::new([[0u32; 4]; 128]);
        for t in 0..128usize {
            let w = &self.warps[4 * g + t / 32];
            for (i, s) in d.iter().enumerate() {
                regs[t * per + i] = f32::from_bits(w.lanes(*s)[t % 32] as u32);
            }
            if let Some(a) = a_regs {
                for (j, s) in a.iter().enumerate() {
                    ar[t][j] = w.lanes(*s)[t % 32] as u32;
                }
            }
        }
        if a_regs.is_some() {
            call.a_regs = Some(ar);
        }
        let me = (4 * g * 32) as u16;
        let size = self.smem.len();
        let r = {
            let (smem, clocks, fences) = (&self.smem, &self.clocks, &self.proxy_fences);
            let mut fail: Option<(ErrorKind, String, u64)> = None;
            let mut load = |addr: u32| -> R<[u8; 16]> {
                let a = addr as usize;
                if !a.is_multiple_of(16) || a + 16 > size {
                    fail = Some((
                        ErrorKind::OutOfBounds,
                        format!(
                            "wgmma operand chunk at shared {a:#x} is misaligned or outside shared memory"
                        ),
                        a as u64,
                    ));
                    return Err(SimError::new(ErrorKind::OutOfBounds, "wgmma operand"));
                }
                if let Some((h, b)) = smem.check(clocks, a, 16, me, 4 * g, false) {
                    let msg = match h {
                        Hazard::Uninit => {
                            format!("wgmma reads shared byte {b:#x}, which nothing wrote")
                        }
                        Hazard::Pending => {
                            format!("wgmma reads shared byte {b:#x} under an outstanding cp.async")
                        }
                        Hazard::Race { tid, .. } if tid == ASYNC_TID => format!(
                            "wgmma reads shared byte {b:#x} written by a TMA copy not yet waited for"
                        ),
                        Hazard::Race { tid, .. } => format!(
                            "wgmma reads shared byte {b:#x} written by thread {tid} with no barrier between"
                        ),
                    };
                    let kind = match h {
                        Hazard::Uninit => ErrorKind::Uninitialized,
                        Hazard::Race { tid, .. } if tid == ASYNC_TID => ErrorKind::AsyncProxy,
                        _ => ErrorKind::SharedRace,
                    };
                    fail = Some((kind, msg, b as u64));
                    return Err(SimError::new(kind, "wgmma operand"));
                }
                if let Some((b, w)) = smem.unfenced(a, 16, fences) {
                    fail = Some((
                        ErrorKind::AsyncProxy,
                        format!(
                            "wgmma reads shared byte {b:#x}, stored by warp {w} with an ordinary \
                             store and no fence.proxy.async since: the async proxy may not see it"
                        ),
                        b as u64,
                    ));
                    return Err(SimError::new(ErrorKind::AsyncProxy, "wgmma operand"));
                }
                let mut c = [0u8; 16];
                c.copy_from_slice(&smem.data[a..a + 16]);
                Ok(c)
            };
            let r = hopper_hooks::wgmma(&call, &mut load, &mut regs);
            match (r, fail) {
                (Err(_), Some((k, m, addr))) => Err(self.fault(wi, 0, k, m, Some(addr))),
                (r, _) => r,
            }
        };
        r.map_err(|e| self.sited(wi, 0, e))?;
        for t in 0..128usize {
            let w = &mut self.warps[4 * g + t / 32];
            for (i, s) in d.iter().enumerate() {
                w.regs[*s as usize][t % 32] = regs[t * per + i].to_bits() as u64;
            }
        }
        for &x in &ws {
            let w = &mut self.warps[x];
            w.wg_open.extend(d.iter().copied());
            w.wg_busy = true;
            if x != wi {
                w.state = WState::Ready;
            }
        }
        self.c.tensor_flops += 2 * 64 * *n as u64 * 16;
        Ok(Flow::NextWait)
    }

    fn tma(&mut self, wi: usize, op: &Op, exec: u32) -> R<Flow> {
        let Op::TmaLoad {
            dst,
            map,
            coords,
            mbar,
        } = op
        else {
            return Ok(Flow::Next);
        };
        let da = self.addrs(wi, dst);
        let ma = self.addrs(wi, map);
        let ba = self.addrs(wi, mbar);
        let cs: Vec<[u64; 32]> = coords.iter().map(|c| self.warps[wi].get(*c)).collect();
        let mut m = exec;
        while m != 0 {
            let l = m.trailing_zeros();
            m &= m - 1;
            let li = l as usize;
            // The tensor map: a kernel parameter (generic param address) or global memory.
            let mut blob = [0u8; 128];
            let a = ma[li];
            if a.wrapping_sub(super::PARAM_WINDOW) < super::WINDOW_BYTES {
                let o = (a - super::PARAM_WINDOW) as usize;
                let p = &self.l.params;
                if o + 128 > p.len() {
                    return Err(self.fault(
                        wi,
                        l,
                        ErrorKind::TensorMap,
                        format!("tensor map at param offset {o:#x} is outside the parameters"),
                        Some(a),
                    ));
                }
                blob.copy_from_slice(&p[o..o + 128]);
            } else {
                for i in 0..8u64 {
                    let (al, off) = self.locate(wi, l, a.wrapping_add(16 * i), 16, false)?;
                    let mut v = [0u32; 4];
                    if !al.load(off, 16, &mut v) {
                        return Err(self.fault(
                            wi,
                            l,
                            ErrorKind::Uninitialized,
                            "tensor map bytes never written".into(),
                            Some(a),
                        ));
                    }
                    for (k, w) in v.iter().enumerate() {
                        blob[16 * i as usize + 4 * k..16 * i as usize + 4 * k + 4]
                            .copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
            let coords: Vec<i32> = cs.iter().map(|c| c[li] as u32 as i32).collect();
            let d = da[li] as u32;
            let bytes = {
                let mut read = |g: u64, buf: &mut [u8]| -> R<()> {
                    for (i, b) in buf.iter_mut().enumerate() {
                        let (al, off) = self.locate(wi, l, g + i as u64, 1, false)?;
                        let mut v = [0u32; 4];
                        if !al.load(off, 1, &mut v) {
                            return Err(self.fault(
                                wi,
                                l,
                                ErrorKind::Uninitialized,
                                format!("TMA reads global byte {:#x}, never written", g + i as u64),
                                Some(g + i as u64),
                            ));
                        }
                        *b = v[0] as u8;
                    }
                    Ok(())
                };
                hopper_hooks::tma_load(&blob, &coords, d, &mut read)
            }
            .map_err(|e| self.sited(wi, l, e))?;
            let (o, n) = (d as usize, bytes.len());
            if o + n > self.smem.len() {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::OutOfBounds,
                    format!("TMA box of {n} bytes at shared {o:#x} is outside shared memory"),
                    Some(d as u64),
                ));
            }
            self.smem.data[o..o + n].copy_from_slice(&bytes);
            let epoch = self.clocks.async_clock;
            self.smem.record(o, n, ASYNC_TID, epoch, true);
            self.smem.mark_generic(o, n, None, 0);
            self.c.tma_bytes += n as u64;
            let mb = ba[li];
            let mb = if mb.wrapping_sub(super::SHARED_WINDOW) < super::WINDOW_BYTES {
                mb - super::SHARED_WINDOW
            } else {
                mb
            } as u32;
            if !self.mbars.contains_key(&mb) {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::Barrier,
                    format!(
                        "TMA completes on the mbarrier at shared {mb:#x}, which is not initialised"
                    ),
                    Some(mb as u64),
                ));
            }
            self.mbar_complete_tx(mb, n as i64);
        }
        Ok(Flow::Next)
    }
}
