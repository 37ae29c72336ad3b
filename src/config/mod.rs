//! Command-line and environment configuration. Every default lives here.
//!
//! Each flag also reads a `VISIONSERVE_*` environment variable; the doc comment of each field is
//! its `--help` text, and README.md's flag table is generated from `--help`.

pub mod file;

use clap::builder::Resettable;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "visionserve",
    version,
    about = "Image-classification inference server (libtorch)"
)]
pub struct Config {
    /// A TOML file of settings: each flag of `serve` is a key (`max_batch_size = 4`,
    /// `model = [...]`), and `[models.NAME]` sections give models with their own options. The
    /// command line and VISIONSERVE_* variables override it; `visionserve config --print
    /// --defaults` lists every key.
    #[arg(long, env = "VISIONSERVE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "VISIONSERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free port).
    #[arg(long, env = "VISIONSERVE_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Port for the KServe v2 gRPC protocol (`inference.GRPCInferenceService` and
    /// `grpc.health.v1.Health`) on --host; 0 picks a free port. Off when not given.
    #[arg(long, env = "VISIONSERVE_GRPC_PORT")]
    pub grpc_port: Option<u16>,

    /// A model to serve, as NAME=SOURCE or just SOURCE (repeatable). SOURCE is a folder in the
    /// Hugging Face Hub layout (config.json + model.safetensors, pytorch_model.bin or a
    /// TorchScript model.pt), one weights file inside such a folder, or `hf-hub:ORG/REPO`.
    /// Per-model options follow a `?`, e.g. `v2s=hf-hub:timm/tf_efficientnetv2_s.in1k?input_size=300`
    /// (options: input_size, arch, backend, jpeg_draft, dtype, max_batch_size, max_batch_delay_ms,
    /// instances).
    #[arg(long = "model", env = "VISIONSERVE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// A folder whose every subfolder holding a config.json is served as a model named after
    /// the subfolder.
    #[arg(long, env = "VISIONSERVE_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,

    /// Who may change the served models at run time: `none` (the models given at start-up),
    /// `explicit` (the management API: POST /v1/models, DELETE /v1/models/{m}, v2's
    /// /v2/repository/...; needs --admin-token) or `poll` (--model-repository is watched and
    /// its added, changed and removed folders are loaded, rolled out and unloaded).
    #[arg(long, env = "VISIONSERVE_MODEL_CONTROL", value_enum, default_value_t = ModelControl::None)]
    pub model_control: ModelControl,

    /// How often --model-control poll scans --model-repository (e.g. 5s, 500ms); a folder's
    /// change is applied once two scans agree.
    #[arg(long, env = "VISIONSERVE_REPOSITORY_POLL_INTERVAL", default_value = "5s", value_parser = parse_timeout)]
    pub repository_poll_interval: Duration,

    /// The key for the management API (GET /v1/repository, POST /v1/models, DELETE
    /// /v1/models/{m}, /v2/repository/...), sent as `Authorization: Bearer KEY` or
    /// `x-api-key: KEY`. Separate from --api-key: inference keys do not manage models and this
    /// key does not classify. Without it the management API answers 403.
    #[arg(long, env = "VISIONSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<crate::auth::Secret>,

    /// Memory the served models may take together, as estimated before each load (per copy of
    /// the model, its weights plus working memory for the largest batch); with --instances
    /// auto a version whose copies do not fit loads as one copy, and a run-time load that still
    /// does not fit is refused with 507. During a rollout the old and the new version both count
    /// [default: the memory limit minus --memory-budget, minus --cache-bytes, minus 512 MiB for
    /// the runtime, at least 256 MiB].
    #[arg(long, env = "VISIONSERVE_MODEL_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub model_memory_budget: Option<u64>,

