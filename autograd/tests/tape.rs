//! Tape mechanics: handles, phases, autocast storage, gradient accumulation rules, memory
//! accounting, dry runs.

use lathe_autograd::{DType, Device, Error, ParamSpec, ParamStore, Tape, Tensor};

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::from_vec(shape.to_vec(), data).unwrap()
}

fn is_bf16(x: f32) -> bool {
    DType::BF16.round(x) == x
}

#[test]
fn vars_are_tied_to_their_tape_and_clear() {
    let mut a = Tape::new(DType::F32);
    let mut b = Tape::new(DType::F32);
    let x = a.input(t(&[2], vec![1.0, 2.0])).unwrap();
    assert!(matches!(b.relu(x), Err(Error::ForeignVar { .. })));
    a.clear();
    assert!(matches!(a.value(x), Err(Error::ForeignVar { .. })));
    let y = b.input(t(&[1], vec![3.0])).unwrap();
    assert_eq!(b.value(y).unwrap(), &[3.0]);
}

#[test]
fn backward_rules_and_phases() {
    let mut tape = Tape::new(DType::F32);
    let x = tape.leaf(t(&[3], vec![1.0, -2.0, 3.0]), true).unwrap();
    let y = tape.mul(x, x).unwrap();
    let z = tape.add(y, x).unwrap();
    let l = tape.sum(z).unwrap();
    // Not a scalar / no gradient path: clear errors.
    assert!(matches!(
        tape.backward_leaves(z, 1.0),
        Err(Error::Backward(_))
    ));
    let c = tape.input(t(&[1], vec![1.0])).unwrap();
    let cs = tape.sum(c).unwrap();
    assert!(matches!(
        tape.backward_leaves(cs, 1.0),
        Err(Error::Backward(_))
    ));
    tape.backward_leaves(l, 0.5).unwrap();
    // d/dx sum(x^2 + x) * 0.5 = (2x + 1) * 0.5; x feeds three consumers, contributions summed.
    assert_eq!(tape.grad(x).unwrap().unwrap(), &[1.5, -1.5, 3.5]);
    assert_eq!(
        tape.scalar(l).unwrap(),
        1.0 + 4.0 + 9.0 + 2.0,
        "the loss stays readable"
    );
    assert!(tape.value(y).is_err(), "activations are freed by backward");
    assert!(
        tape.backward_leaves(l, 1.0).is_err(),
        "one backward per recording"
    );
    assert!(
        tape.relu(x).is_err(),
        "recording after backward needs clear()"
    );
    tape.clear();
    let x = tape.leaf(t(&[1], vec![2.0]), true).unwrap();
    let l = tape.sum(x).unwrap();
    tape.backward_leaves(l, 1.0).unwrap();
    assert_eq!(tape.grad(x).unwrap().unwrap(), &[1.0]);
}

#[test]
fn parameter_gradients_accumulate_into_the_store() {
    let mut store = ParamStore::<f32>::new(&[ParamSpec::new("w", [2], true)]).unwrap();
    store.master_mut().copy_from_slice(&[3.0, -1.0]);
    store.sync_working(DType::F32);
    let mut tape = Tape::new(DType::F32);
    for _ in 0..2 {
        tape.clear();
        let w = tape.param(&store, "w").unwrap();
        let w2 = tape.param(&store, "w").unwrap();
        assert_eq!(w, w2, "one leaf per parameter");
        let p = tape.mul(w, w2).unwrap();
        let l = tape.sum(p).unwrap();
        assert!(matches!(
            tape.backward_leaves(l, 1.0),
            Err(Error::Backward(_))
        ));
        tape.backward(l, 1.0, &mut store).unwrap();
    }
    assert_eq!(
        store.grads(),
        &[12.0, -4.0],
        "2 w per backward, added twice"
    );
    store.zero_grads();
    assert_eq!(store.grads(), &[0.0, 0.0]);
    // A store of another layout is refused.
    tape.clear();
    let w = tape.param(&store, "w").unwrap();
    let l = tape.sum(w).unwrap();
    let mut other = ParamStore::<f32>::new(&[ParamSpec::new("w", [3], true)]).unwrap();
    assert!(matches!(
        tape.backward(l, 1.0, &mut other),
        Err(Error::Backward(_))
    ));
    assert!(matches!(
        tape.param(&store, "nope"),
        Err(Error::UnknownParam(_))
    ));
}

