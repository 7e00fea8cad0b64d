//! The device optimizer step (`lathe_trainer::device`) against the trainer's CPU path.
//!
//! The CPU reference is the trainer's own code, called as `train_step` calls it: the
//! `--inject-nonfinite` aid, the non-finite check, `grad_norm`, `clip_factor`, `Optimizer::step`
//! and `LossScaler::update`. Parameters and gradients are fresh seeded random values, never
//! zero; the device working copy starts poisoned with NaN, so an element the step does not
//! write fails the comparison. Runs on a GPU when one is usable, else on the simulated device
//! (sanitizer on).
//!
//! Tolerances:
//! * Without active clipping the device must match bit for bit (master, working copy, m, v,
//!   step count, scale, growth tracker, skipped count): the fused kernel performs the CPU
//!   AdamW's f32 operations in the same order with IEEE-rounded forms only (`mul.rn`, `add.rn`,
//!   `div.rn`, `sqrt.rn`: no approximate sqrt or division, no FMA contraction), the bias
//!   corrections come from the same f64 repeated squaring, and stochastic rounding hashes the
//!   same `(seed, t, index)`.
//! * The gradient norm is summed in f32 on the device (per-thread sums, a block tree, then the
//!   partials) and in f64 on the CPU: relative error at most `NORM_REL` = 1e-5 (about 170 f32
//!   ulps; the f32 summation bound for these lengths is a few times 1e-6).
//! * With clipping active the clip factor `max / (norm + 1e-6)` inherits that relative error,
//!   and every gradient, moment and update moves with it. Those runs (fp32, no working copy)
//!   compare with a relative Frobenius error under `CLIPPED_REL` = 1e-5, the f32 tolerance of
//!   the project, and check the clip factors agree within `NORM_REL`.

use half::{bf16, f16};
use lathe_autograd::DType;
use lathe_host::nn_ops::WorkingCopyMut;
use lathe_host::testing::test_device;
use lathe_host::{Device, DeviceBuffer};
use lathe_kernels::nn::amp::StepState;
use lathe_kernels::rng::Rng;
use lathe_trainer::device::{
    DeviceBatch, DeviceOptimizer, HostOptimizerState, OffloadGrads, OffloadStaging, StepReadback,
    StepReport, WeightsMut,
};
use lathe_trainer::optim::{
    AdamWConfig, Optimizer, OptimizerConfig, ParamLayout, Rounding, SgdConfig, StepArgs,
    WorkingCopy, clip_factor, grad_norm, write_working_copy,
};
use lathe_trainer::precision::{
    LossScaler, NonFiniteInjection, Precision, ScalerConfig, has_nonfinite,
};
use lathe_trainer::zero::HostOptimizer;

const NORM_REL: f64 = 1e-5;
const CLIPPED_REL: f64 = 1e-5;
const STEPS: u64 = 6;

/// GPT-like views with and without decay; 4349 elements (5 blocks of the check pass, so the
/// norm's partials and the finish kernel's tree are exercised).
fn layout() -> ParamLayout {
    ParamLayout::packed([
        ("wte", &[40usize, 37][..], false),
        ("fc.w", &[37, 50][..], true),
        ("fc.b", &[50][..], false),
        ("proj.w", &[50, 19][..], true),
        ("ln.g", &[19][..], false),
    ])
    .unwrap()
}

/// Never zero: magnitudes in [lo, hi), random signs.
fn random(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = rng.range_f32(lo, hi);
            if rng.next_u32() & 1 == 0 { x } else { -x }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Fp32,
    Bf16Nearest,
    Bf16Stochastic,
    Fp16,
}

impl Mode {
    fn precision(self) -> Precision {
        match self {
            Mode::Fp32 => Precision::Fp32,
            Mode::Bf16Nearest | Mode::Bf16Stochastic => Precision::Bf16,
            Mode::Fp16 => Precision::Fp16,
        }
    }

    fn rounding(self) -> Rounding {
        match self {
            Mode::Bf16Stochastic => Rounding::Stochastic { seed: 0x5EED },
            _ => Rounding::Nearest,
        }
    }
}

