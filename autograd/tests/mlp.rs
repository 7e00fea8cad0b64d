//! The MLP classifier: gradients through the store in f64, and learning a toy problem.

mod common;

use common::{FD_ATOL, FD_RTOL, FD_STEP};
use lathe_autograd::{Activation, DType, IGNORE_INDEX, Mlp, ParamStore, Tape};
use lathe_kernels::rng::Rng;

#[test]
fn mlp_gradients_match_finite_differences() {
    for act in [Activation::Relu, Activation::Gelu] {
        let mlp = Mlp::new(&[5, 7, 6, 3], act).unwrap();
        let mut params: ParamStore<f64> = mlp.init_params(3).cast();
        let mut rng = Rng::new(4);
        for b in params.master_mut() {
            *b += 0.1 * rng.normal() as f64;
        }
        params.sync_working(DType::F32);
        let x: Vec<f64> = (0..4 * 5).map(|_| rng.normal() as f64).collect();
        let labels = [0u32, 2, IGNORE_INDEX, 1];
        let loss_of = |p: &ParamStore<f64>| {
            let mut tape = Tape::<f64>::with_dtype(DType::F32);
            let l = mlp.loss(&mut tape, p, &x, &labels, 4).unwrap();
            tape.scalar(l).unwrap()
        };
        let mut tape = Tape::<f64>::with_dtype(DType::F32);
        let l = mlp.loss(&mut tape, &params, &x, &labels, 4).unwrap();
        tape.backward(l, 1.0, &mut params).unwrap();
        let analytic = params.grads().to_vec();
        for (i, &a) in analytic.iter().enumerate() {
            let mut p = params.clone();
            p.master_mut()[i] += FD_STEP;
            p.sync_working(DType::F32);
            let up = loss_of(&p);
            p.master_mut()[i] -= 2.0 * FD_STEP;
            p.sync_working(DType::F32);
            let numeric = (up - loss_of(&p)) / (2.0 * FD_STEP);
            let err = (a - numeric).abs() / (FD_ATOL + FD_RTOL * numeric.abs());
            assert!(err <= 1.0, "{act:?} param {i}: {} vs {numeric}", a);
        }
    }
}

#[test]
fn mlp_learns_two_interleaved_spirals() {
    // Points on two spirals, label = which spiral.
    let mut rng = Rng::new(10);
    let n = 256;
    let mut x = Vec::with_capacity(2 * n);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 2) as u32;
        let r = 0.2 + 0.8 * (i / 2) as f32 / (n / 2) as f32;
        let a = 3.0 * r * std::f32::consts::PI + class as f32 * std::f32::consts::PI;
        x.push(r * a.cos() + 0.01 * rng.normal());
        x.push(r * a.sin() + 0.01 * rng.normal());
        y.push(class);
    }
    let mlp = Mlp::new(&[2, 64, 64, 2], Activation::Gelu).unwrap();
    assert_eq!(mlp.param_specs()[0].name, "layers.0.weight");
    let mut params = mlp.init_params(1);
    let mut tape = Tape::new(DType::F32);
    let mut m = vec![0f32; params.num_params()];
    for _ in 0..300 {
        tape.clear();
        params.zero_grads();
        let l = mlp.loss(&mut tape, &params, &x, &y, n).unwrap();
        tape.backward(l, 1.0, &mut params).unwrap();
        let (w, g) = params.master_and_grads_mut();
        for ((w, g), m) in w.iter_mut().zip(g.iter()).zip(m.iter_mut()) {
            *m = 0.9 * *m + g;
            *w -= 0.1 * *m;
        }
        params.sync_working(DType::F32);
    }
    tape.clear();
    let logits = mlp.logits(&mut tape, &params, &x, n).unwrap();
    let v = tape.value(logits).unwrap();
    let correct = (0..n)
        .filter(|&i| (v[2 * i + 1] > v[2 * i]) as u32 == y[i])
        .count();
    assert!(correct as f32 / n as f32 > 0.95, "accuracy {correct}/{n}");
    assert!(Mlp::new(&[3], Activation::Relu).is_err());
}
