//! Shared memory of one block with its sanitizer state, and the vector clocks that say which
//! accesses are ordered.
//!
//! Ordering: each warp has a clock; a barrier (or an mbarrier arrive/wait pair) merges the
//! views of the warps it synchronises, as vector clocks do. Every shared byte remembers its
//! last write and up to two concurrent reads (thread, and that thread's clock then). An access
//! by thread `t` of warp `w` conflicts with a recorded access by another thread `u` when `u`'s
//! clock at that access is not below what `w` knows of `u`'s warp, i.e. no barrier chain
//! orders them. Two lanes of one warp instruction never conflict (checks run before any lane
//! records). A race between a write and a third concurrent reader can go unseen; the races
//! reported are always real. A store that leaves already written bytes as they are cannot be
//! observed and takes part in no race (many threads setting the same flag).

/// The thread id recorded for bytes written by the async proxy (TMA).
pub(crate) const ASYNC_TID: u16 = 0xffff;

/// The low bits of a generic-store mark: the writing warp's `fence.proxy.async` count (wraps).
pub(crate) const GENERIC_COUNT: u32 = 0x00ff_ffff;

const PRESENT: u64 = 1 << 63;

pub(crate) struct Clocks {
    nwarps: usize,
    /// `known[w * (nwarps + 1) + x]`: the clock of warp `x` (column `nwarps`: the async proxy)
    /// up to which warp `w` is ordered after; `known[w][w]` is `w`'s own clock.
    known: Vec<u32>,
    pub(crate) async_clock: u32,
}

impl Clocks {
    pub(crate) fn new(nwarps: usize) -> Clocks {
        let n = nwarps + 1;
        let mut known = vec![0u32; nwarps * n];
        for w in 0..nwarps {
            known[w * n + w] = 1;
        }
        Clocks {
            nwarps,
            known,
            async_clock: 1,
        }
    }

    #[inline]
    pub(crate) fn own(&self, w: usize) -> u32 {
        self.known[w * (self.nwarps + 1) + w]
    }

    #[inline]
    fn col(&self, tid: u16) -> usize {
        if tid == ASYNC_TID {
            self.nwarps
        } else {
            tid as usize / 32
        }
    }

    /// Whether an access recorded as (`tid`, `epoch`) is ordered before the current point of
    /// thread `me` in warp `w`.
    #[inline]
    fn ordered(&self, rec_tid: u16, rec_epoch: u32, me: u16, w: usize) -> bool {
        rec_tid == me || rec_epoch < self.known[w * (self.nwarps + 1) + self.col(rec_tid)]
    }

    /// A barrier among `parts`: each advances its clock and all learn the merged view.
    pub(crate) fn barrier(&mut self, parts: &[usize]) {
        let n = self.nwarps + 1;
        let mut m = vec![0u32; n];
        for &p in parts {
            self.known[p * n + p] += 1;
            for (x, v) in m.iter_mut().enumerate() {
                *v = (*v).max(self.known[p * n + x]);
            }
        }
        for &p in parts {
            self.known[p * n..p * n + n].copy_from_slice(&m);
        }
    }

    /// A release by warp `w` (mbarrier arrive): returns the view a later acquirer merges.
    pub(crate) fn release(&mut self, w: usize) -> Vec<u32> {
        let n = self.nwarps + 1;
        self.known[w * n + w] += 1;
        self.known[w * n..w * n + n].to_vec()
    }

    /// A release by the async proxy (a TMA copy completing its bytes on an mbarrier).
    pub(crate) fn release_async(&mut self) -> Vec<u32> {
        let mut v = vec![0u32; self.nwarps + 1];
        self.async_clock += 1;
        v[self.nwarps] = self.async_clock;
        v
    }

    /// An acquire by warp `w` of a released view.
    pub(crate) fn acquire(&mut self, w: usize, view: &[u32]) {
        let n = self.nwarps + 1;
        for (x, v) in view.iter().enumerate().take(n) {
            let k = &mut self.known[w * n + x];
            *k = (*k).max(*v);
        }
    }

    pub(crate) fn width(&self) -> usize {
        self.nwarps + 1
    }
}