    /// Bytes of per-image answers the response cache keeps (e.g. 256MiB); 0 turns it off.
    /// Keyed by the image bytes' BLAKE3 hash, the model, its version and the requested outputs;
    /// a hit skips decoding and the queue. `Cache-Control: no-cache` on a request skips the
    /// lookup, `no-store` the cache.
    #[arg(long, env = "VISIONSERVE_CACHE_BYTES", default_value = "0", value_parser = parse_bytes_or_off)]
    pub cache_bytes: u64,

    /// The model `POST /v1/classify` uses (default: the first model given).
    #[arg(long, env = "VISIONSERVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,

    /// Where models run: `auto` (CUDA when available, else CPU), `cpu` or `cuda:N`.
    #[arg(long, env = "VISIONSERVE_DEVICE", default_value = "auto")]
    pub device: String,

    /// What runs the models: `openvino` compiles a native model (this crate's own description
    /// of it, as an ONNX graph) with OpenVINO for the CPU, several times faster than libtorch
    /// there; `torch` runs it on libtorch, the reference, and the only backend for GPUs and
    /// TorchScript exports. `auto` (the default) is openvino for native models on the CPU and
    /// torch otherwise; where OpenVINO is missing or cannot compile a model it falls back to
    /// torch and logs why. A model's own `backend` option overrides this.
    #[arg(long, env = "VISIONSERVE_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// Weight and activation precision: f32 (the default, faithful to the checkpoint), f16
    /// (CUDA only) or bf16 (CUDA, or CPUs with bf16 instructions; elsewhere oneDNN emulates it
    /// and it is slower than f32). BENCHMARKS.md gives its speed and agreement with f32.
    #[arg(long, env = "VISIONSERVE_DTYPE", value_enum, default_value_t = DType::F32)]
    pub dtype: DType,

    /// Largest batch the batcher forms; every size up to it is warmed up before ready
    /// [default: 8 on CPU, 32 on CUDA].
    #[arg(long, env = "VISIONSERVE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Longest the batcher holds back an idle model to let images that are still being decoded
    /// join the batch, measured from the oldest queued image (an idle model with nothing in
    /// flight never waits).
    #[arg(long, env = "VISIONSERVE_MAX_BATCH_DELAY_MS", default_value_t = 5)]
    pub max_batch_delay_ms: u64,

    /// Copies of each model, each run by its own thread and fed from the same queue: on a GPU,
    /// one copy's upload and download overlap another's compute; on a CPU, N copies with
    /// 1/N of the cores each run without the threads of one operator waiting for each other.
    /// `auto` (the default) on a CPU with 2 or more cores: one copy with every intra-op thread
    /// runs the batches that arrive at an idle model (latency), and copies with half the
    /// threads each (two on an even number of threads) take over once images queue
    /// (throughput); the two kinds never run at once. On a GPU or one CPU, `auto` is one copy,
    /// and so it is for a model whose copies' estimated memory would not fit in what is left of
    /// --model-memory-budget. Each copy holds its own weights and working memory.
    #[arg(long, env = "VISIONSERVE_INSTANCES", default_value = "auto", value_parser = Instances::parse)]
    pub instances: Instances,

    /// Images admitted per model (being decoded, queued or running) before new requests get
    /// 429 Too Many Requests.
    #[arg(long, env = "VISIONSERVE_MAX_QUEUE_IMAGES", default_value_t = 256)]
    pub max_queue_images: usize,

    /// Most images in one request.
    #[arg(long, env = "VISIONSERVE_MAX_IMAGES_PER_REQUEST", default_value_t = 32)]
    pub max_images_per_request: usize,

    /// Largest request body in bytes.
    #[arg(long, env = "VISIONSERVE_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a client may take to send its request body (408 after that).
    #[arg(long, env = "VISIONSERVE_BODY_TIMEOUT", default_value_t = 30)]
    pub body_timeout: u64,

