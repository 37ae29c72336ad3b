//! Prometheus metrics: names, label sets, buckets and the registry, in one place.
//!
//! Durations are histograms in seconds (aggregatable across replicas, unlike summaries);
//! counters get `_total` from the encoder. Per-model handles are resolved once when a model is
//! registered so the request path does no label hashing beyond the outcome label.

mod gpu;
mod process;

pub use process::ProcessStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub const PREFIX: &str = "visionserve";
pub const REQUESTS: &str = "requests";
pub const IMAGES: &str = "images";
pub const FAILURES: &str = "request_failures";
pub const DROPPED_IMAGES: &str = "dropped_images";
pub const REQUEST_DURATION: &str = "request_duration_seconds";
pub const QUEUE_WAIT: &str = "queue_wait_seconds";
pub const PREPROCESS_DURATION: &str = "preprocess_duration_seconds";
pub const INFERENCE_DURATION: &str = "inference_duration_seconds";
pub const BATCH_SIZE: &str = "batch_size";
pub const QUEUE_DEPTH: &str = "queue_depth";
pub const MODEL_READY: &str = "model_ready";
pub const UNAUTHORIZED: &str = "unauthorized_requests";
pub const MODEL_RESTARTS: &str = "model_restarts";
pub const MEMORY_BUDGET: &str = "memory_budget_bytes";
pub const MEMORY_IN_USE: &str = "memory_in_flight_bytes";
pub const ADMITTED: &str = "admitted_images";
pub const ADMISSION_LIMIT: &str = "max_admitted_images";
pub const BUILD_INFO: &str = "build_info";
pub const MODEL_LOAD: &str = "model_load_seconds";
pub const MODEL_WARMUP: &str = "model_warmup_seconds";
pub const CACHE_HITS: &str = "cache_hits";
pub const CACHE_MISSES: &str = "cache_misses";
pub const CACHE_EVICTIONS: &str = "cache_evictions";
pub const CACHE_BYTES: &str = "cache_bytes";
pub const CACHE_CAPACITY: &str = "cache_capacity_bytes";
pub const INSTANCE_BATCHES: &str = "instance_batches";
pub const PRIORITY_ADMITTED: &str = "priority_admitted_images";
pub const PRIORITY_QUEUE_WAIT: &str = "priority_queue_wait_seconds";
pub const KEY_IMAGES: &str = "key_images";
pub const KEY_REFUSED: &str = "key_refused_requests";
pub const DECODED_IMAGES: &str = "decoded_images";

/// `decoded_images`' `scale` values: the size an image was decoded at, relative to its own
/// (1/2 to 1/8: JPEGs decoded smaller with `--jpeg-draft`).
pub const DECODE_SCALES: [&str; 4] = ["1/1", "1/2", "1/4", "1/8"];

/// `visionserve_build_info`'s labels: what this binary is and what it was built against.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub libtorch: &'static str,
    /// The CUDA version libtorch was built with, `none` for a CPU-only libtorch.
    pub cuda: &'static str,
}

impl BuildLabels {
    pub const THIS: BuildLabels = BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
        libtorch: env!("VISIONSERVE_LIBTORCH_VERSION"),
        cuda: env!("VISIONSERVE_LIBTORCH_CUDA"),
    };
}

/// A gauge holding seconds.
pub type SecondsGauge = Gauge<f64, AtomicU64>;

/// Label used for requests naming a model we do not serve (never the client's string: that
/// would let clients create unbounded series).
pub const UNKNOWN_MODEL: &str = "_unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
    /// The model version (`1` for the first load of a name): rollouts get their own series.
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub model: String,
    pub version: String,
    /// The copy's index (`--instances`), as `/v1/models` lists them in `instance_threads`
    /// (not `instance`, which Prometheus gives the scraped target).
    pub model_instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    pub model: String,
    pub version: String,
    /// The level as clients number it (1 = the highest).
    pub priority: String,
}

