//! End-to-end load test: starts the release server binary, drives it with N concurrent
//! closed-loop clients each posting the same real JPEG, and reports images/s and latency
//! percentiles per concurrency level, with the mean batch size the server formed.
//!
//!     cargo bench --bench http -- --image target/test-data/photos/rocket.jpg --concurrency 1,8,32
//!
//! `--protocols v1,v2,grpc` compares the protocols on one server: `/v1` raw image bytes, v2 REST
//! with the binary tensor extension, and v2 gRPC, each asking for the top 5 classes. At each
//! concurrency they run interleaved, `--rounds` times in turn, so that the host's drift hits
//! them alike; the table gives each protocol's median round.
//!
//! `--repeat-ratio R` (v1 only) posts a mix instead of one image: with probability R a
//! byte-identical copy of a variant already answered earlier in the run, else a new variant. The
//! variants are the `--image` JPEG with a unique comment (COM) segment after its SOI marker:
//! the same pixels, different bytes. Two more columns then give the fraction of requests that
//! were repeats and of responses that said `"cached": true` (the response cache's hits).
//!
//! `--model a,b` drives several models of one server side by side: at each concurrency every
//! model gets that many clients at once, and each model has its own row (`V1:a`, `V1:b`).
//!
//! Server flags go after `--server`, e.g. `--server --model lite0=weights/tf_efficientnet_lite0`.

mod support;

use clap::Parser;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Server;
use visionserve::grpc::proto;
use visionserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

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
    /// Model names to post to (default: the server's default model); several, comma-separated,
    /// are loaded side by side, each by its own clients.
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// Protocols to compare: v1, v2 (REST, binary tensors), grpc.
    #[arg(long, value_delimiter = ',', default_value = "v1")]
    protocols: Vec<Protocol>,
    /// Interleaved rounds per protocol and concurrency (the median is reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// v1 only: the fraction of requests (0 to 1) that repeat an image variant already sent;
    /// the others post a new variant. Absent: every request posts the same bytes.
    #[arg(long)]
    repeat_ratio: Option<f64>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
    /// Arguments for the server binary.
    #[arg(long, num_args = 0.., allow_hyphen_values = true)]
    server: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    V1,
    V2,
    Grpc,
}

/// One way of asking for an image's top 5.
#[derive(Clone)]
enum Caller {
    Http {
        client: reqwest::Client,
        url: String,
        headers: Vec<(&'static str, String)>,
        body: bytes::Bytes,
        /// `--repeat-ratio`: the body is chosen per request.
        repeat: Option<Repeat>,
    },
    Grpc {
        client: GrpcInferenceServiceClient<tonic::transport::Channel>,
        request: Box<proto::ModelInferRequest>,
    },
}

impl Caller {
    fn new(
        protocol: Protocol,
        server: &Server,
        client: &reqwest::Client,
        grpc: Option<&GrpcInferenceServiceClient<tonic::transport::Channel>>,
        model: &str,
        image: &[u8],
    ) -> Caller {
        match protocol {
            Protocol::V1 => Caller::Http {
                client: client.clone(),
                url: format!("{}/v1/models/{model}/classify", server.base),
                headers: vec![("content-type", "image/jpeg".into())],
                body: bytes::Bytes::copy_from_slice(image),
                repeat: None,
            },
            Protocol::V2 => {
                let tensor = length_prefixed(image);
                let header = serde_json::to_vec(&serde_json::json!({
                    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": tensor.len()}}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}],
                }))
                .unwrap();
                Caller::Http {
                    client: client.clone(),
                    url: format!("{}/v2/models/{model}/infer", server.base),
                    headers: vec![
                        ("inference-header-content-length", header.len().to_string()),
                        ("content-type", "application/octet-stream".into()),
                    ],
                    body: [header, tensor].concat().into(),
                    repeat: None,
                }
            }
            Protocol::Grpc => Caller::Grpc {
                client: grpc.expect("a gRPC client").clone(),
                request: Box::new(proto::ModelInferRequest {
                    model_name: model.to_owned(),
                    inputs: vec![proto::model_infer_request::InferInputTensor {
                        name: "image".into(),
                        datatype: "BYTES".into(),
                        shape: vec![1],
                        ..Default::default()
                    }],
                    outputs: vec![proto::model_infer_request::InferRequestedOutputTensor {
                        name: "probabilities".into(),
                        parameters: [(
                            "classification".to_owned(),
                            proto::InferParameter {
                                parameter_choice: Some(
                                    proto::infer_parameter::ParameterChoice::Int64Param(5),
                                ),
                            },
                        )]
                        .into(),
                    }],
                    raw_input_contents: vec![length_prefixed(image).into()],
                    ..Default::default()
                }),
            },
        }
    }

