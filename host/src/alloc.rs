//! The caching allocator: size-class pools, stream-ordered reuse, statistics.
//!
//! Device memory from the driver (`cuMemAlloc`) is slow to get and synchronising to give back,
//! so freed blocks stay in pools and are handed out again, as PyTorch's caching allocator does.
//!
//! - **Size classes.** Requests up to 1 MiB round up to a multiple of 512 B; larger ones round
//!   up to one of four steps per power of two (2^k, 1.25, 1.5, 1.75 x 2^k), so a cached block
//!   wastes at most a quarter of its size and similar requests share a class.
//! - **Stream-ordered reuse.** A block remembers the stream it was allocated on. Freed, it goes
//!   back to that stream's pool and may be handed out at once to the next request *on the same
//!   stream*: the stream runs work in order, so the new owner's kernels start after the old
//!   owner's. A block also used on another stream (`record_stream`) waits until that stream's
//!   work recorded at free time has completed before it is reused.
//! - **Statistics** like `torch.cuda.memory_stats`: allocated (bytes in live blocks, class
//!   sizes), requested (the sizes asked for), reserved (bytes held from the driver), their
//!   peaks, and counts. `reset_peak` restarts the peaks.
//! - **Out of memory.** When the driver says no, every cached free block is released and the
//!   request retried once; then the error states the request, free memory and peak.
//!
//! The pooling logic is written against [`RawMemory`], so it is tested on the CPU with a fake.

use std::collections::HashMap;
use std::sync::Mutex;

/// The memory underneath: the driver on a GPU, a fake in tests.
pub trait RawMemory: Send + Sync {
    /// Allocates `bytes`; `Err(true)` for out-of-memory, `Err(false)` for any other failure.
    fn alloc(&self, bytes: usize) -> Result<u64, RawError>;
    /// Returns a block to the driver.
    ///
    /// # Safety
    /// `ptr` came from `alloc` and no work that uses it is pending.
    unsafe fn free(&self, ptr: u64);
    /// (free, total) bytes of the device.
    fn mem_info(&self) -> (usize, usize);
    /// Waits for all work on the device (before giving cached blocks back).
    fn synchronize(&self);
}

/// Why a raw allocation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawError {
    OutOfMemory,
    Other(String),
}

/// A stream identity for the pools (the raw `CUstream` value; 0 for the legacy default stream).
pub type StreamKey = u64;

/// Something that can tell whether work recorded earlier has finished (a CUDA event).
pub trait Pending: Send {
    fn is_complete(&self) -> bool;
}

const SMALL_LIMIT: usize = 1 << 20;
const SMALL_ROUND: usize = 512;

/// The size class a request of `bytes` is served from.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= SMALL_LIMIT {
        return bytes.next_multiple_of(SMALL_ROUND);
    }
    let pow = usize::BITS - 1 - bytes.leading_zeros(); // 2^pow <= bytes
    let base = 1usize << pow;
    let step = base / 4;
    bytes.next_multiple_of(step)
}

/// Memory statistics, in bytes and counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in blocks handed out and not yet freed (class sizes).
    pub allocated: usize,
    /// Bytes asked for by live allocations (before rounding).
    pub requested: usize,
    /// Bytes held from the driver: live blocks plus cached free ones.
    pub reserved: usize,
    pub peak_allocated: usize,
    pub peak_reserved: usize,
    /// Allocation requests served.
    pub allocations: u64,
    /// Requests served from the cache.
    pub cache_hits: u64,
    /// Blocks obtained from the driver.
    pub driver_allocs: u64,
    /// Blocks given back to the driver.
    pub driver_frees: u64,
    /// Out-of-memory retries (cache flushed, request tried again).
    pub oom_retries: u64,
}

/// A block handed out by the allocator.
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    pub ptr: u64,
    /// Class size: the bytes actually reserved for it.
    pub size: usize,
    /// Bytes asked for.
    pub requested: usize,
    pub stream: StreamKey,
}

struct Waiting {
    ptr: u64,
    size: usize,
    stream: StreamKey,
    events: Vec<Box<dyn Pending>>,
}

#[derive(Default)]
struct Pools {
    /// (stream, class size) -> free block pointers.
    free: HashMap<(StreamKey, usize), Vec<u64>>,
    /// Blocks freed while other streams may still use them.
    waiting: Vec<Waiting>,
    stats: MemoryStats,
}

/// The caching allocator over some raw memory.
pub struct CachingAllocator<M: RawMemory> {
    raw: M,
    pools: Mutex<Pools>,
}

