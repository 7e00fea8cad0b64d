//! Typed launches of the Hopper GEMM ([`lathe_kernels::hopper`]), with TMA tensor maps built on
//! the host.
//!
//! `C(m, n) = A(m, k) B(n, k)^T`: A and B bf16 row-major with K contiguous, C f32 or bf16
//! row-major `(m, n)`. Runs on compute capability 9.0 only (sm_90a code): an H100/H200 or the
//! simulated device. The two 128-byte tensor maps travel as typed
//! [`KernelArg::TensorMap`](crate::KernelArg) arguments through [`Device::launch_with`], with
//! one block per SM at most (the kernel is persistent).
//!
//! Requirements, checked before anything reaches the device (TMA's rules for a 2-D bf16
//! tensor map): `k` a multiple of 8 (the row stride `2k` bytes must be a multiple of 16),
//! A and B 16-byte aligned, C 16-byte aligned, `1 <= m, n, k < 2^31`.

use crate::buffer::{DeviceBuffer, DeviceElem};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::module::KernelArg;
use crate::stream::Stream;
use crate::tensor_map::{TensorMapSpec, TmaSwizzle};
use half::bf16;
use lathe_kernels::hopper::{self, BK, BM, BN};
use lathe_kernels::{Elem, KernelDesc};

pub use lathe_kernels::hopper::Version;

/// Largest m, n or k a launch takes (TMA coordinates and the kernel's index math are 32-bit).
pub const MAX_DIM: usize = (1 << 31) - 1;

fn invalid(msg: String) -> Error {
    Error::Invalid(format!("hopper gemm: {msg}"))
}

/// Checks a problem shape against what the kernel and TMA accept.
pub fn check_shape(m: usize, n: usize, k: usize) -> Result<()> {
    for (name, v) in [("m", m), ("n", n), ("k", k)] {
        if v == 0 {
            return Err(invalid(format!(
                "{name} = 0: an empty problem (k = 0 would leave C unwritten; fill C instead)"
            )));
        }
        if v > MAX_DIM {
            return Err(invalid(format!("{name} = {v} exceeds {MAX_DIM}")));
        }
    }
    if !k.is_multiple_of(8) {
        return Err(invalid(format!(
            "k = {k}: rows of A and B are {} bytes, TMA needs a multiple of 16 (k a multiple of \
             8); pad K with zeros",
            2 * k
        )));
    }
    Ok(())
}

/// Checks a device address for the 16-byte alignment TMA (and the vector epilogue) need.
pub fn check_aligned(what: &str, addr: u64) -> Result<()> {
    if !addr.is_multiple_of(16) {
        return Err(invalid(format!(
            "{what} at {addr:#x} is not 16-byte aligned (TMA requires it)"
        )));
    }
    Ok(())
}

/// A 2-D tensor map over a row-major bf16 matrix `(rows, k)` (K contiguous) on `dev`, boxes of
/// `box_rows` rows x 64 K elements, 128-byte swizzle, out-of-bounds elements read as zero.
pub fn encode_k_major(
    dev: &Device,
    what: &str,
    addr: u64,
    rows: usize,
    k: usize,
    box_rows: u32,
) -> Result<KernelArg> {
    check_aligned(what, addr)?;
    if rows == 0 || rows > MAX_DIM || k == 0 || k > MAX_DIM || !k.is_multiple_of(8) {
        return Err(invalid(format!(
            "{what}: ({rows}, {k}) cannot be described by a tensor map (need 1 <= rows, k < 2^31 \
             and k a multiple of 8)"
        )));
    }
    dev.tensor_map(&TensorMapSpec {
        elem: Elem::BF16,
        addr,
        dims: vec![k as u64, rows as u64],
        strides: vec![2 * k as u64],
        box_dims: vec![BK, box_rows],
        swizzle: TmaSwizzle::B128,
    })
}

/// One version of the Hopper GEMM on one device.
#[derive(Debug)]
pub struct HopperGemm {
    dev: Device,
    version: Version,
    f32_out: &'static KernelDesc,
    bf16_out: &'static KernelDesc,
}

