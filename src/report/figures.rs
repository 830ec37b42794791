//! The figures, each as PNG and SVG, drawn with plotters from a [`ReproduceSummary`]:
//!
//! - `fig1a_accuracy`: test accuracy of the BN and plain nets over training (Figure 1(a),
//!   y from 0.8 to 1 as the source draws it), with PyTorch's anchor points;
//! - `fig1a_lead`: BN's lead over plain at each evaluation, on a logarithmic step axis, where
//!   the early steps (a sliver of Figure 1(a), where the curves cross) can be read;
//! - `fig1b_input_means`: the post's view of Figure 1(b,c): the test-set mean of the
//!   sigmoid's input for five units of the second layer, without and with BN;
//! - `fig1c_input_percentiles`: the paper's view: their 15th, 50th and 85th percentiles;
//! - `test_time_predictions`: one-by-one predictions of the first 100 test images per class,
//!   with batch and with population statistics;
//! - `estimators`: test accuracy of each population-statistics estimator over the seeds.
//!
//! PNG text is rendered with DejaVu Sans, embedded in the binary (assets/, with its license)
//! and registered with plotters under the family name `DejaVu Sans, sans-serif`, which SVG
//! viewers read as CSS (DejaVu Sans where installed, else their own sans-serif).

use super::{Curve, ReportError, ReproduceSummary};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::fmt::Display;
use std::path::Path;

/// DejaVu Sans 2.37 (Bitstream Vera license: assets/DejaVuSans-LICENSE.txt).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The family the font is registered under; SVG writes it as CSS, so viewers fall back to
/// their own sans-serif when DejaVu Sans is not installed.
const FONT: &str = "DejaVu Sans, sans-serif";
/// matplotlib's first two default colors, as the source's figures use them.
const PLAIN: RGBColor = RGBColor(31, 119, 180);
const BN: RGBColor = RGBColor(255, 127, 14);
const GRID: RGBColor = RGBColor(225, 225, 225);
const INK: RGBColor = RGBColor(40, 40, 40);

pub const FIG1A: &str = "fig1a_accuracy";
pub const FIG1A_LEAD: &str = "fig1a_lead";
pub const FIG1B: &str = "fig1b_input_means";
pub const FIG1C: &str = "fig1c_input_percentiles";
pub const TEST_TIME: &str = "test_time_predictions";
pub const ESTIMATORS: &str = "estimators";

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Registers the embedded font with plotters (once per process).
pub fn register_fonts() -> Result<(), ReportError> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "DejaVuSans.ttf is not a valid TrueType font".to_string())
        })
        .clone()
        .map_err(ReportError::Font)
}

fn plot_error(path: &Path, e: impl Display) -> ReportError {
    ReportError::Plot { path: path.to_path_buf(), reason: e.to_string() }
}

/// Draws `$draw(&root, args…)` once on a PNG and once on an SVG named `$stem` in `$dir`,
/// each through [`atomically`]; evaluates to the two file names.
macro_rules! render {
    ($dir:expr, $stem:expr, $size:expr, $draw:path $(, $arg:expr)*) => {{
        let png = $dir.join(format!("{}.png", $stem));
        atomically(&png, |tmp| {
            let root = BitMapBackend::new(tmp, $size).into_drawing_area();
            $draw(&root $(, $arg)*).map_err(|e| plot_error(&png, e))?;
            root.present().map_err(|e| plot_error(&png, e))
        })?;
        let svg = $dir.join(format!("{}.svg", $stem));
        atomically(&svg, |tmp| {
            let root = SVGBackend::new(tmp, $size).into_drawing_area();
            $draw(&root $(, $arg)*).map_err(|e| plot_error(&svg, e))?;
            root.present().map_err(|e| plot_error(&svg, e))
        })?;
        vec![format!("{}.png", $stem), format!("{}.svg", $stem)]
    }};
}

