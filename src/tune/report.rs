//! What `tune` writes: the winner as a configuration file, the command line it equals, and
//! tune-report.html (every candidate, the throughput/p99 frontier, the winner and why, and the
//! honesty check).

use super::space::model_spec;
use super::{Candidate, Search};
use crate::report::charts::{self, escape};
use std::fmt::Write;
use std::path::Path;

/// The winner as a `--config` file: server-wide flags at the top, the model's own options in
/// its `[models.NAME]` section.
pub fn config_toml(search: &Search, winner: &Candidate) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `visionserve tune` on {}: the most images per second with p99 <= {} ms at {} clients.",
        search.machine, search.args.p99_ms, search.args.concurrency
    );
    let _ = writeln!(
        out,
        "# Measured: {:.1} responses/s, p99 {:.1} ms. Serve it with: visionserve --config visionserve.toml",
        winner.throughput(),
        winner.p99()
    );
    let settings = winner.settings.changed_from(&search.defaults);
    let _ = writeln!(out, "# Every setting not written here is at its default.");
    for (flag, value) in settings.flags() {
        let key = flag.trim_start_matches("--").replace('-', "_");
        let _ = writeln!(out, "{key} = {}", toml_scalar(&value));
    }
    let _ = writeln!(out, "\n[models.{}]", search.model_name);
    let (source, own) = search
        .source
        .split_once('?')
        .unwrap_or((&search.source, ""));
    let _ = writeln!(out, "source = {}", toml_scalar(source));
    // The source's own options, then the winner's, each key once (the winner's win).
    let mut options: Vec<(String, String)> = Vec::new();
    let query = settings.model_query();
    for pair in own.split('&').chain(query.split('&')) {
        if let Some((key, value)) = pair.split_once('=') {
            options.retain(|(k, _)| k != key);
            options.push((key.to_owned(), value.to_owned()));
        }
    }
    for (key, value) in options {
        let _ = writeln!(out, "{key} = {}", toml_scalar(&value));
    }
    out
}

/// Numbers and booleans bare, everything else a TOML string.
fn toml_scalar(value: &str) -> String {
    if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
        value.to_owned()
    } else {
        toml::Value::String(value.to_owned()).to_string()
    }
}

/// The winner as one command line.
pub fn command_line(search: &Search, winner: &Candidate) -> String {
    let settings = winner.settings.changed_from(&search.defaults);
    let spec = model_spec(&search.model_name, &search.source, &settings.model_query());
    let mut line = format!("visionserve --model '{spec}'");
    for (flag, value) in settings.flags() {
        let _ = write!(line, " {flag} {value}");
    }
    line
}

/// How far the check's median throughput is from the search's figure, as a fraction.
fn check_gap(search: &Search) -> Option<f64> {
    let found = search.candidates[search.winner].throughput();
    let mut checks: Vec<f64> = search
        .checks
        .iter()
        .filter_map(|c| c.level.as_ref().map(|l| l.throughput))
        .collect();
    if checks.is_empty() || found <= 0.0 {
        return None;
    }
    checks.sort_by(f64::total_cmp);
    let median = checks[checks.len() / 2];
    Some((median - found) / found)
}

/// Why the winner won, in a sentence.
fn why(search: &Search) -> String {
    let winner = &search.candidates[search.winner];
    let defaults = &search.candidates[0];
    let meeting = search
        .candidates
        .iter()
        .filter(|c| c.meets(search.args.p99_ms))
        .count();
    if !winner.meets(search.args.p99_ms) {
        return format!(
            "No candidate met p99 <= {} ms at {} clients; this one came closest (p99 {:.1} ms). Lower the concurrency \
             or raise the target.",
            search.args.p99_ms,
            search.args.concurrency,
            winner.p99()
        );
    }
    if search.winner == 0 {
        return format!(
            "The defaults: no other candidate beat them by more than the noise margin (5 %) while meeting p99 <= {} ms \
             ({meeting} of {} did meet it).",
            search.args.p99_ms,
            search.candidates.len()
        );
    }
    format!(
        "The highest throughput of the {meeting} candidates (of {}) that met p99 <= {} ms at {} clients: {:.1} \
         responses/s against the defaults' {:.1} ({:+.0} %), by changing {}.",
        search.candidates.len(),
        search.args.p99_ms,
        search.args.concurrency,
        winner.throughput(),
        defaults.throughput(),
        (winner.throughput() / defaults.throughput().max(1e-9) - 1.0) * 100.0,
        winner.settings.differences(&defaults.settings).join(", ")
    )
}

