//! GPT model: layout, initialisation, loss at init, full-model gradient check, accumulation,
//! determinism, overfitting a fixed batch, greedy decoding, errors.

mod common;

use common::{FD_ATOL, FD_RTOL, FD_STEP, bits};
use lathe_autograd::{DType, Error, Gpt, GptConfig, IGNORE_INDEX, ParamStore, Recompute, Tape};
use lathe_kernels::rng::Rng;

fn micro_config() -> GptConfig {
    GptConfig {
        vocab_size: 11,
        padded_vocab_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
    }
}

fn batch(rng: &mut Rng, b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    (tokens, targets)
}

#[test]
fn parameters_follow_the_hugging_face_layout() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let p = gpt.init_params(1);
    assert_eq!(p.num_params(), cfg.num_params());
    let c = cfg.n_embd;
    let expect: [(&str, Vec<usize>, bool); 8] = [
        ("wte.weight", vec![cfg.padded_vocab_size, c], true),
        ("wpe.weight", vec![cfg.block_size, c], true),
        ("h.0.ln_1.weight", vec![c], false),
        ("h.0.attn.c_attn.weight", vec![c, 3 * c], true),
        ("h.1.attn.c_proj.bias", vec![c], false),
        ("h.2.mlp.c_fc.weight", vec![c, 4 * c], true),
        ("h.3.mlp.c_proj.weight", vec![4 * c, c], true),
        ("ln_f.bias", vec![c], false),
    ];
    for (name, shape, decay) in expect {
        let v = p.view(name).unwrap();
        assert_eq!(v.shape, shape, "{name}");
        assert_eq!(v.decay, decay, "{name}");
    }
    // Contiguous, in order, no gaps.
    let mut off = 0;
    for v in p.views() {
        assert_eq!(v.offset, off, "{}", v.name);
        off += v.numel();
        assert_eq!(v.decay, v.shape.len() == 2, "{}", v.name);
    }
    assert_eq!(off, p.num_params());
    assert_eq!(p.views().len(), 2 + 12 * cfg.n_layer + 2);
}

#[test]
fn initialisation_is_gpt2_and_seeded() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let p = gpt.init_params(7);
    let std =
        |xs: &[f32]| (xs.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
    let fc = p.param("h.0.mlp.c_fc.weight").unwrap();
    assert!((std(fc) - 0.02).abs() < 0.001, "c_fc std {}", std(fc));
    let proj = p.param("h.0.mlp.c_proj.weight").unwrap();
    let want = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    assert!(
        (std(proj) - want).abs() < 0.001,
        "c_proj std {} want {want}",
        std(proj)
    );
    assert!(
        p.param("h.1.ln_2.weight")
            .unwrap()
            .iter()
            .all(|&x| x == 1.0)
    );
    assert!(p.param("h.1.ln_2.bias").unwrap().iter().all(|&x| x == 0.0));
    assert!(
        p.param("h.1.attn.c_attn.bias")
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
    assert_eq!(p.working(), p.master());
    assert_eq!(bits(gpt.init_params(7).master()), bits(p.master()));
    assert_ne!(bits(gpt.init_params(8).master()), bits(p.master()));
    let padded = GptConfig::tiny().with_vocab_size(13);
    let q = Gpt::new(padded.clone()).unwrap().init_params(1);
    let wte = q.param("wte.weight").unwrap();
    assert!(
        wte[13 * padded.n_embd..].iter().all(|&x| x == 0.0),
        "padding rows are zero"
    );
}

#[test]
fn loss_at_init_is_log_vocab() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let params = gpt.init_params(3);
    let mut rng = Rng::new(3);
    let (tokens, targets) = batch(&mut rng, 4, 32, cfg.vocab_size);
    let mut tape = Tape::new(DType::F32);
    let loss = gpt
        .loss(
            &mut tape,
            &params,
            &tokens,
            &targets,
            4,
            32,
            Recompute::None,
        )
        .unwrap();
    let l = tape.scalar(loss).unwrap();
    let ln_v = (cfg.vocab_size as f32).ln();
    assert!((l - ln_v).abs() < 0.05, "loss {l} vs ln(vocab) {ln_v}");
}

