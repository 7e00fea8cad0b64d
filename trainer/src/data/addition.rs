//! The built-in corpus: integer addition written as text, one byte per token.
//!
//! A problem `a + b` is written `"{a}+{b}={answer}\n"`, e.g. `"123+45=168\n"`. Lathe's default
//! job trains on it, so a fresh install can train and show what it learned with nothing
//! downloaded.
//!
//! - **Operands.** Each operand first draws its digit count uniformly from
//!   `min_digits..=max_digits`, then a value uniformly among the numbers with that many digits
//!   (`0..=9` counts as one digit), so short and long operands are equally common.
//! - **Reversed answers.** With `reverse_answer` the sum is written least significant digit
//!   first (`"123+45=861\n"`). A left-to-right model then produces each digit after the digits
//!   it depends on (the carry flows the way the text is written), which makes the task far easier
//!   for a small transformer; with the usual order it must in effect work out every carry before
//!   writing the first digit.
//! - **Zero padding.** With `pad_operands` operands are written with `max_digits` digits and the
//!   sum with `max_digits + 1` (`"045+123=0168\n"`), so every digit sits at a fixed position.
//! - **Fixed layout.** Every problem takes one slot of [`AdditionCorpus::width`] tokens
//!   (`3 * max_digits + 4`): its text, then [`PAD`] tokens. A loader window of `T + 1` tokens
//!   holds `(T + 1) / width` slots (the rest is padding). Only targets that are answer digits or
//!   the final newline carry a loss; every other target is [`IGNORE_INDEX`]
//!   (the operands are random, so predicting them is noise).
//! - **Held-out problems.** The unordered pair `{a, b}` is hashed; a fixed share
//!   (`eval_fraction`) of pairs is reserved for evaluation, and training never draws one of them
//!   (nor its commuted twin). The partition and the evaluation problems do not depend on `seed`,
//!   which only seeds the training stream, so accuracies are comparable across seeds.
//! - **Determinism.** Problem `k` of a split is a pure function of (config, split, k).

use std::collections::HashSet;
use std::convert::Infallible;

use lathe_kernels::rng::Rng;
use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::plan::mix64;
use super::source::WindowSource;
use super::{IGNORE_INDEX, Split};

/// Padding token after each problem (the bytes are 0..=255).
pub const PAD: u32 = 256;
/// Vocabulary of the addition corpus: 256 bytes and [`PAD`].
pub const ADDITION_VOCAB: u32 = 257;
/// Windows per group of the addition source (groups only bound the loader's permutations).
const GROUP_WINDOWS: u64 = 1 << 16;
/// Operand spaces up to this many values are checked exhaustively at construction.
const SMALL_SPACE: u64 = 2048;

const TRAIN_STREAM: u64 = 0x0074_7261_696e;
const EVAL_STREAM: u64 = 0x0000_6576_616c;
const PARTITION_KEY: u64 = 0x7061_7274_6974_696f;

/// Options of the addition corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdditionConfig {
    /// Fewest digits of an operand (at least 1).
    pub min_digits: u32,
    /// Most digits of an operand (at most 18, so sums fit a u64).
    pub max_digits: u32,
    /// Write the sum least significant digit first.
    pub reverse_answer: bool,
    /// Zero-pad operands to `max_digits` and the sum to `max_digits + 1`.
    pub pad_operands: bool,
    /// Seeds the training problems.
    pub seed: u64,
    /// Share of unordered operand pairs held out for evaluation, in `[0.001, 0.5]`.
    pub eval_fraction: f64,
    /// Problems per training epoch.
    pub train_problems: u64,
    /// Problems in the validation split (held-out pairs).
    pub val_problems: u64,
}

impl Default for AdditionConfig {
    /// 1 to 3 digits, reversed answers, 10% of pairs held out, 2^20 training problems per epoch,
    /// 4096 validation problems.
    fn default() -> Self {
        AdditionConfig {
            min_digits: 1,
            max_digits: 3,
            reverse_answer: true,
            pad_operands: false,
            seed: 0,
            eval_fraction: 0.1,
            train_problems: 1 << 20,
            val_problems: 4096,
        }
    }
}

