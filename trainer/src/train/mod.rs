//! The training loop behind `lathe train`.
//!
//! `--world N` runs N data-parallel ranks as threads of this process over a [`LocalGroup`];
//! `--zero S` shards their model state (stages 0-3) and `--offload-optimizer` keeps the
//! optimizer in host memory — see [`crate::zero`] for what each stage holds and exchanges.
//! Rank 0 logs, evaluates and checkpoints; every rank holds the same weights after every step.
//! One rank (`--world 1`, the default) runs the same code on the calling thread. A process
//! that a launcher started as one of several ([`LaunchEnv`]) is one rank of a device run, its
//! collectives over [`TcpComm`] (the same arithmetic as the in-process group).
//!
//! One optimizer step, per rank: make the full working copy available (stage 3: all-gather);
//! zero the gradients; for each of `accum` micro-batches run the forward on the tape and
//! back-propagate with the seed `loss_scale / accum` (gradients accumulate with `+=`); average
//! the gradients over the ranks (all-reduce in buckets, or reduce-scatter from stage 2); check
//! for inf/NaN and compute the global norm of the unscaled gradients over the shards; run the
//! fused optimizer on the rank's shard (unscale, clip, update, write the working copy) unless a
//! non-finite value was found anywhere, in which case every rank skips the step in every
//! precision; gather the updated working copy where the stage keeps it whole; update the loss
//! scaler (GradScaler semantics in fp16). Then rank 0 logs, evaluates, checkpoints. The loss
//! reported is the mean of the ranks' losses.
//!
//! On a device (`--device sim|cuda`) each rank opens its own device (`cuda:N`: rank `r` on GPU
//! `N + r`; `sim`: a simulated device per rank) and runs the step there (`device_step`): every
//! ZeRO stage, the gradients averaged in buckets during the last backward pass by
//! [`crate::device::DeviceGradReducer`], stage 3's parameters gathered as the forward uses
//! them. The device ranks' collectives go through a `DeviceComm`: host staging over the
//! host communicators, or NCCL on CUDA devices (`--comm` / `LATHE_COMM`, see `comm_choice`).
//! With `--offload-optimizer` a device rank's master weights and optimizer state stay in the
//! host model's `HostOptimizer`; the device decides and the host updates (`device_step`).
//!
//! Determinism: the same settings and seed give the same losses bit for bit; a run resumed from
//! a checkpoint reproduces the uninterrupted run's losses exactly (the checkpoint holds the full
//! master weights, optimizer moments, scaler, data position and step, gathered from the shards);
//! stages 0-3 at one world size give identical losses.

mod comm_choice;
mod device_step;
mod eval;
pub mod memory;
pub mod preflight;
mod run;
mod score;
mod state;
mod step;

use crate::config::{DeviceSpec, OptimizerArg, RecomputeArg, TrainArgs, TrainConfig};
use crate::data::{AdditionConfig, Loader, LoaderConfig, LoaderPosition, Source, Split};
use crate::early_stop::EarlyStopping;
use crate::launch::LaunchEnv;
use crate::optim::{AdamWConfig, OptimizerConfig, Rounding, SgdConfig};
use crate::precision::{LossScaler, NonFiniteInjection, Precision};
use crate::profiler::{Profiler, RangeSink};
use crate::schedule::{Schedule, scale_lr_linear};
use crate::zero::{
    DEFAULT_BUCKET_BYTES, RankMemory, ShardedModel, ZeroError, ZeroOptions, ZeroStage,
};
use anyhow::{Context, Result, anyhow, bail};
use comm_choice::RankDevice;
use lathe_autograd::{DType, Gpt, GptConfig, Recompute, Tape};
use lathe_host::comm::{CommError, Communicator, HostComm, LocalGroup, NcclId, ReduceOp, TcpComm};
use std::time::Duration;

pub use eval::EvalOutcome;
pub use run::MAX_CONSECUTIVE_SKIPS;
pub use score::{EvalArgs, EvalReport, run_eval};

