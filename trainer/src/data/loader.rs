//! The batch loader: deterministic order, rank partitions, exact resume, and a worker pool
//! that prefetches.
//!
//! Each step yields `B` windows of `T + 1` tokens as a [`Batch`] of `B x t` inputs and targets
//! (`t = T`, or shorter under a [`Curriculum`]). The order is fixed by (seed, epoch) (see
//! [`plan`](super::plan)); rank `r` of `world` takes its own disjoint share of every step.
//!
//! **Workers.** `workers` threads live as long as the loader, across epochs. The consumer keeps
//! `prefetch` batches requested ahead of the one it is about to take; a worker takes a request
//! from a shared queue, fills buffers from the [`BufferPool`], and sends the batch back through a
//! bounded channel tagged with its sequence number. The consumer reorders by that number, so the
//! batches come out in the same order whatever the workers' timing, and equal to what
//! `workers = 0` (everything on the calling thread) gives.
//!
//! **Resume.** [`Loader::position`] is the position of the next batch the caller will receive
//! (batches prefetched but not yet taken are not counted). A loader built with that position
//! yields exactly the batches the original would have yielded next.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::IGNORE_INDEX;
use super::Split;
use super::buffer::{BufferPool, TokenStorage, VecPool};
use super::curriculum::Curriculum;
use super::error::{DataError, Result};
use super::plan::Planner;
use super::source::{Source, WindowSource};

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Sequences per batch on this rank (`B`).
    pub batch_size: usize,
    /// Full sequence length (`T`); windows hold `T + 1` tokens.
    pub seq_len: usize,
    /// Seed of the shuffling.
    pub seed: u64,
    /// This process's rank in `0..world`.
    pub rank: usize,
    /// Number of data-parallel ranks.
    pub world: usize,
    /// Shuffle shard and window order each epoch (training); off for evaluation.
    pub shuffle: bool,
    /// Worker threads; 0 computes batches on the calling thread.
    pub workers: usize,
    /// Batches requested ahead of the consumer (at least 1 is used).
    pub prefetch: usize,
    pub curriculum: Curriculum,
}

impl LoaderConfig {
    /// Defaults: seed 0, rank 0 of 1, shuffled, 2 workers, prefetch 4, no curriculum.
    pub fn new(batch_size: usize, seq_len: usize) -> Self {
        LoaderConfig {
            batch_size,
            seq_len,
            seed: 0,
            rank: 0,
            world: 1,
            shuffle: true,
            workers: 2,
            prefetch: 4,
            curriculum: Curriculum::None,
        }
    }
}

/// Where a loader is in its data: saved in checkpoints, restored on resume.
///
/// `epoch`, `index_in_epoch` and `step` locate the next batch; the other fields describe the
/// loader that produced the position and must match the loader it is restored into (the rank
/// is not part of it: every rank saves the same position).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderPosition {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Batch index within the epoch, `0..steps_per_epoch`.
    pub index_in_epoch: u64,
    /// Batches since the start of the run (the curriculum's clock).
    pub step: u64,
    pub seed: u64,
    pub world: u64,
    pub batch_size: u64,
    pub seq_len: u64,
    /// Windows per epoch of the source; changes when the data changes.
    pub windows: u64,
}

/// One batch: `b` rows of `t` tokens, row-major.
///
/// `inputs[i * t + j]` is token `j` of row `i`; `targets[i * t + j]` is the token that follows
/// it, or [`IGNORE_INDEX`] where no loss is taken. A pooled storage may be longer than `b * t`;
/// [`Batch::inputs`] and [`Batch::targets`] return exactly the batch. With the default
/// [`VecPool`] the vectors are exactly `b * t` long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch<S = Vec<u32>> {
    pub inputs: S,
    pub targets: S,
    pub b: usize,
    pub t: usize,
    /// The position this batch was produced at.
    pub position: LoaderPosition,
}

