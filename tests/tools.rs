//! The tools around the server: `--config` files (precedence, errors, per-model sections),
//! `visionserve bench` against visionserve over all three protocols and against a plain v2
//! server written here (so it needs no visionserve-only header), and `visionserve tune` with a
//! small budget writing a file the server accepts.

mod common;

use common::{lite0_dir, temp_dir, test_data, ChildServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn visionserve() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_visionserve"));
    // A developer's environment must not change what these tests run.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("VISIONSERVE_")) {
        command.env_remove(key);
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn photo(name: &str) -> String {
    test_data().join("photos").join(name).display().to_string()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// --config

fn printed(config: &Path, envs: &[(&str, &str)], flags: &[&str]) -> toml::Table {
    let output = run(visionserve()
        .args(["config", "--print", "--config"])
        .arg(config)
        .args(flags)
        .envs(envs.iter().copied()));
    assert!(output.status.success(), "{}", text(&output.stderr));
    toml::from_str(&text(&output.stdout)).expect("config --print writes TOML")
}

#[test]
fn the_command_line_beats_the_environment_beats_the_file() {
    let dir = temp_dir("config-precedence");
    let file = write(
        &dir,
        "a.toml",
        "port = 9001\nmax_batch_size = 4\nmax_batch_delay_ms = 7\njpeg_draft = true\n",
    );
    let only_file = printed(&file, &[], &[]);
    assert_eq!(only_file["port"].as_integer(), Some(9001));
    assert_eq!(only_file["max_batch_size"].as_integer(), Some(4));
    assert_eq!(only_file["jpeg_draft"].as_bool(), Some(true));
    let env = [
        ("VISIONSERVE_PORT", "9002"),
        ("VISIONSERVE_MAX_BATCH_SIZE", "6"),
    ];
    let with_env = printed(&file, &env, &[]);
    assert_eq!(with_env["port"].as_integer(), Some(9002));
    assert_eq!(with_env["max_batch_size"].as_integer(), Some(6));
    assert_eq!(
        with_env["max_batch_delay_ms"].as_integer(),
        Some(7),
        "the file still fills the rest"
    );
    let with_flag = printed(&file, &env, &["--port", "9003"]);
    assert_eq!(with_flag["port"].as_integer(), Some(9003));
    assert_eq!(with_flag["max_batch_size"].as_integer(), Some(6));
    // $VISIONSERVE_CONFIG names the file as --config does.
    let output = run(visionserve()
        .args(["config", "--print"])
        .env("VISIONSERVE_CONFIG", &file));
    assert!(text(&output.stdout).contains("port = 9001"));
}

#[test]
fn what_config_print_writes_reads_back_the_same() {
    let dir = temp_dir("config-roundtrip");
    let file = write(
        &dir,
        "a.toml",
        "model = [\"a=weights/a\"]\ncache_bytes = \"64MiB\"\n[models.b]\nsource = \"weights/b\"\nmax_batch_size = 2\ndtype = \"bf16\"\n",
    );
    let first = run(visionserve()
        .args(["config", "--print", "--config"])
        .arg(&file));
    assert!(first.status.success(), "{}", text(&first.stderr));
    let again = write(&dir, "b.toml", &text(&first.stdout));
    let second = run(visionserve()
        .args(["config", "--print", "--config"])
        .arg(&again));
    assert_eq!(text(&first.stdout), text(&second.stdout));
    assert!(text(&first.stdout)
        .contains(r#"model = ["a=weights/a", "b=weights/b?dtype=bf16&max_batch_size=2"]"#));
    // Every key with its default is itself a valid file, and names every flag of serve.
    let defaults = run(visionserve().args(["config", "--print", "--defaults"]));
    let all = write(&dir, "defaults.toml", &text(&defaults.stdout));
    assert!(run(visionserve()
        .args(["config", "--print", "--config"])
        .arg(&all))
    .status
    .success());
    let help = text(&run(visionserve().args(["serve", "--help"])).stdout);
    let flags = help.lines().filter_map(|line| {
        let line = line.trim_start();
        let line = line
            .split_once(", ")
            .filter(|(short, _)| short.len() == 2)
            .map_or(line, |(_, long)| long);
        line.strip_prefix("--")?
            .split([' ', '=', '<'])
            .next()
            .map(|f| f.replace('-', "_"))
    });
    for key in flags {
        if ["help", "version", "config"].contains(&key.as_str()) {
            continue;
        }
        assert!(
            text(&defaults.stdout).contains(&format!("{key} =")),
            "--defaults lacks {key}"
        );
    }
}

#[test]
fn bad_files_name_the_file_the_line_the_key_and_what_is_accepted() {
    let dir = temp_dir("config-errors");
    let cases = [
        (
            "port = 1\ndtype = \"f64\"\n",
            ":2: key `dtype`",
            "possible values: f32, f16, bf16",
        ),
        (
            "max_batch_sise = 4\n",
            ":1: unknown key `max_batch_sise`",
            "did you mean `max_batch_size`?",
        ),
        (
            "port = \"http\"\n",
            ":1: key `port`",
            "invalid value 'http'",
        ),
        (
            "exif_transpose = 1\n",
            ":1: key `exif_transpose`",
            "write true or false",
        ),
        (
            "model = \"a\"\nport = [1]\n",
            ":2: key `port`",
            "not an array",
        ),
        (
            "[models.x]\nsource = \"w\"\ninstances = \"many\"\n",
            ":3: [models.x] key `instances`",
            "auto or a whole number",
        ),
        (
            "[models.x]\nbatch = 2\n",
            ":1: [models.x] needs `source`",
            "hf-hub:ORG/REPO",
        ),
        (
            "[models.x]\nsource = \"w\"\nbatch = 2\n",
            ":3: [models.x] key `batch`",
            "known: input_size",
        ),
        ("port = [\n", ":1: not valid TOML", ""),
    ];
    for (i, (contents, place, accepted)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad{i}.toml"), contents);
        let output = run(visionserve().arg("--config").arg(&file));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{contents:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{}{place}", file.display())),
            "{contents:?}: {stderr}"
        );
        assert!(stderr.contains(accepted), "{contents:?}: {stderr}");
    }
    let missing = run(visionserve().args(["--config", "/nonexistent/visionserve.toml"]));
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr)
        .contains("cannot read the configuration file /nonexistent/visionserve.toml"));
}

#[test]
fn a_server_runs_from_a_file_with_its_models_own_options_and_says_where_each_came_from() {
    let dir = temp_dir("config-serve");
    let file = write(
        &dir,
        "visionserve.toml",
        &format!(
            "max_batch_delay_ms = 1\ngrpc_port = 0\n\n[models.lite0]\nsource = {:?}\nmax_batch_size = 2\nbackend = \"torch\"\ninstances = 1\n",
            lite0_dir().display().to_string()
        ),
    );
    let server = ChildServer::start(
        &["--config".into(), file.display().to_string()],
        &[("VISIONSERVE_MAX_QUEUE_IMAGES", "100")],
    )
    .unwrap_or_else(|logs| panic!("server failed: {logs:?}"));
    server.wait_ready();
    let models = get_json(&server.url("/v1/models"));
    let lite0 = &models["models"][0];
    assert_eq!(lite0["name"], "lite0");
    assert_eq!(lite0["max_batch_size"], 2);
    assert_eq!(lite0["max_batch_delay_ms"], 1);
    assert_eq!(lite0["max_queue_images"], 100);
    assert_eq!(lite0["backend"], "torch");
    assert_eq!(lite0["instances"], 1);
    assert!(server.grpc.is_some(), "grpc_port from the file");
    let (_, logs) = server.terminate();
    let origins = logs
        .iter()
        .find(|l| l.contains("configuration (not at their defaults)"))
        .expect("the start-up log says where settings came from");
    assert!(
        origins.contains(&format!("max_batch_delay_ms=1 ({}:1)", file.display())),
        "{origins}"
    );
    assert!(
        origins.contains("max_queue_images=100 ($VISIONSERVE_MAX_QUEUE_IMAGES)"),
        "{origins}"
    );
    assert!(origins.contains("port=0 (command line)"), "{origins}");
}

/// A GET of JSON (the tests here run outside an async runtime).
fn get_json(url: &str) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

// ---------------------------------------------------------------------------------------------
// bench

/// Run bench with `args` plus short windows, writing JSON; returns it.
fn bench(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = dir.join(format!(
        "bench-{}.json",
        args.join("_").replace(['/', ':', '.'], "")
    ));
    let output = run(visionserve()
        .arg("bench")
        .args(args)
        .args([
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--max-windows",
            "3",
            "-o",
        ])
        .arg(&out));
    assert!(
        output.status.success(),
        "bench {args:?}: {}",
        text(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

fn assert_sane(level: &serde_json::Value) {
    let f = |k: &str| {
        level[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {level}"))
    };
    assert!(f("throughput") > 0.0, "{level}");
    assert!(
        f("p50_ms") > 0.0
            && f("p50_ms") <= f("p90_ms")
            && f("p90_ms") <= f("p99_ms")
            && f("p99_ms") <= f("max_ms"),
        "{level}"
    );
    assert!(level["windows"].as_array().unwrap().len() >= 3, "{level}");
}

#[test]
fn bench_measures_visionserve_over_every_protocol() {
    let dir = temp_dir("bench-visionserve");
    let server = ChildServer::start(
        &[
            "--model".into(),
            lite0_dir().display().to_string(),
            "--grpc-port".into(),
            "0".into(),
        ],
        &[],
    )
    .unwrap_or_else(|logs| panic!("server failed: {logs:?}"));
    server.wait_ready();
    let grpc = server.grpc.clone().expect("a gRPC port");
    let (chelsea, rocket) = (photo("chelsea.jpg"), photo("rocket.jpg"));
    for (protocol, url, stage) in [
        ("v1", &server.base, "inference"),
        ("v2", &server.base, "compute_infer"),
        ("grpc", &grpc, "compute_infer"),
    ] {
        let mut args = vec![
            url.as_str(),
            chelsea.as_str(),
            rocket.as_str(),
            "--protocol",
            protocol,
            "--concurrency",
            "1,3",
        ];
        if protocol == "grpc" {
            args.extend(["--model-name", "tf_efficientnet_lite0"]);
        }
        let result = bench(&dir, &args);
        let levels = result["results"].as_array().unwrap();
        assert_eq!(levels.len(), 2, "{result}");
        assert_eq!(levels[0]["concurrency"], 1);
        assert_eq!(levels[1]["concurrency"], 3);
        for level in levels {
            assert_sane(level);
            assert_eq!(level["errors"], 0, "{protocol}: {level}");
            assert!(
                level["server_stages"][stage]
                    .as_f64()
                    .is_some_and(|ms| ms > 0.0),
                "{protocol}: {level}"
            );
            // The server is a process on this machine: found by its port, its CPU read.
            assert!(
                level["server_cpu_cores"].as_f64().is_some_and(|c| c > 0.0),
                "{protocol}: {level}"
            );
        }
    }
    // The CSV and the HTML report.
    let csv = dir.join("b.csv");
    let html = dir.join("b.html");
    let output = run(visionserve()
        .args([
            "bench",
            &server.base,
            &chelsea,
            "--concurrency",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--max-windows",
            "3",
            "-o",
        ])
        .arg(&csv)
        .arg("--report")
        .arg(&html));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("resp/s") && stdout.contains("c=2"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(csv).unwrap();
    assert!(
        csv.starts_with("concurrency,rate,throughput,p50_ms,p90_ms,p99_ms"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 2);
    let html = std::fs::read_to_string(html).unwrap();
    assert!(html.contains("<svg") && html.contains("latency percentiles by load"));
    assert!(
        !html.contains("<script") && !html.contains("https://"),
        "self-contained, viewable offline"
    );
    server.terminate();
}

/// What the stub v2 server saw.
#[derive(Default)]
struct StubCounts {
    requests: AtomicUsize,
    well_formed: AtomicUsize,
}

/// A minimal KServe v2 server: metadata, a repository index, and an infer endpoint that checks
/// the binary tensor extension and refuses every fourth request with 503. No statistics, no
/// Server-Timing, nothing visionserve-only.
fn start_stub_v2(counts: Arc<StubCounts>) -> String {
    use axum::routing::{get, post};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/v2/repository/index",
                    post(|| async { axum::Json(serde_json::json!([{"name": "stub", "version": "1", "state": "READY"}])) }),
                )
                .route(
                    "/v2/models/stub",
                    get(|| async {
                        axum::Json(serde_json::json!({
                            "name": "stub", "platform": "test",
                            "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}],
                            "outputs": [{"name": "LABEL", "datatype": "BYTES", "shape": [-1]}]
                        }))
                    }),
                )
                .route(
                    "/v2/models/stub/infer",
                    post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                        let counts = counts.clone();
                        async move {
                            let n = counts.requests.fetch_add(1, Ordering::Relaxed);
                            if binary_v2_request_is_well_formed(&headers, &body) {
                                counts.well_formed.fetch_add(1, Ordering::Relaxed);
                            }
                            let status = if n % 4 == 3 { 503 } else { 200 };
                            let answer = serde_json::json!({"model_name": "stub", "outputs": [
                                {"name": "LABEL", "datatype": "BYTES", "shape": [1], "data": ["tabby"]}]});
                            (axum::http::StatusCode::from_u16(status).unwrap(), axum::Json(answer))
                        }
                    }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{address}")
}

/// The JSON header's length in `Inference-Header-Content-Length`, one BYTES input named as the
/// metadata says, its `binary_data_size` covering the rest: a 4-byte length, then a JPEG.
fn binary_v2_request_is_well_formed(headers: &axum::http::HeaderMap, body: &[u8]) -> bool {
    let Some(length) = headers
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return false;
    };
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&body[..length.min(body.len())])
    else {
        return false;
    };
    let input = &header["inputs"][0];
    let tensor = &body[length..];
    let size = input["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap_or(0) as usize;
    input["name"] == "IMAGE"
        && input["datatype"] == "BYTES"
        && size == tensor.len()
        && tensor.len() > 4
        && u32::from_le_bytes(tensor[..4].try_into().unwrap()) as usize == tensor.len() - 4
        && tensor[4..6] == [0xff, 0xd8]
}

#[test]
fn bench_needs_nothing_visionserve_only_from_a_plain_v2_server() {
    let dir = temp_dir("bench-stub");
    let counts = Arc::new(StubCounts::default());
    let url = start_stub_v2(counts.clone());
    let chelsea = photo("chelsea.jpg");
    let closed = bench(
        &dir,
        &[&url, &chelsea, "--protocol", "v2", "--concurrency", "4"],
    );
    assert_eq!(
        closed["model"], "stub",
        "not named: found from the repository index"
    );
    let level = &closed["results"][0];
    assert_sane(level);
    assert!(
        level["server_stages"].as_object().unwrap().is_empty(),
        "the stub reports none"
    );
    let (errors, responses) = (
        level["errors"].as_f64().unwrap(),
        level["responses"].as_f64().unwrap(),
    );
    let refused = errors / (errors + responses);
    assert!(
        (0.2..=0.3).contains(&refused),
        "a quarter refused, counted by status: {level}"
    );
    assert_eq!(level["errors_by_status"]["HTTP 503"].as_f64(), Some(errors));
    assert_eq!(
        counts.well_formed.load(Ordering::Relaxed),
        counts.requests.load(Ordering::Relaxed)
    );
    // Open loop: Poisson arrivals at 40/s, of which three quarters succeed.
    let open = bench(&dir, &[&url, &chelsea, "--protocol", "v2", "--rate", "40"]);
    let level = &open["results"][0];
    assert_eq!(level["rate"], 40.0);
    let throughput = level["throughput"].as_f64().unwrap();
    assert!((15.0..=45.0).contains(&throughput), "about 30/s: {level}");
    // A server whose model takes something else than encoded images is refused clearly.
    let output =
        run(visionserve().args(["bench", "http://127.0.0.1:9", &chelsea, "--protocol", "v2"]));
    assert!(!output.status.success());
}

// ---------------------------------------------------------------------------------------------
// tune

#[test]
fn tune_with_a_small_budget_writes_a_file_the_server_accepts() {
    let dir = temp_dir("tune-small");
    let output = run(visionserve()
        .args(["tune", "--model"])
        .arg(lite0_dir())
        .args([
            "--time-budget",
            "45s",
            "--concurrency",
            "4",
            "--p99-ms",
            "2000",
            "--out-dir",
        ])
        .arg(&dir)
        .arg(photo("chelsea.jpg")));
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        text(&output.stderr)
    );
    assert!(
        stdout.contains("the same as a command line:\n  visionserve --model"),
        "{stdout}"
    );
    assert!(
        stdout.contains("honesty check (from the file, twice)"),
        "{stdout}"
    );
    let file = dir.join("visionserve.toml");
    let checked = run(visionserve()
        .args(["config", "--print", "--config"])
        .arg(&file));
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    assert!(
        text(&checked.stdout).contains("model = [\"tf_efficientnet_lite0="),
        "{}",
        text(&checked.stdout)
    );
    let report = std::fs::read_to_string(dir.join("tune-report.html")).unwrap();
    for part in [
        "Winner",
        "Honesty check",
        "from the file, run 2",
        "Every candidate",
        "<svg",
    ] {
        assert!(report.contains(part), "the report lacks {part}");
    }
    assert!(!report.contains("failed:"), "every candidate ran");
}
