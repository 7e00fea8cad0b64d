//! Recomputation: identical results, lower activation memory, and the dry-run memory count.

mod common;

use common::bits;
use lathe_autograd::{DType, Gpt, GptConfig, ParamStore, Recompute, Tape, Tensor};
use lathe_kernels::rng::Rng;

struct Run {
    loss: u32,
    grads: Vec<u32>,
    peak: usize,
    recomputed: usize,
}

fn run(gpt: &Gpt, dtype: DType, policy: Recompute, b: usize, t: usize) -> Run {
    let cfg = gpt.config();
    let mut params = gpt.init_params(21);
    params.sync_working(dtype);
    let mut rng = Rng::new(8);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let mut tape = Tape::new(dtype);
    let l = gpt
        .loss(&mut tape, &params, &tokens, &targets, b, t, policy)
        .unwrap();
    let loss = tape.scalar(l).unwrap().to_bits();
    tape.backward(l, 1.0, &mut params).unwrap();
    assert_eq!(
        tape.live_activation_bytes(),
        tape.scalar(l).map(|_| 4).unwrap(),
        "only the loss stays live"
    );
    Run {
        loss,
        grads: bits(params.grads()),
        peak: tape.peak_activation_bytes(),
        recomputed: tape.recomputed_nodes(),
    }
}

#[test]
fn policies_give_bitwise_identical_results_and_lower_peaks() {
    let gpt = Gpt::new(GptConfig::tiny()).unwrap();
    let (b, t) = (4, 32);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let runs: Vec<Run> = Recompute::ALL
            .iter()
            .map(|&p| run(&gpt, dtype, p, b, t))
            .collect();
        let [none, act, block] = &runs[..] else {
            unreachable!()
        };
        for (r, name) in [(act, "act"), (block, "block")] {
            assert_eq!(r.loss, none.loss, "{dtype} {name}: loss differs from none");
            assert!(
                r.grads == none.grads,
                "{dtype} {name}: gradients differ from none"
            );
            assert!(r.recomputed > 0, "{dtype} {name}: nothing was recomputed");
        }
        assert_eq!(none.recomputed, 0);
        assert!(
            block.peak < act.peak && act.peak < none.peak,
            "{dtype}: peaks {} {} {}",
            none.peak,
            act.peak,
            block.peak
        );
        println!(
            "tiny GPT {dtype}, B={b} T={t}: peak activations none {} KiB, act {} KiB ({:.0}% of none), block {} KiB ({:.0}%)",
            none.peak / 1024,
            act.peak / 1024,
            100.0 * act.peak as f64 / none.peak as f64,
            block.peak / 1024,
            100.0 * block.peak as f64 / none.peak as f64
        );
    }
}

#[test]
fn dry_run_memory_equals_the_measured_peak() {
    let gpt = Gpt::new(GptConfig::tiny()).unwrap();
    let (b, t) = (2, 24);
    for dtype in [DType::F32, DType::BF16] {
        for policy in Recompute::ALL {
            let measured = run(&gpt, dtype, policy, b, t).peak;
            let dry = gpt.activation_memory(b, t, dtype, policy).unwrap();
            assert_eq!(dry.peak_bytes, measured, "{dtype} {policy}");
            assert!(dry.after_forward_bytes <= dry.peak_bytes);
        }
    }
}

#[test]
fn gpt2_124m_activation_memory_from_a_dry_run() {
    let gpt = Gpt::new(GptConfig::gpt2_124m()).unwrap();
    let (b, t) = (4, 1024);
    let peaks: Vec<usize> = Recompute::ALL
        .iter()
        .map(|&p| {
            gpt.activation_memory(b, t, DType::BF16, p)
                .unwrap()
                .peak_bytes
        })
        .collect();
    for (p, bytes) in Recompute::ALL.iter().zip(&peaks) {
        println!(
            "gpt2-124m bf16 B={b} T={t} recompute={p}: peak activations {:.2} GiB",
            *bytes as f64 / (1u64 << 30) as f64
        );
    }
    assert!(peaks[2] < peaks[1] && peaks[1] < peaks[0], "{peaks:?}");
    // Sanity: the attention probabilities alone are 12 layers x B x 12 heads x T^2 bf16 values.
    assert!(peaks[0] > 12 * b * 12 * t * t * 2);
}

#[test]
fn checkpointed_segment_of_primitives_matches_plain_in_f64() {
    let mut rng = Rng::new(3);
    let x: Vec<f64> = (0..15).map(|_| rng.normal() as f64).collect();
    let w: Vec<f64> = (0..20).map(|_| rng.normal() as f64).collect();
    let grads = |checkpoint: bool| {
        let mut tape = Tape::<f64>::with_dtype(DType::F32);
        let xv = tape
            .leaf(Tensor::from_vec([3, 5], x.clone()).unwrap(), true)
            .unwrap();
        let wv = tape
            .leaf(Tensor::from_vec([5, 4], w.clone()).unwrap(), true)
            .unwrap();
        let seg = |tp: &mut Tape<f64>| {
            let h = tp.matmul(xv, wv, false, false)?;
            let g = tp.gelu(h)?;
            let s = tp.softmax(g)?;
            tp.mul(s, h)
        };
        let y = if checkpoint {
            tape.checkpoint(seg).unwrap()
        } else {
            seg(&mut tape).unwrap()
        };
        let before = tape.live_activation_bytes();
        let l = tape.sum(y).unwrap();
        tape.backward_leaves(l, 1.0).unwrap();
        let gx = tape.grad(xv).unwrap().unwrap().to_vec();
        let gw = tape.grad(wv).unwrap().unwrap().to_vec();
        (gx, gw, before, tape.recomputed_nodes())
    };
    let (gx0, gw0, live0, rec0) = grads(false);
    let (gx1, gw1, live1, rec1) = grads(true);
    assert_eq!(gx0, gx1);
    assert_eq!(gw0, gw1);
    assert!(live1 < live0, "checkpoint keeps less: {live1} vs {live0}");
    assert_eq!(
        (rec0, rec1),
        (0, 3),
        "matmul, gelu and softmax re-run once each"
    );
}

#[test]
fn dropped_values_come_back_on_demand_and_leaves_cannot_be_dropped() {
    let mut tape = Tape::new(DType::F32);
    let x = tape
        .input(Tensor::from_vec([2, 3], vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0]).unwrap())
        .unwrap();
    let r = tape.relu(x).unwrap();
    let before = tape.value(r).unwrap().to_vec();
    tape.drop_for_recompute(r).unwrap();
    assert!(tape.value(r).is_err());
    // A later op reading the dropped value recomputes it.
    let s = tape.scale(r, 2.0).unwrap();
    assert_eq!(tape.value(s).unwrap(), &[2.0, 0.0, 6.0, 0.0, 10.0, 0.0]);
    assert_eq!(tape.value(r).unwrap(), &before[..]);
    tape.drop_for_recompute(r).unwrap();
    tape.materialize(r).unwrap();
    assert_eq!(tape.value(r).unwrap(), &before[..]);
    assert!(tape.drop_for_recompute(x).is_err());
    let store: ParamStore = ParamStore::new(&[]).unwrap();
    assert_eq!(store.num_params(), 0);
    assert_eq!("block".parse::<Recompute>().unwrap(), Recompute::Block);
    assert!("most".parse::<Recompute>().is_err());
}
