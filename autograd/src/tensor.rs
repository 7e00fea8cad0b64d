//! `Tensor`: a shaped, typed block of values on a device.

use crate::dtype::{DType, Device};
use crate::error::{Error, Result};
use crate::scalar::{Scalar, round_slice};

/// Number of elements of a shape (1 for the rank-0 shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A dense row-major tensor.
///
/// Contract: `data.len() == numel(shape)`; every value is representable in `dtype` (the
/// constructors round). Values are held as `T` (`f32`, or `f64` for gradient checks) whatever the
/// dtype: a `bf16` tensor holds the f32 values a GPU bf16 buffer would read back as.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T: Scalar = f32> {
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    data: Vec<T>,
}

impl<T: Scalar> Tensor<T> {
    /// A CPU tensor from row-major `data`, rounded to `dtype`.
    pub fn new(shape: impl Into<Vec<usize>>, mut data: Vec<T>, dtype: DType) -> Result<Self> {
        let shape = shape.into();
        if data.len() != numel(&shape) {
            return Err(Error::Shape {
                op: "Tensor::new",
                detail: format!(
                    "shape {shape:?} holds {} elements but {} values were given",
                    numel(&shape),
                    data.len()
                ),
            });
        }
        round_slice(&mut data, dtype);
        Ok(Tensor {
            shape,
            dtype,
            device: Device::Cpu,
            data,
        })
    }

    /// Like [`Tensor::new`] on a named device; anything but the CPU is an
    /// [`Error::UnsupportedDevice`] in this backend.
    pub fn new_on(
        shape: impl Into<Vec<usize>>,
        data: Vec<T>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        device.ensure_cpu("Tensor::new_on")?;
        Self::new(shape, data, dtype)
    }

    /// An f32-dtype CPU tensor (no rounding needed).
    pub fn from_vec(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Result<Self> {
        Self::new(shape, data, DType::F32)
    }

    /// All zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>, dtype: DType) -> Self {
        let shape = shape.into();
        let data = vec![T::ZERO; numel(&shape)];
        Tensor {
            shape,
            dtype,
            device: Device::Cpu,
            data,
        }
    }

    /// A rank-0 tensor.
    pub fn scalar(x: T, dtype: DType) -> Self {
        Tensor {
            shape: Vec::new(),
            dtype,
            device: Device::Cpu,
            data: vec![x.round_to(dtype)],
        }
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Storage dtype (the values are representable in it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Where the tensor lives (always the CPU in this backend).
    pub fn device(&self) -> Device {
        self.device
    }
    /// Row-major values.
    pub fn data(&self) -> &[T] {
        &self.data
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Bytes the tensor occupies in device storage (`numel * dtype.size_of()`).
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_of()
    }
    /// Takes the values out.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// The same values in another scalar type (f32 <-> f64), keeping dtype and shape.
    pub fn cast<U: Scalar>(&self) -> Tensor<U> {
        let mut data: Vec<U> = self.data.iter().map(|x| U::from_f64(x.to_f64())).collect();
        round_slice(&mut data, self.dtype);
        Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            device: self.device,
            data,
        }
    }

    /// The same values stored in `dtype` (rounded when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Tensor<T> {
        let mut data = self.data.clone();
        round_slice(&mut data, dtype);
        Tensor {
            shape: self.shape.clone(),
            dtype,
            device: self.device,
            data,
        }
    }

    pub(crate) fn into_parts(self) -> (Vec<usize>, DType, Vec<T>) {
        (self.shape, self.dtype, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_checks_length_and_rounds() {
        assert!(Tensor::<f32>::new([2, 3], vec![0.0; 5], DType::F32).is_err());
        let t = Tensor::<f32>::new([1, 2], vec![1.0 + 1.0 / 512.0, 3.0], DType::BF16).unwrap();
        assert_eq!(t.data(), &[1.0, 3.0]);
        assert_eq!(t.size_bytes(), 4);
        assert_eq!(Tensor::<f64>::scalar(2.0, DType::F32).numel(), 1);
        assert!(Tensor::<f32>::new_on([1], vec![1.0], DType::F32, Device::Cuda(0)).is_err());
    }
}