/// Has `draw` write the figure to a fresh temporary sibling of `path`, then renames it into
/// place, so that `path` is never seen half-drawn (a viewer open on a rerendered report, an
/// error midway through a figure): it holds the old figure or the new one, whole. The
/// temporary name keeps the extension, which tells plotters the image format.
fn atomically(path: &Path, draw: impl FnOnce(&Path) -> Result<(), ReportError>) -> Result<(), ReportError> {
    let fail = |e: std::io::Error| ReportError::Write { path: path.to_path_buf(), reason: e.to_string() };
    crate::atomic_file::refuse_non_regular(path).map_err(fail)?;
    // A second Ctrl-C waits for the figure (and its temporary file's removal or rename).
    let _whole = crate::interrupt::Critical::enter();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "figure".into());
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    // The name is reserved exclusively, as crate::atomic_file does: two writers of one
    // directory (containers sharing a volume are all PID 1) never draw into one file.
    let tmp = loop {
        let tmp = dir.join(format!(".{name}.tmp-{}-{:08x}{extension}", std::process::id(), rand::random::<u32>()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(fail(e)),
            Ok(_) => break tmp,
        }
    };
    let result = draw(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(fail));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Draws every figure into `dir`; returns the file names written.
pub fn draw_all(summary: &ReproduceSummary, dir: &Path) -> Result<Vec<String>, ReportError> {
    register_fonts()?;
    let mut files = Vec::new();
    files.extend(render!(dir, FIG1A, (1000, 620), fig1a, summary));
    files.extend(render!(dir, FIG1A_LEAD, (1000, 520), fig1a_lead, summary));
    let rows = summary.comparison.probe_neurons as u32;
    let grid = (1000, 110 + 220 * rows.max(1));
    files.extend(render!(dir, FIG1B, grid, fig1_inputs, summary, false));
    files.extend(render!(dir, FIG1C, grid, fig1_inputs, summary, true));
    files.extend(render!(dir, TEST_TIME, (1000, 520), test_time, summary));
    let height = 150 + 48 * summary.estimators.rows.len() as u32;
    files.extend(render!(dir, ESTIMATORS, (1000, height), estimators, summary));
    Ok(files)
}

fn centered(style: TextStyle<'_>) -> TextStyle<'_> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    style.pos(Pos::new(HPos::Center, VPos::Center))
}

fn text(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().color(&INK)
}

/// Titles: larger, in the one (regular) face embedded, so that the PNG and the SVG agree.
fn title(size: f64) -> TextStyle<'static> {
    text(size)
}

/// Step labels: 10k, 20k, … when the axis is long.
fn step_label(max: f64) -> impl Fn(&f64) -> String {
    move |v: &f64| {
        if max >= 5000.0 {
            let k = v / 1000.0;
            if k.abs() < 1e-9 {
                "0".to_string()
            } else if (k - k.round()).abs() < 1e-9 {
                format!("{}k", k.round())
            } else {
                format!("{k:.1}k")
            }
        } else if (v - v.round()).abs() < 1e-6 {
            format!("{}", v.round())
        } else {
            // A short axis (a few steps) gets fractional ticks: a step has no fraction.
            String::new()
        }
    }
}

/// `lo..hi` where it is a range plotters can draw (finite, of finite positive width), else
/// -1..1: a hand-edited metrics.json's ±1e308 would make its tick search loop forever.
fn drawable(lo: f64, hi: f64) -> (f64, f64) {
    if lo.is_finite() && hi.is_finite() && lo < hi && (hi - lo).is_finite() { (lo, hi) } else { (-1.0, 1.0) }
}

/// Splits a polyline into the pieces inside y ∈ [lo, hi], cutting segments at the edges, so
/// that points off the chart do not spill over the axes.
fn clip(points: &[(f64, f64)], lo: f64, hi: f64) -> Vec<Vec<(f64, f64)>> {
    let inside = |y: f64| (lo..=hi).contains(&y);
    let cut = |a: (f64, f64), b: (f64, f64), y: f64| {
        let t = (y - a.1) / (b.1 - a.1);
        (a.0 + t * (b.0 - a.0), y)
    };
    let mut pieces = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for (i, &p) in points.iter().enumerate() {
        if i > 0 {
            let a = points[i - 1];
            // Entering or leaving (or crossing) the band between a and p.
            let mut crossings: Vec<(f64, f64)> = [lo, hi]
                .into_iter()
                .filter(|&edge| (a.1 - edge) * (p.1 - edge) < 0.0)
                .map(|edge| cut(a, p, edge))
                .collect();
            crossings.sort_by(|u, v| u.0.total_cmp(&v.0));
            for c in crossings {
                if current.is_empty() {
                    current.push(c);
                } else {
                    current.push(c);
                    pieces.push(std::mem::take(&mut current));
                }
            }
        }
        if inside(p.1) {
            current.push(p);
        } else if !current.is_empty() {
            pieces.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces.into_iter().filter(|piece| !piece.is_empty()).collect()
}

/// A polyline as separate two-point segments. plotters' bitmap backend joins the segments of
/// a wide polyline with unlimited miters, which throws spikes across the chart wherever a
/// noisy curve turns sharply; separate segments have no joins.
fn segments(points: &[(f64, f64)], style: ShapeStyle) -> Vec<PathElement<(f64, f64)>> {
    points.windows(2).map(|w| PathElement::new(vec![w[0], w[1]], style)).collect()
}

/// A filled marker where a line has a single point, which [`segments`] cannot draw; nothing
/// otherwise.
fn lone_point(points: &[(f64, f64)], color: RGBColor) -> Option<Circle<(f64, f64), i32>> {
    match points {
        [only] => Some(Circle::new(*only, 5, color.filled())),
        _ => None,
    }
}

/// The corner of the plot area `x` × `y` whose legend box (a share `width` × `height` of the
/// plot) covers the fewest of `points` (lines sampled densely, bars by their tops): the
/// legend hides as little data as it can. Ties go to the earlier corner in `prefer`.
fn quietest_corner(
    points: &[(f64, f64)], x: std::ops::Range<f64>, y: std::ops::Range<f64>, width: f64, height: f64,
    prefer: &[SeriesLabelPosition],
) -> SeriesLabelPosition {
    let (w, h) = ((x.end - x.start) * width, (y.end - y.start) * height);
    let covered = |corner: &SeriesLabelPosition| {
        let (left, lower) = match corner {
            SeriesLabelPosition::UpperLeft => (true, false),
            SeriesLabelPosition::UpperRight => (false, false),
            SeriesLabelPosition::LowerLeft => (true, true),
            _ => (false, true),
        };
        let xs = if left { x.start..x.start + w } else { x.end - w..x.end };
        let ys = if lower { y.start..y.start + h } else { y.end - h..y.end };
        points.iter().filter(|(px, py)| xs.contains(px) && ys.contains(py)).count()
    };
    prefer.iter().min_by_key(|corner| covered(corner)).cloned().unwrap_or(SeriesLabelPosition::UpperLeft)
}

/// `points` joined by straight lines, sampled at `per_segment` points a segment (for
/// [`quietest_corner`]: a line crosses a corner between its points).
fn along(points: &[(f64, f64)], per_segment: usize) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = points.windows(2).flat_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (0..per_segment).map(move |i| {
            let f = i as f64 / per_segment as f64;
            (x0 + f * (x1 - x0), y0 + f * (y1 - y0))
        })
    }).collect();
    out.extend(points.last());
    out
}