fn candidate_row(index: usize, c: &Candidate, search: &Search) -> Vec<String> {
    let (throughput, p99, errors) = match &c.level {
        Some(l) => (
            format!("{:.1}", l.throughput),
            format!("{:.1}", l.p99_ms),
            l.errors.to_string(),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    let verdict = match (&c.failure, c.meets(search.args.p99_ms)) {
        (Some(failure), _) => format!("failed: {failure}"),
        (None, true) => "meets".into(),
        (None, false) => "misses".into(),
    };
    let agreement = c
        .agreement
        .map_or(String::new(), |(same, all)| format!("{same}/{all}"));
    let stable = c
        .level
        .as_ref()
        .map_or("-", |l| if l.stable { "yes" } else { "no" });
    let winner = if index == search.winner { "winner" } else { "" };
    vec![
        (index + 1).to_string(),
        c.stage.clone(),
        c.settings
            .differences(&search.candidates[0].settings)
            .join(" "),
        throughput,
        p99,
        errors,
        stable.to_owned(),
        format!("{:.1}", c.startup_s),
        agreement,
        verdict,
        winner.to_owned(),
    ]
}

/// tune-report.html.
pub fn html(search: &Search) -> String {
    let winner = &search.candidates[search.winner];
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>Model <b>{}</b> ({}) on {}; target p99 &le; {} ms at {} clients; {} candidates in {:.0} s (budget {:.0} s), \
         {} s windows; {} images{}.</p>",
        escape(&search.model_name),
        escape(&search.source),
        escape(&search.machine),
        search.args.p99_ms,
        search.args.concurrency,
        search.candidates.len(),
        search.elapsed.as_secs_f64(),
        search.args.time_budget.as_secs_f64(),
        search.window.as_secs_f64(),
        search.images.len(),
        if search.synthetic_images { " (synthetic photo-sized JPEGs: pass your own for your traffic)" } else { "" }
    );
    body.push_str("<h2>Winner</h2>");
    let _ = write!(body, "<p>{}</p>", escape(&why(search)));
    let _ = write!(body, "<pre>{}</pre>", escape(&command_line(search, winner)));
    body.push_str("<h2>Honesty check</h2>");
    body.push_str(&honesty_html(search));
    body.push_str("<h2>Throughput against p99</h2>");
    let labels: Vec<String> = (1..=search.candidates.len())
        .map(|i| format!("#{i}"))
        .collect();
    let points: Vec<charts::Candidate> = search
        .candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.level.is_some())
        .map(|(i, c)| charts::Candidate {
            label: &labels[i],
            throughput: c.throughput(),
            p99_ms: c.p99(),
            winner: i == search.winner,
        })
        .collect();
    body.push_str(&charts::frontier_svg(
        "every candidate (numbers as in the table)",
        &points,
        search.args.p99_ms,
    ));
    body.push_str("<h2>Every candidate</h2><p>Settings are shown where they differ from the defaults (#1).</p>");
    let rows: Vec<Vec<String>> = search
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| candidate_row(i, c, search))
        .collect();
    body.push_str(&charts::table(
        &[
            "#",
            "searching",
            "settings",
            "resp/s",
            "p99 ms",
            "errors",
            "stable",
            "start s",
            "top-1 agreement",
            "verdict",
            "",
        ],
        &rows,
    ));
    if !search.untried.is_empty() {
        let _ = write!(
            body,
            "<p class=\"warn\">Not tried within the time budget: {}.</p>",
            escape(&search.untried.join(", "))
        );
    }
    body.push_str("<h2>The winner's latency</h2>");
    if let Some(level) = &winner.level {
        body.push_str(&charts::latency_histogram_svg(
            "winner, during the search",
            &level.latencies_ms,
            40,
        ));
    }
    charts::page(&format!("visionserve tune: {}", search.model_name), &body)
}

fn honesty_html(search: &Search) -> String {
    let winner = &search.candidates[search.winner];
    let mut rows = vec![vec![
        "search".to_owned(),
        format!("{:.1}", winner.throughput()),
        format!("{:.1}", winner.p99()),
    ]];
    for (i, check) in search.checks.iter().enumerate() {
        rows.push(match (&check.level, &check.failure) {
            (Some(l), _) => vec![
                format!("from the file, run {}", i + 1),
                format!("{:.1}", l.throughput),
                format!("{:.1}", l.p99_ms),
            ],
            (None, failure) => vec![
                format!("from the file, run {}", i + 1),
                "-".into(),
                failure.clone().unwrap_or_default(),
            ],
        });
    }
    let mut out = charts::table(&["measured", "resp/s", "p99 ms"], &rows);
    match check_gap(search) {
        Some(gap) if gap.abs() > 0.10 => {
            let _ = write!(
                out,
                "<p class=\"warn\">Started again from visionserve.toml, the winner measured {:+.0} % from the search's \
                 figure: more than 10 %, so the search's figures are optimistic or this host's load changed; measure \
                 again before relying on them.</p>",
                gap * 100.0
            );
        }
        Some(gap) => {
            let _ = write!(out, "<p>Started again from visionserve.toml: {:+.0} % from the search's figure (within 10 %).</p>", gap * 100.0);
        }
        None => out.push_str("<p class=\"warn\">The check could not measure the winner again.</p>"),
    }
    out
}

/// What the terminal shows at the end.
pub fn summary(search: &Search, file: &Path, page: &Path) -> String {
    let winner = &search.candidates[search.winner];
    let mut out = String::new();
    let _ = writeln!(out, "{}", why(search));
    if let Some(gap) = check_gap(search) {
        let verdict = if gap.abs() > 0.10 {
            "MORE than 10 %: measure again"
        } else {
            "within 10 %"
        };
        let _ = writeln!(
            out,
            "honesty check (from the file, twice): {:+.0} % from the search's figure, {verdict}",
            gap * 100.0
        );
    }
    let _ = writeln!(
        out,
        "candidates: {}, time: {:.0} s",
        search.candidates.len(),
        search.elapsed.as_secs_f64()
    );
    let _ = writeln!(out, "wrote {} and {}", file.display(), page.display());
    let _ = writeln!(
        out,
        "the same as a command line:\n  {}",
        command_line(search, winner)
    );
    out
}
