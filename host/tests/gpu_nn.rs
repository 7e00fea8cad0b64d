//! The memory-bound training kernels (`lathe_kernels::nn`) against their CPU twins on the GPU:
//! fresh random inputs (never zeros), outputs poisoned with NaN before each launch, awkward
//! shapes (ragged around the vector width, the warp and the block; several rows per block;
//! shared memory past 48 KiB), both dtype families, and bit-for-bit repeatability. Where the
//! kernel and the twin perform the same f32 operations in the same order (AdamW, the
//! layernorm weight/bias gradients, the embedding gradients, the unscale) the comparison is
//! exact. Skips without a GPU; fails instead with `LATHE_REQUIRE_GPU=1`.

use half::{bf16, f16};
use lathe_host::nn_ops::{AdamWLaunch, ClassifierShape, FlashShape, WorkingCopyMut};
use lathe_host::testing::{AWKWARD_SIZES, test_device};
use lathe_host::{Device, DeviceBuffer, DeviceElem, KernelArg};
use lathe_kernels::Problem;
use lathe_kernels::elementwise::twin::Float;
use lathe_kernels::nn::adamw::twin::{Hyper, WorkingMut};
use lathe_kernels::nn::adamw::{self, DecayRanges, Working};
use lathe_kernels::nn::amp::{self, ScalerRule, StepState};
use lathe_kernels::nn::{attention, classifier, embedding, flash, layernorm, pointwise};
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

fn poisoned<T: DeviceElem + Float>(dev: &Device, n: usize) -> DeviceBuffer<T> {
    dev.htod(&vec![T::from_f32(f32::NAN); n])
        .expect("poisoned buffer")
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn close<T: Float>(what: &str, got: &[T], want: &[T], tol: f64) {
    if let Err(e) = check_close(what, &f64s(got), &f64s(want), tol) {
        panic!("{e}");
    }
}

/// Bit-for-bit equality, reporting the first difference.
fn exact<T: Float>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f32(), w.to_f32());
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i} is {g:e}, the twin's {w:e} (bit-exact contract)"
        );
    }
}

#[test]
fn grad_check_norm_unscale_and_scaler_update() {
    let dev = test_device("grad_check_norm_unscale_and_scaler_update");
    let mut rng = Rng::new(0xA3);
    for &n in AWKWARD_SIZES.iter().chain(&[4_000_037usize]) {
        for bad in [None, Some((n / 2, f32::NAN)), Some((n - 1, f32::INFINITY))] {
            let mut g = rng.vec_f32(n, -3.0, 3.0);
            if let Some((k, x)) = bad {
                g[k] = x;
            }
            let (found, sq) = amp::twin::check_norm(&g, 1.0 / 1024.0);
            for unscale in [false, true] {
                let mut dg = dev.htod(&g).unwrap();
                let mut st = dev.step_state(&StepState::new(1024.0)).unwrap();
                if unscale {
                    dev.grad_unscale_check_norm(&mut dg, &mut st, 1.0).unwrap();
                } else {
                    dev.grad_check_norm(&dg, &mut st, 1.0).unwrap();
                }
                let s = dev.read_step_state(&st).unwrap();
                let what = format!("n={n} bad={bad:?} unscale={unscale}");
                assert_eq!(s.found_inf, found, "{what}: found_inf");
                if !found {
                    let want = sq.sqrt();
                    let err = (s.grad_norm as f64 - want).abs() / want;
                    assert!(err < 1e-5, "{what}: norm {} vs {want}", s.grad_norm);
                }
                assert_eq!(
                    s.clip,
                    amp::twin::clip_factor(s.grad_norm, 1.0),
                    "{what}: clip"
                );
                let want_g: Vec<f32> = if unscale {
                    g.iter().map(|x| x * (1.0 / 1024.0)).collect()
                } else {
                    g.clone()
                };
                exact(&what, &dg.to_vec().unwrap(), &want_g);
                // Deterministic: the same input gives the same norm bits.
                let mut st2 = dev.step_state(&StepState::new(1024.0)).unwrap();
                dev.grad_check_norm(&dev.htod(&g).unwrap(), &mut st2, 1.0)
                    .unwrap();
                let s2 = dev.read_step_state(&st2).unwrap();
                assert_eq!(
                    s2.grad_norm.to_bits(),
                    s.grad_norm.to_bits(),
                    "{what}: repeat"
                );
            }
        }
    }
    // The scaler update, step after step on the device, against the twin.
    let rule = ScalerRule {
        growth_interval: 3,
        ..ScalerRule::default()
    };
    let mut host = StepState::new(65536.0);
    let mut st = dev.step_state(&host).unwrap();
    for found in [false, false, false, true, false, false, true, true, false] {
        let g = vec![if found { f32::NAN } else { 0.5 }; 1000];
        dev.grad_check_norm(&dev.htod(&g).unwrap(), &mut st, 0.0)
            .unwrap();
        dev.amp_update(&mut st, &rule).unwrap();
        host.found_inf = found;
        amp::twin::update(&mut host, &rule);
        let got = dev.read_step_state(&st).unwrap();
        assert_eq!(
            (
                got.scale,
                got.inv_scale,
                got.growth_tracker,
                got.step,
                got.skipped
            ),
            (
                host.scale,
                host.inv_scale,
                host.growth_tracker,
                host.step,
                host.skipped
            )
        );
        assert_eq!((got.found_inf, got.last_found_inf), (false, found));
    }
}

