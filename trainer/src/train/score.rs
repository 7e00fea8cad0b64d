//! `lathe eval`: score a checkpoint from the command line.
//!
//! ```text
//! lathe eval --checkpoint DIR [--data PATH | --text FILE] [--micro-batch B] [--seq-len T]
//! ```
//!
//! Loads the model of a checkpoint (a `step-*` directory, or a `--save` directory: its newest)
//! and reports the mean cross-entropy per predicted token and the perplexity `exp(loss)`:
//!
//! * `--data PATH`: over the whole validation split of a dataset (`lathe prepare` or llm.c
//!   shards, or one `.bin` shard);
//! * `--text FILE`: over a text file, tokenized with the tokenizer of the checkpoint's
//!   vocabulary (`bytes` for 257 tokens, `gpt2` for 50257; `--tokenizer` to choose);
//! * neither: over the validation split of the data the checkpoint was trained on, and for the
//!   built-in addition corpus also the exact-match accuracy of greedy decoding on held-out
//!   problems (`--eval-problems`).
//!
//! Tokens are cut into windows of `T + 1` as the loader does (consecutive windows share one
//! token, so every token but the first is predicted once); a last, shorter window is scored
//! too. The loss is computed in the checkpoint's precision.

use super::{Data, data_for, dtype_of, eval};
use crate::checkpoint::{CheckpointReader, hf};
use crate::config::TrainConfig;
use crate::data::{IGNORE_INDEX, Source, Split, TokenizerKind, WindowSource};
use crate::optim::{ParamLayout, ParamView};
use anyhow::{Context, Result, bail};
use lathe_autograd::{Gpt, GptConfig, ParamStore, Recompute, Tape};
use std::path::PathBuf;

/// Arguments of `lathe eval`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EvalArgs {
    /// A checkpoint: a step-* directory, or a --save directory (its newest checkpoint).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Score the validation split of this dataset (a directory or one .bin shard).
    #[arg(long, value_name = "PATH", conflicts_with = "text")]
    pub data: Option<PathBuf>,
    /// Score this text file.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Tokenizer for --text (default: from the checkpoint's vocabulary size).
    #[arg(long, value_enum)]
    pub tokenizer: Option<TokenizerKind>,
    /// Windows per forward pass (default: the checkpoint's --micro-batch).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per window (default: the checkpoint's sequence length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Held-out problems for the exact-match evaluation (built-in corpus).
    #[arg(long)]
    pub eval_problems: Option<usize>,
}

/// What `lathe eval` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// The checkpoint directory read.
    pub checkpoint: PathBuf,
    pub step: u64,
    /// What was scored, for messages.
    pub what: String,
    /// Tokens predicted.
    pub tokens: u64,
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Exact match on held-out addition problems (built-in corpus only).
    pub exact_match: Option<f64>,
}

/// Scores `b` windows `(inputs, targets)` of length `t`; returns the summed loss and the
/// number of targets that carry a loss (not [`IGNORE_INDEX`]).
fn score_batch(
    model: &Gpt,
    params: &ParamStore,
    tape: &mut Tape,
    inputs: &[u32],
    targets: &[u32],
    b: usize,
    t: usize,
) -> Result<(f64, u64)> {
    let counted = targets.iter().filter(|&&y| y != IGNORE_INDEX).count() as u64;
    if counted == 0 {
        return Ok((0.0, 0));
    }
    tape.clear();
    let loss = model.loss(tape, params, inputs, targets, b, t, Recompute::None)?;
    let mean = tape.scalar(loss)? as f64;
    tape.clear();
    Ok((mean * counted as f64, counted))
}

fn add(acc: &mut (f64, u64), x: (f64, u64)) {
    acc.0 += x.0;
    acc.1 += x.1;
}

/// Mean loss over every window of `src` (every group), `b` windows at a time.
fn score_source(
    model: &Gpt,
    params: &ParamStore,
    tape: &mut Tape,
    src: &dyn WindowSource,
    b: usize,
) -> Result<(f64, u64)> {
    let t = src.seq_len();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut acc = (0f64, 0u64);
    let mut pending = 0;
    let (mut x, mut y) = (vec![0u32; t], vec![0u32; t]);
    for (g, &windows) in src.group_windows().iter().enumerate() {
        for w in 0..windows {
            src.read_window(g, w, t, &mut x, &mut y)?;
            inputs.extend_from_slice(&x);
            targets.extend_from_slice(&y);
            pending += 1;
            if pending == b {
                add(
                    &mut acc,
                    score_batch(model, params, tape, &inputs, &targets, b, t)?,
                );
                inputs.clear();
                targets.clear();
                pending = 0;
            }
        }
    }
    if pending > 0 {
        add(
            &mut acc,
            score_batch(model, params, tape, &inputs, &targets, pending, t)?,
        );
    }
    Ok(acc)
}

