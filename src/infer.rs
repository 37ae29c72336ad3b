//! The inference service: the one core every front end (`/v1` REST, v2 REST, v2 gRPC, the
//! CLI) calls, through one entry point, [`Inference::infer`].
//!
//! A front end parses what it can without the body (route, query, headers, metadata) into an
//! [`Intake`], and makes one call. The service then owns the envelope that is the same for
//! every protocol:
//! 1. the checks that need no body (the model exists and is ready with room in its queue, the
//!    server is not shutting down and has room for another request), so that a refusal never
//!    reads the body: the intake is dropped unread, which discards it;
//! 2. the client's options ([`RequestOptions`]: its time limit, its cache choice, the memory its
//!    body needs, reserved before the body is read);
//! 3. the intake's read step ([`Intake::read`]), which turns the body into images and outputs;
//! 4. admission against the model's queue limit, decode and preprocess on the decode pool, one
//!    queue entry per image, and the wait for every answer;
//! 5. counting the outcome once, from the typed error ([`RequestFailure`]); a request dropped
//!    before it ends (its client left) is counted as `client_gone`.
//!
//! The front end renders the [`Answer`], or maps its error to its protocol's status. The service
//! never sees an HTTP or gRPC type; its errors are [`InferError`]s.

use crate::auth::{KeyPolicy, KeyRefusal};
use crate::backend::{InFlight, ModelHandle};
use crate::batching::{ImageJob, JobError};
pub use crate::batching::{ImagePrediction, Outputs};
use crate::budget::{MemoryBudget, Reservation, BUDGET_WAIT};
use crate::cache::{CacheKey, CacheUse, ResponseCache};
pub use crate::error::{InferError, RequestFailure};
use crate::images::decode::{DecodeOptions, DecodeScale};
pub use crate::images::Pixels;
use crate::images::{self, DecodePool};
use crate::metrics::Metrics;
use crate::priority::{Level, Levels};
use crate::registry::{split_version, Missing, Registry};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// How long a refusal for overload or unavailability (429 / RESOURCE_EXHAUSTED, 503 /
/// UNAVAILABLE) is held before it is sent. Clients that ignore `Retry-After` and retry at once
/// would otherwise turn an overloaded server into a rejection loop that spends its CPU on
/// refusals (each body still sent and drained) instead of the model; held refusals cost a
/// timer, not CPU, and well-behaved clients wait longer than this anyway. RELIABILITY.md has
/// the storm this was measured under.
pub const REFUSAL_PACE: Duration = Duration::from_millis(200);

/// Hold a refusal for [`REFUSAL_PACE`] before it is answered.
pub async fn pace_refusal() {
    tokio::time::sleep(REFUSAL_PACE).await;
}

/// `reason` label of requests whose client left before the answer.
pub const CLIENT_GONE: &str = "client_gone";

/// Bounds the service enforces for every protocol.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_images_per_request: usize,
    pub max_concurrent_requests: usize,
    /// The longest a request may take; requests may ask for less.
    pub request_timeout: Duration,
    pub decode: DecodeOptions,
    /// The priority levels, and what each allows.
    pub priority: Levels,
}

/// One image of a request, as a front end hands it over.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// An encoded file (JPEG, PNG, WebP, GIF, BMP): decoded and preprocessed here.
    Encoded(Bytes),
    /// Pixels the client already preprocessed to the model's input size.
    Pixels(Pixels),
}

/// The answer for one image, with its own decode and preprocess times (zero for pixels and
/// for answers from the response cache).
#[derive(Debug, Clone)]
pub struct ImageOutput {
    pub prediction: ImagePrediction,
    pub decode: Duration,
    pub preprocess: Duration,
    /// Answered from the response cache: nothing was decoded or run.
    pub cached: bool,
}

/// A model as a request names it: `name` (its serving version) or a version of it.
#[derive(Debug, Clone, Copy)]
pub struct ModelRef<'a> {
    pub name: &'a str,
    /// `None` or empty: the serving version.
    pub version: Option<&'a str>,
}

impl<'a> ModelRef<'a> {
    /// `name` or `name@version`, as `/v1` and the CLI write it.
    pub fn parse(spec: &'a str) -> Self {
        let (name, version) = split_version(spec);
        Self { name, version }
    }

