//! Mixed-precision step bookkeeping on the device: the non-finite gradient check (optionally
//! fused with the unscale), the global gradient norm and clip factor, and the dynamic loss-scale
//! update. Everything a step needs lives in a small device buffer, the *step state*, so no
//! kernel of a training step waits for the host.
//!
//! One optimizer step on the device:
//! 1. backward, seeded with the state's `SCALE` (the fused classifier reads it);
//! 2. `lathe_grad_check_norm_f32` (or the in-place `lathe_grad_unscale_check_norm_f32`) over
//!    the flat gradient buffer: sets `FOUND_INF`, writes one partial sum of squares per block;
//! 3. `lathe_grad_norm_finish_f32`: `GRAD_NORM` and `CLIP` from the partials;
//! 4. the fused AdamW reads `FOUND_INF` (skips itself), `INV_SCALE`, `CLIP` and `STEP`;
//! 5. `lathe_amp_update`: counts the step (`STEP` or `SKIPPED`), applies GradScaler's rule to
//!    `SCALE`/`INV_SCALE`/`GROWTH_TRACKER`, copies `FOUND_INF` to `LAST_FOUND_INF`, clears it.
//!
//! The host reads the state whenever it likes (an asynchronous copy for logging); nothing
//! synchronises per step. PTX in [`super::amp_ptx`].

use super::amp_ptx;
use crate::desc::{ArgKind, Cost, Elem, Geometry, KernelDesc, Module, Problem, Target, arg};
use std::borrow::Cow;

/// Words of the step state (u32 each; float words hold f32 bit patterns).
pub const FOUND_INF: usize = 0;
/// Loss scale (f32): multiply the loss (the backward seed) by it.
pub const SCALE: usize = 1;
/// `1 / SCALE` formed in f64, rounded to f32 (f32).
pub const INV_SCALE: usize = 2;
/// Consecutive clean steps since the last growth or backoff (u32).
pub const GROWTH_TRACKER: usize = 3;
/// Gradient clip factor (f32), 1 when clipping is off or the norm is not finite.
pub const CLIP: usize = 4;
/// Global L2 norm of the unscaled gradients (f32).
pub const GRAD_NORM: usize = 5;
/// Optimizer steps applied so far (u32); AdamW's step `t` is `STEP + 1`.
pub const STEP: usize = 6;
/// Steps skipped for non-finite gradients so far (u32).
pub const SKIPPED: usize = 7;
/// `FOUND_INF` of the last step, kept by the update for logging (u32).
pub const LAST_FOUND_INF: usize = 8;
/// Length of the step state buffer in u32 words (the rest is reserved, zero).
pub const STATE_WORDS: usize = 16;

/// Threads per block of the check and finish kernels.
pub const THREADS: u32 = 256;
/// Most blocks (and partials) of the check pass.
pub const MAX_CHECK_BLOCKS: u64 = 1024;

/// Blocks of the check pass for `n` elements: a function of `n` alone, so the partials (and
/// the norm) are the same bits on every run.
pub fn check_blocks(n: u64) -> u64 {
    n.div_ceil(THREADS as u64 * 4).clamp(1, MAX_CHECK_BLOCKS)
}

/// The step state as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepState {
    pub found_inf: bool,
    pub scale: f32,
    pub inv_scale: f32,
    pub growth_tracker: u32,
    pub clip: f32,
    pub grad_norm: f32,
    pub step: u32,
    pub skipped: u32,
    pub last_found_inf: bool,
}

impl StepState {
    /// A fresh state: no step yet, `scale` (1 for fp32/bf16, 65536 for fp16 by default),
    /// clip factor 1.
    pub fn new(scale: f32) -> Self {
        StepState {
            found_inf: false,
            scale,
            inv_scale: (1.0 / scale as f64) as f32,
            growth_tracker: 0,
            clip: 1.0,
            grad_norm: 0.0,
            step: 0,
            skipped: 0,
            last_found_inf: false,
        }
    }