impl<S: TokenStorage> Batch<S> {
    /// `b * t` input token ids.
    pub fn inputs(&self) -> &[u32] {
        &self.inputs.as_ref()[..self.b * self.t]
    }

    /// `b * t` target token ids (or [`IGNORE_INDEX`]).
    pub fn targets(&self) -> &[u32] {
        &self.targets.as_ref()[..self.b * self.t]
    }

    /// Number of targets that carry a loss.
    pub fn loss_tokens(&self) -> usize {
        self.targets()
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count()
    }
}

struct Shared<P: BufferPool> {
    source: Arc<dyn WindowSource>,
    planner: Planner,
    pool: Arc<P>,
    cfg: LoaderConfig,
}

impl<P: BufferPool> Shared<P> {
    fn make_batch(&self, pos: LoaderPosition) -> Result<Batch<P::Storage>> {
        let (b, t) = (self.cfg.batch_size, self.cfg.seq_len);
        let len = self.cfg.curriculum.seq_len_at(pos.step, t);
        let mut inputs = self.pool.acquire(b * len)?;
        let mut targets = match self.pool.acquire(b * len) {
            Ok(s) => s,
            Err(e) => {
                self.pool.release(inputs);
                return Err(e);
            }
        };
        let first = (pos.index_in_epoch * self.cfg.world as u64 + self.cfg.rank as u64) * b as u64;
        let mut result = Ok(());
        {
            let (ins, tgs) = (inputs.as_mut(), targets.as_mut());
            for row in 0..b {
                let (group, window) = self.planner.locate(pos.epoch, first + row as u64);
                let r = row * len..(row + 1) * len;
                result =
                    self.source
                        .read_window(group, window, len, &mut ins[r.clone()], &mut tgs[r]);
                if result.is_err() {
                    break;
                }
            }
        }
        if let Err(e) = result {
            self.pool.release(inputs);
            self.pool.release(targets);
            return Err(e);
        }
        Ok(Batch {
            inputs,
            targets,
            b,
            t: len,
            position: pos,
        })
    }

    fn advance(&self, pos: &mut LoaderPosition) {
        pos.index_in_epoch += 1;
        pos.step += 1;
        if pos.index_in_epoch == self.steps_per_epoch() {
            pos.epoch += 1;
            pos.index_in_epoch = 0;
        }
    }

    fn steps_per_epoch(&self) -> u64 {
        self.planner.total() / (self.cfg.world * self.cfg.batch_size) as u64
    }
}

type Job = (u64, LoaderPosition);
type Done<S> = (u64, Result<Batch<S>>);

/// Batches of one split for one rank, in a deterministic order. See the module documentation.
pub struct Loader<P: BufferPool = VecPool> {
    shared: Arc<Shared<P>>,
    /// Position of the next batch returned to the caller.
    next: LoaderPosition,
    /// Position of the next batch requested from the workers.
    issue: LoaderPosition,
    next_seq: u64,
    issued_seq: u64,
    jobs: Option<Sender<Job>>,
    done: Option<Receiver<Done<P::Storage>>>,
    pending: BTreeMap<u64, Result<Batch<P::Storage>>>,
    workers: Vec<JoinHandle<()>>,
    failed: Option<String>,
}

impl Loader<VecPool> {
    /// Opens `split` of `source` and builds a loader over it with plain vector buffers.
    pub fn open(
        source: &Source,
        split: Split,
        cfg: LoaderConfig,
        resume: Option<LoaderPosition>,
    ) -> Result<Self> {
        let windows = source.open(split, cfg.seq_len)?;
        Loader::new(windows, cfg, resume)
    }

    /// A loader over `source` with plain vector buffers.
    pub fn new(
        source: Arc<dyn WindowSource>,
        cfg: LoaderConfig,
        resume: Option<LoaderPosition>,
    ) -> Result<Self> {
        let keep = 2 * (cfg.prefetch.max(1) + cfg.workers + 2);
        Loader::with_pool(source, cfg, resume, Arc::new(VecPool::new(keep)))
    }
}

