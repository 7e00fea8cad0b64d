//! `lathe train` settings: command-line flags, an optional TOML file (`--config run.toml`, the
//! same names with underscores; flags win), and the defaults, resolved into one [`TrainConfig`].

use crate::precision::Precision;
use crate::schedule::ScheduleKind;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where to train. Written and read as the command line spells it (`"cpu"`, `"cuda:1"`), in a
/// `--config` file too; the variant names of older checkpoints' settings (`"Cpu"`) still read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The GPU if there is one, else the CPU (never the simulated device).
    Auto,
    Cpu,
    Cuda(usize),
    /// Lathe's simulated GPU (lathe-sim): the device path without hardware.
    Sim,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "sim" => Ok(DeviceSpec::Sim),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| format!("bad device `{s}`: expected cuda:N with N a number")),
                None => Err(format!(
                    "bad device `{s}`: expected auto, cpu, sim, cuda or cuda:N"
                )),
            },
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            // serde's default enum form, as checkpoints before this change stored it.
            Cuda {
                #[serde(rename = "Cuda")]
                n: usize,
            },
        }
        match Repr::deserialize(d)? {
            Repr::Cuda { n } => Ok(DeviceSpec::Cuda(n)),
            Repr::Text(t) => match t.as_str() {
                "Auto" => Ok(DeviceSpec::Auto),
                "Cpu" => Ok(DeviceSpec::Cpu),
                _ => t.parse().map_err(serde::de::Error::custom),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Sim => write!(f, "sim"),
        }
    }
}

/// How the ranks of a device run exchange device buffers (gradient buckets, norm partials,
/// ZeRO gathers). `--comm`, else the `LATHE_COMM` environment variable, else `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CommArg {
    /// NCCL on CUDA devices when it loads (with a one-line warning when it does not), host
    /// staging otherwise.
    #[default]
    Auto,
    /// NCCL on the device buffers; an error where NCCL cannot run (no NCCL library, the
    /// simulated device, the CPU).
    Nccl,
    /// Host staging: device -> host copy, a host collective, host -> device copy.
    Host,
}

impl CommArg {
    /// The environment variable read when `--comm` is not given.
    pub const ENV: &'static str = "LATHE_COMM";

    fn from_env() -> Result<Option<CommArg>> {
        match std::env::var(Self::ENV) {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => bail!("{}: {e}", Self::ENV),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => Ok(Some(CommArg::Auto)),
                "nccl" => Ok(Some(CommArg::Nccl)),
                "host" => Ok(Some(CommArg::Host)),
                _ => bail!("{}={v:?}: expected nccl, host or auto", Self::ENV),
            },
        }
    }
}

/// Activation recomputation policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeArg {
    #[default]
    None,
    Act,
    Block,
}

/// Optimizer choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerArg {
    #[default]
    Adamw,
    Sgd,
}

