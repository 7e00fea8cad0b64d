//! `cvt`: conversions between integer and float types with every rounding mode decoded.

use super::alu::{Lanes, f32_of, ftz32, map1, map2, mask_of, sx};
use crate::ir::{Rnd, Ty};
use half::{bf16, f16};

/// Rounds an f64 that holds the exact value to f32 with mode `r`.
fn f64_to_f32(x: f64, r: Rnd) -> f32 {
    let n = x as f32;
    if r == Rnd::Rn || n.is_nan() || (n as f64) == x {
        return n;
    }
    let up = |v: f32| if v == f32::INFINITY { v } else { next_up(v) };
    let down = |v: f32| {
        if v == f32::NEG_INFINITY {
            v
        } else {
            next_down(v)
        }
    };
    let nf = n as f64;
    match r {
        Rnd::Rz => {
            if nf.abs() > x.abs() {
                if n > 0.0 { down(n) } else { up(n) }
            } else {
                n
            }
        }
        Rnd::Rm => {
            if nf > x {
                down(n)
            } else {
                n
            }
        }
        _ => {
            if nf < x {
                up(n)
            } else {
                n
            }
        }
    }
}

fn next_up(v: f32) -> f32 {
    if v.is_nan() || v == f32::INFINITY {
        return v;
    }
    if v == 0.0 {
        return f32::from_bits(1);
    }
    let b = v.to_bits();
    f32::from_bits(if v > 0.0 { b + 1 } else { b - 1 })
}

fn next_down(v: f32) -> f32 {
    -next_up(-v)
}

/// Rounds to an integral value with mode `r`.
fn round_int(v: f64, r: Rnd) -> f64 {
    match r {
        Rnd::Rn => v.round_ties_even(),
        Rnd::Rz => v.trunc(),
        Rnd::Rm => v.floor(),
        Rnd::Rp => v.ceil(),
    }
}

/// Reads a lane value of float type `t` as f64 (exact).
fn as_f64(x: u64, t: Ty, ftz: bool) -> f64 {
    match t {
        Ty::F16 => f16::from_bits(x as u16).to_f64(),
        Ty::Bf16 => bf16::from_bits(x as u16).to_f64(),
        Ty::F32 => {
            let v = f32_of(x);
            (if ftz { ftz32(v) } else { v }) as f64
        }
        _ => f64::from_bits(x),
    }
}

/// Integer range of type `t` as i128 bounds.
fn range(t: Ty) -> (i128, i128) {
    let w = t.bits();
    match t {
        Ty::S(_) => (-(1i128 << (w - 1)), (1i128 << (w - 1)) - 1),
        _ => (0, (1i128 << w) - 1),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cvt(
    dty: Ty,
    sty: Ty,
    rnd: Rnd,
    int_rnd: bool,
    sat: bool,
    ftz: bool,
    a: &Lanes,
) -> Lanes {
    let (df, sf) = (dty.is_float(), sty.is_float());
    let dm = mask_of(dty.bits());
    match (df, sf) {
        (false, false) => map1(a, |x| {
            let v: i128 = match sty {
                Ty::S(_) => sx(x, sty.bits()) as i128,
                _ => (x & mask_of(sty.bits())) as i128,
            };
            let v = if sat {
                let (lo, hi) = range(dty);
                v.clamp(lo, hi)
            } else {
                v
            };
            (v as u64) & dm
        }),
        (false, true) => map1(a, |x| {
            // Float to integer saturates to the destination range; NaN gives 0.
            let v = round_int(as_f64(x, sty, ftz), rnd);
            let (lo, hi) = range(dty);
            let i = if v.is_nan() {
                0
            } else if v <= lo as f64 {
                lo
            } else if v >= hi as f64 {
                hi
            } else {
                v as i128
            };
            (i as u64) & dm
        }),
        (true, false) => map1(a, |x| {
            let signed = matches!(sty, Ty::S(_));
            let w = sty.bits();
            match dty {
                Ty::F64 => {
                    if signed {
                        (sx(x, w) as f64).to_bits()
                    } else {
                        ((x & mask_of(w)) as f64).to_bits()
                    }
                }
                Ty::F32 => {
                    let v = if w == 64 {
                        // Round-to-nearest only (decode rejects directed modes here).
                        if signed { x as i64 as f32 } else { x as f32 }
                    } else if signed {
                        f64_to_f32(sx(x, w) as f64, rnd)
                    } else {
                        f64_to_f32((x & mask_of(w)) as f64, rnd)
                    };
                    let v = if sat { sat01(v) } else { v };
                    v.to_bits() as u64
                }
                Ty::F16 => {
                    let v = if signed {
                        sx(x, w) as f64
                    } else {
                        (x & mask_of(w)) as f64
                    };
                    f16::from_f64(v).to_bits() as u64
                }
                _ => {
                    let v = if signed {
                        sx(x, w) as f64
                    } else {
                        (x & mask_of(w)) as f64
                    };
                    bf16::from_f64(v).to_bits() as u64
                }
            }
        }),
        (true, true) => map1(a, |x| {
            let v = as_f64(x, sty, ftz);
            let v = if int_rnd { round_int(v, rnd) } else { v };
            match dty {
                Ty::F64 => {
                    let v = if sat { sat64(v) } else { v };
                    v.to_bits()
                }
                Ty::F32 => {
                    // f64 to f32 rounds once; f16/bf16/f32 sources are exact in f64.
                    let mut r = f64_to_f32(v, rnd);
                    if ftz {
                        r = ftz32(r);
                    }
                    if sat {
                        r = sat01(r);
                    }
                    r.to_bits() as u64
                }
                Ty::F16 => {
                    let r = from_wide(v, sty, false);
                    let r = if sat { sat16(r, false) } else { r };
                    r as u64
                }
                _ => {
                    let r = from_wide(v, sty, true);
                    let r = if sat { sat16(r, true) } else { r };
                    r as u64
                }
            }
        }),
    }
}

/// Rounds to f16/bf16 to nearest even. From f32 the rounding is direct; from f64 it is also a
/// single rounding (half's f64 conversions round directly).
fn from_wide(v: f64, sty: Ty, bf: bool) -> u16 {
    match (bf, sty) {
        (false, Ty::F32) => f16::from_f32(v as f32).to_bits(),
        (true, Ty::F32) => bf16::from_f32(v as f32).to_bits(),
        (false, _) => f16::from_f64(v).to_bits(),
        (true, _) => bf16::from_f64(v).to_bits(),
    }
}

fn sat01(v: f32) -> f32 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) }
}

fn sat64(v: f64) -> f64 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) }
}

fn sat16(r: u16, bf: bool) -> u16 {
    let v = if bf {
        bf16::from_bits(r).to_f32()
    } else {
        f16::from_bits(r).to_f32()
    };
    let s = sat01(v);
    if bf {
        bf16::from_f32(s).to_bits()
    } else {
        f16::from_f32(s).to_bits()
    }
}

/// `cvt.rn{.relu}.{bf16x2,f16x2}.f32 d, a, b`: `a` goes to the upper half, `b` to the lower.
pub(crate) fn cvt_pack(bf: bool, relu: bool, a: &Lanes, b: &Lanes) -> Lanes {
    let one = |x: u64| -> u64 {
        let mut v = f32_of(x);
        if relu && !v.is_nan() && v < 0.0 {
            v = 0.0;
        }
        (if bf {
            bf16::from_f32(v).to_bits()
        } else {
            f16::from_f32(v).to_bits()
        }) as u64
    };
    map2(a, b, |x, y| (one(x) << 16) | one(y))
}
