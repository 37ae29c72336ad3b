//! Start-up, overload and shutdown behaviour.

mod common;

use common::*;
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
    let dir = std::env::temp_dir().join(format!("visionserve-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
    // Wait until the server has run a batch, so the others are admitted and queued.
    let metrics_url = format!("{base}/metrics");
    loop {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let batches_run = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"visionserve_inference_duration_seconds_count{model="lite0"} "#)
            })
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
        assert!(
            batches_run < 8.0,
            "all requests finished before SIGTERM: the test proves nothing"
        );
        if batches_run >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
