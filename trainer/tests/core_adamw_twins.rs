//! The trainer's CPU AdamW and the GPU kernel's CPU twin (`lathe_kernels::nn::adamw::twin`)
//! must compute the same bits: a run on the CPU and a run on the GPU then agree exactly in the
//! optimizer. Checked over several steps with decay and no-decay ranges, loss scaling,
//! clipping, and both rounding modes of the bf16 working copy.

use half::bf16;
use lathe_kernels::nn::adamw::DecayRanges;
use lathe_kernels::nn::adamw::twin::{self, Hyper, WorkingMut};
use lathe_kernels::nn::amp::StepState;
use lathe_kernels::rng::Rng;
use lathe_trainer::optim::{
    AdamWConfig, Optimizer, OptimizerConfig, ParamLayout, ParamView, Rounding, StepArgs,
    WorkingCopy,
};

fn run(stochastic: bool) {
    let n = 10_007;
    let layout = ParamLayout::new(
        vec![
            ParamView::new("w", 0, &[6000], true),
            ParamView::new("b", 6000, &[n - 6000], false),
        ],
        n,
    )
    .unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let h = Hyper {
        lr: 3e-3,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let seed = 99;
    let mut rng = Rng::new(5);
    let mut master_a = rng.vec_f32(n, -1.0, 1.0);
    let mut master_b = master_a.clone();
    let mut opt = Optimizer::new(OptimizerConfig::AdamW(cfg), n).unwrap();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (mut wa, mut wb) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    let ranges = DecayRanges::merged(
        layout
            .decay_ranges()
            .iter()
            .map(|r| r.start as u64..r.end as u64),
    )
    .unwrap();
    let (scale, clip) = (1024f32, 0.7f32);
    for step in 0..4u32 {
        let grads: Vec<f32> = rng
            .vec_f32(n, -1.0, 1.0)
            .iter()
            .map(|g| g * scale)
            .collect();
        let rounding = if stochastic {
            Rounding::Stochastic { seed }
        } else {
            Rounding::Nearest
        };
        let args = StepArgs {
            lr: h.lr,
            inv_scale: 1.0 / scale,
            clip_factor: clip,
            found_inf: false,
            offset: 0,
        };
        opt.step(
            &mut master_a,
            &grads,
            WorkingCopy::Bf16 {
                buf: &mut wa,
                rounding,
            },
            &layout,
            &args,
        )
        .unwrap();
        let mut state = StepState::new(scale);
        state.clip = clip;
        state.step = step;
        let working = if stochastic {
            WorkingMut::Bf16Stochastic(&mut wb)
        } else {
            WorkingMut::Bf16(&mut wb)
        };
        assert!(twin::step(
            &mut master_b,
            &grads,
            &mut m,
            &mut v,
            working,
            &ranges,
            &state,
            0,
            seed,
            &h,
            true,
        ));
        for i in 0..n {
            assert_eq!(
                master_a[i].to_bits(),
                master_b[i].to_bits(),
                "step {step} element {i}: {} vs {}",
                master_a[i],
                master_b[i]
            );
            assert_eq!(wa[i].to_bits(), wb[i].to_bits(), "step {step} working {i}");
        }
    }
}

#[test]
fn cpu_adamw_equals_the_kernel_twin_bitwise() {
    run(false);
}

#[test]
fn cpu_adamw_equals_the_kernel_twin_with_stochastic_rounding() {
    run(true);
}