/// Mean loss over a token stream, in windows of `t + 1` (the last one may be shorter).
fn score_tokens(
    model: &Gpt,
    params: &ParamStore,
    tape: &mut Tape,
    tokens: &[u32],
    b: usize,
    t: usize,
) -> Result<(f64, u64)> {
    if tokens.len() < 2 {
        bail!(
            "the text has {} token(s); scoring needs at least 2",
            tokens.len()
        );
    }
    let mut acc = (0f64, 0u64);
    let full = (tokens.len() - 1) / t;
    let mut w = 0;
    while w < full {
        let k = b.min(full - w);
        let (mut x, mut y) = (Vec::with_capacity(k * t), Vec::with_capacity(k * t));
        for i in w..w + k {
            x.extend_from_slice(&tokens[i * t..i * t + t]);
            y.extend_from_slice(&tokens[i * t + 1..i * t + t + 1]);
        }
        add(&mut acc, score_batch(model, params, tape, &x, &y, k, t)?);
        w += k;
    }
    let rest = tokens.len() - 1 - full * t;
    if rest > 0 {
        let s = full * t;
        let x = score_batch(
            model,
            params,
            tape,
            &tokens[s..s + rest],
            &tokens[s + 1..s + rest + 1],
            1,
            rest,
        )?;
        add(&mut acc, x);
    }
    Ok(acc)
}

/// Entry point of `lathe eval`.
pub fn run_eval(args: EvalArgs) -> Result<EvalReport> {
    let reader = CheckpointReader::open(&args.checkpoint)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    let st = reader.state();
    let mut cfg: TrainConfig =
        serde_json::from_value(st.settings.clone()).context("the checkpoint's run settings")?;
    if let Some(p) = args.eval_problems {
        cfg.eval_problems = p;
    }
    let mc = &st.model_config;
    let field = |k: &str| {
        mc.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize)
            .with_context(|| format!("the checkpoint's model config has no {k}"))
    };
    let vocab = field("vocab_size")?;
    let gcfg = GptConfig::from_name(&cfg.model)?.with_vocab_size(vocab);
    if (gcfg.n_layer, gcfg.n_head, gcfg.n_embd)
        != (field("n_layer")?, field("n_head")?, field("n_embd")?)
    {
        bail!(
            "the checkpoint's model config {mc} does not match model preset {}",
            cfg.model
        );
    }
    let model = Gpt::new(gcfg.clone())?;
    let mut params = model.init_params(cfg.seed);
    let layout = ParamLayout::new(
        params
            .views()
            .iter()
            .map(|v| ParamView::new(v.name.clone(), v.offset, &v.shape, v.decay))
            .collect(),
        params.num_params(),
    )?;
    hf::load_master(&reader, &layout, vocab, params.master_mut())?;
    let dtype = dtype_of(cfg.precision);
    params.sync_working(dtype);
    let mut tape = Tape::new(dtype);
    let seq_len = args
        .seq_len
        .or_else(|| {
            mc.get("seq_len")
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
        })
        .unwrap_or(gcfg.block_size);
    if seq_len == 0 || seq_len > gcfg.block_size {
        bail!(
            "--seq-len {seq_len}: must be between 1 and the model's context length {}",
            gcfg.block_size
        );
    }
    let b = args.micro_batch.unwrap_or(cfg.micro_batch);
    if b == 0 {
        bail!("--micro-batch must be at least 1");
    }
    super::memory::check_tokens(b, seq_len, super::memory::available_bytes())?;

    let mut exact_match = None;
    let ((sum, n), what) = if let Some(text) = &args.text {
        let kind = match args.tokenizer {
            Some(k) => k,
            None if vocab == TokenizerKind::Bytes.vocab_size() as usize => TokenizerKind::Bytes,
            None if vocab == TokenizerKind::Gpt2.vocab_size() as usize => TokenizerKind::Gpt2,
            None => bail!(
                "the checkpoint's vocabulary has {vocab} tokens, which is neither bytes (257) \
                 nor gpt2 (50257): give --tokenizer"
            ),
        };
        if kind.vocab_size() as usize > vocab {
            bail!(
                "--tokenizer {kind} has {} tokens, more than the checkpoint's {vocab}",
                kind.vocab_size()
            );
        }
        let bytes = std::fs::read(text).with_context(|| format!("--text {}", text.display()))?;
        let s = std::str::from_utf8(&bytes)
            .with_context(|| format!("--text {}: not UTF-8 text", text.display()))?;
        let tokens = kind.encode(s)?;
        (
            score_tokens(&model, &params, &mut tape, &tokens, b, seq_len)?,
            format!("{} ({kind} tokens)", text.display()),
        )
    } else {
        if args.data.is_some() {
            cfg.data = args.data.clone();
        }
        let data: Data = data_for(&cfg)?;
        if data.vocab != vocab {
            bail!(
                "the data's vocabulary has {} tokens, the checkpoint's {vocab}",
                data.vocab
            );
        }
        let src = data.source.open(Split::Val, seq_len)?;
        let what = match &data.source {
            Source::Shards { path, .. } => format!("{} (validation split)", path.display()),
            Source::Addition(_) => "the built-in addition corpus (validation split)".to_string(),
        };
        let scored = score_source(&model, &params, &mut tape, src.as_ref(), b)?;
        exact_match = eval::final_evaluation(&cfg, &data, &model, &params)?.accuracy;
        (scored, what)
    };
    if n == 0 {
        bail!("{what}: nothing to score (no window of {seq_len} + 1 tokens)");
    }
    let loss = sum / n as f64;
    let report = EvalReport {
        checkpoint: reader.path().to_path_buf(),
        step: reader.step(),
        what,
        tokens: n,
        loss,
        perplexity: loss.exp(),
        exact_match,
    };
    println!(
        "{} (step {}) on {}: loss {:.4}, perplexity {:.3} over {} tokens{}",
        report.checkpoint.display(),
        report.step,
        report.what,
        report.loss,
        report.perplexity,
        report.tokens,
        report
            .exact_match
            .map(|a| format!(", exact match {:.1}%", 100.0 * a))
            .unwrap_or_default()
    );
    Ok(report)
}