#[test]
fn a_changed_working_copy_is_copied_again() {
    let mut store = ParamStore::<f32>::new(&[ParamSpec::new("w", [1], true)]).unwrap();
    store.master_mut()[0] = 1.0;
    store.sync_working(DType::F32);
    let mut tape = Tape::new(DType::F32);
    let a = tape.param(&store, "w").unwrap();
    store.master_mut()[0] = 2.0;
    store.sync_working(DType::F32);
    let b = tape.param(&store, "w").unwrap();
    assert_ne!(a, b);
    assert_eq!(tape.value(b).unwrap(), &[2.0]);
}

#[test]
fn autocast_rounds_low_precision_outputs_only() {
    let mut tape = Tape::new(DType::BF16);
    let vals: Vec<f32> = (0..12).map(|i| 0.1 + i as f32 * 0.0137).collect();
    let x = tape.input(t(&[3, 4], vals.clone())).unwrap();
    assert_eq!(
        tape.dtype_of(x).unwrap(),
        DType::F32,
        "inputs keep their dtype"
    );
    let y = tape.matmul(x, x, false, true).unwrap();
    assert_eq!(tape.dtype_of(y).unwrap(), DType::BF16);
    assert!(tape.value(y).unwrap().iter().all(|&v| is_bf16(v)));
    let s = tape.softmax(x).unwrap();
    assert_eq!(tape.dtype_of(s).unwrap(), DType::F32);
    assert!(
        tape.value(s).unwrap().iter().any(|&v| !is_bf16(v)),
        "softmax stays f32"
    );
    let w = tape
        .input(Tensor::new([4], vec![1.0; 4], DType::BF16).unwrap())
        .unwrap();
    let b = tape
        .input(Tensor::new([4], vec![0.0; 4], DType::BF16).unwrap())
        .unwrap();
    let (h, mean, rstd) = tape.layernorm_stats(x, w, b, 1e-5).unwrap();
    assert_eq!(tape.dtype_of(h).unwrap(), DType::BF16);
    assert_eq!(tape.dtype_of(mean).unwrap(), DType::F32);
    assert_eq!(tape.dtype_of(rstd).unwrap(), DType::F32);
    let tr = tape.transpose(y, 0, 1).unwrap();
    assert_eq!(
        tape.dtype_of(tr).unwrap(),
        DType::BF16,
        "movement keeps the dtype"
    );
    let l = tape.sum(h).unwrap();
    assert_eq!(tape.dtype_of(l).unwrap(), DType::F32);
}

#[test]
fn low_precision_gradients_are_rounded_and_parameter_gradients_are_not() {
    let mut store = ParamStore::<f32>::new(&[ParamSpec::new("w", [3, 2], true)]).unwrap();
    for (i, w) in store.master_mut().iter_mut().enumerate() {
        *w = 0.3 + 0.0731 * i as f32;
    }
    store.sync_working(DType::BF16);
    let mut tape = Tape::new(DType::BF16);
    let x = tape
        .leaf(
            Tensor::new(
                [2, 3],
                vec![0.11, 0.23, 0.37, 0.41, 0.53, 0.67],
                DType::BF16,
            )
            .unwrap(),
            true,
        )
        .unwrap();
    let w = tape.param(&store, "w").unwrap();
    let y = tape.matmul(x, w, false, false).unwrap();
    let g = tape.gelu(y).unwrap();
    let l = tape.mean(g).unwrap();
    tape.backward(l, 1.0 / 3.0, &mut store).unwrap();
    assert!(
        tape.grad(x).unwrap().unwrap().iter().all(|&v| is_bf16(v)),
        "activation grads in bf16"
    );
    assert!(
        store.grads().iter().any(|&v| !is_bf16(v)),
        "parameter grads accumulate in f32"
    );
}

#[test]
fn memory_is_counted_at_storage_size() {
    let mut tape = Tape::new(DType::BF16);
    let x = tape.input(t(&[4, 8], vec![0.5; 32])).unwrap();
    assert_eq!(tape.live_activation_bytes(), 32 * 4, "f32 input");
    let y = tape.relu(x).unwrap();
    assert_eq!(tape.live_activation_bytes(), 32 * 4 + 32 * 2, "bf16 output");
    let _s = tape.softmax(y).unwrap();
    assert_eq!(tape.live_activation_bytes(), 32 * 4 + 32 * 2 + 32 * 4);
    tape.drop_for_recompute(y).unwrap();
    assert_eq!(tape.live_activation_bytes(), 32 * 4 + 32 * 4);
    assert_eq!(tape.peak_activation_bytes(), 32 * 10);
    tape.reset_peak();
    assert_eq!(tape.peak_activation_bytes(), 32 * 8);
    let store = ParamStore::<f32>::new(&[ParamSpec::new("w", [8, 8], true)]).unwrap();
    let mut tape = Tape::new(DType::F32);
    tape.param(&store, "w").unwrap();
    assert_eq!(
        tape.live_activation_bytes(),
        0,
        "parameters are not activations"
    );
    assert_eq!(tape.param_bytes(), 64 * 4);
}

