//! `Device`: one CUDA device with its context, streams, module cache and caching allocator.

use crate::alloc::{AllocError, CachingAllocator, MemoryStats, RawError, RawMemory};
use crate::driver::{device_count, ensure_driver};
use crate::error::{Context, Error, Result};
use crate::module::ModuleCache;
use crate::stream::Stream;
use cudarc::driver::{CudaContext, result, sys};
use std::sync::Arc;

/// Driver memory for the caching allocator.
pub(crate) struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl RawMemory for DriverMemory {
    fn alloc(&self, bytes: usize) -> Result<u64, RawError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| RawError::Other(e.to_string()))?;
        // SAFETY: the context is current on this thread; the size is non-zero (class sizes
        // are at least 512 bytes).
        match unsafe { result::malloc_sync(bytes) } {
            Ok(p) => Ok(p),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(RawError::OutOfMemory),
            Err(e) => Err(RawError::Other(format!("cuMemAlloc({bytes}): {e}"))),
        }
    }

    unsafe fn free(&self, ptr: u64) {
        // An error here (device lost) cannot be acted on: the pointer is dropped either way.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the caller guarantees the pointer came from cuMemAlloc and is idle.
        let _ = unsafe { result::free_sync(ptr) };
    }

    fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    fn synchronize(&self) {
        let _ = self.ctx.synchronize();
    }
}

pub(crate) struct DeviceInner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) ordinal: usize,
    pub(crate) name: String,
    pub(crate) cc: (u32, u32),
    pub(crate) sm_count: u32,
    pub(crate) max_shared_optin: u32,
    pub(crate) compute: Stream,
    pub(crate) copy: Stream,
    pub(crate) modules: ModuleCache,
    pub(crate) alloc: CachingAllocator<DriverMemory>,
    pub(crate) timer: std::sync::Mutex<Option<crate::timing::KernelTimer>>,
}

/// One CUDA device. Cheap to clone (shared).
///
/// Holds two streams: `compute` for kernels and `copy` for host/device transfers that overlap
/// compute. Without a driver or device, [`Device::cuda`] returns an error, never panics.
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Device {
    /// The number of CUDA devices (an error when there is no driver).
    pub fn count() -> Result<usize> {
        device_count()
    }

    /// Opens device `ordinal` (its primary context).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        ensure_driver()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).ctx("cuCtxCreate")?;
        let attr = |a| ctx.attribute(a).ctx("cuDeviceGetAttribute");
        use sys::CUdevice_attribute::*;
        let cc = (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_shared_optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let name = ctx.name().ctx("cuDeviceGetName")?;
        let compute = Stream {
            inner: ctx.new_stream().ctx("cuStreamCreate")?,
        };
        let copy = Stream {
            inner: ctx.new_stream().ctx("cuStreamCreate")?,
        };
        let alloc = CachingAllocator::new(DriverMemory { ctx: ctx.clone() });
        Ok(Device {
            inner: Arc::new(DeviceInner {
                ctx,
                ordinal,
                name,
                cc,
                sm_count,
                max_shared_optin,
                compute,
                copy,
                modules: ModuleCache::default(),
                alloc,
                timer: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// (major, minor), e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.cc
    }

    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.inner.ctx.mem_get_info().ctx("cuMemGetInfo")
    }

    /// "cuda:0 NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
    pub fn describe(&self) -> String {
        let (ma, mi) = self.inner.cc;
        format!(
            "cuda:{} {} (sm_{ma}{mi}, {} SMs)",
            self.inner.ordinal, self.inner.name, self.inner.sm_count
        )
    }

    /// The stream kernels run on.
    pub fn compute_stream(&self) -> &Stream {
        &self.inner.compute
    }

    /// The stream host/device copies that overlap compute run on.
    pub fn copy_stream(&self) -> &Stream {
        &self.inner.copy
    }

    /// A new stream on this device.
    pub fn new_stream(&self) -> Result<Stream> {
        Ok(Stream {
            inner: self.inner.ctx.new_stream().ctx("cuStreamCreate")?,
        })
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.ctx.synchronize().ctx("cuCtxSynchronize")
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().ctx("cuCtxSetCurrent")
    }

    /// The allocator's statistics (allocated, reserved, peaks, counts).
    pub fn memory_stats(&self) -> MemoryStats {
        self.inner.alloc.stats()
    }

    /// Restarts the allocator's peaks (like `torch.cuda.reset_peak_memory_stats`).
    pub fn reset_peak_memory(&self) {
        self.inner.alloc.reset_peak()
    }

    /// Gives cached free blocks back to the driver.
    pub fn empty_cache(&self) {
        self.inner.alloc.empty_cache()
    }

    /// The underlying cudarc context, for code that needs cudarc directly (NCCL, cuBLASLt).
    pub fn cudarc_context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    pub(crate) fn alloc_error(&self, e: AllocError) -> Error {
        match e {
            AllocError::OutOfMemory {
                requested,
                free,
                total,
                stats,
            } => Error::OutOfMemory {
                device: self.describe(),
                requested,
                free,
                total,
                allocated: stats.allocated,
                reserved: stats.reserved,
                peak: stats.peak_allocated,
            },
            AllocError::Other(e) => Error::Invalid(format!("device allocation failed: {e}")),
        }
    }
}
