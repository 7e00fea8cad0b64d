//! `lathe bench`: quick measurements from the command line (criterion benches under `benches/`
//! are the careful ones).
//!
//! - `lathe bench memory [--model M] [--micro-batch B] [--seq-len T] [--precision P]`: activation
//!   memory of one training step under each recomputation policy, from a dry run of the tape
//!   (exact accounting, no compute), so it works for gpt2-124m shapes on any machine.
//! - `lathe bench step [--model M] ...`: wall time of training steps on the CPU backend.
//! - `lathe bench zero [--model M] [--worlds 1,2,4,8] [--precision P]`: model-state bytes per
//!   rank at every ZeRO stage (Lathe's layout next to the ZeRO paper's formulas).
//! - `lathe bench gemm|adamw|attention [--device cuda|sim] [--shape ...] [--iters N]`: the
//!   device step's kernels, timed on a GPU, counted on the simulator
//!   ([`crate::bench_kernels`]).

use crate::precision::Precision;
use anyhow::Result;
use lathe_autograd::{AttentionPath, DType, Gpt, GptConfig, Recompute};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    /// Activation memory per recomputation policy (dry run).
    Memory,
    /// CPU training-step time.
    Step,
    /// Per-rank model-state memory at every ZeRO stage, next to the ZeRO paper's formulas.
    Zero,
    /// The three GEMMs of a linear layer (`--shape M,N,K`).
    Gemm,
    /// The fused AdamW step (`--shape N` parameters).
    Adamw,
    /// Causal attention forward + backward (`--shape B,HEADS,T,HEAD_SIZE`).
    Attention,
}

/// Flags of `lathe bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Model presets to measure (repeatable); default tiny and gpt2-124m for memory, tiny for
    /// step.
    #[arg(long)]
    pub model: Vec<String>,
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Default: the model's context length.
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long, default_value = "bf16")]
    pub precision: Precision,
    /// Steps to time (`step` only).
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// World sizes for the `zero` table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub worlds: Vec<usize>,
    /// Device of the kernel benchmarks: `cuda[:N]`, `sim`, or `auto` (a GPU if one is usable,
    /// else the simulated device).
    #[arg(long, default_value = "auto")]
    pub device: crate::config::DeviceSpec,
    /// Problem shapes of the kernel benchmarks (repeatable): `M,N,K` for gemm, `N` for adamw,
    /// `B,HEADS,T,HEAD_SIZE` for attention. Defaults: GPT-2 124M's shapes on a GPU, small ones
    /// on the simulator.
    #[arg(long)]
    pub shape: Vec<String>,
    /// Timed runs of each kernel benchmark on a GPU (after one warm-up; the median is shown).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
}

