//! SVG plots of anomaly scores, drawn with plotters' SVG backend.
//!
//! Text needs no font file: without plotters' `ttf`/`ab_glyph` features it falls back to its
//! built-in "naive" font, which only *estimates* text extents (about 0.7 em per character) for
//! layout, and the SVG backend writes every label as an SVG `<text>` element that the viewer
//! renders with its own fonts. To keep layout independent of those estimates, label areas have
//! fixed sizes rather than being fitted to measured text.
//!
//! Each plot is rendered to memory first and then written to `<path>.tmp` and renamed, so a
//! failure never leaves a half-written or stray file behind.

use std::fs;
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, DefaultFormatting, KeyPointHint, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

const SIZE: (u32, u32) = (800, 560);
const NORMAL_COLOUR: RGBColor = RGBColor(31, 119, 180);
const ANOMALOUS_COLOUR: RGBColor = RGBColor(214, 39, 40);
/// Colours for ROC series, cycled (matplotlib's "tab10", readable on white).
const SERIES_COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Overlaid histograms of normal vs anomalous scores (two colours, semi-transparent, legend
/// "normal"/"anomalous", x label "anomaly score", y "count", title given).
///
/// The `bins` equal-width bins span [min, max] of *all* scores: unlike the original, which
/// clipped at a percentile, outliers stay visible. With `log_x` the bins are equal-width in
/// `log10(1 + score - min)`, which spreads out the bulk near the minimum when a few scores are
/// huge; tick labels still show raw scores. If all scores are equal a single bin is drawn.
pub fn histogram_svg(
    path: &Path,
    title: &str,
    normal: &[f64],
    anomalous: &[f64],
    axes: &HistogramAxes,
) -> Result<()> {
    let svg = render_histogram(title, normal, anomalous, axes)
        .with_context(|| format!("histogram plot {}", path.display()))?;
    write_atomically(path, &svg)
}

/// How a histogram bins and draws: `bins` bins, scores on a log axis (`log_x`), counts
/// on a log axis (`log_count`: the few anomalies a near-perfect detector misses stay
/// visible next to thousands of correct ones).
#[derive(Clone, Copy, Debug)]
pub struct HistogramAxes {
    pub bins: usize,
    pub log_x: bool,
    pub log_count: bool,
}

/// The count axis: plotting coordinate `1 + log10(count)` (0 for none) when `log`.
#[derive(Clone, Copy)]
struct CountScale {
    log: bool,
}

impl CountScale {
    fn to_plot(self, count: u64) -> f64 {
        match (self.log, count) {
            (true, 0) => 0.0,
            (true, c) => 1.0 + (c as f64).log10(),
            (false, c) => c as f64,
        }
    }

    /// Ticks up to `top` (plotting coordinate) as (position, count label).
    fn ticks(self, top: f64) -> Vec<(f64, u64)> {
        if self.log {
            (0..=top.floor() as u32)
                .map(|k| (f64::from(k), if k == 0 { 0 } else { 10u64.pow(k - 1) }))
                .collect()
        } else {
            multiples(0.0, top, nice_step(top.max(1.0), 6.0).max(1.0))
                .map(|c| (c, c as u64))
                .collect()
        }
    }
}

/// ROC curve(s): one line per `(label, points)` series (e.g. "all (AUROC 0.998)",
/// "layer 1 ..."), a thin grey diagonal for chance, axes FPR/TPR in [0, 1]. Curves are drawn
/// as given; [`crate::eval::metrics::roc_curve`] produces them.
pub fn roc_svg(path: &Path, title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let svg = render_roc(title, curves).with_context(|| format!("ROC plot {}", path.display()))?;
    write_atomically(path, &svg)
}

/// A grid of AUROCs (`values[row][col]`, None for a failed or missing cell) as coloured
/// cells with their values: 0.5 (chance) white, 1.0 deep blue, below chance red.
pub fn heatmap_svg(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
) -> Result<()> {
    if rows.is_empty() || cols.is_empty() || values.len() != rows.len() {
        bail!(
            "heatmap {}: needs rows and columns of values",
            path.display()
        );
    }
    let (label_w, label_h, cell_w, cell_h) = (200u32, 60u32, 130u32, 40u32);
    let size = (
        label_w + cell_w * cols.len() as u32 + 20,
        label_h + cell_h * rows.len() as u32 + 20,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let text = |s: &str, x: u32, y: u32, size: u32| {
            Text::new(
                s.to_string(),
                (x as i32, y as i32),
                ("sans-serif", size).into_font(),
            )
        };
        root.draw(&text(title, 10, 8, 18)).map_err(draw_err)?;
        for (j, c) in cols.iter().enumerate() {
            let x = label_w + cell_w * j as u32 + 6;
            root.draw(&text(c, x, label_h - 22, 14)).map_err(draw_err)?;
        }
        for (i, (r, row)) in rows.iter().zip(values).enumerate() {
            let y = label_h + cell_h * i as u32;
            root.draw(&text(r, 10, y + 12, 14)).map_err(draw_err)?;
            for (j, v) in row.iter().enumerate().take(cols.len()) {
                let x = label_w + cell_w * j as u32;
                let colour = match v {
                    None => RGBColor(200, 200, 200),
                    Some(v) => {
                        // White at chance, towards blue (better) or red (worse).
                        let t = ((v - 0.5) * 2.0).clamp(-1.0, 1.0);
                        let fade = |c: u8| (255.0 - (255.0 - c as f64) * t.abs()) as u8;
                        let target = if t >= 0.0 {
                            (8, 69, 148)
                        } else {
                            (203, 24, 29)
                        };
                        RGBColor(fade(target.0), fade(target.1), fade(target.2))
                    }
                };
                let corners = [
                    (x as i32, y as i32),
                    ((x + cell_w - 2) as i32, (y + cell_h - 2) as i32),
                ];
                root.draw(&Rectangle::new(corners, colour.filled()))
                    .map_err(draw_err)?;
                let label = v.map_or("failed".to_string(), |v| format!("{v:.4}"));
                let ink = if v.is_some_and(|v| v > 0.8) {
                    WHITE
                } else {
                    BLACK
                };
                let at = ((x + 30) as i32, (y + 12) as i32);
                let font = ("sans-serif", 14).into_font().color(&ink);
                root.draw(&Text::new(label, at, font)).map_err(draw_err)?;
            }
        }
        root.present().map_err(draw_err)?;
    }
    write_atomically(path, &svg)
}

/// The x transform: plotting coordinate `log10(1 + score - min)` when `log_x`, else the score.
#[derive(Clone, Copy)]
struct XScale {
    log_x: bool,
    min: f64,
}

impl XScale {
    fn to_plot(self, score: f64) -> f64 {
        if self.log_x {
            (1.0 + score - self.min).log10()
        } else {
            score
        }
    }

    fn to_score(self, x: f64) -> f64 {
        if self.log_x {
            self.min + 10f64.powf(x) - 1.0
        } else {
            x
        }
    }
}

/// Bin edges (in plotting coordinates) and per-class counts.
struct Binned {
    scale: XScale,
    lo: f64,
    width: f64,
    normal: Vec<u64>,
    anomalous: Vec<u64>,
}

impl Binned {
    fn hi(&self) -> f64 {
        self.lo + self.width * self.normal.len() as f64
    }
}

fn bin_scores(normal: &[f64], anomalous: &[f64], bins: usize, log_x: bool) -> Result<Binned> {
    if bins == 0 {
        bail!("need at least one bin");
    }
    let all = || normal.iter().chain(anomalous).copied();
    if normal.is_empty() && anomalous.is_empty() {
        bail!("no scores to plot");
    }
    let bad = all().filter(|s| !s.is_finite()).count();
    if bad > 0 {
        bail!("{bad} score(s) are NaN or infinite; cannot place them in a bin");
    }
    let min = all().fold(f64::INFINITY, f64::min);
    let scale = XScale { log_x, min };
    let (lo, hi) = all()
        .map(|s| scale.to_plot(s))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    if !(hi - lo).is_finite() {
        bail!("scores span [{lo}, {hi}], too wide a range to bin");
    }
    let (lo, bins, width) = if hi > lo {
        (lo, bins, (hi - lo) / bins as f64)
    } else {
        // All equal: one bin centred on the value, wide enough to be seen.
        let half = if lo == 0.0 { 0.5 } else { lo.abs() * 0.05 };
        (lo - half, 1, 2.0 * half)
    };
    let count = |scores: &[f64]| {
        let mut counts = vec![0u64; bins];
        for &s in scores {
            // The maximum lands on the upper edge; numpy puts it in the last bin, and so do we.
            let k = (((scale.to_plot(s) - lo) / width) as usize).min(bins - 1);
            counts[k] += 1;
        }
        counts
    };
    Ok(Binned {
        scale,
        lo,
        width,
        normal: count(normal),
        anomalous: count(anomalous),
    })
}

/// The smallest step of the form {1, 2, 5} x 10^k that cuts `span` into at most `max_parts`.
fn nice_step(span: f64, max_parts: f64) -> f64 {
    let raw = span / max_parts;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * mag)
}