    /// A name and version the protocol carries apart (v2 routes, gRPC).
    pub fn new(name: &'a str, version: Option<&'a str>) -> Self {
        Self {
            name,
            version: version.filter(|v| !v.is_empty()),
        }
    }
}

/// What a client chose for its request, known before its body is read.
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// The client's own time limit (the shortest it gave), within `--request-timeout`.
    pub timeout: Option<Duration>,
    /// How the request may use the response cache (its `Cache-Control`).
    pub cache: CacheUse,
    /// Memory the body takes while the request runs, held before it is read.
    pub body_bytes: Option<u64>,
    /// The priority the client asked for (1 = the highest, 0 = the default), as it wrote it.
    pub priority: Option<u64>,
    /// The API key the request presented, whose limits apply to it.
    pub key: Option<Arc<KeyPolicy>>,
}

impl RequestOptions {
    /// Shorten the time limit to `timeout` (the shortest of several wins).
    pub fn limit_time(&mut self, timeout: Duration) {
        self.timeout = Some(self.timeout.map_or(timeout, |t| t.min(timeout)));
    }
}

/// What a front end's read step makes of a body: the images, what to compute for each, and
/// what the front end keeps to render its answer.
pub struct Plan<K> {
    pub images: Vec<ImageInput>,
    pub outputs: Outputs,
    /// A time limit the body itself carries (v2's `timeout` parameter).
    pub timeout: Option<Duration>,
    /// A priority the body itself carries (v2's `priority` parameter).
    pub priority: Option<u64>,
    pub keep: K,
}

/// A request as a front end hands it to [`Inference::infer`]: what it parsed without the body,
/// and how to read the body. Dropping it unread discards the body (a refused request's client
/// still gets its answer: the HTTP layer drains what it sends).
pub trait Intake: Send {
    /// What the front end needs back to render the answer (ids, requested tensors, formats).
    type Keep: Send;
    /// The front end's error: every service error converts into it, and it says how the
    /// request is counted.
    type Error: From<InferError> + RequestFailure + Send;

    /// The client's options, once the request is admitted for `model` (whose class count
    /// bounds `top_k`, for instance). An error fails the request before its body is read.
    fn options(&mut self, model: &ModelHandle) -> Result<RequestOptions, Self::Error>;

    /// Read the body and plan the request: its images and outputs.
    fn read(
        self,
        model: Arc<ModelHandle>,
    ) -> impl Future<Output = Result<Plan<Self::Keep>, Self::Error>> + Send;
}

/// A request's answer: one output per image, in request order.
pub struct Answer<K> {
    /// The version that answered.
    pub model: Arc<ModelHandle>,
    pub outputs: Vec<ImageOutput>,
    pub keep: K,
    /// From the request's admission to its last answer (the `total` stage).
    pub elapsed: Duration,
}

impl<K> Answer<K> {
    /// What the access log records of this answer; `cache_on` says whether a response cache
    /// could have answered it.
    pub fn access_note(&self, cache_on: bool) -> crate::access::AccessNote {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut note = crate::access::AccessNote {
            model: self.model.name().to_owned(),
            version: self.model.version().to_owned(),
            images: self.outputs.len(),
            ..Default::default()
        };
        for output in &self.outputs {
            note.decode_ms = note.decode_ms.max(ms(output.decode));
            note.preprocess_ms = note.preprocess_ms.max(ms(output.preprocess));
            note.queue_ms = note.queue_ms.max(ms(output.prediction.queue_wait));
            note.inference_ms = note.inference_ms.max(ms(output.prediction.inference));
        }
        let hits = self.outputs.iter().filter(|o| o.cached).count();
        note.cache = match (cache_on, hits) {
            (false, _) => "-",
            (true, 0) => "miss",
            (true, n) if n == self.outputs.len() => "hit",
            (true, _) => "partial",
        };
        note
    }
}

/// The served models and what every request shares.
pub struct Inference {
    registry: Arc<Registry>,
    default_model: String,
    limits: Limits,
    pool: DecodePool,
    memory: Arc<MemoryBudget>,
    metrics: Arc<Metrics>,
    cache: Option<Arc<ResponseCache>>,
    /// One permit per request being handled (`--max-concurrent-requests`).
    requests: Arc<Semaphore>,
    shutting_down: AtomicBool,
}

