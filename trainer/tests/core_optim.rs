//! The fused optimizers against hand-computed values, straightforward scalar references, and
//! their contracts (skip on non-finite, determinism, sharding, stochastic rounding).

use half::{bf16, f16};
use lathe_kernels::rng::Rng;
use lathe_trainer::optim::{
    AdamW, AdamWConfig, OptimError, Optimizer, OptimizerConfig, ParamLayout, ParamView, Rounding,
    Sgd, SgdConfig, StepArgs, StepOutcome, WorkingCopy, bf16_stochastic, bias_correction,
    stochastic_bits, stochastic_key, write_working_copy,
};

/// A layout with decaying and non-decaying views and an uncovered tail, `n` elements in all.
fn layout(n: usize) -> ParamLayout {
    let a = n / 3;
    let b = n / 5;
    ParamLayout::new(
        vec![
            ParamView::new("wte.weight", 0, &[a], true),
            ParamView::new("ln.bias", a, &[b], false),
            ParamView::new("fc.weight", a + b, &[n / 4], true),
        ],
        n,
    )
    .unwrap()
}

fn decay_mask(l: &ParamLayout) -> Vec<bool> {
    let mut d = vec![false; l.len()];
    for v in l.views() {
        for x in &mut d[v.range()] {
            *x = v.decay;
        }
    }
    d
}

/// The AdamW update written the obvious way, one element at a time, f32, in the documented
/// operation order.
#[allow(clippy::too_many_arguments)]
fn adamw_reference(
    c: &AdamWConfig,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decay: &[bool],
    args: &StepArgs,
) {
    // The bias corrections are host-side scalars of the launch (tested in the crate).
    let bc1 = bias_correction(c.beta1, t);
    let bc2 = bias_correction(c.beta2, t);
    let gs = args.inv_scale * args.clip_factor;
    for i in 0..p.len() {
        let gi = g[i] * gs;
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * (gi * gi);
        let mut u = (m[i] / bc1) / ((v[i] / bc2).sqrt() + c.eps);
        if decay[i] {
            u += c.weight_decay * p[i];
        }
        p[i] -= args.lr * u;
    }
}

