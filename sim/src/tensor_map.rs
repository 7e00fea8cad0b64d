//! Tensor maps for TMA on the simulated device: Lathe's own 128-byte encoding of what
//! `cuTensorMapEncodeTiled` describes. On a GPU the driver encodes tensor maps; on the
//! simulator Lathe encodes them here and the interpreter decodes them at `cp.async.bulk.tensor`.

use crate::error::{ErrorKind, SimError};

/// Element types a tensor map can describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaDtype {
    U8,
    U16,
    U32,
    F16,
    BF16,
    F32,
}

impl TmaDtype {
    pub fn size(self) -> u32 {
        match self {
            TmaDtype::U8 => 1,
            TmaDtype::U16 | TmaDtype::F16 | TmaDtype::BF16 => 2,
            TmaDtype::U32 | TmaDtype::F32 => 4,
        }
    }
}

/// Shared-memory swizzle of the box (`CU_TENSOR_MAP_SWIZZLE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

/// A tiled tensor map (what `cuTensorMapEncodeTiled` takes), rank 1 to 5, dimension 0 the
/// contiguous one. Out-of-bounds elements of a box are filled with zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapDesc {
    pub dtype: TmaDtype,
    /// Global address of element 0 (16-byte aligned).
    pub global_addr: u64,
    /// Elements per dimension, innermost first.
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (multiples of 16); `dims.len() - 1` entries.
    pub strides: Vec<u64>,
    /// Box size per dimension, in elements (1..=256).
    pub box_dims: Vec<u32>,
    pub swizzle: Swizzle,
}

/// Encodes `desc` into the 128-byte blob a kernel receives as `.param .align 64 .b8 tm[128]`,
/// after checking it as the driver would.
pub fn encode(desc: &TensorMapDesc) -> Result<[u8; 128], SimError> {
    let _ = desc;
    Err(SimError::new(
        ErrorKind::Unsupported,
        "tensor map encoding is not built yet",
    ))
}

/// Decodes a blob written by [`encode`]; anything else is an [`ErrorKind::TensorMap`] error.
pub fn decode(blob: &[u8]) -> Result<TensorMapDesc, SimError> {
    let _ = blob;
    Err(SimError::new(
        ErrorKind::TensorMap,
        "tensor map decoding is not built yet",
    ))
}
