//! SIGINT and SIGTERM as a flag: long commands (`lathe prepare`, `lathe launch`) install the
//! handler, poll [`received`] where it is safe to stop, clean up, and exit with `128 + signal`.
//! The handler only stores the signal number (async-signal-safe); off Unix nothing is installed.

use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM from now on (instead of dying at once). Idempotent.
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_signal as extern "C" fn(libc::c_int);
        // SAFETY: `handler` only performs an atomic store, which is async-signal-safe, and
        // lives for the whole program; `signal` has no other preconditions.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// The signal caught since [`install`] (SIGINT = 2, SIGTERM = 15), if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Sends signal `sig` to process `pid` (best effort; Unix only).
pub fn send(pid: u32, sig: i32) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child we started.
        unsafe {
            libc::kill(pid, sig);
        }
    }
    #[cfg(not(unix))]
    let _ = (pid, sig);
}

/// A signal's name for messages.
pub fn name(sig: i32) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

/// Whether process `pid` still exists (Linux: `/proc/PID`; elsewhere assumed alive).
pub fn process_alive(pid: u32) -> bool {
    let proc_dir = std::path::Path::new("/proc");
    !proc_dir.is_dir() || proc_dir.join(pid.to_string()).exists()
}
