//! Flat parameter storage, as in llm.c.
//!
//! All parameters of a model live in one contiguous buffer per role: fp32 master weights, the
//! working copy the forward pass reads (the master rounded to the compute dtype), and fp32
//! gradients. A parameter is a [`ParamView`]: a name, an offset and a shape into those buffers.
//! Optimizers, all-reduce buckets, ZeRO shards and checkpoints then work on plain slices.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::scalar::Scalar;
use crate::tensor::numel;

/// What a model declares about one parameter before the store lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Unique name (Hugging Face naming for the GPT).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Whether weight decay applies (2-D weights: yes; biases, norms: no).
    pub decay: bool,
}

impl ParamSpec {
    /// A spec from its parts.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>, decay: bool) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.into(),
            decay,
        }
    }
}

/// One parameter inside the flat buffers: elements `offset .. offset + numel(shape)`, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamView {
    /// Unique name.
    pub name: String,
    /// First element in the flat buffers.
    pub offset: usize,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Whether weight decay applies.
    pub decay: bool,
}

impl ParamView {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// Range of this parameter in the flat buffers.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Flat master / working / gradient buffers plus the views that name them.
///
/// - `master`: fp32 weights (`T` = f64 only in gradient checks), updated by the optimizer.
/// - `working`: what the forward pass reads: `master` rounded to the compute dtype
///   ([`ParamStore::sync_working`]); equal to `master` in f32.
/// - `grads`: fp32 gradients; `Tape::backward` adds (`+=`) into it, so K micro-batches
///   accumulate until [`ParamStore::zero_grads`].
///
/// Parameters are packed back to back in declaration order, with no padding.
#[derive(Debug)]
pub struct ParamStore<T: Scalar = f32> {
    views: Vec<ParamView>,
    index: HashMap<String, usize>,
    len: usize,
    master: Vec<T>,
    working: Vec<T>,
    grads: Vec<T>,
    working_dtype: DType,
    has_data: bool,
    /// Identity of this store (a clone gets a new one) and a counter bumped whenever the
    /// working copy may change: a tape re-copies a parameter it saw at another version.
    id: u64,
    working_version: u64,
    /// The device copy of the buffers (authoritative while present; see
    /// [`ParamStore::to_device`]).
    pub(crate) device_params: Option<crate::device::params::DeviceParams>,
}

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

fn next_store_id() -> u64 {
    NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed)
}

/// A clone holds the host buffers only (a device store's host mirror as of its last
/// [`ParamStore::fetch_from_device`]).
impl<T: Scalar> Clone for ParamStore<T> {
    fn clone(&self) -> Self {
        ParamStore {
            views: self.views.clone(),
            index: self.index.clone(),
            len: self.len,
            master: self.master.clone(),
            working: self.working.clone(),
            grads: self.grads.clone(),
            working_dtype: self.working_dtype,
            has_data: self.has_data,
            id: next_store_id(),
            working_version: 0,
            device_params: None,
        }
    }
}

impl<T: Scalar> ParamStore<T> {
    /// Lays out `specs` in order, all buffers zero, working dtype f32.
    pub fn new(specs: &[ParamSpec]) -> Result<Self> {
        let mut store = Self::layout(specs)?;
        store.master = vec![T::ZERO; store.len];
        store.working = vec![T::ZERO; store.len];
        store.grads = vec![T::ZERO; store.len];
        store.has_data = true;
        Ok(store)
    }

    /// Views only, no buffers: enough to record a graph in a dry run (memory accounting at
    /// shapes too large to allocate). Data accessors return empty slices.
    pub fn layout(specs: &[ParamSpec]) -> Result<Self> {
        let mut views = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        let mut offset = 0usize;
        for s in specs {
            if index.insert(s.name.clone(), views.len()).is_some() {
                return Err(Error::DuplicateParam(s.name.clone()));
            }
            views.push(ParamView {
                name: s.name.clone(),
                offset,
                shape: s.shape.clone(),
                decay: s.decay,
            });
            offset += numel(&s.shape);
        }
        Ok(ParamStore {
            views,
            index,
            len: offset,
            master: Vec::new(),
            working: Vec::new(),
            grads: Vec::new(),
            working_dtype: DType::F32,
            has_data: false,
            id: next_store_id(),
            working_version: 0,
            device_params: None,
        })
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.len
    }
    /// All views, in layout order.
    pub fn views(&self) -> &[ParamView] {
        &self.views
    }
    /// False for a [`ParamStore::layout`] store.
    pub fn has_data(&self) -> bool {
        self.has_data
    }
    /// The view of parameter `name`.
    pub fn view(&self, name: &str) -> Result<&ParamView> {
        self.index
            .get(name)
            .map(|&i| &self.views[i])
            .ok_or_else(|| Error::UnknownParam(name.to_string()))
    }
    /// Position of `name` in [`ParamStore::views`].
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The fp32 master weights, all parameters back to back.
    pub fn master(&self) -> &[T] {
        &self.master
    }
    /// The master weights, mutable (optimizer steps, loading). Call
    /// [`ParamStore::sync_working`] afterwards.
    pub fn master_mut(&mut self) -> &mut [T] {
        &mut self.master
    }
    /// The working copy the forward reads (master rounded to [`ParamStore::working_dtype`]).
    pub fn working(&self) -> &[T] {
        &self.working
    }
    /// Direct access for fused optimizers that write the low-precision copy themselves; the
    /// caller then also sets the dtype with [`ParamStore::set_working_dtype`].
    pub fn working_mut(&mut self) -> &mut [T] {
        self.working_version += 1;
        &mut self.working
    }
    /// The fp32 gradients, laid out like the master weights.
    pub fn grads(&self) -> &[T] {
        &self.grads
    }
    /// The gradients, mutable (unscaling, clipping, all-reduce).
    pub fn grads_mut(&mut self) -> &mut [T] {
        &mut self.grads
    }
    /// Master and gradient buffers at once (an optimizer step reads one and writes the other).
    pub fn master_and_grads_mut(&mut self) -> (&mut [T], &mut [T]) {
        (&mut self.master, &mut self.grads)
    }

