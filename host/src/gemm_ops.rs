//! Typed launches of the tensor-core GEMM kernels ([`lathe_kernels::gemm`]).
//!
//! `C = act(alpha * op(A) op(B) + beta * C + bias)`, operands bf16 or f16 (`I`), C in `I` or
//! f32 (`O`), f32 accumulation. Storage is row-major; [`Op`] says how A and B are stored:
//!
//! | | A buffer | B buffer | C buffer |
//! |---|---|---|---|
//! | shape | `(m, k)` for `Op::N`, `(k, m)` for `Op::T` | `(k, n)` / `(n, k)` | `(m, n)` |
//! | leading dimension | `lda` (default: the row length) | `ldb` | `ldc` |
//!
//! For a GPT-2 linear layer (weight stored `(in, out)`) use [`Device::linear_forward`],
//! [`Device::linear_backward_input`] and [`Device::linear_backward_weight`].
//!
//! Every launch checks the problem ([`Gemm::validate`]), the buffer lengths and the element
//! types before anything reaches the driver. Any alignment works; operands whose base is 16-byte
//! aligned with a leading dimension that is a multiple of 8 take the fast copy path
//! ([`lathe_kernels::gemm::fast_path`]) — buffers from Lathe's allocator always are aligned, so
//! only odd leading dimensions leave it.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use crate::stream::Stream;
use lathe_kernels::gemm;

pub use lathe_kernels::gemm::{Gemm, Linear, Op, Version};

/// The parameters of every GEMM kernel, in PTX order: `a, b, c, bias, m, n, k, lda, ldb, ldc,
/// alpha, beta, flags` (the batched kernels append their three strides). Dimensions must have
/// been checked against `MAX_DIM` (< 2^31) first.
pub(crate) fn gemm_args<I: DeviceElem, O: DeviceElem>(
    g: &Gemm,
    a: &DeviceBuffer<I>,
    b: &DeviceBuffer<I>,
    bias: Option<&DeviceBuffer<I>>,
    c: &mut DeviceBuffer<O>,
) -> Vec<KernelArg> {
    let bias_arg = match bias {
        Some(bias) => bias.arg(),
        // Never read: the kernel only touches the bias when FLAG_BIAS is set.
        None => KernelArg::Ptr {
            addr: 0,
            elem: I::ELEM,
            len: 0,
            writable: false,
        },
    };
    let u = |x: usize| KernelArg::U32(x as u32);
    vec![
        a.arg(),
        b.arg(),
        c.arg_mut(),
        bias_arg,
        u(g.m),
        u(g.n),
        u(g.k),
        u(g.lda()),
        u(g.ldb()),
        u(g.ldc()),
        KernelArg::F32(g.alpha),
        KernelArg::F32(g.beta),
        KernelArg::U32(g.flags(bias.is_some())),
    ]
}

fn too_short(what: &str, len: usize, need: usize, shape: String) -> Error {
    Error::Invalid(format!(
        "gemm: {what} holds {len} elements; {shape} needs at least {need}"
    ))
}

/// Grid blocks a launch may have (`cuLaunchKernel` takes up to 2^31 - 1 in x).
const MAX_BLOCKS: u64 = (1 << 31) - 1;

impl Device {
    /// `C = act(alpha * op(A) op(B) + beta * C + bias)` with the shipped kernel version, on the
    /// compute stream. `bias` (length `g.n`, type `I`) is added when given; `g.gelu` applies
    /// GELU (tanh form) last. With `g.beta == 0`, C is written without being read.
    ///
    /// Which kernel: on a device of compute capability 9.0 (an H100/H200, or the simulated
    /// device) a product with at least one full 128 x 256 tile of outputs whose operands TMA
    /// can describe runs on the Hopper wgmma + TMA kernel
    /// ([`Device::hopper_gemm`]; `LATHE_GEMM=mma` turns that off); everything else on the
    /// `mma.sync` kernels of [`Version::SHIPPED`].
    pub fn gemm<I: DeviceElem, O: DeviceElem>(
        &self,
        g: &Gemm,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        if self.gemm_takes_hopper::<I, O>(g, a.addr(), b.addr()) {
            if !check_gemm(g, a, b, bias, c)? {
                return Ok(());
            }
            return self.hopper_gemm(self.compute_stream(), g, a, b, bias, c);
        }
        self.gemm_with(Version::SHIPPED, self.compute_stream(), g, a, b, bias, c)
    }

