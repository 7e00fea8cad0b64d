//! The element type the CPU backend computes in.
//!
//! Training runs in `f32`. The same op code also runs in `f64`, which is what the gradient checks
//! use: central finite differences in f64 are accurate to ~1e-9, so the analytic gradients can be
//! held to a tight tolerance. In f64 mode, rounding to `F32` is the identity (the f64 path is the
//! exact reference); rounding to `bf16`/`f16` still goes through those formats.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::dtype::DType;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point type the CPU backend computes in: `f32` (training) or `f64` (checks).
///
/// Sealed: implemented for `f32` and `f64` only.
pub trait Scalar:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialEq
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `f32` or `f64`.
    const NAME: &'static str;

    /// Conversion (rounding to nearest for f32).
    fn from_f64(x: f64) -> Self;
    /// Conversion (exact).
    fn to_f64(self) -> f64;
    /// Conversion (exact).
    fn from_f32(x: f32) -> Self;
    /// Conversion (rounding to nearest for f64).
    fn to_f32(self) -> f32;
    /// Conversion of a count.
    fn from_usize(x: usize) -> Self;
    /// `e^x` (for f32: [`exp_f32`], within 2^-22 relative).
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The larger of two values (the other one if either is NaN).
    fn max(self, other: Self) -> Self;
    /// Neither infinite nor NaN.
    fn is_finite(self) -> bool;

    /// Rounds to what a tensor of `dtype` stores (see the module doc for f64).
    fn round_to(self, dtype: DType) -> Self;

    /// `C <- alpha * A * B + beta * C` with arbitrary strides (matrixmultiply's sgemm/dgemm).
    /// With `beta == 0`, C is not read.
    ///
    /// # Safety
    /// Every element addressed by `(m, k, rsa, csa)` from `a`, `(k, n, rsb, csb)` from `b` and
    /// `(m, n, rsc, csc)` from `c` must be in bounds of live allocations, and the C region must
    /// not alias A or B or be accessed by anyone else during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";

    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_usize(x: usize) -> Self {
        x as f32
    }
    #[inline]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    #[inline]
    fn round_to(self, dtype: DType) -> Self {
        dtype.round(self)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: the caller upholds the bounds and aliasing contract stated on the trait method,
        // which is exactly matrixmultiply's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";

    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline]
    fn from_usize(x: usize) -> Self {
        x as f64
    }
    #[inline]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline]
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline]
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::F32 => self,
            low => low.round(self as f32) as f64,
        }
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: the caller upholds the bounds and aliasing contract stated on the trait method,
        // which is exactly matrixmultiply's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// `e^x` in f32 without a libm call, so that loops over it vectorise: Cody-Waite reduction
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-7 Taylor polynomial for `e^r`, and `2^n` built
/// from exponent bits (split in two factors so `n = 128` does not overflow early). Relative
/// error below 2^-22 over the whole range (tested against f64); `e^x` is 0 below -87.3 (the
/// f32 denormal range is flushed), infinity above 88.72, NaN for NaN. Branch-free and made of
/// plain IEEE operations, so scalar and vectorised code give the same bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0x3F318000: 9 significant bits, n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.72);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) << 23) as u32);
    let s2 = f32::from_bits(((ni - half + 127) << 23) as u32);
    let y = p * s1 * s2;
    if x < -87.3 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else {
        y
    }
}

/// Rounds every element of `xs` to `dtype` (no-op for `F32`).
pub(crate) fn round_slice<T: Scalar>(xs: &mut [T], dtype: DType) {
    if dtype.is_low_precision() {
        for x in xs {
            *x = x.round_to(dtype);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.7 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(
            worst < 1.0 / (1u64 << 22) as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.7).is_finite());
    }
}
