//! SGD with momentum, PyTorch `torch.optim.SGD` semantics, fused in one pass like AdamW.
//!
//! Per element, f32 operations rounded to nearest, in this order:
//!
//! ```text
//! g = grad[i] * grad_scale                          // inv_loss_scale * clip_factor
//! g = g + weight_decay * p                          // L2 term, only where the view decays
//! if momentum != 0:
//!     b = g                                         // on the first applied step
//!     b = momentum * b + one_minus_dampening * g    // afterwards
//!     d = nesterov ? g + momentum * b : b
//! else d = g
//! p = p - lr * d
//! ```
//!
//! Unlike AdamW the decay here is coupled (added to the gradient), as in PyTorch's SGD.

use serde::{Deserialize, Serialize};

use super::layout::ParamLayout;
use super::working::{WorkingCopy, for_each_chunk};
use super::{OptimError, StepArgs, StepOutcome, check_buffers, check_config};

/// SGD hyperparameters (the learning rate comes from the schedule each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (default 0.9; 0 disables the momentum buffer).
    pub momentum: f32,
    /// Dampening of the gradient in the momentum update (default 0).
    pub dampening: f32,
    /// L2 weight decay on views with `decay = true` (default 0).
    pub weight_decay: f32,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`, as in PyTorch).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// Checks `0 <= momentum < 1`, `0 <= dampening <= 1`, `weight_decay >= 0` finite, and the
    /// Nesterov preconditions.
    pub fn validate(&self) -> Result<(), OptimError> {
        check_config(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "must be in [0, 1)",
        )?;
        check_config(
            "dampening",
            self.dampening,
            (0.0..=1.0).contains(&self.dampening),
            "must be in [0, 1]",
        )?;
        check_config(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "must be finite and >= 0",
        )?;
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return Err(OptimError::BadConfig {
                name: "nesterov",
                value: 1.0,
                reason: "needs momentum > 0 and dampening = 0",
            });
        }
        Ok(())
    }
}

/// The per-step scalars of one fused SGD launch.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SgdScalars {
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    grad_scale: f32,
    first: bool,
    nesterov: bool,
}

#[inline]
fn sgd_span<const DECAY: bool>(p: &mut [f32], g: &[f32], buf: &mut [f32], k: &SgdScalars) {
    if buf.is_empty() {
        for (p, &g) in p.iter_mut().zip(g) {
            let mut g = g * k.grad_scale;
            if DECAY {
                g += k.weight_decay * *p;
            }
            *p -= k.lr * g;
        }
        return;
    }
    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
        let mut g = g * k.grad_scale;
        if DECAY {
            g += k.weight_decay * *p;
        }
        let b_new = if k.first {
            g
        } else {
            k.momentum * *b + k.one_minus_dampening * g
        };
        let d = if k.nesterov {
            g + k.momentum * b_new
        } else {
            b_new
        };
        *p -= k.lr * d;
        *b = b_new;
    }
}

/// SGD state: the momentum buffer (empty when `momentum == 0`) and the applied step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    config: SgdConfig,
    len: usize,
    momentum: Vec<f32>,
    step: u64,
}

impl Sgd {
    /// A fresh optimizer for `len` elements.
    pub fn new(config: SgdConfig, len: usize) -> Result<Self, OptimError> {
        config.validate()?;
        let momentum = if config.momentum > 0.0 {
            vec![0.0; len]
        } else {
            Vec::new()
        };
        Ok(Sgd {
            config,
            len,
            momentum,
            step: 0,
        })
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// Applied steps so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub(crate) fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    /// Number of elements this optimizer updates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it updates no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The momentum buffer (f32, `len` elements; empty without momentum).
    pub fn momentum_buffer(&self) -> &[f32] {
        &self.momentum
    }

    pub(crate) fn momentum_buffer_mut(&mut self) -> &mut [f32] {
        &mut self.momentum
    }

    /// One fused step; same contract as [`super::AdamW::step`].
    pub fn step(
        &mut self,
        master: &mut [f32],
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        check_buffers(self.len, master, grads, &working, layout, args)?;
        if args.found_inf {
            return Ok(StepOutcome::Skipped);
        }
        self.step += 1;
        let k = SgdScalars {
            lr: args.lr,
            momentum: self.config.momentum,
            one_minus_dampening: 1.0 - self.config.dampening,
            weight_decay: self.config.weight_decay,
            grad_scale: args.inv_scale * args.clip_factor,
            first: self.step == 1,
            nesterov: self.config.nesterov,
        };
        let sr_step = self.step;
        for_each_chunk(
            master,
            grads,
            &mut self.momentum,
            &mut [],
            working,
            args.offset,
            sr_step,
            |c| {
                let base = c.base;
                layout.for_each_segment(base..base + c.master.len(), |seg, decay| {
                    let r = seg.start - base..seg.end - base;
                    let b: &mut [f32] = if c.s0.is_empty() {
                        &mut []
                    } else {
                        &mut c.s0[r.clone()]
                    };
                    let (p, g) = (&mut c.master[r.clone()], &c.grads[r]);
                    if decay && k.weight_decay != 0.0 {
                        sgd_span::<true>(p, g, b, &k);
                    } else {
                        sgd_span::<false>(p, g, b, &k);
                    }
                });
            },
        );
        Ok(StepOutcome::Applied)
    }
}