/// Multiples of `step` in [lo, hi].
fn multiples(lo: f64, hi: f64, step: f64) -> impl Iterator<Item = f64> {
    ((lo / step).ceil() as i64..=(hi / step).floor() as i64).map(move |j| j as f64 * step)
}

/// Ticks at round *scores*, as `(plotting coordinate, score)` pairs sorted by position.
///
/// Linear: multiples of one round step. Log: candidates from roundest to least round (0, then
/// ±{1, 2, 5} x 10^k, then multiples of ever finer round steps), each kept only if it does not
/// crowd a tick already kept. That gives the familiar 1, 2, 5, 10, 20, ... of a log axis
/// (plotters would put ticks at round *log* values) and still labels narrow or negative spans.
fn x_ticks(scale: XScale, lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let (s_lo, s_hi) = (scale.to_score(lo), scale.to_score(hi));
    let span = s_hi - s_lo;
    if !scale.log_x {
        return multiples(s_lo, s_hi, nice_step(span, 8.0))
            .map(|s| (s, s))
            .collect();
    }
    let round_numbers = |k_top: i32, decades: i32| {
        (0..decades).flat_map(move |d| [1.0, 5.0, 2.0].map(|m| m * 10f64.powi(k_top - d)))
    };
    let k_top = s_lo.abs().max(s_hi.abs()).log10().ceil() as i32;
    let powers = round_numbers(k_top, 16).flat_map(|v| [v, -v]);
    // Steps fine enough to add ticks, coarse enough that they stay round (<= 25 per span).
    let steps = round_numbers(span.log10().ceil() as i32, 3).filter(|&step| {
        let parts = span / step;
        (1.0..=25.0).contains(&parts)
    });
    let candidates = std::iter::once(0.0)
        .chain(powers)
        .chain(steps.flat_map(|step| multiples(s_lo, s_hi, step)));

    let mut ticks: Vec<(f64, f64)> = Vec::new();
    for s in candidates.filter(|s| (s_lo..=s_hi).contains(s)) {
        let x = scale.to_plot(s);
        if ticks.iter().all(|(t, _)| (t - x).abs() >= (hi - lo) / 10.0) {
            ticks.push((x, s));
        }
    }
    ticks.sort_by(|a, b| a.0.total_cmp(&b.0));
    ticks
}

