//! Shared test helpers: the test data, servers on port 0, requests, metrics, process memory
//! and scratch folders.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use visionserve::config::Config;

/// The data `make test-data` builds with Pillow + timm (tests/fixtures/make_test_data.py).
pub fn test_data() -> PathBuf {
    let dir = std::env::var_os("VISIONSERVE_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data"));
    assert!(
        dir.join("lite0.json").is_file(),
        "test data missing in {}: run `make test` (or `make test-data`) first",
        dir.display()
    );
    dir
}

/// The real EfficientNet-Lite0 model folder `make weights` exports.
pub fn lite0_dir() -> PathBuf {
    let dir = std::env::var_os("VISIONSERVE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tf_efficientnet_lite0")
        });
    assert!(
        dir.join("config.json").is_file(),
        "model missing in {}: run `make weights`",
        dir.display()
    );
    dir
}

pub fn read(path: &str) -> Vec<u8> {
    let full = test_data().join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

pub fn json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&read(path)).expect("valid JSON fixture")
}

/// A server running `visionserve::run` on its own thread and runtime, bound to port 0.
pub struct TestServer {
    pub base: String,
    /// `http://ADDR` of the gRPC port, when the config asked for one (`grpc_port`).
    pub grpc: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Start and wait until `/health/ready` answers 200.
    pub fn start(config: Config) -> Self {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let grpc = match config.grpc_port {
                    Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
                    None => None,
                };
                let grpc_addr = grpc.as_ref().map(|l| l.local_addr()).transpose()?;
                addr_tx
                    .send((listener.local_addr()?, grpc_addr))
                    .expect("test waits for the address");
                let listeners = visionserve::Listeners {
                    http: listener,
                    grpc,
                };
                visionserve::serve(config, listeners, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let (addr, grpc_addr) = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server bound a port");
        let server = Self {
            base: format!("http://{addr}"),
            grpc: grpc_addr.map(|a| format!("http://{a}")),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server.wait_ready(Duration::from_secs(300));
        server
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/health/ready", self.base);
        while Instant::now() < deadline {
            if let Some(thread) = &self.thread {
                assert!(!thread.is_finished(), "server exited while starting");
            }
            if http_status(&url) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server not ready after {timeout:?}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Signal shutdown and wait for `run` to return.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().expect("server thread panicked"),
            None => Ok(()),
        }
    }

    /// Ask the server to shut down without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn join(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A blocking GET returning the status, with plain std networking (usable outside a runtime).
pub fn http_status(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

pub fn config_for(models: &[String]) -> Config {
    let mut config = Config::for_models(models.iter().cloned());
    config.device = "cpu".into();
    config.max_batch_size = Some(4);
    config
}

/// Ranked (class index, probability) pairs.
pub type Ranked = Vec<(u64, f64)>;

/// Top-5 from a classify response result: (index, score).
pub fn predictions(result: &serde_json::Value) -> Ranked {
    result["predictions"]
        .as_array()
        .expect("predictions array")
        .iter()
        .map(|p| (p["index"].as_u64().unwrap(), p["score"].as_f64().unwrap()))
        .collect()
}

/// Reference top-5 as written by the fixture script: [[index, prob], ...].
pub fn reference(value: &serde_json::Value) -> Ranked {
    value
        .as_array()
        .expect("reference array")
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Same indices in the same order and every probability within `tol`.
pub fn assert_same_top5(got: &[(u64, f64)], want: &[(u64, f64)], tol: f64, what: &str) {
    let got_idx: Vec<u64> = got.iter().map(|p| p.0).collect();
    let want_idx: Vec<u64> = want.iter().map(|p| p.0).collect();
    assert_eq!(
        got_idx, want_idx,
        "{what}: top-5 indices differ (got {got:?}, want {want:?})"
    );
    for ((_, g), (_, w)) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol,
            "{what}: score {g} vs {w} differs by more than {tol}"
        );
    }
}

/// The real `visionserve` binary as a child process on port 0, for what only a process shows
/// (signals, environment variables, exit status).
pub struct ChildServer {
    pub child: std::process::Child,
    pub base: String,
    /// `http://ADDR` of the gRPC port, when `--grpc-port` was given.
    pub grpc: Option<String>,
    logs: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ChildServer {
    /// Start with `args` (plus `--port 0` and JSON logs) and `envs`; waits for the address.
    /// Returns Err with the logs if the process exits first.
    pub fn start(args: &[String], envs: &[(&str, &str)]) -> Result<Self, Vec<String>> {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_visionserve"))
            .args(args)
            .args(["--port", "0", "--log-format", "json"])
            .envs(envs.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (addr_tx, addr_rx) = mpsc::channel();
        let (grpc_tx, grpc_rx) = mpsc::channel();
        let logs = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in stderr.lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    let address = event["address"].as_str().unwrap_or_default().to_owned();
                    if event["message"] == "listening" {
                        let _ = addr_tx.send(address);
                    } else if event["message"] == "gRPC listening" {
                        let _ = grpc_tx.send(address);
                    }
                }
                lines.push(line);
            }
            lines
        });
        match addr_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => Ok(Self {
                child,
                base: format!("http://{addr}"),
                // Logged before the HTTP address.
                grpc: grpc_rx.try_recv().ok().map(|a| format!("http://{a}")),
                logs: Some(logs),
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(logs.join().unwrap_or_default())
            }
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while http_status(&format!("{}/health/ready", self.base)) != Some(200) {
            assert!(Instant::now() < deadline, "not ready in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGTERM, wait for exit; returns (exit status, log lines).
    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let logs = self
            .logs
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (status, logs)
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The parity fixtures (`make parity-data`).
pub fn parity_data() -> PathBuf {
    let dir = std::env::var_os("VISIONSERVE_PARITY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/parity"));
    assert!(
        dir.is_dir(),
        "parity data missing in {}: run `make test` (or `make parity-data`)",
        dir.display()
    );
    dir
}

/// The server's `/metrics` text.
pub async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series `name{labels}` in metrics text, if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')
            .map(|v| v.trim().parse().unwrap())
    })
}

/// A v2 gRPC request classifying one encoded image (typed `bytes_contents`).
pub fn grpc_image_request(
    model: &str,
    image: Vec<u8>,
) -> visionserve::grpc::proto::ModelInferRequest {
    use visionserve::grpc::proto;
    proto::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![proto::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents: Some(proto::InferTensorContents {
                bytes_contents: vec![image],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `name{labels} value` lines of the text format, keyed by name+labels.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed sample {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        // Ours, and the standard process metrics every Prometheus client exports.
        assert!(
            series.starts_with("visionserve_") || series.starts_with("process_"),
            "{line:?}"
        );
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// (VmRSS, VmHWM) of `pid`, in bytes.
pub fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resident memory (VmRSS) of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    memory_of(pid).0
}

/// A fresh, empty folder for one test, unique to the process, `tag` and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("visionserve-{tag}-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `photos/{photo}` of the test data posted to `url` with its content type.
pub fn post_photo(client: &reqwest::Client, url: &str, photo: &str) -> reqwest::RequestBuilder {
    let content_type = if photo.ends_with(".png") {
        "image/png"
    } else {
        "image/jpeg"
    };
    client
        .post(url)
        .header("content-type", content_type)
        .body(read(&format!("photos/{photo}")))
}

/// Classify `photo` with `model` on the server at `base`: the answer, which must be 200.
pub async fn classify(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    photo: &str,
) -> serde_json::Value {
    let url = format!("{base}/v1/models/{model}/classify");
    let response = post_photo(client, &url, photo).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `GET /v1/models` on the server at `base`, each model's entry keyed by its name.
pub async fn listed_models(
    client: &reqwest::Client,
    base: &str,
) -> std::collections::HashMap<String, serde_json::Value> {
    let listed: serde_json::Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listed["models"]
        .as_array()
        .expect("a models array")
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_owned(), m.clone()))
        .collect()
}
