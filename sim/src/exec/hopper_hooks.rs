//! The engine's hook points into the Hopper pure functions (TMA box copies, wgmma products).
//!
//! The engine decodes the instructions, resolves operands, checks memory and keeps the
//! mbarrier, async-proxy and wgmma-group state; these two functions are the only places that
//! need the tensor-map, descriptor and register-layout knowledge, which lives in
//! [`crate::hopper`] and [`crate::tensor_map`].

use crate::error::{ErrorKind, SimError};

/// One `wgmma.mma_async` m64nNk16 with f32 accumulators, its operands resolved.
#[derive(Clone, Debug)]
pub(crate) struct WgmmaCall {
    /// N: 8..=256 in steps of 8.
    pub(crate) n: u32,
    pub(crate) bf16: bool,
    /// A from shared memory: its 64-bit matrix descriptor and `imm-trans-a`.
    pub(crate) a_desc: Option<u64>,
    pub(crate) trans_a: u32,
    /// A from registers: the four `.b32` A registers of each of the 128 threads.
    pub(crate) a_regs: Option<Box<[[u32; 4]; 128]>>,
    pub(crate) b_desc: u64,
    pub(crate) trans_b: u32,
    /// `scale-d`: true accumulates onto D, false overwrites it.
    pub(crate) scale_d: bool,
    pub(crate) scale_a: i32,
    pub(crate) scale_b: i32,
}

/// Reads 16 bytes of shared memory at a 16-byte aligned shared address (sanitizer-checked).
pub(crate) type LoadChunk<'a> = dyn FnMut(u32) -> Result<[u8; 16], SimError> + 'a;

/// Reads global bytes at an address into the buffer (bounds, regions, initialisation checked).
pub(crate) type ReadGlobal<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), SimError> + 'a;

/// Runs one wgmma on the warpgroup's accumulators: `regs[t * n / 2 + i]` is f32 register `i`
/// of thread `t` (0..128) of the warpgroup, read and written in place. Shared operands are read
/// through `load_chunk`.
pub(crate) fn wgmma(
    call: &WgmmaCall,
    load_chunk: &mut LoadChunk,
    regs: &mut [f32],
) -> Result<(), SimError> {
    use crate::hopper::desc::{Major, decode};
    use crate::hopper::wgmma::{
        ASource, MmaDtype, MmaOp, gather_accumulators, mma_chunked, scatter_accumulators,
    };
    let a = match (&call.a_desc, &call.a_regs) {
        (Some(d), _) => ASource::Shared {
            desc: decode(*d)?,
            major: Major::from_trans(call.trans_a)?,
        },
        (None, Some(r)) => ASource::Registers(r),
        (None, None) => {
            return Err(SimError::new(
                ErrorKind::Unsupported,
                "wgmma without an A operand",
            ));
        }
    };
    let op = MmaOp {
        n: call.n,
        dtype: if call.bf16 {
            MmaDtype::BF16
        } else {
            MmaDtype::F16
        },
        a,
        b: decode(call.b_desc)?,
        b_major: Major::from_trans(call.trans_b)?,
        scale_d: call.scale_d,
        scale_a: call.scale_a,
        scale_b: call.scale_b,
    };
    let mut d = vec![0f32; 64 * call.n as usize];
    gather_accumulators(call.n, regs, &mut d)?;
    mma_chunked(&op, load_chunk, &mut d)?;
    scatter_accumulators(call.n, &d, regs)
}

/// Loads the box at `coords` through the 128-byte tensor map `map` for a copy into shared
/// address `dst`: returns the box's bytes as they land at `dst..` (swizzled, zero-filled out
/// of bounds), reading global memory through `read_global`.
pub(crate) fn tma_load(
    map: &[u8],
    coords: &[i32],
    dst: u32,
    read_global: &mut ReadGlobal,
) -> Result<Vec<u8>, SimError> {
    let desc = crate::tensor_map::decode(map)?;
    crate::hopper::tma::load_box(&desc, coords, dst, read_global)
}