/// The dataset in a caption where it is not the source's MNIST: " on fashion-mnist".
fn other_dataset(s: &ReproduceSummary) -> String {
    if s.dataset == "mnist" { String::new() } else { format!(" on {}", s.dataset) }
}

/// The legend every chart uses, at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult<DB> {
    chart
        .configure_series_labels()
        .position(position)
        .margin(15)
        .label_font(text(16.0))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()
}

/// The accuracy axis: 0.8–1 as in the source, lowered (in steps of 0.05) only when the
/// second half of the curves lies below it.
pub(crate) fn accuracy_floor(curves: &[&Curve]) -> f64 {
    let late_min = curves
        .iter()
        .flat_map(|c| {
            let n = c.history.len();
            c.history[n / 2..].iter().map(|p| p.test_accuracy)
        })
        .fold(1.0f64, f64::min);
    if late_min >= 0.82 { 0.8 } else { ((late_min - 0.02) * 20.0).floor().max(0.0) / 20.0 }
}

fn fig1a<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &ReproduceSummary) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let c = &s.comparison;
    let x_max = c.steps as f64;
    let y_min = accuracy_floor(&[&c.bn, &c.plain]);
    let caption = format!("Figure 1(a): test accuracy, {} with and without BN{}", s.model.widths().iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-"), other_dataset(s));
    let mut chart = ChartBuilder::on(root)
        .caption(caption, title(24.0))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, y_min..1.0f64)?;
    let fmt = step_label(x_max);
    chart
        .configure_mesh()
        .max_light_lines(0)
        .bold_line_style(GRID)
        .x_labels(9)
        .y_labels(((1.0 - y_min) / 0.05).round() as usize + 1)
        .x_label_formatter(&fmt)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .x_desc(format!("training step (batch {}, SGD lr {}){}", s.train.batch_size, s.train.learning_rate, below_the_axis(c, y_min)))
        .y_desc(format!("test accuracy{}", bn_statistics(c, ", BN with ")))
        .label_style(text(15.0))
        .axis_desc_style(text(17.0))
        .draw()?;
    for (curve, color, name) in [(&c.plain, PLAIN, "Without BN"), (&c.bn, BN, "With BN")] {
        let points: Vec<(f64, f64)> = curve.history.iter().map(|p| (p.step as f64, p.test_accuracy)).collect();
        let style = color.stroke_width(2);
        let mut first = true;
        for piece in clip(&points, y_min, 1.0) {
            // A lone point has no segment to draw: a marker shows it (a run of one evaluation).
            chart.draw_series(lone_point(&piece, color))?;
            let series = chart.draw_series(segments(&piece, style))?;
            if std::mem::take(&mut first) {
                let final_acc = curve.final_accuracy();
                series
                    .label(format!("{name} (final {final_acc:.4})"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            }
        }
    }
    if s.anchors_apply() {
        let anchors: Vec<_> = s.references.pytorch_curve.iter().filter(|(step, _, _)| (*step as f64) <= x_max).collect();
        if !anchors.is_empty() {
            chart
                .draw_series(anchors.iter().map(|&&(step, _, plain)| Circle::new((step as f64, plain), 6, PLAIN.stroke_width(2))))?
                .label("PyTorch anchor, without BN")
                .legend(|(x, y)| Circle::new((x + 12, y), 6, PLAIN.stroke_width(2)));
            chart
                .draw_series(anchors.iter().map(|&&(step, bn, _)| Circle::new((step as f64, bn), 6, BN.stroke_width(2))))?
                .label("PyTorch anchor, with BN")
                .legend(|(x, y)| Circle::new((x + 12, y), 6, BN.stroke_width(2)));
        }
    }
    // Where the curves leave the most room: as in the source, lower right, unless a late
    // low curve (a short run) is there.
    let drawn: Vec<(f64, f64)> = [&c.plain, &c.bn]
        .iter()
        .flat_map(|curve| along(&curve.history.iter().map(|p| (p.step as f64, p.test_accuracy)).collect::<Vec<_>>(), 20))
        .collect();
    let corners = [SeriesLabelPosition::LowerRight, SeriesLabelPosition::UpperLeft, SeriesLabelPosition::LowerLeft, SeriesLabelPosition::UpperRight];
    draw_legend(&mut chart, quietest_corner(&drawn, 0.0..x_max, y_min..1.0, 0.4, 0.32, &corners))
}

/// The points Figure 1(a)'s accuracy axis leaves out, said under it: "; below 0.80: 2 of
/// BN's points, 5 of plain's"; nothing where there are none.
fn below_the_axis(c: &super::Comparison, floor: f64) -> String {
    let below = |curve: &Curve| curve.history.iter().filter(|p| p.test_accuracy < floor).count();
    match (below(&c.bn), below(&c.plain)) {
        (0, 0) => String::new(),
        (bn, plain) => format!("; below {floor:.2}: {bn} of BN's points, {plain} of plain's"),
    }
}

/// BN's lead over plain, in percentage points of test accuracy, at each evaluation, on a
/// logarithmic step axis: the early steps, a sliver of Figure 1(a) where the two curves lie
/// within a pixel of each other, get as much room as the late ones, and which net is ahead
/// reads off the zero line.
fn fig1a_lead<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &ReproduceSummary) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let c = &s.comparison;
    let lead = percentage_points(c.lead());
    let anchors = if s.anchors_apply() {
        percentage_points(s.references.pytorch_curve.iter().filter(|anchor| anchor.0 <= c.steps).map(|&(step, bn, plain)| (step, bn - plain)))
    } else {
        Vec::new()
    };
    let x_lo = lead.iter().chain(&anchors).map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_lo = if x_lo.is_finite() { x_lo } else { 1.0 };
    let x_hi = (c.steps as f64).max(x_lo * 2.0);
    let (lo, hi) = lead.iter().chain(&anchors).fold((0.0f64, 0.0f64), |(lo, hi), &(_, d)| (lo.min(d), hi.max(d)));
    let pad = ((hi - lo) * 0.08).max(0.5);
    let (y_lo, y_hi) = drawable(lo - pad, hi + pad);
    let caption = format!("BN's lead over plain in test accuracy, at each evaluation{}", other_dataset(s));
    let mut chart = ChartBuilder::on(root)
        .caption(caption, title(22.0))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)?;
    chart
        .configure_mesh()
        .max_light_lines(0)
        .bold_line_style(GRID)
        .x_label_formatter(&|v| if *v >= 1000.0 { format!("{}k", v / 1000.0) } else { format!("{v}") })
        .y_label_formatter(&|v| format!("{v:+.1}"))
        .x_desc(format!("training step (logarithmic){}", bn_statistics(c, "; BN evaluated with ")))
        .y_desc("BN − plain (percentage points)")
        .label_style(text(15.0))
        .axis_desc_style(text(17.0))
        .draw()?;
    // Which side is whose, in the two nets' colors.
    chart.draw_series([
        Rectangle::new([(x_lo, 0.0), (x_hi, y_hi)], BN.mix(0.07).filled()),
        Rectangle::new([(x_lo, y_lo), (x_hi, 0.0)], PLAIN.mix(0.07).filled()),
    ])?;
    chart.draw_series(std::iter::once(PathElement::new(vec![(x_lo, 0.0), (x_hi, 0.0)], INK.mix(0.6).stroke_width(1))))?;
    let corner_text = |y: f64, words: &str, color: &'static RGBColor| Text::new(words.to_string(), (x_lo * 1.08, y), text(15.0).color(color));
    let height = y_hi - y_lo;
    chart.draw_series([corner_text(y_hi - 0.02 * height, "BN ahead", &BN), corner_text(y_lo + 0.07 * height, "plain ahead", &PLAIN)])?;
    if let Some(from) = c.bn_ahead_from().filter(|&step| step as f64 > x_lo) {
        let x = from as f64;
        chart
            .draw_series(std::iter::once(DashedPathElement::new(vec![(x, y_lo), (x, y_hi)], 6, 5, BN.stroke_width(2))))?
            .label(format!("BN ahead at every evaluation from step {from}"))
            .legend(|(x, y)| DashedPathElement::new(vec![(x, y), (x + 24, y)], 6, 4, BN.stroke_width(2)));
    }
    chart.draw_series(lone_point(&lead, INK))?;
    chart
        .draw_series(segments(&lead, INK.stroke_width(2)))?
        .label("bntrain")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], INK.stroke_width(3)));
    if !anchors.is_empty() {
        chart
            .draw_series(anchors.iter().map(|&point| Circle::new(point, 6, INK.stroke_width(2))))?
            .label("PyTorch anchor")
            .legend(|(x, y)| Circle::new((x + 12, y), 6, INK.stroke_width(2)));
    }
    // The legend where the line leaves the most room (on the log axis, by position), on the
    // right: the left corners hold the "BN ahead" and "plain ahead" labels.
    let log = |x: f64| (x / x_lo).ln() / (x_hi / x_lo).ln();
    let drawn: Vec<(f64, f64)> = along(&lead, 20).into_iter().map(|(x, y)| (log(x), y)).collect();
    let corners = [SeriesLabelPosition::UpperRight, SeriesLabelPosition::LowerRight];
    draw_legend(&mut chart, quietest_corner(&drawn, 0.0..1.0, y_lo..y_hi, 0.4, 0.3, &corners))
}

