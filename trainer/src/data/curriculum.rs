//! Sequence-length curriculum: train on short sequences first, growing to the full length.
//!
//! With `Seq { start_len, warmup_steps }` the sequence length at (0-based) step `s` of a run of
//! full length `T` is
//!
//! ```text
//! s >= warmup_steps:  T
//! otherwise:          max(start_len, round_down_8(start_len + (T - start_len) * s / warmup_steps))
//! ```
//!
//! a linear ramp (integer arithmetic, so every rank and every resumed run agrees) rounded down to
//! a multiple of 8, so the ramp visits at most `T / 8` distinct shapes (fewer kernel shapes to
//! tune and fewer CUDA graphs to capture) and every length but `start_len` and `T` is
//! tensor-core friendly. The loader applies it by truncation: the window of step `s` is still cut
//! at `T + 1` tokens on the same grid, and the batch holds its first `len` inputs and targets
//! (`Batch::t` says which `len`). Data positions therefore do not depend on the curriculum, and
//! a run may change or drop it on resume; only the number of tokens per step grows.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};

/// How the sequence length grows over the first steps of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Curriculum {
    /// Every step uses the full length.
    #[default]
    None,
    /// Linear ramp from `start_len` to the full length over `warmup_steps` steps.
    Seq { start_len: usize, warmup_steps: u64 },
}

impl Curriculum {
    /// Sequence length used at `step` when the full length is `max_len`. Always in
    /// `1..=max_len` for a curriculum that passed [`Curriculum::validate`].
    pub fn seq_len_at(&self, step: u64, max_len: usize) -> usize {
        match *self {
            Curriculum::None => max_len,
            Curriculum::Seq {
                start_len,
                warmup_steps,
            } => {
                let start = start_len.clamp(1, max_len.max(1));
                if step >= warmup_steps {
                    return max_len;
                }
                let span = (max_len - start) as u128;
                let raw = start + (span * step as u128 / warmup_steps as u128) as usize;
                (raw - raw % 8).max(start)
            }
        }
    }

    /// Checks the curriculum against the full length `max_len`.
    pub fn validate(&self, max_len: usize) -> Result<()> {
        if let Curriculum::Seq {
            start_len,
            warmup_steps,
        } = *self
        {
            if start_len == 0 || start_len > max_len {
                return Err(DataError::Config(format!(
                    "curriculum start length must be in 1..={max_len} (the sequence length), got {start_len}"
                )));
            }
            if warmup_steps == 0 {
                return Err(DataError::Config(
                    "curriculum warmup steps must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Curriculum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Curriculum::None => f.write_str("none"),
            Curriculum::Seq {
                start_len,
                warmup_steps,
            } => write!(f, "seq:{start_len}:{warmup_steps}"),
        }
    }
}

/// Parses `none` or `seq:START_LEN:WARMUP_STEPS` (the command-line spelling).
impl FromStr for Curriculum {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        if s == "none" {
            return Ok(Curriculum::None);
        }
        let bad = || {
            DataError::Config(format!(
                "curriculum must be `none` or `seq:START_LEN:WARMUP_STEPS`, got `{s}`"
            ))
        };
        let mut parts = s.split(':');
        if parts.next() != Some("seq") {
            return Err(bad());
        }
        let start_len = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let warmup_steps = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Curriculum::Seq {
            start_len,
            warmup_steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_is_monotone_rounded_and_reaches_full_length() {
        let c = Curriculum::Seq {
            start_len: 32,
            warmup_steps: 100,
        };
        c.validate(1024).unwrap();
        assert_eq!(c.seq_len_at(0, 1024), 32);
        assert_eq!(c.seq_len_at(50, 1024), 528); // 32 + 992 * 50 / 100
        assert_eq!(c.seq_len_at(100, 1024), 1024);
        assert_eq!(c.seq_len_at(10_000, 1024), 1024);
        let mut prev = 0;
        for s in 0..100 {
            let l = c.seq_len_at(s, 1024);
            assert!(
                l >= prev && l.is_multiple_of(8) && l < 1024,
                "step {s}: {l}"
            );
            prev = l;
        }
        assert_eq!(Curriculum::None.seq_len_at(0, 77), 77);
    }

    #[test]
    fn parse_and_validate() {
        let c: Curriculum = "seq:64:500".parse().unwrap();
        assert_eq!(
            c,
            Curriculum::Seq {
                start_len: 64,
                warmup_steps: 500
            }
        );
        assert_eq!(c.to_string(), "seq:64:500");
        assert_eq!("none".parse::<Curriculum>().unwrap(), Curriculum::None);
        assert!("seq:64".parse::<Curriculum>().is_err());
        assert!("linear:1:2".parse::<Curriculum>().is_err());
        assert!(c.validate(32).is_err());
        assert!(
            "seq:0:5"
                .parse::<Curriculum>()
                .unwrap()
                .validate(32)
                .is_err()
        );
    }
}
