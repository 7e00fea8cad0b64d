//! The training loop behind `lathe train`.
//!
//! One optimizer step: zero the gradients; for each of `accum` micro-batches run the forward on
//! the tape and back-propagate with the seed `loss_scale / accum` (gradients accumulate with
//! `+=`); check the gradients for inf/NaN; compute the global norm of the unscaled gradients
//! and the clip factor; run the fused optimizer (unscale, clip, update, write the working copy)
//! unless a non-finite value was found, in which case the step is skipped in every precision;
//! update the loss scaler (GradScaler semantics in fp16). Then log, evaluate, checkpoint.
//!
//! Determinism: the same settings and seed give the same losses bit for bit; a run resumed from
//! a checkpoint reproduces the uninterrupted run's losses exactly (the checkpoint holds the
//! master weights, optimizer moments, scaler, data position and step).

mod eval;
mod state;

use crate::config::{DeviceSpec, OptimizerArg, RecomputeArg, TrainArgs, TrainConfig};
use crate::data::{AdditionConfig, Loader, LoaderConfig, LoaderPosition, Source, Split};
use crate::early_stop::{EarlyStopDecision, EarlyStopping};
use crate::metrics::{MetricsWriter, RunSummary, StepRecord, Throughput};
use crate::optim::{
    AdamWConfig, Optimizer, OptimizerConfig, ParamLayout, ParamView as OptView, Rounding,
    SgdConfig, StepArgs, StepOutcome, WorkingCopy, clip_factor, grad_norm, write_working_copy,
};
use crate::precision::{LossScaler, NonFiniteInjection, Precision, has_nonfinite};
use crate::profiler::{Phase, Profiler, RangeSink, Schedule as ProfSchedule};
use crate::schedule::{Schedule, scale_lr_linear};
use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use lathe_autograd::{DType, Gpt, GptConfig, ParamStore, Recompute, Tape};
use std::time::Instant;

pub use eval::EvalOutcome;

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps run, in total (including those before a resume).
    pub steps: u64,
    /// Loss of each step run by this process (index = step - first step).
    pub losses: Vec<f64>,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    /// Exact-match accuracy on held-out problems (built-in corpus only).
    pub eval_accuracy: Option<f64>,
    pub skipped_steps: u64,
    pub stopped_early: bool,
    pub peak_mem_bytes: u64,
}

/// Entry point of `lathe train`.
pub fn run_train(args: TrainArgs) -> Result<TrainOutcome> {
    let args = args.with_config_file()?;
    let device = args.device.unwrap_or(DeviceSpec::Auto);
    resolve_device(device)?;
    let cfg = TrainConfig::resolve(args, false)?;
    let mut trainer = Trainer::new(cfg)?;
    trainer.run()
}

/// Lathe's training runs on the CPU reference backend; the CUDA backend of autograd is not
/// part of this build yet. `cuda` therefore fails with the driver's error when there is no GPU
/// and with a clear message when there is one; `auto` falls back to the CPU.
fn resolve_device(spec: DeviceSpec) -> Result<()> {
    match spec {
        DeviceSpec::Cpu => Ok(()),
        DeviceSpec::Cuda(n) => {
            let dev = lathe_host::Device::cuda(n).with_context(|| format!("--device cuda:{n}"))?;
            bail!(
                "--device cuda:{n}: found {}, but training on the GPU needs Lathe's CUDA autograd \
                 backend, which this build does not have yet; use --device cpu",
                dev.describe()
            )
        }
        DeviceSpec::Auto => {
            if let Ok(dev) = lathe_host::Device::cuda(0) {
                eprintln!(
                    "note: {} found, but this build trains on the CPU reference backend only",
                    dev.describe()
                );
            }
            Ok(())
        }
    }
}

fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

fn recompute_of(r: RecomputeArg) -> Recompute {
    match r {
        RecomputeArg::None => Recompute::None,
        RecomputeArg::Act => Recompute::Act,
        RecomputeArg::Block => Recompute::Block,
    }
}

