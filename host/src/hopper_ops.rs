//! Typed launches of the Hopper GEMM ([`lathe_kernels::hopper`]), with TMA tensor maps built on
//! the host.
//!
//! `C(m, n) = A(m, k) B(n, k)^T`: A and B bf16 row-major with K contiguous, C f32 or bf16
//! row-major `(m, n)`. Runs on compute capability 9.0 only (sm_90a code).
//!
//! The kernels take two 128-byte `CUtensorMap` values by value (`.param .align 64 .b8 [128]`),
//! which [`Device::launch`]'s 8-byte argument slots cannot carry, so this file loads the module
//! and launches through the driver itself: [`HopperGemm`] owns the loaded module and its two
//! functions (f32 and bf16 output), opted in to the dynamic shared memory the ring needs.
//!
//! Requirements, checked before anything reaches the driver (TMA's rules for a 2-D bf16
//! tensor map): `k` a multiple of 8 (the row stride `2k` bytes must be a multiple of 16),
//! A and B 16-byte aligned, C 16-byte aligned, `1 <= m, n, k < 2^31`.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Context, Error, Result};
use crate::stream::Stream;
use cudarc::driver::{result, sys};
use half::bf16;
use lathe_kernels::Elem;
use lathe_kernels::hopper::{self, BK, BM, BN, THREADS};
use std::ffi::{CString, c_void};

pub use lathe_kernels::hopper::Version;

/// A TMA descriptor as the kernel parameter expects it: 128 bytes, at least 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap(pub sys::CUtensorMap);

impl std::fmt::Debug for TensorMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TensorMap(..)")
    }
}

/// Largest m, n or k a launch takes (TMA coordinates and the kernel's index math are 32-bit).
pub const MAX_DIM: usize = (1 << 31) - 1;

fn invalid(msg: String) -> Error {
    Error::Invalid(format!("hopper gemm: {msg}"))
}

/// Checks a problem shape against what the kernel and TMA accept.
pub fn check_shape(m: usize, n: usize, k: usize) -> Result<()> {
    for (name, v) in [("m", m), ("n", n), ("k", k)] {
        if v == 0 {
            return Err(invalid(format!(
                "{name} = 0: an empty problem (k = 0 would leave C unwritten; fill C instead)"
            )));
        }
        if v > MAX_DIM {
            return Err(invalid(format!("{name} = {v} exceeds {MAX_DIM}")));
        }
    }
    if !k.is_multiple_of(8) {
        return Err(invalid(format!(
            "k = {k}: rows of A and B are {} bytes, TMA needs a multiple of 16 (k a multiple of \
             8); pad K with zeros",
            2 * k
        )));
    }
    Ok(())
}

/// Checks a device address for the 16-byte alignment TMA (and the vector epilogue) need.
pub fn check_aligned(what: &str, addr: u64) -> Result<()> {
    if !addr.is_multiple_of(16) {
        return Err(invalid(format!(
            "{what} at {addr:#x} is not 16-byte aligned (TMA requires it)"
        )));
    }
    Ok(())
}

/// A 2-D tensor map over a row-major bf16 matrix `(rows, k)` (K contiguous), boxes of
/// `box_rows` rows x 64 K elements, 128-byte swizzle, out-of-bounds elements read as zero.
pub fn encode_k_major(
    what: &str,
    addr: u64,
    rows: usize,
    k: usize,
    box_rows: u32,
) -> Result<TensorMap> {
    check_aligned(what, addr)?;
    if rows == 0 || rows > MAX_DIM || k == 0 || k > MAX_DIM || !k.is_multiple_of(8) {
        return Err(invalid(format!(
            "{what}: ({rows}, {k}) cannot be described by a tensor map (need 1 <= rows, k < 2^31 \
             and k a multiple of 8)"
        )));
    }
    let dims: [u64; 2] = [k as u64, rows as u64];
    let strides: [u64; 1] = [2 * k as u64];
    let boxd: [u32; 2] = [BK, box_rows];
    let elem: [u32; 2] = [1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: `map` is writable 128-byte storage; the dimension, stride, box and element-stride
    // arrays have rank (2) and rank - 1 (1) entries and live across the call; the address is
    // a 16-byte aligned device pointer and the values satisfy the documented limits (checked
    // above: box inner extent 64 x 2 B = 128 B for the 128B swizzle, box rows <= 256).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
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
    // SAFETY: the driver filled the map on success; it was zero-initialised before.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// One loaded version of the Hopper GEMM on one device.
pub struct HopperGemm {
    dev: Device,
    version: Version,
    module: sys::CUmodule,
    f32_out: sys::CUfunction,
    bf16_out: sys::CUfunction,
}

// SAFETY: module and function handles may be used from any thread with their context current;
// every use below binds the device's context first, and nothing mutates them after loading.
unsafe impl Send for HopperGemm {}
// SAFETY: as above.
unsafe impl Sync for HopperGemm {}

impl std::fmt::Debug for HopperGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HopperGemm v{} on {}",
            self.version.number(),
            self.dev.describe()
        )
    }
}