/// What a finished run reports (rank 0's view, plus every rank's [`RankReport`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps run, in total (including those before a resume).
    pub steps: u64,
    /// Loss of each step run by this process (index = step - first step): the mean over ranks.
    pub losses: Vec<f64>,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    /// Exact-match accuracy on held-out problems (built-in corpus only).
    pub eval_accuracy: Option<f64>,
    pub skipped_steps: u64,
    pub stopped_early: bool,
    /// Rank 0's peak: model state, offload staging, the autograd workspace and the tape's peak
    /// activation bytes.
    pub peak_mem_bytes: u64,
    /// One entry per rank, in rank order.
    pub ranks: Vec<RankReport>,
}

/// What one rank holds.
#[derive(Clone, Debug, PartialEq)]
pub struct RankReport {
    pub rank: usize,
    /// Bytes the rank held between steps, measured at startup.
    pub memory: RankMemory,
    /// Digest of the working copy the rank held at the end (the full copy in stages 0-2, its
    /// shard in stage 3): equal on every rank of a stage 0-2 run.
    pub working_digest: u64,
}

/// How long a rank waits in a collective for its peers. Rank 0 evaluates and writes
/// checkpoints while the others wait in their next collective, so this is long; a rank that
/// fails or panics drops its endpoint, which ends every peer's wait at once.
pub(super) const RANK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long a launched process waits for the others to join the run.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Stack of each rank's thread (the main thread's usual size).
const RANK_STACK_BYTES: usize = 8 << 20;

/// Entry point of `lathe train`.
pub fn run_train(args: TrainArgs) -> Result<TrainOutcome> {
    let mut args = args.with_config_file()?;
    // Started by a launcher as one of several processes: this process is one rank.
    let launch = LaunchEnv::from_env()?.filter(|e| e.world_size > 1);
    let device = args.device.unwrap_or(DeviceSpec::Auto);
    let device_index = launch.as_ref().map_or(0, |e| e.local_rank);
    // Fail early on a device that cannot be opened (a simulated device always can).
    let on_device = match device {
        DeviceSpec::Cpu => false,
        DeviceSpec::Sim => true,
        spec => open_device(spec, device_index)?.is_some(),
    };
    preflight::check_launch_env(launch.clone(), on_device)?;
    if let Some(env) = &launch {
        match args.world {
            Some(w) if w != env.world_size => bail!(
                "--world {w}: this process was started by {} as rank {} of {} processes, and \
                 the launcher's processes are the ranks; drop --world",
                env.source,
                env.rank,
                env.world_size
            ),
            _ => args.world = Some(env.world_size),
        }
    }
    let cfg = TrainConfig::resolve(args, on_device)?;
    let pre = preflight::check(&cfg)?;
    {
        let data = data_for(&cfg)?;
        let gcfg = GptConfig::from_name(&cfg.model)?.with_vocab_size(data.vocab);
        let seq_len = cfg.seq_len.unwrap_or(gcfg.block_size);
        // An out-of-range length is refused, with its own message, when the ranks start.
        if (1..=gcfg.block_size).contains(&seq_len) {
            // Launched processes: this node holds its own processes' ranks.
            let ranks_here = launch.as_ref().map_or(cfg.world, |e| e.local_world_size);
            memory::check(
                &cfg,
                &gcfg,
                seq_len,
                recompute_of(cfg.recompute),
                ranks_here,
            )?;
        }
    }
    let rank_device = match device {
        _ if !on_device => RankDevice::Cpu,
        DeviceSpec::Sim => RankDevice::Sim,
        _ => RankDevice::Cuda,
    };
    let want_nccl = comm_choice::wants_nccl(cfg.comm, cfg.world, rank_device)?;
    match launch {
        Some(env) => train_launched(cfg, pre, env, want_nccl),
        None => {
            let id = comm_choice::create_id(cfg.comm, want_nccl)?;
            train_ranks(cfg, pre, id)
        }
    }
}

