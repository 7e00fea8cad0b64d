//! Device buffers from the caching allocator, pinned host buffers, and copies between them.

use crate::alloc::{Block, Pending};
use crate::device::{Backend, Device};
use crate::error::{Context, Error, Result};
use crate::module::KernelArg;
use crate::stream::{Event, Stream};
use cudarc::driver::result;
use half::{bf16, f16};
use lathe_kernels::Elem;
use std::marker::PhantomData;

/// Element types a device buffer can hold, with the kernel element type they map to.
pub trait DeviceElem: bytemuck::Pod + Send + Sync + 'static {
    const ELEM: Elem;
}
impl DeviceElem for f32 {
    const ELEM: Elem = Elem::F32;
}
impl DeviceElem for bf16 {
    const ELEM: Elem = Elem::BF16;
}
impl DeviceElem for f16 {
    const ELEM: Elem = Elem::F16;
}
impl DeviceElem for u16 {
    const ELEM: Elem = Elem::U16;
}
impl DeviceElem for u32 {
    const ELEM: Elem = Elem::U32;
}
impl DeviceElem for i32 {
    const ELEM: Elem = Elem::I32;
}

/// `len` elements of `T` in device memory, from the device's caching allocator.
///
/// Allocated for a stream (the compute stream by default). Dropping it returns the block to
/// that stream's pool, where later work on the same stream may reuse it: stream order makes
/// that safe. If the buffer was also used on another stream, call [`DeviceBuffer::record_stream`]
/// so the block waits for that stream too.
pub struct DeviceBuffer<T: DeviceElem> {
    block: Option<Block>,
    len: usize,
    dev: Device,
    other_streams: Vec<Stream>,
    _t: PhantomData<T>,
}

impl<T: DeviceElem> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer<{}>[{}] at {:#x}",
            T::ELEM.name(),
            self.len,
            self.addr()
        )
    }
}