    /// Classification requests handled at once, all models together (429 beyond): with
    /// --max-body-bytes it bounds the memory request bodies can take.
    #[arg(
        long,
        env = "VISIONSERVE_MAX_CONCURRENT_REQUESTS",
        default_value_t = 512
    )]
    pub max_concurrent_requests: usize,

    /// Seconds a classification request may take from its headers to its answer (504
    /// `deadline_exceeded` after); a request may ask for less (`?timeout=`, a `Request-Timeout`
    /// header, v2's `timeout` parameter, gRPC's deadline), never for more. Images whose
    /// deadline passed are dropped before inference.
    #[arg(long, env = "VISIONSERVE_REQUEST_TIMEOUT", default_value_t = 60)]
    pub request_timeout: u64,

    /// Priority levels of classification requests, 1 the highest (as Triton numbers them). A
    /// request names its level with `?priority=` or a `Priority: N` header (`/v1`, v2 REST),
    /// v2's `priority` parameter or gRPC `priority` metadata (0: the default level); an API
    /// key may cap it. Batches fill from the highest level first, and each level has its own
    /// queue limit and timeout, so a flood at a low level is refused before it displaces the
    /// levels above. 1 (the default): no priorities, and a priority sent is ignored.
    #[arg(long, env = "VISIONSERVE_PRIORITY_LEVELS", default_value_t = 1)]
    pub priority_levels: usize,

    /// The level of requests that name none (1 = the highest).
    #[arg(long, env = "VISIONSERVE_DEFAULT_PRIORITY", default_value_t = 1)]
    pub default_priority: u64,

    /// Per level, highest first (comma-separated): a request at the level is admitted while
    /// the model has fewer images than this in flight, else 429 [default: level L of N may
    /// fill --max-queue-images * (N - L + 1) / N].
    #[arg(long, env = "VISIONSERVE_PRIORITY_QUEUE_IMAGES", value_delimiter = ',')]
    pub priority_queue_images: Vec<usize>,

    /// Per level, highest first (comma-separated): the seconds a request at the level may
    /// take, at most --request-timeout [default: --request-timeout for every level].
    #[arg(
        long,
        env = "VISIONSERVE_PRIORITY_REQUEST_TIMEOUT",
        value_delimiter = ','
    )]
    pub priority_request_timeout: Vec<u64>,

    /// Longest one batch may run on the model (e.g. 30s, 500ms). Past it the model is
    /// considered wedged: it turns not ready, the batch's requests get 503 at once, and a new
    /// model thread loads and warms up (after 1 s, doubling to 60 s if it keeps failing). A
    /// panic in the model thread does the same (its batch gets 500).
    #[arg(long, env = "VISIONSERVE_BATCH_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub batch_timeout: Duration,

    /// Largest image (width x height) accepted; checked from the header before decoding.
    #[arg(
        long,
        env = "VISIONSERVE_MAX_IMAGE_PIXELS",
        default_value_t = 40_000_000
    )]
    pub max_image_pixels: u64,

    /// Apply the EXIF orientation tag before preprocessing (timm does not, so it is off).
    #[arg(long, env = "VISIONSERVE_EXIF_TRANSPOSE")]
    pub exif_transpose: bool,

    /// Decode large JPEGs at 1/2, 1/4 or 1/8 of their size (libjpeg-turbo's DCT scaling), never
    /// below what the model's resize step needs, as Pillow's `Image.draft` does: a 12-megapixel
    /// photo decodes several times faster, with scores close to, not equal to, timm's on the
    /// whole image. A model's `jpeg_draft` option overrides it. Off: decoded whole, as timm does.
    #[arg(long, env = "VISIONSERVE_JPEG_DRAFT")]
    pub jpeg_draft: bool,

    /// In-flight memory budget in bytes (e.g. 512MiB, 2GiB): request bodies being received
    /// (their Content-Length; twice that for JSON and multipart, which are copied once), images
    /// being decoded (7 bytes per pixel, read from the header first) and the model inputs of
    /// queued images hold it until released. A request that does not fit waits 250 ms, then
    /// gets 429; one larger than the whole budget gets 413 [default: a quarter of the memory
    /// limit (cgroup memory.max or memory.limit_in_bytes, else the machine's RAM), at least
    /// 64 MiB].
    #[arg(long, env = "VISIONSERVE_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,

    /// Threads libtorch uses inside one operator: with --instances N, per copy; with auto (the
    /// default), the copy that runs lone batches, and half of it (rounded down) for each pool
    /// copy [default: the CPUs the process may use (cgroup CPU quota included), divided by N
    /// with --instances N, at least 1; libtorch's own default, the machine's physical cores,
    /// oversubscribes a container].
    #[arg(long, env = "VISIONSERVE_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<usize>,

    /// Threads that decode and resize images [default: the CPUs the process may use].
    #[arg(long, env = "VISIONSERVE_DECODE_THREADS")]
    pub decode_threads: Option<usize>,

    /// Seconds to finish admitted requests after SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "VISIONSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// An API key clients must present (`Authorization: Bearer KEY` or `x-api-key: KEY`) on
    /// every protocol; repeatable, comma-separated in the environment variable. With no key
    /// (here or in --api-keys-file) the server is open. Health endpoints stay open.
    #[arg(
        long = "api-key",
        env = "VISIONSERVE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<crate::auth::Secret>,

    /// A file of API keys, one per line (`#` starts a comment), accepted besides --api-key and
    /// re-read on SIGHUP so keys rotate without a restart (a reload that fails keeps the keys in
    /// force).
    #[arg(long, env = "VISIONSERVE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Require an API key for `/metrics` too (it is open by default, for scrapers).
    #[arg(long, env = "VISIONSERVE_PROTECT_METRICS")]
    pub protect_metrics: bool,

    /// Serve HTTPS instead of HTTP on --port, and gRPC over TLS on --grpc-port: the
    /// certificate chain, a PEM file with the server's certificate first (needs --tls-key).
    /// Re-read with --tls-key on SIGHUP: new connections get the new certificate, open ones
    /// keep theirs (a reload that fails keeps the certificate in force). Plain HTTP sent to the
    /// port gets 400.
    #[arg(long, env = "VISIONSERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert, a PEM file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "VISIONSERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: the CA certificates (PEM) that client certificates must chain to (needs
    /// --tls-cert). A certificate that is expired or from another CA fails the handshake. A
    /// client with no certificate is refused (HTTP 403, gRPC UNAUTHENTICATED) on everything but
    /// the health probes, which stay open for kubelet. Re-read on SIGHUP.
    #[arg(long, env = "VISIONSERVE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Let web pages served from this origin call the API from a browser (CORS), e.g.
    /// `https://app.example.com`; repeatable, or `*` for any origin. Preflights are answered
    /// before the API key is checked (browsers send none on them), and pages may send
    /// `Authorization` and `x-api-key`. Off when not given: browsers then keep pages on other
    /// origins from reading any answer.
    #[arg(long = "cors-origin", env = "VISIONSERVE_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<String>,

    /// One structured line per request (`visionserve::access` target, INFO; probes and scrapes
    /// at DEBUG): request id, trace id, client address, protocol, method, route, model and
    /// version, images, bytes in and out, status, error_type, cache, stage times and total.
    /// Refusals (401, 413, 429) are logged too; keys, bodies and images never.
    #[arg(long, env = "VISIONSERVE_ACCESS_LOG", value_enum, default_value_t = Switch::On)]
    pub access_log: Switch,

    /// Log format.
    #[arg(long, env = "VISIONSERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax (RUST_LOG is read too).
    #[arg(long, env = "VISIONSERVE_LOG", default_value = "info")]
    pub log: String,

    /// Export OpenTelemetry traces to this OTLP endpoint: gRPC (`http://collector:4317`), or
    /// HTTP/protobuf when the URL says so (port 4318 or a path ending in `/v1/traces`, or
    /// OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf). OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and
    /// OTEL_EXPORTER_OTLP_ENDPOINT are read when this is not given; without any, nothing is
    /// traced or exported.
    #[arg(long, env = "VISIONSERVE_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of exported traces [default: OTEL_SERVICE_NAME, else visionserve].
    #[arg(long, env = "VISIONSERVE_OTLP_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,

    /// The share of traces started here that are exported, 0 to 1; a request whose client
    /// sent a sampled `traceparent` follows the client's choice (parent-based sampling)
    /// [default: OTEL_TRACES_SAMPLER(_ARG), else 1].
    #[arg(long, env = "VISIONSERVE_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