impl<P: BufferPool> Loader<P> {
    /// A loader over `source` whose batches live in buffers from `pool`. Starts at the
    /// beginning, or at `resume` (which must come from a loader with the same seed, world,
    /// batch size, sequence length and data).
    pub fn with_pool(
        source: Arc<dyn WindowSource>,
        cfg: LoaderConfig,
        resume: Option<LoaderPosition>,
        pool: Arc<P>,
    ) -> Result<Self> {
        validate(&cfg, source.as_ref())?;
        let planner = Planner::new(
            source.group_windows(),
            cfg.seed,
            cfg.shuffle,
            2 * cfg.workers + 4,
        )?;
        let needed = (cfg.world * cfg.batch_size) as u64;
        if planner.total() < needed {
            return Err(DataError::TooFewWindows {
                what: source.describe(),
                windows: planner.total(),
                window_len: cfg.seq_len + 1,
                needed,
            });
        }
        let start = LoaderPosition {
            epoch: 0,
            index_in_epoch: 0,
            step: 0,
            seed: cfg.seed,
            world: cfg.world as u64,
            batch_size: cfg.batch_size as u64,
            seq_len: cfg.seq_len as u64,
            windows: planner.total(),
        };
        let next = match resume {
            None => start,
            Some(saved) => check_resume(saved, start, planner.total() / needed)?,
        };
        let shared = Arc::new(Shared {
            source,
            planner,
            pool,
            cfg,
        });
        let mut loader = Loader {
            shared,
            next,
            issue: next,
            next_seq: 0,
            issued_seq: 0,
            jobs: None,
            done: None,
            pending: BTreeMap::new(),
            workers: Vec::new(),
            failed: None,
        };
        loader.spawn_workers()?;
        // Start filling buffers now, while the caller builds its model.
        loader.top_up()?;
        Ok(loader)
    }

    fn spawn_workers(&mut self) -> Result<()> {
        let n = self.shared.cfg.workers;
        if n == 0 {
            return Ok(());
        }
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = sync_channel::<Done<P::Storage>>(self.shared.cfg.prefetch.max(1));
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..n {
            let (shared, rx, tx) = (self.shared.clone(), job_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("lathe-loader-{i}"))
                .spawn(move || worker(shared, rx, tx))
                .map_err(|e| DataError::Worker(format!("cannot start a loader thread: {e}")))?;
            self.workers.push(handle);
        }
        self.jobs = Some(job_tx);
        self.done = Some(done_rx);
        Ok(())
    }

