//! TMA tensor maps as kernel arguments, on a GPU (`cuTensorMapEncodeTiled`) and on the
//! simulated device (Lathe's own encoding, `lathe_sim::tensor_map`).

use crate::device::{Backend, Device};
use crate::error::{Error, Result};
use crate::module::{KernelArg, TensorMapBytes};
use cudarc::driver::{result, sys};
use lathe_kernels::Elem;
use std::ffi::c_void;

/// The shared-memory swizzle of a TMA box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmaSwizzle {
    None,
    B32,
    B64,
    B128,
}

/// A tiled tensor map over a tensor in device memory, dimension 0 the contiguous one.
/// Out-of-bounds elements of a box read as zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    pub elem: Elem,
    /// Device address of element 0 (16-byte aligned).
    pub addr: u64,
    /// Elements per dimension, innermost first (rank 1 to 5).
    pub dims: Vec<u64>,
    /// Byte strides of dimensions 1.. (`dims.len() - 1` entries, multiples of 16).
    pub strides: Vec<u64>,
    /// Box size per dimension, in elements (1 to 256).
    pub box_dims: Vec<u32>,
    pub swizzle: TmaSwizzle,
}

impl TensorMapSpec {
    /// The bytes from element 0 to one past the last element the map can reach.
    pub fn extent_bytes(&self) -> u64 {
        let inner = self.dims.first().copied().unwrap_or(0) * self.elem.size() as u64;
        self.dims
            .iter()
            .skip(1)
            .zip(&self.strides)
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<u64>()
            + inner
    }

    fn check(&self) -> Result<()> {
        let rank = self.dims.len();
        if !(1..=5).contains(&rank) || self.strides.len() + 1 != rank || self.box_dims.len() != rank
        {
            return Err(Error::Invalid(format!(
                "tensor map: rank {rank} with {} strides and {} box dimensions (need rank 1 to \
                 5, rank - 1 strides, rank box dimensions)",
                self.strides.len(),
                self.box_dims.len()
            )));
        }
        Ok(())
    }
}

fn sim_dtype(e: Elem) -> lathe_sim::tensor_map::TmaDtype {
    use lathe_sim::tensor_map::TmaDtype;
    match e {
        Elem::F32 => TmaDtype::F32,
        Elem::F16 => TmaDtype::F16,
        Elem::BF16 => TmaDtype::BF16,
        Elem::U16 => TmaDtype::U16,
        Elem::U32 | Elem::I32 => TmaDtype::U32,
    }
}

fn cuda_dtype(e: Elem) -> sys::CUtensorMapDataType {
    use sys::CUtensorMapDataType::*;
    match e {
        Elem::F32 => CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        Elem::F16 => CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        Elem::BF16 => CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        Elem::U16 => CU_TENSOR_MAP_DATA_TYPE_UINT16,
        Elem::U32 => CU_TENSOR_MAP_DATA_TYPE_UINT32,
        Elem::I32 => CU_TENSOR_MAP_DATA_TYPE_INT32,
    }
}

impl Device {
    /// Encodes `spec` for this device and returns it as a kernel argument (checked against a
    /// descriptor's `ArgKind::TensorMap` like any other argument).
    pub fn tensor_map(&self, spec: &TensorMapSpec) -> Result<KernelArg> {
        spec.check()?;
        let map = match &self.inner.backend {
            Backend::Sim { .. } => {
                use lathe_sim::tensor_map::{Swizzle, TensorMapDesc, encode};
                let desc = TensorMapDesc {
                    dtype: sim_dtype(spec.elem),
                    global_addr: spec.addr,
                    dims: spec.dims.clone(),
                    strides: spec.strides.clone(),
                    box_dims: spec.box_dims.clone(),
                    swizzle: match spec.swizzle {
                        TmaSwizzle::None => Swizzle::None,
                        TmaSwizzle::B32 => Swizzle::B32,
                        TmaSwizzle::B64 => Swizzle::B64,
                        TmaSwizzle::B128 => Swizzle::B128,
                    },
                };
                TensorMapBytes(encode(&desc).map_err(|e| Error::sim("tensor map encoding", e))?)
            }
            Backend::Cuda { .. } => self.encode_cuda(spec)?,
        };
        Ok(KernelArg::TensorMap {
            map,
            elem: spec.elem,
            addr: spec.addr,
            bytes: spec.extent_bytes(),
        })
    }

    fn encode_cuda(&self, spec: &TensorMapSpec) -> Result<TensorMapBytes> {
        use sys::CUtensorMapSwizzle::*;
        let rank = spec.dims.len();
        let elem_strides = vec![1u32; rank];
        let swizzle = match spec.swizzle {
            TmaSwizzle::None => CU_TENSOR_MAP_SWIZZLE_NONE,
            TmaSwizzle::B32 => CU_TENSOR_MAP_SWIZZLE_32B,
            TmaSwizzle::B64 => CU_TENSOR_MAP_SWIZZLE_64B,
            TmaSwizzle::B128 => CU_TENSOR_MAP_SWIZZLE_128B,
        };
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: `map` is writable 128-byte storage; the dimension, stride, box and element-
        // stride arrays have `rank` and `rank - 1` entries (checked) and live across the call;
        // the driver validates the values and reports violations as an error code.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                cuda_dtype(spec.elem),
                rank as u32,
                spec.addr as *mut c_void,
                spec.dims.as_ptr(),
                spec.strides.as_ptr(),
                spec.box_dims.as_ptr(),
                elem_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Driver {
                call: "cuTensorMapEncodeTiled",
                source: result::DriverError(r),
            });
        }
        // SAFETY: the driver filled the map on success; CUtensorMap is 128 plain bytes.
        let raw: [u8; 128] = unsafe { std::mem::transmute(map.assume_init()) };
        Ok(TensorMapBytes(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_covers_the_last_element() {
        let s = TensorMapSpec {
            elem: Elem::BF16,
            addr: 0,
            dims: vec![64, 3],
            strides: vec![256],
            box_dims: vec![64, 2],
            swizzle: TmaSwizzle::B128,
        };
        assert_eq!(s.extent_bytes(), 2 * 256 + 128);
        assert!(s.check().is_ok());
        let bad = TensorMapSpec {
            strides: vec![],
            ..s
        };
        assert!(bad.check().unwrap_err().to_string().contains("rank 2"));
    }

    #[test]
    fn tensor_map_bytes_are_128_aligned_to_64() {
        assert_eq!(size_of::<TensorMapBytes>(), 128);
        assert_eq!(align_of::<TensorMapBytes>(), 64);
        assert_eq!(size_of::<sys::CUtensorMap>(), 128);
    }
}
