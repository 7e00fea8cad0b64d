//! The memory-bound training kernels at GPT-2 124M shapes, in GB/s of the bytes each kernel
//! must move (its descriptor's `Cost::bytes`), next to a device-to-device copy of the same
//! order of size (`cuMemcpyDtoD`, the bandwidth ceiling) measured in the same run.
//!
//!     cargo bench -p lathe-benches --bench nn
//!
//! Shapes: 124,475,904 parameters (llm.c's GPT-2 124M with V padded to 50304), B=16, T=1024,
//! C=768, 12 heads, bf16 activations. Inputs are random (never zeros); every buffer is far
//! larger than L2 except the small ones named as such. Peers: PyTorch's fused AdamW and its
//! `_amp_foreach_non_finite_check_and_unscale_` over the same parameter count, measured by
//! `shared/peer/torch_gpt2_anchors.py` on the same machine (1.342 ms for AdamW on the H100 it
//! was last run on: 28 B/param, about 2.6 TB/s).

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use lathe_benches::{device_or_skip, time_with_events};
use lathe_host::nn_ops::{AdamWLaunch, ClassifierShape, WorkingCopyMut};
use lathe_host::{Device, DeviceBuffer, Stream};
use lathe_kernels::nn::adamw::{self, DecayRanges, Working};
use lathe_kernels::nn::amp::{self, StepState};
use lathe_kernels::nn::{attention, classifier, embedding, layernorm, pointwise};
use lathe_kernels::rng::Rng;
use lathe_kernels::{Elem, KernelDesc, Problem};

const PARAMS: usize = 124_475_904;
const B: usize = 16;
const T: usize = 1024;
const C: usize = 768;
const V: usize = 50257;
const VP: usize = 50304;
const HEADS: usize = 12;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn bytes(k: &KernelDesc, p: &Problem) -> Throughput {
    Throughput::Bytes((k.cost)(p).bytes)
}

fn bf16_random(dev: &Device, rng: &mut Rng, n: usize, lo: f32, hi: f32) -> DeviceBuffer<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.range_f32(lo, hi)))
        .collect();
    dev.htod(&v).expect("upload")
}

fn run(g: &mut Group<'_>, s: &Stream, name: &str, mut f: impl FnMut() -> lathe_host::Result<()>) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| time_with_events(s, iters, &mut f))
    });
}

fn optimizer(g: &mut Group<'_>, dev: &Device, s: &Stream, rng: &mut Rng) {
    let n = PARAMS;
    let up = |rng: &mut Rng, lo, hi| dev.htod(&rng.vec_f32(n, lo, hi)).expect("upload");
    let mut master = up(rng, -0.1, 0.1);
    let mut grads = up(rng, -1.0, 1.0);
    let mut m = up(rng, -0.01, 0.01);
    let mut v = up(rng, 1e-8, 1e-4);
    let mut working = dev.alloc::<bf16>(n).expect("alloc");
    // GPT-2's convention: matrices decay, biases and gains do not (a few hundred ranges).
    let ranges = DecayRanges::merged((0..148u64).map(|k| {
        let start = k * (n as u64 / 148);
        start..start + (n as u64 / 148) * 3 / 4
    }))
    .expect("ranges");
    let dr = dev.upload_decay_ranges(&ranges).expect("ranges");
    let mut state = dev.step_state(&StepState::new(1.0)).expect("state");
    let l = AdamWLaunch {
        lr: 6e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        offset: 0,
        seed: 7,
        unscale: true,
    };
    let p = Problem::elems(n as u64);

    let mut copy_dst = dev.alloc::<f32>(n).expect("alloc");
    g.throughput(Throughput::Bytes(8 * n as u64));
    run(g, s, "copy_d2d_f32 124.5M (peer: cuMemcpyDtoD)", || {
        grads.copy_to(&mut copy_dst)
    });
    for (w, name) in [
        (
            Working::None,
            "adamw_f32 124.5M (peer: torch fused AdamW 1.342 ms)",
        ),
        (Working::Bf16, "adamw_f32_bf16 124.5M"),
        (Working::Bf16Stochastic, "adamw_f32_bf16_sr 124.5M"),
    ] {
        g.throughput(bytes(adamw::kernel_for(w), &p));
        run(g, s, name, || {
            let wc = match w {
                Working::None => WorkingCopyMut::None,
                Working::Bf16 => WorkingCopyMut::Bf16(&mut working),
                _ => WorkingCopyMut::Bf16Stochastic(&mut working),
            };
            dev.adamw_step(&mut master, &grads, &mut m, &mut v, wc, &dr, &state, &l)
        });
    }
    g.throughput(bytes(&amp::UNSCALE_CHECK_NORM_F32, &p));
    run(
        g,
        s,
        "grad_unscale_check_norm 124.5M (peer: torch unscale check)",
        || dev.grad_unscale_check_norm(&mut grads, &mut state, 1.0),
    );
    g.throughput(bytes(&amp::CHECK_NORM_F32, &p));
    run(g, s, "grad_check_norm 124.5M", || {
        dev.grad_check_norm(&grads, &mut state, 1.0)
    });
}

