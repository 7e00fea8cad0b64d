//! Simulator tests of the layer kernels (pointwise, classifier, embedding, attention); see
//! `sim_tests` for the method.

use super::*;
use crate::desc::{Elem, Problem};
use crate::elementwise::twin::Float;
use crate::rng::Rng;
use crate::simtest::{Arg, Gpu};
use crate::tolerance::{check_close, rel_tolerance};
use half::bf16;

fn random<T: Float>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.range_f32(lo, hi))).collect()
}

/// Reads `n` elements of `T` as f32 bit patterns (comparable, NaN-safe).
fn read_bits<T: Float + bytemuck::Pod>(gpu: &Gpu, addr: u64, n: usize) -> Vec<u32> {
    gpu.read::<T>(addr, n)
        .iter()
        .map(|x| x.to_f32().to_bits())
        .collect()
}

fn f64s_bits(v: &[u32]) -> Vec<f64> {
    v.iter().map(|&b| f32::from_bits(b) as f64).collect()
}

fn f64s<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

fn pointwise_case<T: Float + bytemuck::Pod>(e: Elem, n: usize, shift: usize) {
    let mut rng = Rng::new(n as u64 + shift as u64);
    let x: Vec<T> = random(&mut rng, n + shift, -5.0, 5.0);
    let y: Vec<T> = random(&mut rng, n + shift, -2.0, 2.0);
    let sz = std::mem::size_of::<T>() as u64;
    let sh = shift as u64 * sz;
    let (fwd, bwd, add) = {
        let mut gpu = Gpu::new();
        let (dx, dy) = (gpu.upload(&x), gpu.upload(&y));
        let out = gpu.alloc_bytes((n + shift) * sz as usize);
        let p = Problem::elems(n as u64);
        let mut res = Vec::new();
        let runs: [(&KernelDesc, Vec<Arg>); 3] = [
            (
                pointwise::gelu_fwd_for(e).unwrap(),
                vec![Arg::Ptr(dx + sh), Arg::Ptr(out + sh)],
            ),
            (
                pointwise::gelu_bwd_for(e).unwrap(),
                vec![Arg::Ptr(dx + sh), Arg::Ptr(dy + sh), Arg::Ptr(out + sh)],
            ),
            (
                pointwise::residual_add_for(e).unwrap(),
                vec![Arg::Ptr(dx + sh), Arg::Ptr(dy + sh), Arg::Ptr(out + sh)],
            ),
        ];
        for (k, mut args) in runs {
            args.push(Arg::U64(n as u64));
            gpu.launch(k, &p, &args).unwrap();
            res.push(read_bits::<T>(&gpu, out + sh, n));
        }
        (res[0].clone(), res[1].clone(), res[2].clone())
    };
    let mut want = vec![T::from_f32(0.0); n];
    let tol = rel_tolerance(e);
    let what = format!("{e:?} n={n} shift={shift}");
    pointwise::twin::gelu_forward(&x[shift..], &mut want);
    check_close(
        &format!("gelu fwd {what}"),
        &f64s_bits(&fwd),
        &f64s(&want),
        tol,
    )
    .unwrap();
    pointwise::twin::gelu_backward(&x[shift..], &y[shift..], &mut want);
    check_close(
        &format!("gelu bwd {what}"),
        &f64s_bits(&bwd),
        &f64s(&want),
        tol,
    )
    .unwrap();
    pointwise::twin::residual_add(&x[shift..], &y[shift..], &mut want);
    check_close(
        &format!("residual {what}"),
        &f64s_bits(&add),
        &f64s(&want),
        0.0,
    )
    .unwrap();
}