/// A linear f64 axis with ticks we choose. plotters' `with_key_points` would do, but its
/// wrapper keeps `RangedCoordf64`'s "no default formatting", which `configure_mesh` rejects.
struct TickedAxis {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Only the bold grid: light lines between irregular log ticks would only add clutter.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

fn render_histogram(
    title: &str,
    normal: &[f64],
    anomalous: &[f64],
    axes: &HistogramAxes,
) -> Result<String> {
    let b = bin_scores(normal, anomalous, axes.bins, axes.log_x)?;
    let scale = b.scale;
    let counts = CountScale {
        log: axes.log_count,
    };
    let (lo, hi) = (b.lo, b.hi());
    let y_max = b
        .normal
        .iter()
        .chain(&b.anomalous)
        .copied()
        .max()
        .unwrap_or(0);
    // 20 % headroom keeps the legend off the tallest bars.
    let y_top = counts.to_plot(y_max) * 1.2 + 1.0;
    let x_desc = if axes.log_x {
        "anomaly score (log10(1 + score - min) scale)"
    } else {
        "anomaly score"
    };
    let y_desc = if axes.log_count {
        "count (log scale)"
    } else {
        "count"
    };

    let ticks = x_ticks(scale, lo, hi);
    let y_ticks = counts.ticks(y_top);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                TickedAxis {
                    inner: (lo..hi).into(),
                    ticks: ticks.iter().map(|&(x, _)| x).collect(),
                },
                TickedAxis {
                    inner: (0.0..y_top).into(),
                    ticks: y_ticks.iter().map(|&(y, _)| y).collect(),
                },
            )
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .axis_desc_style(("sans-serif", 15))
            .x_label_formatter(&|&x| {
                // Label with the exact round score, not one recomputed through the transform
                // (which would print 0 as 7.1e-15).
                let tick = ticks.iter().find(|&&(t, _)| t == x);
                format_tick(tick.map_or(scale.to_score(x), |&(_, s)| s))
            })
            // Whole counts only.
            .y_label_formatter(&|&y| {
                let tick = y_ticks.iter().find(|&&(t, _)| t == y);
                tick.map_or(String::new(), |&(_, c)| c.to_string())
            })
            .draw()
            .map_err(draw_err)?;

