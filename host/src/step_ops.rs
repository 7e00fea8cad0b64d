//! Typed launches of the kernels the device training step adds around the tensor-core GEMM:
//!
//! - [`Device::gemm_f32`]: the SIMT f32-FMA GEMM ([`lathe_kernels::simt_gemm`]) for
//!   `--precision fp32` linear layers (128 x 128 tiles when they fill the GPU, else 64 x 64);
//! - [`Device::gemm_batched`]: strided-batched products (one launch for every
//!   `(batch, head)` of attention) — bf16 / f16 operands on the tensor-core kernel
//!   ([`lathe_kernels::gemm::batched`]), f32 operands on the SIMT kernel; f32 accumulation.
//!   [`Device::gemm_batched_simt`] runs 16-bit operands on the SIMT kernel instead;
//! - [`Device::bias_grad`]: `dbias[c] += sum_r dy[r][c]` from f32 / bf16 / f16 gradients,
//!   deterministic (fixed summation order);
//! - [`Device::heads_split`], [`Device::heads_merge`]: the attention head permutes
//!   `(B, T, P, nh, hs) <-> P x (B, nh, T, hs)` and their backward (the same permutes reversed).
//!
//! Every wrapper checks shapes and buffer lengths before anything reaches the driver and
//! launches on the compute stream.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use lathe_kernels::gemm;
use lathe_kernels::nn::{colsum, heads};
use lathe_kernels::simt_gemm;
use lathe_kernels::{Elem, KernelDesc, Problem};

pub use lathe_kernels::nn::heads::Heads;
pub use lathe_kernels::simt_gemm::{Batched, SimtTile};

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v} does not fit the kernel's u32")))
}

fn null<T: DeviceElem>(writable: bool) -> KernelArg {
    KernelArg::Ptr {
        addr: 0,
        elem: T::ELEM,
        len: 0,
        writable,
    }
}

impl Device {
    /// `C = act(alpha op(A) op(B) + beta C + bias)` in full f32 (FMA, not TF32): the product
    /// of `--precision fp32` training. Same [`lathe_kernels::gemm::Gemm`] semantics as
    /// [`Device::gemm`].
    pub fn gemm_f32(
        &self,
        g: &lathe_kernels::gemm::Gemm,
        a: &DeviceBuffer<f32>,
        b: &DeviceBuffer<f32>,
        bias: Option<&DeviceBuffer<f32>>,
        c: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.gemm_batched(&Batched::single(*g), a, b, bias, c)
    }

    /// A strided batch of GEMMs in one launch: for `z < batch`,
    /// `C[z] = act(alpha op(A[z]) op(B[z]) + beta C[z] + bias)`, `X[z]` starting
    /// `z * stride_x` elements into its buffer. `I` is f32 (then `O` is f32; SIMT kernel, f32
    /// FMA) or bf16 / f16 (`O` the same type or f32; tensor cores). The bias (length `n`,
    /// type `I`) is shared by every batch.
    pub fn gemm_batched<I: DeviceElem, O: DeviceElem>(
        &self,
        bg: &Batched,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        let g = &bg.gemm;
        let k = match I::ELEM {
            Elem::F32 => {
                let tile = simt_gemm::pick_tile(&bg.problem(), self.sm_count());
                simt_gemm::kernel_for_tile(tile, g.op_a, g.op_b, I::ELEM, O::ELEM)
            }
            _ => gemm::batched::kernel_for(g.op_a, g.op_b, I::ELEM, O::ELEM),
        };
        self.gemm_batched_on(k, bg, a, b, bias, c)
    }

    /// [`Device::gemm_batched`] on the SIMT kernel of an explicit tile
    /// ([`simt_gemm::LARGE`] has f32 operands and output only).
    pub fn gemm_batched_simt_tile<I: DeviceElem, O: DeviceElem>(
        &self,
        tile: SimtTile,
        bg: &Batched,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        let g = &bg.gemm;
        let k = simt_gemm::kernel_for_tile(tile, g.op_a, g.op_b, I::ELEM, O::ELEM);
        self.gemm_batched_on(k, bg, a, b, bias, c)
    }

