//! One rank's model state under a ZeRO stage, and the phases of a sharded optimizer step.
//!
//! A step, as the trainer drives it (every call a collective where it says so):
//!
//! 1. [`ShardedModel::begin_step`] — a parameter store holding the full working copy and zeroed
//!    gradients is ready (stage 3: all-gathered from the shards);
//! 2. the trainer runs forward and backward on [`ShardedModel::workspace`] for each micro-batch;
//! 3. [`ShardedModel::reduce_gradients`] — all-reduce in buckets (stages 0-1) or reduce-scatter
//!    and release the workspace (stages 2-3);
//! 4. [`ShardedModel::check_gradients`] — inf/NaN flag (all-reduced `Max`) and global norm
//!    (per-rank sums of squares over each rank's shard, combined in rank order);
//! 5. [`ShardedModel::step`] — the fused update of the rank's master shard, then the new
//!    working copy is all-gathered where the stage keeps it whole.

use super::collectives::{all_reduce_buckets, any_rank, gather_to_root, sum_over_ranks};
use super::memory::RankMemory;
use super::offload::{HostOptimizer, OptimizerShard};
use super::{ZeroError, ZeroStage};
use crate::optim::{
    Optimizer, OptimizerConfig, OptimizerState, ParamLayout, ParamView as OptView, Rounding,
    StepArgs, StepOutcome, WorkingCopy, grad_sq_partials, write_working_copy,
};
use crate::precision::has_nonfinite;
use half::{bf16, f16};
use lathe_autograd::{DType, ParamSpec, ParamStore};
use lathe_host::comm::{CommElement, CommError, Communicator, HostComm, ReduceOp, shard_range};
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;

/// Settings of a sharded run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZeroOptions {
    pub stage: ZeroStage,
    /// Keep the master shard and optimizer state in a [`super::HostOptimizer`].
    pub offload: bool,
    /// Compute dtype of the working copy (F32, BF16 or F16).
    pub dtype: DType,
    /// How the bf16 working copy is rounded.
    pub rounding: Rounding,
    pub optimizer: OptimizerConfig,
    /// Elements per all-reduce bucket (stages 0-1); 0 means one bucket.
    pub bucket_elems: usize,
}

/// The working copy a rank keeps between steps: full in stages 0-2, its shard in stage 3.
#[derive(Debug)]
enum Working {
    /// fp32, stages 0-1: the f32 parameters in the persistent workspace are the working copy.
    InWorkspace,
    /// fp32, stages 2-3 (the workspace is released between steps).
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// One rank's sharded model state and the parameter store its tape uses. See the module docs.
#[derive(Debug)]
pub struct ShardedModel {
    opts: ZeroOptions,
    rank: usize,
    len: usize,
    /// Master / optimizer range: everything in stage 0, else `shard`.
    own: Range<usize>,
    /// `shard_range(len, world, rank)`: gradient checks (all stages), gradients (stages 2-3),
    /// working copy (stage 3).
    shard: Range<usize>,
    layout: ParamLayout,
    specs: Vec<ParamSpec>,
    state_names: Vec<&'static str>,
    opt: OptimizerShard,
    working: Working,
    /// The reduced gradient shard (stages 2-3; empty otherwise).
    grads: Vec<f32>,
    /// Autograd's full-size store: persistent in stages 0-1, one step's in stages 2-3.
    workspace: Option<ParamStore>,
}

/// `dst[i] = f(src[i])`, in parallel chunks.
fn image<T: Copy + Sync>(src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32 + Sync) {
    const CH: usize = 1 << 15;
    dst.par_chunks_mut(CH)
        .zip(src.par_chunks(CH))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s)));
}

/// All-gathers this rank's `shard` of `buf` into the whole of `buf`.
fn gather_in_place<T: CommElement>(
    comm: &HostComm,
    buf: &mut [T],
    shard: &Range<usize>,
) -> Result<(), CommError> {
    let mine = buf[shard.clone()].to_vec();
    comm.all_gather_uneven(&mine, buf)
}