struct AdamCase {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

fn adam_case(rng: &mut Rng, n: usize) -> AdamCase {
    AdamCase {
        p: rng.vec_f32(n, -1.0, 1.0),
        g: rng.vec_f32(n, -4.0, 4.0),
        m: rng.vec_f32(n, -0.1, 0.1),
        v: rng.vec_f32(n, 1e-6, 0.01),
    }
}

const HYPER: Hyper = Hyper {
    lr: 3e-3,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

fn launch_of(offset: u64, unscale: bool) -> AdamWLaunch {
    AdamWLaunch {
        lr: HYPER.lr,
        beta1: HYPER.beta1,
        beta2: HYPER.beta2,
        eps: HYPER.eps,
        weight_decay: HYPER.weight_decay,
        offset,
        seed: 0x5EED,
        unscale,
    }
}

#[test]
fn adamw_matches_twin_bit_for_bit() {
    let dev = test_device("adamw_matches_twin_bit_for_bit");
    let mut rng = Rng::new(0xADA);
    let offset = 1000u64;
    for w in [
        Working::None,
        Working::Bf16,
        Working::Bf16Stochastic,
        Working::F16,
    ] {
        for &n in AWKWARD_SIZES {
            let n64 = n as u64;
            let ranges = DecayRanges::merged([
                offset..offset + n64 / 3 + 1,
                offset + n64 / 2 + 1..offset + n64 / 2 + 2,
                offset + n64 - n64 / 5..offset + n64,
            ])
            .unwrap();
            let dr = dev.upload_decay_ranges(&ranges).unwrap();
            let c = adam_case(&mut rng, n);
            let mut state = StepState::new(8.0);
            state.step = 41;
            state.clip = 0.75;
            for found in [false, true] {
                state.found_inf = found;
                let ds = dev.step_state(&state).unwrap();
                let (mut dp, dg) = (dev.htod(&c.p).unwrap(), dev.htod(&c.g).unwrap());
                let (mut dm, mut dv) = (dev.htod(&c.m).unwrap(), dev.htod(&c.v).unwrap());
                let mut wb = poisoned::<bf16>(&dev, n);
                let mut wh = poisoned::<f16>(&dev, n);
                let working = match w {
                    Working::None => WorkingCopyMut::None,
                    Working::Bf16 => WorkingCopyMut::Bf16(&mut wb),
                    Working::Bf16Stochastic => WorkingCopyMut::Bf16Stochastic(&mut wb),
                    Working::F16 => WorkingCopyMut::F16(&mut wh),
                };
                let l = launch_of(offset, true);
                dev.adamw_step(&mut dp, &dg, &mut dm, &mut dv, working, &dr, &ds, &l)
                    .unwrap();
                let (mut p, mut m, mut v) = (c.p.clone(), c.m.clone(), c.v.clone());
                let mut hb = vec![bf16::from_f32(f32::NAN); n];
                let mut hh = vec![f16::from_f32(f32::NAN); n];
                let hw = match w {
                    Working::None => WorkingMut::None,
                    Working::Bf16 => WorkingMut::Bf16(&mut hb),
                    Working::Bf16Stochastic => WorkingMut::Bf16Stochastic(&mut hb),
                    Working::F16 => WorkingMut::F16(&mut hh),
                };
                adamw::twin::step(
                    &mut p, &c.g, &mut m, &mut v, hw, &ranges, &state, offset, 0x5EED, &HYPER, true,
                );
                let what = format!("adamw {w:?} n={n} found_inf={found}");
                exact(&format!("{what} master"), &dp.to_vec().unwrap(), &p);
                exact(&format!("{what} m"), &dm.to_vec().unwrap(), &m);
                exact(&format!("{what} v"), &dv.to_vec().unwrap(), &v);
                match w {
                    Working::None => {}
                    Working::F16 => exact(&format!("{what} working"), &wh.to_vec().unwrap(), &hh),
                    _ => exact(&format!("{what} working"), &wb.to_vec().unwrap(), &hb),
                }
            }
        }
    }
}

#[test]
fn adamw_scalar_path_on_misaligned_buffers() {
    let dev = test_device("adamw_scalar_path_on_misaligned_buffers");
    let mut rng = Rng::new(0x51);
    let n = 4099;
    let c = adam_case(&mut rng, n + 1);
    let ranges = DecayRanges::new(std::iter::once(7..2000).collect()).unwrap();
    let dr = dev.htod(&ranges.words()).unwrap();
    let state = StepState::new(1.0);
    let ds = dev.step_state(&state).unwrap();
    let (mut dp, dg) = (dev.htod(&c.p).unwrap(), dev.htod(&c.g).unwrap());
    let (mut dm, mut dv) = (dev.htod(&c.m).unwrap(), dev.htod(&c.v).unwrap());
    let mut dw = poisoned::<bf16>(&dev, n + 1);
    let one = |b: KernelArg| match b {
        KernelArg::Ptr {
            addr,
            elem,
            len,
            writable,
        } => KernelArg::Ptr {
            addr: addr + elem.size() as u64,
            elem,
            len: len - 1,
            writable,
        },
        other => other,
    };
    let args = [
        one(dp.arg_mut()),
        one(dg.arg()),
        one(dm.arg_mut()),
        one(dv.arg_mut()),
        one(dw.arg_mut()),
        dr.arg(),
        KernelArg::U32(ranges.count()),
        ds.arg(),
        KernelArg::U64(n as u64),
        KernelArg::U64(0),
        KernelArg::U64(0),
        KernelArg::F32(HYPER.lr),
        KernelArg::F32(HYPER.beta1),
        KernelArg::F32(HYPER.beta2),
        KernelArg::F32(HYPER.eps),
        KernelArg::F32(HYPER.weight_decay),
        KernelArg::U32(1),
    ];
    let k = adamw::kernel_for(Working::Bf16);
    dev.launch(k, &Problem::elems(n as u64), &args, dev.compute_stream())
        .unwrap();
    let (mut p, mut m, mut v) = (c.p.clone(), c.m.clone(), c.v.clone());
    let mut hb = vec![bf16::from_f32(f32::NAN); n + 1];
    adamw::twin::step(
        &mut p[1..],
        &c.g[1..],
        &mut m[1..],
        &mut v[1..],
        WorkingMut::Bf16(&mut hb[1..]),
        &ranges,
        &state,
        0,
        0,
        &HYPER,
        true,
    );
    exact("misaligned master", &dp.to_vec().unwrap(), &p);
    exact("misaligned m", &dm.to_vec().unwrap(), &m);
    exact("misaligned v", &dv.to_vec().unwrap(), &v);
    let w = dw.to_vec().unwrap();
    assert!(w[0].is_nan(), "wrote before its range");
    exact("misaligned working", &w[1..], &hb[1..]);
}

/// Several steps on the device with no host read in between (check, AdamW, update), one of
/// them overflowing, against the same sequence on the host: bit for bit (clipping off, so
/// no f32-vs-f64 norm enters the update).
#[test]
fn device_step_sequence_matches_host_sequence() {
    let dev = test_device("device_step_sequence_matches_host_sequence");
    let mut rng = Rng::new(0x5E9);
    let n = 100_003;
    let c = adam_case(&mut rng, n);
    let ranges = DecayRanges::all(n as u64);
    let dr = dev.upload_decay_ranges(&ranges).unwrap();
    let rule = ScalerRule {
        growth_interval: 2,
        ..ScalerRule::default()
    };
    let mut host = StepState::new(1024.0);
    let mut st = dev.step_state(&host).unwrap();
    let (mut dp, mut dm, mut dv) = (
        dev.htod(&c.p).unwrap(),
        dev.htod(&c.m).unwrap(),
        dev.htod(&c.v).unwrap(),
    );
    let mut dw = poisoned::<bf16>(&dev, n);
    let (mut p, mut m, mut v) = (c.p.clone(), c.m.clone(), c.v.clone());
    let mut hw = vec![bf16::ZERO; n];
    for k in 0..6 {
        let mut g: Vec<f32> = rng.vec_f32(n, -2000.0, 2000.0);
        if k == 3 {
            g[n / 3] = f32::INFINITY;
        }
        let dg = dev.htod(&g).unwrap();
        dev.grad_check_norm(&dg, &mut st, 0.0).unwrap();
        let l = launch_of(0, true);
        dev.adamw_step(
            &mut dp,
            &dg,
            &mut dm,
            &mut dv,
            WorkingCopyMut::Bf16Stochastic(&mut dw),
            &dr,
            &st,
            &l,
        )
        .unwrap();
        dev.amp_update(&mut st, &rule).unwrap();
        host.found_inf = amp::twin::check_norm(&g, host.inv_scale).0;
        adamw::twin::step(
            &mut p,
            &g,
            &mut m,
            &mut v,
            WorkingMut::Bf16Stochastic(&mut hw),
            &ranges,
            &host,
            0,
            0x5EED,
            &HYPER,
            true,
        );
        amp::twin::update(&mut host, &rule);
    }
    exact("sequence master", &dp.to_vec().unwrap(), &p);
    exact("sequence m", &dm.to_vec().unwrap(), &m);
    exact("sequence v", &dv.to_vec().unwrap(), &v);
    exact("sequence working", &dw.to_vec().unwrap(), &hw);
    let s = dev.read_step_state(&st).unwrap();
    assert_eq!(
        (s.step, s.skipped, s.scale),
        (host.step, host.skipped, host.scale)
    );
}

fn layernorm_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, rows: usize, c: usize) {
    let x: Vec<T> = random(rng, rows * c, -2.0, 3.0);
    let w: Vec<T> = random(rng, c, 0.5, 1.5);
    let b: Vec<T> = random(rng, c, -0.5, 0.5);
    let dout: Vec<T> = random(rng, rows * c, -1.0, 1.0);
    let (dw0, db0) = (rng.vec_f32(c, -1.0, 1.0), rng.vec_f32(c, -1.0, 1.0));
    let (dx_, dw_, db_) = (
        dev.htod(&x).unwrap(),
        dev.htod(&w).unwrap(),
        dev.htod(&b).unwrap(),
    );
    let mut out = poisoned::<T>(dev, rows * c);
    let mut mean = poisoned::<f32>(dev, rows);
    let mut rstd = poisoned::<f32>(dev, rows);
    dev.layernorm_forward(&dx_, &dw_, &db_, &mut out, &mut mean, &mut rstd, c, 1e-5)
        .unwrap();
    let what = format!("layernorm {} rows={rows} c={c}", T::ELEM.name());
    let mut o = vec![T::from_f32(0.0); rows * c];
    let (mut m, mut r) = (vec![0f32; rows], vec![0f32; rows]);
    layernorm::twin::forward(&x, &w, &b, &mut o, &mut m, &mut r, c, 1e-5);
    let tol = rel_tolerance(T::ELEM);
    close(&format!("{what} out"), &out.to_vec().unwrap(), &o, tol);
    let (gm, gr) = (mean.to_vec().unwrap(), rstd.to_vec().unwrap());
    close(&format!("{what} mean"), &gm, &m, 1e-5);
    close(&format!("{what} rstd"), &gr, &r, 1e-5);
    let dd = dev.htod(&dout).unwrap();
    let mut dx = poisoned::<T>(dev, rows * c);
    let (mut gdw, mut gdb) = (dev.htod(&dw0).unwrap(), dev.htod(&db0).unwrap());
    dev.layernorm_backward(
        &dd, &dx_, &dw_, &mean, &rstd, &mut dx, &mut gdw, &mut gdb, c,
    )
    .unwrap();
    let mut tdx = vec![T::from_f32(0.0); rows * c];
    let (mut tw, mut tb) = (dw0.clone(), db0.clone());
    layernorm::twin::backward(&dout, &x, &w, &gm, &gr, &mut tdx, &mut tw, &mut tb, c);
    close(&format!("{what} dx"), &dx.to_vec().unwrap(), &tdx, tol);
    exact(&format!("{what} dweight"), &gdw.to_vec().unwrap(), &tw);
    exact(&format!("{what} dbias"), &gdb.to_vec().unwrap(), &tb);
}

#[test]
fn layernorm_matches_twin() {
    let dev = test_device("layernorm_matches_twin");
    let mut rng = Rng::new(0x1A7);
    // Ragged C, GPT-2's C, C = 4096, more rows than backward blocks, shared memory past 48 KiB.
    for &(rows, c) in &[(1, 1), (7, 37), (33, 768), (5, 4096), (2077, 64), (3, 8192)] {
        layernorm_case::<f32>(&dev, &mut rng, rows, c);
        layernorm_case::<bf16>(&dev, &mut rng, rows, c);
        layernorm_case::<f16>(&dev, &mut rng, rows, c);
    }
}

fn pointwise_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, n: usize) {
    let tol = rel_tolerance(T::ELEM);
    let what = format!("{} n={n}", T::ELEM.name());
    let x: Vec<T> = random(rng, n, -5.0, 5.0);
    let y: Vec<T> = random(rng, n, -2.0, 2.0);
    let (dx, dy) = (dev.htod(&x).unwrap(), dev.htod(&y).unwrap());
    let mut want = vec![T::from_f32(0.0); n];
    let mut out = poisoned::<T>(dev, n);
    dev.gelu_forward(&dx, &mut out).unwrap();
    pointwise::twin::gelu_forward(&x, &mut want);
    close(&format!("gelu {what}"), &out.to_vec().unwrap(), &want, tol);
    let mut out = poisoned::<T>(dev, n);
    dev.gelu_backward(&dx, &dy, &mut out).unwrap();
    pointwise::twin::gelu_backward(&x, &y, &mut want);
    close(
        &format!("gelu backward {what}"),
        &out.to_vec().unwrap(),
        &want,
        tol,
    );
    let mut g = dev.htod(&y).unwrap();
    dev.gelu_backward_in_place(&dx, &mut g).unwrap();
    close(
        &format!("gelu backward in place {what}"),
        &g.to_vec().unwrap(),
        &want,
        tol,
    );
    let mut out = poisoned::<T>(dev, n);
    dev.residual_add(&dx, &dy, &mut out).unwrap();
    pointwise::twin::residual_add(&x, &y, &mut want);
    exact(&format!("residual {what}"), &out.to_vec().unwrap(), &want);
    let mut a = dev.htod(&x).unwrap();
    dev.residual_add_in_place(&mut a, &dy).unwrap();
    exact(
        &format!("residual in place {what}"),
        &a.to_vec().unwrap(),
        &want,
    );
    for c in [1usize, 3, 257] {
        if !n.is_multiple_of(c) {
            continue;
        }
        let bias: Vec<T> = random(rng, c, -1.0, 1.0);
        let db = dev.htod(&bias).unwrap();
        let mut out = poisoned::<T>(dev, n);
        dev.bias_add(&dx, &db, &mut out, c).unwrap();
        pointwise::twin::bias_add(&x, &bias, &mut want, c);
        exact(
            &format!("bias add c={c} {what}"),
            &out.to_vec().unwrap(),
            &want,
        );
        let mut a = dev.htod(&x).unwrap();
        dev.bias_add_in_place(&mut a, &db, c).unwrap();
        exact(
            &format!("bias add in place c={c} {what}"),
            &a.to_vec().unwrap(),
            &want,
        );
    }
}

