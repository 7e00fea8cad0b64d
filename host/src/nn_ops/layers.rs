//! Typed launches of the fused classifier, the embeddings and the causal attention softmax.

use super::{invalid, kernel_for, len_eq, rows_of, to_u32};
use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::Result;
use crate::module::KernelArg;
use lathe_kernels::Problem;
use lathe_kernels::nn::amp::STATE_WORDS;
use lathe_kernels::nn::{attention, classifier, embedding, flash};

/// Shape of one fused-classifier launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassifierShape {
    /// Row length of the logits (the padded vocabulary, `Vp`).
    pub vp: usize,
    /// Real vocabulary `V <= Vp`: columns `>= V` get zero gradient and take no part in the
    /// softmax.
    pub v: usize,
    /// Targets equal to this are ignored (loss 0, zero gradient).
    pub ignore_index: i32,
    /// Gradient factor: `dlogits = (softmax - onehot) * dloss * SCALE`.
    pub dloss: f32,
}

impl Device {
    #[allow(clippy::too_many_arguments)]
    fn classifier_launch<T: DeviceElem>(
        &self,
        logits: KernelArg,
        dlogits: KernelArg,
        len: usize,
        losses: &mut DeviceBuffer<f32>,
        targets: &DeviceBuffer<i32>,
        state: &DeviceBuffer<u32>,
        s: &ClassifierShape,
    ) -> Result<()> {
        let k = kernel_for("fused classifier", T::ELEM, classifier::kernel_for(T::ELEM))?;
        if s.v == 0 || s.v > s.vp {
            return Err(invalid(format!(
                "fused classifier: V = {} must be in 1..=Vp = {}",
                s.v, s.vp
            )));
        }
        let rows = rows_of("fused classifier logits", len, s.vp)?;
        len_eq("fused classifier targets", rows, targets.len())?;
        len_eq("fused classifier losses", rows, losses.len())?;
        len_eq("step state", STATE_WORDS, state.len())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            logits,
            dlogits,
            losses.arg_mut(),
            targets.arg(),
            state.arg(),
            KernelArg::U32(to_u32("rows", rows)?),
            KernelArg::U32(to_u32("Vp", s.vp)?),
            KernelArg::U32(to_u32("V", s.v)?),
            KernelArg::U32(s.ignore_index as u32),
            KernelArg::F32(s.dloss),
        ];
        let p = Problem {
            batch: rows as u64,
            n: s.vp as u64,
            k: s.v as u64,
            m: 1,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// Fused softmax cross-entropy: `losses (rows)` f32 and `dlogits (rows, Vp)` from
    /// `logits (rows, Vp)` and `targets (rows)` i32; the loss scale is read from `state`.
    /// A target outside `[0, V)` that is not `ignore_index` gives NaN loss and gradients.
    pub fn fused_classifier<T: DeviceElem>(
        &self,
        logits: &DeviceBuffer<T>,
        dlogits: &mut DeviceBuffer<T>,
        losses: &mut DeviceBuffer<f32>,
        targets: &DeviceBuffer<i32>,
        state: &DeviceBuffer<u32>,
        shape: &ClassifierShape,
    ) -> Result<()> {
        len_eq("fused classifier dlogits", logits.len(), dlogits.len())?;
        let len = logits.len();
        self.classifier_launch::<T>(
            logits.arg(),
            dlogits.arg_mut(),
            len,
            losses,
            targets,
            state,
            shape,
        )
    }

    /// [`Device::fused_classifier`] writing the gradient over the logits (llm.c's layout).
    pub fn fused_classifier_in_place<T: DeviceElem>(
        &self,
        logits: &mut DeviceBuffer<T>,
        losses: &mut DeviceBuffer<f32>,
        targets: &DeviceBuffer<i32>,
        state: &DeviceBuffer<u32>,
        shape: &ClassifierShape,
    ) -> Result<()> {
        let len = logits.len();
        self.classifier_launch::<T>(
            logits.arg(),
            logits.arg_mut(),
            len,
            losses,
            targets,
            state,
            shape,
        )
    }

    /// `out[n] = wte[tokens[n]] + wpe[n % t]`: `tokens (B*T)` i32, `wte (V, c)`,
    /// `wpe (>= t, c)`, `out (B*T, c)`. A token outside `[0, V)` gives a NaN row.
    pub fn embedding_forward<T: DeviceElem>(
        &self,
        tokens: &DeviceBuffer<i32>,
        wte: &DeviceBuffer<T>,
        wpe: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for("embedding", T::ELEM, embedding::forward_for(T::ELEM))?;
        let v = rows_of("embedding wte", wte.len(), c)?;
        let max_t = rows_of("embedding wpe", wpe.len(), c)?;
        let n = tokens.len();
        if t == 0 || t > max_t || !n.is_multiple_of(t) {
            return Err(invalid(format!(
                "embedding: {n} tokens are not sequences of T = {t} (wpe holds {max_t})"
            )));
        }
        len_eq("embedding out", n * c, out.len())?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            tokens.arg(),
            wte.arg(),
            wpe.arg(),
            out.arg_mut(),
            KernelArg::U32(to_u32("tokens", n)?),
            KernelArg::U32(to_u32("T", t)?),
            KernelArg::U32(to_u32("C", c)?),
            KernelArg::U32(to_u32("V", v)?),
        ];
        let p = Problem {
            batch: n as u64,
            n: c as u64,
            m: t as u64,
            k: v as u64,
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// Embedding backward: `dwte (V, c)` and `dwpe (>= t, c)` f32 accumulated (`+=`) from
    /// `dout (B*T, c)`, deterministically (fixed summation orders, no atomics). Tokens outside
    /// `[0, V)` contribute nothing.
    pub fn embedding_backward<T: DeviceElem>(
        &self,
        tokens: &DeviceBuffer<i32>,
        dout: &DeviceBuffer<T>,
        dwte: &mut DeviceBuffer<f32>,
        dwpe: &mut DeviceBuffer<f32>,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let kp = kernel_for(
            "embedding backward",
            T::ELEM,
            embedding::backward_pos_for(T::ELEM),
        )?;
        let kt = kernel_for(
            "embedding backward",
            T::ELEM,
            embedding::backward_tok_for(T::ELEM),
        )?;
        let v = rows_of("embedding backward dwte", dwte.len(), c)?;
        let max_t = rows_of("embedding backward dwpe", dwpe.len(), c)?;
        let n = tokens.len();
        if t == 0 || t > max_t || !n.is_multiple_of(t) {
            return Err(invalid(format!(
                "embedding backward: {n} tokens are not sequences of T = {t} (dwpe holds {max_t})"
            )));
        }
        len_eq("embedding backward dout", n * c, dout.len())?;
        if n == 0 {
            return Ok(());
        }
        to_u32("T * C", t * c)?;
        let s = self.compute_stream();
        let b = n / t;
        let args = [
            dout.arg(),
            dwpe.arg_mut(),
            KernelArg::U32(to_u32("B", b)?),
            KernelArg::U32(t as u32),
            KernelArg::U32(to_u32("C", c)?),
        ];
        let p = Problem {
            batch: b as u64,
            m: t as u64,
            n: c as u64,
            k: 0,
        };
        self.launch(kp, &p, &args, s)?;
        let args = [
            tokens.arg(),
            dout.arg(),
            dwte.arg_mut(),
            KernelArg::U32(to_u32("tokens", n)?),
            KernelArg::U32(c as u32),
            KernelArg::U32(to_u32("V", v)?),
        ];
        let p = Problem {
            batch: n as u64,
            n: c as u64,
            m: t as u64,
            k: v as u64,
        };
        self.launch(kt, &p, &args, s)
    }

    fn attention_dims(what: &str, len: usize, bh: usize, t: usize) -> Result<()> {
        if t == 0 || bh.checked_mul(t).and_then(|r| r.checked_mul(t)) != Some(len) {
            return Err(invalid(format!(
                "{what}: {len} elements are not {bh} x {t} x {t}"
            )));
        }
        to_u32("B*H*T rows", bh * t)?;
        Ok(())
    }

    fn attention_launch(
        &self,
        k: &'static lathe_kernels::KernelDesc,
        mut args: Vec<KernelArg>,
        bh: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        if bh == 0 {
            return Ok(());
        }
        args.extend([
            KernelArg::U32(bh as u32),
            KernelArg::U32(t as u32),
            KernelArg::F32(scale),
        ]);
        let p = lathe_kernels::Problem {
            batch: bh as u64,
            n: t as u64,
            ..Default::default()
        };
        self.launch(k, &p, &args, self.compute_stream())
    }

    /// Causal softmax forward: `probs (bh, t, t) = softmax_causal(scale * scores)`, zeros
    /// above the diagonal.
    pub fn attention_softmax_forward<T: DeviceElem>(
        &self,
        scores: &DeviceBuffer<T>,
        probs: &mut DeviceBuffer<T>,
        bh: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for(
            "attention softmax",
            T::ELEM,
            attention::forward_for(T::ELEM),
        )?;
        Self::attention_dims("attention softmax scores", scores.len(), bh, t)?;
        len_eq("attention softmax probs", scores.len(), probs.len())?;
        self.attention_launch(k, vec![scores.arg(), probs.arg_mut()], bh, t, scale)
    }

    /// [`Device::attention_softmax_forward`] with the probabilities written over the scores.
    pub fn attention_softmax_forward_in_place<T: DeviceElem>(
        &self,
        scores: &mut DeviceBuffer<T>,
        bh: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for(
            "attention softmax",
            T::ELEM,
            attention::forward_for(T::ELEM),
        )?;
        Self::attention_dims("attention softmax scores", scores.len(), bh, t)?;
        self.attention_launch(k, vec![scores.arg(), scores.arg_mut()], bh, t, scale)
    }

    /// Causal softmax backward: `dscores = scale * P * (dP - rowsum(P * dP))` below and on the
    /// diagonal, 0 above.
    pub fn attention_softmax_backward<T: DeviceElem>(
        &self,
        probs: &DeviceBuffer<T>,
        dprobs: &DeviceBuffer<T>,
        dscores: &mut DeviceBuffer<T>,
        bh: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for(
            "attention softmax backward",
            T::ELEM,
            attention::backward_for(T::ELEM),
        )?;
        Self::attention_dims("attention softmax probs", probs.len(), bh, t)?;
        len_eq("attention softmax dprobs", probs.len(), dprobs.len())?;
        len_eq("attention softmax dscores", probs.len(), dscores.len())?;
        let args = vec![probs.arg(), dprobs.arg(), dscores.arg_mut()];
        self.attention_launch(k, args, bh, t, scale)
    }

    /// [`Device::attention_softmax_backward`] with `dscores` written over `dprobs`.
    pub fn attention_softmax_backward_in_place<T: DeviceElem>(
        &self,
        probs: &DeviceBuffer<T>,
        grad: &mut DeviceBuffer<T>,
        bh: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for(
            "attention softmax backward",
            T::ELEM,
            attention::backward_for(T::ELEM),
        )?;
        Self::attention_dims("attention softmax probs", probs.len(), bh, t)?;
        len_eq("attention softmax gradient", probs.len(), grad.len())?;
        let args = vec![probs.arg(), grad.arg(), grad.arg_mut()];
        self.attention_launch(k, args, bh, t, scale)
    }
}

/// Shape of one fused causal attention call: `qkv (B, T, 3C)`, `y (B, T, C)`, `C = nh hs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashShape {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
}

impl FlashShape {
    fn c(&self) -> usize {
        self.nh * self.hs
    }
    /// Elements of `lse` and of the backward's row dots: `B nh T`.
    pub fn stats_len(&self) -> usize {
        self.b * self.nh * self.t
    }
    fn dims(&self) -> Result<[KernelArg; 3]> {
        Ok([
            KernelArg::U32(to_u32("T", self.t)?),
            KernelArg::U32(to_u32("n_head", self.nh)?),
            KernelArg::U32(to_u32("head size", self.hs)?),
        ])
    }
    fn problem(&self) -> Problem {
        flash::problem(self.b, self.t, self.nh, self.hs)
    }
}

impl Device {
    /// Whether the fused attention kernels take inputs of type `T` with head size `hs`; the
    /// reason when they do not.
    pub fn flash_attention_unsupported<T: DeviceElem>(hs: usize) -> Option<String> {
        flash::unsupported(T::ELEM, hs)
    }

