//! Host memory a run needs, estimated before anything large is allocated, so that settings too
//! big for the machine are refused with the numbers instead of aborting the process
//! (`memory allocation of N bytes failed`).
//!
//! Per rank: the model state ([`RankMemory::predict`], plus the full-size initial parameters
//! every rank builds before sharding), the peak activation memory of one step (a dry run of the
//! tape, which allocates nothing but the batch's token ids) and the loader's buffers (the pool
//! keeps `2 * (prefetch + workers + 2)` batches of inputs and targets, 8 bytes per position).
//! Rank 0 adds one evaluation batch's activations. Set `LATHE_SKIP_MEMORY_CHECK=1` to train
//! anyway where the estimate is wrong.
//!
//! A device run is estimated the same way (an upper bound: its activations are on the
//! device). Its host model keeps the model state too, and with `--offload-optimizer` that host
//! state is the live master shard and moments, plus the staging the prediction counts (on a
//! device, the pinned gradient and working-copy shards of `crate::device::OffloadStaging`).

use crate::config::TrainConfig;
use crate::precision::Precision;
use crate::zero::{RankMemory, StateWidths, ZeroStage};
use anyhow::{Result, bail};
use lathe_autograd::{DType, Gpt, GptConfig, Recompute};

/// The parts of an estimate, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryEstimate {
    /// Model state and initial parameters, one rank.
    pub model_per_rank: f64,
    /// Peak activations of a training step, one rank.
    pub activations_per_rank: f64,
    /// Loader buffers, one rank.
    pub loader_per_rank: f64,
    /// Evaluation on rank 0.
    pub eval: f64,
    pub world: usize,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.world as f64 * (self.model_per_rank + self.activations_per_rank + self.loader_per_rank)
            + self.eval
    }
}

/// Bytes the loader's buffer pool may hold for one rank.
pub fn loader_bytes(micro_batch: usize, seq_len: usize, prefetch: usize, workers: usize) -> f64 {
    2.0 * (prefetch as f64 + workers as f64 + 2.0) * 8.0 * micro_batch as f64 * seq_len as f64
}

/// `MemAvailable` of `/proc/meminfo`, when the system says.
pub fn available_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn gib(b: f64) -> String {
    format!("{:.1} GiB", b / (1u64 << 30) as f64)
}

/// Refuses when the batch's token ids alone (what even a dry run allocates) would take more
/// than half of `available` bytes.
pub fn check_tokens(micro_batch: usize, seq_len: usize, available: Option<f64>) -> Result<()> {
    let bytes = 4.0 * micro_batch as f64 * seq_len as f64;
    let limit = available.unwrap_or(f64::INFINITY) / 2.0;
    if micro_batch.checked_mul(seq_len).is_none() || bytes > limit {
        bail!(
            "--micro-batch {micro_batch} x --seq-len {seq_len}: the token ids of one batch alone \
             take {}, more than half of the {} of memory available",
            gib(bytes),
            available.map_or("?".into(), gib)
        );
    }
    Ok(())
}

fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

/// Estimates what `cfg` needs with model `gcfg` at sequence length `seq_len`.
pub fn estimate(
    cfg: &TrainConfig,
    gcfg: &GptConfig,
    seq_len: usize,
    recompute: Recompute,
) -> Result<MemoryEstimate> {
    let available = available_bytes();
    check_tokens(cfg.micro_batch, seq_len, available)?;
    let loader = loader_bytes(cfg.micro_batch, seq_len, cfg.prefetch, cfg.loader_workers);
    let gpt = Gpt::new(gcfg.clone())?;
    let n = gcfg.num_params();
    let dtype = dtype_of(cfg.precision);
    let stage = ZeroStage::new(cfg.zero).map_err(|e| anyhow::anyhow!("--zero: {e}"))?;
    let buffers = match cfg.optimizer {
        crate::config::OptimizerArg::Adamw => 2,
        crate::config::OptimizerArg::Sgd => 1,
    };
    let widths = StateWidths::lathe(cfg.precision, buffers);
    let m = RankMemory::predict(n, cfg.world, 0, stage, &widths, cfg.offload_optimizer);
    let model = (m.model_state() + m.staging + m.workspace_step) as f64 + 4.0 * n as f64;
    let mut est = MemoryEstimate {
        model_per_rank: model,
        loader_per_rank: loader,
        world: cfg.world,
        ..Default::default()
    };
    // Without the dry run: if even this much does not fit, say so now.
    if let Some(avail) = available
        && est.total() > avail
    {
        return Ok(est);
    }
    est.activations_per_rank = gpt
        .activation_memory(cfg.micro_batch, seq_len, dtype, recompute)?
        .peak_bytes as f64;
    est.eval = if recompute == Recompute::None {
        est.activations_per_rank
    } else {
        gpt.activation_memory(cfg.micro_batch, seq_len, dtype, Recompute::None)?
            .peak_bytes as f64
    };
    Ok(est)
}