#[test]
fn dry_runs_count_without_values() {
    let specs = [ParamSpec::new("w", [1000, 1000], true)];
    let mut layout = ParamStore::<f32>::layout(&specs).unwrap();
    assert!(!layout.has_data() && layout.master().is_empty());
    let mut tape = Tape::<f32>::dry_run(DType::BF16);
    let x = tape.input(Tensor::zeros([64, 1000], DType::BF16)).unwrap();
    let w = tape.param(&layout, "w").unwrap();
    let y = tape.matmul(x, w, false, false).unwrap();
    assert!(tape.value(y).is_err());
    let l = tape.mean(y).unwrap();
    tape.backward(l, 1.0, &mut layout).unwrap();
    assert!(tape.peak_activation_bytes() >= 2 * 64 * 1000 * 2);
    let mut real = Tape::new(DType::F32);
    assert!(matches!(real.param(&layout, "w"), Err(Error::Params(_))));
}

#[test]
fn devices_other_than_the_cpu_are_refused_clearly() {
    let e = Tensor::<f32>::new_on([1], vec![0.0], DType::F32, Device::Cuda(0)).unwrap_err();
    assert!(e.to_string().contains("not supported yet"), "{e}");
}

#[test]
fn profiling_counts_kernels_and_lists_events() {
    let mut tape = Tape::new(DType::F32);
    tape.set_profiling(true);
    let x = tape.leaf(t(&[2, 3], vec![0.5; 6]), true).unwrap();
    let y = tape.gelu(x).unwrap();
    let l = tape.sum(y).unwrap();
    tape.backward_leaves(l, 1.0).unwrap();
    let prof = tape.profile();
    let gelu = prof.iter().find(|p| p.op == "gelu").unwrap();
    assert_eq!((gelu.forward_calls, gelu.backward_calls), (1, 1));
    let events = tape.take_events();
    assert_eq!(events.len(), 4, "gelu and sum, forward and backward");
    assert!(events.iter().any(|e| e.op == "sum" && e.backward));
    assert!(tape.take_events().is_empty());
    tape.set_profiling(false);
    assert!(tape.profile().is_empty());
}

#[test]
fn tapes_and_stores_can_move_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tape<f32>>();
    send_sync::<ParamStore<f32>>();
    send_sync::<lathe_autograd::Gpt>();
}

#[test]
fn the_grad_ready_hook_sees_every_parameter_once_last_layers_first() {
    use lathe_autograd::{Gpt, GptConfig, Recompute};
    use std::sync::{Arc, Mutex};
    let cfg = GptConfig {
        vocab_size: 11,
        padded_vocab_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
    };
    let gpt = Gpt::new(cfg).unwrap();
    let mut params = gpt.init_params(3);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tape = Tape::new(DType::F32);
    let log = seen.clone();
    tape.set_grad_ready_hook(Some(Box::new(move |p, range| {
        // The gradient is final when the hook runs: it is already in the store.
        assert!(p.grads()[range.clone()].iter().any(|&g| g != 0.0));
        log.lock().unwrap().push(range);
        Ok(())
    })));
    let tokens = [1u32, 2, 3, 4, 5, 6];
    let loss = gpt
        .loss(&mut tape, &params, &tokens, &tokens, 1, 6, Recompute::None)
        .unwrap();
    tape.backward(loss, 1.0, &mut params).unwrap();
    let seen = seen.lock().unwrap().clone();
    let mut starts: Vec<usize> = seen.iter().map(|r| r.start).collect();
    assert_eq!(seen.len(), params.views().len(), "one call per parameter");
    // The final layernorm comes first, the token embedding (first used, tied) last.
    let ln_f = params.view("ln_f.weight").unwrap().offset;
    assert!(seen[0].start >= ln_f, "first ready: {:?}", seen[0]);
    assert_eq!(seen.last().unwrap().start, 0);
    starts.sort_unstable();
    let expect: Vec<usize> = params.views().iter().map(|v| v.offset).collect();
    assert_eq!(starts, expect);
}
