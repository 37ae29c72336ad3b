//! Dynamic batching through HTTP: many concurrent single-image requests share batches, and
//! every client gets its own image's answer.

mod common;

use common::*;
use visionserve::config::Instances;

const MAX_BATCH: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched_and_answered_correctly() {
    let lite0 = lite0_dir();
    let mut config = config_for(&[format!("lite0={}", lite0.join("model.pt").display())]);
    config.max_batch_size = Some(MAX_BATCH);
    config.max_batch_delay_ms = 20;
    let server = TestServer::start(config);
    let (batches, _) = post_64_concurrent_images(&server).await;
    assert!(
        batches < 64.0,
        "the model ran {batches} batches for 64 requests: nothing was batched"
    );
    server.stop().unwrap();
}

/// Two copies of the model (`--instances 2`), one intra-op thread each, fed from one queue:
/// every image is answered once, with its own image's classes, and both copies run batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_the_queue_and_answer_correctly() {
    let mut config = config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.max_batch_size = Some(MAX_BATCH);
    config.max_batch_delay_ms = 20;
    config.instances = Instances::Fixed(2);
    config.intra_op_threads = Some(1);
    let server = TestServer::start(config);
    let model = model_info(&server).await;
    assert_eq!(model["instances"], 2, "{model}");
    assert_eq!(
        model["instance_threads"],
        serde_json::json!([1, 1]),
        "{model}"
    );
    let preferred = model["batch_policy"]["preferred_batch_size"]
        .as_u64()
        .unwrap();
    assert!((1..=MAX_BATCH as u64).contains(&preferred), "{model}");
    // With one thread per copy, larger batches may not raise throughput: the policy may then
    // run images one by one, on both copies at once.
    let (batches, sizes) = post_64_concurrent_images(&server).await;
    assert!(
        sizes.iter().all(|&b| b as u64 <= preferred),
        "{sizes:?} {model}"
    );
    let per_copy = instance_batches_settled(&server, 2, batches).await;
    assert_eq!(per_copy.iter().sum::<f64>(), batches, "{per_copy:?}");
    assert!(
        per_copy.iter().all(|&n| n > 0.0),
        "a copy ran nothing: {per_copy:?}"
    );
    server.stop().unwrap();
}

