//! The collectives of a data-parallel step, over [`HostComm`]'s host buffers.
//!
//! Every function here is a collective: all ranks of the group call it in the same order with
//! matching lengths. Reductions fold the ranks in rank order (see `lathe_host::comm`), so the
//! results are identical run to run.

use lathe_host::comm::{CommElement, CommError, Communicator, HostComm, ReduceOp, shard_range};
use std::ops::Range;

/// Gradient bucket size: 25 MiB, PyTorch DDP's `bucket_cap_mb` default.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The buckets of a flat buffer of `len` elements, `bucket_elems` each (the first one shorter
/// when `len` is not a multiple), listed last slice first: backward finishes the last
/// parameters first, so that is the order an overlapped reduction would launch them in.
/// `bucket_elems == 0` is treated as one bucket holding everything.
pub fn bucket_ranges(len: usize, bucket_elems: usize) -> Vec<Range<usize>> {
    let size = if bucket_elems == 0 {
        len.max(1)
    } else {
        bucket_elems
    };
    let mut out = Vec::with_capacity(len.div_ceil(size));
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(size);
        out.push(start..end);
        end = start;
    }
    out
}

/// Averages `grads` over the ranks in place, one all-reduce per bucket of
/// [`bucket_ranges`]`(grads.len(), bucket_elems)`. Returns the number of buckets. Elementwise
/// the result does not depend on the bucket size (each element is reduced over the ranks in
/// rank order whatever slice it travels in).
pub fn all_reduce_buckets(
    comm: &HostComm,
    grads: &mut [f32],
    bucket_elems: usize,
) -> Result<usize, CommError> {
    let buckets = bucket_ranges(grads.len(), bucket_elems);
    for r in &buckets {
        comm.all_reduce(&mut grads[r.clone()], ReduceOp::Avg)?;
    }
    Ok(buckets.len())
}

/// Whether `local` is true on any rank (an all-reduce `Max` of one flag).
pub fn any_rank(comm: &HostComm, local: bool) -> Result<bool, CommError> {
    let mut flag = [if local { 1.0f32 } else { 0.0 }];
    comm.all_reduce(&mut flag, ReduceOp::Max)?;
    Ok(flag[0] != 0.0)
}

/// The sum over ranks of `local`, added in rank order: each rank places its value in its own
/// slot of a `world`-long vector, the vector is all-reduced (a slot's other contributions are
/// zeros, so the slots arrive exact), and the slots are summed in order. With one rank the
/// result is `local` itself, bit for bit.
pub fn sum_over_ranks(comm: &HostComm, local: f64) -> Result<f64, CommError> {
    let mut slots = vec![0.0f64; comm.world_size()];
    slots[comm.rank()] = local;
    comm.all_reduce(&mut slots, ReduceOp::Sum)?;
    Ok(slots.iter().sum())
}

/// The mean over ranks of `local` (an all-reduce `Avg` of one value).
pub fn mean_over_ranks(comm: &HostComm, local: f64) -> Result<f64, CommError> {
    let mut v = [local];
    comm.all_reduce(&mut v, ReduceOp::Avg)?;
    Ok(v[0])
}

/// Assembles a flat buffer of `len` elements whose shard `shard_range(len, world, r)` rank `r`
/// holds (`shard`), on rank `root` only: `Some(full)` there, `None` elsewhere.
///
/// Built from one broadcast per rank, so the other ranks need only a shard-sized receive
/// buffer (an all-gather would give every rank a full-size copy). Meant for rare events —
/// checkpoints and evaluation — not for every step.
pub fn gather_to_root<T: CommElement>(
    comm: &HostComm,
    shard: &[T],
    len: usize,
    root: usize,
) -> Result<Option<Vec<T>>, CommError> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let mine = shard_range(len, world, rank);
    if shard.len() != mine.len() {
        return Err(CommError::InvalidArgument {
            rank,
            op: "gather_to_root".into(),
            detail: format!(
                "shard has {} elements, but rank {rank}'s shard of {len} is {mine:?}",
                shard.len()
            ),
        });
    }
    let mut out = (rank == root).then(|| vec![T::default(); len]);
    for r in 0..world {
        let range = shard_range(len, world, r);
        let mut buf = if r == rank {
            shard.to_vec()
        } else {
            vec![T::default(); range.len()]
        };
        comm.broadcast(&mut buf, r)?;
        if let Some(full) = out.as_mut() {
            full[range].copy_from_slice(&buf);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_host::comm::LocalGroup;

    fn on_ranks<R: Send>(world: usize, f: impl Fn(HostComm) -> R + Sync) -> Vec<R> {
        let comms: Vec<HostComm> = LocalGroup::new(world).into_iter().map(Into::into).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn buckets_tile_the_buffer_last_first() {
        assert_eq!(bucket_ranges(10, 4), vec![6..10, 2..6, 0..2]);
        assert_eq!(bucket_ranges(8, 4), vec![4..8, 0..4]);
        assert_eq!(bucket_ranges(3, 0), vec![0..3]);
        assert!(bucket_ranges(0, 4).is_empty());
    }

    #[test]
    fn bucketed_all_reduce_equals_one_all_reduce() {
        let n = 1001;
        let data = |r: usize| -> Vec<f32> {
            lathe_kernels::rng::Rng::new(r as u64 + 1).vec_f32(n, -1.0, 1.0)
        };
        let whole = on_ranks(3, |c| {
            let mut g = data(c.rank());
            c.all_reduce(&mut g, ReduceOp::Avg).unwrap();
            g
        });
        let bucketed = on_ranks(3, |c| {
            let mut g = data(c.rank());
            let k = all_reduce_buckets(&c, &mut g, 100).unwrap();
            (k, g)
        });
        for ((k, g), w) in bucketed.iter().zip(&whole) {
            assert_eq!(*k, 11);
            assert_eq!(
                g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn small_collectives_agree_on_every_rank() {
        let out = on_ranks(3, |c| {
            let r = c.rank();
            (
                any_rank(&c, r == 2).unwrap(),
                any_rank(&c, false).unwrap(),
                sum_over_ranks(&c, r as f64 + 0.5).unwrap(),
                mean_over_ranks(&c, r as f64).unwrap(),
            )
        });
        for o in out {
            assert_eq!(o, (true, false, 4.5, 1.0));
        }
    }

    #[test]
    fn gather_to_root_assembles_uneven_shards() {
        let len = 11;
        let full: Vec<f32> = (0..len).map(|i| i as f32 * 1.5).collect();
        let out = on_ranks(4, |c| {
            let r = shard_range(len, 4, c.rank());
            gather_to_root(&c, &full[r], len, 1).unwrap()
        });
        assert_eq!(out[1].as_deref(), Some(&full[..]));
        assert!(out[0].is_none() && out[2].is_none() && out[3].is_none());
    }
}
