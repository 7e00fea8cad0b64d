//! The report's plots, drawn as SVG text by `plotters`. Every plot is drawn even when the log has
//! no data for it (it then says so), so a page always has the same plots in the same places.

use std::ops::Range;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::log::RunLog;
use super::ticks::{self, TickFmt};
use super::{PLOT_TITLES, ReportError};

/// Plot size in pixels (two fit side by side on a 1200 px wide page).
const SIZE: (u32, u32) = (580, 320);
/// Most points drawn per series; longer series keep each bucket's minimum and maximum.
const MAX_POINTS: usize = 1600;

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE_: RGBColor = RGBColor(148, 103, 189);
const BROWN_: RGBColor = RGBColor(140, 86, 75);
const GREY_: RGBColor = RGBColor(110, 110, 110);

/// One drawn plot.
pub(crate) struct Plot {
    /// Title, also the SVG's caption.
    pub title: &'static str,
    /// The `<svg>` element.
    pub svg: String,
    /// A line shown under the plot (what is missing, or a count worth knowing).
    pub note: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Line,
    Markers,
    LineMarkers,
}

struct Series {
    label: String,
    /// Runs of consecutive finite points; a missing value breaks the line.
    segments: Vec<Vec<(i64, f64)>>,
    color: RGBColor,
    kind: Kind,
}

struct Spec {
    title: &'static str,
    y_desc: String,
    /// Log axis (powers of ten) for values spanning decades.
    log_y: bool,
    /// The values are log2 of the quantity; ticks are labelled with 2^v (for powers of two such
    /// as the loss scale, where a plain log axis would label no tick between decades).
    y_exp2: bool,
    /// Whole-number ticks (counts).
    y_integer: bool,
    series: Vec<Series>,
    note: Option<String>,
}

fn step_x(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

/// Splits `(step, value)` pairs into runs of finite values.
fn segments(points: impl IntoIterator<Item = (u64, Option<f64>)>) -> Vec<Vec<(i64, f64)>> {
    let mut out: Vec<Vec<(i64, f64)>> = vec![Vec::new()];
    for (s, v) in points {
        match v.filter(|v| v.is_finite()) {
            Some(v) => out.last_mut().map_or((), |seg| seg.push((step_x(s), v))),
            None if out.last().is_some_and(|seg| !seg.is_empty()) => out.push(Vec::new()),
            None => {}
        }
    }
    out.retain(|seg| !seg.is_empty());
    out
}

/// Keeps at most about `MAX_POINTS` points: each bucket of consecutive points keeps its minimum
/// and maximum, in step order, so spikes survive.
fn thin(segs: Vec<Vec<(i64, f64)>>) -> Vec<Vec<(i64, f64)>> {
    let total: usize = segs.iter().map(Vec::len).sum();
    if total <= MAX_POINTS {
        return segs;
    }
    let bucket = total.div_ceil(MAX_POINTS / 2);
    segs.into_iter()
        .map(|seg| {
            let mut out = Vec::with_capacity(2 * seg.len() / bucket + 2);
            for chunk in seg.chunks(bucket) {
                let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1));
                let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1));
                if let (Some(&lo), Some(&hi)) = (lo, hi) {
                    if lo.0 <= hi.0 {
                        out.push(lo);
                        if hi != lo {
                            out.push(hi);
                        }
                    } else {
                        out.push(hi);
                        out.push(lo);
                    }
                }
            }
            out
        })
        .collect()
}

fn series(label: &str, segs: Vec<Vec<(i64, f64)>>, color: RGBColor, kind: Kind) -> Series {
    Series {
        label: label.to_string(),
        segments: thin(segs),
        color,
        kind,
    }
}

/// Compact tick label: 0, 0.125, 2.5, 1000, 12.3k, 4.5M, 3e-4.
pub(crate) fn fmt_num(v: f64) -> String {
    fn trim(s: String) -> String {
        if s.contains('.') && !s.contains('e') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
    let a = v.abs();
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    if !(1e-3..1e12).contains(&a) {
        let s = format!("{v:.2e}");
        // 3.00e-4 -> 3e-4, 1.50e12 -> 1.5e12
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim(m.to_string())),
            None => s,
        };
    }
    // Below 10 000 plain digits read fine; above, a suffix keeps labels short.
    for (threshold, scale, suffix) in [(1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")] {
        if a >= threshold {
            let scaled = v / scale;
            return format!("{}{suffix}", trim(format!("{scaled:.2}")));
        }
    }
    trim(format!("{v:.3}"))
}

