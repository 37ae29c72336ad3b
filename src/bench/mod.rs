//! `visionserve bench`: a load generator for any server that speaks `/v1`, KServe v2 REST or
//! KServe v2 gRPC (visionserve, Triton, OpenVINO Model Server, KServe runtimes), as
//! perf_analyzer is for Triton: closed-loop concurrency sweeps or open-loop Poisson rates,
//! measured in windows until stable, with latency percentiles, errors by status, the server's
//! own stage times and, for a server on this machine, its CPU.

pub mod client;
pub mod local;
pub mod measure;
pub mod output;

use anyhow::{bail, Context, Result};
use clap::Args;
use client::{Protocol, Target};
use measure::{Level, Load, Probe, Requests, Snapshot, Windows};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The server's URL (`http://HOST:PORT`; for --protocol grpc its gRPC port), then image
    /// files and folders (searched recursively), sent round robin. With --model, images only.
    #[arg(required = true, value_name = "[URL] IMAGE_OR_DIR")]
    pub inputs: Vec<String>,
    /// Start a visionserve serving this model (a folder, weights file or hf-hub:ORG/REPO, with
    /// `?options`) as a child process, and measure it, instead of a URL.
    #[arg(long)]
    pub model: Option<String>,
    /// More flags for the server --model starts (repeatable), e.g. `--server-arg=--instances=2`.
    #[arg(long = "server-arg", requires = "model", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// The model to send to [default: /v1's default model; for v2 and gRPC the server's only
    /// ready model].
    #[arg(long)]
    pub model_name: Option<String>,
    #[arg(long, value_enum, default_value_t = Protocol::V1)]
    pub protocol: Protocol,
    /// Closed loop: clients, each with one request outstanding, e.g. 1,8,32 (the default).
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    pub concurrency: Vec<usize>,
    /// Open loop: requests per second with Poisson arrivals, e.g. 50,100.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Seconds each measurement window lasts.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before each level's first window (not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Windows tried per level before it is reported as unstable.
    #[arg(long, default_value_t = 10)]
    pub max_windows: usize,
    /// Percent within which three consecutive windows' throughputs and mean latencies must
    /// agree.
    #[arg(long, default_value_t = 10.0)]
    pub stability: f64,
    /// Open loop: requests outstanding at most (beyond it, arrivals count as errors).
    #[arg(long, default_value_t = 1024)]
    pub max_outstanding: usize,
    /// API key, sent as `Authorization: Bearer KEY` (and gRPC metadata).
    #[arg(long, env = "VISIONSERVE_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A header sent with every request, `NAME: VALUE` (gRPC: metadata); repeatable, e.g.
    /// `--header "Priority: 2"`.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The server's process id, for its CPU (found from the port when the server is on this
    /// machine).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Threads that generate load (wrk's -t): few, so that a server on the same machine keeps
    /// its CPUs.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Write the results as JSON or CSV (by the file's extension).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Write a self-contained HTML report (curves and histograms as inline SVG).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// What a bench run measured, for the outputs.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub target: String,
    pub protocol: Protocol,
    pub model: Option<String>,
    pub images: usize,
    pub window_seconds: f64,
    pub machine: String,
    pub results: Vec<Level>,
}

/// The server, the images and the loads a run measures.
#[derive(Debug)]
pub struct Plan {
    pub url: String,
    pub images: Vec<PathBuf>,
    pub loads: Vec<Load>,
}

impl BenchArgs {
    /// Split the positionals into the URL and the images, and the loads to measure.
    pub fn plan(&self) -> Result<Plan> {
        let mut inputs = self.inputs.clone();
        let url = if inputs[0].starts_with("http://") || inputs[0].starts_with("https://") {
            Some(inputs.remove(0))
        } else {
            None
        };
        let url = match (url, &self.model) {
            (Some(_), Some(_)) => bail!("give a server URL or --model, not both"),
            (None, None) => bail!("give a server URL (http://HOST:PORT) or --model SOURCE"),
            (Some(url), None) => url,
            (None, Some(_)) => String::new(),
        };
        let paths: Vec<PathBuf> = inputs.iter().map(PathBuf::from).collect();
        let images = crate::images::files::collect_images(&paths)?;
        if images.is_empty() {
            bail!("no images: give image files or folders holding .jpg, .png, .webp, .gif or .bmp files");
        }
        let loads = if !self.rate.is_empty() {
            if let Some(bad) = self.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
                bail!("--rate values must be positive requests per second, not {bad}");
            }
            self.rate.iter().map(|r| Load::Rate(*r)).collect()
        } else if self.concurrency.is_empty() {
            vec![
                Load::Concurrency(1),
                Load::Concurrency(8),
                Load::Concurrency(32),
            ]
        } else {
            if self.concurrency.contains(&0) {
                bail!("--concurrency values must be at least 1");
            }
            self.concurrency
                .iter()
                .map(|c| Load::Concurrency(*c))
                .collect()
        };
        Ok(Plan { url, images, loads })
    }

    pub fn windows(&self) -> Result<Windows> {
        if !(self.duration > 0.0 && self.duration.is_finite()) || self.max_windows < 3 {
            bail!("--duration must be positive and --max-windows at least 3");
        }
        Ok(Windows {
            warmup: Duration::from_secs_f64(self.warmup.max(0.0)),
            length: Duration::from_secs_f64(self.duration),
            max: self.max_windows,
            stability: self.stability / 100.0,
            max_outstanding: self.max_outstanding.max(1),
        })
    }
}

