//! lathe-sim: the simulated GPU. A PTX interpreter with an always-on sanitizer and per-launch
//! counters, behind a small device API (memory, modules, launches) that `lathe-host` wraps as
//! `Device::sim()`. No CUDA dependency.
//!
//! - [`Sim`]: one simulated device: its memory, loaded modules and launches.
//! - [`SimError`]: every failure, with the kernel, block, thread, PTX line and address.
//! - [`Counters`]: what one launch did (instructions by class, memory sectors, bank conflicts,
//!   tensor-core FLOPs). There is no timing model.
//! - [`tensor_map`]: Lathe's own 128-byte tensor-map encoding for TMA on the simulator.
//! - [`hopper`]: the sm_90a pieces as functions: TMA box copies with swizzle and out-of-bounds
//!   fill, wgmma shared-memory descriptors and operand addressing (every swizzle mode, both
//!   operand majors), the m64nNk16 product and its register layouts.
//!
//! How it works:
//! - `load_module` parses and decodes once: registers become slots, immediates are converted to
//!   the instruction's type, labels become instruction indices, every instruction keeps its
//!   PTX line and text. A form the interpreter does not implement is an `Unsupported` error
//!   naming the line; malformed text is a `Parse` error.
//! - A launch runs blocks in parallel (rayon, `SimConfig::parallel_blocks`). In a block, warps
//!   run one at a time until they wait (barrier, mbarrier phase, warpgroup rendezvous, exit).
//!   A warp keeps a PC per lane and runs the lanes at the lowest PC together, so divergent
//!   paths run one after the other and reconverge where they meet. One decoded instruction
//!   runs for all 32 lanes in one loop over structure-of-arrays registers.
//! - Global memory is words of relaxed atomics with a written-bit per byte: blocks on several
//!   host threads share it without locks and without undefined behaviour, even when a buggy
//!   kernel races across blocks. A launch snapshots the allocation table once.
//! - The sanitizer checks every access (bounds of allocation and launch regions, alignment,
//!   read-only regions, never-written bytes, shared-memory races through vector clocks over
//!   barriers and mbarriers, outstanding `cp.async` and TMA bytes, ordinary stores read by
//!   wgmma without a `fence.proxy.async` after them, wgmma accumulators touched before their
//!   `wgmma.wait_group`), `.sync`/`.aligned`
//!   instructions reached by part of a warp, barriers that can never complete, deadlocks and
//!   an instruction budget. Findings are errors with a [`Site`]; the device stays usable.
//! - Integer division by zero gives all ones (quotient) and the dividend (remainder), as the
//!   hardware does; `.approx` functions are computed in f64 and rounded once.

mod decode;
mod decode_half;
mod decode_hopper;
mod decode_inst;
mod decode_mem;
mod decode_sync;
mod error;
mod exec;
pub mod hopper;
mod ir;
mod memory;
mod parse;
pub mod tensor_map;

pub use error::{ErrorKind, SimError, Site};

use std::sync::Arc;

/// The properties of a simulated device. The default is an H100 SXM: sm_90a, 132 SMs, 227 KiB
/// of opt-in shared memory per block, and `memory_bytes` of global memory.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub name: String,
    /// Total global memory in bytes. Allocations beyond it fail with [`ErrorKind::OutOfMemory`],
    /// so out-of-memory paths are testable with a small value. Host memory is only used for
    /// what is actually allocated.
    pub memory_bytes: u64,
    pub sm_count: u32,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Dynamic + static shared memory one block may use after opting in (232,448 on an H100).
    pub max_shared_per_block_optin: u32,
    /// Run independent blocks of a launch on several host threads.
    pub parallel_blocks: bool,
    /// Warp instructions one block may execute before the launch fails with
    /// [`ErrorKind::Trap`] (so an endless loop is an error, not a hang).
    pub instruction_budget: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            name: "Lathe simulated H100".to_string(),
            memory_bytes: 16 << 30,
            sm_count: 132,
            compute_capability: (9, 0),
            max_shared_per_block_optin: 227 * 1024,
            parallel_blocks: true,
            instruction_budget: 1 << 24,
        }
    }
}

/// One kernel parameter value, in PTX parameter order.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    U32(u32),
    U64(u64),
    F32(f32),
    /// A by-value byte blob (`.param .align A .b8 name[N]`), e.g. a 128-byte tensor map.
    Bytes(Vec<u8>),
}

/// A global-memory range a launch may touch. When a launch lists regions, every global access
/// (including TMA reads through tensor maps) must fall inside one, and stores inside a writable
/// one: this is tighter than allocation bounds (a buffer is smaller than its allocator block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub addr: u64,
    pub bytes: u64,
    pub writable: bool,
}

/// A launch: geometry, dynamic shared memory, parameters and the regions it may access.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub params: Vec<Param>,
    /// Empty: any live allocation may be accessed (stores included).
    pub regions: Vec<Region>,
}

