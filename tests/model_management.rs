//! Models at run time and the response cache (issue #11): load, roll out and unload under
//! continuous traffic, memory given back after an unload, the memory budget, the repository
//! poller, the admin key, and cached answers.
//!
//! The rollout uses two real checkpoints of one architecture: the ImageNet Lite0 (`make
//! weights`) and the random-weight Lite0 of the parity fixtures (`make parity-data`), so the
//! two versions answer the same photo with different scores.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-secret";

fn parity_model(name: &str) -> String {
    parity_data()
        .join("efficientnet")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn lite0() -> String {
    lite0_dir().to_string_lossy().into_owned()
}

fn explicit_server(extra: &[&str]) -> ChildServer {
    let mut args: Vec<String> = [
        "--model",
        &format!("m={}", lite0()),
        "--device",
        "cpu",
        "--max-batch-size",
        "2",
        "--model-control",
        "explicit",
        "--admin-token",
        ADMIN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = ChildServer::start(&args, &[])
        .unwrap_or_else(|logs| panic!("server did not start:\n{}", logs.join("\n")));
    server.wait_ready();
    server
}

fn admin(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.bearer_auth(ADMIN)
}

/// `POST /v1/models` with the admin key.
async fn load_model(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    admin(client.post(format!("{base}/v1/models")))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// One classification as the traffic saw it.
#[derive(Debug, Clone)]
struct Answer {
    sent: Instant,
    status: u16,
    version: Option<String>,
    error_type: Option<String>,
    top_score: Option<f64>,
}

/// Clients classifying the same photo until `stop`, every answer recorded.
fn start_traffic(
    base: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Answer>>>, Vec<tokio::task::JoinHandle<()>>) {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let image = read("photos/rocket.jpg");
    let tasks = (0..clients)
        .map(|_| {
            let (answers, stop, image) = (answers.clone(), stop.clone(), image.clone());
            let url = format!("{base}/v1/models/m/classify");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Acquire) {
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "image/jpeg")
                        .body(image.clone())
                        .send()
                        .await
                        .expect("the server answers every request");
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.expect("a JSON answer");
                    answers.lock().unwrap().push(Answer {
                        sent,
                        status,
                        version: body["version"].as_str().map(str::to_owned),
                        error_type: body["error_type"].as_str().map(str::to_owned),
                        top_score: body["results"][0]["predictions"][0]["score"].as_f64(),
                    });
                }
            })
        })
        .collect();
    (answers, tasks)
}

