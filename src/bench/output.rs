//! What `bench` writes: a table on the terminal (with a progress bar while it measures), JSON
//! or CSV for scripts, and a self-contained HTML report.

use super::measure::{Level, Load, Windows};
use super::BenchResult;
use crate::report::charts::{self, escape, Series};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write;
use std::path::Path;

/// A level's progress: windows done out of the most it may take.
pub fn level_bar(load: Load, windows: Windows, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(windows.max as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>16} [{bar:20}] window {pos}/{len} {msg} ({elapsed})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(load.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// The CPU's model name and how many CPUs this process may use.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cpus} CPUs")
}

fn load_cell(load: Load) -> String {
    match load {
        Load::Concurrency(n) => format!("c={n}"),
        Load::Rate(r) => format!("{r}/s"),
    }
}

fn errors_cell(level: &Level) -> String {
    if level.errors == 0 {
        return "0".into();
    }
    let parts: Vec<String> = level
        .errors_by_status
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    format!("{} ({})", level.errors, parts.join(", "))
}

fn stages_cell(level: &Level) -> String {
    let parts: Vec<String> = level
        .server_stages
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    parts.join(", ")
}

fn cpu_cell(level: &Level) -> String {
    level
        .server_cpu_cores
        .map_or_else(|| "-".into(), |c| format!("{c:.2}"))
}

/// The terminal's table.
pub fn table(result: &BenchResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({:?}), {} images, {} s windows, {}",
        result.target, result.protocol, result.images, result.window_seconds, result.machine
    );
    let _ = writeln!(
        out,
        "{:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8}  errors",
        "load", "resp/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "stable", "srv CPU"
    );
    for level in &result.results {
        let _ = writeln!(
            out,
            "{:>10} {:>10.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>8}  {}",
            load_cell(level.load),
            level.throughput,
            level.p50_ms,
            level.p90_ms,
            level.p99_ms,
            level.max_ms,
            if level.stable { "yes" } else { "NO" },
            cpu_cell(level),
            errors_cell(level)
        );
    }
    for level in result
        .results
        .iter()
        .filter(|l| !l.server_stages.is_empty())
    {
        let _ = writeln!(
            out,
            "{:>10} server stages (ms): {}",
            load_cell(level.load),
            stages_cell(level)
        );
    }
    out
}

/// JSON (`.json`) or CSV (anything else ending in `.csv`) by the file's extension.
pub fn write_data(path: &Path, result: &BenchResult) -> Result<()> {
    let text = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => csv(result),
        Some("json") => serde_json::to_string_pretty(result)? + "\n",
        _ => anyhow::bail!("-o {}: write a .json or .csv file", path.display()),
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// One row per level.
pub fn csv(result: &BenchResult) -> String {
    let mut out = String::from(
        "concurrency,rate,throughput,p50_ms,p90_ms,p99_ms,max_ms,mean_ms,responses,errors,stable,server_cpu_cores\n",
    );
    for l in &result.results {
        let (concurrency, rate) = match l.load {
            Load::Concurrency(n) => (n.to_string(), String::new()),
            Load::Rate(r) => (String::new(), r.to_string()),
        };
        let _ = writeln!(
            out,
            "{concurrency},{rate},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{}",
            l.throughput,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.max_ms,
            l.mean_ms,
            l.responses,
            l.errors,
            l.stable,
            l.server_cpu_cores
                .map_or(String::new(), |c| format!("{c:.3}"))
        );
    }
    out
}

/// The HTML report: the run's facts, the table, the latency/throughput curves, a latency
/// histogram per level, and each level's windows.
pub fn html(result: &BenchResult) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>{} over {:?}, {} images round robin, {} s windows; {}.</p>",
        escape(&result.target),
        result.protocol,
        result.images,
        result.window_seconds,
        escape(&result.machine)
    );
    body.push_str(&results_table(&result.results));
    let unstable: Vec<String> = result
        .results
        .iter()
        .filter(|l| !l.stable)
        .map(|l| l.load.to_string())
        .collect();
    if !unstable.is_empty() {
        let _ = write!(
            body,
            "<p class=\"warn\">Unstable (no three consecutive windows agreed; figures are the last three windows): {}</p>",
            escape(&unstable.join(", "))
        );
    }
    body.push_str("<h2>Latency against throughput</h2>");
    let curve = |pick: fn(&Level) -> f64| -> Vec<(f64, f64)> {
        result
            .results
            .iter()
            .map(|l| (l.throughput, pick(l)))
            .collect()
    };
    let (p50, p90, p99) = (
        curve(|l| l.p50_ms),
        curve(|l| l.p90_ms),
        curve(|l| l.p99_ms),
    );
    body.push_str(&charts::latency_throughput_svg(
        "latency percentiles by load",
        "latency (ms)",
        &[
            Series {
                name: "p50",
                points: &p50,
            },
            Series {
                name: "p90",
                points: &p90,
            },
            Series {
                name: "p99",
                points: &p99,
            },
        ],
    ));
    body.push_str("<h2>Latency histograms</h2>");
    for level in &result.results {
        body.push_str(&charts::latency_histogram_svg(
            &level.load.to_string(),
            &level.latencies_ms,
            40,
        ));
    }
    body.push_str("<h2>Windows</h2>");
    for level in &result.results {
        let rows: Vec<Vec<String>> = level
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                vec![
                    (i + 1).to_string(),
                    format!("{:.1}", w.throughput),
                    format!("{:.1}", w.mean_ms),
                    format!("{:.1}", w.p99_ms),
                    w.errors.to_string(),
                ]
            })
            .collect();
        let _ = write!(body, "<h3>{}</h3>", escape(&level.load.to_string()));
        body.push_str(&charts::table(
            &["window", "resp/s", "mean ms", "p99 ms", "errors"],
            &rows,
        ));
    }
    charts::page("visionserve bench", &body)
}

/// The levels as an HTML table.
pub fn results_table(levels: &[Level]) -> String {
    let rows: Vec<Vec<String>> = levels
        .iter()
        .map(|l| {
            vec![
                load_cell(l.load),
                format!("{:.1}", l.throughput),
                format!("{:.1}", l.p50_ms),
                format!("{:.1}", l.p90_ms),
                format!("{:.1}", l.p99_ms),
                format!("{:.1}", l.max_ms),
                if l.stable { "yes".into() } else { "no".into() },
                cpu_cell(l),
                errors_cell(l),
                stages_cell(l),
            ]
        })
        .collect();
    charts::table(
        &[
            "load",
            "resp/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "stable",
            "server CPU",
            "errors",
            "server stages (ms)",
        ],
        &rows,
    )
}
