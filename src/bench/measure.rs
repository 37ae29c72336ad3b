//! Load and measurement: a closed loop of N clients (each sends its next request when its last
//! is answered) or an open loop of Poisson arrivals at a rate (latency counted from when a
//! request was due, so a slow server cannot hide its queue: no coordinated omission), measured
//! in windows repeated until three in a row agree, as perf_analyzer's are.

use super::client::{Outcome, Prepared, Target};
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One level of load.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Load {
    /// Closed loop: this many clients, each with one request outstanding.
    Concurrency(usize),
    /// Open loop: requests per second, Poisson arrivals.
    Rate(f64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(n) => write!(f, "concurrency {n}"),
            Load::Rate(r) => write!(f, "rate {r}/s"),
        }
    }
}

/// How windows are measured.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Load before the first window, not counted (connections, the server's caches).
    pub warmup: Duration,
    pub length: Duration,
    /// Windows tried before a level is reported as unstable.
    pub max: usize,
    /// Three windows in a row are stable when their throughputs and mean latencies are each
    /// within this fraction of one another (max <= min * (1 + stability)).
    pub stability: f64,
    /// Open loop: requests outstanding at most; arrivals beyond it count as `client overloaded`
    /// errors (the server is far behind the rate).
    pub max_outstanding: usize,
}

/// One answered (or failed) request.
#[derive(Debug, Clone)]
pub struct Sample {
    pub latency: Duration,
    pub outcome: Outcome,
    pub stages: Vec<(String, f64)>,
}

/// What one window saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    pub throughput: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

/// A level's figures over its reported windows (the last three).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Level {
    /// `"concurrency": N` or `"rate": R` in JSON.
    #[serde(flatten)]
    pub load: Load,
    /// Successful responses per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub responses: usize,
    /// Failed requests, all statuses together.
    pub errors: usize,
    pub errors_by_status: BTreeMap<String, usize>,
    /// Whether three consecutive windows agreed within the stability bound.
    pub stable: bool,
    pub windows: Vec<Window>,
    /// The server's mean stage times per request (ms), where it reports them.
    pub server_stages: BTreeMap<String, f64>,
    /// CPU cores the server process used (local servers only).
    pub server_cpu_cores: Option<f64>,
    /// Successful requests' latencies (ms), for the report's histograms.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

impl Level {
    /// A level with nothing measured.
    pub fn empty(load: Load) -> Self {
        summarize_level(load, &[], Duration::ZERO, false, Vec::new())
    }
}

/// Samples as they arrive, taken window by window.
#[derive(Default)]
struct Recorder {
    samples: Mutex<Vec<Sample>>,
}

impl Recorder {
    fn push(&self, sample: Sample) {
        self.samples.lock().unwrap().push(sample);
    }

    fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

/// The images' requests, sent round robin.
pub struct Requests {
    prepared: Vec<Prepared>,
    next: AtomicUsize,
}

impl Requests {
    pub fn new(prepared: Vec<Prepared>) -> Self {
        assert!(!prepared.is_empty(), "at least one image");
        Self {
            prepared,
            next: AtomicUsize::new(0),
        }
    }

    fn next(&self) -> &Prepared {
        &self.prepared[self.next.fetch_add(1, Ordering::Relaxed) % self.prepared.len()]
    }
}

/// What the caller observes of the server between windows (statistics, CPU).
pub trait Probe {
    /// Called at each window boundary; returns an opaque snapshot.
    fn snapshot(&self) -> impl std::future::Future<Output = Snapshot> + Send;
}

/// The server's state at a window boundary.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub at: Option<Instant>,
    pub statistics: Option<super::client::Statistics>,
    pub cpu_seconds: Option<f64>,
}

/// Reports each finished window (for a progress bar).
pub type OnWindow<'a> = &'a (dyn Fn(usize, &Window) + Sync);