enum HostWork {
    None,
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostWork {
    fn copy(&mut self, rounding: Rounding) -> WorkingCopy<'_> {
        match self {
            HostWork::None => WorkingCopy::None,
            HostWork::Bf16(b) => WorkingCopy::Bf16 { buf: b, rounding },
            HostWork::F16(b) => WorkingCopy::F16(b),
        }
    }

    fn bits(&self) -> Vec<u16> {
        match self {
            HostWork::None => Vec::new(),
            HostWork::Bf16(b) => b.iter().map(|x| x.to_bits()).collect(),
            HostWork::F16(b) => b.iter().map(|x| x.to_bits()).collect(),
        }
    }
}

enum DevWork {
    None,
    Bf16(DeviceBuffer<bf16>),
    F16(DeviceBuffer<f16>),
}

impl DevWork {
    fn copy(&mut self, mode: Mode) -> WorkingCopyMut<'_> {
        match self {
            DevWork::None => WorkingCopyMut::None,
            DevWork::Bf16(b) => {
                if mode == Mode::Bf16Stochastic {
                    WorkingCopyMut::Bf16Stochastic(b)
                } else {
                    WorkingCopyMut::Bf16(b)
                }
            }
            DevWork::F16(b) => WorkingCopyMut::F16(b),
        }
    }

    fn bits(&self) -> Vec<u16> {
        match self {
            DevWork::None => Vec::new(),
            DevWork::Bf16(b) => b.to_vec().unwrap().iter().map(|x| x.to_bits()).collect(),
            DevWork::F16(b) => b.to_vec().unwrap().iter().map(|x| x.to_bits()).collect(),
        }
    }
}

/// The trainer's CPU path for one rank: optimizer, scaler, clip, parameters.
struct Cpu {
    opt: Optimizer,
    scaler: LossScaler,
    master: Vec<f32>,
    work: HostWork,
    rounding: Rounding,
    grad_clip: f64,
    layout: ParamLayout,
}

/// What one CPU step decided.
struct CpuStep {
    found_inf: bool,
    norm: f64,
    clip: f32,
    scale_used: f32,
}

impl Cpu {
    /// `grads`: scaled gradients (as the backward pass leaves them), consumed.
    fn step(&mut self, step: u64, mut grads: Vec<f32>, lr: f32, inject: &[u64]) -> CpuStep {
        // As `Trainer::train_step` and `ZeroModel::check_gradients` do it.
        NonFiniteInjection::at(inject.iter().copied()).inject(step, &mut grads);
        let inv_scale = self.scaler.inv_scale();
        let found_inf = has_nonfinite(&grads);
        let norm = if found_inf {
            f64::NAN
        } else {
            grad_norm(&grads, inv_scale)
        };
        let clip = if self.grad_clip > 0.0 && !found_inf {
            clip_factor(norm, self.grad_clip)
        } else {
            1.0
        };
        let args = StepArgs {
            lr,
            inv_scale,
            clip_factor: clip,
            found_inf,
            offset: 0,
        };
        let work = self.work.copy(self.rounding);
        self.opt
            .step(&mut self.master, &grads, work, &self.layout, &args)
            .unwrap();
        let u = self.scaler.update(found_inf);
        CpuStep {
            found_inf,
            norm,
            clip,
            scale_used: u.previous_scale,
        }
    }
}

/// Both paths, set up from the same random parameters.
struct Pair {
    dev: Device,
    mode: Mode,
    cpu: Cpu,
    opt: DeviceOptimizer,
    master: DeviceBuffer<f32>,
    grads: DeviceBuffer<f32>,
    work: DevWork,
}

fn pair(test: &str, mode: Mode, grad_clip: f64, seed: u64) -> Pair {
    pair_with(
        test,
        mode,
        grad_clip,
        seed,
        LossScaler::for_precision(mode.precision()),
    )
}

