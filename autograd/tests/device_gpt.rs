//! The GPT written once, run on the device (a GPU, else the simulated device) against the CPU
//! tape: loss and every parameter gradient, in f32, bf16 and f16; recomputation on the device
//! is bitwise neutral and lowers the peak; a sharded store (ZeRO stage 3) gathers each
//! parameter when the forward first uses it and, with block recomputation, drops a block's
//! parameters after its forward and gathers them again for its backward, bit for bit; greedy
//! decoding runs on the device.
//!
//! Tolerances: the loss within 1e-5 relative in f32 and 1e-2 in bf16/f16 (the loss is an f32
//! mean over rows of 16-bit logits; the two backends round the logits at the same point but
//! reach them through differently ordered 16-bit activations, each step worth one rounding of
//! 2^-8); the whole gradient within the relative Frobenius bound of the dtype (1e-5 f32) and
//! 2e-2 for the 16-bit runs, whose gradients pass through every layer's roundings twice
//! (forward and backward) on both sides — the CPU reference emulates the same storage, so
//! that is what separates them, not a missing rounding.

use half::bf16;
use lathe_autograd::{DType, DevBuf, Gpt, GptConfig, ParamGatherHook, ParamStore, Recompute, Tape};
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::rel_frobenius_error;
use std::ops::Range;
use std::sync::{Arc, Mutex};

fn config() -> GptConfig {
    GptConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
    }
}

fn batch(seed: u64, b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let tokens = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    let targets = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
    (tokens, targets)
}

fn device() -> lathe_host::Device {
    lathe_autograd::device::set_poison_allocations(true);
    lathe_host::testing::test_device("autograd device gpt")
}

fn host_params(gpt: &Gpt, dt: DType) -> ParamStore {
    let mut p = gpt.init_params(7);
    p.sync_working(dt);
    p
}

fn device_params(gpt: &Gpt, dt: DType, dev: &lathe_host::Device) -> ParamStore {
    let mut p = gpt.init_params(7);
    p.to_device(dev).unwrap();
    p.sync_working_device(dt).unwrap();
    p
}

#[test]
fn loss_and_gradients_match_the_cpu() {
    let dev = device();
    let gpt = Gpt::new(config()).unwrap();
    let (b, t) = (2, 11);
    let (tokens, targets) = batch(3, b, t, 50);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let mut hp = host_params(&gpt, dt);
        let mut tape = Tape::new(dt);
        let loss = gpt
            .loss(&mut tape, &hp, &tokens, &targets, b, t, Recompute::None)
            .unwrap();
        let cpu_loss = tape.scalar(loss).unwrap();
        tape.backward(loss, 1.0, &mut hp).unwrap();

        let mut dp = device_params(&gpt, dt, &dev);
        let mut dtape = Tape::on_device(dt, &dev);
        let loss = gpt
            .loss(&mut dtape, &dp, &tokens, &targets, b, t, Recompute::None)
            .unwrap();
        let dev_loss = dtape.scalar(loss).unwrap();
        dtape.backward(loss, 1.0, &mut dp).unwrap();
        dp.fetch_from_device().unwrap();

        let (ltol, gtol) = if dt == DType::F32 {
            (1e-5, 1e-5)
        } else {
            (1e-2, 2e-2)
        };
        let rel = ((dev_loss - cpu_loss) / cpu_loss).abs() as f64;
        assert!(
            rel <= ltol,
            "{dt}: device loss {dev_loss} vs cpu {cpu_loss} ({rel:.2e})"
        );
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert!(dp.grads().iter().all(|g| g.is_finite()), "{dt}: non-finite");
        for v in hp.views() {
            let e = rel_frobenius_error(&f(&dp.grads()[v.range()]), &f(&hp.grads()[v.range()]));
            assert!(e <= gtol, "{dt}: gradient of {} off by {e:.2e}", v.name);
        }
    }
}

#[test]
fn recomputation_is_bitwise_neutral_and_lowers_the_peak_on_the_device() {
    let dev = device();
    let gpt = Gpt::new(config()).unwrap();
    let (b, t) = (2, 16);
    let (tokens, targets) = batch(5, b, t, 50);
    let mut results = Vec::new();
    for policy in Recompute::ALL {
        let mut p = device_params(&gpt, DType::BF16, &dev);
        let mut tape = Tape::on_device(DType::BF16, &dev);
        dev.synchronize().unwrap();
        dev.reset_peak_memory();
        let loss = gpt
            .loss(&mut tape, &p, &tokens, &targets, b, t, policy)
            .unwrap();
        tape.backward(loss, 1.0, &mut p).unwrap();
        let l = tape.scalar(loss).unwrap();
        let device_peak = dev.memory_stats().peak_allocated;
        p.fetch_from_device().unwrap();
        results.push((
            policy,
            l.to_bits(),
            p.grads().iter().map(|g| g.to_bits()).collect::<Vec<_>>(),
            tape.peak_activation_bytes(),
            device_peak,
        ));
    }
    let (_, l0, g0, peak0, dpeak0) = &results[0];
    for (policy, l, g, peak, dpeak) in &results[1..] {
        assert_eq!(l, l0, "{policy:?}: loss differs from no recomputation");
        assert!(
            g == g0,
            "{policy:?}: gradients differ from no recomputation"
        );
        assert!(
            peak < peak0,
            "{policy:?}: tape peak {peak} not below {peak0}"
        );
        assert!(
            dpeak < dpeak0,
            "{policy:?}: device allocator peak {dpeak} not below {dpeak0}"
        );
    }
}