    /// Each client its own random stream (`--repeat-ratio`).
    fn reseed(&mut self) {
        if let Caller::Http {
            repeat: Some(repeat),
            ..
        } = self
        {
            repeat.reseed();
        }
    }

    /// Send one request.
    async fn call(&mut self) -> Outcome {
        match self {
            Caller::Http {
                client,
                url,
                headers,
                body,
                repeat,
            } => {
                // `--repeat-ratio`: a variant, and whether it was sent before.
                let picked = repeat.as_mut().map(|r| r.pick());
                let body = match (&*repeat, picked) {
                    (Some(r), Some((variant, _))) => r.body(variant),
                    _ => body.clone(),
                };
                let mut request = client.post(url.as_str()).body(body);
                for (name, value) in headers.iter() {
                    request = request.header(*name, value);
                }
                let response = match request.send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.ok(),
                    _ => None,
                };
                let Some(response) = response else {
                    return Outcome::Failed;
                };
                match (&*repeat, picked) {
                    (Some(r), Some((variant, repeated))) => {
                        if !repeated {
                            r.answered(variant);
                        }
                        Outcome::Ok {
                            repeated,
                            cached: says_cached(&response),
                        }
                    }
                    _ => Outcome::Ok {
                        repeated: false,
                        cached: false,
                    },
                }
            }
            Caller::Grpc { client, request } => match client.model_infer(*request.clone()).await {
                Ok(_) => Outcome::Ok {
                    repeated: false,
                    cached: false,
                },
                Err(_) => Outcome::Failed,
            },
        }
    }
}

enum Outcome {
    Failed,
    /// `repeated`: the body was a variant sent before; `cached`: the response said so.
    Ok {
        repeated: bool,
        cached: bool,
    },
}

/// `--repeat-ratio`: unique variants of one JPEG (a COM segment with a nonce after SOI), and the
/// variants already answered, shared by every client over the whole run.
#[derive(Clone)]
struct Repeat {
    ratio: f64,
    /// The JPEG after its SOI marker.
    rest: bytes::Bytes,
    shared: Arc<Variants>,
    rng: SplitMix64,
}

struct Variants {
    /// The next new variant's nonce.
    next: AtomicU64,
    /// Nonces of the variants a 200 answered, in no particular order.
    answered: Mutex<Vec<u64>>,
    /// Seeds for the clients' random streams.
    seeds: AtomicU64,
}

impl Repeat {
    fn new(ratio: f64, image: &[u8]) -> Repeat {
        let Some(rest) = image.strip_prefix(&[0xFF, 0xD8]) else {
            eprintln!("--repeat-ratio needs a JPEG --image (no SOI marker)");
            std::process::exit(2);
        };
        Repeat {
            ratio,
            rest: bytes::Bytes::copy_from_slice(rest),
            shared: Arc::new(Variants {
                next: AtomicU64::new(0),
                answered: Mutex::new(Vec::new()),
                seeds: AtomicU64::new(0),
            }),
            rng: SplitMix64(0),
        }
    }

    fn reseed(&mut self) {
        self.rng = SplitMix64(self.shared.seeds.fetch_add(1, Ordering::Relaxed));
        // The first outputs of neighbouring seeds differ well after one step.
        self.rng.next();
    }

    /// The variant to send, and whether it was sent before: with probability `ratio` one
    /// already answered (uniformly), else (or when none has been answered yet) a new one.
    fn pick(&mut self) -> (u64, bool) {
        if self.rng.unit() < self.ratio {
            let answered = self.shared.answered.lock().unwrap();
            if !answered.is_empty() {
                let i = self.rng.below(answered.len() as u64) as usize;
                return (answered[i], true);
            }
        }
        (self.shared.next.fetch_add(1, Ordering::Relaxed), false)
    }

    fn answered(&self, variant: u64) {
        self.shared.answered.lock().unwrap().push(variant);
    }