/// One problem, `a + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

impl Problem {
    pub fn sum(&self) -> u64 {
        self.a + self.b
    }
}

/// The corpus: problem generation, formatting, and the train/eval partition.
#[derive(Clone, Debug)]
pub struct AdditionCorpus {
    cfg: AdditionConfig,
}

impl AdditionCorpus {
    /// Validates `cfg`; for small operand spaces also checks that both partitions are non-empty.
    pub fn new(cfg: AdditionConfig) -> Result<Self> {
        let bad = |m: String| Err(DataError::Config(format!("addition corpus: {m}")));
        if cfg.min_digits == 0 || cfg.min_digits > cfg.max_digits || cfg.max_digits > 18 {
            return bad(format!(
                "digits must satisfy 1 <= min ({}) <= max ({}) <= 18",
                cfg.min_digits, cfg.max_digits
            ));
        }
        if !(0.001..=0.5).contains(&cfg.eval_fraction) {
            return bad(format!(
                "eval fraction must be in [0.001, 0.5], got {}",
                cfg.eval_fraction
            ));
        }
        let corpus = AdditionCorpus { cfg };
        let operands: u64 = (corpus.cfg.min_digits..=corpus.cfg.max_digits)
            .map(|d| {
                let (lo, hi) = digit_range(d);
                hi - lo + 1
            })
            .sum();
        if operands <= SMALL_SPACE {
            let (mut held, mut total) = (0u64, 0u64);
            for d1 in corpus.cfg.min_digits..=corpus.cfg.max_digits {
                for d2 in corpus.cfg.min_digits..=corpus.cfg.max_digits {
                    let ((l1, h1), (l2, h2)) = (digit_range(d1), digit_range(d2));
                    for a in l1..=h1 {
                        for b in l2..=h2 {
                            total += 1;
                            held += corpus.is_eval(Problem { a, b }) as u64;
                        }
                    }
                }
            }
            if held == total {
                return bad("every problem is held out; lower the eval fraction".into());
            }
            if held == 0 {
                return bad(format!(
                    "no problem of {total} is held out at eval fraction {}; raise it or use more digits",
                    corpus.cfg.eval_fraction
                ));
            }
        }
        Ok(corpus)
    }

    pub fn config(&self) -> &AdditionConfig {
        &self.cfg
    }

    /// Tokens per problem slot: `3 * max_digits + 4` (two operands, `+`, `=`, a sum of up to
    /// `max_digits + 1` digits, and `\n`).
    pub fn width(&self) -> usize {
        3 * self.cfg.max_digits as usize + 4
    }

    /// Most tokens an answer takes, its newline included: `max_digits + 2`. Greedy decoding
    /// for [`exact_match`] needs to produce no more than this.
    pub fn max_answer_tokens(&self) -> usize {
        self.cfg.max_digits as usize + 2
    }

    /// True when `{a, b}` is in the held-out partition.
    pub fn is_eval(&self, p: Problem) -> bool {
        let (lo, hi) = (p.a.min(p.b), p.a.max(p.b));
        let h = mix64(mix64(PARTITION_KEY, lo), hi);
        ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < self.cfg.eval_fraction
    }

    /// Problem `k` of `split`'s stream: training problems never come from the held-out
    /// partition, validation problems always do. (Both partitions are non-empty: `new` checks
    /// small operand spaces exhaustively, and a large one holds millions of pairs, so the
    /// rejection loop ends after about `1 / eval_fraction` draws.)
    pub fn problem(&self, split: Split, k: u64) -> Problem {
        let stream = match split {
            Split::Train => mix64(self.cfg.seed, TRAIN_STREAM),
            Split::Val => EVAL_STREAM,
        };
        let mut rng = Rng::new(mix64(stream, k));
        let want_eval = split == Split::Val;
        loop {
            let p = Problem {
                a: self.operand(&mut rng),
                b: self.operand(&mut rng),
            };
            if self.is_eval(p) == want_eval {
                return p;
            }
        }
    }

