//! Tensor maps for TMA on the simulated device: Lathe's own 128-byte encoding of what
//! `cuTensorMapEncodeTiled` describes. On a GPU the driver encodes tensor maps; on the
//! simulator Lathe encodes them here and the interpreter decodes them at `cp.async.bulk.tensor`.
//!
//! The blob (all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `LTMA` |
//! | 4 | format version ([`FORMAT_VERSION`]) |
//! | 5 | rank (1..=5) |
//! | 6 | dtype code ([`TmaDtype::code`]) |
//! | 7 | swizzle code (`CU_TENSOR_MAP_SWIZZLE_*`: 0 none, 1 32B, 2 64B, 3 128B) |
//! | 8..16 | global address (u64) |
//! | 16..56 | dims, 5 x u64 (unused slots zero) |
//! | 56..88 | byte strides of dims 1..rank, 4 x u64 (unused slots zero) |
//! | 88..98 | box dims, 5 x u16 (unused slots zero) |
//! | 98..120 | reserved, zero |
//! | 120..128 | FNV-1a 64 checksum of bytes 0..120 |
//!
//! The checksum makes random or corrupted bytes (a wrong pointer passed as a tensor map, a map
//! overwritten in memory) an error rather than a silent misread.

use crate::error::{ErrorKind, SimError};

/// The largest rank a tiled tensor map may have.
pub const MAX_RANK: usize = 5;
/// The version byte [`encode`] writes and [`decode`] accepts.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: [u8; 4] = *b"LTMA";
const OFF_ADDR: usize = 8;
const OFF_DIMS: usize = 16;
const OFF_STRIDES: usize = 56;
const OFF_BOX: usize = 88;
const OFF_RESERVED: usize = 98;
const OFF_SUM: usize = 120;

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
    /// Bytes per element.
    pub fn size(self) -> u32 {
        match self {
            TmaDtype::U8 => 1,
            TmaDtype::U16 | TmaDtype::F16 | TmaDtype::BF16 => 2,
            TmaDtype::U32 | TmaDtype::F32 => 4,
        }
    }

    /// The `CU_TENSOR_MAP_DATA_TYPE_*` value of this type, the code stored in the blob.
    pub fn code(self) -> u8 {
        match self {
            TmaDtype::U8 => 0,
            TmaDtype::U16 => 1,
            TmaDtype::U32 => 2,
            TmaDtype::F16 => 6,
            TmaDtype::F32 => 7,
            TmaDtype::BF16 => 9,
        }
    }

    /// The inverse of [`TmaDtype::code`].
    pub fn from_code(code: u8) -> Option<TmaDtype> {
        [
            TmaDtype::U8,
            TmaDtype::U16,
            TmaDtype::U32,
            TmaDtype::F16,
            TmaDtype::BF16,
            TmaDtype::F32,
        ]
        .into_iter()
        .find(|t| t.code() == code)
    }
}

/// Shared-memory swizzle of the box (`CU_TENSOR_MAP_SWIZZLE_*`), also the swizzle modes of a
/// wgmma matrix descriptor (which encodes them with different numbers, see
/// [`crate::hopper::desc`]).
///
/// A swizzle of span `S` (32, 64 or 128 bytes) permutes the 16-byte chunks of a shared address:
/// address bits 4.. (the chunk within an `S`-byte row, `log2(S/16)` bits) are XORed with the same
/// number of bits starting at bit 7. The pattern is a function of the absolute shared address and
/// repeats every `8 * S` bytes (256, 512, 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

impl Swizzle {
    /// The `CU_TENSOR_MAP_SWIZZLE_*` value (0 none, 1 32B, 2 64B, 3 128B).
    pub fn code(self) -> u8 {
        match self {
            Swizzle::None => 0,
            Swizzle::B32 => 1,
            Swizzle::B64 => 2,
            Swizzle::B128 => 3,
        }
    }

    /// The inverse of [`Swizzle::code`].
    pub fn from_code(code: u8) -> Option<Swizzle> {
        match code {
            0 => Some(Swizzle::None),
            1 => Some(Swizzle::B32),
            2 => Some(Swizzle::B64),
            3 => Some(Swizzle::B128),
            _ => None,
        }
    }

