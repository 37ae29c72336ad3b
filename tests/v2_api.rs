//! The Open Inference Protocol (KServe v2) over REST and gRPC, against the real Lite0 weights:
//! metadata, the three inputs (encoded images as JSON base64, binary tensors and a raw body;
//! preprocessed pixels), the classification and binary extensions, statistics, and errors.
//! Answers must equal `/v1`'s for the same photos and timm's within 1e-4. The Python suite in
//! tests/clients drives the same endpoints with tritonclient and the kserve SDK.

mod common;

use base64::Engine;
use common::{assert_same_top5, lite0_dir, read, reference, Ranked, TestServer};
use serde_json::{json, Value};
use visionserve::grpc::proto;
use visionserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;

const PHOTOS: [&str; 3] = ["chelsea.png", "coffee.png", "rocket.jpg"];
const HEADER_LENGTH: &str = "inference-header-content-length";

fn start() -> TestServer {
    let mut config = common::config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.grpc_port = Some(0);
    TestServer::start(config)
}

fn top5_of(row: &[f32]) -> Ranked {
    let mut ranked: Vec<(u64, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &p)| (i as u64, f64::from(p)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(5);
    ranked
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A JSON array of numbers as `f32`.
fn json_f32s(data: &Value) -> Vec<f32> {
    data.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn length_prefixed(elements: &[Vec<u8>]) -> Vec<u8> {
    elements
        .iter()
        .flat_map(|e| (e.len() as u32).to_le_bytes().into_iter().chain(e.clone()))
        .collect()
}

/// `/v1`'s top-5 for one photo.
async fn v1_top5(client: &reqwest::Client, server: &TestServer, photo: &str) -> Ranked {
    let response: Value = client
        .post(server.url("/v1/models/lite0/classify?top_k=5"))
        .body(read(&format!("photos/{photo}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    common::predictions(&response["results"][0])
}

/// POST a v2 JSON request; returns (status, body).
async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Split a binary-extension response into its JSON and its binary outputs by name.
fn split_binary(
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> (Value, Vec<(String, Vec<u8>)>) {
    let length: usize = headers[HEADER_LENGTH].to_str().unwrap().parse().unwrap();
    let json: Value = serde_json::from_slice(&body[..length]).unwrap();
    let mut at = length;
    let mut parts = Vec::new();
    for output in json["outputs"].as_array().unwrap() {
        if let Some(size) = output["parameters"]["binary_data_size"].as_u64() {
            let size = size as usize;
            parts.push((
                output["name"].as_str().unwrap().to_owned(),
                body[at..at + size].to_vec(),
            ));
            at += size;
        }
    }
    assert_eq!(at, body.len(), "binary outputs fill the body");
    (json, parts)
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_describes_the_models_tensors() {
    let server = tokio::task::spawn_blocking(start).await.unwrap();
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let request = client.get(server.url(path));
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, meta) = get("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(meta["name"], "visionserve");
    assert!(meta["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("classification")));
    assert_eq!(get("/v2/health/live").await.0, 200);
    assert_eq!(get("/v2/health/ready").await.0, 200);
    assert_eq!(
        get("/v2/models/lite0/ready").await,
        (200, json!({"name": "lite0", "ready": true}))
    );

    let (status, model) = get("/v2/models/lite0").await;
    assert_eq!(status, 200);
    assert_eq!(model, get("/v2/models/lite0/versions/1").await.1);
    assert_eq!(model["versions"], json!(["1"]));
    assert_eq!(model["platform"], "visionserve_native");
    assert_eq!(
        model["inputs"],
        json!([
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, 224, 224]},
        ])
    );
    assert_eq!(
        model["outputs"],
        json!([
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]},
            {"name": "embeddings", "datatype": "FP32", "shape": [-1, 1280]},
        ])
    );
    let (status, missing) = get("/v2/models/nope").await;
    assert_eq!(status, 404);
    assert!(
        missing["error"].as_str().unwrap().contains("lite0"),
        "{missing}"
    );
    let (status, version) = get("/v2/models/lite0/versions/2").await;
    assert_eq!(status, 404);
    assert!(
        version["error"]
            .as_str()
            .unwrap()
            .contains("available: lite0@1"),
        "{version}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rest_answers_equal_v1_and_timm() {
    let server = tokio::task::spawn_blocking(start).await.unwrap();
    let client = reqwest::Client::new();
    let timm = common::json("lite0.json");
    let images: Vec<String> = PHOTOS
        .iter()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(read(&format!("photos/{p}"))))
        .collect();
    let request = json!({
        "id": "req-7",
        "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": images}],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": true}},
            {"name": "logits", "parameters": {"classification": 5}},
        ],
    });
    let response = client
        .post(server.url("/v2/models/lite0/infer"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let (json, binary) = split_binary(&headers, &response.bytes().await.unwrap());
    assert_eq!(json["id"], "req-7");
    assert_eq!(json["model_name"], "lite0");
    let names: Vec<&str> = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["probabilities", "logits"],
        "only the requested outputs"
    );
    assert_eq!(json["outputs"][0]["shape"], json!([3, 1000]));
    let probabilities = f32s(&binary[0].1);
    let classification = &json["outputs"][1];
    assert_eq!(classification["datatype"], "BYTES");
    assert_eq!(classification["shape"], json!([3, 5]));

    for (i, photo) in PHOTOS.iter().enumerate() {
        let row = &probabilities[i * 1000..(i + 1) * 1000];
        let sum: f32 = row.iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "{photo}: probabilities sum to {sum}"
        );
        let got = top5_of(row);
        assert_same_top5(&got, &reference(&timm[*photo]), 1e-4, photo);
        assert_same_top5(&got, &v1_top5(&client, &server, photo).await, 1e-5, photo);
        // "logit:index:label", best first, on the same classes.
        let strings = &classification["data"].as_array().unwrap()[i * 5..(i + 1) * 5];
        let indices: Vec<u64> = strings
            .iter()
            .map(|s| {
                s.as_str()
                    .unwrap()
                    .split(':')
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            indices,
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            "{photo}"
        );
    }
    // Labels come from the model's config.json: chelsea is a tiger cat (282).
    let first = classification["data"][0].as_str().unwrap();
    assert!(first.ends_with(":282:tiger cat"), "{first}");
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_inputs_raw_bodies_and_pixels_agree() {
    let server = tokio::task::spawn_blocking(start).await.unwrap();
    let client = reqwest::Client::new();
    let url = server.url("/v2/models/lite0/infer");
    let chelsea = read("photos/chelsea.png");

    // BYTES through the binary extension, all outputs binary.
    let raw = length_prefixed(std::slice::from_ref(&chelsea));
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "probabilities"}, {"name": "embeddings"}],
        "parameters": {"binary_data_output": true},
    }))
    .unwrap();
    let response = client
        .post(&url)
        .header(HEADER_LENGTH, header.len())
        .body([header, raw].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let (_, binary) = split_binary(&headers, &response.bytes().await.unwrap());
    let from_binary = f32s(&binary[0].1);
    let embeddings = f32s(&binary[1].1);
    assert_eq!(embeddings.len(), 1280);
    assert!(embeddings.iter().all(|e| e.is_finite()) && embeddings.iter().any(|&e| e != 0.0));

    // A raw body: the whole body is one image; the answer is JSON.
    let response = client
        .post(&url)
        .header(HEADER_LENGTH, "0")
        .body(chelsea)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let raw_json: Value = response.json().await.unwrap();
    let from_raw: Vec<f32> = json_f32s(&raw_json["outputs"][0]["data"]);
    assert_eq!(raw_json["outputs"][0]["name"], "probabilities");

    // timm's own preprocessed pixels (HWC) sent as UINT8 NCHW, in JSON.
    let hwc = read("preprocess/lite0__chelsea.png.bin");
    let plane = 224 * 224;
    let chw: Vec<u8> = (0..3)
        .flat_map(|c| (0..plane).map(move |i| (c, i)))
        .map(|(c, i)| hwc[i * 3 + c])
        .collect();
    let (status, pixels) = post_json(
        &client,
        &url,
        &json!({
            "inputs": [{"name": "pixels", "shape": [1, 3, 224, 224], "datatype": "UINT8", "data": chw}],
            "outputs": [{"name": "probabilities"}],
        }),
    )
    .await;
    assert_eq!(status, 200, "{pixels}");
    let from_pixels: Vec<f32> = json_f32s(&pixels["outputs"][0]["data"]);

    // The same pixels normalised by the client (mean = std = 0.5), as FP32.
    let normalised: Vec<f32> = chw
        .iter()
        .map(|&v| (f32::from(v) / 255.0 - 0.5) / 0.5)
        .collect();
    let (status, fp32) = post_json(
        &client,
        &url,
        &json!({
            "inputs": [{"name": "pixels", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": normalised}],
            "outputs": [{"name": "probabilities"}],
        }),
    )
    .await;
    assert_eq!(status, 200, "{fp32}");
    let from_fp32: Vec<f32> = json_f32s(&fp32["outputs"][0]["data"]);

    for (what, other) in [
        ("raw", &from_raw),
        ("pixels", &from_pixels),
        ("fp32", &from_fp32),
    ] {
        let max_diff = from_binary
            .iter()
            .zip(other.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(other.len(), 1000, "{what}");
        assert!(max_diff <= 1e-5, "{what}: differs by {max_diff}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_400_that_says_what_was_expected() {
    let server = tokio::task::spawn_blocking(start).await.unwrap();
    let client = reqwest::Client::new();
    let url = server.url("/v2/models/lite0/infer");
    let image = base64::engine::general_purpose::STANDARD.encode(read("photos/coffee.png"));
    let cases = [
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
            "must be BYTES",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [image]}]}),
            "holds 2 elements but 1 were sent",
        ),
        (
            json!({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": vec![0u8; 3 * 32 * 32]}]}),
            "[N, 3, 224, 224]",
        ),
        (
            json!({"inputs": [{"name": "picture", "shape": [1], "datatype": "BYTES", "data": [image]}]}),
            "unknown input",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}],
                   "outputs": [{"name": "features"}]}),
            "unknown output \"features\"",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}],
                   "outputs": [{"name": "embeddings", "parameters": {"classification": 3}}]}),
            "not \"embeddings\"",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [33], "datatype": "BYTES", "data": vec![image.clone(); 33]}]}),
            "more than 32 images",
        ),
        (json!({"inputs": []}), "exactly one input"),
        (json!({"input": []}), "expected {\"inputs\""),
    ];
    for (request, expected) in cases {
        let (status, body) = post_json(&client, &url, &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
    }
    // Binary sizes that do not add up.
    let header = br#"{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 100}}]}"#;
    let response = client
        .post(&url)
        .header(HEADER_LENGTH, header.len())
        .body([&header[..], &[0u8; 10]].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("binary_data_size is 100"),
        "{body}"
    );
    // An undecodable image is the client's error too.
    let (status, body) = post_json(
        &client,
        &url,
        &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64::engine::general_purpose::STANDARD.encode(b"not an image")]}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Unknown model: 404.
    let (status, _) = post_json(&client, &server.url("/v2/models/nope/infer"), &json!({})).await;
    assert_eq!(status, 404);

    // The server carries on.
    let (status, body) = post_json(
        &client,
        &url,
        &json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["outputs"][0]["data"][0]
            .as_str()
            .unwrap()
            .contains(":967:"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_answers_equal_rest_and_statistics_count_them() {
    let server = tokio::task::spawn_blocking(start).await.unwrap();
    let mut client = GrpcInferenceServiceClient::connect(server.grpc.clone().unwrap())
        .await
        .unwrap();
    let live = client
        .server_live(proto::ServerLiveRequest {})
        .await
        .unwrap();
    assert!(live.into_inner().live);
    let ready = client
        .model_ready(proto::ModelReadyRequest {
            name: "lite0".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let metadata = client
        .model_metadata(proto::ModelMetadataRequest {
            name: "lite0".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.inputs[0].datatype, "BYTES");
    assert_eq!(metadata.outputs[2].shape, [-1, 1280]);

    let stats = |client: &mut GrpcInferenceServiceClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            client
                .model_statistics(proto::ModelStatisticsRequest {
                    name: "lite0".into(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .model_stats[0]
                .clone()
        }
    };
    let before = stats(&mut client).await;

    let files: Vec<Vec<u8>> = PHOTOS
        .iter()
        .map(|p| read(&format!("photos/{p}")))
        .collect();
    let request = proto::ModelInferRequest {
        model_name: "lite0".into(),
        id: "g1".into(),
        inputs: vec![proto::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![3],
            ..Default::default()
        }],
        outputs: vec![proto::model_infer_request::InferRequestedOutputTensor {
            name: "probabilities".into(),
            ..Default::default()
        }],
        raw_input_contents: vec![length_prefixed(&files).into()],
        ..Default::default()
    };
    let response = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(response.id, "g1");
    assert_eq!(response.outputs[0].shape, [3, 1000]);
    let probabilities = f32s(&response.raw_output_contents[0]);
    let http = reqwest::Client::new();
    for (i, photo) in PHOTOS.iter().enumerate() {
        let got = top5_of(&probabilities[i * 1000..(i + 1) * 1000]);
        assert_same_top5(&got, &v1_top5(&http, &server, photo).await, 1e-5, photo);
    }

    let after = stats(&mut client).await;
    let success =
        |s: &proto::ModelStatistics| s.inference_stats.as_ref().unwrap().success.unwrap().count;
    // The gRPC request, then three /v1 requests.
    assert_eq!(success(&after) - success(&before), 4);
    assert_eq!(after.inference_count - before.inference_count, 6);
    assert!(after.execution_count > before.execution_count);
    let batched: u64 = after
        .batch_stats
        .iter()
        .map(|b| b.batch_size * b.compute_infer.unwrap().count)
        .sum();
    assert_eq!(
        batched, after.inference_count,
        "batch_stats account for every image"
    );

    // Errors carry the right codes.
    let bad = proto::ModelInferRequest {
        model_name: "lite0".into(),
        inputs: vec![proto::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "UINT8".into(),
            shape: vec![1],
            contents: Some(proto::InferTensorContents {
                uint_contents: vec![1],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = client.model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("must be BYTES"), "{status:?}");
    let missing = proto::ModelInferRequest {
        model_name: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        client.model_infer(missing).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // The standard health service.
    let channel = tonic::transport::Endpoint::from_shared(server.grpc.clone().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    // grpc.health.v1 follows readiness by polling it (every 200 ms), so it may still say
    // NOT_SERVING for a moment after /health/ready first answered 200.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "inference.GRPCInferenceService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == serving {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "grpc.health.v1 still says {status} 5 s after the server was ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
