//! The access log: one JSON line per request on /v1, v2 REST and gRPC, refusals (401, 413,
//! 429) included, once each; probes only at DEBUG; `--access-log off` silences it; keys and
//! bodies never appear.

mod common;

use common::{grpc_image_request, lite0_dir, read, ChildServer};
use visionserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

const KEY: &str = "access-log-test-key-0123456789";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn start(extra: &[&str]) -> ChildServer {
    let mut args: Vec<String> = vec![
        "--model".into(),
        format!("lite0={}", lite0_dir().display()),
        "--grpc-port".into(),
        "0".into(),
        "--api-key".into(),
        KEY.into(),
        "--max-body-bytes".into(),
        "200000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = ChildServer::start(&args, &[]).unwrap_or_else(|logs| panic!("{logs:?}"));
    server.wait_ready();
    server
}

fn access_lines(logs: &[String]) -> Vec<serde_json::Value> {
    logs.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "visionserve::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_once_with_what_it_was_and_how_it_ended() {
    let server = start(&[]);
    let client = reqwest::Client::new();
    let photo = read("photos/chelsea.jpg");
    let traceparent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    let ok = client
        .post(server.url("/v1/models/lite0/classify"))
        .bearer_auth(KEY)
        .header("traceparent", &traceparent)
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let request_id = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    let unauthorized = client
        .post(server.url("/v1/classify"))
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let too_large = client
        .post(server.url("/v1/classify"))
        .bearer_auth(KEY)
        .body(vec![0u8; 300_000])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    let not_an_image = client
        .post(server.url("/v2/models/lite0/infer"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(not_an_image.status(), 400);
    assert_eq!(
        client
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut grpc = GrpcInferenceServiceClient::connect(server.grpc.clone().unwrap())
        .await
        .unwrap();
    let mut call = tonic::Request::new(grpc_image_request("lite0", photo.clone()));
    call.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    grpc.model_infer(call).await.unwrap();
    let refused = grpc
        .model_infer(grpc_image_request("lite0", photo.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let (_, logs) = server.terminate();
    let lines = access_lines(&logs);
    assert!(
        !logs.iter().any(|l| l.contains(KEY)),
        "the key is never logged"
    );
    let find = |status: &str, protocol: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["status"] == status && l["protocol"] == protocol)
            .collect()
    };
    let served = find("200", "v1");
    assert_eq!(served.len(), 1, "{lines:#?}");
    let served = served[0];
    assert_eq!(served["request_id"], request_id.as_str());
    assert_eq!(served["trace_id"], TRACE);
    assert_eq!(served["method"], "POST");
    assert_eq!(served["route"], "/v1/models/{model}/classify");
    assert_eq!(served["model"], "lite0");
    assert_eq!(served["version"], "1");
    assert_eq!(served["images"], 1);
    assert_eq!(served["bytes_in"], photo.len().to_string());
    assert!(served["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        served["inference_ms"].as_f64().unwrap() > 0.0
            && served["decode_ms"].as_f64().unwrap() > 0.0
    );
    assert!(served["total_ms"].as_f64().unwrap() >= served["inference_ms"].as_f64().unwrap());
    assert_eq!(served["error_type"], "-");
    // Refusals, once each, with their error type.
    let refusal = |status: &str, protocol: &str| {
        let found = find(status, protocol);
        assert_eq!(found.len(), 1, "{status} {protocol}: {lines:#?}");
        found[0]["error_type"].as_str().unwrap().to_owned()
    };
    assert_eq!(refusal("401", "v1"), "unauthorized");
    assert_eq!(refusal("413", "v1"), "body_too_large");
    assert_eq!(refusal("400", "v2"), "unsupported_image_format");
    assert_eq!(refusal("Unauthenticated", "grpc"), "unauthorized");
    let grpc_ok = find("Ok", "grpc");
    assert_eq!(grpc_ok.len(), 1, "{lines:#?}");
    assert_eq!(grpc_ok[0]["model"], "lite0");
    assert_eq!(grpc_ok[0]["images"], 1);
    // Probes are DEBUG: not at the default INFO.
    assert!(
        !lines.iter().any(|l| l["route"] == "/health/ready"),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 6, "one line per request: {lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_logs_no_request() {
    let server = start(&["--access-log", "off"]);
    let answer = reqwest::Client::new()
        .post(server.url("/v1/classify"))
        .bearer_auth(KEY)
        .body(read("photos/chelsea.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let (_, logs) = server.terminate();
    assert!(access_lines(&logs).is_empty());
}