/// An API key by its name (`name=` in `--api-keys-file`, else a fingerprint): never the key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyRefusalLabels {
    pub key: String,
    /// `rate` or `concurrency`: the limit that refused the request.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub model: String,
    pub version: String,
    /// One of [`DECODE_SCALES`].
    pub scale: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    pub version: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub model: String,
    pub version: String,
    pub reason: &'static str,
}

/// Request outcomes (`outcome` label).
pub const OUTCOME_SUCCESS: &str = "success";
pub const OUTCOME_CLIENT_ERROR: &str = "client_error";
pub const OUTCOME_SERVER_ERROR: &str = "server_error";

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The exemplar of a latency observation: the trace of the request observed (OpenMetrics
/// exemplars; Grafana links a bucket's exemplar to its trace by `trace_id`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

/// A latency histogram whose buckets keep the last traced observation as an exemplar.
pub type TracedHistogram = HistogramWithExemplars<TraceLabel>;

fn traced_latency_histogram() -> TracedHistogram {
    HistogramWithExemplars::new(exponential_buckets(0.0005, 2.0, 16))
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4, ... 256 images
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    images: Family<OutcomeLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    request_duration: Family<ModelLabel, TracedHistogram, fn() -> TracedHistogram>,
    queue_wait: Family<ModelLabel, Histogram, fn() -> Histogram>,
    preprocess: Family<ModelLabel, Histogram, fn() -> Histogram>,
    inference: Family<ModelLabel, Histogram, fn() -> Histogram>,
    batch_size: Family<ModelLabel, Histogram, fn() -> Histogram>,
    queue_depth: Family<ModelLabel, Gauge>,
    model_ready: Family<ModelLabel, Gauge>,
    unauthorized: Family<ProtocolLabel, Counter>,
    restarts: Family<ReasonLabels, Counter>,
    load_seconds: Family<ModelLabel, SecondsGauge>,
    warmup_seconds: Family<ModelLabel, SecondsGauge>,
    admitted: Family<ModelLabel, Gauge>,
    admission_limit: Family<ModelLabel, Gauge>,
    /// The in-flight memory budget and the part of it held now.
    pub memory_budget: Gauge,
    pub memory_in_use: Gauge,
    /// The response cache (`--cache-bytes`): lookups by model, evictions, size and capacity.
    cache_hits: Family<ModelLabel, Counter>,
    cache_misses: Family<ModelLabel, Counter>,
    instance_batches: Family<InstanceLabels, Counter>,
    priority_admitted: Family<PriorityLabels, Gauge>,
    priority_queue_wait: Family<PriorityLabels, Histogram, fn() -> Histogram>,
    key_images: Family<KeyLabel, Counter>,
    key_refused: Family<KeyRefusalLabels, Counter>,
    decoded: Family<ScaleLabels, Counter>,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub cache_capacity: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Register a clone of `metric` under `name` (the registry keeps one handle, the server
/// another) and return it.
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

fn latency_family() -> Family<ModelLabel, Histogram, fn() -> Histogram> {
    Family::new_with_constructor(latency_histogram as fn() -> _)
}

impl Metrics {
    /// Every metric, registered in the order `/metrics` lists them.
    pub fn new() -> Self {
        // The standard process_* metrics carry no prefix; everything else is visionserve_*.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let r = root.sub_registry_with_prefix(PREFIX);
        // visionserve_gpu_* from NVML at each scrape (gpu.rs); no series without a GPU/driver.
        r.register_collector(Box::new(gpu::GpuCollector::new()));
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&BuildLabels::THIS).set(1);
        r.register(
            BUILD_INFO,
            "Always 1; the labels say this binary's version and the libtorch and CUDA versions it was built against",
            build_info,
        );
        let unauthorized = Family::<ProtocolLabel, Counter>::default();
        // Both series exist from the start, so dashboards show 0 rather than nothing.
        for protocol in ["http", "grpc"] {
            let _ = unauthorized.get_or_create(&ProtocolLabel { protocol });
        }
        Self {
            admitted: registered(r, ADMITTED,
                "Images admitted and not yet answered (decoding, queued or running); new requests get 429 when this reaches max_admitted_images",
                Family::default()),
            admission_limit: registered(r, ADMISSION_LIMIT,
                "The model's --max-queue-images: images it admits at once",
                Family::default()),
            load_seconds: registered(r, MODEL_LOAD,
                "How long the model's last load took (reading and placing the weights)",
                Family::default()),
            warmup_seconds: registered(r, MODEL_WARMUP,
                "How long the model's last warm-up took (every batch size, before it turned ready)",
                Family::default()),
            requests: registered(r, REQUESTS,
                "Classification requests by model and outcome",
                Family::default()),
            images: registered(r, IMAGES, "Images by model and outcome", Family::default()),
            failures: registered(r, FAILURES,
                "Failed requests by model and reason (the error_type)",
                Family::default()),
            dropped: registered(r, DROPPED_IMAGES,
                "Queued images dropped before inference, by reason (client_gone: the client disconnected; deadline_exceeded: the request's deadline passed)",
                Family::default()),
            request_duration: registered(r, REQUEST_DURATION,
                "End-to-end request latency (with trace-id exemplars in OpenMetrics when traces are exported)",
                Family::new_with_constructor(traced_latency_histogram as fn() -> _)),
            queue_wait: registered(r, QUEUE_WAIT,
                "Time an image waited between queueing and its batch starting",
                latency_family()),
            preprocess: registered(r, PREPROCESS_DURATION,
                "Decode plus resize/crop time per image",
                latency_family()),
            decoded: registered(r, DECODED_IMAGES,
                "Images decoded, by the scale they were decoded at (1/1: whole; 1/2, 1/4, 1/8: JPEGs decoded smaller with --jpeg-draft)",
                Family::default()),
            inference: registered(r, INFERENCE_DURATION,
                "Model time per batch (input upload, forward, top-k)",
                latency_family()),
            batch_size: registered(r, BATCH_SIZE,
                "Images per batch run by the model",
                Family::new_with_constructor(batch_histogram as fn() -> _)),
            queue_depth: registered(r, QUEUE_DEPTH,
                "Images queued for the model, not yet in a batch",
                Family::default()),
            model_ready: registered(r, MODEL_READY,
                "1 once the model is loaded and warmed up",
                Family::default()),
            unauthorized: registered(r, UNAUTHORIZED,
                "Requests refused for a missing or invalid API key, or a missing client certificate under mutual TLS, by protocol (http, grpc)",
                unauthorized),
            restarts: registered(r, MODEL_RESTARTS,
                "Model threads replaced, by reason (batch_timeout: a batch ran past --batch-timeout; panic: the thread panicked)",
                Family::default()),
            memory_budget: registered(r, MEMORY_BUDGET,
                "The in-flight memory budget (--memory-budget): bodies, decoding images and queued model inputs",
                Gauge::default()),
            memory_in_use: registered(r, MEMORY_IN_USE,
                "Bytes of the in-flight memory budget held by requests now",
                Gauge::default()),
            instance_batches: registered(r, INSTANCE_BATCHES,
                "Batches run by each copy of a model (--instances); with --instances auto, instance 0 has every intra-op thread and runs the batches that arrive at an idle model",
                Family::default()),
            priority_admitted: registered(r, PRIORITY_ADMITTED,
                "Images admitted and not yet answered, by priority level (1 = the highest; only with --priority-levels above 1)",
                Family::default()),
            priority_queue_wait: registered(r, PRIORITY_QUEUE_WAIT,
                "Time images waited between queueing and their batch starting, by priority level (only with --priority-levels above 1)",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram)),
            key_images: registered(r, KEY_IMAGES,
                "Images requested under each API key, by the key's name (its name= in --api-keys-file, else sha256: and the start of its digest); refused requests' images not counted",
                Family::default()),
            key_refused: registered(r, KEY_REFUSED,
                "Requests refused with 429 for an API key's own limits (limit: rate or concurrency)",
                Family::default()),
            cache_hits: registered(r, CACHE_HITS,
                "Images answered from the response cache, by model and version (no decode, no queue)",
                Family::default()),
            cache_misses: registered(r, CACHE_MISSES,
                "Images looked up in the response cache and not found, by model and version",
                Family::default()),
            cache_evictions: registered(r, CACHE_EVICTIONS,
                "Response cache entries evicted to stay within --cache-bytes",
                Counter::default()),
            cache_bytes: registered(r, CACHE_BYTES,
                "Bytes the response cache holds (keys and answers, as estimated)",
                Gauge::default()),
            cache_capacity: registered(r, CACHE_CAPACITY,
                "The response cache's capacity (--cache-bytes; 0: off)",
                Gauge::default()),
            registry: root,
        }
    }

    /// Handles for one model version, resolved once.
    pub fn for_model(&self, model: &str, version: &str) -> ModelMetrics {
        let label = ModelLabel {
            model: model.to_owned(),
            version: version.to_owned(),
        };
        let reason_labels = |reason| ReasonLabels {
            model: model.to_owned(),
            version: version.to_owned(),
            reason,
        };
        // One statement per handle: `get_or_create` returns a read guard, and a second call on
        // the same family in the same expression would wait for it to create its series.
        let dropped = |reason| self.dropped.get_or_create(&reason_labels(reason)).clone();
        let dropped_client_gone = dropped("client_gone");
        let dropped_deadline = dropped("deadline_exceeded");
        let restarted = |reason| self.restarts.get_or_create(&reason_labels(reason)).clone();
        let restarts_batch_timeout = restarted("batch_timeout");
        let restarts_panic = restarted("panic");
        let decoded_at = |scale| {
            self.decoded
                .get_or_create(&ScaleLabels {
                    model: model.to_owned(),
                    version: version.to_owned(),
                    scale,
                })
                .clone()
        };
        let prepare = PrepareMetrics {
            duration: self.preprocess.get_or_create(&label).clone(),
            decoded: DECODE_SCALES.map(decoded_at),
        };
        ModelMetrics {
            model: model.to_owned(),
            version: version.to_owned(),
            failure_reasons: Arc::default(),
            stats: Arc::default(),
            queue_wait: self.queue_wait.get_or_create(&label).clone(),
            prepare,
            inference: self.inference.get_or_create(&label).clone(),
            batch_size: self.batch_size.get_or_create(&label).clone(),
            request_duration: self.request_duration.get_or_create(&label).clone(),
            queue_depth: self.queue_depth.get_or_create(&label).clone(),
            ready: self.model_ready.get_or_create(&label).clone(),
            dropped_client_gone,
            dropped_deadline,
            restarts_batch_timeout,
            restarts_panic,
            load_seconds: self.load_seconds.get_or_create(&label).clone(),
            admitted: self.admitted.get_or_create(&label).clone(),
            admission_limit: self.admission_limit.get_or_create(&label).clone(),
            cache_hits: self.cache_hits.get_or_create(&label).clone(),
            cache_misses: self.cache_misses.get_or_create(&label).clone(),
            warmup_seconds: self.warmup_seconds.get_or_create(&label).clone(),
            instance_batches: self.instance_batches.clone(),
            instances_counted: Arc::default(),
            priority_admitted: self.priority_admitted.clone(),
            priority_queue_wait: self.priority_queue_wait.clone(),
            levels: Arc::default(),
            requests: self.requests.clone(),
            images: self.images.clone(),
            failures: self.failures.clone(),
        }
    }

    /// Count a request that failed before a model was resolved (unknown model).
    pub fn unknown_model_request(&self, reason: &'static str) {
        let model = UNKNOWN_MODEL.to_owned();
        self.requests
            .get_or_create(&OutcomeLabels {
                model: model.clone(),
                version: String::new(),
                outcome: OUTCOME_CLIENT_ERROR,
            })
            .inc();
        self.failures
            .get_or_create(&ReasonLabels {
                model,
                version: String::new(),
                reason,
            })
            .inc();
    }

    /// Count a request refused for its API key (`protocol`: http or grpc).
    pub fn unauthorized_request(&self, protocol: &'static str) {
        self.unauthorized
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }

    /// Drop every series of a model version that was unloaded or replaced: a version that no
    /// longer exists has no series, and rollouts do not pile them up.
    pub fn remove_model(&self, model: &ModelMetrics) {
        let label = ModelLabel {
            model: model.model.clone(),
            version: model.version.clone(),
        };
        self.request_duration.remove(&label);
        for family in [
            &self.queue_wait,
            &self.preprocess,
            &self.inference,
            &self.batch_size,
        ] {
            family.remove(&label);
        }
        for family in [
            &self.queue_depth,
            &self.model_ready,
            &self.admitted,
            &self.admission_limit,
        ] {
            family.remove(&label);
        }
        self.load_seconds.remove(&label);
        self.warmup_seconds.remove(&label);
        for outcome in [OUTCOME_SUCCESS, OUTCOME_CLIENT_ERROR, OUTCOME_SERVER_ERROR] {
            let labels = OutcomeLabels {
                model: label.model.clone(),
                version: label.version.clone(),
                outcome,
            };
            self.requests.remove(&labels);
            self.images.remove(&labels);
        }
        let reasons = model
            .failure_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for reason in reasons {
            self.failures.remove(&model.reason(reason));
        }
        for reason in ["client_gone", "deadline_exceeded"] {
            self.dropped.remove(&model.reason(reason));
        }
        for scale in DECODE_SCALES {
            self.decoded.remove(&ScaleLabels {
                model: label.model.clone(),
                version: label.version.clone(),
                scale,
            });
        }
        for reason in ["batch_timeout", "panic"] {
            self.restarts.remove(&model.reason(reason));
        }
        self.cache_hits.remove(&label);
        self.cache_misses.remove(&label);
        for instance in 0..model.instances_counted.load(Ordering::Acquire) {
            self.instance_batches
                .remove(&model.instance_label(instance));
        }
        for level in 0..model.levels.get().map_or(0, Vec::len) {
            let labels = model.priority_label(level);
            self.priority_admitted.remove(&labels);
            self.priority_queue_wait.remove(&labels);
        }
    }

    /// Images requested under the key named `key` (counted once a request is admitted).
    pub fn key_images(&self, key: &str, images: usize) {
        self.key_images
            .get_or_create(&KeyLabel {
                key: key.to_owned(),
            })
            .inc_by(images as u64);
    }

    /// A request refused for the `limit` (`rate` or `concurrency`) of the key named `key`.
    pub fn key_refused(&self, key: &str, limit: &'static str) {
        self.key_refused
            .get_or_create(&KeyRefusalLabels {
                key: key.to_owned(),
                limit,
            })
            .inc();
    }

    /// Text exposition format 0.0.4 (what Prometheus and `promtool check metrics` expect).
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// OpenMetrics text, for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// How long the model thread's three phases of one batch took.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchPhases {
    /// Building the input tensor: upload and normalisation.
    pub input: Duration,
    /// The forward pass.
    pub infer: Duration,
    /// Softmax, top-k and copying outputs off the device.
    pub output: Duration,
}

/// A count and the time it took, as the v2 statistics extension reports them.
#[derive(Debug, Default)]
pub struct DurationCounter {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl DurationCounter {
    fn add(&self, count: u64, each: Duration) {
        self.count.fetch_add(count, Ordering::Relaxed);
        self.nanos
            .fetch_add(count * each.as_nanos() as u64, Ordering::Relaxed);
    }

    /// (count, total nanoseconds).
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed),
        )
    }
}

