//! lathe-host: the GPU runtime over cudarc's driver API.
//!
//! - [`Device`]: a CUDA device with its compute and copy streams, module cache and caching
//!   allocator. `Device::cuda(0)` returns [`Error::NoDriver`] on machines without CUDA.
//! - [`DeviceBuffer`], [`PinnedBuffer`]: memory, and copies between host and device.
//! - [`Device::launch`]: typed launch of a kernel descriptor from `lathe-kernels`.
//! - [`alloc`]: the caching allocator and its statistics.
//! - [`comm`]: communicators (in-process ranks, NCCL) and the rendezvous.
//! - [`nvtx`]: optional NVTX ranges. [`testing`]: the GPU test harness.

pub mod alloc;
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
pub mod stream;
pub mod testing;
pub mod timing;

pub use alloc::MemoryStats;
pub use buffer::{DeviceBuffer, DeviceElem, PinnedBuffer};
pub use device::Device;
pub use error::{Error, Result};
pub use module::KernelArg;
pub use stream::{Event, Stream};

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