        for (label, colour, bins) in [
            ("normal", NORMAL_COLOUR, &b.normal),
            ("anomalous", ANOMALOUS_COLOUR, &b.anomalous),
        ] {
            let width = b.width;
            let bars = bins
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(move |(k, &c)| {
                    let x0 = lo + width * k as f64;
                    let top = counts.to_plot(c);
                    Rectangle::new([(x0, 0.0), (x0 + width, top)], colour.mix(0.45).filled())
                });
            chart
                .draw_series(bars)
                .map_err(draw_err)?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], colour.mix(0.45).filled())
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// The smallest false positive rate the log-scale ROC shows (points below sit on it).
pub const LOG_FPR_MIN: f64 = 1e-4;

/// `roc_svg` with the false positive rate on a log scale from [`LOG_FPR_MIN`] to 1: the
/// low-FPR end, where detectors at AUROC ≥ 0.99 differ, gets most of the width.
pub fn roc_log_svg(path: &Path, title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let svg =
        render_roc_log(title, curves).with_context(|| format!("ROC plot {}", path.display()))?;
    write_atomically(path, &svg)
}

fn check_curves(curves: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    if curves.is_empty() {
        bail!("no ROC curves to plot");
    }
    for (label, points) in curves {
        if let Some(p) = points
            .iter()
            .find(|(x, y)| !x.is_finite() || !y.is_finite())
        {
            bail!("ROC curve {label:?} has a non-finite point {p:?}");
        }
    }
    Ok(())
}

fn render_roc(title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    check_curves(curves)?;
    let mut svg = String::new();
    draw_roc(&mut svg, title, 0.0..1.0, curves, &|v| format!("{v:.1}"))?;
    Ok(svg)
}

fn render_roc_log(title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    check_curves(curves)?;
    let clamped: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(label, points)| {
            let points = points
                .iter()
                .map(|&(x, y)| (x.max(LOG_FPR_MIN), y))
                .collect();
            (label.clone(), points)
        })
        .collect();
    let mut svg = String::new();
    let x = (LOG_FPR_MIN..1.0).log_scale();
    draw_roc(&mut svg, title, x, &clamped, &|v| format_tick(*v))?;
    Ok(svg)
}

/// The ROC chart on any x axis over [0, 1] (linear or log).
fn draw_roc<X>(
    svg: &mut String,
    title: &str,
    x: X,
    curves: &[(String, Vec<(f64, f64)>)],
    x_label: &dyn Fn(&f64) -> String,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, 0.0..1.0)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(x_label)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(draw_err)?;
    let grey = RGBColor(150, 150, 150);
    // The chance diagonal, sampled so that it is a diagonal on a log axis too.
    let chance = (0..=100).map(|i| {
        let v = 10f64.powf(-4.0 + 4.0 * i as f64 / 100.0);
        (v, v)
    });
    chart
        .draw_series(LineSeries::new(
            std::iter::once((0.0, 0.0)).chain(chance),
            grey.stroke_width(1),
        ))
        .map_err(draw_err)?
        .label("chance")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], grey));
    for (i, (label, points)) in curves.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// One legend style for both plots, boxed and half-opaque so it stays readable over data.
fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(draw_err)
}

/// Compact tick text: plain decimals for ordinary magnitudes, scientific otherwise.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        // "1.50e6" -> "1.5e6": round ticks need no trailing zeros.
        let s = format!("{v:.2e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exp}")
    } else {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".into()
        } else {
            s.into()
        }
    }
}

/// plotters' error types are generic over the backend; callers only need the message.
fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// Writes `contents` to `path` via a sibling temp file and a rename, so readers never see a
/// partial SVG and a failure (write or rename) removes the temp file again.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("svg.tmp");
    let result = fs::write(&tmp, contents)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("saving plot {}", path.display()))
}
