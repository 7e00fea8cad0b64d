//! Every op's forward and backward on the device (a GPU, else the simulated device) against
//! the CPU tape, in f32, bf16 and f16, at small odd shapes.
//!
//! Each case builds `L = sum(op(inputs) * W)` for a fixed random `W` on both tapes from the
//! same inputs (random, never zero, rounded to the dtype), then compares the op's output and
//! the gradient of every input. Device buffers are poisoned with NaN when allocated, so an
//! element a kernel forgets to write fails the comparison.
//!
//! Tolerance (relative Frobenius error, the formula of `lathe_kernels::tolerance`): 1e-5 in
//! f32, 5e-3 in bf16/f16. Both backends store the same dtype at the same points; they differ
//! only in summation order, which moves an f32 result by a few ulp and a 16-bit result by at
//! most one rounding step (2^-8 relative for bf16, 2^-11 for f16) on a fraction of elements.
//! Gradients that flow back through two roundings get at most twice that, still inside the
//! bound for the relative (whole-tensor) measure.

use lathe_autograd::{DType, IGNORE_INDEX, Result, Tape, Tensor, Var};
use lathe_kernels::Elem;
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::{check_close, rel_tolerance};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => rel_tolerance(Elem::F32),
        DType::BF16 => rel_tolerance(Elem::BF16),
        DType::F16 => rel_tolerance(Elem::F16),
    }
}

fn device() -> lathe_host::Device {
    lathe_autograd::device::set_poison_allocations(true);
    lathe_host::testing::test_device("autograd device ops")
}

/// Random values in about [-2, 2], at least 0.05 away from zero, rounded to `dt`.
fn random(rng: &mut Rng, n: usize, dt: DType) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = rng.normal();
            let x = if x.abs() < 0.05 {
                0.05f32.copysign(x) + x
            } else {
                x
            };
            dt.round(x)
        })
        .collect()
}

type Build<'a> = &'a dyn Fn(&mut Tape, &[Var]) -> Result<Var>;

struct Outcome {
    out: Vec<f32>,
    grads: Vec<Option<Vec<f32>>>,
}

fn run(
    tape: &mut Tape,
    dt: DType,
    inputs: &[(Vec<usize>, Vec<f32>, bool)],
    weights: &[f32],
    build: Build,
) -> Outcome {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(shape, data, rg)| {
            let t = Tensor::new(shape.clone(), data.clone(), dt).unwrap();
            tape.leaf(t, *rg).unwrap()
        })
        .collect();
    let out = build(tape, &vars).unwrap();
    let shape = tape.shape(out).unwrap().to_vec();
    let out_dt = tape.dtype_of(out).unwrap();
    let w = Tensor::new(shape, weights.to_vec(), out_dt).unwrap();
    let w = tape.input(w).unwrap();
    let p = tape.mul(out, w).unwrap();
    let loss = tape.sum(p).unwrap();
    let out_vals = tape.read(out).unwrap();
    tape.backward_leaves(loss, 1.0).unwrap();
    let grads = vars.iter().map(|&v| tape.read_grad(v).unwrap()).collect();
    Outcome {
        out: out_vals,
        grads,
    }
}

