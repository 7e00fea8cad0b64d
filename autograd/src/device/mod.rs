//! The device backend of the tape: values and gradients in device buffers, ops launched as
//! Lathe's kernels through `lathe-host`, on a GPU or on the simulated device.
//!
//! A tape made with [`crate::Tape::on_device`] keeps every value in a [`DevBuf`] of its
//! storage dtype (the autocast table of [`crate::autocast`] decides it, as on the CPU: a bf16
//! activation takes 2 bytes a element on the device), gradients likewise (parameter gradients
//! in f32). Each op's forward and backward launch kernels on the device's compute stream in
//! the order the tape records them; nothing waits for the device except the explicit reads
//! ([`crate::Tape::read`], [`crate::Tape::read_scalar`]).
//!
//! The model code is the same for both backends: `Gpt` and `Mlp` call `tape.linear(..)`,
//! `tape.attention(..)` and so on, and the tape dispatches to the CPU kernels of
//! [`crate::ops`] or to the device ops of [`ops`] here.

pub(crate) mod ops;
pub mod params;

pub(crate) use params::param_leaf;
pub use params::{DeviceParams, ParamGatherHook, WorkingMut};

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};
use lathe_host::{Device, DeviceBuffer};

use crate::dtype::DType;
use crate::error::{Error, Result};

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Testing aid: with `on`, every buffer the device backend allocates is filled with NaN
/// first, so a kernel that leaves an output element unwritten shows up as a NaN in the result
/// (process-wide; off by default).
pub fn set_poison_allocations(on: bool) {
    POISON.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A device buffer holding one value (or gradient) in its storage dtype.
pub enum DevBuf {
    /// f32 storage.
    F32(DeviceBuffer<f32>),
    /// bfloat16 storage.
    Bf16(DeviceBuffer<bf16>),
    /// IEEE half storage.
    F16(DeviceBuffer<f16>),
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({}, {})", self.dtype(), self.len())
    }
}

/// Runs `$body` with `$b` bound to the typed buffer inside a [`DevBuf`].
macro_rules! each {
    ($buf:expr, $b:ident => $body:expr) => {
        match $buf {
            $crate::device::DevBuf::F32($b) => $body,
            $crate::device::DevBuf::Bf16($b) => $body,
            $crate::device::DevBuf::F16($b) => $body,
        }
    };
}
pub(crate) use each;

/// Why the device's fused attention kernels do not take compute dtype `dt` with head size
/// `hs` (`None`: they do).
pub(crate) fn flash_attention_unsupported(dt: DType, hs: usize) -> Option<String> {
    let e = match dt {
        DType::F32 => lathe_kernels::Elem::F32,
        DType::BF16 => lathe_kernels::Elem::BF16,
        DType::F16 => lathe_kernels::Elem::F16,
    };
    lathe_kernels::nn::flash::unsupported(e, hs)
}

/// Maps a host error to the autograd error, naming the op that launched.
pub(crate) fn dev_err(op: &'static str) -> impl FnOnce(lathe_host::Error) -> Error {
    move |source| Error::Device { op, source }
}

impl DevBuf {
    /// An uninitialised buffer of `len` elements of `dtype` from the device's caching
    /// allocator.
    pub fn alloc(dev: &Device, dtype: DType, len: usize) -> Result<DevBuf> {
        let e = dev_err("alloc");
        let mut b = match dtype {
            DType::F32 => DevBuf::F32(dev.alloc(len).map_err(e)?),
            DType::BF16 => DevBuf::Bf16(dev.alloc(len).map_err(e)?),
            DType::F16 => DevBuf::F16(dev.alloc(len).map_err(e)?),
        };
        if POISON.load(std::sync::atomic::Ordering::Relaxed) {
            b.fill(dev, f32::NAN)?;
        }
        Ok(b)
    }

    /// A buffer of `len` zeros.
    pub fn zeros(dev: &Device, dtype: DType, len: usize) -> Result<DevBuf> {
        let mut b = Self::alloc(dev, dtype, len)?;
        b.fill(dev, 0.0)?;
        Ok(b)
    }

