//! lathe-host: the device runtime — cudarc's driver API for a GPU, lathe-sim for the
//! simulated device, behind one API.
//!
//! - [`Device`]: a CUDA device (`Device::cuda(0)`, [`Error::NoDriver`] on machines without
//!   CUDA) or the simulated GPU (`Device::sim()`), with its compute and copy streams, module
//!   cache and caching allocator.
//! - [`DeviceBuffer`], [`PinnedBuffer`]: memory, and copies between host and device.
//! - [`Device::launch`]: typed launch of a kernel descriptor from `lathe-kernels`; typed
//!   wrappers per family ([`gemm_ops`], [`nn_ops`], [`step_ops`], ...; the autograd tape's
//!   kernels in `autograd_ops`).
//! - [`alloc`]: the caching allocator and its statistics.
//! - [`comm`]: communicators (in-process ranks, NCCL) and the rendezvous.
//! - [`nvtx`]: optional NVTX ranges. [`testing`]: the GPU test harness.

pub mod alloc;
mod autograd_ops;
pub mod buffer;
pub mod comm;
pub mod device;
pub mod driver;
pub mod error;
pub mod gemm_ops;
pub mod hopper_ops;
pub mod module;
pub mod nn_ops;
pub mod nvtx;
pub mod ops;
pub mod peer;
pub mod step_ops;
pub mod stream;
pub mod tensor_map;
pub mod testing;
pub mod timing;

pub use alloc::MemoryStats;
pub use buffer::{DeviceBuffer, DeviceElem, PinnedBuffer};
pub use device::Device;
pub use error::{Error, Result};
pub use lathe_sim::SimConfig;
pub use module::{KernelArg, TensorMapBytes};
pub use stream::{Event, Stream};
pub use tensor_map::{TensorMapSpec, TmaSwizzle};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        if driver::driver_present() {
            eprintln!("a CUDA driver is present; the no-driver path is not exercised here");
            return;
        }
        let e = Device::cuda(0).unwrap_err();
        assert!(matches!(e, Error::NoDriver), "{e}");
        assert!(e.to_string().contains("no CUDA driver found"), "{e}");
        assert!(Device::count().is_err());
    }
}
