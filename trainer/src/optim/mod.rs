//! Optimizers over Lathe's flat parameter buffers: CPU twins of the fused kernels.
//!
//! Parameters live as in llm.c: one contiguous fp32 master buffer, one gradient buffer, one
//! buffer per optimizer moment, and (in bf16/fp16) one low-precision working copy, all sharing
//! offsets. A [`ParamLayout`] names the views `(name, offset, shape, decay)` into them.
//!
//! One optimizer step is one pass per element: unscale by `1/loss_scale`, multiply by the clip
//! factor, update the moments, apply decoupled weight decay where the view decays, update the
//! fp32 master, and round it into the working copy. A step whose gradients hold inf/NaN
//! (`found_inf`) is skipped and leaves every buffer bitwise unchanged.
//!
//! Work is split over fixed chunks with rayon. Updates are elementwise, so results are the same
//! for any thread count; the gradient norm reduces over fixed chunks in a fixed order ([`norm`]).
//!
//! A ZeRO-style shard calls `step` with the shard's slices, the global layout, and
//! `StepArgs::offset` set to the shard's first global index: decay flags and stochastic-rounding
//! bits then follow global indices, so N shards update exactly like one.

mod adamw;
mod layout;
pub mod norm;
mod rounding;
mod sgd;
mod working;

use serde::{Deserialize, Serialize};

pub use adamw::{AdamW, AdamWConfig, AdamWScalars, adamw_span, bias_correction};
pub use layout::{LayoutError, ParamLayout, ParamView};
pub use norm::{NORM_CHUNK, clip_factor, grad_norm, grad_sq_partials, grad_sq_sum};
pub use rounding::{
    Rounding, bf16_nearest, bf16_stochastic, f16_nearest, mix64, stochastic_bits, stochastic_key,
};
pub use sgd::{Sgd, SgdConfig};
pub use working::{WorkingCopy, write_working_copy};

/// Errors from optimizer construction and steps.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum OptimError {
    /// A hyperparameter out of range.
    #[error("optimizer setting {name} = {value} is invalid: {reason}")]
    BadConfig {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// A buffer whose length disagrees with the optimizer's.
    #[error("optimizer buffer `{buffer}` has {found} elements, expected {expected}")]
    LengthMismatch {
        buffer: &'static str,
        expected: usize,
        found: usize,
    },
    /// The updated range does not fit in the layout.
    #[error(
        "optimizer range {offset}..{end} (offset + length) lies outside the parameter layout of {layout_len} elements"
    )]
    OutsideLayout {
        offset: usize,
        end: usize,
        layout_len: usize,
    },
    /// A per-step scalar that is not finite (or a negative learning rate).
    #[error("optimizer step argument {name} = {value} is invalid (must be finite{extra})")]
    BadStepArg {
        name: &'static str,
        value: f32,
        extra: &'static str,
    },
    /// Restoring state of one optimizer kind into another.
    #[error("checkpointed optimizer is {found}, but this run uses {expected}")]
    KindMismatch {
        expected: &'static str,
        found: &'static str,
    },
}

pub(crate) fn check_config(
    name: &'static str,
    value: f32,
    ok: bool,
    reason: &'static str,
) -> Result<(), OptimError> {
    if ok {
        Ok(())
    } else {
        Err(OptimError::BadConfig {
            name,
            value: value as f64,
            reason,
        })
    }
}

/// The per-step inputs of an optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepArgs {
    /// Learning rate of this step (from the schedule).
    pub lr: f32,
    /// `1 / loss_scale` (1 when not scaling).
    pub inv_scale: f32,
    /// Gradient clipping factor from [`clip_factor`] (1 when not clipping).
    pub clip_factor: f32,
    /// The gradients held inf/NaN: skip the step, touching nothing.
    pub found_inf: bool,
    /// Global index of element 0 of the buffers passed (0 unless sharded).
    pub offset: usize,
}

impl StepArgs {
    /// An unsharded, unscaled, unclipped step at learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        StepArgs {
            lr,
            inv_scale: 1.0,
            clip_factor: 1.0,
            found_inf: false,
            offset: 0,
        }
    }
}

/// Whether a step changed the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    /// Skipped for non-finite gradients; nothing changed.
    Skipped,
}

pub(crate) fn check_buffers(
    len: usize,
    master: &[f32],
    grads: &[f32],
    working: &WorkingCopy<'_>,
    layout: &ParamLayout,
    args: &StepArgs,
) -> Result<(), OptimError> {
    let mismatch = |buffer, found| OptimError::LengthMismatch {
        buffer,
        expected: len,
        found,
    };
    if master.len() != len {
        return Err(mismatch("master", master.len()));
    }
    if grads.len() != len {
        return Err(mismatch("grads", grads.len()));
    }
    if let Some(w) = working.buffer_len().filter(|&w| w != len) {
        return Err(mismatch("working", w));
    }
    let end = args.offset.saturating_add(len);
    if end > layout.len() {
        return Err(OptimError::OutsideLayout {
            offset: args.offset,
            end,
            layout_len: layout.len(),
        });
    }
    let arg = |name, value: f32, ok: bool, extra| {
        if ok && value.is_finite() {
            Ok(())
        } else {
            Err(OptimError::BadStepArg { name, value, extra })
        }
    };
    arg("lr", args.lr, args.lr >= 0.0, " and >= 0")?;
    arg("inv_scale", args.inv_scale, true, "")?;
    arg("clip_factor", args.clip_factor, true, "")
}