    /// The master values of one parameter.
    pub fn param(&self, name: &str) -> Result<&[T]> {
        let r = self.view(name)?.range();
        Ok(&self.master[r])
    }
    /// The master values of one parameter, mutable (initialisation, loading).
    pub fn param_mut(&mut self, name: &str) -> Result<&mut [T]> {
        let r = self.view(name)?.range();
        Ok(&mut self.master[r])
    }
    /// The gradient of one parameter.
    pub fn grad(&self, name: &str) -> Result<&[T]> {
        let r = self.view(name)?.range();
        Ok(&self.grads[r])
    }

    /// Sets every gradient to zero (start of an optimizer step's accumulation).
    pub fn zero_grads(&mut self) {
        self.grads.fill(T::ZERO);
    }

    /// `working = round(master)` in `dtype`; the tape checks that its compute dtype matches.
    pub fn sync_working(&mut self, dtype: DType) {
        for (w, m) in self.working.iter_mut().zip(&self.master) {
            *w = m.round_to(dtype);
        }
        self.working_dtype = dtype;
        self.working_version += 1;
    }

    /// The dtype the working copy was last synced to.
    pub fn working_dtype(&self) -> DType {
        self.working_dtype
    }
    /// Declares the dtype of a working copy written through [`ParamStore::working_mut`].
    pub fn set_working_dtype(&mut self, dtype: DType) {
        self.working_dtype = dtype;
        self.working_version += 1;
    }

    pub(crate) fn bump_working_version(&mut self) {
        self.working_version += 1;
    }

    /// `(store identity, working-copy version)`: changes whenever the working copy may have.
    pub(crate) fn working_stamp(&self) -> (u64, u64) {
        (self.id, self.working_version)
    }

    /// The same store in another scalar type (f32 <-> f64), e.g. for a gradient check.
    pub fn cast<U: Scalar>(&self) -> ParamStore<U> {
        let conv = |v: &[T]| {
            v.iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect::<Vec<U>>()
        };
        ParamStore {
            views: self.views.clone(),
            index: self.index.clone(),
            len: self.len,
            master: conv(&self.master),
            working: conv(&self.working),
            grads: conv(&self.grads),
            working_dtype: self.working_dtype,
            has_data: self.has_data,
            id: next_store_id(),
            working_version: 0,
            device_params: None,
        }
    }

    /// The specs this store was laid out from (for building a twin store).
    pub fn specs(&self) -> Vec<ParamSpec> {
        self.views
            .iter()
            .map(|v| ParamSpec::new(v.name.clone(), v.shape.clone(), v.decay))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_contiguous_and_lookup_works() {
        let specs = [
            ParamSpec::new("w", [2, 3], true),
            ParamSpec::new("b", [3], false),
        ];
        let mut p = ParamStore::<f32>::new(&specs).unwrap();
        assert_eq!(p.num_params(), 9);
        assert_eq!(p.view("b").unwrap().offset, 6);
        assert!(p.view("nope").is_err());
        p.param_mut("b")
            .unwrap()
            .copy_from_slice(&[1.0 + 1.0 / 512.0, 2.0, 3.0]);
        p.sync_working(DType::BF16);
        assert_eq!(&p.working()[6..], &[1.0, 2.0, 3.0]);
        assert_eq!(p.working_dtype(), DType::BF16);
        p.grads_mut()[0] = 5.0;
        p.zero_grads();
        assert!(p.grads().iter().all(|&g| g == 0.0));
        let dup = [
            ParamSpec::new("w", [1], true),
            ParamSpec::new("w", [1], true),
        ];
        assert!(matches!(
            ParamStore::<f32>::new(&dup),
            Err(Error::DuplicateParam(_))
        ));
    }
}