/// Run `visionserve bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let plan = args.plan()?;
    let windows = args.windows()?;
    let server = match &args.model {
        Some(model) => {
            let mut server_args = vec!["--model".to_owned(), model.clone()];
            server_args.extend(args.server_args.iter().cloned());
            eprintln!("starting visionserve {}", server_args.join(" "));
            Some(local::LocalServer::start(
                &server_args,
                Duration::from_secs(600),
            )?)
        }
        None => None,
    };
    let url = match (&server, args.protocol) {
        (Some(server), Protocol::Grpc) => server.grpc_url.clone(),
        (Some(server), _) => server.url.clone(),
        (None, _) => plan.url.clone(),
    };
    let pid = args
        .server_pid
        .or(server.as_ref().map(local::LocalServer::pid))
        .or_else(|| local_port(&url).and_then(local::pid_listening_on));
    // The model a started server serves is known by the name its spec gives it.
    let model_name = args.model_name.clone().or_else(|| {
        let spec = crate::repository::ModelSpec::parse(args.model.as_deref()?).ok()?;
        Some(spec.name)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let target = Target::connect(
            &url,
            args.protocol,
            model_name.clone(),
            args.api_key.clone(),
        )
        .await?
        .with_headers(args.headers.clone());
        let resolved = target.model.clone();
        let results = measure_loads(target, &plan.images, &plan.loads, windows, pid, true).await?;
        anyhow::Ok((resolved, results))
    })?;
    let (model_name, result) = result;
    let result = BenchResult {
        target: args
            .model
            .clone()
            .map_or(url, |m| format!("visionserve --model {m}")),
        protocol: args.protocol,
        model: model_name,
        images: plan.images.len(),
        window_seconds: args.duration,
        machine: output::machine(),
        results: result,
    };
    print!("{}", output::table(&result));
    if let Some(path) = &args.output {
        output::write_data(path, &result)?;
    }
    if let Some(path) = &args.report {
        std::fs::write(path, output::html(&result))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("report: {}", path.display());
    }
    if let Some(server) = server {
        server.stop();
    }
    Ok(())
}

/// The port of a URL on this machine (loopback or this host's name), whose server's CPU can
/// be read.
fn local_port(url: &str) -> Option<u16> {
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0");
    local.then(|| port.parse().ok()).flatten()
}

/// What bench reads of the server at each window boundary.
struct ServerProbe {
    target: Arc<Target>,
    pid: Option<u32>,
}

impl Probe for ServerProbe {
    async fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Some(Instant::now()),
            statistics: self.target.statistics().await,
            cpu_seconds: self.pid.and_then(local::cpu_seconds),
        }
    }
}

/// Measure each load in turn against `target` with `images`, with a progress bar on the
/// terminal when `progress`.
pub async fn measure_loads(
    target: Target,
    images: &[PathBuf],
    loads: &[Load],
    windows: Windows,
    pid: Option<u32>,
    progress: bool,
) -> Result<Vec<Level>> {
    let mut prepared = Vec::with_capacity(images.len());
    for path in images {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        prepared.push(target.prepare(&bytes));
    }
    let requests = Arc::new(Requests::new(prepared));
    let target = Arc::new(target);
    let probe = ServerProbe {
        target: target.clone(),
        pid,
    };
    let mut levels = Vec::new();
    for load in loads {
        let bar = output::level_bar(*load, windows, progress);
        let on_window = |n: usize, w: &measure::Window| {
            bar.set_position(n as u64);
            bar.set_message(format!(
                "{:.1} resp/s, p99 {:.1} ms",
                w.throughput, w.p99_ms
            ));
        };
        let level = measure::run_level(
            target.clone(),
            requests.clone(),
            *load,
            windows,
            &probe,
            &on_window,
        )
        .await;
        bar.finish_and_clear();
        levels.push(level);
    }
    Ok(levels)
}

/// `NAME: VALUE` as a header to send.
fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not a header: write NAME: VALUE"))?;
    let (name, value) = (name.trim(), value.trim());
    reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| format!("{value:?} is not a header value"))?;
    Ok((name.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(line: &[&str]) -> BenchArgs {
        Wrapper::parse_from(std::iter::once("bench").chain(line.iter().copied())).args
    }

    #[test]
    fn a_url_first_is_the_target_and_the_rest_are_images() {
        let dir = std::env::temp_dir().join(format!("bench-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.jpg"), b"x").unwrap();
        let image = dir.join("a.jpg").display().to_string();
        let plan = parse(&["http://127.0.0.1:8080", &image, "--concurrency", "2,4"])
            .plan()
            .unwrap();
        assert_eq!(plan.url, "http://127.0.0.1:8080");
        assert_eq!(plan.images.len(), 1);
        assert_eq!(plan.loads, vec![Load::Concurrency(2), Load::Concurrency(4)]);
        let plan = parse(&["--model", "m", &image, "--rate", "50"])
            .plan()
            .unwrap();
        assert_eq!(plan.loads, vec![Load::Rate(50.0)]);
        assert!(parse(&[&image])
            .plan()
            .unwrap_err()
            .to_string()
            .contains("URL"));
        assert!(parse(&["http://h:1", "--model", "m", &image])
            .plan()
            .is_err());
        assert!(parse(&["http://h:1", &image, "--rate", "0"])
            .plan()
            .is_err());
        let defaults = parse(&["http://h:1", &image]).plan().unwrap();
        assert_eq!(defaults.loads.len(), 3);
    }

    #[test]
    fn only_loopback_urls_are_local() {
        assert_eq!(local_port("http://127.0.0.1:8080"), Some(8080));
        assert_eq!(local_port("http://localhost:9000/"), Some(9000));
        assert_eq!(local_port("http://example.com:8080"), None);
    }
}