fn layers(g: &mut Group<'_>, dev: &Device, s: &Stream, rng: &mut Rng) {
    let rows = B * T;
    let x = bf16_random(dev, rng, rows * C, -2.0, 2.0);
    let w = bf16_random(dev, rng, C, 0.5, 1.5);
    let bias = bf16_random(dev, rng, C, -0.5, 0.5);
    let mut out = dev.alloc::<bf16>(rows * C).expect("alloc");
    let mut mean = dev.alloc::<f32>(rows).expect("alloc");
    let mut rstd = dev.alloc::<f32>(rows).expect("alloc");
    let lp = Problem {
        batch: rows as u64,
        n: C as u64,
        ..Problem::default()
    };
    let fwd = layernorm::forward_for(Elem::BF16).expect("kernel");
    g.throughput(bytes(fwd, &lp));
    run(g, s, "layernorm_fwd_bf16 16384x768", || {
        dev.layernorm_forward(&x, &w, &bias, &mut out, &mut mean, &mut rstd, C, 1e-5)
    });
    let dout = bf16_random(dev, rng, rows * C, -1.0, 1.0);
    let mut dx = dev.alloc::<bf16>(rows * C).expect("alloc");
    let mut dw = dev.htod(&rng.vec_f32(C, -1.0, 1.0)).expect("upload");
    let mut db = dev.htod(&rng.vec_f32(C, -1.0, 1.0)).expect("upload");
    g.throughput(bytes(
        layernorm::backward_for(Elem::BF16).expect("kernel"),
        &lp,
    ));
    run(g, s, "layernorm_bwd_bf16 16384x768 (+ colsum)", || {
        dev.layernorm_backward(&dout, &x, &w, &mean, &rstd, &mut dx, &mut dw, &mut db, C)
    });

    let n = rows * 4 * C;
    let h = bf16_random(dev, rng, n, -4.0, 4.0);
    let dh = bf16_random(dev, rng, n, -1.0, 1.0);
    let mut gh = dev.alloc::<bf16>(n).expect("alloc");
    let pe = Problem::elems(n as u64);
    g.throughput(bytes(
        pointwise::gelu_fwd_for(Elem::BF16).expect("kernel"),
        &pe,
    ));
    run(g, s, "gelu_fwd_bf16 16384x3072", || {
        dev.gelu_forward(&h, &mut gh)
    });
    g.throughput(bytes(
        pointwise::gelu_bwd_for(Elem::BF16).expect("kernel"),
        &pe,
    ));
    run(g, s, "gelu_bwd_bf16 16384x3072", || {
        dev.gelu_backward(&h, &dh, &mut gh)
    });
    let pr = Problem::elems((rows * C) as u64);
    g.throughput(bytes(
        pointwise::residual_add_for(Elem::BF16).expect("kernel"),
        &pr,
    ));
    run(g, s, "residual_add_bf16 16384x768", || {
        dev.residual_add(&x, &dout, &mut out)
    });
    g.throughput(bytes(
        pointwise::bias_add_for(Elem::BF16).expect("kernel"),
        &lp,
    ));
    run(g, s, "bias_add_bf16 16384x768", || {
        dev.bias_add(&x, &bias, &mut out, C)
    });

    let tokens: Vec<i32> = (0..rows).map(|_| rng.below(V as u64) as i32).collect();
    let dtok = dev.htod(&tokens).expect("upload");
    let wte = bf16_random(dev, rng, VP * C, -0.1, 0.1);
    let wpe = bf16_random(dev, rng, T * C, -0.1, 0.1);
    let ep = Problem {
        batch: rows as u64,
        n: C as u64,
        m: T as u64,
        k: VP as u64,
    };
    g.throughput(bytes(
        embedding::forward_for(Elem::BF16).expect("kernel"),
        &ep,
    ));
    run(g, s, "embedding_fwd_bf16 16384x768", || {
        dev.embedding_forward(&dtok, &wte, &wpe, &mut out, T, C)
    });
    let mut dwte = dev.htod(&rng.vec_f32(VP * C, -0.01, 0.01)).expect("upload");
    let mut dwpe = dev.htod(&rng.vec_f32(T * C, -0.01, 0.01)).expect("upload");
    g.throughput(bytes(
        embedding::backward_tok_for(Elem::BF16).expect("kernel"),
        &ep,
    ));
    run(
        g,
        s,
        "embedding_bwd_bf16 16384x768 V=50304 (tok + pos)",
        || dev.embedding_backward(&dtok, &dout, &mut dwte, &mut dwpe, T, C),
    );
}