/// The batch sizes `BatchStats` keeps apart; larger batches share the last slot.
pub const MAX_TRACKED_BATCH: usize = 256;

/// Per-model totals in the shape of the v2 statistics extension (Triton's `ModelStatistics`),
/// counted by the same `ModelMetrics` calls that feed the histograms, so `/v2/.../stats` and
/// `/metrics` never disagree.
#[derive(Debug)]
pub struct InferStats {
    pub success: DurationCounter,
    pub fail: DurationCounter,
    /// Per image: from queueing to its batch starting.
    pub queue: DurationCounter,
    /// Per image, each charged its whole batch's time (Triton's convention).
    pub compute_input: DurationCounter,
    pub compute_infer: DurationCounter,
    pub compute_output: DurationCounter,
    /// Images run successfully, and batches.
    pub inference_count: AtomicU64,
    pub execution_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last batch (0: none yet).
    pub last_inference_ms: AtomicU64,
    /// Index `size - 1`: batches of that size, per phase.
    pub batches: Vec<[DurationCounter; 3]>,
}

impl Default for InferStats {
    fn default() -> Self {
        Self {
            success: DurationCounter::default(),
            fail: DurationCounter::default(),
            queue: DurationCounter::default(),
            compute_input: DurationCounter::default(),
            compute_infer: DurationCounter::default(),
            compute_output: DurationCounter::default(),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            batches: (0..MAX_TRACKED_BATCH).map(|_| Default::default()).collect(),
        }
    }
}