/// Flags of `lathe train`. Every one is optional: unset flags come from `--config` or the
/// defaults (see [`TrainConfig`]).
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// A TOML file with any of these settings (flag names with underscores); flags win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model preset: tiny (default), small or gpt2-124m.
    #[arg(long)]
    pub model: Option<String>,
    /// A directory of token shards written by `lathe prepare` (or llm.c), or one `.bin`
    /// shard (its `val` sibling is the validation split); default: the built-in addition
    /// corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// auto (default: a usable GPU, else the CPU), cpu, sim (the simulated GPU), cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// fp32, bf16 or fp16 (default: bf16 on a GPU, fp32 on the CPU).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step (the loss is divided by this).
    #[arg(long)]
    pub accum: Option<usize>,
    /// Activation recomputation: none, act (cheap activations) or block (whole blocks).
    #[arg(long)]
    pub recompute: Option<RecomputeArg>,
    /// ZeRO stage: 0 (data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    #[arg(long)]
    pub zero: Option<u8>,
    /// Data-parallel ranks in this process (threads).
    #[arg(long)]
    pub world: Option<usize>,
    /// Keep the optimizer state (fp32 master weights, moments) in host memory and run the
    /// optimizer step on the CPU; on a device the device still decides skip, scale and clip.
    #[arg(long)]
    #[serde(default)]
    pub offload_optimizer: bool,
    /// Optimizer steps (default 600).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate (default 3e-3 for tiny, 6e-4 otherwise).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warmup steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// cosine (default), linear or constant.
    #[arg(long)]
    pub schedule: Option<ScheduleKind>,
    /// Decay floor as a fraction of the peak learning rate.
    #[arg(long)]
    pub min_lr_frac: Option<f64>,
    /// Scale the learning rate linearly with the global batch (Goyal et al. 2017), relative
    /// to a global batch of one micro-batch on one rank.
    #[arg(long)]
    #[serde(default)]
    pub scale_lr: bool,
    /// adamw (default) or sgd (on a device: with --offload-optimizer).
    #[arg(long)]
    pub optimizer: Option<OptimizerArg>,
    /// Decoupled weight decay (AdamW) or L2 decay (SGD), on 2-D weights only.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f32>,
    /// Clip gradients to this global norm (0: off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Evaluate on held-out data every N steps (0: only at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Micro-batches per validation-loss evaluation.
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Stop after this many evaluations without improvement (0: never).
    #[arg(long)]
    pub early_stop_patience: Option<u32>,
    /// The improvement in validation loss that counts.
    #[arg(long)]
    pub early_stop_min_delta: Option<f64>,
    /// Seed for initialisation, data order and stochastic rounding.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write one JSON object per step to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Write a Chrome trace of the profiled steps to this file.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Profiler schedule: steps skipped first.
    #[arg(long)]
    pub profile_wait: Option<u64>,
    /// Profiler schedule: steps run with the profiler on but discarded.
    #[arg(long)]
    pub profile_warmup: Option<u64>,
    /// Profiler schedule: steps recorded.
    #[arg(long)]
    pub profile_active: Option<u64>,
    /// Write checkpoints under this directory.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Checkpoint every N steps (and at the end).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep only the newest N checkpoints (0: keep all).
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Continue from the latest complete checkpoint in DIR (or a step-* directory).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Allow a fresh run to write into a --save directory that already holds checkpoints:
    /// they are deleted when this run writes its first checkpoint.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Testing aid: put an inf into one gradient at these steps, e.g. `3,7`.
    #[arg(long)]
    pub inject_nonfinite: Option<String>,
    /// Round the bf16 working copy stochastically (seeded, reproducible).
    #[arg(long)]
    #[serde(default)]
    pub stochastic_rounding: bool,
    /// Data loader worker threads.
    #[arg(long)]
    pub loader_workers: Option<usize>,
    /// Batches the loader prepares ahead.
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Curriculum: none, or seq:START_LEN:WARMUP_STEPS (sequences grow linearly from
    /// START_LEN tokens to the full length over the first WARMUP_STEPS steps).
    #[arg(long)]
    pub curriculum: Option<String>,
    /// Exact-match evaluation problems for the built-in corpus.
    #[arg(long)]
    pub eval_problems: Option<usize>,
    /// No progress bar (log lines only).
    #[arg(long)]
    #[serde(default)]
    pub no_progress: bool,
    /// Device collectives of multi-rank device runs: auto (default: NCCL on CUDA devices when
    /// it loads, else host staging), nccl or host. Default from LATHE_COMM.
    #[arg(long)]
    pub comm: Option<CommArg>,
}

macro_rules! merge {
    ($cli:ident, $file:ident; $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.clone(); } )* };
}

impl TrainArgs {
    /// Fills unset flags from the `--config` file, if any.
    pub fn with_config_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = load_toml(&path)?;
        merge!(self, file; model, data, device, precision, micro_batch, seq_len, accum,
            recompute, zero, world, steps, lr, warmup, schedule, min_lr_frac, optimizer,
            weight_decay, momentum, grad_clip, eval_every, eval_batches, early_stop_patience,
            early_stop_min_delta, seed, log, profile, profile_wait, profile_warmup,
            profile_active, save, save_every, keep_last, resume, inject_nonfinite,
            loader_workers, prefetch, curriculum, eval_problems, comm);
        self.offload_optimizer |= file.offload_optimizer;
        self.scale_lr |= file.scale_lr;
        self.stochastic_rounding |= file.stochastic_rounding;
        self.no_progress |= file.no_progress;
        self.overwrite |= file.overwrite;
        Ok(self)
    }
}