fn big_rows(g: &mut Group<'_>, dev: &Device, s: &Stream, rng: &mut Rng) {
    let rows = B * T;
    let logits = bf16_random(dev, rng, rows * VP, -4.0, 4.0);
    let mut dlogits = dev.alloc::<bf16>(rows * VP).expect("alloc");
    let mut losses = dev.alloc::<f32>(rows).expect("alloc");
    let targets: Vec<i32> = (0..rows).map(|_| rng.below(V as u64) as i32).collect();
    let dt = dev.htod(&targets).expect("upload");
    let state = dev.step_state(&StepState::new(1.0)).expect("state");
    let shape = ClassifierShape {
        vp: VP,
        v: V,
        ignore_index: -100,
        dloss: 1.0 / rows as f32,
    };
    let cp = Problem {
        batch: rows as u64,
        n: VP as u64,
        k: V as u64,
        m: 1,
    };
    g.throughput(bytes(
        classifier::kernel_for(Elem::BF16).expect("kernel"),
        &cp,
    ));
    run(g, s, "classifier_xent_bf16 16384x50304", || {
        dev.fused_classifier(&logits, &mut dlogits, &mut losses, &dt, &state, &shape)
    });
    drop((logits, dlogits));

    let bh = B * HEADS;
    let n = bh * T * T;
    let scores = bf16_random(dev, rng, n, -4.0, 4.0);
    let mut probs = dev.alloc::<bf16>(n).expect("alloc");
    let ap = Problem {
        batch: bh as u64,
        n: T as u64,
        ..Problem::default()
    };
    let scale = 1.0 / 8.0;
    g.throughput(bytes(
        attention::forward_for(Elem::BF16).expect("kernel"),
        &ap,
    ));
    run(g, s, "attn_softmax_fwd_bf16 192x1024x1024", || {
        dev.attention_softmax_forward(&scores, &mut probs, bh, T, scale)
    });
    let mut dprobs = bf16_random(dev, rng, n, -1.0, 1.0);
    g.throughput(bytes(
        attention::backward_for(Elem::BF16).expect("kernel"),
        &ap,
    ));
    run(
        g,
        s,
        "attn_softmax_bwd_bf16 192x1024x1024 (in place)",
        || dev.attention_softmax_backward_in_place(&probs, &mut dprobs, bh, T, scale),
    );
}

fn bench(c: &mut Criterion) {
    let Some(dev) = device_or_skip("nn") else {
        return;
    };
    let s = dev.compute_stream().clone();
    let mut rng = Rng::new(0x6E6E);
    let mut g = c.benchmark_group(format!("nn/{}", dev.name()));
    g.sample_size(20);
    optimizer(&mut g, &dev, &s, &mut rng);
    layers(&mut g, &dev, &s, &mut rng);
    big_rows(&mut g, &dev, &s, &mut rng);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
