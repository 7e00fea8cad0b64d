//! The `nn` kernels' PTX run on Lathe's simulated device (lathe-sim, through
//! [`crate::simtest`]) against their CPU twins, at small awkward shapes, aligned and misaligned
//! (vector and scalar paths), with random non-zero inputs and NaN-poisoned outputs. What the GPU
//! tests in `lathe-host` check on hardware, checked here on every `cargo test`.
//!
//! Races: the simulator's sanitizer reports a shared-memory access that no barrier orders
//! against another thread's as a launch error, so one run per case is enough (no second run in
//! another thread order to compare against).

use super::*;
use crate::desc::Problem;
use crate::elementwise::twin::Float;
use crate::rng::Rng;
use crate::simtest::{Arg, Gpu};
use crate::tolerance::{check_close, rel_tolerance};
use half::{bf16, f16};

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

#[test]
fn amp_check_unscale_norm_and_update() {
    use amp::*;
    for &(n, off, bad) in &[
        (1usize, 0usize, None),
        (5, 1, None),
        (1003, 0, None),
        (1003, 1, Some((500usize, f32::NAN))),
        (4099, 0, Some((4098, f32::NEG_INFINITY))),
    ] {
        let mut rng = Rng::new(n as u64);
        let mut g = rng.vec_f32(n + off, -2.0, 2.0);
        if let Some((k, x)) = bad {
            g[off + k] = x;
        }
        for unscale in [false, true] {
            let desc = if unscale {
                &UNSCALE_CHECK_NORM_F32
            } else {
                &CHECK_NORM_F32
            };
            let blocks = check_blocks(n as u64) as usize;
            let (state, grads) = {
                let mut gpu = Gpu::new();
                let dg = gpu.upload(&g);
                let ds = gpu.upload(&StepState::new(8.0).to_words());
                let dp = gpu.alloc_bytes(4 * blocks);
                let args = [
                    Arg::Ptr(dg + 4 * off as u64),
                    Arg::U64(n as u64),
                    Arg::Ptr(ds),
                    Arg::Ptr(dp),
                ];
                gpu.launch(desc, &Problem::elems(n as u64), &args).unwrap();
                let fin = [
                    Arg::Ptr(dp),
                    Arg::U32(blocks as u32),
                    Arg::Ptr(ds),
                    Arg::F32(1.5),
                ];
                gpu.launch(&NORM_FINISH_F32, &Problem::elems(blocks as u64), &fin)
                    .unwrap();
                (
                    gpu.read::<u32>(ds, STATE_WORDS),
                    bits32(&gpu.read::<f32>(dg, n + off)),
                )
            };
            let s = StepState::from_words(&state).unwrap();
            let (found, sq) = twin::check_norm(&g[off..], 0.125);
            assert_eq!(s.found_inf, found, "n={n} off={off}");
            if found {
                assert!(!s.grad_norm.is_finite());
            } else {
                let want = sq.sqrt();
                assert!(
                    (s.grad_norm as f64 - want).abs() <= 1e-5 * want,
                    "norm {} vs {want}",
                    s.grad_norm
                );
            }
            assert_eq!(s.clip, twin::clip_factor(s.grad_norm, 1.5));
            assert_eq!((s.scale, s.step), (8.0, 0), "other words untouched");
            for (i, &b) in grads.iter().enumerate() {
                let want = if unscale && i >= off {
                    g[i] * 0.125
                } else {
                    g[i]
                };
                assert_eq!(b, want.to_bits(), "grad {i} (unscale {unscale})");
            }
        }
    }
    // The update kernel follows the twin word for word, without a floor and with one that
    // stops the backoff (4 -> 2 -> 1.5 -> 1.5).
    let free = ScalerRule {
        growth_interval: 3,
        ..ScalerRule::default()
    };
    let floored = ScalerRule {
        min_scale: 1.5,
        ..free
    };
    let cases = [
        (
            free,
            1024.0,
            vec![false, false, false, true, false, true, true, false],
        ),
        (floored, 4.0, vec![true, true, true, false, true]),
    ];
    for (rule, init, founds) in cases {
        let mut host = StepState::new(init);
        let mut gpu = Gpu::new();
        let ds = gpu.upload(&host.to_words());
        for found in founds {
            host.found_inf = found;
            let mut w = gpu.read::<u32>(ds, STATE_WORDS);
            w[FOUND_INF] = found as u32;
            gpu.write(ds, &w);
            let args = [
                Arg::Ptr(ds),
                Arg::U32(1),
                Arg::U32(rule.growth_interval),
                Arg::U64(rule.growth_factor.to_bits()),
                Arg::U64(rule.backoff_factor.to_bits()),
                Arg::F32(rule.min_scale),
            ];
            gpu.launch(&AMP_UPDATE, &Problem::default(), &args).unwrap();
            twin::update(&mut host, &rule);
            assert_eq!(gpu.read::<u32>(ds, STATE_WORDS), host.to_words().to_vec());
        }
        if rule.min_scale > 0.0 {
            assert_eq!(host.scale, 1.5, "the backoff stops at the floor");
        }
    }
}