/// `--backend`: what runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// OpenVINO for native models on the CPU, libtorch otherwise.
    Auto,
    /// libtorch: CPU and GPU, native models and TorchScript.
    Torch,
    /// OpenVINO on the CPU, native models.
    Openvino,
}

impl Backend {
    /// `auto`, `torch` or `openvino`, as a model option writes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(text, true)
            .map_err(|_| format!("backend must be auto, torch or openvino, not {text:?}"))
    }
}

/// An on/off setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--model-control`: who may change the served models at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// The models given at start-up, for the life of the process.
    None,
    /// The management API loads and unloads (it needs `--admin-token`).
    Explicit,
    /// The `--model-repository` folder decides: the poller applies its changes.
    Poll,
}

// ---------------------------------------------------------------------------------------------
// Values as people write them on the command line, in environment variables and in requests

/// A timeout as clients write it: `250ms`, `1.5s`, `800us`, or a bare number of seconds.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v * scale).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            format!("timeout must be a positive duration such as 250ms, 1.5s or 2, not {text:?}")
        })
}

/// A `--cors-origin`: `*`, or `scheme://host[:port]` as a browser sends it in `Origin` (no
/// path, no trailing slash).
pub fn parse_origin(origin: &str) -> Result<String, String> {
    let accepted = "write an origin as a browser sends it, e.g. https://app.example.com or \
                    http://localhost:3000 (no path, no trailing slash), or * for any";
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_default();
    let well_formed = !host.is_empty()
        && !host.contains(['/', '?', '#', '@'])
        && host.chars().all(|c| c.is_ascii_graphic());
    if well_formed {
        Ok(origin.to_owned())
    } else {
        Err(format!("{origin:?} is not an origin: {accepted}"))
    }
}

