//! `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16}`: the register layouts
//! and the product.
//!
//! Register layouts (verified on the H100 by the probe kernels' stores): warp `w` of the
//! warpgroup (threads `32w..32w+31`) holds rows `16w..16w+15`; with `lane = thread % 32`,
//! register (or element) `i` of a thread holds row `16w + lane/4 + 8*((i/2)%2)` and column
//! `8*(i/4) + 2*(lane%4) + i%2`: the `mma.sync` m16n8 C layout repeated every 8 columns. The
//! f32 accumulator of m64nNk16 has `N/2` registers per thread; the A fragment (A in registers)
//! has 8 16-bit elements per thread in four `.b32` registers (element `2r` in the low half of
//! register `r`, `2r+1` in the high half) with the same formula over its 16 columns.
//!
//! Rounding model of [`mma`]: each product `p_k = a_k * b_k` is computed in f32 (exact: at most
//! 22 significant bits, and always in range for f16; for bf16, whose exponent range is f32's,
//! exact unless it overflows or underflows f32, which takes inputs beyond about 2^+-63), and the
//! 16 products are added onto `d` in k order, `((d + p0) + p1) + ... + p15`, each add rounded
//! to nearest even in f32. The H100's adder tree differs from this in the last bits; Lathe's
//! tests compare against an f64 product with a tolerance, as the probes did.

use super::desc::{Major, MatrixDesc, k_part, mn_part};
use crate::error::{ErrorKind, SimError};

/// Rows of the A operand and of D.
pub const M: u32 = 64;
/// The K extent of one 16-bit wgmma.
pub const K: u32 = 16;
/// Threads in a warpgroup.
pub const THREADS: u32 = 128;

/// The 16-bit input type of A and B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaDtype {
    BF16,
    F16,
}

impl MmaDtype {
    #[inline]
    fn to_f32(self, bits: u16) -> f32 {
        match self {
            MmaDtype::BF16 => half::bf16::from_bits(bits).to_f32(),
            MmaDtype::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }
}

/// (row, col) of D held by f32 accumulator register `reg` (`0..N/2`) of thread
/// `thread_in_warpgroup` (`0..128`) for m64nNk16.
#[inline]
pub fn accumulator_coords(thread_in_warpgroup: u32, reg: u32) -> (u32, u32) {
    let w = thread_in_warpgroup / 32;
    let lane = thread_in_warpgroup % 32;
    let row = 16 * w + lane / 4 + 8 * ((reg / 2) % 2);
    let col = 8 * (reg / 4) + 2 * (lane % 4) + reg % 2;
    (row, col)
}

/// (row, col) of A (64 x 16) held by element `elem` (`0..8`; register `elem / 2`, low half
/// first) of thread `thread_in_warpgroup` when A comes from registers.
#[inline]
pub fn a_fragment_coords(thread_in_warpgroup: u32, elem: u32) -> (u32, u32) {
    accumulator_coords(thread_in_warpgroup, elem)
}

/// Gathers the accumulator registers of a warpgroup into `d` (64 x `n`, row-major):
/// `regs[t * n/2 + i]` is register `i` of thread `t`.
pub fn gather_accumulators(n: u32, regs: &[f32], d: &mut [f32]) -> Result<(), SimError> {
    check_n(n, d.len())?;
    let per = (n / 2) as usize;
    check_len("accumulator registers", regs.len(), THREADS as usize * per)?;
    for t in 0..THREADS {
        for i in 0..n / 2 {
            let (r, c) = accumulator_coords(t, i);
            d[(r * n + c) as usize] = regs[t as usize * per + i as usize];
        }
    }
    Ok(())
}

/// The inverse of [`gather_accumulators`]: writes `d` (64 x `n`) into per-thread registers.
pub fn scatter_accumulators(n: u32, d: &[f32], regs: &mut [f32]) -> Result<(), SimError> {
    check_n(n, d.len())?;
    let per = (n / 2) as usize;
    check_len("accumulator registers", regs.len(), THREADS as usize * per)?;
    for t in 0..THREADS {
        for i in 0..n / 2 {
            let (r, c) = accumulator_coords(t, i);
            regs[t as usize * per + i as usize] = d[(r * n + c) as usize];
        }
    }
    Ok(())
}

/// Where A comes from.
#[derive(Clone, Copy, Debug)]
pub enum ASource<'a> {
    /// Shared memory through a descriptor, with A's major-ness (`imm-trans-a`).
    Shared { desc: MatrixDesc, major: Major },
    /// Registers: `regs[t]` are the four `.b32` A registers of thread `t` of the warpgroup
    /// (see [`a_fragment_coords`]).
    Registers(&'a [[u32; 4]; 128]),
}

/// One `wgmma.mma_async` m64nNk16 with f32 accumulators.
#[derive(Clone, Copy, Debug)]
pub struct MmaOp<'a> {
    /// N: 8..=256 in steps of 8.
    pub n: u32,
    pub dtype: MmaDtype,
    pub a: ASource<'a>,
    /// B (N x 16) in shared memory, and its major-ness (`imm-trans-b`).
    pub b: MatrixDesc,
    pub b_major: Major,
    /// The `scale-d` predicate: true adds onto D, false overwrites D with A*B.
    pub scale_d: bool,
    /// `imm-scale-a` / `imm-scale-b`: 1 or -1 (negate the operand).
    pub scale_a: i32,
    pub scale_b: i32,
}