fn load_toml(path: &Path) -> Result<TrainArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
}

/// Every setting of a run, resolved (what checkpoints record as the run's settings).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: String,
    pub data: Option<PathBuf>,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub micro_batch: usize,
    pub seq_len: Option<usize>,
    pub accum: usize,
    pub recompute: RecomputeArg,
    pub zero: u8,
    pub world: usize,
    pub offload_optimizer: bool,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: ScheduleKind,
    pub min_lr_frac: f64,
    pub scale_lr: bool,
    pub optimizer: OptimizerArg,
    pub weight_decay: f32,
    pub momentum: f32,
    pub grad_clip: f64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub early_stop_patience: u32,
    pub early_stop_min_delta: f64,
    pub seed: u64,
    pub log: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    pub profile_wait: u64,
    pub profile_warmup: u64,
    pub profile_active: u64,
    pub save: Option<PathBuf>,
    pub save_every: u64,
    pub keep_last: usize,
    pub resume: Option<PathBuf>,
    #[serde(default)]
    pub overwrite: bool,
    pub inject_nonfinite: Vec<u64>,
    pub stochastic_rounding: bool,
    pub loader_workers: usize,
    pub prefetch: usize,
    pub curriculum: String,
    pub eval_problems: usize,
    pub progress: bool,
    /// How device ranks exchange device buffers.
    #[serde(default)]
    pub comm: CommArg,
}