/// `--otlp-endpoint`: an `http://` URL with a host. No TLS stack is built in for the exporter
/// (a collector runs beside the server), so `https://` is refused rather than failing later.
pub fn parse_otlp_endpoint(url: &str) -> Result<String, String> {
    let accepted = "write a URL such as http://localhost:4317 (gRPC) or \
                    http://localhost:4318/v1/traces (HTTP/protobuf)";
    if url.starts_with("https://") {
        return Err(format!(
            "{url:?}: traces are exported without TLS; send them to a collector on this host \
             or in this pod over http:// ({accepted})"
        ));
    }
    let host = url.strip_prefix("http://").unwrap_or_default();
    if host.is_empty() || host.starts_with('/') || !url.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!("{url:?} is not an OTLP endpoint: {accepted}"));
    }
    Ok(url.to_owned())
}

/// `--trace-sample-ratio`: a share between 0 and 1.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!(
            "{text:?} is not a sampling ratio: write a number from 0 (none) to 1 (every trace)"
        )),
    }
}

/// `512MiB`, `1GiB`, `300MB`, `64k` or plain bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?} is not a size: write e.g. 512MiB, 2GiB or bytes"
            ))
        }
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(|v| (v * scale as f64) as u64)
        .ok_or_else(|| format!("{text:?} is not a size: write e.g. 512MiB, 2GiB or bytes"))
}

/// [`parse_bytes`], or `0` for a feature sized by bytes that is off (`--cache-bytes 0`).
pub fn parse_bytes_or_off(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(text)
}