/// One model's metric handles (cheap to clone: each is an Arc inside).
#[derive(Clone)]
pub struct ModelMetrics {
    model: String,
    version: String,
    /// The `reason`s this version has failed with, so that its series can be removed.
    failure_reasons: Arc<std::sync::Mutex<Vec<&'static str>>>,
    pub stats: Arc<InferStats>,
    queue_wait: Histogram,
    pub prepare: PrepareMetrics,
    inference: Histogram,
    batch_size: Histogram,
    pub request_duration: TracedHistogram,
    pub queue_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub dropped_client_gone: Counter<u64, AtomicU64>,
    pub dropped_deadline: Counter<u64, AtomicU64>,
    pub restarts_batch_timeout: Counter<u64, AtomicU64>,
    pub restarts_panic: Counter<u64, AtomicU64>,
    load_seconds: SecondsGauge,
    warmup_seconds: SecondsGauge,
    /// Images holding an admission permit now, and how many permits there are.
    pub admitted: Gauge,
    pub admission_limit: Gauge,
    requests: Family<OutcomeLabels, Counter>,
    images: Family<OutcomeLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    instance_batches: Family<InstanceLabels, Counter>,
    /// Instances 0..this have a `instance_batches` series, so that it can be removed.
    instances_counted: Arc<std::sync::atomic::AtomicUsize>,
    priority_admitted: Family<PriorityLabels, Gauge>,
    priority_queue_wait: Family<PriorityLabels, Histogram, fn() -> Histogram>,
    /// Per priority level, highest first: set once, when the model has more than one level.
    levels: Arc<std::sync::OnceLock<Vec<LevelMetrics>>>,
}

