//! The per-instruction dispatch: register-to-register operations inline, the rest handed to
//! the memory, synchronisation, atomic and Hopper modules.

use super::alu;
use super::block::{Block, Flow};
use super::cvt;
use super::smem::GENERIC_COUNT;
use crate::error::{ErrorKind, SimError};
use crate::ir::*;

/// A source operand's lanes by reference: a register's own lanes (no copy), or an immediate
/// splatted into the caller's deferred-initialised temporary `$t`.
macro_rules! sref {
    ($w:expr, $s:expr, $t:ident) => {
        match $s {
            Src::Reg(r) => $w.lanes(r),
            Src::Imm(v) => {
                $t = [v; 32];
                &$t
            }
        }
    };
}

impl<'a> Block<'a> {
    /// Executes one instruction for the lanes in `exec`.
    pub(crate) fn exec(&mut self, wi: usize, op: &Op, exec: u32) -> Result<Flow, SimError> {
        let w = &mut self.warps[wi];
        let (ta, tb, tc): (alu::Lanes, alu::Lanes, alu::Lanes);
        match op {
            Op::Int {
                op,
                bits,
                signed,
                d,
                a,
                b,
            } => {
                let r = alu::int_op(*op, *bits, *signed, sref!(w, *a, ta), sref!(w, *b, tb));
                w.put(*d, &r, exec);
            }
            Op::IntUn { op, bits, d, a } => {
                let r = alu::int_un(*op, *bits, sref!(w, *a, ta));
                w.put(*d, &r, exec);
            }
            Op::MulWide {
                signed,
                bits,
                d,
                a,
                b,
            } => {
                let r = alu::mul_wide(*signed, *bits, sref!(w, *a, ta), sref!(w, *b, tb));
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
                    sref!(w, *a, ta),
                    sref!(w, *b, tb),
                    sref!(w, *c, tc),
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
                let r = alu::fbin(*op, *ty, *ftz, *sat, sref!(w, *a, ta), sref!(w, *b, tb));
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
                let r = alu::fma(
                    *ty,
                    *ftz,
                    *sat,
                    sref!(w, *a, ta),
                    sref!(w, *b, tb),
                    sref!(w, *c, tc),
                );
                w.put(*d, &r, exec);
            }
            Op::FUn { op, ty, ftz, d, a } => {
                let r = alu::fun(*op, *ty, *ftz, sref!(w, *a, ta));
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
                let r = alu::setp(*cmp, *ty, *ftz, sref!(w, *a, ta), sref!(w, *b, tb));
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
                let r = alu::map3(
                    sref!(w, *a, ta),
                    sref!(w, *b, tb),
                    &w.get(Src::Reg(*c)),
                    |x, y, p| {
                        if p & 1 != 0 { x } else { y }
                    },
                );
                w.put(*d, &r, exec);
            }
            Op::Testp { p, ty, d, a } => {
                let r = alu::testp(*p, *ty, sref!(w, *a, ta));
                w.put(*d, &r, exec);
            }
            Op::Mov { d, a } => {
                let m = alu::mask_of(self.l.k.slot_bits[*d as usize] as u32);
                let r = alu::map1(sref!(w, *a, ta), |x| x & m);
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
                let r = cvt::cvt(*dty, *sty, *rnd, *int_rnd, *sat, *ftz, sref!(w, *a, ta));
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
                let r = cvt::cvt_pack(*bf16, *relu, sref!(w, *a, ta), sref!(w, *b, tb));
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
            Op::FenceProxyAsync => {
                self.proxy_fences[wi] = self.proxy_fences[wi].wrapping_add(1) & GENERIC_COUNT;
            }
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
            Op::Prmt { d, a, b, c } => {
                let (x, y) = (w.get(*a), w.get(*b));
                let lo = alu::map2(&x, &y, |p, q| (p & 0xffff_ffff) | (q << 32));
                let r = alu::map2(&lo, sref!(w, *c, tc), |v, s| {
                    let mut o = 0u64;
                    for i in 0..4 {
                        let n = (s >> (4 * i)) & 0xf;
                        let byte = (v >> (8 * (n & 7))) & 0xff;
                        let byte = if n & 8 != 0 {
                            if byte & 0x80 != 0 { 0xff } else { 0 }
                        } else {
                            byte
                        };
                        o |= byte << (8 * i);
                    }
                    o
                });
                w.put(*d, &r, exec);
            }
            Op::Bfe {
                signed,
                bits,
                d,
                a,
                b,
                c,
            } => {
                let w_ = *bits as u64;
                let sg = *signed;
                let pl = alu::map2(sref!(w, *b, tb), sref!(w, *c, tc), |p, l| {
                    (p & 0xff) | (l & 0xff) << 8
                });
                let r = alu::map2(sref!(w, *a, ta), &pl, |x, pl| {
                    let (pos, len) = (pl & 0xff, pl >> 8);
                    if len == 0 {
                        return 0;
                    }
                    let sbit = sg && (x >> (pos + len - 1).min(w_ - 1)) & 1 != 0;
                    let mut o = 0u64;
                    for i in 0..w_ {
                        let bit = if i < len && pos + i < w_ {
                            (x >> (pos + i)) & 1 != 0
                        } else {
                            sbit
                        };
                        o |= u64::from(bit) << i;
                    }
                    o
                });
                w.put(*d, &r, exec);
            }
            Op::Bfi {
                bits,
                d,
                a,
                b,
                c,
                e,
            } => {
                let w_ = *bits as u64;
                let pl = alu::map2(sref!(w, *c, tc), &w.get(*e), |p, l| {
                    (p & 0xff) | (l & 0xff) << 8
                });
                let ab = alu::map2(sref!(w, *a, ta), sref!(w, *b, tb), |x, y| x ^ y);
                let bv = w.get(*b);
                let r = alu::map3(&ab, &bv, &pl, |xy, y, pl| {
                    let x = xy ^ y;
                    let (pos, len) = (pl & 0xff, pl >> 8);
                    let mut o = y;
                    for i in 0..len {
                        if pos + i < w_ {
                            o = (o & !(1 << (pos + i))) | (((x >> i) & 1) << (pos + i));
                        }
                    }
                    o
                });
                w.put(*d, &r, exec);
            }
            Op::Vote { .. } | Op::Elect { .. } => return self.sync_op(wi, op, exec),
            Op::Half {
                op,
                bf16,
                x2,
                ftz,
                sat,
                d,
                a,
                b,
                c,
            } => {
                let r = super::half::half(
                    *op,
                    *bf16,
                    *x2,
                    *ftz,
                    *sat,
                    sref!(w, *a, ta),
                    sref!(w, *b, tb),
                    sref!(w, *c, tc),
                );
                w.put(*d, &r, exec);
            }
            Op::Activemask { d } => w.put(*d, &[exec as u64; 32], exec),
            Op::WgmmaFence
            | Op::WgmmaCommit
            | Op::WgmmaWait { .. }
            | Op::Wgmma { .. }
            | Op::TmaLoad { .. } => return self.hopper_op(wi, op, exec),
        }
        Ok(Flow::Next)
    }
}