fn pair_with(test: &str, mode: Mode, grad_clip: f64, seed: u64, scaler: LossScaler) -> Pair {
    let dev = test_device(test);
    let layout = layout();
    let n = layout.len();
    let mut rng = Rng::new(seed);
    let master = random(&mut rng, n, 0.05, 1.0);
    let config = OptimizerConfig::AdamW(AdamWConfig::default());
    let rounding = mode.rounding();
    let mut work = match mode.precision() {
        Precision::Fp32 => HostWork::None,
        Precision::Bf16 => HostWork::Bf16(vec![bf16::ZERO; n]),
        Precision::Fp16 => HostWork::F16(vec![f16::ZERO; n]),
    };
    assert!(write_working_copy(&master, work.copy(rounding), 0, 0));
    let cpu = Cpu {
        opt: Optimizer::new(config, n).unwrap(),
        scaler: scaler.clone(),
        master: master.clone(),
        work,
        rounding,
        grad_clip,
        layout: layout.clone(),
    };
    let opt = DeviceOptimizer::new(&dev, &config, &layout, &scaler, grad_clip, rounding).unwrap();
    let dmaster = dev.htod(&master).unwrap();
    let grads = dev.alloc::<f32>(n).unwrap();
    // The working copy starts as NaN: the first step must write every element.
    let work = match mode.precision() {
        Precision::Fp32 => DevWork::None,
        Precision::Bf16 => {
            let mut b = dev.alloc::<bf16>(n).unwrap();
            dev.fill(&mut b, f32::NAN).unwrap();
            DevWork::Bf16(b)
        }
        Precision::Fp16 => {
            let mut b = dev.alloc::<f16>(n).unwrap();
            dev.fill(&mut b, f32::NAN).unwrap();
            DevWork::F16(b)
        }
    };
    Pair {
        dev,
        mode,
        cpu,
        opt,
        master: dmaster,
        grads,
        work,
    }
}

fn lr_at(step: u64) -> f32 {
    // A warmup-like ramp: each step a different learning rate.
    1e-2 * (step + 1) as f32 / STEPS as f32
}

impl Pair {
    /// One step on both paths with the same random unscaled gradients times the current scale.
    fn step(&mut self, step: u64, rng: &mut Rng, inject: &[u64]) -> CpuStep {
        let n = self.master.len();
        let scale = self.cpu.scaler.scale();
        // Unscaled gradients of 0.05..1 in magnitude (norm about 39), times the loss scale
        // (a power of two, so unscaling is exact).
        let grads: Vec<f32> = random(rng, n, 0.05, 1.0)
            .into_iter()
            .map(|g| g * scale)
            .collect();
        self.grads.copy_from_host(&grads).unwrap();
        let c = self.cpu.step(step, grads, lr_at(step), inject);
        self.opt
            .step(
                &mut self.master,
                &mut self.grads,
                self.work.copy(self.mode),
                lr_at(step),
                inject.contains(&step),
            )
            .unwrap();
        c
    }

    fn state(&self) -> StepState {
        self.dev.read_step_state(self.opt.state()).unwrap()
    }

    fn used_state(&self) -> StepState {
        self.dev.read_step_state(self.opt.used_state()).unwrap()
    }

    fn host(&self) -> HostOptimizerState {
        self.opt.to_host(&self.master).unwrap()
    }

