//! API keys on every protocol, against the real binary: refused without a key (401 over HTTP
//! with `WWW-Authenticate`, UNAUTHENTICATED over gRPC) before any body is read, accepted with a
//! key from the command line or the keys file, probes and `/metrics` open, keys rotated by
//! SIGHUP, and never written to the logs.

mod common;

use common::*;
use std::time::{Duration, Instant};
use visionserve::grpc::proto;
use visionserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

const CLI_KEY: &str = "cli-key-6f1d2a";
const FILE_KEY: &str = "file-key-93be07";
const ROTATED_KEY: &str = "rotated-key-51c4e8";

fn infer_request(photo: Vec<u8>) -> proto::ModelInferRequest {
    grpc_image_request("lite0", photo)
}

async fn classify(
    client: &reqwest::Client,
    server: &ChildServer,
    key: Option<&str>,
) -> reqwest::Response {
    let mut request = post_photo(client, &server.url("/v1/classify"), "astronaut.png");
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_guard_every_protocol_and_rotate_on_sighup() {
    let dir = temp_dir("auth");
    let keys_file = dir.join("keys");
    std::fs::write(&keys_file, format!("# rotated by SIGHUP\n{FILE_KEY}\n")).unwrap();
    let args: Vec<String> = [
        "--model",
        &format!("lite0={}", lite0_dir().display()),
        "--device",
        "cpu",
        "--grpc-port",
        "0",
        "--api-keys-file",
        keys_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = ChildServer::start(&args, &[("VISIONSERVE_API_KEYS", CLI_KEY)]).expect("starts");
    // Probes need no key.
    server.wait_ready();
    let client = reqwest::Client::new();
    for open in [
        "/health/live",
        "/v2/health/ready",
        "/v2/models/lite0/ready",
        "/metrics",
    ] {
        let status = client.get(server.url(open)).send().await.unwrap().status();
        assert_eq!(status, 200, "{open} must stay open");
    }

    // /v1: 401 with the challenge and the /v1 error shape, then 200 with either key.
    let refused = classify(&client, &server, None).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["www-authenticate"],
        "Bearer realm=\"visionserve\""
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error_type"], "unauthorized");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    let wrong = classify(&client, &server, Some("cli-key-6f1d2b")).await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(
        classify(&client, &server, Some(CLI_KEY)).await.status(),
        200
    );
    assert_eq!(
        classify(&client, &server, Some(FILE_KEY)).await.status(),
        200
    );
    let via_header = client
        .get(server.url("/v1/models"))
        .header("x-api-key", FILE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), 200);

    // v2 REST: its own error shape.
    let v2 = client
        .get(server.url("/v2/models/lite0"))
        .send()
        .await
        .unwrap();
    assert_eq!(v2.status(), 401);
    let body: serde_json::Value = v2.json().await.unwrap();
    assert!(
        body["error"].is_string() && body.get("error_type").is_none(),
        "{body}"
    );

    // A refused client that sends a large body first still reads its 401 (the body is
    // drained, not reset), and the server never parsed it.
    let big = vec![0u8; 8 << 20];
    let refused = client
        .post(server.url("/v1/classify"))
        .header("content-type", "application/octet-stream")
        .body(big)
        .send()
        .await
        .expect("the 401 arrives, not a reset");
    assert_eq!(refused.status(), 401);

    // gRPC: UNAUTHENTICATED without a key, answered with one; health open.
    let grpc = server.grpc.clone().expect("gRPC address logged");
    let mut stub = GrpcInferenceServiceClient::connect(grpc.clone())
        .await
        .unwrap();
    let photo = read("photos/astronaut.png");
    let err = stub
        .model_infer(infer_request(photo.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let live = stub.server_live(proto::ServerLiveRequest {}).await.unwrap();
    assert!(live.into_inner().live);
    let mut keyed = tonic::Request::new(infer_request(photo.clone()));
    keyed.metadata_mut().insert(
        "authorization",
        format!("Bearer {CLI_KEY}").parse().unwrap(),
    );
    let answer = stub.model_infer(keyed).await.expect("keyed call answered");
    let answer = answer.into_inner();
    assert!(answer.outputs.iter().any(|o| o.name == "probabilities"));
    assert_eq!(answer.outputs.len(), answer.raw_output_contents.len());

    // Refusals are counted by protocol.
    let text = scrape(&server.base).await;
    assert!(
        metric(
            &text,
            r#"visionserve_unauthorized_requests_total{protocol="http"}"#
        )
        .unwrap()
            >= 4.0
    );
    assert_eq!(
        metric(
            &text,
            r#"visionserve_unauthorized_requests_total{protocol="grpc"}"#
        ),
        Some(1.0)
    );

    // Rotation: SIGHUP re-reads the file; the old file key stops working, the new one works,
    // and --api-key keys stay.
    std::fs::write(&keys_file, format!("{ROTATED_KEY}\n")).unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while classify(&client, &server, Some(FILE_KEY)).await.status() != 401 {
        assert!(Instant::now() < deadline, "SIGHUP did not rotate the keys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        classify(&client, &server, Some(ROTATED_KEY)).await.status(),
        200
    );
    assert_eq!(
        classify(&client, &server, Some(CLI_KEY)).await.status(),
        200
    );
    let mut rotated = tonic::Request::new(infer_request(photo));
    rotated
        .metadata_mut()
        .insert("x-api-key", ROTATED_KEY.parse().unwrap());
    stub.model_infer(rotated)
        .await
        .expect("rotated key accepted over gRPC");

    let (status, logs) = server.terminate();
    assert!(status.success(), "exit status {status}");
    let logs = logs.join("\n");
    assert!(logs.contains("API keys reloaded"), "{logs}");
    for key in [CLI_KEY, FILE_KEY, ROTATED_KEY] {
        assert!(!logs.contains(key), "a key appeared in the logs");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn protect_metrics_and_refuse_to_start_on_an_unreadable_keys_file() {
    let model = format!("lite0={}", lite0_dir().display());
    let missing = std::env::temp_dir().join("visionserve-no-such-keys-file");
    let args: Vec<String> = [
        "--model",
        &model,
        "--api-keys-file",
        missing.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let logs = match ChildServer::start(&args, &[]) {
        Ok(_) => panic!("a server asked to check keys it cannot read must not start open"),
        Err(logs) => logs.join("\n"),
    };
    assert!(logs.contains("--api-keys-file"), "{logs}");

    let args: Vec<String> = ["--model", &model, "--api-key", CLI_KEY, "--protect-metrics"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = ChildServer::start(&args, &[]).expect("starts");
    let client = reqwest::Client::new();
    let metrics = |key: Option<&str>| {
        let mut request = client.get(server.url("/metrics"));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.send()
    };
    assert_eq!(metrics(None).await.unwrap().status(), 401);
    assert_eq!(metrics(Some(CLI_KEY)).await.unwrap().status(), 200);
    assert_eq!(
        client
            .get(server.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