fn dtype(p: Precision) -> DType {
    match p {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

/// One row of the recomputation memory table.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryRow {
    pub model: String,
    pub b: usize,
    pub t: usize,
    pub policy: &'static str,
    /// `materialized` (the `(B, nh, T, T)` probabilities kept per layer, the CPU path) or
    /// `flash` (the fused kernels' log-sum-exp, the device path where they apply).
    pub attention: &'static str,
    pub peak_bytes: usize,
    /// Peak relative to `none` with materialised attention.
    pub ratio: f64,
}

/// Activation memory of one step of `model` under none / act / block recomputation, with
/// materialised and with flash attention.
pub fn recompute_memory(
    model: &str,
    b: usize,
    t: Option<usize>,
    precision: Precision,
) -> Result<Vec<MemoryRow>> {
    let cfg = GptConfig::from_name(model)?;
    let t = t.unwrap_or(cfg.block_size);
    let gpt = Gpt::new(cfg)?;
    let mut rows = Vec::new();
    let mut base = 0usize;
    for (attention, path) in [
        ("materialized", AttentionPath::Materialized),
        ("flash", AttentionPath::Flash),
    ] {
        for (name, r) in [
            ("none", Recompute::None),
            ("act", Recompute::Act),
            ("block", Recompute::Block),
        ] {
            let m = gpt.activation_memory_with(b, t, dtype(precision), r, path)?;
            if r == Recompute::None && path == AttentionPath::Materialized {
                base = m.peak_bytes;
            }
            rows.push(MemoryRow {
                model: model.to_string(),
                b,
                t,
                policy: name,
                attention,
                peak_bytes: m.peak_bytes,
                ratio: m.peak_bytes as f64 / base.max(1) as f64,
            });
        }
    }
    Ok(rows)
}

/// Entry point of `lathe bench`.
pub fn run_bench(args: BenchArgs) -> Result<()> {
    use crate::bench_kernels::{KernelBench, run as run_kernels};
    let kernel = match args.kind {
        BenchKind::Gemm => Some(KernelBench::Gemm),
        BenchKind::Adamw => Some(KernelBench::Adamw),
        BenchKind::Attention => Some(KernelBench::Attention),
        _ => None,
    };
    if let Some(k) = kernel {
        return run_kernels(k, args.device, &args.shape, args.iters).map(|_| ());
    }
    match args.kind {
        BenchKind::Memory => {
            let models = if args.model.is_empty() {
                vec!["tiny".to_string(), "gpt2-124m".to_string()]
            } else {
                args.model.clone()
            };
            println!(
                "activation memory of one training step ({}), dry run of the tape",
                args.precision.as_str()
            );
            println!(
                "{:<10} {:>4} {:>5} {:<6} {:<12} {:>12} {:>8}",
                "model", "B", "T", "policy", "attention", "peak MiB", "vs none"
            );
            for m in &models {
                let b = args
                    .micro_batch
                    .unwrap_or(if m == "tiny" { 32 } else { 16 });
                let t = match args.seq_len {
                    Some(t) => t,
                    None => GptConfig::from_name(m)?.block_size,
                };
                // The dry run allocates the batch's token ids: refuse what cannot fit.
                crate::train::memory::check_tokens(b, t, crate::train::memory::available_bytes())?;
                for r in recompute_memory(m, b, args.seq_len, args.precision)? {
                    println!(
                        "{:<10} {:>4} {:>5} {:<6} {:<12} {:>12.1} {:>7.1}%",
                        r.model,
                        r.b,
                        r.t,
                        r.policy,
                        r.attention,
                        r.peak_bytes as f64 / (1u64 << 20) as f64,
                        100.0 * r.ratio
                    );
                }
            }
            Ok(())
        }
        BenchKind::Zero => {
            let model = args
                .model
                .first()
                .cloned()
                .unwrap_or_else(|| "gpt2-124m".into());
            let params = GptConfig::from_name(&model)?.num_params();
            if args.worlds.contains(&0) {
                anyhow::bail!("--worlds: world sizes must be at least 1");
            }
            // AdamW: two moment buffers.
            let table = crate::zero::memory_table(&model, params, args.precision, 2, &args.worlds);
            println!("{table}");
            Ok(())
        }
        // Run above.
        BenchKind::Gemm | BenchKind::Adamw | BenchKind::Attention => Ok(()),
        BenchKind::Step => {
            let model = args.model.first().cloned().unwrap_or_else(|| "tiny".into());
            let targs = crate::config::TrainArgs {
                model: Some(model),
                device: Some(crate::config::DeviceSpec::Cpu),
                micro_batch: args.micro_batch,
                seq_len: args.seq_len,
                precision: Some(args.precision),
                steps: Some(args.steps),
                eval_every: Some(0),
                eval_problems: Some(1),
                no_progress: true,
                ..Default::default()
            };
            let out = crate::train::run_train(targs)?;
            println!(
                "{} steps; peak memory {:.1} MB",
                out.steps,
                out.peak_mem_bytes as f64 / 1e6
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recomputation_lowers_the_peak_in_order() {
        let rows = recompute_memory("tiny", 8, Some(64), Precision::Bf16).unwrap();
        assert_eq!(rows.len(), 6);
        for r in rows.chunks(3) {
            assert!(r[1].peak_bytes < r[0].peak_bytes, "{rows:?}");
            assert!(r[2].peak_bytes < r[1].peak_bytes, "{rows:?}");
        }
        // Flash attention keeps no T x T tensor: below materialised under every policy.
        for k in 0..3 {
            assert!(rows[3 + k].peak_bytes < rows[k].peak_bytes, "{rows:?}");
        }
    }
}