/// Whether any byte of `p` is non-zero.
#[inline(always)]
fn any_set(p: &[u8]) -> bool {
    match p.len() {
        16 => u128::from_le_bytes(p.try_into().expect("16 bytes")) != 0,
        8 => u64::from_le_bytes(p.try_into().expect("8 bytes")) != 0,
        4 => u32::from_le_bytes(p.try_into().expect("4 bytes")) != 0,
        _ => p.iter().fold(0u8, |a, &x| a | x) != 0,
    }
}

/// What is wrong with a shared access.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hazard {
    Uninit,
    /// Unordered with an access of thread `tid` (`write`: that access was a write).
    Race {
        tid: u16,
        write: bool,
    },
    /// A `cp.async` into these bytes has not been waited for.
    Pending,
}

/// Per-byte access records, kept per 16-byte chunk while every byte of the chunk has the same
/// record (aligned 16-byte accesses touch one summary instead of 16 records); a chunk gets
/// per-byte records when an access covers part of it.
struct Shadow<T = u64> {
    byte: Vec<T>,
    chunk: Vec<T>,
    /// Whether `chunk` holds every byte's record (then `byte` is stale for that chunk).
    uniform: Vec<bool>,
}

impl<T: Copy + PartialEq + Default> Shadow<T> {
    fn new(bytes: usize) -> Shadow<T> {
        let n = bytes.div_ceil(16);
        Shadow {
            byte: vec![T::default(); bytes],
            chunk: vec![T::default(); n],
            uniform: vec![true; n],
        }
    }

    /// The record of byte `b`.
    #[inline(always)]
    fn at(&self, b: usize) -> T {
        let c = b >> 4;
        if self.uniform[c] {
            self.chunk[c]
        } else {
            self.byte[b]
        }
    }

    /// The one record of every byte of `[off, off + len)` when that range lies in a chunk with
    /// one record.
    #[inline(always)]
    fn run(&self, off: usize, len: usize) -> Option<T> {
        let c = off >> 4;
        (len > 0 && (off + len - 1) >> 4 == c && self.uniform[c]).then(|| self.chunk[c])
    }

    /// Gives chunk `c` per-byte records.
    #[inline]
    fn split(&mut self, c: usize) {
        if self.uniform[c] {
            let end = (16 * c + 16).min(self.byte.len());
            self.byte[16 * c..end].fill(self.chunk[c]);
            self.uniform[c] = false;
        }
    }

    #[inline(always)]
    fn set(&mut self, b: usize, v: T) {
        self.split(b >> 4);
        self.byte[b] = v;
    }

    /// Sets the record of every byte of `[off, off + len)`.
    #[inline(always)]
    fn fill(&mut self, off: usize, len: usize, v: T) {
        if len == 16 && off & 15 == 0 && off + 16 <= self.byte.len() {
            self.chunk[off >> 4] = v;
            self.uniform[off >> 4] = true;
            return;
        }
        let end = off + len;
        let mut b = off;
        while b < end {
            let c = b >> 4;
            let ce = (16 * c + 16).min(self.byte.len());
            let e = ce.min(end);
            if b == 16 * c && e == ce {
                self.chunk[c] = v;
                self.uniform[c] = true;
            } else {
                self.split(c);
                self.byte[b..e].fill(v);
            }
            b = e;
        }
    }

    /// Whether every byte of `[off, off + len)` has the same record (`len > 0`).
    #[inline(always)]
    fn same(&self, off: usize, len: usize) -> bool {
        if self.run(off, len).is_some() {
            return true;
        }
        let f = self.at(off);
        (off..off + len).all(|b| self.at(b) == f)
    }
}

pub(crate) struct Smem {
    pub(crate) data: Vec<u8>,
    wr: Shadow,
    rd: Shadow,
    /// An earlier reader concurrent with the one in `rd` (so that a writer that is itself the
    /// latest reader still meets the other one).
    rd2: Shadow,
    pending: Vec<u8>,
    pub(crate) npending: usize,
    /// Per byte, the last generic (ordinary `st.shared`) store not yet made visible to the
    /// async proxy: `(warp + 1) << 24 | that warp's fence.proxy.async count at the store`, or 0
    /// (never stored generically, or last written by the async proxy). wgmma operand reads
    /// require the writer's count to have moved on since: a `fence.proxy.async` after the store.
    generic: Shadow<u32>,
}

