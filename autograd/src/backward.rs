//! The reverse walk.
//!
//! `backward(loss, seed, params)` seeds `dloss = seed` (the trainer passes
//! `loss_scale / accum_steps`) and visits the nodes in reverse creation order:
//!
//! 1. values the op's backward reads (see `ops::saved`) that were dropped for recomputation are
//!    recomputed first, by re-running the forward of the dropped nodes on their kept inputs;
//! 2. the op's backward produces one contribution per input that needs a gradient;
//! 3. contributions are summed into the inputs' gradients. An activation gradient is written by
//!    its first contribution and summed after (stored in the activation's dtype); a parameter's
//!    gradient is added (`+=`) into the store's f32 gradient buffer when the walk reaches the
//!    parameter, so gradients accumulate across micro-batches until `zero_grads`;
//! 4. values and gradients no later step needs are freed.
//!
//! The walk order, and so every summation order, is the same whether values were kept or
//! recomputed: recomputation changes memory, never results.

use crate::device::ops::DIn;
use crate::device::{DevBuf, dev_err};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{self, Op, Val};
use crate::params::ParamStore;
use crate::scalar::Scalar;
use crate::tape::{Phase, SlotKind, Tape, Var, round_par};
use crate::tensor::numel;

use rayon::prelude::*;

const NONE: usize = usize::MAX;

/// The seed of the loss gradient.
enum Seed<'a, T> {
    /// A host value.
    Host(T),
    /// `state[SCALE] * factor`, read on the device.
    State(&'a lathe_host::DeviceBuffer<u32>, f32),
}

impl<T: Scalar> Tape<T> {
    /// Back-propagates from the one-element `loss`, seeding `dloss = seed`, and adds the
    /// parameter gradients into `params.grads` (`+=`). Inputs made with [`Tape::leaf`] and
    /// `requires_grad` keep their gradients ([`Tape::grad`]). Activation values are freed as
    /// the walk passes them; the tape must be [`Tape::clear`]ed before recording again.
    pub fn backward(&mut self, loss: Var, seed: T, params: &mut ParamStore<T>) -> Result<()> {
        self.backward_impl(loss, Seed::Host(seed), Some(params))
    }

    /// [`Tape::backward`] for a tape without parameters (gradients of leaves only).
    pub fn backward_leaves(&mut self, loss: Var, seed: T) -> Result<()> {
        self.backward_impl(loss, Seed::Host(seed), None)
    }

    /// [`Tape::backward`] on a device tape with the seed read on the device:
    /// `dloss = state[SCALE] * factor`, `state` being the step state of
    /// [`lathe_kernels::nn::amp`] (the dynamic loss scale lives there, updated by the device's
    /// optimizer step), so no step waits for the host to learn the scale.
    pub fn backward_scaled(
        &mut self,
        loss: Var,
        state: &lathe_host::DeviceBuffer<u32>,
        factor: f32,
        params: &mut ParamStore<T>,
    ) -> Result<()> {
        if self.dev.is_none() {
            return Err(Error::Backward(
                "backward_scaled seeds from a device step state; this tape runs on the CPU".into(),
            ));
        }
        self.backward_impl(loss, Seed::State(state, factor), Some(params))
    }

    fn backward_impl(
        &mut self,
        loss: Var,
        seed: Seed<'_, T>,
        params: Option<&mut ParamStore<T>>,
    ) -> Result<()> {
        if self.phase != Phase::Recording {
            return Err(Error::Backward(
                "the tape was already back-propagated; clear it".into(),
            ));
        }
        let ls = self.slot_index(loss)?;
        let shape = &self.slots[ls].shape;
        if numel(shape) != 1 {
            return Err(Error::Backward(format!(
                "the loss must have one element, got shape {shape:?}"
            )));
        }
        if !self.slots[ls].requires_grad {
            return Err(Error::Backward(
                "the loss does not depend on any parameter or leaf that requires a gradient".into(),
            ));
        }
        match (self.param_len, &params) {
            (Some(_), None) => {
                return Err(Error::Backward(
                    "the tape holds parameters: call backward with their ParamStore".into(),
                ));
            }
            (Some(len), Some(p)) if p.num_params() != len || (!self.dry && !p.has_data()) => {
                return Err(Error::Backward(format!(
                    "the ParamStore ({} parameters{}) is not the one the forward used ({len})",
                    p.num_params(),
                    if p.has_data() { "" } else { ", no buffers" }
                )));
            }
            _ => {}
        }
        self.phase = Phase::InBackward;
        let r = self.walk(ls, seed, params);
        self.phase = Phase::Backpropagated;
        r
    }