/// Run one level: warm up, then windows until three in a row agree or `windows.max` ran.
pub async fn run_level(
    target: Arc<Target>,
    requests: Arc<Requests>,
    load: Load,
    windows: Windows,
    probe: &impl Probe,
    on_window: OnWindow<'_>,
) -> Level {
    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    let generator = match load {
        Load::Concurrency(n) => closed_loop(&target, &requests, &recorder, &stop, n),
        Load::Rate(rate) => open_loop(
            &target,
            &requests,
            &recorder,
            &stop,
            rate,
            windows.max_outstanding,
        ),
    };
    tokio::time::sleep(windows.warmup).await;
    recorder.take();
    let mut snapshots = vec![probe.snapshot().await];
    let mut measured: Vec<(Vec<Sample>, Window)> = Vec::new();
    while measured.len() < windows.max {
        let start = Instant::now();
        tokio::time::sleep(windows.length).await;
        let samples = recorder.take();
        let window = summarize_window(&samples, start.elapsed());
        on_window(measured.len() + 1, &window);
        measured.push((samples, window));
        snapshots.push(probe.snapshot().await);
        if is_stable(&measured, windows.stability) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in generator {
        task.abort();
    }
    let stable = is_stable(&measured, windows.stability);
    let reported = measured.len().min(3);
    let first = measured.len() - reported;
    let (from, to) = (&snapshots[first], &snapshots[measured.len()]);
    let all_windows = measured.iter().map(|(_, w)| w.clone()).collect();
    let samples: Vec<Sample> = measured.drain(first..).flat_map(|(s, _)| s).collect();
    let mut level = summarize_level(load, &samples, elapsed(from, to), stable, all_windows);
    if let (Some(a), Some(b)) = (&from.statistics, &to.statistics) {
        let from_stats: BTreeMap<String, f64> =
            super::client::stage_means(a, b).into_iter().collect();
        if level.server_stages.is_empty() {
            level.server_stages = from_stats;
        }
    }
    if let (Some(a), Some(b)) = (from.cpu_seconds, to.cpu_seconds) {
        level.server_cpu_cores = Some((b - a) / elapsed(from, to).as_secs_f64());
    }
    level
}

fn elapsed(from: &Snapshot, to: &Snapshot) -> Duration {
    match (from.at, to.at) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => Duration::ZERO,
    }
}

/// N clients, each sending its next request once its last is answered.
fn closed_loop(
    target: &Arc<Target>,
    requests: &Arc<Requests>,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
    clients: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (target, requests, recorder, stop) = (
                target.clone(),
                requests.clone(),
                recorder.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let reply = target.send(requests.next()).await;
                    recorder.push(Sample {
                        latency: start.elapsed(),
                        outcome: reply.outcome,
                        stages: reply.stages,
                    });
                }
            })
        })
        .collect()
}

