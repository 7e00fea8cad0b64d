//! The run loop: steps, logging, evaluation, checkpoints (rank 0 reports; every rank takes
//! part in the collectives that evaluation and checkpoints need).

use super::{NvtxSink, TrainOutcome, Trainer, eval};
use crate::early_stop::EarlyStopDecision;
use crate::metrics::{MetricsWriter, RunSummary, Throughput};
use crate::profiler::{Profiler, Schedule as ProfSchedule};
use crate::zero::{RankMemory, StateWidths, rank_report};
use anyhow::{Context, Result, bail};
use lathe_host::comm::{Communicator, ReduceOp};
use std::time::Instant;

/// A run stops as diverged after this many optimizer steps in a row were skipped for non-finite
/// gradients: more than the 16 backoffs that take fp16's initial scale 2^16 to the floor of 1,
/// so a scale that starts too high still recovers.
pub const MAX_CONSECUTIVE_SKIPS: u64 = 40;

impl Trainer {
    /// Whether any master weight is NaN or infinite (a collective: every rank calls it).
    fn weights_nonfinite(&mut self) -> Result<bool> {
        self.sync_device_to_host()?;
        let bad = match self.zero.master_on_root(&self.comm)? {
            Some(m) => m.iter().any(|x| !x.is_finite()),
            None => false,
        };
        let mut flag = [if bad { 1.0f32 } else { 0.0 }];
        self.comm.broadcast(&mut flag, 0)?;
        Ok(flag[0] != 0.0)
    }

    /// A failure after a completed step must not cost the run: saves a checkpoint of this
    /// step (when `--save` is given and it has none yet) and returns `e`, saying what was
    /// saved. One rank only: with several, the others are waiting in a collective.
    fn save_before_failing(&mut self, e: anyhow::Error) -> anyhow::Error {
        if self.cfg.save.is_none() || self.cfg.world > 1 || self.saved_step == Some(self.step) {
            return e;
        }
        match self.save_checkpoint() {
            Ok(()) => e.context(format!(
                "(a checkpoint of step {} was saved first; continue with --resume {})",
                self.step,
                self.cfg
                    .save
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            )),
            Err(s) => e.context(format!("(saving a checkpoint failed too: {s:#})")),
        }
    }

