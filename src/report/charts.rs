//! Charts and HTML scaffolding for the self-contained reports of `bench` and `tune`.
//!
//! Charts are drawn by `plotters` into inline SVG strings, so a report is one HTML file that
//! opens offline with no JavaScript. The SVG backend escapes text and attribute values itself,
//! so titles and labels are passed to it raw (escaping them here would show `&amp;` literally).

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;

/// Chart size in SVG user units; the page's CSS scales it down on narrow screens.
const SIZE: (u32, u32) = (720, 420);
/// Generic family: the SVG only names it, the viewer's browser picks the font.
const FONT: &str = "sans-serif";
const X_DESC: &str = "throughput (responses/s)";
/// Okabe-Ito colours: distinguishable with common colour-vision deficiencies; cycled.
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];
const GREY: RGBColor = RGBColor(90, 90, 90);
/// Above this many points, value labels would overlap into noise, so they are left off.
const MAX_POINT_LABELS: usize = 24;
/// Larger magnitudes are treated as garbage: padding a range around them could overflow to inf.
const MAX_MAGNITUDE: f64 = 1e15;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// One line on a latency-against-throughput chart (e.g. one protocol, or one candidate).
pub struct Series<'a> {
    pub name: &'a str,
    /// (throughput in responses/s, latency in ms) points, in load order (e.g. concurrency 1, 8, 32).
    pub points: &'a [(f64, f64)],
}

/// One measured candidate of a search.
pub struct Candidate<'a> {
    pub label: &'a str,
    pub throughput: f64,
    pub p99_ms: f64,
    /// The chosen one: drawn distinctly (larger, another colour) and labelled.
    pub winner: bool,
}

/// Latency (y, ms) against throughput (x, responses/s): one line with markers per series, each
/// point labelled with its latency unless there are too many points to read. Returns an
/// `<svg ...>...</svg>` string (no XML prolog) to inline in HTML.
pub fn latency_throughput_svg(title: &str, y_label: &str, series: &[Series]) -> String {
    let lines: Vec<(&str, Vec<(f64, f64)>)> =
        series.iter().map(|s| (s.name, clean(s.points))).collect();
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return no_data_svg(title);
    }
    let x = padded_range(all.iter().map(|p| p.0));
    let y = padded_range(all.iter().map(|p| p.1));
    let label_points = all.len() <= MAX_POINT_LABELS;
    render(|root| {
        let mut chart = cartesian(root, title, x.clone(), y)?;
        mesh(&mut chart, X_DESC, y_label)?;
        // Colour by position in `series`, so a series keeps its colour when another one is empty.
        for (i, (name, points)) in lines.iter().enumerate().filter(|(_, l)| !l.1.is_empty()) {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            let font = (FONT, 12).into_font().color(&colour);
            chart.draw_series(points.iter().map(|&p| {
                let text = if label_points { short(p.1) } else { "".into() };
                EmptyElement::at(p)
                    + Circle::new((0, 0), 4, colour.filled())
                    + beside(text, p.0, &x, font.clone(), 6)
            }))?;
        }
        legend(&mut chart)
    })
}