    /// Bitwise comparison of every buffer and of the scaler with the CPU path.
    fn assert_exact(&self, what: &str) {
        let h = self.host();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let first_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(x, y)| x != y);
        assert_eq!(
            bits(&h.master),
            bits(&self.cpu.master),
            "{what}: master differs first at {:?}",
            first_diff(&h.master, &self.cpu.master)
        );
        let (hb, cb) = (h.optimizer.buffers(), self.cpu.opt.buffers());
        for ((name, d), (_, c)) in hb.iter().zip(&cb) {
            assert_eq!(
                bits(d),
                bits(c),
                "{what}: {name} differs first at {:?}",
                first_diff(d, c)
            );
        }
        assert_eq!(
            self.work.bits(),
            self.cpu.work.bits(),
            "{what}: working copy"
        );
        assert_eq!(
            h.optimizer.step_count(),
            self.cpu.opt.step_count(),
            "{what}"
        );
        assert_eq!(h.scaler, self.cpu.scaler, "{what}: scaler");
    }

    /// Relative Frobenius comparison (clipped runs; see the module doc).
    fn assert_close(&self, what: &str) {
        let h = self.host();
        let rel = |d: &[f32], c: &[f32]| {
            let num: f64 = d
                .iter()
                .zip(c)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum();
            let den: f64 = c.iter().map(|&y| (y as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        let e = rel(&h.master, &self.cpu.master);
        assert!(e < CLIPPED_REL, "{what}: master rel error {e}");
        for ((name, d), (_, c)) in h.optimizer.buffers().iter().zip(&self.cpu.opt.buffers()) {
            let e = rel(d, c);
            assert!(e < CLIPPED_REL, "{what}: {name} rel error {e}");
        }
        assert_eq!(
            h.optimizer.step_count(),
            self.cpu.opt.step_count(),
            "{what}"
        );
        assert_eq!(h.scaler, self.cpu.scaler, "{what}: scaler");
    }

    fn assert_grads_zeroed(&self, what: &str) {
        let g = self.grads.to_vec().unwrap();
        assert!(
            g.iter().all(|&x| x.to_bits() == 0),
            "{what}: gradients not zeroed"
        );
    }
}

fn assert_norm(what: &str, device: f32, cpu: f64) {
    let e = (device as f64 - cpu).abs() / cpu;
    assert!(
        e <= NORM_REL,
        "{what}: grad norm {device} vs CPU {cpu} (rel {e})"
    );
}

/// Six steps, compared after each one.
fn run(test: &str, mode: Mode, grad_clip: f64, expect_clipping: bool) {
    let mut p = pair(test, mode, grad_clip, 11);
    let mut rng = Rng::new(12);
    for k in 0..STEPS {
        let c = p.step(k, &mut rng, &[]);
        let what = format!("{mode:?} step {k}");
        let used = p.used_state();
        assert!(!used.found_inf && !c.found_inf, "{what}");
        assert_eq!(used.scale, c.scale_used, "{what}: scale used");
        assert_norm(&what, used.grad_norm, c.norm);
        if expect_clipping {
            assert!(
                c.clip < 1.0,
                "{what}: clipping should be active (norm {})",
                c.norm
            );
            let e = (used.clip as f64 - c.clip as f64).abs() / c.clip as f64;
            assert!(
                e <= NORM_REL,
                "{what}: clip {} vs CPU {}",
                used.clip,
                c.clip
            );
            p.assert_close(&what);
        } else {
            assert_eq!(used.clip, 1.0, "{what}");
            assert_eq!(c.clip, 1.0, "{what}");
            p.assert_exact(&what);
        }
        let st = p.state();
        assert_eq!(st.step as u64, k + 1, "{what}: applied steps");
        assert_eq!(st.skipped, 0, "{what}");
        p.assert_grads_zeroed(&what);
    }
}

#[test]
fn fp32_with_active_clipping_matches_cpu() {
    run(
        "fp32_with_active_clipping_matches_cpu",
        Mode::Fp32,
        1.0,
        true,
    );
}

#[test]
fn bf16_nearest_matches_cpu_bit_for_bit() {
    run(
        "bf16_nearest_matches_cpu_bit_for_bit",
        Mode::Bf16Nearest,
        0.0,
        false,
    );
}

#[test]
fn bf16_stochastic_matches_cpu_bit_for_bit() {
    run(
        "bf16_stochastic_matches_cpu_bit_for_bit",
        Mode::Bf16Stochastic,
        0.0,
        false,
    );
}

#[test]
fn fp16_scaled_matches_cpu_bit_for_bit() {
    // Clipping enabled but above the norm (about 39): the factor is exactly 1 on both paths.
    run(
        "fp16_scaled_matches_cpu_bit_for_bit",
        Mode::Fp16,
        1000.0,
        false,
    );
}

#[test]
fn an_offloaded_step_is_the_fused_step_bit_for_bit_with_clipping_and_skips() {
    // `--offload-optimizer` on a device: the device queues the check, norm, clip and scale
    // update and copies the gradients down; the host's optimizer updates with the device's
    // `1/scale` and clip factor. Against the fused device step on the same gradients, with
    // clipping active (norms about 39 against 1) and an injected non-finite step: the same
    // bits everywhere, the step state word for word.
    let inject = [2u64];
    for mode in [Mode::Fp16, Mode::Bf16Stochastic, Mode::Fp32] {
        let mut p = pair("offloaded_step", mode, 1.0, 31);
        let layout = layout();
        let n = layout.len();
        let dtype = match mode.precision() {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        };
        let config = OptimizerConfig::AdamW(AdamWConfig::default());
        let mut host = HostOptimizer::new(config, p.cpu.master.clone(), dtype).unwrap();
        host.release_staging();
        let scaler = p.cpu.scaler.clone();
        let mut off =
            DeviceOptimizer::offloaded(&p.dev, host.optimizer(), &layout, 0..n, &scaler, 1.0)
                .unwrap();
        assert!(off.is_offloaded() && off.config().is_none());
        let mut staging = OffloadStaging::new(&p.dev, n, dtype).unwrap();
        // Pinned: the f32 gradients, and a 16-bit working copy (fp32: the master goes up).
        let half = if dtype == DType::F32 { 0 } else { 2 };
        assert_eq!(staging.bytes(), (4 + half) * n as u64);
        let mut grads = p.dev.alloc::<f32>(n).unwrap();
        // The new weights land here (poisoned: the first step must write every element).
        let mut w32 = p.dev.alloc::<f32>(n).unwrap();
        let mut w16 = p.dev.alloc::<f16>(n).unwrap();
        let mut wb16 = p.dev.alloc::<bf16>(n).unwrap();
        p.dev.fill(&mut w32, f32::NAN).unwrap();
        p.dev.fill(&mut w16, f32::NAN).unwrap();
        p.dev.fill(&mut wb16, f32::NAN).unwrap();
        let (mut rng, mut rng_off) = (Rng::new(32), Rng::new(32));
        for k in 0..STEPS {
            let scale = p.cpu.scaler.scale();
            let g: Vec<f32> = random(&mut rng_off, n, 0.05, 1.0)
                .into_iter()
                .map(|g| g * scale)
                .collect();
            p.step(k, &mut rng, &inject);
            grads.copy_from_host(&g).unwrap();
            off.step_offloaded(
                &mut grads,
                OffloadGrads::Whole,
                staging.grads_mut(),
                inject.contains(&k),
            )
            .unwrap();
            let used = p.dev.read_step_state(off.used_state()).unwrap();
            let what = format!("{mode:?} step {k}");
            assert_eq!(used, p.used_state(), "{what}: the state the step used");
            let dst = match dtype {
                DType::F32 => WeightsMut::F32(&mut w32),
                DType::BF16 => WeightsMut::Bf16(&mut wb16),
                _ => WeightsMut::F16(&mut w16),
            };
            staging
                .update(&mut host, &used, lr_at(k), 0, mode.rounding(), &layout, dst)
                .unwrap();
            let resident = p.host();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(host.master()),
                bits(&resident.master),
                "{what}: master"
            );
            for ((name, a), (_, b)) in host
                .optimizer()
                .buffers()
                .iter()
                .zip(resident.optimizer.buffers())
            {
                assert_eq!(bits(a), bits(b), "{what}: {name}");
            }
            assert_eq!(
                host.optimizer().step_count(),
                resident.optimizer.step_count()
            );
            let (sc, applied) = off.host_scaler().unwrap();
            assert_eq!(
                (sc, applied),
                (resident.scaler, resident.optimizer.step_count())
            );
            let up = match dtype {
                DType::F32 => bits(&w32.to_vec().unwrap())
                    .iter()
                    .map(|&b| b as u64)
                    .collect(),
                DType::BF16 => wb16
                    .to_vec()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect(),
                _ => w16
                    .to_vec()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect::<Vec<_>>(),
            };
            let want: Vec<u64> = match dtype {
                DType::F32 => bits(&resident.master).iter().map(|&b| b as u64).collect(),
                _ => p.work.bits().iter().map(|&b| b as u64).collect(),
            };
            assert_eq!(up, want, "{what}: the weights copied back");
            assert!(
                grads.to_vec().unwrap().iter().all(|&x| x.to_bits() == 0),
                "{what}: gradients not zeroed"
            );
        }
        assert_eq!(off.host_scaler().unwrap().0.skipped_steps(), 1);
    }
}

#[test]
fn fp16_injected_nonfinite_steps_are_skipped_and_back_off() {
    let mut p = pair("fp16_injected_nonfinite", Mode::Fp16, 0.0, 21);
    let mut rng = Rng::new(22);
    let inject = [1u64, 2];
    let mut readback = StepReadback::new(&p.dev).unwrap();
    let mut loss = p.dev.alloc::<f32>(1).unwrap();
    let mut reports: Vec<StepReport> = Vec::new();
    let mut after_first: Option<HostOptimizerState> = None;
    let want_scale = [65536.0f32, 65536.0, 32768.0, 16384.0, 16384.0, 16384.0];
    for k in 0..STEPS {
        assert_eq!(
            p.cpu.scaler.scale(),
            want_scale[k as usize],
            "CPU scale at {k}"
        );
        let c = p.step(k, &mut rng, &inject);
        loss.copy_from_host(&[2.5 + k as f32]).unwrap();
        readback.record(&p.opt, &loss).unwrap();
        // Step k's numbers appear only once step k + 1 was recorded.
        match readback.previous().unwrap() {
            None => assert_eq!(k, 0, "a report should be ready after step {k}"),
            Some(r) => {
                assert_eq!(r.step, k - 1);
                reports.push(r);
            }
        }
        assert_eq!(readback.previous().unwrap(), None, "one report per step");
        let what = format!("fp16 inject step {k}");
        assert_eq!(c.found_inf, inject.contains(&k), "{what}");
        assert_eq!(p.used_state().scale, want_scale[k as usize], "{what}");
        p.assert_exact(&what);
        p.assert_grads_zeroed(&what);
        let h = p.host();
        match k {
            0 => after_first = Some(h),
            1 | 2 => {
                // Skipped: master, moments and step count as after step 0.
                let a = after_first.as_ref().unwrap();
                assert_eq!(h.master, a.master, "{what}: master changed");
                assert_eq!(h.optimizer, a.optimizer, "{what}: moments changed");
            }
            _ => {}
        }
    }
    let rest = readback.finish().unwrap();
    assert_eq!(rest.len(), 1, "finish drains the last step");
    reports.extend(rest);
    assert_eq!(readback.finish().unwrap(), Vec::new());
    assert_eq!(reports.len(), STEPS as usize);
    for (k, r) in reports.iter().enumerate() {
        let skipped = inject.contains(&(k as u64));
        assert_eq!(r.step, k as u64);
        assert_eq!(r.loss, 2.5 + k as f32, "step {k} loss");
        assert_eq!(r.scale, want_scale[k], "step {k} scale used");
        assert_eq!(r.skipped, skipped, "step {k}");
        assert_eq!(r.found_inf, skipped, "step {k}");
        assert_eq!(r.grad_norm.is_finite(), !skipped, "step {k}");
        let next = want_scale.get(k + 1).copied().unwrap_or(16384.0);
        assert_eq!(r.next_scale, next, "step {k} next scale");
    }
    assert_eq!(reports[5].skipped_total, 2);
    assert_eq!(reports[5].applied_total, 4);
    assert_eq!(p.cpu.scaler.skipped_steps(), 2);
    assert_eq!(p.cpu.opt.step_count(), 4);
}

#[test]
fn the_device_scale_stops_at_the_host_scalers_floor() {
    // From a scale of 4, four non-finite steps in a row: the host scaler backs off to
    // min(MIN_SCALE, init_scale) = 1 and stays there; the device's update does the same.
    let scaler = LossScaler::new(ScalerConfig {
        init_scale: 4.0,
        ..ScalerConfig::default()
    })
    .unwrap();
    let mut p = pair_with("scale_floor", Mode::Fp16, 0.0, 71, scaler);
    let mut rng = Rng::new(72);
    // Step 0 is clean (it writes the working copy, which starts as NaN), then four skips.
    let inject = [1u64, 2, 3, 4];
    let mut used = Vec::new();
    for k in 0..6 {
        let cpu_scale = p.cpu.scaler.scale();
        p.step(k, &mut rng, &inject);
        used.push(p.used_state().scale);
        assert_eq!(p.used_state().scale, cpu_scale, "scale used at step {k}");
        p.assert_exact(&format!("floor step {k}"));
    }
    assert_eq!(used, vec![4.0, 4.0, 2.0, 1.0, 1.0, 1.0]);
    assert_eq!(p.host().scaler.scale(), 1.0);
}

#[test]
fn to_host_and_from_host_round_trip_bit_for_bit() {
    let mut p = pair("round_trip", Mode::Bf16Stochastic, 0.0, 31);
    let mut rng = Rng::new(32);
    for k in 0..3 {
        p.step(k, &mut rng, &[]);
    }
    let h = p.host();
    // The checkpoint types are the CPU path's, with the CPU path's values.
    assert_eq!(h.optimizer, p.cpu.opt);
    assert_eq!(h.scaler, p.cpu.scaler);
    assert_eq!(h.master, p.cpu.master);
    let layout = layout();
    let mut master2 = p.dev.alloc::<f32>(layout.len()).unwrap();
    p.dev.fill(&mut master2, f32::NAN).unwrap();
    let mut opt2 = DeviceOptimizer::from_host(
        &p.dev,
        &h,
        &layout,
        0.0,
        Mode::Bf16Stochastic.rounding(),
        &mut master2,
    )
    .unwrap();
    let h2 = opt2.to_host(&master2).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&h2.master), bits(&h.master));
    for ((_, a), (_, b)) in h2.optimizer.buffers().iter().zip(&h.optimizer.buffers()) {
        assert_eq!(bits(a), bits(b));
    }
    assert_eq!(h2.optimizer.state(), h.optimizer.state());
    assert_eq!(h2.scaler, h.scaler);
    // The rebuilt optimizer continues exactly like the original.
    let g = random(&mut rng, layout.len(), 0.05, 1.0);
    let mut w2 = p.dev.alloc::<bf16>(layout.len()).unwrap();
    let mut g2 = p.dev.htod(&g).unwrap();
    p.grads.copy_from_host(&g).unwrap();
    p.opt
        .step(
            &mut p.master,
            &mut p.grads,
            p.work.copy(p.mode),
            1e-3,
            false,
        )
        .unwrap();
    opt2.step(
        &mut master2,
        &mut g2,
        WorkingCopyMut::Bf16Stochastic(&mut w2),
        1e-3,
        false,
    )
    .unwrap();
    let (a, b) = (p.host(), opt2.to_host(&master2).unwrap());
    assert_eq!(bits(&a.master), bits(&b.master));
    assert_eq!(a.optimizer, b.optimizer);
    assert_eq!(a.scaler, b.scaler);
    assert_eq!(p.work.bits(), DevWork::Bf16(w2).bits());
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let dev = test_device("bad_inputs");
    let layout = layout();
    let n = layout.len();
    let scaler = LossScaler::for_precision(Precision::Bf16);
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    let e = DeviceOptimizer::new(&dev, &sgd, &layout, &scaler, 0.0, Rounding::Nearest).unwrap_err();
    assert!(format!("{e:#}").contains("AdamW only"), "{e:#}");
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let e =
        DeviceOptimizer::new(&dev, &adamw, &layout, &scaler, -1.0, Rounding::Nearest).unwrap_err();
    assert!(format!("{e:#}").contains("--grad-clip"), "{e:#}");
    let mut opt =
        DeviceOptimizer::new(&dev, &adamw, &layout, &scaler, 0.0, Rounding::Nearest).unwrap();
    let mut master = dev.alloc::<f32>(n).unwrap();
    let mut short = dev.alloc::<f32>(n - 1).unwrap();
    let e = opt
        .step(&mut master, &mut short, WorkingCopyMut::None, 1e-3, false)
        .unwrap_err();
    assert!(format!("{e:#}").contains("gradients have"), "{e:#}");
    let mut grads = dev.alloc::<f32>(n).unwrap();
    let mut w = dev.alloc::<bf16>(n).unwrap();
    let e = opt
        .step(
            &mut master,
            &mut grads,
            WorkingCopyMut::Bf16Stochastic(&mut w),
            1e-3,
            false,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("stochastic"), "{e:#}");
    let e = opt
        .step(
            &mut master,
            &mut grads,
            WorkingCopyMut::None,
            f32::NAN,
            false,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("learning rate"), "{e:#}");
    let e = opt.to_host(&short).unwrap_err();
    assert!(format!("{e:#}").contains("master"), "{e:#}");
    let mut rb = StepReadback::new(&dev).unwrap();
    let two = dev.alloc::<f32>(2).unwrap();
    let e = rb.record(&opt, &two).unwrap_err();
    assert!(format!("{e:#}").contains("loss buffer"), "{e:#}");
    let mut batch = DeviceBatch::new(&dev, 8).unwrap();
    let e = batch.upload(&[1; 8], &[2; 7]).unwrap_err();
    assert!(format!("{e:#}").contains("B*T"), "{e:#}");
}

