//! Global memory of the simulated device: allocations with a written-bit per byte.
//!
//! Addresses start at [`BASE`] and are 256-byte aligned, like `cuMemAlloc`'s. Each allocation
//! keeps its bytes and a shadow byte per byte (1 = written), so a kernel reading memory nothing
//! wrote is caught.

use crate::error::{ErrorKind, SimError};
use std::collections::BTreeMap;
use std::sync::RwLock;

/// The first device address handed out (non-zero, so a null pointer is never valid).
pub const BASE: u64 = 0x7f00_0000_0000;
const ALIGN: u64 = 256;

pub(crate) struct Allocation {
    pub(crate) data: Vec<u8>,
    pub(crate) written: Vec<u8>,
}

pub(crate) struct Memory {
    total: u64,
    state: RwLock<State>,
}

struct State {
    allocs: BTreeMap<u64, Allocation>,
    used: u64,
    next: u64,
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

    pub(crate) fn alloc(&self, bytes: u64) -> Result<u64, SimError> {
        if bytes == 0 {
            return Err(bad(ErrorKind::BadAddress, "allocation of 0 bytes".into()));
        }
        let mut s = self.write_state();
        let rounded = bytes.next_multiple_of(ALIGN);
        if s.used + rounded > self.total {
            return Err(bad(
                ErrorKind::OutOfMemory,
                format!(
                    "out of memory: {bytes} bytes requested, {} of {} bytes free",
                    self.total - s.used,
                    self.total
                ),
            ));
        }
        let n = usize::try_from(bytes)
            .map_err(|_| bad(ErrorKind::OutOfMemory, format!("{bytes} bytes")))?;
        let addr = s.next;
        // Addresses are never reused, so a stale pointer cannot alias a new allocation.
        s.next += rounded + ALIGN;
        s.used += rounded;
        s.allocs.insert(
            addr,
            Allocation {
                data: vec![0; n],
                written: vec![0; n],
            },
        );
        Ok(addr)
    }

    pub(crate) fn free(&self, addr: u64) -> Result<(), SimError> {
        let mut s = self.write_state();
        match s.allocs.remove(&addr) {
            Some(a) => {
                s.used -= (a.data.len() as u64).next_multiple_of(ALIGN);
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

    /// Runs `f` on the allocation holding `[addr, addr + len)` and the offset of `addr` in it.
    fn with<R>(
        &self,
        what: &str,
        addr: u64,
        len: u64,
        f: impl FnOnce(&mut Allocation, usize) -> R,
    ) -> Result<R, SimError> {
        let mut s = self.write_state();
        let Some((&base, a)) = s.allocs.range_mut(..=addr).next_back() else {
            return Err(outside(what, addr, len));
        };
        let off = addr - base;
        if off + len > a.data.len() as u64 {
            return Err(outside(what, addr, len));
        }
        Ok(f(a, off as usize))
    }

    pub(crate) fn write(&self, addr: u64, src: &[u8]) -> Result<(), SimError> {
        self.with("host-to-device copy", addr, src.len() as u64, |a, o| {
            a.data[o..o + src.len()].copy_from_slice(src);
            a.written[o..o + src.len()].fill(1);
        })
    }

    pub(crate) fn read(&self, addr: u64, dst: &mut [u8]) -> Result<(), SimError> {
        self.with("device-to-host copy", addr, dst.len() as u64, |a, o| {
            dst.copy_from_slice(&a.data[o..o + dst.len()]);
        })
    }

    pub(crate) fn fill(&self, addr: u64, bytes: u64, value: u8) -> Result<(), SimError> {
        self.with("memset", addr, bytes, |a, o| {
            let n = bytes as usize;
            a.data[o..o + n].fill(value);
            a.written[o..o + n].fill(1);
        })
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: u64) -> Result<(), SimError> {
        let mut data = vec![0; bytes as usize];
        let written = self.with("device-to-device copy (source)", src, bytes, |a, o| {
            data.copy_from_slice(&a.data[o..o + bytes as usize]);
            a.written[o..o + bytes as usize].to_vec()
        })?;
        self.with("device-to-device copy (destination)", dst, bytes, |a, o| {
            a.data[o..o + bytes as usize].copy_from_slice(&data);
            a.written[o..o + bytes as usize].copy_from_slice(&written);
        })
    }
}

fn outside(what: &str, addr: u64, len: u64) -> SimError {
    bad(
        ErrorKind::BadAddress,
        format!("{what} of {len} bytes at {addr:#x} is outside every live allocation"),
    )
}
