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
//! Server flags go after `--server`, e.g. `--server --model lite0=weights/tf_efficientnet_lite0`.

mod support;

use clap::Parser;
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
    /// Model name to post to (default: the server's default model).
    #[arg(long)]
    model: Option<String>,
    /// Protocols to compare: v1, v2 (REST, binary tensors), grpc.
    #[arg(long, value_delimiter = ',', default_value = "v1")]
    protocols: Vec<Protocol>,
    /// Interleaved rounds per protocol and concurrency (the median is reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
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

    /// Send one request; true when it succeeded.
    async fn call(&mut self) -> bool {
        match self {
            Caller::Http {
                client,
                url,
                headers,
                body,
            } => {
                let mut request = client.post(url.as_str()).body(body.clone());
                for (name, value) in headers.iter() {
                    request = request.header(*name, value);
                }
                match request.send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
            Caller::Grpc { client, request } => client.model_infer(*request.clone()).await.is_ok(),
        }
    }
}

fn length_prefixed(image: &[u8]) -> Vec<u8> {
    [&(image.len() as u32).to_le_bytes()[..], image].concat()
}

/// Closed loop: each client sends its next request when the previous one returns.
async fn load(caller: &Caller, clients: usize, duration: Duration) -> (Vec<f64>, usize) {
    let stop = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut caller = caller.clone();
        tasks.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0);
            while Instant::now() < stop {
                let start = Instant::now();
                if caller.call().await {
                    latencies.push(start.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
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

/// One measured round.
struct Round {
    requests: usize,
    errors: usize,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    mean_batch: f64,
}

async fn measure(
    caller: &Caller,
    client: &reqwest::Client,
    base: &str,
    clients: usize,
    seconds: f64,
) -> Round {
    load(caller, clients, Duration::from_secs(1)).await;
    let (images_before, batches_before) = batch_totals(client, base).await;
    let start = Instant::now();
    let (latencies, errors) = load(caller, clients, Duration::from_secs_f64(seconds)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let (images_after, batches_after) = batch_totals(client, base).await;
    Round {
        requests: latencies.len(),
        errors,
        rate: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 0.50),
        p90: percentile(&latencies, 0.90),
        p99: percentile(&latencies, 0.99),
        mean_batch: (images_after - images_before) / (batches_after - batches_before).max(1.0),
    }
}

/// The model to call: `--model`, else the server's default.
async fn model_name(client: &reqwest::Client, base: &str, model: Option<String>) -> String {
    if let Some(model) = model {
        return model;
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
        .unwrap()
        .to_owned()
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    // cargo bench appends `--bench`, which the greedy `--server` list would swallow.
    args.server.retain(|a| a != "--bench");
    if args.protocols.contains(&Protocol::Grpc) {
        args.server.extend(["--grpc-port".into(), "0".into()]);
    }
    let body = std::fs::read(&args.image).expect("image readable");
    let server = Server::start(&args.server);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    server.wait_ready(&client).await;
    let model = model_name(&client, &server.base, args.model.clone()).await;
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
    let callers: Vec<(Protocol, Caller)> = args
        .protocols
        .iter()
        .map(|&p| {
            (
                p,
                Caller::new(p, &server, &client, grpc.as_ref(), &model, &body),
            )
        })
        .collect();
    println!("| protocol | clients | requests | errors | images/s | p50 ms | p90 ms | p99 ms | mean batch |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &clients in &args.concurrency {
        let mut rounds: Vec<Vec<Round>> = callers.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            for (i, (_, caller)) in callers.iter().enumerate() {
                rounds[i].push(measure(caller, &client, &server.base, clients, args.seconds).await);
            }
        }
        for ((protocol, _), mut rounds) in callers.iter().zip(rounds) {
            rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let r = &rounds[rounds.len() / 2];
            println!(
                "| {protocol:?} | {clients} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
                r.requests, r.errors, r.rate, r.p50, r.p90, r.p99, r.mean_batch,
            );
        }
    }
}
