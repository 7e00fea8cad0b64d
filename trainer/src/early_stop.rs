//! Early stopping on validation loss.
//!
//! An evaluation *improves* when its loss is below the best so far by at least `min_delta`
//! (and strictly below it, so `min_delta = 0` does not count a tie). After `patience`
//! consecutive evaluations without improvement, training should stop. A NaN or infinite loss
//! never improves. The state serializes for checkpoints, so a resumed run keeps its count.

use serde::{Deserialize, Serialize};

/// Errors from early-stopping settings.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EarlyStopError {
    #[error("early-stopping min_delta = {0} is invalid: must be finite and >= 0")]
    BadMinDelta(f64),
}

/// What one evaluation meant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EarlyStopDecision {
    /// A new best loss.
    Improved,
    /// No improvement; `remaining` more such evaluations are tolerated.
    NoImprovement { remaining: u32 },
    /// Patience is exhausted: stop training.
    Stop,
}

/// Early-stopping state with best tracking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    patience: u32,
    min_delta: f64,
    best_loss: Option<f64>,
    best_step: Option<u64>,
    bad_evals: u32,
    stopped: bool,
}

impl EarlyStopping {
    /// Stop after `patience` evaluations in a row that do not improve by at least `min_delta`.
    pub fn new(patience: u32, min_delta: f64) -> Result<Self, EarlyStopError> {
        if !(min_delta.is_finite() && min_delta >= 0.0) {
            return Err(EarlyStopError::BadMinDelta(min_delta));
        }
        Ok(EarlyStopping {
            patience,
            min_delta,
            best_loss: None,
            best_step: None,
            bad_evals: 0,
            stopped: false,
        })
    }

    /// Records the validation loss measured at optimizer step `step`.
    pub fn observe(&mut self, step: u64, val_loss: f64) -> EarlyStopDecision {
        let improved = val_loss.is_finite()
            && match self.best_loss {
                None => true,
                Some(best) => val_loss < best && best - val_loss >= self.min_delta,
            };
        if improved {
            self.best_loss = Some(val_loss);
            self.best_step = Some(step);
            self.bad_evals = 0;
            return EarlyStopDecision::Improved;
        }
        self.bad_evals = self.bad_evals.saturating_add(1);
        if self.bad_evals >= self.patience {
            self.stopped = true;
            EarlyStopDecision::Stop
        } else {
            EarlyStopDecision::NoImprovement {
                remaining: self.patience - self.bad_evals,
            }
        }
    }

    /// Whether patience has run out.
    pub fn should_stop(&self) -> bool {
        self.stopped
    }

    /// Best validation loss so far.
    pub fn best_loss(&self) -> Option<f64> {
        self.best_loss
    }

    /// Step of the best validation loss.
    pub fn best_step(&self) -> Option<u64> {
        self.best_step
    }

    /// Consecutive evaluations without improvement.
    pub fn bad_evals(&self) -> u32 {
        self.bad_evals
    }

    pub fn patience(&self) -> u32 {
        self.patience
    }

    pub fn min_delta(&self) -> f64 {
        self.min_delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_and_tracks_best() {
        let mut e = EarlyStopping::new(2, 0.01).unwrap();
        assert_eq!(e.observe(100, 3.0), EarlyStopDecision::Improved);
        assert_eq!(e.observe(200, 2.5), EarlyStopDecision::Improved);
        // 0.005 better is not enough.
        assert_eq!(
            e.observe(300, 2.495),
            EarlyStopDecision::NoImprovement { remaining: 1 }
        );
        // A real improvement resets the count.
        assert_eq!(e.observe(400, 2.4), EarlyStopDecision::Improved);
        assert_eq!(
            e.observe(500, 2.41),
            EarlyStopDecision::NoImprovement { remaining: 1 }
        );
        assert!(!e.should_stop());
        assert_eq!(e.observe(600, f64::NAN), EarlyStopDecision::Stop);
        assert!(e.should_stop());
        assert_eq!(e.best_loss(), Some(2.4));
        assert_eq!(e.best_step(), Some(400));
    }

    #[test]
    fn ties_do_not_improve_with_zero_delta() {
        let mut e = EarlyStopping::new(1, 0.0).unwrap();
        assert_eq!(e.observe(1, 1.0), EarlyStopDecision::Improved);
        assert_eq!(e.observe(2, 1.0), EarlyStopDecision::Stop);
    }

    #[test]
    fn state_roundtrips_and_continues() {
        let mut e = EarlyStopping::new(3, 0.0).unwrap();
        e.observe(1, 2.0);
        e.observe(2, 2.1);
        let mut r: EarlyStopping =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(r, e);
        assert_eq!(
            r.observe(3, 2.2),
            EarlyStopDecision::NoImprovement { remaining: 1 }
        );
        assert_eq!(r.observe(4, 2.2), EarlyStopDecision::Stop);
        assert!(EarlyStopping::new(3, -1.0).is_err());
        assert!(EarlyStopping::new(3, f64::NAN).is_err());
    }
}
