//! How a flat buffer is split among ranks.
//!
//! ZeRO gives each rank one contiguous range of the flat parameter, gradient and optimizer-state
//! buffers. Lathe does not pad: a buffer of `len` elements is cut into `world` contiguous ranges
//! whose sizes differ by at most one, the first `len % world` ranks taking one extra element.
//! Every communicator's `reduce_scatter_uneven` and `all_gather_uneven` use exactly these ranges,
//! so a rank's shard is always `&buf[shard_range(buf.len(), world, rank)]`.
//!
//! Code that prefers the padded layout (every shard `padded_shard_len` long, the buffer padded to
//! `world * padded_shard_len` elements) can use the even collectives on the padded buffer instead.

use std::ops::Range;

/// The range of a flat buffer of `len` elements that `rank` owns among `world` ranks.
///
/// Ranges are contiguous, in rank order, cover `0..len` exactly, and their sizes differ by at
/// most one (ranks below `len % world` get `len / world + 1` elements, the others `len / world`).
/// When `len < world` the last ranks get empty ranges. For `world == 0` or `rank >= world` the
/// result is the empty range `len..len` (no rank owns anything there).
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    if world == 0 || rank >= world {
        return len..len;
    }
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

/// Every rank's [`shard_range`], in rank order (empty for `world == 0`).
pub fn shard_ranges(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| shard_range(len, world, r)).collect()
}

/// The shard length of the padded layout: `ceil(len / world)` (0 for `world == 0`).
pub fn padded_shard_len(len: usize, world: usize) -> usize {
    if world == 0 { 0 } else { len.div_ceil(world) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_buffer_and_differ_by_at_most_one() {
        for len in 0..40 {
            for world in 1..7 {
                let ranges = shard_ranges(len, world);
                let mut next = 0;
                for r in &ranges {
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
                let min = ranges.iter().map(|r| r.len()).min().unwrap_or(0);
                let max = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
                assert!(max - min <= 1, "len {len} world {world}: {ranges:?}");
                assert_eq!(max, padded_shard_len(len, world));
            }
        }
        assert_eq!(shard_range(10, 4, 0), 0..3);
        assert_eq!(shard_range(10, 4, 3), 8..10);
        assert_eq!(shard_range(10, 4, 4), 10..10);
        assert_eq!(shard_range(10, 0, 0), 10..10);
    }
}