#[test]
fn pointwise_kernels_match_twins() {
    let dev = test_device("pointwise_kernels_match_twins");
    let mut rng = Rng::new(0x6E1);
    for &n in AWKWARD_SIZES.iter().chain(&[257 * 4099]) {
        pointwise_case::<f32>(&dev, &mut rng, n);
        pointwise_case::<bf16>(&dev, &mut rng, n);
        pointwise_case::<f16>(&dev, &mut rng, n);
    }
}

fn classifier_case<T: DeviceElem + Float>(
    dev: &Device,
    rng: &mut Rng,
    rows: usize,
    vp: usize,
    v: usize,
) {
    let mut logits: Vec<T> = random(rng, rows * vp, -6.0, 6.0);
    let mut targets: Vec<i32> = (0..rows).map(|_| rng.below(v as u64) as i32).collect();
    targets[0] = (v - 1) as i32;
    // Masked logits (-inf) in row 0, away from its target.
    logits[0] = T::from_f32(f32::NEG_INFINITY);
    logits[v / 2] = T::from_f32(f32::NEG_INFINITY);
    if rows > 2 {
        targets[1] = -100;
        targets[2] = v as i32; // invalid: NaN row
    }
    let state = dev.step_state(&StepState::new(2.0)).unwrap();
    let shape = ClassifierShape {
        vp,
        v,
        ignore_index: -100,
        dloss: 1.0 / rows as f32,
    };
    let mut want_d = vec![T::from_f32(0.0); rows * vp];
    let mut want_l = vec![0f32; rows];
    classifier::twin::classifier(
        &logits,
        &mut want_d,
        &mut want_l,
        &targets,
        vp,
        v,
        -100,
        shape.dloss,
        2.0,
    );
    let what = format!("classifier {} rows={rows} vp={vp} v={v}", T::ELEM.name());
    let dt = dev.htod(&targets).unwrap();
    let dl = dev.htod(&logits).unwrap();
    let mut dd = poisoned::<T>(dev, rows * vp);
    let mut loss = poisoned::<f32>(dev, rows);
    dev.fused_classifier(&dl, &mut dd, &mut loss, &dt, &state, &shape)
        .unwrap();
    let tol = rel_tolerance(T::ELEM).max(1e-5);
    close(
        &format!("{what} loss"),
        &loss.to_vec().unwrap(),
        &want_l,
        1e-5,
    );
    let grad = dd.to_vec().unwrap();
    close(&format!("{what} dlogits"), &grad, &want_d, tol);
    let mut inplace = dev.htod(&logits).unwrap();
    let mut loss2 = poisoned::<f32>(dev, rows);
    dev.fused_classifier_in_place(&mut inplace, &mut loss2, &dt, &state, &shape)
        .unwrap();
    exact(
        &format!("{what} in place"),
        &inplace.to_vec().unwrap(),
        &grad,
    );
}

