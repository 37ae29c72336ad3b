//! A wedged or crashing model, through the test-only fault hook (`VISIONSERVE_FAULT_FILE`,
//! compiled only into test builds): the batch's requests are answered at once (503 when it
//! hangs past --batch-timeout, 500 when it panics), the model turns not ready and is counted,
//! the log names the requests, and a new model thread makes it ready again.

mod common;

use common::*;
use std::time::{Duration, Instant};

async fn classify(
    client: &reqwest::Client,
    server: &ChildServer,
    request_id: &str,
) -> (u16, serde_json::Value) {
    let response = post_photo(client, &server.url("/v1/classify"), "astronaut.png")
        .header("x-request-id", request_id)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn ready_status(client: &reqwest::Client, server: &ChildServer) -> u16 {
    client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_until_ready(client: &reqwest::Client, server: &ChildServer) -> Duration {
    let start = Instant::now();
    while ready_status(client, server).await != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the model did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wedged_or_panicking_model_is_answered_for_and_restarted() {
    let dir = temp_dir("fault");
    let fault = dir.join("fault");
    let args: Vec<String> = [
        "--model",
        &format!("lite0={}", lite0_dir().display()),
        "--device",
        "cpu",
        "--max-batch-size",
        "2",
        "--batch-timeout",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = ChildServer::start(
        &args,
        &[("VISIONSERVE_FAULT_FILE", fault.to_str().unwrap())],
    )
    .expect("starts");
    server.wait_ready();
    let client = reqwest::Client::new();
    let want = reference(&json("lite0.json")["astronaut.png"]);
    let (status, _) = classify(&client, &server, "healthy-1").await;
    assert_eq!(status, 200);

    // Wedge: the batch hangs until the file goes. Its request gets 503 about one batch timeout
    // later, not never; the model is not ready from that moment.
    std::fs::write(&fault, "hang").unwrap();
    let start = Instant::now();
    let (status, body) = classify(&client, &server, "wedged-req-1").await;
    let answered_in = start.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error_type"], "not_ready", "{body}");
    assert!(
        answered_in >= Duration::from_millis(900) && answered_in < Duration::from_secs(5),
        "answered in {answered_in:?}"
    );
    assert_eq!(ready_status(&client, &server).await, 503);
    let models: serde_json::Value = client
        .get(server.url("/v1/models/lite0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["state"], "restarting", "{models}");
    assert!(
        models["failure"]
            .as_str()
            .unwrap()
            .contains("--batch-timeout"),
        "{models}"
    );
    // New requests are refused at once while the model restarts.
    let (status, _) = classify(&client, &server, "during-restart").await;
    assert_eq!(status, 503);
    // The wedged thread comes back later; whatever it computed must not be sent anywhere.
    std::fs::remove_file(&fault).unwrap();
    wait_until_ready(&client, &server).await;
    let (status, body) = classify(&client, &server, "recovered-1").await;
    assert_eq!(status, 200, "{body}");
    assert_same_top5(
        &predictions(&body["results"][0]),
        &want,
        1e-4,
        "after the restart",
    );
    let models: serde_json::Value = client
        .get(server.url("/v1/models/lite0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["restarts"], 1, "{models}");
    assert!(models.get("failure").is_none(), "{models}");

    // Panic: the batch gets 500, the thread is replaced, the model comes back.
    std::fs::write(&fault, "panic").unwrap();
    let (status, body) = classify(&client, &server, "panicked-req-1").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(ready_status(&client, &server).await, 503);
    std::fs::remove_file(&fault).unwrap();
    wait_until_ready(&client, &server).await;
    let (status, _) = classify(&client, &server, "recovered-2").await;
    assert_eq!(status, 200);

    let text = scrape(&server.base).await;
    let restarts = |reason: &str| {
        metric(
            &text,
            &format!(
                r#"visionserve_model_restarts_total{{model="lite0",version="1",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(restarts("batch_timeout"), Some(1.0));
    assert_eq!(restarts("panic"), Some(1.0));
    assert_eq!(
        metric(
            &text,
            r#"visionserve_model_ready{model="lite0",version="1"}"#
        ),
        Some(1.0)
    );

    let (status, logs) = server.terminate();
    assert!(status.success(), "exit status {status}");
    // The error log names each request of the failed batches.
    let logged = |request: &str, message: &str| {
        logs.iter()
            .any(|line| line.contains(request) && line.contains(message))
    };
    assert!(
        logged("wedged-req-1", "model wedged"),
        "{}",
        logs.join("\n")
    );
    assert!(
        logged("panicked-req-1", "batch failed"),
        "{}",
        logs.join("\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
