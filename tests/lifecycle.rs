//! Start-up, overload and shutdown behaviour.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_429_with_retry_after() {
    let lite0 = lite0_dir();
    let mut config = config_for(&[format!("lite0={}", lite0.join("model.pt").display())]);
    config.max_batch_size = Some(1);
    config.max_queue_images = 2;
    config.max_images_per_request = 1;
    let server = TestServer::start(config);
    let client = reqwest::Client::new();
    let photo = read("photos/astronaut.png");
    let want = reference(&json("lite0.json")["astronaut.png"]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (client, url, photo) = (client.clone(), server.url("/v1/classify"), photo.clone());
        tasks.spawn(async move {
            client
                .post(url)
                .header("content-type", "image/png")
                .body(photo)
                .send()
                .await
                .unwrap()
        });
    }
    let (mut ok, mut overloaded) = (0, 0);
    while let Some(response) = tasks.join_next().await {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => {
                let body: serde_json::Value = response.json().await.unwrap();
                assert_same_top5(
                    &predictions(&body["results"][0]),
                    &want,
                    1e-4,
                    "admitted request",
                );
                ok += 1;
            }
            429 => {
                let retry: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(body["error_type"], "overloaded");
                assert!(
                    body["error"]
                        .as_str()
                        .unwrap()
                        .contains("queue limit (2 images"),
                    "{body}"
                );
                overloaded += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        ok >= 2 && overloaded >= 1,
        "{ok} answered, {overloaded} refused"
    );
    server.stop().unwrap();
}

