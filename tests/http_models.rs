//! Both native families served through HTTP by one process, each model with its own queue and
//! batcher, against timm's predictions on real photos through each checkpoint's own eval
//! transform (test size, crop and normalisation from its config.json; squash crop for the
//! 384-pixel CoAtNet).

mod common;

use common::*;

const MODELS: [(&str, &str); 3] = [
    ("effnet", "efficientnet/tf_efficientnetv2_b0"),
    ("coatnet", "coatnet/coatnet_nano_rw_224"),
    ("coatnet384", "coatnet/coatnet_rmlp_2_rw_384"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn efficientnet_and_coatnet_side_by_side() {
    let root = parity_data();
    let specs: Vec<String> = MODELS
        .iter()
        .map(|(name, unit)| format!("{name}={}", root.join(unit).display()))
        .collect();
    let mut config = config_for(&specs);
    config.max_batch_size = Some(4);
    let server = tokio::task::spawn_blocking(move || TestServer::start(config))
        .await
        .unwrap();

    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (name, unit) in MODELS {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join(unit).join("meta.json")).unwrap())
                .unwrap();
        for (photo, want) in meta["photos"]
            .as_object()
            .expect("photo references")
            .clone()
        {
            // Several concurrent copies so each model's batcher forms batches while the
            // other models run theirs.
            for copy in 0..3 {
                let (client, url) = (
                    client.clone(),
                    server.url(&format!("/v1/models/{name}/classify")),
                );
                let (photo, want) = (photo.clone(), want.clone());
                tasks.spawn(async move {
                    let body = read(&format!("photos/{photo}"));
                    let response = client
                        .post(url)
                        .body(body)
                        .header("content-type", "application/octet-stream")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "{name} {photo}");
                    let json: serde_json::Value = response.json().await.unwrap();
                    assert_eq!(json["model"], name);
                    assert_same_top5(
                        &predictions(&json["results"][0]),
                        &reference(&want),
                        1e-4,
                        &format!("{name} {photo} #{copy}"),
                    );
                });
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let metrics = scrape(&server.base).await;
    for (name, _) in MODELS {
        let images = metric(
            &metrics,
            &format!("visionserve_batch_size_sum{{model=\"{name}\",version=\"1\"}}"),
        );
        assert_eq!(
            images,
            Some(9.0),
            "{name} ran its 9 images on its own batcher"
        );
    }
    let models: serde_json::Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let describe = |n: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(
        describe("coatnet384")["input_size"],
        serde_json::json!([3, 384, 384])
    );
    assert_eq!(describe("coatnet384")["preprocess"]["crop_mode"], "squash");
    assert_eq!(describe("coatnet")["preprocess"]["crop_pct"], 0.9);
    assert_eq!(
        describe("effnet")["input_size"],
        serde_json::json!([3, 224, 224])
    );
    server.stop().unwrap();
}
