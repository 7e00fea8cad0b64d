//! Text rendering of the [`Summary`]: the phase table, the kernel table, the host span table and
//! the overhead line.

use std::fmt::{self, Display, Formatter, Write as _};

use super::Phase;
use super::summary::{RooflineBound, Summary};

/// Host spans shown in the table (the longest ones).
const TOP_SPANS: usize = 15;
/// Longest name printed in a table before it is shortened.
const MAX_NAME: usize = 48;

/// Rounds `parts` (which add up to `total`) to whole units such that the rounded parts add up to
/// exactly `units`: each part gets the floor of its quota `part * units / total`, and the units
/// left over go to the largest remainders. Used so that printed columns add up to their total.
pub(crate) fn apportion(parts: &[u64], total: u64, units: u64) -> Vec<u64> {
    if total == 0 {
        return vec![0; parts.len()];
    }
    let quota = |p: u64| u128::from(p) * u128::from(units);
    let mut out: Vec<u64> = parts
        .iter()
        .map(|&p| (quota(p) / u128::from(total)) as u64)
        .collect();
    let given: u64 = out.iter().sum();
    let mut by_rem: Vec<usize> = (0..parts.len()).collect();
    by_rem.sort_by_key(|&i| std::cmp::Reverse(quota(parts[i]) % u128::from(total)));
    for &i in by_rem.iter().take(units.saturating_sub(given) as usize) {
        out[i] += 1;
    }
    out
}

fn shorten(name: &str) -> String {
    if name.chars().count() <= MAX_NAME {
        name.to_string()
    } else {
        let head: String = name.chars().take(MAX_NAME - 1).collect();
        format!("{head}~")
    }
}

fn ms(ns: f64) -> String {
    format!("{:.3}", ns / 1e6)
}

fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1e3)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

impl Summary {
    fn write_phases(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let n_steps = self.steps.len().max(1) as f64;
        let mut rows: Vec<(&str, u64)> = Phase::ALL
            .iter()
            .map(|&p| (p.as_str(), self.phase_ns(p)))
            .collect();
        rows.push(("untracked", self.untracked_ns));
        let parts: Vec<u64> = rows.iter().map(|r| r.1).collect();
        // Totals in microseconds and shares in tenths of a percent, each adding up to its total.
        let total_us = (self.measured_ns + 500) / 1000;
        let us_col = apportion(&parts, self.measured_ns, total_us);
        let permille = apportion(&parts, self.measured_ns, 1000);
        writeln!(
            f,
            "{:<15} {:>12} {:>10} {:>7}",
            "phase", "total ms", "ms/step", "share"
        )?;
        for (i, (name, ns)) in rows.iter().enumerate() {
            writeln!(
                f,
                "{:<15} {:>12} {:>10} {:>6.1}%",
                name,
                format!("{:.3}", us_col[i] as f64 / 1000.0),
                ms(*ns as f64 / n_steps),
                permille[i] as f64 / 10.0
            )?;
        }
        writeln!(
            f,
            "{:<15} {:>12} {:>10} {:>6.1}%",
            "step total",
            format!("{:.3}", total_us as f64 / 1000.0),
            ms(self.measured_ns as f64 / n_steps),
            if self.measured_ns > 0 { 100.0 } else { 0.0 }
        )
    }

