//! The loss scaler step by step against PyTorch GradScaler's rule, and the skip path end to end
//! with the non-finite check, injection and an optimizer.

use lathe_kernels::rng::Rng;
use lathe_trainer::optim::{
    Optimizer, OptimizerConfig, ParamLayout, StepArgs, StepOutcome, WorkingCopy, clip_factor,
    grad_norm,
};
use lathe_trainer::precision::{
    LossScaler, NonFiniteInjection, Precision, ScalerConfig, has_nonfinite, unscale_and_check,
};

#[test]
fn scale_doubles_after_2000_clean_steps_and_halves_on_inf() {
    let mut s = LossScaler::for_precision(Precision::Fp16);
    for i in 1..2000 {
        let u = s.update(false);
        assert!(!u.skipped);
        assert_eq!(u.scale, 65536.0);
        assert_eq!(s.growth_tracker(), i);
    }
    let u = s.update(false);
    assert_eq!((u.previous_scale, u.scale), (65536.0, 131072.0));
    assert_eq!(s.growth_tracker(), 0);

    let u = s.update(true);
    assert!(u.found_inf && u.skipped);
    assert_eq!((u.previous_scale, u.scale), (131072.0, 65536.0));
    assert_eq!(s.growth_tracker(), 0);
    assert_eq!(s.skipped_steps(), 1);

    // 1500 clean, then an inf resets the count: growth needs 2000 fresh clean steps.
    for _ in 0..1500 {
        s.update(false);
    }
    assert_eq!(s.update(true).scale, 32768.0);
    for _ in 0..1999 {
        assert_eq!(s.update(false).scale, 32768.0);
    }
    assert_eq!(s.update(false).scale, 65536.0);
    // Consecutive infs keep halving.
    assert_eq!(s.update(true).scale, 32768.0);
    assert_eq!(s.update(true).scale, 16384.0);
    assert_eq!(s.inv_scale(), 1.0 / 16384.0);
    assert_eq!(s.skipped_steps(), 4);
}

/// PyTorch's `_amp_update_scale_` written out, for random step sequences, plus Lathe's floor
/// of the scale at `MIN_SCALE` (PyTorch has none; a scale sinking below it only reaches
/// subnormals and an infinite `inv_scale`).
fn gradscaler_rule(scale: &mut f32, tracker: &mut u32, found_inf: bool, interval: u32) {
    if found_inf {
        *scale = ((*scale as f64 * 0.5) as f32).max(lathe_trainer::precision::MIN_SCALE);
        *tracker = 0;
    } else {
        let successful = *tracker + 1;
        if successful == interval {
            let grown = (*scale as f64 * 2.0) as f32;
            if grown.is_finite() {
                *scale = grown;
            }
            *tracker = 0;
        } else {
            *tracker = successful;
        }
    }
}

#[test]
fn random_sequences_follow_the_gradscaler_rule_and_survive_serde() {
    let cfg = ScalerConfig {
        growth_interval: 3,
        ..ScalerConfig::default()
    };
    let mut s = LossScaler::new(cfg).unwrap();
    let (mut scale, mut tracker) = (65536.0f32, 0u32);
    let mut rng = Rng::new(17);
    for i in 0..2000 {
        let inf = rng.uniform() < 0.3;
        gradscaler_rule(&mut scale, &mut tracker, inf, 3);
        let u = s.update(inf);
        assert_eq!(u.skipped, inf);
        assert_eq!(
            (s.scale(), s.growth_tracker()),
            (scale, tracker),
            "step {i}"
        );
        if i == 1000 {
            // A checkpointed scaler continues exactly.
            let json = serde_json::to_string(&s).unwrap();
            s = serde_json::from_str(&json).unwrap();
        }
    }
}

#[test]
fn disabled_scaler_keeps_scale_one_but_still_skips() {
    for p in [Precision::Fp32, Precision::Bf16] {
        let mut s = LossScaler::for_precision(p);
        let u = s.update(true);
        assert!(u.skipped && u.found_inf);
        assert_eq!(u.scale, 1.0);
        for _ in 0..5000 {
            s.update(false);
        }
        assert_eq!(s.scale(), 1.0);
        assert_eq!(s.inv_scale(), 1.0);
        assert_eq!(s.skipped_steps(), 1);
    }
}

/// One fp16 training step the way the loop runs it: scaled gradients, optional injection, the
/// check, the scaler, the norm and clip factor, the optimizer.
fn fp16_step(
    step: u64,
    inject: &NonFiniteInjection,
    scaler: &mut LossScaler,
    opt: &mut Optimizer,
    layout: &ParamLayout,
    master: &mut [f32],
    true_grads: &[f32],
) -> (bool, StepOutcome) {
    let mut grads: Vec<f32> = true_grads.iter().map(|g| g * scaler.scale()).collect();
    inject.inject(step, &mut grads);
    let found_inf = has_nonfinite(&grads);
    let inv = scaler.inv_scale();
    let norm = grad_norm(&grads, inv);
    let update = scaler.update(found_inf);
    let args = StepArgs {
        lr: 1e-2,
        inv_scale: inv,
        clip_factor: clip_factor(norm, 1.0),
        found_inf: update.skipped,
        offset: 0,
    };
    let out = opt
        .step(master, &grads, WorkingCopy::None, layout, &args)
        .unwrap();
    (update.skipped, out)
}

#[test]
fn injected_nonfinite_steps_are_skipped_and_back_off() {
    let n = 1000;
    let layout = ParamLayout::packed([("w", &[n][..], true)]).unwrap();
    let mut rng = Rng::new(4);
    let grads = rng.vec_f32(n, -1e-3, 1e-3);
    let mut master = rng.vec_f32(n, -1.0, 1.0);
    let mut opt = Optimizer::new(OptimizerConfig::default(), n).unwrap();
    let mut scaler = LossScaler::for_precision(Precision::Fp16);
    let inject: NonFiniteInjection = "2,3".parse().unwrap();
    let mut skipped = Vec::new();
    for step in 0..5 {
        let before = master.clone();
        let (skip, out) = fp16_step(
            step,
            &inject,
            &mut scaler,
            &mut opt,
            &layout,
            &mut master,
            &grads,
        );
        assert_eq!(skip, out == StepOutcome::Skipped);
        if skip {
            assert_eq!(master, before);
            skipped.push(step);
        } else {
            assert_ne!(master, before);
        }
    }
    assert_eq!(skipped, vec![2, 3]);
    assert_eq!(scaler.scale(), 16384.0);
    assert_eq!(opt.step_count(), 3);
}

#[test]
fn unscaled_gradients_match_between_fused_and_separate_paths() {
    let mut rng = Rng::new(8);
    let g = rng.vec_f32(100_000, -100.0, 100.0);
    let inv = 1.0 / 32768.0;
    let mut fused = g.clone();
    assert!(!unscale_and_check(&mut fused, inv));
    let norm_fused = grad_norm(&fused, 1.0);
    let norm_separate = grad_norm(&g, inv);
    // Multiplying by a power of two is exact, so both paths agree bit for bit.
    assert_eq!(norm_fused.to_bits(), norm_separate.to_bits());
}
