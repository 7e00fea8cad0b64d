//! Typed launches of the memory-bound training kernels (`lathe_kernels::nn`): the step state
//! and gradient check, fused AdamW, layernorm, GELU, residual and bias adds, the fused
//! classifier, embeddings and the causal attention softmax. Each wrapper checks shapes and
//! lengths, picks the kernel for the element type, and launches on the compute stream; nothing
//! here synchronises with the host except the explicit `read_*` helpers.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use half::{bf16, f16};
use lathe_kernels::nn::adamw::{self, DecayRanges, Working};
use lathe_kernels::nn::amp::{self, STATE_WORDS, ScalerRule, StepState};
use lathe_kernels::nn::{colsum, layernorm, pointwise};
use lathe_kernels::{KernelDesc, Problem};

fn len_eq(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::Length {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v} does not fit the kernel's u32")))
}

fn kernel_for(
    op: &str,
    e: lathe_kernels::Elem,
    k: Option<&'static KernelDesc>,
) -> Result<&'static KernelDesc> {
    k.ok_or_else(|| invalid(format!("{op} has no kernel for element type {}", e.name())))
}

/// A pointer argument `off` elements into `b` (read-only unless `writable`).
fn at<T: DeviceElem>(b: &DeviceBuffer<T>, off: usize, writable: bool) -> KernelArg {
    KernelArg::Ptr {
        addr: b.addr() + (off * size_of::<T>()) as u64,
        elem: T::ELEM,
        len: b.len() - off,
        writable,
    }
}

/// `rows = len / c`, checking `c > 0` and divisibility.
fn rows_of(what: &'static str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || !len.is_multiple_of(c) {
        return Err(invalid(format!(
            "{what}: {len} elements are not rows of {c}"
        )));
    }
    Ok(len / c)
}

/// The weight-decay table of a fused AdamW launch, on the device.
pub struct DeviceDecayRanges {
    words: DeviceBuffer<u32>,
    count: u32,
}