/// One rank of a run whose ranks are processes (a launcher started them): connects to the
/// other processes through the rendezvous at the master address, then trains as that rank,
/// on device `local rank`. Rank 0 alone logs, evaluates and writes checkpoints, as with
/// in-process ranks.
///
/// With NCCL (`want_nccl`: see `comm_choice`), rank 0 creates NCCL's unique id and hands it to
/// every rank in the rendezvous round that connects the host communicators; the ranks then
/// check that every one of them can load NCCL (else, under `--comm auto`, all stage through
/// the host).
fn train_launched(
    cfg: TrainConfig,
    pre: preflight::Preflight,
    env: LaunchEnv,
    want_nccl: bool,
) -> Result<TrainOutcome> {
    let who = format!("rank {} of {} ({})", env.rank, env.world_size, env.source);
    let mine = if env.rank == 0 {
        comm_choice::create_id(cfg.comm, want_nccl)?
    } else {
        None
    };
    let (mut comms, shared) = TcpComm::connect_group_sharing(
        env.rank,
        env.world_size,
        &env.master(),
        2,
        RENDEZVOUS_TIMEOUT,
        mine.as_ref().map(|id| id.as_bytes().as_slice()),
    )
    .with_context(|| format!("{who}: joining the other processes at {}", env.master()))?;
    for c in &mut comms {
        c.set_timeout(RANK_TIMEOUT);
    }
    let (Some(grad_comm), Some(comm)) = (comms.pop(), comms.pop()) else {
        bail!("{who}: the process group has too few communicators");
    };
    let comm = HostComm::from(comm);
    let nccl_id = match shared {
        None => None,
        Some(bytes) => {
            let id = NcclId::from_bytes(&bytes).with_context(|| format!("{who}: NCCL id"))?;
            // Every rank received the id, so every rank takes part in this check.
            let mut cannot = [u32::from(!want_nccl)];
            comm.all_reduce(&mut cannot[..], ReduceOp::Sum)
                .map_err(anyhow::Error::new)
                .with_context(|| format!("{who}: agreeing on NCCL"))?;
            if cannot[0] > 0 {
                if env.rank == 0 {
                    eprintln!(
                        "warning: {} of {} ranks cannot use NCCL; device ranks exchange \
                         through host memory",
                        cannot[0], env.world_size
                    );
                }
                None
            } else {
                Some(id)
            }
        }
    };
    let rr = run_rank(cfg, comm, grad_comm.into(), pre, env.local_rank, nccl_id)
        .with_context(|| format!("{who} failed"))?;
    Ok(TrainOutcome {
        ranks: vec![rr.report],
        ..rr.outcome
    })
}

/// What one rank's thread hands back.
struct RankResult {
    outcome: TrainOutcome,
    report: RankReport,
}

fn run_rank(
    cfg: TrainConfig,
    comm: HostComm,
    grad_comm: HostComm,
    pre: preflight::Preflight,
    device_index: usize,
    nccl_id: Option<NcclId>,
) -> Result<RankResult> {
    let rank = comm.rank();
    let mut t = Trainer::new(cfg, comm, grad_comm, device_index, nccl_id)?;
    t.overwrite_pending = pre.overwrite_existing;
    let outcome = t.run()?;
    Ok(RankResult {
        outcome,
        report: RankReport {
            rank,
            memory: t.startup_memory,
            working_digest: t.zero.working_digest(),
        },
    })
}