impl Drop for HopperGemm {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        // SAFETY: loaded in `new`, unloaded once; functions of it are not used after this.
        let _ = unsafe { result::module::unload(self.module) };
    }
}

fn jit_load(dev: &Device, name: &str, ptx: &str) -> Result<sys::CUmodule> {
    let src =
        CString::new(ptx).map_err(|_| invalid(format!("PTX of `{name}` holds a NUL byte")))?;
    const LOG: usize = 16 * 1024;
    let mut err_log = vec![0u8; LOG];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut values: [*mut c_void; 2] = [err_log.as_mut_ptr().cast(), LOG as *mut c_void];
    let mut raw: sys::CUmodule = std::ptr::null_mut();
    dev.bind()?;
    // SAFETY: the context is current; `src` is NUL-terminated PTX; both option arrays have 2
    // entries; the log buffer outlives the call and its size is passed by value as the driver
    // API specifies for *_SIZE_BYTES options.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            &mut raw,
            src.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        let end = err_log.iter().position(|&c| c == 0).unwrap_or(LOG);
        return Err(Error::Jit {
            module: name.to_string(),
            device: dev.describe(),
            source: result::DriverError(r),
            log: String::from_utf8_lossy(&err_log[..end]).into_owned(),
        });
    }
    Ok(raw)
}