    fn walk(
        &mut self,
        ls: usize,
        seed: Seed<'_, T>,
        mut params: Option<&mut ParamStore<T>>,
    ) -> Result<()> {
        self.slots[ls].pinned = true;
        let loss_node = self.slots[ls].node;
        let n_nodes = self.nodes.len();

        // Which nodes run a backward: those with an output on a path to the loss.
        let mut gets_grad = vec![false; self.slots.len()];
        gets_grad[ls] = true;
        let mut active = vec![false; n_nodes];
        for n in (0..=loss_node).rev() {
            let node = &self.nodes[n];
            if matches!(node.op, Op::Leaf) || !node.outputs().any(|s| gets_grad[s]) {
                continue;
            }
            active[n] = true;
            for &i in &node.inputs {
                if self.slots[i].requires_grad {
                    gets_grad[i] = true;
                }
            }
        }

        // What each active backward reads, and the last (lowest) node that reads each value.
        let mut saved: Vec<(Vec<bool>, Vec<bool>)> = vec![(Vec::new(), Vec::new()); n_nodes];
        let mut last_use = vec![NONE; self.slots.len()];
        for n in 0..n_nodes {
            if !active[n] {
                continue;
            }
            let node = &self.nodes[n];
            let in_rg: Vec<bool> = node
                .inputs
                .iter()
                .map(|&i| self.slots[i].requires_grad)
                .collect();
            let (si, so) = ops::saved(&node.op, &in_rg, node.n_out);
            for (k, &i) in node.inputs.iter().enumerate() {
                if si[k] {
                    last_use[i] = last_use[i].min(n);
                }
            }
            for (k, s) in node.outputs().enumerate() {
                if so[k] {
                    last_use[s] = last_use[s].min(n);
                }
            }
            saved[n] = (si, so);
        }

        // Free now what nothing reads, unless it is needed to recompute a dropped value that
        // will be read.
        let mut recompute_need = vec![false; self.slots.len()];
        for n in (0..n_nodes).rev() {
            let node = &self.nodes[n];
            if matches!(node.op, Op::Leaf) {
                continue;
            }
            let needed_missing = node
                .outputs()
                .any(|s| !self.slots[s].has_value() && (last_use[s] != NONE || recompute_need[s]));
            if needed_missing {
                for &i in &node.inputs {
                    recompute_need[i] = true;
                }
            }
        }
        for s in 0..self.slots.len() {
            let slot = &self.slots[s];
            if slot.kind == SlotKind::Computed
                && !slot.pinned
                && last_use[s] == NONE
                && !recompute_need[s]
            {
                self.free_value(s);
            }
        }

        // Seed.
        let seed_dtype = self.slots[ls].dtype;
        if let (Some(ctx), false) = (&self.dev, self.dry) {
            let dev = ctx.dev.clone();
            let g = match seed {
                Seed::Host(x) => {
                    let mut g = DevBuf::alloc(&dev, seed_dtype, 1)?;
                    g.fill(&dev, x.to_f64() as f32)?;
                    g
                }
                Seed::State(state, factor) => {
                    let mut g = dev.alloc::<f32>(1).map_err(dev_err("backward seed"))?;
                    dev.fill_from_state_scale(state, factor, &mut g)
                        .map_err(dev_err("backward seed"))?;
                    DevBuf::F32(g).conform(&dev, seed_dtype)?
                }
            };
            self.set_dgrad(ls, g);
        } else {
            let Seed::Host(seed) = seed else {
                return Err(Error::Backward("a device seed on a CPU tape".into()));
            };
            let mut g = if self.dry {
                Vec::new()
            } else {
                self.pool.take(1)
            };
            if let Some(x) = g.first_mut() {
                *x = seed;
            }
            round_par(&mut g, seed_dtype);
            self.set_grad(ls, g);
        }

        for n in (0..=loss_node).rev() {
            if matches!(self.nodes[n].op, Op::Leaf) {
                let s = self.nodes[n].first_out;
                if let SlotKind::Param { offset } = self.slots[s].kind {
                    if let (Some(g), Some(p)) =
                        (self.slots[s].dgrad.as_ref(), params.as_deref_mut())
                    {
                        let dp = p.device_mut().ok_or_else(|| {
                            Error::Backward(
                                "the parameter store is on the host but the tape on a device"
                                    .into(),
                            )
                        })?;
                        let dev = dp.device().clone();
                        dp.grads_dev_mut().add_assign_at(&dev, offset, g)?;
                    }
                    if let (Some(g), Some(p), false) = (
                        self.slots[s].grad.as_deref(),
                        params.as_deref_mut(),
                        self.dry,
                    ) {
                        add_into(&mut p.grads_mut()[offset..offset + g.len()], g);
                    }
                    let len = numel(&self.slots[s].shape);
                    let had_grad = self.slots[s].has_grad();
                    self.free_grad(s);
                    if let (Some(hook), Some(p), true) =
                        (self.grad_ready.as_mut(), params.as_deref_mut(), had_grad)
                    {
                        hook(p, offset..offset + len)?;
                    }
                }
                continue;
            }
            if !active[n] {
                continue;
            }
            let node = &self.nodes[n];
            let (si, so) = &saved[n];
            let mut needed: Vec<usize> = node
                .inputs
                .iter()
                .zip(si)
                .filter(|(_, k)| **k)
                .map(|(&i, _)| i)
                .collect();
            needed.extend(node.outputs().zip(so).filter(|(_, k)| **k).map(|(s, _)| s));
            let filled = self.ensure(&needed)?;

            if self.dev.is_some() && !self.dry {
                let contributions = self.run_backward_device(n, &saved[n])?;
                let outputs = self.nodes[n].outputs();
                for s in outputs {
                    self.free_grad(s);
                    if !self.slots[s].pinned {
                        self.free_value(s);
                    }
                }
                let inputs = self.nodes[n].inputs.clone();
                for (&i, c) in inputs.iter().zip(contributions) {
                    if let Some(c) = c {
                        self.accumulate_device(i, c)?;
                    }
                }
                self.free_after(n, &inputs, &filled, &last_use);
                continue;
            }
            let contributions = self.run_backward(n, &saved[n]);

            let outputs = self.nodes[n].outputs();
            for s in outputs {
                self.free_grad(s);
                if !self.slots[s].pinned {
                    self.free_value(s);
                }
            }
            let inputs = self.nodes[n].inputs.clone();
            for (&i, c) in inputs.iter().zip(contributions) {
                if let Some(c) = c {
                    self.accumulate(i, c);
                }
            }
            self.free_after(n, &inputs, &filled, &last_use);
        }
        Ok(())
    }