#[test]
fn fused_classifier_matches_twin() {
    let dev = test_device("fused_classifier_matches_twin");
    let mut rng = Rng::new(0xC1A5);
    classifier_case::<f32>(&dev, &mut rng, 5, 68, 61);
    classifier_case::<f32>(&dev, &mut rng, 3, 67, 67);
    classifier_case::<bf16>(&dev, &mut rng, 17, 50304, 50257);
    classifier_case::<f16>(&dev, &mut rng, 9, 1001, 999);
    classifier_case::<f32>(&dev, &mut rng, 4, 50304, 50257);
}

fn embedding_case<T: DeviceElem + Float>(
    dev: &Device,
    rng: &mut Rng,
    b: usize,
    t: usize,
    c: usize,
    v: usize,
) {
    let n = b * t;
    let mut tokens: Vec<i32> = (0..n).map(|_| rng.below(v as u64) as i32).collect();
    // A frequent token (many rows of one tile), the last row, an invalid token.
    for k in (0..n).step_by(7) {
        tokens[k] = 3;
    }
    tokens[n - 1] = (v - 1) as i32;
    tokens[n / 2] = -1;
    let wte: Vec<T> = random(rng, v * c, -1.0, 1.0);
    let wpe: Vec<T> = random(rng, t * c, -1.0, 1.0);
    let dout: Vec<T> = random(rng, n * c, -1.0, 1.0);
    let (dwte0, dwpe0) = (rng.vec_f32(v * c, -1.0, 1.0), rng.vec_f32(t * c, -1.0, 1.0));
    let what = format!("embedding {} b={b} t={t} c={c} v={v}", T::ELEM.name());
    let dtok = dev.htod(&tokens).unwrap();
    let mut out = poisoned::<T>(dev, n * c);
    dev.embedding_forward(
        &dtok,
        &dev.htod(&wte).unwrap(),
        &dev.htod(&wpe).unwrap(),
        &mut out,
        t,
        c,
    )
    .unwrap();
    let mut want = vec![T::from_f32(0.0); n * c];
    embedding::twin::forward(&tokens, &wte, &wpe, &mut want, t, c);
    exact(&format!("{what} forward"), &out.to_vec().unwrap(), &want);
    let dd = dev.htod(&dout).unwrap();
    let (mut gte, mut gpe) = (dev.htod(&dwte0).unwrap(), dev.htod(&dwpe0).unwrap());
    dev.embedding_backward(&dtok, &dd, &mut gte, &mut gpe, t, c)
        .unwrap();
    let (mut tw, mut tp) = (dwte0.clone(), dwpe0.clone());
    embedding::twin::backward_tok(&tokens, &dout, &mut tw, c);
    embedding::twin::backward_pos(&dout, &mut tp, b, t, c);
    exact(&format!("{what} dwte"), &gte.to_vec().unwrap(), &tw);
    exact(&format!("{what} dwpe"), &gpe.to_vec().unwrap(), &tp);
}