#[test]
fn pointwise_kernels_match_twins() {
    for &(n, shift) in &[(1usize, 0usize), (7, 1), (1003, 0), (1003, 1)] {
        pointwise_case::<f32>(Elem::F32, n, shift);
        pointwise_case::<bf16>(Elem::BF16, n, shift);
        pointwise_case::<half::f16>(Elem::F16, n, shift);
    }
    // Bias add: 2-D grid, columns past a 256 boundary, rows striding over the row blocks.
    for &(rows, c) in &[(3usize, 5usize), (4, 300)] {
        let mut rng = Rng::new(rows as u64 * c as u64);
        let x: Vec<bf16> = random(&mut rng, rows * c, -1.0, 1.0);
        let b: Vec<bf16> = random(&mut rng, c, -1.0, 1.0);
        let got = {
            let mut gpu = Gpu::new();
            let (dx, db) = (gpu.upload(&x), gpu.upload(&b));
            let out = gpu.alloc_bytes(2 * rows * c);
            let args = [
                Arg::Ptr(dx),
                Arg::Ptr(db),
                Arg::Ptr(out),
                Arg::U32(rows as u32),
                Arg::U32(c as u32),
            ];
            let p = Problem {
                batch: rows as u64,
                n: c as u64,
                ..Problem::default()
            };
            let k = pointwise::bias_add_for(Elem::BF16).unwrap();
            let mut g = (k.geometry)(&p);
            g.grid.1 = 2; // rows 0, 2 / 1, 3: the row stride
            gpu.launch_on(k, g, &args).unwrap();
            read_bits::<bf16>(&gpu, out, rows * c)
        };
        let mut want = vec![bf16::ZERO; rows * c];
        pointwise::twin::bias_add(&x, &b, &mut want, c);
        check_close("bias add", &f64s_bits(&got), &f64s(&want), 0.0).unwrap();
    }
}

fn classifier_case<T: Float + bytemuck::Pod>(e: Elem, vp: usize, v: usize, shift: usize) {
    let rows = 4;
    let mut rng = Rng::new(vp as u64 * 31 + v as u64);
    let mut logits: Vec<T> = random(&mut rng, rows * vp + shift, -4.0, 4.0);
    // Masked logits (-inf) take no probability; the target of row 0 is column 3.
    logits[shift + 1] = T::from_f32(f32::NEG_INFINITY);
    logits[shift + v - 1] = T::from_f32(f32::NEG_INFINITY);
    let targets = [3i32, -100, (v - 1) as i32, v as i32];
    let sz = std::mem::size_of::<T>() as u64;
    let sh = shift as u64 * sz;
    let state = amp::StepState::new(4.0).to_words();
    for in_place in [false, true] {
        let (loss, grad) = {
            let mut gpu = Gpu::new();
            let dl = gpu.upload(&logits);
            let dd = if in_place {
                dl
            } else {
                gpu.alloc_bytes((rows * vp + shift) * sz as usize)
            };
            let (dloss, dt, ds) = (
                gpu.alloc_bytes(4 * rows),
                gpu.upload(&targets),
                gpu.upload(&state),
            );
            let args = [
                Arg::Ptr(dl + sh),
                Arg::Ptr(dd + sh),
                Arg::Ptr(dloss),
                Arg::Ptr(dt),
                Arg::Ptr(ds),
                Arg::U32(rows as u32),
                Arg::U32(vp as u32),
                Arg::U32(v as u32),
                Arg::U32(-100i32 as u32),
                Arg::F32(0.25),
            ];
            let p = Problem {
                batch: rows as u64,
                n: vp as u64,
                k: v as u64,
                m: 1,
            };
            gpu.launch(classifier::kernel_for(e).unwrap(), &p, &args)
                .unwrap();
            (
                gpu.read::<u32>(dloss, rows),
                read_bits::<T>(&gpu, dd + sh, rows * vp),
            )
        };
        let mut want_d = vec![T::from_f32(0.0); rows * vp];
        let mut want_l = vec![0f32; rows];
        classifier::twin::classifier(
            &logits[shift..],
            &mut want_d,
            &mut want_l,
            &targets,
            vp,
            v,
            -100,
            0.25,
            4.0,
        );
        let what = format!("classifier {e:?} vp={vp} v={v} shift={shift} in_place={in_place}");
        let loss64 = f64s_bits(&loss);
        check_close(&format!("{what} loss"), &loss64, &f64s(&want_l), 1e-5).unwrap();
        check_close(
            &format!("{what} dlogits"),
            &f64s_bits(&grad),
            &f64s(&want_d),
            rel_tolerance(e).max(1e-5),
        )
        .unwrap();
    }
}

