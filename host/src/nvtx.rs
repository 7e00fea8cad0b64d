//! NVTX ranges, optional: Nsight Systems shows them when libnvToolsExt is present; without it
//! (CUDA 13 ships NVTX3 headers only) every call is a silent no-op, never a panic.

use std::sync::OnceLock;

/// Whether the NVTX library could be loaded (checked once).
pub fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: only tries to dlopen libnvToolsExt; no symbol is called.
        unsafe { cudarc::nvtx::sys::is_culib_present() }
    })
}

/// A range that ends when dropped.
#[must_use = "the range ends when this guard is dropped"]
pub struct Range {
    inner: Option<cudarc::nvtx::safe::Range>,
}

/// Starts a named range (no-op without the library).
pub fn range(name: &str) -> Range {
    if !available() || name.contains('\0') {
        return Range { inner: None };
    }
    Range {
        inner: Some(cudarc::nvtx::safe::scoped_range(name)),
    }
}

impl Range {
    /// Whether this range reached NVTX.
    pub fn is_recorded(&self) -> bool {
        self.inner.is_some()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_never_panic() {
        let r = super::range("lathe-test");
        assert_eq!(r.is_recorded(), super::available());
        drop(r);
        let r = super::range("bad\0name");
        assert!(!r.is_recorded());
    }
}