/// The failure of [`CachingAllocator::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    OutOfMemory {
        requested: usize,
        free: usize,
        total: usize,
        stats: MemoryStats,
    },
    Other(String),
}

impl<M: RawMemory> CachingAllocator<M> {
    pub fn new(raw: M) -> Self {
        CachingAllocator {
            raw,
            pools: Mutex::new(Pools::default()),
        }
    }

    pub fn raw(&self) -> &M {
        &self.raw
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pools> {
        // A panic while holding the lock leaves the pools consistent (every update is a few
        // plain assignments), so a poisoned lock is still usable.
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks whose other-stream work has finished go back to their pools.
    fn collect_waiting(pools: &mut Pools) {
        let mut i = 0;
        while i < pools.waiting.len() {
            if pools.waiting[i].events.iter().all(|e| e.is_complete()) {
                let w = pools.waiting.swap_remove(i);
                pools
                    .free
                    .entry((w.stream, w.size))
                    .or_default()
                    .push(w.ptr);
            } else {
                i += 1;
            }
        }
    }

    /// A block of at least `bytes` for use on `stream`.
    pub fn allocate(&self, bytes: usize, stream: StreamKey) -> Result<Block, AllocError> {
        let size = size_class(bytes);
        let mut pools = self.lock();
        if !pools.waiting.is_empty() {
            Self::collect_waiting(&mut pools);
        }
        let hit = pools.free.get_mut(&(stream, size)).and_then(Vec::pop);
        let ptr = match hit {
            Some(p) => {
                pools.stats.cache_hits += 1;
                p
            }
            None => match self.raw.alloc(size) {
                Ok(p) => {
                    pools.stats.driver_allocs += 1;
                    pools.stats.reserved += size;
                    p
                }
                Err(RawError::OutOfMemory) => {
                    // Give every cached block back and try once more.
                    pools.stats.oom_retries += 1;
                    self.release_cached_locked(&mut pools);
                    match self.raw.alloc(size) {
                        Ok(p) => {
                            pools.stats.driver_allocs += 1;
                            pools.stats.reserved += size;
                            p
                        }
                        Err(RawError::OutOfMemory) => {
                            let (free, total) = self.raw.mem_info();
                            return Err(AllocError::OutOfMemory {
                                requested: bytes,
                                free,
                                total,
                                stats: pools.stats,
                            });
                        }
                        Err(RawError::Other(e)) => return Err(AllocError::Other(e)),
                    }
                }
                Err(RawError::Other(e)) => return Err(AllocError::Other(e)),
            },
        };
        let s = &mut pools.stats;
        s.allocations += 1;
        s.allocated += size;
        s.requested += bytes;
        s.peak_allocated = s.peak_allocated.max(s.allocated);
        s.peak_reserved = s.peak_reserved.max(s.reserved);
        Ok(Block {
            ptr,
            size,
            requested: bytes,
            stream,
        })
    }

    /// Returns a block. `other_streams` holds events recorded (at free time) on every other
    /// stream that used the block; the block is reused only after they complete.
    pub fn free(&self, block: Block, other_streams: Vec<Box<dyn Pending>>) {
        let mut pools = self.lock();
        let s = &mut pools.stats;
        s.allocated -= block.size;
        s.requested -= block.requested;
        if other_streams.is_empty() {
            pools
                .free
                .entry((block.stream, block.size))
                .or_default()
                .push(block.ptr);
        } else {
            pools.waiting.push(Waiting {
                ptr: block.ptr,
                size: block.size,
                stream: block.stream,
                events: other_streams,
            });
        }
    }

    fn release_cached_locked(&self, pools: &mut Pools) {
        self.raw.synchronize();
        Self::collect_waiting(pools);
        for ((_, size), ptrs) in pools.free.drain() {
            for p in ptrs {
                // SAFETY: the block is free (in a pool) and the device was synchronised, so no
                // pending work uses it.
                unsafe { self.raw.free(p) };
                pools.stats.reserved -= size;
                pools.stats.driver_frees += 1;
            }
        }
    }

    /// Gives every cached free block back to the driver (like `torch.cuda.empty_cache`).
    pub fn empty_cache(&self) {
        let mut pools = self.lock();
        self.release_cached_locked(&mut pools);
    }

    pub fn stats(&self) -> MemoryStats {
        self.lock().stats
    }

    /// Restarts the peaks from the current values.
    pub fn reset_peak(&self) {
        let mut pools = self.lock();
        let s = &mut pools.stats;
        s.peak_allocated = s.allocated;
        s.peak_reserved = s.reserved;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    /// Fake device memory with a capacity; freeing returns the bytes.
    struct Fake {
        next: AtomicU64,
        live: Mutex<HashMap<u64, usize>>,
        cap: usize,
        frees: AtomicUsize,
    }
    impl Fake {
        fn new(cap: usize) -> Self {
            Fake {
                next: AtomicU64::new(1 << 20),
                live: Mutex::new(HashMap::new()),
                cap,
                frees: AtomicUsize::new(0),
            }
        }
        fn used(&self) -> usize {
            self.live.lock().unwrap().values().sum()
        }
    }
    impl RawMemory for Fake {
        fn alloc(&self, bytes: usize) -> Result<u64, RawError> {
            if self.used() + bytes > self.cap {
                return Err(RawError::OutOfMemory);
            }
            let p = self.next.fetch_add(bytes as u64, Ordering::SeqCst);
            self.live.lock().unwrap().insert(p, bytes);
            Ok(p)
        }
        unsafe fn free(&self, ptr: u64) {
            self.frees.fetch_add(1, Ordering::SeqCst);
            self.live.lock().unwrap().remove(&ptr).expect("double free");
        }
        fn mem_info(&self) -> (usize, usize) {
            (self.cap - self.used(), self.cap)
        }
        fn synchronize(&self) {}
    }

    struct Flag(Arc<AtomicBool>);
    impl Pending for Flag {
        fn is_complete(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn size_classes() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
        assert_eq!(size_class(3 << 20), 3 << 20);
        let big = 100_000_000;
        let c = size_class(big);
        assert!(c >= big && (c as f64) < big as f64 * 1.25, "{c}");
    }

    #[test]
    fn same_stream_reuse_and_statistics() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let b1 = a.allocate(1000, 1).unwrap();
        let p1 = b1.ptr;
        let s = a.stats();
        assert_eq!((s.allocated, s.requested, s.reserved), (1024, 1000, 1024));
        a.free(b1, vec![]);
        assert_eq!(a.stats().allocated, 0);
        assert_eq!(a.stats().reserved, 1024, "freed blocks stay cached");
        // Same class, same stream: the cached block comes back.
        let b2 = a.allocate(900, 1).unwrap();
        assert_eq!(b2.ptr, p1);
        assert_eq!(a.stats().cache_hits, 1);
        // Another stream never gets a block the first may still be using.
        let b3 = a.allocate(900, 2).unwrap();
        assert_ne!(b3.ptr, p1);
        assert_eq!(a.stats().peak_allocated, 2048);
        a.free(b2, vec![]);
        a.reset_peak();
        assert_eq!(a.stats().peak_allocated, 1024);
        a.free(b3, vec![]);
        a.empty_cache();
        let s = a.stats();
        assert_eq!((s.reserved, s.driver_frees), (0, 2));
    }

    #[test]
    fn cross_stream_blocks_wait_for_their_events() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let b = a.allocate(4096, 1).unwrap();
        let p = b.ptr;
        let done = Arc::new(AtomicBool::new(false));
        a.free(b, vec![Box::new(Flag(done.clone()))]);
        let early = a.allocate(4096, 1).unwrap();
        assert_ne!(early.ptr, p, "reused before the other stream finished");
        done.store(true, Ordering::SeqCst);
        let late = a.allocate(4096, 1).unwrap();
        assert_eq!(late.ptr, p);
        a.free(early, vec![]);
        a.free(late, vec![]);
    }

    #[test]
    fn out_of_memory_flushes_the_cache_then_reports() {
        let a = CachingAllocator::new(Fake::new(8 << 20));
        let b = a.allocate(6 << 20, 1).unwrap();
        a.free(b, vec![]);
        // 6 MiB cached + 7 MiB do not fit in 8: the cache is flushed and the retry succeeds.
        let c = a.allocate(7 << 20, 2).unwrap();
        let s = a.stats();
        assert_eq!((s.oom_retries, s.driver_frees), (1, 1));
        assert_eq!(s.reserved, 7 << 20);
        // Now nothing can be freed: a clear out-of-memory report.
        match a.allocate(2 << 20, 2).unwrap_err() {
            AllocError::OutOfMemory {
                requested,
                free,
                total,
                stats,
            } => {
                assert_eq!(requested, 2 << 20);
                assert_eq!((free, total), (1 << 20, 8 << 20));
                assert_eq!(stats.allocated, 7 << 20);
                assert_eq!(stats.peak_allocated, 7 << 20);
            }
            e => panic!("{e:?}"),
        }
        a.free(c, vec![]);
    }
}
