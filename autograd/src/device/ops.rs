//! The device kernels of every op: forward and backward launches through `lathe-host`.
//!
//! Contracts (the device twin of [`crate::ops`]):
//! - forward: returns one new buffer per output, in the output's storage dtype (the tape
//!   decided it with the autocast table), every element written.
//! - backward: returns, for each input `i` with `want[i] = Some(dtype)`, a new buffer with
//!   this op's contribution dL/d(input i). It is produced in `dtype` when the kernel can write
//!   that directly (parameter gradients in f32); the tape converts anything else when it adds
//!   the contribution in. Values the backward did not ask to keep arrive as `None`.
//!
//! Numerics follow the CPU reference: f32 arithmetic everywhere, storage rounded to nearest
//! even, matrix products accumulated in f32 (tensor cores for bf16/f16 operands, the SIMT
//! f32-FMA kernel for f32 operands — full f32, not TF32). Summation orders differ from the
//! CPU's, so results agree within the dtype tolerances, not bit for bit; every launch is
//! deterministic, so a device run repeats bit for bit.
//!
//! Attention is three launches around two strided-batched products per direction (one launch
//! for all `B x n_head` heads): head split, `S = Q K^T` in f32, causal softmax, `P` rounded to
//! the compute dtype (saved for the backward), `O = P V`, head merge. Memory beyond the saved
//! `qkv` and `P` (`B n_head T^2` elements of the compute dtype): the transient `S` (and `dP`
//! in the backward) in f32, `4 B n_head T^2` bytes, plus `q, k, v` head copies (`3 B T C`
//! elements), freed when the op returns.

use half::{bf16, f16};
use lathe_host::gemm_ops::{Gemm, Op as GOp};
use lathe_host::nn_ops::FlashShape;
use lathe_host::step_ops::{Batched, Heads};
use lathe_host::{Device, DeviceBuffer, DeviceElem};

use super::{DevBuf, DevCtx, dev_err};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::Op;
use crate::ops::matmul::mm_dims;
use crate::tensor::numel;

/// An input (or saved output) handed to a device kernel; `buf` is `None` for values the
/// backward did not ask to keep.
pub(crate) struct DIn<'a> {
    pub shape: &'a [usize],
    pub buf: Option<&'a DevBuf>,
}

impl DIn<'_> {
    fn get(&self, op: &'static str) -> Result<&DevBuf> {
        self.buf.ok_or_else(|| Error::Invalid {
            op,
            detail: "a value the device kernel needs was not kept".into(),
        })
    }
}

/// Typed access to the buffer inside a [`DevBuf`].
pub(crate) trait Pick: DeviceElem {
    const DTYPE: DType;
    fn pick(b: &DevBuf) -> Result<&DeviceBuffer<Self>>;
    fn pick_mut(b: &mut DevBuf) -> Result<&mut DeviceBuffer<Self>>;
}

fn wrong(want: DType, got: DType) -> Error {
    Error::Invalid {
        op: "device",
        detail: format!("expected a {want} buffer, got {got}"),
    }
}

macro_rules! pick_impl {
    ($t:ty, $v:ident, $dt:expr) => {
        impl Pick for $t {
            const DTYPE: DType = $dt;
            fn pick(b: &DevBuf) -> Result<&DeviceBuffer<Self>> {
                match b {
                    DevBuf::$v(x) => Ok(x),
                    other => Err(wrong($dt, other.dtype())),
                }
            }
            fn pick_mut(b: &mut DevBuf) -> Result<&mut DeviceBuffer<Self>> {
                match b {
                    DevBuf::$v(x) => Ok(x),
                    other => Err(wrong($dt, other.dtype())),
                }
            }
        }
    };
}
pick_impl!(f32, F32, DType::F32);
pick_impl!(bf16, Bf16, DType::BF16);
pick_impl!(f16, F16, DType::F16);

/// Runs `$body` with the type alias `$T` set to the element type of `$dt`.
macro_rules! with_type {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
        }
    };
}

/// A value converted to `dtype` when it is stored in another one.
enum Conformed<'a> {
    Same(&'a DevBuf),
    Owned(DevBuf),
}

impl Conformed<'_> {
    fn get(&self) -> &DevBuf {
        match self {
            Conformed::Same(b) => b,
            Conformed::Owned(b) => b,
        }
    }
}

fn conform<'a>(dev: &Device, b: &'a DevBuf, dtype: DType) -> Result<Conformed<'a>> {
    if b.dtype() == dtype {
        Ok(Conformed::Same(b))
    } else {
        Ok(Conformed::Owned(b.to_dtype(dev, dtype)?))
    }
}