#[test]
fn embedding_matches_twin_bit_for_bit() {
    let dev = test_device("embedding_matches_twin_bit_for_bit");
    let mut rng = Rng::new(0xE3B);
    embedding_case::<f32>(&dev, &mut rng, 2, 7, 12, 70);
    embedding_case::<bf16>(&dev, &mut rng, 4, 256, 768, 5003);
    embedding_case::<f16>(&dev, &mut rng, 3, 333, 130, 257);
    embedding_case::<bf16>(&dev, &mut rng, 1, 1024, 64, 50257);
}

fn attention_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, bh: usize, t: usize) {
    let n = bh * t * t;
    let s: Vec<T> = random(rng, n, -4.0, 4.0);
    let dp: Vec<T> = random(rng, n, -1.0, 1.0);
    let scale = 1.0 / (64f32).sqrt();
    let what = format!("attention {} bh={bh} t={t}", T::ELEM.name());
    let tol = rel_tolerance(T::ELEM).max(1e-5);
    let ds_ = dev.htod(&s).unwrap();
    let mut probs = poisoned::<T>(dev, n);
    dev.attention_softmax_forward(&ds_, &mut probs, bh, t, scale)
        .unwrap();
    let mut want = vec![T::from_f32(0.0); n];
    attention::twin::forward(&s, &mut want, t, scale);
    let gp = probs.to_vec().unwrap();
    close(&format!("{what} probs"), &gp, &want, tol);
    let mut inplace = dev.htod(&s).unwrap();
    dev.attention_softmax_forward_in_place(&mut inplace, bh, t, scale)
        .unwrap();
    exact(
        &format!("{what} probs in place"),
        &inplace.to_vec().unwrap(),
        &gp,
    );
    let ddp = dev.htod(&dp).unwrap();
    let mut dsc = poisoned::<T>(dev, n);
    dev.attention_softmax_backward(&probs, &ddp, &mut dsc, bh, t, scale)
        .unwrap();
    attention::twin::backward(&gp, &dp, &mut want, t, scale);
    let gds = dsc.to_vec().unwrap();
    close(&format!("{what} dscores"), &gds, &want, tol);
    let mut g = dev.htod(&dp).unwrap();
    dev.attention_softmax_backward_in_place(&probs, &mut g, bh, t, scale)
        .unwrap();
    exact(
        &format!("{what} dscores in place"),
        &g.to_vec().unwrap(),
        &gds,
    );
}

