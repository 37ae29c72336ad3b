//! Per-key quotas and request priorities, against the real binary.
//!
//! Quotas: two keys with different rates under the same load each get their own share
//! (`burst + rate x time`, within 10 %); a key over its rate gets 429 with `Retry-After` and the
//! IETF `RateLimit` headers over HTTP and RESOURCE_EXHAUSTED over gRPC; metrics name keys by
//! their names, never by the keys; SIGHUP reloads the limits.
//!
//! Priorities: a flood at the low level fills only its share of the queue and gets 429s, while
//! every request at the high level is answered; bad priorities are refused with what is
//! accepted, and RFC 9218's `Priority: u=..` header is ignored.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use visionserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

const ALPHA: &str = "alpha-key-3c9e51";
const BETA: &str = "beta-key-7a20d4";

fn args(extra: &[&str]) -> Vec<String> {
    let model = format!("lite0={}", lite0_dir().display());
    ["--model", &model, "--device", "cpu"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// Requests answered 200 for `key`, sent by `clients` loops until `stop`.
async fn hammer(
    server: Arc<ChildServer>,
    key: &'static str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> usize {
    let answered = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (server, client, stop, answered) = (
            server.clone(),
            client.clone(),
            stop.clone(),
            answered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let response = post_photo(&client, &server.url("/v1/classify"), "rocket.jpg")
                    .bearer_auth(key)
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => {
                        answered.fetch_add(1, Ordering::AcqRel);
                    }
                    429 => {}
                    other => panic!("{key}: unexpected status {other}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    answered.load(Ordering::Acquire)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_keys_each_get_their_own_rate() {
    let dir = temp_dir("quotas");
    let keys_file = dir.join("keys");
    std::fs::write(
        &keys_file,
        format!("{ALPHA} name=alpha rate=4/s burst=4\n{BETA} name=beta rate=8/s burst=8\n"),
    )
    .unwrap();
    let server = ChildServer::start(
        &args(&[
            "--grpc-port",
            "0",
            "--api-keys-file",
            keys_file.to_str().unwrap(),
        ]),
        &[],
    )
    .expect("starts");
    server.wait_ready();
    let server = Arc::new(server);

    // The same load on both keys: three clients each, retrying at once on 429.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let alpha = tokio::spawn(hammer(server.clone(), ALPHA, 3, stop.clone()));
    let beta = tokio::spawn(hammer(server.clone(), BETA, 3, stop.clone()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Release);
    let (alpha, beta) = (alpha.await.unwrap(), beta.await.unwrap());
    let seconds = started.elapsed().as_secs_f64();
    for (key, got, rate, burst) in [("alpha", alpha, 4.0, 4.0), ("beta", beta, 8.0, 8.0)] {
        let share = burst + rate * seconds;
        let off = (got as f64 - share).abs() / share;
        assert!(
            off <= 0.10,
            "{key}: {got} answered in {seconds:.2} s, its share is {share:.1} ({:.0} % off)",
            off * 100.0
        );
    }

    // Over the rate: 429 with Retry-After and the IETF RateLimit headers, and the message
    // names the key's name, never the key.
    let client = reqwest::Client::new();
    let refused = loop {
        let response = post_photo(&client, &server.url("/v1/classify"), "rocket.jpg")
            .bearer_auth(ALPHA)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            break response;
        }
    };
    let headers = refused.headers().clone();
    assert!(headers.contains_key("retry-after"));
    assert_eq!(headers["ratelimit-policy"], "\"images\";q=4;w=1");
    assert!(headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"images\";r=0;t="));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error_type"], "key_rate_limited");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("\"alpha\"") && message.contains("4 images per 1 s"),
        "{message}"
    );
    assert!(!message.contains(ALPHA));

    // gRPC: the same limit, RESOURCE_EXHAUSTED.
    let mut grpc = GrpcInferenceServiceClient::connect(server.grpc.clone().unwrap())
        .await
        .unwrap();
    let code = loop {
        let mut request =
            tonic::Request::new(grpc_image_request("lite0", read("photos/rocket.jpg")));
        request
            .metadata_mut()
            .insert("x-api-key", ALPHA.parse().unwrap());
        if let Err(status) = grpc.model_infer(request).await {
            break status.code();
        }
    };
    assert_eq!(code, tonic::Code::ResourceExhausted);

    // Metrics name keys by their names.
    let metrics = scrape(&server.url("")).await;
    let images = metric(&metrics, "visionserve_key_images_total{key=\"beta\"}").unwrap();
    assert!(images >= beta as f64, "{images} < {beta}");
    assert!(
        metric(
            &metrics,
            "visionserve_key_refused_requests_total{key=\"alpha\",limit=\"rate\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(!metrics.contains(ALPHA) && !metrics.contains(BETA));

    // SIGHUP reloads the limits: alpha loses its rate, and beta's bucket is kept.
    std::fs::write(
        &keys_file,
        format!("{ALPHA} name=alpha\n{BETA} name=beta rate=8/s burst=8\n"),
    )
    .unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut in_a_row = 0;
    while in_a_row < 12 {
        assert!(
            Instant::now() < deadline,
            "alpha's rate was not lifted by SIGHUP"
        );
        let response = post_photo(&client, &server.url("/v1/classify"), "rocket.jpg")
            .bearer_auth(ALPHA)
            .send()
            .await
            .unwrap();
        in_a_row = if response.status() == 200 {
            in_a_row + 1
        } else {
            0
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_low_priority_flood_is_refused_and_the_high_level_answered() {
    let server = ChildServer::start(
        &args(&[
            "--priority-levels",
            "2",
            "--default-priority",
            "2",
            "--priority-queue-images",
            "32,2",
            "--max-images-per-request",
            "2",
        ]),
        &[],
    )
    .expect("starts");
    server.wait_ready();
    let server = Arc::new(server);
    let client = reqwest::Client::new();

    // The flood: twelve clients at the default (low) level.
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..12 {
        let (server, client, stop, refused) = (
            server.clone(),
            client.clone(),
            stop.clone(),
            refused.clone(),
        );
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let response = post_photo(&client, &server.url("/v1/classify"), "rocket.jpg")
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => {}
                    429 => {
                        let body: serde_json::Value = response.json().await.unwrap();
                        assert_eq!(body["error_type"], "overloaded");
                        refused.fetch_add(1, Ordering::AcqRel);
                    }
                    other => panic!("flood: unexpected status {other}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The trickle at the high level, by each way of asking: every one answered.
    for round in 0..8 {
        let url = server.url("/v1/classify");
        let response = match round % 3 {
            0 => post_photo(&client, &format!("{url}?priority=1"), "rocket.jpg"),
            1 => post_photo(&client, &url, "rocket.jpg").header("priority", "1"),
            _ => post_photo(&client, &format!("{url}?priority=1"), "rocket.jpg")
                .header("priority", "u=0, i"),
        }
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 200, "high-priority request {round}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Release);
    for task in flood {
        task.await.unwrap();
    }
    assert!(
        refused.load(Ordering::Acquire) > 0,
        "the low level's queue share (2 images) must refuse part of a 12-client flood"
    );

    let metrics = scrape(&server.url("")).await;
    let waits = |level: &str| {
        metric(
            &metrics,
            &format!(
                "visionserve_priority_queue_wait_seconds_count{{model=\"lite0\",version=\"1\",priority=\"{level}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(waits("1") >= 8.0 && waits("2") > 0.0, "{metrics}");
    assert!(metrics.contains("visionserve_priority_admitted_images{"));

    // Bad priorities name what is accepted.
    let response = post_photo(
        &client,
        &server.url("/v1/classify?priority=3"),
        "rocket.jpg",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("between 1 (highest) and 2 (lowest)"),
        "{message}"
    );
    let response = post_photo(&client, &server.url("/v1/classify"), "rocket.jpg")
        .header("priority", "urgent")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let v2 = client
        .post(server.url("/v2/models/lite0/infer"))
        .json(&serde_json::json!({
            "parameters": {"priority": "high"},
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(v2.status(), 400);
    let body: serde_json::Value = v2.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("\"priority\""), "{message}");
}