/// One (possibly batched) product `C = op(A) op(B) (+ bias)`, operands of one dtype, C of
/// the operand dtype or f32.
fn gemm(
    dev: &Device,
    bg: &Batched,
    a: &DevBuf,
    b: &DevBuf,
    bias: Option<&DevBuf>,
    c: &mut DevBuf,
) -> Result<()> {
    fn go<I: Pick, O: Pick>(
        dev: &Device,
        bg: &Batched,
        a: &DevBuf,
        b: &DevBuf,
        bias: Option<&DevBuf>,
        c: &mut DevBuf,
    ) -> Result<()> {
        let bias = bias.map(I::pick).transpose()?;
        let (a, b, c) = (I::pick(a)?, I::pick(b)?, O::pick_mut(c)?);
        let r = if I::DTYPE != DType::F32 && bg.batch == 1 {
            dev.gemm(&bg.gemm, a, b, bias, c)
        } else {
            dev.gemm_batched(bg, a, b, bias, c)
        };
        r.map_err(dev_err("matmul"))
    }
    if a.dtype() != b.dtype() {
        return Err(Error::Invalid {
            op: "matmul",
            detail: format!("operands in {} and {}", a.dtype(), b.dtype()),
        });
    }
    match (a.dtype(), c.dtype()) {
        (DType::F32, DType::F32) => go::<f32, f32>(dev, bg, a, b, bias, c),
        (DType::BF16, DType::BF16) => go::<bf16, bf16>(dev, bg, a, b, bias, c),
        (DType::BF16, DType::F32) => go::<bf16, f32>(dev, bg, a, b, bias, c),
        (DType::F16, DType::F16) => go::<f16, f16>(dev, bg, a, b, bias, c),
        (DType::F16, DType::F32) => go::<f16, f32>(dev, bg, a, b, bias, c),
        (i, o) => Err(Error::Invalid {
            op: "matmul",
            detail: format!("no product of {i} operands into {o}"),
        }),
    }
}

fn gop(t: bool) -> GOp {
    if t { GOp::T } else { GOp::N }
}

fn batched(g: Gemm, batch: usize, sa: usize, sb: usize, sc: usize) -> Batched {
    Batched {
        gemm: g,
        batch,
        stride_a: sa,
        stride_b: sb,
        stride_c: sc,
    }
}

fn alloc(dev: &Device, dtype: DType, shape: &[usize]) -> Result<DevBuf> {
    DevBuf::alloc(dev, dtype, numel(shape))
}