    /// The span in bytes (the row length of the pattern): 32, 64, 128, or 16 for no swizzle
    /// (one chunk: nothing moves).
    pub fn span_bytes(self) -> u32 {
        match self {
            Swizzle::None => 16,
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }

    /// Bytes after which the pattern repeats (`8 * span`; 128 for no swizzle): the alignment a
    /// buffer needs for its first row to start at phase 0 of the pattern.
    pub fn repeat_bytes(self) -> u32 {
        8 * self.span_bytes()
    }

    /// The physical shared address of logical shared address `addr`. An involution: applying
    /// it twice gives `addr` back, and it maps every aligned `repeat_bytes` block onto itself.
    #[inline]
    pub fn apply(self, addr: u32) -> u32 {
        let mask = self.span_bytes() / 16 - 1;
        addr ^ (((addr >> 7) & mask) << 4)
    }
}

/// A tiled tensor map (what `cuTensorMapEncodeTiled` takes), rank 1 to 5, dimension 0 the
/// contiguous one. Out-of-bounds elements of a box are filled with zeros. Element strides are
/// all 1, interleave is none, and L2 promotion is not modelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapDesc {
    pub dtype: TmaDtype,
    /// Global address of element 0 (16-byte aligned).
    pub global_addr: u64,
    /// Elements per dimension, innermost first (each 1..=2^32).
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (multiples of 16, below 2^40); `dims.len() - 1` entries.
    pub strides: Vec<u64>,
    /// Box size per dimension, in elements (1..=256); the inner extent in bytes is a multiple
    /// of 16 and, when swizzled, at most the swizzle span.
    pub box_dims: Vec<u32>,
    pub swizzle: Swizzle,
}

impl TensorMapDesc {
    /// The rank (number of dimensions).
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Bytes one box occupies in shared memory (product of the box dims times the element size),
    /// the `complete_tx` byte count of one load.
    pub fn box_bytes(&self) -> u64 {
        self.box_dims.iter().map(|&b| b as u64).product::<u64>() * self.dtype.size() as u64
    }

    /// Byte stride of dimension `i` (the element size for dimension 0).
    pub fn stride_bytes(&self, i: usize) -> u64 {
        if i == 0 {
            self.dtype.size() as u64
        } else {
            self.strides[i - 1]
        }
    }
}

fn bad(message: String) -> SimError {
    SimError::new(ErrorKind::TensorMap, format!("tensor map: {message}"))
}

/// Checks `desc` as `cuTensorMapEncodeTiled` does for a tiled map without interleave: rank
/// 1..=5, global address 16-byte aligned, dims 1..=2^32, strides multiples of 16 below 2^40,
/// box dims 1..=256, inner box extent a multiple of 16 bytes and, for the 32/64/128B swizzles,
/// no larger than the swizzle span. Each violation is an [`ErrorKind::TensorMap`] error naming
/// the field and its value.
pub fn validate(desc: &TensorMapDesc) -> Result<(), SimError> {
    let rank = desc.dims.len();
    if !(1..=MAX_RANK).contains(&rank) {
        return Err(bad(format!(
            "rank (dims.len()) = {rank} is outside 1..={MAX_RANK}"
        )));
    }
    if desc.strides.len() != rank - 1 {
        return Err(bad(format!(
            "strides.len() = {} must be rank - 1 = {}",
            desc.strides.len(),
            rank - 1
        )));
    }
    if desc.box_dims.len() != rank {
        return Err(bad(format!(
            "box_dims.len() = {} must equal the rank {rank}",
            desc.box_dims.len()
        )));
    }
    if !desc.global_addr.is_multiple_of(16) {
        return Err(bad(format!(
            "global_addr = {:#x} is not 16-byte aligned",
            desc.global_addr
        )));
    }
    for (i, &d) in desc.dims.iter().enumerate() {
        if !(1..=1u64 << 32).contains(&d) {
            return Err(bad(format!("dims[{i}] = {d} is outside 1..=2^32")));
        }
    }
    for (i, &s) in desc.strides.iter().enumerate() {
        if !s.is_multiple_of(16) {
            return Err(bad(format!(
                "strides[{i}] = {s} bytes is not a multiple of 16"
            )));
        }
        if s >= 1u64 << 40 {
            return Err(bad(format!("strides[{i}] = {s} bytes is not below 2^40")));
        }
    }
    for (i, &b) in desc.box_dims.iter().enumerate() {
        if !(1..=256).contains(&b) {
            return Err(bad(format!("box_dims[{i}] = {b} is outside 1..=256")));
        }
    }
    let inner = desc.box_dims[0] as u64 * desc.dtype.size() as u64;
    if !inner.is_multiple_of(16) {
        return Err(bad(format!(
            "box_dims[0] = {} ({inner} bytes of {:?}) is not a multiple of 16 bytes",
            desc.box_dims[0], desc.dtype
        )));
    }
    if desc.swizzle != Swizzle::None && inner > desc.swizzle.span_bytes() as u64 {
        return Err(bad(format!(
            "box_dims[0] = {} ({inner} bytes) exceeds the {}-byte span of swizzle {:?}",
            desc.box_dims[0],
            desc.swizzle.span_bytes(),
            desc.swizzle
        )));
    }
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn u64_at(blob: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&blob[off..off + 8]);
    u64::from_le_bytes(b)
}