#[test]
fn adamw_one_step_matches_hand_computation() {
    // One element, loss scale 1024, decay on: t = 1 then t = 2, against f64 arithmetic.
    let l = ParamLayout::new(vec![ParamView::new("w", 0, &[1], true)], 1).unwrap();
    let c = AdamWConfig::default();
    let mut opt = AdamW::new(c, 1).unwrap();
    let mut p = [1.0f32];
    let args = StepArgs {
        lr: 1e-3,
        inv_scale: 1.0 / 1024.0,
        ..StepArgs::new(1e-3)
    };
    opt.step(&mut p, &[512.0], WorkingCopy::None, &l, &args)
        .unwrap();
    // g = 0.5; m = 0.05; v = 0.0125; m_hat = 0.5; v_hat = 0.25;
    // p = 1 - 1e-3 * (0.5 / (0.5 + 1e-8) + 0.1 * 1).
    let expect1 = 1.0 - 1e-3 * (0.5 / (0.5 + 1e-8) + 0.1);
    assert!(
        (p[0] as f64 - expect1).abs() < 1e-7,
        "{} vs {expect1}",
        p[0]
    );
    // f32 rounding of 1 - beta (e.g. 1 - 0.9f32 = 0.100000024) bounds the agreement.
    assert!((opt.m()[0] as f64 / 0.05 - 1.0).abs() < 1e-6);
    assert!((opt.v()[0] as f64 / 0.0125 - 1.0).abs() < 1e-6);

    opt.step(&mut p, &[-256.0], WorkingCopy::None, &l, &args)
        .unwrap();
    // g = -0.25; m = 0.045 - 0.025 = 0.02; v = 0.011875 + 0.003125 = 0.015;
    // m_hat = 0.02 / 0.19; v_hat = 0.015 / 0.0975.
    let (m, v) = (0.02f64, 0.015f64);
    let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.9025));
    let expect2 = expect1 - 1e-3 * (mh / (vh.sqrt() + 1e-8) + 0.1 * expect1);
    assert!(
        (p[0] as f64 - expect2).abs() < 1e-7,
        "{} vs {expect2}",
        p[0]
    );
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn adamw_matches_scalar_reference_bitwise_on_random_inputs() {
    let n = 100_003; // several parallel chunks, ragged end
    let l = layout(n);
    let decay = decay_mask(&l);
    let mut rng = Rng::new(42);
    let c = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut p = rng.vec_f32(n, -1.0, 1.0);
    let mut p_ref = p.clone();
    let (mut m_ref, mut v_ref) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut opt = Optimizer::new(OptimizerConfig::AdamW(c), n).unwrap();
    let mut work = vec![bf16::ZERO; n];
    // The same update in f64 throughout.
    let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64) = (vec![0.0f64; n], vec![0.0f64; n]);
    for t in 1..=3u64 {
        let g = rng.vec_f32(n, -8.0, 8.0);
        let args = StepArgs {
            lr: 3e-4 * t as f32,
            inv_scale: 0.125,
            clip_factor: 0.7,
            found_inf: false,
            offset: 0,
        };
        let working = WorkingCopy::Bf16 {
            buf: &mut work,
            rounding: Rounding::Nearest,
        };
        let out = opt.step(&mut p, &g, working, &l, &args).unwrap();
        assert_eq!(out, StepOutcome::Applied);
        adamw_reference(&c, t, &mut p_ref, &g, &mut m_ref, &mut v_ref, &decay, &args);
        let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
        for i in 0..n {
            let gi = g[i] as f64 * 0.125 * 0.7;
            m64[i] = b1 * m64[i] + (1.0 - b1) * gi;
            v64[i] = b2 * v64[i] + (1.0 - b2) * gi * gi;
            let mh = m64[i] / (1.0 - b1.powi(t as i32));
            let vh = v64[i] / (1.0 - b2.powi(t as i32));
            let wd = if decay[i] {
                c.weight_decay as f64 * p64[i]
            } else {
                0.0
            };
            p64[i] -= args.lr as f64 * (mh / (vh.sqrt() + c.eps as f64) + wd);
        }
    }
    let worst = p
        .iter()
        .zip(&p64)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    // Parameters are O(1) (f32 ulp ~1e-7) and move by O(1e-3) per step.
    assert!(
        worst < 1e-6,
        "f32 twin vs f64 reference: max |diff| {worst}"
    );
    assert!(
        p.iter()
            .zip(&p_ref)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let bufs = opt.buffers();
    assert_eq!(bufs[0].0, "m");
    assert!(
        bufs[0]
            .1
            .iter()
            .zip(&m_ref)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        bufs[1]
            .1
            .iter()
            .zip(&v_ref)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(work.iter().zip(&p).all(|(w, &x)| *w == bf16::from_f32(x)));
    // Decay really depends on the view: an uncovered tail element moved without decay.
    assert!(!decay[n - 1] && decay[0]);
}

#[test]
fn found_inf_leaves_everything_bitwise_unchanged() {
    let n = 70_000;
    let l = layout(n);
    let mut rng = Rng::new(5);
    for config in [
        OptimizerConfig::AdamW(AdamWConfig::default()),
        OptimizerConfig::Sgd(SgdConfig::default()),
    ] {
        let mut opt = Optimizer::new(config, n).unwrap();
        let mut p = rng.vec_f32(n, -1.0, 1.0);
        let g = rng.vec_f32(n, -1.0, 1.0);
        let mut work = vec![f16::from_f32(0.25); n];
        opt.step(
            &mut p,
            &g,
            WorkingCopy::F16(&mut work),
            &l,
            &StepArgs::new(1e-2),
        )
        .unwrap();
        let (p0, w0, o0) = (p.clone(), work.clone(), opt.clone());
        let mut bad = g.clone();
        bad[n / 2] = f32::NAN;
        let args = StepArgs {
            found_inf: true,
            ..StepArgs::new(1e-2)
        };
        let out = opt
            .step(&mut p, &bad, WorkingCopy::F16(&mut work), &l, &args)
            .unwrap();
        assert_eq!(out, StepOutcome::Skipped);
        assert!(p.iter().zip(&p0).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(
            work.iter()
                .zip(&w0)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(opt, o0);
        assert_eq!(opt.step_count(), 1);
        assert!(work.iter().zip(&p).all(|(w, &x)| *w == f16::from_f32(x)));
    }
}

#[test]
fn shards_and_thread_counts_give_identical_results() {
    let n = 90_001;
    let l = layout(n);
    let mut rng = Rng::new(9);
    let p0 = rng.vec_f32(n, -1.0, 1.0);
    let g = rng.vec_f32(n, -1.0, 1.0);
    let rounding = Rounding::Stochastic { seed: 1234 };
    let c = OptimizerConfig::AdamW(AdamWConfig::default());

    let run_whole = || {
        let mut p = p0.clone();
        let mut w = vec![bf16::ZERO; n];
        let mut opt = Optimizer::new(c, n).unwrap();
        for _ in 0..2 {
            let working = WorkingCopy::Bf16 {
                buf: &mut w,
                rounding,
            };
            opt.step(&mut p, &g, working, &l, &StepArgs::new(1e-3))
                .unwrap();
        }
        (p, w)
    };
    let (p_whole, w_whole) = run_whole();
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (p_one, w_one) = single.install(run_whole);
    assert_eq!(p_whole, p_one);
    assert_eq!(w_whole, w_one);

    // Two shards with their own optimizers, cut mid-view.
    let cut = 40_000;
    let mut p = p0.clone();
    let mut w = vec![bf16::ZERO; n];
    let (pa, pb) = p.split_at_mut(cut);
    let (wa, wb) = w.split_at_mut(cut);
    let (ga, gb) = g.split_at(cut);
    let mut oa = Optimizer::new(c, cut).unwrap();
    let mut ob = Optimizer::new(c, n - cut).unwrap();
    for _ in 0..2 {
        let wk = WorkingCopy::Bf16 { buf: wa, rounding };
        oa.step(pa, ga, wk, &l, &StepArgs::new(1e-3)).unwrap();
        let wk = WorkingCopy::Bf16 { buf: wb, rounding };
        let args = StepArgs {
            offset: cut,
            ..StepArgs::new(1e-3)
        };
        ob.step(pb, gb, wk, &l, &args).unwrap();
    }
    assert_eq!(p, p_whole);
    assert_eq!(w, w_whole);
}

#[test]
fn stochastic_rounding_is_reproducible_and_unbiased() {
    let n = 200_000;
    // 0.3 of the way from 1.0 to the next bf16 (1 + 2^-7).
    let x = 1.0f32 + 0.3 / 128.0;
    let master = vec![x; n];
    let round = |seed: u64, step: u64| {
        let mut w = vec![bf16::ZERO; n];
        let working = WorkingCopy::Bf16 {
            buf: &mut w,
            rounding: Rounding::Stochastic { seed },
        };
        assert!(write_working_copy(&master, working, 0, step));
        w
    };
    let a = round(7, 3);
    assert_eq!(a, round(7, 3));
    assert_ne!(a, round(8, 3));
    assert_ne!(a, round(7, 4));
    assert!(
        a.iter()
            .all(|w| w.to_f32() == 1.0 || w.to_f32() == 1.0078125)
    );
    let mean = a.iter().map(|w| w.to_f32() as f64).sum::<f64>() / n as f64;
    // Standard error: 2^-7 * sqrt(0.3 * 0.7 / n) ~ 8e-6; allow 5 of them.
    assert!((mean - x as f64).abs() < 4e-5, "mean {mean} vs {x}");
    // Nearest rounding would be biased by 0.3 ulp.
    assert!((bf16::from_f32(x).to_f32() as f64 - x as f64).abs() > 2e-3);

    // One element over many steps is unbiased too, and each bit pattern is what a kernel
    // computes from (seed, step, index).
    let steps = 20_000u64;
    let mut sum = 0.0f64;
    for s in 0..steps {
        let r = bf16_stochastic(-x, stochastic_bits(stochastic_key(99, s), 12_345));
        sum += r.to_f32() as f64;
    }
    assert!((sum / steps as f64 + x as f64).abs() < 1.2e-4);
}

#[test]
fn sgd_momentum_and_nesterov_match_pytorch_rules() {
    let n = 40_000;
    let l = layout(n);
    let decay = decay_mask(&l);
    let mut rng = Rng::new(3);
    for nesterov in [false, true] {
        let c = SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.01,
            nesterov,
        };
        let mut opt = Sgd::new(c, n).unwrap();
        let mut p = rng.vec_f32(n, -1.0, 1.0);
        let mut p_ref = p.clone();
        let mut buf = vec![0.0f32; n];
        for t in 1..=3 {
            let g = rng.vec_f32(n, -1.0, 1.0);
            let args = StepArgs {
                inv_scale: 0.5,
                ..StepArgs::new(0.1)
            };
            opt.step(&mut p, &g, WorkingCopy::None, &l, &args).unwrap();
            for i in 0..n {
                let mut gi = g[i] * 0.5;
                if decay[i] {
                    gi += 0.01 * p_ref[i];
                }
                buf[i] = if t == 1 { gi } else { 0.9 * buf[i] + gi };
                let d = if nesterov { gi + 0.9 * buf[i] } else { buf[i] };
                p_ref[i] -= 0.1 * d;
            }
        }
        assert_eq!(p, p_ref, "nesterov {nesterov}");
        assert_eq!(opt.momentum_buffer(), &buf[..]);
    }
    // Plain SGD keeps no buffer.
    let plain = Optimizer::new(
        OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.0,
            ..SgdConfig::default()
        }),
        4,
    )
    .unwrap();
    assert!(plain.buffers().is_empty());
    let bad = SgdConfig {
        momentum: 0.0,
        nesterov: true,
        ..SgdConfig::default()
    };
    assert!(Sgd::new(bad, 4).is_err());
}

