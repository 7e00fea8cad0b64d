//! Data loader throughput on the CPU, in tokens/s, with 1, 2 and 4 workers.
//!
//!     cargo bench -p lathe-benches --bench loader
//!     LATHE_BENCH_SMALL=1 cargo bench -p lathe-benches --bench loader   # 64 MB instead of 2 GB
//!
//! The shard set (2 GB: 1G random GPT-2 tokens in 100M-token shards; or 64 MB) is generated
//! once into a temporary directory. Each measurement pulls shuffled batches of 16 x 1024 tokens
//! (GPT-2 124M's sequence length) from a warm loader, checking every token against the 50257
//! vocabulary, and hands the buffers back to the pool, as training does. The figure to beat is
//! ~460k tokens/s: what one H100 consumes training GPT-2 124M (llm.c, bf16); a loader that keeps
//! up with it on one core leaves the rest of the host to the training loop.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lathe_kernels::rng::Rng;
use lathe_trainer::data::{Loader, LoaderConfig, ShardWriter, Source, Split};

const B: usize = 16;
const T: usize = 1024;
const BATCHES_PER_ITER: usize = 32;
const GPT2_VOCAB: u32 = 50257;
/// Tokens per second one H100 consumes training GPT-2 124M.
const H100_STEP_TOKENS_PER_S: f64 = 460_000.0;

/// Writes `total` random tokens as `train_*.bin` shards of `per_shard` tokens.
fn generate(dir: &Path, total: u64, per_shard: u64) {
    let mut rng = Rng::new(2024);
    let mut chunk = vec![0u16; 1 << 20];
    let mut written = 0u64;
    let mut index = 0;
    while written < total {
        let n = per_shard.min(total - written);
        let mut w =
            ShardWriter::create(&dir.join(format!("train_{index:06}.bin"))).expect("create shard");
        let mut left = n;
        while left > 0 {
            let k = (chunk.len() as u64).min(left) as usize;
            for t in &mut chunk[..k] {
                *t = rng.below(GPT2_VOCAB as u64) as u16;
            }
            w.push(&chunk[..k]).expect("write shard");
            left -= k as u64;
        }
        w.finish().expect("finish shard");
        written += n;
        index += 1;
    }
}

fn loader(dir: &Path, workers: usize) -> Loader {
    let mut cfg = LoaderConfig::new(B, T);
    cfg.workers = workers;
    cfg.prefetch = 8;
    cfg.seed = 1;
    let src = Source::Shards {
        path: dir.to_path_buf(),
        vocab_size: Some(GPT2_VOCAB),
    };
    Loader::open(&src, Split::Train, cfg, None).expect("open loader")
}

fn pull(l: &mut Loader, batches: usize) {
    for _ in 0..batches {
        let b = l.next_batch().expect("batch");
        black_box(&b.inputs);
        l.recycle(b);
    }
}

fn bench(c: &mut Criterion) {
    let small = std::env::var_os("LATHE_BENCH_SMALL").is_some();
    let (total, per_shard) = if small {
        (32u64 << 20, 8u64 << 20) // 64 MB
    } else {
        (1u64 << 30, 100_000_000) // 2 GB
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let t0 = Instant::now();
    generate(dir.path(), total, per_shard);
    eprintln!(
        "loader bench: generated {:.2} GB of shards in {:.1} s",
        (2 * total) as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );

    let tokens_per_iter = (BATCHES_PER_ITER * B * T) as u64;
    let mut g = c.benchmark_group(format!("loader/{}MB", (2 * total) >> 20));
    g.sample_size(20);
    g.throughput(Throughput::Elements(tokens_per_iter));
    let worker_counts = [1usize, 2, 4];
    for &workers in &worker_counts {
        let mut l = loader(dir.path(), workers);
        pull(&mut l, 8); // warm up the pool and the page cache
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| pull(&mut l, BATCHES_PER_ITER))
        });
    }
    g.finish();

    // The headline figure: median of 5 timed runs of 128 batches each.
    println!(
        "\nloader throughput (B={B}, T={T}, shuffled, vocab-checked), against {:.0}k tokens/s (one H100 step of GPT-2 124M):",
        H100_STEP_TOKENS_PER_S / 1e3
    );
    for &workers in &worker_counts {
        let mut l = loader(dir.path(), workers);
        pull(&mut l, 8);
        let mut rates: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                pull(&mut l, 128);
                (128 * B * T) as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        let r = rates[2];
        println!(
            "  workers={workers}: {:8.1} M tokens/s = {:6.1} x the H100 step rate",
            r / 1e6,
            r / H100_STEP_TOKENS_PER_S
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