#[test]
fn classifier_matches_twin() {
    classifier_case::<f32>(Elem::F32, 68, 61, 0);
    classifier_case::<f32>(Elem::F32, 67, 67, 1);
    classifier_case::<bf16>(Elem::BF16, 2052, 2049, 0);
    classifier_case::<half::f16>(Elem::F16, 40, 33, 1);
}

fn embedding_case<T: Float + bytemuck::Pod>(e: Elem, b: usize, t: usize, c: usize, v: usize) {
    let n = b * t;
    let mut rng = Rng::new((n * c + v) as u64);
    let mut tokens: Vec<i32> = (0..n).map(|_| rng.below(v as u64) as i32).collect();
    // Repeats (several tokens per vocabulary row), a boundary row, an invalid token.
    tokens[1] = tokens[0];
    tokens[n - 1] = (v - 1) as i32;
    tokens[n / 2] = v as i32 + 3;
    let wte: Vec<T> = random(&mut rng, v * c, -1.0, 1.0);
    let wpe: Vec<T> = random(&mut rng, (t + 2) * c, -1.0, 1.0);
    let dout: Vec<T> = random(&mut rng, n * c, -1.0, 1.0);
    let dwte0 = rng.vec_f32(v * c, -1.0, 1.0);
    let dwpe0 = rng.vec_f32((t + 2) * c, -1.0, 1.0);
    let sz = std::mem::size_of::<T>();
    let (out, dwte, dwpe) = {
        let mut gpu = Gpu::new();
        let (dtok, dte, dpe) = (gpu.upload(&tokens), gpu.upload(&wte), gpu.upload(&wpe));
        let out = gpu.alloc_bytes(n * c * sz);
        let fwd = [
            Arg::Ptr(dtok),
            Arg::Ptr(dte),
            Arg::Ptr(dpe),
            Arg::Ptr(out),
            Arg::U32(n as u32),
            Arg::U32(t as u32),
            Arg::U32(c as u32),
            Arg::U32(v as u32),
        ];
        let p = Problem {
            batch: n as u64,
            n: c as u64,
            m: t as u64,
            k: v as u64,
        };
        gpu.launch(embedding::forward_for(e).unwrap(), &p, &fwd)
            .unwrap();
        let (dd, gte, gpe) = (gpu.upload(&dout), gpu.upload(&dwte0), gpu.upload(&dwpe0));
        let pos = [
            Arg::Ptr(dd),
            Arg::Ptr(gpe),
            Arg::U32(b as u32),
            Arg::U32(t as u32),
            Arg::U32(c as u32),
        ];
        let pp = Problem {
            batch: b as u64,
            m: t as u64,
            n: c as u64,
            k: 0,
        };
        gpu.launch(embedding::backward_pos_for(e).unwrap(), &pp, &pos)
            .unwrap();
        let tok = [
            Arg::Ptr(dtok),
            Arg::Ptr(dd),
            Arg::Ptr(gte),
            Arg::U32(n as u32),
            Arg::U32(c as u32),
            Arg::U32(v as u32),
        ];
        gpu.launch(embedding::backward_tok_for(e).unwrap(), &p, &tok)
            .unwrap();
        (
            read_bits::<T>(&gpu, out, n * c),
            gpu.read::<u32>(gte, v * c),
            gpu.read::<u32>(gpe, (t + 2) * c),
        )
    };
    let mut want = vec![T::from_f32(0.0); n * c];
    embedding::twin::forward(&tokens, &wte, &wpe, &mut want, t, c);
    let what = format!("embedding {e:?} b={b} t={t} c={c} v={v}");
    let bits: Vec<u32> = want.iter().map(|x| x.to_f32().to_bits()).collect();
    // NaN rows compare as NaN patterns: check those separately.
    for (i, (&g, &w)) in out.iter().zip(&bits).enumerate() {
        let (gf, wf) = (f32::from_bits(g), f32::from_bits(w));
        assert!(
            gf == wf || (gf.is_nan() && wf.is_nan()),
            "{what} out[{i}]: {gf} vs {wf}"
        );
    }
    let (mut tw, mut tp) = (dwte0.clone(), dwpe0.clone());
    embedding::twin::backward_tok(&tokens, &dout, &mut tw, c);
    embedding::twin::backward_pos(&dout, &mut tp, b, t, c);
    let tw: Vec<u32> = tw.iter().map(|x| x.to_bits()).collect();
    let tp: Vec<u32> = tp.iter().map(|x| x.to_bits()).collect();
    assert_eq!(dwte, tw, "{what} dwte");
    assert_eq!(dwpe, tp, "{what} dwpe");
}

