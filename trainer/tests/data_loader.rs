//! The loader: determinism, worker-count independence, exact resume, disjoint ranks,
//! curriculum truncation.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use lathe_trainer::data::{
    Batch, Curriculum, DataError, Loader, LoaderConfig, LoaderPosition, Source, Split,
    WindowSource, mix64, write_shard,
};

/// A source whose window `(g, w)` starts with the id `g * 1000 + w`, and whose reads sleep a
/// pseudo-random few hundred microseconds so that workers finish out of order.
struct IdSource {
    windows: Vec<u64>,
    t: usize,
    jitter: bool,
}

impl WindowSource for IdSource {
    fn seq_len(&self) -> usize {
        self.t
    }
    fn group_windows(&self) -> &[u64] {
        &self.windows
    }
    fn read_window(
        &self,
        group: usize,
        window: u64,
        len: usize,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> Result<(), DataError> {
        let id = group as u32 * 1000 + window as u32;
        if self.jitter {
            let us = mix64(id as u64, 7) % 400;
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        for i in 0..len {
            inputs[i] = id + i as u32;
            targets[i] = id + i as u32 + 1;
        }
        Ok(())
    }
    fn vocab_size(&self) -> Option<u32> {
        None
    }
    fn describe(&self) -> String {
        "ids".into()
    }
}

fn id_source(jitter: bool) -> Arc<dyn WindowSource> {
    Arc::new(IdSource {
        windows: vec![13, 7, 20, 1, 9],
        t: 4,
        jitter,
    })
}

fn ids(b: &Batch) -> Vec<u32> {
    b.inputs.chunks(b.t).map(|row| row[0]).collect()
}

fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
    (0..n).map(|_| loader.next_batch().unwrap()).collect()
}

fn cfg(workers: usize) -> LoaderConfig {
    let mut c = LoaderConfig::new(3, 4);
    c.seed = 11;
    c.workers = workers;
    c.prefetch = 3;
    c
}

#[test]
fn same_seed_same_batches_whatever_the_workers() {
    // 50 windows, 3 per step: 16 steps per epoch; 40 batches cross two epoch boundaries.
    let reference = take(
        &mut Loader::new(id_source(false), cfg(0), None).unwrap(),
        40,
    );
    assert_eq!(reference[15].position.epoch, 0);
    assert_eq!(reference[16].position.epoch, 1);
    assert_eq!(reference[16].position.index_in_epoch, 0);
    for workers in [1, 2, 4] {
        let mut l = Loader::new(id_source(true), cfg(workers), None).unwrap();
        assert_eq!(l.steps_per_epoch(), 16);
        assert_eq!(take(&mut l, 40), reference, "workers = {workers}");
    }
    // Within an epoch no window repeats; epochs are ordered differently.
    let e0: Vec<u32> = reference[..16].iter().flat_map(ids).collect();
    let e1: Vec<u32> = reference[16..32].iter().flat_map(ids).collect();
    assert_eq!(e0.iter().collect::<HashSet<_>>().len(), 48);
    assert_ne!(e0, e1);
    // Another seed, another order.
    let mut other = cfg(0);
    other.seed = 12;
    let b = take(&mut Loader::new(id_source(false), other, None).unwrap(), 16);
    assert_ne!(b, reference[..16]);
}

#[test]
fn resume_continues_the_exact_sequence() {
    let uninterrupted = take(
        &mut Loader::new(id_source(false), cfg(2), None).unwrap(),
        45,
    );
    for stop in [0usize, 5, 15, 16, 31] {
        let mut first = Loader::new(id_source(true), cfg(3), None).unwrap();
        let head = take(&mut first, stop);
        // Batches prefetched but not taken are not part of the position.
        let saved = serde_json::to_string(&first.position()).unwrap();
        drop(first);
        let pos: LoaderPosition = serde_json::from_str(&saved).unwrap();
        assert_eq!(pos.step, stop as u64);
        let mut resumed = Loader::new(id_source(true), cfg(1), Some(pos)).unwrap();
        let tail = take(&mut resumed, 45 - stop);
        let joined: Vec<Batch> = head.into_iter().chain(tail).collect();
        assert_eq!(joined, uninterrupted, "stopped after {stop}");
    }
}

#[test]
fn resume_rejects_a_position_from_another_setup() {
    let mut l = Loader::new(id_source(false), cfg(0), None).unwrap();
    take(&mut l, 3);
    let pos = l.position();
    let mut c = cfg(0);
    c.batch_size = 2;
    let msg = Loader::new(id_source(false), c, Some(pos))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("batch_size") && msg.contains("saved position has"),
        "{msg}"
    );
    let mut c = cfg(0);
    c.world = 2;
    assert!(Loader::new(id_source(false), c, Some(pos)).is_err());
}

