//! Kernel descriptors: everything the runtime, the profiler and the ptxas check need to know about
//! a kernel without reading its PTX.

use std::borrow::Cow;

/// The GPU architecture a PTX module is written for. A module only uses instructions its target
/// allows; the driver JIT-compiles it for the actual device (sm_80 PTX runs on sm_90 too, sm_90a
/// PTX runs on compute capability 9.0 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Ampere and newer: `mma.sync`, `cp.async`, `ldmatrix`, bf16 conversions.
    Sm80,
    /// Hopper with architecture-specific features: `wgmma`, `setmaxnreg`.
    Sm90a,
}

impl Target {
    /// The name used in `.target` and by `ptxas -arch`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm90a => "sm_90a",
        }
    }

    /// The lowest compute capability (major, minor) that can run the module.
    pub fn min_compute_capability(self) -> (u32, u32) {
        match self {
            Target::Sm80 => (8, 0),
            Target::Sm90a => (9, 0),
        }
    }

    /// Whether a device of compute capability `cc` can load this module. sm_90a code runs on
    /// 9.0 exactly (architecture-specific features are not forward compatible).
    pub fn runs_on(self, cc: (u32, u32)) -> bool {
        match self {
            Target::Sm80 => cc >= (8, 0),
            Target::Sm90a => cc == (9, 0),
        }
    }
}

/// Element types kernels read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    F16,
    BF16,
    U16,
    U32,
    I32,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::U32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::U16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::BF16 => "bf16",
            Elem::U16 => "u16",
            Elem::U32 => "u32",
            Elem::I32 => "i32",
        }
    }
}

/// What one kernel parameter is. Pointers carry their element type so a typed launch can check
/// that the buffer handed in matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A device pointer the kernel only reads.
    In(Elem),
    /// A device pointer the kernel writes (and may read).
    Out(Elem),
    U32,
    U64,
    F32,
    /// A TMA tensor map passed by value: `.param .align 64 .b8 name[128]`. It describes a
    /// tensor of the given element type in device memory, which the kernel only reads.
    TensorMap(Elem),
}

/// One kernel parameter, in PTX order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    pub name: &'static str,
    pub kind: ArgKind,
}

/// Shorthands for descriptor tables.
pub const fn arg(name: &'static str, kind: ArgKind) -> Arg {
    Arg { name, kind }
}

/// The size of one launch's problem. Elementwise kernels use `n`; matrix kernels `m, n, k`;
/// `batch` counts independent problems (rows, heads, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Problem {
    pub n: u64,
    pub m: u64,
    pub k: u64,
    pub batch: u64,
}

impl Problem {
    /// An elementwise problem over `n` elements.
    pub fn elems(n: u64) -> Self {
        Problem {
            n,
            m: 1,
            k: 1,
            batch: 1,
        }
    }
}

/// Grid, block and dynamic shared memory for one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// The work one launch must do: floating-point operations and the fewest bytes it must move
/// through device memory (each input read once, each output written once). The profiler turns
/// these into achieved TFLOP/s and GB/s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    pub bytes: u64,
}

/// One PTX module: a unit the driver JIT-loads once per device.
pub struct Module {
    /// Unique name; the runtime's module cache is keyed by it.
    pub name: &'static str,
    pub target: Target,
    /// The PTX text. Hand-written files come through `include_str!`; families are printed by a
    /// Rust function that fills a hand-written template.
    pub ptx: fn() -> Cow<'static, str>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
            .field("target", &self.target)
            .finish()
    }
}

/// A kernel: its entry in a module, its parameters, and how to launch it for a problem.
pub struct KernelDesc {
    /// The `.entry` name in the PTX; by convention `lathe_<op>_<dtypes>`.
    pub entry: &'static str,
    pub module: &'static Module,
    /// Parameters in PTX order.
    pub args: &'static [Arg],
    /// Launch geometry for a problem size.
    pub geometry: fn(&Problem) -> Geometry,
    /// FLOPs and minimum bytes for a problem size.
    pub cost: fn(&Problem) -> Cost,
    /// One line: what the kernel computes.
    pub summary: &'static str,
}

impl std::fmt::Debug for KernelDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDesc")
            .field("entry", &self.entry)
            .field("module", &self.module.name)
            .field("args", &self.args)
            .finish()
    }
}

/// `ceil(a / b)` for launch arithmetic.
pub const fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}
