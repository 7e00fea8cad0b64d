//! Memory instructions: global, shared, param and generic `ld`/`st`, `cp.async` and
//! `ldmatrix`, with the sanitizer's checks and the memory counters.

use super::block::{Block, Flow, PendingCopy};
use super::smem::{ASYNC_TID, Hazard, bank_conflicts};
use super::{PARAM_WINDOW, SHARED_WINDOW, WINDOW_BYTES};
use crate::error::{ErrorKind, SimError};
use crate::ir::*;

type R<T> = Result<T, SimError>;

/// Per-lane bytes moved by one access (up to 16).
pub(crate) type Bytes = [[u8; 16]; 32];

/// Element `size` bytes (1, 2, 4 or 8) at byte `o` of a lane's data, little-endian.
#[inline(always)]
fn get_elem(d: &[u8; 16], o: usize, size: u32) -> u64 {
    let mut b = [0u8; 8];
    match size {
        1 => b[0] = d[o],
        2 => b[..2].copy_from_slice(&d[o..o + 2]),
        4 => b[..4].copy_from_slice(&d[o..o + 4]),
        _ => b.copy_from_slice(&d[o..o + 8]),
    }
    u64::from_le_bytes(b)
}

#[inline(always)]
fn put_elem(d: &mut [u8; 16], o: usize, size: u32, v: u64) {
    let b = v.to_le_bytes();
    match size {
        1 => d[o] = b[0],
        2 => d[o..o + 2].copy_from_slice(&b[..2]),
        4 => d[o..o + 4].copy_from_slice(&b[..4]),
        _ => d[o..o + 8].copy_from_slice(&b),
    }
}

/// Copies `len` (1, 2, 4, 8 or 16) bytes with fixed-size moves.
#[inline(always)]
fn copy_n(dst: &mut [u8], src: &[u8], len: usize) {
    match len {
        1 => dst[0] = src[0],
        2 => dst[..2].copy_from_slice(&src[..2]),
        4 => dst[..4].copy_from_slice(&src[..4]),
        8 => dst[..8].copy_from_slice(&src[..8]),
        16 => dst[..16].copy_from_slice(&src[..16]),
        n => dst[..n].copy_from_slice(&src[..n]),
    }
}

/// Whether `a` is a multiple of `n` (a mask for the usual power of two, not a division).
#[inline(always)]
fn aligned(a: u64, n: u32) -> bool {
    if n.is_power_of_two() {
        a & (n as u64 - 1) == 0
    } else {
        a.is_multiple_of(n as u64)
    }
}

fn lanes(m: u32) -> impl Iterator<Item = u32> {
    let mut m = m;
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let l = m.trailing_zeros();
            m &= m - 1;
            Some(l)
        }
    })
}

impl<'a> Block<'a> {
    /// Per-lane addresses of an address operand.
    pub(crate) fn addrs(&self, wi: usize, a: &Addr) -> [u64; 32] {
        let off = a.offset as u64;
        match a.base {
            Some(b) => {
                let r = self.warps[wi].lanes(b);
                let mut o = [0u64; 32];
                for l in 0..32 {
                    o[l] = r[l].wrapping_add(off);
                }
                o
            }
            None => [off; 32],
        }
    }

    /// Checks one lane's global access of `len` bytes at `a` (alignment, allocation bounds,
    /// regions, writability) and returns its allocation and offset.
    pub(crate) fn locate(
        &self,
        wi: usize,
        l: u32,
        a: u64,
        len: u32,
        write: bool,
    ) -> R<(&'a crate::memory::Allocation, u64)> {
        let mem: &'a crate::memory::Snapshot = &self.l.mem;
        let what = if write { "store" } else { "load" };
        if !aligned(a, len) {
            return Err(self.fault(
                wi,
                l,
                ErrorKind::Misaligned,
                format!("global {what} of {len} bytes at {a:#x} is not {len}-byte aligned"),
                Some(a),
            ));
        }
        let Some(al) = mem.find(a) else {
            return Err(self.fault(
                wi,
                l,
                ErrorKind::OutOfBounds,
                format!("global {what} of {len} bytes at {a:#x} is outside every live allocation"),
                Some(a),
            ));
        };
        let off = a - al.base;
        if off + len as u64 > al.len {
            return Err(self.fault(
                wi,
                l,
                ErrorKind::OutOfBounds,
                format!(
                    "global {what} of {len} bytes at {a:#x} runs past the end of the {}-byte allocation at {:#x}",
                    al.len, al.base
                ),
                Some(a),
            ));
        }
        if !self.l.regions.is_empty() {
            // A buffer may be passed twice (read-only and writable, e.g. in place): a store
            // is allowed when any region holding it is writable.
            let holds = |r: &&crate::Region| {
                a >= r.addr && a + len as u64 <= r.addr.saturating_add(r.bytes)
            };
            let mut inside = self.l.regions.iter().filter(holds);
            let r = if write {
                let first = inside.clone().next();
                inside.find(|r| r.writable).or(first)
            } else {
                inside.next()
            };
            match r {
                None => {
                    return Err(self.fault(
                        wi,
                        l,
                        ErrorKind::OutOfBounds,
                        format!("global {what} of {len} bytes at {a:#x} is outside every region of the launch"),
                        Some(a),
                    ))
                }
                Some(r) if write && !r.writable => {
                    return Err(self.fault(
                        wi,
                        l,
                        ErrorKind::ReadOnly,
                        format!("global store at {a:#x} into the read-only region at {:#x}", r.addr),
                        Some(a),
                    ))
                }
                _ => {}
            }
        }
        Ok((al, off))
    }