/// What [`Inference`] is built from.
pub struct Parts {
    pub registry: Arc<Registry>,
    pub default_model: String,
    pub limits: Limits,
    pub pool: DecodePool,
    pub memory: Arc<MemoryBudget>,
    pub metrics: Arc<Metrics>,
    pub cache: Option<Arc<ResponseCache>>,
}

impl Inference {
    pub fn new(parts: Parts) -> Self {
        Self {
            registry: parts.registry,
            default_model: parts.default_model,
            memory: parts.memory,
            requests: Arc::new(Semaphore::new(parts.limits.max_concurrent_requests)),
            limits: parts.limits,
            pool: parts.pool,
            metrics: parts.metrics,
            cache: parts.cache,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Every name's serving version, by name.
    pub fn models(&self) -> Vec<Arc<ModelHandle>> {
        self.registry.serving()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn cache(&self) -> Option<&Arc<ResponseCache>> {
        self.cache.as_ref()
    }

    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn pool(&self) -> &DecodePool {
        &self.pool
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The model a client named: `name` (its serving version) or `name@version`.
    pub fn model(&self, spec: &str) -> Result<Arc<ModelHandle>, InferError> {
        let (name, version) = split_version(spec);
        self.model_version(name, version)
    }

    /// `name` at `version` (`None` or empty: the serving version), or `ModelNotFound` listing
    /// what exists.
    pub fn model_version(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelHandle>, InferError> {
        let version = version.filter(|v| !v.is_empty());
        self.registry
            .lookup(name, version)
            .map_err(|missing| not_found(name, version, missing))
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Live and every serving model loaded and warmed up. Versions loading beside a serving
    /// one (a rollout) or under a new name do not count: loading a model at run time never
    /// takes a ready server out of its load balancer.
    pub fn all_ready(&self) -> bool {
        !self.is_shutting_down() && self.models().iter().all(|m| m.status.is_ready())
    }

    /// The one entry point of every front end: admit a request for `model`, apply the client's
    /// options, read and plan it with `intake`, run it, and count its outcome once. A request
    /// refused before its body is read drops `intake` unread.
    pub async fn infer<I: Intake>(
        &self,
        model: ModelRef<'_>,
        intake: I,
    ) -> Result<Answer<I::Keep>, I::Error> {
        let mut request = self.begin(model)?;
        let handled = request.handle(intake).await;
        match &handled {
            Ok(_) => request.succeeded(),
            Err(err) => request.failed(err),
        }
        let (outputs, keep) = handled?;
        Ok(Answer {
            model: request.model.clone(),
            outputs,
            keep,
            elapsed: request.started.elapsed(),
        })
    }

    /// Everything that can be decided about a request before its body is read. A refusal is
    /// counted in the metrics here.
    fn begin(&self, model: ModelRef<'_>) -> Result<InferRequest, InferError> {
        let started = Instant::now();
        let ModelRef { name, version } = model;
        let version = version.filter(|v| !v.is_empty());
        let (model, in_flight) = match self.registry.lease(name, version) {
            Ok(leased) => leased,
            Err(missing) => {
                let err = not_found(name, version, missing);
                self.metrics.unknown_model_request(err.error_type());
                return Err(err);
            }
        };
        let permit = self.admit_request(&model).inspect_err(|err| {
            model.metrics.request_failed(
                err.error_type(),
                0,
                err.is_server_error(),
                started.elapsed(),
                None,
            );
        })?;
        let span = tracing::Span::current();
        Ok(InferRequest {
            model,
            started,
            timeout: self.limits.request_timeout,
            images: 0,
            limits: self.limits,
            pool: self.pool.clone(),
            memory: self.memory.clone(),
            cache: self.cache.clone(),
            cache_use: CacheUse::default(),
            held: Vec::new(),
            trace: crate::telemetry::RequestTrace::of(&span),
            span,
            level: self.limits.priority.default_level(),
            key: None,
            _key_slot: None,
            metrics: self.metrics.clone(),
            _permit: permit,
            _in_flight: in_flight,
            recorded: false,
        })
    }

    fn admit_request(&self, model: &ModelHandle) -> Result<OwnedSemaphorePermit, InferError> {
        if self.is_shutting_down() {
            return Err(InferError::ShuttingDown);
        }
        model.ensure_ready()?;
        self.requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| InferError::TooManyRequests {
                limit: self.limits.max_concurrent_requests,
            })
    }
}

/// `ModelNotFound` for a name or version that is not served, listing what is.
fn not_found(name: &str, version: Option<&str>, missing: Missing) -> InferError {
    match (missing, version) {
        (Missing::NoVersion { versions }, Some(version)) => InferError::ModelNotFound {
            name: format!("{name}@{version}"),
            available: versions
                .iter()
                .map(|v| format!("{name}@{v}"))
                .collect::<Vec<_>>()
                .join(", "),
        },
        (Missing::NoModel { available }, _) => InferError::ModelNotFound {
            name: name.to_owned(),
            available,
        },
        // A name with only a loading version: nothing serves it yet.
        (Missing::NoVersion { versions }, None) => InferError::ModelNotFound {
            name: name.to_owned(),
            available: format!(
                "none yet under this name: {} is loading (it serves once ready)",
                versions
                    .iter()
                    .map(|v| format!("{name}@{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// A request admitted by [`Inference::begin`]; holds its concurrency permit until dropped.
struct InferRequest {
    model: Arc<ModelHandle>,
    started: Instant,
    /// From `started`: `--request-timeout`, or less if the client asked.
    timeout: Duration,
    images: usize,
    limits: Limits,
    pool: DecodePool,
    memory: Arc<MemoryBudget>,
    cache: Option<Arc<ResponseCache>>,
    cache_use: CacheUse,
    /// Memory budget held until the request ends: its body and its queued model inputs.
    held: Vec<Reservation>,
    /// The front end's request span: the model thread logs about this request's images in it.
    span: tracing::Span,
    /// Its priority level: where its images join the model's queue.
    level: Level,
    /// The API key it presented, and its hold on one of the key's concurrency slots.
    key: Option<Arc<KeyPolicy>>,
    _key_slot: Option<OwnedSemaphorePermit>,
    metrics: Arc<Metrics>,
    /// Its OpenTelemetry trace, under which the stages are recorded (empty when not traced).
    trace: crate::telemetry::RequestTrace,
    _permit: OwnedSemaphorePermit,
    /// Keeps the version from being freed while this request uses it.
    _in_flight: InFlight,
    recorded: bool,
}

impl InferRequest {
    /// Apply the client's options, read and plan the body, and run the plan.
    async fn handle<I: Intake>(
        &mut self,
        mut intake: I,
    ) -> Result<(Vec<ImageOutput>, I::Keep), I::Error> {
        let options = intake.options(&self.model)?;
        self.key = options.key;
        self.set_priority(options.priority)?;
        if let Some(timeout) = options.timeout {
            self.limit_time(timeout);
        }
        self.cache_use = options.cache;
        self.enter_key()?;
        self.model.check_room(self.level)?;
        if let Some(bytes) = options.body_bytes {
            self.reserve_body(bytes).await?;
        }
        let read_start = Instant::now();
        let plan = intake.read(self.model.clone()).await?;
        self.trace.stage("body read", read_start, Instant::now());
        if plan.priority.is_some() {
            self.set_priority(plan.priority)?;
        }
        if let Some(timeout) = plan.timeout {
            self.limit_time(timeout);
        }
        // One image was counted on entering; the others now that the body says how many.
        self.charge_key(plan.images.len().saturating_sub(1))?;
        let outputs = self.run(plan.images, plan.outputs).await?;
        Ok((outputs, plan.keep))
    }

    /// Put the request at the level it `asked` for (`None`: the default), within its key's cap,
    /// and within that level's time limit.
    fn set_priority(&mut self, asked: Option<u64>) -> Result<(), InferError> {
        let levels = &self.limits.priority;
        let cap = self.key.as_ref().and_then(|key| key.priority());
        self.level = levels
            .resolve(asked, cap)
            .map_err(InferError::InvalidInput)?;
        self.limit_time(levels.timeout(self.level));
        Ok(())
    }

    /// Apply the key's limits on entry: a concurrency slot, and its first image against its
    /// rate (so that a key over its rate is refused before its body is read).
    fn enter_key(&mut self) -> Result<(), InferError> {
        let Some(key) = self.key.clone() else {
            return Ok(());
        };
        self._key_slot = key.enter().map_err(|r| self.key_refused(&key, r))?;
        self.charge_key(1)
    }

    /// Count `images` more against the key's rate.
    fn charge_key(&mut self, images: usize) -> Result<(), InferError> {
        let Some(key) = self.key.clone() else {
            return Ok(());
        };
        key.charge(images).map_err(|r| self.key_refused(&key, r))?;
        self.metrics.key_images(key.name(), images);
        Ok(())
    }

    fn key_refused(&self, key: &KeyPolicy, refusal: KeyRefusal) -> InferError {
        let limit = match refusal {
            KeyRefusal::Concurrency { .. } => "concurrency",
            KeyRefusal::Rate { .. } | KeyRefusal::OverBurst { .. } => "rate",
        };
        self.metrics.key_refused(key.name(), limit);
        InferError::KeyLimit {
            key: key.name().to_owned(),
            refusal,
        }
    }

    /// Shorten the request's deadline to `timeout` after it began (a client's own timeout);
    /// a longer one than the server's `--request-timeout` is capped.
    fn limit_time(&mut self, timeout: Duration) {
        self.timeout = self.timeout.min(timeout);
    }

    fn deadline(&self) -> Instant {
        self.started + self.timeout
    }

    /// Hold memory budget for a body of `bytes` about to be read; kept until the request ends.
    async fn reserve_body(&mut self, bytes: u64) -> Result<(), InferError> {
        let reservation = self
            .memory
            .reserve(bytes, self.budget_wait(), "the request body")
            .await?;
        self.held.push(reservation);
        Ok(())
    }

    /// How long a reservation may wait: briefly, and never past the deadline.
    fn budget_wait(&self) -> Duration {
        BUDGET_WAIT.min(self.deadline().saturating_duration_since(Instant::now()))
    }

    fn deadline_exceeded(&self, why: String) -> InferError {
        InferError::DeadlineExceeded {
            timeout_ms: self.timeout.as_millis() as u64,
            why,
        }
    }

    /// Classify `images`, computing `outputs` for each; answers in image order. Images the
    /// response cache knows are answered from it; the others are decoded and run. Past the
    /// request's deadline it answers `DeadlineExceeded` and its queued images are dropped.
    async fn run(
        &mut self,
        images: Vec<ImageInput>,
        outputs: Outputs,
    ) -> Result<Vec<ImageOutput>, InferError> {
        self.validate(&images, &outputs)?;
        self.images = images.len();
        let Some(cache) = self.cache.clone() else {
            return self.run_model(images, outputs).await;
        };
        let keys = self.cache_keys(&images, outputs).await;
        let mut answers: Vec<Option<ImageOutput>> = Vec::with_capacity(images.len());
        // The images to run, with their place in the request and their key.
        let (mut misses, mut positions, mut miss_keys) = (Vec::new(), Vec::new(), Vec::new());
        for (position, (image, key)) in images.into_iter().zip(keys).enumerate() {
            let looked_up = key.filter(|_| self.cache_use.read);
            match looked_up.and_then(|key| cache.get(&key)) {
                Some(prediction) => {
                    self.model.metrics.cache_hits.inc();
                    answers.push(Some(ImageOutput {
                        prediction,
                        decode: Duration::ZERO,
                        preprocess: Duration::ZERO,
                        cached: true,
                    }));
                }
                None => {
                    if looked_up.is_some() {
                        self.model.metrics.cache_misses.inc();
                    }
                    answers.push(None);
                    misses.push(image);
                    positions.push(position);
                    miss_keys.push(key.filter(|_| self.cache_use.write));
                }
            }
        }
        if !misses.is_empty() {
            let fresh = self.run_model(misses, outputs).await.map_err(|e| match e {
                // Errors name the image by its place in the request, not among the misses.
                InferError::Image { index, source } => InferError::Image {
                    index: positions.get(index).copied().unwrap_or(index),
                    source,
                },
                other => other,
            })?;
            for ((answer, position), key) in fresh.into_iter().zip(positions).zip(miss_keys) {
                if let Some(key) = key {
                    cache.insert(key, &answer.prediction);
                }
                answers[position] = Some(answer);
            }
        }
        answers
            .into_iter()
            .map(|a| a.ok_or(InferError::Internal))
            .collect()
    }

    /// The cache key of every encoded image (`None` for pixels, or when the request uses no
    /// cache). Large images are hashed off the async workers.
    async fn cache_keys(&self, images: &[ImageInput], outputs: Outputs) -> Vec<Option<CacheKey>> {
        const HASH_INLINE_BYTES: usize = 256 * 1024;
        if !self.cache_use.read && !self.cache_use.write {
            return images.iter().map(|_| None).collect();
        }
        let encoded: Vec<Option<Bytes>> = images
            .iter()
            .map(|image| match image {
                ImageInput::Encoded(bytes) => Some(bytes.clone()),
                ImageInput::Pixels(_) => None,
            })
            .collect();
        let total: usize = encoded.iter().flatten().map(Bytes::len).sum();
        let model = self.model.id();
        let hash_all = move || {
            encoded
                .iter()
                .map(|bytes| bytes.as_ref().map(|b| CacheKey::new(b, model, outputs)))
                .collect::<Vec<_>>()
        };
        if total <= HASH_INLINE_BYTES {
            return hash_all();
        }
        match tokio::task::spawn_blocking(hash_all).await {
            Ok(keys) => keys,
            Err(_) => images.iter().map(|_| None).collect(),
        }
    }

    /// Decode, queue and run `images` on the model.
    async fn run_model(
        &mut self,
        images: Vec<ImageInput>,
        outputs: Outputs,
    ) -> Result<Vec<ImageOutput>, InferError> {
        let model = self.model.clone();
        // A wait the deadline cannot cover is refused now rather than after it.
        let wait = model.least_wait(images.len(), self.level);
        if Instant::now() + wait > self.deadline() {
            return Err(self.deadline_exceeded(format!(
                " (the model's queue needs about {} ms)",
                wait.as_millis()
            )));
        }
        let mut admission = model.admit(images.len(), self.level)?;
        // The model inputs of these images stay in memory until they are answered.
        let inputs = self
            .memory
            .reserve(
                self.input_bytes(&images),
                self.budget_wait(),
                "the model inputs",
            )
            .await?;
        self.held.push(inputs);
        let deadline = tokio::time::Instant::from_std(self.deadline());
        // Decoding (or waiting for a decode thread) may take the time left: the images would
        // only be dropped from the queue.
        let prepared = match tokio::time::timeout_at(deadline, self.prepare_all(images)).await {
            Ok(prepared) if Instant::now() < self.deadline() => prepared?,
            _ => return Err(self.deadline_exceeded(" (spent decoding)".into())),
        };
        let (pending, submit_error) = self.submit_all(prepared, outputs);
        admission.images_queued();

        // Wait for every queued image, even once one has failed: dropping the others' receivers
        // would make them look abandoned by the client, and releasing the admission early would
        // under-count the images still in flight.
        let mut answers = Vec::with_capacity(pending.len());
        for image in pending {
            match tokio::time::timeout_at(deadline, image.answer).await {
                Ok(answer) => {
                    self.record_queue_and_run(image.queued_at, &answer);
                    answers.push((answer, image.decode, image.preprocess));
                }
                // The remaining receivers are dropped with `pending`: the batcher and the
                // model thread drop those images as expired.
                Err(_) => return Err(self.deadline_exceeded(String::new())),
            }
        }
        drop(admission);
        if let Some(e) = submit_error {
            return Err(e);
        }
        answers
            .into_iter()
            .map(|(answer, decode, preprocess)| {
                let prediction = answer
                    .map_err(|_| InferError::Internal)?
                    .map_err(|e| self.job_error(e))?;
                Ok(ImageOutput {
                    prediction,
                    decode,
                    preprocess,
                    cached: false,
                })
            })
            .collect()
    }

    /// Queue one job per prepared image, in order, until the model refuses one (its error is
    /// returned beside the images already queued, which must still be waited for).
    fn submit_all(
        &self,
        prepared: Vec<images::Prepared>,
        outputs: Outputs,
    ) -> (Vec<Pending>, Option<InferError>) {
        let mut pending = Vec::with_capacity(prepared.len());
        for image in prepared {
            let (reply, answer) = oneshot::channel();
            let job = ImageJob {
                pixels: image.pixels,
                outputs,
                reply,
                span: self.span.clone(),
                deadline: Some(self.deadline()),
                level: self.level,
            };
            if let Err(e) = self.model.submit(job) {
                return (pending, Some(e));
            }
            pending.push(Pending {
                answer,
                decode: image.decode,
                preprocess: image.preprocess,
                queued_at: Instant::now(),
            });
        }
        (pending, None)
    }

    /// Record an answered image's wait in the queue and its run on the model (timed by the
    /// model thread) as stages of the request's trace.
    fn record_queue_and_run(
        &self,
        queued_at: Instant,
        answer: &Result<Result<ImagePrediction, JobError>, oneshot::error::RecvError>,
    ) {
        let Ok(Ok(prediction)) = answer else { return };
        if !self.trace.is_recording() {
            return;
        }
        let ran_at = queued_at + prediction.queue_wait;
        self.trace.stage("queue wait", queued_at, ran_at);
        self.trace.stage_with(
            "inference",
            ran_at,
            ran_at + prediction.inference,
            &[("batch_size", prediction.batch_size as i64)],
        );
    }

    /// What a job's failure means for its request.
    fn job_error(&self, error: JobError) -> InferError {
        match error {
            JobError::Failed => InferError::Internal,
            JobError::Stopped => InferError::ShuttingDown,
            JobError::ModelRestarting => InferError::NotReady {
                model: self.model.name().to_owned(),
            },
            JobError::DeadlineExceeded => self.deadline_exceeded(String::new()),
        }
    }

    /// The request succeeded: count it.
    fn succeeded(&mut self) {
        self.recorded = true;
        self.model.metrics.request_succeeded(
            self.images,
            self.started.elapsed(),
            self.trace.trace_id(),
        );
    }

    /// The request failed with `err` (the front end's or the service's error): count and log
    /// it. Failures of the server that are part of normal operation (loading, draining, a
    /// deadline) are logged quietly; the others as errors.
    fn failed(&mut self, err: &impl RequestFailure) {
        self.recorded = true;
        if err.is_server_error() && !err.is_expected() {
            tracing::error!(model = %self.model.name(), error = %err, "request failed");
        } else {
            tracing::debug!(model = %self.model.name(), error = %err, "request rejected");
        }
        self.model.metrics.request_failed(
            err.error_type(),
            self.images,
            err.is_server_error(),
            self.started.elapsed(),
            self.trace.trace_id(),
        );
    }

    fn validate(&self, images: &[ImageInput], outputs: &Outputs) -> Result<(), InferError> {
        if images.is_empty() {
            return Err(InferError::NoImages);
        }
        if images.len() > self.limits.max_images_per_request {
            return Err(InferError::TooManyImages {
                limit: self.limits.max_images_per_request,
            });
        }
        let num_classes = self.model.info.num_classes;
        if outputs.top_k > num_classes {
            return Err(InferError::InvalidInput(format!(
                "top_k must be between 1 and {num_classes}, not {}",
                outputs.top_k
            )));
        }
        if outputs.embeddings && self.model.status.embedding_size().is_none() {
            return Err(InferError::InvalidInput(format!(
                "model {:?} ({}) does not expose embeddings; native models do",
                self.model.name(),
                self.model.status.implementation()
            )));
        }
        for (index, image) in images.iter().enumerate() {
            if let ImageInput::Pixels(pixels) = image {
                self.check_pixels(index, pixels)?;
            }
        }
        Ok(())
    }

    /// Bytes the model inputs of `images` take while queued (u8 pixels, or f32 normalised).
    fn input_bytes(&self, images: &[ImageInput]) -> u64 {
        let (h, w) = self.model.info.preprocess.input_size;
        let values = (3 * h * w) as u64;
        images
            .iter()
            .map(|image| match image {
                ImageInput::Pixels(Pixels::Normalized(_)) => values * 4,
                _ => values,
            })
            .sum()
    }

    /// Preprocessed pixels must be exactly the model's input size.
    fn check_pixels(&self, index: usize, pixels: &Pixels) -> Result<(), InferError> {
        let (h, w) = self.model.info.preprocess.input_size;
        let got = match pixels {
            Pixels::Rgb8(values) => values.len(),
            Pixels::Normalized(values) => values.len(),
        };
        if got == 3 * h * w {
            return Ok(());
        }
        Err(InferError::InvalidInput(format!(
            "image {index}: preprocessed pixels must be 3 x {h} x {w} = {} values for model {:?}, not {got}",
            3 * h * w,
            self.model.name()
        )))
    }

    /// Decode and preprocess every encoded image on the pool, in parallel; the first failure
    /// (in image order) fails the request and names the image.
    async fn prepare_all(
        &self,
        images: Vec<ImageInput>,
    ) -> Result<Vec<images::Prepared>, InferError> {
        let count = images.len();
        let mut slots: Vec<Option<images::Prepared>> = (0..count).map(|_| None).collect();
        let mut tasks = JoinSet::new();
        for (index, image) in images.into_iter().enumerate() {
            let bytes = match image {
                ImageInput::Pixels(pixels) => {
                    slots[index] = Some(images::Prepared {
                        pixels,
                        decode: Duration::ZERO,
                        preprocess: Duration::ZERO,
                        scale: None,
                    });
                    continue;
                }
                ImageInput::Encoded(bytes) => bytes,
            };
            // Decoding holds up to 7 bytes per decoded pixel: reserve them from the header first.
            let decode = self
                .model
                .info
                .preprocess
                .decode_options(self.limits.decode);
            let decode_bytes = images::decode::decode_memory(&bytes, &decode);
            let reservation = match decode_bytes {
                Some(needed) => Some(
                    self.memory
                        .reserve(needed, self.budget_wait(), "decoding this image")
                        .await?,
                ),
                None => None,
            };
            let cost = images::estimated_cost(bytes.len(), decode_bytes);
            let pool = self.pool.clone();
            let cfg = self.model.info.preprocess.clone();
            let metrics = self.model.metrics.prepare.clone();
            let level = self.level;
            let trace = self.trace.clone();
            tasks.spawn(async move {
                let prepared = match pool
                    .run_costing(cost, level, move || {
                        (Instant::now(), images::prepare(&bytes, &decode, &cfg))
                    })
                    .await
                {
                    Ok((began, prepared)) => {
                        if let Ok(p) = &prepared {
                            record_prepare(&trace, began, p);
                        }
                        prepared.map_err(|source| InferError::Image { index, source })
                    }
                    Err(failed) => Err(InferError::from(failed)),
                };
                drop(reservation);
                if let Ok(p) = &prepared {
                    let scale = p.scale.unwrap_or(DecodeScale::Full).label();
                    metrics.image_prepared(scale, p.decode + p.preprocess);
                }
                (index, prepared)
            });
        }
        let mut first_error: Option<(usize, InferError)> = None;
        while let Some(joined) = tasks.join_next().await {
            let (index, prepared) = joined.map_err(|_| InferError::Internal)?;
            match prepared {
                Ok(p) => slots[index] = Some(p),
                Err(err) => {
                    if first_error.as_ref().is_none_or(|(i, _)| index < *i) {
                        first_error = Some((index, err));
                    }
                }
            }
        }
        if let Some((_, err)) = first_error {
            return Err(err);
        }
        // Every slot is filled: each image was either given or prepared, or failed above.
        slots
            .into_iter()
            .map(|s| s.ok_or(InferError::Internal))
            .collect()
    }
}

/// A queued image: where its answer will come, and its decode and preprocess times.
struct Pending {
    answer: oneshot::Receiver<Result<ImagePrediction, JobError>>,
    decode: Duration,
    preprocess: Duration,
    /// When it was handed to the model's queue (the start of its queue wait).
    queued_at: Instant,
}

/// Record an image's decode and its preprocess (run one after the other on a decode thread,
/// from `began`) as stages of the request's trace.
fn record_prepare(
    trace: &crate::telemetry::RequestTrace,
    began: Instant,
    prepared: &images::Prepared,
) {
    if !trace.is_recording() {
        return;
    }
    let decoded = began + prepared.decode;
    trace.stage("decode", began, decoded);
    trace.stage("preprocess", decoded, decoded + prepared.preprocess);
}

/// Counts a request whose future is dropped before it reported its outcome: hyper and tonic
/// drop it when the client disconnects. Its queued images are dropped by the batcher.
impl Drop for InferRequest {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let elapsed = self.started.elapsed();
        if std::thread::panicking() {
            // The front end answers 500; record it as the server's failure.
            self.model
                .metrics
                .request_failed("internal", self.images, true, elapsed, None);
            return;
        }
        tracing::debug!(model = %self.model.name(), "client disconnected before the answer");
        self.model.metrics.request_failed(
            CLIENT_GONE,
            self.images,
            false,
            elapsed,
            self.trace.trace_id(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `images` and `metrics` import nothing from each other, so the scale labels are written
    /// in both: they must stay the same, in the same order.
    #[test]
    fn decode_scales_are_labelled_alike_in_images_and_metrics() {
        assert_eq!(
            DecodeScale::ALL.map(DecodeScale::label),
            crate::metrics::DECODE_SCALES
        );
    }
}