/// What one launch did. Counts are exact, not sampled; there are no times.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Instructions issued per warp (one per warp per executed instruction), by class.
    pub warp_instructions: InstClasses,
    /// Instructions times active lanes.
    pub lane_instructions: u64,
    pub global_load_requests: u64,
    pub global_store_requests: u64,
    /// 32-byte sectors touched by global loads / stores (coalescing: a perfectly coalesced
    /// 4-byte-per-lane warp access touches 4 sectors).
    pub global_load_sectors: u64,
    pub global_store_sectors: u64,
    pub global_load_bytes: u64,
    pub global_store_bytes: u64,
    /// Atomic and reduction operations (lanes).
    pub global_atomics: u64,
    pub shared_load_requests: u64,
    pub shared_store_requests: u64,
    /// Extra shared-memory wavefronts caused by bank conflicts (0 for a conflict-free kernel).
    pub shared_bank_conflicts: u64,
    /// Bytes moved by TMA (`cp.async.bulk.tensor`) and `cp.async`.
    pub tma_bytes: u64,
    pub cp_async_bytes: u64,
    /// Tensor-core floating-point operations (2 per multiply-add) of `mma.sync` and `wgmma`.
    pub tensor_flops: u64,
    pub blocks: u64,
    pub threads_per_block: u32,
    /// Static (`.shared` declarations) and dynamic shared memory per block.
    pub static_shared_bytes: u32,
    pub dynamic_shared_bytes: u32,
}

/// Warp-instruction counts by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstClasses {
    /// Integer and logic arithmetic, moves, predicates, selects.
    pub int: u64,
    /// f32/f16/bf16 add, mul, fma, min/max, comparisons.
    pub fp: u64,
    /// `.approx` transcendental functions (ex2, lg2, rcp, rsqrt, sqrt, tanh, sin, cos).
    pub sfu: u64,
    pub convert: u64,
    pub global_mem: u64,
    pub shared_mem: u64,
    pub param_mem: u64,
    /// Branches, calls, returns, exits.
    pub control: u64,
    /// Barriers, mbarrier operations, fences, shuffles, votes.
    pub sync: u64,
    /// `ldmatrix`, `mma.sync`, `wgmma.*`.
    pub tensor: u64,
    /// `cp.async`, `cp.async.bulk.*`.
    pub async_copy: u64,
}

impl InstClasses {
    pub fn total(&self) -> u64 {
        self.int
            + self.fp
            + self.sfu
            + self.convert
            + self.global_mem
            + self.shared_mem
            + self.param_mem
            + self.control
            + self.sync
            + self.tensor
            + self.async_copy
    }
}

/// A parsed PTX module, ready to launch. Cheap to clone.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ir::Program>,
    entries: Arc<Vec<String>>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Module({})", self.entries.join(", "))
    }
}

impl Module {
    /// The `.entry` names the module defines.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }
}

/// One simulated device. Cheap to clone (shared); usable from several threads. Launches run
/// to completion before [`Sim::launch`] returns, so stream order always holds.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<SimInner>,
}

struct SimInner {
    config: SimConfig,
    memory: memory::Memory,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sim({})", self.inner.config.name)
    }
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        let memory = memory::Memory::new(config.memory_bytes);
        Sim {
            inner: Arc::new(SimInner { config, memory }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Allocates `bytes` (> 0) of global memory, 256-byte aligned, never written (a read
    /// before a write is a sanitizer error). Out of memory is [`ErrorKind::OutOfMemory`].
    pub fn alloc(&self, bytes: u64) -> Result<u64, SimError> {
        self.inner.memory.alloc(bytes)
    }

    /// Frees an allocation by its base address.
    pub fn free(&self, addr: u64) -> Result<(), SimError> {
        self.inner.memory.free(addr)
    }

    /// (free, total) global memory in bytes.
    pub fn mem_info(&self) -> (u64, u64) {
        self.inner.memory.info()
    }

    /// Host-to-device copy; the bytes count as written.
    pub fn write(&self, addr: u64, src: &[u8]) -> Result<(), SimError> {
        self.inner.memory.write(addr, src)
    }

    /// Device-to-host copy. Never-written bytes read as they are (no error: a host copy of a
    /// partly written buffer is legal).
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> Result<(), SimError> {
        self.inner.memory.read(addr, dst)
    }

    /// Device-to-device copy (`cuMemcpyDtoD`); the written state travels with the bytes.
    pub fn copy(&self, dst: u64, src: u64, bytes: u64) -> Result<(), SimError> {
        self.inner.memory.copy(dst, src, bytes)
    }

    /// Sets `bytes` bytes at `addr` to `value` (`cuMemsetD8`); they count as written.
    pub fn fill(&self, addr: u64, bytes: u64, value: u8) -> Result<(), SimError> {
        self.inner.memory.fill(addr, bytes, value)
    }

    /// Parses a PTX module. Malformed text or an instruction form the simulator does not
    /// implement is an error naming the PTX line.
    pub fn load_module(&self, ptx: &str) -> Result<Module, SimError> {
        let program = decode::decode_module(ptx)?;
        let entries = program.kernels.iter().map(|k| k.name.clone()).collect();
        Ok(Module {
            inner: Arc::new(program),
            entries: Arc::new(entries),
        })
    }

    /// Runs `entry` of `module` to completion. Sanitizer findings, faults and bad launch
    /// arguments are errors; the device stays usable afterwards.
    pub fn launch(
        &self,
        module: &Module,
        entry: &str,
        launch: &Launch,
    ) -> Result<Counters, SimError> {
        let k = module
            .inner
            .kernels
            .iter()
            .find(|k| k.name == entry)
            .ok_or_else(|| {
                SimError::new(
                    ErrorKind::BadLaunch,
                    format!("no entry `{entry}` in {module:?}"),
                )
            })?;
        exec::run_launch(k, launch, self.inner.memory.snapshot(), &self.inner.config)
    }
}
