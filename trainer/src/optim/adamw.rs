//! Fused AdamW: CPU twin of Lathe's one-pass optimizer kernel.
//!
//! Per element `i` (global index `offset + i`), with the per-step scalars of [`AdamWScalars`],
//! every operation an f32 operation rounded to nearest (no fused multiply-add, so a PTX kernel
//! written with `.rn` forms reproduces it bit for bit):
//!
//! ```text
//! g  = grad[i] * grad_scale                      // grad_scale = inv_loss_scale * clip_factor
//! m  = beta1 * m + one_minus_beta1 * g
//! v  = beta2 * v + one_minus_beta2 * (g * g)
//! u  = (m / bias_correction1) / (sqrt(v / bias_correction2) + eps)
//! u  = u + weight_decay * p                      // only where the parameter's view decays
//! p  = p - lr * u                                // fp32 master
//! w  = round(p)                                  // working copy: bf16 or f16, see `rounding`
//! ```
//!
//! This is AdamW with decoupled weight decay (Loshchilov & Hutter), written as llm.c writes it;
//! PyTorch's `p *= 1 - lr*wd` followed by the Adam step is the same update in exact arithmetic.
//! Moments start at zero; the step count `t` starts at 1 on the first applied step. A step with
//! non-finite gradients changes nothing (not even `t`).

use serde::{Deserialize, Serialize};

use super::layout::ParamLayout;
use super::working::{WorkingCopy, for_each_chunk};
use super::{OptimError, StepArgs, StepOutcome, check_buffers, check_config};

/// AdamW hyperparameters (the learning rate comes from the schedule each step).
///
/// Defaults are GPT-2/GPT-3 training's (as in llm.c and nanoGPT): `beta2 = 0.95` rather than
/// PyTorch's 0.999, which reacts faster to gradient-scale changes and is the usual choice for
/// transformer language models; `weight_decay = 0.1` applied to the views with `decay = true`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Checks `0 <= beta < 1`, `eps > 0`, `weight_decay >= 0`, all finite.
    pub fn validate(&self) -> Result<(), OptimError> {
        let beta_ok = |b: f32| (0.0..1.0).contains(&b);
        check_config(
            "beta1",
            self.beta1,
            beta_ok(self.beta1),
            "must be in [0, 1)",
        )?;
        check_config(
            "beta2",
            self.beta2,
            beta_ok(self.beta2),
            "must be in [0, 1)",
        )?;
        let eps_ok = self.eps > 0.0 && self.eps.is_finite();
        check_config("eps", self.eps, eps_ok, "must be finite and > 0")?;
        check_config(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "must be finite and >= 0",
        )
    }
}

/// The scalar parameters of one fused AdamW launch, computed on the host once per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub lr: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// [`bias_correction`]`(beta1, t)`.
    pub bias_correction1: f32,
    /// [`bias_correction`]`(beta2, t)`.
    pub bias_correction2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `inv_scale * clip_factor` (f32 product).
    pub grad_scale: f32,
}

/// `1 - beta^t` rounded to f32, with `beta^t` formed in f64 by repeated squaring: only IEEE
/// multiplies, so the host, this twin and the GPU kernel get the same bits on every platform
/// (a libm `pow` may differ in the last place between platforms).
pub fn bias_correction(beta: f32, t: u64) -> f32 {
    let (mut r, mut b, mut e) = (1.0f64, beta as f64, t);
    while e != 0 {
        if e & 1 == 1 {
            r *= b;
        }
        b *= b;
        e >>= 1;
    }
    (1.0 - r) as f32
}

