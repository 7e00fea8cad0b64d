//! Global memory of the simulated device: allocations with a written-bit per byte.
//!
//! Addresses start at [`BASE`] and are 256-byte aligned, like `cuMemAlloc`'s, and are never
//! reused. Each allocation keeps its bytes as 4-byte words and a shadow nibble per word (bit i
//! set = byte i of the word written), so a kernel reading memory nothing wrote is caught.
//!
//! Concurrency: the bytes and shadow bits are relaxed atomics, so blocks running on several host
//! threads share one allocation without locks and without undefined behaviour, even when a buggy
//! kernel races across blocks (the race then gives some interleaving of whole-word writes, never
//! torn Rust state). A launch takes a snapshot of the allocation table ([`Snapshot`]) once; a
//! host `free` during a launch only drops the table entry, the launch keeps its `Arc`.

use crate::error::{ErrorKind, SimError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

/// The first device address handed out (non-zero, so a null pointer is never valid).
pub const BASE: u64 = 0x7f00_0000_0000;
const ALIGN: u64 = 256;

/// One allocation: `len` bytes as little-endian words plus a written-mask nibble per word.
pub(crate) struct Allocation {
    pub(crate) base: u64,
    pub(crate) len: u64,
    words: Box<[AtomicU32]>,
    shadow: Box<[AtomicU8]>,
    wide_lock: Mutex<()>,
}

impl Allocation {
    /// `None` when the host cannot hold it (an error for the caller, never an abort).
    fn new(base: u64, len: u64) -> Option<Allocation> {
        let n = usize::try_from(len.div_ceil(4)).ok()?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).ok()?;
        words.extend((0..n).map(|_| AtomicU32::new(0)));
        let mut shadow = Vec::new();
        shadow.try_reserve_exact(n).ok()?;
        shadow.extend((0..n).map(|_| AtomicU8::new(0)));
        Some(Allocation {
            base,
            len,
            words: words.into_boxed_slice(),
            shadow: shadow.into_boxed_slice(),
            wide_lock: Mutex::new(()),
        })
    }

    /// Reads `n` (1, 2, 4, 8 or 16) bytes at offset `off`, naturally aligned and in bounds
    /// (the caller checked). Returns the value and whether every byte was written.
    #[inline]
    pub(crate) fn load(&self, off: u64, n: u32, out: &mut [u32; 4]) -> bool {
        let w = (off >> 2) as usize;
        if n >= 4 {
            let k = (n / 4) as usize;
            let mut ok = true;
            for (i, o) in out.iter_mut().enumerate().take(k) {
                *o = self.words[w + i].load(Relaxed);
                ok &= self.shadow[w + i].load(Relaxed) == 0xf;
            }
            ok
        } else {
            let sh = ((off & 3) * 8) as u32;
            let mask = if n == 1 { 0xffu32 } else { 0xffff };
            out[0] = (self.words[w].load(Relaxed) >> sh) & mask;
            let bits = if n == 1 { 1u8 } else { 3 } << (off & 3);
            self.shadow[w].load(Relaxed) & bits == bits
        }
    }

    /// Writes `n` (1, 2, 4, 8 or 16) bytes at offset `off` (aligned, in bounds) and marks them.
    #[inline]
    pub(crate) fn store(&self, off: u64, n: u32, vals: &[u32; 4]) {
        let w = (off >> 2) as usize;
        if n >= 4 {
            for (i, v) in vals.iter().enumerate().take((n / 4) as usize) {
                self.words[w + i].store(*v, Relaxed);
                mark(&self.shadow[w + i], 0xf);
            }
        } else {
            let sh = ((off & 3) * 8) as u32;
            let mask = if n == 1 { 0xffu32 } else { 0xffff } << sh;
            let v = (vals[0] << sh) & mask;
            // A sub-word store merges into its word atomically.
            let _ = self.words[w].fetch_update(Relaxed, Relaxed, |old| Some((old & !mask) | v));
            mark(&self.shadow[w], (if n == 1 { 1u8 } else { 3 }) << (off & 3));
        }
    }

    /// Atomically replaces the `n`-byte (4 or 8) value at `off` (aligned, in bounds) with
    /// `f(old)`; returns the old value and whether all its bytes had been written. 8-byte
    /// operations serialise on the allocation's lock (the words are 4-byte atomics).
    pub(crate) fn rmw(&self, off: u64, n: u32, f: impl Fn(u64) -> u64) -> (u64, bool) {
        let w = (off >> 2) as usize;
        if n == 4 {
            let mut old = 0;
            let _ = self.words[w].fetch_update(Relaxed, Relaxed, |o| {
                old = o as u64;
                Some(f(o as u64) as u32)
            });
            let init = self.shadow[w].load(Relaxed) == 0xf;
            mark(&self.shadow[w], 0xf);
            (old, init)
        } else {
            let _g = self.wide_lock.lock().unwrap_or_else(|e| e.into_inner());
            let old =
                self.words[w].load(Relaxed) as u64 | (self.words[w + 1].load(Relaxed) as u64) << 32;
            let new = f(old);
            self.words[w].store(new as u32, Relaxed);
            self.words[w + 1].store((new >> 32) as u32, Relaxed);
            let init =
                self.shadow[w].load(Relaxed) == 0xf && self.shadow[w + 1].load(Relaxed) == 0xf;
            mark(&self.shadow[w], 0xf);
            mark(&self.shadow[w + 1], 0xf);
            (old, init)
        }
    }

    fn get_byte(&self, off: u64) -> (u8, bool) {
        let w = (off >> 2) as usize;
        let sh = (off & 3) as u32;
        let b = (self.words[w].load(Relaxed) >> (sh * 8)) as u8;
        (b, self.shadow[w].load(Relaxed) >> sh & 1 == 1)
    }

    fn set_byte(&self, off: u64, b: u8, written: bool) {
        let w = (off >> 2) as usize;
        let sh = (off & 3) as u32;
        let mask = 0xffu32 << (sh * 8);
        let v = (b as u32) << (sh * 8);
        let _ = self.words[w].fetch_update(Relaxed, Relaxed, |old| Some((old & !mask) | v));
        if written {
            self.shadow[w].fetch_or(1 << sh, Relaxed);
        } else {
            self.shadow[w].fetch_and(!(1 << sh), Relaxed);
        }
    }
}