/// Runs the forward of `op` on the device. `outs` are the outputs' (shape, storage dtype).
pub(crate) fn forward(
    ctx: &mut DevCtx,
    node: usize,
    op: &Op,
    compute: DType,
    ins: &[DIn],
    outs: &[(&[usize], DType)],
) -> Result<Vec<DevBuf>> {
    let dev = ctx.dev.clone();
    let dev = &dev;
    let name = op.name();
    let e = || dev_err(name);
    let out0 = || alloc(dev, outs[0].1, outs[0].0);
    let x = |i: usize| ins[i].get(name);
    match op {
        Op::Leaf => Ok(Vec::new()),
        Op::Matmul { trans_a, trans_b } => {
            let (ta, tb) = (*trans_a, *trans_b);
            let (d, _) = mm_dims(ins[0].shape, ins[1].shape, ta, tb)?;
            let a = conform(dev, x(0)?, compute)?;
            let b = conform(dev, x(1)?, compute)?;
            let mut c = out0()?;
            let bg = if !d.b_batched && !ta {
                Batched::single(Gemm::new(d.batch * d.m, d.n, d.k).with_ops(GOp::N, gop(tb)))
            } else {
                let sb = if d.b_batched { d.k * d.n } else { 0 };
                let g = Gemm::new(d.m, d.n, d.k).with_ops(gop(ta), gop(tb));
                batched(g, d.batch, d.m * d.k, sb, d.m * d.n)
            };
            gemm(dev, &bg, a.get(), b.get(), None, &mut c)?;
            Ok(vec![c])
        }
        Op::Linear => {
            let (xs, ws) = (ins[0].shape, ins[1].shape);
            let (inp, outp) = (ws[0], ws[1]);
            let rows = numel(xs) / inp;
            let a = conform(dev, x(0)?, compute)?;
            let w = conform(dev, x(1)?, compute)?;
            let bias = match ins.get(2) {
                Some(b) => Some(conform(dev, b.get(name)?, compute)?),
                None => None,
            };
            let mut c = out0()?;
            let g = Gemm::new(rows, outp, inp);
            gemm(
                dev,
                &Batched::single(g),
                a.get(),
                w.get(),
                bias.as_ref().map(|b| b.get()),
                &mut c,
            )?;
            Ok(vec![c])
        }
        Op::Add | Op::Mul => {
            let dt = outs[0].1;
            let a = conform(dev, x(0)?, dt)?;
            let b = conform(dev, x(1)?, dt)?;
            let mut c = out0()?;
            with_type!(dt, T => {
                let (a, b, o) = (T::pick(a.get())?, T::pick(b.get())?, T::pick_mut(&mut c)?);
                if matches!(op, Op::Add) {
                    dev.residual_add(a, b, o)
                } else {
                    dev.mul(a, b, o)
                }
                .map_err(e())?;
            });
            Ok(vec![c])
        }
        Op::Scale(s) => {
            let dt = outs[0].1;
            let a = conform(dev, x(0)?, dt)?;
            let mut c = out0()?;
            with_type!(dt, T => dev
                .scale(T::pick(a.get())?, T::pick_mut(&mut c)?, *s as f32)
                .map_err(e())?);
            Ok(vec![c])
        }
        Op::BiasAdd => {
            let dt = outs[0].1;
            let a = conform(dev, x(0)?, dt)?;
            let b = conform(dev, x(1)?, dt)?;
            let cols = numel(ins[1].shape);
            let mut c = out0()?;
            with_type!(dt, T => dev
                .bias_add(T::pick(a.get())?, T::pick(b.get())?, T::pick_mut(&mut c)?, cols)
                .map_err(e())?);
            Ok(vec![c])
        }
        Op::Gelu | Op::Relu => {
            let dt = outs[0].1;
            let a = conform(dev, x(0)?, dt)?;
            let mut c = out0()?;
            with_type!(dt, T => {
                let (a, o) = (T::pick(a.get())?, T::pick_mut(&mut c)?);
                if matches!(op, Op::Gelu) {
                    dev.gelu_forward(a, o)
                } else {
                    dev.relu_forward(a, o)
                }
                .map_err(e())?;
            });
            Ok(vec![c])
        }
        Op::LayerNorm { eps } => {
            let dt = outs[0].1;
            let c = *ins[0].shape.last().unwrap_or(&1);
            let a = conform(dev, x(0)?, dt)?;
            let w = conform(dev, x(1)?, dt)?;
            let b = conform(dev, x(2)?, dt)?;
            let mut y = out0()?;
            let mut mean = alloc(dev, DType::F32, outs[1].0)?;
            let mut rstd = alloc(dev, DType::F32, outs[2].0)?;
            with_type!(dt, T => dev
                .layernorm_forward(
                    T::pick(a.get())?,
                    T::pick(w.get())?,
                    T::pick(b.get())?,
                    T::pick_mut(&mut y)?,
                    f32::pick_mut(&mut mean)?,
                    f32::pick_mut(&mut rstd)?,
                    c,
                    *eps as f32,
                )
                .map_err(e())?);
            Ok(vec![y, mean, rstd])
        }
        Op::Softmax => {
            let c = *ins[0].shape.last().unwrap_or(&1);
            let a = conform(dev, x(0)?, DType::F32)?;
            let mut y = alloc(dev, DType::F32, outs[0].0)?;
            dev.softmax_forward(f32::pick(a.get())?, f32::pick_mut(&mut y)?, c)
                .map_err(e())?;
            Ok(vec![y.conform(dev, outs[0].1)?])
        }
        Op::Attention { n_head } => attention_forward(dev, *n_head, ins[0].shape, x(0)?, outs),
        Op::FlashAttention { n_head, .. } => flash_forward(dev, *n_head, ins[0].shape, x(0)?, outs),
        Op::Embedding { ids } => {
            let dt = outs[0].1;
            let c = ins[0].shape[1];
            let ids_dev = ids_on_device(ctx, node, ids)?;
            let table = conform(dev, x(0)?, dt)?;
            let mut y = out0()?;
            with_type!(dt, T => dev
                .gather_rows(ids_dev, T::pick(table.get())?, T::pick_mut(&mut y)?, c)
                .map_err(e())?);
            Ok(vec![y])
        }
        Op::CrossEntropy {
            targets,
            vocab,
            ignore_index,
        } => {
            let vp = *ins[0].shape.last().unwrap_or(&1);
            let rows = targets.len();
            let t_dev = ids_on_device(ctx, node, targets)?;
            let logits = x(0)?;
            let mut losses = dev.alloc::<f32>(rows).map_err(e())?;
            let mut lse = DevBuf::alloc(dev, DType::F32, rows)?;
            with_type!(logits.dtype(), T => dev
                .xent_forward(
                    T::pick(logits)?,
                    t_dev,
                    &mut losses,
                    f32::pick_mut(&mut lse)?,
                    vp,
                    *vocab,
                    *ignore_index,
                )
                .map_err(e())?);
            let n = targets.iter().filter(|&&t| t != *ignore_index).count();
            let mut loss = dev.alloc::<f32>(1).map_err(e())?;
            if n == 0 || rows == 0 {
                dev.fill(&mut loss, 0.0).map_err(e())?;
            } else {
                dev.sum_into(&losses, &mut loss).map_err(e())?;
                dev.scale_in_place(&mut loss, (1.0 / n as f64) as f32)
                    .map_err(e())?;
            }
            Ok(vec![DevBuf::F32(loss), lse])
        }
        Op::Reshape => Ok(vec![x(0)?.to_dtype(dev, outs[0].1)?]),
        Op::Transpose { d0, d1 } => {
            let src = x(0)?;
            let mut y = alloc(dev, src.dtype(), outs[0].0)?;
            swap(dev, src, &mut y, ins[0].shape, *d0, *d1)?;
            Ok(vec![y])
        }
        Op::Split { dim, sizes } => {
            let src = x(0)?;
            let (outer, d, inner) = split3(ins[0].shape, *dim);
            let mut res = Vec::with_capacity(sizes.len());
            let mut start = 0;
            for (k, &sz) in sizes.iter().enumerate() {
                let mut y = alloc(dev, src.dtype(), outs[k].0)?;
                copy_2d(
                    dev,
                    src,
                    start * inner,
                    d * inner,
                    &mut y,
                    0,
                    sz * inner,
                    outer,
                    sz * inner,
                )?;
                start += sz;
                res.push(y);
            }
            Ok(res)
        }
        Op::Concat { dim } => {
            let dt = outs[0].1;
            let (outer, d, inner) = split3(outs[0].0, *dim);
            let mut y = out0()?;
            let mut start = 0;
            for (k, i) in ins.iter().enumerate() {
                let sz = i.shape[*dim];
                let src = conform(dev, x(k)?, dt)?;
                copy_2d(
                    dev,
                    src.get(),
                    0,
                    sz * inner,
                    &mut y,
                    start * inner,
                    d * inner,
                    outer,
                    sz * inner,
                )?;
                start += sz;
            }
            Ok(vec![y])
        }
        Op::Sum | Op::Mean => {
            let n = numel(ins[0].shape);
            let a = conform(dev, x(0)?, DType::F32)?;
            let mut s = dev.alloc::<f32>(1).map_err(e())?;
            if n == 0 {
                dev.fill(&mut s, 0.0).map_err(e())?;
            } else {
                dev.sum_into(f32::pick(a.get())?, &mut s).map_err(e())?;
                if matches!(op, Op::Mean) {
                    dev.scale_in_place(&mut s, (1.0 / n as f64) as f32)
                        .map_err(e())?;
                }
            }
            Ok(vec![DevBuf::F32(s)])
        }
    }
}