    /// [`Device::gemm_batched`] on the SIMT kernel for every operand type (f32 FMA on the
    /// widened 16-bit values).
    pub fn gemm_batched_simt<I: DeviceElem, O: DeviceElem>(
        &self,
        bg: &Batched,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        let g = &bg.gemm;
        let k = simt_gemm::kernel_for(g.op_a, g.op_b, I::ELEM, O::ELEM);
        self.gemm_batched_on(k, bg, a, b, bias, c)
    }

    fn gemm_batched_on<I: DeviceElem, O: DeviceElem>(
        &self,
        k: Option<&'static KernelDesc>,
        bg: &Batched,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        bg.validate().map_err(|e| invalid(e.to_string()))?;
        let g = &bg.gemm;
        let k = k.ok_or_else(|| {
            invalid(format!(
                "batched gemm has no kernel for {} operands with {} output (f32 -> f32; bf16 or \
                 f16 -> the same type or f32)",
                I::ELEM.name(),
                O::ELEM.name()
            ))
        })?;
        for (what, len, need) in [
            ("A", a.len(), bg.a_len()),
            ("B", b.len(), bg.b_len()),
            ("C", c.len(), bg.c_len()),
        ] {
            if len < need {
                return Err(invalid(format!(
                    "batched gemm: {what} holds {len} elements; {} batches of {}x{}x{} (strides \
                     {}, {}, {}) need {need}",
                    bg.batch, g.m, g.n, g.k, bg.stride_a, bg.stride_b, bg.stride_c
                )));
            }
        }
        if let Some(bias) = bias
            && bias.len() < g.n
        {
            return Err(invalid(format!(
                "batched gemm: bias holds {} elements; n = {}",
                bias.len(),
                g.n
            )));
        }
        if g.m == 0 || g.n == 0 || bg.batch == 0 {
            return Ok(());
        }
        let grid = (k.geometry)(&bg.problem()).grid;
        if grid.0 >= i32::MAX as u32 {
            return Err(invalid(format!(
                "batched gemm: {} x {} needs more tiles than one launch allows",
                g.m, g.n
            )));
        }
        // validate() bounded every dimension by MAX_DIM (< 2^31).
        let mut args = crate::gemm_ops::gemm_args(g, a, b, bias, c);
        args.extend([bg.stride_a, bg.stride_b, bg.stride_c].map(|s| KernelArg::U64(s as u64)));
        self.launch(k, &bg.problem(), &args, self.compute_stream())
    }

    /// Bias gradient of a linear layer: `dbias[c] += sum_{r < rows} dy[r][c]` with `dy`
    /// `(rows, c)` row-major in f32, bf16 or f16 and `dbias` f32 (length `c`), in a fixed
    /// order (the same bits every run; no atomics).
    pub fn bias_grad<T: DeviceElem>(
        &self,
        dy: &DeviceBuffer<T>,
        rows: usize,
        c: usize,
        dbias: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let k = colsum::colsum_for(T::ELEM).ok_or_else(|| {
            invalid(format!(
                "bias gradient has no kernel for {} gradients",
                T::ELEM.name()
            ))
        })?;
        if dbias.len() != c {
            return Err(Error::Length {
                what: "bias gradient",
                expected: c,
                got: dbias.len(),
            });
        }
        if dy.len() < rows * c {
            return Err(invalid(format!(
                "bias gradient: dy holds {} elements; ({rows}, {c}) needs {}",
                dy.len(),
                rows * c
            )));
        }
        if c == 0 {
            return Ok(());
        }
        let g = colsum::bias_grad_interleave(rows, c);
        if g == 1 {
            return self.colsum_launch(k, dy, 0, rows, c, c, dbias);
        }
        // Narrow layer: interleave the rows g ways first (see bias_grad_interleave).
        let mut part = self.alloc::<f32>(g * c)?;
        self.fill(&mut part, 0.0)?;
        let body = rows / g;
        self.colsum_launch(k, dy, 0, body, g * c, g * c, &mut part)?;
        if !rows.is_multiple_of(g) {
            // The last rows % g rows into part[0 .. c].
            self.colsum_launch(k, dy, body * g * c, rows % g, c, c, &mut part)?;
        }
        self.colsum_launch(&colsum::COLSUM_ACC_F32, &part, 0, g, c, c, dbias)
    }