    /// After node `n`'s backward: frees the inputs it read last and the recomputed values no
    /// later node reads.
    fn free_after(&mut self, n: usize, inputs: &[usize], filled: &[usize], last_use: &[usize]) {
        for &i in inputs {
            let droppable = self.slots[i].kind == SlotKind::Computed || self.is_refillable(i);
            if last_use[i] == n && droppable && !self.slots[i].pinned {
                self.free_value(i);
            }
        }
        for &s in filled {
            let lu = last_use[s];
            if (lu == NONE || lu > n) && !self.slots[s].pinned {
                self.free_value(s);
            }
        }
    }

    /// Runs node `n`'s backward on the device; one contribution per input needing a gradient.
    fn run_backward_device(
        &mut self,
        n: usize,
        saved: &(Vec<bool>, Vec<bool>),
    ) -> Result<Vec<Option<DevBuf>>> {
        let ctx = self.dev.as_mut().expect("device tape");
        let node = &self.nodes[n];
        let slots = &self.slots;
        let val = |s: usize, keep: bool| DIn {
            shape: &slots[s].shape,
            buf: if keep { slots[s].dvalue.as_ref() } else { None },
        };
        let ins: Vec<DIn> = node
            .inputs
            .iter()
            .zip(&saved.0)
            .map(|(&i, &k)| val(i, k))
            .collect();
        let outs: Vec<DIn> = node
            .outputs()
            .zip(&saved.1)
            .map(|(s, &k)| val(s, k))
            .collect();
        let gouts: Vec<Option<&DevBuf>> = node.outputs().map(|s| slots[s].dgrad.as_ref()).collect();
        let want: Vec<Option<DType>> = node
            .inputs
            .iter()
            .map(|&i| {
                let s = &slots[i];
                s.requires_grad.then_some(match s.kind {
                    SlotKind::Param { .. } => DType::F32,
                    _ => s.dtype,
                })
            })
            .collect();
        let start = self.profile.as_ref().map(|_| std::time::Instant::now());
        let name = node.op.name();
        let din =
            crate::device::ops::backward(ctx, n, &node.op, self.dtype, &ins, &outs, &gouts, &want)
                .map_err(|e| e.in_op(name))?;
        if let Some(s) = start {
            let secs = s.elapsed().as_secs_f64();
            self.record_time(name, true, s, secs);
        }
        Ok(din)
    }