    fn flash_kernels<T: DeviceElem>(&self, s: &FlashShape) -> Result<flash::Kernels> {
        if let Some(why) = flash::unsupported(T::ELEM, s.hs) {
            return Err(invalid(format!("fused attention: {why}")));
        }
        flash::pick(T::ELEM, s.hs)
            .ok_or_else(|| invalid(format!("fused attention: head size {}", s.hs)))
    }

    /// Fused causal attention forward: `y (B, T, C)` and `lse (B, nh, T)` (natural log-sum-exp
    /// of each scaled, masked score row) from `qkv (B, T, 3C)`.
    pub fn flash_attention_forward<T: DeviceElem>(
        &self,
        qkv: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        lse: &mut DeviceBuffer<f32>,
        s: &FlashShape,
        scale: f32,
    ) -> Result<()> {
        let k = self.flash_kernels::<T>(s)?;
        let n = s.b * s.t * s.c();
        len_eq("fused attention qkv", 3 * n, qkv.len())?;
        len_eq("fused attention y", n, y.len())?;
        len_eq("fused attention lse", s.stats_len(), lse.len())?;
        if n == 0 {
            return Ok(());
        }
        let mut args = vec![qkv.arg(), y.arg_mut(), lse.arg_mut()];
        args.extend(s.dims()?);
        args.push(KernelArg::F32(scale));
        self.launch(k.forward, &s.problem(), &args, self.compute_stream())
    }