impl AdamWScalars {
    /// Scalars for step `t` (1-based).
    pub fn new(config: &AdamWConfig, t: u64, lr: f32, inv_scale: f32, clip_factor: f32) -> Self {
        AdamWScalars {
            lr,
            beta1: config.beta1,
            one_minus_beta1: 1.0 - config.beta1,
            beta2: config.beta2,
            one_minus_beta2: 1.0 - config.beta2,
            bias_correction1: bias_correction(config.beta1, t),
            bias_correction2: bias_correction(config.beta2, t),
            eps: config.eps,
            weight_decay: config.weight_decay,
            grad_scale: inv_scale * clip_factor,
        }
    }
}

/// The update of a run of elements that share one decay flag (see the module doc).
/// All slices have the same length.
#[inline]
pub fn adamw_span<const DECAY: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamWScalars,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.grad_scale;
        let m_new = k.beta1 * *m + k.one_minus_beta1 * g;
        let v_new = k.beta2 * *v + k.one_minus_beta2 * (g * g);
        let m_hat = m_new / k.bias_correction1;
        let v_hat = v_new / k.bias_correction2;
        let mut u = m_hat / (v_hat.sqrt() + k.eps);
        if DECAY {
            u += k.weight_decay * *p;
        }
        *p -= k.lr * u;
        *m = m_new;
        *v = v_new;
    }
}

/// AdamW state: first and second moments (f32, one element per parameter element of this
/// buffer or shard) and the count of applied steps.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
}

impl AdamW {
    /// Zero moments for `len` elements.
    pub fn new(config: AdamWConfig, len: usize) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(AdamW {
            config,
            m: vec![0.0; len],
            v: vec![0.0; len],
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
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
        self.m.len()
    }

    /// Whether it updates no element.
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// First moment, f32, `len` elements.
    pub fn m(&self) -> &[f32] {
        &self.m
    }

    /// Second moment, f32, `len` elements.
    pub fn v(&self) -> &[f32] {
        &self.v
    }

    pub(crate) fn buffers_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.m, &mut self.v)
    }

    /// One fused step over `master`/`grads` (this optimizer's `len` elements, global offset
    /// `args.offset` in `layout`), writing `working` when given. Skips (touching nothing) when
    /// `args.found_inf`.
    pub fn step(
        &mut self,
        master: &mut [f32],
        grads: &[f32],
        working: WorkingCopy<'_>,
        layout: &ParamLayout,
        args: &StepArgs,
    ) -> Result<StepOutcome, OptimError> {
        check_buffers(self.len(), master, grads, &working, layout, args)?;
        if args.found_inf {
            return Ok(StepOutcome::Skipped);
        }
        self.step += 1;
        let k = AdamWScalars::new(
            &self.config,
            self.step,
            args.lr,
            args.inv_scale,
            args.clip_factor,
        );
        let sr_step = self.step;
        for_each_chunk(
            master,
            grads,
            &mut self.m,
            &mut self.v,
            working,
            args.offset,
            sr_step,
            |c| {
                let base = c.base;
                layout.for_each_segment(base..base + c.master.len(), |seg, decay| {
                    let r = seg.start - base..seg.end - base;
                    let (p, g) = (&mut c.master[r.clone()], &c.grads[r.clone()]);
                    let (m, v) = (&mut c.s0[r.clone()], &mut c.s1[r]);
                    if decay {
                        adamw_span::<true>(p, g, m, v, &k);
                    } else {
                        adamw_span::<false>(p, g, m, v, &k);
                    }
                });
            },
        );
        Ok(StepOutcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_correction_is_one_minus_beta_to_the_t() {
        assert_eq!(bias_correction(0.9, 0), 0.0);
        assert_eq!(bias_correction(0.9, 1), (1.0 - 0.9f32 as f64) as f32);
        for beta in [0.9f32, 0.95, 0.999] {
            for t in [2u64, 3, 10, 1000, 100_000] {
                let want = 1.0 - (beta as f64).powf(t as f64);
                let got = bias_correction(beta, t) as f64;
                assert!(
                    (got - want).abs() <= want * 1.2e-7,
                    "{beta} {t}: {got} vs {want}"
                );
            }
        }
    }
}