/// Full-model gradient check in f64 through the ParamStore (tied embedding, every block op,
/// padded vocabulary, ignored targets), for each recompute policy.
#[test]
fn whole_model_gradients_match_finite_differences() {
    let cfg = micro_config();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let mut params: ParamStore<f64> = gpt.init_params(5).cast();
    // Larger weights than at init so that every path contributes visibly.
    let mut rng = Rng::new(9);
    for x in params.master_mut() {
        *x += 0.3 * rng.normal() as f64;
    }
    params.sync_working(DType::F32);
    let (b, t) = (2, 5);
    let (tokens, mut targets) = batch(&mut rng, b, t, cfg.vocab_size);
    targets[3] = IGNORE_INDEX;
    let loss_at = |p: &ParamStore<f64>| {
        let mut tape = Tape::<f64>::with_dtype(DType::F32);
        let l = gpt
            .loss(&mut tape, p, &tokens, &targets, b, t, Recompute::None)
            .unwrap();
        tape.scalar(l).unwrap()
    };
    let mut reference: Option<Vec<f64>> = None;
    for policy in Recompute::ALL {
        let mut p = params.clone();
        p.zero_grads();
        let mut tape = Tape::<f64>::with_dtype(DType::F32);
        let l = gpt
            .loss(&mut tape, &p, &tokens, &targets, b, t, policy)
            .unwrap();
        tape.backward(l, 1.0, &mut p).unwrap();
        match &reference {
            None => reference = Some(p.grads().to_vec()),
            Some(r) => assert!(
                r.iter()
                    .zip(p.grads())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{policy}"
            ),
        }
    }
    let analytic = reference.unwrap();
    let wte_rows_used = cfg.vocab_size * cfg.n_embd;
    for (i, &a) in analytic.iter().enumerate() {
        let mut p = params.clone();
        p.master_mut()[i] += FD_STEP;
        p.sync_working(DType::F32);
        let up = loss_at(&p);
        p.master_mut()[i] -= 2.0 * FD_STEP;
        p.sync_working(DType::F32);
        let down = loss_at(&p);
        let numeric = (up - down) / (2.0 * FD_STEP);
        let err = (a - numeric).abs() / (FD_ATOL + FD_RTOL * numeric.abs());
        assert!(
            err <= 1.0,
            "param element {i}: analytic {} numeric {numeric}",
            a
        );
        if (wte_rows_used..cfg.padded_vocab_size * cfg.n_embd).contains(&i) {
            assert_eq!(a, 0.0, "padding rows of wte get no gradient");
        }
    }
}

fn run_grads(
    gpt: &Gpt,
    params: &mut ParamStore,
    tokens: &[u32],
    targets: &[u32],
    b: usize,
    t: usize,
) -> f32 {
    let mut tape = Tape::new(params.working_dtype());
    let l = gpt
        .loss(&mut tape, params, tokens, targets, b, t, Recompute::None)
        .unwrap();
    let v = tape.scalar(l).unwrap();
    tape.backward(l, 1.0, params).unwrap();
    v
}

#[test]
fn accumulating_micro_batches_equals_one_large_batch() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let (k, b, t) = (4, 2, 16);
    let mut rng = Rng::new(11);
    let (tokens, targets) = batch(&mut rng, k * b, t, cfg.vocab_size);

    let mut big = gpt.init_params(2);
    let big_loss = run_grads(&gpt, &mut big, &tokens, &targets, k * b, t);

    let mut acc = gpt.init_params(2);
    let mut tape = Tape::new(DType::F32);
    let mut acc_loss = 0.0;
    for i in 0..k {
        tape.clear();
        let r = i * b * t..(i + 1) * b * t;
        let l = gpt
            .loss(
                &mut tape,
                &acc,
                &tokens[r.clone()],
                &targets[r],
                b,
                t,
                Recompute::None,
            )
            .unwrap();
        acc_loss += tape.scalar(l).unwrap() / k as f32;
        tape.backward(l, 1.0 / k as f32, &mut acc).unwrap();
    }
    // f32 tolerance: the two computations sum the same terms in different orders (one GEMM
    // reduction over 128 rows vs four over 32 plus three additions), so they agree to a few
    // ulps of the gradient magnitudes: relative Frobenius error per parameter under 1e-5.
    assert!(
        (acc_loss - big_loss).abs() <= 1e-5 * big_loss,
        "{acc_loss} vs {big_loss}"
    );
    for v in big.views() {
        let (g1, g2) = (&big.grads()[v.range()], &acc.grads()[v.range()]);
        let num: f64 = g1
            .iter()
            .zip(g2)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = g1.iter().map(|a| (*a as f64).powi(2)).sum();
        if den == 0.0 {
            assert_eq!(num, 0.0, "{}", v.name);
            continue;
        }
        assert!(
            (num / den).sqrt() < 1e-5,
            "{}: relative error {}",
            v.name,
            (num / den).sqrt()
        );
    }
    // Parameter gradients accumulate (+=): a second backward doubles them.
    let before = big.grads().to_vec();
    run_grads(&gpt, &mut big, &tokens, &targets, k * b, t);
    for (a, b) in before.iter().zip(big.grads()) {
        assert_eq!(2.0 * a, *b);
    }
}