/// The low-precision working copy as the optimizer writes it (the GPU stores these bits).
enum Working {
    None,
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// The data a run trains on.
struct Data {
    source: Source,
    /// Addition corpus settings, when training on it (for the exact-match evaluation).
    addition: Option<AdditionConfig>,
    vocab: usize,
}

fn data_for(cfg: &TrainConfig) -> Result<Data> {
    match &cfg.data {
        None => {
            // 2-3 digit operands, zero-padded so every digit sits at a fixed position, the sum
            // written least significant digit first: the layout a small transformer learns
            // fastest (each answer digit depends on two fixed positions and the carry it just
            // wrote).
            let a = AdditionConfig {
                seed: cfg.seed,
                min_digits: 2,
                max_digits: 3,
                pad_operands: true,
                reverse_answer: true,
                ..AdditionConfig::default()
            };
            Ok(Data {
                source: Source::Addition(a.clone()),
                addition: Some(a),
                vocab: crate::data::addition::ADDITION_VOCAB as usize,
            })
        }
        Some(dir) => {
            let meta = crate::data::DatasetMeta::read(dir)
                .with_context(|| format!("--data {}", dir.display()))?;
            let vocab = match meta {
                Some(m) => m.vocab_size as usize,
                None => crate::data::TokenizerKind::Gpt2.vocab_size() as usize,
            };
            Ok(Data {
                source: Source::Shards {
                    path: dir.clone(),
                    vocab_size: Some(vocab as u32),
                },
                addition: None,
                vocab,
            })
        }
    }
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    model: Gpt,
    params: ParamStore,
    layout: ParamLayout,
    optimizer: Optimizer,
    working: Working,
    scaler: LossScaler,
    schedule: Schedule,
    loader: Loader,
    data: Data,
    tape: Tape,
    /// Evaluation runs on its own tape, so the training tape's peak memory is the step's.
    eval_tape: Tape,
    dtype: DType,
    recompute: Recompute,
    seq_len: usize,
    /// Optimizer steps completed.
    step: u64,
    tokens: u64,
    early: Option<EarlyStopping>,
    inject: NonFiniteInjection,
    best_val: Option<f64>,
    /// Step profiler (`--profile`); disabled otherwise (one branch per call).
    prof: Profiler,
}

impl Trainer {
    /// Builds the model, parameters, optimizer and data; resumes from `--resume` if given.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        if cfg.world > 1 || cfg.zero > 0 || cfg.offload_optimizer {
            bail!(
                "--world, --zero and --offload-optimizer need the sharded trainer, which this \
                 build does not have yet"
            );
        }
        let data = data_for(&cfg)?;
        let gcfg = GptConfig::from_name(&cfg.model)?.with_vocab_size(data.vocab);
        let seq_len = cfg.seq_len.unwrap_or(gcfg.block_size);
        if seq_len == 0 || seq_len > gcfg.block_size {
            bail!(
                "--seq-len {seq_len}: must be between 1 and the model's context length {}",
                gcfg.block_size
            );
        }
        let model = Gpt::new(gcfg)?;
        let mut params = model.init_params(cfg.seed);
        let layout = ParamLayout::new(
            params
                .views()
                .iter()
                .map(|v| OptView::new(v.name.clone(), v.offset, &v.shape, v.decay))
                .collect(),
            params.num_params(),
        )?;
        let opt_cfg = match cfg.optimizer {
            OptimizerArg::Adamw => OptimizerConfig::AdamW(AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            }),
            OptimizerArg::Sgd => OptimizerConfig::Sgd(SgdConfig {
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
                ..SgdConfig::default()
            }),
        };
        let optimizer = Optimizer::new(opt_cfg, params.num_params())?;
        let n = params.num_params();
        let working = match cfg.precision {
            Precision::Fp32 => Working::None,
            Precision::Bf16 => Working::Bf16(vec![bf16::ZERO; n]),
            Precision::Fp16 => Working::F16(vec![f16::ZERO; n]),
        };
        let dtype = dtype_of(cfg.precision);
        params.set_working_dtype(dtype);
        let global_batch = cfg.micro_batch * cfg.accum * cfg.world;
        let lr = if cfg.scale_lr {
            scale_lr_linear(cfg.lr, global_batch as u64, cfg.micro_batch as u64)?
        } else {
            cfg.lr
        };
        let schedule = Schedule::new(cfg.schedule, lr, cfg.warmup, cfg.steps, cfg.min_lr_frac)?;
        let early = match cfg.early_stop_patience {
            0 => None,
            p => Some(EarlyStopping::new(p, cfg.early_stop_min_delta)?),
        };
        let inject = NonFiniteInjection::at(cfg.inject_nonfinite.iter().copied());
        let mut t = Trainer {
            loader: Self::open_loader(&cfg, &data, seq_len, None)?,
            scaler: LossScaler::for_precision(cfg.precision),
            tape: Tape::new(dtype),
            eval_tape: Tape::new(dtype),
            recompute: recompute_of(cfg.recompute),
            cfg,
            model,
            params,
            layout,
            optimizer,
            working,
            schedule,
            data,
            dtype,
            seq_len,
            step: 0,
            tokens: 0,
            early,
            inject,
            best_val: None,
            prof: Profiler::disabled(),
        };
        if let Some(dir) = t.cfg.resume.clone() {
            t.resume_from(&dir)?;
        } else {
            t.refresh_working(0);
        }
        Ok(t)
    }

    fn open_loader(
        cfg: &TrainConfig,
        data: &Data,
        seq_len: usize,
        resume: Option<LoaderPosition>,
    ) -> Result<Loader> {
        let mut lc = LoaderConfig::new(cfg.micro_batch, seq_len);
        lc.seed = cfg.seed;
        lc.workers = cfg.loader_workers;
        lc.prefetch = cfg.prefetch;
        lc.curriculum = cfg
            .curriculum
            .parse()
            .map_err(|e| anyhow::anyhow!("--curriculum: {e}"))?;
        Ok(Loader::open(&data.source, Split::Train, lc, resume)?)
    }

    /// Rewrites the working copy (and the store's f32 view of it) from the master weights.
    fn refresh_working(&mut self, sr_step: u64) {
        let rounding = self.rounding();
        let master = self.params.master();
        match &mut self.working {
            Working::None => {}
            Working::Bf16(buf) => {
                write_working_copy(master, WorkingCopy::Bf16 { buf, rounding }, 0, sr_step);
            }
            Working::F16(buf) => {
                write_working_copy(master, WorkingCopy::F16(buf), 0, sr_step);
            }
        }
        self.publish_working();
    }

    /// Copies the optimizer's working copy into the parameter store the tape reads.
    fn publish_working(&mut self) {
        match &self.working {
            Working::None => {
                let (m, w) = (self.params.master().to_vec(), self.params.working_mut());
                w.copy_from_slice(&m);
            }
            Working::Bf16(buf) => {
                let w = self.params.working_mut();
                for (w, b) in w.iter_mut().zip(buf) {
                    *w = b.to_f32();
                }
            }
            Working::F16(buf) => {
                let w = self.params.working_mut();
                for (w, h) in w.iter_mut().zip(buf) {
                    *w = h.to_f32();
                }
            }
        }
        self.params.set_working_dtype(self.dtype);
    }

    fn rounding(&self) -> Rounding {
        if self.cfg.stochastic_rounding {
            Rounding::Stochastic {
                seed: self.cfg.seed,
            }
        } else {
            Rounding::Nearest
        }
    }

    /// Bytes the run holds: parameters (master, working, gradients), optimizer state and the
    /// tape's peak activation memory (the CPU backend's equivalent of the allocator's peak).
    fn mem_peak_bytes(&self) -> u64 {
        let n = self.params.num_params() as u64;
        let working = match self.working {
            Working::None => 0,
            _ => 2 * n,
        };
        let opt: u64 = self
            .optimizer
            .buffers()
            .iter()
            .map(|(_, b)| 4 * b.len() as u64)
            .sum();
        8 * n + working + opt + self.tape.peak_activation_bytes() as u64
    }

    /// Bytes held right now: parameters, optimizer state and the tape's live activations.
    fn live_bytes(&self) -> u64 {
        self.mem_peak_bytes() - self.tape.peak_activation_bytes() as u64
            + self.tape.live_activation_bytes() as u64
    }

    /// One optimizer step; returns its log record.
    fn train_step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr_at(step);
        let accum = self.cfg.accum;
        let loss_scale = self.scaler.scale();
        let seed = loss_scale / accum as f32;
        self.params.zero_grads();
        let mut loss_sum = 0f64;
        let (b, t) = (self.cfg.micro_batch, self.seq_len);
        for _ in 0..accum {
            let batch = {
                let _s = self.prof.span("data", Phase::Data);
                self.loader.next_batch()?
            };
            self.tape.clear();
            let fwd = self.prof.begin("forward", Phase::Forward);
            let loss = self.model.loss(
                &mut self.tape,
                &self.params,
                batch.inputs(),
                batch.targets(),
                batch.b,
                batch.t,
                self.recompute,
            )?;
            loss_sum += self.tape.scalar(loss)? as f64;
            self.prof.end(fwd);
            {
                let _s = self.prof.span("backward", Phase::Backward);
                self.tape.backward(loss, seed, &mut self.params)?;
            }
            self.prof.counter("allocated_bytes", self.live_bytes() as f64);
            self.loader.recycle(batch);
        }
        self.tokens += (accum * b * t) as u64;
        let loss = loss_sum / accum as f64;
        let opt_span = self.prof.begin("optimizer", Phase::Optimizer);
        self.inject.inject(step, self.params.grads_mut());
        let found_inf = has_nonfinite(self.params.grads());
        let inv_scale = self.scaler.inv_scale();
        let norm = if found_inf {
            f64::NAN
        } else {
            grad_norm(self.params.grads(), inv_scale)
        };
        let clip = if self.cfg.grad_clip > 0.0 && !found_inf {
            clip_factor(norm, self.cfg.grad_clip)
        } else {
            1.0
        };
        let args = StepArgs {
            lr: lr as f32,
            inv_scale,
            clip_factor: clip,
            found_inf,
            offset: 0,
        };
        let rounding = self.rounding();
        let (master, grads) = self.params.master_and_grads_mut();
        let working = match &mut self.working {
            Working::None => WorkingCopy::None,
            Working::Bf16(buf) => WorkingCopy::Bf16 { buf, rounding },
            Working::F16(buf) => WorkingCopy::F16(buf),
        };
        let outcome = self
            .optimizer
            .step(master, grads, working, &self.layout, &args)?;
        if outcome == StepOutcome::Applied {
            self.publish_working();
        }
        let update = self.scaler.update(found_inf);
        self.prof.end(opt_span);
        self.step += 1;
        Ok(StepRecord {
            step,
            loss,
            lr,
            tokens: self.tokens,
            tok_s: f64::NAN,
            loss_scale: loss_scale as f64,
            skipped: update.skipped,
            grad_norm: norm,
            mem_peak_bytes: self.mem_peak_bytes(),
            step_ms: Some(t0.elapsed().as_secs_f64() * 1e3),
            ..Default::default()
        })
    }

    /// Runs to `--steps` (or early stopping), evaluating, logging and checkpointing.
    pub fn run(&mut self) -> Result<TrainOutcome> {
        let cfg = self.cfg.clone();
        let start_step = self.step;
        let mut metrics = match &cfg.log {
            Some(p) if cfg.resume.is_some() => Some(MetricsWriter::resume(p, start_step)?),
            Some(p) => Some(MetricsWriter::create(p)?),
            None => None,
        };
        let n = self.params.num_params();
        eprintln!(
            "lathe: training {} ({:.2}M parameters) on the CPU, {} precision, {} steps of {} x {} \
             x {} tokens{}",
            cfg.model,
            n as f64 / 1e6,
            cfg.precision.as_str(),
            cfg.steps,
            cfg.accum,
            cfg.micro_batch,
            self.seq_len,
            if start_step > 0 {
                format!(", resuming at step {start_step}")
            } else {
                String::new()
            }
        );
        if cfg.profile.is_some() {
            let sched = ProfSchedule::new(cfg.profile_wait, cfg.profile_warmup, cfg.profile_active);
            self.prof = Profiler::new(sched)?.with_range_sink(Box::new(NvtxSink));
        }
        let bar = progress_bar(cfg.progress, cfg.steps, start_step);
        let mut meter = Throughput::new(0.9, 1);
        let mut losses = Vec::new();
        let mut stopped_early = false;
        let mut last_val = None;
        let run_start = Instant::now();
        while self.step < cfg.steps {
            let t0 = Instant::now();
            let mut rec = self.train_step()?;
            let tokens = (cfg.accum * cfg.micro_batch * self.seq_len) as u64;
            rec.tok_s = meter.update(tokens, t0.elapsed()).unwrap_or(f64::NAN);
            losses.push(rec.loss);
            let done = self.step;
            let eval_now = cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every) && done < cfg.steps;
            if eval_now || done == cfg.steps {
                let v = self.val_loss()?;
                rec.val_loss = Some(v);
                last_val = Some(v);
                self.best_val = Some(self.best_val.map_or(v, |b: f64| b.min(v)));
                let msg = format!(
                    "step {done}/{}: loss {:.4}, val loss {v:.4}, {:.0} tok/s",
                    cfg.steps, rec.loss, rec.tok_s
                );
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
                if let Some(es) = &mut self.early
                    && es.observe(rec.step, v) == EarlyStopDecision::Stop
                {
                    stopped_early = true;
                }
            } else if bar.is_none() && (done.is_multiple_of(50) || done == 1) {
                eprintln!(
                    "step {done}/{}: loss {:.4}, {:.0} tok/s{}",
                    cfg.steps,
                    rec.loss,
                    rec.tok_s,
                    if rec.skipped { " (skipped: non-finite gradients)" } else { "" }
                );
            }
            if rec.skipped {
                let msg = format!(
                    "step {}: non-finite gradients, step skipped; loss scale now {}",
                    rec.step,
                    self.scaler.scale()
                );
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
            }
            if let Some(b) = &bar {
                b.set_position(done);
                b.set_message(format!(
                    "loss {:.4} | {:.0} tok/s | mem {:.1} MB",
                    rec.loss,
                    rec.tok_s,
                    rec.mem_peak_bytes as f64 / 1e6
                ));
            }
            self.prof.counter("peak_bytes", rec.mem_peak_bytes as f64);
            self.prof.step();
            if let Some(m) = &mut metrics {
                m.write_step(&rec)?;
            }
            let save_now = cfg.save.is_some()
                && ((cfg.save_every > 0 && done.is_multiple_of(cfg.save_every))
                    || done == cfg.steps
                    || stopped_early);
            if save_now {
                self.save_checkpoint()?;
            }
            if stopped_early {
                let msg = format!("early stopping at step {done}: validation loss stopped improving");
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
                break;
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        if let Some(path) = &cfg.profile {
            self.prof
                .write_chrome_trace(path)
                .with_context(|| format!("--profile {}", path.display()))?;
            eprintln!("{}", self.prof.summary(None));
            eprintln!("trace written to {} (open it in Perfetto or chrome://tracing)", path.display());
        }
        let eval = self.final_evaluation()?;
        let final_loss = losses.last().copied().unwrap_or(f64::NAN);
        let wall = run_start.elapsed().as_secs_f64();
        let run_tokens = (losses.len() * cfg.accum * cfg.micro_batch * self.seq_len) as f64;
        let summary = RunSummary {
            steps: self.step,
            tokens: self.tokens,
            final_loss,
            eval_accuracy: eval.accuracy,
            final_val_loss: last_val,
            best_val_loss: self.best_val,
            skipped_steps: self.scaler.skipped_steps(),
            wall_s: wall,
            mean_tok_s: if wall > 0.0 { run_tokens / wall } else { f64::NAN },
            stopped_early,
            ..Default::default()
        };
        if let Some(m) = &mut metrics {
            m.write_summary(&summary)?;
        }
        eprintln!(
            "done: {} steps, final loss {final_loss:.4}{}{} in {wall:.1} s ({:.0} tok/s)",
            self.step,
            last_val
                .map(|v| format!(", val loss {v:.4}"))
                .unwrap_or_default(),
            eval.accuracy
                .map(|a| format!(", exact match {:.1}%", 100.0 * a))
                .unwrap_or_default(),
            summary.mean_tok_s
        );
        Ok(TrainOutcome {
            steps: self.step,
            losses,
            final_loss,
            final_val_loss: last_val,
            eval_accuracy: eval.accuracy,
            skipped_steps: self.scaler.skipped_steps(),
            stopped_early,
            peak_mem_bytes: self.mem_peak_bytes(),
        })
    }
}

fn progress_bar(enabled: bool, steps: u64, start: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start);
    Some(bar)
}

/// Sends the profiler's spans to NVTX, so Nsight Systems shows them; a silent no-op where the
/// NVTX library is absent.
struct NvtxSink;

thread_local! {
    static NVTX_STACK: std::cell::RefCell<Vec<lathe_host::nvtx::Range>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl RangeSink for NvtxSink {
    fn push_range(&self, name: &str) {
        NVTX_STACK.with(|s| s.borrow_mut().push(lathe_host::nvtx::range(name)));
    }
    fn pop_range(&self) {
        NVTX_STACK.with(|s| {
            s.borrow_mut().pop();
        });
    }
}
