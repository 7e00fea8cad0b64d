//! Parameter buffers on a device: the flat master weights, the working copy the forward
//! reads and the gradients, as one device allocation each (llm.c's layout), so the optimizer
//! is one fused launch over all parameters.

use half::{bf16, f16};
use lathe_host::{Device, DeviceBuffer};
use std::ops::Range;
use std::sync::Arc;

use super::{DevBuf, DevCtx, dev_err};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::params::{ParamStore, ParamView};
use crate::scalar::Scalar;

/// The device buffers of a [`ParamStore`] moved with [`ParamStore::to_device`].
pub struct DeviceParams {
    dev: Device,
    master: DeviceBuffer<f32>,
    /// f32 gradients (a [`DevBuf::F32`]).
    grads: DevBuf,
    /// The bf16 / f16 working copy; `None` when the forward reads the f32 master itself.
    working: Option<DevBuf>,
    /// Sharded parameters ([`ParamStore::to_device_sharded`]): no full master or working copy
    /// on this device; a tape's parameter leaves are filled by this hook.
    gather: Option<ParamGatherHook>,
}

/// Fills a device buffer (in the store's working dtype, `range.len()` elements) with the
/// working values of the parameters `range` of the flat buffer. A ZeRO stage 3 rank installs
/// one that gathers them from the ranks' shards: a tape calls it the first time it uses a
/// parameter, so parameters are gathered as the forward reaches them, not the whole model up
/// front. Every rank's tape must ask for the same parameters in the same order when the hook
/// is a collective (they run the same model).
pub type ParamGatherHook =
    Arc<dyn Fn(Range<usize>, &mut DevBuf) -> std::result::Result<(), String> + Send + Sync>;

/// The working copy an optimizer writes next to the master weights.
pub enum WorkingMut<'a> {
    /// f32 training: the forward reads the master weights.
    None,
    /// A bf16 copy.
    Bf16(&'a mut DeviceBuffer<bf16>),
    /// An f16 copy.
    F16(&'a mut DeviceBuffer<f16>),
}

impl std::fmt::Debug for DeviceParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceParams({} parameters on {}, working {:?}{})",
            self.grads.len(),
            self.dev.describe(),
            self.working.as_ref().map(|w| w.dtype()),
            if self.gather.is_some() {
                ", sharded"
            } else {
                ""
            }
        )
    }
}

impl DeviceParams {
    /// The device holding the buffers.
    pub fn device(&self) -> &Device {
        &self.dev
    }
    /// Whether the parameters are sharded ([`ParamStore::to_device_sharded`]): then the
    /// master buffer is empty and there is no working copy.
    pub fn is_sharded(&self) -> bool {
        self.gather.is_some()
    }
    /// The gather hook of a sharded store.
    pub(crate) fn gather_hook(&self) -> Option<&ParamGatherHook> {
        self.gather.as_ref()
    }
    /// The f32 master weights (empty when sharded).
    pub fn master(&self) -> &DeviceBuffer<f32> {
        &self.master
    }
    /// The f32 gradients.
    pub fn grads(&self) -> &DeviceBuffer<f32> {
        match &self.grads {
            DevBuf::F32(g) => g,
            _ => unreachable!("gradients are f32"),
        }
    }
    pub(crate) fn grads_dev_mut(&mut self) -> &mut DevBuf {
        &mut self.grads
    }
    /// The working copy (`None` in f32 training).
    pub fn working(&self) -> Option<&DevBuf> {
        self.working.as_ref()
    }
    /// Master weights, gradients and working copy, mutably (what an optimizer step writes).
    pub fn parts_mut(
        &mut self,
    ) -> (
        &mut DeviceBuffer<f32>,
        &mut DeviceBuffer<f32>,
        WorkingMut<'_>,
    ) {
        let grads = match &mut self.grads {
            DevBuf::F32(g) => g,
            _ => unreachable!("gradients are f32"),
        };
        let working = match &mut self.working {
            None | Some(DevBuf::F32(_)) => WorkingMut::None,
            Some(DevBuf::Bf16(w)) => WorkingMut::Bf16(w),
            Some(DevBuf::F16(w)) => WorkingMut::F16(w),
        };
        (&mut self.master, grads, working)
    }
    /// Frees the f32 master buffer when this device does not need it: a sharded optimizer
    /// keeps the master weights of its shard elsewhere, and the forward reads the bf16 / f16
    /// working copy. Refused in f32 training, where the forward reads the master.
    pub fn release_master(&mut self) -> Result<()> {
        if self.working.is_none() {
            return Err(Error::Params(
                "the forward reads the f32 master weights: they cannot be released".into(),
            ));
        }
        self.master = self
            .dev
            .alloc::<f32>(0)
            .map_err(dev_err("DeviceParams::release_master"))?;
        Ok(())
    }
    /// Sets every gradient to zero (on the compute stream).
    pub fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill(&self.dev, 0.0)
    }
}