#[test]
fn runs_are_bitwise_deterministic() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let mut rng = Rng::new(12);
    let (tokens, targets) = batch(&mut rng, 8, 32, cfg.vocab_size);
    let run = || {
        let mut p = gpt.init_params(4);
        let l = run_grads(&gpt, &mut p, &tokens, &targets, 8, 32);
        (l.to_bits(), bits(p.grads()))
    };
    let a = run();
    let b = run();
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1, "gradients differ between two identical runs");
    // The work split does not depend on the number of threads either.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let c = pool.install(run);
        assert_eq!(a.0, c.0, "{threads} threads");
        assert!(a.1 == c.1, "gradients differ with {threads} threads");
    }
}

#[test]
fn tiny_gpt_overfits_a_fixed_batch_and_then_decodes_it() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let mut params = gpt.init_params(0);
    let (b, t) = (2, 16);
    // Two fixed sequences; targets are the next token.
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|s| {
            (0..=t)
                .map(|i| ((i * 7 + s * 3) % 23 + 40) as u32)
                .collect()
        })
        .collect();
    let tokens: Vec<u32> = seqs.iter().flat_map(|s| s[..t].to_vec()).collect();
    let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
    let mut tape = Tape::new(DType::F32);
    let mut momentum = vec![0f32; params.num_params()];
    let (lr, mu) = (0.05f32, 0.9f32);
    let mut losses = Vec::new();
    for _ in 0..30 {
        tape.clear();
        params.zero_grads();
        let l = gpt
            .loss(&mut tape, &params, &tokens, &targets, b, t, Recompute::None)
            .unwrap();
        losses.push(tape.scalar(l).unwrap());
        tape.backward(l, 1.0, &mut params).unwrap();
        let (master, grads) = params.master_and_grads_mut();
        for ((w, g), m) in master.iter_mut().zip(grads.iter()).zip(momentum.iter_mut()) {
            *m = mu * *m + g;
            *w -= lr * *m;
        }
        params.sync_working(DType::F32);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!(
        "overfit: loss {first:.3} -> {last:.4} in {} steps",
        losses.len()
    );
    assert!(
        last < 0.05 * first,
        "loss only went from {first} to {last}: {losses:?}"
    );
    // Greedy decoding reproduces the memorised continuation.
    let prompt = &seqs[0][..8];
    let out = gpt.generate_greedy(&params, prompt, 8, None).unwrap();
    assert_eq!(out, seqs[0][8..16].to_vec());
    let stop = seqs[0][11];
    let out = gpt.generate_greedy(&params, prompt, 8, Some(stop)).unwrap();
    assert_eq!(out, seqs[0][8..11].to_vec(), "stops before the stop token");
    let both = gpt
        .generate_greedy_batch(&params, &[&seqs[0][..8], &seqs[1][..8]], 4, None)
        .unwrap();
    assert_eq!(both[1], seqs[1][8..12].to_vec());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = GptConfig::tiny();
    let gpt = Gpt::new(cfg.clone()).unwrap();
    let mut params = gpt.init_params(0);
    let mut tape = Tape::new(DType::F32);
    let long = vec![1u32; cfg.block_size + 1];
    let e = gpt
        .loss(
            &mut tape,
            &params,
            &long,
            &long,
            1,
            cfg.block_size + 1,
            Recompute::None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("block_size"), "{e}");
    let e = gpt
        .loss(
            &mut tape,
            &params,
            &[1, 999],
            &[1, 1],
            1,
            2,
            Recompute::None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("position 1"), "{e}");
    let e = gpt
        .loss(
            &mut tape,
            &params,
            &[1, 2],
            &[1, 999],
            1,
            2,
            Recompute::None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("target 999"), "{e}");
    params.sync_working(DType::BF16);
    let e = gpt
        .loss(&mut tape, &params, &[1, 2], &[1, 2], 1, 2, Recompute::None)
        .unwrap_err();
    assert!(
        matches!(e, Error::Params(_)) && e.to_string().contains("sync_working"),
        "{e}"
    );
    assert!(Gpt::new(GptConfig { n_head: 5, ..cfg }).is_err());
}
