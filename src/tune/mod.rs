//! `visionserve tune`: the configuration that serves the most images per second on this
//! machine, with this model, while its p99 latency at a given concurrency meets a target (as
//! Triton's Model Analyzer does for Triton).
//!
//! The search is coordinate descent from the defaults: one setting at a time, each of its
//! values measured with every other setting at the best found so far, the best kept when it
//! beats the incumbent by more than the noise margin. Settings are ordered by how much they
//! have moved throughput in BENCHMARKS.md (backend, copies, batch size, batch delay, decode
//! threads, then the output-changing ones). A full grid is ~10^3 candidates; one pass of
//! coordinate descent is ~15, which fits a few minutes. Each candidate is a fresh server
//! process measured by `bench`'s own windows. The winner is then started again from the
//! written file and measured twice, and the report shows those figures beside the search's.

mod report;
mod space;

use crate::bench::client::{Protocol, Target};
use crate::bench::local::LocalServer;
use crate::bench::measure::{Level, Load, Windows};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use space::Settings;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct TuneArgs {
    /// The model (a folder, weights file or hf-hub:ORG/REPO, optionally NAME=SOURCE).
    #[arg(long)]
    pub model: String,
    /// The p99 latency (ms) the winner must meet at --concurrency.
    #[arg(long, default_value_t = 100.0)]
    pub p99_ms: f64,
    /// Clients (closed loop) the p99 target is measured at.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long the search may take, honesty check included (e.g. 10m, 90s).
    #[arg(long, default_value = "10m", value_parser = parse_budget)]
    pub time_budget: Duration,
    /// Also try bf16 (it changes outputs: the report gives its top-1 agreement with f32).
    #[arg(long)]
    pub allow_bf16: bool,
    /// Also try decoding large JPEGs reduced (--jpeg-draft; it changes outputs: the report
    /// gives its top-1 agreement).
    #[arg(long)]
    pub allow_jpeg_draft: bool,
    /// Where visionserve.toml and tune-report.html are written.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Images to send, files or folders [default: a few synthetic photo-sized JPEGs, written
    /// to --out-dir; your own images measure what you will serve].
    pub inputs: Vec<PathBuf>,
}

/// `10m`, `90s`, `1h` or seconds.
fn parse_budget(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = match text.char_indices().last() {
        Some((i, 'h')) => (&text[..i], 3600.0),
        Some((i, 'm')) => (&text[..i], 60.0),
        Some((i, 's')) => (&text[..i], 1.0),
        _ => (text, 1.0),
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| Duration::from_secs_f64(v * scale))
        .ok_or_else(|| format!("a time budget is e.g. 10m, 90s or 1h, not {text:?}"))
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    pub settings: Settings,
    /// What was being searched when it was tried (`defaults`, `max_batch_size`, `check`).
    pub stage: String,
    pub level: Option<Level>,
    /// Why it has no figures (it failed to start, or to answer).
    pub failure: Option<String>,
    /// Seconds from start to ready.
    pub startup_s: f64,
    /// Top-1 agreement with the defaults on the images, for output-changing settings.
    pub agreement: Option<(usize, usize)>,
}

impl Candidate {
    pub fn meets(&self, p99_ms: f64) -> bool {
        self.level
            .as_ref()
            .is_some_and(|l| l.p99_ms <= p99_ms && l.errors == 0)
    }

    pub fn throughput(&self) -> f64 {
        self.level.as_ref().map_or(0.0, |l| l.throughput)
    }

    pub fn p99(&self) -> f64 {
        self.level.as_ref().map_or(f64::INFINITY, |l| l.p99_ms)
    }
}

/// A candidate's score: those meeting the target by throughput, above every one that does
/// not (which rank by p99, lower first).
fn better(a: &Candidate, b: &Candidate, p99_ms: f64, margin: f64) -> bool {
    match (a.meets(p99_ms), b.meets(p99_ms)) {
        (true, false) => true,
        (false, true) => false,
        (true, true) => a.throughput() > b.throughput() * (1.0 + margin),
        (false, false) => a.p99() * (1.0 + margin) < b.p99(),
    }
}

/// Improvements smaller than this are within these hosts' noise between runs.
const NOISE_MARGIN: f64 = 0.05;

/// The search's state, for the report.
pub struct Search {
    pub args: TuneArgs,
    pub model_name: String,
    pub source: String,
    pub images: Vec<PathBuf>,
    pub synthetic_images: bool,
    pub candidates: Vec<Candidate>,
    pub winner: usize,
    pub checks: Vec<Candidate>,
    pub untried: Vec<String>,
    pub elapsed: Duration,
    pub window: Duration,
    pub machine: String,
    /// The server's defaults: what every candidate's settings are written against.
    pub defaults: Settings,
}

