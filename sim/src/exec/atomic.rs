//! `atom` / `red` on global memory: relaxed read-modify-writes, one lane at a time in lane
//! order (any order is a valid outcome of relaxed atomics).

use super::block::{Block, Flow};
use crate::error::{ErrorKind, SimError};
use crate::ir::{AtomOp, Op, Ty};

impl<'a> Block<'a> {
    pub(crate) fn atomic(&mut self, wi: usize, op: &Op, exec: u32) -> Result<Flow, SimError> {
        let Op::Atom {
            op,
            ty,
            d,
            addr,
            b,
            c,
        } = op
        else {
            return Ok(Flow::Next);
        };
        let size = ty.bits() / 8;
        let addrs = self.addrs(wi, addr);
        let bv = self.warps[wi].get(*b);
        let cv = c.map(|c| self.warps[wi].get(c));
        let mut out = [0u64; 32];
        let mut m = exec;
        while m != 0 {
            let l = m.trailing_zeros();
            m &= m - 1;
            let a = addrs[l as usize];
            let (al, off) = self.locate(wi, l, a, size, true)?;
            let x = bv[l as usize];
            let y = cv.as_ref().map_or(0, |c| c[l as usize]);
            let (old, init) = al.rmw(off, size, |o| apply(*op, *ty, o, x, y));
            if !init {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::Uninitialized,
                    format!("atomic on {size} bytes at {a:#x}, which were never written"),
                    Some(a),
                ));
            }
            out[l as usize] = old;
        }
        self.c.global_atomics += exec.count_ones() as u64;
        if let Some(d) = d {
            self.warps[wi].put(*d, &out, exec);
        }
        Ok(Flow::Next)
    }
}

fn apply(op: AtomOp, ty: Ty, o: u64, x: u64, y: u64) -> u64 {
    let w = ty.bits();
    let m = super::alu::mask_of(w);
    let (o, x) = (o & m, x & m);
    let sx = |v: u64| super::alu::sx(v, w);
    let r = match (op, ty) {
        (AtomOp::Add, Ty::F32) => {
            (f32::from_bits(o as u32) + f32::from_bits(x as u32)).to_bits() as u64
        }
        (AtomOp::Add, Ty::F64) => (f64::from_bits(o) + f64::from_bits(x)).to_bits(),
        (AtomOp::Add, _) => o.wrapping_add(x),
        (AtomOp::Min, Ty::S(_)) => sx(o).min(sx(x)) as u64,
        (AtomOp::Max, Ty::S(_)) => sx(o).max(sx(x)) as u64,
        (AtomOp::Min, _) => o.min(x),
        (AtomOp::Max, _) => o.max(x),
        (AtomOp::And, _) => o & x,
        (AtomOp::Or, _) => o | x,
        (AtomOp::Xor, _) => o ^ x,
        (AtomOp::Exch, _) => x,
        (AtomOp::Cas, _) => {
            if o == x {
                y & m
            } else {
                o
            }
        }
        // inc/dec wrap at the operand b, as the ISA defines them.
        (AtomOp::Inc, _) => {
            if o >= x {
                0
            } else {
                o + 1
            }
        }
        (AtomOp::Dec, _) => {
            if o == 0 || o > x {
                x
            } else {
                o - 1
            }
        }
    };
    r & m
}