fn check(name: &str, shapes: &[(&[usize], bool)], build: Build) {
    let dev = device();
    for dt in DTYPES {
        let mut rng = Rng::new(0x5eed ^ name.len() as u64);
        let inputs: Vec<(Vec<usize>, Vec<f32>, bool)> = shapes
            .iter()
            .map(|(s, rg)| {
                let n = s.iter().product();
                (s.to_vec(), random(&mut rng, n, dt), *rg)
            })
            .collect();
        // The output's size, from a dry run of the graph.
        let mut dry = Tape::dry_run(dt);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(s, _, rg)| dry.leaf(Tensor::zeros(s.clone(), dt), *rg).unwrap())
            .collect();
        let o = build(&mut dry, &vars).unwrap();
        let n_out: usize = dry.shape(o).unwrap().iter().product();
        let out_dt = dry.dtype_of(o).unwrap();
        let weights = random(&mut rng, n_out, out_dt);

        let cpu = run(&mut Tape::new(dt), dt, &inputs, &weights, build);
        let gpu = run(&mut Tape::on_device(dt, &dev), dt, &inputs, &weights, build);
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let what = format!("{name} {} forward", dt.name());
        check_close(&what, &f(&gpu.out), &f(&cpu.out), tol(dt)).unwrap_or_else(|e| panic!("{e}"));
        for (i, (g, c)) in gpu.grads.iter().zip(&cpu.grads).enumerate() {
            match (g, c) {
                (Some(g), Some(c)) => {
                    let what = format!("{name} {} d(input {i})", dt.name());
                    check_close(&what, &f(g), &f(c), tol(dt)).unwrap_or_else(|e| panic!("{e}"));
                }
                (None, None) => {}
                _ => panic!(
                    "{name} {}: input {i} has a gradient on one backend only",
                    dt.name()
                ),
            }
        }
        assert!(
            cpu.grads.iter().any(|g| g.is_some()),
            "{name}: nothing was differentiated"
        );
    }
}

#[test]
fn matmul_all_transposes_and_batching() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a: Vec<usize> = if ta { vec![2, 7, 5] } else { vec![2, 5, 7] };
        // Shared 2-D b and batched b.
        let b2: Vec<usize> = if tb { vec![9, 7] } else { vec![7, 9] };
        let b3: Vec<usize> = if tb { vec![2, 9, 7] } else { vec![2, 7, 9] };
        let mm = move |t: &mut Tape, v: &[Var]| t.matmul(v[0], v[1], ta, tb);
        check("matmul shared", &[(&a, true), (&b2, true)], &mm);
        check("matmul batched", &[(&a, true), (&b3, true)], &mm);
    }
}

#[test]
fn linear_with_and_without_bias() {
    check(
        "linear",
        &[(&[3, 5, 13], true), (&[13, 11], true), (&[11], true)],
        &|t, v| t.linear(v[0], v[1], Some(v[2])),
    );
    check(
        "linear no bias",
        &[(&[7, 9], true), (&[9, 6], true)],
        &|t, v| t.linear(v[0], v[1], None),
    );
}

#[test]
fn elementwise_ops() {
    let s: &[usize] = &[3, 37];
    check("add", &[(s, true), (s, true)], &|t, v| t.add(v[0], v[1]));
    check("mul", &[(s, true), (s, true)], &|t, v| t.mul(v[0], v[1]));
    check("scale", &[(s, true)], &|t, v| t.scale(v[0], -0.75));
    check("gelu", &[(s, true)], &|t, v| t.gelu(v[0]));
    check("relu", &[(s, true)], &|t, v| t.relu(v[0]));
    check(
        "bias_add",
        &[(&[2, 5, 7], true), (&[5, 7], true)],
        &|t, v| t.bias_add(v[0], v[1]),
    );
}

#[test]
fn layernorm_and_softmax() {
    check(
        "layernorm",
        &[(&[5, 33], true), (&[33], true), (&[33], true)],
        &|t, v| t.layernorm(v[0], v[1], v[2], 1e-5),
    );
    check("softmax", &[(&[4, 19], true)], &|t, v| t.softmax(v[0]));
}

#[test]
fn attention_causal() {
    // B 2, T 5, C 12, 3 heads of 4.
    check("attention", &[(&[2, 5, 36], true)], &|t, v| {
        t.attention(v[0], 3)
    });
}