impl HopperGemm {
    /// JIT-loads `version` on `dev` and opts its functions in to the shared memory they use.
    /// Fails with [`Error::UnsupportedTarget`] on a device that is not compute capability 9.0.
    pub fn new(dev: &Device, version: Version) -> Result<HopperGemm> {
        let k32 = hopper::kernel_for(version, Elem::F32)
            .ok_or_else(|| invalid(format!("no f32 kernel for v{}", version.number())))?;
        let k16 = hopper::kernel_for(version, Elem::BF16)
            .ok_or_else(|| invalid(format!("no bf16 kernel for v{}", version.number())))?;
        let cc = dev.compute_capability();
        if !k32.module.target.runs_on(cc) {
            return Err(Error::UnsupportedTarget {
                entry: k32.entry,
                target: k32.module.target.name(),
                device: dev.describe(),
                major: cc.0,
                minor: cc.1,
            });
        }
        let optin = dev
            .cudarc_context()
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .ctx("cuDeviceGetAttribute")? as u32;
        let smem = hopper::shared_bytes();
        if smem > optin {
            return Err(invalid(format!(
                "needs {smem} bytes of shared memory per block, {} allows {optin}",
                dev.describe()
            )));
        }
        let module = jit_load(dev, k32.module.name, &(k32.module.ptx)())?;
        let mut g = HopperGemm {
            dev: dev.clone(),
            version,
            module,
            f32_out: std::ptr::null_mut(),
            bf16_out: std::ptr::null_mut(),
        };
        for (slot, k) in [(&mut g.f32_out, k32), (&mut g.bf16_out, k16)] {
            let name = CString::new(k.entry).map_err(|_| invalid("NUL in entry".into()))?;
            // SAFETY: the module is loaded in this device's context, bound by jit_load.
            let f = unsafe { result::module::get_function(g.module, name) }
                .ctx("cuModuleGetFunction")?;
            // SAFETY: a valid function handle; the size is within the device's opt-in limit.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .ctx("cuFuncSetAttribute")?;
            *slot = f;
        }
        Ok(g)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// `C(m, n) = A(m, k) B(n, k)^T` on the compute stream. `a` holds at least `m * k` bf16
    /// (row-major, K contiguous), `b` at least `n * k`, `c` at least `m * n` elements of `O`
    /// (f32 or bf16), row-major. C is written, never read.
    pub fn gemm<O: DeviceElem>(
        &self,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<O>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm_on(self.dev.compute_stream(), a, b, c, m, n, k)
    }

    /// [`HopperGemm::gemm`] on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_on<O: DeviceElem>(
        &self,
        stream: &Stream,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<O>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        check_shape(m, n, k)?;
        let f = match O::ELEM {
            Elem::F32 => self.f32_out,
            Elem::BF16 => self.bf16_out,
            other => {
                return Err(invalid(format!(
                    "C must be f32 or bf16, got {}",
                    other.name()
                )));
            }
        };
        for (what, len, need) in [
            ("A", a.len(), m * k),
            ("B", b.len(), n * k),
            ("C", c.len(), m * n),
        ] {
            if len < need {
                return Err(invalid(format!(
                    "{what} holds {len} elements, (m, n, k) = ({m}, {n}, {k}) needs {need}"
                )));
            }
        }
        check_aligned("C", c.addr())?;
        let mut tm_a = encode_k_major("A", a.addr(), m, k, BM)?;
        let mut tm_b = encode_k_major("B", b.addr(), n, k, BN)?;
        let (tiles_m, tiles_n) = hopper::tiles(m as u64, n as u64);
        let grid = (tiles_m * tiles_n).min(self.dev.sm_count().max(1) as u64) as u32;
        let mut c_addr = c.addr();
        let (mut mm, mut nn, mut kk) = (m as u32, n as u32, k as u32);
        let mut params: [*mut c_void; 6] = [
            (&mut tm_a as *mut TensorMap).cast(),
            (&mut tm_b as *mut TensorMap).cast(),
            (&mut c_addr as *mut u64).cast(),
            (&mut mm as *mut u32).cast(),
            (&mut nn as *mut u32).cast(),
            (&mut kk as *mut u32).cast(),
        ];
        self.dev.bind()?;
        // SAFETY: the parameter list matches the PTX entry (two 128-byte tensor maps, a u64
        // pointer, three u32) and each value lives until the call returns (the driver copies
        // them at launch). The tensor maps describe live Lathe buffers of at least the lengths
        // checked above; C holds m * n elements. The buffers return to a stream-ordered pool
        // when dropped, so they stay valid for work already queued on their stream.
        unsafe {
            result::launch_kernel(
                f,
                (grid, 1, 1),
                (THREADS, 1, 1),
                hopper::shared_bytes(),
                stream.raw(),
                &mut params,
            )
        }
        .ctx("cuLaunchKernel")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_tma_cannot_describe_are_rejected_with_the_reason() {
        assert!(check_shape(128, 256, 64).is_ok());
        assert!(check_shape(129, 255, 72).is_ok());
        let e = check_shape(128, 128, 60).unwrap_err().to_string();
        assert!(e.contains("k = 60") && e.contains("multiple of 16"), "{e}");
        let e = check_shape(0, 128, 64).unwrap_err().to_string();
        assert!(e.contains("m = 0"), "{e}");
        assert!(check_shape(1 << 31, 8, 8).is_err());
        assert!(check_aligned("A", 0x1000).is_ok());
        let e = check_aligned("B", 0x1008).unwrap_err().to_string();
        assert!(e.contains("B at 0x1008"), "{e}");
    }

    #[test]
    fn tensor_map_is_128_bytes_aligned_to_at_least_64() {
        // CUDA 13's header aligns CUtensorMap to 128; the kernel parameter needs 64.
        assert_eq!(size_of::<TensorMap>(), 128);
        assert!(align_of::<TensorMap>() >= 64);
    }
}