impl<T: Scalar> ParamStore<T> {
    /// The device buffers, when the store was moved to a device.
    pub fn device(&self) -> Option<&DeviceParams> {
        self.device_params.as_ref()
    }
    /// The device buffers, mutably.
    pub fn device_mut(&mut self) -> Option<&mut DeviceParams> {
        self.device_params.as_mut()
    }
}

impl ParamStore<f32> {
    /// Uploads master, gradients and (for a bf16 / f16 working dtype) the working copy to
    /// `dev`. From then on the device buffers are the store's state: device tapes read
    /// them, device optimizers write them; the host buffers are a mirror refreshed by
    /// [`ParamStore::fetch_from_device`] (checkpoints) and pushed by
    /// [`ParamStore::upload_to_device`] (after loading a checkpoint).
    pub fn to_device(&mut self, dev: &Device) -> Result<()> {
        if !self.has_data() {
            return Err(Error::Params(
                "a layout-only store has no buffers to move to a device".into(),
            ));
        }
        let e = dev_err("ParamStore::to_device");
        let master = dev.htod(self.master()).map_err(e)?;
        let grads = DevBuf::upload(dev, DType::F32, self.grads())?;
        let working = match self.working_dtype() {
            DType::F32 => None,
            dt => Some(DevBuf::upload(dev, dt, self.working())?),
        };
        self.device_params = Some(DeviceParams {
            dev: dev.clone(),
            master,
            grads,
            working,
            gather: None,
        });
        self.bump_working_version();
        Ok(())
    }

    /// Puts the store on `dev` without its parameters: only the full-size f32 gradient buffer
    /// (zeroed) goes up, and a tape gets each parameter's working values (in the store's
    /// working dtype) from `gather` when it first uses it. ZeRO stage 3 keeps each rank's
    /// shard of the parameters elsewhere and gathers through the hook.
    pub fn to_device_sharded(&mut self, dev: &Device, gather: ParamGatherHook) -> Result<()> {
        if !self.has_data() {
            return Err(Error::Params(
                "a layout-only store has no buffers to move to a device".into(),
            ));
        }
        let e = dev_err("ParamStore::to_device_sharded");
        let master = dev.alloc::<f32>(0).map_err(e)?;
        let grads = DevBuf::zeros(dev, DType::F32, self.num_params())?;
        self.device_params = Some(DeviceParams {
            dev: dev.clone(),
            master,
            grads,
            working: None,
            gather: Some(gather),
        });
        self.bump_working_version();
        Ok(())
    }

    /// Copies the device's master, working copy and gradients into the host buffers
    /// (waits for the device).
    pub fn fetch_from_device(&mut self) -> Result<()> {
        let Some(d) = self.device_params.take() else {
            return Ok(());
        };
        let r = (|| {
            let e = || dev_err("ParamStore::fetch_from_device");
            let g = d.grads.download()?;
            self.grads_mut().copy_from_slice(&g);
            if d.gather.is_some() {
                // Sharded: the parameters are not on this device.
                return Ok(());
            }
            // A released master ([`DeviceParams::release_master`]) lives elsewhere.
            if d.master.len() == self.master().len() {
                d.master.copy_to_host(self.master_mut()).map_err(e())?;
            }
            match &d.working {
                Some(w) => {
                    let w = w.download()?;
                    self.working_mut().copy_from_slice(&w);
                }
                None => {
                    let m = self.master().to_vec();
                    self.working_mut().copy_from_slice(&m);
                }
            }
            Ok(())
        })();
        self.device_params = Some(d);
        r
    }