/// (step, lead) pairs as [`fig1a_lead`] draws them: the lead in percentage points, and only
/// the points a logarithmic step axis can show (not step 0) with a finite lead.
fn percentage_points(lead: impl IntoIterator<Item = (u64, f64)>) -> Vec<(f64, f64)> {
    lead.into_iter().map(|(step, d)| (step as f64, 100.0 * d)).filter(|&(step, d)| step > 0.0 && d.is_finite()).collect()
}

/// How the BN net's test evaluations normalized, after `lead`, where it is not plain from
/// the figure: the test set's own batch statistics, as the source measures.
fn bn_statistics(c: &super::Comparison, lead: &str) -> String {
    match c.eval_mode.as_str() {
        "batch" => format!("{lead}the test set's batch statistics"),
        "population" => format!("{lead}population statistics"),
        _ => String::new(),
    }
}

/// Figure 1(b,c): one row per probed unit, without BN on the left and with BN on the right.
/// The two panels of a row share their y scale (the same span of input values per pixel),
/// each centered on its own values, so how far the inputs wander compares directly even
/// though the plain net's inputs sit far from 0. `percentiles` draws the 15/50/85th
/// percentiles (the paper's view); otherwise the test-set mean (the post's view).
fn fig1_inputs<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &ReproduceSummary, percentiles: bool) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let c = &s.comparison;
    // With BN a unit's input is β + γ·x̂: its band's width is γ's doing, not drift.
    let (heading, subtitle) = if percentiles {
        (
            format!("Figure 1(b,c), percentile view: inputs to the sigmoid, layer {}", c.probe_layer + 1),
            "15th, 50th (line) and 85th percentile over the test set at each evaluation (the paper's view); with BN the band's width follows the learned scale γ",
        )
    } else {
        (
            format!("Figure 1(b,c), mean view: inputs to the sigmoid, layer {}", c.probe_layer + 1),
            "mean over the test set at each evaluation (the post's view)",
        )
    };
    let (w, _) = root.dim_in_pixel();
    let (head, body) = root.split_vertically(100);
    head.draw(&Text::new(heading, (w as i32 / 2, 22), centered(title(22.0))))?;
    head.draw(&Text::new(subtitle.to_string(), (w as i32 / 2, 46), centered(text(14.0))))?;
    let scale_note = "same y scale within a row, each panel centered on its own values; dashed: 0 (where in range), the sigmoid's steepest point";
    head.draw(&Text::new(scale_note.to_string(), (w as i32 / 2, 64), centered(text(14.0))))?;
    let with_bn = format!("With BN{}", bn_statistics(c, ", "));
    for (i, (name, color)) in [("Without BN", PLAIN), ("With BN", BN)].into_iter().enumerate() {
        let name = if i == 1 { with_bn.as_str() } else { name };
        let x = (w as i32 / 2) * i as i32 + w as i32 / 4 + 35;
        head.draw(&Text::new(name.to_string(), (x, 84), centered(title(19.0).color(&color))))?;
    }
    let rows = c.probe_neurons.max(1);
    let panels = body.split_evenly((rows, 2));
    let x_max = c.steps as f64;
    let fmt = step_label(x_max);
    for unit in 0..c.probe_neurons {
        let extent = |curve: &Curve| -> (f64, f64) {
            curve.probes.iter().flat_map(|p| {
                let n = p.neurons[unit];
                if percentiles { [n.p15, n.p85] } else { [n.mean, n.mean] }
            })
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
        };
        let (plain_extent, bn_extent) = (extent(&c.plain), extent(&c.bn));
        let span = (plain_extent.1 - plain_extent.0).max(bn_extent.1 - bn_extent.0);
        let span = if span.is_finite() { (span * 1.15).max(0.1) } else { 2.0 };
        for (col, (curve, color, (lo, hi))) in [(&c.plain, PLAIN, plain_extent), (&c.bn, BN, bn_extent)].into_iter().enumerate() {
            // Halved first: (lo + hi) / 2 overflows at ±1e308.
            let mid = if lo.is_finite() { lo / 2.0 + hi / 2.0 } else { 0.0 };
            let (y_lo, y_hi) = drawable(mid - span / 2.0, mid + span / 2.0);
            let decimals = if span >= 10.0 { 0 } else if span >= 1.0 { 1 } else { 2 };
            let y_fmt = move |v: &f64| format!("{v:.decimals$}");
            let area = &panels[unit * 2 + col];
            let last_row = unit + 1 == c.probe_neurons;
            let mut chart = ChartBuilder::on(area)
                .margin_left(10)
                .margin_right(20)
                .margin_top(8)
                .margin_bottom(4)
                .x_label_area_size(if last_row { 48 } else { 26 })
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..x_max, y_lo..y_hi)?;
            let mut mesh = chart.configure_mesh();
            mesh.max_light_lines(0)
                .bold_line_style(GRID)
                .x_labels(6)
                .y_labels(7)
                .x_label_formatter(&fmt)
                .y_label_formatter(&y_fmt)
                .label_style(text(13.0))
                .axis_desc_style(text(15.0));
            if col == 0 {
                mesh.y_desc(format!("unit {}: input", unit + 1));
            }
            if last_row {
                mesh.x_desc("training step");
            }
            mesh.draw()?;
            // How far from the sigmoid's steep middle the inputs sit, at a glance.
            if (y_lo..=y_hi).contains(&0.0) {
                chart.draw_series(std::iter::once(DashedPathElement::new(vec![(0.0, 0.0), (x_max, 0.0)], 6, 5, INK.mix(0.55).stroke_width(1))))?;
            }
            let series = |f: &dyn Fn(&super::ProbeStats) -> f64| -> Vec<(f64, f64)> {
                curve.probes.iter().map(|p| (p.step as f64, f(&p.neurons[unit]))).collect()
            };
            if percentiles {
                let (p15, p50, p85) = (series(&|n| n.p15), series(&|n| n.p50), series(&|n| n.p85));
                let band: Vec<(f64, f64)> = p15.iter().chain(p85.iter().rev()).copied().collect();
                chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.18).filled())))?;
                for line in [p15, p85] {
                    chart.draw_series(std::iter::once(PathElement::new(line, color.mix(0.8).stroke_width(1))))?;
                }
                chart.draw_series(lone_point(&p50, color))?;
                chart.draw_series(segments(&p50, color.stroke_width(2)))?;
            } else {
                let means = series(&|n| n.mean);
                chart.draw_series(lone_point(&means, color))?;
                chart.draw_series(segments(&means, color.stroke_width(2)))?;
            }
        }
    }
    Ok(())
}