#[test]
fn embedding_matches_twin_bit_for_bit() {
    // 2 vocabulary tiles (the second partial), 2 channel tiles (the second partial), and more
    // tokens than one scan chunk.
    embedding_case::<f32>(Elem::F32, 3, 250, 130, 100);
    embedding_case::<bf16>(Elem::BF16, 2, 7, 12, 70);
    embedding_case::<half::f16>(Elem::F16, 1, 5, 3, 9);
}

fn attention_case<T: Float + bytemuck::Pod>(e: Elem, bh: usize, t: usize, shift: usize) {
    let n = bh * t * t;
    let mut rng = Rng::new((n + shift) as u64);
    let s: Vec<T> = random(&mut rng, n + shift, -3.0, 3.0);
    let dp: Vec<T> = random(&mut rng, n + shift, -1.0, 1.0);
    let sz = std::mem::size_of::<T>() as u64;
    let sh = shift as u64 * sz;
    let scale = 0.35f32;
    let p = Problem {
        batch: bh as u64,
        n: t as u64,
        ..Problem::default()
    };
    let (probs, ds) = {
        let mut gpu = Gpu::new();
        let (dsc, ddp) = (gpu.upload(&s), gpu.upload(&dp));
        let dpr = gpu.alloc_bytes((n + shift) * sz as usize);
        let fwd = [
            Arg::Ptr(dsc + sh),
            Arg::Ptr(dpr + sh),
            Arg::U32(bh as u32),
            Arg::U32(t as u32),
            Arg::F32(scale),
        ];
        gpu.launch(attention::forward_for(e).unwrap(), &p, &fwd)
            .unwrap();
        // Backward in place: dscores over dprobs.
        let bwd = [
            Arg::Ptr(dpr + sh),
            Arg::Ptr(ddp + sh),
            Arg::Ptr(ddp + sh),
            Arg::U32(bh as u32),
            Arg::U32(t as u32),
            Arg::F32(scale),
        ];
        gpu.launch(attention::backward_for(e).unwrap(), &p, &bwd)
            .unwrap();
        (
            read_bits::<T>(&gpu, dpr + sh, n),
            read_bits::<T>(&gpu, ddp + sh, n),
        )
    };
    let mut want_p = vec![T::from_f32(0.0); n];
    attention::twin::forward(&s[shift..], &mut want_p, t, scale);
    let what = format!("attention {e:?} bh={bh} t={t} shift={shift}");
    let tol = rel_tolerance(e).max(1e-5);
    check_close(
        &format!("{what} probs"),
        &f64s_bits(&probs),
        &f64s(&want_p),
        tol,
    )
    .unwrap();
    let gp: Vec<T> = probs
        .iter()
        .map(|&b| T::from_f32(f32::from_bits(b)))
        .collect();
    let mut want_ds = vec![T::from_f32(0.0); n];
    attention::twin::backward(&gp, &dp[shift..], &mut want_ds, t, scale);
    check_close(
        &format!("{what} dscores"),
        &f64s_bits(&ds),
        &f64s(&want_ds),
        tol,
    )
    .unwrap();
    // Above the diagonal: exact zeros.
    for r in 0..bh * t {
        for j in r % t + 1..t {
            assert_eq!(probs[r * t + j], 0, "{what} P[{r},{j}]");
            assert_eq!(ds[r * t + j], 0, "{what} dS[{r},{j}]");
        }
    }
}

#[test]
fn attention_softmax_matches_twin() {
    attention_case::<f32>(Elem::F32, 2, 9, 0);
    attention_case::<f32>(Elem::F32, 3, 12, 0);
    attention_case::<f32>(Elem::F32, 1, 12, 1);
    attention_case::<bf16>(Elem::BF16, 2, 40, 0);
    attention_case::<half::f16>(Elem::F16, 1, 7, 0);
}