/// Floating-point operations of one m64nNk16 (2 per multiply-add).
pub fn flops(n: u32) -> u64 {
    2 * M as u64 * n as u64 * K as u64
}

fn check_n(n: u32, d_len: usize) -> Result<(), SimError> {
    if !(8..=256).contains(&n) || !n.is_multiple_of(8) {
        return Err(SimError::new(
            ErrorKind::Unsupported,
            format!("wgmma m64n{n}k16: N must be 8..=256 in steps of 8"),
        ));
    }
    check_len("D", d_len, (M * n) as usize)
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), SimError> {
    if got != want {
        return Err(SimError::new(
            ErrorKind::BadLaunch,
            format!("wgmma: {what} has {got} values, not {want}"),
        ));
    }
    Ok(())
}

fn sign(name: &str, s: i32) -> Result<f32, SimError> {
    match s {
        1 => Ok(1.0),
        -1 => Ok(-1.0),
        _ => Err(SimError::new(
            ErrorKind::Parse,
            format!("wgmma {name} = {s} is not 1 or -1"),
        )),
    }
}

/// How the operands are read from shared memory.
enum Loader<'l> {
    /// One 16-bit element per call.
    Element(&'l mut dyn FnMut(u32) -> Result<u16, SimError>),
    /// One 16-byte, 16-byte-aligned chunk per call.
    Chunk(&'l mut dyn FnMut(u32) -> Result<[u8; 16], SimError>),
}

/// Runs `op`: `D = A * B^T + (scale_d ? D : 0)` where A is 64 x 16, B is N x 16 (both indexed
/// (row, k)) and `d` is D as 64 x N f32, row-major (the accumulator registers through
/// [`accumulator_coords`]). Shared operands are read element by element through
/// `load_smem(addr)` (addresses from [`super::desc::operand_offset`], 16-bit aligned); its
/// errors are returned as is, and `d` is untouched unless every load succeeds. Rounding: see
/// the module documentation. Allocation-free: operands are staged in 20 KiB of stack.
///
/// Errors: N outside 8..=256 or not a multiple of 8 ([`ErrorKind::Unsupported`]), `d` of the
/// wrong length ([`ErrorKind::BadLaunch`]), a scale immediate other than ±1
/// ([`ErrorKind::Parse`]).
pub fn mma(
    op: &MmaOp,
    load_smem: &mut dyn FnMut(u32) -> Result<u16, SimError>,
    d: &mut [f32],
) -> Result<(), SimError> {
    run(op, Loader::Element(load_smem), d)
}

/// [`mma`] reading shared memory 16 bytes at a time, as the hardware does: `load_chunk(addr)`
/// returns the bytes at `addr..addr + 16` (`addr` 16-byte aligned). Every swizzle moves whole
/// 16-byte chunks, and a chunk holds 8 consecutive K (K-major) or M/N (MN-major) elements of
/// one operand, so this makes 8 times fewer calls than [`mma`] for the same result, bit for bit.
pub fn mma_chunked(
    op: &MmaOp,
    load_chunk: &mut dyn FnMut(u32) -> Result<[u8; 16], SimError>,
    d: &mut [f32],
) -> Result<(), SimError> {
    run(op, Loader::Chunk(load_chunk), d)
}

/// Reads a `rows` x 16 operand through `desc` into `out[k * stride_k + row * stride_row]`,
/// converted to f32 and multiplied by `sign`.
#[allow(clippy::too_many_arguments)]
fn stage(
    loader: &mut Loader,
    desc: &MatrixDesc,
    major: Major,
    rows: u32,
    dtype: MmaDtype,
    sign: f32,
    out: &mut [f32],
    (stride_row, stride_k): (usize, usize),
) -> Result<(), SimError> {
    let kp: [u32; 16] = std::array::from_fn(|k| k_part(desc, major, k as u32, 2));
    let addr = |row: u32, k: usize| {
        let base = desc.start.wrapping_add(mn_part(desc, major, row, 2));
        desc.swizzle.apply(base.wrapping_add(kp[k]))
    };
    match loader {
        Loader::Element(load) => {
            for r in 0..rows {
                for k in 0..16 {
                    let v = dtype.to_f32(load(addr(r, k))?);
                    out[k * stride_k + r as usize * stride_row] = sign * v;
                }
            }
        }
        Loader::Chunk(load) => {
            // A chunk is 8 elements along K (K-major) or along M/N (MN-major).
            let (outer, inner) = match major {
                Major::K => (rows, 2),
                Major::MN => (rows / 8, 16),
            };
            for o in 0..outer {
                for i in 0..inner {
                    let (r, k) = match major {
                        Major::K => (o, 8 * i as usize),
                        Major::MN => (8 * o, i as usize),
                    };
                    let bytes = load(addr(r, k))?;
                    for e in 0..8 {
                        let v = dtype.to_f32(u16::from_le_bytes([bytes[2 * e], bytes[2 * e + 1]]));
                        let (re, ke) = match major {
                            Major::K => (r as usize, k + e),
                            Major::MN => (r as usize + e, k),
                        };
                        out[ke * stride_k + re * stride_row] = sign * v;
                    }
                }
            }
        }
    }
    Ok(())
}

fn run(op: &MmaOp, mut loader: Loader, d: &mut [f32]) -> Result<(), SimError> {
    let n = op.n;
    check_n(n, d.len())?;
    let sa = sign("imm-scale-a", op.scale_a)?;
    let sb = sign("imm-scale-b", op.scale_b)?;
    let nu = n as usize;
    let ku = K as usize;

    // A as 64 x 16 row-major; B transposed as 16 x N row-major (so the inner loop runs along N).
    let mut a = [0f32; (M * K) as usize];
    let mut bt = [0f32; (K * 256) as usize];
    match op.a {
        ASource::Shared { desc, major } => {
            stage(&mut loader, &desc, major, M, op.dtype, sa, &mut a, (ku, 1))?;
        }
        ASource::Registers(regs) => {
            for (t, tr) in regs.iter().enumerate() {
                for e in 0..8u32 {
                    let (r, c) = a_fragment_coords(t as u32, e);
                    let bits = (tr[(e / 2) as usize] >> (16 * (e % 2))) as u16;
                    a[(r * K + c) as usize] = sa * op.dtype.to_f32(bits);
                }
            }
        }
    }
    let (b, major, dtype) = (op.b, op.b_major, op.dtype);
    stage(&mut loader, &b, major, n, dtype, sb, &mut bt, (1, nu))?;

    // Column blocks with the accumulators in registers (32 wide: enough independent adds to
    // hide their latency); per element the order is still d, then k = 0..16.
    for (i, row) in d.chunks_exact_mut(nu).enumerate() {
        let arow = &a[i * ku..(i + 1) * ku];
        let mut c = 0;
        while c + 32 <= nu {
            block::<32>(arow, &bt, nu, c, &mut row[c..c + 32], op.scale_d);
            c += 32;
        }
        while c < nu {
            block::<8>(arow, &bt, nu, c, &mut row[c..c + 8], op.scale_d);
            c += 8;
        }
    }
    Ok(())
}

/// `out = (scale_d ? out : 0) + sum_k arow[k] * bt[k][c..c + W]`, k in order.
#[inline(always)]
fn block<const W: usize>(
    arow: &[f32],
    bt: &[f32],
    nu: usize,
    c: usize,
    out: &mut [f32],
    scale_d: bool,
) {
    let mut acc = [0f32; W];
    if scale_d {
        acc.copy_from_slice(out);
    }
    for (k, &aik) in arow.iter().enumerate() {
        let b = &bt[k * nu + c..k * nu + c + W];
        for (x, &y) in acc.iter_mut().zip(b) {
            // The product is exact in f32 (see the module docs): one rounding per add.
            *x += aik * y;
        }
    }
    out.copy_from_slice(&acc);
}
