//! `Device`: one GPU (a CUDA context) or one simulated GPU (lathe-sim), with its streams,
//! module cache and caching allocator, behind one API.

use crate::alloc::{AllocError, CachingAllocator, MemoryStats, RawError, RawMemory};
use crate::driver::{device_count, ensure_driver};
use crate::error::{Context, Error, Result};
use crate::module::ModuleCache;
use crate::stream::Stream;
use cudarc::driver::{CudaContext, result, sys};
use lathe_sim::{Sim, SimConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// The simulated device's memory for the caching allocator.
pub(crate) struct SimMemory {
    sim: Sim,
}

impl RawMemory for SimMemory {
    fn alloc(&self, bytes: usize) -> Result<u64, RawError> {
        match self.sim.alloc(bytes as u64) {
            Ok(p) => Ok(p),
            Err(e) if e.kind == lathe_sim::ErrorKind::OutOfMemory => Err(RawError::OutOfMemory),
            Err(e) => Err(RawError::Other(e.to_string())),
        }
    }

    unsafe fn free(&self, ptr: u64) {
        // The allocator only frees what `alloc` returned; an error would be a bug in it, and
        // there is nothing to do about one here.
        let _ = self.sim.free(ptr);
    }

    fn mem_info(&self) -> (usize, usize) {
        let (free, total) = self.sim.mem_info();
        (free as usize, total as usize)
    }

    fn synchronize(&self) {}
}

/// The memory under a device's caching allocator.
pub(crate) enum DeviceMemory {
    Driver(DriverMemory),
    Sim(SimMemory),
}

impl RawMemory for DeviceMemory {
    fn alloc(&self, bytes: usize) -> Result<u64, RawError> {
        match self {
            DeviceMemory::Driver(m) => m.alloc(bytes),
            DeviceMemory::Sim(m) => m.alloc(bytes),
        }
    }

    unsafe fn free(&self, ptr: u64) {
        match self {
            // SAFETY: forwarded with the caller's guarantee.
            DeviceMemory::Driver(m) => unsafe { m.free(ptr) },
            // SAFETY: as above.
            DeviceMemory::Sim(m) => unsafe { m.free(ptr) },
        }
    }

    fn mem_info(&self) -> (usize, usize) {
        match self {
            DeviceMemory::Driver(m) => m.mem_info(),
            DeviceMemory::Sim(m) => m.mem_info(),
        }
    }

    fn synchronize(&self) {
        match self {
            DeviceMemory::Driver(m) => m.synchronize(),
            DeviceMemory::Sim(m) => m.synchronize(),
        }
    }
}

/// What a device runs on.
pub(crate) enum Backend {
    Cuda {
        ctx: Arc<CudaContext>,
        modules: ModuleCache,
    },
    Sim {
        sim: Sim,
        /// Parsed modules by name (each module parsed once per device).
        modules: Mutex<HashMap<&'static str, lathe_sim::Module>>,
    },
}

pub(crate) struct DeviceInner {
    pub(crate) backend: Backend,
    pub(crate) ordinal: usize,
    pub(crate) name: String,
    pub(crate) cc: (u32, u32),
    pub(crate) sm_count: u32,
    pub(crate) max_shared_optin: u32,
    pub(crate) compute: Stream,
    pub(crate) copy: Stream,
    pub(crate) alloc: CachingAllocator<DeviceMemory>,
    pub(crate) timer: std::sync::Mutex<Option<crate::timing::KernelTimer>>,
}

/// One device: a CUDA GPU ([`Device::cuda`]) or Lathe's simulated GPU ([`Device::sim`]).
/// Cheap to clone (shared).
///
/// Holds two streams: `compute` for kernels and `copy` for host/device transfers that overlap
/// compute. Without a driver or device, [`Device::cuda`] returns an error, never panics.
/// Buffers, copies, streams, events, module loading, the caching allocator and typed launches
/// behave the same on both kinds; the simulated device runs each launch to completion when it
/// is submitted, checks it with its sanitizer and counts what it did instead of timing it.
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

    /// Opens CUDA device `ordinal` (its primary context).
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
        let compute = Stream::cuda(ctx.new_stream().ctx("cuStreamCreate")?);
        let copy = Stream::cuda(ctx.new_stream().ctx("cuStreamCreate")?);
        let alloc = CachingAllocator::new(DeviceMemory::Driver(DriverMemory { ctx: ctx.clone() }));
        Ok(Device {
            inner: Arc::new(DeviceInner {
                backend: Backend::Cuda {
                    ctx,
                    modules: ModuleCache::default(),
                },
                ordinal,
                name,
                cc,
                sm_count,
                max_shared_optin,
                compute,
                copy,
                alloc,
                timer: std::sync::Mutex::new(None),
            }),
        })
    }

    /// A new simulated GPU with an H100's properties (sm_90a, 132 SMs, 227 KiB of opt-in
    /// shared memory) and the default memory size (`LATHE_SIM_MEMORY` bytes if set, else
    /// 16 GiB). Each call makes a separate device with its own memory.
    pub fn sim() -> Result<Device> {
        let mut config = SimConfig::default();
        if let Ok(v) = std::env::var("LATHE_SIM_MEMORY") {
            config.memory_bytes = parse_bytes(&v).ok_or_else(|| {
                Error::Invalid(format!(
                    "LATHE_SIM_MEMORY={v:?} is not a size in bytes (e.g. 1073741824, 512M, 2G)"
                ))
            })?;
        }
        Ok(Device::sim_with(config))
    }

    /// A new simulated GPU with the given properties (e.g. a small `memory_bytes` to test
    /// out-of-memory handling).
    pub fn sim_with(config: SimConfig) -> Device {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let sim = Sim::new(config);
        let c = sim.config();
        let alloc = CachingAllocator::new(DeviceMemory::Sim(SimMemory { sim: sim.clone() }));
        Device {
            inner: Arc::new(DeviceInner {
                ordinal: NEXT.fetch_add(1, Ordering::Relaxed),
                name: c.name.clone(),
                cc: c.compute_capability,
                sm_count: c.sm_count,
                max_shared_optin: c.max_shared_per_block_optin,
                compute: Stream::sim(),
                copy: Stream::sim(),
                alloc,
                timer: std::sync::Mutex::new(None),
                backend: Backend::Sim {
                    sim,
                    modules: Mutex::new(HashMap::new()),
                },
            }),
        }
    }

    /// Whether this is the simulated device.
    pub fn is_sim(&self) -> bool {
        matches!(self.inner.backend, Backend::Sim { .. })
    }

    /// The simulator behind a simulated device (`None` on a GPU).
    pub fn sim_device(&self) -> Option<&Sim> {
        match &self.inner.backend {
            Backend::Sim { sim, .. } => Some(sim),
            Backend::Cuda { .. } => None,
        }
    }

    /// The ordinal: the CUDA device number, or the simulated device's number in this process.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// (major, minor), e.g. (9, 0) for an H100 and for the simulated device.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.cc
    }

    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// Shared memory one block may use after opting in, in bytes.
    pub fn max_shared_per_block_optin(&self) -> u32 {
        self.inner.max_shared_optin
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        match &self.inner.backend {
            Backend::Cuda { ctx, .. } => ctx.mem_get_info().ctx("cuMemGetInfo"),
            Backend::Sim { sim, .. } => {
                let (free, total) = sim.mem_info();
                Ok((free as usize, total as usize))
            }
        }
    }

    /// "cuda:0 NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" or "sim:0 Lathe simulated H100 ...".
    pub fn describe(&self) -> String {
        let (ma, mi) = self.inner.cc;
        let kind = if self.is_sim() { "sim" } else { "cuda" };
        format!(
            "{kind}:{} {} (sm_{ma}{mi}, {} SMs)",
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
        match &self.inner.backend {
            Backend::Cuda { ctx, .. } => Ok(Stream::cuda(ctx.new_stream().ctx("cuStreamCreate")?)),
            Backend::Sim { .. } => Ok(Stream::sim()),
        }
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { ctx, .. } => ctx.synchronize().ctx("cuCtxSynchronize"),
            Backend::Sim { .. } => Ok(()),
        }
    }

    /// Makes this device's context current on the calling thread (nothing to do on the
    /// simulated device).
    pub fn bind(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { ctx, .. } => ctx.bind_to_thread().ctx("cuCtxSetCurrent"),
            Backend::Sim { .. } => Ok(()),
        }
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

    /// The underlying cudarc context, for code that needs cudarc directly (NCCL, cuBLASLt);
    /// an error on the simulated device.
    pub fn cudarc_context(&self) -> Result<&Arc<CudaContext>> {
        match &self.inner.backend {
            Backend::Cuda { ctx, .. } => Ok(ctx),
            Backend::Sim { .. } => Err(Error::Invalid(format!(
                "{} is simulated: it has no CUDA context",
                self.describe()
            ))),
        }
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

/// Parses "123", "512K", "64M", "2G" (powers of 1024) into bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes_parse() {
        assert_eq!(super::parse_bytes("1024"), Some(1024));
        assert_eq!(super::parse_bytes("512M"), Some(512 << 20));
        assert_eq!(super::parse_bytes("2G"), Some(2 << 30));
        assert_eq!(super::parse_bytes("x"), None);
        assert_eq!(super::parse_bytes(""), None);
    }
}