    /// Prints `msg` above the progress bar, or on stderr (rank 0 only).
    fn say(&self, bar: &Option<indicatif::ProgressBar>, msg: String) {
        if !self.is_root() {
            return;
        }
        match bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Every rank's startup memory, on every rank (a collective).
    fn gather_memory(&self) -> Result<Vec<RankMemory>> {
        const F: usize = 7;
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let m = self.startup_memory;
        let mut v = vec![0f64; world * F];
        let mine = [
            m.master,
            m.working,
            m.grads,
            m.optimizer,
            m.staging,
            m.workspace_idle,
            m.workspace_step,
        ];
        for (d, s) in v[rank * F..(rank + 1) * F].iter_mut().zip(mine) {
            *d = s as f64;
        }
        self.comm.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok(v.chunks(F)
            .map(|c| RankMemory {
                master: c[0] as u64,
                working: c[1] as u64,
                grads: c[2] as u64,
                optimizer: c[3] as u64,
                staging: c[4] as u64,
                offloaded: m.offloaded,
                workspace_idle: c[5] as u64,
                workspace_step: c[6] as u64,
            })
            .collect())
    }

    /// Validation loss on rank 0 (`None` elsewhere); a collective in stage 3.
    fn val_loss(&mut self) -> Result<Option<f64>> {
        let stage3_dev = self.stage3_eval_device();
        if stage3_dev.is_some() {
            // The host model's shards are refreshed from the devices, then gathered to rank 0.
            self.sync_device_to_host()?;
        }
        let (cfg, data, model, tape, seq_len) = (
            &self.cfg,
            &self.data,
            &self.model,
            &mut self.eval_tape,
            self.seq_len,
        );
        self.zero
            .with_root_params(&self.comm, |p| match &stage3_dev {
                Some(dev) => eval::val_loss(
                    cfg,
                    data,
                    model,
                    tape,
                    seq_len,
                    &super::device_step::store_on_device(p, dev)?,
                ),
                None => eval::val_loss(cfg, data, model, tape, seq_len, p),
            })?
            .transpose()
    }

    /// Runs to `--steps` (or early stopping), evaluating, logging and checkpointing.
    pub fn run(&mut self) -> Result<TrainOutcome> {
        let cfg = self.cfg.clone();
        let root = self.is_root();
        let start_step = self.step;
        if start_step >= cfg.steps {
            let from = cfg.resume.as_deref().unwrap_or(std::path::Path::new("?"));
            if start_step > cfg.steps {
                bail!(
                    "nothing to train: the checkpoint in {} is at step {start_step}, past \
                     --steps {}; give --steps above {start_step} to continue it",
                    from.display(),
                    cfg.steps
                );
            }
            if root {
                eprintln!(
                    "nothing to train: the checkpoint in {} is already at step {start_step} = \
                     --steps; give a larger --steps to continue it",
                    from.display()
                );
            }
            return Ok(TrainOutcome {
                steps: self.step,
                losses: Vec::new(),
                final_loss: f64::NAN,
                final_val_loss: None,
                eval_accuracy: None,
                skipped_steps: self.scaler.skipped_steps(),
                stopped_early: false,
                peak_mem_bytes: self.mem_peak_bytes(),
                ranks: Vec::new(),
            });
        }
        let mut metrics = match &cfg.log {
            // Step records are numbered from 0: keep those of the steps already done.
            Some(p) if root && cfg.resume.is_some() => {
                Some(MetricsWriter::resume_before(p, start_step)?)
            }
            Some(p) if root => Some(MetricsWriter::create(p)?),
            _ => None,
        };
        let n = self.zero.len();
        let memory = self.gather_memory()?;
        if root {
            eprintln!(
                "lathe: training {} ({:.2}M parameters) on {}, {} precision, {} steps of {} \
                 x {} x {} tokens{}{}",
                cfg.model,
                n as f64 / 1e6,
                self.dev
                    .as_ref()
                    .map_or("the CPU".to_string(), |d| d.dev.describe()),
                cfg.precision.as_str(),
                cfg.steps,
                cfg.accum,
                cfg.micro_batch,
                self.seq_len,
                if cfg.world > 1 || cfg.zero > 0 || cfg.offload_optimizer {
                    format!(
                        " on each of {} ranks, {}{}",
                        cfg.world,
                        self.zero.stage(),
                        if cfg.offload_optimizer {
                            ", optimizer offloaded"
                        } else {
                            ""
                        }
                    )
                } else {
                    String::new()
                },
                if start_step > 0 {
                    format!(", resuming at step {start_step}")
                } else {
                    String::new()
                }
            );
            // The per-rank memory table matters when state is split across ranks.
            if cfg.world > 1 || cfg.zero > 0 || cfg.offload_optimizer {
                let widths = StateWidths::lathe(cfg.precision, self.zero.state_names().len());
                eprint!("{}", rank_report(&memory, n, self.zero.stage(), &widths));
            }
            if cfg.profile.is_some() {
                let sched =
                    ProfSchedule::new(cfg.profile_wait, cfg.profile_warmup, cfg.profile_active);
                self.prof = Profiler::new(sched)?.with_range_sink(Box::new(NvtxSink));
                if let Some(d) = &self.dev {
                    // Device kernels on the device's track: CUDA-event times on a GPU, the
                    // simulator's counters on the simulated device.
                    self.prof.set_device_label(&d.dev.describe());
                    d.dev.enable_kernel_timing()?;
                } else {
                    // The CPU backend's ops stand in for kernels, on a "CPU" track.
                    self.prof.set_device_label("CPU");
                    self.tape.set_profiling(true);
                }
            }
        }
        let bar = if root {
            progress_bar(cfg.progress, cfg.steps, start_step)
        } else {
            None
        };
        let mut meter = Throughput::new(0.9, 1);
        let mut losses = Vec::new();
        let mut stopped_early = false;
        let mut last_val = None;
        let run_start = Instant::now();
        let step_tokens = (cfg.accum * cfg.micro_batch * self.seq_len * cfg.world) as u64;
        let mut skipped_in_a_row = 0u64;
        'steps: while self.step < cfg.steps {
            let t0 = Instant::now();
            let recs = if self.dev.is_some() {
                // The host reads a device step's record a step behind, except where it must
                // look at the state anyway: evaluations, checkpoints, the last step.
                let next = self.step + 1;
                let drain = next == cfg.steps
                    || (cfg.eval_every > 0 && next.is_multiple_of(cfg.eval_every))
                    || (cfg.save.is_some()
                        && cfg.save_every > 0
                        && next.is_multiple_of(cfg.save_every));
                self.train_step_device(drain)?
            } else {
                vec![self.train_step()?]
            };
            let elapsed = t0.elapsed() / recs.len().max(1) as u32;
            for mut rec in recs {
                // The meter skips the first (warm-up) step; report that step's own rate meanwhile.
                rec.tok_s = meter
                    .update(step_tokens, elapsed)
                    .unwrap_or(step_tokens as f64 / elapsed.as_secs_f64().max(1e-9));
                losses.push(rec.loss);
                let done = rec.step + 1;
                skipped_in_a_row = if rec.skipped { skipped_in_a_row + 1 } else { 0 };
                // A non-finite loss with weights that are still finite is one bad batch (the step
                // is skipped); with non-finite weights, or when every step is skipped, the run has
                // diverged: stop, without a checkpoint of the broken state.
                let diverged = if !rec.loss.is_finite() && self.weights_nonfinite()? {
                    Some(format!("the weights hold NaN or inf after step {done}"))
                } else if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS {
                    Some(format!(
                        "the last {skipped_in_a_row} steps (up to step {done}) were all skipped for \
                     non-finite gradients{}",
                        if self.scaler.is_enabled() {
                            format!(", loss scale down to {}", self.current_scale())
                        } else {
                            String::new()
                        }
                    ))
                } else {
                    None
                };
                if let Some(why) = diverged {
                    if let Some(m) = &mut metrics {
                        m.write_step(&rec)?;
                    }
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    bail!(
                        "training diverged: {why} (loss {}). Lower --lr, use bf16 or fp32, or \
                     clip gradients (--grad-clip); {}",
                        rec.loss,
                        match self.saved_step {
                            Some(s) => format!("the last checkpoint is step {s}"),
                            None => "no checkpoint was written".to_string(),
                        }
                    );
                }
                let eval_now =
                    cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every) && done < cfg.steps;
                if eval_now || done == cfg.steps {
                    let val = self.val_loss().map_err(|e| self.save_before_failing(e));
                    if let Some(v) = val? {
                        rec.val_loss = Some(v);
                        last_val = Some(v);
                        self.best_val = Some(self.best_val.map_or(v, |b: f64| b.min(v)));
                        let msg = format!(
                            "step {done}/{}: loss {:.4}, val loss {v:.4}, {:.0} tok/s",
                            cfg.steps, rec.loss, rec.tok_s
                        );
                        self.say(&bar, msg);
                        if let Some(es) = &mut self.early
                            && es.observe(rec.step, v) == EarlyStopDecision::Stop
                        {
                            stopped_early = true;
                        }
                    }
                    // Rank 0 decided; every rank stops together.
                    let mut flag = [if stopped_early { 1.0f32 } else { 0.0 }];
                    self.comm.broadcast(&mut flag, 0)?;
                    stopped_early = flag[0] != 0.0;
                } else if bar.is_none() && (done.is_multiple_of(50) || done == 1) {
                    let msg = format!(
                        "step {done}/{}: loss {:.4}, {:.0} tok/s{}",
                        cfg.steps,
                        rec.loss,
                        rec.tok_s,
                        if rec.skipped {
                            " (skipped: non-finite gradients)"
                        } else {
                            ""
                        }
                    );
                    self.say(&bar, msg);
                }
                if rec.skipped {
                    let msg = format!(
                        "step {done}: non-finite gradients, step skipped; loss scale now {}",
                        self.current_scale()
                    );
                    self.say(&bar, msg);
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
                if let Some(m) = &mut metrics
                    && let Err(e) = m.write_step(&rec)
                {
                    return Err(self.save_before_failing(e.into()));
                }
                let save_now = cfg.save.is_some()
                    && ((cfg.save_every > 0 && done.is_multiple_of(cfg.save_every))
                        || done == cfg.steps
                        || stopped_early);
                if save_now {
                    self.save_checkpoint()?;
                }
                if stopped_early {
                    let msg =
                        format!("early stopping at step {done}: validation loss stopped improving");
                    self.say(&bar, msg);
                    break 'steps;
                }
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        // The scaler's counts and the weights, from the device.
        self.sync_device_to_host()?;
        if let (Some(path), true) = (&cfg.profile, root) {
            self.prof
                .write_chrome_trace(path)
                .with_context(|| format!("--profile {}", path.display()))?;
            eprintln!("{}", self.prof.summary(None));
            eprintln!(
                "trace written to {} (open it in Perfetto or chrome://tracing)",
                path.display()
            );
        }
        let eval = {
            let stage3_dev = self.stage3_eval_device();
            let (cfg, data, model) = (&self.cfg, &self.data, &self.model);
            self.zero
                .with_root_params(&self.comm, |p| match &stage3_dev {
                    Some(dev) => eval::final_evaluation(
                        cfg,
                        data,
                        model,
                        &super::device_step::store_on_device(p, dev)?,
                    ),
                    None => eval::final_evaluation(cfg, data, model, p),
                })?
                .transpose()?
                .unwrap_or_default()
        };
        let final_loss = losses.last().copied().unwrap_or(f64::NAN);
        let wall = run_start.elapsed().as_secs_f64();
        let run_tokens = losses.len() as f64 * step_tokens as f64;
        let summary = RunSummary {
            steps: self.step,
            tokens: self.tokens,
            final_loss,
            eval_accuracy: eval.accuracy,
            final_val_loss: last_val,
            best_val_loss: self.best_val,
            skipped_steps: self.scaler.skipped_steps(),
            wall_s: wall,
            mean_tok_s: if wall > 0.0 {
                run_tokens / wall
            } else {
                f64::NAN
            },
            stopped_early,
            ..Default::default()
        };
        if let Some(m) = &mut metrics {
            m.write_summary(&summary)?;
        }
        if root {
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
        }
        Ok(TrainOutcome {
            steps: self.step,
            losses,
            final_loss,
            final_val_loss: last_val,
            eval_accuracy: eval.accuracy,
            skipped_steps: self.scaler.skipped_steps(),
            stopped_early,
            peak_mem_bytes: self.mem_peak_bytes(),
            ranks: Vec::new(),
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
