//! f16/bf16 arithmetic: each half widened exactly to f64, computed, rounded once to nearest
//! even (the product of two 16-bit floats is exact in f64, so `fma` rounds once too).

use super::alu::{Lanes, map3};
use crate::ir::HOp;
use half::{bf16, f16};

fn widen(bf: bool, h: u16) -> f64 {
    if bf {
        bf16::from_bits(h).to_f64()
    } else {
        f16::from_bits(h).to_f64()
    }
}

fn narrow(bf: bool, v: f64) -> u16 {
    if bf {
        bf16::from_f64(v).to_bits()
    } else {
        f16::from_f64(v).to_bits()
    }
}

/// Flushes an f16 subnormal to a zero of the same sign.
fn ftz16(h: u16) -> u16 {
    if h & 0x7c00 == 0 { h & 0x8000 } else { h }
}

fn one(op: HOp, bf: bool, ftz: bool, sat: bool, a: u16, b: u16, c: u16) -> u16 {
    let f = |h: u16| if ftz { ftz16(h) } else { h };
    let (x, y, z) = (widen(bf, f(a)), widen(bf, f(b)), widen(bf, f(c)));
    let r = match op {
        HOp::Neg => return a ^ 0x8000,
        HOp::Abs => return a & 0x7fff,
        HOp::Add => x + y,
        HOp::Sub => x - y,
        HOp::Mul => x * y,
        HOp::Fma => x * y + z,
        HOp::Min | HOp::Max => {
            let max = op == HOp::Max;
            if x.is_nan() && y.is_nan() {
                f64::NAN
            } else if x.is_nan() {
                y
            } else if y.is_nan() {
                x
            } else if x == y {
                // -0 < +0.
                if (x.is_sign_negative() && !max) || (x.is_sign_positive() && max) {
                    x
                } else {
                    y
                }
            } else if (x > y) == max {
                x
            } else {
                y
            }
        }
    };
    let r = if sat {
        if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) }
    } else {
        r
    };
    let h = narrow(bf, r);
    if ftz { ftz16(h) } else { h }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn half(
    op: HOp,
    bf: bool,
    x2: bool,
    ftz: bool,
    sat: bool,
    a: &Lanes,
    b: &Lanes,
    c: &Lanes,
) -> Lanes {
    map3(a, b, c, |x, y, z| {
        let lo = one(op, bf, ftz, sat, x as u16, y as u16, z as u16) as u64;
        if x2 {
            let hi = one(
                op,
                bf,
                ftz,
                sat,
                (x >> 16) as u16,
                (y >> 16) as u16,
                (z >> 16) as u16,
            ) as u64;
            lo | hi << 16
        } else {
            lo
        }
    })
}