    /// Checks and performs a global access of `len` bytes per lane; loads fill `data`.
    pub(crate) fn global(
        &mut self,
        wi: usize,
        exec: u32,
        addrs: &[u64; 32],
        len: u32,
        write: bool,
        data: &mut Bytes,
    ) -> R<()> {
        let mut sectors = [0u64; 32];
        let mut ns = 0;
        // Fast path: every lane aligned and inside one allocation (and one region): the
        // checks run once per warp instruction instead of once per lane.
        let (mut lo, mut hi, mut or) = (u64::MAX, 0u64, 0u64);
        let mut contiguous = exec == u32::MAX;
        for l in lanes(exec) {
            let a = addrs[l as usize];
            lo = lo.min(a);
            hi = hi.max(a);
            or |= a;
            contiguous &= a == addrs[0].wrapping_add(l as u64 * len as u64);
        }
        let end = hi.saturating_add(len as u64);
        let whole: Option<&'a crate::memory::Allocation> = if or & (len as u64 - 1) == 0 {
            let mem: &'a crate::memory::Snapshot = &self.l.mem;
            mem.find(lo)
                .map(|a| &**a)
                .filter(|al| end <= al.base + al.len)
                .filter(|_| {
                    self.l.regions.is_empty()
                        || self.l.regions.iter().any(|r| {
                            lo >= r.addr
                                && end <= r.addr.saturating_add(r.bytes)
                                && (r.writable || !write)
                        })
                })
        } else {
            None
        };
        for l in lanes(exec) {
            let a = addrs[l as usize];
            let (al, off) = match whole {
                Some(al) => (al, a - al.base),
                None => self.locate(wi, l, a, len, write)?,
            };
            let d = &mut data[l as usize];
            if write {
                let mut v = [0u32; 4];
                for (i, w) in v.iter_mut().enumerate() {
                    *w = u32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]);
                }
                al.store(off, len, &v);
            } else {
                let mut v = [0u32; 4];
                if !al.load(off, len, &mut v) {
                    return Err(self.fault(
                        wi,
                        l,
                        ErrorKind::Uninitialized,
                        format!("global load of {len} bytes at {a:#x} reads memory never written"),
                        Some(a),
                    ));
                }
                for (i, w) in v.iter().enumerate() {
                    d[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                }
            }
            sectors[ns] = a >> 5;
            ns += 1;
        }
        let distinct = if contiguous {
            ((end - 1) >> 5) - (lo >> 5) + 1
        } else {
            let s = &mut sectors[..ns];
            s.sort_unstable();
            let mut distinct = 0u64;
            for i in 0..s.len() {
                if i == 0 || s[i] != s[i - 1] {
                    distinct += 1;
                }
            }
            distinct
        };
        let bytes = ns as u64 * len as u64;
        if write {
            self.c.global_store_requests += 1;
            self.c.global_store_sectors += distinct;
            self.c.global_store_bytes += bytes;
        } else {
            self.c.global_load_requests += 1;
            self.c.global_load_sectors += distinct;
            self.c.global_load_bytes += bytes;
        }
        Ok(())
    }

    /// Checks a shared access of `len` bytes per lane at shared offsets `offs` (bounds,
    /// alignment, uninitialised reads, races, pending `cp.async`) and records it. `data`: a
    /// store's bytes, so that stores leaving memory unchanged are exempt from race checks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn shared_check(
        &mut self,
        wi: usize,
        exec: u32,
        offs: &[u64; 32],
        len: u32,
        align: u32,
        write: bool,
        data: Option<&Bytes>,
    ) -> R<()> {
        let size = self.smem.len() as u64;
        let what = if write { "store" } else { "load" };
        // Lanes whose store leaves written bytes unchanged (no one can observe it).
        let mut silent = 0u32;
        for l in lanes(exec) {
            let a = offs[l as usize];
            if a.checked_add(len as u64).is_none_or(|e| e > size) {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::OutOfBounds,
                    format!("shared {what} of {len} bytes at shared offset {a:#x} is outside the block's {size} bytes of shared memory"),
                    Some(a),
                ));
            }
            if !aligned(a, align) {
                return Err(self.fault(
                    wi,
                    l,
                    ErrorKind::Misaligned,
                    format!(
                        "shared {what} of {len} bytes at offset {a:#x} is not {align}-byte aligned"
                    ),
                    Some(a),
                ));
            }
            let unchanged = |d: &Bytes| {
                self.smem
                    .unchanged(a as usize, &d[l as usize][..len as usize])
            };
            if data.is_some_and(unchanged) {
                silent |= 1 << l;
                continue;
            }
            let tid = (wi * 32 + l as usize) as u16;
            if let Some((h, b)) =
                self.smem
                    .check(&self.clocks, a as usize, len as usize, tid, wi, write)
            {
                let (kind, msg) = match h {
                    Hazard::Uninit => (
                        ErrorKind::Uninitialized,
                        format!("shared load reads byte {b:#x}, which no thread wrote"),
                    ),
                    Hazard::Pending => (
                        ErrorKind::SharedRace,
                        format!(
                            "shared {what} touches byte {b:#x} while a cp.async into it is outstanding (no cp.async.wait before it)"
                        ),
                    ),
                    Hazard::Race { tid: t, write: ww } if t == ASYNC_TID => (
                        ErrorKind::AsyncProxy,
                        format!(
                            "shared {what} of byte {b:#x}, written by an async (TMA) copy, before waiting on its mbarrier ({})",
                            if ww { "write" } else { "read" }
                        ),
                    ),
                    Hazard::Race { tid: t, write: ww } => (
                        ErrorKind::SharedRace,
                        format!(
                            "shared {what} of byte {b:#x} races with a {} by thread {t} (warp {}): no barrier orders them",
                            if ww { "write" } else { "read" },
                            t / 32
                        ),
                    ),
                };
                return Err(self.fault(wi, l, kind, msg, Some(b as u64)));
            }
        }
        let epoch = self.clocks.own(wi);
        for l in lanes(exec & !silent) {
            let tid = (wi * 32 + l as usize) as u16;
            let off = offs[l as usize] as usize;
            if write {
                self.smem.record(off, len as usize, tid, epoch, true);
                let fences = self.proxy_fences[wi];
                self.smem.mark_generic(off, len as usize, Some(wi), fences);
            } else {
                self.smem
                    .record_read(&self.clocks, off, len as usize, tid, wi);
            }
        }
        if write {
            self.c.shared_store_requests += 1;
        } else {
            self.c.shared_load_requests += 1;
        }
        self.c.shared_bank_conflicts += bank_conflicts(exec, offs, len);
        Ok(())
    }

    fn param(&self, wi: usize, exec: u32, addrs: &[u64; 32], len: u32, data: &mut Bytes) -> R<()> {
        let p = &self.l.params;
        for l in lanes(exec) {
            let a = addrs[l as usize];
            if a.checked_add(len as u64).is_none_or(|e| e > p.len() as u64) {
                return Err(self.fault(wi, l, ErrorKind::OutOfBounds, format!("param load of {len} bytes at offset {a:#x} is outside the {} parameter bytes", p.len()), Some(a)));
            }
            let a = a as usize;
            copy_n(&mut data[l as usize], &p[a..], len as usize);
        }
        Ok(())
    }

    pub(crate) fn ld_st(&mut self, wi: usize, op: &Op, exec: u32) -> R<Flow> {
        let (space, size, addr, n) = match op {
            Op::Ld {
                space,
                size,
                ds,
                addr,
                ..
            } => (*space, *size as u32, addr, ds.len() as u32),
            Op::St {
                space,
                size,
                vals,
                addr,
            } => (*space, *size as u32, addr, vals.len() as u32),
            _ => return Ok(Flow::Next),
        };
        let len = size * n;
        let write = matches!(op, Op::St { .. });
        let mut data: Bytes = [[0u8; 16]; 32];
        if let Op::St { vals, .. } = op {
            for (i, v) in vals.iter().enumerate() {
                let v = self.warps[wi].get(*v);
                for l in lanes(exec) {
                    put_elem(
                        &mut data[l as usize],
                        i * size as usize,
                        size,
                        v[l as usize],
                    );
                }
            }
        }
        let mut addrs = self.addrs(wi, addr);
        // Split generic addresses by window.
        let (mut g, mut s, mut p) = (0u32, 0u32, 0u32);
        match space {
            Space::Global => g = exec,
            Space::Shared => s = exec,
            Space::Param => p = exec,
            Space::Generic => {
                for l in lanes(exec) {
                    let a = &mut addrs[l as usize];
                    if a.wrapping_sub(SHARED_WINDOW) < WINDOW_BYTES {
                        *a -= SHARED_WINDOW;
                        s |= 1 << l;
                    } else if a.wrapping_sub(PARAM_WINDOW) < WINDOW_BYTES {
                        *a -= PARAM_WINDOW;
                        p |= 1 << l;
                    } else {
                        g |= 1 << l;
                    }
                }
            }
        }
        if g != 0 {
            self.global(wi, g, &addrs, len, write, &mut data)?;
        }
        if s != 0 {
            self.shared_check(wi, s, &addrs, len, len, write, write.then_some(&data))?;
            let sm = &mut self.smem.data;
            for l in lanes(s) {
                let a = addrs[l as usize] as usize;
                if write {
                    copy_n(&mut sm[a..], &data[l as usize], len as usize);
                } else {
                    copy_n(&mut data[l as usize], &sm[a..], len as usize);
                }
            }
        }
        if p != 0 {
            if write {
                return Err(self.fault(
                    wi,
                    p.trailing_zeros(),
                    ErrorKind::ReadOnly,
                    "store to kernel parameter memory".into(),
                    Some(addrs[p.trailing_zeros() as usize]),
                ));
            }
            self.param(wi, p, &addrs, len, &mut data)?;
        }
        if let Op::Ld { signed, ds, .. } = op {
            let k = self.l.k;
            let w = &mut self.warps[wi];
            for (i, d) in ds.iter().enumerate() {
                let Some(d) = d else { continue };
                let db = k.slot_bits[*d as usize] as u32;
                let eb = size * 8;
                let mut r = [0u64; 32];
                let dm = super::alu::mask_of(db);
                let sext = *signed && db > eb;
                for l in lanes(exec) {
                    let v = get_elem(&data[l as usize], i * size as usize, size);
                    r[l as usize] = if sext {
                        (super::alu::sx(v, eb) as u64) & dm
                    } else {
                        v & dm
                    };
                }
                w.put(*d, &r, exec);
            }
        }
        Ok(Flow::Next)
    }

    pub(crate) fn async_or_matrix(&mut self, wi: usize, op: &Op, exec: u32) -> R<Flow> {
        match op {
            Op::CpAsync {
                dst,
                src,
                size,
                src_size,
            } => {
                let size = *size as u32;
                let da = self.addrs(wi, dst);
                let sa = self.addrs(wi, src);
                let ss = src_size.map(|s| self.warps[wi].get(s));
                // Source bytes actually read per lane (the rest of the copy is zero filled).
                let mut data: Bytes = [[0u8; 16]; 32];
                let mut rmask = 0u32;
                for l in lanes(exec) {
                    let n = ss
                        .as_ref()
                        .map_or(size as u64, |v| v[l as usize] & 0xffff_ffff);
                    if n > size as u64 {
                        return Err(self.fault(
                            wi,
                            l,
                            ErrorKind::BadLaunch,
                            format!("cp.async source size {n} exceeds the copy size {size}"),
                            None,
                        ));
                    }
                    // Partial sources are read byte by byte below.
                    if n == size as u64 {
                        rmask |= 1 << l;
                    }
                }
                if rmask != 0 {
                    self.global(wi, rmask, &sa, size, false, &mut data)?;
                }
                for l in lanes(exec & !rmask) {
                    let n = ss.as_ref().map_or(0, |v| v[l as usize] & 0xffff_ffff) as u32;
                    for i in 0..n {
                        let mut one: Bytes = [[0u8; 16]; 32];
                        let mut a1 = [0u64; 32];
                        a1[l as usize] = sa[l as usize].wrapping_add(i as u64);
                        self.global(wi, 1 << l, &a1, 1, false, &mut one)?;
                        data[l as usize][i as usize] = one[l as usize][0];
                    }
                }
                // Destination: checked now, written at the wait.
                let size_u = self.smem.len() as u64;
                for l in lanes(exec) {
                    let a = da[l as usize];
                    if a.checked_add(size as u64).is_none_or(|e| e > size_u) {
                        return Err(self.fault(wi, l, ErrorKind::OutOfBounds, format!("cp.async destination at shared offset {a:#x} is outside the block's {size_u} bytes"), Some(a)));
                    }
                    if !aligned(a, size) {
                        return Err(self.fault(wi, l, ErrorKind::Misaligned, format!("cp.async destination at shared offset {a:#x} is not {size}-byte aligned"), Some(a)));
                    }
                }
                let w = &mut self.warps[wi];
                for l in lanes(exec) {
                    w.cp.push(PendingCopy {
                        lane: l as u8,
                        group: w.cp_committed[l as usize],
                        dst: da[l as usize] as u32,
                        len: size as u8,
                        data: data[l as usize],
                    });
                    self.smem
                        .set_pending(da[l as usize] as usize, size as usize, true);
                }
                self.c.cp_async_bytes += (exec.count_ones() * size) as u64;
            }
            Op::CpAsyncCommit => {
                let w = &mut self.warps[wi];
                for l in lanes(exec) {
                    w.cp_committed[l as usize] += 1;
                }
            }
            Op::CpAsyncWait { n, all } => {
                let w = &mut self.warps[wi];
                let complete = |c: &PendingCopy| {
                    let l = c.lane as u32;
                    exec >> l & 1 != 0 && (*all || c.group + *n < w.cp_committed[l as usize])
                };
                // Completed copies in issue order; the others stay pending in order.
                let done: Vec<PendingCopy> = if w.cp.iter().all(complete) {
                    std::mem::take(&mut w.cp)
                } else {
                    let (done, keep) = std::mem::take(&mut w.cp).into_iter().partition(complete);
                    w.cp = keep;
                    done
                };
                for c in done {
                    self.smem.set_pending(c.dst as usize, c.len as usize, false);
                    let mut offs = [0u64; 32];
                    offs[c.lane as usize] = c.dst as u64;
                    self.shared_check(
                        wi,
                        1 << c.lane,
                        &offs,
                        c.len as u32,
                        c.len as u32,
                        true,
                        None,
                    )?;
                    self.c.shared_store_requests -= 1;
                    let d = c.dst as usize;
                    self.smem.data[d..d + c.len as usize]
                        .copy_from_slice(&c.data[..c.len as usize]);
                }
            }
            Op::Ldmatrix {
                num,
                trans,
                ds,
                addr,
            } => {
                let rows = 8 * *num as u32;
                let rmask = if rows == 32 {
                    u32::MAX
                } else {
                    (1u32 << rows) - 1
                };
                let offs = self.addrs(wi, addr);
                self.shared_check(wi, rmask, &offs, 16, 16, false, None)?;
                let sm = &self.smem.data;
                // m[j][r][c]: matrix j, row r, column c (b16 elements).
                let mut m = [[[0u16; 8]; 8]; 4];
                for j in 0..*num as usize {
                    for r in 0..8 {
                        let a = offs[j * 8 + r] as usize;
                        let row: &[u8; 16] = sm[a..a + 16].try_into().expect("16-byte row");
                        for (c, e) in m[j][r].iter_mut().enumerate() {
                            *e = u16::from_le_bytes([row[2 * c], row[2 * c + 1]]);
                        }
                    }
                }
                let w = &mut self.warps[wi];
                for (j, d) in ds.iter().enumerate() {
                    let mut v = [0u64; 32];
                    for (t, x) in v.iter_mut().enumerate() {
                        let (r, c) = (t / 4, 2 * (t % 4));
                        let (lo, hi) = if *trans {
                            (m[j][c][r], m[j][c + 1][r])
                        } else {
                            (m[j][r][c], m[j][r][c + 1])
                        };
                        *x = lo as u64 | (hi as u64) << 16;
                    }
                    w.put(*d, &v, exec);
                }
            }
            _ => {}
        }
        Ok(Flow::Next)
    }
}
