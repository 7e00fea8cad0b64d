//! Typed wrappers over the registry's first kernels: fill, scale, axpy, casts, sum, max-abs.
//! Each checks lengths, then launches on the device's compute stream.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use lathe_kernels::{Problem, elementwise, reduce};

fn same_len(what: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Length {
            what,
            expected: a,
            got: b,
        });
    }
    Ok(())
}

fn unsupported(op: &str, e: lathe_kernels::Elem) -> Error {
    Error::Invalid(format!("{op} has no kernel for element type {}", e.name()))
}

impl Device {
    /// `out[i] = value` (rounded to the element type).
    pub fn fill<T: DeviceElem>(&self, out: &mut DeviceBuffer<T>, value: f32) -> Result<()> {
        let k = elementwise::fill_for(T::ELEM).ok_or_else(|| unsupported("fill", T::ELEM))?;
        if out.is_empty() {
            return Ok(());
        }
        let n = out.len() as u64;
        let args = [out.arg_mut(), KernelArg::U64(n), KernelArg::F32(value)];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    /// `y[i] = alpha * x[i]`.
    pub fn scale<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        alpha: f32,
    ) -> Result<()> {
        let k = elementwise::scale_for(T::ELEM).ok_or_else(|| unsupported("scale", T::ELEM))?;
        same_len("scale", x.len(), y.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as u64;
        let args = [
            x.arg(),
            y.arg_mut(),
            KernelArg::U64(n),
            KernelArg::F32(alpha),
        ];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    /// `x[i] *= alpha` in place.
    pub fn scale_in_place<T: DeviceElem>(&self, x: &mut DeviceBuffer<T>, alpha: f32) -> Result<()> {
        let k = elementwise::scale_for(T::ELEM).ok_or_else(|| unsupported("scale", T::ELEM))?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as u64;
        let args = [
            x.arg(),
            x.arg_mut(),
            KernelArg::U64(n),
            KernelArg::F32(alpha),
        ];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    /// `y[i] = fma(alpha, x[i], y[i])`.
    pub fn axpy<T: DeviceElem>(
        &self,
        alpha: f32,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = elementwise::axpy_for(T::ELEM).ok_or_else(|| unsupported("axpy", T::ELEM))?;
        same_len("axpy", x.len(), y.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as u64;
        let args = [
            x.arg(),
            y.arg_mut(),
            KernelArg::U64(n),
            KernelArg::F32(alpha),
        ];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    /// `y[i] = B(x[i])`, round to nearest even.
    pub fn cast<A: DeviceElem, B: DeviceElem>(
        &self,
        x: &DeviceBuffer<A>,
        y: &mut DeviceBuffer<B>,
    ) -> Result<()> {
        let k = elementwise::cast_for(A::ELEM, B::ELEM).ok_or_else(|| {
            Error::Invalid(format!(
                "no cast kernel from {} to {}",
                A::ELEM.name(),
                B::ELEM.name()
            ))
        })?;
        same_len("cast", x.len(), y.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as u64;
        let args = [x.arg(), y.arg_mut(), KernelArg::U64(n)];
        self.launch(k, &Problem::elems(n), &args, self.compute_stream())
    }

    fn reduce_f32(
        &self,
        k: &'static lathe_kernels::KernelDesc,
        x: &DeviceBuffer<f32>,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        same_len("reduction output", 1, out.len())?;
        let n = x.len() as u64;
        let blocks = reduce::blocks_for(n) as usize;
        let mut partials = self.alloc::<f32>(blocks)?;
        let s = self.compute_stream();
        self.launch(
            k,
            &Problem::elems(n),
            &[x.arg(), KernelArg::U64(n), partials.arg_mut()],
            s,
        )?;
        let m = blocks as u64;
        self.launch(
            k,
            &Problem::elems(m),
            &[partials.arg(), KernelArg::U64(m), out.arg_mut()],
            s,
        )
    }

    /// `out[0] = sum(x)` (deterministic two-pass tree; 0 for an empty x).
    pub fn sum_into(&self, x: &DeviceBuffer<f32>, out: &mut DeviceBuffer<f32>) -> Result<()> {
        self.reduce_f32(&reduce::SUM_F32, x, out)
    }

    /// `out[0] = max |x|`, NaN if any element is NaN.
    pub fn max_abs_into(&self, x: &DeviceBuffer<f32>, out: &mut DeviceBuffer<f32>) -> Result<()> {
        self.reduce_f32(&reduce::MAX_ABS_F32, x, out)
    }

    /// `sum(x)` read back to the host (synchronises).
    pub fn sum(&self, x: &DeviceBuffer<f32>) -> Result<f32> {
        let mut out = self.alloc::<f32>(1)?;
        self.sum_into(x, &mut out)?;
        Ok(out.to_vec()?[0])
    }

    /// `max |x|` read back to the host (synchronises).
    pub fn max_abs(&self, x: &DeviceBuffer<f32>) -> Result<f32> {
        let mut out = self.alloc::<f32>(1)?;
        self.max_abs_into(x, &mut out)?;
        Ok(out.to_vec()?[0])
    }
}
