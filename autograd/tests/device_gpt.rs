//! The GPT written once, run on the device (a GPU, else the simulated device) against the CPU
//! tape: loss and every parameter gradient, in f32, bf16 and f16; recomputation on the device
//! is bitwise neutral and lowers the peak; greedy decoding runs on the device.
//!
//! Tolerances: the loss within 1e-5 relative in f32 and 1e-2 in bf16/f16 (the loss is an f32
//! mean over rows of 16-bit logits; the two backends round the logits at the same point but
//! reach them through differently ordered 16-bit activations, each step worth one rounding of
//! 2^-8); the whole gradient within the relative Frobenius bound of the dtype (1e-5 f32) and
//! 2e-2 for the 16-bit runs, whose gradients pass through every layer's roundings twice
//! (forward and backward) on both sides — the CPU reference emulates the same storage, so
//! that is what separates them, not a missing rounding.

use lathe_autograd::{DType, Gpt, GptConfig, ParamStore, Recompute, Tape};
use lathe_kernels::rng::Rng;
use lathe_kernels::tolerance::rel_frobenius_error;

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