impl<T: DeviceElem> DeviceBuffer<T> {
    /// The device address of element 0.
    pub fn addr(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.ptr)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// A read-only kernel argument.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr {
            addr: self.addr(),
            elem: T::ELEM,
            len: self.len,
            writable: false,
        }
    }

    /// A kernel argument the kernel may write (needs `&mut`: one writer at a time).
    pub fn arg_mut(&mut self) -> KernelArg {
        KernelArg::Ptr {
            addr: self.addr(),
            elem: T::ELEM,
            len: self.len,
            writable: true,
        }
    }

    /// A read-only kernel argument for the elements `range` of the buffer (the kernel sees a
    /// buffer of `range.len()` elements starting at `range.start`).
    pub fn arg_range(&self, range: std::ops::Range<usize>) -> Result<KernelArg> {
        self.range_check("kernel argument", range.start, range.len())?;
        Ok(KernelArg::Ptr {
            addr: self.addr() + (range.start * size_of::<T>()) as u64,
            elem: T::ELEM,
            len: range.len(),
            writable: false,
        })
    }

    /// [`DeviceBuffer::arg_range`] the kernel may write.
    pub fn arg_range_mut(&mut self, range: std::ops::Range<usize>) -> Result<KernelArg> {
        self.range_check("kernel argument", range.start, range.len())?;
        Ok(KernelArg::Ptr {
            addr: self.addr() + (range.start * size_of::<T>()) as u64,
            elem: T::ELEM,
            len: range.len(),
            writable: true,
        })
    }

    /// Marks the buffer as used on `stream` too: when freed, its block is reused only after
    /// the work `stream` has at that time is done.
    pub fn record_stream(&mut self, stream: &Stream) {
        if !self.other_streams.iter().any(|s| s.key() == stream.key()) {
            self.other_streams.push(stream.clone());
        }
    }

    /// Copies to a new host vector (synchronous).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        self.copy_to_host(&mut v)?;
        Ok(v)
    }

    /// Copies into `dst` (same length), waiting for the compute stream's work first.
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        if dst.len() != self.len {
            return Err(Error::Length {
                what: "device-to-host copy",
                expected: self.len,
                got: dst.len(),
            });
        }
        if self.len == 0 {
            return Ok(());
        }
        let s = self.dev.compute_stream();
        self.dev
            .copy_dtoh_async(bytemuck::cast_slice_mut(dst), self.addr(), s)?;
        s.synchronize()
    }

    /// Copies `src` (same length) into the buffer, ordered on the compute stream (synchronous).
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        if src.len() != self.len {
            return Err(Error::Length {
                what: "host-to-device copy",
                expected: self.len,
                got: src.len(),
            });
        }
        if self.len == 0 {
            return Ok(());
        }
        let s = self.dev.compute_stream();
        self.dev
            .copy_htod_async(self.addr(), bytemuck::cast_slice(src), s)?;
        s.synchronize()
    }

    /// Checks that `len` elements from `offset` lie inside the buffer.
    fn range_check(&self, what: &'static str, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{what}: elements {offset}..{offset}+{len} are outside a buffer of {}",
                self.len
            ))),
        }
    }

    /// Copies elements `offset..offset + dst.len()` into `dst`, waiting for the compute
    /// stream's work first. A range past the end is an error (nothing is copied).
    pub fn copy_to_host_at(&self, offset: usize, dst: &mut [T]) -> Result<()> {
        self.range_check("device-to-host copy", offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let s = self.dev.compute_stream();
        let addr = self.addr() + (offset * size_of::<T>()) as u64;
        self.dev
            .copy_dtoh_async(bytemuck::cast_slice_mut(dst), addr, s)?;
        s.synchronize()
    }

    /// Copies `src` into elements `offset..offset + src.len()`, ordered on the compute stream
    /// (synchronous). A range past the end is an error (nothing is copied).
    pub fn copy_from_host_at(&mut self, offset: usize, src: &[T]) -> Result<()> {
        self.range_check("host-to-device copy", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let s = self.dev.compute_stream();
        let addr = self.addr() + (offset * size_of::<T>()) as u64;
        self.dev
            .copy_htod_async(addr, bytemuck::cast_slice(src), s)?;
        s.synchronize()
    }

    /// Device-to-device copy of the whole buffer into `dst` on the compute stream.
    pub fn copy_to(&self, dst: &mut DeviceBuffer<T>) -> Result<()> {
        if dst.len != self.len {
            return Err(Error::Length {
                what: "device-to-device copy",
                expected: self.len,
                got: dst.len,
            });
        }
        if self.len == 0 {
            return Ok(());
        }
        self.dev.copy_dtod_async(
            dst.addr(),
            self.addr(),
            self.bytes(),
            self.dev.compute_stream(),
        )
    }
}

impl Device {
    /// Starts a host-to-device copy of `src` to `dst` on `stream`. On a GPU the caller keeps
    /// `src` alive and unchanged until the stream has passed the copy; the simulated device
    /// copies before returning.
    pub(crate) fn copy_htod_async(&self, dst: u64, src: &[u8], stream: &Stream) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { .. } => {
                self.bind()?;
                // SAFETY: `dst` is a device address with room for `src` (the callers check
                // lengths); the callers keep `src` valid until the stream passes the copy.
                unsafe { result::memcpy_htod_async(dst, src, stream.cu()?) }
                    .ctx("cuMemcpyHtoDAsync")
            }
            Backend::Sim { sim, .. } => sim
                .write(dst, src)
                .map_err(|e| Error::sim("host-to-device copy", e)),
        }
    }

    /// Starts a device-to-host copy into `dst` on `stream` (see [`Device::copy_htod_async`]).
    pub(crate) fn copy_dtoh_async(&self, dst: &mut [u8], src: u64, stream: &Stream) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { .. } => {
                self.bind()?;
                // SAFETY: `src` holds `dst.len()` bytes (the callers check lengths); the
                // callers do not touch `dst` until the stream passes the copy.
                unsafe { result::memcpy_dtoh_async(dst, src, stream.cu()?) }
                    .ctx("cuMemcpyDtoHAsync")
            }
            Backend::Sim { sim, .. } => sim
                .read(src, dst)
                .map_err(|e| Error::sim("device-to-host copy", e)),
        }
    }

    /// A device-to-device copy of `bytes` on `stream`.
    pub(crate) fn copy_dtod_async(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: &Stream,
    ) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { .. } => {
                self.bind()?;
                // SAFETY: both ranges hold `bytes` bytes of live buffers (callers check).
                unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.cu()?) }
                    .ctx("cuMemcpyDtoDAsync")
            }
            Backend::Sim { sim, .. } => sim
                .copy(dst, src, bytes as u64)
                .map_err(|e| Error::sim("device-to-device copy", e)),
        }
    }
}

impl<T: DeviceElem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            let events: Vec<Box<dyn Pending>> = self
                .other_streams
                .iter()
                .filter_map(|s| s.record_sync_point().ok())
                .map(|e| Box::new(e) as Box<dyn Pending>)
                .collect();
            self.dev.inner.alloc.free(block, events);
        }
    }
}

impl Device {
    /// An uninitialised buffer of `len` elements for the compute stream.
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.alloc_on(len, self.compute_stream())
    }

    /// An uninitialised buffer of `len` elements for `stream`.
    pub fn alloc_on<T: DeviceElem>(&self, len: usize, stream: &Stream) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::Invalid(format!("buffer of {len} elements overflows")))?;
        let block = self
            .inner
            .alloc
            .allocate(bytes, stream.key())
            .map_err(|e| self.alloc_error(e))?;
        Ok(DeviceBuffer {
            block: Some(block),
            len,
            dev: self.clone(),
            other_streams: Vec::new(),
            _t: PhantomData,
        })
    }

    /// A buffer holding a copy of `src` (synchronous).
    pub fn htod<T: DeviceElem>(&self, src: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(src.len())?;
        b.copy_from_host(src)?;
        Ok(b)
    }
}