impl HopperGemm {
    /// Loads `version` on `dev`. Fails with [`Error::UnsupportedTarget`] on a device that is
    /// not compute capability 9.0, and when the device cannot give the ring's shared memory.
    pub fn new(dev: &Device, version: Version) -> Result<HopperGemm> {
        let f32_out = hopper::kernel_for(version, Elem::F32)
            .ok_or_else(|| invalid(format!("no f32 kernel for v{}", version.number())))?;
        let bf16_out = hopper::kernel_for(version, Elem::BF16)
            .ok_or_else(|| invalid(format!("no bf16 kernel for v{}", version.number())))?;
        let cc = dev.compute_capability();
        if !f32_out.module.target.runs_on(cc) {
            return Err(Error::UnsupportedTarget {
                entry: f32_out.entry,
                target: f32_out.module.target.name(),
                device: dev.describe(),
                major: cc.0,
                minor: cc.1,
            });
        }
        let smem = hopper::shared_bytes();
        let optin = dev.max_shared_per_block_optin();
        if smem > optin {
            return Err(invalid(format!(
                "needs {smem} bytes of shared memory per block, {} allows {optin}",
                dev.describe()
            )));
        }
        dev.load_module(f32_out.module)?;
        Ok(HopperGemm {
            dev: dev.clone(),
            version,
            f32_out,
            bf16_out,
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// `C(m, n) = A(m, k) B(n, k)^T` on the compute stream. `a` holds at least `m * k` bf16
    /// (row-major, K contiguous), `b` at least `n * k`, `c` at least `m * n` elements of `O`
    /// (f32 or bf16), row-major. C is written, never read.
    pub fn gemm<O: DeviceElem>(
        &self,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<O>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm_on(self.dev.compute_stream(), a, b, c, m, n, k)
    }

    /// [`HopperGemm::gemm`] on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_on<O: DeviceElem>(
        &self,
        stream: &Stream,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<O>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        check_shape(m, n, k)?;
        let desc = match O::ELEM {
            Elem::F32 => self.f32_out,
            Elem::BF16 => self.bf16_out,
            other => {
                return Err(invalid(format!(
                    "C must be f32 or bf16, got {}",
                    other.name()
                )));
            }
        };
        for (what, len, need) in [
            ("A", a.len(), m * k),
            ("B", b.len(), n * k),
            ("C", c.len(), m * n),
        ] {
            if len < need {
                return Err(invalid(format!(
                    "{what} holds {len} elements, (m, n, k) = ({m}, {n}, {k}) needs {need}"
                )));
            }
        }
        check_aligned("C", c.addr())?;
        let tm_a = encode_k_major(&self.dev, "A", a.addr(), m, k, BM)?;
        let tm_b = encode_k_major(&self.dev, "B", b.addr(), n, k, BN)?;
        let problem = hopper::problem(m, n, k);
        let mut g = (desc.geometry)(&problem);
        // Persistent: at most one block per SM; the kernel walks the remaining tiles.
        g.grid.0 = g.grid.0.min(self.dev.sm_count().max(1));
        let args = [
            tm_a,
            tm_b,
            c.arg_mut(),
            KernelArg::U32(m as u32),
            KernelArg::U32(n as u32),
            KernelArg::U32(k as u32),
        ];
        self.dev.launch_with(desc, &g, &problem, &args, stream)
    }
}

/// Outputs (`m * n`) from which [`Device::gemm`] takes the Hopper kernels on a device that
/// has them: one full 128 x 256 tile. Smaller products stay on the `mma.sync` kernels, whose
/// 128 x 128 (and smaller) tiles waste less of a tiny problem.
pub const HOPPER_MIN_OUTPUTS: usize = (BM * BN) as usize;

/// Which GEMM kernels [`Device::gemm`] may take: `LATHE_GEMM=mma` keeps every product on the
/// `mma.sync` kernels (to compare or to rule the Hopper path out), anything else (or unset)
/// lets sm_90 devices use the Hopper kernels where they apply.
fn hopper_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("LATHE_GEMM").map_or(true, |v| v != "mma"))
}

/// A 2-D tensor map over one GEMM operand as stored: `(outer, inner)` row-major with leading
/// dimension `ld` (elements), boxes of `box_inner x box_outer`, 128-byte swizzle, out-of-bounds
/// elements read as zero.
#[allow(clippy::too_many_arguments)]
fn operand_map(
    dev: &Device,
    what: &str,
    elem: Elem,
    addr: u64,
    outer: usize,
    inner: usize,
    ld: usize,
    box_dims: [u32; 2],
) -> Result<KernelArg> {
    check_aligned(what, addr)?;
    if !(2 * ld).is_multiple_of(16) {
        return Err(invalid(format!(
            "{what}: leading dimension {ld} is {} bytes; TMA needs a multiple of 16",
            2 * ld
        )));
    }
    dev.tensor_map(&TensorMapSpec {
        elem,
        addr,
        dims: vec![inner as u64, outer as u64],
        strides: vec![2 * ld as u64],
        box_dims: box_dims.to_vec(),
        swizzle: TmaSwizzle::B128,
    })
}