impl DeviceDecayRanges {
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// The working copy an AdamW step writes (same length as the master weights).
pub enum WorkingCopyMut<'a> {
    None,
    /// bf16, round to nearest even.
    Bf16(&'a mut DeviceBuffer<bf16>),
    /// bf16, stochastic rounding keyed by `(seed, step, global index)`.
    Bf16Stochastic(&'a mut DeviceBuffer<bf16>),
    /// IEEE half, round to nearest even.
    F16(&'a mut DeviceBuffer<f16>),
}

/// Host-side scalars of one AdamW launch. Step count, loss scale, clip factor and the skip
/// decision come from the step state on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWLaunch {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global index of element 0 (a shard's start): decay ranges and stochastic rounding use
    /// global indices.
    pub offset: u64,
    /// Stochastic-rounding seed (ignored by the other working copies).
    pub seed: u64,
    /// Multiply gradients by the state's `INV_SCALE` (false when they were unscaled in place).
    pub unscale: bool,
}

impl Device {
    // ---------------------------------------------------------------- step state, AMP

    /// A step state on the device, initialised from `init`.
    pub fn step_state(&self, init: &StepState) -> Result<DeviceBuffer<u32>> {
        self.htod(&init.to_words())
    }

    /// Reads a step state back (synchronises the compute stream).
    pub fn read_step_state(&self, state: &DeviceBuffer<u32>) -> Result<StepState> {
        let w = state.to_vec()?;
        StepState::from_words(&w).ok_or_else(|| {
            invalid(format!(
                "step state has {} words, needs {STATE_WORDS}",
                w.len()
            ))
        })
    }

    fn check_state(state: &DeviceBuffer<u32>) -> Result<()> {
        len_eq("step state", STATE_WORDS, state.len())
    }

    fn grad_pass(
        &self,
        k: &'static KernelDesc,
        grads: KernelArg,
        n: usize,
        state: &mut DeviceBuffer<u32>,
        max_norm: f32,
    ) -> Result<()> {
        Self::check_state(state)?;
        let n = n as u64;
        let blocks = amp::check_blocks(n) as usize;
        let mut partials = self.alloc::<f32>(blocks)?;
        let s = self.compute_stream();
        let args = [
            grads,
            KernelArg::U64(n),
            state.arg_mut(),
            partials.arg_mut(),
        ];
        self.launch(k, &Problem::elems(n), &args, s)?;
        self.grad_norm_finish(&partials, blocks, state, max_norm)
    }

    /// The first half of [`Device::grad_check_norm`] over `grads[range]` only: sets the
    /// state's `FOUND_INF` when that range holds inf/NaN and writes the range's
    /// `check_blocks(range.len())` per-block sums of `(g * INV_SCALE)^2` into
    /// `partials[at..]`. Returns how many partials it wrote. A norm split over shards (ZeRO)
    /// runs this once per shard, in shard order, then [`Device::grad_norm_finish`] over all
    /// the partials: the same arithmetic whether the shards sit in one buffer or on several
    /// ranks.
    pub fn grad_check_partials(
        &self,
        grads: &DeviceBuffer<f32>,
        range: std::ops::Range<usize>,
        state: &mut DeviceBuffer<u32>,
        partials: &mut DeviceBuffer<f32>,
        at: usize,
    ) -> Result<usize> {
        Self::check_state(state)?;
        let n = range.len() as u64;
        let blocks = amp::check_blocks(n) as usize;
        let args = [
            grads.arg_range(range)?,
            KernelArg::U64(n),
            state.arg_mut(),
            partials.arg_range_mut(at..at + blocks)?,
        ];
        self.launch(
            &amp::CHECK_NORM_F32,
            &Problem::elems(n),
            &args,
            self.compute_stream(),
        )?;
        Ok(blocks)
    }

    /// The second half of [`Device::grad_check_norm`]: the norm of `partials[..count]` (in
    /// order) into the state's `GRAD_NORM`, and `CLIP`.
    pub fn grad_norm_finish(
        &self,
        partials: &DeviceBuffer<f32>,
        count: usize,
        state: &mut DeviceBuffer<u32>,
        max_norm: f32,
    ) -> Result<()> {
        Self::check_state(state)?;
        let args = [
            partials.arg_range(0..count)?,
            KernelArg::U32(u32::try_from(count).map_err(|_| {
                invalid(format!(
                    "{count} norm partials do not fit the finish kernel"
                ))
            })?),
            state.arg_mut(),
            KernelArg::F32(max_norm),
        ];
        self.launch(
            &amp::NORM_FINISH_F32,
            &Problem::elems(count as u64),
            &args,
            self.compute_stream(),
        )
    }

    /// Non-finite check and global norm of `grads * INV_SCALE` (grads unchanged): sets the
    /// state's `FOUND_INF`, writes `GRAD_NORM` and `CLIP = min(1, max_norm / (norm + 1e-6))`
    /// (`max_norm <= 0` turns clipping off). Two deterministic launches, no host sync.
    pub fn grad_check_norm(
        &self,
        grads: &DeviceBuffer<f32>,
        state: &mut DeviceBuffer<u32>,
        max_norm: f32,
    ) -> Result<()> {
        self.grad_pass(
            &amp::CHECK_NORM_F32,
            grads.arg(),
            grads.len(),
            state,
            max_norm,
        )
    }

    /// [`Device::grad_check_norm`] and `grads *= INV_SCALE` in place (then launch AdamW with
    /// `unscale: false`).
    pub fn grad_unscale_check_norm(
        &self,
        grads: &mut DeviceBuffer<f32>,
        state: &mut DeviceBuffer<u32>,
        max_norm: f32,
    ) -> Result<()> {
        let n = grads.len();
        self.grad_pass(
            &amp::UNSCALE_CHECK_NORM_F32,
            grads.arg_mut(),
            n,
            state,
            max_norm,
        )
    }

    /// End of a step: counts it (applied or skipped), applies GradScaler's rule when
    /// `rule.dynamic`, clears `FOUND_INF` (kept in `LAST_FOUND_INF`).
    pub fn amp_update(&self, state: &mut DeviceBuffer<u32>, rule: &ScalerRule) -> Result<()> {
        Self::check_state(state)?;
        if rule.dynamic
            && !(rule.growth_interval > 0
                && rule.growth_factor > 1.0
                && rule.backoff_factor > 0.0
                && rule.backoff_factor < 1.0
                && rule.min_scale.is_finite()
                && rule.min_scale >= 0.0)
        {
            return Err(invalid(format!(
                "loss-scale rule {rule:?}: needs growth_interval > 0, growth_factor > 1, \
                 0 < backoff_factor < 1, a finite min_scale >= 0"
            )));
        }
        let args = [
            state.arg_mut(),
            KernelArg::U32(rule.dynamic as u32),
            KernelArg::U32(rule.growth_interval),
            KernelArg::U64(rule.growth_factor.to_bits()),
            KernelArg::U64(rule.backoff_factor.to_bits()),
            KernelArg::F32(rule.min_scale),
        ];
        self.launch(
            &amp::AMP_UPDATE,
            &Problem::default(),
            &args,
            self.compute_stream(),
        )
    }

    // ---------------------------------------------------------------- AdamW

    /// Uploads a weight-decay table for [`Device::adamw_step`].
    pub fn upload_decay_ranges(&self, ranges: &DecayRanges) -> Result<DeviceDecayRanges> {
        Ok(DeviceDecayRanges {
            words: self.htod(&ranges.words())?,
            count: ranges.count(),
        })
    }

    /// One fused AdamW step over `master, grads, m, v` (same length `n`, f32), writing the
    /// working copy when one is given. Skips itself on the device when the state's
    /// `FOUND_INF` is set. See `lathe_kernels::nn::adamw` for the exact formula.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        master: &mut DeviceBuffer<f32>,
        grads: &DeviceBuffer<f32>,
        m: &mut DeviceBuffer<f32>,
        v: &mut DeviceBuffer<f32>,
        working: WorkingCopyMut<'_>,
        decay: &DeviceDecayRanges,
        state: &DeviceBuffer<u32>,
        p: &AdamWLaunch,
    ) -> Result<()> {
        let n = master.len();
        len_eq("adamw grads", n, grads.len())?;
        len_eq("adamw m", n, m.len())?;
        len_eq("adamw v", n, v.len())?;
        Self::check_state(state)?;
        let (kind, warg) = match working {
            WorkingCopyMut::None => (Working::None, None),
            WorkingCopyMut::Bf16(w) => {
                len_eq("adamw working copy", n, w.len())?;
                (Working::Bf16, Some(w.arg_mut()))
            }
            WorkingCopyMut::Bf16Stochastic(w) => {
                len_eq("adamw working copy", n, w.len())?;
                (Working::Bf16Stochastic, Some(w.arg_mut()))
            }
            WorkingCopyMut::F16(w) => {
                len_eq("adamw working copy", n, w.len())?;
                (Working::F16, Some(w.arg_mut()))
            }
        };
        if n == 0 {
            return Ok(());
        }
        let mut args = vec![master.arg_mut(), grads.arg(), m.arg_mut(), v.arg_mut()];
        args.extend(warg);
        args.extend([
            decay.words.arg(),
            KernelArg::U32(decay.count),
            state.arg(),
            KernelArg::U64(n as u64),
            KernelArg::U64(p.offset),
            KernelArg::U64(p.seed),
            KernelArg::F32(p.lr),
            KernelArg::F32(p.beta1),
            KernelArg::F32(p.beta2),
            KernelArg::F32(p.eps),
            KernelArg::F32(p.weight_decay),
            KernelArg::U32(p.unscale as u32),
        ]);
        self.launch(
            adamw::kernel_for(kind),
            &Problem::elems(n as u64),
            &args,
            self.compute_stream(),
        )
    }

    // ---------------------------------------------------------------- layernorm

    /// LayerNorm forward over rows of `c`: `x, out (rows, c)`, `weight, bias (c)` of `T`;
    /// `mean, rstd (rows)` f32 written for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        bias: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
        mean: &mut DeviceBuffer<f32>,
        rstd: &mut DeviceBuffer<f32>,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let k = kernel_for("layernorm", T::ELEM, layernorm::forward_for(T::ELEM))?;
        let rows = rows_of("layernorm x", x.len(), c)?;
        len_eq("layernorm weight", c, weight.len())?;
        len_eq("layernorm bias", c, bias.len())?;
        len_eq("layernorm out", x.len(), out.len())?;
        len_eq("layernorm mean", rows, mean.len())?;
        len_eq("layernorm rstd", rows, rstd.len())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            x.arg(),
            weight.arg(),
            bias.arg(),
            out.arg_mut(),
            mean.arg_mut(),
            rstd.arg_mut(),
            KernelArg::U32(to_u32("rows", rows)?),
            KernelArg::U32(to_u32("C", c)?),
            KernelArg::F32(eps),
        ];
        let p = Problem {
            batch: rows as u64,
            n: c as u64,
            ..Problem::default()
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// LayerNorm backward: `dx (rows, c)` written; `dweight, dbias (c)` f32 accumulated (`+=`)
    /// through per-block partials and a fixed-order column sum (deterministic).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: DeviceElem>(
        &self,
        dout: &DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        weight: &DeviceBuffer<T>,
        mean: &DeviceBuffer<f32>,
        rstd: &DeviceBuffer<f32>,
        dx: &mut DeviceBuffer<T>,
        dweight: &mut DeviceBuffer<f32>,
        dbias: &mut DeviceBuffer<f32>,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for(
            "layernorm backward",
            T::ELEM,
            layernorm::backward_for(T::ELEM),
        )?;
        let rows = rows_of("layernorm backward x", x.len(), c)?;
        len_eq("layernorm backward dout", x.len(), dout.len())?;
        len_eq("layernorm backward dx", x.len(), dx.len())?;
        len_eq("layernorm backward weight", c, weight.len())?;
        len_eq("layernorm backward mean", rows, mean.len())?;
        len_eq("layernorm backward rstd", rows, rstd.len())?;
        len_eq("layernorm backward dweight", c, dweight.len())?;
        len_eq("layernorm backward dbias", c, dbias.len())?;
        if rows == 0 {
            return Ok(());
        }
        let groups = layernorm::bwd_groups(rows as u64) as usize;
        let mut partials = self.alloc::<f32>(groups * 2 * c)?;
        let (rows32, c32) = (to_u32("rows", rows)?, to_u32("C", c)?);
        let s = self.compute_stream();
        let args = [
            dout.arg(),
            x.arg(),
            weight.arg(),
            mean.arg(),
            rstd.arg(),
            dx.arg_mut(),
            partials.arg_mut(),
            KernelArg::U32(rows32),
            KernelArg::U32(c32),
        ];
        let p = Problem {
            batch: rows as u64,
            n: c as u64,
            ..Problem::default()
        };
        self.launch(k, &p, &args, s)?;
        self.colsum_acc(&partials, 0, groups, c, 2 * c, dweight)?;
        self.colsum_acc(&partials, c, groups, c, 2 * c, dbias)
    }