/// FNV-1a over 64-bit words.
fn fnv(words: impl Iterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl ShardedModel {
    /// This rank's state from the full initial parameters `init` (every rank passes the same):
    /// keeps the master shard, builds fresh optimizer state, writes the working copy.
    pub fn new(opts: ZeroOptions, comm: &HostComm, init: &ParamStore) -> Result<Self, ZeroError> {
        let (rank, world, len) = (comm.rank(), comm.world_size(), init.num_params());
        let stage = opts.stage;
        let shard = shard_range(len, world, rank);
        let own = if stage.shards_optimizer() {
            shard.clone()
        } else {
            0..len
        };
        let views = init
            .views()
            .iter()
            .map(|v| OptView::new(v.name.clone(), v.offset, &v.shape, v.decay))
            .collect();
        let layout = ParamLayout::new(views, len)?;
        let specs = init.specs();
        let state_names = Optimizer::new(opts.optimizer, 1)?
            .buffers()
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let opt = OptimizerShard::new(
            opts.optimizer,
            init.master()[own.clone()].to_vec(),
            opts.offload,
            opts.dtype,
        )?;
        let wlen = if stage.shards_parameters() {
            shard.len()
        } else {
            len
        };
        let working = match opts.dtype {
            DType::BF16 => Working::Bf16(vec![bf16::ZERO; wlen]),
            DType::F16 => Working::F16(vec![f16::ZERO; wlen]),
            DType::F32 if stage.shards_gradients() => Working::F32(vec![0.0; wlen]),
            DType::F32 => Working::InWorkspace,
        };
        let (grads, workspace) = if stage.shards_gradients() {
            (vec![0.0; shard.len()], None)
        } else {
            // Built empty rather than cloned from `init`: its master buffer is never written
            // (the master lives in `opt`), so its pages are never touched.
            (Vec::new(), Some(ParamStore::new(&specs)?))
        };
        let mut m = ShardedModel {
            opts,
            rank,
            len,
            own,
            shard,
            layout,
            specs,
            state_names,
            opt,
            working,
            grads,
            workspace,
        };
        m.set_working_from_full(init.master(), 0);
        Ok(m)
    }

    /// The stage.
    pub fn stage(&self) -> ZeroStage {
        self.opts.stage
    }
    /// Number of parameters (full model).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The global parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    /// The range of the flat buffers this rank's master and optimizer state cover.
    pub fn own_range(&self) -> Range<usize> {
        self.own.clone()
    }
    /// This rank's shard, `shard_range(len, world, rank)`.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }
    /// The master shard and optimizer state.
    pub fn optimizer_shard(&self) -> &OptimizerShard {
        &self.opt
    }
    /// Names of the optimizer's state buffers (`m`, `v`; `momentum`; or none).
    pub fn state_names(&self) -> &[&'static str] {
        &self.state_names
    }

    /// Rewrites the working copy from a full master (initialisation, checkpoint), rounding
    /// with stochastic-rounding step `sr_step`, and refreshes the workspace's image of it.
    fn set_working_from_full(&mut self, full: &[f32], sr_step: u64) {
        let range = if self.opts.stage.shards_parameters() {
            self.shard.clone()
        } else {
            0..self.len
        };
        let (src, offset) = (&full[range.clone()], range.start);
        let rounding = self.opts.rounding;
        match &mut self.working {
            Working::InWorkspace => {
                if let Some(ws) = self.workspace.as_mut() {
                    ws.working_mut().copy_from_slice(src);
                }
            }
            Working::F32(buf) => buf.copy_from_slice(src),
            Working::Bf16(buf) => {
                write_working_copy(src, WorkingCopy::Bf16 { buf, rounding }, offset, sr_step);
            }
            Working::F16(buf) => {
                write_working_copy(src, WorkingCopy::F16(buf), offset, sr_step);
            }
        }
        self.refresh_image();
    }

    /// Stages 0-2: copies the full working copy into the workspace's f32 image (stage 3
    /// holds a shard only; a device run's stage-3 workspace holds no weights).
    fn refresh_image(&mut self) {
        let dtype = self.opts.dtype;
        if self.opts.stage.shards_parameters() {
            return;
        }
        let Some(ws) = self.workspace.as_mut() else {
            return;
        };
        match &self.working {
            Working::InWorkspace => {}
            Working::F32(b) => ws.working_mut().copy_from_slice(b),
            Working::Bf16(b) => image(b, ws.working_mut(), bf16::to_f32),
            Working::F16(b) => image(b, ws.working_mut(), f16::to_f32),
        }
        ws.set_working_dtype(dtype);
    }

    /// A fresh store (zero gradients) whose working buffer `fill` writes.
    fn new_store(
        &self,
        fill: impl FnOnce(&mut [f32]) -> Result<(), CommError>,
    ) -> Result<ParamStore, ZeroError> {
        let mut ws = ParamStore::new(&self.specs)?;
        fill(ws.working_mut())?;
        ws.set_working_dtype(self.opts.dtype);
        Ok(ws)
    }

    /// A store holding the full working copy, from what this rank holds (stages 0-2).
    fn store_from_full_working(&self) -> Result<ParamStore, ZeroError> {
        self.new_store(|dst| {
            match &self.working {
                Working::InWorkspace => {
                    if let Some(ws) = &self.workspace {
                        dst.copy_from_slice(ws.working());
                    }
                }
                Working::F32(b) => dst.copy_from_slice(b),
                Working::Bf16(b) => image(b, dst, bf16::to_f32),
                Working::F16(b) => image(b, dst, f16::to_f32),
            }
            Ok(())
        })
    }

    /// Step phase 1 (collective in stage 3): makes the workspace hold the full working copy
    /// and zero gradients.
    pub fn begin_step(&mut self, comm: &HostComm) -> Result<(), ZeroError> {
        let stage = self.opts.stage;
        if !stage.shards_gradients() {
            let ws = self
                .workspace
                .as_mut()
                .ok_or(ZeroError::OutOfOrder("stages 0-1 keep their workspace"))?;
            ws.zero_grads();
            return Ok(());
        }
        let ws = if !stage.shards_parameters() {
            self.store_from_full_working()?
        } else {
            let n = self.len;
            self.new_store(|dst| match &self.working {
                Working::F32(shard) => comm.all_gather_uneven(shard, dst),
                Working::Bf16(shard) => {
                    // Gathered in bf16 (what a device would move), imaged, then dropped.
                    let mut full = vec![bf16::ZERO; n];
                    comm.all_gather_uneven(shard, &mut full)?;
                    image(&full, dst, bf16::to_f32);
                    Ok(())
                }
                Working::F16(shard) => {
                    let mut full = vec![f16::ZERO; n];
                    comm.all_gather_uneven(shard, &mut full)?;
                    image(&full, dst, f16::to_f32);
                    Ok(())
                }
                Working::InWorkspace => Ok(()),
            })?
        };
        self.workspace = Some(ws);
        Ok(())
    }

    /// A device run keeps one workspace in every stage (stages 2-3 otherwise build one per
    /// step): stage 2's holds the full working copy as stages 0-1 do, stage 3's only the
    /// layout's buffers (the device run gathers the weights itself). Not collective.
    pub fn keep_workspace(&mut self) -> Result<(), ZeroError> {
        if self.workspace.is_none() {
            let ws = if self.opts.stage.shards_parameters() {
                self.new_store(|_| Ok(()))?
            } else {
                self.store_from_full_working()?
            };
            self.workspace = Some(ws);
        }
        Ok(())
    }

    /// The working copy's values over the global `range` of the flat buffers, as f32 (exact:
    /// bf16 and f16 widen without rounding). `range` must lie in what this rank holds: its
    /// shard in stage 3, anything otherwise.
    pub fn working_image(&self, range: Range<usize>) -> Result<Vec<f32>, ZeroError> {
        let base = if self.opts.stage.shards_parameters() {
            self.shard.start
        } else {
            0
        };
        let held = match &self.working {
            Working::InWorkspace => self.workspace.as_ref().map_or(0, |w| w.working().len()),
            Working::F32(b) => b.len(),
            Working::Bf16(b) => b.len(),
            Working::F16(b) => b.len(),
        };
        if range.start < base || range.end > base + held || range.start > range.end {
            return Err(ZeroError::OutOfOrder(
                "working_image: the range lies outside what this rank holds",
            ));
        }
        let r = range.start - base..range.end - base;
        Ok(match &self.working {
            Working::InWorkspace => self
                .workspace
                .as_ref()
                .map_or_else(Vec::new, |w| w.working()[r].to_vec()),
            Working::F32(b) => b[r].to_vec(),
            Working::Bf16(b) => b[r].iter().map(|x| x.to_f32()).collect(),
            Working::F16(b) => b[r].iter().map(|x| x.to_f32()).collect(),
        })
    }

    /// The parameter store forward and backward use (between `begin_step` and
    /// `reduce_gradients`; always in stages 0-1).
    pub fn workspace(&self) -> Result<&ParamStore, ZeroError> {
        self.workspace
            .as_ref()
            .ok_or(ZeroError::OutOfOrder("no workspace: call begin_step first"))
    }

    /// The workspace, writable (backward adds into its gradients).
    pub fn workspace_mut(&mut self) -> Result<&mut ParamStore, ZeroError> {
        self.workspace
            .as_mut()
            .ok_or(ZeroError::OutOfOrder("no workspace: call begin_step first"))
    }

    /// The workspace and, when the optimizer is offloaded, its host optimizer, both
    /// writable, with the layout: a device run's offloaded step copies the gradients out of
    /// the one and updates the other.
    #[allow(clippy::type_complexity)]
    pub fn workspace_and_host_optimizer(
        &mut self,
    ) -> Result<(&mut ParamStore, Option<&mut HostOptimizer>, &ParamLayout), ZeroError> {
        let ws = self
            .workspace
            .as_mut()
            .ok_or(ZeroError::OutOfOrder("no workspace: call begin_step first"))?;
        Ok((ws, self.opt.host_mut(), &self.layout))
    }

    /// The host optimizer when the optimizer is offloaded (`--offload-optimizer`).
    pub fn host_optimizer_mut(&mut self) -> Option<&mut HostOptimizer> {
        self.opt.host_mut()
    }

    /// Step phase 3 (collective): averages the gradients over the ranks. Stages 0-1:
    /// all-reduce in buckets, in place; stages 2-3: reduce-scatter into the rank's shard and
    /// release the workspace. Returns the number of reductions made.
    pub fn reduce_gradients(&mut self, comm: &HostComm) -> Result<usize, ZeroError> {
        let ws = self.workspace.as_mut().ok_or(ZeroError::OutOfOrder(
            "reduce_gradients needs the step's workspace",
        ))?;
        if self.opts.stage.shards_gradients() {
            comm.reduce_scatter_uneven(ws.grads(), &mut self.grads, ReduceOp::Avg)?;
            self.workspace = None;
            Ok(1)
        } else {
            Ok(all_reduce_buckets(
                comm,
                ws.grads_mut(),
                self.opts.bucket_elems,
            )?)
        }
    }

    /// The reduced gradients of this rank's shard (after `reduce_gradients`).
    fn grad_shard(&self) -> Result<&[f32], ZeroError> {
        if self.opts.stage.shards_gradients() {
            Ok(&self.grads)
        } else {
            Ok(&self.workspace()?.grads()[self.shard.clone()])
        }
    }

    /// Step phase 4 (collective): whether any rank's gradient shard holds inf/NaN, and the
    /// global L2 norm of the unscaled gradients (NaN when a non-finite value was found).
    pub fn check_gradients(
        &self,
        comm: &HostComm,
        inv_scale: f32,
    ) -> Result<(bool, f64), ZeroError> {
        let g = self.grad_shard()?;
        let found_inf = any_rank(comm, has_nonfinite(g))?;
        if found_inf {
            return Ok((true, f64::NAN));
        }
        let local: f64 = grad_sq_partials(g, inv_scale, self.shard.start)
            .iter()
            .sum();
        Ok((false, sum_over_ranks(comm, local)?.sqrt()))
    }

    /// Step phase 5 (collective where the stage gathers): updates this rank's master shard
    /// (`args.offset` is replaced by the shard's start) and brings the working copy up to date.
    pub fn step(&mut self, comm: &HostComm, args: &StepArgs) -> Result<StepOutcome, ZeroError> {
        let stage = self.opts.stage;
        let args = StepArgs {
            offset: self.own.start,
            ..*args
        };
        let own = self.own.clone();
        let grads: &[f32] = if stage.shards_gradients() {
            &self.grads
        } else {
            let ws = self
                .workspace
                .as_ref()
                .ok_or(ZeroError::OutOfOrder("stages 0-1 keep their workspace"))?;
            &ws.grads()[own.clone()]
        };
        let rounding = self.opts.rounding;
        let whole = stage.shards_parameters();
        let working = match &mut self.working {
            Working::InWorkspace | Working::F32(_) => WorkingCopy::None,
            Working::Bf16(buf) => WorkingCopy::Bf16 {
                buf: if whole { buf } else { &mut buf[own] },
                rounding,
            },
            Working::F16(buf) => WorkingCopy::F16(if whole { buf } else { &mut buf[own] }),
        };
        let outcome = self.opt.step(grads, working, &self.layout, &args)?;
        if outcome == StepOutcome::Applied {
            self.publish(comm)?;
        }
        Ok(outcome)
    }

    /// After an applied update: makes the working copy whole again where the stage keeps it
    /// whole (all-gather), and refreshes the workspace image (stages 0-1).
    fn publish(&mut self, comm: &HostComm) -> Result<(), ZeroError> {
        let stage = self.opts.stage;
        let master = self.opt.master();
        match &mut self.working {
            Working::InWorkspace => {
                let ws = self
                    .workspace
                    .as_mut()
                    .ok_or(ZeroError::OutOfOrder("stages 0-1 keep their workspace"))?;
                if stage.shards_optimizer() {
                    comm.all_gather_uneven(master, ws.working_mut())?;
                } else {
                    ws.working_mut().copy_from_slice(master);
                }
            }
            Working::F32(buf) if stage.shards_parameters() => buf.copy_from_slice(master),
            Working::F32(buf) => comm.all_gather_uneven(master, buf)?,
            Working::Bf16(buf) if stage.shards_optimizer() && !stage.shards_parameters() => {
                gather_in_place(comm, buf, &self.shard)?;
            }
            Working::F16(buf) if stage.shards_optimizer() && !stage.shards_parameters() => {
                gather_in_place(comm, buf, &self.shard)?;
            }
            // Stage 0 wrote the whole copy; stage 3 keeps only the shard it wrote.
            Working::Bf16(_) | Working::F16(_) => {}
        }
        self.refresh_image();
        Ok(())
    }

    /// Lends rank 0 a store holding the full working copy (collective in stage 3, where the
    /// shards are gathered to rank 0 only); returns `Some(f(store))` on rank 0, `None`
    /// elsewhere. Evaluation and decoding use it.
    pub fn with_root_params<R>(
        &self,
        comm: &HostComm,
        f: impl FnOnce(&ParamStore) -> R,
    ) -> Result<Option<R>, ZeroError> {
        if self.opts.stage.shards_parameters() {
            let store = match &self.working {
                Working::F32(s) => gather_to_root(comm, s, self.len, 0)?
                    .map(|full| {
                        self.new_store(|d| {
                            d.copy_from_slice(&full);
                            Ok(())
                        })
                    })
                    .transpose()?,
                Working::Bf16(s) => gather_to_root(comm, s, self.len, 0)?
                    .map(|full| {
                        self.new_store(|d| {
                            image(&full, d, bf16::to_f32);
                            Ok(())
                        })
                    })
                    .transpose()?,
                Working::F16(s) => gather_to_root(comm, s, self.len, 0)?
                    .map(|full| {
                        self.new_store(|d| {
                            image(&full, d, f16::to_f32);
                            Ok(())
                        })
                    })
                    .transpose()?,
                Working::InWorkspace => None,
            };
            return Ok(store.map(|s| f(&s)));
        }
        if self.rank != 0 {
            return Ok(None);
        }
        match &self.workspace {
            Some(ws) => Ok(Some(f(ws))),
            None => Ok(Some(f(&self.store_from_full_working()?))),
        }
    }

    /// The full fp32 master on rank 0 (collective from stage 1 on: gathered), `None` elsewhere.
    pub fn master_on_root(&self, comm: &HostComm) -> Result<Option<Cow<'_, [f32]>>, ZeroError> {
        if !self.opts.stage.shards_optimizer() {
            return Ok((self.rank == 0).then(|| Cow::Borrowed(self.opt.master())));
        }
        Ok(gather_to_root(comm, self.opt.master(), self.len, 0)?.map(Cow::Owned))
    }

    /// The full optimizer state on rank 0 (collective from stage 1 on): its small state for
    /// the whole model and each named buffer at full length. `None` on other ranks.
    #[allow(clippy::type_complexity)]
    pub fn optimizer_on_root(
        &self,
        comm: &HostComm,
    ) -> Result<Option<(OptimizerState, Vec<(&'static str, Cow<'_, [f32]>)>)>, ZeroError> {
        let o = self.opt.optimizer();
        let state = OptimizerState {
            len: self.len,
            ..o.state()
        };
        let bufs = o.buffers();
        let mut out = Vec::new();
        for &name in &self.state_names {
            let shard: &[f32] = bufs
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(&[], |(_, b)| *b);
            let full = if self.opts.stage.shards_optimizer() {
                gather_to_root(comm, shard, self.len, 0)?.map(Cow::Owned)
            } else {
                (self.rank == 0).then_some(Cow::Borrowed(shard))
            };
            if let Some(full) = full {
                out.push((name, full));
            }
        }
        Ok((self.rank == 0).then_some((state, out)))
    }

    /// Restores from a full checkpoint: `master` (all parameters), the optimizer's `state`
    /// (for the whole model) and its named `buffers` at full length. Keeps this rank's shard
    /// and rewrites the working copy.
    pub fn restore(
        &mut self,
        master: &[f32],
        state: &OptimizerState,
        buffers: &[(&str, Vec<f32>)],
    ) -> Result<(), ZeroError> {
        if master.len() != self.len || state.len != self.len {
            return Err(ZeroError::Restore(format!(
                "the checkpoint holds {} master weights and optimizer state for {}, this model \
                 has {} parameters",
                master.len(),
                state.len,
                self.len
            )));
        }
        let own = self.own.clone();
        let opt = self.opt.optimizer_mut();
        opt.restore_state(&OptimizerState {
            len: own.len(),
            ..*state
        })?;
        for (name, dst) in opt.buffers_mut() {
            let src = buffers
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| ZeroError::Restore(format!("optimizer buffer `{name}` missing")))?;
            if src.1.len() != self.len {
                return Err(ZeroError::Restore(format!(
                    "optimizer buffer `{name}` has {} elements, expected {}",
                    src.1.len(),
                    self.len
                )));
            }
            dst.copy_from_slice(&src.1[own.clone()]);
        }
        self.opt.master_mut().copy_from_slice(&master[own]);
        // The working copy is a function of the master weights (and, with stochastic
        // rounding, of the step that wrote it: the optimizer's step count).
        let sr_step = self.opt.optimizer().step_count();
        self.set_working_from_full(master, sr_step);
        Ok(())
    }

    /// What this rank holds between steps, measured from its buffers' lengths (the
    /// `workspace_step` of stages 2-3 is what `begin_step` will allocate).
    pub fn memory(&self) -> RankMemory {
        let n = self.len as u64;
        let store_bytes = |ws: &ParamStore| {
            4 * (ws.master().len() + ws.working().len() + ws.grads().len()) as u64
        };
        let (working, working_in_store) = match &self.working {
            Working::InWorkspace => {
                let w = self.workspace.as_ref().map_or(0, |ws| ws.working().len());
                (4 * w as u64, 4 * w as u64)
            }
            Working::F32(b) => (4 * b.len() as u64, 0),
            Working::Bf16(b) => (2 * b.len() as u64, 0),
            Working::F16(b) => (2 * b.len() as u64, 0),
        };
        let grads = if self.opts.stage.shards_gradients() {
            4 * self.grads.len() as u64
        } else {
            self.workspace
                .as_ref()
                .map_or(0, |ws| 4 * ws.grads().len() as u64)
        };
        let idle = match &self.workspace {
            Some(ws) if !self.opts.stage.shards_gradients() => {
                store_bytes(ws) - grads - working_in_store
            }
            Some(ws) => store_bytes(ws),
            None => 0,
        };
        let step = if self.opts.stage.shards_gradients() {
            let gathered = match (&self.working, self.opts.stage.shards_parameters()) {
                (Working::Bf16(_) | Working::F16(_), true) => 2 * n,
                _ => 0,
            };
            12 * n + gathered
        } else {
            idle
        };
        RankMemory {
            master: 4 * self.opt.master().len() as u64,
            working,
            grads,
            optimizer: self.opt.state_bytes(),
            staging: self.opt.staging_bytes(),
            offloaded: self.opt.is_offloaded(),
            workspace_idle: idle,
            workspace_step: step,
        }
    }

    /// A digest of the working copy this rank holds (full in stages 0-2, its shard in 3), so
    /// tests can check that every rank holds the same weights.
    pub fn working_digest(&self) -> u64 {
        match &self.working {
            Working::InWorkspace => self
                .workspace
                .as_ref()
                .map_or(0, |ws| fnv(ws.working().iter().map(|x| x.to_bits() as u64))),
            Working::F32(b) => fnv(b.iter().map(|x| x.to_bits() as u64)),
            Working::Bf16(b) => fnv(b.iter().map(|x| x.to_bits() as u64)),
            Working::F16(b) => fnv(b.iter().map(|x| x.to_bits() as u64)),
        }
    }
}
