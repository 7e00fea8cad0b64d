//! The wgmma shared-memory matrix descriptor and operand addressing.
//!
//! Descriptor bits (64-bit register operand of `wgmma.mma_async`):
//!
//! | bits | field |
//! |---|---|
//! | 0..14 | start address: `(addr & 0x3FFFF) >> 4` |
//! | 16..30 | leading dimension byte offset (LBO) >> 4 |
//! | 32..46 | stride dimension byte offset (SBO) >> 4 |
//! | 49..52 | base offset (swizzled modes only) |
//! | 62..64 | swizzle: 0 none, 1 128B, 2 64B, 3 32B |
//!
//! Canonical layouts, with `T = 16 / elem_bytes` elements per 16-byte chunk and `S` the
//! swizzle span in bytes (the byte offset below is from the start address; the swizzle is then
//! applied to the absolute address, [`Swizzle::apply`]):
//!
//! - K-major, no swizzle: 8 x 16-byte core matrices; row `mn % 8` at 16 B, `mn / 8` at SBO,
//!   chunk `k / T` at LBO (the probe `wg_core_lbo128`: LBO 128 = K-adjacent core matrices,
//!   SBO 1024 = M/N-adjacent ones; the swapped reading ran wrong on the H100).
//! - K-major, swizzled: rows of `S` bytes; row `mn % 8` at `S`, `mn / 8` at SBO, `k` contiguous
//!   inside the row; LBO unused (the probe `wg_swz128`: SBO 1024, start +32 B per k16).
//! - MN-major, no swizzle: core matrices of 8 K-rows x 16 bytes of M/N; `mn % T` contiguous,
//!   `mn / T` at SBO, `k % 8` at 16 B, `k / 8` at LBO.
//! - MN-major, swizzled: rows of `S` bytes along M/N; `mn` contiguous within a row, whole rows
//!   of M/N (`S / elem_bytes` elements) at LBO, `k % 8` at `S`, `k / 8` at SBO.
//!
//! The K-major readings are pinned by the H100 probes; in particular the probe `wg_swz128`
//! advances the start address by 32 B inside a 128B-swizzled row and reads right, which holds
//! only if the swizzle acts on the absolute address (start + offset), as modelled here. The
//! MN-major readings follow the ISA's canonical layouts and worked examples; no probe has run
//! them on a device yet.

use crate::error::{ErrorKind, SimError};
use crate::tensor_map::Swizzle;

/// Which dimension of an operand is contiguous in shared memory: `K` (the `imm-trans` operand
/// 0, the non-transposed case) or `MN` (`imm-trans` 1: M-major A, N-major B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Major {
    K,
    MN,
}

impl Major {
    /// The major-ness an `imm-trans-a` / `imm-trans-b` value selects (0 K-major, 1 MN-major).
    pub fn from_trans(trans: u32) -> Result<Major, SimError> {
        match trans {
            0 => Ok(Major::K),
            1 => Ok(Major::MN),
            t => Err(SimError::new(
                ErrorKind::Parse,
                format!("wgmma transpose immediate {t} is not 0 or 1"),
            )),
        }
    }
}

/// A decoded matrix descriptor. Byte quantities are in bytes (the descriptor stores them >> 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixDesc {
    /// Shared start address in bytes: a multiple of 16 below 2^18.
    pub start: u32,
    /// Leading dimension byte offset (a multiple of 16 below 2^18).
    pub lbo: u32,
    /// Stride dimension byte offset (a multiple of 16 below 2^18).
    pub sbo: u32,
    /// Base offset (0..8): the phase of the swizzle pattern when the operand's pattern does not
    /// start on a `repeat_bytes` boundary. The simulator supports 0 only (see [`decode`]).
    pub base_offset: u8,
    pub swizzle: Swizzle,
}

/// The descriptor's 2-bit swizzle code (0 none, 1 128B, 2 64B, 3 32B; not the tensor map's).
pub fn swizzle_code(s: Swizzle) -> u64 {
    match s {
        Swizzle::None => 0,
        Swizzle::B128 => 1,
        Swizzle::B64 => 2,
        Swizzle::B32 => 3,
    }
}