#[tokio::test]
async fn a_model_that_does_not_load_fails_start_up() {
    let dir = temp_dir("broken");
    std::fs::copy(lite0_dir().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.pt"), b"not a torchscript archive").unwrap();
    let config = config_for(&[format!("broken={}", dir.display())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = visionserve::run(config, listener, std::future::pending()).await;
    let message = format!(
        "{:#}",
        result.expect_err("a broken model must fail start-up")
    );
    assert!(
        message.contains("broken") && message.contains("model.pt"),
        "{message}"
    );

    // A TorchScript model whose output does not match its config's class count.
    let mut config_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lite0_dir().join("config.json")).unwrap()).unwrap();
    config_json["num_classes"] = 10.into();
    config_json["pretrained_cfg"]["num_classes"] = 10.into();
    config_json
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("label_"));
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config_json).unwrap(),
    )
    .unwrap();
    std::fs::copy(lite0_dir().join("model.pt"), dir.join("model.pt")).unwrap();
    let config = config_for(&[format!("mismatch={}", dir.display())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let message = format!(
        "{:#}",
        visionserve::run(config, listener, std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        message.contains("[1, 1000]") && message.contains("num_classes = 10"),
        "{message}"
    );

    let config = config_for(&["missing=/nonexistent/model/folder".to_owned()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let message = format!(
        "{:#}",
        visionserve::run(config, listener, std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(message.contains("does not exist"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the real binary: SIGTERM while requests are queued; all of them are answered and the
/// process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_requests_in_flight() {
    let lite0 = lite0_dir();
    let args: Vec<String> = [
        "--model",
        &format!("lite0={}", lite0.join("model.pt").display()),
        "--device",
        "cpu",
        "--max-batch-size",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = ChildServer::start(&args, &[]).expect("server starts");
    server.wait_ready();
    let base = server.base.clone();

    let client = reqwest::Client::new();
    let photo = read("photos/astronaut.png");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, photo) = (client.clone(), format!("{base}/v1/classify"), photo.clone());
        tasks.spawn(async move {
            client
                .post(url)
                .header("content-type", "image/png")
                .body(photo)
                .send()
                .await
        });
    }
    wait_for_first_batch(&base, 8).await;
    let terminated = tokio::task::spawn_blocking(move || server.terminate());
    let want = reference(&json("lite0.json")["astronaut.png"]);
    while let Some(response) = tasks.join_next().await {
        let response = response
            .unwrap()
            .expect("in-flight request answered, not dropped");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_same_top5(
            &predictions(&body["results"][0]),
            &want,
            1e-4,
            "request in flight at SIGTERM",
        );
    }
    let (status, logs) = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        logs.iter().any(|l| l.contains("SIGTERM received")),
        "{logs:#?}"
    );
    assert!(
        http_status(&format!("{base}/health/live")).is_none(),
        "server still accepting after exit"
    );
}

/// Wait until the server has run a batch, so that the others of `requests` are admitted and
/// queued (batch size 1).
async fn wait_for_first_batch(base: &str, requests: usize) {
    loop {
        let text = scrape(base).await;
        let batches_run = metric(
            &text,
            r#"visionserve_inference_duration_seconds_count{model="lite0",version="1"}"#,
        )
        .unwrap_or(0.0);
        assert!(
            batches_run < requests as f64,
            "all requests finished before SIGTERM: the test proves nothing"
        );
        if batches_run >= 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_grpc_calls_in_flight() {
    use visionserve::grpc::proto;
    let lite0 = lite0_dir();
    let args: Vec<String> = [
        "--model",
        &format!("lite0={}", lite0.display()),
        "--device",
        "cpu",
        "--max-batch-size",
        "1",
        "--grpc-port",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = ChildServer::start(&args, &[]).expect("server starts");
    server.wait_ready();
    let base = server.base.clone();
    let client = proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        server.grpc.clone().expect("gRPC address logged"),
    )
    .await
    .unwrap();
    let photo = read("photos/astronaut.png");
    let request = grpc_image_request("lite0", photo);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (mut client, request) = (client.clone(), request.clone());
        tasks.spawn(async move { client.model_infer(request).await });
    }
    wait_for_first_batch(&base, 8).await;
    let terminated = tokio::task::spawn_blocking(move || server.terminate());
    let want = reference(&json("lite0.json")["astronaut.png"]);
    while let Some(response) = tasks.join_next().await {
        let response = response
            .unwrap()
            .expect("in-flight call answered, not cancelled")
            .into_inner();
        let probabilities: Vec<(u64, f64)> = response.raw_output_contents[0]
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                (
                    i as u64,
                    f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                )
            })
            .collect();
        let mut top = probabilities;
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(5);
        assert_same_top5(&top, &want, 1e-4, "gRPC call in flight at SIGTERM");
    }
    let (status, _) = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Clients that give up while their image is queued: the image is dropped before it reaches
/// the model, counted, and the clients still waiting get their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnected_clients_are_dropped_before_inference() {
    let lite0 = lite0_dir();
    let mut config = config_for(&[format!("lite0={}", lite0.display())]);
    config.max_batch_size = Some(1);
    let server = tokio::task::spawn_blocking(move || TestServer::start(config))
        .await
        .unwrap();
    let photo = read("photos/astronaut.png");
    let url = server.url("/v1/classify");
    let impatient = reqwest::Client::builder()
        // Long enough for every image to be decoded and queued even on a loaded machine (an
        // image whose client leaves while it decodes never reaches the queue), short enough
        // that a batch-1 queue of 16 images has not drained.
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let patient = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        // Every fourth client waits; the others hang up after 100 ms, before a batch-1 queue
        // of 16 images drains.
        let client = if i % 4 == 0 {
            patient.clone()
        } else {
            impatient.clone()
        };
        let (url, photo) = (url.clone(), photo.clone());
        tasks.spawn(async move {
            (
                i % 4 == 0,
                client
                    .post(url)
                    .header("content-type", "image/png")
                    .body(photo)
                    .send()
                    .await,
            )
        });
    }
    let mut answered = 0;
    while let Some(done) = tasks.join_next().await {
        let (patient, response) = done.unwrap();
        if patient {
            assert_eq!(
                response.expect("patient clients are answered").status(),
                200
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 4);
    // Abandoned images still queued behind the last answer are dropped when the batcher
    // reaches them; give it until the counts stop moving.
    let mut last = (-1.0, -1.0);
    let mut settled = 0;
    for _ in 0..100 {
        let metrics = scrape(&server.base).await;
        let value = |series: &str| metric(&metrics, series).unwrap_or(0.0);
        let dropped = value(
            r#"visionserve_dropped_images_total{model="lite0",version="1",reason="client_gone"}"#,
        );
        let ran = value(r#"visionserve_batch_size_sum{model="lite0",version="1"}"#);
        settled = if (ran, dropped) == last {
            settled + 1
        } else {
            0
        };
        last = (ran, dropped);
        if settled == 5 {
            assert!(
                dropped >= 1.0,
                "no abandoned image was dropped before inference\n{metrics}"
            );
            // Images whose client left during decoding never reach the queue at all.
            assert!(
                ran >= 4.0 && ran + dropped <= 16.0,
                "ran {ran}, dropped {dropped}\n{metrics}"
            );
            assert!(ran < 16.0, "abandoned images ran anyway\n{metrics}");
            // An impatient client whose image ran first may be answered within its 100 ms:
            // every request is counted once, as answered or as gone.
            let gone = value(
                r#"visionserve_request_failures_total{model="lite0",version="1",reason="client_gone"}"#,
            );
            let served =
                value(r#"visionserve_requests_total{model="lite0",version="1",outcome="success"}"#);
            assert!(gone >= 1.0, "no hung-up client was counted\n{metrics}");
            assert_eq!(
                gone + served,
                16.0,
                "every client is counted once, as served or gone\n{metrics}"
            );
            server.stop().unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the queue never settled");
}

/// A client that trickles its body holds one of the --max-concurrent-requests slots until
/// --body-timeout ends it with 408; meanwhile other requests get 429, then service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_bodies_time_out_and_concurrency_is_bounded() {
    use std::io::{Read, Write};
    let mut config = config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.max_concurrent_requests = 1;
    config.body_timeout = 1;
    let server = tokio::task::spawn_blocking(move || TestServer::start(config))
        .await
        .unwrap();
    let addr = server.base.strip_prefix("http://").unwrap().to_owned();
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(stream, "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n").unwrap();
        stream.write_all(&[0x89, b'P', b'N', b'G']).unwrap();
        let mut response = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = stream.read_to_string(&mut response);
        response
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = reqwest::Client::new()
        .post(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(read("photos/chelsea.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 429);
    assert_eq!(busy.headers()["retry-after"], "1");
    let body: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(body["error_type"], "too_many_requests");

    let response = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("body_timeout"), "{response}");
    let ok = reqwest::Client::new()
        .post(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(read("photos/chelsea.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    server.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_past_their_deadline_get_504_and_their_images_never_run() {
    use visionserve::grpc::proto;
    let mut config = config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.max_batch_size = Some(1);
    config.grpc_port = Some(0);
    let server = tokio::task::spawn_blocking(move || TestServer::start(config))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let photo = read("photos/astronaut.png");
    let url = server.url("/v1/classify");

    // A bad timeout is the client's error, refused before the body is read.
    let bad = client
        .post(format!("{url}?timeout=soon"))
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Patient requests keep the batch-1 model busy for several hundred ms, on either backend
    // (OpenVINO runs Lite0's batch of 1 in under 10 ms here, so it takes a few dozen)...
    const FILLERS: usize = 48;
    let mut fillers = tokio::task::JoinSet::new();
    for _ in 0..FILLERS {
        let (client, url, photo) = (client.clone(), url.clone(), photo.clone());
        fillers.spawn(async move { client.post(url).body(photo).send().await.unwrap().status() });
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ...so that requests allowing 100 ms cannot be served in time, through every protocol.
    let v1 = client
        .post(format!("{url}?timeout=100ms"))
        .body(photo.clone())
        .send();
    let header = client
        .post(&url)
        .header("request-timeout", "0.1")
        .body(photo.clone())
        .send();
    let v2_body = json!({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &photo)]}],
        "parameters": {"timeout": 100_000},
    });
    let v2 = client
        .post(server.url("/v2/models/lite0/infer"))
        .json(&v2_body)
        .send();
    let mut grpc = proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        server.grpc.clone().unwrap(),
    )
    .await
    .unwrap();
    let mut request = tonic::Request::new(grpc_image_request("lite0", photo.clone()));
    request.set_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let (v1, header, v2, grpc) = tokio::join!(v1, header, v2, grpc.model_infer(request));
    let elapsed = started.elapsed();
    for (what, response) in [
        ("?timeout", v1.unwrap()),
        ("Request-Timeout", header.unwrap()),
    ] {
        assert_eq!(response.status(), 504, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error_type"], "deadline_exceeded", "{what}: {body}");
    }
    assert_eq!(v2.unwrap().status(), 504);
    let code = grpc.unwrap_err().code();
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(
        elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );

    while let Some(status) = fillers.join_next().await {
        assert_eq!(
            status.unwrap(),
            200,
            "requests without a timeout are served"
        );
    }
    // Whether refused up front (the queue's estimated wait) or dropped from the queue when
    // their deadline passed, the timed-out images never reached the model.
    let text = scrape(&server.base).await;
    let ran = metric(
        &text,
        r#"visionserve_batch_size_sum{model="lite0",version="1"}"#,
    )
    .unwrap();
    assert_eq!(
        ran, FILLERS as f64,
        "only the patient requests' images ran\n{text}"
    );
    let timed_out = metric(
        &text,
        r#"visionserve_request_failures_total{model="lite0",version="1",reason="deadline_exceeded"}"#,
    )
    .unwrap();
    assert_eq!(timed_out, 4.0, "{text}");
}