/// One-by-one predictions of the first test images per class: batch statistics collapse to
/// one class, population statistics follow the labels.
fn test_time<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &ReproduceSummary) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let t = &s.test_time;
    let classes = t.first_batch.class_histogram.len().max(1);
    // The true labels' counts, outlined around each class's bars where the summary has them.
    let mut labelled = vec![0u32; classes];
    for &label in &t.first_labels {
        if let Some(n) = labelled.get_mut(label as usize) {
            *n += 1;
        }
    }
    let max = t.first_batch.class_histogram.iter().chain(&t.first_population.class_histogram).chain(&labelled).copied().max().unwrap_or(1) as f64;
    let count = t.first_batch.count;
    let caption = format!("One-by-one predictions of the first {count} test images{} (BN net after {} steps, restored)", other_dataset(s), t.steps);
    // Headroom above the tallest bar for the legend, which goes to the side with fewer tall
    // bars (the collapsed class's is as tall as the chart). The ticks stop at the top of the
    // range where that is below the count (plotters draws a grid line for a key point
    // outside the range).
    let y_max = (max * 1.3).max(1.0).ceil() as u32;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, title(21.0))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.5f64..(classes as f64 - 0.5), (0u32..y_max).with_key_points(count_ticks(count.min(y_max as usize))))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(0)
        .bold_line_style(GRID)
        .x_labels(classes)
        .x_label_formatter(&|v| if (v - v.round()).abs() < 1e-6 && *v >= -0.01 { format!("{}", v.round()) } else { String::new() })
        .y_label_formatter(&|v| format!("{v}"))
        .x_desc(if t.first_labels.is_empty() { "predicted class" } else { "class (bars: predicted; outlines: true)" })
        .y_desc(format!("images (of {count})"))
        .label_style(text(15.0))
        .axis_desc_style(text(17.0))
        .draw()?;
    let bars = [
        (&t.first_population, PLAIN, -0.38, "population statistics", t.first_population.accuracy),
        (&t.first_batch, BN, 0.02, "batch statistics (a batch of one)", t.first_batch.accuracy),
    ];
    for (one, color, offset, name, acc) in bars {
        chart
            .draw_series(one.class_histogram.iter().enumerate().map(|(k, &n)| {
                let x = k as f64 + offset;
                Rectangle::new([(x, 0), (x + 0.36, n)], color.filled())
            }))?
            .label(format!("{name}: accuracy {acc:.2}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    // Over the bars, so that a taller bar does not hide an outline's top.
    if !t.first_labels.is_empty() {
        let outline = INK.mix(0.6).stroke_width(2);
        chart
            .draw_series(labelled.iter().enumerate().filter(|(_, &n)| n > 0).map(|(k, &n)| {
                Rectangle::new([(k as f64 - 0.42, 0), (k as f64 + 0.42, n)], outline)
            }))?
            .label("true labels")
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], outline));
    }
    let tops: Vec<(f64, f64)> = [&t.first_population.class_histogram, &t.first_batch.class_histogram, &labelled]
        .iter()
        .flat_map(|histogram| histogram.iter().enumerate().flat_map(|(k, &n)| (0..=100).map(move |i| (k as f64, n as f64 * i as f64 / 100.0))))
        .collect();
    let corners = [SeriesLabelPosition::UpperLeft, SeriesLabelPosition::UpperRight];
    draw_legend(&mut chart, quietest_corner(&tops, -0.5..classes as f64 - 0.5, 0.0..y_max as f64, 0.45, 0.25, &corners))
}

