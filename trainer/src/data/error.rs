//! The data pipeline's error type. Every variant that concerns a file names it, and errors
//! about the contents of a shard also give the byte offset (and token index) where the problem is.

use std::path::PathBuf;

/// Errors of shard reading and writing, `prepare`, the loader and the built-in corpus.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An operating-system error on a named file or directory.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot open shard".
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is shorter than the 1024-byte shard header.
    #[error(
        "{path}: not a token shard: the file is {len} bytes, shorter than the 1024-byte header"
    )]
    HeaderTooShort { path: PathBuf, len: u64 },

    /// Header word 0 is not 20240520.
    #[error("{path}: bad magic number {found} at byte offset 0 (expected 20240520)")]
    BadMagic { path: PathBuf, found: i32 },

    /// Header word 1 is not 1.
    #[error(
        "{path}: unsupported shard version {found} at byte offset 4 (only version 1, u16 tokens, is supported)"
    )]
    BadVersion { path: PathBuf, found: i32 },

    /// Header word 2 (the token count) is negative.
    #[error("{path}: negative token count {found} at byte offset 8")]
    BadCount { path: PathBuf, found: i32 },

    /// The file length does not equal `1024 + 2 * count`.
    #[error(
        "{path}: the header says {count} tokens, so the file should be {expected} bytes, but it is {actual} bytes ({})",
        if actual < expected { "truncated" } else { "trailing bytes" }
    )]
    LengthMismatch {
        path: PathBuf,
        count: u64,
        expected: u64,
        actual: u64,
    },

    /// A token is not below the vocabulary size.
    #[error(
        "{path}: token {token} at token index {index} (byte offset {offset}) is out of the vocabulary of {vocab} tokens"
    )]
    TokenOutOfVocab {
        path: PathBuf,
        index: u64,
        offset: u64,
        token: u32,
        vocab: u32,
    },

    /// A shard would hold more tokens than the header's i32 count can say.
    #[error("{path}: a shard holds at most {max} tokens (the header count is an i32)")]
    ShardTooLarge { path: PathBuf, max: u64 },

    /// An input file named for `prepare` does not exist or is not a regular file.
    #[error("input file {path} {reason}")]
    BadInput { path: PathBuf, reason: &'static str },

    /// All inputs given to `prepare` are empty, or no input was given.
    #[error("nothing to prepare: {0}")]
    EmptyInput(String),

    /// The GPT-2 tokenizer needs UTF-8 text.
    #[error(
        "{path}: not valid UTF-8 at byte offset {offset} (the gpt2 tokenizer reads UTF-8 text; use --tokenizer bytes for binary data)"
    )]
    NotUtf8 { path: PathBuf, offset: u64 },

    /// The output directory of `prepare` cannot be used.
    #[error("output directory {path}: {reason}")]
    OutDir { path: PathBuf, reason: String },

    /// The data path given to the loader does not exist.
    #[error("data path {path} does not exist")]
    MissingData { path: PathBuf },

    /// A data directory holds no shard of the requested split.
    #[error(
        "{path}: no {split} shards found (expected files like {split}_000000.bin or NAME_{split}_000000.bin)"
    )]
    NoShards { path: PathBuf, split: &'static str },

    /// A `meta.json` next to the shards could not be parsed.
    #[error("{path}: cannot parse dataset metadata: {reason}")]
    BadMeta { path: PathBuf, reason: String },

    /// The split holds fewer windows than one step needs.
    #[error(
        "{what}: {windows} windows of {window_len} tokens, but one step needs {needed} (batch x world); use more data or a smaller batch/sequence length"
    )]
    TooFewWindows {
        what: String,
        windows: u64,
        window_len: usize,
        needed: u64,
    },

    /// The tokenizer failed to load or to decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An invalid option (batch size zero, rank out of range, bad fraction, ...).
    #[error("invalid data option: {0}")]
    Config(String),

    /// A saved loader position does not fit the loader it is restored into.
    #[error(
        "cannot resume the data loader: the saved position has {field} = {saved}, but this loader has {current}"
    )]
    PositionMismatch {
        field: &'static str,
        saved: u64,
        current: u64,
    },

    /// The buffer pool could not provide a host buffer.
    #[error("host buffer: {0}")]
    Buffer(String),

    /// A dataset directory that `lathe prepare` did not finish.
    #[error(
        "{path}: not a complete dataset: {reason} (an interrupted `lathe prepare`? run it again)"
    )]
    Incomplete { path: PathBuf, reason: String },

    /// `lathe prepare` caught SIGINT or SIGTERM (and removed what it had written).
    #[error("interrupted by {0}; nothing was written")]
    Interrupted(String),

    /// A loader worker thread panicked, or the pool shut down; the loader cannot continue.
    #[error("data loader worker failed: {0}")]
    Worker(String),
}

impl DataError {
    /// Shorthand for [`DataError::Io`].
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// The data pipeline's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