/// The device copy of a node's integer inputs (see [`DevCtx::ids`]).
fn ids_on_device<'a>(
    ctx: &'a mut DevCtx,
    node: usize,
    ids: &[u32],
) -> Result<&'a DeviceBuffer<u32>> {
    ctx.ids(node, ids)
}

/// (outer, dim, inner) view of `shape` around `dim`.
fn split3(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (numel(&shape[..dim]), shape[dim], numel(&shape[dim + 1..]))
}

#[allow(clippy::too_many_arguments)]
fn copy_2d(
    dev: &Device,
    src: &DevBuf,
    src_off: usize,
    src_ld: usize,
    dst: &mut DevBuf,
    dst_off: usize,
    dst_ld: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    with_type!(src.dtype(), T => dev
        .copy_2d(T::pick(src)?, src_off, src_ld, T::pick_mut(dst)?, dst_off, dst_ld, rows, cols)
        .map_err(dev_err("copy")))
}

/// `dst (pre, b, mid, a, post) = src (pre, a, mid, b, post)` for `src` of `shape` and the
/// dims `d0 < d1` holding `a` and `b`.
fn swap(
    dev: &Device,
    src: &DevBuf,
    dst: &mut DevBuf,
    shape: &[usize],
    d0: usize,
    d1: usize,
) -> Result<()> {
    let (d0, d1) = (d0.min(d1), d0.max(d1));
    if d0 == d1 {
        return src.copy_into(dev, dst);
    }
    let dims = [
        numel(&shape[..d0]),
        shape[d0],
        numel(&shape[d0 + 1..d1]),
        shape[d1],
        numel(&shape[d1 + 1..]),
    ];
    with_type!(src.dtype(), T => dev
        .swap_axes(T::pick(src)?, T::pick_mut(dst)?, dims)
        .map_err(dev_err("transpose")))
}

fn attention_dims(qkv: &[usize], n_head: usize) -> (usize, usize, usize, usize) {
    let (b, t, c) = (qkv[0], qkv[1], qkv[2] / 3);
    (b, t, n_head, c / n_head)
}

fn attention_forward(
    dev: &Device,
    n_head: usize,
    qkv_shape: &[usize],
    qkv: &DevBuf,
    outs: &[(&[usize], DType)],
) -> Result<Vec<DevBuf>> {
    let e = || dev_err("attention");
    let dt = outs[0].1;
    let (b, t, nh, hs) = attention_dims(qkv_shape, n_head);
    let bh = b * nh;
    let qkv = conform(dev, qkv, dt)?;
    let [q, k, v] = split_heads(dev, qkv.get(), b, t, nh, hs)?;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    // S = Q K^T (f32), then the causal softmax in place.
    let mut s = DevBuf::alloc(dev, DType::F32, bh * t * t)?;
    let g = Gemm::new(t, t, hs).with_ops(GOp::N, GOp::T);
    gemm(
        dev,
        &batched(g, bh, t * hs, t * hs, t * t),
        &q,
        &k,
        None,
        &mut s,
    )?;
    dev.attention_softmax_forward_in_place(f32::pick_mut(&mut s)?, bh, t, scale)
        .map_err(e())?;
    let p = s.conform(dev, outs[1].1)?;
    let p_op = conform(dev, &p, dt)?;
    // O = P V per head, then back to (B, T, C).
    let mut o = DevBuf::alloc(dev, dt, bh * t * hs)?;
    let g = Gemm::new(t, hs, t);
    gemm(
        dev,
        &batched(g, bh, t * t, t * hs, t * hs),
        p_op.get(),
        &v,
        None,
        &mut o,
    )?;
    let mut y = alloc(dev, dt, outs[0].0)?;
    merge_heads(dev, &[&o], &mut y, b, t, nh, hs)?;
    Ok(vec![y, p])
}

fn flash_shape(qkv_shape: &[usize], n_head: usize) -> (FlashShape, f32) {
    let (b, t, nh, hs) = attention_dims(qkv_shape, n_head);
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    (FlashShape { b, t, nh, hs }, scale)
}

/// The fused attention forward: `y` and the f32 log-sum-exp `(B, nh, T)`.
fn flash_forward(
    dev: &Device,
    n_head: usize,
    qkv_shape: &[usize],
    qkv: &DevBuf,
    outs: &[(&[usize], DType)],
) -> Result<Vec<DevBuf>> {
    let dt = outs[0].1;
    let (s, scale) = flash_shape(qkv_shape, n_head);
    let qkv = conform(dev, qkv, dt)?;
    let mut y = alloc(dev, dt, outs[0].0)?;
    let mut lse = DevBuf::alloc(dev, DType::F32, s.stats_len())?;
    with_type!(dt, T => dev
        .flash_attention_forward(
            T::pick(qkv.get())?,
            T::pick_mut(&mut y)?,
            f32::pick_mut(&mut lse)?,
            &s,
            scale,
        )
        .map_err(dev_err("flash_attention"))?);
    Ok(vec![y, lse])
}