/// Decodes a 64-bit descriptor. A non-zero base offset is [`ErrorKind::Unsupported`]: no
/// probe pins its effect, and Lathe's kernels keep swizzled tiles on pattern boundaries (the
/// base offset is then 0 by the ISA's rule). Bits outside the fields are ignored, as the
/// hardware ignores them.
pub fn decode(raw: u64) -> Result<MatrixDesc, SimError> {
    let swizzle = match raw >> 62 {
        0 => Swizzle::None,
        1 => Swizzle::B128,
        2 => Swizzle::B64,
        _ => Swizzle::B32,
    };
    let d = MatrixDesc {
        start: ((raw & 0x3FFF) << 4) as u32,
        lbo: (((raw >> 16) & 0x3FFF) << 4) as u32,
        sbo: (((raw >> 32) & 0x3FFF) << 4) as u32,
        base_offset: ((raw >> 49) & 7) as u8,
        swizzle,
    };
    if d.base_offset != 0 && swizzle != Swizzle::None {
        return Err(SimError::new(
            ErrorKind::Unsupported,
            format!(
                "wgmma descriptor {raw:#018x}: base offset {} (a swizzled operand not on a \
                 {}-byte pattern boundary) is not simulated",
                d.base_offset,
                swizzle.repeat_bytes()
            ),
        ));
    }
    Ok(d)
}

/// Encodes a descriptor. Errors ([`ErrorKind::Unsupported`]): start, LBO or SBO not a multiple
/// of 16 or not below 2^18, base offset above 7. The start address is taken modulo 2^18 as the
/// ISA's `(addr & 0x3FFFF) >> 4` does, so a full 32-bit shared address may be passed.
pub fn encode(d: &MatrixDesc) -> Result<u64, SimError> {
    let start = d.start & 0x3FFFF;
    for (name, v) in [("start address", start), ("LBO", d.lbo), ("SBO", d.sbo)] {
        if v % 16 != 0 || v >= 1 << 18 {
            return Err(SimError::new(
                ErrorKind::Unsupported,
                format!("wgmma descriptor: {name} = {v:#x} is not a multiple of 16 below 2^18"),
            ));
        }
    }
    if d.base_offset > 7 {
        return Err(SimError::new(
            ErrorKind::Unsupported,
            format!("wgmma descriptor: base offset {} is above 7", d.base_offset),
        ));
    }
    Ok((start as u64 >> 4)
        | ((d.lbo as u64 >> 4) << 16)
        | ((d.sbo as u64 >> 4) << 32)
        | ((d.base_offset as u64) << 49)
        | (swizzle_code(d.swizzle) << 62))
}

/// The shared byte address of element (row `mn`, column `k`) of an operand read through
/// descriptor `d`: A is 64 x 16 (M x K), B is N x 16 (N x K), so `k < 16` for 16-bit types.
/// `major` is the operand's major-ness (its `imm-trans` value), `elem_bytes` the element size
/// (2 for bf16/f16; 1 or 4 work the same way). See the module documentation for the layouts.
#[inline]
pub fn operand_offset(d: &MatrixDesc, major: Major, mn: u32, k: u32, elem_bytes: u32) -> u32 {
    let off = mn_part(d, major, mn, elem_bytes) + k_part(d, major, k, elem_bytes);
    d.swizzle.apply(d.start.wrapping_add(off))
}

/// The part of an operand element's unswizzled byte offset that depends on its row `mn`.
#[inline]
pub(crate) fn mn_part(d: &MatrixDesc, major: Major, mn: u32, elem_bytes: u32) -> u32 {
    let t = 16 / elem_bytes;
    let span = d.swizzle.span_bytes();
    match (major, d.swizzle) {
        (Major::K, Swizzle::None) => (mn % 8) * 16 + (mn / 8) * d.sbo,
        (Major::K, _) => (mn % 8) * span + (mn / 8) * d.sbo,
        (Major::MN, Swizzle::None) => (mn % t) * elem_bytes + (mn / t) * d.sbo,
        (Major::MN, _) => {
            let b = mn * elem_bytes;
            b % span + (b / span) * d.lbo
        }
    }
}

/// The part of an operand element's unswizzled byte offset that depends on its column `k`.
#[inline]
pub(crate) fn k_part(d: &MatrixDesc, major: Major, k: u32, elem_bytes: u32) -> u32 {
    let t = 16 / elem_bytes;
    let span = d.swizzle.span_bytes();
    match (major, d.swizzle) {
        (Major::K, Swizzle::None) => (k % t) * elem_bytes + (k / t) * d.lbo,
        (Major::K, _) => k * elem_bytes,
        (Major::MN, Swizzle::None) => (k % 8) * 16 + (k / 8) * d.lbo,
        (Major::MN, _) => (k % 8) * span + (k / 8) * d.sbo,
    }
}
