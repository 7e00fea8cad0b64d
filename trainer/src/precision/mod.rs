//! Precision modes, the dynamic loss scaler, and the non-finite gradient check.
//!
//! Lathe keeps fp32 master weights in every mode. `bf16` and `fp16` add a low-precision working
//! copy that the forward and backward passes read; only `fp16` needs loss scaling, because its
//! 5-bit exponent flushes small gradients to zero. The scaler follows PyTorch's `GradScaler`
//! exactly (see [`LossScaler`]); in `fp32` and `bf16` it is disabled (scale 1).
//!
//! In every precision Lathe checks the gradients for inf/NaN before the optimizer step and skips
//! the step when it finds one: the check is [`has_nonfinite`] (or the fused
//! [`unscale_and_check`], CPU twin of the device kernel that checks and unscales in one pass).

mod check;
mod inject;
mod scaler;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use check::{has_nonfinite, unscale_and_check};
pub use inject::NonFiniteInjection;
pub use scaler::{LossScaler, MIN_SCALE, ScaleUpdate, ScalerConfig, update_scale};

/// Errors from parsing precision settings or building a scaler.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PrecisionError {
    /// A precision name other than `fp32`, `bf16`, `fp16`.
    #[error("unknown precision `{0}` (expected fp32, bf16 or fp16)")]
    UnknownPrecision(String),
    /// A `--inject-nonfinite` list that does not parse.
    #[error("invalid --inject-nonfinite list `{input}`: item `{item}` {reason}")]
    BadInjectList {
        input: String,
        item: String,
        reason: &'static str,
    },
    /// A scaler setting outside its valid range.
    #[error("invalid loss scaler setting: {0}")]
    BadScalerConfig(String),
}

/// The numeric format of the working copy of the weights and of the activations.
///
/// Parses from and prints as `fp32`, `bf16`, `fp16` (clap `ValueEnum`, `FromStr`, serde).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32; no working copy, no loss scaling.
    #[default]
    Fp32,
    /// bfloat16 working copy and activations; f32 range, so no loss scaling.
    Bf16,
    /// IEEE half working copy and activations, with dynamic loss scaling.
    Fp16,
}

impl Precision {
    /// All modes, in the order the CLI lists them.
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Bf16, Precision::Fp16];

    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// Bytes per element of the working copy (the master copy is always 4 bytes).
    pub fn bytes_per_element(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
        }
    }

    /// Whether a separate low-precision working copy of the weights exists.
    pub fn has_working_copy(self) -> bool {
        self != Precision::Fp32
    }

    /// Whether this mode uses dynamic loss scaling (only `fp16`).
    pub fn uses_loss_scaling(self) -> bool {
        self == Precision::Fp16
    }

    /// Rounds `x` to this precision (round to nearest even) and back to f32: what a value
    /// stored in the working copy reads as.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::Fp32 => x,
            Precision::Bf16 => half::bf16::from_f32(x).to_f32(),
            Precision::Fp16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = PrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| PrecisionError::UnknownPrecision(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_roundtrip_through_fromstr_display_serde_and_clap() {
        for p in Precision::ALL {
            let s = p.to_string();
            assert_eq!(s.parse::<Precision>().unwrap(), p);
            assert_eq!(<Precision as ValueEnum>::from_str(&s, false).unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Precision>(&json).unwrap(), p);
        }
        assert_eq!(" BF16 ".parse::<Precision>().unwrap(), Precision::Bf16);
        let err = "fp8".parse::<Precision>().unwrap_err();
        assert!(err.to_string().contains("fp8"), "{err}");
    }

    #[test]
    fn round_matches_the_format() {
        let x = 1.0 + 1.0 / 3.0;
        assert_eq!(Precision::Fp32.round(x), x);
        assert_eq!(Precision::Bf16.round(x), 1.3359375);
        assert_eq!(Precision::Fp16.round(x), 1.3330078);
        assert!(Precision::Fp16.round(1e6).is_infinite());
        assert!(Precision::Bf16.round(1e30).is_finite());
    }
}
