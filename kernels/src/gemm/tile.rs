//! Tile shapes and the per-thread index math of the GEMM kernels, written once in Rust.
//!
//! The PTX generator prints these expressions as PTX ([`Ix::emit`]); the tests evaluate the same
//! expressions for every thread ([`Ix::eval`]) to prove that the shared-memory swizzle is a
//! bijection, that `ldmatrix` reads every fragment element exactly once and without bank
//! conflicts, and that the epilogue covers every output element of a block tile exactly once.
//!
//! Vocabulary (used in every GEMM file):
//! - a block computes a `bm x bn` tile of C, walking K in steps of `bk`;
//! - warps form a `warps_m x warps_n` grid; warp `w` has `wm_idx = w / warps_n`,
//!   `wn_idx = w % warps_n` and owns a `wm x wn` sub-tile (`mt` m16 tiles by `nt` n8 tiles);
//! - each operand's k-tile is staged in shared memory as `rows` rows of `chunks` 16-byte chunks
//!   (8 elements each) in the layout the operand has in global memory (no transposing copy):
//!   A `(M, K)` K-contiguous is a `bm x bk` tile; A stored `(K, M)` is a `bk x bm` tile; B stored
//!   `(K, N)` is `bk x bn`; B stored `(N, K)` is `bn x bk`. `ldmatrix` (with `.trans` where the
//!   contiguous axis is M or N) turns them into `mma` fragments.

use super::Op;
use std::fmt::Write;

/// One block tile configuration. Tile sizes and warp counts are powers of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub warps_m: u32,
    pub warps_n: u32,
    /// Shared-memory stages of the `cp.async` pipeline (1 = load, wait, compute).
    pub stages: u32,
    /// Block tiles are visited in groups of `group_m` tile rows (L2 reuse of B panels).
    pub group_m: u32,
    /// Blocks per SM the register allocation must allow (`.minnctapersm`; 0: no directive).
    /// v2 asks for 2, which caps it at 128 registers a thread (no spills, checked by ptxas).
    pub min_blocks: u32,
}

impl Tile {
    pub const fn threads(&self) -> u32 {
        32 * self.warps_m * self.warps_n
    }
    /// Rows of C per warp.
    pub const fn wm(&self) -> u32 {
        self.bm / self.warps_m
    }
    /// Columns of C per warp.
    pub const fn wn(&self) -> u32 {
        self.bn / self.warps_n
    }
    /// m16 fragments per warp.
    pub const fn mt(&self) -> u32 {
        self.wm() / 16
    }
    /// n8 fragments per warp.
    pub const fn nt(&self) -> u32 {
        self.wn() / 8
    }
    /// k16 steps per k-tile.
    pub const fn ksteps(&self) -> u32 {
        self.bk / 16
    }
    pub const fn a_bytes(&self) -> u32 {
        self.bm * self.bk * 2
    }
    pub const fn b_bytes(&self) -> u32 {
        self.bk * self.bn * 2
    }
    /// One stage: the A tile, then the B tile.
    pub const fn stage_bytes(&self) -> u32 {
        self.a_bytes() + self.b_bytes()
    }
    /// Dynamic shared memory of one block.
    pub const fn shared_bytes(&self) -> u32 {
        self.stages * self.stage_bytes()
    }