    /// The device words.
    pub fn to_words(&self) -> [u32; STATE_WORDS] {
        let mut w = [0u32; STATE_WORDS];
        w[FOUND_INF] = self.found_inf as u32;
        w[SCALE] = self.scale.to_bits();
        w[INV_SCALE] = self.inv_scale.to_bits();
        w[GROWTH_TRACKER] = self.growth_tracker;
        w[CLIP] = self.clip.to_bits();
        w[GRAD_NORM] = self.grad_norm.to_bits();
        w[STEP] = self.step;
        w[SKIPPED] = self.skipped;
        w[LAST_FOUND_INF] = self.last_found_inf as u32;
        w
    }

    /// Reads the device words back; `None` when fewer than [`STATE_WORDS`] are given.
    pub fn from_words(w: &[u32]) -> Option<Self> {
        if w.len() < STATE_WORDS {
            return None;
        }
        Some(StepState {
            found_inf: w[FOUND_INF] != 0,
            scale: f32::from_bits(w[SCALE]),
            inv_scale: f32::from_bits(w[INV_SCALE]),
            growth_tracker: w[GROWTH_TRACKER],
            clip: f32::from_bits(w[CLIP]),
            grad_norm: f32::from_bits(w[GRAD_NORM]),
            step: w[STEP],
            skipped: w[SKIPPED],
            last_found_inf: w[LAST_FOUND_INF] != 0,
        })
    }
}

/// Settings of the loss-scale update (PyTorch GradScaler's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalerRule {
    /// false: the scale stays as it is (fp32, bf16); steps are still counted.
    pub dynamic: bool,
    pub growth_interval: u32,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// A backoff never takes the scale below this (f32; 0: no floor). The trainer's scaler
    /// uses `min(1, init_scale)`, as DeepSpeed's `min_loss_scale`.
    pub min_scale: f32,
}

impl Default for ScalerRule {
    fn default() -> Self {
        ScalerRule {
            dynamic: true,
            growth_interval: 2000,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale: 0.0,
        }
    }
}

fn module_ptx() -> Cow<'static, str> {
    let mut s = crate::ptx::header(Target::Sm80);
    s.push_str(&amp_ptx::check_norm("lathe_grad_check_norm_f32", false));
    s.push_str(&amp_ptx::check_norm(
        "lathe_grad_unscale_check_norm_f32",
        true,
    ));
    s.push_str(&amp_ptx::norm_finish("lathe_grad_norm_finish_f32"));
    s.push_str(&amp_ptx::update("lathe_amp_update"));
    Cow::Owned(s)
}

/// The module of this family.
pub static MODULE: Module = Module {
    name: "nn_amp",
    target: Target::Sm80,
    ptx: module_ptx,
};