#[test]
fn ranks_see_disjoint_windows() {
    let world = 3;
    let mut per_rank = Vec::new();
    let mut steps = 0;
    for rank in 0..world {
        let mut c = cfg(2);
        c.rank = rank;
        c.world = world;
        let mut l = Loader::new(id_source(true), c, None).unwrap();
        steps = l.steps_per_epoch() as usize;
        assert_eq!(steps, 50 / (3 * 3));
        // Two epochs.
        let batches = take(&mut l, 2 * steps);
        per_rank.push(batches);
    }
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        for batches in &per_rank {
            for b in &batches[epoch * steps..(epoch + 1) * steps] {
                assert_eq!(b.position.epoch, epoch as u64);
                for id in ids(b) {
                    assert!(seen.insert(id), "window {id} seen twice in epoch {epoch}");
                }
            }
        }
        assert_eq!(seen.len(), steps * world * 3);
    }
    // Rank r's step-i batch is slice r of what one rank with world * B windows per step sees.
    let mut c = cfg(0);
    c.batch_size = 9;
    let single = take(&mut Loader::new(id_source(false), c, None).unwrap(), steps);
    for (i, b) in single.iter().enumerate() {
        let all = ids(b);
        for (r, batches) in per_rank.iter().enumerate() {
            assert_eq!(ids(&batches[i]), all[r * 3..(r + 1) * 3]);
        }
    }
}

#[test]
fn curriculum_truncates_windows_on_the_same_grid() {
    let mut full = cfg(0);
    full.seq_len = 16;
    let src = || -> Arc<dyn WindowSource> {
        Arc::new(IdSource {
            windows: vec![40, 30],
            t: 16,
            jitter: false,
        })
    };
    let mut short = full.clone();
    short.curriculum = Curriculum::Seq {
        start_len: 2,
        warmup_steps: 10,
    };
    short.workers = 2;
    let a = take(&mut Loader::new(src(), full, None).unwrap(), 12);
    let b = take(&mut Loader::new(src(), short.clone(), None).unwrap(), 12);
    for (step, (fa, sb)) in a.iter().zip(&b).enumerate() {
        let len = short.curriculum.seq_len_at(step as u64, 16);
        assert_eq!(sb.t, len);
        assert_eq!(sb.inputs.len(), 3 * len);
        for row in 0..3 {
            assert_eq!(
                sb.inputs[row * len..(row + 1) * len],
                fa.inputs[row * 16..row * 16 + len]
            );
            assert_eq!(
                sb.targets[row * len..(row + 1) * len],
                fa.targets[row * 16..row * 16 + len]
            );
        }
    }
    assert_eq!(b[0].t, 2);
    assert_eq!(b[5].t, 8);
    assert_eq!(b[11].t, 16);
}

#[test]
fn shard_windows_and_tiny_datasets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: &Path = tmp.path();
    let tokens: Vec<u16> = (0..101).collect();
    write_shard(&dir.join("train_000000.bin"), &tokens).unwrap();
    // T = 10: windows [0..=10], [10..=20], ..., [90..=100]: 10 windows, each token but the
    // first a target exactly once.
    let mut c = LoaderConfig::new(2, 10);
    c.shuffle = false;
    let mut l = Loader::open(&Source::shards(dir), Split::Train, c.clone(), None).unwrap();
    assert_eq!(l.windows_per_epoch(), 10);
    let mut targets = Vec::new();
    for _ in 0..5 {
        let b = l.next_batch().unwrap();
        targets.extend(b.targets.iter().copied());
        l.recycle(b);
    }
    assert_eq!(targets, (1..=100).collect::<Vec<u32>>());
    // Too little data for one step: a clear error.
    c.batch_size = 11;
    let msg = Loader::open(&Source::shards(dir), Split::Train, c, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("10 windows of 11 tokens") && msg.contains("needs 11"),
        "{msg}"
    );
}
