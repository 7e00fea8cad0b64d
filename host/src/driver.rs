//! Finding the CUDA driver without ever letting cudarc panic.
//!
//! cudarc loads libcuda lazily and panics at first use when it is absent, so every entry point
//! of the runtime calls [`ensure_driver`] first.

use crate::error::{Context, Error, Result};
use std::sync::OnceLock;

/// Whether libcuda can be loaded on this machine (checked once).
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen the library by its candidate names; no symbol is called.
        unsafe { cudarc::driver::sys::is_culib_present() }
    })
}

/// Errors with [`Error::NoDriver`] unless libcuda is present and `cuInit` succeeded.
pub fn ensure_driver() -> Result<()> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    static INIT: OnceLock<Result<(), cudarc::driver::DriverError>> = OnceLock::new();
    // libcuda is present (checked above), so cudarc's loader will not panic; cuInit(0) may
    // be called any number of times.
    (*INIT.get_or_init(cudarc::driver::result::init)).ctx("cuInit")
}

/// The number of CUDA devices; an error when no driver is installed.
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    let n = cudarc::driver::CudaContext::device_count().ctx("cuDeviceGetCount")?;
    Ok(n.max(0) as usize)
}

/// The driver's CUDA version as (major, minor), e.g. (13, 0) for driver 580.
pub fn driver_version() -> Result<(u32, u32)> {
    ensure_driver()?;
    let mut v = 0i32;
    // SAFETY: the driver is loaded and initialised; `v` is a valid out pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .ctx("cuDriverGetVersion")?;
    Ok(((v / 1000) as u32, ((v % 1000) / 10) as u32))
}