fn u16_at(blob: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([blob[off], blob[off + 1]])
}

/// Encodes `desc` into the 128-byte blob a kernel receives as `.param .align 64 .b8 tm[128]`,
/// after checking it with [`validate`] as the driver would.
pub fn encode(desc: &TensorMapDesc) -> Result<[u8; 128], SimError> {
    validate(desc)?;
    let mut blob = [0u8; 128];
    blob[0..4].copy_from_slice(&MAGIC);
    blob[4] = FORMAT_VERSION;
    blob[5] = desc.rank() as u8;
    blob[6] = desc.dtype.code();
    blob[7] = desc.swizzle.code();
    blob[OFF_ADDR..OFF_ADDR + 8].copy_from_slice(&desc.global_addr.to_le_bytes());
    for (i, d) in desc.dims.iter().enumerate() {
        blob[OFF_DIMS + 8 * i..OFF_DIMS + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    for (i, s) in desc.strides.iter().enumerate() {
        blob[OFF_STRIDES + 8 * i..OFF_STRIDES + 8 * i + 8].copy_from_slice(&s.to_le_bytes());
    }
    for (i, &b) in desc.box_dims.iter().enumerate() {
        // validate() bounds box dims by 256, so they fit in 16 bits.
        blob[OFF_BOX + 2 * i..OFF_BOX + 2 * i + 2].copy_from_slice(&(b as u16).to_le_bytes());
    }
    let sum = fnv1a(&blob[..OFF_SUM]);
    blob[OFF_SUM..].copy_from_slice(&sum.to_le_bytes());
    Ok(blob)
}

/// Decodes a blob written by [`encode`] (exactly 128 bytes, right magic, version and checksum,
/// unused slots zero, and a map that passes [`validate`]); anything else is an
/// [`ErrorKind::TensorMap`] error.
pub fn decode(blob: &[u8]) -> Result<TensorMapDesc, SimError> {
    if blob.len() != 128 {
        return Err(bad(format!("blob is {} bytes, not 128", blob.len())));
    }
    if blob[0..4] != MAGIC {
        return Err(bad(format!(
            "magic = {:02x?} is not {:02x?} (not a tensor map made by lathe_sim::tensor_map::encode)",
            &blob[0..4],
            MAGIC
        )));
    }
    if blob[4] != FORMAT_VERSION {
        return Err(bad(format!(
            "version = {} is not {FORMAT_VERSION}",
            blob[4]
        )));
    }
    let stored = u64_at(blob, OFF_SUM);
    let computed = fnv1a(&blob[..OFF_SUM]);
    if stored != computed {
        return Err(bad(format!(
            "checksum = {stored:#018x} does not match the contents ({computed:#018x}): corrupted map"
        )));
    }
    let rank = blob[5] as usize;
    if !(1..=MAX_RANK).contains(&rank) {
        return Err(bad(format!("rank = {rank} is outside 1..={MAX_RANK}")));
    }
    let dtype = TmaDtype::from_code(blob[6])
        .ok_or_else(|| bad(format!("dtype code = {} is not a known type", blob[6])))?;
    let swizzle = Swizzle::from_code(blob[7])
        .ok_or_else(|| bad(format!("swizzle code = {} is not 0..=3", blob[7])))?;
    let dims: Vec<u64> = (0..MAX_RANK)
        .map(|i| u64_at(blob, OFF_DIMS + 8 * i))
        .collect();
    let strides: Vec<u64> = (0..MAX_RANK - 1)
        .map(|i| u64_at(blob, OFF_STRIDES + 8 * i))
        .collect();
    let boxes: Vec<u32> = (0..MAX_RANK)
        .map(|i| u16_at(blob, OFF_BOX + 2 * i) as u32)
        .collect();
    let unused_nonzero = dims[rank..].iter().any(|&d| d != 0)
        || strides[rank - 1..].iter().any(|&s| s != 0)
        || boxes[rank..].iter().any(|&b| b != 0)
        || blob[OFF_RESERVED..OFF_SUM].iter().any(|&b| b != 0);
    if unused_nonzero {
        return Err(bad(format!(
            "slots past rank {rank} or reserved bytes are not zero"
        )));
    }
    let desc = TensorMapDesc {
        dtype,
        global_addr: u64_at(blob, OFF_ADDR),
        dims: dims[..rank].to_vec(),
        strides: strides[..rank - 1].to_vec(),
        box_dims: boxes[..rank].to_vec(),
        swizzle,
    };
    validate(&desc)?;
    Ok(desc)
}