/// The fused attention backward: `dqkv` in the compute dtype from `qkv`, `[y, lse]` and `dy`.
fn flash_backward(
    dev: &Device,
    n_head: usize,
    compute: DType,
    qkv_shape: &[usize],
    qkv: &DevBuf,
    [y, lse]: [&DevBuf; 2],
    dy: &DevBuf,
) -> Result<DevBuf> {
    let dt = compute;
    let (s, scale) = flash_shape(qkv_shape, n_head);
    let qkv = conform(dev, qkv, dt)?;
    let y = conform(dev, y, dt)?;
    let dy = conform(dev, dy, dt)?;
    let mut dqkv = DevBuf::alloc(dev, dt, 3 * s.b * s.t * s.nh * s.hs)?;
    with_type!(dt, T => dev
        .flash_attention_backward(
            T::pick(qkv.get())?,
            T::pick(y.get())?,
            f32::pick(lse)?,
            T::pick(dy.get())?,
            T::pick_mut(&mut dqkv)?,
            &s,
            scale,
        )
        .map_err(dev_err("flash_attention"))?);
    Ok(dqkv)
}

fn split_heads(
    dev: &Device,
    packed: &DevBuf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<[DevBuf; 3]> {
    let dt = packed.dtype();
    let n = b * nh * t * hs;
    let mut h = [
        DevBuf::alloc(dev, dt, n)?,
        DevBuf::alloc(dev, dt, n)?,
        DevBuf::alloc(dev, dt, n)?,
    ];
    let s = Heads {
        b,
        t,
        nh,
        hs,
        parts: 3,
    };
    with_type!(dt, T => {
        let [h0, h1, h2] = &mut h;
        let mut outs = [T::pick_mut(h0)?, T::pick_mut(h1)?, T::pick_mut(h2)?];
        dev.heads_split(&s, T::pick(packed)?, &mut outs)
            .map_err(dev_err("attention"))?;
    });
    Ok(h)
}

fn split_one_head_tensor(
    dev: &Device,
    packed: &DevBuf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<DevBuf> {
    let dt = packed.dtype();
    let mut h = DevBuf::alloc(dev, dt, b * nh * t * hs)?;
    let s = Heads {
        b,
        t,
        nh,
        hs,
        parts: 1,
    };
    with_type!(dt, T => dev
        .heads_split(&s, T::pick(packed)?, &mut [T::pick_mut(&mut h)?])
        .map_err(dev_err("attention"))?);
    Ok(h)
}

#[allow(clippy::too_many_arguments)]
fn merge_heads(
    dev: &Device,
    parts: &[&DevBuf],
    packed: &mut DevBuf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    let s = Heads {
        b,
        t,
        nh,
        hs,
        parts: parts.len(),
    };
    with_type!(packed.dtype(), T => {
        let src = parts.iter().map(|p| T::pick(p)).collect::<Result<Vec<_>>>()?;
        dev.heads_merge(&s, &src, T::pick_mut(packed)?)
            .map_err(dev_err("attention"))
    })
}

/// Runs the backward of `op` on the device (see the module doc for the contract).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    ctx: &mut DevCtx,
    node: usize,
    op: &Op,
    compute: DType,
    ins: &[DIn],
    outs: &[DIn],
    gouts: &[Option<&DevBuf>],
    want: &[Option<DType>],
) -> Result<Vec<Option<DevBuf>>> {
    let dev = ctx.dev.clone();
    let dev = &dev;
    let name = op.name();
    let e = || dev_err(name);
    let g0 = || gouts[0].ok_or_else(|| Error::Backward(format!("{name}: missing output gradient")));
    let x = |i: usize| ins[i].get(name);
    let mut din: Vec<Option<DevBuf>> = (0..ins.len()).map(|_| None).collect();
    match op {
        Op::Leaf => {}
        Op::Matmul { trans_a, trans_b } => {
            let (ta, tb) = (*trans_a, *trans_b);
            let (d, _) = mm_dims(ins[0].shape, ins[1].shape, ta, tb)?;
            let g = conform(dev, g0()?, compute)?;
            let g = g.get();
            let (m, k, n, batch) = (d.m, d.k, d.n, d.batch);
            if let Some(dt) = want[0] {
                let b = conform(dev, x(1)?, compute)?;
                let out_dt = if dt == DType::F32 {
                    DType::F32
                } else {
                    compute
                };
                let mut da = DevBuf::alloc(dev, out_dt, batch * m * k)?;
                let sb = if d.b_batched { k * n } else { 0 };
                if !d.b_batched && !ta {
                    // dA (batch m, k) = dC (batch m, n) op(B)^T
                    let gm = Gemm::new(batch * m, k, n).with_ops(GOp::N, gop(!tb));
                    gemm(dev, &Batched::single(gm), g, b.get(), None, &mut da)?;
                } else if ta {
                    // A stored (k, m) = op(B) (k, n) dC^T (n, m)
                    let gm = Gemm::new(k, m, n).with_ops(gop(tb), GOp::T);
                    let bg = batched(gm, batch, sb, m * n, m * k);
                    gemm(dev, &bg, b.get(), g, None, &mut da)?;
                } else {
                    // dA (m, k) = dC (m, n) op(B)^T
                    let gm = Gemm::new(m, k, n).with_ops(GOp::N, gop(!tb));
                    let bg = batched(gm, batch, m * n, sb, m * k);
                    gemm(dev, &bg, g, b.get(), None, &mut da)?;
                }
                din[0] = Some(da);
            }
            return finish_matmul_b(dev, &d, ta, tb, compute, ins, g, want, din);
        }
        Op::Linear => {
            let (xs, ws) = (ins[0].shape, ins[1].shape);
            let (inp, outp) = (ws[0], ws[1]);
            let rows = numel(xs) / inp;
            let g = conform(dev, g0()?, compute)?;
            let g = g.get();
            if let Some(dt) = want[0] {
                let w = conform(dev, x(1)?, compute)?;
                let out_dt = if dt == DType::F32 {
                    DType::F32
                } else {
                    compute
                };
                let mut dx = DevBuf::alloc(dev, out_dt, rows * inp)?;
                let gm = Gemm::new(rows, inp, outp).with_ops(GOp::N, GOp::T);
                gemm(dev, &Batched::single(gm), g, w.get(), None, &mut dx)?;
                din[0] = Some(dx);
            }
            if want[1].is_some() {
                let a = conform(dev, x(0)?, compute)?;
                let out_dt = if compute == DType::F32 {
                    DType::F32
                } else {
                    want[1].unwrap_or(compute)
                };
                let mut dw = DevBuf::alloc(dev, out_dt, inp * outp)?;
                let gm = Gemm::new(inp, outp, rows).with_ops(GOp::T, GOp::N);
                gemm(dev, &Batched::single(gm), a.get(), g, None, &mut dw)?;
                din[1] = Some(dw);
            }
            if ins.len() > 2 && want[2].is_some() {
                din[2] = Some(bias_grad(dev, g, rows, outp)?);
            }
        }
        Op::Add => {
            let g = g0()?;
            for (i, w) in want.iter().enumerate() {
                if let Some(dt) = w {
                    din[i] = Some(g.to_dtype(dev, *dt)?);
                }
            }
        }
        Op::Mul => {
            let g = g0()?;
            for i in 0..2 {
                if want[i].is_some() {
                    let other = conform(dev, x(1 - i)?, g.dtype())?;
                    let mut d = DevBuf::alloc(dev, g.dtype(), g.len())?;
                    with_type!(g.dtype(), T => dev
                        .mul(T::pick(g)?, T::pick(other.get())?, T::pick_mut(&mut d)?)
                        .map_err(e())?);
                    din[i] = Some(d);
                }
            }
        }
        Op::Scale(s) => {
            if want[0].is_some() {
                let g = g0()?;
                let mut d = DevBuf::alloc(dev, g.dtype(), g.len())?;
                with_type!(g.dtype(), T => dev
                    .scale(T::pick(g)?, T::pick_mut(&mut d)?, *s as f32)
                    .map_err(e())?);
                din[0] = Some(d);
            }
        }
        Op::BiasAdd => {
            let g = g0()?;
            if let Some(dt) = want[0] {
                din[0] = Some(g.to_dtype(dev, dt)?);
            }
            if want[1].is_some() {
                let cols = numel(ins[1].shape);
                let rows = g.len().checked_div(cols).unwrap_or(0);
                din[1] = Some(bias_grad(dev, g, rows, cols)?);
            }
        }
        Op::Gelu => {
            if want[0].is_some() {
                let g = g0()?;
                let a = conform(dev, x(0)?, g.dtype())?;
                let mut d = DevBuf::alloc(dev, g.dtype(), g.len())?;
                with_type!(g.dtype(), T => dev
                    .gelu_backward(T::pick(a.get())?, T::pick(g)?, T::pick_mut(&mut d)?)
                    .map_err(e())?);
                din[0] = Some(d);
            }
        }
        Op::Relu => {
            if want[0].is_some() {
                let g = g0()?;
                let y = conform(dev, outs[0].get(name)?, g.dtype())?;
                let mut d = DevBuf::alloc(dev, g.dtype(), g.len())?;
                with_type!(g.dtype(), T => dev
                    .relu_backward(T::pick(y.get())?, T::pick(g)?, T::pick_mut(&mut d)?)
                    .map_err(e())?);
                din[0] = Some(d);
            }
        }
        Op::LayerNorm { .. } => {
            let g = g0()?;
            let dt = g.dtype();
            let c = *ins[0].shape.last().unwrap_or(&1);
            let a = conform(dev, x(0)?, dt)?;
            let w = conform(dev, x(1)?, dt)?;
            let (mean, rstd) = (outs[1].get(name)?, outs[2].get(name)?);
            let mut dx = DevBuf::alloc(dev, dt, g.len())?;
            let mut dw = DevBuf::zeros(dev, DType::F32, c)?;
            let mut db = DevBuf::zeros(dev, DType::F32, c)?;
            with_type!(dt, T => dev
                .layernorm_backward(
                    T::pick(g)?,
                    T::pick(a.get())?,
                    T::pick(w.get())?,
                    f32::pick(mean)?,
                    f32::pick(rstd)?,
                    T::pick_mut(&mut dx)?,
                    f32::pick_mut(&mut dw)?,
                    f32::pick_mut(&mut db)?,
                    c,
                )
                .map_err(e())?);
            if want[0].is_some() {
                din[0] = Some(dx);
            }
            if want[1].is_some() {
                din[1] = Some(dw);
            }
            if want[2].is_some() {
                din[2] = Some(db);
            }
        }
        Op::Softmax => {
            if want[0].is_some() {
                let c = *ins[0].shape.last().unwrap_or(&1);
                let y = conform(dev, outs[0].get(name)?, DType::F32)?;
                let g = conform(dev, g0()?, DType::F32)?;
                let mut d = DevBuf::alloc(dev, DType::F32, g.get().len())?;
                dev.softmax_backward(
                    f32::pick(y.get())?,
                    f32::pick(g.get())?,
                    f32::pick_mut(&mut d)?,
                    c,
                )
                .map_err(e())?;
                din[0] = Some(d);
            }
        }
        Op::Attention { n_head } => {
            if want[0].is_some() {
                din[0] = Some(attention_backward(
                    dev,
                    *n_head,
                    compute,
                    ins[0].shape,
                    x(0)?,
                    outs[1].get(name)?,
                    g0()?,
                )?);
            }
        }
        Op::FlashAttention { n_head, .. } => {
            if want[0].is_some() {
                din[0] = Some(flash_backward(
                    dev,
                    *n_head,
                    compute,
                    ins[0].shape,
                    x(0)?,
                    [outs[0].get(name)?, outs[1].get(name)?],
                    g0()?,
                )?);
            }
        }
        Op::Embedding { ids } => {
            if want[0].is_some() {
                let c = ins[0].shape[1];
                let v = ins[0].shape[0];
                let g = g0()?;
                let ids_dev = ids_on_device(ctx, node, ids)?;
                let mut dt = DevBuf::zeros(dev, DType::F32, v * c)?;
                with_type!(g.dtype(), T => dev
                    .gather_rows_backward(ids_dev, T::pick(g)?, f32::pick_mut(&mut dt)?, c)
                    .map_err(e())?);
                din[0] = Some(dt);
            }
        }
        Op::CrossEntropy {
            targets,
            vocab,
            ignore_index,
        } => {
            if want[0].is_some() {
                let vp = *ins[0].shape.last().unwrap_or(&1);
                let n = targets.iter().filter(|&&t| t != *ignore_index).count();
                let factor = if n == 0 { 0.0 } else { (1.0 / n as f64) as f32 };
                let g = conform(dev, g0()?, DType::F32)?;
                let t_dev = ids_on_device(ctx, node, targets)?;
                let logits = x(0)?;
                let lse = outs[1].get(name)?;
                let mut d = DevBuf::alloc(dev, logits.dtype(), logits.len())?;
                with_type!(logits.dtype(), T => dev
                    .xent_backward(
                        T::pick(logits)?,
                        f32::pick(lse)?,
                        t_dev,
                        f32::pick(g.get())?,
                        factor,
                        T::pick_mut(&mut d)?,
                        vp,
                        *vocab,
                        *ignore_index,
                    )
                    .map_err(e())?);
                din[0] = Some(d);
            }
        }
        Op::Reshape => {
            if let Some(dt) = want[0] {
                din[0] = Some(g0()?.to_dtype(dev, dt)?);
            }
        }
        Op::Transpose { d0, d1 } => {
            if want[0].is_some() {
                let g = g0()?;
                let mut d = DevBuf::alloc(dev, g.dtype(), g.len())?;
                swap(dev, g, &mut d, outs[0].shape, *d0, *d1)?;
                din[0] = Some(d);
            }
        }
        Op::Split { dim, sizes } => {
            if want[0].is_some() {
                let dt = gouts.iter().flatten().map(|g| g.dtype()).next();
                let dt = dt.unwrap_or(compute);
                let (outer, d, inner) = split3(ins[0].shape, *dim);
                let mut dx = DevBuf::zeros(dev, dt, numel(ins[0].shape))?;
                let mut start = 0;
                for (k, &sz) in sizes.iter().enumerate() {
                    if let Some(g) = gouts[k] {
                        let g = conform(dev, g, dt)?;
                        copy_2d(
                            dev,
                            g.get(),
                            0,
                            sz * inner,
                            &mut dx,
                            start * inner,
                            d * inner,
                            outer,
                            sz * inner,
                        )?;
                    }
                    start += sz;
                }
                din[0] = Some(dx);
            }
        }
        Op::Concat { dim } => {
            let g = g0()?;
            let (outer, d, inner) = split3(outs[0].shape, *dim);
            let mut start = 0;
            for (k, i) in ins.iter().enumerate() {
                let sz = i.shape[*dim];
                if want[k].is_some() {
                    let mut dx = DevBuf::alloc(dev, g.dtype(), numel(i.shape))?;
                    copy_2d(
                        dev,
                        g,
                        start * inner,
                        d * inner,
                        &mut dx,
                        0,
                        sz * inner,
                        outer,
                        sz * inner,
                    )?;
                    din[k] = Some(dx);
                }
                start += sz;
            }
        }
        Op::Sum | Op::Mean => {
            if let Some(dt) = want[0] {
                let n = numel(ins[0].shape);
                let factor = if matches!(op, Op::Mean) && n > 0 {
                    (1.0 / n as f64) as f32
                } else {
                    1.0
                };
                let g = conform(dev, g0()?, DType::F32)?;
                let mut d = DevBuf::alloc(dev, dt, n)?;
                with_type!(dt, T => dev
                    .fill_from_scalar(f32::pick(g.get())?, 0, factor, T::pick_mut(&mut d)?)
                    .map_err(e())?);
                din[0] = Some(d);
            }
        }
    }
    Ok(din)
}

/// The `b` half of the matmul backward (shared `b` folds the batch into one product).
#[allow(clippy::too_many_arguments)]
fn finish_matmul_b(
    dev: &Device,
    d: &crate::ops::matmul::MmDims,
    ta: bool,
    tb: bool,
    compute: DType,
    ins: &[DIn],
    g: &DevBuf,
    want: &[Option<DType>],
    mut din: Vec<Option<DevBuf>>,
) -> Result<Vec<Option<DevBuf>>> {
    let Some(dt) = want[1] else {
        return Ok(din);
    };
    let (m, k, n, batch) = (d.m, d.k, d.n, d.batch);
    let a = conform(dev, ins[0].get("matmul")?, compute)?;
    let out_dt = if dt == DType::F32 {
        DType::F32
    } else {
        compute
    };
    let (rows, cols) = if tb { (n, k) } else { (k, n) };
    if d.b_batched {
        let mut db = DevBuf::alloc(dev, out_dt, batch * k * n)?;
        let bg = if tb {
            // B stored (n, k) = dC^T (n, m) op(A) (m, k)
            let gm = Gemm::new(n, k, m).with_ops(GOp::T, gop(ta));
            batched(gm, batch, m * n, m * k, n * k)
        } else {
            // (k, n) = op(A)^T (k, m) dC (m, n)
            let gm = Gemm::new(k, n, m).with_ops(gop(!ta), GOp::N);
            batched(gm, batch, m * k, m * n, k * n)
        };
        if tb {
            gemm(dev, &bg, g, a.get(), None, &mut db)?;
        } else {
            gemm(dev, &bg, a.get(), g, None, &mut db)?;
        }
        din[1] = Some(db);
    } else if !ta {
        // Shared b: one product over all batch * m rows.
        let mut db = DevBuf::alloc(dev, out_dt, rows * cols)?;
        let r = batch * m;
        if tb {
            let gm = Gemm::new(n, k, r).with_ops(GOp::T, GOp::N);
            gemm(dev, &Batched::single(gm), g, a.get(), None, &mut db)?;
        } else {
            let gm = Gemm::new(k, n, r).with_ops(GOp::T, GOp::N);
            gemm(dev, &Batched::single(gm), a.get(), g, None, &mut db)?;
        }
        din[1] = Some(db);
    } else {
        // Shared b with a transposed a: per-batch products summed in batch order.
        let mut db = DevBuf::zeros(dev, DType::F32, rows * cols)?;
        let mut part = DevBuf::alloc(dev, DType::F32, batch * rows * cols)?;
        let bg = if tb {
            let gm = Gemm::new(n, k, m).with_ops(GOp::T, GOp::T);
            batched(gm, batch, m * n, m * k, n * k)
        } else {
            let gm = Gemm::new(k, n, m).with_ops(GOp::N, GOp::N);
            batched(gm, batch, m * k, m * n, k * n)
        };
        if tb {
            gemm(dev, &bg, g, a.get(), None, &mut part)?;
        } else {
            gemm(dev, &bg, a.get(), g, None, &mut part)?;
        }
        let part = f32::pick(&part)?;
        dev.bias_grad(part, batch, rows * cols, f32::pick_mut(&mut db)?)
            .map_err(dev_err("matmul"))?;
        din[1] = Some(db);
    }
    Ok(din)
}

/// `dbias[c] = sum_r g[r][c]` in f32, deterministic.
fn bias_grad(dev: &Device, g: &DevBuf, rows: usize, cols: usize) -> Result<DevBuf> {
    let mut db = DevBuf::zeros(dev, DType::F32, cols)?;
    with_type!(g.dtype(), T => dev
        .bias_grad(T::pick(g)?, rows, cols, f32::pick_mut(&mut db)?)
        .map_err(dev_err("bias gradient"))?);
    Ok(db)
}

fn attention_backward(
    dev: &Device,
    n_head: usize,
    compute: DType,
    qkv_shape: &[usize],
    qkv: &DevBuf,
    p: &DevBuf,
    dy: &DevBuf,
) -> Result<DevBuf> {
    let dt = compute;
    let (b, t, nh, hs) = attention_dims(qkv_shape, n_head);
    let bh = b * nh;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    let qkv = conform(dev, qkv, dt)?;
    let dy = conform(dev, dy, dt)?;
    let p_op = conform(dev, p, dt)?;
    let [q, k, v] = split_heads(dev, qkv.get(), b, t, nh, hs)?;
    let dyh = split_one_head_tensor(dev, dy.get(), b, t, nh, hs)?;
    // dP = dO V^T (f32), then dS = softmax backward (scale included), in place.
    let mut ds = DevBuf::alloc(dev, DType::F32, bh * t * t)?;
    let g = Gemm::new(t, t, hs).with_ops(GOp::N, GOp::T);
    gemm(
        dev,
        &batched(g, bh, t * hs, t * hs, t * t),
        &dyh,
        &v,
        None,
        &mut ds,
    )?;
    let p32 = conform(dev, p, DType::F32)?;
    dev.attention_softmax_backward_in_place(
        f32::pick(p32.get())?,
        f32::pick_mut(&mut ds)?,
        bh,
        t,
        scale,
    )
    .map_err(dev_err("attention"))?;
    drop(p32);
    let ds = ds.conform(dev, dt)?;
    let n = bh * t * hs;
    // dQ = dS K, dK = dS^T Q, dV = P^T dO.
    let mut dq = DevBuf::alloc(dev, dt, n)?;
    let mut dk = DevBuf::alloc(dev, dt, n)?;
    let mut dv = DevBuf::alloc(dev, dt, n)?;
    let nn = Gemm::new(t, hs, t);
    let tn = Gemm::new(t, hs, t).with_ops(GOp::T, GOp::N);
    let strides = (t * t, t * hs, t * hs);
    let bgn = batched(nn, bh, strides.0, strides.1, strides.2);
    let bgt = batched(tn, bh, strides.0, strides.1, strides.2);
    gemm(dev, &bgn, &ds, &k, None, &mut dq)?;
    gemm(dev, &bgt, &ds, &q, None, &mut dk)?;
    gemm(dev, &bgt, p_op.get(), &dyh, None, &mut dv)?;
    let mut dqkv = DevBuf::alloc(dev, dt, b * t * 3 * nh * hs)?;
    merge_heads(dev, &[&dq, &dk, &dv], &mut dqkv, b, t, nh, hs)?;
    Ok(dqkv)
}
