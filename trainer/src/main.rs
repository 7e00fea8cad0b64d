//! `lathe`: train, prepare data, benchmark, launch multi-process runs, and report.

use anyhow::Result;
use clap::{Parser, Subcommand};
use lathe_trainer::config::TrainArgs;

#[derive(Parser)]
#[command(
    name = "lathe",
    version,
    about = "Train neural networks fast with hand-written PTX kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (with no arguments: a small GPT on Lathe's built-in addition corpus).
    Train(Box<TrainArgs>),
    /// Tokenize text files into token shards for `lathe train --data`.
    Prepare(lathe_trainer::data::PrepareArgs),
    /// Score a checkpoint: loss and perplexity on a dataset or a text file, exact match on the
    /// built-in corpus.
    Eval(lathe_trainer::train::EvalArgs),
    /// Turn a `--log` JSONL file into a self-contained HTML report.
    Report(lathe_trainer::report::ReportArgs),
    /// Quick measurements: activation memory per recomputation policy, CPU step time.
    Bench(lathe_trainer::bench::BenchArgs),
    /// Start one training process per GPU (like torchrun).
    Launch(lathe_trainer::launch::LaunchArgs),
    /// List CUDA devices.
    Devices,
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", lathe_trainer::error_text(&e));
            // Stopped by a caught SIGINT/SIGTERM: exit as the signal would have.
            lathe_trainer::signals::received().map_or(1, |s| 128 + s)
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command.unwrap_or(Command::Train(Box::default())) {
        Command::Train(args) => lathe_trainer::train::run_train(*args).map(|_| 0),
        Command::Prepare(args) => lathe_trainer::data::run_prepare(args).map(|_| 0),
        Command::Eval(args) => lathe_trainer::train::run_eval(args).map(|_| 0),
        Command::Report(args) => lathe_trainer::report::run_report(args).map(|_| 0),
        Command::Bench(args) => lathe_trainer::bench::run_bench(args).map(|_| 0),
        Command::Launch(args) => lathe_trainer::launch::run_launch(args),
        Command::Devices => devices().map(|_| 0),
    }
}

fn devices() -> Result<()> {
    match lathe_host::Device::count() {
        Ok(n) => {
            let (major, minor) = lathe_host::driver::driver_version()?;
            println!("CUDA driver API {major}.{minor}; {n} device(s)");
            for i in 0..n {
                let d = lathe_host::Device::cuda(i)?;
                let (free, total) = d.memory_info()?;
                println!(
                    "{}  {:.1}/{:.1} GiB free  (--device cuda:{i})",
                    d.describe(),
                    free as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("no CUDA device: {e}"),
    }
    let sim = lathe_host::Device::sim()?;
    let (_, total) = sim.memory_info()?;
    println!(
        "{}  {:.1} GiB  (--device sim: interprets the PTX, checks every access, keeps no time)",
        sim.describe(),
        total as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
