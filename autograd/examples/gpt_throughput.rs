//! Forward+backward throughput of a GPT on the CPU backend.
//!
//! ```text
//! cargo run --release -p lathe-autograd --example gpt_throughput -- [model] [batch] [seq] [steps] [dtype] [recompute]
//! ```
//! Defaults: `tiny 32 64 10 f32 none`. Prints the median step time and tokens/s after two
//! warm-up steps, and the peak activation memory.

use std::time::Instant;

use lathe_autograd::{DType, Gpt, GptConfig, Recompute, Tape};
use lathe_kernels::rng::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let cfg = GptConfig::from_name(&arg(0, "tiny"))?;
    let b: usize = arg(1, "32").parse()?;
    let t: usize = arg(2, &cfg.block_size.min(64).to_string()).parse()?;
    let steps: usize = arg(3, "10").parse()?;
    let dtype: DType = arg(4, "f32").parse()?;
    let recompute: Recompute = arg(5, "none").parse()?;

    let gpt = Gpt::new(cfg.clone())?;
    let mut params = gpt.init_params(0);
    params.sync_working(dtype);
    let mut rng = Rng::new(1);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let mut tape = Tape::new(dtype);
    let profile = std::env::var_os("LATHE_PROFILE_OPS").is_some();
    let mut times = Vec::new();
    let mut fwd_times = Vec::new();
    for step in 0..steps + 2 {
        // Profile steady-state steps only (the first steps also pay for first-touch page faults).
        if step == 2 {
            tape.set_profiling(profile);
        }
        tape.clear();
        params.zero_grads();
        let t0 = Instant::now();
        let loss = gpt.loss(&mut tape, &params, &tokens, &targets, b, t, recompute)?;
        let t1 = Instant::now();
        tape.backward(loss, 1.0, &mut params)?;
        let t2 = Instant::now();
        if step >= 2 {
            times.push((t2 - t0).as_secs_f64());
            fwd_times.push((t1 - t0).as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    fwd_times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let fwd = fwd_times[fwd_times.len() / 2];
    let toks = (b * t) as f64;
    let flops = cfg.flops_per_token(t) * toks;
    println!(
        "{} ({} params) B={b} T={t} {dtype} recompute={recompute} threads={}",
        arg(0, "tiny"),
        cfg.num_params(),
        rayon::current_num_threads()
    );
    println!(
        "step {:.1} ms (forward {:.1} ms): {:.0} tokens/s, {:.1} GFLOP/s, peak activations {:.1} MiB",
        med * 1e3,
        fwd * 1e3,
        toks / med,
        flops / med / 1e9,
        tape.peak_activation_bytes() as f64 / (1 << 20) as f64
    );
    for p in tape.profile() {
        println!(
            "  {:<14} fwd {:>4} calls {:>8.1} ms   bwd {:>4} calls {:>8.1} ms",
            p.op,
            p.forward_calls,
            p.forward_secs * 1e3,
            p.backward_calls,
            p.backward_secs * 1e3
        );
    }
    Ok(())
}