/// Runs `cfg.world` ranks (threads, one [`LocalGroup`]) and returns rank 0's outcome with
/// every rank's report. When ranks fail, the error returned is the first one that is not just
/// a peer noticing the failure (a broken group).
/// `nccl_id`: the id of the NCCL communicator the device ranks build (`None`: host staging).
fn train_ranks(
    cfg: TrainConfig,
    pre: preflight::Preflight,
    nccl_id: Option<NcclId>,
) -> Result<TrainOutcome> {
    let world = cfg.world;
    let comms = LocalGroup::with_timeout(world, RANK_TIMEOUT);
    // A second group of the same ranks for the device gradient reducer, which runs inside the
    // backward pass (see `crate::device::DeviceGradReducer`).
    let grad_comms = LocalGroup::with_timeout(world, RANK_TIMEOUT);
    let results: Vec<Result<RankResult>> = if world == 1 {
        comms
            .into_iter()
            .zip(grad_comms)
            .map(|(c, g)| run_rank(cfg.clone(), c.into(), g.into(), pre.clone(), 0, nccl_id))
            .collect()
    } else {
        std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(world);
            for (comm, grad_comm) in comms.into_iter().zip(grad_comms) {
                let (cfg, rank, pre) = (cfg.clone(), comm.rank(), pre.clone());
                let h = std::thread::Builder::new()
                    .name(format!("lathe-rank-{rank}"))
                    .stack_size(RANK_STACK_BYTES)
                    .spawn_scoped(s, move || {
                        run_rank(cfg, comm.into(), grad_comm.into(), pre, rank, nccl_id)
                    })
                    .with_context(|| format!("starting the thread of rank {rank}"));
                handles.push(h);
            }
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h?.join().unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(anyhow!("rank {r} panicked: {msg}"))
                    })
                })
                .collect()
        })
    };
    let mut root = None;
    let mut reports = Vec::with_capacity(world);
    let mut errors = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(rr) => {
                reports.push(rr.report);
                if r == 0 {
                    root = Some(rr.outcome);
                }
            }
            Err(e) => errors.push((r, e)),
        }
    }
    if !errors.is_empty() {
        let broken = |e: &anyhow::Error| {
            e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<CommError>(),
                    Some(CommError::GroupBroken { .. })
                ) || matches!(
                    c.downcast_ref::<ZeroError>(),
                    Some(ZeroError::Comm(CommError::GroupBroken { .. }))
                )
            })
        };
        let i = errors.iter().position(|(_, e)| !broken(e)).unwrap_or(0);
        let (r, e) = errors.swap_remove(i);
        return Err(if world > 1 {
            e.context(format!("rank {r} of {world} failed"))
        } else {
            e
        });
    }
    let mut out = root.ok_or_else(|| anyhow!("rank 0 returned no outcome"))?;
    out.ranks = reports;
    Ok(out)
}

/// The device rank `rank` trains on: `cuda:N` opens GPU `N + rank`, `sim` a simulated device
/// of its own, `auto` GPU `rank` when one can be opened (else the CPU; never the simulator),
/// `cpu` none.
fn open_device(spec: DeviceSpec, rank: usize) -> Result<Option<lathe_host::Device>> {
    match spec {
        DeviceSpec::Cpu => Ok(None),
        DeviceSpec::Cuda(n) => lathe_host::Device::cuda(n + rank)
            .map(Some)
            .with_context(|| format!("--device cuda:{n} (rank {rank}: GPU {})", n + rank)),
        DeviceSpec::Sim => lathe_host::Device::sim().map(Some).context("--device sim"),
        DeviceSpec::Auto => Ok(lathe_host::Device::cuda(rank).ok()),
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

/// The data a run trains on.
struct Data {
    source: Source,
    /// Addition corpus settings, when training on it (for the exact-match evaluation).
    addition: Option<AdditionConfig>,
    vocab: usize,
    /// The token that ends a document, when the data has one (for Hugging Face's config).
    eos: Option<u32>,
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
                eos: None,
            })
        }
        Some(dir) => {
            // A single shard file reads the metadata of the directory it is in, if any.
            let meta_dir = if dir.is_file() {
                dir.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
            } else {
                dir.as_path()
            };
            if dir.is_dir() {
                crate::data::check_complete(dir)
                    .with_context(|| format!("--data {}", dir.display()))?;
            }
            let meta = crate::data::DatasetMeta::read(meta_dir)
                .with_context(|| format!("--data {}", dir.display()))?;
            let (vocab, eos) = match meta {
                Some(m) => (m.vocab_size as usize, Some(m.separator)),
                None => {
                    let g = crate::data::TokenizerKind::Gpt2;
                    (g.vocab_size() as usize, Some(g.separator()))
                }
            };
            Ok(Data {
                source: Source::Shards {
                    path: dir.clone(),
                    vocab_size: Some(vocab as u32),
                },
                addition: None,
                vocab,
                eos,
            })
        }
    }
}