#[inline]
fn mark(s: &AtomicU8, bits: u8) {
    if s.load(Relaxed) & bits != bits {
        s.fetch_or(bits, Relaxed);
    }
}

pub(crate) struct Memory {
    total: u64,
    state: RwLock<State>,
}

struct State {
    allocs: BTreeMap<u64, Arc<Allocation>>,
    used: u64,
    next: u64,
}

/// The allocation table as one launch sees it, sorted by base address.
pub(crate) struct Snapshot {
    allocs: Vec<Arc<Allocation>>,
}

impl Snapshot {
    /// The allocation holding `addr`, if any.
    #[inline]
    pub(crate) fn find(&self, addr: u64) -> Option<&Arc<Allocation>> {
        let i = self.allocs.partition_point(|a| a.base <= addr);
        let a = self.allocs.get(i.checked_sub(1)?)?;
        (addr - a.base < a.len).then_some(a)
    }
}

fn bad(kind: ErrorKind, msg: String) -> SimError {
    SimError::new(kind, msg)
}

impl Memory {
    pub(crate) fn new(total: u64) -> Self {
        Memory {
            total,
            state: RwLock::new(State {
                allocs: BTreeMap::new(),
                used: 0,
                next: BASE,
            }),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            allocs: self.read_state().allocs.values().cloned().collect(),
        }
    }

    pub(crate) fn alloc(&self, bytes: u64) -> Result<u64, SimError> {
        if bytes == 0 {
            return Err(bad(ErrorKind::BadAddress, "allocation of 0 bytes".into()));
        }
        let mut s = self.write_state();
        let rounded = bytes.checked_next_multiple_of(ALIGN).unwrap_or(u64::MAX);
        if s.used.saturating_add(rounded) > self.total {
            return Err(bad(
                ErrorKind::OutOfMemory,
                format!(
                    "out of memory: {bytes} bytes requested, {} of {} bytes free",
                    self.total - s.used,
                    self.total
                ),
            ));
        }
        let addr = s.next;
        let a = Allocation::new(addr, bytes)
            .ok_or_else(|| bad(ErrorKind::OutOfMemory, format!("{bytes} bytes")))?;
        // Addresses are never reused, so a stale pointer cannot alias a new allocation.
        s.next += rounded + ALIGN;
        s.used += rounded;
        s.allocs.insert(addr, Arc::new(a));
        Ok(addr)
    }

