//! End-to-end load test: starts the release server binary, drives it with N concurrent
//! closed-loop clients each posting the same real JPEG, and reports images/s and latency
//! percentiles per concurrency level, with the mean batch size the server formed.
//!
//!     cargo bench --bench http -- --image target/test-data/photos/rocket.jpg --concurrency 1,8,32
//!
//! Server flags go after `--server`, e.g. `--server --model lite0=weights/tf_efficientnet_lite0`.

use clap::Parser;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Image to post.
    #[arg(long)]
    image: std::path::PathBuf,
    /// Concurrent clients, one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Seconds per measurement (after one second of warm-up load).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Model name to post to (default: the server's default model).
    #[arg(long)]
    model: Option<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
    /// Arguments for the server binary.
    #[arg(long, num_args = 0.., allow_hyphen_values = true)]
    server: Vec<String>,
}

struct Server {
    child: std::process::Child,
    base: String,
}

impl Server {
    fn start(args: &[String]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_visionserve"))
            .args(args)
            .args([
                "--port",
                "0",
                "--log-format",
                "json",
                "--log",
                "warn,visionserve=info",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .expect("server binary starts");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    match event["message"].as_str() {
                        Some("listening") => {
                            let _ = tx.send(event["address"].as_str().unwrap().to_owned());
                        }
                        Some("model loaded and warmed up") => {
                            eprintln!("warm-up: {}", event["warmup"])
                        }
                        _ => {}
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("server address");
        Server {
            child,
            base: format!("http://{addr}"),
        }
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let ready = client
                .get(format!("{}/health/ready", self.base))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Closed loop: each client sends its next request when the previous one returns.
async fn load(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    clients: usize,
    duration: Duration,
) -> (Vec<f64>, usize) {
    let stop = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, url, body) = (
            client.clone(),
            url.to_owned(),
            bytes::Bytes::copy_from_slice(body),
        );
        tasks.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0);
            while Instant::now() < stop {
                let start = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", "image/jpeg")
                    .body(body.clone())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        latencies.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (latencies, e) = done.unwrap();
        all.extend(latencies);
        errors += e;
    }
    all.sort_by(f64::total_cmp);
    (all, errors)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn batch_totals(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    (
        sum("visionserve_batch_size_sum"),
        sum("visionserve_batch_size_count"),
    )
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // cargo bench appends `--bench`, which the greedy `--server` list would swallow.
    args.server.retain(|a| a != "--bench");
    let body = std::fs::read(&args.image).expect("image readable");
    let server = Server::start(&args.server);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    server.wait_ready(&client).await;
    let url = match &args.model {
        Some(model) => format!("{}/v1/models/{model}/classify", server.base),
        None => format!("{}/v1/classify", server.base),
    };
    println!("| clients | requests | errors | images/s | p50 ms | p90 ms | p99 ms | mean batch |");
    println!("|---|---|---|---|---|---|---|---|");
    for &clients in &args.concurrency {
        load(&client, &url, &body, clients, Duration::from_secs(1)).await;
        let (images_before, batches_before) = batch_totals(&client, &server.base).await;
        let start = Instant::now();
        let (latencies, errors) = load(
            &client,
            &url,
            &body,
            clients,
            Duration::from_secs_f64(args.seconds),
        )
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let (images_after, batches_after) = batch_totals(&client, &server.base).await;
        let mean_batch = (images_after - images_before) / (batches_after - batches_before).max(1.0);
        println!(
            "| {clients} | {} | {errors} | {:.1} | {:.1} | {:.1} | {:.1} | {mean_batch:.2} |",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.90),
            percentile(&latencies, 0.99),
        );
    }
}