fn optimizer_config(cfg: &TrainConfig) -> OptimizerConfig {
    match cfg.optimizer {
        OptimizerArg::Adamw => OptimizerConfig::AdamW(AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        }),
        OptimizerArg::Sgd => OptimizerConfig::Sgd(SgdConfig {
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            ..SgdConfig::default()
        }),
    }
}

/// One rank of a training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    comm: HostComm,
    model: Gpt,
    /// This rank's (sharded) model state and the parameter store its tape uses.
    zero: ShardedModel,
    scaler: LossScaler,
    schedule: Schedule,
    loader: Loader,
    data: Data,
    tape: Tape,
    /// Evaluation runs on its own tape, so the training tape's peak memory is the step's.
    eval_tape: Tape,
    recompute: Recompute,
    seq_len: usize,
    /// Optimizer steps completed.
    step: u64,
    /// Tokens trained on so far, all ranks together.
    tokens: u64,
    early: Option<EarlyStopping>,
    inject: NonFiniteInjection,
    best_val: Option<f64>,
    /// Step profiler (`--profile`, rank 0); disabled otherwise (one branch per call).
    prof: Profiler,
    /// What this rank held between steps right after setup.
    startup_memory: RankMemory,
    /// `--overwrite`: delete the checkpoints already in `--save` at the first save.
    overwrite_pending: bool,
    /// The step of the last checkpoint this run wrote.
    saved_step: Option<u64>,
    /// The device the step runs on (`None`: the CPU reference backend).
    dev: Option<device_step::DeviceRun>,
    /// The gradient reducer's communicator until a multi-rank device run takes it.
    grad_comm: Option<HostComm>,
    /// The NCCL id a multi-rank device run builds its device communicator from (`None`:
    /// host staging), until it does.
    nccl_id: Option<NcclId>,
}