/// Bytes for people: `48.0 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// `--instances`: a fixed number of interchangeable copies, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    Fixed(usize),
    /// A copy with every thread for lone batches, and a pool of copies for load (CPU).
    Auto,
}

impl Instances {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            _ => match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Self::Fixed(n)),
                _ => Err(format!(
                    "--instances must be auto or a whole number of at least 1, not {s:?}"
                )),
            },
        }
    }
}

/// Where a model runs, parsed from `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("--device must be auto, cpu or cuda:N, not {s:?}")),
        }
    }
}

impl Config {
    pub fn device_choice(&self) -> Result<DeviceChoice, String> {
        DeviceChoice::parse(&self.device)
    }

    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }

    /// Reject combinations that cannot work, before anything is loaded.
    pub fn validate(&self) -> Result<(), String> {
        let device = self.device_choice()?;
        if self.dtype == DType::F16 && device == DeviceChoice::Cpu {
            return Err(
                "--dtype f16 needs CUDA (CPUs have no fast f16 convolutions); on CPU use --dtype bf16 or f32"
                    .into(),
            );
        }
        if self.max_batch_size == Some(0) {
            return Err("--max-batch-size must be at least 1".into());
        }
        if self.max_images_per_request == 0 {
            return Err("--max-images-per-request must be at least 1".into());
        }
        if self.max_images_per_request > self.max_queue_images {
            return Err(format!(
                "--max-images-per-request ({}) cannot exceed --max-queue-images ({}): \
                 such a request could never be admitted",
                self.max_images_per_request, self.max_queue_images
            ));
        }
        if self.max_concurrent_requests == 0 || self.body_timeout == 0 || self.request_timeout == 0
        {
            return Err(
                "--max-concurrent-requests, --body-timeout and --request-timeout must be at least 1"
                    .into(),
            );
        }
        if self.decode_threads == Some(0) || self.intra_op_threads == Some(0) {
            return Err("thread counts must be at least 1".into());
        }
        if self.model_control == ModelControl::Explicit && self.admin_token.is_none() {
            return Err(
                "--model-control explicit needs --admin-token: without it anyone who reaches the \
                 port could load files from this machine"
                    .into(),
            );
        }
        if self.model_control == ModelControl::Poll && self.model_repository.is_none() {
            return Err(
                "--model-control poll needs --model-repository (the folder to watch)".into(),
            );
        }
        if self.cors_origins.len() > 1 && self.cors_origins.iter().any(|o| o == "*") {
            return Err(
                "--cors-origin * allows every origin: give it alone, not with others".into(),
            );
        }
        self.validate_tls()?;
        if self.models.is_empty() && self.model_repository.is_none() {
            return Err("no model given: pass --model NAME=PATH or --model-repository DIR".into());
        }
        let levels = self.priority_levels()?;
        if let Some(level) = levels
            .all()
            .find(|&level| levels.queue_images(level) < self.max_images_per_request)
        {
            return Err(format!(
                "--priority-queue-images: level {} admits {} images, fewer than \
                 --max-images-per-request ({}): such a request could never be admitted at it",
                level.number(),
                levels.queue_images(level),
                self.max_images_per_request
            ));
        }
        Ok(())
    }

    /// The priority levels and what each allows (`--priority-*`).
    pub fn priority_levels(&self) -> Result<crate::priority::Levels, String> {
        let timeouts: Vec<Duration> = self
            .priority_request_timeout
            .iter()
            .map(|&s| Duration::from_secs(s))
            .collect();
        crate::priority::Levels::new(
            self.priority_levels,
            self.default_priority,
            &self.priority_queue_images,
            &timeouts,
            self.max_queue_images,
            Duration::from_secs(self.request_timeout),
        )
    }

    /// --tls-cert and --tls-key come together; --tls-client-ca needs them.
    fn validate_tls(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("--tls-cert needs --tls-key (its private key)".into()),
            (None, Some(_)) => {
                return Err("--tls-key needs --tls-cert (the certificate it belongs to)".into())
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(
                "--tls-client-ca needs --tls-cert and --tls-key: client certificates are \
                 checked in the TLS handshake"
                    .into(),
            );
        }
        Ok(())
    }

    /// The TLS files, when --tls-cert is given (after [`Config::validate`]).
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// A configuration for tests and embedding: every default, the given models, port 0.
    /// `VISIONSERVE_*` variables are ignored, so a developer's environment cannot change what
    /// a test runs.
    pub fn for_models<I: IntoIterator<Item = S>, S: Into<String>>(models: I) -> Self {
        let command = Config::command().mut_args(|arg| arg.env(Resettable::Reset));
        let matches = command.get_matches_from(["visionserve"]);
        let mut config = Config::from_arg_matches(&matches).expect("the defaults parse");
        config.port = 0;
        config.models = models.into_iter().map(Into::into).collect();
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceChoice::parse("auto"), Ok(DeviceChoice::Auto));
        assert_eq!(DeviceChoice::parse("cuda:1"), Ok(DeviceChoice::Cuda(1)));
        assert!(DeviceChoice::parse("gpu").is_err());
    }

    #[test]
    fn rejects_f16_but_not_bf16_on_cpu() {
        let mut c = Config::for_models(["m=weights/x"]);
        c.device = "cpu".into();
        c.dtype = DType::F16;
        let error = c.validate().unwrap_err();
        assert!(
            error.contains("needs CUDA") && error.contains("bf16"),
            "{error}"
        );
        c.dtype = DType::Bf16;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn rejects_requests_that_can_never_be_admitted() {
        let mut c = Config::for_models(["m=weights/x"]);
        c.max_images_per_request = 300;
        assert!(c.validate().unwrap_err().contains("--max-queue-images"));
    }

    #[test]
    fn test_configs_ignore_the_environment() {
        // A variable no test sets: what a developer might have exported.
        std::env::set_var("VISIONSERVE_MAX_BATCH_DELAY_MS", "999");
        let config = Config::for_models(["m=weights/x"]);
        std::env::remove_var("VISIONSERVE_MAX_BATCH_DELAY_MS");
        assert_eq!(config.max_batch_delay_ms, 5);
        assert_eq!(config.port, 0);
    }

    #[test]
    fn timeouts_parse_with_their_units() {
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout(" 2 "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_timeout("800us"), Ok(Duration::from_micros(800)));
        for bad in ["", "0", "-1s", "fast", "1h", "inf", "1e20", "1e-300", "NaN"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn cors_origins_are_checked_as_browsers_send_them() {
        for good in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert_eq!(parse_origin(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.com/x",
            "ftp://x",
            "https://",
            "http://a b",
        ] {
            assert!(
                parse_origin(bad)
                    .unwrap_err()
                    .contains("e.g. https://app.example.com"),
                "{bad}"
            );
        }
        let mut c = Config::for_models(["m=weights/x"]);
        c.cors_origins = vec!["*".into(), "https://a.example".into()];
        assert!(c.validate().unwrap_err().contains("alone"));
    }

    #[test]
    fn tls_flags_come_together() {
        let mut c = Config::for_models(["m=weights/x"]);
        c.tls_cert = Some("cert.pem".into());
        let error = c.validate().unwrap_err();
        assert!(
            error.contains("--tls-cert") && error.contains("--tls-key"),
            "{error}"
        );
        c.tls_key = Some("key.pem".into());
        assert_eq!(c.validate(), Ok(()));
        c.tls_cert = None;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("--tls-key needs --tls-cert"));
        c.tls_key = None;
        c.tls_client_ca = Some("ca.pem".into());
        assert!(c.validate().unwrap_err().contains("--tls-client-ca needs"));
    }

    #[test]
    fn requires_a_model() {
        let c = Config::for_models(Vec::<String>::new());
        assert!(c.validate().unwrap_err().contains("no model"));
    }
}