    /// `out[j] += sum_{g < groups} partials[first + g * stride + j]` for `j < width`, in a
    /// fixed order (the second pass of deterministic parameter gradients).
    pub fn colsum_acc(
        &self,
        partials: &DeviceBuffer<f32>,
        first: usize,
        groups: usize,
        width: usize,
        stride: usize,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        len_eq("column sum output", width, out.len())?;
        if width > stride || (groups > 0 && first + (groups - 1) * stride + width > partials.len())
        {
            return Err(invalid(format!(
                "column sum of {groups} x {width} (stride {stride}, first {first}) does not fit \
                 {} partials",
                partials.len()
            )));
        }
        if width == 0 {
            return Ok(());
        }
        let args = [
            at(partials, first, false),
            KernelArg::U32(to_u32("groups", groups)?),
            KernelArg::U32(to_u32("width", width)?),
            KernelArg::U32(to_u32("stride", stride)?),
            out.arg_mut(),
        ];
        let p = Problem {
            batch: groups as u64,
            n: width as u64,
            ..Problem::default()
        };
        self.launch(&colsum::COLSUM_ACC_F32, &p, &args, self.compute_stream())
    }

    // ---------------------------------------------------------------- pointwise

    fn elementwise_nn(
        &self,
        k: &'static KernelDesc,
        mut args: Vec<KernelArg>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        args.push(KernelArg::U64(n as u64));
        self.launch(k, &Problem::elems(n as u64), &args, self.compute_stream())
    }

