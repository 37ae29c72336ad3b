//! The subcommands: `classify` over the test photos answers exactly what the server answers,
//! skips unreadable files, resumes with --skip-existing, and writes CSV; `models` lists the
//! presets; `download` fails clearly offline.

mod common;

use common::{config_for, lite0_dir, temp_dir, test_data, TestServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn visionserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_visionserve"))
}

/// A folder with a few test photos (in a subfolder too) and one file that is not an image.
fn photo_folder(name: &str) -> PathBuf {
    let dir = temp_dir(&format!("cli-{name}"));
    std::fs::create_dir_all(dir.join("more")).unwrap();
    let photos = test_data().join("photos");
    for photo in ["chelsea.jpg", "coffee.png", "rocket.jpg"] {
        std::fs::copy(photos.join(photo), dir.join(photo)).unwrap();
    }
    std::fs::copy(photos.join("astronaut.png"), dir.join("more/astronaut.png")).unwrap();
    std::fs::write(dir.join("broken.jpg"), b"not a jpeg at all").unwrap();
    dir
}

fn run_classify(args: &[&str]) -> (String, String) {
    let output = visionserve()
        .args(["classify", "--device", "cpu", "--model"])
        .arg(lite0_dir())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "classify failed:\n{stderr}");
    (stdout, stderr)
}

fn jsonl(text: &str) -> BTreeMap<String, serde_json::Value> {
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["file"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

async fn server_answer(server: &TestServer, file: &Path) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(server.url("/v1/models/lite0/classify?top_k=3"))
        .header("content-type", "application/octet-stream")
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["results"][0]["predictions"].clone()
}

#[tokio::test]
async fn classify_answers_what_the_server_answers() {
    let dir = photo_folder("same");
    let (stdout, stderr) = run_classify(&["--top-k", "3", dir.to_str().unwrap()]);
    let results = jsonl(&stdout);
    let names: Vec<String> = results
        .keys()
        .map(|k| {
            Path::new(k)
                .strip_prefix(&dir)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "chelsea.jpg",
            "coffee.png",
            "more/astronaut.png",
            "rocket.jpg"
        ]
    );
    assert!(
        stderr.contains("broken.jpg"),
        "the unreadable file is reported:\n{stderr}"
    );
    assert!(stderr.contains("classified 4 of 5 images"), "{stderr}");

    let server = TestServer::start(config_for(&[format!("lite0={}", lite0_dir().display())]));
    for (file, result) in &results {
        assert_eq!(result["model"], "model");
        let ours = result["predictions"].as_array().unwrap();
        let answer = server_answer(&server, Path::new(file)).await;
        let theirs = answer.as_array().unwrap();
        assert_eq!(ours.len(), 3);
        // The server's code path: the same classes and labels in the same order, and the same
        // scores up to the few ulps that differ between batch sizes (libtorch's kernels sum in
        // another order for a batch of 4 than for 1; the server's own answers vary as much).
        for (a, b) in ours.iter().zip(theirs) {
            assert_eq!(
                (&a["index"], &a["label"]),
                (&b["index"], &b["label"]),
                "{file}"
            );
            let (x, y) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
            assert!((x - y).abs() < 1e-5, "{file}: {x} vs {y}");
        }
    }
    server.stop().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn classify_resumes_and_writes_csv() {
    let dir = photo_folder("resume");
    let out = dir.join("results.csv");
    let out_arg = out.to_str().unwrap();
    // First run: two photos only.
    let first = [dir.join("chelsea.jpg"), dir.join("rocket.jpg")];
    let mut args = vec![
        "--output",
        "csv",
        "--top-k",
        "2",
        "-o",
        out_arg,
        "--skip-existing",
    ];
    let first: Vec<&str> = first.iter().map(|p| p.to_str().unwrap()).collect();
    run_classify(&[args.clone(), first].concat());
    // Second run over the folder: only what is missing is classified.
    args.push(dir.to_str().unwrap());
    let (_, stderr) = run_classify(&args);
    assert!(stderr.contains("2 already done"), "{stderr}");
    assert!(stderr.contains("classified 2 of 3 images"), "{stderr}");
    let csv = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "file,rank,index,label,score", "one header");
    assert_eq!(lines.len(), 1 + 4 * 2, "four photos, two rows each:\n{csv}");
    let chelsea: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("chelsea.jpg"))
        .copied()
        .collect();
    assert_eq!(chelsea.len(), 2);
    assert!(
        chelsea[0].contains(",1,") && chelsea[1].contains(",2,"),
        "{chelsea:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn models_lists_presets_and_checkpoints() {
    let output = visionserve().arg("models").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "tf_efficientnet_lite0",
        "timm/tf_efficientnetv2_b0.in1k",
        "coatnet_nano_rw_224",
        "squash",
    ] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }
}

#[test]
fn download_fails_clearly_offline() {
    let cache = temp_dir("hf");
    let output = visionserve()
        .args(["download", "hf-hub:timm/tf_efficientnetv2_b0.in1k"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn flags_without_a_subcommand_still_serve() {
    // `visionserve --help` is the server's help (its flags), listing the subcommands too.
    let output = visionserve().arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "--model",
        "--grpc-port",
        "classify",
        "download",
        "models",
        "serve",
    ] {
        assert!(help.contains(expected), "{expected} missing:\n{help}");
    }
}