/// Page-locked host memory: host/device copies from it run asynchronously at full speed.
///
/// Asynchronous copies record an event; host access ([`PinnedBuffer::as_slice`],
/// [`PinnedBuffer::as_mut_slice`]) and drop wait for it, so the host never touches memory the
/// copy engine is still reading or writing.
pub struct PinnedBuffer<T: DeviceElem> {
    ptr: *mut T,
    len: usize,
    dev: Device,
    pending: Option<Event>,
}

// SAFETY: the buffer owns its allocation; access goes through &self/&mut self.
unsafe impl<T: DeviceElem> Send for PinnedBuffer<T> {}
// SAFETY: shared access is read-only.
unsafe impl<T: DeviceElem> Sync for PinnedBuffer<T> {}

impl<T: DeviceElem> PinnedBuffer<T> {
    /// A zeroed pinned buffer of `len` elements (ordinary host memory on the simulated
    /// device, where nothing needs page-locking).
    pub fn new(dev: &Device, len: usize) -> Result<Self> {
        let cap = len.max(1);
        let p = if dev.is_sim() {
            let b: Box<[T]> = vec![T::zeroed(); cap].into_boxed_slice();
            Box::into_raw(b).cast::<T>()
        } else {
            let bytes = cap * size_of::<T>();
            dev.bind()?;
            // SAFETY: the context is current; cuMemHostAlloc returns page-locked memory of
            // `bytes`.
            let p = unsafe { result::malloc_host(bytes, 0) }.ctx("cuMemHostAlloc")? as *mut T;
            // SAFETY: `p` points to `bytes` writable bytes; zero is a valid bit pattern for Pod.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, bytes) };
            p
        };
        Ok(PinnedBuffer {
            ptr: p,
            len,
            dev: dev.clone(),
            pending: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn wait(&self) -> Result<()> {
        if let Some(e) = &self.pending {
            e.synchronize()?;
        }
        Ok(())
    }

    /// The contents, after any copy in flight has finished.
    pub fn as_slice(&self) -> Result<&[T]> {
        self.wait()?;
        // SAFETY: `ptr` holds `len` initialised elements; no copy is in flight (waited).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// Mutable contents, after any copy in flight has finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        self.wait()?;
        self.pending = None;
        // SAFETY: as above, and `&mut self` makes this the only access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// Waits for any copy in flight; afterwards [`PinnedBuffer::idle_slice`] is `Some`.
    pub fn wait_idle(&mut self) -> Result<()> {
        self.wait()?;
        self.pending = None;
        Ok(())
    }

    /// Whether no copy is in flight (never blocks).
    pub fn is_idle(&self) -> bool {
        self.pending.as_ref().is_none_or(Event::is_complete)
    }

    /// The contents if no copy is in flight (never blocks).
    pub fn idle_slice(&self) -> Option<&[T]> {
        // SAFETY: `ptr` holds `len` initialised elements and no copy touches them (checked).
        self.is_idle()
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// Mutable contents if no copy is in flight (never blocks).
    pub fn idle_slice_mut(&mut self) -> Option<&mut [T]> {
        if !self.is_idle() {
            return None;
        }
        self.pending = None;
        // SAFETY: as in `idle_slice`, and `&mut self` makes this the only access.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// Starts copying this buffer into `dst` on `stream`; returns at once.
    pub fn copy_to_device_async(
        &mut self,
        dst: &mut DeviceBuffer<T>,
        stream: &Stream,
    ) -> Result<()> {
        if dst.len() != self.len {
            return Err(Error::Length {
                what: "pinned host-to-device copy",
                expected: self.len,
                got: dst.len(),
            });
        }
        self.wait()?;
        // SAFETY: `ptr` holds `len` initialised elements; the slice stays valid until the
        // event recorded below has completed (host access and drop wait for it).
        let src = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        self.dev
            .copy_htod_async(dst.addr(), bytemuck::cast_slice(src), stream)?;
        self.pending = Some(stream.record_sync_point()?);
        dst.record_stream(stream);
        Ok(())
    }

    /// Starts copying `src` into this buffer on `stream`; returns at once.
    pub fn copy_from_device_async(&mut self, src: &DeviceBuffer<T>, stream: &Stream) -> Result<()> {
        if src.len() != self.len {
            return Err(Error::Length {
                what: "device-to-pinned-host copy",
                expected: self.len,
                got: src.len(),
            });
        }
        self.wait()?;
        // SAFETY: as in copy_to_device_async; the destination is owned by `self` and is not
        // accessed by the host until the recorded event completes.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) };
        self.dev
            .copy_dtoh_async(bytemuck::cast_slice_mut(dst), src.addr(), stream)?;
        self.pending = Some(stream.record_sync_point()?);
        Ok(())
    }
}

impl<T: DeviceElem> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        let _ = self.wait();
        if self.dev.is_sim() {
            let cap = self.len.max(1);
            // SAFETY: allocated in `new` as a boxed slice of `cap` elements; dropped once.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, cap)) });
            return;
        }
        let _ = self.dev.bind();
        // SAFETY: allocated by cuMemHostAlloc; no copy is in flight (waited above).
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}