#[test]
fn misuse_is_reported_not_panicked() {
    let l = layout(100);
    let mut opt = Optimizer::new(OptimizerConfig::default(), 100).unwrap();
    let mut p = vec![0.0f32; 100];
    let e = opt
        .step(
            &mut p,
            &[0.0; 99],
            WorkingCopy::None,
            &l,
            &StepArgs::new(1.0),
        )
        .unwrap_err();
    assert_eq!(
        e,
        OptimError::LengthMismatch {
            buffer: "grads",
            expected: 100,
            found: 99
        }
    );
    let mut w = vec![f16::ZERO; 3];
    let e = opt
        .step(
            &mut p,
            &[0.0; 100],
            WorkingCopy::F16(&mut w),
            &l,
            &StepArgs::new(1.0),
        )
        .unwrap_err();
    assert!(e.to_string().contains("working"), "{e}");
    let args = StepArgs {
        offset: 1,
        ..StepArgs::new(1.0)
    };
    assert!(matches!(
        opt.step(&mut p, &[0.0; 100], WorkingCopy::None, &l, &args),
        Err(OptimError::OutsideLayout { .. })
    ));
    let e = opt
        .step(
            &mut p,
            &[0.0; 100],
            WorkingCopy::None,
            &l,
            &StepArgs::new(f32::NAN),
        )
        .unwrap_err();
    assert!(e.to_string().contains("lr"), "{e}");
    let bad = AdamWConfig {
        beta2: 1.0,
        ..AdamWConfig::default()
    };
    let e = AdamW::new(bad, 1).unwrap_err();
    assert!(e.to_string().contains("beta2"), "{e}");
    assert_eq!(opt.step_count(), 0);

    let sgd = Optimizer::new(OptimizerConfig::Sgd(SgdConfig::default()), 100).unwrap();
    let e = opt.restore_state(&sgd.state()).unwrap_err();
    assert!(matches!(e, OptimError::KindMismatch { .. }), "{e}");
}