#[test]
fn attention_softmax_matches_twin() {
    let dev = test_device("attention_softmax_matches_twin");
    let mut rng = Rng::new(0xA77);
    for &(bh, t) in &[(1, 1), (2, 9), (3, 64), (2, 257), (2, 1024)] {
        attention_case::<f32>(&dev, &mut rng, bh, t);
        attention_case::<bf16>(&dev, &mut rng, bh, t);
        attention_case::<f16>(&dev, &mut rng, bh, t);
    }
}

fn flash_case<T: DeviceElem + Float>(dev: &Device, rng: &mut Rng, s: FlashShape) {
    let what = format!("fused attention {:?} {s:?}", T::ELEM);
    let c = s.nh * s.hs;
    let n = s.b * s.t * c;
    let qkv: Vec<T> = random(rng, 3 * n, -2.0, 2.0);
    let dy: Vec<T> = random(rng, n, -1.0, 1.0);
    let scale = 1.0 / (s.hs as f32).sqrt();
    let tw = flash::twin::Shape {
        b: s.b,
        t: s.t,
        nh: s.nh,
        hs: s.hs,
    };
    let dq = dev.htod(&qkv).unwrap();
    let mut y = poisoned::<T>(dev, n);
    let mut lse = poisoned::<f32>(dev, s.stats_len());
    dev.flash_attention_forward(&dq, &mut y, &mut lse, &s, scale)
        .unwrap();
    let tol = rel_tolerance(T::ELEM);
    let (want_y, want_lse) = flash::twin::forward(&tw, &qkv);
    let gy = y.to_vec().unwrap();
    check_close(&format!("{what} y"), &f64s(&gy), &want_y, tol).unwrap();
    check_close(
        &format!("{what} lse"),
        &f64s(&lse.to_vec().unwrap()),
        &want_lse,
        tol,
    )
    .unwrap();
    let ddy = dev.htod(&dy).unwrap();
    let mut dqkv = poisoned::<T>(dev, 3 * n);
    dev.flash_attention_backward(&dq, &y, &lse, &ddy, &mut dqkv, &s, scale)
        .unwrap();
    let got = dqkv.to_vec().unwrap();
    let want = flash::twin::backward(&tw, &qkv, &dy);
    check_close(&format!("{what} dqkv"), &f64s(&got), &want, tol).unwrap();
    // Deterministic: a second backward gives the same bits.
    let mut again = poisoned::<T>(dev, 3 * n);
    dev.flash_attention_backward(&dq, &y, &lse, &ddy, &mut again, &s, scale)
        .unwrap();
    exact(
        &format!("{what} dqkv rerun"),
        &again.to_vec().unwrap(),
        &got,
    );
}