    /// Fused causal attention backward: `dqkv (B, T, 3C)` from `qkv`, the forward's `y` and
    /// `lse`, and `dy`. Every element of `dqkv` is written (no accumulation); the result is the
    /// same bits on every run (no atomics).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward<T: DeviceElem>(
        &self,
        qkv: &DeviceBuffer<T>,
        y: &DeviceBuffer<T>,
        lse: &DeviceBuffer<f32>,
        dy: &DeviceBuffer<T>,
        dqkv: &mut DeviceBuffer<T>,
        s: &FlashShape,
        scale: f32,
    ) -> Result<()> {
        let k = self.flash_kernels::<T>(s)?;
        let n = s.b * s.t * s.c();
        len_eq("fused attention qkv", 3 * n, qkv.len())?;
        len_eq("fused attention y", n, y.len())?;
        len_eq("fused attention dy", n, dy.len())?;
        len_eq("fused attention lse", s.stats_len(), lse.len())?;
        len_eq("fused attention dqkv", 3 * n, dqkv.len())?;
        if n == 0 {
            return Ok(());
        }
        let mut dvec = self.alloc::<f32>(s.stats_len())?;
        let p = s.problem();
        let mut args = vec![
            y.arg(),
            dy.arg(),
            dvec.arg_mut(),
            KernelArg::U32(to_u32("B * n_head * T", s.stats_len())?),
        ];
        args.extend(s.dims()?);
        self.launch(k.row_dot, &p, &args, self.compute_stream())?;
        let mut args = vec![qkv.arg(), dy.arg(), lse.arg(), dvec.arg(), dqkv.arg_mut()];
        args.extend(s.dims()?);
        args.push(KernelArg::F32(scale));
        self.launch(k.dq, &p, &args, self.compute_stream())?;
        self.launch(k.dkdv, &p, &args, self.compute_stream())
    }
}