    pub(crate) fn free(&self, addr: u64) -> Result<(), SimError> {
        let mut s = self.write_state();
        match s.allocs.remove(&addr) {
            Some(a) => {
                s.used -= a.len.next_multiple_of(ALIGN);
                Ok(())
            }
            None => Err(bad(
                ErrorKind::BadAddress,
                format!("free of {addr:#x}, which is not the start of a live allocation"),
            )),
        }
    }

    pub(crate) fn info(&self) -> (u64, u64) {
        let s = self.read_state();
        (self.total - s.used, self.total)
    }

    /// The allocation holding `[addr, addr + len)` and the offset of `addr` in it.
    fn find(&self, what: &str, addr: u64, len: u64) -> Result<(Arc<Allocation>, u64), SimError> {
        let s = self.read_state();
        let Some((&base, a)) = s.allocs.range(..=addr).next_back() else {
            return Err(outside(what, addr, len));
        };
        let off = addr - base;
        if off.checked_add(len).is_none_or(|end| end > a.len) {
            return Err(outside(what, addr, len));
        }
        Ok((a.clone(), off))
    }

    pub(crate) fn write(&self, addr: u64, src: &[u8]) -> Result<(), SimError> {
        let (a, o) = self.find("host-to-device copy", addr, src.len() as u64)?;
        put_bytes(&a, o, src.len() as u64, |i| (src[i as usize], true));
        Ok(())
    }

    pub(crate) fn read(&self, addr: u64, dst: &mut [u8]) -> Result<(), SimError> {
        let (a, o) = self.find("device-to-host copy", addr, dst.len() as u64)?;
        let mut i = 0usize;
        while i < dst.len() {
            let off = o + i as u64;
            if off & 3 == 0 && dst.len() - i >= 4 {
                let w = a.words[(off >> 2) as usize].load(Relaxed);
                dst[i..i + 4].copy_from_slice(&w.to_le_bytes());
                i += 4;
            } else {
                dst[i] = a.get_byte(off).0;
                i += 1;
            }
        }
        Ok(())
    }

    pub(crate) fn fill(&self, addr: u64, bytes: u64, value: u8) -> Result<(), SimError> {
        let (a, o) = self.find("memset", addr, bytes)?;
        put_bytes(&a, o, bytes, |_| (value, true));
        Ok(())
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: u64) -> Result<(), SimError> {
        let (sa, so) = self.find("device-to-device copy (source)", src, bytes)?;
        let (da, d) = self.find("device-to-device copy (destination)", dst, bytes)?;
        let staged: Vec<(u8, bool)> = (0..bytes).map(|i| sa.get_byte(so + i)).collect();
        put_bytes(&da, d, bytes, |i| staged[i as usize]);
        Ok(())
    }
}

/// Writes `len` bytes at offset `o`, byte `i` being `f(i)`, whole words at a time where possible.
fn put_bytes(a: &Allocation, o: u64, len: u64, f: impl Fn(u64) -> (u8, bool)) {
    let mut i = 0;
    while i < len {
        let off = o + i;
        if off & 3 == 0 && len - i >= 4 {
            let bytes = [f(i), f(i + 1), f(i + 2), f(i + 3)];
            let w = (off >> 2) as usize;
            let v = u32::from_le_bytes([bytes[0].0, bytes[1].0, bytes[2].0, bytes[3].0]);
            let m = bytes
                .iter()
                .enumerate()
                .fold(0u8, |m, (k, b)| m | (u8::from(b.1) << k));
            a.words[w].store(v, Relaxed);
            a.shadow[w].store(m, Relaxed);
            i += 4;
        } else {
            let (b, wr) = f(i);
            a.set_byte(off, b, wr);
            i += 1;
        }
    }
}

fn outside(what: &str, addr: u64, len: u64) -> SimError {
    bad(
        ErrorKind::BadAddress,
        format!("{what} of {len} bytes at {addr:#x} is outside every live allocation"),
    )
}