/// The fused causal attention (forward, row dot, dQ and dK/dV passes) against its f64 twin,
/// every kernel of the family: bf16 and f16, padded head sizes 32 and 64, sequences that end
/// inside a 64-token tile, head sizes below the padded one.
#[test]
fn flash_attention_matches_twin() {
    let dev = test_device("flash_attention_matches_twin");
    let mut rng = Rng::new(0xF1A5);
    let sh = |b, t, nh, hs| FlashShape { b, t, nh, hs };
    flash_case::<bf16>(&dev, &mut rng, sh(2, 70, 2, 8));
    flash_case::<bf16>(&dev, &mut rng, sh(1, 130, 1, 64));
    flash_case::<f16>(&dev, &mut rng, sh(1, 65, 2, 32));
    flash_case::<f16>(&dev, &mut rng, sh(2, 31, 1, 48));
    // Shapes the fused kernels do not take are errors naming why, not launches.
    let q = dev.htod(&[bf16::ONE; 3 * 2 * 12]).unwrap();
    let mut y = dev.alloc::<bf16>(2 * 12).unwrap();
    let mut l = dev.alloc::<f32>(2).unwrap();
    let e = dev
        .flash_attention_forward(&q, &mut y, &mut l, &sh(1, 2, 1, 12), 0.3)
        .unwrap_err();
    assert!(e.to_string().contains("head size 12"), "{e}");
    let q32 = dev.htod(&[1f32; 3 * 2 * 16]).unwrap();
    let mut y32 = dev.alloc::<f32>(2 * 16).unwrap();
    let e = dev
        .flash_attention_forward(&q32, &mut y32, &mut l, &sh(1, 2, 1, 16), 0.3)
        .unwrap_err();
    assert!(e.to_string().contains("bf16 or f16"), "{e}");
    let e = dev
        .flash_attention_forward(&q, &mut y, &mut l, &sh(1, 4, 1, 8), 0.3)
        .unwrap_err();
    assert!(e.to_string().contains("qkv"), "{e}");
}