#[test]
fn attention_flash_on_the_device() {
    // Head size 8 (pads to 32), T 70 (a 64-token tile and a tail): bf16 and f16 take the
    // fused kernels on the device (f32 the materialised path), the CPU tape the reference.
    check("attention flash", &[(&[2, 70, 144], true)], &|t, v| {
        t.attention(v[0], 6)
    });
    // Head size 64 (T 20): the other padded size.
    check(
        "attention flash hs 64",
        &[(&[1, 20, 384], true)],
        &|t, v| t.attention(v[0], 2),
    );
    // The device tape did record the fused op (and the CPU tape did not).
    let dev = device();
    for (on_device, want) in [(true, "flash_attention"), (false, "attention")] {
        let mut t = if on_device {
            Tape::on_device(DType::BF16, &dev)
        } else {
            Tape::new(DType::BF16)
        };
        t.set_profiling(true);
        let x = Tensor::new(vec![1, 3, 48], vec![0.5; 144], DType::BF16).unwrap();
        let x = t.leaf(x, false).unwrap();
        t.attention(x, 2).unwrap();
        let ops: Vec<&str> = t.profile().iter().map(|p| p.op).collect();
        assert!(ops.contains(&want), "{ops:?}");
    }
    // The fused kernels against the device's materialised path (the reference it replaces),
    // values and gradients, within the dtype's tolerance.
    for dt in [DType::BF16, DType::F16] {
        let mut rng = Rng::new(0xF1A);
        let x = random(&mut rng, 2 * 70 * 144, dt);
        let w = random(&mut rng, 2 * 70 * 48, dt);
        let inputs = vec![(vec![2, 70, 144], x, true)];
        let build: Build = &|t, v| t.attention(v[0], 6);
        let mut flash = Tape::on_device(dt, &dev);
        let a = run(&mut flash, dt, &inputs, &w, build);
        let mut mat = Tape::on_device(dt, &dev);
        mat.set_attention_path(lathe_autograd::AttentionPath::Materialized);
        let b = run(&mut mat, dt, &inputs, &w, build);
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        check_close("flash vs materialised y", &f(&a.out), &f(&b.out), tol(dt)).unwrap();
        let (ga, gb) = (a.grads[0].as_ref().unwrap(), b.grads[0].as_ref().unwrap());
        check_close("flash vs materialised dqkv", &f(ga), &f(gb), tol(dt)).unwrap();
    }
    // Asking for the fused path with a head size its kernels do not take is an error.
    let mut t = Tape::on_device(DType::BF16, &dev);
    t.set_attention_path(lathe_autograd::AttentionPath::Flash);
    let x = Tensor::new(vec![1, 3, 36], vec![0.5; 108], DType::BF16).unwrap();
    let x = t.leaf(x, false).unwrap();
    let e = t.attention(x, 3).unwrap_err().to_string();
    assert!(e.contains("head size 4"), "{e}");
}

#[test]
fn embedding_and_cross_entropy() {
    let ids: Vec<u32> = vec![3, 0, 6, 3, 1, 6, 2];
    check("embedding", &[(&[7, 5], true)], &move |t, v| {
        t.embedding(v[0], &ids, &[7])
    });
    let targets: Vec<u32> = vec![1, IGNORE_INDEX, 8, 0, 4];
    check("cross_entropy", &[(&[5, 11], true)], &move |t, v| {
        t.cross_entropy(v[0], &targets, 9, IGNORE_INDEX)
    });
}

#[test]
fn shape_ops() {
    check("reshape", &[(&[3, 8], true)], &|t, v| {
        t.reshape(v[0], &[6, 4])
    });
    check("transpose", &[(&[2, 3, 4, 5], true)], &|t, v| {
        t.transpose(v[0], 1, 3)
    });
    check("split", &[(&[3, 9, 2], true)], &|t, v| {
        let parts = t.split(v[0], 1, &[2, 4, 3])?;
        // Use two of the three parts (the third gets no gradient).
        t.add(parts[0], parts[0])?;
        let a = t.scale(parts[2], 2.0)?;
        t.concat(&[parts[1], a], 1)
    });
    check(
        "concat",
        &[(&[2, 3, 5], true), (&[2, 4, 5], true)],
        &|t, v| t.concat(&[v[0], v[1]], 1),
    );
    check("sum", &[(&[3, 7], true)], &|t, v| t.sum(v[0]));
    check("mean", &[(&[3, 7], true)], &|t, v| t.mean(v[0]));
}
