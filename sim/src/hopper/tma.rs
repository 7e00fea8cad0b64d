//! TMA tile copies (`cp.async.bulk.tensor.Nd...tile`) between global memory and shared memory
//! through a tensor map, as pure functions of the map, the coordinates and a memory callback.
//!
//! Shared-memory layout of a box: the box's elements packed densely in row-major order
//! (dimension 0 fastest), logical byte `j` at shared address `dst + j`, then the map's swizzle
//! applied to each 16-byte chunk as a function of its absolute shared address
//! ([`Swizzle::apply`]: the chunk index within a 128-byte shared-memory line is XORed with the
//! line index modulo 2, 4 or 8 for the 32/64/128B swizzles, the ISA's tables of the swizzling
//! modes). The destination must be 128-byte aligned; the pattern starts at phase 0 only when it
//! is aligned to [`Swizzle::repeat_bytes`] (256, 512 or 1024 bytes for the 32/64/128B
//! swizzles). A destination aligned to 128 but not to that starts mid-pattern (the ISA's
//! "swizzle base offset" `(dst / 128) % 8` for 128B), exactly as on the device. This is the
//! layout the H100 probe `tma_wg` confirmed for a 64 x 64 bf16 box with SWIZZLE_128B at a
//! 1024-aligned destination.

use crate::error::{ErrorKind, SimError};
use crate::tensor_map::{Swizzle, TensorMapDesc, validate};

/// The alignment `cp.async.bulk.tensor` requires of its shared-memory address.
pub const SMEM_ALIGN: u32 = 128;

/// A global-memory reader: fills the buffer with the bytes at the address (the interpreter
/// checks bounds, regions and initialization there).
pub type ReadGlobal<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), SimError> + 'a;

/// A global-memory writer: stores the bytes at the address.
pub type WriteGlobal<'a> = dyn FnMut(u64, &[u8]) -> Result<(), SimError> + 'a;

/// Calls `f(global_addr, box_byte_offset, bytes)` for every in-bounds run of the box at
/// `coords`, in row-major order, merging rows that are contiguous both in global memory and in
/// the box. Out-of-bounds elements belong to no run.
fn for_each_run(
    map: &TensorMapDesc,
    coords: &[i32],
    f: &mut dyn FnMut(u64, usize, usize) -> Result<(), SimError>,
) -> Result<(), SimError> {
    let rank = map.rank();
    let elem = map.dtype.size() as u64;
    let box0 = map.box_dims[0] as i64;
    let row_bytes = box0 as u64 * elem;
    let rows: u64 = map.box_dims[1..].iter().map(|&b| b as u64).product();
    let x0 = coords[0] as i64;
    let lo = x0.max(0);
    let hi = (x0 + box0).min(map.dims[0] as i64);
    if lo >= hi {
        return Ok(());
    }
    let overflow = || {
        SimError::new(
            ErrorKind::OutOfBounds,
            format!(
                "TMA box at {coords:?}: global address overflows 64 bits (base {:#x})",
                map.global_addr
            ),
        )
    };
    // Pending run: (global address, box offset, length).
    let mut run: Option<(u64, usize, usize)> = None;
    let mut idx = [0u32; 5];
    for r in 0..rows {
        let mut rem = r;
        for (i, slot) in idx.iter_mut().enumerate().take(rank).skip(1) {
            let b = map.box_dims[i] as u64;
            *slot = (rem % b) as u32;
            rem /= b;
        }
        let mut addr = map.global_addr;
        let mut inside = true;
        for i in 1..rank {
            let c = coords[i] as i64 + idx[i] as i64;
            if c < 0 || c >= map.dims[i] as i64 {
                inside = false;
                break;
            }
            let off = (c as u64)
                .checked_mul(map.strides[i - 1])
                .ok_or_else(overflow)?;
            addr = addr.checked_add(off).ok_or_else(overflow)?;
        }
        if !inside {
            continue;
        }
        let g = addr.checked_add(lo as u64 * elem).ok_or_else(overflow)?;
        let off = (r * row_bytes + (lo - x0) as u64 * elem) as usize;
        let len = ((hi - lo) as u64 * elem) as usize;
        run = match run {
            Some((ga, bo, bl)) if ga.wrapping_add(bl as u64) == g && bo + bl == off => {
                Some((ga, bo, bl + len))
            }
            Some(prev) => {
                f(prev.0, prev.1, prev.2)?;
                Some((g, off, len))
            }
            None => Some((g, off, len)),
        };
    }
    if let Some((g, off, len)) = run {
        f(g, off, len)?;
    }
    Ok(())
}

