//! One optimizer step of one rank (see the module documentation of [`super`]).

use super::Trainer;
use crate::metrics::StepRecord;
use crate::optim::{StepArgs, clip_factor};
use crate::profiler::{KernelRecord, Phase};
use crate::zero::mean_over_ranks;
use anyhow::Result;
use std::time::Instant;

impl Trainer {
    /// Hands the tape's op timings (the CPU backend's "kernels") to the profiler, on its
    /// "CPU" kernel track, while it records; drops them otherwise.
    pub(super) fn record_op_timings(&mut self) {
        let events = self.tape.take_events();
        if !self.prof.is_recording() {
            return;
        }
        // Convert `Instant`s to the profiler's time base through one common reading.
        let (now, now_ns) = (Instant::now(), self.prof.now_ns());
        for ev in events {
            let ago = now.saturating_duration_since(ev.start).as_nanos() as u64;
            let name = if ev.backward {
                format!("{} (backward)", ev.op)
            } else {
                ev.op.to_string()
            };
            self.prof.kernel_span(KernelRecord {
                name: name.into(),
                stream: 0,
                start_ns: now_ns.saturating_sub(ago),
                dur_ns: (ev.secs * 1e9) as u64,
                flops: 0,
                bytes: 0,
                simulated: None,
            });
        }
    }

    /// One optimizer step; returns its log record (the same on every rank but for timings).
    pub(super) fn train_step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr_at(step);
        let accum = self.cfg.accum;
        let loss_scale = self.scaler.scale();
        let seed = loss_scale / accum as f32;
        {
            // Stage 3 all-gathers the working copy here; stage 2 builds its workspace.
            let _s = self.prof.span("gather_params", Phase::Communication);
            self.zero.begin_step(&self.comm)?;
        }
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
                self.zero.workspace()?,
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
                self.tape.backward(loss, seed, self.zero.workspace_mut()?)?;
            }
            self.prof
                .counter("allocated_bytes", self.live_bytes() as f64);
            self.record_op_timings();
            self.loader.recycle(batch);
        }
        self.tokens += (accum * b * t * self.cfg.world) as u64;
        if self.is_root() {
            // Testing aid: an inf in rank 0's gradient before the reduction reaches every rank.
            self.inject
                .inject(step, self.zero.workspace_mut()?.grads_mut());
        }
        {
            let _s = self.prof.span("reduce_gradients", Phase::Communication);
            self.zero.reduce_gradients(&self.comm)?;
        }
        let loss = mean_over_ranks(&self.comm, loss_sum / accum as f64)?;
        let opt_span = self.prof.begin("optimizer", Phase::Optimizer);
        let inv_scale = self.scaler.inv_scale();
        let (found_inf, norm) = self.zero.check_gradients(&self.comm, inv_scale)?;
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
        self.zero.step(&self.comm, &args)?;
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
}