#[test]
fn device_batch_uploads_what_was_given() {
    let dev = test_device("device_batch_uploads");
    let (b, t) = (3, 17);
    let mut batch = DeviceBatch::new(&dev, b * t).unwrap();
    assert_eq!(batch.len(), b * t);
    let mut rng = Rng::new(41);
    // More batches than slots, so both slots are reused.
    for k in 0..5 {
        let inputs: Vec<u32> = (0..b * t).map(|_| rng.next_u32() % 50257).collect();
        let targets: Vec<u32> = (0..b * t).map(|_| rng.next_u32() % 50257 + k).collect();
        let (di, dt) = batch.upload(&inputs, &targets).unwrap();
        assert_eq!(di.to_vec().unwrap(), inputs, "batch {k} inputs");
        assert_eq!(dt.to_vec().unwrap(), targets, "batch {k} targets");
    }
}

#[test]
fn resumes_from_the_cpu_path_mid_run() {
    // Three CPU steps (one of them skipped: scale 32768, growth tracker 1, one skip), then the
    // device takes over from the CPU state and both continue for three steps.
    let mut p = pair("resume_from_cpu", Mode::Fp16, 0.0, 51);
    let mut rng = Rng::new(52);
    let n = p.master.len();
    for k in 0..3 {
        let scale = p.cpu.scaler.scale();
        let g: Vec<f32> = random(&mut rng, n, 0.05, 1.0)
            .into_iter()
            .map(|g| g * scale)
            .collect();
        p.cpu.step(k, g, lr_at(k), &[1]);
    }
    assert_eq!(p.cpu.scaler.scale(), 32768.0);
    assert_eq!(p.cpu.scaler.growth_tracker(), 1);
    assert_eq!(p.cpu.scaler.skipped_steps(), 1);
    let host = HostOptimizerState {
        master: p.cpu.master.clone(),
        optimizer: p.cpu.opt.clone(),
        scaler: p.cpu.scaler.clone(),
    };
    p.dev.fill(&mut p.master, f32::NAN).unwrap();
    p.opt = DeviceOptimizer::from_host(
        &p.dev,
        &host,
        &layout(),
        0.0,
        Rounding::Nearest,
        &mut p.master,
    )
    .unwrap();
    assert_eq!(p.host(), host);
    for k in 3..STEPS {
        p.step(k, &mut rng, &[]);
        p.assert_exact(&format!("resumed step {k}"));
    }
    assert_eq!(p.state().growth_tracker, 4);
}

#[test]
fn readback_keeps_reports_when_the_host_falls_behind() {
    let mut p = pair("readback_behind", Mode::Bf16Nearest, 0.0, 61);
    let mut rng = Rng::new(62);
    let mut rb = StepReadback::new(&p.dev).unwrap();
    let mut loss = p.dev.alloc::<f32>(1).unwrap();
    // Three steps recorded before any read: the first slot is reused, its report kept.
    for k in 0..3 {
        p.step(k, &mut rng, &[]);
        loss.copy_from_host(&[k as f32]).unwrap();
        rb.record(&p.opt, &loss).unwrap();
    }
    let a = rb.previous().unwrap().unwrap();
    let b = rb.previous().unwrap().unwrap();
    assert_eq!((a.step, a.loss, a.applied_total), (0, 0.0, 1));
    assert_eq!((b.step, b.loss, b.applied_total), (1, 1.0, 2));
    assert_eq!(rb.previous().unwrap(), None);
    let last = rb.finish().unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        (last[0].step, last[0].loss, last[0].applied_total),
        (2, 2.0, 3)
    );
    assert_eq!((last[0].scale, last[0].next_scale), (1.0, 1.0));
}