/// The count axis's ticks for `count` images: 0 and multiples of a round step (1, 2 or 5
/// times a power of ten, about five of them) up to `count`, and none in the headroom above,
/// which is the legend's (no count there is possible, and a tick there had no label).
fn count_ticks(count: usize) -> Vec<u32> {
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    let raw = (count / 5).max(1);
    let magnitude = 10u32.pow(raw.ilog10());
    let step = [1, 2, 5, 10].iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(10 * magnitude);
    (0..=count / step).map(|i| i * step).collect()
}

/// Test accuracy per population-statistics estimator: each seed a small dot, the mean a large
/// one, the range across seeds a bar.
fn estimators<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &ReproduceSummary) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let e = &s.estimators;
    let n = e.rows.len();
    let (lo, hi) = e.rows.iter().flat_map(|r| r.accuracy.iter().copied()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(0.002);
    let (x_lo, x_hi) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
    let caption = format!(
        "Population statistics: test accuracy on the same weights ({} seed{}, {} steps)",
        e.seeds.len(), if e.seeds.len() == 1 { "" } else { "s" }, e.steps
    );
    let labels: Vec<String> = e.rows.iter().map(|r| r.label.clone()).collect();
    let label_of = move |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() { labels[n - 1 - i as usize].clone() } else { String::new() }
    };
    let mut chart = ChartBuilder::on(root)
        .caption(caption, title(21.0))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(190)
        .build_cartesian_2d(x_lo..x_hi, -0.6f64..(n as f64 - 0.4))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .max_light_lines(0)
        .bold_line_style(GRID)
        .x_labels(8)
        .y_labels(n + 1)
        .x_label_formatter(&|v| format!("{v:.4}"))
        .y_label_formatter(&label_of)
        .x_desc(if e.seeds.len() == 1 { "test accuracy (ring: the one seed's)" } else { "test accuracy (small dots: seeds; ring: mean over seeds; bar: min to max)" })
        .label_style(text(15.0))
        .axis_desc_style(text(17.0))
        .draw()?;
    for (i, row) in e.rows.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let color = if row.label.starts_with("exact") { RGBColor(44, 160, 44) } else if row.label.starts_with("cumulative") { RGBColor(148, 103, 189) } else { BN };
        chart.draw_series(std::iter::once(PathElement::new(vec![(row.min, y), (row.max, y)], color.stroke_width(3))))?;
        chart.draw_series(row.accuracy.iter().map(|&a| Circle::new((a, y), 4, color.mix(0.6).filled())))?;
        chart.draw_series(std::iter::once(Circle::new((row.mean, y), 8, color.stroke_width(2))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count axis of the predictions figure: round steps from 0 up to the count, none
    /// past it.
    #[test]
    fn count_ticks_stop_at_the_count() {
        assert_eq!(count_ticks(100), vec![0, 20, 40, 60, 80, 100]);
        assert_eq!(count_ticks(60), vec![0, 20, 40, 60]);
        assert_eq!(count_ticks(7), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(count_ticks(12), vec![0, 2, 4, 6, 8, 10, 12]);
        assert_eq!(count_ticks(1), vec![0, 1]);
        assert_eq!(count_ticks(0), vec![0]);
        assert_eq!(count_ticks(1000).last(), Some(&1000));
    }
    use crate::report::tests::sample;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A figure is drawn beside its final path and renamed into place: a draw that fails
    /// leaves the old figure whole and no temporary file; one that succeeds replaces it.
    #[test]
    fn figures_appear_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fig.png");
        std::fs::write(&path, b"the old figure").unwrap();
        let failed = atomically(&path, |tmp| {
            assert_eq!(tmp.parent(), Some(dir.path()), "drawn in the same directory");
            assert_eq!(tmp.extension().and_then(|e| e.to_str()), Some("png"), "plotters reads the format from the extension");
            assert_ne!(tmp, path);
            std::fs::write(tmp, b"half a fig").unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"the old figure", "the final path untouched while drawing");
            Err(plot_error(tmp, "midway"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"the old figure");
        assert_eq!(names(dir.path()), ["fig.png"], "temporary files left");
        atomically(&path, |tmp| std::fs::write(tmp, b"the new figure").map_err(|e| plot_error(tmp, e))).expect("drawn");
        assert_eq!(std::fs::read(&path).unwrap(), b"the new figure");
        assert_eq!(names(dir.path()), ["fig.png"], "temporary files left");
        // Every figure of a study, through the same path.
        let s = sample(200, 50, 100);
        let files = draw_all(&s, dir.path()).expect("figures");
        let mut expected = files.clone();
        expected.push("fig.png".into());
        expected.sort();
        assert_eq!(names(dir.path()), expected);
    }

    /// Steps are whole: a short axis's fractional ticks get no label, not a repeated one.
    #[test]
    fn step_labels_are_whole_steps() {
        let short = step_label(3.0);
        assert_eq!([0.0, 0.5, 1.0, 2.5, 3.0].map(|v| short(&v)), ["0", "", "1", "", "3"]);
        let long = step_label(40000.0);
        assert_eq!([0.0, 5000.0, 2500.0].map(|v| long(&v)), ["0", "5k", "2.5k"]);
    }

    /// The lead is drawn in percentage points; step 0 (no place on a log axis) and a lead
    /// that is not a number (an evaluation that diverged) are left out, the rest kept in order.
    #[test]
    fn the_lead_is_drawn_in_percentage_points_where_a_log_axis_can_show_it() {
        let drawn = percentage_points([(0, 0.5), (50, 0.012), (100, f64::NAN), (150, -0.25), (200, f64::INFINITY)]);
        assert_eq!(drawn, [(50.0, 1.2), (150.0, -25.0)]);
    }

    /// A run with a single evaluation point (`--steps 50`) draws that point: a marker, since a
    /// line of one point has no segment.
    #[test]
    fn a_single_evaluation_point_is_drawn() {
        register_fonts().unwrap();
        let s = sample(50, 50, 50);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 620)).into_drawing_area();
            fig1a(&root, &s).unwrap();
            root.present().unwrap();
        }
        assert_eq!(svg.matches("<circle").count(), 2, "one marker per net:\n{svg}");
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 520)).into_drawing_area();
            fig1a_lead(&root, &s).unwrap();
            root.present().unwrap();
        }
        assert_eq!(svg.matches("<circle").count(), 1, "one marker for the one lead:\n{svg}");
        for percentiles in [false, true] {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (1000, 1210)).into_drawing_area();
                fig1_inputs(&root, &s, percentiles).unwrap();
                root.present().unwrap();
            }
            assert_eq!(svg.matches("<circle").count(), 2 * 5, "one marker per panel");
        }
        // A curve of many points is a line, without markers.
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 620)).into_drawing_area();
            let mut many = sample(300, 50, 50);
            many.model.hidden = vec![50, 50];
            fig1a(&root, &many).unwrap();
            root.present().unwrap();
        }
        assert_eq!(svg.matches("<circle").count(), 0);
    }

    #[test]
    fn clipping_cuts_at_the_edges() {
        let pts = [(0.0, 0.5), (1.0, 0.9), (2.0, 0.95), (3.0, 0.7), (4.0, 0.85)];
        let pieces = clip(&pts, 0.8, 1.0);
        assert_eq!(pieces.len(), 2);
        assert!((pieces[0][0].0 - 0.75).abs() < 1e-12 && pieces[0][0].1 == 0.8);
        assert_eq!(pieces[0][1], (1.0, 0.9));
        assert_eq!(pieces[1].last(), Some(&(4.0, 0.85)));
        assert!(clip(&[(0.0, 0.1), (1.0, 0.2)], 0.8, 1.0).is_empty());
    }
}

