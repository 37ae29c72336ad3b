//! The stress suite (`make stress`): drives the release server through what production does to
//! it and prints one line per check, PASS or FAIL with its figures; exits non-zero if any
//! check fails.
//!
//! - capacity: 8 closed-loop clients, the reference goodput (200s per second);
//! - overload: 16 and 96 closed-loop clients that ignore `Retry-After` -> only 200 and 429,
//!   goodput >= 0.9x capacity, p99 of the 200s within the queue's drain time, RSS bounded;
//! - slow clients: hundreds of connections trickling headers or bodies while 8 clients run ->
//!   their p50 stays within 1.5x (+5 ms) of the capacity run's;
//! - soak: `--soak-requests` requests -> RSS after the first 10 % and at the end within 5 %;
//! - wedged model (the test-only fault hook): not ready, every request answered (200 or 503)
//!   within the batch timeout, then recovery;
//! - SIGTERM under load: admitted requests answered, new ones refused, exit within the
//!   shutdown timeout.
//!
//! ```text
//! cargo bench --bench stress -- --image target/test-data/photos/rocket.jpg \
//!     --server --model lite0=weights/tf_efficientnet_lite0
//! ```

mod support;

use clap::Parser;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};
use support::Server;

#[derive(Parser)]
struct Args {
    /// Image every client posts.
    #[arg(long)]
    image: std::path::PathBuf,
    /// Seconds of each load phase (capacity, each overload level, slow clients).
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Requests in the soak.
    #[arg(long, default_value_t = 100_000)]
    soak_requests: usize,
    /// Connections trickling headers or bodies in the slow-client check.
    #[arg(long, default_value_t = 300)]
    slow_connections: usize,
    /// Checks to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overload,slow,soak,wedge,sigterm"
    )]
    checks: Vec<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
    /// Arguments for the server binary.
    #[arg(long, num_args = 0.., allow_hyphen_values = true)]
    server: Vec<String>,
}

/// What one closed-loop load phase saw.
#[derive(Default)]
struct Phase {
    statuses: BTreeMap<u16, usize>,
    /// Transport errors (connection reset, refused, timed out).
    errors: usize,
    /// Latencies of the 200s, ms, sorted.
    ok_ms: Vec<f64>,
    /// Latency of the slowest answer of any status, ms.
    slowest_ms: f64,
    seconds: f64,
}

impl Phase {
    fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
    fn goodput(&self) -> f64 {
        self.count(200) as f64 / self.seconds
    }
    fn p(&self, q: f64) -> f64 {
        if self.ok_ms.is_empty() {
            return f64::NAN;
        }
        self.ok_ms[((self.ok_ms.len() - 1) as f64 * q).round() as usize]
    }
    fn others(&self, allowed: &[u16]) -> usize {
        self.statuses
            .iter()
            .filter(|(s, _)| !allowed.contains(s))
            .map(|(_, n)| n)
            .sum::<usize>()
            + self.errors
    }
    fn describe(&self) -> String {
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}x{n}"))
            .collect();
        format!(
            "{} errors {}, goodput {:.1}/s, p50 {:.1} ms, p99 {:.1} ms",
            statuses.join(" "),
            self.errors,
            self.goodput(),
            self.p(0.5),
            self.p(0.99)
        )
    }
}

#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    url: String,
    body: bytes::Bytes,
}

impl Load {
    /// Closed loop: `clients` clients, each sending its next request when the previous one is
    /// answered, until `duration` has passed or `total` requests were sent.
    async fn run(&self, clients: usize, duration: Duration, total: Option<usize>) -> Phase {
        let start = Instant::now();
        let stop = start + duration;
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (load, sent) = (self.clone(), sent.clone());
            tasks.spawn(async move {
                let mut phase = Phase::default();
                loop {
                    if Instant::now() >= stop {
                        break;
                    }
                    let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if total.is_some_and(|t| n >= t) {
                        break;
                    }
                    let begun = Instant::now();
                    let answer = load
                        .client
                        .post(&load.url)
                        .header("content-type", "image/jpeg")
                        .body(load.body.clone())
                        .send()
                        .await;
                    let status = match answer {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            match response.bytes().await {
                                Ok(_) => Some(status),
                                Err(_) => None,
                            }
                        }
                        Err(_) => None,
                    };
                    let ms = begun.elapsed().as_secs_f64() * 1e3;
                    phase.slowest_ms = phase.slowest_ms.max(ms);
                    match status {
                        Some(status) => {
                            *phase.statuses.entry(status).or_default() += 1;
                            if status == 200 {
                                phase.ok_ms.push(ms);
                            }
                        }
                        None => phase.errors += 1,
                    }
                }
                phase
            });
        }
        let mut all = Phase::default();
        while let Some(done) = tasks.join_next().await {
            let phase = done.unwrap();
            for (status, n) in phase.statuses {
                *all.statuses.entry(status).or_default() += n;
            }
            all.errors += phase.errors;
            all.ok_ms.extend(phase.ok_ms);
            all.slowest_ms = all.slowest_ms.max(phase.slowest_ms);
        }
        all.ok_ms.sort_by(f64::total_cmp);
        all.seconds = start.elapsed().as_secs_f64();
        all
    }
}