impl Smem {
    pub(crate) fn new(bytes: usize) -> Smem {
        Smem {
            data: vec![0; bytes],
            wr: Shadow::new(bytes),
            rd: Shadow::new(bytes),
            rd2: Shadow::new(bytes),
            pending: Vec::new(),
            npending: 0,
            generic: Shadow::new(bytes),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// Checks a read or write of `[off, off + len)` by thread `tid` of warp `w`; returns the
    /// first hazard and the byte it is at.
    #[inline]
    pub(crate) fn check(
        &self,
        cl: &Clocks,
        off: usize,
        len: usize,
        tid: u16,
        w: usize,
        write: bool,
    ) -> Option<(Hazard, usize)> {
        if self.npending > 0 {
            let p = &self.pending[off..off + len];
            if any_set(p) {
                let b = off + p.iter().position(|&x| x > 0).unwrap_or(0);
                return Some((Hazard::Pending, b));
            }
        }
        let one = |r: u64, b: usize, is_write_rec: bool| -> Option<(Hazard, usize)> {
            if r == 0 {
                return (is_write_rec && !write).then_some((Hazard::Uninit, b));
            }
            let (t, e) = (r as u16, (r >> 16) as u32);
            (!cl.ordered(t, e, tid, w)).then_some((
                Hazard::Race {
                    tid: t,
                    write: is_write_rec,
                },
                b,
            ))
        };
        // Usually every byte of an access has the same record: check it once.
        if len == 0 {
            return None;
        }
        let wr = &self.wr;
        if wr.same(off, len) {
            if let Some(h) = one(wr.at(off), off, true) {
                return Some(h);
            }
        } else {
            for b in off..off + len {
                if let Some(h) = one(wr.at(b), b, true) {
                    return Some(h);
                }
            }
        }
        if write {
            for readers in [&self.rd, &self.rd2] {
                if readers.same(off, len) {
                    let h = Some(readers.at(off))
                        .filter(|&r| r != 0)
                        .and_then(|r| one(r, off, false));
                    if h.is_some() {
                        return h;
                    }
                } else {
                    for b in off..off + len {
                        let r = readers.at(b);
                        if let Some(h) = Some(r).filter(|&r| r != 0).and_then(|r| one(r, b, false))
                        {
                            return Some(h);
                        }
                    }
                }
            }
        }
        None
    }

    /// Whether storing `bytes` at `off` would leave written memory as it is.
    pub(crate) fn unchanged(&self, off: usize, bytes: &[u8]) -> bool {
        let n = bytes.len();
        (off..off + n).all(|b| self.wr.at(b) != 0)
            && self.data[off..off + n] == *bytes
            && (self.npending == 0 || self.pending[off..off + n].iter().all(|&p| p == 0))
    }

    /// Records a read by thread `tid` of warp `w` (after every lane was checked): a previous
    /// reader that is another thread and not ordered before this one moves to `rd2`.
    #[inline]
    pub(crate) fn record_read(&mut self, cl: &Clocks, off: usize, len: usize, tid: u16, w: usize) {
        let v = PRESENT | ((cl.own(w) as u64) << 16) | tid as u64;
        // Usually every byte of the access has the same reader record: decide once.
        if len > 0 && self.rd.same(off, len) {
            let r = self.rd.at(off);
            if r != 0
                && r != v
                && r as u16 != tid
                && !cl.ordered(r as u16, (r >> 16) as u32, tid, w)
            {
                self.rd2.fill(off, len, r);
            }
            self.rd.fill(off, len, v);
            return;
        }
        let mut last = (0u64, false);
        for b in off..off + len {
            let r = self.rd.at(b);
            if r != 0 && r != v && r as u16 != tid {
                let concurrent = if r == last.0 {
                    last.1
                } else {
                    let c = !cl.ordered(r as u16, (r >> 16) as u32, tid, w);
                    last = (r, c);
                    c
                };
                if concurrent {
                    self.rd2.set(b, r);
                }
            }
            self.rd.set(b, v);
        }
    }

    /// Records a write (after every lane of the instruction was checked).
    #[inline]
    pub(crate) fn record(&mut self, off: usize, len: usize, tid: u16, epoch: u32, write: bool) {
        let v = PRESENT | ((epoch as u64) << 16) | tid as u64;
        let t = if write { &mut self.wr } else { &mut self.rd };
        t.fill(off, len, v);
    }

    /// Marks `[off, off + len)` as stored generically by warp `w` after its `fences`-th
    /// `fence.proxy.async` (or as written by the async proxy, with `w == None`).
    pub(crate) fn mark_generic(&mut self, off: usize, len: usize, w: Option<usize>, fences: u32) {
        let v = w.map_or(0, |w| ((w as u32 + 1) << 24) | (fences & GENERIC_COUNT));
        self.generic.fill(off, len, v);
    }

    /// The first byte of `[off, off + len)` stored generically and not fenced for the async
    /// proxy since, with the warp that stored it.
    pub(crate) fn unfenced(
        &self,
        off: usize,
        len: usize,
        fences: &[u32],
    ) -> Option<(usize, usize)> {
        if self.generic.run(off, len) == Some(0) {
            return None;
        }
        for b in off..off + len {
            let g = self.generic.at(b);
            if g != 0 {
                let w = (g >> 24) as usize - 1;
                if fences.get(w).copied() == Some(g & GENERIC_COUNT) {
                    return Some((b, w));
                }
            }
        }
        None
    }

    /// Marks bytes as the destination of an outstanding `cp.async` (or unmarks them).
    pub(crate) fn set_pending(&mut self, off: usize, len: usize, on: bool) {
        if self.pending.is_empty() {
            self.pending = vec![0; self.data.len()];
        }
        for p in &mut self.pending[off..off + len] {
            if on {
                *p = p.saturating_add(1);
            } else {
                *p = p.saturating_sub(1);
            }
        }
        if on {
            self.npending += 1;
        } else {
            self.npending = self.npending.saturating_sub(1);
        }
    }
}

/// Bank conflicts of one shared-memory warp access: `offs` per active lane, `len` bytes each
/// (a 16-byte access runs in 4 phases of 8 lanes, an 8-byte one in 2 of 16). Returns the
/// extra wavefronts beyond one per phase.
pub(crate) fn bank_conflicts(exec: u32, offs: &[u64; 32], len: u32) -> u64 {
    // One lane of at most 16 bytes touches consecutive words: distinct banks.
    if exec.count_ones() <= 1 && len <= 16 {
        return 0;
    }
    if len == 16 && lanes_of(exec).all(|l| offs[l].is_multiple_of(16)) {
        return conflicts16(exec, offs);
    }
    let per = match len {
        0..=4 => 32,
        5..=8 => 16,
        _ => 8,
    };
    let mut extra = 0u64;
    for p in 0..(32 / per) {
        // Fast path: no bank holds two different words (the usual conflict-free access).
        let mut seen = 0u32;
        let mut word = [0u64; 32];
        let mut clash = false;
        let mut any = false;
        'lanes: for (l, &a) in offs.iter().enumerate().take((p + 1) * per).skip(p * per) {
            if exec >> l & 1 == 0 {
                continue;
            }
            any = true;
            for wd in (a >> 2)..=((a + len.max(1) as u64 - 1) >> 2) {
                let b = (wd % 32) as usize;
                if seen >> b & 1 == 0 {
                    seen |= 1 << b;
                    word[b] = wd;
                } else if word[b] != wd {
                    clash = true;
                    break 'lanes;
                }
            }
        }
        if !any || !clash {
            continue;
        }
        extra += phase_conflicts(exec, offs, len, p * per, (p + 1) * per);
    }
    extra
}

fn lanes_of(exec: u32) -> impl Iterator<Item = usize> {
    let mut m = exec;
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            l
        })
    })
}

