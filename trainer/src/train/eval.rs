//! Evaluation: validation loss, and exact-match accuracy of greedy decoding on held-out
//! addition problems (the built-in corpus).

use super::Data;
use crate::config::TrainConfig;
use crate::data::addition::{AdditionCorpus, PAD, exact_match, render};
use crate::data::{Loader, LoaderConfig, Split};
use anyhow::{Context, Result};
use lathe_autograd::{Gpt, ParamStore, Tape};
use std::collections::BTreeMap;

/// What the final evaluation found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalOutcome {
    pub accuracy: Option<f64>,
}

/// The loader of the validation batches every evaluation reads.
fn val_loader(cfg: &TrainConfig, data: &Data, seq_len: usize) -> Result<Loader> {
    let mut lc = LoaderConfig::new(cfg.micro_batch, seq_len);
    lc.seed = cfg.seed;
    lc.shuffle = false;
    lc.workers = 0;
    Loader::open(&data.source, Split::Val, lc, None).map_err(|e| {
        let hint = match &e {
            crate::data::DataError::NoShards { .. } => {
                " (evaluation needs a validation split: prepare the data with --val-fraction \
                 above 0)"
            }
            _ => "",
        };
        anyhow::Error::new(e).context(format!("validation data{hint}"))
    })
}

/// Reads the validation batches [`val_loss`] will read (the same ones every time), so that a
/// missing or too small split, or a token outside the vocabulary, is found before training.
pub(super) fn check_val(cfg: &TrainConfig, data: &Data, seq_len: usize) -> Result<()> {
    let mut loader = val_loader(cfg, data, seq_len)?;
    for _ in 0..cfg.eval_batches.max(1) {
        loader.next_batch().context("validation data")?;
    }
    Ok(())
}

/// Mean loss over `eval_batches` micro-batches of the validation split (always the same
/// batches: the validation loader is not shuffled and starts at the beginning), computed with
/// the full parameters `params` on `tape` (rank 0 only).
pub(super) fn val_loss(
    cfg: &TrainConfig,
    data: &Data,
    model: &Gpt,
    tape: &mut Tape,
    seq_len: usize,
    params: &ParamStore,
) -> Result<f64> {
    let mut loader = val_loader(cfg, data, seq_len)?;
    let mut sum = 0f64;
    let n = cfg.eval_batches.max(1);
    for _ in 0..n {
        let batch = loader.next_batch()?;
        tape.clear();
        let loss = model.loss(
            tape,
            params,
            batch.inputs(),
            batch.targets(),
            batch.b,
            batch.t,
            lathe_autograd::Recompute::None,
        )?;
        sum += tape.scalar(loss)? as f64;
    }
    tape.clear();
    Ok(sum / n as f64)
}

/// On the built-in corpus: greedy-decodes `eval_problems` held-out problems with `params` and
/// prints the exact-match accuracy with a few examples. Other data: nothing to decode.
pub(super) fn final_evaluation(
    cfg: &TrainConfig,
    data: &Data,
    model: &Gpt,
    params: &ParamStore,
) -> Result<EvalOutcome> {
    let Some(acfg) = data.addition.clone() else {
        return Ok(EvalOutcome::default());
    };
    let corpus = AdditionCorpus::new(acfg)?;
    let problems = corpus.eval_set(cfg.eval_problems);
    let max_new = corpus.max_answer_tokens() + 1;
    // Decode prompts of equal length together (the batched decoder needs that).
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in problems.iter().enumerate() {
        by_len
            .entry(corpus.prompt_tokens(*p).len())
            .or_default()
            .push(i);
    }
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); problems.len()];
    for idx in by_len.values() {
        for chunk in idx.chunks(64) {
            let prompts: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| corpus.prompt_tokens(problems[i]))
                .collect();
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let outs = model.generate_greedy_batch(params, &refs, max_new, Some(b'\n' as u32))?;
            for (&i, o) in chunk.iter().zip(outs) {
                outputs[i] = o;
            }
        }
    }
    let mut k = 0;
    let report = exact_match(&corpus, &problems, |_| {
        let o = outputs[k].clone();
        k += 1;
        o
    });
    eprintln!(
        "exact match on {} held-out addition problems: {}/{} = {:.1}%{}",
        report.total,
        report.correct,
        report.total,
        100.0 * report.accuracy(),
        if corpus.config().reverse_answer {
            " (answers are written least significant digit first)"
        } else {
            ""
        }
    );
    for (i, p) in problems.iter().enumerate().take(3) {
        let got: Vec<u32> = outputs[i].iter().copied().filter(|&t| t != PAD).collect();
        eprintln!(
            "  {}{}   (expected {})",
            corpus.prompt(*p),
            render(&got),
            corpus.answer(*p)
        );
    }
    for f in report.failures.iter().take(3) {
        eprintln!(
            "  wrong: {}+{} -> {:?}, expected {:?}",
            f.problem.a, f.problem.b, f.got, f.expected
        );
    }
    Ok(EvalOutcome {
        accuracy: Some(report.accuracy()),
    })
}