    /// One column-sum launch: `out[j] += sum_{i < groups} src[first + i stride + j]`, `j < width`.
    #[allow(clippy::too_many_arguments)]
    fn colsum_launch<T: DeviceElem>(
        &self,
        k: &'static KernelDesc,
        src: &DeviceBuffer<T>,
        first: usize,
        groups: usize,
        width: usize,
        stride: usize,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let args = [
            KernelArg::Ptr {
                addr: src.addr() + (first * size_of::<T>()) as u64,
                elem: T::ELEM,
                len: src.len() - first,
                writable: false,
            },
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
        self.launch(k, &p, &args, self.compute_stream())
    }

    fn heads_check(s: &Heads, packed: usize, parts: &[usize]) -> Result<bool> {
        if s.parts == 0 || s.parts > heads::MAX_PARTS || parts.len() != s.parts {
            return Err(invalid(format!(
                "heads permute: {} head tensors for parts = {} (1..={})",
                parts.len(),
                s.parts,
                heads::MAX_PARTS
            )));
        }
        if s.packed_len() >= i32::MAX as usize {
            return Err(invalid(format!(
                "heads permute: {} elements exceed the kernel's 32-bit indexing",
                s.packed_len()
            )));
        }
        if packed != s.packed_len() {
            return Err(Error::Length {
                what: "packed (B, T, P, nh, hs)",
                expected: s.packed_len(),
                got: packed,
            });
        }
        for &len in parts {
            if len != s.head_len() {
                return Err(Error::Length {
                    what: "head tensor (B, nh, T, hs)",
                    expected: s.head_len(),
                    got: len,
                });
            }
        }
        Ok(s.head_len() > 0)
    }

    fn heads_args(s: &Heads) -> [KernelArg; 5] {
        // heads_check bounded every product by 2^31.
        let u = |x: usize| KernelArg::U32(x as u32);
        [u(s.b), u(s.t), u(s.nh), u(s.hs), u(s.parts)]
    }

    /// `out[p] (B, nh, T, hs) = packed (B, T, P, nh, hs)[:, :, p]` for `p < s.parts`
    /// (`out.len() == s.parts`). qkv -> q, k, v with `parts = 3`; the backward of
    /// [`Device::heads_merge`] with `parts = 1`.
    pub fn heads_split<T: DeviceElem>(
        &self,
        s: &Heads,
        packed: &DeviceBuffer<T>,
        out: &mut [&mut DeviceBuffer<T>],
    ) -> Result<()> {
        let lens: Vec<usize> = out.iter().map(|b| b.len()).collect();
        if !Self::heads_check(s, packed.len(), &lens)? {
            return Ok(());
        }
        let k = heads::split_for(T::ELEM)
            .ok_or_else(|| invalid(format!("heads split has no kernel for {}", T::ELEM.name())))?;
        let mut ptrs = [null::<T>(true), null::<T>(true), null::<T>(true)];
        for (p, b) in out.iter_mut().enumerate() {
            ptrs[p] = b.arg_mut();
        }
        let [h0, h1, h2] = ptrs;
        let [b, t, nh, hs, parts] = Self::heads_args(s);
        let args = [packed.arg(), h0, h1, h2, b, t, nh, hs, parts];
        self.launch(k, &s.problem(), &args, self.compute_stream())
    }

    /// `packed (B, T, P, nh, hs)[:, :, p] = src[p] (B, nh, T, hs)` for `p < s.parts`: the
    /// attention output merge with `parts = 1` (packed is then `(B, T, nh hs)`); the backward
    /// of [`Device::heads_split`] (dq, dk, dv -> dqkv) with `parts = 3`.
    pub fn heads_merge<T: DeviceElem>(
        &self,
        s: &Heads,
        src: &[&DeviceBuffer<T>],
        packed: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let lens: Vec<usize> = src.iter().map(|b| b.len()).collect();
        if !Self::heads_check(s, packed.len(), &lens)? {
            return Ok(());
        }
        let k = heads::merge_for(T::ELEM)
            .ok_or_else(|| invalid(format!("heads merge has no kernel for {}", T::ELEM.name())))?;
        let mut ptrs = [null::<T>(false), null::<T>(false), null::<T>(false)];
        for (p, b) in src.iter().enumerate() {
            ptrs[p] = b.arg();
        }
        let [h0, h1, h2] = ptrs;
        let [b, t, nh, hs, parts] = Self::heads_args(s);
        let args = [h0, h1, h2, packed.arg_mut(), b, t, nh, hs, parts];
        self.launch(k, &s.problem(), &args, self.compute_stream())
    }
}