#[test]
fn nn_shape_errors_are_errors_not_launches() {
    let dev = test_device("nn_shape_errors_are_errors_not_launches");
    let x = dev.htod(&[1.0f32; 10]).unwrap();
    let w = dev.htod(&[1.0f32; 3]).unwrap();
    let mut out = dev.alloc::<f32>(10).unwrap();
    let (mut m, mut r) = (dev.alloc::<f32>(3).unwrap(), dev.alloc::<f32>(3).unwrap());
    let e = dev
        .layernorm_forward(&x, &w, &w, &mut out, &mut m, &mut r, 3, 1e-5)
        .unwrap_err();
    assert!(e.to_string().contains("rows of 3"), "{e}");
    let mut st = dev.htod(&[0u32; 3]).unwrap();
    assert!(
        dev.grad_check_norm(&x, &mut st, 1.0).is_err(),
        "short step state"
    );
    let mut p = dev.htod(&[0f32; 10]).unwrap();
    let mut v = dev.htod(&[0f32; 9]).unwrap();
    let dr = dev.upload_decay_ranges(&DecayRanges::default()).unwrap();
    let good = dev.step_state(&StepState::new(1.0)).unwrap();
    let mut m2 = dev.htod(&[0f32; 10]).unwrap();
    let e = dev
        .adamw_step(
            &mut p,
            &x,
            &mut m2,
            &mut v,
            WorkingCopyMut::None,
            &dr,
            &good,
            &launch_of(0, false),
        )
        .unwrap_err();
    assert!(e.to_string().contains("adamw v"), "{e}");
    let shape = ClassifierShape {
        vp: 5,
        v: 6,
        ignore_index: -1,
        dloss: 1.0,
    };
    let mut lg = dev.htod(&[0f32; 10]).unwrap();
    let mut loss = dev.alloc::<f32>(2).unwrap();
    let tg = dev.htod(&[0i32; 2]).unwrap();
    assert!(
        dev.fused_classifier_in_place(&mut lg, &mut loss, &tg, &good, &shape)
            .is_err()
    );
}