    /// [`Device::gemm`] with an explicit kernel version and stream.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_with<I: DeviceElem, O: DeviceElem>(
        &self,
        version: Version,
        stream: &Stream,
        g: &Gemm,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        g.validate().map_err(|e| Error::Invalid(e.to_string()))?;
        let k = gemm::kernel_for(version, g.op_a, g.op_b, I::ELEM, O::ELEM).ok_or_else(|| {
            Error::Invalid(format!(
                "gemm has no kernel for {} operands with {} output (operands bf16 or f16; \
                 output the operand type or f32)",
                I::ELEM.name(),
                O::ELEM.name()
            ))
        })?;
        if !check_gemm(g, a, b, bias, c)? {
            return Ok(());
        }
        let t = version.tile();
        let blocks = (g.m as u64).div_ceil(t.bm as u64) * (g.n as u64).div_ceil(t.bn as u64);
        if blocks > MAX_BLOCKS {
            return Err(Error::Invalid(format!(
                "gemm: {} x {} needs {blocks} blocks of {}x{}, more than one launch allows",
                g.m, g.n, t.bm, t.bn
            )));
        }
        let args = gemm_args(g, a, b, bias, c);
        self.launch(k, &g.problem(), &args, stream)
    }
}

/// Validates `g` and the buffer lengths; `Ok(false)` for an empty product (nothing to launch).
fn check_gemm<I: DeviceElem, O: DeviceElem>(
    g: &Gemm,
    a: &DeviceBuffer<I>,
    b: &DeviceBuffer<I>,
    bias: Option<&DeviceBuffer<I>>,
    c: &DeviceBuffer<O>,
) -> Result<bool> {
    {
        g.validate().map_err(|e| Error::Invalid(e.to_string()))?;
        let (ar, ac) = g.a_stored();
        let (br, bc) = g.b_stored();
        if a.len() < g.a_len() {
            let shape = format!("A stored ({ar}, {ac}) with lda {}", g.lda());
            return Err(too_short("A", a.len(), g.a_len(), shape));
        }
        if b.len() < g.b_len() {
            let shape = format!("B stored ({br}, {bc}) with ldb {}", g.ldb());
            return Err(too_short("B", b.len(), g.b_len(), shape));
        }
        if c.len() < g.c_len() {
            let shape = format!("C ({}, {}) with ldc {}", g.m, g.n, g.ldc());
            return Err(too_short("C", c.len(), g.c_len(), shape));
        }
        if let Some(bias) = bias
            && bias.len() < g.n
        {
            return Err(too_short("bias", bias.len(), g.n, format!("n = {}", g.n)));
        }
        Ok(g.m != 0 && g.n != 0)
    }
}

impl Device {
    /// Linear layer forward, GPT-2 Conv1D storage: `y(rows, out) = x(rows, in) w(in, out)
    /// (+ bias(out))`, then GELU if `gelu`. `y` is `I` or f32.
    pub fn linear_forward<I: DeviceElem, O: DeviceElem>(
        &self,
        shape: Linear,
        x: &DeviceBuffer<I>,
        w: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        gelu: bool,
        y: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        self.gemm(&shape.forward().with_gelu(gelu), x, w, bias, y)
    }

    /// Input gradient of [`Device::linear_forward`] (before any GELU):
    /// `dx(rows, in) = dy(rows, out) w^T`, with `w` stored `(in, out)`. Overwrites `dx`.
    pub fn linear_backward_input<I: DeviceElem, O: DeviceElem>(
        &self,
        shape: Linear,
        dy: &DeviceBuffer<I>,
        w: &DeviceBuffer<I>,
        dx: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        self.gemm(&shape.backward_input(), dy, w, None, dx)
    }

    /// Weight gradient of [`Device::linear_forward`]: `dw(in, out) = x^T dy`, reduced over the
    /// rows in f32; with `accumulate` it is added to `dw` (`+=`, gradient accumulation across
    /// micro-batches), else `dw` is overwritten.
    pub fn linear_backward_weight<I: DeviceElem>(
        &self,
        shape: Linear,
        x: &DeviceBuffer<I>,
        dy: &DeviceBuffer<I>,
        accumulate: bool,
        dw: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.gemm(&shape.backward_weight(accumulate), x, dy, None, dw)
    }
}