    /// SOI, then a COM segment (FF FE, a big-endian length that counts itself, the text), then
    /// the rest of the image: the same bytes for the same variant.
    fn body(&self, variant: u64) -> bytes::Bytes {
        let text = format!("visionserve bench variant {variant:016x}");
        let mut body = Vec::with_capacity(2 + 4 + text.len() + self.rest.len());
        body.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xFE]);
        body.extend_from_slice(&(2 + text.len() as u16).to_be_bytes());
        body.extend_from_slice(text.as_bytes());
        body.extend_from_slice(&self.rest);
        body.into()
    }
}

/// SplitMix64 (Steele, Lea and Flood): cheap, and good enough to pick requests.
#[derive(Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n), n > 0 (Lemire's multiply-shift; the bias is below 2^-40 here).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// Whether a /v1 response body holds `"cached": true` (one image per request here).
fn says_cached(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"cached\"";
    let mut from = 0;
    while let Some(at) = body[from..].windows(KEY.len()).position(|w| w == KEY) {
        from += at + KEY.len();
        let value = body[from..].trim_ascii_start();
        if let Some(value) = value.strip_prefix(b":") {
            if value.trim_ascii_start().starts_with(b"true") {
                return true;
            }
        }
    }
    false
}

fn length_prefixed(image: &[u8]) -> Vec<u8> {
    [&(image.len() as u32).to_le_bytes()[..], image].concat()
}

/// What one load phase saw.
#[derive(Default)]
struct Load {
    /// Successful requests' latencies (ms), sorted.
    latencies: Vec<f64>,
    errors: usize,
    /// Successful requests that repeated a variant, and whose response said `"cached": true`.
    repeated: usize,
    cached: usize,
}

/// Closed loop: each client sends its next request when the previous one returns.
async fn load(caller: &Caller, clients: usize, duration: Duration) -> Load {
    let stop = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut caller = caller.clone();
        caller.reseed();
        tasks.spawn(async move {
            let mut seen = Load::default();
            while Instant::now() < stop {
                let start = Instant::now();
                match caller.call().await {
                    Outcome::Ok { repeated, cached } => {
                        seen.latencies.push(start.elapsed().as_secs_f64() * 1e3);
                        seen.repeated += repeated as usize;
                        seen.cached += cached as usize;
                    }
                    Outcome::Failed => seen.errors += 1,
                }
            }
            seen
        });
    }
    let mut all = Load::default();
    while let Some(done) = tasks.join_next().await {
        let seen = done.unwrap();
        all.latencies.extend(seen.latencies);
        all.errors += seen.errors;
        all.repeated += seen.repeated;
        all.cached += seen.cached;
    }
    all.latencies.sort_by(f64::total_cmp);
    all
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The images and batches `model` (a name, or name@version) has run so far.
async fn batch_totals(client: &reqwest::Client, base: &str, model: &str) -> (f64, f64) {
    let (name, version) = model
        .split_once('@')
        .map_or((model, None), |(name, version)| (name, Some(version)));
    let label = format!("model=\"{name}\"");
    let version = version.map(|v| format!("version=\"{v}\""));
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
            .filter(|l| l.starts_with(prefix) && l.contains(&label))
            .filter(|l| version.as_ref().is_none_or(|v| l.contains(v.as_str())))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    (
        sum("visionserve_batch_size_sum"),
        sum("visionserve_batch_size_count"),
    )
}

/// One measured round.
struct Round {
    requests: usize,
    errors: usize,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    mean_batch: f64,
    /// Fractions of the successful requests that repeated a variant, and that came back cached.
    repeated: f64,
    cached: f64,
}