    fn operand(&self, rng: &mut Rng) -> u64 {
        let span = (self.cfg.max_digits - self.cfg.min_digits + 1) as u64;
        let d = self.cfg.min_digits + rng.below(span) as u32;
        let (lo, hi) = digit_range(d);
        lo + rng.below(hi - lo + 1)
    }

    /// Up to `n` distinct held-out problems, the first ones of the validation stream (fewer
    /// when the held-out partition is smaller than `n`). The same for every `seed`.
    pub fn eval_set(&self, n: usize) -> Vec<Problem> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(n);
        let budget = 64 * n as u64 + 10_000;
        for k in 0..budget {
            if out.len() == n {
                break;
            }
            let p = self.problem(Split::Val, k);
            if seen.insert(p) {
                out.push(p);
            }
        }
        out
    }

    fn number(&self, x: u64, width: u32) -> String {
        if self.cfg.pad_operands {
            format!("{x:0width$}", width = width as usize)
        } else {
            x.to_string()
        }
    }

    /// `"{a}+{b}="`.
    pub fn prompt(&self, p: Problem) -> String {
        let d = self.cfg.max_digits;
        format!("{}+{}=", self.number(p.a, d), self.number(p.b, d))
    }

    /// The sum as written after `=` (reversed if configured), without the newline.
    pub fn answer(&self, p: Problem) -> String {
        let s = self.number(p.sum(), self.cfg.max_digits + 1);
        if self.cfg.reverse_answer {
            s.chars().rev().collect()
        } else {
            s
        }
    }

    /// The whole problem, `prompt + answer + "\n"`.
    pub fn text(&self, p: Problem) -> String {
        format!("{}{}\n", self.prompt(p), self.answer(p))
    }

    /// The prompt as tokens (what greedy decoding starts from).
    pub fn prompt_tokens(&self, p: Problem) -> Vec<u32> {
        self.prompt(p).bytes().map(u32::from).collect()
    }

    /// Writes problem `p` into a slot of `width()` tokens: text, then [`PAD`]. `answer[i]` is
    /// set for the answer digits and the newline (the positions that carry a loss as targets).
    pub fn write_slot(&self, p: Problem, tokens: &mut [u32], answer: &mut [bool]) {
        let prompt = self.prompt(p);
        let text = self.text(p);
        for (i, (t, m)) in tokens.iter_mut().zip(answer.iter_mut()).enumerate() {
            match text.as_bytes().get(i) {
                Some(&c) => {
                    *t = c as u32;
                    *m = i >= prompt.len();
                }
                None => {
                    *t = PAD;
                    *m = false;
                }
            }
        }
    }
}

/// `(lowest, highest)` number with `d` digits; one digit includes 0.
fn digit_range(d: u32) -> (u64, u64) {
    let hi = 10u64.pow(d) - 1;
    let lo = if d == 1 { 0 } else { 10u64.pow(d - 1) };
    (lo, hi)
}

/// Renders tokens for display: bytes as characters, [`PAD`] as `_`, anything else as `?`.
pub fn render(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|&t| match t {
            0..=255 => t as u8 as char,
            PAD => '_',
            _ => '?',
        })
        .collect()
}

/// A wrong answer, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalFailure {
    pub problem: Problem,
    pub expected: String,
    pub got: String,
}

/// Result of [`exact_match`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EvalReport {
    pub total: usize,
    pub correct: usize,
    /// The first few wrong answers (at most 8).
    pub failures: Vec<EvalFailure>,
}