    /// Adds a device contribution into slot `s`'s gradient (in the slot's dtype; f32 for
    /// parameters), converting its dtype when it differs.
    fn accumulate_device(&mut self, s: usize, c: DevBuf) -> Result<()> {
        let dtype = match self.slots[s].kind {
            SlotKind::Param { .. } => DType::F32,
            _ => self.slots[s].dtype,
        };
        let dev = self.dev.as_ref().expect("device tape").dev.clone();
        match self.slots[s].dgrad.as_mut() {
            None => {
                let c = c.conform(&dev, dtype)?;
                self.set_dgrad(s, c);
            }
            Some(g) => g.add_assign(&dev, &c)?,
        }
        Ok(())
    }

    /// Runs node `n`'s backward kernel; returns one contribution per input needing a gradient.
    fn run_backward(&mut self, n: usize, saved: &(Vec<bool>, Vec<bool>)) -> Vec<Option<Vec<T>>> {
        let node = &self.nodes[n];
        let mut din: Vec<Option<Vec<T>>> = node
            .inputs
            .iter()
            .map(|&i| {
                let s = &self.slots[i];
                s.requires_grad.then(|| {
                    if self.dry {
                        Vec::new()
                    } else {
                        self.pool.take(numel(&s.shape))
                    }
                })
            })
            .collect();
        if self.dry {
            return din;
        }
        let val = |s: usize, keep: bool| {
            let slot = &self.slots[s];
            let data = if keep {
                slot.value.as_deref().expect("ensured above")
            } else {
                &[]
            };
            Val {
                shape: &slot.shape,
                data,
            }
        };
        let ins: Vec<Val<T>> = node
            .inputs
            .iter()
            .zip(&saved.0)
            .map(|(&i, &k)| val(i, k))
            .collect();
        let outs: Vec<Val<T>> = node
            .outputs()
            .zip(&saved.1)
            .map(|(s, &k)| val(s, k))
            .collect();
        let gouts: Vec<Option<&[T]>> = node
            .outputs()
            .map(|s| self.slots[s].grad.as_deref())
            .collect();
        let start = self.profile.as_ref().map(|_| std::time::Instant::now());
        ops::backward(&node.op, &ins, &outs, &gouts, &mut din);
        let name = node.op.name();
        if let Some(s) = start {
            let secs = s.elapsed().as_secs_f64();
            self.record_time(name, true, s, secs);
        }
        din
    }

    /// Adds a contribution into slot `s`'s gradient (stored in the slot's dtype; f32 for
    /// parameters).
    fn accumulate(&mut self, s: usize, mut c: Vec<T>) {
        let dtype = match self.slots[s].kind {
            SlotKind::Param { .. } => DType::F32,
            _ => self.slots[s].dtype,
        };
        match self.slots[s].grad.as_mut() {
            None => {
                round_par(&mut c, dtype);
                self.set_grad(s, c);
            }
            Some(g) => {
                if dtype.is_low_precision() {
                    g.par_chunks_mut(ops::par::CHUNK)
                        .zip(c.par_chunks(ops::par::CHUNK))
                        .for_each(|(g, c)| {
                            for (g, &c) in g.iter_mut().zip(c) {
                                *g = (*g + c).round_to(dtype);
                            }
                        });
                } else {
                    add_into(g, &c);
                }
                self.pool.give(c);
            }
        }
    }
}

/// `dst += src`, in parallel chunks.
fn add_into<T: Scalar>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(ops::par::CHUNK)
        .zip(src.par_chunks(ops::par::CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}