impl Device {
    /// The version-3 Hopper kernel for `g` with operands `I` and output `O`, if this device
    /// runs it and the operands can be described by TMA (16-byte aligned bases, leading
    /// dimensions a multiple of 8 elements); `None` otherwise (the reason does not matter to
    /// a caller with a fallback).
    pub fn hopper_kernel_for<I: DeviceElem, O: DeviceElem>(
        &self,
        g: &lathe_kernels::gemm::Gemm,
        a_addr: u64,
        b_addr: u64,
    ) -> Option<&'static KernelDesc> {
        use lathe_kernels::gemm::Op;
        let k = hopper::v3_kernel(g.op_a == Op::T, g.op_b == Op::N, I::ELEM, O::ELEM)?;
        let ok = k.module.target.runs_on(self.compute_capability())
            && hopper::shared_bytes() <= self.max_shared_per_block_optin()
            && a_addr.is_multiple_of(16)
            && b_addr.is_multiple_of(16)
            && g.lda().is_multiple_of(8)
            && g.ldb().is_multiple_of(8)
            && [g.m, g.n, g.k].iter().all(|&d| (1..=MAX_DIM).contains(&d));
        ok.then_some(k)
    }

    /// Whether [`Device::gemm`] runs `g` on the Hopper kernels (see [`HOPPER_MIN_OUTPUTS`]).
    pub fn gemm_takes_hopper<I: DeviceElem, O: DeviceElem>(
        &self,
        g: &lathe_kernels::gemm::Gemm,
        a_addr: u64,
        b_addr: u64,
    ) -> bool {
        hopper_allowed()
            && g.m.saturating_mul(g.n) >= HOPPER_MIN_OUTPUTS
            && self.hopper_kernel_for::<I, O>(g, a_addr, b_addr).is_some()
    }

    /// `C = act(alpha * op(A) op(B) + beta * C + bias)` on the version-3 Hopper kernel, with
    /// [`Device::gemm`]'s contract (the caller has validated `g` and the buffer lengths). Fails
    /// with the reason when the kernel does not apply (see [`Device::hopper_kernel_for`]).
    #[allow(clippy::too_many_arguments)]
    pub fn hopper_gemm<I: DeviceElem, O: DeviceElem>(
        &self,
        stream: &Stream,
        g: &lathe_kernels::gemm::Gemm,
        a: &DeviceBuffer<I>,
        b: &DeviceBuffer<I>,
        bias: Option<&DeviceBuffer<I>>,
        c: &mut DeviceBuffer<O>,
    ) -> Result<()> {
        use lathe_kernels::gemm::Op;
        let Some(desc) = self.hopper_kernel_for::<I, O>(g, a.addr(), b.addr()) else {
            let cc = self.compute_capability();
            return Err(invalid(format!(
                "no version-3 kernel for A {:?} / B {:?}, {} operands, {} output on {} \
                 (compute capability {}.{}; operands need 16-byte aligned bases and leading \
                 dimensions that are multiples of 8)",
                g.op_a,
                g.op_b,
                I::ELEM.name(),
                O::ELEM.name(),
                self.describe(),
                cc.0,
                cc.1
            )));
        };
        let (ar, ac) = g.a_stored();
        let (br, bc) = g.b_stored();
        // K-major: boxes of 64 K x 128 (A) or 256 (B) rows; MN-major: 64 x 64.
        let a_box = if g.op_a == Op::T { [64, 64] } else { [BK, BM] };
        let b_box = if g.op_b == Op::N { [64, 64] } else { [BK, BN] };
        let tm_a = operand_map(self, "A", I::ELEM, a.addr(), ar, ac, g.lda(), a_box)?;
        let tm_b = operand_map(self, "B", I::ELEM, b.addr(), br, bc, g.ldb(), b_box)?;
        let bias_arg = match bias {
            Some(bias) => bias.arg(),
            None => KernelArg::Ptr {
                addr: 0,
                elem: I::ELEM,
                len: 0,
                writable: false,
            },
        };
        let problem = hopper::problem(g.m, g.n, g.k);
        let mut geo = (desc.geometry)(&problem);
        geo.grid.0 = geo.grid.0.min(self.sm_count().max(1));
        let args = [
            tm_a,
            tm_b,
            c.arg_mut(),
            bias_arg,
            KernelArg::U32(g.m as u32),
            KernelArg::U32(g.n as u32),
            KernelArg::U32(g.k as u32),
            KernelArg::U32(g.ldc() as u32),
            KernelArg::F32(g.alpha),
            KernelArg::F32(g.beta),
            KernelArg::U32(g.flags(bias.is_some())),
        ];
        self.launch_with(desc, &geo, &problem, &args, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_tma_cannot_describe_are_rejected_with_the_reason() {
        assert!(check_shape(128, 256, 64).is_ok());
        assert!(check_shape(129, 255, 72).is_ok());
        let e = check_shape(128, 128, 60).unwrap_err().to_string();
        assert!(e.contains("k = 60") && e.contains("multiple of 16"), "{e}");
        let e = check_shape(0, 128, 64).unwrap_err().to_string();
        assert!(e.contains("m = 0"), "{e}");
        assert!(check_shape(1 << 31, 8, 8).is_err());
        assert!(check_aligned("A", 0x1000).is_ok());
        let e = check_aligned("B", 0x1008).unwrap_err().to_string();
        assert!(e.contains("B at 0x1008"), "{e}");
    }
}