impl Trainer {
    /// Builds rank `comm.rank()`: the model (initialised in full, then sharded), optimizer
    /// state, loader; resumes from `--resume` if given. Every rank of `comm`'s group must be
    /// built with the same `cfg`. `grad_comm` is this rank's endpoint of a second group of the
    /// same ranks, used by a device run's gradient reducer from inside the backward pass
    /// ([`crate::device::DeviceGradReducer`]); the CPU path does not use it.
    /// The trainer of rank `comm.rank()`; a device run opens device `device_index` of the
    /// `--device` spec (`cuda:N`: GPU `N + device_index`; the rank for in-process ranks, the
    /// local rank for launched processes). `nccl_id`: every rank's same NCCL id when the
    /// device ranks exchange over NCCL, `None` for host staging (the CPU path ignores it).
    pub fn new(
        cfg: TrainConfig,
        comm: HostComm,
        grad_comm: HostComm,
        device_index: usize,
        nccl_id: Option<NcclId>,
    ) -> Result<Self> {
        for (what, c) in [
            ("communicator", &comm),
            ("gradient communicator", &grad_comm),
        ] {
            if c.world_size() != cfg.world || c.rank() != comm.rank() {
                bail!(
                    "--world {} but rank {} of the {what} has {} ranks",
                    cfg.world,
                    c.rank(),
                    c.world_size()
                );
            }
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
        let dtype = dtype_of(cfg.precision);
        let opts = ZeroOptions {
            stage: ZeroStage::new(cfg.zero).map_err(|e| anyhow!("--zero: {e}"))?,
            offload: cfg.offload_optimizer,
            dtype,
            rounding: if cfg.stochastic_rounding {
                Rounding::Stochastic { seed: cfg.seed }
            } else {
                Rounding::Nearest
            },
            optimizer: optimizer_config(&cfg),
            bucket_elems: DEFAULT_BUCKET_BYTES / std::mem::size_of::<f32>(),
        };
        let zero = {
            let init = model.init_params(cfg.seed);
            ShardedModel::new(opts, &comm, &init)?
        };
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
        // Every evaluation reads the same validation batches: read them now, so a missing or
        // too small validation split or an out-of-vocabulary token fails before training.
        if comm.rank() == 0 {
            eval::check_val(&cfg, &data, seq_len)?;
        }
        let mut t = Trainer {
            loader: Self::open_loader(&cfg, &data, seq_len, comm.rank(), None)?,
            scaler: LossScaler::for_precision(cfg.precision),
            tape: Tape::new(dtype),
            eval_tape: Tape::new(dtype),
            recompute: recompute_of(cfg.recompute),
            cfg,
            comm,
            model,
            zero,
            schedule,
            data,
            seq_len,
            step: 0,
            tokens: 0,
            early,
            inject,
            best_val: None,
            prof: Profiler::disabled(),
            startup_memory: RankMemory::default(),
            overwrite_pending: false,
            saved_step: None,
            dev: None,
            grad_comm: Some(grad_comm),
            nccl_id,
        };
        if let Some(dev) = open_device(t.cfg.device, device_index)? {
            if matches!(t.cfg.optimizer, OptimizerArg::Sgd) && !t.cfg.offload_optimizer {
                bail!(
                    "--optimizer sgd: the device step has fused AdamW only; use adamw, or \
                     --offload-optimizer (the host runs SGD)"
                );
            }
            t.tape = Tape::on_device(dtype, &dev);
            t.eval_tape = Tape::on_device(dtype, &dev);
            t.attach_device(dev)?;
        }
        if let Some(dir) = t.cfg.resume.clone() {
            t.resume_from(&dir)?;
            t.reload_device()?;
        }
        t.startup_memory = t.zero.memory();
        // A device run's offloaded optimizer stages through pinned buffers of its own.
        t.startup_memory.staging += t.device_staging_bytes();
        Ok(t)
    }

    fn open_loader(
        cfg: &TrainConfig,
        data: &Data,
        seq_len: usize,
        rank: usize,
        resume: Option<LoaderPosition>,
    ) -> Result<Loader> {
        let mut lc = LoaderConfig::new(cfg.micro_batch, seq_len);
        lc.seed = cfg.seed;
        lc.rank = rank;
        lc.world = cfg.world;
        lc.workers = cfg.loader_workers;
        lc.prefetch = cfg.prefetch;
        lc.curriculum = cfg
            .curriculum
            .parse()
            .map_err(|e| anyhow::anyhow!("--curriculum: {e}"))?;
        Ok(Loader::open(&data.source, Split::Train, lc, resume)?)
    }

    /// Whether this is rank 0 (the one that logs, evaluates and checkpoints).
    fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Bytes this rank holds at its peak: model state, offload staging, the autograd workspace
    /// while a step runs, and the tape's peak activation memory (the CPU backend's equivalent
    /// of the allocator's peak).
    fn mem_peak_bytes(&self) -> u64 {
        if let Some(p) = self.device_peak_bytes() {
            return p;
        }
        let m = self.zero.memory();
        m.model_state() + m.staging + m.workspace_step + self.tape.peak_activation_bytes() as u64
    }

    /// Bytes held right now: model state, staging, the workspace if one exists, and the tape's
    /// live activations.
    fn live_bytes(&self) -> u64 {
        let m = self.zero.memory();
        m.model_state() + m.staging + m.workspace_idle + self.tape.live_activation_bytes() as u64
    }
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