/// One round of a group of callers loaded at once (one per model), `clients` each.
async fn measure(
    group: &[Target],
    client: &reqwest::Client,
    base: &str,
    clients: usize,
    seconds: f64,
) -> Vec<Round> {
    let all_at_once = |duration| {
        futures::future::join_all(group.iter().map(|t| load(&t.caller, clients, duration)))
    };
    all_at_once(Duration::from_secs(1)).await;
    let mut before = Vec::new();
    for target in group {
        before.push(batch_totals(client, base, &target.model).await);
    }
    let start = Instant::now();
    let seen = all_at_once(Duration::from_secs_f64(seconds)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut rounds = Vec::new();
    for ((target, seen), (images_before, batches_before)) in group.iter().zip(seen).zip(before) {
        let (images_after, batches_after) = batch_totals(client, base, &target.model).await;
        let latencies = &seen.latencies;
        let requests = latencies.len();
        rounds.push(Round {
            requests,
            errors: seen.errors,
            rate: requests as f64 / elapsed,
            p50: percentile(latencies, 0.50),
            p90: percentile(latencies, 0.90),
            p99: percentile(latencies, 0.99),
            mean_batch: (images_after - images_before) / (batches_after - batches_before).max(1.0),
            repeated: seen.repeated as f64 / requests.max(1) as f64,
            cached: seen.cached as f64 / requests.max(1) as f64,
        });
    }
    rounds
}

/// One row of the table: a protocol calling one model.
struct Target {
    label: String,
    model: String,
    caller: Caller,
}

/// The models to call: `--model`, else the server's default.
async fn model_names(client: &reqwest::Client, base: &str, models: Vec<String>) -> Vec<String> {
    if !models.is_empty() {
        return models;
    }
    let models: serde_json::Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["default"] == true)
        .and_then(|m| m["name"].as_str())
        .map(|name| vec![name.to_owned()])
        .unwrap()
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // cargo bench appends `--bench`, which the greedy `--server` list would swallow.
    args.server.retain(|a| a != "--bench");
    if let Some(ratio) = args.repeat_ratio {
        if args.protocols != [Protocol::V1] {
            eprintln!("--repeat-ratio works with --protocols v1 only (the response cache's flag is in /v1 responses)");
            std::process::exit(2);
        }
        if !(0.0..=1.0).contains(&ratio) {
            eprintln!("--repeat-ratio must be between 0 and 1, not {ratio}");
            std::process::exit(2);
        }
    }
    if args.protocols.contains(&Protocol::Grpc) {
        args.server.extend(["--grpc-port".into(), "0".into()]);
    }
    let body = std::fs::read(&args.image).expect("image readable");
    // Before the server starts: an exit skips its Drop.
    let repeat = args.repeat_ratio.map(|ratio| Repeat::new(ratio, &body));
    let server = Server::start(&args.server);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    server.wait_ready(&client).await;
    let models = model_names(&client, &server.base, args.model.clone()).await;
    let grpc = match &server.grpc {
        Some(address) => {
            // The same flow-control windows as the server, as a tuned client would use.
            let channel = tonic::transport::Endpoint::from_shared(address.clone())
                .unwrap()
                .initial_stream_window_size(visionserve::grpc::STREAM_WINDOW_BYTES)
                .initial_connection_window_size(4 * visionserve::grpc::STREAM_WINDOW_BYTES)
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap();
            Some(GrpcInferenceServiceClient::new(channel))
        }
        None => None,
    };
    // One group per protocol, measured in turn; the models of a group are loaded at once.
    let groups: Vec<Vec<Target>> = args
        .protocols
        .iter()
        .map(|&p| {
            models
                .iter()
                .map(|model| {
                    let mut caller = Caller::new(p, &server, &client, grpc.as_ref(), model, &body);
                    if let Caller::Http { repeat: r, .. } = &mut caller {
                        r.clone_from(&repeat);
                    }
                    let label = match models.len() {
                        1 => format!("{p:?}"),
                        _ => format!("{p:?}:{model}"),
                    };
                    Target {
                        label,
                        model: model.clone(),
                        caller,
                    }
                })
                .collect()
        })
        .collect();
    let (extra_header, extra_rule) = match args.repeat_ratio {
        Some(_) => (" repeated | cached |", "---|---|"),
        None => ("", ""),
    };
    println!("| protocol | clients | requests | errors | images/s | p50 ms | p90 ms | p99 ms | mean batch |{extra_header}");
    println!("|---|---|---|---|---|---|---|---|---|{extra_rule}");
    for &clients in &args.concurrency {
        let targets: Vec<&Target> = groups.iter().flatten().collect();
        let mut rounds: Vec<Vec<Round>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            let mut row = 0;
            for group in &groups {
                for measured in measure(group, &client, &server.base, clients, args.seconds).await {
                    rounds[row].push(measured);
                    row += 1;
                }
            }
        }
        for (target, mut rounds) in targets.iter().zip(rounds) {
            rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let r = &rounds[rounds.len() / 2];
            let extra = match args.repeat_ratio {
                Some(_) => format!(" {:.3} | {:.3} |", r.repeated, r.cached),
                None => String::new(),
            };
            println!(
                "| {} | {clients} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |{extra}",
                target.label, r.requests, r.errors, r.rate, r.p50, r.p90, r.p99, r.mean_batch,
            );
        }
    }
}