fn check_geometry(p: &Problem) -> Geometry {
    Geometry {
        grid: (check_blocks(p.n) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn one_block(_: &Problem) -> Geometry {
    Geometry {
        grid: (1, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn one_thread(_: &Problem) -> Geometry {
    Geometry {
        grid: (1, 1, 1),
        block: (1, 1, 1),
        shared_bytes: 0,
    }
}

/// `Problem::elems(n)`: `grads (n) f32` (read; the unscale variant writes it back in place),
/// `state (16) u32` (sets `FOUND_INF`), `partials (check_blocks(n)) f32` (written).
pub static CHECK_NORM_F32: KernelDesc = KernelDesc {
    entry: "lathe_grad_check_norm_f32",
    module: &MODULE,
    args: &[
        arg("grads", ArgKind::In(Elem::F32)),
        arg("n", ArgKind::U64),
        arg("state", ArgKind::Out(Elem::U32)),
        arg("partials", ArgKind::Out(Elem::F32)),
    ],
    geometry: check_geometry,
    cost: |p| Cost {
        flops: 3 * p.n,
        bytes: 4 * p.n,
    },
    summary: "non-finite check of grads and per-block sums of (g * inv_scale)^2",
};

/// Like [`CHECK_NORM_F32`], and `grads[i] *= inv_scale` in place.
pub static UNSCALE_CHECK_NORM_F32: KernelDesc = KernelDesc {
    entry: "lathe_grad_unscale_check_norm_f32",
    module: &MODULE,
    args: &[
        arg("grads", ArgKind::Out(Elem::F32)),
        arg("n", ArgKind::U64),
        arg("state", ArgKind::Out(Elem::U32)),
        arg("partials", ArgKind::Out(Elem::F32)),
    ],
    geometry: check_geometry,
    cost: |p| Cost {
        flops: 3 * p.n,
        bytes: 8 * p.n,
    },
    summary: "grads *= inv_scale in place, non-finite check, per-block sums of squares",
};

/// `Problem::elems(count)`: `partials (count) f32` -> state `GRAD_NORM`, `CLIP`.
pub static NORM_FINISH_F32: KernelDesc = KernelDesc {
    entry: "lathe_grad_norm_finish_f32",
    module: &MODULE,
    args: &[
        arg("partials", ArgKind::In(Elem::F32)),
        arg("count", ArgKind::U32),
        arg("state", ArgKind::Out(Elem::U32)),
        arg("max_norm", ArgKind::F32),
    ],
    geometry: one_block,
    cost: |p| Cost {
        flops: p.n,
        bytes: 4 * p.n,
    },
    summary: "gradient norm and clip factor from the check pass's partials",
};

/// One thread: GradScaler's update of the step state; factors are f64 bit patterns.
pub static AMP_UPDATE: KernelDesc = KernelDesc {
    entry: "lathe_amp_update",
    module: &MODULE,
    args: &[
        arg("state", ArgKind::Out(Elem::U32)),
        arg("dynamic", ArgKind::U32),
        arg("growth_interval", ArgKind::U32),
        arg("growth_factor", ArgKind::U64),
        arg("backoff_factor", ArgKind::U64),
        arg("min_scale", ArgKind::F32),
    ],
    geometry: one_thread,
    cost: |_| Cost {
        flops: 4,
        bytes: 4 * STATE_WORDS as u64,
    },
    summary: "loss-scale update and step counting on the device (no host sync)",
};

/// Every kernel of this module.
pub static ALL: &[&KernelDesc] = &[
    &CHECK_NORM_F32,
    &UNSCALE_CHECK_NORM_F32,
    &NORM_FINISH_F32,
    &AMP_UPDATE,
];

/// CPU twins.
pub mod twin {
    use super::{ScalerRule, StepState};

    /// The check pass: whether any element is non-finite (before scaling) and the sum of
    /// squares of `g * inv_scale` (each product rounded to f32, then squared and summed in
    /// f64: the reference the GPU's f32 tree is compared with).
    pub fn check_norm(grads: &[f32], inv_scale: f32) -> (bool, f64) {
        let mut found = false;
        let mut sq = 0f64;
        for &g in grads {
            found |= !g.is_finite();
            let u = (g * inv_scale) as f64;
            sq += u * u;
        }
        (found, sq)
    }

    /// [`check_norm`] and `grads[i] *= inv_scale` in place.
    pub fn unscale_check_norm(grads: &mut [f32], inv_scale: f32) -> (bool, f64) {
        let r = check_norm(grads, inv_scale);
        for g in grads.iter_mut() {
            *g *= inv_scale;
        }
        r
    }

    /// The clip factor the finish kernel writes for a norm: `min(1, max_norm / (norm + 1e-6))`
    /// in f64 rounded to f32; 1 when `norm` is not finite or `max_norm` is not a positive
    /// finite number (clipping off).
    pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
        if !(norm.is_finite() && max_norm.is_finite() && max_norm > 0.0) {
            return 1.0;
        }
        (max_norm as f64 / (norm as f64 + 1e-6)).min(1.0) as f32
    }

    /// The update kernel, word for word.
    pub fn update(s: &mut StepState, rule: &ScalerRule) {
        let found = s.found_inf;
        if found {
            s.skipped += 1;
        } else {
            s.step += 1;
        }
        if rule.dynamic {
            if found {
                s.scale = ((s.scale as f64 * rule.backoff_factor) as f32).max(rule.min_scale);
                s.growth_tracker = 0;
            } else {
                let next = s.growth_tracker + 1;
                if next >= rule.growth_interval {
                    let grown = (s.scale as f64 * rule.growth_factor) as f32;
                    if grown.is_finite() {
                        s.scale = grown;
                    }
                    s.growth_tracker = 0;
                } else {
                    s.growth_tracker = next;
                }
            }
            s.inv_scale = (1.0 / s.scale as f64) as f32;
        }
        s.last_found_inf = found;
        s.found_inf = false;
    }
}

#[cfg(test)]
mod tests {
    use super::twin::*;
    use super::*;

    #[test]
    fn state_words_roundtrip() {
        let mut s = StepState::new(65536.0);
        s.found_inf = true;
        s.growth_tracker = 17;
        s.clip = 0.25;
        s.grad_norm = 3.5;
        s.step = 9;
        s.skipped = 2;
        let w = s.to_words();
        assert_eq!(w.len(), STATE_WORDS);
        assert_eq!(f32::from_bits(w[INV_SCALE]), 1.0 / 65536.0);
        assert_eq!(StepState::from_words(&w), Some(s));
        assert_eq!(StepState::from_words(&w[..3]), None);
    }

    #[test]
    fn check_finds_non_finite_before_scaling() {
        let (f, sq) = check_norm(&[1.0, -2.0, 3.0], 0.5);
        assert!(!f);
        assert_eq!(sq, 0.25 + 1.0 + 2.25);
        assert!(check_norm(&[1.0, f32::NAN], 1.0).0);
        assert!(check_norm(&[f32::NEG_INFINITY], 0.0).0);
        // A huge finite value that scaling keeps finite is not flagged.
        let mut g = vec![f32::MAX, 1.0];
        let (f, _) = unscale_check_norm(&mut g, 0.5);
        assert!(!f);
        assert_eq!(g, vec![f32::MAX * 0.5, 0.5]);
    }

    #[test]
    fn clip_factor_follows_clip_grad_norm() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        let c = clip_factor(4.0, 1.0);
        assert_eq!(c, (1.0f64 / (4.0 + 1e-6)) as f32);
        assert_eq!(clip_factor(f32::INFINITY, 1.0), 1.0);
        assert_eq!(clip_factor(f32::NAN, 1.0), 1.0);
        assert_eq!(clip_factor(4.0, 0.0), 1.0);
        assert_eq!(clip_factor(4.0, -1.0), 1.0);
    }

    #[test]
    fn update_follows_gradscaler() {
        let rule = ScalerRule {
            growth_interval: 3,
            ..ScalerRule::default()
        };
        let mut s = StepState::new(1024.0);
        // Two clean steps: the tracker counts, the scale holds.
        for k in 1..=2 {
            update(&mut s, &rule);
            assert_eq!((s.step, s.growth_tracker, s.scale), (k, k, 1024.0));
        }
        // The third grows the scale and resets the tracker.
        update(&mut s, &rule);
        assert_eq!((s.step, s.growth_tracker, s.scale), (3, 0, 2048.0));
        assert_eq!(s.inv_scale, 1.0 / 2048.0);
        // An overflow step backs off, is not counted as applied, and resets the tracker.
        update(&mut s, &rule);
        s.found_inf = true;
        update(&mut s, &rule);
        assert_eq!(
            (s.step, s.skipped, s.growth_tracker, s.scale),
            (4, 1, 0, 1024.0)
        );
        assert!(s.last_found_inf && !s.found_inf);
        // Growth that would overflow keeps the scale.
        let mut big = StepState::new(f32::MAX);
        let rule1 = ScalerRule {
            growth_interval: 1,
            ..rule
        };
        update(&mut big, &rule1);
        assert_eq!(big.scale, f32::MAX);
        assert_eq!(big.growth_tracker, 0);
        // A static scaler only counts.
        let mut st = StepState::new(1.0);
        st.found_inf = true;
        let off = ScalerRule {
            dynamic: false,
            ..rule
        };
        update(&mut st, &off);
        assert_eq!((st.scale, st.skipped, st.step), (1.0, 1, 0));
    }

    #[test]
    fn check_grid_depends_on_n_only() {
        assert_eq!(check_blocks(0), 1);
        assert_eq!(check_blocks(1), 1);
        assert_eq!(check_blocks(1025), 2);
        assert_eq!(check_blocks(1 << 40), MAX_CHECK_BLOCKS);
    }
}
