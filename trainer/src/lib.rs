//! lathe-trainer: precision, optimizers, schedules, checkpoints, data pipeline, profiler and the
//! `lathe` command line.

pub mod bench;
pub mod bench_kernels;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod early_stop;
pub mod launch;
pub mod metrics;
pub mod optim;
pub mod precision;
pub mod profiler;
pub mod report;
pub mod schedule;
pub mod signals;
pub mod train;
pub mod zero;

/// An error and its causes on one line, `outer: inner: ...`, as `{:#}` prints them, except that
/// a cause whose text the error above it already shows (many errors print their source, such
/// as the operating system's message, in their own text) is not repeated.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev: Option<String> = None;
    for cause in e.chain() {
        let msg = cause.to_string();
        if prev.as_deref().is_some_and(|p| p.contains(msg.as_str())) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
        prev = Some(msg);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_text_says_the_os_message_once() {
        let os = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let os_text = os.to_string();
        let e = crate::data::DataError::io("cannot read", "/x/y", os);
        let e = anyhow::Error::new(e).context("--data /x");
        let t = super::error_text(&e);
        assert_eq!(t.matches(os_text.as_str()).count(), 1, "{t}");
        assert!(t.starts_with("--data /x: cannot read /x/y"), "{t}");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner");
    }
}
