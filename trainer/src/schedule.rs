//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay to a floor.
//!
//! Steps are 0-based optimizer steps. With `warmup = W`, `total_steps = N`, peak `base_lr` and
//! floor `min_lr = base_lr * min_lr_frac`:
//!
//! * warmup, `step < W`: `base_lr * (f + (1 - f) * (step + 1) / W)` where `f` is
//!   `warmup_start_frac` (0: the line starts at zero, as llm.c; the first step already gets
//!   `base_lr / W`, never 0). Step `W - 1` reaches `base_lr`.
//! * decay, `W <= step < N`: with progress `r = (step - W) / (N - W)` in `[0, 1)`,
//!   cosine: `min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * r))`;
//!   linear: `min_lr + (base_lr - min_lr) * (1 - r)`; constant: `base_lr`.
//! * after the end, `step >= N`: `min_lr` (cosine, linear), `base_lr` (constant).
//!
//! [`scale_lr_linear`] is the linear batch-size scaling rule used with `--scale-lr`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors from schedule settings.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ScheduleError {
    #[error("unknown schedule `{0}` (expected cosine, linear or constant)")]
    UnknownKind(String),
    #[error("schedule setting {name} = {value} is invalid: {reason}")]
    BadSetting {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },
}

/// The shape of the decay after warmup.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine period from `base_lr` down to `min_lr`.
    #[default]
    Cosine,
    /// A straight line from `base_lr` down to `min_lr`.
    Linear,
    /// `base_lr` throughout (after warmup).
    Constant,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 3] = [
        ScheduleKind::Cosine,
        ScheduleKind::Linear,
        ScheduleKind::Constant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Constant => "constant",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScheduleKind {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        ScheduleKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| ScheduleError::UnknownKind(s.to_string()))
    }
}

/// A learning-rate schedule (see the module doc for the formulas).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Peak learning rate, reached at the end of warmup.
    pub base_lr: f64,
    /// Warmup steps (0: start at `base_lr`).
    pub warmup: u64,
    /// Total optimizer steps of the run; decay ends here.
    pub total_steps: u64,
    /// Floor of the decay as a fraction of `base_lr`, in `[0, 1]` (e.g. 0.1).
    pub min_lr_frac: f64,
    /// Where the warmup line starts, as a fraction of `base_lr`, in `[0, 1)` (0 by default).
    #[serde(default)]
    pub warmup_start_frac: f64,
}

impl Schedule {
    /// A schedule with warmup from zero; checks every setting.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup: u64,
        total_steps: u64,
        min_lr_frac: f64,
    ) -> Result<Self, ScheduleError> {
        let s = Schedule {
            kind,
            base_lr,
            warmup,
            total_steps,
            min_lr_frac,
            warmup_start_frac: 0.0,
        };
        s.validate()?;
        Ok(s)
    }

    /// A constant learning rate, no warmup.
    pub fn constant(lr: f64) -> Self {
        Schedule {
            kind: ScheduleKind::Constant,
            base_lr: lr,
            warmup: 0,
            total_steps: 0,
            min_lr_frac: 1.0,
            warmup_start_frac: 0.0,
        }
    }

    /// The same schedule with the warmup line starting at `frac * base_lr`.
    pub fn with_warmup_start(mut self, frac: f64) -> Result<Self, ScheduleError> {
        self.warmup_start_frac = frac;
        self.validate()?;
        Ok(self)
    }

    /// Checks `base_lr >= 0`, `min_lr_frac` in `[0, 1]`, `warmup_start_frac` in `[0, 1)`, all
    /// finite.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let bad = |name, value, reason| {
            Err(ScheduleError::BadSetting {
                name,
                value,
                reason,
            })
        };
        if !(self.base_lr.is_finite() && self.base_lr >= 0.0) {
            return bad("base_lr", self.base_lr, "must be finite and >= 0");
        }
        if !(0.0..=1.0).contains(&self.min_lr_frac) {
            return bad("min_lr_frac", self.min_lr_frac, "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.warmup_start_frac) {
            return bad(
                "warmup_start_frac",
                self.warmup_start_frac,
                "must be in [0, 1)",
            );
        }
        Ok(())
    }

    /// The floor `base_lr * min_lr_frac`.
    pub fn min_lr(&self) -> f64 {
        self.base_lr * self.min_lr_frac
    }

    /// Learning rate of 0-based optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            let f = self.warmup_start_frac;
            let ramp = (step + 1) as f64 / self.warmup as f64;
            return self.base_lr * (f + (1.0 - f) * ramp);
        }
        if self.kind == ScheduleKind::Constant {
            return self.base_lr;
        }
        let min_lr = self.min_lr();
        if step >= self.total_steps {
            return min_lr;
        }
        let r = (step - self.warmup) as f64 / (self.total_steps - self.warmup) as f64;
        let coeff = match self.kind {
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * r).cos()),
            ScheduleKind::Linear => 1.0 - r,
            ScheduleKind::Constant => 1.0,
        };
        min_lr + (self.base_lr - min_lr) * coeff
    }
}