impl EvalReport {
    /// `correct / total` (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Exact-match accuracy on `problems`. `predict` gets a problem's prompt tokens and returns the
/// tokens the model generates after it (e.g. greedy decoding of up to
/// [`AdditionCorpus::max_answer_tokens`] tokens). The output is read up to its first newline,
/// [`PAD`] or non-byte token, and must equal the expected answer exactly.
pub fn exact_match(
    corpus: &AdditionCorpus,
    problems: &[Problem],
    mut predict: impl FnMut(&[u32]) -> Vec<u32>,
) -> EvalReport {
    match try_exact_match(corpus, problems, |p| Ok::<_, Infallible>(predict(p))) {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// [`exact_match`] with a fallible `predict` (e.g. decoding on a GPU); stops at the first error.
pub fn try_exact_match<E>(
    corpus: &AdditionCorpus,
    problems: &[Problem],
    mut predict: impl FnMut(&[u32]) -> std::result::Result<Vec<u32>, E>,
) -> std::result::Result<EvalReport, E> {
    let mut report = EvalReport::default();
    for &p in problems {
        let out = predict(&corpus.prompt_tokens(p))?;
        let got: Vec<u8> = out
            .iter()
            .take_while(|&&t| t < 256 && t != b'\n' as u32)
            .map(|&t| t as u8)
            .collect();
        let expected = corpus.answer(p);
        report.total += 1;
        if got == expected.as_bytes() {
            report.correct += 1;
        } else if report.failures.len() < 8 {
            report.failures.push(EvalFailure {
                problem: p,
                expected,
                got: String::from_utf8_lossy(&got).into_owned(),
            });
        }
    }
    Ok(report)
}

/// The addition corpus as loader windows: each window of `seq_len + 1` tokens packs
/// `(seq_len + 1) / width` problems of one split.
#[derive(Debug)]
pub struct AdditionSource {
    corpus: AdditionCorpus,
    split: Split,
    seq_len: usize,
    slots: usize,
    windows: Vec<u64>,
}

impl AdditionSource {
    pub fn new(cfg: AdditionConfig, split: Split, seq_len: usize) -> Result<Self> {
        let corpus = AdditionCorpus::new(cfg)?;
        let width = corpus.width();
        if seq_len + 1 < width {
            return Err(DataError::Config(format!(
                "addition corpus: a problem takes {width} tokens, so the sequence length must be at least {}, got {seq_len}",
                width - 1
            )));
        }
        let problems = match split {
            Split::Train => corpus.cfg.train_problems,
            Split::Val => corpus.cfg.val_problems,
        };
        let slots = (seq_len + 1) / width;
        let total = problems / slots as u64;
        let mut windows = vec![GROUP_WINDOWS; (total / GROUP_WINDOWS) as usize];
        if !total.is_multiple_of(GROUP_WINDOWS) {
            windows.push(total % GROUP_WINDOWS);
        }
        Ok(AdditionSource {
            corpus,
            split,
            seq_len,
            slots,
            windows,
        })
    }

    pub fn corpus(&self) -> &AdditionCorpus {
        &self.corpus
    }

    /// Problems per window.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The problems of window `window` of group `group`, in slot order.
    pub fn window_problems(&self, group: usize, window: u64) -> Vec<Problem> {
        let first = (group as u64 * GROUP_WINDOWS + window) * self.slots as u64;
        (0..self.slots as u64)
            .map(|s| self.corpus.problem(self.split, first + s))
            .collect()
    }
}

impl WindowSource for AdditionSource {
    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn group_windows(&self) -> &[u64] {
        &self.windows
    }

    fn read_window(
        &self,
        group: usize,
        window: u64,
        len: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> Result<()> {
        if group >= self.windows.len() || window >= self.windows[group] || len > self.seq_len {
            return Err(DataError::Config(format!(
                "addition window {window} of group {group} (length {len}) does not exist"
            )));
        }
        let n = self.seq_len + 1;
        let mut tokens = vec![PAD; n];
        let mut answer = vec![false; n];
        let width = self.corpus.width();
        for (s, p) in self.window_problems(group, window).into_iter().enumerate() {
            let r = s * width..(s + 1) * width;
            self.corpus
                .write_slot(p, &mut tokens[r.clone()], &mut answer[r]);
        }
        for i in 0..len {
            inputs[i] = tokens[i];
            targets[i] = if answer[i + 1] {
                tokens[i + 1]
            } else {
                IGNORE_INDEX
            };
        }
        Ok(())
    }

    fn vocab_size(&self) -> Option<u32> {
        Some(ADDITION_VOCAB)
    }

    fn describe(&self) -> String {
        format!(
            "addition corpus ({} split, {}..={} digits)",
            self.split.name(),
            self.corpus.cfg.min_digits,
            self.corpus.cfg.max_digits
        )
    }
}