/// The series of one priority level of a model.
#[derive(Clone, Debug)]
pub struct LevelMetrics {
    pub admitted: Gauge,
    queue_wait: Histogram,
}

/// A model's per-image decode metrics, cheap to clone into the task that decodes.
#[derive(Clone, Debug)]
pub struct PrepareMetrics {
    duration: Histogram,
    /// One counter per entry of [`DECODE_SCALES`].
    decoded: [Counter; 4],
}

impl PrepareMetrics {
    /// An image was decoded at `scale` (one of [`DECODE_SCALES`]), then resized and cropped,
    /// in `elapsed`.
    pub fn image_prepared(&self, scale: &str, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(i) = DECODE_SCALES.iter().position(|s| *s == scale) {
            self.decoded[i].inc();
        }
    }
}

impl ModelMetrics {
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The batch counter of one copy of the model.
    pub fn instance_batches(&self, instance: usize) -> Counter {
        self.instances_counted
            .fetch_max(instance + 1, Ordering::AcqRel);
        self.instance_batches
            .get_or_create(&self.instance_label(instance))
            .clone()
    }

    fn instance_label(&self, instance: usize) -> InstanceLabels {
        InstanceLabels {
            model: self.model.clone(),
            version: self.version.clone(),
            model_instance: instance.to_string(),
        }
    }

