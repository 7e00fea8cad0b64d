//! A multi-layer perceptron classifier: `linear -> act -> ... -> linear`, cross-entropy loss.
//!
//! Parameters: `layers.{i}.weight` `(in, out)` (decayed) and `layers.{i}.bias` `(out)`.

use lathe_kernels::rng::Rng;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::loss::IGNORE_INDEX;
use crate::params::{ParamSpec, ParamStore};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;

/// Nonlinearity between the layers of an [`Mlp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// GELU, tanh form.
    Gelu,
}

/// An MLP with layer widths `sizes[0] -> sizes[1] -> ... -> sizes[n]` (inputs to classes).
#[derive(Clone, Debug)]
pub struct Mlp {
    sizes: Vec<usize>,
    activation: Activation,
}

impl Mlp {
    /// At least two sizes (inputs and classes), all non-zero.
    pub fn new(sizes: &[usize], activation: Activation) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::Config(format!(
                "an MLP needs at least two non-zero sizes (inputs, classes), got {sizes:?}"
            )));
        }
        Ok(Mlp {
            sizes: sizes.to_vec(),
            activation,
        })
    }

    /// Layer widths, inputs first, classes last.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
    /// Number of classes (the last width).
    pub fn num_classes(&self) -> usize {
        *self.sizes.last().expect("validated")
    }

    /// Parameter layout.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.sizes
            .windows(2)
            .enumerate()
            .flat_map(|(i, w)| {
                [
                    ParamSpec::new(format!("layers.{i}.weight"), [w[0], w[1]], true),
                    ParamSpec::new(format!("layers.{i}.bias"), [w[1]], false),
                ]
            })
            .collect()
    }

    /// Weights normal with std `sqrt(2 / fan_in)` (He), biases 0; working copy synced in f32.
    pub fn init_params(&self, seed: u64) -> ParamStore {
        let mut store = ParamStore::<f32>::new(&self.param_specs()).expect("unique names");
        let mut rng = Rng::new(seed);
        for view in store.views().to_vec() {
            let std = (2.0 / view.shape[0] as f32).sqrt();
            let dst = &mut store.master_mut()[view.range()];
            if view.shape.len() == 2 {
                for x in dst {
                    *x = std * rng.normal();
                }
            } else {
                dst.fill(0.0);
            }
        }
        store.sync_working(DType::F32);
        store
    }

    /// Logits `(batch, classes)` for inputs `x` `(batch, sizes[0])` row-major.
    pub fn logits<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        x: &[T],
        batch: usize,
    ) -> Result<Var> {
        let input = Tensor::new([batch, self.sizes[0]], x.to_vec(), tape.dtype())?;
        let mut h = tape.input(input)?;
        let n = self.sizes.len() - 1;
        for i in 0..n {
            let w = tape.param(params, &format!("layers.{i}.weight"))?;
            let b = tape.param(params, &format!("layers.{i}.bias"))?;
            h = tape.linear(h, w, Some(b))?;
            if i + 1 < n {
                h = match self.activation {
                    Activation::Relu => tape.relu(h)?,
                    Activation::Gelu => tape.gelu(h)?,
                };
            }
        }
        Ok(h)
    }

    /// Mean cross-entropy of the logits against `labels` (one class per row, or
    /// [`IGNORE_INDEX`]).
    pub fn loss<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &ParamStore<T>,
        x: &[T],
        labels: &[u32],
        batch: usize,
    ) -> Result<Var> {
        let logits = self.logits(tape, params, x, batch)?;
        tape.cross_entropy(logits, labels, self.num_classes(), IGNORE_INDEX)
    }
}