/// Value range of the series, padded; positive values only on a log axis.
fn y_range(spec: &Spec) -> Option<(f64, f64)> {
    let vals = spec
        .series
        .iter()
        .flat_map(|s| s.segments.iter().flatten().map(|p| p.1))
        .filter(|v| v.is_finite() && (!spec.log_y || *v > 0.0));
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return None;
    }
    Some(if spec.log_y {
        (lo / 1.5, hi * 1.5)
    } else if lo == hi && lo == 0.0 {
        (0.0, 1.0)
    } else if lo == hi {
        let pad = lo.abs() * 0.1;
        (lo - pad, hi + pad)
    } else {
        let pad = (hi - lo) * 0.06;
        // Keep a non-negative quantity's axis from dipping below zero for the padding's sake.
        let bottom = if lo >= 0.0 {
            (lo - pad).max(0.0)
        } else {
            lo - pad
        };
        (bottom, hi + pad)
    })
}

fn plot_err(title: &str, e: impl std::fmt::Display) -> ReportError {
    ReportError::Plot {
        plot: title.to_string(),
        message: e.to_string(),
    }
}

fn draw_series<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    s: &Series,
    log_y: bool,
) -> Result<(), String>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (i64, f64)>,
{
    let color = s.color;
    let visible = |p: &&(i64, f64)| !log_y || p.1 > 0.0;
    let mut labelled = false;
    for seg in &s.segments {
        let pts: Vec<(i64, f64)> = seg.iter().filter(visible).copied().collect();
        if s.kind == Kind::Line && pts.len() == 1 {
            // A lone point between gaps draws no line; show it as a dot.
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        if matches!(s.kind, Kind::Line | Kind::LineMarkers) {
            let ann = chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if !labelled {
                ann.label(s.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
                labelled = true;
            }
        }
        if matches!(s.kind, Kind::Markers | Kind::LineMarkers) {
            let ann = chart
                .draw_series(pts.iter().map(|&p| Cross::new(p, 4, color.stroke_width(2))))
                .map_err(|e| e.to_string())?;
            if !labelled {
                ann.label(s.label.clone())
                    .legend(move |(x, y)| Cross::new((x + 9, y), 4, color.stroke_width(2)));
                labelled = true;
            }
        }
    }
    Ok(())
}

fn draw_into<Y>(
    spec: &Spec,
    x: Range<i64>,
    y: Y,
    fmt: Option<TickFmt>,
    svg: &mut String,
) -> Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let has_data = spec.series.iter().any(|s| !s.segments.is_empty());
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?;
    let y_fmt = |v: &f64| fmt.map_or_else(|| fmt_num(*v), |f| f.label(*v));
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(spec.y_desc.as_str())
        .x_labels(8)
        .y_labels(6)
        .y_label_formatter(&y_fmt)
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for s in &spec.series {
        draw_series(&mut chart, s, spec.log_y)?;
    }
    if spec
        .series
        .iter()
        .filter(|s| !s.segments.is_empty())
        .count()
        > 1
    {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    if !has_data {
        let (w, h) = SIZE;
        root.draw(&Text::new(
            "no data in the log",
            (w as i32 / 2 - 60, h as i32 / 2),
            ("sans-serif", 16).into_font().color(&GREY_),
        ))
        .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn render(spec: Spec, x: Range<i64>) -> Result<Plot, ReportError> {
    let mut svg = String::new();
    let (lo, hi) = y_range(&spec).unwrap_or((0.0, 1.0));
    let result = if spec.log_y {
        // Plotters labels the powers of ten of a log axis well by itself.
        draw_into(&spec, x, (lo..hi).log_scale(), None, &mut svg)
    } else {
        let (bold, light, fmt) = if spec.y_exp2 {
            ticks::exp2(lo, hi)
        } else {
            ticks::linear(lo, hi, spec.y_integer)
        };
        let y = ticks::TickedAxis::new(lo, hi, bold, light);
        draw_into(&spec, x, y, Some(fmt), &mut svg)
    };
    result.map_err(|e| plot_err(spec.title, e))?;
    Ok(Plot {
        title: spec.title,
        svg,
        note: spec.note,
    })
}

/// Whether positive values spread over at least `ratio`, so a log axis reads better.
fn wide_positive(values: impl Iterator<Item = f64>, ratio: f64) -> bool {
    let mut lo = f64::INFINITY;
    let mut hi = 0.0f64;
    for v in values.filter(|v| v.is_finite()) {
        if v <= 0.0 {
            return false;
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    hi > 0.0 && hi / lo >= ratio
}

fn missing(field: &str) -> Option<String> {
    Some(format!("no data: no step line has a \"{field}\" value"))
}

/// Draws every plot of [`PLOT_TITLES`], in that order.
pub(crate) fn all_plots(log: &RunLog) -> Result<Vec<Plot>, ReportError> {
    let steps = &log.steps;
    let (lo, hi) = steps.iter().fold((u64::MAX, 0), |(lo, hi), s| {
        (lo.min(s.step), hi.max(s.step))
    });
    let (lo, hi) = (step_x(lo), step_x(hi));
    let x = if lo >= hi {
        lo.saturating_sub(1)..hi.saturating_add(1)
    } else {
        lo..hi
    };
    let seg =
        |f: fn(&super::StepRecord) -> Option<f64>| segments(steps.iter().map(|s| (s.step, f(s))));
    let empty_note = |segs: &Vec<Vec<(i64, f64)>>, field: &str| {
        if segs.is_empty() {
            missing(field)
        } else {
            None
        }
    };

    let loss = seg(|s| s.loss);
    let val: Vec<Vec<(i64, f64)>> = {
        // Validation runs every few steps: draw it as one connected line through its points.
        let pts: Vec<(i64, f64)> = seg(|s| s.val_loss).into_iter().flatten().collect();
        if pts.is_empty() {
            Vec::new()
        } else {
            vec![pts]
        }
    };
    let loss_note = empty_note(&loss, "loss");
    let mut loss_series = vec![series("train loss", loss, BLUE_, Kind::Line)];
    if !val.is_empty() {
        loss_series.push(series("val loss", val, ORANGE_, Kind::LineMarkers));
    }

    let lr = seg(|s| s.lr);
    let tok = seg(|s| s.tok_s);

    let scale = seg(|s| s.loss_scale);
    let skipped_at: Vec<(i64, f64)> = steps
        .iter()
        .filter(|s| s.skipped == Some(true))
        .filter_map(|s| {
            s.loss_scale
                .filter(|v| v.is_finite())
                .map(|v| (step_x(s.step), v))
        })
        .collect();
    let scale_note = empty_note(&scale, "loss_scale");
    let scale_exp2 = wide_positive(scale.iter().flatten().map(|p| p.1), 4.0);
    let log2 = |segs: Vec<Vec<(i64, f64)>>| -> Vec<Vec<(i64, f64)>> {
        if scale_exp2 {
            segs.into_iter()
                .map(|seg| seg.into_iter().map(|(x, y)| (x, y.log2())).collect())
                .collect()
        } else {
            segs
        }
    };
    let mut scale_series = vec![series("loss scale", log2(scale), PURPLE_, Kind::Line)];
    if !skipped_at.is_empty() {
        scale_series.push(series(
            "skipped step",
            log2(vec![skipped_at]),
            RED_,
            Kind::Markers,
        ));
    }

    let n_skipped = steps.iter().filter(|s| s.skipped == Some(true)).count();
    let has_skip_field = steps.iter().any(|s| s.skipped.is_some());
    let mut cumulative = 0u64;
    let mut cum_pts = Vec::with_capacity(steps.len());
    let mut skip_marks = Vec::new();
    for s in steps {
        if s.skipped == Some(true) {
            cumulative += 1;
            skip_marks.push((step_x(s.step), cumulative as f64));
        }
        if s.skipped.is_some() {
            cum_pts.push((step_x(s.step), cumulative as f64));
        }
    }
    let mut skip_series = vec![series(
        "skipped so far",
        if cum_pts.is_empty() {
            Vec::new()
        } else {
            vec![cum_pts]
        },
        GREY_,
        Kind::Line,
    )];
    if !skip_marks.is_empty() {
        skip_series.push(series(
            "skipped step",
            vec![skip_marks],
            RED_,
            Kind::Markers,
        ));
    }
    let skip_note = if has_skip_field {
        Some(format!(
            "{n_skipped} of {} logged steps skipped (inf/nan gradients)",
            steps.iter().filter(|s| s.skipped.is_some()).count()
        ))
    } else {
        missing("skipped")
    };

    let gn = seg(|s| s.grad_norm);
    let gn_log = wide_positive(gn.iter().flatten().map(|p| p.1), 1000.0);

    let max_mem = steps
        .iter()
        .filter_map(|s| s.mem_peak_bytes)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (unit, div) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .into_iter()
        .find(|(_, d)| max_mem >= *d as f64)
        .unwrap_or(("bytes", 1));
    let mem = seg(|s| s.mem_peak_bytes)
        .into_iter()
        .map(|seg| seg.into_iter().map(|(x, y)| (x, y / div as f64)).collect())
        .collect::<Vec<Vec<_>>>();

    let specs = [
        Spec {
            title: PLOT_TITLES[0],
            y_desc: "loss".into(),
            log_y: false,
            y_exp2: false,
            y_integer: false,
            note: loss_note,
            series: loss_series,
        },
        Spec {
            title: PLOT_TITLES[1],
            y_desc: "learning rate".into(),
            log_y: false,
            y_exp2: false,
            y_integer: false,
            note: empty_note(&lr, "lr"),
            series: vec![series("lr", lr, GREEN_, Kind::Line)],
        },
        Spec {
            title: PLOT_TITLES[2],
            y_desc: "tokens / s".into(),
            log_y: false,
            y_exp2: false,
            y_integer: false,
            note: empty_note(&tok, "tok_s"),
            series: vec![series("tok/s", tok, BLUE_, Kind::Line)],
        },
        Spec {
            title: PLOT_TITLES[3],
            y_desc: "loss scale".into(),
            log_y: false,
            y_exp2: scale_exp2,
            y_integer: false,
            note: scale_note,
            series: scale_series,
        },
        Spec {
            title: PLOT_TITLES[4],
            y_desc: "skipped steps (cumulative)".into(),
            log_y: false,
            y_exp2: false,
            y_integer: true,
            note: skip_note,
            series: skip_series,
        },
        Spec {
            title: PLOT_TITLES[5],
            y_desc: "gradient norm".into(),
            log_y: gn_log,
            y_exp2: false,
            y_integer: false,
            note: empty_note(&gn, "grad_norm"),
            series: vec![series("grad norm", gn, BROWN_, Kind::Line)],
        },
        Spec {
            title: PLOT_TITLES[6],
            y_desc: format!("peak memory ({unit})"),
            log_y: false,
            y_exp2: false,
            y_integer: false,
            note: empty_note(&mem, "mem_peak_bytes"),
            series: vec![series("peak memory", mem, ORANGE_, Kind::Line)],
        },
    ];
    specs.into_iter().map(|s| render(s, x.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::{fmt_num, segments, thin};

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.125), "0.125");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(1000.0), "1000");
        assert_eq!(fmt_num(65536.0), "65.54k");
        assert_eq!(fmt_num(3e-4), "3e-4");
        assert_eq!(fmt_num(-1.5e6), "-1.5M");
    }

    #[test]
    fn missing_values_break_lines_and_long_series_are_thinned() {
        let segs = segments([
            (0, Some(1.0)),
            (1, None),
            (2, Some(f64::NAN)),
            (3, Some(2.0)),
        ]);
        assert_eq!(segs, vec![vec![(0, 1.0)], vec![(3, 2.0)]]);
        let long: Vec<(i64, f64)> = (0..10_000).map(|i| (i, (i % 97) as f64)).collect();
        let thinned = thin(vec![long]);
        let n = thinned[0].len();
        assert!(n <= super::MAX_POINTS + 2, "{n} points kept");
        assert!(
            thinned[0].iter().any(|p| p.1 == 96.0),
            "maxima survive thinning"
        );
        assert!(
            thinned[0].windows(2).all(|w| w[0].0 <= w[1].0),
            "step order kept"
        );
    }
}
