//! Loading native checkpoints: the Hugging Face cache (`hf-hub:`), and checkpoints that do not
//! fit their architecture.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Lay out `files` as `huggingface_hub` caches a repo: blobs, a snapshot of symlinks, a ref.
fn fill_hub_cache(hf_home: &Path, repo: &str, files: &[&Path]) {
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    for (i, file) in files.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("blob{i}"));
        std::fs::copy(file, &blob).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/blob{i}"),
            snapshot.join(file.file_name().unwrap()),
        )
        .unwrap();
    }
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
}

#[tokio::test]
async fn hf_hub_models_load_from_a_prefilled_cache_offline() {
    let unit = parity_data().join("efficientnet/tf_efficientnetv2_b0");
    let hf_home = temp_dir("hf-home");
    fill_hub_cache(
        &hf_home,
        "timm/tf_efficientnetv2_b0.in1k",
        &[&unit.join("config.json"), &unit.join("model.safetensors")],
    );
    let home = hf_home.to_str().unwrap().to_owned();
    let args: Vec<String> = vec![
        "--model".into(),
        "hf-hub:timm/tf_efficientnetv2_b0.in1k".into(),
        "--model".into(),
        format!("folder={}", unit.display()),
        "--max-batch-size".into(),
        "2".into(),
    ];
    let server = tokio::task::spawn_blocking(move || {
        let env = [("HF_HOME", home.as_str()), ("HF_HUB_OFFLINE", "1")];
        let server = ChildServer::start(&args, &env)
            .unwrap_or_else(|logs| panic!("server failed:\n{}", logs.join("\n")));
        server.wait_ready();
        server
    })
    .await
    .unwrap();
    let from_hub = classify(
        &reqwest::Client::new(),
        &server.base,
        "tf_efficientnetv2_b0",
        "chelsea.png",
    )
    .await;
    let from_folder = classify(
        &reqwest::Client::new(),
        &server.base,
        "folder",
        "chelsea.png",
    )
    .await;
    assert_eq!(
        from_hub["results"][0]["predictions"],
        from_folder["results"][0]["predictions"]
    );
    let models: serde_json::Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hub = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tf_efficientnetv2_b0")
        .unwrap()
        .clone();
    assert_eq!(hub["source"], "hf-hub:timm/tf_efficientnetv2_b0.in1k");
    // Served at the checkpoint's test size (224), not its train size (192).
    assert_eq!(hub["input_size"], serde_json::json!([3, 224, 224]));
    let (status, _) = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());

    // Offline and not cached: a start-up error that says why and what to do.
    let args = vec![
        "--model".into(),
        "hf-hub:timm/tf_efficientnetv2_s.in1k".into(),
    ];
    let home = hf_home.to_str().unwrap().to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        match ChildServer::start(
            &args,
            &[("HF_HOME", home.as_str()), ("HF_HUB_OFFLINE", "1")],
        ) {
            Err(logs) => logs,
            Ok(mut server) => {
                let status = server.child.wait().unwrap();
                assert!(!status.success());
                server.terminate().1
            }
        }
    })
    .await
    .unwrap();
    let text = outcome.join("\n");
    assert!(
        text.contains("HF_HUB_OFFLINE") && text.contains("tf_efficientnetv2_s.in1k"),
        "{text}"
    );
    std::fs::remove_dir_all(&hf_home).unwrap();
}

/// Write a copy of the Lite0 model folder whose checkpoint went through `edit`.
fn edited_lite0(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
    architecture: Option<&str>,
) -> PathBuf {
    let src = lite0_dir();
    let dir = temp_dir(name);
    let mut tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    if let Some(arch) = architecture {
        config["architecture"] = arch.into();
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    dir
}

async fn start_up_error(dir: &Path) -> String {
    let config = config_for(&[format!("broken={}", dir.display())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = visionserve::run(config, listener, std::future::pending()).await;
    std::fs::remove_dir_all(dir).unwrap();
    format!(
        "{:#}",
        result.expect_err("the checkpoint must be refused at start-up")
    )
}

#[tokio::test]
async fn checkpoints_that_do_not_fit_fail_start_up_naming_the_tensor() {
    let missing = edited_lite0(
        "missing",
        |t| t.retain(|(k, _)| k != "blocks.3.1.conv_dw.weight"),
        None,
    );
    let message = start_up_error(&missing).await;
    assert!(
        message.contains("\"blocks.3.1.conv_dw.weight\"") && message.contains("[480, 1, 3, 3]"),
        "{message}"
    );

    let misshapen = edited_lite0(
        "misshapen",
        |t| {
            let entry = t
                .iter_mut()
                .find(|(k, _)| k == "classifier.weight")
                .unwrap();
            entry.1 = Tensor::zeros([10, 1280], (tch::Kind::Float, tch::Device::Cpu));
        },
        None,
    );
    let message = start_up_error(&misshapen).await;
    assert!(
        message.contains("\"classifier.weight\" has shape [10, 1280]")
            && message.contains("[1000, 1280]"),
        "{message}"
    );

    let extra = edited_lite0(
        "extra",
        |t| {
            t.push((
                "head.extra.weight".into(),
                Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu)),
            ))
        },
        None,
    );
    let message = start_up_error(&extra).await;
    assert!(message.contains("\"head.extra.weight\""), "{message}");

    // Lite0 weights under another EfficientNet's name: the first mismatch is reported.
    let wrong_variant = edited_lite0("variant", |_| {}, Some("tf_efficientnet_b0"));
    let message = start_up_error(&wrong_variant).await;
    assert!(
        message.contains("tf_efficientnet_b0")
            && message
                .contains("\"blocks.0.0.se.conv_reduce.weight\" (expected shape [8, 32, 1, 1])"),
        "{message}"
    );

    let unknown = edited_lite0("unknown", |_| {}, Some("resnet50"));
    let message = start_up_error(&unknown).await;
    assert!(
        message.contains("\"resnet50\" has no native implementation")
            && message.contains("weights/export.py"),
        "{message}"
    );
}
