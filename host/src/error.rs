//! Errors of the GPU runtime.

use cudarc::driver::DriverError;

/// Everything that can go wrong in the runtime. Messages say what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no CUDA driver found: libcuda could not be loaded (is an NVIDIA driver installed? \
         Lathe needs driver 580 or newer for CUDA 13.0)"
    )]
    NoDriver,
    #[error("CUDA device {ordinal} not found: this machine has {count} CUDA device(s)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver call `{call}` failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("loading PTX module `{module}` on {device} failed: {source}\nJIT log:\n{log}")]
    Jit {
        module: String,
        device: String,
        source: DriverError,
        log: String,
    },
    #[error(
        "kernel `{entry}` targets {target} but {device} has compute capability {major}.{minor}"
    )]
    UnsupportedTarget {
        entry: &'static str,
        target: &'static str,
        device: String,
        major: u32,
        minor: u32,
    },
    #[error("launch of `{entry}`: {problem}")]
    BadLaunch {
        entry: &'static str,
        problem: String,
    },
    #[error(
        "out of device memory on {device}: tried to allocate {requested} bytes; {free} bytes free \
         of {total}; Lathe holds {allocated} bytes in tensors, {reserved} reserved by its \
         allocator, peak {peak}. Try a smaller --micro-batch with more --accum steps, \
         --recompute act|block, or --zero 1|2|3"
    )]
    OutOfMemory {
        device: String,
        requested: usize,
        free: usize,
        total: usize,
        allocated: usize,
        reserved: usize,
        peak: usize,
    },
    #[error("{what}: length mismatch, expected {expected} elements, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what} on the simulated device failed: {source}")]
    Sim {
        what: String,
        #[source]
        source: lathe_sim::SimError,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn sim(what: impl Into<String>, source: lathe_sim::SimError) -> Error {
        Error::Sim {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a driver result with the name of the call.
pub(crate) trait Context<T> {
    fn ctx(self, call: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, DriverError> {
    fn ctx(self, call: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { call, source })
    }
}
