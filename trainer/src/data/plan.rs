//! The visiting order of windows in an epoch, a pure function of (seed, epoch).
//!
//! An epoch visits every window of the source once. With shuffling on, the group (shard) order
//! is a permutation drawn from `(seed, epoch)`, and the windows of each group are visited in a
//! permutation drawn from `(seed, epoch, group)`: reading stays within one shard at a time (good
//! for the page cache), while the order changes every epoch. Without shuffling, groups and
//! windows are visited in storage order. The epoch's sequence of windows is then dealt out in
//! steps: step `i` of rank `r` of `world` takes sequence positions
//! `(i * world + r) * B .. (i * world + r + 1) * B`, so ranks never share a window within an
//! epoch, and the `windows mod (world * B)` windows at the end of the sequence are skipped that
//! epoch (a different set each epoch when shuffling).

use std::sync::{Arc, Mutex};

use lathe_kernels::rng::Rng;

use super::error::{DataError, Result};

/// A 64-bit mix of two words (splitmix64's finalizer over `a` and a rotated, scrambled `b`).
/// Used to derive independent seeds from (seed, epoch, group) and to hash problems.
pub fn mix64(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Group order of one epoch and the cumulative window counts along it.
#[derive(Debug)]
struct EpochOrder {
    groups: Vec<usize>,
    /// `ends[k]` = windows in `groups[..=k]`.
    ends: Vec<u64>,
}

/// A tiny least-recently-used cache (a handful of entries, linear search).
#[derive(Debug)]
struct Lru<K, V> {
    items: Vec<(K, V)>,
    cap: usize,
}

impl<K: PartialEq + Copy, V: Clone> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Lru {
            items: Vec::new(),
            cap,
        }
    }

    fn get(&mut self, k: K) -> Option<V> {
        let i = self.items.iter().position(|(key, _)| *key == k)?;
        let item = self.items.remove(i);
        let v = item.1.clone();
        self.items.push(item);
        Some(v)
    }

    fn put(&mut self, k: K, v: V) {
        if self.items.iter().any(|(key, _)| *key == k) {
            return;
        }
        if self.items.len() == self.cap {
            self.items.remove(0);
        }
        self.items.push((k, v));
    }
}

/// Within-group window permutations, keyed by (epoch, group).
type PermCache = Lru<(u64, usize), Arc<Vec<u32>>>;

/// Maps (epoch, sequence position) to (group, window). Shared by the loader's workers; caches
/// the few epoch orders and within-group permutations in use.
#[derive(Debug)]
pub(crate) struct Planner {
    windows: Vec<u64>,
    total: u64,
    seed: u64,
    shuffle: bool,
    orders: Mutex<Lru<u64, Arc<EpochOrder>>>,
    perms: Mutex<PermCache>,
}

const GROUP_ORDER_STREAM: u64 = 0x6772_6f75_7073; // "groups"

impl Planner {
    pub(crate) fn new(windows: &[u64], seed: u64, shuffle: bool, cache: usize) -> Result<Self> {
        if let Some(&w) = windows.iter().find(|&&w| w > u32::MAX as u64) {
            return Err(DataError::Config(format!(
                "a group of {w} windows is larger than the loader's limit of 2^32"
            )));
        }
        Ok(Planner {
            windows: windows.to_vec(),
            total: windows.iter().sum(),
            seed,
            shuffle,
            orders: Mutex::new(Lru::new(4)),
            perms: Mutex::new(Lru::new(cache.max(4))),
        })
    }

    /// Windows in one epoch.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    fn order(&self, epoch: u64) -> Arc<EpochOrder> {
        if let Some(o) = self.orders.lock().ok().and_then(|mut c| c.get(epoch)) {
            return o;
        }
        let mut groups: Vec<usize> = (0..self.windows.len()).collect();
        if self.shuffle {
            Rng::new(mix64(mix64(self.seed, epoch), GROUP_ORDER_STREAM)).shuffle(&mut groups);
        }
        let mut acc = 0;
        let ends = groups
            .iter()
            .map(|&g| {
                acc += self.windows[g];
                acc
            })
            .collect();
        let o = Arc::new(EpochOrder { groups, ends });
        if let Ok(mut c) = self.orders.lock() {
            c.put(epoch, o.clone());
        }
        o
    }

    fn perm(&self, epoch: u64, group: usize) -> Arc<Vec<u32>> {
        if let Some(p) = self
            .perms
            .lock()
            .ok()
            .and_then(|mut c| c.get((epoch, group)))
        {
            return p;
        }
        // Built outside the lock so other workers are not held up; two workers racing on the
        // same group compute the same permutation.
        let mut p: Vec<u32> = (0..self.windows[group] as u32).collect();
        Rng::new(mix64(mix64(self.seed, epoch), group as u64 + 1)).shuffle(&mut p);
        let p = Arc::new(p);
        if let Ok(mut c) = self.perms.lock() {
            c.put((epoch, group), p.clone());
        }
        p
    }

    /// The (group, window) at sequence position `pos < total()` of `epoch`.
    pub(crate) fn locate(&self, epoch: u64, pos: u64) -> (usize, u64) {
        let order = self.order(epoch);
        let k = order.ends.partition_point(|&e| e <= pos);
        let group = order.groups[k];
        let within = pos - if k == 0 { 0 } else { order.ends[k - 1] };
        if !self.shuffle {
            return (group, within);
        }
        (group, self.perm(epoch, group)[within as usize] as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_window_once_per_epoch_and_orders_differ() {
        let windows = [5u64, 0, 17, 3, 9];
        let p = Planner::new(&windows, 42, true, 4).unwrap();
        let mut seqs = Vec::new();
        for epoch in 0..3 {
            let seq: Vec<(usize, u64)> = (0..p.total()).map(|i| p.locate(epoch, i)).collect();
            let mut sorted = seq.clone();
            sorted.sort();
            let mut want = Vec::new();
            for (g, &w) in windows.iter().enumerate() {
                want.extend((0..w).map(|i| (g, i)));
            }
            assert_eq!(sorted, want);
            seqs.push(seq);
        }
        assert_ne!(seqs[0], seqs[1]);
        assert_ne!(seqs[1], seqs[2]);
        // Same (seed, epoch), same order, from a fresh planner.
        let q = Planner::new(&windows, 42, true, 4).unwrap();
        assert_eq!(
            (0..q.total()).map(|i| q.locate(1, i)).collect::<Vec<_>>(),
            seqs[1]
        );
        // Without shuffling: storage order.
        let s = Planner::new(&windows, 42, false, 4).unwrap();
        assert_eq!(s.locate(7, 0), (0, 0));
        assert_eq!(s.locate(7, 5), (2, 0));
        assert_eq!(s.locate(7, 33), (4, 8));
    }
}
