//! The dynamic loss scaler (PyTorch `GradScaler` semantics).

use serde::{Deserialize, Serialize};

use super::{Precision, PrecisionError};

/// Settings of a [`LossScaler`]. The defaults are PyTorch's `GradScaler` defaults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalerConfig {
    /// Scale before the first step (default 2^16 = 65536).
    pub init_scale: f32,
    /// Multiplier applied after `growth_interval` consecutive clean steps (default 2.0).
    pub growth_factor: f64,
    /// Multiplier applied on a step with inf/NaN gradients (default 0.5).
    pub backoff_factor: f64,
    /// Number of consecutive clean steps before the scale grows (default 2000).
    pub growth_interval: u32,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl ScalerConfig {
    /// Checks the ranges PyTorch asserts: `init_scale` finite and positive, `growth_factor > 1`,
    /// `0 < backoff_factor < 1`, `growth_interval > 0`.
    pub fn validate(&self) -> Result<(), PrecisionError> {
        let bad = |m: String| Err(PrecisionError::BadScalerConfig(m));
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return bad(format!(
                "init_scale must be finite and > 0, got {}",
                self.init_scale
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad(format!(
                "growth_factor must be > 1, got {}",
                self.growth_factor
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad(format!(
                "backoff_factor must be in (0, 1), got {}",
                self.backoff_factor
            ));
        }
        if self.growth_interval == 0 {
            return bad("growth_interval must be > 0".to_string());
        }
        Ok(())
    }
}

/// The scale update rule on its own: CPU twin of the device kernel that updates the scale and
/// growth tracker in place without a host round trip (PyTorch's `_amp_update_scale_`).
///
/// On `found_inf`: `scale *= backoff_factor`, `growth_tracker = 0`. Otherwise the tracker
/// increments; on reaching `growth_interval` the scale is multiplied by `growth_factor` if the
/// product is finite, and the tracker resets. Products are formed in f64 and rounded to f32.
pub fn update_scale(
    scale: &mut f32,
    growth_tracker: &mut u32,
    found_inf: bool,
    config: &ScalerConfig,
) {
    if found_inf {
        *scale = (*scale as f64 * config.backoff_factor) as f32;
        *growth_tracker = 0;
    } else {
        let successful = growth_tracker.saturating_add(1);
        if successful >= config.growth_interval {
            let grown = (*scale as f64 * config.growth_factor) as f32;
            if grown.is_finite() {
                *scale = grown;
            }
            *growth_tracker = 0;
        } else {
            *growth_tracker = successful;
        }
    }
}

/// What [`LossScaler::update`] decided for one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleUpdate {
    /// The gradients held an inf or NaN.
    pub found_inf: bool,
    /// The optimizer step must be skipped (equals `found_inf`, in every precision).
    pub skipped: bool,
    /// The scale the step's backward pass used.
    pub previous_scale: f32,
    /// The scale for the next step.
    pub scale: f32,
}

/// The smallest loss scale a backoff leads to.
pub const MIN_SCALE: f32 = 1.0;

/// Dynamic loss scaler with exactly the update rule of PyTorch's `GradScaler`
/// (`torch._amp_update_scale_`):
///
/// * on a step with inf/NaN gradients: `scale *= backoff_factor`, the growth tracker resets to 0,
///   and the step is skipped;
/// * on a clean step: the tracker increments; when it reaches `growth_interval` the scale is
///   multiplied by `growth_factor` (only if the product is finite) and the tracker resets to 0.
///
/// Products are formed in f64 and stored as f32, as PyTorch does. Unlike PyTorch, the scale
/// never backs off below [`MIN_SCALE`] (DeepSpeed's `min_loss_scale`), or below `init_scale`
/// when that is smaller: gradients that overflow fp16 even unscaled mean the run diverged, and
/// a scale sinking further would reach subnormals and an infinite `inv_scale`. The trainer
/// stops a run whose steps keep being skipped.
///
/// A *disabled* scaler (`fp32`, `bf16`) keeps scale 1 and never changes it, but still reports
/// non-finite gradients: Lathe skips such a step in every precision (and logs it).
///
/// The whole state serializes (serde) for checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    enabled: bool,
    config: ScalerConfig,
    scale: f32,
    growth_tracker: u32,
    skipped_steps: u64,
}

impl LossScaler {
    /// An enabled scaler with the given settings.
    pub fn new(config: ScalerConfig) -> Result<Self, PrecisionError> {
        config.validate()?;
        Ok(LossScaler {
            enabled: true,
            scale: config.init_scale,
            config,
            growth_tracker: 0,
            skipped_steps: 0,
        })
    }

    /// A disabled scaler: scale 1 forever.
    pub fn disabled() -> Self {
        LossScaler {
            enabled: false,
            config: ScalerConfig::default(),
            scale: 1.0,
            growth_tracker: 0,
            skipped_steps: 0,
        }
    }

    /// The default scaler for a precision: enabled with PyTorch's defaults for `fp16`, disabled
    /// otherwise.
    pub fn for_precision(precision: Precision) -> Self {
        if precision.uses_loss_scaling() {
            LossScaler {
                enabled: true,
                config: ScalerConfig::default(),
                scale: ScalerConfig::default().init_scale,
                growth_tracker: 0,
                skipped_steps: 0,
            }
        } else {
            LossScaler::disabled()
        }
    }

    /// Whether the scale is dynamic (fp16) or fixed at 1.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The settings.
    pub fn config(&self) -> &ScalerConfig {
        &self.config
    }

    /// The current scale: multiply the loss (seed the backward pass) with it.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `1 / scale`, formed in f64 and rounded to f32 as PyTorch does: multiply gradients by it to
    /// unscale them.
    pub fn inv_scale(&self) -> f32 {
        (1.0 / self.scale as f64) as f32
    }

    /// Consecutive clean steps since the last growth or backoff.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// Total steps skipped for non-finite gradients so far (every precision).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// The scaled loss `loss * scale` (what the backward pass starts from).
    pub fn scale_loss(&self, loss: f32) -> f32 {
        loss * self.scale
    }

    /// Records one step's outcome and updates the scale. Call once per optimizer step, after the
    /// non-finite check; skip the optimizer update when the result says `skipped`.
    pub fn update(&mut self, found_inf: bool) -> ScaleUpdate {
        let previous_scale = self.scale;
        if found_inf {
            self.skipped_steps += 1;
        }
        if self.enabled {
            update_scale(
                &mut self.scale,
                &mut self.growth_tracker,
                found_inf,
                &self.config,
            );
            if found_inf {
                self.scale = self.scale.max(MIN_SCALE.min(self.config.init_scale));
            }
        }
        ScaleUpdate {
            found_inf,
            skipped: found_inf,
            previous_scale,
            scale: self.scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_gradscaler_defaults() {
        let s = LossScaler::for_precision(Precision::Fp16);
        assert!(s.is_enabled());
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.inv_scale(), 1.0 / 65536.0);
        assert_eq!(s.config().growth_interval, 2000);
        assert_eq!(s.config().growth_factor, 2.0);
        assert_eq!(s.config().backoff_factor, 0.5);
        for p in [Precision::Fp32, Precision::Bf16] {
            let s = LossScaler::for_precision(p);
            assert!(!s.is_enabled());
            assert_eq!(s.scale(), 1.0);
        }
    }

    #[test]
    fn bad_configs_are_rejected_with_the_setting_named() {
        let c = ScalerConfig {
            growth_factor: 1.0,
            ..ScalerConfig::default()
        };
        let e = LossScaler::new(c).unwrap_err();
        assert!(e.to_string().contains("growth_factor"), "{e}");
        let c = ScalerConfig {
            backoff_factor: 1.0,
            ..ScalerConfig::default()
        };
        assert!(LossScaler::new(c).is_err());
        let c = ScalerConfig {
            init_scale: f32::INFINITY,
            ..ScalerConfig::default()
        };
        assert!(LossScaler::new(c).is_err());
        let c = ScalerConfig {
            growth_interval: 0,
            ..ScalerConfig::default()
        };
        assert!(LossScaler::new(c).is_err());
    }

    #[test]
    fn growth_stops_short_of_infinity() {
        let mut s = LossScaler::new(ScalerConfig {
            init_scale: f32::MAX / 1.5,
            growth_interval: 1,
            ..ScalerConfig::default()
        })
        .unwrap();
        let u = s.update(false);
        assert_eq!(u.scale, f32::MAX / 1.5);
        assert_eq!(s.growth_tracker(), 0);
    }
}