/// `--instances auto`: one request at a time runs on the copy with every thread; a burst runs
/// on the two copies with one thread each, and every answer is still its own image's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_instances_run_lone_requests_solo_and_bursts_on_the_pool() {
    let mut config = config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.max_batch_size = Some(MAX_BATCH);
    config.max_batch_delay_ms = 20;
    config.instances = Instances::Auto;
    // Whatever this machine's CPUs: a solo copy of 2 threads and two copies of 1.
    config.intra_op_threads = Some(2);
    let server = TestServer::start(config);
    let model = model_info(&server).await;
    assert_eq!(model["instances"], 3, "{model}");
    assert_eq!(
        model["instance_threads"],
        serde_json::json!([2, 1, 1]),
        "{model}"
    );

    let (batches, _) = post_64_concurrent_images(&server).await;
    let burst = instance_batches_settled(&server, 3, batches).await;
    assert_eq!(burst.iter().sum::<f64>(), batches, "{burst:?}");
    assert!(
        burst[1] + burst[2] > 0.0,
        "a burst of 64 never reached the pool: {burst:?}"
    );

    let client = reqwest::Client::new();
    let image = read("photos/chelsea.jpg");
    for _ in 0..4 {
        let response = client
            .post(server.url("/v1/classify"))
            .header("content-type", "image/jpeg")
            .body(image.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // The model thread counts its batch finished just after answering: let it.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let after = instance_batches_settled(&server, 3, batches + 4.0).await;
    assert_eq!(
        [
            after[0] - burst[0],
            after[1] - burst[1],
            after[2] - burst[2]
        ],
        [4.0, 0.0, 0.0],
        "one request at a time should run on the solo copy: {burst:?} then {after:?}"
    );
    server.stop().unwrap();
}

/// `--instances auto` where the model's copies would not fit in `--model-memory-budget`: one
/// copy with every thread, which still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_instances_run_one_copy_where_the_copies_do_not_fit_the_memory_budget() {
    let mut config = config_for(&[format!("lite0={}", lite0_dir().display())]);
    config.instances = Instances::Auto;
    config.intra_op_threads = Some(2);
    // Less than any model: start-up models are loaded anyway (with a warning), as small as
    // they can be.
    config.model_memory_budget = Some(1);
    let server = TestServer::start(config);
    let model = model_info(&server).await;
    assert_eq!(model["instances"], 1, "{model}");
    assert_eq!(model["instance_threads"], serde_json::json!([2]), "{model}");
    let response = reqwest::Client::new()
        .post(server.url("/v1/classify"))
        .header("content-type", "image/jpeg")
        .body(read("photos/chelsea.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    server.stop().unwrap();
}

async fn model_info(server: &TestServer) -> serde_json::Value {
    reqwest::get(server.url("/v1/models/lite0"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `visionserve_instance_batches_total` of copies 0..copies.
async fn instance_batches(server: &TestServer, copies: usize) -> Vec<f64> {
    let metrics = scrape(&server.base).await;
    (0..copies)
        .map(|i| {
            let series = format!(
                r#"visionserve_instance_batches_total{{model="lite0",version="1",model_instance="{i}"}}"#
            );
            metric(&metrics, &series).unwrap_or(0.0)
        })
        .collect()
}

/// [`instance_batches`] once they add up to `batches`, or after 5 s: a copy counts its batch
/// after it has answered the batch's images, so a scrape right after the last answer can
/// miss the last count.
async fn instance_batches_settled(server: &TestServer, copies: usize, batches: f64) -> Vec<f64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let per_copy = instance_batches(server, copies).await;
        if per_copy.iter().sum::<f64>() == batches || std::time::Instant::now() > deadline {
            return per_copy;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Post the 64 reference images at once; check each answer against timm's, that every image
/// ran once and batches stayed within the limit. Returns the number of batches and the batch
/// size each client saw.
async fn post_64_concurrent_images(server: &TestServer) -> (f64, Vec<usize>) {
    let cases: Vec<(Vec<u8>, Ranked)> = json("batch.json")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (read(c["file"].as_str().unwrap()), reference(&c["top5"])))
        .collect();
    assert_eq!(cases.len(), 64);

    let client = reqwest::Client::new();
    let url = server.url("/v1/classify");
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (jpeg, _)) in cases.iter().enumerate() {
        let (client, url, jpeg) = (client.clone(), url.clone(), jpeg.clone());
        tasks.spawn(async move {
            let response = client
                .post(url)
                .header("content-type", "image/jpeg")
                .body(jpeg)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            (i, response.json::<serde_json::Value>().await.unwrap())
        });
    }
    let mut batch_sizes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, body) = done.unwrap();
        let result = &body["results"][0];
        assert_same_top5(
            &predictions(result),
            &cases[i].1,
            1e-4,
            &format!("batch image {i}"),
        );
        batch_sizes.push(result["batch_size"].as_u64().unwrap() as usize);
    }
    assert!(
        batch_sizes.iter().all(|&b| (1..=MAX_BATCH).contains(&b)),
        "{batch_sizes:?}"
    );

    let metrics = scrape(&server.base).await;
    let value = |series: &str| {
        metric(&metrics, series).unwrap_or_else(|| panic!("{series} missing\n{metrics}"))
    };
    let batches = value(r#"visionserve_batch_size_count{model="lite0",version="1"}"#);
    let images = value(r#"visionserve_batch_size_sum{model="lite0",version="1"}"#);
    let at_most_max = value(r#"visionserve_batch_size_bucket{model="lite0",version="1",le="8"}"#);
    assert_eq!(images, 64.0, "every image ran exactly once");
    assert_eq!(
        at_most_max, batches,
        "a batch exceeded the maximum of {MAX_BATCH}"
    );
    println!("64 requests ran in {batches} batches; batch sizes seen by clients: {batch_sizes:?}");
    (batches, batch_sizes)
}