async fn repository(client: &reqwest::Client, base: &str) -> Value {
    let response = admin(client.get(format!("{base}/v1/repository")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn versions_of(repository: &Value, name: &str) -> Vec<(String, String, bool)> {
    repository["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == name)
        .map(|e| {
            (
                e["version"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
                e["serving"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Wait until `name` has no version but `keep` in the repository (drained and freed).
async fn wait_drained(client: &reqwest::Client, base: &str, name: &str, keep: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = versions_of(&repository(client, base).await, name);
        if listed.iter().all(|(v, _, _)| Some(v.as_str()) == keep) {
            return;
        }
        assert!(Instant::now() < deadline, "still draining: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_and_an_unload_under_traffic_lose_no_request() {
    let server = explicit_server(&["--model-memory-budget", "120MiB"]);
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (answers, traffic) = start_traffic(&base, 3, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The management API takes the admin key and only it.
    let body = json!({"name": "m", "source": parity_model("tf_efficientnet_lite0")});
    let refused = client
        .post(format!("{base}/v1/models"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let wrong = client
        .post(format!("{base}/v1/models"))
        .bearer_auth("not-the-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // A source that does not exist, and one whose weights are broken: refused, the serving
    // version stays, and the repository says why.
    let missing = load_model(
        &client,
        &base,
        &json!({"name": "m", "source": "/no/such/folder"}),
    )
    .await;
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error_type"],
        "bad_request"
    );
    let broken = temp_dir("broken");
    std::fs::copy(lite0_dir().join("config.json"), broken.join("config.json")).unwrap();
    std::fs::write(broken.join("model.safetensors"), b"these are not weights").unwrap();
    let failed = load_model(&client, &base, &json!({"name": "m", "source": broken})).await;
    assert_eq!(failed.status(), 422);
    assert_eq!(
        failed.json::<Value>().await.unwrap()["error_type"],
        "load_failed"
    );
    let listed = repository(&client, &base).await;
    let failed_entry = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state"] == "failed")
        .unwrap_or_else(|| panic!("the failed load is listed: {listed}"));
    assert!(!failed_entry["reason"].as_str().unwrap().is_empty());
    assert!(versions_of(&listed, "m").contains(&("1".into(), "ready".into(), true)));

    // A model too large for what is left of the budget is refused before anything loads.
    let too_big = load_model(
        &client,
        &base,
        &json!({"name": "big", "source": parity_model("tf_efficientnetv2_s")}),
    )
    .await;
    assert_eq!(too_big.status(), 507);
    let refusal: Value = too_big.json().await.unwrap();
    assert_eq!(refusal["error_type"], "insufficient_memory");
    assert!(
        refusal["error"].as_str().unwrap().contains("m@1"),
        "{refusal}"
    );
    assert!(versions_of(&repository(&client, &base).await, "big").is_empty());

    // The rollout: version 2 loads beside version 1, then takes the traffic.
    let rolled = load_model(&client, &base, &body).await;
    assert_eq!(rolled.status(), 201);
    let switched = Instant::now();
    let entry: Value = rolled.json().await.unwrap();
    let new_version = entry["version"].as_str().unwrap().to_owned();
    assert_ne!(new_version, "1");
    assert_eq!(
        (entry["state"].as_str(), entry["serving"].as_bool()),
        (Some("ready"), Some(true))
    );
    wait_drained(&client, &base, "m", Some(&new_version)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The old version is gone: by name and version it is not found, and its series are gone.
    let old = post_rocket(&client, &base, "m@1").await;
    assert_eq!(old.status(), 404);
    let metrics = scrape(&base).await;
    let served = format!(
        r#"visionserve_requests_total{{model="m",version="{new_version}",outcome="success"}}"#
    );
    assert!(metric(&metrics, &served).unwrap_or(0.0) > 0.0, "{metrics}");
    assert!(
        !metrics.contains(r#"model="m",version="1""#),
        "the drained version left series behind"
    );

    // The unload: from now on the name is not found; what was admitted is answered.
    let unloading = Instant::now();
    let unloaded = admin(client.delete(format!("{base}/v1/models/m")))
        .send()
        .await
        .unwrap();
    assert_eq!(unloaded.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    for task in traffic {
        task.await.unwrap();
    }

    let answers = answers.lock().unwrap().clone();
    let before_unload: Vec<&Answer> = answers.iter().filter(|a| a.sent < unloading).collect();
    let failures: Vec<&&Answer> = before_unload.iter().filter(|a| a.status != 200).collect();
    assert!(
        failures.is_empty(),
        "requests failed before the unload: {failures:?}"
    );
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(
            (answer.status, answer.error_type.as_deref()),
            (404, Some("model_not_found")),
            "{answer:?}"
        );
    }
    assert!(
        answers.iter().any(|a| a.status == 404),
        "the unload took effect"
    );
    let score_of = |version: &str| {
        let scores: Vec<f64> = answers
            .iter()
            .filter(|a| a.version.as_deref() == Some(version))
            .filter_map(|a| a.top_score)
            .collect();
        assert!(!scores.is_empty(), "no answer from version {version}");
        scores
    };
    let (old_scores, new_scores) = (score_of("1"), score_of(&new_version));
    assert!(
        answers
            .iter()
            .filter(|a| a.sent > switched && a.status == 200)
            .all(|a| a.version.as_deref() == Some(new_version.as_str())),
        "requests sent after the rollout answered were served by the new version"
    );
    let spread = |s: &[f64]| {
        s.iter().cloned().fold(f64::MIN, f64::max) - s.iter().cloned().fold(f64::MAX, f64::min)
    };
    assert!(spread(&old_scores) < 1e-4 && spread(&new_scores) < 1e-4);
    assert!(
        (old_scores[0] - new_scores[0]).abs() > 1e-3,
        "the versions answer differently: {} vs {}",
        old_scores[0],
        new_scores[0]
    );
    server.terminate();
}

/// `rocket.jpg` classified by `model` (`name` or `name@version`).
async fn post_rocket(client: &reqwest::Client, base: &str, model: &str) -> reqwest::Response {
    let url = format!("{base}/v1/models/{model}/classify");
    post_photo(client, &url, "rocket.jpg").send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_model_gives_its_memory_back() {
    let server = explicit_server(&[]);
    let base = server.base.clone();
    let client = reqwest::Client::new();
    for _ in 0..4 {
        classify(&client, &base, "m", "rocket.jpg").await;
    }
    let before = rss_bytes(server.child.id());
    let loaded = load_model(
        &client,
        &base,
        &json!({
            "name": "big",
            "source": parity_model("tf_efficientnetv2_s"),
            "options": {"input_size": 160}
        }),
    )
    .await;
    assert_eq!(loaded.status(), 201, "{}", loaded.text().await.unwrap());
    for _ in 0..4 {
        classify(&client, &base, "big", "rocket.jpg").await;
    }
    let loaded_rss = rss_bytes(server.child.id());
    // The test means something only if the model took memory worth giving back.
    assert!(
        loaded_rss > before + (60 << 20),
        "loading took only {} MiB",
        (loaded_rss - before) >> 20
    );
    let unloaded = admin(client.delete(format!("{base}/v1/models/big")))
        .send()
        .await
        .unwrap();
    assert_eq!(unloaded.status(), 200);
    let after = rss_bytes(server.child.id());
    eprintln!(
        "RSS: {} MiB before, {} MiB loaded, {} MiB after the unload",
        before >> 20,
        loaded_rss >> 20,
        after >> 20
    );
    assert!(
        after as f64 <= before as f64 * 1.10,
        "RSS {} MiB after the unload, {} MiB before it",
        after >> 20,
        before >> 20
    );
    classify(&client, &base, "m", "rocket.jpg").await;
    server.terminate();
}

/// A model folder made of links to another's files (the poller sees their sizes and times).
fn link_model(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["config.json", "model.safetensors"] {
        let _ = std::fs::remove_file(to.join(file));
        std::os::unix::fs::symlink(from.join(file), to.join(file)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_loads_rolls_out_and_unloads_repository_folders() {
    let root = temp_dir("repository");
    link_model(&lite0_dir(), &root.join("a"));
    let args: Vec<String> = [
        "--model-repository",
        root.to_str().unwrap(),
        "--model-control",
        "poll",
        "--repository-poll-interval",
        "200ms",
        "--admin-token",
        ADMIN,
        "--device",
        "cpu",
        "--max-batch-size",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = ChildServer::start(&args, &[])
        .unwrap_or_else(|logs| panic!("server did not start:\n{}", logs.join("\n")));
    server.wait_ready();
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let first = classify(&client, &base, "a", "rocket.jpg").await;

    // Explicit loads are refused: the folder decides.
    let refused = load_model(&client, &base, &json!({"name": "x", "source": lite0()})).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error_type"],
        "model_control_disabled"
    );

    let parity_lite0 = std::path::PathBuf::from(parity_model("tf_efficientnet_lite0"));
    let wait_for = |name: &'static str, want: &'static [(&'static str, &'static str, bool)]| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let got = versions_of(&repository(&client, &base).await, name);
                let want: Vec<(String, String, bool)> = want
                    .iter()
                    .map(|(v, s, serving)| (v.to_string(), s.to_string(), *serving))
                    .collect();
                if got == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: {got:?}, waiting for {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Added.
    link_model(&parity_lite0, &root.join("b"));
    wait_for("b", &[("1", "ready", true)]).await;
    classify(&client, &base, "b", "rocket.jpg").await;
    // Changed: a rollout to version 2, with the other checkpoint's answers.
    link_model(&parity_lite0, &root.join("a"));
    wait_for("a", &[("2", "ready", true)]).await;
    let second = classify(&client, &base, "a", "rocket.jpg").await;
    assert_eq!(second["version"], "2");
    assert_ne!(
        first["results"][0]["predictions"][0]["score"],
        second["results"][0]["predictions"][0]["score"]
    );
    // Removed.
    std::fs::remove_dir_all(root.join("b")).unwrap();
    wait_for("b", &[]).await;
    let gone = post_rocket(&client, &base, "b").await;
    assert_eq!(gone.status(), 404);
    server.terminate();
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_is_off_without_an_admin_key_and_read_only_under_control_none() {
    // No --admin-token: 403 whatever the key.
    let server = TestServer::start(config_for(&[format!("lite0={}", lite0())]));
    let client = reqwest::Client::new();
    for request in [
        client.get(server.url("/v1/repository")),
        client
            .post(server.url("/v1/models"))
            .json(&json!({"name": "x", "source": "y"})),
        client.delete(server.url("/v1/models/lite0")),
        client.post(server.url("/v2/repository/index")),
    ] {
        let response = request.bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(response.status(), 403);
    }
    // The model is still there, and GET /v1/models/{m} is not a management route.
    assert_eq!(
        client
            .get(server.url("/v1/models/lite0"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.stop().unwrap();

    // With the key but --model-control none: the repository reads, changes are refused.
    let mut config = config_for(&[format!("lite0={}", lite0())]);
    config.admin_token = Some(ADMIN.parse().unwrap());
    let server = TestServer::start(config);
    let listed: Value = admin(client.get(server.url("/v1/repository")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["model_control"], "none");
    assert_eq!(
        versions_of(&listed, "lite0"),
        vec![("1".into(), "ready".into(), true)]
    );
    let index: Value = admin(client.post(server.url("/v2/repository/index")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        index,
        json!([{"name": "lite0", "version": "1", "state": "READY", "reason": ""}])
    );
    let refused = admin(client.delete(server.url("/v1/models/lite0")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error_type"],
        "model_control_disabled"
    );
    let refused = admin(client.post(server.url("/v2/repository/models/lite0/unload")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    server.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_images_are_answered_from_the_cache() {
    let mut config = config_for(&[format!("lite0={}", lite0())]);
    config.cache_bytes = 16 << 20;
    let server = TestServer::start(config);
    let client = reqwest::Client::new();
    let rocket = read("photos/rocket.jpg");
    let post = |body: Vec<u8>, cache_control: Option<&'static str>| {
        let mut request = client
            .post(server.url("/v1/classify"))
            .header("content-type", "image/jpeg")
            .body(body);
        if let Some(value) = cache_control {
            request = request.header("cache-control", value);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let timing = response.headers()["server-timing"]
                .to_str()
                .unwrap()
                .to_owned();
            (response.json::<Value>().await.unwrap(), timing)
        }
    };
    let (fresh, timing) = post(rocket.clone(), None).await;
    assert_eq!(fresh["results"][0]["cached"], false);
    assert!(timing.contains("cache;desc=miss"), "{timing}");
    let (hit, timing) = post(rocket.clone(), None).await;
    assert_eq!(hit["results"][0]["cached"], true);
    assert!(timing.contains("cache;desc=hit"), "{timing}");
    assert_eq!(
        hit["results"][0]["predictions"],
        fresh["results"][0]["predictions"]
    );
    assert_eq!(hit["results"][0]["timing_ms"]["inference"], 0.0);
    // no-cache: answered by the model again; another image: a miss.
    let (revalidated, _) = post(rocket.clone(), Some("no-cache")).await;
    assert_eq!(revalidated["results"][0]["cached"], false);
    let (other, _) = post(read("photos/chelsea.jpg"), None).await;
    assert_eq!(other["results"][0]["cached"], false);
    // Another top_k is another answer.
    let top1 = client
        .post(server.url("/v1/classify?top_k=1"))
        .header("content-type", "image/jpeg")
        .body(rocket.clone())
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(top1["results"][0]["cached"], false);

    // v2 REST goes through the same cache (its outputs make another key: a miss, then a hit).
    let mut v2_timings = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(server.url("/v2/models/lite0/infer"))
            .header("inference-header-content-length", "0")
            .body(rocket.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        v2_timings.push(
            response.headers()["server-timing"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(v2_timings, ["cache;desc=miss", "cache;desc=hit"]);

    let metrics = scrape(&server.base).await;
    let value =
        |series: &str| metric(&metrics, series).unwrap_or_else(|| panic!("{series}\n{metrics}"));
    assert_eq!(
        value(r#"visionserve_cache_hits_total{model="lite0",version="1"}"#),
        2.0
    );
    // The first rocket, chelsea, the top-1 rocket and the first v2 request missed; no-cache
    // did not look.
    assert_eq!(
        value(r#"visionserve_cache_misses_total{model="lite0",version="1"}"#),
        4.0
    );
    assert!(value("visionserve_cache_bytes") > 0.0);
    assert_eq!(value("visionserve_cache_capacity_bytes"), (16 << 20) as f64);
    // Only the model's runs are batches: 5 images went through it.
    assert_eq!(
        value(r#"visionserve_batch_size_sum{model="lite0",version="1"}"#),
        5.0
    );
    server.stop().unwrap();
}