#[test]
fn adamw_matches_twin_bit_for_bit() {
    use adamw::twin::{Hyper, WorkingMut, step};
    use adamw::{DecayRanges, Working, kernel_for};
    let h = Hyper {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let offset = 100u64;
    let ranges = DecayRanges::new(vec![101..103, 104..105, 110..700, 800..1200]).unwrap();
    for w in [
        Working::None,
        Working::Bf16,
        Working::Bf16Stochastic,
        Working::F16,
    ] {
        for &(n, shift) in &[(1usize, 0usize), (7, 1), (1029, 0), (1029, 1)] {
            let mut rng = Rng::new(n as u64 * 7 + shift as u64);
            let p = rng.vec_f32(n + shift, -1.0, 1.0);
            let g = rng.vec_f32(n + shift, -4.0, 4.0);
            let m = rng.vec_f32(n + shift, -0.1, 0.1);
            let v = rng.vec_f32(n + shift, 0.0, 0.01);
            let mut state = amp::StepState::new(8.0);
            state.step = 4;
            state.clip = 0.7;
            for found in [false, true] {
                state.found_inf = found;
                let got = {
                    let mut gpu = Gpu::new();
                    let dp = gpu.upload(&p);
                    let dg = gpu.upload(&g);
                    let dm = gpu.upload(&m);
                    let dv = gpu.upload(&v);
                    let dw = gpu.upload(&vec![0x7FC0u16; n + shift]);
                    let dr = gpu.upload(&ranges.words());
                    let ds = gpu.upload(&state.to_words());
                    let sh = 4 * shift as u64;
                    let mut args = vec![
                        Arg::Ptr(dp + sh),
                        Arg::Ptr(dg + sh),
                        Arg::Ptr(dm + sh),
                        Arg::Ptr(dv + sh),
                    ];
                    if w != Working::None {
                        args.push(Arg::Ptr(dw + 2 * shift as u64));
                    }
                    args.extend([
                        Arg::Ptr(dr),
                        Arg::U32(ranges.count()),
                        Arg::Ptr(ds),
                        Arg::U64(n as u64),
                        Arg::U64(offset),
                        Arg::U64(0xC0FFEE),
                        Arg::F32(h.lr),
                        Arg::F32(h.beta1),
                        Arg::F32(h.beta2),
                        Arg::F32(h.eps),
                        Arg::F32(h.weight_decay),
                        Arg::U32(1),
                    ]);
                    gpu.launch(kernel_for(w), &Problem::elems(n as u64), &args)
                        .unwrap();
                    (
                        bits32(&gpu.read::<f32>(dp, n + shift)),
                        bits32(&gpu.read::<f32>(dm, n + shift)),
                        bits32(&gpu.read::<f32>(dv, n + shift)),
                        gpu.read::<u16>(dw, n + shift),
                    )
                };
                let (mut pp, mut mm, mut vv) = (p.clone(), m.clone(), v.clone());
                let mut wb = vec![bf16::from_bits(0x7FC0); n + shift];
                let mut wh = vec![f16::from_bits(0x7FC0); n + shift];
                let working = match w {
                    Working::None => WorkingMut::None,
                    Working::Bf16 => WorkingMut::Bf16(&mut wb[shift..]),
                    Working::Bf16Stochastic => WorkingMut::Bf16Stochastic(&mut wb[shift..]),
                    Working::F16 => WorkingMut::F16(&mut wh[shift..]),
                };
                let (s, e) = (shift, n + shift);
                step(
                    &mut pp[s..e],
                    &g[s..e],
                    &mut mm[s..e],
                    &mut vv[s..e],
                    working,
                    &ranges,
                    &state,
                    offset,
                    0xC0FFEE,
                    &h,
                    true,
                );
                let what = format!("{w:?} n={n} shift={shift} found={found}");
                assert_eq!(got.0, bits32(&pp), "master {what}");
                assert_eq!(got.1, bits32(&mm), "m {what}");
                assert_eq!(got.2, bits32(&vv), "v {what}");
                let want_w: Vec<u16> = match w {
                    Working::F16 => wh.iter().map(|x| x.to_bits()).collect(),
                    _ => wb.iter().map(|x| x.to_bits()).collect(),
                };
                assert_eq!(got.3, want_w, "working {what}");
            }
        }
    }
}

/// `groups`: the backward's grid (the descriptor's choice when `None`).
fn layernorm_case<T: Float + bytemuck::Pod>(
    e: crate::desc::Elem,
    rows: usize,
    c: usize,
    shift: usize,
    groups: Option<usize>,
) {
    let mut rng = Rng::new((rows * 1000 + c) as u64);
    let x: Vec<T> = random(&mut rng, rows * c + shift, -2.0, 3.0);
    let w: Vec<T> = random(&mut rng, c + shift, 0.5, 1.5);
    let b: Vec<T> = random(&mut rng, c + shift, -0.5, 0.5);
    let dout: Vec<T> = random(&mut rng, rows * c + shift, -1.0, 1.0);
    let dw0 = rng.vec_f32(c, -1.0, 1.0);
    let db0 = rng.vec_f32(c, -1.0, 1.0);
    let sz = std::mem::size_of::<T>() as u64;
    let sh = shift as u64 * sz;
    let p = Problem {
        batch: rows as u64,
        n: c as u64,
        ..Problem::default()
    };
    let groups = groups.unwrap_or(layernorm::bwd_groups(rows as u64) as usize);
    let (out, mean, rstd, dx, dw, db) = {
        let mut gpu = Gpu::new();
        let (dxp, dwp, dbp) = (gpu.upload(&x), gpu.upload(&w), gpu.upload(&b));
        let dop = gpu.alloc_bytes((rows * c + shift) * sz as usize);
        let (mp, rp) = (gpu.alloc_bytes(4 * rows), gpu.alloc_bytes(4 * rows));
        let fwd = [
            Arg::Ptr(dxp + sh),
            Arg::Ptr(dwp + sh),
            Arg::Ptr(dbp + sh),
            Arg::Ptr(dop + sh),
            Arg::Ptr(mp),
            Arg::Ptr(rp),
            Arg::U32(rows as u32),
            Arg::U32(c as u32),
            Arg::F32(1e-5),
        ];
        gpu.launch(layernorm::forward_for(e).unwrap(), &p, &fwd)
            .unwrap();
        let dd = gpu.upload(&dout);
        let ddx = gpu.alloc_bytes((rows * c + shift) * sz as usize);
        let part = gpu.alloc_bytes(4 * groups * 2 * c);
        let (gw, gb) = (gpu.upload(&dw0), gpu.upload(&db0));
        let bwd = [
            Arg::Ptr(dd + sh),
            Arg::Ptr(dxp + sh),
            Arg::Ptr(dwp + sh),
            Arg::Ptr(mp),
            Arg::Ptr(rp),
            Arg::Ptr(ddx + sh),
            Arg::Ptr(part),
            Arg::U32(rows as u32),
            Arg::U32(c as u32),
        ];
        let bd = layernorm::backward_for(e).unwrap();
        let mut geo = (bd.geometry)(&p);
        geo.grid.0 = groups as u32;
        gpu.launch_on(bd, geo, &bwd).unwrap();
        let cp = Problem {
            batch: groups as u64,
            n: c as u64,
            ..Problem::default()
        };
        for (base, out) in [(part, gw), (part + 4 * c as u64, gb)] {
            let a = [
                Arg::Ptr(base),
                Arg::U32(groups as u32),
                Arg::U32(c as u32),
                Arg::U32(2 * c as u32),
                Arg::Ptr(out),
            ];
            gpu.launch(&colsum::COLSUM_ACC_F32, &cp, &a).unwrap();
        }
        (
            bits32(
                &gpu.read::<T>(dop + sh, rows * c)
                    .iter()
                    .map(|t| t.to_f32())
                    .collect::<Vec<_>>(),
            ),
            bits32(&gpu.read::<f32>(mp, rows)),
            bits32(&gpu.read::<f32>(rp, rows)),
            bits32(
                &gpu.read::<T>(ddx + sh, rows * c)
                    .iter()
                    .map(|t| t.to_f32())
                    .collect::<Vec<_>>(),
            ),
            bits32(&gpu.read::<f32>(gw, c)),
            bits32(&gpu.read::<f32>(gb, c)),
        )
    };
    let from = |v: &[u32]| -> Vec<f64> { v.iter().map(|&b| f32::from_bits(b) as f64).collect() };
    let mut o = vec![T::from_f32(0.0); rows * c];
    let (mut m, mut r) = (vec![0f32; rows], vec![0f32; rows]);
    let (xs, ws, bs) = (&x[shift..], &w[shift..], &b[shift..]);
    layernorm::twin::forward(xs, ws, bs, &mut o, &mut m, &mut r, c, 1e-5);
    let what = format!("layernorm {e:?} rows={rows} c={c} shift={shift}");
    let tol = rel_tolerance(e).max(1e-5);
    check_close(&format!("{what} out"), &from(&out), &f64s(&o), tol).unwrap();
    check_close(&format!("{what} mean"), &from(&mean), &f64s(&m), 1e-5).unwrap();
    check_close(&format!("{what} rstd"), &from(&rstd), &f64s(&r), 1e-5).unwrap();
    // The backward twin runs from the kernel's statistics.
    let (gm, gr): (Vec<f32>, Vec<f32>) = (
        mean.iter().map(|&b| f32::from_bits(b)).collect(),
        rstd.iter().map(|&b| f32::from_bits(b)).collect(),
    );
    let mut dxs = vec![T::from_f32(0.0); rows * c];
    let (mut tw, mut tb) = (dw0.clone(), db0.clone());
    layernorm::twin::backward_grouped(
        &dout[shift..],
        xs,
        ws,
        &gm,
        &gr,
        &mut dxs,
        &mut tw,
        &mut tb,
        c,
        groups,
    );
    check_close(&format!("{what} dx"), &from(&dx), &f64s(&dxs), tol).unwrap();
    assert_eq!(dw, bits32(&tw), "{what} dweight (same order as the twin)");
    assert_eq!(db, bits32(&tb), "{what} dbias");
}

#[test]
fn layernorm_matches_twin() {
    use crate::desc::Elem;
    for &(rows, c, shift) in &[
        (1usize, 1usize, 0usize),
        (5, 37, 0),
        (9, 64, 0),
        (9, 64, 1),
        (3, 130, 0),
    ] {
        layernorm_case::<f32>(Elem::F32, rows, c, shift, None);
        layernorm_case::<bf16>(Elem::BF16, rows, c, shift, None);
    }
    layernorm_case::<f16>(Elem::F16, 4, 36, 0, None);
    // Several rows per block (as for more than 1024 rows): 3 blocks over 11 rows, one empty.
    layernorm_case::<f32>(Elem::F32, 11, 40, 0, Some(3));
    layernorm_case::<bf16>(Elem::BF16, 7, 33, 0, Some(5));
}