/// The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet
/// in 1 Hour"): when the global batch grows by a factor k, multiply the learning rate by k:
/// `base_lr * global_batch / reference_batch`. `global_batch` is what one optimizer step sees
/// (micro-batch x accumulation steps x data-parallel ranks); `reference_batch` is the batch
/// `base_lr` was tuned for, in the same unit (sequences or tokens). Pair it with warmup: the rule
/// fails early in training without one, which is why the paper introduces gradual warmup.
pub fn scale_lr_linear(
    base_lr: f64,
    global_batch: u64,
    reference_batch: u64,
) -> Result<f64, ScheduleError> {
    if reference_batch == 0 {
        return Err(ScheduleError::BadSetting {
            name: "reference_batch",
            value: 0.0,
            reason: "must be > 0",
        });
    }
    if global_batch == 0 {
        return Err(ScheduleError::BadSetting {
            name: "global_batch",
            value: 0.0,
            reason: "must be > 0",
        });
    }
    Ok(base_lr * global_batch as f64 / reference_batch as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-30)
    }

    #[test]
    fn kinds_parse_and_print() {
        for k in ScheduleKind::ALL {
            assert_eq!(k.to_string().parse::<ScheduleKind>().unwrap(), k);
        }
        assert_eq!(
            "Cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        let e = "step".parse::<ScheduleKind>().unwrap_err();
        assert!(e.to_string().contains("`step`"));
    }

    #[test]
    fn cosine_at_key_steps() {
        let s = Schedule::new(ScheduleKind::Cosine, 6e-4, 10, 110, 0.1).unwrap();
        assert!(close(s.lr_at(0), 6e-5));
        assert!(close(s.lr_at(4), 3e-4));
        assert!(close(s.lr_at(9), 6e-4));
        assert!(close(s.lr_at(10), 6e-4));
        // Halfway through the decay: midpoint between peak and floor.
        assert!(close(s.lr_at(60), 0.5 * (6e-4 + 6e-5)));
        assert!(s.lr_at(109) > 6e-5 && s.lr_at(109) < 6.02e-5);
        assert!(close(s.lr_at(110), 6e-5));
        assert!(close(s.lr_at(10_000), 6e-5));
        // Monotone after warmup.
        for t in 10..120 {
            assert!(s.lr_at(t + 1) <= s.lr_at(t));
        }
    }

    #[test]
    fn linear_and_constant_at_key_steps() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 0, 100, 0.0).unwrap();
        assert!(close(s.lr_at(0), 1.0));
        assert!(close(s.lr_at(25), 0.75));
        assert!(close(s.lr_at(99), 0.01));
        assert_eq!(s.lr_at(100), 0.0);
        let c = Schedule::new(ScheduleKind::Constant, 0.5, 4, 100, 0.1).unwrap();
        assert!(close(c.lr_at(1), 0.25));
        assert!(close(c.lr_at(3), 0.5));
        assert!(close(c.lr_at(50), 0.5));
        assert!(close(c.lr_at(500), 0.5));
        assert_eq!(Schedule::constant(3e-4).lr_at(7), 3e-4);
    }

    #[test]
    fn warmup_from_a_fraction() {
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 4, 8, 0.0)
            .unwrap()
            .with_warmup_start(0.2)
            .unwrap();
        assert!(close(s.lr_at(0), 0.2 + 0.8 * 0.25));
        assert!(close(s.lr_at(3), 1.0));
        assert!(s.with_warmup_start(1.0).is_err());
    }

    #[test]
    fn warmup_longer_than_run_and_bad_settings() {
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 10, 5, 0.1).unwrap();
        assert!(close(s.lr_at(4), 0.5));
        assert!(close(s.lr_at(10), 0.1));
        assert!(Schedule::new(ScheduleKind::Cosine, -1.0, 0, 5, 0.1).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, f64::NAN, 0, 5, 0.1).is_err());
        let e = Schedule::new(ScheduleKind::Cosine, 1.0, 0, 5, 1.5).unwrap_err();
        assert!(e.to_string().contains("min_lr_frac"));
    }

    #[test]
    fn linear_scaling_rule() {
        assert!(close(scale_lr_linear(0.1, 8192, 256).unwrap(), 3.2));
        assert!(close(scale_lr_linear(6e-4, 64, 512).unwrap(), 7.5e-5));
        assert!(scale_lr_linear(0.1, 8, 0).is_err());
        assert!(scale_lr_linear(0.1, 0, 8).is_err());
    }
}