/// Which optimizer and its hyperparameters (serializes with a `kind` tag).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    #[serde(rename = "adamw")]
    AdamW(AdamWConfig),
    Sgd(SgdConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::AdamW(AdamWConfig::default())
    }
}

impl OptimizerConfig {
    /// `"adamw"` or `"sgd"`.
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::AdamW(_) => "adamw",
            OptimizerConfig::Sgd(_) => "sgd",
        }
    }
}

/// The small part of an optimizer's state (for `state.json`); the big buffers are
/// [`Optimizer::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub config: OptimizerConfig,
    /// Applied steps (AdamW's bias-correction `t`).
    pub step: u64,
    /// Elements the optimizer updates.
    pub len: usize,
}

/// The optimizer a training loop holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// A fresh optimizer (zero state) for `len` elements.
    pub fn new(config: OptimizerConfig, len: usize) -> Result<Self, OptimError> {
        Ok(match config {
            OptimizerConfig::AdamW(c) => Optimizer::AdamW(AdamW::new(c, len)?),
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(Sgd::new(c, len)?),
        })
    }

    pub fn config(&self) -> OptimizerConfig {
        match self {
            Optimizer::AdamW(o) => OptimizerConfig::AdamW(*o.config()),
            Optimizer::Sgd(o) => OptimizerConfig::Sgd(*o.config()),
        }
    }

    /// Applied steps so far.
    pub fn step_count(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step_count(),
            Optimizer::Sgd(o) => o.step_count(),
        }
    }

    /// Elements this optimizer updates.
    pub fn len(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.len(),
            Optimizer::Sgd(o) => o.len(),
        }
    }

    /// Whether it updates no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One fused optimizer step.
    ///
    /// * `master`: fp32 master weights, `len` elements (this optimizer's range), updated.
    /// * `grads`: f32 gradients, still multiplied by the loss scale, `len` elements.
    /// * `working`: the low-precision copy to rewrite from the updated master, or `None`.
    /// * `layout`: the global parameter layout (decay flags); `args.offset + len <= layout.len()`.
    ///
    /// Returns [`StepOutcome::Skipped`] without touching anything when `args.found_inf`.
    pub fn step(
        &mut self,
        master: &mut [f32],
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        match self {
            Optimizer::AdamW(o) => o.step(master, grads, working, layout, args),
            Optimizer::Sgd(o) => o.step(master, grads, working, layout, args),
        }
    }

    /// Config, step count and length, for checkpoints.
    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            config: self.config(),
            step: self.step_count(),
            len: self.len(),
        }
    }

    /// The state buffers by name (`"m"`, `"v"` for AdamW; `"momentum"` for SGD with momentum),
    /// each f32 with `len` elements.
    pub fn buffers(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            Optimizer::AdamW(o) => vec![("m", o.m()), ("v", o.v())],
            Optimizer::Sgd(o) if o.momentum_buffer().is_empty() => Vec::new(),
            Optimizer::Sgd(o) => vec![("momentum", o.momentum_buffer())],
        }
    }

    /// The state buffers by name, writable (to load a checkpoint).
    pub fn buffers_mut(&mut self) -> Vec<(&'static str, &mut [f32])> {
        match self {
            Optimizer::AdamW(o) => {
                let (m, v) = o.buffers_mut();
                vec![("m", m), ("v", v)]
            }
            Optimizer::Sgd(o) if o.momentum_buffer().is_empty() => Vec::new(),
            Optimizer::Sgd(o) => vec![("momentum", o.momentum_buffer_mut())],
        }
    }

    /// Restores the step count from a checkpointed state. The kind and length must match; the
    /// hyperparameters stay this optimizer's own (the run's settings decide them).
    pub fn restore_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        if state.config.kind() != self.config().kind() {
            return Err(OptimError::KindMismatch {
                expected: self.config().kind(),
                found: state.config.kind(),
            });
        }
        if state.len != self.len() {
            return Err(OptimError::LengthMismatch {
                buffer: "checkpointed optimizer state",
                expected: self.len(),
                found: state.len,
            });
        }
        match self {
            Optimizer::AdamW(o) => o.set_step_count(state.step),
            Optimizer::Sgd(o) => o.set_step_count(state.step),
        }
        Ok(())
    }
}
