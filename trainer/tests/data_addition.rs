//! The built-in addition corpus: determinism, held-out disjointness, layout and loss mask,
//! the exact-match evaluator, and loading it like any other source.

use std::collections::HashSet;

use lathe_trainer::data::addition::{PAD, render};
use lathe_trainer::data::{
    AdditionConfig, AdditionCorpus, IGNORE_INDEX, Loader, LoaderConfig, Problem, Source, Split,
    exact_match,
};

fn corpus(cfg: AdditionConfig) -> AdditionCorpus {
    AdditionCorpus::new(cfg).unwrap()
}

#[test]
fn deterministic_and_eval_disjoint_from_train() {
    let c = corpus(AdditionConfig::default());
    let again = corpus(AdditionConfig::default());
    let train: Vec<Problem> = (0..20_000).map(|k| c.problem(Split::Train, k)).collect();
    let train2: Vec<Problem> = (0..20_000)
        .map(|k| again.problem(Split::Train, k))
        .collect();
    assert_eq!(train, train2);
    let eval = c.eval_set(2000);
    assert_eq!(eval.len(), 2000);
    assert_eq!(eval.iter().collect::<HashSet<_>>().len(), 2000);
    // No held-out pair, in either order, is ever a training problem.
    let train_pairs: HashSet<(u64, u64)> =
        train.iter().map(|p| (p.a.min(p.b), p.a.max(p.b))).collect();
    for p in &eval {
        assert!(c.is_eval(*p));
        assert!(
            !train_pairs.contains(&(p.a.min(p.b), p.a.max(p.b))),
            "{p:?}"
        );
        assert!(p.a < 1000 && p.b < 1000);
    }
    assert!(train.iter().all(|p| !c.is_eval(*p)));
    // Roughly 10% of pairs are held out.
    let held = (0..1000u64)
        .flat_map(|a| (0..1000u64).map(move |b| Problem { a, b }))
        .filter(|p| c.is_eval(*p))
        .count();
    assert!((80_000..120_000).contains(&held), "{held}");
    // Digit counts are balanced: about a third of operands have one digit.
    let one_digit = train.iter().filter(|p| p.a < 10).count();
    assert!((5500..7800).contains(&one_digit), "{one_digit}");
    // The training seed changes training problems, not the eval set.
    let other = corpus(AdditionConfig {
        seed: 5,
        ..AdditionConfig::default()
    });
    let other_train: Vec<Problem> = (0..100).map(|k| other.problem(Split::Train, k)).collect();
    assert_ne!(other_train, train[..100]);
    assert_eq!(other.eval_set(2000), eval);
}

#[test]
fn formatting_options() {
    let p = Problem { a: 123, b: 45 };
    let plain = corpus(AdditionConfig {
        reverse_answer: false,
        ..AdditionConfig::default()
    });
    assert_eq!(plain.text(p), "123+45=168\n");
    let rev = corpus(AdditionConfig::default());
    assert_eq!(rev.text(p), "123+45=861\n");
    let padded = corpus(AdditionConfig {
        pad_operands: true,
        reverse_answer: false,
        ..AdditionConfig::default()
    });
    assert_eq!(padded.text(p), "123+045=0168\n");
    assert_eq!(padded.width(), 13);
    assert_eq!(padded.text(p).len(), 13);
    assert_eq!(rev.max_answer_tokens(), 5);
    assert!(
        AdditionCorpus::new(AdditionConfig {
            max_digits: 19,
            ..AdditionConfig::default()
        })
        .is_err()
    );
}