    /// Checks the constraints the generator relies on.
    pub fn validate(&self) -> Result<(), String> {
        let shape = [self.bm, self.bn, self.bk, self.warps_m, self.warps_n];
        if shape.iter().any(|v| !v.is_power_of_two()) {
            return Err(format!(
                "{self:?}: tile and warp counts must be powers of two"
            ));
        }
        if self.stages == 0 || self.group_m == 0 {
            return Err(format!("{self:?}: stages and group_m must be at least 1"));
        }
        if self.min_blocks * self.shared_bytes() > 160 * 1024 {
            return Err(format!(
                "{self:?}: min_blocks blocks do not fit an A100's shared memory"
            ));
        }
        if self.wm() < 16 || self.wn() < 16 || self.bk < 16 {
            return Err(format!("{self:?}: warp tile below 16x16 or bk < 16"));
        }
        for op in [Op::N, Op::T] {
            for o in [Operand::a(self, op), Operand::b(self, op)] {
                let t = self.threads();
                if o.chunks < 2
                    || !t.is_multiple_of(o.chunks)
                    || !(o.rows * o.chunks).is_multiple_of(t)
                {
                    return Err(format!("{self:?}: {o:?} does not split over {t} threads"));
                }
                if !(t / o.chunks).is_multiple_of(8) {
                    return Err(format!(
                        "{self:?}: {o:?}: loader row step not a multiple of 8"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The swizzle of a tile with `chunks` 16-byte chunks per row: the XOR applied to the chunk index
/// of row `row`. It depends on `row % 8` only, and makes any 8 consecutive rows read at one
/// chunk column (one `ldmatrix` phase) hit 8 different 16-byte bank groups:
/// - `chunks >= 8`: `row % 8` (the 3 low bits of the chunk index);
/// - `chunks == 4`: `(row / 2) % 4` (two rows share a 128-byte line);
/// - `chunks == 2`: `(row / 4) % 2`.
pub const fn swizzle(row: u32, chunks: u32) -> u32 {
    let rows_per_line = if chunks >= 8 { 1 } else { 8 / chunks };
    let span = if chunks >= 8 { 8 } else { chunks };
    (row / rows_per_line) % span
}

/// An integer expression of the thread index (`%tid.x`), evaluated in Rust by the tests and
/// printed as PTX by the generator, so both see the same index math.
#[derive(Clone, Debug)]
pub enum Ix {
    Tid,
    Const(u32),
    Add(Box<Ix>, Box<Ix>),
    Xor(Box<Ix>, Box<Ix>),
    Mul(Box<Ix>, u32),
    Div(Box<Ix>, u32),
    Rem(Box<Ix>, u32),
}

impl Ix {
    pub fn tid() -> Ix {
        Ix::Tid
    }
    pub fn c(v: u32) -> Ix {
        Ix::Const(v)
    }
    pub fn lane() -> Ix {
        Ix::Tid % 32
    }
    pub fn warp() -> Ix {
        Ix::Tid / 32
    }

    /// The value for thread `tid`.
    pub fn eval(&self, tid: u32) -> u32 {
        match self {
            Ix::Tid => tid,
            Ix::Const(v) => *v,
            Ix::Add(a, b) => a.eval(tid).wrapping_add(b.eval(tid)),
            Ix::Xor(a, b) => a.eval(tid) ^ b.eval(tid),
            Ix::Mul(a, c) => a.eval(tid).wrapping_mul(*c),
            Ix::Div(a, c) => a.eval(tid) / c,
            Ix::Rem(a, c) => a.eval(tid) % c,
        }
    }

    /// Prints PTX computing the expression from the `.b32` register `tid` into fresh registers
    /// from `fresh`; returns the register (or immediate) holding the value.
    pub fn emit(&self, out: &mut String, tid: &str, fresh: &mut dyn FnMut() -> String) -> String {
        if let Some(v) = self.constant() {
            return v.to_string();
        }
        let shift_or = |c: u32, pow2: &str, other: &str| {
            if c.is_power_of_two() {
                format!(
                    "{pow2} {{d}}, {{a}}, {};",
                    if pow2 == "and.b32" {
                        c - 1
                    } else {
                        c.trailing_zeros()
                    }
                )
            } else {
                format!("{other} {{d}}, {{a}}, {c};")
            }
        };
        // The instruction template ({d} destination, {a} {b} operands) and the operands.
        let (template, a, b) = match self {
            Ix::Tid => return tid.to_string(),
            Ix::Const(v) => return v.to_string(),
            Ix::Add(x, y) => ("add.u32 {d}, {a}, {b};".to_string(), x, Some(y)),
            Ix::Xor(x, y) => ("xor.b32 {d}, {a}, {b};".to_string(), x, Some(y)),
            Ix::Mul(x, c) => (shift_or(*c, "shl.b32", "mul.lo.u32"), x, None),
            Ix::Div(x, c) => (shift_or(*c, "shr.u32", "div.u32"), x, None),
            Ix::Rem(x, c) => (shift_or(*c, "and.b32", "rem.u32"), x, None),
        };
        let a = a.emit(out, tid, fresh);
        let b = b.map(|y| y.emit(out, tid, fresh)).unwrap_or_default();
        let d = fresh();
        let line = template
            .replace("{d}", &d)
            .replace("{a}", &a)
            .replace("{b}", &b);
        let _ = writeln!(out, "\t{line}");
        d
    }

    /// The value when the expression does not depend on the thread.
    fn constant(&self) -> Option<u32> {
        Some(match self {
            Ix::Tid => return None,
            Ix::Const(v) => *v,
            Ix::Add(a, b) => a.constant()?.wrapping_add(b.constant()?),
            Ix::Xor(a, b) => a.constant()? ^ b.constant()?,
            Ix::Mul(a, c) => a.constant()?.wrapping_mul(*c),
            Ix::Div(a, c) => a.constant()? / c,
            Ix::Rem(a, c) => a.constant()? % c,
        })
    }
}

impl std::ops::Add for Ix {
    type Output = Ix;
    fn add(self, o: Ix) -> Ix {
        Ix::Add(Box::new(self), Box::new(o))
    }
}
impl std::ops::BitXor for Ix {
    type Output = Ix;
    fn bitxor(self, o: Ix) -> Ix {
        Ix::Xor(Box::new(self), Box::new(o))
    }
}
impl std::ops::Mul<u32> for Ix {
    type Output = Ix;
    fn mul(self, c: u32) -> Ix {
        Ix::Mul(Box::new(self), c)
    }
}
impl std::ops::Div<u32> for Ix {
    type Output = Ix;
    fn div(self, c: u32) -> Ix {
        Ix::Div(Box::new(self), c)
    }
}
impl std::ops::Rem<u32> for Ix {
    type Output = Ix;
    fn rem(self, c: u32) -> Ix {
        Ix::Rem(Box::new(self), c)
    }
}

/// Which operand a tile holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    A,
    B,
}

/// One operand's k-tile in shared memory and how threads load and read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub which: Which,
    pub op: Op,
    /// Rows of the shared tile (rows of the stored matrix).
    pub rows: u32,
    /// 16-byte chunks per shared row (the stored matrix's contiguous axis / 8).
    pub chunks: u32,
    /// Whether stepping K moves the tile down the stored rows (else along the columns).
    pub k_on_rows: bool,
    /// Whether `ldmatrix` needs `.trans` (the contiguous axis is M or N, not K).
    pub trans: bool,
    /// Byte offset of this tile inside a stage.
    pub offset: u32,
}

/// One `ldmatrix.x4` of a k-tile: which fragments it fills and where it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ldm {
    /// The k16 step.
    pub ks: u32,
    /// A: the m16 fragment `i`; B: the pair of n8 fragments `2p, 2p+1`.
    pub idx: u32,
    /// The compile-time chunk offset XOR-ed into the lane's base address (`key * 16` bytes).
    pub key: u32,
    /// The compile-time byte offset added after the XOR (whole rows, multiples of 8 rows).
    pub imm: u32,
}

impl Operand {
    /// The A operand: `(M, K)` K-contiguous for [`Op::N`], stored `(K, M)` for [`Op::T`].
    pub fn a(t: &Tile, op: Op) -> Operand {
        let (rows, chunks, k_on_rows, trans) = match op {
            Op::N => (t.bm, t.bk / 8, false, false),
            Op::T => (t.bk, t.bm / 8, true, true),
        };
        Operand {
            which: Which::A,
            op,
            rows,
            chunks,
            k_on_rows,
            trans,
            offset: 0,
        }
    }

    /// The B operand: stored `(K, N)` for [`Op::N`], `(N, K)` K-contiguous for [`Op::T`].
    pub fn b(t: &Tile, op: Op) -> Operand {
        let (rows, chunks, k_on_rows, trans) = match op {
            Op::N => (t.bk, t.bn / 8, true, true),
            Op::T => (t.bn, t.bk / 8, false, false),
        };
        Operand {
            which: Which::B,
            op,
            rows,
            chunks,
            k_on_rows,
            trans,
            offset: t.a_bytes(),
        }
    }

    pub fn bytes(&self) -> u32 {
        self.rows * self.chunks * 16
    }

    /// Byte offset of chunk `c` of row `row` inside the tile.
    pub fn smem_offset(&self, row: u32, c: u32) -> u32 {
        row * self.chunks * 16 + (c ^ swizzle(row, self.chunks)) * 16
    }

    fn smem_offset_ix(&self, row: Ix, c: Ix) -> Ix {
        let rows_per_line = if self.chunks >= 8 { 1 } else { 8 / self.chunks };
        let span = if self.chunks >= 8 { 8 } else { self.chunks };
        let swz = (row.clone() / rows_per_line) % span;
        row * (self.chunks * 16) + (c ^ swz) * 16
    }

    /// Chunks each thread copies per k-tile.
    pub fn chunks_per_thread(&self, t: &Tile) -> u32 {
        self.rows * self.chunks / t.threads()
    }

    /// Rows between one thread's successive chunks.
    pub fn row_step(&self, t: &Tile) -> u32 {
        t.threads() / self.chunks
    }

    /// The thread's first tile row (its chunk `u` is at row `load_row + u * row_step`).
    pub fn load_row(&self) -> Ix {
        Ix::tid() / self.chunks
    }

    /// The thread's chunk column (the same for all its chunks).
    pub fn load_chunk(&self) -> Ix {
        Ix::tid() % self.chunks
    }

    /// Byte offset in the tile where the thread's chunk 0 lands; chunk `u` lands
    /// `u * row_step * chunks * 16 = u * threads * 16` bytes further (the swizzle repeats
    /// every 8 rows and `row_step` is a multiple of 8).
    pub fn load_dst(&self) -> Ix {
        self.smem_offset_ix(self.load_row(), self.load_chunk())
    }

    /// The lane's (row, chunk) for the `ldmatrix` with `key = 0, imm = 0`, including the warp's
    /// offset. Lane `l` gives the address of row `l % 8` of matrix `l / 8`.
    pub fn ldm_lane(&self, t: &Tile) -> (Ix, Ix) {
        let lane = Ix::lane;
        let j = || Ix::lane() / 8;
        let r = || Ix::lane() % 8;
        let wm_idx = Ix::warp() / t.warps_n;
        let wn_idx = Ix::warp() % t.warps_n;
        match (self.which, self.op) {
            // Matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
            // = mma A registers a0..a3. Rows are m, chunks k.
            (Which::A, Op::N) => (wm_idx * t.wm() + lane() % 16, lane() / 16),
            // Stored (K, M): matrix j covers k 8*(j/2).., m 8*(j%2)..; .trans gives a0..a3.
            (Which::A, Op::T) => (r() + (j() / 2) * 8, wm_idx * (t.wm() / 8) + j() % 2),
            // Stored (K, N): matrix j covers k 8*(j%2).., n 8*(j/2)..; .trans gives
            // b0, b1 of fragment 2p, then b0, b1 of fragment 2p+1.
            (Which::B, Op::N) => (r() + (j() % 2) * 8, wn_idx * (t.wn() / 8) + j() / 2),
            // Stored (N, K): matrix j covers n 8*(j/2).., k 8*(j%2)..; same register order.
            (Which::B, Op::T) => (wn_idx * t.wn() + r() + (j() / 2) * 8, j() % 2),
        }
    }

    /// The `ldmatrix.x4` instructions of one k-tile, in issue order.
    pub fn ldms(&self, t: &Tile) -> Vec<Ldm> {
        let row_bytes = self.chunks * 16;
        let count = match self.which {
            Which::A => t.mt(),
            Which::B => t.nt() / 2,
        };
        let mut v = Vec::new();
        for ks in 0..t.ksteps() {
            for idx in 0..count {
                // A N / B T: k runs along the chunks (2 chunks per k16 step), the m16 / n16
                // block along the rows. A T / B N: k runs along the rows, m / n along chunks.
                let (key, imm) = if self.trans {
                    (2 * idx, 16 * ks * row_bytes)
                } else {
                    (2 * ks, 16 * idx * row_bytes)
                };
                v.push(Ldm { ks, idx, key, imm });
            }
        }
        v
    }

    /// The distinct XOR keys of [`Operand::ldms`], ascending.
    pub fn ldm_keys(&self, t: &Tile) -> Vec<u32> {
        let mut k: Vec<u32> = self.ldms(t).iter().map(|l| l.key).collect();
        k.sort_unstable();
        k.dedup();
        k
    }

    /// The lane's byte offset in the tile for XOR key `key` (before adding [`Ldm::imm`]).
    /// Valid because the lane's chunk index never has a bit that `key` has (tested), so
    /// `(c + key) ^ s == (c ^ s) ^ key`, and a whole-row `imm` keeps `row % 8`.
    pub fn ldm_base(&self, t: &Tile, key: u32) -> Ix {
        let (row, c) = self.ldm_lane(t);
        self.smem_offset_ix(row, c) ^ Ix::c(key * 16)
    }
}

/// The block tile `(tile_m, tile_n)` that block `pid` computes: blocks walk down a group of
/// `group_m` tile rows before moving one tile column right, so the blocks resident at one time
/// share A row panels and B column panels in L2.
pub fn raster(pid: u32, tiles_m: u32, tiles_n: u32, group_m: u32) -> (u32, u32) {
    let group_size = group_m * tiles_n;
    let group = pid / group_size;
    let first_m = group * group_m;
    let rows = (tiles_m - first_m).min(group_m);
    let r = pid - group * group_size;
    (first_m + r % rows, r / rows)
}

/// The thread's accumulator coordinates inside the block tile: row of `c0, c1` of fragment
/// `(i, j)` is `row + 16 i`, rows of `c2, c3` are 8 further; columns `col + 8 j`, `+1`.
pub fn acc_origin(t: &Tile) -> (Ix, Ix) {
    let wm_idx = Ix::warp() / t.warps_n;
    let wn_idx = Ix::warp() % t.warps_n;
    (
        wm_idx * t.wm() + Ix::lane() / 4,
        wn_idx * t.wn() + (Ix::lane() % 4) * 2,
    )
}
