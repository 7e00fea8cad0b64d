//! Shared helpers for the integration tests.
#![allow(dead_code)]

use lathe_autograd::{DType, Result, Tape, Tensor, Var};
use lathe_kernels::rng::Rng;

/// Finite-difference step for the f64 checks.
pub const FD_STEP: f64 = 1e-5;
/// A check passes when `|analytic - numeric| <= FD_ATOL + FD_RTOL * |numeric|`. Central
/// differences in f64 with step 1e-5 are accurate to ~1e-10 on these smooth functions, so
/// 1e-6 relative is tight while leaving room for the truncation error.
pub const FD_RTOL: f64 = 1e-6;
pub const FD_ATOL: f64 = 1e-8;

/// A tensor of normal values (f64, f32 dtype so nothing is rounded).
pub fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor<f64> {
    let n = shape.iter().product();
    Tensor::from_vec(
        shape.to_vec(),
        (0..n).map(|_| rng.normal() as f64).collect(),
    )
    .unwrap()
}

/// Like [`randn`] but every value at least `gap` away from zero (for kinks such as ReLU).
pub fn randn_away_from_zero(rng: &mut Rng, shape: &[usize], gap: f64) -> Tensor<f64> {
    let t = randn(rng, shape);
    let data = t
        .data()
        .iter()
        .map(|&x| {
            if x.abs() < gap {
                x.signum() * gap + x
            } else {
                x
            }
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), data).unwrap()
}

/// Builds `L = sum(out * w)` for a fixed random `w` and returns it.
fn project(tape: &mut Tape<f64>, out: Var, seed: u64) -> Result<Var> {
    let shape = tape.shape(out)?.to_vec();
    let mut rng = Rng::new(seed);
    let w = randn(&mut rng, &shape);
    let w = tape.input(w)?;
    let p = tape.mul(out, w)?;
    tape.sum(p)
}

/// A graph under test: builds an output from the input leaves.
type Build<'a> = &'a dyn Fn(&mut Tape<f64>, &[Var]) -> Result<Var>;

fn eval(inputs: &[Tensor<f64>], build: Build) -> f64 {
    let mut tape = Tape::<f64>::with_dtype(DType::F32);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| tape.leaf(t.clone(), true).unwrap())
        .collect();
    let out = build(&mut tape, &vars).unwrap();
    let l = project(&mut tape, out, 1234).unwrap();
    tape.scalar(l).unwrap()
}

/// Checks the gradient of every input of `build` against central finite differences in f64.
/// Returns the largest error relative to the tolerance (must be <= 1).
pub fn gradcheck(
    name: &str,
    inputs: Vec<Tensor<f64>>,
    build: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>,
) -> f64 {
    let inputs = &inputs[..];
    let mut tape = Tape::<f64>::with_dtype(DType::F32);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| tape.leaf(t.clone(), true).unwrap())
        .collect();
    let out = build(&mut tape, &vars).unwrap();
    let l = project(&mut tape, out, 1234).unwrap();
    tape.backward_leaves(l, 1.0).unwrap();
    let mut worst: f64 = 0.0;
    for (k, input) in inputs.iter().enumerate() {
        let analytic = tape
            .grad(vars[k])
            .unwrap()
            .map(|g| g.to_vec())
            .unwrap_or_else(|| vec![0.0; input.numel()]);
        for i in 0..input.numel() {
            let bump = |d: f64| {
                let mut ins = inputs.to_vec();
                let mut data = ins[k].data().to_vec();
                data[i] += d;
                ins[k] = Tensor::from_vec(ins[k].shape().to_vec(), data).unwrap();
                eval(&ins, &build)
            };
            let numeric = (bump(FD_STEP) - bump(-FD_STEP)) / (2.0 * FD_STEP);
            let err = (analytic[i] - numeric).abs() / (FD_ATOL + FD_RTOL * numeric.abs());
            assert!(
                err <= 1.0,
                "{name}: input {k} element {i}: analytic {} vs numeric {numeric}",
                analytic[i]
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Bit patterns of an f32 slice (for bitwise comparisons with readable failures).
pub fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}