    fn write_kernels(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.kernels.is_empty() {
            return writeln!(
                f,
                "{} kernels: none recorded (CPU backend, or no GPU runtime feeding kernel spans)",
                self.device_label
            );
        }
        let calls: u64 = self.kernels.iter().map(|k| k.calls).sum();
        writeln!(
            f,
            "{} kernels: {} kernel(s), {calls} launch(es) on {} stream(s), {} ms kernel time \
             = {:.1}% of the measured step (streams may overlap)",
            self.device_label,
            self.kernels.len(),
            self.streams,
            ms(self.kernel_total_ns as f64),
            100.0 * self.share(self.kernel_total_ns)
        )?;
        let w = self
            .kernels
            .iter()
            .map(|k| shorten(&k.name).chars().count())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:<w$} {:>7} {:>11} {:>10} {:>7} {:>9} {:>9} {:>9} {:>8}",
            "kernel",
            "calls",
            "total ms",
            "mean us",
            "step %",
            "TFLOP/s",
            "GB/s",
            "roofline",
            "bound"
        )?;
        for k in &self.kernels {
            let (roof, bound) = match &self.roofline {
                Some(r) => (
                    k.roofline_fraction(r)
                        .map_or_else(|| "-".to_string(), |x| format!("{:.1}%", 100.0 * x)),
                    match k.bound(r) {
                        Some(RooflineBound::Compute) => "compute",
                        Some(RooflineBound::Memory) => "memory",
                        None => "-",
                    },
                ),
                None => ("-".to_string(), "-"),
            };
            writeln!(
                f,
                "{:<w$} {:>7} {:>11} {:>10} {:>6.1}% {:>9} {:>9} {:>9} {:>8}",
                shorten(&k.name),
                k.calls,
                ms(k.total_ns as f64),
                us(k.mean_ns()),
                100.0 * self.share(k.total_ns),
                opt(k.tflops(), 2),
                opt(k.gbps(), 1),
                roof,
                bound
            )?;
        }
        if let Some(r) = &self.roofline {
            writeln!(
                f,
                "roofline: {:.1} TFLOP/s peak, {:.1} GB/s copy bandwidth; \"roofline\" = ideal \
                 time at the limiting ceiling / measured time",
                r.peak_flops / 1e12,
                r.copy_bandwidth_bytes_per_s / 1e9
            )?;
        }
        Ok(())
    }

    fn write_spans(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.host_spans.is_empty() {
            return writeln!(f, "host spans: none recorded");
        }
        let shown = self.host_spans.len().min(TOP_SPANS);
        writeln!(
            f,
            "host spans (inclusive time, all threads; {shown} longest of {}):",
            self.host_spans.len()
        )?;
        let w = self.host_spans[..shown]
            .iter()
            .map(|s| shorten(&s.name).chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "{:<w$} {:<13} {:>7} {:>11} {:>10}",
            "span", "phase", "calls", "total ms", "mean us"
        )?;
        for s in &self.host_spans[..shown] {
            writeln!(
                f,
                "{:<w$} {:<13} {:>7} {:>11} {:>10}",
                shorten(&s.name),
                s.phase.as_str(),
                s.calls,
                ms(s.total_ns as f64),
                us(s.mean_ns())
            )?;
        }
        Ok(())
    }

    fn write_overhead(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let o = &self.overhead;
        writeln!(
            f,
            "profiler overhead: {} record call(s) ({} span(s), {} counter sample(s), {} kernel \
             record(s)); {} ms inside record calls ({:.2}% of the measured step)",
            o.record_calls,
            o.spans,
            o.counters,
            o.kernels,
            ms(o.inside_record_ns as f64),
            100.0 * self.share(o.inside_record_ns)
        )?;
        writeln!(
            f,
            "calibrated span cost (begin + end): {:.1} ns recording, {:.2} ns disabled; \
             estimated {} ms for the recorded spans ({:.2}% of the measured step)",
            o.span_cost.enabled_ns,
            o.span_cost.disabled_ns,
            ms(o.estimated_span_ns()),
            if self.measured_ns == 0 {
                0.0
            } else {
                100.0 * o.estimated_span_ns() / self.measured_ns as f64
            }
        )
    }
}

impl Display for Summary {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let mut head = String::from("Lathe profile");
        if let Some(s) = &self.schedule {
            let _ = write!(head, " (schedule {s})");
        }
        writeln!(f, "{head}")?;
        if self.steps.is_empty() {
            writeln!(
                f,
                "no step was measured: the schedule has not reached an active step that ended \
                 with step()"
            )?;
            return self.write_overhead(f);
        }
        let list: Vec<String> = self.steps.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "measured {} step(s) [{}]: {} ms in total, {} ms per step (phases from thread {})",
            self.steps.len(),
            list.join(", "),
            ms(self.measured_ns as f64),
            ms(self.measured_ns as f64 / self.steps.len() as f64),
            self.step_thread.as_deref().unwrap_or("?")
        )?;
        writeln!(f)?;
        self.write_phases(f)?;
        writeln!(f)?;
        self.write_kernels(f)?;
        writeln!(f)?;
        self.write_spans(f)?;
        writeln!(f)?;
        self.write_overhead(f)
    }
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn apportion_adds_up_to_the_units() {
        let parts = [333, 333, 334, 0];
        let r = apportion(&parts, 1000, 7);
        assert_eq!(r.iter().sum::<u64>(), 7);
        assert_eq!(r[3], 0);
        let r = apportion(&[1, 1, 1], 3, 1000);
        assert_eq!(r.iter().sum::<u64>(), 1000);
        assert!(r.iter().all(|&x| x == 333 || x == 334));
        assert_eq!(apportion(&[5, 6], 0, 10), vec![0, 0]);
    }
}
