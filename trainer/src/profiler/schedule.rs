//! Which steps the profiler records, in the manner of `torch.profiler.schedule`.

use super::ProfilerError;

/// What the profiler does during one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepAction {
    /// Nothing is timed; spans only reach the range sink.
    Wait,
    /// Everything is timed and stored as in an active step, then discarded when the step ends
    /// (so that first-use costs of the recording machinery stay out of the measurement).
    Warmup,
    /// Everything is timed and kept.
    Active,
    /// All cycles are over; nothing more is recorded (also what a disabled profiler reports).
    Done,
}

impl StepAction {
    /// Whether spans, counters and kernels are timed and stored during this step.
    pub fn records(self) -> bool {
        matches!(self, StepAction::Warmup | StepAction::Active)
    }

    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => StepAction::Wait,
            1 => StepAction::Warmup,
            2 => StepAction::Active,
            _ => StepAction::Done,
        }
    }
}

/// A recording schedule: after `skip_first` steps, cycles of `wait` idle steps, `warmup` steps and
/// `active` recorded steps, repeated `repeat` times (0 repeats forever).
///
/// `Schedule::new(1, 1, 3)` gives: step 0 wait, step 1 warmup, steps 2..=4 active, step 5 wait,
/// step 6 warmup, steps 7..=9 active, and so on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Steps skipped once before the first cycle.
    pub skip_first: u64,
    /// Idle steps at the start of each cycle.
    pub wait: u64,
    /// Steps recorded then discarded, after the wait steps of each cycle.
    pub warmup: u64,
    /// Steps recorded and kept at the end of each cycle; at least 1.
    pub active: u64,
    /// Number of cycles; 0 means cycles never end.
    pub repeat: u64,
}

impl Schedule {
    /// One cycle of `wait`, `warmup`, `active` steps (set [`Schedule::repeat`] for more).
    pub fn new(wait: u64, warmup: u64, active: u64) -> Self {
        Self {
            skip_first: 0,
            wait,
            warmup,
            active,
            repeat: 1,
        }
    }

    /// Records every step, forever.
    pub fn always() -> Self {
        Self {
            skip_first: 0,
            wait: 0,
            warmup: 0,
            active: 1,
            repeat: 0,
        }
    }

    /// The same schedule with `repeat` cycles (0: forever).
    pub fn with_repeat(mut self, repeat: u64) -> Self {
        self.repeat = repeat;
        self
    }

    /// The same schedule starting after `skip_first` steps.
    pub fn with_skip_first(mut self, skip_first: u64) -> Self {
        self.skip_first = skip_first;
        self
    }

    /// Checks that the schedule records something.
    pub fn validate(&self) -> Result<(), ProfilerError> {
        if self.active == 0 {
            return Err(ProfilerError::InvalidSchedule(
                "active must be at least 1 (a schedule with no active step records nothing)".into(),
            ));
        }
        if self
            .wait
            .checked_add(self.warmup)
            .and_then(|c| c.checked_add(self.active))
            .is_none()
        {
            return Err(ProfilerError::InvalidSchedule(
                "wait + warmup + active overflows u64".into(),
            ));
        }
        Ok(())
    }

    /// What to do during step `step` (0-based).
    pub fn action(&self, step: u64) -> StepAction {
        if step < self.skip_first {
            return StepAction::Wait;
        }
        let step = step - self.skip_first;
        // `validate` guarantees the sum fits; saturating keeps an unvalidated schedule whose sum
        // overflows from panicking.
        let cycle = self
            .wait
            .saturating_add(self.warmup)
            .saturating_add(self.active);
        if cycle == 0 || self.active == 0 {
            return StepAction::Done;
        }
        if self.repeat > 0 && step / cycle >= self.repeat {
            return StepAction::Done;
        }
        let pos = step % cycle;
        if pos < self.wait {
            StepAction::Wait
        } else if pos < self.wait + self.warmup {
            StepAction::Warmup
        } else {
            StepAction::Active
        }
    }
}

impl Default for Schedule {
    /// `Schedule::new(1, 1, 3)`: skip one step, warm up one, record three.
    fn default() -> Self {
        Self::new(1, 1, 3)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skip_first={} wait={} warmup={} active={} repeat={}",
            self.skip_first,
            self.wait,
            self.warmup,
            self.active,
            if self.repeat == 0 {
                "forever".to_string()
            } else {
                self.repeat.to_string()
            }
        )
    }
}