    /// The model (re)loaded in `load` and warmed up in `warmup`.
    pub fn model_loaded(&self, load: Duration, warmup: Duration) {
        self.load_seconds.set(load.as_secs_f64());
        self.warmup_seconds.set(warmup.as_secs_f64());
    }

    /// An image at priority level `level` (0 = the highest) waited this long between queueing
    /// and its batch starting.
    pub fn observe_queue_wait(&self, wait: Duration, level: usize) {
        self.queue_wait.observe(wait.as_secs_f64());
        self.stats.queue.add(1, wait);
        if let Some(series) = self.level(level) {
            series.queue_wait.observe(wait.as_secs_f64());
        }
    }

    /// The series of priority level `level` (0 = the highest), once the model has more than
    /// one level ([`ModelMetrics::priority_levels`]).
    pub fn level(&self, level: usize) -> Option<&LevelMetrics> {
        self.levels.get()?.get(level)
    }

    /// Create the per-level series of a model with `count` priority levels (none for one
    /// level: without priorities the model's own series say it all). Returns them, highest
    /// level first.
    pub fn priority_levels(&self, count: usize) -> &[LevelMetrics] {
        self.levels.get_or_init(|| {
            let count = if count > 1 { count } else { 0 };
            (0..count)
                .map(|level| {
                    let labels = self.priority_label(level);
                    LevelMetrics {
                        admitted: self.priority_admitted.get_or_create(&labels).clone(),
                        queue_wait: self.priority_queue_wait.get_or_create(&labels).clone(),
                    }
                })
                .collect()
        })
    }