/// A histogram of latencies (ms) with about `bins` equal-width bins between the min and the
/// 99.9th percentile (the x range is clipped there so one outlier does not squash the chart; the
/// caption says so when samples were left out). Dashed vertical lines mark p50, p90 and p99.
pub fn latency_histogram_svg(title: &str, latencies_ms: &[f64], bins: usize) -> String {
    let mut sorted: Vec<f64> = latencies_ms
        .iter()
        .copied()
        .filter(|v| plottable(*v))
        .collect();
    if sorted.is_empty() {
        return no_data_svg(title);
    }
    sorted.sort_by(f64::total_cmp);
    let (lo, hi) = (sorted[0], percentile(&sorted, 99.9));
    // All-equal samples give an empty span; widen it so the bins have a width.
    let x = if hi - lo > hi.abs() * 1e-9 {
        lo..hi
    } else {
        around(lo)
    };
    let counts = bin_counts(&sorted, &x, bins.max(1));
    let beyond = sorted.iter().filter(|&&v| v > x.end).count();
    let caption = if beyond > 0 {
        format!(
            "{title} (clipped at p99.9 = {} ms: {beyond} slower not shown)",
            short(hi)
        )
    } else {
        title.to_string()
    };
    let top = counts.iter().copied().max().unwrap_or(0) as f64 * 1.25 + 1.0;
    let marks = [
        ("p50", 50.0, COLOURS[2]),
        ("p90", 90.0, COLOURS[4]),
        ("p99", 99.0, COLOURS[1]),
    ];
    render(|root| {
        let mut chart = cartesian(root, &caption, x.clone(), 0.0..top)?;
        let x_desc = format!("latency (ms), {} samples", sorted.len());
        mesh(&mut chart, &x_desc, "responses")?;
        let width = (x.end - x.start) / counts.len() as f64;
        chart.draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| {
                    let left = x.start + width * i as f64;
                    Rectangle::new(
                        [(left, 0.0), (left + width, c as f64)],
                        COLOURS[0].mix(0.6).filled(),
                    )
                }),
        )?;
        for (row, (name, q, colour)) in marks.into_iter().enumerate() {
            let v = percentile(&sorted, q);
            chart.draw_series(DashedLineSeries::new(
                [(v, 0.0), (v, top)],
                6,
                4,
                colour.stroke_width(2),
            ))?;
            // Stagger the labels so close percentiles do not overprint.
            let at = (v, top * (0.93 - 0.07 * row as f64));
            let text = format!("{name} {} ms", short(v));
            let font = (FONT, 13).into_font().color(&colour);
            chart.draw_series([EmptyElement::at(at) + beside(text, v, &x, font, 5)])?;
        }
        Ok(())
    })
}

/// p99 (y, ms) against throughput (x) for every candidate as points; the Pareto frontier
/// (points not dominated by one with >= throughput and <= p99) joined by a line; a horizontal
/// dashed line at `p99_target_ms` labelled "p99 target" (left off when not finite).
pub fn frontier_svg(title: &str, candidates: &[Candidate], p99_target_ms: f64) -> String {
    let cands: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| plottable(c.throughput) && plottable(c.p99_ms))
        .collect();
    if cands.is_empty() {
        return no_data_svg(title);
    }
    let target = plottable(p99_target_ms).then_some(p99_target_ms);
    let x = padded_range(cands.iter().map(|c| c.throughput));
    let y = padded_range(cands.iter().map(|c| c.p99_ms).chain(target));
    let pairs: Vec<(f64, f64)> = cands.iter().map(|c| (c.throughput, c.p99_ms)).collect();
    let front = pareto_frontier(&pairs);
    let label_front = front.len() <= MAX_POINT_LABELS;
    render(|root| {
        let mut chart = cartesian(root, title, x.clone(), y)?;
        mesh(&mut chart, X_DESC, "p99 latency (ms)")?;
        let (blue, green, winner_colour) = (COLOURS[0], COLOURS[2], COLOURS[1]);
        let front_points = front.iter().map(|&i| pairs[i]);
        chart
            .draw_series(LineSeries::new(front_points, green.stroke_width(2)))?
            .label("Pareto frontier")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green.stroke_width(2)));
        chart
            .draw_series(pairs.iter().map(|&p| Circle::new(p, 4, blue.filled())))?
            .label("candidate")
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, blue.filled()));
        if label_front {
            let style = (FONT, 11).into_font().color(&GREY);
            chart.draw_series(front.iter().filter(|&&i| !cands[i].winner).map(|&i| {
                let text = cands[i].label.to_string();
                EmptyElement::at(pairs[i]) + beside(text, pairs[i].0, &x, style.clone(), 6)
            }))?;
        }
        if let Some(t) = target {
            let style = GREY.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    [(x.start, t), (x.end, t)],
                    8,
                    5,
                    style,
                ))?
                .label("p99 target")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
            let font = (FONT, 12)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Right, VPos::Bottom));
            chart.draw_series([Text::new("p99 target ", (x.end, t), font)])?;
        }
        let winners: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].winner).collect();
        if !winners.is_empty() {
            let font = (FONT, 13, FontStyle::Bold)
                .into_font()
                .color(&winner_colour);
            chart
                .draw_series(winners.iter().map(|&i| {
                    EmptyElement::at(pairs[i])
                        + Circle::new((0, 0), 8, winner_colour.filled())
                        + beside(cands[i].label.to_string(), pairs[i].0, &x, font.clone(), 10)
                }))?
                .label("winner")
                .legend(move |(x, y)| Circle::new((x + 10, y), 6, winner_colour.filled()));
        }
        legend(&mut chart)
    })
}

