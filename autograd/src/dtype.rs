//! Element types and devices.
//!
//! The CPU reference backend keeps every value in `f32` (or `f64` in the gradient-check mode) and
//! emulates low-precision storage by rounding: a tensor of dtype `bf16` holds `f32` values that
//! are exactly representable in bf16, i.e. what the GPU would store and read back.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Storage type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 (5-bit exponent, 10-bit mantissa).
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Bytes one element occupies in device storage.
    pub const fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Short lower-case name (`f32`, `f16`, `bf16`), as used in kernel symbols and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// True for the 16-bit types.
    pub const fn is_low_precision(self) -> bool {
        !matches!(self, DType::F32)
    }

    /// Rounds `x` to the nearest value representable in this dtype (ties to even), returned as
    /// f32. Identity for `F32`. Values beyond the f16 range become infinities, NaN stays NaN.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// [`DType::round`] applied to every element in place.
    pub fn round_slice(self, xs: &mut [f32]) {
        if self.is_low_precision() {
            for x in xs {
                *x = self.round(*x);
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts `f32`/`fp32`/`float32`, `f16`/`fp16`/`half`/`float16`, `bf16`/`bfloat16`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "half" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::Invalid {
                op: "DType::from_str",
                detail: format!("unknown dtype `{s}` (expected f32, f16 or bf16)"),
            }),
        }
    }
}

/// Where a tensor lives. The CPU reference backend only runs on [`Device::Cpu`]; the CUDA variant
/// exists so that callers can name it and get a clear error until that backend is in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed by the CPU reference backend.
    #[default]
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    /// `Ok(())` on the CPU, [`Error::UnsupportedDevice`] elsewhere; `what` names the caller.
    pub fn ensure_cpu(self, what: &'static str) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            device => Err(Error::UnsupportedDevice { device, what }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_names_and_parsing() {
        assert_eq!(DType::F32.size_of(), 4);
        assert_eq!(DType::BF16.size_of(), 2);
        assert_eq!(DType::F16.name(), "f16");
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("FP16".parse::<DType>().unwrap(), DType::F16);
        assert!("f8".parse::<DType>().is_err());
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3 * 2^-8 is a tie between 1 + 2^-7 (odd mantissa) and 1 + 2^-6: goes up.
        assert_eq!(DType::BF16.round(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        // f16 has 10 mantissa bits.
        assert_eq!(DType::F16.round(1.0 + 1.0 / 2048.0), 1.0);
        assert_eq!(DType::F16.round(70000.0), f32::INFINITY);
        assert_eq!(DType::F32.round(0.1), 0.1);
        assert!(DType::BF16.round(f32::NAN).is_nan());
    }

    #[test]
    fn cuda_is_a_clear_error() {
        let e = Device::Cuda(1).ensure_cpu("Tensor::new").unwrap_err();
        assert!(e.to_string().contains("cuda:1"), "{e}");
        assert!(Device::Cpu.ensure_cpu("x").is_ok());
    }
}