    fn priority_label(&self, level: usize) -> PriorityLabels {
        PriorityLabels {
            model: self.model.clone(),
            version: self.version.clone(),
            priority: (level + 1).to_string(),
        }
    }

    /// A batch of `size` images ran in `elapsed`.
    pub fn batch_finished(&self, size: usize, elapsed: Duration, phases: BatchPhases) {
        self.inference.observe(elapsed.as_secs_f64());
        self.batch_size.observe(size as f64);
        let stats = &self.stats;
        let n = size as u64;
        stats.compute_input.add(n, phases.input);
        stats.compute_infer.add(n, phases.infer);
        stats.compute_output.add(n, phases.output);
        stats.inference_count.fetch_add(n, Ordering::Relaxed);
        stats.execution_count.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        stats.last_inference_ms.store(now_ms, Ordering::Relaxed);
        let slot = &stats.batches[size.clamp(1, MAX_TRACKED_BATCH) - 1];
        slot[0].add(1, phases.input);
        slot[1].add(1, phases.infer);
        slot[2].add(1, phases.output);
    }

    /// A batch of `size` images failed after `elapsed`.
    pub fn batch_failed(&self, size: usize, elapsed: Duration) {
        self.inference.observe(elapsed.as_secs_f64());
        self.batch_size.observe(size as f64);
    }

    /// A request answered in `elapsed`; `trace_id` (when traced) becomes its bucket's exemplar.
    pub fn request_succeeded(&self, images: usize, elapsed: Duration, trace_id: Option<String>) {
        self.stats.success.add(1, elapsed);
        self.observe_request(elapsed, trace_id);
        self.outcome(&self.requests, OUTCOME_SUCCESS).inc();
        self.outcome(&self.images, OUTCOME_SUCCESS)
            .inc_by(images as u64);
    }

