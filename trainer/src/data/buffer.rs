//! Host buffers the loader's workers fill.
//!
//! The loader is generic over a [`BufferPool`]: a worker takes a buffer from the pool, writes a
//! batch into it, and the consumer hands it back with [`crate::data::Loader::recycle`] once the
//! batch has been used (for a GPU run: once the host-to-device copy reading it has completed).
//! [`VecPool`] hands out plain `Vec<u32>`s; the GPU runtime can plug in a pool of pinned
//! (page-locked) host buffers so the copy to the device is a true async DMA, without any change
//! to the loader.

use std::sync::Mutex;

use super::error::Result;

/// Storage for one tensor of a batch: a contiguous, mutable run of `u32` token ids.
pub trait TokenStorage: AsRef<[u32]> + AsMut<[u32]> + Send + 'static {}

impl<T: AsRef<[u32]> + AsMut<[u32]> + Send + 'static> TokenStorage for T {}

/// A source of reusable host buffers, shared by all loader workers.
pub trait BufferPool: Send + Sync + 'static {
    /// The buffer type; `as_ref().len()` may exceed what was asked for (a pooled buffer sized
    /// for the longest batch); the loader only uses the first `len` elements.
    type Storage: TokenStorage;

    /// A buffer of at least `len` elements, contents unspecified. Called from worker threads.
    fn acquire(&self, len: usize) -> Result<Self::Storage>;

    /// Returns a buffer for reuse.
    fn release(&self, storage: Self::Storage);
}

/// A pool of plain heap vectors. Acquired vectors have exactly the requested length; released
/// ones are kept (up to `keep`) and reused.
#[derive(Debug)]
pub struct VecPool {
    free: Mutex<Vec<Vec<u32>>>,
    keep: usize,
}

impl VecPool {
    /// A pool that keeps at most `keep` released vectors.
    pub fn new(keep: usize) -> Self {
        VecPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }
}

impl Default for VecPool {
    /// Keeps up to 64 vectors (enough for the inputs and targets of 32 prefetched batches).
    fn default() -> Self {
        VecPool::new(64)
    }
}

impl BufferPool for VecPool {
    type Storage = Vec<u32>;

    fn acquire(&self, len: usize) -> Result<Vec<u32>> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut v = reused.unwrap_or_default();
        v.resize(len, 0);
        Ok(v)
    }

    fn release(&self, storage: Vec<u32>) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.keep
        {
            free.push(storage);
        }
    }
}
