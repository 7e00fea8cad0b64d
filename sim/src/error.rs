//! The simulator's errors: what went wrong, and where (kernel, block, thread, PTX line, address).

/// The kind of a [`SimError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Malformed PTX text.
    Parse,
    /// An instruction form or directive the simulator does not implement.
    Unsupported,
    /// Wrong launch geometry, parameters or shared memory size.
    BadLaunch,
    OutOfMemory,
    /// A host copy or free outside any allocation.
    BadAddress,
    /// A global or shared access outside its allocation, region or shared window.
    OutOfBounds,
    Misaligned,
    /// A store to a region the launch marked read-only.
    ReadOnly,
    /// A read of memory never written.
    Uninitialized,
    /// Two threads of a block touching the same shared bytes between barriers, one writing.
    SharedRace,
    /// Divergent, partial or mismatched barriers; `.sync`/`.aligned` instructions reached by
    /// a partial warp.
    Barrier,
    /// No thread can make progress (including an mbarrier phase that never completes).
    Deadlock,
    /// Async-proxy ordering: TMA-filled shared memory read before its mbarrier wait, generic
    /// stores read by wgmma/TMA without `fence.proxy.async`.
    AsyncProxy,
    /// A wgmma accumulator read or written before the matching `wgmma.wait_group`.
    WgmmaHazard,
    /// `setmaxnreg` outside its rules or over the register file.
    RegisterBudget,
    /// `trap`, or a runaway kernel over the instruction budget.
    Trap,
    /// Malformed tensor map.
    TensorMap,
}

/// Where in a launch an error happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub kernel: String,
    pub block: (u32, u32, u32),
    pub thread: (u32, u32, u32),
    /// 1-based line of the PTX text.
    pub line: u32,
    /// The instruction, as written.
    pub text: String,
    /// The memory address involved, if any.
    pub addr: Option<u64>,
}

/// A simulator error: its kind, a message saying what is wrong, and the site when the error
/// comes from a running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError {
    pub kind: ErrorKind,
    pub message: String,
    pub site: Option<Box<Site>>,
}

impl SimError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SimError {
            kind,
            message: message.into(),
            site: None,
        }
    }

    pub fn at(mut self, site: Site) -> Self {
        self.site = Some(Box::new(site));
        self
    }
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)?;
        if let Some(s) = &self.site {
            write!(
                f,
                " (kernel `{}`, block ({}, {}, {}), thread ({}, {}, {}), PTX line {}: `{}`",
                s.kernel,
                s.block.0,
                s.block.1,
                s.block.2,
                s.thread.0,
                s.thread.1,
                s.thread.2,
                s.line,
                s.text
            )?;
            if let Some(a) = s.addr {
                write!(f, ", address {a:#x}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimError {}