/// [`bank_conflicts`] of 16-byte-aligned 16-byte accesses: a lane covers the four banks of one
/// quad (`offset / 16 % 8`), so a phase of 8 lanes is conflict-free unless two lanes use one
/// quad at different addresses.
fn conflicts16(exec: u32, offs: &[u64; 32]) -> u64 {
    let mut extra = 0u64;
    for p in 0..4 {
        let mut seen = 0u32;
        let mut quad = [0u64; 8];
        let mut clash = false;
        for l in lanes_of(exec & (0xff << (8 * p))) {
            let a = offs[l] >> 4;
            let q = (a & 7) as usize;
            if seen >> q & 1 == 0 {
                seen |= 1 << q;
                quad[q] = a;
            } else if quad[q] != a {
                clash = true;
                break;
            }
        }
        if clash {
            extra += phase_conflicts(exec, offs, 16, 8 * p, 8 * p + 8);
        }
    }
    extra
}

/// Extra wavefronts of one phase (lanes `lo..hi`) with at least one conflict.
fn phase_conflicts(exec: u32, offs: &[u64; 32], len: u32, lo: usize, hi: usize) -> u64 {
    // Aligned accesses of at most 16 bytes: at most 32 words per phase.
    let mut words = [0u64; 64];
    let mut n = 0;
    for (l, &a) in offs.iter().enumerate().take(hi).skip(lo) {
        if exec >> l & 1 == 0 {
            continue;
        }
        for wd in (a >> 2)..=((a + len.max(1) as u64 - 1) >> 2) {
            if n < words.len() {
                words[n] = wd;
                n += 1;
            }
        }
    }
    let words = &mut words[..n];
    words.sort_unstable();
    let mut per_bank = [0u32; 32];
    for i in 0..n {
        if i == 0 || words[i] != words[i - 1] {
            per_bank[(words[i] % 32) as usize] += 1;
        }
    }
    (per_bank.iter().copied().max().unwrap_or(1) as u64).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The general count, without the single-lane and 16-byte shortcuts.
    fn general(exec: u32, offs: &[u64; 32], len: u32) -> u64 {
        let per = match len {
            0..=4 => 32,
            5..=8 => 16,
            _ => 8,
        };
        (0..32 / per)
            .map(|p| phase_conflicts(exec, offs, len, p * per, (p + 1) * per))
            .sum()
    }

    #[test]
    fn chunked_records_read_as_per_byte_records() {
        let n = 200;
        let mut sh = Shadow::new(n);
        let mut plain = vec![0u64; n];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..50_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1usize, 2, 4, 8, 16, 16, 16, 32, 48][(x % 9) as usize];
            let off = ((x >> 8) as usize % n) / len * len;
            let len = len.min(n - off);
            if x >> 40 & 3 == 0 {
                let b = off;
                sh.set(b, step);
                plain[b] = step;
            } else {
                sh.fill(off, len, step);
                plain[off..off + len].fill(step);
            }
            let (o, l) = ((x >> 20) as usize % n, 1 + (x >> 30) as usize % 16);
            let l = l.min(n - o);
            let want = plain[o..o + l].iter().all(|&r| r == plain[o]);
            assert_eq!(sh.same(o, l), want);
            if let Some(r) = sh.run(o, l) {
                assert!(plain[o..o + l].iter().all(|&p| p == r));
            }
        }
        for (b, &r) in plain.iter().enumerate() {
            assert_eq!(sh.at(b), r, "byte {b}");
        }
    }

    #[test]
    fn shortcuts_count_as_the_general_rule() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..20_000 {
            let exec = match case % 4 {
                0 => u32::MAX,
                1 => 1 << (next() % 32),
                _ => next() as u32,
            };
            let span = [64u64, 256, 1024, 8192][(case / 4) % 4];
            let len = [4u32, 8, 16][case % 3];
            let mut offs = [0u64; 32];
            for o in &mut offs {
                *o = next() % span / len as u64 * len as u64;
            }
            assert_eq!(
                bank_conflicts(exec, &offs, len),
                general(exec, &offs, len),
                "exec {exec:#x} len {len} offs {offs:?}"
            );
        }
    }
}
