//! Models built on the tape.

pub mod config;
pub mod gpt;
pub mod mlp;

pub use config::GptConfig;
pub use gpt::{ActivationMemory, Gpt};
pub use mlp::{Activation, Mlp};