    /// Uploads `data` (f32 values, rounded to `dtype` to nearest even) to a new buffer.
    pub fn upload(dev: &Device, dtype: DType, data: &[f32]) -> Result<DevBuf> {
        let e = dev_err("upload");
        Ok(match dtype {
            DType::F32 => DevBuf::F32(dev.htod(data).map_err(e)?),
            DType::BF16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                DevBuf::Bf16(dev.htod(&v).map_err(e)?)
            }
            DType::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                DevBuf::F16(dev.htod(&v).map_err(e)?)
            }
        })
    }

    /// Reads the buffer back as f32 values (synchronises with the compute stream).
    pub fn download(&self) -> Result<Vec<f32>> {
        let e = dev_err("download");
        Ok(match self {
            DevBuf::F32(b) => b.to_vec().map_err(e)?,
            DevBuf::Bf16(b) => b.to_vec().map_err(e)?.iter().map(|x| x.to_f32()).collect(),
            DevBuf::F16(b) => b.to_vec().map_err(e)?.iter().map(|x| x.to_f32()).collect(),
        })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self {
            DevBuf::F32(_) => DType::F32,
            DevBuf::Bf16(_) => DType::BF16,
            DevBuf::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each!(self, b => b.len())
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `self[i] = value` for every element (rounded to the dtype).
    pub fn fill(&mut self, dev: &Device, value: f32) -> Result<()> {
        each!(self, b => dev.fill(b, value)).map_err(dev_err("fill"))
    }

    /// A copy of this buffer in `dtype` (a device-to-device copy, or a cast kernel).
    pub fn to_dtype(&self, dev: &Device, dtype: DType) -> Result<DevBuf> {
        let mut out = Self::alloc(dev, dtype, self.len())?;
        self.copy_into(dev, &mut out)?;
        Ok(out)
    }

    /// Writes this buffer into `dst` (same length), converting the dtype when they differ.
    pub fn copy_into(&self, dev: &Device, dst: &mut DevBuf) -> Result<()> {
        let e = dev_err("copy");
        if self.len() != dst.len() {
            return Err(Error::Invalid {
                op: "copy",
                detail: format!("{} elements into a buffer of {}", self.len(), dst.len()),
            });
        }
        match (self, dst) {
            (DevBuf::F32(a), DevBuf::F32(b)) => a.copy_to(b),
            (DevBuf::Bf16(a), DevBuf::Bf16(b)) => a.copy_to(b),
            (DevBuf::F16(a), DevBuf::F16(b)) => a.copy_to(b),
            (a, b) => each!(a, a => each!(b, b => dev.cast(a, b))),
        }
        .map_err(e)
    }

    /// This buffer if it already has `dtype`, else a converted copy.
    pub(crate) fn conform(self, dev: &Device, dtype: DType) -> Result<DevBuf> {
        if self.dtype() == dtype {
            Ok(self)
        } else {
            self.to_dtype(dev, dtype)
        }
    }

    /// `self += x` elementwise (f32 arithmetic, one rounding to this buffer's dtype).
    pub fn add_assign(&mut self, dev: &Device, x: &DevBuf) -> Result<()> {
        self.add_assign_at(dev, 0, x)
    }

    /// `self[offset + i] += x[i]`.
    pub fn add_assign_at(&mut self, dev: &Device, offset: usize, x: &DevBuf) -> Result<()> {
        if offset + x.len() > self.len() {
            return Err(Error::Invalid {
                op: "add",
                detail: format!(
                    "{} elements at offset {offset} into a buffer of {}",
                    x.len(),
                    self.len()
                ),
            });
        }
        each!(self, y => each!(x, x => dev.add_into_at(x, y, offset))).map_err(dev_err("add"))
    }
}

/// Most integer arrays (token ids, targets) a device tape keeps on the device across steps.
const IDS_CACHE: usize = 16;

/// The device context of a tape: the device, plus the device copies of the integer inputs
/// (token ids, targets) of the recorded ops.
pub(crate) struct DevCtx {
    pub dev: Device,
    /// Device copies of `Op::Embedding` ids and `Op::CrossEntropy` targets, by node (until
    /// the tape is cleared).
    pub node_ids: HashMap<usize, Arc<DeviceBuffer<u32>>>,
    /// Integer arrays already on the device, by content, newest last: batches bound with
    /// [`crate::Tape::bind_ids`] and arrays that repeat every step (the positions), so a
    /// training step uploads nothing itself.
    pub cache: Vec<(Vec<u32>, Arc<DeviceBuffer<u32>>)>,
}

impl DevCtx {
    pub fn new(dev: Device) -> Self {
        DevCtx {
            dev,
            node_ids: HashMap::new(),
            cache: Vec::new(),
        }
    }

    fn remember(&mut self, host: &[u32], buf: Arc<DeviceBuffer<u32>>) {
        self.cache.retain(|(h, _)| h != host);
        if self.cache.len() >= IDS_CACHE {
            self.cache.remove(0);
        }
        self.cache.push((host.to_vec(), buf));
    }

    /// Registers `dev` as the device copy of `host` (a copy on the compute stream, ordered
    /// after whatever made `dev`).
    pub fn bind(&mut self, host: &[u32], dev: &DeviceBuffer<u32>) -> Result<()> {
        if dev.len() != host.len() {
            return Err(Error::Invalid {
                op: "bind_ids",
                detail: format!(
                    "{} ids on the host but {} on the device",
                    host.len(),
                    dev.len()
                ),
            });
        }
        let e = || dev_err("bind_ids");
        let mut own = self.dev.alloc::<u32>(dev.len()).map_err(e())?;
        dev.copy_to(&mut own).map_err(e())?;
        self.remember(host, Arc::new(own));
        Ok(())
    }

    /// The device copy of `node`'s integer input `ids`: from the node (backward, recompute),
    /// from the cache, or uploaded now (once; then cached).
    pub fn ids(&mut self, node: usize, ids: &[u32]) -> Result<&DeviceBuffer<u32>> {
        if !self.node_ids.contains_key(&node) {
            let found = self
                .cache
                .iter()
                .rev()
                .find(|(h, _)| h.as_slice() == ids)
                .map(|(_, b)| b.clone());
            let buf = match found {
                Some(b) => b,
                None => {
                    let b = Arc::new(self.dev.htod(ids).map_err(dev_err("upload ids"))?);
                    self.remember(ids, b.clone());
                    b
                }
            };
            self.node_ids.insert(node, buf);
        }
        Ok(&self.node_ids[&node])
    }
}
