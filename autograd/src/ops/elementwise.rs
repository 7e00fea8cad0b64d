//! Elementwise ops: add, mul, scale, bias_add (broadcast), GELU (tanh form), ReLU.

use rayon::prelude::*;

use crate::error::{Result, shape_err};
use crate::ops::par::{CHUNK, col_sums, map1, map2};
use crate::ops::{Op, Val};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::numel;

impl<T: Scalar> Tape<T> {
    fn same_shape(&self, op: &'static str, a: Var, b: Var) -> Result<Vec<usize>> {
        let (sa, sb) = (self.shape(a)?, self.shape(b)?);
        if sa != sb {
            return Err(shape_err(
                op,
                format!("operands have shapes {sa:?} and {sb:?}"),
            ));
        }
        Ok(sa.to_vec())
    }

    /// `a + b`, same shapes (the residual stream). Output in the compute dtype.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_shape("add", a, b)?;
        Ok(self.record(Op::Add, &[a, b], vec![s])?[0])
    }

    /// `a * b` elementwise, same shapes.
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_shape("mul", a, b)?;
        Ok(self.record(Op::Mul, &[a, b], vec![s])?[0])
    }

    /// `s * x`.
    pub fn scale(&mut self, x: Var, s: f64) -> Result<Var> {
        let shape = self.shape(x)?.to_vec();
        Ok(self.record(Op::Scale(s), &[x], vec![shape])?[0])
    }

    /// `x + b` with `b` broadcast over the leading dims: `b`'s shape must equal the trailing
    /// dims of `x` (e.g. `x` (B, T, C) and `b` (C) or (T, C)).
    pub fn bias_add(&mut self, x: Var, b: Var) -> Result<Var> {
        let (xs, bs) = (self.shape(x)?, self.shape(b)?);
        if bs.len() > xs.len() || xs[xs.len() - bs.len()..] != *bs {
            return Err(shape_err(
                "bias_add",
                format!("bias {bs:?} is not the trailing part of x {xs:?}"),
            ));
        }
        let shape = xs.to_vec();
        Ok(self.record(Op::BiasAdd, &[x, b], vec![shape])?[0])
    }

    /// GELU, tanh approximation (as GPT-2): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        let shape = self.shape(x)?.to_vec();
        Ok(self.record(Op::Gelu, &[x], vec![shape])?[0])
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let shape = self.shape(x)?.to_vec();
        Ok(self.record(Op::Relu, &[x], vec![shape])?[0])
    }
}

pub(crate) fn add_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    map2(out, ins[0].data, ins[1].data, |a, b| a + b);
}

pub(crate) fn add_backward<T: Scalar>(g: &[T], din: &mut [Option<Vec<T>>]) {
    for d in din.iter_mut().flatten() {
        d.copy_from_slice(g);
    }
}

pub(crate) fn mul_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    map2(out, ins[0].data, ins[1].data, |a, b| a * b);
}

pub(crate) fn mul_backward<T: Scalar>(ins: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    if let Some(da) = din[0].as_mut() {
        map2(da, g, ins[1].data, |g, b| g * b);
    }
    if let Some(db) = din[1].as_mut() {
        map2(db, g, ins[0].data, |g, a| g * a);
    }
}

pub(crate) fn scale_forward<T: Scalar>(s: T, ins: &[Val<T>], out: &mut [T]) {
    map1(out, ins[0].data, move |x| x * s);
}

pub(crate) fn scale_backward<T: Scalar>(s: T, g: &[T], din: &mut [Option<Vec<T>>]) {
    if let Some(d) = din[0].as_mut() {
        map1(d, g, move |g| g * s);
    }
}

pub(crate) fn bias_add_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    let (x, b) = (ins[0].data, ins[1].data);
    let w = b.len().max(1);
    let rows_per = (CHUNK / w).max(1);
    out.par_chunks_mut(rows_per * w)
        .zip(x.par_chunks(rows_per * w))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_mut(w).zip(x.chunks(w)) {
                for ((o, &x), &b) in orow.iter_mut().zip(xrow).zip(b) {
                    *o = x + b;
                }
            }
        });
}

pub(crate) fn bias_add_backward<T: Scalar>(ins: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    if let Some(dx) = din[0].as_mut() {
        dx.copy_from_slice(g);
    }
    if let Some(db) = din[1].as_mut() {
        let w = numel(ins[1].shape);
        col_sums(g, g.len() / w.max(1), w, db);
    }
}

const GELU_K: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_C: f64 = 0.044_715;

// GELU, tanh form. With u = sqrt(2/pi) (x + 0.044715 x^3) and s = sigmoid(2u):
//   0.5 (1 + tanh(u)) = s,  so  gelu(x) = x s;
//   1 - tanh(u)^2 = 4 s (1 - s),  so  gelu'(x) = s + 2 x s (1 - s) du/dx.
// The same function as the tanh formula, evaluated with one exp instead of a tanh (which costs
// several times more on the CPU and loses accuracy in 1 + tanh(u) for negative u).

#[inline(always)]
fn gelu_sigmoid<T: Scalar>(x: T) -> T {
    let u = T::from_f64(GELU_K) * (x + T::from_f64(GELU_C) * x * x * x);
    T::ONE / (T::ONE + (-(u + u)).exp())
}

// Named `#[inline(always)]` functions rather than closures: passed as fn items they are always
// inlined into the (AVX2-compiled) loops of `map1` / `map2`.

#[inline(always)]
fn gelu<T: Scalar>(x: T) -> T {
    x * gelu_sigmoid(x)
}

#[inline(always)]
fn gelu_grad<T: Scalar>(g: T, x: T) -> T {
    let s = gelu_sigmoid(x);
    let du = T::from_f64(GELU_K) * (T::ONE + T::from_f64(3.0 * GELU_C) * x * x);
    g * (s + T::from_f64(2.0) * x * s * (T::ONE - s) * du)
}

pub(crate) fn gelu_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    map1(out, ins[0].data, gelu::<T>);
}

pub(crate) fn gelu_backward<T: Scalar>(ins: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    if let Some(d) = din[0].as_mut() {
        map2(d, g, ins[0].data, gelu_grad::<T>);
    }
}

pub(crate) fn relu_forward<T: Scalar>(ins: &[Val<T>], out: &mut [T]) {
    map1(out, ins[0].data, |x| if x > T::ZERO { x } else { T::ZERO });
}

pub(crate) fn relu_backward<T: Scalar>(outs: &[Val<T>], g: &[T], din: &mut [Option<Vec<T>>]) {
    if let Some(d) = din[0].as_mut() {
        map2(
            d,
            g,
            outs[0].data,
            |g, y| if y > T::ZERO { g } else { T::ZERO },
        );
    }
}