/// HTML-escape text for element content and attribute values (& < > " ').
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// A whole self-contained HTML page (no external resources): doctype, charset, title, a small
/// inline stylesheet, an `<h1>`, then `body_html` as given (the caller escapes its own text).
/// Written as well-formed XML too (upper-case DOCTYPE, self-closed `<meta/>`), so a test can
/// check a report with an XML parser.
pub fn page(title: &str, body_html: &str) -> String {
    let title = escape(title);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         {body_html}\n</body>\n</html>\n"
    )
}

/// System fonts only (a report must open offline); tabular digits keep numeric columns aligned.
const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
  margin: 2em auto; max-width: 1000px; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #eee; }
tbody tr:nth-child(even) { background: #f7f7f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { color: #b45309; font-weight: 600; }
svg { max-width: 100%; height: auto; }
";

/// An HTML table: header and body cells escaped; cells whose text is a number (after trimming,
/// optionally followed by a short unit such as "ms", "%" or "x") get `class="num"`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut html = String::from("<table>\n<thead><tr>");
    for header in headers {
        html.push_str(&format!("<th>{}</th>", escape(header)));
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let class = if is_numeric(cell) {
                " class=\"num\""
            } else {
                ""
            };
            html.push_str(&format!("<td{class}>{}</td>", escape(cell)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n");
    html
}

/// A number with an optional unit of up to five letters, `%` or `/` ("12 ms", "45%", "3 req/s").
fn is_numeric(cell: &str) -> bool {
    let text = cell.trim();
    let number = text.trim_end_matches(|c: char| c.is_alphabetic() || c == '%' || c == '/');
    // Stripping letters first also rejects "NaN" and "inf", which `f64::from_str` would accept.
    text.len() - number.len() <= 5 && number.trim_end().parse::<f64>().is_ok()
}

fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() < MAX_MAGNITUDE
}

/// The plottable points: non-finite ones would poison the axis ranges (plotters panics on NaN).
fn clean(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let ok = |&(x, y): &(f64, f64)| plottable(x) && plottable(y);
    points.iter().copied().filter(ok).collect()
}

/// An axis range for the values: from zero for non-negative data (latency and throughput read
/// honestly against zero), with a 5% margin; never empty, since plotters misbehaves on min == max.
fn padded_range(values: impl IntoIterator<Item = f64>) -> Range<f64> {
    let (min, max) = values
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if min > max {
        return 0.0..1.0;
    }
    let min = min.min(0.0);
    let span = max - min;
    if span <= max.abs() * 1e-9 {
        return around(max);
    }
    let pad = span * 0.05;
    (if min < 0.0 { min - pad } else { 0.0 })..max + pad
}

/// A range of ±10% around one value (0..1 for zero: latency is never negative), for data with no
/// spread.
fn around(v: f64) -> Range<f64> {
    if v == 0.0 {
        return 0.0..1.0;
    }
    v - v.abs() * 0.1..v + v.abs() * 0.1
}

/// A label beside a marker: to its right, or to its left in the right quarter of the x range so
/// it is not cut off at the plot's edge. `gap` is in pixels.
fn beside(
    text: String,
    px: f64,
    x: &Range<f64>,
    font: TextStyle<'static>,
    gap: i32,
) -> Text<'static, (i32, i32), String> {
    let right_side = px < x.start + 0.75 * (x.end - x.start);
    let (dx, h) = if right_side {
        (gap, HPos::Left)
    } else {
        (-gap, HPos::Right)
    };
    Text::new(text, (dx, -6), font.pos(Pos::new(h, VPos::Bottom)))
}

/// Axis tick text: at most three decimals, no trailing zeros ("500", "2.5"; plotters: "500.0").
fn tick(v: f64) -> String {
    // `+ 0.0` turns a rounded -0.0 into 0.0, which would otherwise print as "-0".
    ((v * 1000.0).round() / 1000.0 + 0.0).to_string()
}

/// Nearest-rank percentile of sorted, non-empty data.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Counts per equal-width bin over `range`; values outside it are not counted.
fn bin_counts(values: &[f64], range: &Range<f64>, bins: usize) -> Vec<usize> {
    let width = (range.end - range.start) / bins as f64;
    let mut counts = vec![0; bins];
    for &v in values
        .iter()
        .filter(|v| range.start <= **v && **v <= range.end)
    {
        // The maximum lands exactly on the last edge; keep it in the last bin.
        counts[(((v - range.start) / width) as usize).min(bins - 1)] += 1;
    }
    counts
}

/// Indices of the non-dominated points, by increasing throughput (x) so they join into a line.
fn pareto_frontier(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    // Best throughput first, ties by lower p99: then a point is on the frontier exactly when its
    // p99 beats every point before it (all of which have at least its throughput).
    order.sort_by(|&a, &b| {
        points[b]
            .0
            .total_cmp(&points[a].0)
            .then(points[a].1.total_cmp(&points[b].1))
    });
    let mut best = f64::INFINITY;
    let mut front: Vec<usize> = order
        .into_iter()
        .filter(|&i| {
            let on = points[i].1 < best;
            best = best.min(points[i].1);
            on
        })
        .collect();
    front.reverse();
    front
}

/// A compact number for labels: three significant digits or so.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// Draws into a fresh SVG string; a drawing error yields a placeholder SVG rather than a
/// half-drawn chart, because a report should still be written when one chart fails.
fn render(draw: impl FnOnce(&Area) -> Drawn) -> String {
    let mut svg = String::new();
    let outcome = {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present())
    };
    match outcome {
        Ok(()) => svg,
        Err(e) => format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
             <text x=\"20\" y=\"40\" font-family=\"{FONT}\">chart could not be drawn: {}</text></svg>",
            escape(&e.to_string()),
            w = SIZE.0,
            h = SIZE.1
        ),
    }
}

