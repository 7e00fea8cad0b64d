//! Rounding the fp32 master weights into the low-precision working copy.
//!
//! Round to nearest even is `half`'s conversion. Stochastic rounding (bf16 only) rounds up with
//! probability equal to the discarded fraction, so the rounded value is unbiased. Its random bits
//! come from a counter-based hash of `(seed, step, index)`: no state, any element can be rounded
//! independently, and a GPU kernel computes the same bits from the same three integers:
//!
//! ```text
//! key  = mix64(seed ^ mix64(step + 0x9E3779B97F4A7C15))      // once per step, on the host
//! bits = mix64(key ^ (index * 0xD1B54A32D192ED03)) >> 48       // per element, 16 bits
//! bf16 = upper 16 bits of (f32_bits(x) + bits)                 // NaN stays NaN (quieted)
//! ```
//!
//! `mix64` is the splitmix64 output function; all integer arithmetic wraps modulo 2^64. `index`
//! is the element's global index in the flat parameter buffer, so sharded and unsharded updates
//! round identically.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// How the working copy is rounded from the master weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Rounding {
    /// Round to nearest, ties to even.
    #[default]
    Nearest,
    /// Stochastic rounding (bf16 only), reproducible from `seed`.
    Stochastic { seed: u64 },
}

/// The splitmix64 output function (a bijection on u64).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-step key of stochastic rounding (computed once per step; a kernel parameter).
#[inline]
pub fn stochastic_key(seed: u64, step: u64) -> u64 {
    mix64(seed ^ mix64(step.wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

/// The 16 random bits for element `index` under `key`.
#[inline]
pub fn stochastic_bits(key: u64, index: u64) -> u16 {
    (mix64(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 48) as u16
}

/// Stochastically rounds `x` to bf16 with the random bits `r`: the result is the bf16 neighbour
/// above `|x|` with probability (discarded low 16 bits) / 2^16, else the one below. NaN maps to
/// a quiet NaN; values that are already bf16 are returned unchanged.
#[inline]
pub fn bf16_stochastic(x: f32, r: u16) -> bf16 {
    if x.is_nan() {
        return bf16::from_f32(x);
    }
    // f32 is sign-magnitude: adding to the bit pattern moves the magnitude up. The largest
    // non-NaN pattern is 0xFF80_0000 (-inf), so the sum cannot wrap; +-inf stay inf.
    let b = x.to_bits().wrapping_add(r as u32);
    bf16::from_bits((b >> 16) as u16)
}

/// Rounds `x` to bf16, round to nearest even.
#[inline]
pub fn bf16_nearest(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// Rounds `x` to IEEE half, round to nearest even (overflow gives inf).
#[inline]
pub fn f16_nearest(x: f32) -> f16 {
    f16::from_f32(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_picks_a_neighbour_and_keeps_exact_values() {
        let x = 1.0f32 + 3.0 / 1024.0; // between bf16 1.0 and 1.0078125
        for r in [0u16, 1, 0x7FFF, 0x8000, 0xFFFF] {
            let y = bf16_stochastic(x, r).to_f32();
            assert!(y == 1.0 || y == 1.0078125, "{y}");
        }
        assert_eq!(bf16_stochastic(x, 0).to_f32(), 1.0);
        assert_eq!(bf16_stochastic(x, 0xFFFF).to_f32(), 1.0078125);
        assert_eq!(bf16_stochastic(-x, 0xFFFF).to_f32(), -1.0078125);
        for exact in [0.0f32, -0.0, 1.5, -2.0, f32::INFINITY, f32::NEG_INFINITY] {
            for r in [0u16, 0xFFFF] {
                let y = bf16_stochastic(exact, r).to_f32();
                assert_eq!(y.to_bits(), exact.to_bits(), "{exact} {r}");
            }
        }
        assert!(bf16_stochastic(f32::NAN, 0xFFFF).to_f32().is_nan());
        assert!(bf16_stochastic(-f32::NAN, 0xFFFF).to_f32().is_nan());
    }

    #[test]
    fn stochastic_bits_are_reproducible_and_spread() {
        let k = stochastic_key(7, 3);
        assert_eq!(k, stochastic_key(7, 3));
        assert_ne!(k, stochastic_key(7, 4));
        assert_ne!(k, stochastic_key(8, 3));
        let n = 1 << 16;
        let mean = (0..n).map(|i| stochastic_bits(k, i) as f64).sum::<f64>() / n as f64;
        assert!((mean / 65536.0 - 0.5).abs() < 0.01, "{mean}");
        let ones = (0..n).filter(|&i| stochastic_bits(k, i) & 1 == 1).count();
        assert!((ones as f64 / n as f64 - 0.5).abs() < 0.01);
    }
}