impl TrainConfig {
    /// Resolves flags (already merged with `--config`) and defaults, and checks ranges.
    /// `precision` defaults depend on the device, which the caller resolves first.
    pub fn resolve(a: TrainArgs, on_gpu: bool) -> Result<TrainConfig> {
        let inject = match &a.inject_nonfinite {
            None => Vec::new(),
            Some(s) => crate::precision::NonFiniteInjection::parse(s)
                .map_err(|e| anyhow::anyhow!("--inject-nonfinite: {e}"))?
                .steps()
                .collect(),
        };
        let model = a.model.unwrap_or_else(|| "tiny".into());
        // The tiny default model learns fastest at a high rate; larger models use GPT-2's 6e-4.
        let default_lr = if model == "tiny" { 3e-3 } else { 6e-4 };
        let c = TrainConfig {
            model,
            data: a.data,
            device: a.device.unwrap_or(DeviceSpec::Auto),
            precision: a.precision.unwrap_or(if on_gpu {
                Precision::Bf16
            } else {
                Precision::Fp32
            }),
            micro_batch: a.micro_batch.unwrap_or(32),
            seq_len: a.seq_len,
            accum: a.accum.unwrap_or(1),
            recompute: a.recompute.unwrap_or_default(),
            zero: a.zero.unwrap_or(0),
            world: a.world.unwrap_or(1),
            offload_optimizer: a.offload_optimizer,
            steps: a.steps.unwrap_or(600),
            lr: a.lr.unwrap_or(default_lr),
            warmup: a.warmup.unwrap_or(50),
            schedule: a.schedule.unwrap_or_default(),
            min_lr_frac: a.min_lr_frac.unwrap_or(0.1),
            scale_lr: a.scale_lr,
            optimizer: a.optimizer.unwrap_or_default(),
            weight_decay: a.weight_decay.unwrap_or(0.1),
            momentum: a.momentum.unwrap_or(0.9),
            grad_clip: a.grad_clip.unwrap_or(1.0),
            eval_every: a.eval_every.unwrap_or(200),
            eval_batches: a.eval_batches.unwrap_or(4),
            early_stop_patience: a.early_stop_patience.unwrap_or(0),
            early_stop_min_delta: a.early_stop_min_delta.unwrap_or(0.0),
            seed: a.seed.unwrap_or(1337),
            log: a.log,
            profile: a.profile,
            profile_wait: a.profile_wait.unwrap_or(1),
            profile_warmup: a.profile_warmup.unwrap_or(1),
            profile_active: a.profile_active.unwrap_or(3),
            save: a.save,
            save_every: a.save_every.unwrap_or(0),
            keep_last: a.keep_last.unwrap_or(0),
            resume: a.resume,
            overwrite: a.overwrite,
            inject_nonfinite: inject,
            stochastic_rounding: a.stochastic_rounding,
            loader_workers: a.loader_workers.unwrap_or(2),
            prefetch: a.prefetch.unwrap_or(4),
            curriculum: a.curriculum.unwrap_or_else(|| "none".into()),
            eval_problems: a.eval_problems.unwrap_or(500),
            progress: !a.no_progress,
            comm: match a.comm {
                Some(c) => c,
                None => CommArg::from_env()?.unwrap_or_default(),
            },
        };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        let positive = [
            ("--micro-batch", self.micro_batch),
            ("--accum", self.accum),
            ("--world", self.world),
            ("--loader-workers", self.loader_workers),
            ("--prefetch", self.prefetch),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        // Bounds past which a setting only exhausts memory or time (the memory estimate at
        // startup covers what fits below them).
        let at_most = [
            ("--world", self.world, 1024),
            ("--loader-workers", self.loader_workers, 256),
            ("--prefetch", self.prefetch, 4096),
            ("--eval-batches", self.eval_batches, 100_000),
            ("--eval-problems", self.eval_problems, 100_000),
        ];
        for (name, v, max) in at_most {
            if v > max {
                bail!("{name} must be at most {max} (got {v})");
            }
        }
        if self.zero > 3 {
            bail!("--zero must be 0, 1, 2 or 3 (got {})", self.zero);
        }
        // The optimizers compute in f32: a rate beyond f32's range would be infinite at the
        // first step.
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= f32::MAX as f64) {
            bail!(
                "--lr must be a positive number no larger than {:e} (got {})",
                f32::MAX,
                self.lr
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_frac) {
            bail!("--min-lr-frac must be in [0, 1] (got {})", self.min_lr_frac);
        }
        if self.grad_clip < 0.0 || !self.grad_clip.is_finite() {
            bail!("--grad-clip must be >= 0 (got {})", self.grad_clip);
        }
        if self.stochastic_rounding && self.precision != Precision::Bf16 {
            bail!("--stochastic-rounding applies to --precision bf16 only");
        }
        self.curriculum
            .parse::<crate::data::Curriculum>()
            .map_err(|e| anyhow::anyhow!("--curriculum: {e}"))?;
        if self.save_every > 0 && self.save.is_none() {
            bail!("--save-every needs --save DIR");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn config_file_fills_unset_flags_and_rejects_typos() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(
            &p,
            "model = \"tiny\"\nsteps = 7\nlr = 0.01\nmicro_batch = 3\n",
        )
        .unwrap();
        let a = TrainArgs {
            config: Some(p.clone()),
            steps: Some(9),
            ..Default::default()
        };
        let c = TrainConfig::resolve(a.with_config_file().unwrap(), false).unwrap();
        assert_eq!(
            (c.steps, c.lr, c.micro_batch),
            (9, 0.01, 3),
            "flags win over the file"
        );
        std::fs::write(&p, "stepz = 7\n").unwrap();
        let a = TrainArgs {
            config: Some(p),
            ..Default::default()
        };
        let e = a.with_config_file().unwrap_err();
        assert!(format!("{e:#}").contains("stepz"), "{e:#}");
    }

    #[test]
    fn bad_values_are_named() {
        let a = TrainArgs {
            accum: Some(0),
            ..Default::default()
        };
        let e = TrainConfig::resolve(a, false).unwrap_err();
        assert!(e.to_string().contains("--accum"), "{e}");
    }
}