/// The title and a centred "no data" note, so an empty report section still shows what is missing.
fn no_data_svg(title: &str) -> String {
    render(|root| {
        let centre = |size: i32, colour: &RGBColor| {
            (FONT, size)
                .into_font()
                .color(colour)
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        let (w, h) = (SIZE.0 as i32, SIZE.1 as i32);
        root.draw(&Text::new(title, (w / 2, 24), centre(20, &BLACK)))?;
        root.draw(&Text::new("no data", (w / 2, h / 2), centre(16, &GREY)))
    })
}

fn cartesian<'a, 'b>(
    root: &'a Area<'b>,
    caption: &str,
    x: Range<f64>,
    y: Range<f64>,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    ChartBuilder::on(root)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
}

fn mesh(chart: &mut Chart, x_desc: &str, y_desc: &str) -> Drawn {
    // No light grid lines: they double the SVG's size for little reading help.
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 12))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Drawn {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .label_font((FONT, 13))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap well-formedness check: one root `<svg>`, every tag closed in order.
    fn assert_svg(svg: &str) {
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        let mut open: Vec<&str> = Vec::new();
        for tag in svg
            .split('<')
            .skip(1)
            .map(|t| &t[..t.find('>').expect("unclosed tag")])
        {
            let name = tag
                .trim_start_matches('/')
                .split([' ', '\n', '/'])
                .next()
                .unwrap();
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()));
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(closing), "mismatched </{closing}>");
            } else if !tag.ends_with('/') {
                open.push(name);
            }
        }
        assert!(open.is_empty(), "unclosed {open:?}");
    }

    fn assert_has(text: &str, needles: &[&str]) {
        for needle in needles {
            assert!(text.contains(needle), "{needle:?} missing");
        }
    }

    #[test]
    fn curve_draws_series_and_escapes_text() {
        let a = [(100.0, 5.0), (800.0, 7.5), (2000.0, 30.0)];
        let b = [(f64::NAN, 1.0), (50.0, f64::INFINITY), (90.0, 4.0)];
        let series = [
            Series {
                name: "http & <json>",
                points: &a,
            },
            Series {
                name: "grpc",
                points: &b,
            },
        ];
        let svg = latency_throughput_svg("p99 <by> & protocol", "p99 (ms)", &series);
        assert_svg(&svg);
        let title = "p99 &lt;by&gt; &amp; protocol";
        assert_has(
            &svg,
            &[title, "http &amp; &lt;json&gt;", "grpc", X_DESC, "30.0"],
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn curve_degenerate_inputs_do_not_panic() {
        let nan = [(f64::NAN, f64::NAN)];
        let one = [(3.0, 3.0)];
        let same = [(0.0, 0.0); 3];
        assert!(latency_throughput_svg("t", "ms", &[]).contains("no data"));
        for points in [&[][..], &nan[..]] {
            let svg = latency_throughput_svg("t", "ms", &[Series { name: "x", points }]);
            assert_svg(&svg);
            assert!(svg.contains("no data"));
        }
        for points in [&one[..], &same[..]] {
            assert_svg(&latency_throughput_svg(
                "t",
                "ms",
                &[Series { name: "x", points }],
            ));
        }
    }

    #[test]
    fn histogram_marks_percentiles_and_clips_outliers() {
        let mut latencies: Vec<f64> = (1..=2000).map(|i| f64::from(i) / 100.0).collect();
        latencies.extend([5000.0, f64::NAN, f64::NEG_INFINITY]);
        let svg = latency_histogram_svg("lat & co", &latencies, 30);
        assert_svg(&svg);
        assert!(svg.contains("lat &amp; co (clipped at p99.9"));
        assert_has(&svg, &["p50 10.0 ms", "p90 18.0 ms", "p99 19.8 ms"]);
        assert!(!latency_histogram_svg("t", &[1.0, 2.0, 3.0], 3).contains("clipped"));
    }

    #[test]
    fn histogram_degenerate_inputs_do_not_panic() {
        for (latencies, bins) in [
            (&[][..], 10),
            (&[f64::NAN][..], 10),
            (&[7.0][..], 0),
            (&[2.5; 9][..], 20),
            (&[0.0; 3][..], 1),
        ] {
            let svg = latency_histogram_svg("t", latencies, bins);
            assert_svg(&svg);
            assert_eq!(
                svg.contains("no data"),
                latencies.iter().all(|v| v.is_nan())
            );
        }
    }

    #[test]
    fn frontier_keeps_non_dominated_points() {
        let points = [
            (100.0, 5.0),
            (200.0, 9.0),
            (150.0, 12.0),
            (200.0, 8.0),
            (50.0, 5.0),
            (300.0, 20.0),
        ];
        // (150, 12) loses to (200, 8); (50, 5) to (100, 5); (200, 9) to (200, 8).
        assert_eq!(pareto_frontier(&points), vec![0, 3, 5]);
        assert_eq!(pareto_frontier(&[]), Vec::<usize>::new());
    }

    #[test]
    fn frontier_chart_marks_winner_and_target() {
        let c = |label, throughput, p99_ms, winner| Candidate {
            label,
            throughput,
            p99_ms,
            winner,
        };
        let cands = [
            c("b=1", 100.0, 5.0, false),
            c("b=8 & <w>", 400.0, 9.0, true),
            c("x", f64::NAN, 1.0, false),
        ];
        let svg = frontier_svg("search", &cands, 10.0);
        assert_svg(&svg);
        assert_has(
            &svg,
            &["b=8 &amp; &lt;w&gt;", "p99 target", "winner", "b=1"],
        );
        let no_target = frontier_svg("search", &cands[..1], f64::NAN);
        assert_svg(&no_target);
        assert!(!no_target.contains("p99 target") && !no_target.contains("winner"));
        assert!(frontier_svg("t", &cands[2..], 1.0).contains("no data"));
        assert_svg(&frontier_svg("t", &[c("same", 0.0, 0.0, true)], 0.0));
    }

    #[test]
    fn ranges_are_never_empty() {
        assert_eq!(padded_range([]), 0.0..1.0);
        assert_eq!(padded_range([0.0, 0.0]), 0.0..1.0);
        assert_eq!(padded_range([10.0, 10.0]), 0.0..10.5);
        assert_eq!(padded_range([-2.0, -2.0]), -2.2..-1.8);
        assert_eq!(padded_range([10.0, 20.0]), 0.0..21.0);
        assert_eq!(padded_range([-10.0, 10.0]), -11.0..11.0);
    }

    #[test]
    fn percentiles_bins_and_ticks() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            [50.0, 99.0, 99.9].map(|q| percentile(&sorted, q)),
            [50.0, 99.0, 100.0]
        );
        assert_eq!(percentile(&[4.0], 50.0), 4.0);
        assert_eq!(
            bin_counts(&[0.0, 1.0, 5.0, 10.0, 11.0], &(0.0..10.0), 2),
            vec![2, 2]
        );
        assert_eq!(
            [500.0, 2.5, 0.1 + 0.2, -1e-9].map(tick),
            ["500", "2.5", "0.3", "0"]
        );
    }

    #[test]
    fn escape_covers_markup_characters() {
        assert_eq!(
            escape(r#"a&b<c>"d"'e'"#),
            "a&amp;b&lt;c&gt;&quot;d&quot;&#39;e&#39;"
        );
    }

    #[test]
    fn table_escapes_and_right_aligns_numbers() {
        let rows = vec![vec![
            "<http>".to_string(),
            " 8.1 ms ".into(),
            "45%".into(),
            "1.5x".into(),
            "-3e2".into(),
        ]];
        let html = table(&["a & b"], &rows);
        assert_has(&html, &["<th>a &amp; b</th>", "<td>&lt;http&gt;</td>"]);
        assert_eq!(html.matches("class=\"num\"").count(), 4);
        for text in ["", "NaN", "inf", "ms", "3 workers", "1.2.3", "v1"] {
            assert!(!is_numeric(text), "{text}");
        }
    }

    #[test]
    fn page_is_self_contained() {
        let html = page("bench <1> & 2", "<p class=\"warn\">x</p>");
        assert!(html.starts_with("<!DOCTYPE html>"));
        let title = "bench &lt;1&gt; &amp; 2";
        assert_has(
            &html,
            &[
                "<meta charset=\"utf-8\"/>",
                &format!("<title>{title}</title>"),
            ],
        );
        assert_has(
            &html,
            &[&format!("<h1>{title}</h1>"), "<p class=\"warn\">x</p>"],
        );
        assert_has(&html, &["td.num", ".warn", "svg { max-width: 100%"]);
        assert!(!html.contains("http://") && !html.contains("<script"));
    }
}