    /// The next batch. Blocks until it is ready.
    pub fn next_batch(&mut self) -> Result<Batch<P::Storage>> {
        if let Some(msg) = &self.failed {
            return Err(DataError::Worker(format!("an earlier batch failed: {msg}")));
        }
        if self.jobs.is_none() {
            let batch = self.shared.make_batch(self.next)?;
            self.shared.advance(&mut self.next);
            return Ok(batch);
        }
        self.top_up()?;
        let result = loop {
            if let Some(r) = self.pending.remove(&self.next_seq) {
                break r;
            }
            let received = self.done.as_ref().map(|d| d.recv());
            match received {
                Some(Ok((seq, r))) => {
                    self.pending.insert(seq, r);
                }
                _ => return Err(self.fail("the loader's workers have stopped".into())),
            }
        };
        match result {
            Ok(batch) => {
                self.next_seq += 1;
                self.shared.advance(&mut self.next);
                // Keep `prefetch` batches in flight while the caller uses this one. A failure
                // here marks the loader failed and is reported by the next call.
                let _ = self.top_up();
                Ok(batch)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Requests batches from the workers until `prefetch` are outstanding ahead of the next.
    fn top_up(&mut self) -> Result<()> {
        if self.jobs.is_none() {
            return Ok(());
        }
        let ahead = self.shared.cfg.prefetch.max(1) as u64;
        while self.issued_seq < self.next_seq + ahead {
            let job = (self.issued_seq, self.issue);
            if self.jobs.as_ref().is_none_or(|j| j.send(job).is_err()) {
                return Err(self.fail("the loader's workers have stopped".into()));
            }
            self.shared.advance(&mut self.issue);
            self.issued_seq += 1;
        }
        Ok(())
    }

    fn fail(&mut self, msg: String) -> DataError {
        self.failed = Some(msg.clone());
        DataError::Worker(msg)
    }

    /// Gives a batch's buffers back to the pool for reuse.
    pub fn recycle(&self, batch: Batch<P::Storage>) {
        self.shared.pool.release(batch.inputs);
        self.shared.pool.release(batch.targets);
    }

    /// Position of the next batch [`Loader::next_batch`] will return: save it in checkpoints.
    pub fn position(&self) -> LoaderPosition {
        self.next
    }

    /// Steps (batches per rank) in one epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.shared.steps_per_epoch()
    }

    /// Windows in one epoch, over all ranks (including the few skipped at the epoch's end).
    pub fn windows_per_epoch(&self) -> u64 {
        self.shared.planner.total()
    }

    /// The loader's settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// The window source.
    pub fn source(&self) -> &Arc<dyn WindowSource> {
        &self.shared.source
    }

    /// The buffer pool.
    pub fn pool(&self) -> &Arc<P> {
        &self.shared.pool
    }
}

impl<P: BufferPool> Iterator for Loader<P> {
    type Item = Result<Batch<P::Storage>>;

    /// Never `None`: the loader cycles through epochs forever.
    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

impl<P: BufferPool> Drop for Loader<P> {
    fn drop(&mut self) {
        // Closing the job queue ends each worker's loop; the result channel holds at most
        // `prefetch` batches, as many as were ever requested ahead, so no worker is blocked
        // sending and every join returns.
        self.jobs = None;
        self.done = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker<P: BufferPool>(
    shared: Arc<Shared<P>>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: SyncSender<Done<P::Storage>>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, pos)) = job else { return };
        let result =
            catch_unwind(AssertUnwindSafe(|| shared.make_batch(pos))).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker(format!(
                    "a loader thread panicked: {msg}"
                )))
            });
        if done.send((seq, result)).is_err() {
            return;
        }
    }
}

fn validate(cfg: &LoaderConfig, source: &dyn WindowSource) -> Result<()> {
    let bad = |m: String| Err(DataError::Config(m));
    if cfg.batch_size == 0 {
        return bad("batch size must be at least 1".into());
    }
    if cfg.seq_len == 0 {
        return bad("sequence length must be at least 1".into());
    }
    if cfg.world == 0 || cfg.rank >= cfg.world {
        return bad(format!(
            "rank {} is not in 0..{} (world)",
            cfg.rank, cfg.world
        ));
    }
    if source.seq_len() != cfg.seq_len {
        return bad(format!(
            "{} was opened for sequence length {}, the loader asks for {}",
            source.describe(),
            source.seq_len(),
            cfg.seq_len
        ));
    }
    cfg.curriculum.validate(cfg.seq_len)
}

fn check_resume(
    saved: LoaderPosition,
    start: LoaderPosition,
    steps: u64,
) -> Result<LoaderPosition> {
    let fields = [
        ("seed", saved.seed, start.seed),
        ("world", saved.world, start.world),
        ("batch_size", saved.batch_size, start.batch_size),
        ("seq_len", saved.seq_len, start.seq_len),
        ("windows per epoch", saved.windows, start.windows),
    ];
    for (field, s, c) in fields {
        if s != c {
            return Err(DataError::PositionMismatch {
                field,
                saved: s,
                current: c,
            });
        }
    }
    if saved.index_in_epoch >= steps {
        return Err(DataError::PositionMismatch {
            field: "index_in_epoch (must be below steps per epoch)",
            saved: saved.index_in_epoch,
            current: steps,
        });
    }
    Ok(saved)
}