    /// Pushes the host buffers to the device copy (after they were changed on the host,
    /// e.g. restored from a checkpoint).
    pub fn upload_to_device(&mut self) -> Result<()> {
        let Some(dev) = self.device_params.as_ref().map(|d| d.dev.clone()) else {
            return Err(Error::Params("the store is not on a device".into()));
        };
        self.to_device(&dev)
    }

    /// `working = round(master)` in `dtype`, on the device (f32: the forward reads the
    /// master and no copy is kept).
    pub fn sync_working_device(&mut self, dtype: DType) -> Result<()> {
        let Some(d) = self.device_params.as_mut() else {
            return Err(Error::Params("the store is not on a device".into()));
        };
        if d.gather.is_some() {
            return Err(Error::Params(
                "the store's parameters are sharded: the ranks' shards hold the working copy"
                    .into(),
            ));
        }
        d.working = match dtype {
            DType::F32 => None,
            dt => {
                let mut w = DevBuf::alloc(&d.dev, dt, d.master.len())?;
                super::each!(&mut w, w => d.dev.cast(&d.master, w))
                    .map_err(dev_err("sync_working"))?;
                Some(w)
            }
        };
        self.set_working_dtype(dtype);
        Ok(())
    }
}

/// A device copy of parameter `view`'s working values in `dtype`, for a device tape.
pub(crate) fn param_leaf<T: Scalar>(
    ctx: &DevCtx,
    store: &ParamStore<T>,
    view: &ParamView,
    dtype: DType,
) -> Result<DevBuf> {
    let d = store.device().ok_or_else(|| {
        Error::Params(format!(
            "parameter `{}`: the store is on the host but the tape runs on {}; call \
             ParamStore::to_device first",
            view.name,
            ctx.dev.describe()
        ))
    })?;
    if d.dev.describe() != ctx.dev.describe() {
        return Err(Error::Params(format!(
            "parameter `{}` lives on {} but the tape runs on {}",
            view.name,
            d.dev.describe(),
            ctx.dev.describe()
        )));
    }
    let n = view.numel();
    let mut out = DevBuf::alloc(&ctx.dev, dtype, n)?;
    if let Some(gather) = &d.gather {
        if store.working_dtype() != dtype {
            return Err(Error::Params(format!(
                "parameter `{}`: the sharded working copy is in {} but the tape computes in {dtype}",
                view.name,
                store.working_dtype()
            )));
        }
        gather(view.range(), &mut out)
            .map_err(|m| Error::Params(format!("gathering parameter `{}`: {m}", view.name)))?;
        return Ok(out);
    }
    let e = || dev_err("param");
    match (dtype, &d.working) {
        (DType::F32, _) => ctx
            .dev
            .copy_2d(&d.master, view.offset, n, f32_mut(&mut out), 0, n, 1, n)
            .map_err(e())?,
        (dt, Some(w)) if w.dtype() == dt => match (w, &mut out) {
            (DevBuf::Bf16(w), DevBuf::Bf16(o)) => ctx.dev.copy_2d(w, view.offset, n, o, 0, n, 1, n),
            (DevBuf::F16(w), DevBuf::F16(o)) => ctx.dev.copy_2d(w, view.offset, n, o, 0, n, 1, n),
            _ => unreachable!("dtypes checked"),
        }
        .map_err(e())?,
        (dt, w) => {
            return Err(Error::Params(format!(
                "the device working copy is in {} but the tape computes in {dt}: call \
                 ParamStore::sync_working_device({}) first",
                w.as_ref()
                    .map_or("f32".to_string(), |w| w.dtype().to_string()),
                dt.name()
            )));
        }
    }
    Ok(out)
}

fn f32_mut(b: &mut DevBuf) -> &mut DeviceBuffer<f32> {
    match b {
        DevBuf::F32(x) => x,
        _ => unreachable!("allocated as f32"),
    }
}