#[test]
fn windows_pack_problems_with_answer_only_targets() {
    let cfg = AdditionConfig::default();
    let c = corpus(cfg.clone());
    // Width 13; T + 1 = 30 holds two slots and 4 tokens of padding.
    let src = Source::Addition(cfg);
    let mut lc = LoaderConfig::new(4, 29);
    lc.shuffle = false;
    lc.workers = 2;
    let mut loader = Loader::open(&src, Split::Train, lc, None).unwrap();
    assert_eq!(loader.windows_per_epoch(), (1 << 20) / 2);
    let b = loader.next_batch().unwrap();
    assert_eq!((b.b, b.t), (4, 29));
    for row in 0..4 {
        let inputs = &b.inputs[row * 29..(row + 1) * 29];
        let targets = &b.targets[row * 29..(row + 1) * 29];
        let p0 = c.problem(Split::Train, 2 * row as u64);
        let p1 = c.problem(Split::Train, 2 * row as u64 + 1);
        let slot = |p: Problem| {
            let mut v: Vec<u32> = c.text(p).bytes().map(u32::from).collect();
            v.resize(13, PAD);
            v
        };
        let mut want: Vec<u32> = slot(p0);
        want.extend(slot(p1));
        want.resize(30, PAD);
        assert_eq!(inputs, &want[..29], "{}", render(inputs));
        // Targets: the answer digits and newline of each problem, IGNORE elsewhere.
        let mut scored = String::new();
        for (i, &t) in targets.iter().enumerate() {
            if t != IGNORE_INDEX {
                assert_eq!(t, want[i + 1]);
                scored.push(t as u8 as char);
            }
        }
        assert_eq!(scored, format!("{}\n{}\n", c.answer(p0), c.answer(p1)));
    }
    assert_eq!(
        b.loss_tokens(),
        (0..8)
            .map(|k| c.answer(c.problem(Split::Train, k)).len() + 1)
            .sum::<usize>()
    );
    // Validation windows come from held-out pairs only.
    let mut vc = LoaderConfig::new(8, 12);
    vc.shuffle = false;
    let mut val = Loader::open(
        &Source::Addition(AdditionConfig::default()),
        Split::Val,
        vc,
        None,
    )
    .unwrap();
    let vb = val.next_batch().unwrap();
    for row in vb.inputs.chunks(12) {
        let text = render(row);
        let (a, rest) = text.split_once('+').unwrap();
        let b = rest.split_once('=').unwrap().0;
        let p = Problem {
            a: a.parse().unwrap(),
            b: b.parse().unwrap(),
        };
        assert!(c.is_eval(p), "{text}");
    }
    // A sequence length too short for one problem is a clear error.
    let msg = Loader::open(
        &Source::Addition(AdditionConfig::default()),
        Split::Train,
        LoaderConfig::new(1, 8),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("at least 12"), "{msg}");
}

#[test]
fn exact_match_evaluator() {
    let c = corpus(AdditionConfig::default());
    let problems = c.eval_set(50);
    // An oracle that parses the prompt and answers correctly (with the newline and junk after).
    let oracle = |prompt: &[u32]| -> Vec<u32> {
        let text = render(prompt);
        let (a, rest) = text.split_once('+').unwrap();
        let b = rest.trim_end_matches('=');
        let sum = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
        let rev: String = sum.to_string().chars().rev().collect();
        let mut out: Vec<u32> = rev.bytes().map(u32::from).collect();
        out.push(b'\n' as u32);
        out.push(b'9' as u32);
        out
    };
    let r = exact_match(&c, &problems, oracle);
    assert_eq!((r.correct, r.total), (50, 50));
    assert_eq!(r.accuracy(), 1.0);
    assert!(r.failures.is_empty());
    // Always answering "0": right only for 0 + 0.
    let r = exact_match(&c, &problems, |_| vec![b'0' as u32, b'\n' as u32]);
    let zeros = problems.iter().filter(|p| p.sum() == 0).count();
    assert_eq!(r.correct, zeros);
    assert_eq!(r.failures.len(), 8);
    assert_eq!(r.failures[0].got, "0");
    // An answer with an extra digit is wrong even if it starts right.
    let r = exact_match(&c, &problems[..1], |p| {
        let mut o = oracle(p);
        o.insert(0, b'1' as u32);
        o
    });
    assert_eq!(r.correct, 0);
}
