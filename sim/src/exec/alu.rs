//! Arithmetic on 32 lanes at once: integer, float, comparisons and conversions.
//!
//! Each function computes all 32 lanes (inactive lanes compute garbage that is never written
//! back), which keeps the loops branch-free.

use crate::ir::*;

pub(crate) type Lanes = [u64; 32];

#[inline(always)]
pub(crate) fn map1(a: &Lanes, f: impl Fn(u64) -> u64) -> Lanes {
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l]);
    }
    o
}

#[inline(always)]
pub(crate) fn map2(a: &Lanes, b: &Lanes, f: impl Fn(u64, u64) -> u64) -> Lanes {
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l], b[l]);
    }
    o
}

#[inline(always)]
pub(crate) fn map3(a: &Lanes, b: &Lanes, c: &Lanes, f: impl Fn(u64, u64, u64) -> u64) -> Lanes {
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l], b[l], c[l]);
    }
    o
}

#[inline(always)]
pub(crate) fn mask_of(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extends the low `bits` of `x`.
#[inline(always)]
pub(crate) fn sx(x: u64, bits: u32) -> i64 {
    let s = 64 - bits;
    ((x << s) as i64) >> s
}

pub(crate) fn int_op(op: IntOp, bits: u8, signed: bool, a: &Lanes, b: &Lanes) -> Lanes {
    let w = bits as u32;
    let m = mask_of(w);
    let min_s = -(1i128 << (w - 1));
    let max_s = (1i128 << (w - 1)) - 1;
    match op {
        IntOp::Add => map2(a, b, |x, y| x.wrapping_add(y) & m),
        IntOp::Sub => map2(a, b, |x, y| x.wrapping_sub(y) & m),
        IntOp::AddSat => map2(a, b, |x, y| {
            ((sx(x, w) as i128 + sx(y, w) as i128).clamp(min_s, max_s) as u64) & m
        }),
        IntOp::SubSat => map2(a, b, |x, y| {
            ((sx(x, w) as i128 - sx(y, w) as i128).clamp(min_s, max_s) as u64) & m
        }),
        IntOp::MulLo => map2(a, b, |x, y| x.wrapping_mul(y) & m),
        IntOp::MulHi => {
            if signed {
                map2(a, b, |x, y| {
                    (((sx(x, w) as i128 * sx(y, w) as i128) >> w) as u64) & m
                })
            } else {
                map2(a, b, |x, y| {
                    ((((x & m) as u128 * (y & m) as u128) >> w) as u64) & m
                })
            }
        }
        IntOp::Min | IntOp::Max => {
            let max = op == IntOp::Max;
            if signed {
                map2(a, b, |x, y| {
                    let (p, q) = (sx(x, w), sx(y, w));
                    (if (p > q) == max { p } else { q }) as u64 & m
                })
            } else {
                map2(a, b, |x, y| {
                    let (p, q) = (x & m, y & m);
                    if (p > q) == max { p } else { q }
                })
            }
        }
        // Division by zero: the quotient is all ones and the remainder the dividend (what
        // the hardware returns; the ISA leaves the value unspecified). Signed overflow wraps.
        IntOp::Div => {
            if signed {
                map2(a, b, |x, y| {
                    let (p, q) = (sx(x, w), sx(y, w));
                    if q == 0 {
                        m
                    } else {
                        (p.wrapping_div(q) as u64) & m
                    }
                })
            } else {
                map2(a, b, |x, y| {
                    let (p, q) = (x & m, y & m);
                    p.checked_div(q).unwrap_or(m)
                })
            }
        }
        IntOp::Rem => {
            if signed {
                map2(a, b, |x, y| {
                    let (p, q) = (sx(x, w), sx(y, w));
                    if q == 0 {
                        x & m
                    } else {
                        (p.wrapping_rem(q) as u64) & m
                    }
                })
            } else {
                map2(a, b, |x, y| {
                    let (p, q) = (x & m, y & m);
                    p.checked_rem(q).unwrap_or(p)
                })
            }
        }
        IntOp::And => map2(a, b, |x, y| x & y & m),
        IntOp::Or => map2(a, b, |x, y| (x | y) & m),
        IntOp::Xor => map2(a, b, |x, y| (x ^ y) & m),
        // Shift amounts are unsigned and clamp at the operand width.
        IntOp::Shl => map2(a, b, |x, y| {
            let s = y & 0xffff_ffff;
            if s >= w as u64 { 0 } else { (x << s) & m }
        }),
        IntOp::Shr => {
            if signed {
                map2(a, b, |x, y| {
                    let s = (y & 0xffff_ffff).min(w as u64 - 1);
                    ((sx(x, w) >> s) as u64) & m
                })
            } else {
                map2(a, b, |x, y| {
                    let s = y & 0xffff_ffff;
                    if s >= w as u64 { 0 } else { (x & m) >> s }
                })
            }
        }
    }
}

pub(crate) fn int_un(op: IntUnOp, bits: u8, a: &Lanes) -> Lanes {
    let w = bits as u32;
    let m = mask_of(w);
    match op {
        IntUnOp::Not => map1(a, |x| !x & m),
        IntUnOp::Cnot => map1(a, |x| u64::from(x & m == 0)),
        IntUnOp::Neg => map1(a, |x| x.wrapping_neg() & m),
        IntUnOp::Abs => map1(a, |x| (sx(x, w).wrapping_abs() as u64) & m),
        IntUnOp::Popc => map1(a, |x| (x & m).count_ones() as u64),
        IntUnOp::Clz => map1(a, |x| ((x & m).leading_zeros() - (64 - w)) as u64),
        IntUnOp::Brev => map1(a, |x| (x & m).reverse_bits() >> (64 - w)),
    }
}

pub(crate) fn mul_wide(signed: bool, bits: u8, a: &Lanes, b: &Lanes) -> Lanes {
    let w = bits as u32;
    let m = mask_of(w);
    let m2 = mask_of(2 * w);
    if signed {
        map2(a, b, |x, y| (sx(x, w).wrapping_mul(sx(y, w)) as u64) & m2)
    } else {
        map2(a, b, |x, y| ((x & m).wrapping_mul(y & m)) & m2)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn mad(
    hi: bool,
    wide: bool,
    signed: bool,
    bits: u8,
    a: &Lanes,
    b: &Lanes,
    c: &Lanes,
) -> Lanes {
    let w = bits as u32;
    let m = mask_of(w);
    if wide {
        let p = mul_wide(signed, bits, a, b);
        let m2 = mask_of(2 * w);
        return map2(&p, c, |x, y| x.wrapping_add(y) & m2);
    }
    if hi {
        let p = int_op(IntOp::MulHi, bits, signed, a, b);
        return map2(&p, c, |x, y| x.wrapping_add(y) & m);
    }
    map3(a, b, c, |x, y, z| x.wrapping_mul(y).wrapping_add(z) & m)
}

#[inline(always)]
pub(crate) fn f32_of(x: u64) -> f32 {
    f32::from_bits(x as u32)
}

#[inline(always)]
pub(crate) fn bits32(x: f32) -> u64 {
    x.to_bits() as u64
}

/// Flushes an f32 subnormal to a zero of the same sign.
#[inline(always)]
pub(crate) fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// Saturates to [0, 1] (NaN to 0).
#[inline(always)]
fn sat32(x: f32) -> f32 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// PTX `min`/`max`: NaN operands are ignored (both NaN gives NaN); -0 < +0.
#[inline(always)]
fn fminmax<T: Copy + PartialOrd>(
    x: T,
    y: T,
    xn: bool,
    yn: bool,
    xneg0: bool,
    max: bool,
) -> (T, bool) {
    if xn {
        return (y, false);
    }
    if yn {
        return (x, false);
    }
    let pick_x = if max { x > y } else { x < y };
    if pick_x || (x == y && (xneg0 != max)) {
        (x, true)
    } else {
        (y, true)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn fbin(op: FOp, ty: FTy, ftz: bool, sat: bool, a: &Lanes, b: &Lanes) -> Lanes {
    match ty {
        FTy::F32 => {
            let f = |x: u64, y: u64| -> u64 {
                let (mut p, mut q) = (f32_of(x), f32_of(y));
                if ftz {
                    p = ftz32(p);
                    q = ftz32(q);
                }
                let mut r = match op {
                    FOp::Add => p + q,
                    FOp::Sub => p - q,
                    FOp::Mul => p * q,
                    FOp::Div => p / q,
                    FOp::Min | FOp::Max => {
                        let (v, _) = fminmax(
                            p,
                            q,
                            p.is_nan(),
                            q.is_nan(),
                            p.to_bits() == 0x8000_0000,
                            op == FOp::Max,
                        );
                        v
                    }
                    FOp::MinNan | FOp::MaxNan => {
                        if p.is_nan() || q.is_nan() {
                            f32::from_bits(0x7fff_ffff)
                        } else {
                            fminmax(
                                p,
                                q,
                                false,
                                false,
                                p.to_bits() == 0x8000_0000,
                                op == FOp::MaxNan,
                            )
                            .0
                        }
                    }
                };
                if ftz {
                    r = ftz32(r);
                }
                if sat {
                    r = sat32(r);
                }
                bits32(r)
            };
            map2(a, b, f)
        }
        FTy::F64 => map2(a, b, |x, y| {
            let (p, q) = (f64::from_bits(x), f64::from_bits(y));
            let r = match op {
                FOp::Add => p + q,
                FOp::Sub => p - q,
                FOp::Mul => p * q,
                FOp::Div => p / q,
                FOp::Min | FOp::Max => {
                    fminmax(
                        p,
                        q,
                        p.is_nan(),
                        q.is_nan(),
                        p.to_bits() == 1 << 63,
                        op == FOp::Max,
                    )
                    .0
                }
                FOp::MinNan | FOp::MaxNan => {
                    if p.is_nan() || q.is_nan() {
                        f64::from_bits(0x7fff_ffff_ffff_ffff)
                    } else {
                        fminmax(
                            p,
                            q,
                            false,
                            false,
                            p.to_bits() == 1 << 63,
                            op == FOp::MaxNan,
                        )
                        .0
                    }
                }
            };
            r.to_bits()
        }),
    }
}

pub(crate) fn fma(ty: FTy, ftz: bool, sat: bool, a: &Lanes, b: &Lanes, c: &Lanes) -> Lanes {
    match ty {
        FTy::F32 => map3(a, b, c, |x, y, z| {
            let (mut p, mut q, mut s) = (f32_of(x), f32_of(y), f32_of(z));
            if ftz {
                p = ftz32(p);
                q = ftz32(q);
                s = ftz32(s);
            }
            let mut r = p.mul_add(q, s);
            if ftz {
                r = ftz32(r);
            }
            if sat {
                r = sat32(r);
            }
            bits32(r)
        }),
        FTy::F64 => map3(a, b, c, |x, y, z| {
            f64::from_bits(x)
                .mul_add(f64::from_bits(y), f64::from_bits(z))
                .to_bits()
        }),
    }
}

/// Unary float functions. `.approx` forms are computed in f64 and rounded once, which is
/// within every error bound the ISA documents for them.
pub(crate) fn fun(op: FUnOp, ty: FTy, ftz: bool, a: &Lanes) -> Lanes {
    let g = |v: f64| -> f64 {
        match op {
            FUnOp::Neg => -v,
            FUnOp::Abs => v.abs(),
            FUnOp::Rcp => 1.0 / v,
            FUnOp::Sqrt => v.sqrt(),
            FUnOp::Rsqrt => 1.0 / v.sqrt(),
            FUnOp::Ex2 => v.exp2(),
            FUnOp::Lg2 => v.log2(),
            FUnOp::Sin => v.sin(),
            FUnOp::Cos => v.cos(),
            FUnOp::Tanh => v.tanh(),
        }
    };
    match ty {
        FTy::F32 => map1(a, |x| {
            let mut p = f32_of(x);
            if ftz {
                p = ftz32(p);
            }
            let mut r = match op {
                FUnOp::Neg => -p,
                FUnOp::Abs => p.abs(),
                FUnOp::Rcp => 1.0 / p,
                FUnOp::Sqrt => p.sqrt(),
                _ => g(p as f64) as f32,
            };
            if ftz {
                r = ftz32(r);
            }
            bits32(r)
        }),
        FTy::F64 => map1(a, |x| g(f64::from_bits(x)).to_bits()),
    }
}

/// Compares two lanes' values of type `ty`.
#[inline(always)]
fn compare(cmp: Cmp, ty: Ty, ftz: bool, x: u64, y: u64) -> bool {
    match ty {
        Ty::F32 | Ty::F64 => {
            let (p, q) = if ty == Ty::F32 {
                let (mut p, mut q) = (f32_of(x), f32_of(y));
                if ftz {
                    p = ftz32(p);
                    q = ftz32(q);
                }
                (p as f64, q as f64)
            } else {
                (f64::from_bits(x), f64::from_bits(y))
            };
            let un = p.is_nan() || q.is_nan();
            match cmp {
                Cmp::Eq => p == q,
                Cmp::Ne => !un && p != q,
                Cmp::Lt => p < q,
                Cmp::Le => p <= q,
                Cmp::Gt => p > q,
                Cmp::Ge => p >= q,
                Cmp::Equ => un || p == q,
                Cmp::Neu => p != q,
                Cmp::Ltu => un || p < q,
                Cmp::Leu => un || p <= q,
                Cmp::Gtu => un || p > q,
                Cmp::Geu => un || p >= q,
                Cmp::Num => !un,
                Cmp::Nan => un,
                _ => false,
            }
        }
        _ => {
            let w = ty.bits();
            let m = mask_of(w);
            let signed = matches!(ty, Ty::S(_));
            let (p, q) = (x & m, y & m);
            let ord = if signed {
                sx(p, w).cmp(&sx(q, w))
            } else {
                p.cmp(&q)
            };
            use std::cmp::Ordering::*;
            match cmp {
                Cmp::Eq => ord == Equal,
                Cmp::Ne => ord != Equal,
                Cmp::Lt | Cmp::Lo => ord == Less,
                Cmp::Le | Cmp::Ls => ord != Greater,
                Cmp::Gt | Cmp::Hi => ord == Greater,
                Cmp::Ge | Cmp::Hs => ord != Less,
                _ => false,
            }
        }
    }
}

pub(crate) fn setp(cmp: Cmp, ty: Ty, ftz: bool, a: &Lanes, b: &Lanes) -> Lanes {
    map2(a, b, |x, y| u64::from(compare(cmp, ty, ftz, x, y)))
}

pub(crate) fn testp(p: TestP, ty: FTy, a: &Lanes) -> Lanes {
    map1(a, |x| {
        let v = match ty {
            FTy::F32 => f32_of(x) as f64,
            FTy::F64 => f64::from_bits(x),
        };
        let sub = match ty {
            FTy::F32 => f32_of(x).is_subnormal(),
            FTy::F64 => v.is_subnormal(),
        };
        u64::from(match p {
            TestP::Finite => v.is_finite(),
            TestP::Infinite => v.is_infinite(),
            TestP::Number => !v.is_nan(),
            TestP::NotANumber => v.is_nan(),
            TestP::Normal => v.is_finite() && v != 0.0 && !sub,
            TestP::Subnormal => sub,
        })
    })
}