    /// `out = gelu(x)` (tanh form), same length.
    pub fn gelu_forward<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for("gelu", T::ELEM, pointwise::gelu_fwd_for(T::ELEM))?;
        len_eq("gelu out", x.len(), out.len())?;
        self.elementwise_nn(k, vec![x.arg(), out.arg_mut()], x.len())
    }

    /// `dx = dout * gelu'(x)`, all the same length.
    pub fn gelu_backward<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        dout: &DeviceBuffer<T>,
        dx: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for("gelu backward", T::ELEM, pointwise::gelu_bwd_for(T::ELEM))?;
        len_eq("gelu backward dout", x.len(), dout.len())?;
        len_eq("gelu backward dx", x.len(), dx.len())?;
        self.elementwise_nn(k, vec![x.arg(), dout.arg(), dx.arg_mut()], x.len())
    }

    /// `g = g * gelu'(x)` in place (the gradient buffer becomes dx).
    pub fn gelu_backward_in_place<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        g: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for("gelu backward", T::ELEM, pointwise::gelu_bwd_for(T::ELEM))?;
        len_eq("gelu backward gradient", x.len(), g.len())?;
        self.elementwise_nn(k, vec![x.arg(), g.arg(), g.arg_mut()], x.len())
    }

    /// `out = a + b`, same length.
    pub fn residual_add<T: DeviceElem>(
        &self,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for(
            "residual add",
            T::ELEM,
            pointwise::residual_add_for(T::ELEM),
        )?;
        len_eq("residual add b", a.len(), b.len())?;
        len_eq("residual add out", a.len(), out.len())?;
        self.elementwise_nn(k, vec![a.arg(), b.arg(), out.arg_mut()], a.len())
    }

    /// `a += b` in place.
    pub fn residual_add_in_place<T: DeviceElem>(
        &self,
        a: &mut DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
    ) -> Result<()> {
        let k = kernel_for(
            "residual add",
            T::ELEM,
            pointwise::residual_add_for(T::ELEM),
        )?;
        len_eq("residual add b", a.len(), b.len())?;
        self.elementwise_nn(k, vec![a.arg(), b.arg(), a.arg_mut()], a.len())
    }

    fn bias_add_launch<T: DeviceElem>(
        &self,
        x: KernelArg,
        bias: &DeviceBuffer<T>,
        out: KernelArg,
        len: usize,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for("bias add", T::ELEM, pointwise::bias_add_for(T::ELEM))?;
        let rows = rows_of("bias add x", len, c)?;
        len_eq("bias add bias", c, bias.len())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            x,
            bias.arg(),
            out,
            KernelArg::U32(to_u32("rows", rows)?),
            KernelArg::U32(to_u32("C", c)?),
        ];
        let p = Problem {
            batch: rows as u64,
            n: c as u64,
            ..Problem::default()
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// `out[r, j] = x[r, j] + bias[j]` over rows of `c`.
    pub fn bias_add<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        bias: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
        c: usize,
    ) -> Result<()> {
        len_eq("bias add out", x.len(), out.len())?;
        self.bias_add_launch(x.arg(), bias, out.arg_mut(), x.len(), c)
    }

    /// `x[r, j] += bias[j]` in place.
    pub fn bias_add_in_place<T: DeviceElem>(
        &self,
        x: &mut DeviceBuffer<T>,
        bias: &DeviceBuffer<T>,
        c: usize,
    ) -> Result<()> {
        let len = x.len();
        self.bias_add_launch(x.arg(), bias, x.arg_mut(), len, c)
    }
}

mod layers;
pub use layers::{ClassifierShape, FlashShape};