#[cfg(test)]
mod legend_tests {
    use super::*;

    /// A line low at its end keeps the legend out of the lower right; a collapsed class
    /// near 0 sends the predictions' legend to the right.
    #[test]
    fn the_legend_goes_where_it_hides_the_least() {
        let corners = [SeriesLabelPosition::LowerRight, SeriesLabelPosition::UpperLeft];
        let rising = along(&[(0.0, 0.5), (100.0, 0.95)], 20);
        assert!(matches!(quietest_corner(&rising, 0.0..100.0, 0.5..1.0, 0.4, 0.3, &corners), SeriesLabelPosition::LowerRight));
        let low_end = along(&[(0.0, 0.5), (50.0, 0.9), (100.0, 0.55)], 20);
        assert!(matches!(quietest_corner(&low_end, 0.0..100.0, 0.5..1.0, 0.4, 0.3, &corners), SeriesLabelPosition::UpperLeft));
        let bar_at_1: Vec<(f64, f64)> = (0..=100).map(|v| (1.0, v as f64)).collect();
        let sides = [SeriesLabelPosition::UpperLeft, SeriesLabelPosition::UpperRight];
        assert!(matches!(quietest_corner(&bar_at_1, -0.5..9.5, 0.0..130.0, 0.45, 0.25, &sides), SeriesLabelPosition::UpperRight));
        let bar_at_8: Vec<(f64, f64)> = (0..=100).map(|v| (8.0, v as f64)).collect();
        assert!(matches!(quietest_corner(&bar_at_8, -0.5..9.5, 0.0..130.0, 0.45, 0.25, &sides), SeriesLabelPosition::UpperLeft));
    }
}
