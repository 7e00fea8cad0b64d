//! Y-axis ticks and their labels. Ticks are chosen here (1, 2, 2.5 or 5 times a power of ten,
//! about six per axis) and labelled with just enough digits to tell them apart, so that a narrow
//! range such as a loss between 1.2301 and 1.2309 still gets distinct labels.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;

/// How tick values are printed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum TickFmt {
    /// Fixed decimals: `0.25`, `3`.
    Fixed(usize),
    /// A shared power of ten: `1.5e-4`.
    Sci {
        /// The exponent.
        exp: i32,
        /// Mantissa decimals.
        decimals: usize,
    },
    /// Scaled by a suffix: `150k`, `1.5M`.
    Suffix {
        /// What the suffix stands for.
        scale: f64,
        /// The suffix.
        suffix: &'static str,
        /// Decimals of the scaled value.
        decimals: usize,
    },
    /// The values are base-2 logarithms; print the power of two.
    Exp2,
}

impl TickFmt {
    /// The label of tick value `v`.
    pub(crate) fn label(&self, v: f64) -> String {
        match *self {
            // Every label of the axis keeps the same decimals ("5.0", "5.2").
            TickFmt::Fixed(d) => clean(format!("{v:.d$}")),
            TickFmt::Sci { exp, decimals } => {
                let m = v / 10f64.powi(exp);
                if m.abs() < 0.5 * 10f64.powi(-(decimals as i32)) {
                    "0".into()
                } else {
                    format!("{}e{exp}", clean(format!("{m:.decimals$}")))
                }
            }
            TickFmt::Suffix {
                scale,
                suffix,
                decimals,
            } => {
                let s = clean(format!("{:.decimals$}", v / scale));
                if s == "0" { s } else { format!("{s}{suffix}") }
            }
            TickFmt::Exp2 => {
                let q = v.exp2();
                if q >= 1.0 {
                    super::plots::fmt_num(q.round())
                } else {
                    super::plots::fmt_num(q)
                }
            }
        }
    }
}

/// `-0` and `-0.00` lose their sign.
fn clean(s: String) -> String {
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// Decimals needed to print multiples of `step` exactly (up to 12).
fn decimals_of(step: f64) -> usize {
    (0..=12)
        .find(|&d| {
            let x = step * 10f64.powi(d);
            (x - x.round()).abs() <= 1e-6 * x.abs().max(1.0)
        })
        .unwrap_or(12) as usize
}

/// Ticks of a linear axis over `[lo, hi]`: the major ticks (labelled), the minor ones (grid
/// only) and the label format.
/// With `integer`, ticks fall on whole numbers only (for counts).
pub(crate) fn linear(lo: f64, hi: f64, integer: bool) -> (Vec<f64>, Vec<f64>, TickFmt) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = if integer {
        (span / 6.0).max(1.0)
    } else {
        span / 6.0
    };
    let mag = 10f64.powf(raw.log10().floor());
    // The candidate nearest the ideal step (on a log scale): five to nine ticks.
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
        .unwrap_or(mag);
    let ticks = |step: f64| -> Vec<f64> {
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        (first..=last).map(|i| i as f64 * step).collect()
    };
    let bold = ticks(step);
    let light = if integer && step <= 1.0 {
        Vec::new()
    } else {
        ticks(step / 5.0)
    };

    let top = bold
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(hi.abs().min(lo.abs()));
    let fmt = if top >= 1e4 {
        let (scale, suffix) = if top >= 1e9 {
            (1e9, "G")
        } else if top >= 1e6 {
            (1e6, "M")
        } else {
            (1e3, "k")
        };
        TickFmt::Suffix {
            scale,
            suffix,
            decimals: decimals_of(step / scale),
        }
    } else if step < 1e-3 {
        let exp = top.log10().floor() as i32;
        TickFmt::Sci {
            exp,
            decimals: decimals_of(step / 10f64.powi(exp)),
        }
    } else {
        TickFmt::Fixed(decimals_of(step))
    };
    (bold, light, fmt)
}

/// Ticks of an axis of base-2 logarithms: whole exponents, thinned to at most seven.
pub(crate) fn exp2(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>, TickFmt) {
    let first = lo.ceil() as i64;
    let last = hi.floor() as i64;
    let n = (last - first + 1).max(1);
    let stride = (n + 6) / 7;
    let bold: Vec<f64> = (first..=last)
        .filter(|k| (k - first) % stride == 0)
        .map(|k| k as f64)
        .collect();
    let light = if stride == 1 {
        Vec::new()
    } else {
        (first..=last).map(|k| k as f64).collect()
    };
    (bold, light, TickFmt::Exp2)
}

/// A linear f64 axis whose ticks are given: `bold` are labelled, `light` only draw grid lines.
/// (Plotters' own `WithKeyPoints` has no default value formatting, which the mesh needs.)
pub(crate) struct TickedAxis {
    inner: RangedCoordf64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl TickedAxis {
    /// The axis over `lo..hi` with the given ticks.
    pub(crate) fn new(lo: f64, hi: f64, bold: Vec<f64>, light: Vec<f64>) -> Self {
        Self {
            inner: (lo..hi).into(),
            bold,
            light,
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

#[cfg(test)]
mod tests {
    use super::{TickFmt, exp2, linear};

    fn labels(lo: f64, hi: f64) -> Vec<String> {
        let (bold, _, fmt) = linear(lo, hi, false);
        bold.iter().map(|v| fmt.label(*v)).collect()
    }

    #[test]
    fn linear_ticks_cover_the_range_with_distinct_labels() {
        assert_eq!(
            labels(4.864, 5.536),
            ["4.9", "5.0", "5.1", "5.2", "5.3", "5.4", "5.5"]
        );
        assert_eq!(
            labels(0.0, 6e-4),
            ["0", "1e-4", "2e-4", "3e-4", "4e-4", "5e-4", "6e-4"]
        );
        assert_eq!(
            labels(0.0, 160_000.0),
            ["0", "25k", "50k", "75k", "100k", "125k", "150k"]
        );
        let narrow = labels(1.2301, 1.2309);
        assert!(narrow.len() >= 3, "{narrow:?}");
        let mut dedup = narrow.clone();
        dedup.dedup();
        assert_eq!(dedup, narrow, "labels must differ");
        let (counts, _, fmt) = linear(-0.2, 3.2, true);
        assert_eq!(counts, [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(fmt, TickFmt::Fixed(0));
        assert_eq!(
            labels(-1.0, 1.0),
            [
                "-1.00", "-0.75", "-0.50", "-0.25", "0.00", "0.25", "0.50", "0.75", "1.00"
            ]
        );
    }

    #[test]
    fn exp2_ticks_are_powers_of_two() {
        let (bold, _, fmt) = exp2(12.4, 16.6);
        let l: Vec<String> = bold.iter().map(|v| fmt.label(*v)).collect();
        assert_eq!(l, ["8192", "16.38k", "32.77k", "65.54k"]);
        assert_eq!(fmt, TickFmt::Exp2);
        assert!(exp2(0.0, 40.0).0.len() <= 7);
    }
}
