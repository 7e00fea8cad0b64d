//! lathe-autograd: tensors, the tape, ops, and the models Lathe trains.
//!
//! This crate is the CPU reference backend: every op is computed in f32 (or f64 for gradient
//! checks) with the GPU's low-precision storage emulated by rounding ([`autocast`]). A CUDA
//! backend will sit behind the same API; naming [`Device::Cuda`] today gives a clear error.
//!
//! - [`DType`], [`Device`], [`Tensor`]: element types and values.
//! - [`ParamStore`], [`ParamView`]: flat master / working / gradient buffers, as in llm.c.
//! - [`Tape`], [`Var`]: record ops (`tape.matmul(..)`, `tape.layernorm(..)`, ...) and
//!   [`Tape::backward`] through them; parameter gradients accumulate with `+=`.
//! - [`Recompute`]: activation recomputation policies, bitwise-neutral on results; the tape
//!   counts live activation bytes ([`Tape::peak_activation_bytes`]) and a dry-run tape
//!   measures them at any size without computing ([`Gpt::activation_memory`]).
//! - [`models`]: [`Gpt`] (GPT-2 layout and names) and [`Mlp`].
//! - Profiling: [`Tape::set_profiling`] times every kernel ([`Tape::profile`],
//!   [`Tape::take_events`]).
//!
//! Determinism: kernels split work over rayon in chunks fixed by the shapes, and every reduction
//! has one fixed order, so a run repeats bit for bit on the same machine whatever the thread
//! count. Throughput of the tiny GPT: `cargo run --release -p lathe-autograd --example
//! gpt_throughput`.
//!
//! ```
//! use lathe_autograd::{DType, Gpt, GptConfig, Recompute, Tape};
//! let cfg = GptConfig::from_name("tiny")?;
//! let gpt = Gpt::new(cfg.clone())?;
//! let mut params = gpt.init_params(0);
//! let (b, t) = (2, 8);
//! let tokens: Vec<u32> = (0..(b * t) as u32).map(|i| i % 10).collect();
//! let targets: Vec<u32> = tokens.iter().map(|&x| (x + 1) % 10).collect();
//! let mut tape = Tape::new(DType::F32);
//! let loss = gpt.loss(&mut tape, &params, &tokens, &targets, b, t, Recompute::None)?;
//! println!("loss {}", tape.scalar(loss)?);
//! tape.backward(loss, 1.0, &mut params)?;
//! # Ok::<(), lathe_autograd::Error>(())
//! ```

#![warn(missing_docs)]

pub mod autocast;
mod backward;
pub mod device;
pub mod dtype;
pub mod error;
pub mod models;
pub(crate) mod ops;
pub mod params;
pub mod recompute;
pub mod scalar;
pub mod tape;
pub mod tensor;

pub use device::{DevBuf, DeviceParams, ParamGatherHook, WorkingMut};
pub use dtype::{DType, Device};
pub use error::{Error, Result};
pub use models::{Activation, ActivationMemory, Gpt, GptConfig, Mlp};
pub use ops::attention::AttentionPath;
pub use ops::loss::IGNORE_INDEX;
pub use ops::norm::LAYERNORM_EPS;
pub use params::{ParamSpec, ParamStore, ParamView};
pub use recompute::{Mark, Recompute};
pub use scalar::Scalar;
pub use tape::{GradReadyHook, OpEvent, OpProfile, Tape, Var};
pub use tensor::{Tensor, numel};
