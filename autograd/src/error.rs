//! The error type of lathe-autograd.

use crate::dtype::Device;

/// Everything that can go wrong when recording, running or differentiating a graph.
///
/// Every variant names the operation (or the parameter, or the model) it comes from, so a
/// message read in a training log points at the call that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operand shapes do not fit the operation's contract.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What does not fit.
        detail: String,
    },

    /// An argument is outside what the operation accepts (an index, a dimension, a size).
    #[error("{op}: invalid argument: {detail}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },

    /// A `Var` from another tape, or from before `Tape::clear`.
    #[error(
        "variable {index} does not belong to this tape (it comes from another tape or from before a clear)"
    )]
    ForeignVar {
        /// The variable's index.
        index: u32,
    },

    /// The value of a variable is not available (it was freed by `backward`).
    #[error("value of variable {index} is not available: {detail}")]
    Unavailable {
        /// The variable's index.
        index: u32,
        /// Why.
        detail: String,
    },

    /// No parameter of that name in the store.
    #[error("no parameter named `{0}` in the parameter store")]
    UnknownParam(String),

    /// Two parameters share a name.
    #[error("duplicate parameter name `{0}`")]
    DuplicateParam(String),

    /// The parameter store does not match what the tape or the model expects.
    #[error("parameter store: {0}")]
    Params(String),

    /// A device the CPU reference backend cannot run on.
    #[error("{what}: device {device} is not supported yet by this backend (CPU only)")]
    UnsupportedDevice {
        /// The device asked for.
        device: Device,
        /// The call that asked.
        what: &'static str,
    },

    /// A model or config name that is not known.
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },

    /// A model configuration that cannot be built.
    #[error("invalid model config: {0}")]
    Config(String),

    /// A device operation failed (allocation, launch, copy).
    #[error("{op} on the device: {source}")]
    Device {
        /// The operation.
        op: &'static str,
        /// The device runtime's error.
        #[source]
        source: lathe_host::Error,
    },

    /// `backward` was called in a state where it cannot run.
    #[error("backward: {0}")]
    Backward(String),
}

impl Error {
    /// A device error raised inside an op's kernels names that op (an allocation failing in
    /// the middle of `linear`'s backward says so).
    pub(crate) fn in_op(self, op: &'static str) -> Error {
        match self {
            Error::Device { source, .. } => Error::Device { op, source },
            e => e,
        }
    }
}

/// Result alias for lathe-autograd.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for an [`Error::Shape`].
pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape {
        op,
        detail: detail.into(),
    }
}

/// Shorthand for an [`Error::Invalid`].
pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        detail: detail.into(),
    }
}