/// Poisson arrivals at `rate` per second; each request's latency counts from when it was due.
fn open_loop(
    target: &Arc<Target>,
    requests: &Arc<Requests>,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
    rate: f64,
    max_outstanding: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (target, requests, recorder, stop) = (
        target.clone(),
        requests.clone(),
        recorder.clone(),
        stop.clone(),
    );
    let scheduler = tokio::spawn(async move {
        let gaps = Exp::new(rate).expect("a positive rate");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let outstanding = Arc::new(AtomicUsize::new(0));
        let mut due = tokio::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            due += Duration::from_secs_f64(gaps.sample(&mut rng));
            tokio::time::sleep_until(due).await;
            if outstanding.load(Ordering::Relaxed) >= max_outstanding {
                recorder.push(Sample {
                    latency: Duration::ZERO,
                    outcome: Outcome::Refused("client overloaded".into()),
                    stages: Vec::new(),
                });
                continue;
            }
            outstanding.fetch_add(1, Ordering::Relaxed);
            let (target, requests, recorder, outstanding) = (
                target.clone(),
                requests.clone(),
                recorder.clone(),
                outstanding.clone(),
            );
            let due = due.into_std();
            tokio::spawn(async move {
                let reply = target.send(requests.next()).await;
                recorder.push(Sample {
                    latency: due.elapsed(),
                    outcome: reply.outcome,
                    stages: reply.stages,
                });
                outstanding.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    vec![scheduler]
}

/// Three windows in a row whose throughputs and mean latencies each agree within `stability`.
fn is_stable(measured: &[(Vec<Sample>, Window)], stability: f64) -> bool {
    if measured.len() < 3 {
        return false;
    }
    let last: Vec<&Window> = measured[measured.len() - 3..]
        .iter()
        .map(|(_, w)| w)
        .collect();
    let agree = |values: Vec<f64>| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        min > 0.0 && max <= min * (1.0 + stability)
    };
    agree(last.iter().map(|w| w.throughput).collect())
        && agree(last.iter().map(|w| w.mean_ms).collect())
}

fn ok_latencies_ms(samples: &[Sample]) -> Vec<f64> {
    let mut latencies: Vec<f64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Ok)
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn summarize_window(samples: &[Sample], length: Duration) -> Window {
    let latencies = ok_latencies_ms(samples);
    Window {
        throughput: latencies.len() as f64 / length.as_secs_f64(),
        mean_ms: mean(&latencies),
        p99_ms: percentile(&latencies, 0.99),
        errors: samples.len() - latencies.len(),
    }
}

fn summarize_level(
    load: Load,
    samples: &[Sample],
    span: Duration,
    stable: bool,
    windows: Vec<Window>,
) -> Level {
    let latencies = ok_latencies_ms(samples);
    let mut errors_by_status = BTreeMap::new();
    for label in samples.iter().filter_map(|s| s.outcome.label()) {
        *errors_by_status.entry(label).or_default() += 1;
    }
    Level {
        load,
        throughput: latencies.len() as f64 / span.as_secs_f64().max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        mean_ms: mean(&latencies),
        responses: latencies.len(),
        errors: samples.len() - latencies.len(),
        errors_by_status,
        stable,
        windows,
        server_stages: mean_stages(samples),
        server_cpu_cores: None,
        latencies_ms: latencies,
    }
}

/// The mean of each `Server-Timing` stage over the answers that carried it.
fn mean_stages(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (name, ms) in samples.iter().flat_map(|s| &s.stages) {
        let entry = sums.entry(name.clone()).or_default();
        entry.0 += ms;
        entry.1 += 1;
    }
    sums.into_iter()
        .map(|(name, (sum, n))| (name, sum / n as f64))
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(throughput: f64, mean_ms: f64) -> (Vec<Sample>, Window) {
        (
            Vec::new(),
            Window {
                throughput,
                mean_ms,
                p99_ms: 0.0,
                errors: 0,
            },
        )
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn stable_needs_three_agreeing_windows_in_a_row() {
        let stable = [window(100.0, 10.0), window(105.0, 10.5), window(98.0, 10.2)];
        assert!(is_stable(&stable, 0.10));
        assert!(!is_stable(&stable[..2], 0.10));
        let drifting = [window(100.0, 10.0), window(120.0, 10.0), window(98.0, 10.0)];
        assert!(!is_stable(&drifting, 0.10));
        let latency_drifts = [
            window(100.0, 10.0),
            window(100.0, 14.0),
            window(100.0, 10.0),
        ];
        assert!(!is_stable(&latency_drifts, 0.10));
        let no_answers = [window(0.0, 0.0), window(0.0, 0.0), window(0.0, 0.0)];
        assert!(!is_stable(&no_answers, 0.10));
    }

    #[test]
    fn errors_are_counted_by_status_and_left_out_of_latency() {
        let sample = |ms: u64, outcome: Outcome| Sample {
            latency: Duration::from_millis(ms),
            outcome,
            stages: vec![("queue".into(), ms as f64)],
        };
        let samples = vec![
            sample(10, Outcome::Ok),
            sample(30, Outcome::Ok),
            sample(1, Outcome::Refused("HTTP 429".into())),
            sample(1, Outcome::Refused("HTTP 429".into())),
            sample(1, Outcome::Transport("reset".into())),
        ];
        let level = summarize_level(
            Load::Concurrency(2),
            &samples,
            Duration::from_secs(2),
            true,
            vec![],
        );
        assert_eq!(level.responses, 2);
        assert_eq!(level.throughput, 1.0);
        assert_eq!(level.errors, 3);
        assert_eq!(level.errors_by_status["HTTP 429"], 2);
        assert_eq!(level.errors_by_status["connection"], 1);
        assert_eq!(level.max_ms, 30.0);
        // Server-Timing stages average over every answer that carried them.
        assert!((level.server_stages["queue"] - 8.6).abs() < 1e-9);
    }
}