#[test]
fn a_sharded_store_gathers_parameters_as_used_and_again_for_recomputed_blocks() {
    let dev = device();
    let gpt = Gpt::new(config()).unwrap();
    let (b, t) = (2, 16);
    let (tokens, targets) = batch(9, b, t, 50);
    let dt = DType::BF16;
    // The reference: the whole working copy on the device.
    let mut full = device_params(&gpt, dt, &dev);
    let mut tape = Tape::on_device(dt, &dev);
    let loss = gpt
        .loss(&mut tape, &full, &tokens, &targets, b, t, Recompute::Block)
        .unwrap();
    tape.backward(loss, 1.0, &mut full).unwrap();
    let ref_loss = tape.scalar(loss).unwrap().to_bits();
    let all_param_bytes = tape.param_bytes();
    assert_eq!(tape.peak_param_bytes(), all_param_bytes);
    full.fetch_from_device().unwrap();

    // The sharded store: the working copy lives elsewhere (here, one bf16 host vector) and
    // the hook copies the asked range into the leaf, counting the elements it moved.
    let mut sharded = gpt.init_params(7);
    sharded.sync_working(dt);
    let source: Vec<bf16> = sharded
        .working()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let gathered = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&gathered);
    let hook: ParamGatherHook = Arc::new(move |range, out: &mut DevBuf| {
        log.lock().unwrap().push(range.clone());
        match out {
            DevBuf::Bf16(o) => o.copy_from_host(&source[range]).map_err(|e| e.to_string()),
            _ => Err("expected a bf16 leaf".into()),
        }
    });
    sharded.to_device_sharded(&dev, hook).unwrap();
    let n = sharded.num_params();
    let mut tape = Tape::on_device(dt, &dev);
    let loss = gpt
        .loss(
            &mut tape,
            &sharded,
            &tokens,
            &targets,
            b,
            t,
            Recompute::Block,
        )
        .unwrap();
    let forward: Vec<Range<usize>> = std::mem::take(&mut *gathered.lock().unwrap());
    tape.backward(loss, 1.0, &mut sharded).unwrap();
    let backward: Vec<Range<usize>> = std::mem::take(&mut *gathered.lock().unwrap());
    assert_eq!(tape.scalar(loss).unwrap().to_bits(), ref_loss);
    sharded.fetch_from_device().unwrap();
    assert!(
        sharded
            .grads()
            .iter()
            .zip(full.grads())
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the sharded store's gradients differ from the full store's"
    );
    // Every parameter once in the forward, in layout order.
    let views = sharded.views().to_vec();
    let all: Vec<Range<usize>> = views.iter().map(|v| v.range()).collect();
    assert_eq!(forward, all, "the forward's gathers");
    // Again for the backward: the blocks' parameters whose values a gradient needs (every
    // weight matrix: the input gradients read it), each once; nothing outside the blocks.
    let in_block = |r: &Range<usize>| {
        views
            .iter()
            .any(|v| v.range() == *r && v.name.starts_with("h."))
    };
    assert!(backward.iter().all(in_block), "{backward:?}");
    let mut unique = backward.clone();
    unique.sort_by_key(|r| r.start);
    unique.dedup();
    assert_eq!(unique.len(), backward.len(), "a parameter gathered twice");
    for v in views
        .iter()
        .filter(|v| v.name.starts_with("h.") && v.name.ends_with("weight") && v.shape.len() == 2)
    {
        assert!(
            backward.contains(&v.range()),
            "{} not gathered again",
            v.name
        );
    }
    let block_params: usize = views
        .iter()
        .filter(|v| v.name.starts_with("h."))
        .map(|v| v.numel())
        .sum();
    // At most the parameters outside the blocks plus one block's are held at once.
    let per_block = block_params / config().n_layer * dt.size_of();
    let outside = (n - block_params) * dt.size_of();
    eprintln!(
        "parameter leaves: peak {} of {all_param_bytes} bytes (outside blocks {outside}, one \
         block {per_block})",
        tape.peak_param_bytes()
    );
    assert!(tape.peak_param_bytes() <= outside + per_block);
    assert!(tape.peak_param_bytes() < all_param_bytes);
}

#[test]
fn greedy_decoding_runs_on_the_device() {
    let dev = device();
    let gpt = Gpt::new(config()).unwrap();
    let host = host_params(&gpt, DType::F32);
    let dp = device_params(&gpt, DType::F32, &dev);
    let prompt = [1u32, 4, 9];
    let cpu = gpt.generate_greedy(&host, &prompt, 5, None).unwrap();
    let gpu = gpt.generate_greedy(&dp, &prompt, 5, None).unwrap();
    assert_eq!(gpu.len(), 5);
    assert_eq!(
        gpu, cpu,
        "f32 greedy decoding differs between device and CPU"
    );
}

#[test]
fn a_host_store_on_a_device_tape_is_a_clear_error() {
    let dev = device();
    let gpt = Gpt::new(config()).unwrap();
    let p = host_params(&gpt, DType::F32);
    let mut tape = Tape::on_device(DType::F32, &dev);
    let (tokens, targets) = batch(1, 1, 4, 50);
    let e = gpt
        .loss(&mut tape, &p, &tokens, &targets, 1, 4, Recompute::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("to_device"), "{e}");
}