fn check_args(map: &TensorMapDesc, coords: &[i32], smem_addr: u32) -> Result<(), SimError> {
    validate(map)?;
    if coords.len() != map.rank() {
        return Err(SimError::new(
            ErrorKind::TensorMap,
            format!(
                "TMA: {} coordinates given for a rank-{} tensor map",
                coords.len(),
                map.rank()
            ),
        ));
    }
    if !smem_addr.is_multiple_of(SMEM_ALIGN) {
        return Err(SimError::new(
            ErrorKind::Misaligned,
            format!("TMA: shared address {smem_addr:#x} is not {SMEM_ALIGN}-byte aligned"),
        ));
    }
    Ok(())
}

/// The box-relative position of the 16-byte chunk at box offset `j` once swizzled at
/// `smem_addr` (both 16-byte multiples).
fn swizzled_offset(
    swizzle: Swizzle,
    smem_addr: u32,
    j: usize,
    len: usize,
) -> Result<usize, SimError> {
    let logical = smem_addr.wrapping_add(j as u32);
    let p = swizzle.apply(logical).wrapping_sub(smem_addr) as usize;
    if p + 16 > len {
        return Err(SimError::new(
            ErrorKind::Unsupported,
            format!(
                "TMA: a {len}-byte box at {smem_addr:#x} under swizzle {swizzle:?} would move \
                 bytes past its end (a box of whole 128-byte shared-memory lines never does)"
            ),
        ));
    }
    Ok(p)
}

/// Loads the box of `map` whose first element has coordinates `coords` (innermost first,
/// signed) into shared memory at `dst_smem_addr`, and returns the bytes written there: byte
/// `j` of the result is destined for shared address `dst_smem_addr + j`, and the length is
/// [`TensorMapDesc::box_bytes`].
///
/// - Elements with a coordinate below zero or at or past its dimension read as zero.
/// - In-bounds bytes are read through `read_global(addr, buf)`, one call per contiguous run
///   (a row segment, or several rows when they are adjacent in global memory); an error from it
///   is returned as is.
/// - The swizzle is applied as the hardware applies it, by shared address bits (see the module
///   documentation).
///
/// Errors: an invalid map or a coordinate count other than the rank ([`ErrorKind::TensorMap`]),
/// a destination not 128-byte aligned ([`ErrorKind::Misaligned`]), a swizzled box that is not
/// whole swizzle rows ([`ErrorKind::Unsupported`]), address overflow
/// ([`ErrorKind::OutOfBounds`]).
pub fn load_box(
    map: &TensorMapDesc,
    coords: &[i32],
    dst_smem_addr: u32,
    read_global: &mut ReadGlobal,
) -> Result<Vec<u8>, SimError> {
    check_args(map, coords, dst_smem_addr)?;
    let len = map.box_bytes() as usize;
    let mut linear = vec![0u8; len];
    for_each_run(map, coords, &mut |g, off, n| {
        read_global(g, &mut linear[off..off + n])
    })?;
    if map.swizzle == Swizzle::None {
        return Ok(linear);
    }
    let mut out = vec![0u8; len];
    for j in (0..len).step_by(16) {
        let p = swizzled_offset(map.swizzle, dst_smem_addr, j, len)?;
        out[p..p + 16].copy_from_slice(&linear[j..j + 16]);
    }
    Ok(out)
}

/// Stores a box from shared memory to global memory (`cp.async.bulk.tensor` shared -> global):
/// `smem` holds the bytes at shared addresses `src_smem_addr..src_smem_addr + box_bytes`, laid
/// out (and swizzled) as [`load_box`] writes them. In-bounds elements are written through
/// `write_global(addr, bytes)`, one call per contiguous run; out-of-bounds ones are dropped.
/// Errors as [`load_box`], plus [`ErrorKind::BadLaunch`] when `smem` is not the box's size.
pub fn store_box(
    map: &TensorMapDesc,
    coords: &[i32],
    src_smem_addr: u32,
    smem: &[u8],
    write_global: &mut WriteGlobal,
) -> Result<(), SimError> {
    check_args(map, coords, src_smem_addr)?;
    let len = map.box_bytes() as usize;
    if smem.len() != len {
        return Err(SimError::new(
            ErrorKind::BadLaunch,
            format!(
                "TMA store: {} shared bytes given for a {len}-byte box",
                smem.len()
            ),
        ));
    }
    let mut linear = vec![0u8; len];
    if map.swizzle == Swizzle::None {
        linear.copy_from_slice(smem);
    } else {
        for j in (0..len).step_by(16) {
            let p = swizzled_offset(map.swizzle, src_smem_addr, j, len)?;
            linear[j..j + 16].copy_from_slice(&smem[p..p + 16]);
        }
    }
    for_each_run(map, coords, &mut |g, off, n| {
        write_global(g, &linear[off..off + n])
    })
}