    /// `server_error` is true for 5xx outcomes.
    pub fn request_failed(
        &self,
        reason: &'static str,
        images: usize,
        server_error: bool,
        elapsed: Duration,
        trace_id: Option<String>,
    ) {
        self.stats.fail.add(1, elapsed);
        self.observe_request(elapsed, trace_id);
        let outcome = if server_error {
            OUTCOME_SERVER_ERROR
        } else {
            OUTCOME_CLIENT_ERROR
        };
        self.outcome(&self.requests, outcome).inc();
        if images > 0 {
            self.outcome(&self.images, outcome).inc_by(images as u64);
        }
        self.failures.get_or_create(&self.reason(reason)).inc();
        let mut reasons = self
            .failure_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }

    fn observe_request(&self, elapsed: Duration, trace_id: Option<String>) {
        let exemplar = trace_id.map(|trace_id| TraceLabel { trace_id });
        let at = exemplar.as_ref().map(|_| SystemTime::now());
        self.request_duration
            .observe(elapsed.as_secs_f64(), exemplar, at);
    }

    fn reason(&self, reason: &'static str) -> ReasonLabels {
        ReasonLabels {
            model: self.model.clone(),
            version: self.version.clone(),
            reason,
        }
    }

    fn outcome(&self, family: &Family<OutcomeLabels, Counter>, outcome: &'static str) -> Counter {
        family
            .get_or_create(&OutcomeLabels {
                model: self.model.clone(),
                version: self.version.clone(),
                outcome,
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_gauges() {
        let metrics = Metrics::new();
        let m = metrics.for_model("lite0", "1");
        m.request_succeeded(3, Duration::from_millis(12), None);
        m.request_failed(
            "undecodable_image",
            1,
            false,
            Duration::from_millis(1),
            None,
        );
        m.batch_finished(3, Duration::from_millis(30), BatchPhases::default());
        m.queue_depth.set(2);
        m.prepare.image_prepared("1/8", Duration::from_millis(9));
        metrics.unknown_model_request("model_not_found");
        let text = metrics.encode_prometheus();
        assert!(
            text.contains(
                r#"visionserve_requests_total{model="lite0",version="1",outcome="success"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"visionserve_images_total{model="lite0",version="1",outcome="success"} 3"#
        ));
        assert!(text.contains(
            r#"visionserve_request_failures_total{model="lite0",version="1",reason="undecodable_image"} 1"#
        ));
        assert!(text.contains(
            r#"visionserve_request_failures_total{model="_unknown",version="",reason="model_not_found"} 1"#
        ));
        assert!(
            text.contains(r#"visionserve_batch_size_bucket{model="lite0",version="1",le="4"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"visionserve_queue_depth{model="lite0",version="1"} 2"#));
        assert!(text.contains(
            r#"visionserve_decoded_images_total{model="lite0",version="1",scale="1/8"} 1"#
        ));
        // Every scale has its series from the start, so dashboards show 0 rather than nothing.
        assert!(text.contains(
            r#"visionserve_decoded_images_total{model="lite0",version="1",scale="1/1"} 0"#
        ));
        assert!(!text.contains("# EOF"));
        // An unloaded version leaves no series behind; another version's stay.
        let other = metrics.for_model("lite0", "2");
        other.request_succeeded(1, Duration::from_millis(1), None);
        metrics.remove_model(&m);
        let text = metrics.encode_prometheus();
        assert!(!text.contains(r#"version="1""#), "{text}");
        assert!(text.contains(
            r#"visionserve_requests_total{model="lite0",version="2",outcome="success"} 1"#
        ));
        assert!(metrics.encode_openmetrics().ends_with("# EOF\n"));
    }
}