/// Refuses an estimate above `available` bytes, naming each part.
pub fn refuse_if_too_big(est: &MemoryEstimate, available: Option<f64>) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    if est.total() <= avail {
        return Ok(());
    }
    bail!(
        "these settings need about {} of host memory, but {} is available: per rank (x{}) {} of \
         model state, {} of activations and {} of loader buffers, plus {} to evaluate. Lower \
         --micro-batch, --seq-len, --world or --prefetch, or use --recompute act|block (set \
         LATHE_SKIP_MEMORY_CHECK=1 to try anyway)",
        gib(est.total()),
        gib(avail),
        est.world,
        gib(est.model_per_rank),
        gib(est.activations_per_rank),
        gib(est.loader_per_rank),
        gib(est.eval)
    )
}

/// The whole check for `lathe train`. `ranks_here`: the ranks whose memory this machine holds
/// (`--world` for ranks as threads; the launcher's processes on this node otherwise).
pub fn check(
    cfg: &TrainConfig,
    gcfg: &GptConfig,
    seq_len: usize,
    recompute: Recompute,
    ranks_here: usize,
) -> Result<()> {
    if std::env::var_os("LATHE_SKIP_MEMORY_CHECK").is_some_and(|v| v == "1") {
        return Ok(());
    }
    let mut est = estimate(cfg, gcfg, seq_len, recompute)?;
    est.world = ranks_here;
    refuse_if_too_big(&est, available_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TrainArgs, TrainConfig};

    fn cfg(model: &str, world: usize, b: usize) -> TrainConfig {
        TrainConfig::resolve(
            TrainArgs {
                model: Some(model.into()),
                world: Some(world),
                micro_batch: Some(b),
                ..Default::default()
            },
            false,
        )
        .unwrap()
    }

    #[test]
    fn big_settings_are_refused_with_the_numbers_and_small_ones_pass() {
        let g = GptConfig::from_name("gpt2-124m").unwrap();
        let est = estimate(&cfg("gpt2-124m", 64, 1), &g, 64, Recompute::None).unwrap();
        // 64 ranks each holding the whole model's state: far beyond 16 GiB.
        let e = refuse_if_too_big(&est, Some(16.0 * (1u64 << 30) as f64))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x64") && e.contains("--world"), "{e}");
        let t = GptConfig::tiny();
        let est = estimate(&cfg("tiny", 1, 32), &t, t.block_size, Recompute::None).unwrap();
        assert!(est.total() < 1e9, "{est:?}");
        assert!(refuse_if_too_big(&est, Some(4.0 * (1u64 << 30) as f64)).is_ok());
    }

    #[test]
    fn token_buffers_beyond_memory_are_refused_without_allocating() {
        assert!(check_tokens(1_000_000_000_000, 1024, Some(1e12)).is_err());
        assert!(check_tokens(usize::MAX, 2, None).is_err());
        assert!(check_tokens(32, 1024, Some(1e9)).is_ok());
        assert!(loader_bytes(4, 25, usize::MAX / 2, 1) > 1e18);
    }
}