/// Run `visionserve tune`.
pub fn run(args: TuneArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    if args.concurrency == 0 || args.p99_ms.is_nan() || args.p99_ms <= 0.0 {
        bail!("--concurrency must be at least 1 and --p99-ms positive");
    }
    let spec = crate::repository::ModelSpec::parse(&args.model).map_err(anyhow::Error::msg)?;
    let (images, synthetic_images) = match args.inputs.is_empty() {
        true => (space::synthetic_images(&args.out_dir)?, true),
        false => (crate::images::files::collect_images(&args.inputs)?, false),
    };
    if images.is_empty() {
        bail!("no images in {:?}", args.inputs);
    }
    let cpus = crate::budget::Resources::detect().cpus;
    let cuda = tch::Cuda::is_available();
    let axes = space::axes(cpus, cuda, args.allow_bf16, args.allow_jpeg_draft);
    let planned = 1 + axes.iter().map(|a| a.values.len() - 1).sum::<usize>() + 2;
    let window = (args.time_budget / planned as u32 / 8)
        .clamp(Duration::from_secs(1), Duration::from_secs(5));
    let start = Instant::now();
    let bar = progress(args.time_budget);
    let mut search = Search {
        model_name: spec.name.clone(),
        // The source with its own `?options`, which every candidate keeps.
        source: match search_query(&args.model) {
            Some(query) => format!("{}?{query}", spec.source),
            None => spec.source.clone(),
        },
        args,
        images,
        synthetic_images,
        candidates: Vec::new(),
        winner: 0,
        checks: Vec::new(),
        untried: Vec::new(),
        elapsed: Duration::ZERO,
        window,
        machine: crate::bench::output::machine(),
        defaults: Settings::defaults(cpus, cuda),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let measure = |settings: &Settings, stage: &str, compare: Compare, search: &Search| {
        bar.set_message(format!("{stage}: {}", settings.label()));
        runtime.block_on(measure_candidate(search, settings, stage, compare))
    };
    let defaults = Settings::defaults(cpus, cuda);
    let first = measure(&defaults, "defaults", Compare::Record, &search);
    // The longest candidate so far: a search stops while this one more, and the two honesty
    // checks, still fit the budget.
    let mut longest = start.elapsed();
    if let Some(failure) = &first.0.failure {
        bar.finish_and_clear();
        bail!("the model does not serve with the default settings, so there is nothing to tune: {failure}");
    }
    let baseline_top1 = first.1.clone();
    search.candidates.push(first.0);
    let mut best = search.candidates[0].settings.clone();
    let margin_note =
        |c: &Candidate| format!("{:.1} resp/s, p99 {:.1} ms", c.throughput(), c.p99());
    for axis in &axes {
        for value in &axis.values {
            let settings = best.with(axis.name, value);
            if settings == best {
                continue;
            }
            if start.elapsed() + longest * 3 > search.args.time_budget {
                search.untried.push(format!("{}={value}", axis.name));
                continue;
            }
            let began = Instant::now();
            let compare = match (axis.changes_outputs, &baseline_top1) {
                (true, Some(top1)) => Compare::Against(top1),
                _ => Compare::Skip,
            };
            let (candidate, _) = measure(&settings, axis.name, compare, &search);
            longest = longest.max(began.elapsed());
            let incumbent = &search.candidates[search.winner];
            let wins = better(&candidate, incumbent, search.args.p99_ms, NOISE_MARGIN);
            search.candidates.push(candidate);
            if wins {
                search.winner = search.candidates.len() - 1;
                best = settings;
            }
            bar.set_prefix(margin_note(&search.candidates[search.winner]));
        }
    }
    let winner = search.candidates[search.winner].clone();
    let file = search.args.out_dir.join("visionserve.toml");
    std::fs::write(&file, report::config_toml(&search, &winner))
        .with_context(|| format!("cannot write {}", file.display()))?;
    for round in 1..=2 {
        bar.set_message(format!(
            "honesty check {round}/2: the winner from {}",
            file.display()
        ));
        let check = runtime.block_on(measure_from_file(&search, &file, &winner.settings));
        search.checks.push(check);
    }
    bar.finish_and_clear();
    search.elapsed = start.elapsed();
    let page = search.args.out_dir.join("tune-report.html");
    std::fs::write(&page, report::html(&search))
        .with_context(|| format!("cannot write {}", page.display()))?;
    print!("{}", report::summary(&search, &file, &page));
    Ok(())
}

fn search_query(model: &str) -> Option<&str> {
    model
        .split_once('?')
        .map(|(_, query)| query)
        .filter(|q| !q.is_empty())
}

/// A bar over the whole budget, with the time left and the best so far.
fn progress(budget: Duration) -> ProgressBar {
    let bar = ProgressBar::new(budget.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template(
            "tune [{bar:24}] {elapsed} of {len}s, ~{eta} left | best: {prefix} | {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let ticker = bar.clone();
    let start = Instant::now();
    std::thread::spawn(move || {
        while !ticker.is_finished() {
            ticker.set_position(start.elapsed().as_secs());
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    bar
}

fn windows(search: &Search) -> Windows {
    Windows {
        warmup: search.window,
        length: search.window,
        max: 5,
        stability: 0.10,
        max_outstanding: 1024,
    }
}

/// Whether a candidate's top-1 classes on the images are read, and compared.
#[derive(Clone, Copy)]
enum Compare<'a> {
    /// The defaults: read them, as the reference.
    Record,
    /// An output-changing setting: read them and count agreement with the defaults'.
    Against(&'a [usize]),
    Skip,
}

/// Start a fresh server with `settings`, measure it at the target concurrency, stop it.
async fn measure_candidate(
    search: &Search,
    settings: &Settings,
    stage: &str,
    compare: Compare<'_>,
) -> (Candidate, Option<Vec<usize>>) {
    let args = settings
        .changed_from(&search.defaults)
        .server_args(&search.model_name, &search.source);
    measure_server(search, settings, stage, &args, compare).await
}

/// The honesty check: the winner started from the written file.
async fn measure_from_file(
    search: &Search,
    file: &std::path::Path,
    settings: &Settings,
) -> Candidate {
    let args = vec!["--config".to_owned(), file.display().to_string()];
    measure_server(search, settings, "check", &args, Compare::Skip)
        .await
        .0
}

async fn measure_server(
    search: &Search,
    settings: &Settings,
    stage: &str,
    server_args: &[String],
    compare: Compare<'_>,
) -> (Candidate, Option<Vec<usize>>) {
    let mut candidate = Candidate {
        settings: settings.clone(),
        stage: stage.to_owned(),
        level: None,
        failure: None,
        startup_s: 0.0,
        agreement: None,
    };
    let started = Instant::now();
    let args = server_args.to_vec();
    let server = match tokio::task::spawn_blocking(move || {
        LocalServer::start(&args, Duration::from_secs(600))
    })
    .await
    {
        Ok(Ok(server)) => server,
        Ok(Err(e)) => {
            candidate.failure = Some(first_line(&format!("{e:#}")));
            return (candidate, None);
        }
        Err(e) => {
            candidate.failure = Some(e.to_string());
            return (candidate, None);
        }
    };
    candidate.startup_s = started.elapsed().as_secs_f64();
    let measured = async {
        let target = Target::connect(
            &server.url,
            Protocol::V1,
            Some(search.model_name.clone()),
            None,
        )
        .await?;
        let top1 = match compare {
            Compare::Skip => None,
            _ => Some(space::top1(&server.url, &search.model_name, &search.images).await?),
        };
        let loads = [Load::Concurrency(search.args.concurrency)];
        let mut levels = crate::bench::measure_loads(
            target,
            &search.images,
            &loads,
            windows(search),
            Some(server.pid()),
            false,
        )
        .await?;
        anyhow::Ok((levels.remove(0), top1))
    }
    .await;
    let top1 = match measured {
        Ok((level, top1)) => {
            candidate.level = Some(level);
            top1
        }
        Err(e) => {
            candidate.failure = Some(first_line(&format!("{e:#}")));
            None
        }
    };
    if let (Compare::Against(base), Some(mine)) = (compare, &top1) {
        let same = base.iter().zip(mine).filter(|(a, b)| a == b).count();
        candidate.agreement = Some((same, base.len()));
    }
    let _ = tokio::task::spawn_blocking(move || server.stop()).await;
    (candidate, top1)
}

fn first_line(text: &str) -> String {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(throughput: f64, p99_ms: f64) -> Candidate {
        let mut level = Level::empty(Load::Concurrency(32));
        level.throughput = throughput;
        level.p99_ms = p99_ms;
        Candidate {
            settings: Settings::defaults(2, false),
            stage: "test".into(),
            level: Some(level),
            failure: None,
            startup_s: 0.0,
            agreement: None,
        }
    }

    #[test]
    fn meeting_the_target_beats_any_throughput_that_does_not() {
        let fast_but_slow_tail = candidate(200.0, 150.0);
        let within = candidate(100.0, 90.0);
        assert!(better(&within, &fast_but_slow_tail, 100.0, 0.05));
        assert!(!better(&fast_but_slow_tail, &within, 100.0, 0.05));
        // Within the target, throughput decides, beyond the noise margin only.
        assert!(better(&candidate(110.0, 50.0), &within, 100.0, 0.05));
        assert!(!better(&candidate(103.0, 50.0), &within, 100.0, 0.05));
        // Neither meets it: the lower p99 is closer.
        assert!(better(
            &candidate(50.0, 120.0),
            &fast_but_slow_tail,
            100.0,
            0.05
        ));
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_budget("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_budget("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_budget("45"), Ok(Duration::from_secs(45)));
        assert!(parse_budget("soon").is_err());
        assert!(parse_budget("0m").is_err());
    }
}