/// Resident memory of `pid`, MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, pass: bool, figures: String) {
        if !pass {
            self.failed += 1;
        }
        println!("{} {name}: {figures}", if pass { "PASS" } else { "FAIL" });
        let _ = std::io::stdout().flush();
    }
}

struct Context {
    args: Args,
    body: bytes::Bytes,
    client: reqwest::Client,
}

impl Context {
    fn load(&self, server: &Server) -> Load {
        Load {
            client: self.client.clone(),
            url: format!("{}/v1/classify", server.base),
            body: self.body.clone(),
        }
    }

    async fn start(&self, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut args = self.args.server.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::start_with_env(&args, envs);
        server.wait_ready(&self.client).await;
        server
    }
}

/// Overload and slow clients, on one server; returns the capacity run for the later checks.
async fn overload_and_slow(ctx: &Context, report: &mut Report) {
    let server = ctx.start(&[], &[]).await;
    let load = ctx.load(&server);
    let seconds = Duration::from_secs_f64(ctx.args.seconds);
    load.run(8, Duration::from_secs(2), None).await;
    let capacity = load.run(8, seconds, None).await;
    report.check(
        "capacity (8 clients)",
        capacity.others(&[200]) == 0,
        capacity.describe(),
    );
    let model: serde_json::Value = ctx
        .client
        .get(format!("{}/v1/models", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queue_limit = model["models"][0]["max_queue_images"]
        .as_f64()
        .unwrap_or(256.0);
    if ctx.args.checks.iter().any(|c| c == "overload") {
        for clients in [16, 96] {
            let phase = load.run(clients, seconds, None).await;
            let ratio = phase.goodput() / capacity.goodput();
            // A 200 waited at most for the admitted queue to drain at capacity.
            let drain_ms = queue_limit / capacity.goodput() * 1e3 * 1.5 + 1000.0;
            let pass = phase.others(&[200, 429]) == 0 && ratio >= 0.9 && phase.p(0.99) <= drain_ms;
            report.check(
                &format!("overload ({clients} clients)"),
                pass,
                format!(
                    "{}; goodput {ratio:.2}x capacity (>= 0.90), p99 bound {drain_ms:.0} ms, RSS {:.0} MiB",
                    phase.describe(),
                    rss_mib(server.child.id())
                ),
            );
        }
    }
    if ctx.args.checks.iter().any(|c| c == "slow") {
        let address = server.base.trim_start_matches("http://").to_owned();
        let mut trickling = trickle(
            &address,
            ctx.args.slow_connections,
            seconds + Duration::from_secs(2),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let phase = load.run(8, seconds, None).await;
        trickling.abort_all();
        let bound = capacity.p(0.5) * 1.5 + 5.0;
        report.check(
            &format!("slow clients ({} trickling)", ctx.args.slow_connections),
            phase.others(&[200]) == 0 && phase.p(0.5) <= bound,
            format!("{}; p50 bound {bound:.1} ms", phase.describe()),
        );
    }
}

/// Open `connections` connections that send their request a byte at a time: half trickle the
/// headers, half send headers announcing a body and trickle that.
fn trickle(address: &str, connections: usize, duration: Duration) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let address = address.to_owned();
        tasks.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let Ok(mut stream) = tokio::net::TcpStream::connect(&address).await else {
                return;
            };
            let head = format!("POST /v1/classify HTTP/1.1\r\nhost: {address}\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n");
            let stop = Instant::now() + duration;
            if i % 2 == 1 {
                let _ = stream.write_all(head.as_bytes()).await;
            }
            let drip = if i % 2 == 0 { head.into_bytes() } else { vec![0xff; 100_000] };
            for byte in drip {
                if Instant::now() >= stop || stream.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    tasks
}

async fn soak(ctx: &Context, report: &mut Report) {
    let server = ctx.start(&[], &[]).await;
    let load = ctx.load(&server);
    let total = ctx.args.soak_requests;
    let first = load
        .run(8, Duration::from_secs(86_400), Some(total / 10))
        .await;
    let early = rss_mib(server.child.id());
    let rest = load
        .run(8, Duration::from_secs(86_400), Some(total - total / 10))
        .await;
    let late = rss_mib(server.child.id());
    let drift = (late - early) / early;
    report.check(
        &format!("soak ({total} requests)"),
        first.others(&[200]) + rest.others(&[200]) == 0 && drift.abs() <= 0.05,
        format!(
            "RSS {early:.0} MiB after {} requests, {late:.0} MiB at the end ({:+.1} %); {}",
            total / 10,
            drift * 100.0,
            rest.describe()
        ),
    );
}

async fn wedge(ctx: &Context, report: &mut Report) {
    let fault =
        std::env::temp_dir().join(format!("visionserve-stress-fault-{}", std::process::id()));
    let _ = std::fs::remove_file(&fault);
    let server = ctx
        .start(
            &["--batch-timeout", "2s"],
            &[("VISIONSERVE_FAULT_FILE", fault.to_str().unwrap())],
        )
        .await;
    let load = ctx.load(&server);
    let during = tokio::spawn({
        let load = load.clone();
        async move { load.run(8, Duration::from_secs(8), None).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&fault, "hang").unwrap();
    let wedged_at = Instant::now();
    let ready = |client: reqwest::Client, base: String| async move {
        client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    while ready(ctx.client.clone(), server.base.clone()).await == 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if wedged_at.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let noticed = wedged_at.elapsed();
    std::fs::remove_file(&fault).unwrap();
    while ready(ctx.client.clone(), server.base.clone()).await != 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if wedged_at.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let recovered = wedged_at.elapsed();
    let phase = during.await.unwrap();
    let after = load.run(8, Duration::from_secs(2), None).await;
    report.check(
        "wedged model",
        noticed < Duration::from_secs(5)
            && recovered < Duration::from_secs(120)
            && phase.others(&[200, 503]) == 0
            && phase.slowest_ms < 5_000.0
            && after.others(&[200]) == 0,
        format!(
            "not ready after {:.1} s, ready again after {:.1} s; during: {}, slowest answer {:.0} ms; after: {}",
            noticed.as_secs_f64(),
            recovered.as_secs_f64(),
            phase.describe(),
            phase.slowest_ms,
            after.describe()
        ),
    );
}

async fn sigterm(ctx: &Context, report: &mut Report) {
    let mut server = ctx.start(&["--shutdown-timeout", "30"], &[]).await;
    let load = ctx.load(&server);
    let during = tokio::spawn({
        let load = load.clone();
        async move { load.run(32, Duration::from_secs(6), None).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signalled = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait();
        (status, server)
    })
    .await
    .unwrap();
    let exited = signalled.elapsed();
    let phase = during.await.unwrap();
    // After the listener closed, new connections are refused (transport errors); a request
    // already sent must still get its answer: 200, 503 if it arrived while draining, or 429
    // if the queue was full.
    let answered = phase.count(200);
    report.check(
        "SIGTERM under load",
        status.0.as_ref().is_ok_and(|s| s.success())
            && exited < Duration::from_secs(30)
            && phase.others(&[200, 429, 503]) == phase.errors
            && answered > 0,
        format!(
            "exit {:?} after {:.2} s; {} (errors are connections refused after the listener closed)",
            status.0.map(|s| s.code()),
            exited.as_secs_f64(),
            phase.describe()
        ),
    );
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // cargo bench appends `--bench`, which the greedy `--server` list would swallow.
    args.server.retain(|a| a != "--bench");
    let body = std::fs::read(&args.image).expect("image readable").into();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let ctx = Context { args, body, client };
    let mut report = Report { failed: 0 };
    let wants = |check: &str| ctx.args.checks.iter().any(|c| c == check);
    if wants("overload") || wants("slow") {
        overload_and_slow(&ctx, &mut report).await;
    }
    if wants("soak") {
        soak(&ctx, &mut report).await;
    }
    if wants("wedge") {
        wedge(&ctx, &mut report).await;
    }
    if wants("sigterm") {
        sigterm(&ctx, &mut report).await;
    }
    if report.failed > 0 {
        println!("{} check(s) failed", report.failed);
        std::process::exit(1);
    }
}
