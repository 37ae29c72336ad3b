//! Models at run time: each served model is a handle (what request handlers talk to), a
//! batcher task and a model thread per copy. `runner` picks what runs a copy: libtorch
//! (`torch`, with `device`) or OpenVINO (`openvino`); nothing else here touches either.

pub mod device;
#[cfg(feature = "fault-injection")]
mod fault;
pub mod health;
pub mod openvino;
pub mod runner;
pub mod spec;
mod supervisor;
pub mod torch;
pub mod worker;

use crate::batching::batcher::{self, BatcherConfig};
use crate::batching::queue::{Lane, Lanes};
use crate::batching::{Batch, BatcherLink, ImageJob};
use crate::config::{Backend, DType, Instances};
use crate::error::InferError;
use crate::images::preprocess::PreprocessConfig;
use crate::metrics::ModelMetrics;
use crate::priority::{Level, Levels, MAX_LEVELS};
use crate::repository::{ModelConfig, ModelFiles, WeightsFormat};
use serde::Serialize;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{mpsc, oneshot, watch};

/// Static facts about a served model, for `/v1/models` and for request handling.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    /// The version `name@version` addresses (the first load of a name is `1`).
    pub version: String,
    pub architecture: String,
    pub tag: Option<String>,
    pub source: String,
    pub weights_format: WeightsFormat,
    pub device: String,
    pub dtype: DType,
    pub num_classes: usize,
    pub preprocess: PreprocessConfig,
    pub max_batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub max_queue_images: usize,
    /// Copies of the model, each with its own thread (`--instances`).
    pub instances: usize,
    /// The intra-op threads of each copy, in instance order. With `--instances auto` the first
    /// copy has every thread and runs the batches that arrive at an idle model; the others
    /// run side by side once images queue.
    pub instance_threads: Vec<usize>,
    #[serde(skip)]
    pub labels: Arc<Vec<String>>,
}

/// One row of a model's warm-up profile: the fastest of a few timed runs of a batch size.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct WarmupTiming {
    pub batch_size: usize,
    pub millis: f64,
    pub images_per_second: f64,
}

impl WarmupTiming {
    pub fn new(batch_size: usize, millis: f64) -> Self {
        Self {
            batch_size,
            millis,
            images_per_second: batch_size as f64 * 1e3 / millis.max(1e-6),
        }
    }
}

/// The batch size the batcher stops at, and why.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct BatchPolicy {
    /// Batches stop growing here (at most `max_batch_size`).
    pub preferred_batch_size: usize,
    /// The rule, for people reading `/v1/models`.
    #[schema(
        example = "the smallest size from which every larger size is within 3 % of the best throughput (where throughput stops rising); else the largest"
    )]
    pub rule: &'static str,
}

impl BatchPolicy {
    /// `queue::preferred_batch_size`'s rule in words (its tolerance is `queue::PLATEAU`, 0.97).
    const RULE: &'static str = "the smallest size from which every larger size is within 3 % of the best throughput (where throughput stops rising); else the largest";

    /// The policy for a warm-up profile (`queue::preferred_batch_size`).
    pub fn from_profile(profile: &[WarmupTiming]) -> Option<Self> {
        let points: Vec<(usize, f64)> = profile
            .iter()
            .map(|t| (t.batch_size, t.images_per_second))
            .collect();
        Some(Self {
            preferred_batch_size: crate::batching::queue::preferred_batch_size(&points)?,
            rule: Self::RULE,
        })
    }
}

// The default state (0) is "loading".
const READY: u8 = 1;
const FAILED: u8 = 2;
/// The model thread wedged or panicked; a new one is being started.
const RESTARTING: u8 = 3;
/// Loaded, timing every batch size before it is ready.
const WARMING: u8 = 4;

/// Load state, written by the model thread and read by handlers.
#[derive(Debug, Default)]
pub struct ModelStatus {
    state: AtomicU8,
    execution: OnceLock<runner::Execution>,
    /// Why the model failed to load or is restarting (cleared once ready again).
    failure: Mutex<Option<String>>,
    restarts: std::sync::atomic::AtomicU64,
    warmup: OnceLock<Vec<WarmupTiming>>,
    embedding_size: OnceLock<Option<usize>>,
    /// Copies that have not finished their first load and warm-up.
    copies_loading: AtomicUsize,
}

impl ModelStatus {
    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            READY => "ready",
            FAILED => "failed",
            RESTARTING => "restarting",
            WARMING => "warming",
            _ => "loading",
        }
    }

    /// `torch` or `openvino`, once loaded.
    pub fn backend(&self) -> &'static str {
        self.execution.get().map_or("", |e| e.backend)
    }

    /// `native` or `torchscript`, once loaded.
    pub fn implementation(&self) -> &'static str {
        self.execution.get().map_or("", |e| e.implementation)
    }

    /// The runtime and its version (`libtorch 2.11.0`, `OpenVINO 2026.4.1`), once loaded.
    pub fn runtime(&self) -> &str {
        self.execution.get().map_or("", |e| e.runtime.as_str())
    }

    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times the model thread was replaced.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn set_failure(&self, message: Option<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = message;
    }

    pub fn warmup(&self) -> &[WarmupTiming] {
        self.warmup.get().map_or(&[], Vec::as_slice)
    }

    /// Where batches stop growing, once the first warm-up measured it.
    pub fn batch_policy(&self) -> Option<BatchPolicy> {
        BatchPolicy::from_profile(self.warmup())
    }

    /// The length of the model's embeddings, once loaded (`None` before, or if it has none).
    pub fn embedding_size(&self) -> Option<usize> {
        self.embedding_size.get().copied().flatten()
    }

    fn set_embedding_size(&self, size: Option<usize>) {
        let _ = self.embedding_size.set(size);
    }

    /// The status of a model of `copies` copies, loading.
    fn for_copies(copies: usize) -> Self {
        Self {
            copies_loading: AtomicUsize::new(copies),
            ..Self::default()
        }
    }

    /// A copy is loaded and warmed up (`first_time`, or a replacement); returns whether the
    /// model is ready now. It is once every copy has loaded, so that its first requests do not
    /// meet copies still warming up (or a batch policy not measured yet); a replacement
    /// makes it ready again at once, the other copies having kept serving.
    fn copy_ready(&self, first_time: bool) -> bool {
        if first_time && self.copies_loading.fetch_sub(1, Ordering::AcqRel) > 1 {
            return false;
        }
        self.set_ready();
        true
    }

    fn set_ready(&self) {
        self.set_failure(None);
        self.state.store(READY, Ordering::Release);
    }

    /// The weights are loaded and warm-up begins (only on the first load: a restart stays
    /// `restarting` until ready).
    fn set_warming(&self) {
        let _ = self
            .state
            .compare_exchange(0, WARMING, Ordering::AcqRel, Ordering::Acquire);
    }

    fn set_failed(&self, message: String) {
        self.set_failure(Some(message));
        self.state.store(FAILED, Ordering::Release);
    }

    fn set_restarting(&self, reason: String) {
        self.set_failure(Some(reason));
        self.state.store(RESTARTING, Ordering::Release);
    }

    fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The first copy to load decides (the copies of a version run on the same backend).
    fn set_execution(&self, execution: runner::Execution) {
        let _ = self.execution.set(execution);
    }

    /// Keep the first profile measured (instances warm up one after another, alike); returns
    /// the policy derived from it.
    fn set_warmup(&self, timings: Vec<WarmupTiming>) -> Option<BatchPolicy> {
        let _ = self.warmup.set(timings);
        self.batch_policy()
    }
}

/// The next [`ModelHandle::id`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reports once whether the model thread loaded and warmed up its model (or why not).
pub type LoadOutcome = oneshot::Receiver<Result<(), String>>;

/// What request handlers use to reach a model.
pub struct ModelHandle {
    pub info: ModelInfo,
    pub status: Arc<ModelStatus>,
    pub metrics: ModelMetrics,
    link: Arc<BatcherLink>,
    jobs: mpsc::Sender<ImageJob>,
    admission: Arc<AdmittedImages>,
    closing: watch::Sender<bool>,
    /// One per instance.
    threads: Vec<supervisor::ThreadSlot>,
    /// Its copies as the batcher feeds them: the pool's copies share the queue's waits (the
    /// solo copy of `--instances auto` never runs beside them).
    lanes: Lanes,
    /// Requests holding this version (see [`InFlight`]).
    in_flight: Arc<AtomicUsize>,
    /// Unique to this spawn in the process (never reused, unlike a name and version after an
    /// unload): what the response cache keys answers by.
    id: u64,
}

/// A request's hold on a model version: counted from the lookup that found the version
/// (`Registry::lease`) until the request ends, so that draining knows when it is done.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The images in flight on a model (being decoded, queued or running), in all and by priority
/// level, and the limits that admit more: a request at level L is admitted while the total
/// stays within L's limit (`crate::priority`; with one level, `--max-queue-images`).
struct AdmittedImages {
    levels: Levels,
    total: AtomicUsize,
    by_level: [AtomicUsize; MAX_LEVELS],
}

impl AdmittedImages {
    fn new(levels: Levels) -> Self {
        Self {
            levels,
            total: AtomicUsize::new(0),
            by_level: Default::default(),
        }
    }

    /// Count `images` more at `level` if they fit within its limit.
    fn try_admit(&self, level: Level, images: usize) -> bool {
        let limit = self.levels.queue_images(level);
        let admitted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                (total + images <= limit).then_some(total + images)
            });
        if admitted.is_ok() {
            self.by_level[level.index()].fetch_add(images, Ordering::AcqRel);
        }
        admitted.is_ok()
    }

    fn release(&self, level: Level, images: usize) {
        self.by_level[level.index()].fetch_sub(images, Ordering::AcqRel);
        self.total.fetch_sub(images, Ordering::AcqRel);
    }

    /// A request at `level` would find room for one image.
    fn has_room(&self, level: Level) -> bool {
        self.total.load(Ordering::Acquire) < self.levels.queue_images(level)
    }

    fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Images that run before a new one at `level`: those of its level and above.
    fn ahead_of(&self, level: Level) -> usize {
        self.by_level[..=level.index()]
            .iter()
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }
}

/// Images a request has been allowed to put in flight. While held, they count against its
/// level's limit; images not yet queued count as incoming for the batcher.
pub struct Admission {
    admitted_images: Arc<AdmittedImages>,
    level: Level,
    link: Arc<BatcherLink>,
    incoming: usize,
    /// `visionserve_admitted_images`, and the level's with priorities, given back on drop.
    admitted: prometheus_client::metrics::gauge::Gauge,
    level_admitted: Option<prometheus_client::metrics::gauge::Gauge>,
    images: usize,
}

impl Admission {
    /// The request's images are queued (or abandoned): they are no longer incoming.
    pub fn images_queued(&mut self) {
        self.release_incoming();
    }

    fn release_incoming(&mut self) {
        if self.incoming > 0 {
            self.link.images_arrived(self.incoming);
            self.incoming = 0;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release_incoming();
        self.admitted_images.release(self.level, self.images);
        self.admitted.dec_by(self.images as i64);
        if let Some(gauge) = &self.level_admitted {
            gauge.dec_by(self.images as i64);
        }
    }
}

/// How a model version is spawned: the server-wide settings every version gets (a version's
/// own options may change them).
#[derive(Debug, Clone, Copy)]
pub struct SpawnOptions {
    pub device: tch::Device,
    pub dtype: DType,
    /// What runs it.
    pub backend: Backend,
    pub max_batch_size: usize,
    pub max_batch_delay: std::time::Duration,
    pub max_queue_images: usize,
    /// The priority levels, and each one's share of the queue.
    pub priority: Levels,
    /// A batch running longer than this marks the model not ready and replaces its thread.
    pub batch_timeout: std::time::Duration,
    /// Copies of the model, each with its own thread and supervisor, and their threads.
    pub instances: InstanceLayout,
}

/// The copies of a model and the intra-op threads of each, resolved from `--instances` and
/// `--intra-op-threads` for the CPUs the process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLayout {
    /// The solo copy's threads, if there is one (`--instances auto` on 2 or more CPUs): it
    /// runs the batches that arrive at an idle model, with every thread.
    pub solo_threads: Option<usize>,
    /// Copies that take batches side by side.
    pub pool: usize,
    pub pool_threads: usize,
}

impl InstanceLayout {
    /// `intra_op` is `--intra-op-threads` (the threads a lone batch gets); by default every
    /// CPU, shared among the copies that run at once.
    pub fn resolve(instances: Instances, cpus: usize, intra_op: Option<usize>, cuda: bool) -> Self {
        let cpus = cpus.max(1);
        let fixed = |n: usize| Self {
            solo_threads: None,
            pool: n,
            pool_threads: intra_op.unwrap_or(cpus / n).max(1),
        };
        match instances {
            Instances::Fixed(n) => fixed(n.max(1)),
            Instances::Auto => {
                let all = intra_op.unwrap_or(cpus);
                if cuda || all < 2 {
                    return fixed(1);
                }
                // Copies with half the threads (two for an even count; an odd count leaves a
                // thread over, or with 3 runs three copies of 1): each runs operators with half
                // as many threads to wait for, and memory grows by three or four copies, not
                // one per CPU.
                let pool_threads = all / 2;
                Self {
                    solo_threads: Some(all),
                    pool: all / pool_threads,
                    pool_threads,
                }
            }
        }
    }

    /// Every copy: the lane it serves and its threads, solo first.
    pub fn copies(&self) -> Vec<(Lane, usize)> {
        let solo = self.solo_threads.map(|threads| (Lane::Solo, threads));
        solo.into_iter()
            .chain(std::iter::repeat_n(
                (Lane::Pool, self.pool_threads),
                self.pool,
            ))
            .collect()
    }

    /// One copy with the threads of this layout's widest copy (what `auto` falls back to).
    pub fn single(&self) -> Self {
        Self {
            solo_threads: None,
            pool: 1,
            pool_threads: self.solo_threads.unwrap_or(self.pool_threads),
        }
    }

    pub fn lanes(&self) -> Lanes {
        Lanes {
            solo: self.solo_threads.is_some(),
            pool: self.pool,
        }
    }
}

/// A model version to spawn: what it is called and the files and config it is built from.
pub struct VersionSpec {
    pub name: String,
    /// The version `name@version` addresses.
    pub version: String,
    /// What `--model` or the management API gave as its source, for `/v1/models`.
    pub source: String,
    pub files: ModelFiles,
    pub config: ModelConfig,
}

/// The hand-offs from the batcher to the model copies: one slot per lane, shared by the lane's
/// copies (whichever is free takes the next batch).
struct Handoffs {
    pool: Arc<Mutex<mpsc::Receiver<Batch>>>,
    solo: Arc<Mutex<mpsc::Receiver<Batch>>>,
}

impl ModelHandle {
    /// Start the batcher task and the model's supervisors, which start the model threads; the
    /// threads load and warm the model up and the outcome is reported on the returned channel.
    pub fn spawn(
        spec: VersionSpec,
        metrics: ModelMetrics,
        options: SpawnOptions,
    ) -> anyhow::Result<(Arc<Self>, LoadOutcome)> {
        let kind = device::kind(options.dtype, options.device)?;
        let layout = options.instances;
        let info = model_info(&spec, &options);
        let status = Arc::new(ModelStatus::for_copies(info.instances));
        let link = Arc::new(BatcherLink::default());
        // Admission control bounds what is in flight, so this channel never fills up.
        let (jobs_tx, jobs_rx) = mpsc::channel(options.max_queue_images.max(1));
        let (closing_tx, closing_rx) = watch::channel(false);
        let handoffs = spawn_batcher(jobs_rx, &link, &metrics, &options, closing_rx.clone());
        let worker_spec = Arc::new(worker::WorkerSpec {
            name: spec.name,
            files: spec.files,
            preprocess: spec.config.preprocess,
            num_classes: spec.config.num_classes,
            device: options.device,
            kind,
            max_batch_size: options.max_batch_size,
            backend: options.backend,
        });
        let shared = CopyShared {
            spec: worker_spec,
            openvino: Arc::new(openvino::OpenVinoPrep::for_copies(info.instances)),
            handoffs,
            warmup_gate: Arc::default(),
            link: link.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            batch_timeout: options.batch_timeout,
            closing: closing_rx,
        };
        let (threads, loaded) = spawn_copies(&layout, &shared);

        metrics.admission_limit.set(options.max_queue_images as i64);
        metrics.priority_levels(options.priority.count());
        let handle = Arc::new(Self {
            info,
            status,
            metrics,
            link,
            jobs: jobs_tx,
            admission: Arc::new(AdmittedImages::new(options.priority)),
            closing: closing_tx,
            threads,
            lanes: layout.lanes(),
            in_flight: Arc::default(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        });
        Ok((handle, loaded))
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn version(&self) -> &str {
        &self.info.version
    }

    /// This loaded version's identity in the process (see the field).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Count one more request holding this version until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Requests holding this version now.
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn ensure_ready(&self) -> Result<(), InferError> {
        if self.status.is_ready() {
            Ok(())
        } else {
            Err(InferError::NotReady {
                model: self.info.name.clone(),
            })
        }
    }

    /// Refuse with 429 when the queue has no room for even one more image at `level`:
    /// decided before a request's body is read, so that refusing under overload costs next to
    /// nothing.
    pub fn check_room(&self, level: Level) -> Result<(), InferError> {
        if self.admission.has_room(level) {
            return Ok(());
        }
        Err(self.overloaded(level))
    }

    /// Admit `images` images at `level` or refuse with 429 and a Retry-After estimate.
    pub fn admit(&self, images: usize, level: Level) -> Result<Admission, InferError> {
        if !self.admission.try_admit(level, images) {
            return Err(self.overloaded(level));
        }
        self.link.images_admitted(images);
        let admitted = self.metrics.admitted.clone();
        admitted.inc_by(images as i64);
        let level_admitted = self
            .metrics
            .level(level.index())
            .map(|series| series.admitted.clone());
        if let Some(gauge) = &level_admitted {
            gauge.inc_by(images as i64);
        }
        Ok(Admission {
            admitted_images: self.admission.clone(),
            level,
            link: self.link.clone(),
            incoming: images,
            admitted,
            level_admitted,
            images,
        })
    }

    fn overloaded(&self, level: Level) -> InferError {
        InferError::Overloaded {
            model: self.info.name.clone(),
            limit: self.admission.levels.queue_images(level),
            retry_after_s: self.retry_after_secs(),
        }
    }

    /// A lower bound of how long `images` more images at `level` would wait: everything
    /// admitted before them at their level and above, then themselves, in full batches, each
    /// batch costing at least the recent model time of one image. A deadline shorter than this
    /// cannot be met.
    pub fn least_wait(&self, images: usize, level: Level) -> std::time::Duration {
        let ahead = self.admission.ahead_of(level);
        std::time::Duration::from_micros(least_wait_us(
            ahead + images,
            self.info.max_batch_size,
            self.lanes.pool,
            self.link.micros_per_image(),
        ))
    }

    /// Seconds until the admitted images have likely been served, from the recent per-image
    /// model time, shared among the instances.
    fn retry_after_secs(&self) -> u64 {
        let queued = self.admission.total();
        clearing_time_us(queued, self.lanes.pool, self.link.micros_per_image())
            .div_ceil(1_000_000)
            .max(1)
    }

    /// Queue one preprocessed image.
    pub fn submit(&self, job: ImageJob) -> Result<(), InferError> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Closed(_) => InferError::ShuttingDown,
            // Cannot happen while admission counts every queued image.
            mpsc::error::TrySendError::Full(job) => self.overloaded(job.level),
        })
    }

    /// Stop taking images: the batcher hands over what is queued, then the model thread
    /// finishes and exits.
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// Wait for the model threads to exit (after `close`).
    pub fn join(&self) {
        for slot in &self.threads {
            let thread = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(thread) = thread {
                if thread.join().is_err() {
                    tracing::error!(model = %self.info.name, "model thread panicked");
                }
            }
        }
    }
}

/// What `/v1/models` and request handling know of a version from the start.
fn model_info(spec: &VersionSpec, options: &SpawnOptions) -> ModelInfo {
    let copies = options.instances.copies();
    let config = &spec.config;
    ModelInfo {
        name: spec.name.clone(),
        version: spec.version.clone(),
        architecture: config.architecture.clone(),
        tag: config.tag.clone(),
        source: spec.source.clone(),
        weights_format: spec.files.format,
        device: device::describe(options.device),
        dtype: options.dtype,
        num_classes: config.num_classes,
        preprocess: config.preprocess.clone(),
        max_batch_size: options.max_batch_size,
        max_batch_delay_ms: options.max_batch_delay.as_millis() as u64,
        max_queue_images: options.max_queue_images,
        instances: copies.len(),
        instance_threads: copies.iter().map(|c| c.1).collect(),
        labels: Arc::new(config.labels.clone()),
    }
}

/// Start the batcher task, which takes jobs from `jobs` and hands batches to the lanes.
fn spawn_batcher(
    jobs: mpsc::Receiver<ImageJob>,
    link: &Arc<BatcherLink>,
    metrics: &ModelMetrics,
    options: &SpawnOptions,
    closing: watch::Receiver<bool>,
) -> Handoffs {
    let layout = options.instances;
    // One slot per lane: the batch waiting while another runs.
    let (pool_tx, pool_rx) = mpsc::channel(1);
    let (solo_tx, solo_rx) = mpsc::channel(1);
    tokio::spawn(batcher::run(
        jobs,
        batcher::Handoff {
            pool: pool_tx,
            solo: layout.solo_threads.map(|_| solo_tx),
        },
        link.clone(),
        metrics.clone(),
        BatcherConfig {
            max_batch_size: options.max_batch_size,
            max_batch_delay: options.max_batch_delay,
            lanes: layout.lanes(),
            mix_levels: options.device.is_cuda(),
        },
        closing,
    ));
    Handoffs {
        pool: Arc::new(Mutex::new(pool_rx)),
        solo: Arc::new(Mutex::new(solo_rx)),
    }
}

/// What every copy of a version shares.
struct CopyShared {
    spec: Arc<worker::WorkerSpec>,
    openvino: Arc<openvino::OpenVinoPrep>,
    handoffs: Handoffs,
    /// Held while a copy warms up: each warms up alone, so that its timings are not skewed by
    /// another warming up at the same time.
    warmup_gate: Arc<Mutex<()>>,
    link: Arc<BatcherLink>,
    status: Arc<ModelStatus>,
    metrics: ModelMetrics,
    batch_timeout: std::time::Duration,
    closing: watch::Receiver<bool>,
}

/// Start a supervisor (and through it a model thread) per copy; the returned channel reports
/// once every copy has loaded, or the first failure.
fn spawn_copies(
    layout: &InstanceLayout,
    shared: &CopyShared,
) -> (Vec<supervisor::ThreadSlot>, LoadOutcome) {
    let copies = layout.copies();
    // The batch policy comes from a pool copy: the pool runs the batches of a loaded server,
    // where the batch size matters.
    let profiled = copies.iter().position(|c| c.0 == Lane::Pool);
    let mut threads = Vec::with_capacity(copies.len());
    let mut loads = Vec::with_capacity(copies.len());
    for (instance, (lane, intra_op_threads)) in copies.into_iter().enumerate() {
        let thread = supervisor::ThreadSlot::default();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let supervisor = supervisor::Supervisor {
            ctx: Arc::new(worker::WorkerContext {
                spec: shared.spec.clone(),
                openvino: shared.openvino.clone(),
                instance,
                lane,
                intra_op_threads,
                profiles: profiled == Some(instance),
                batches: match lane {
                    Lane::Solo => shared.handoffs.solo.clone(),
                    Lane::Pool => shared.handoffs.pool.clone(),
                },
                warmup_gate: shared.warmup_gate.clone(),
                link: shared.link.clone(),
                status: shared.status.clone(),
                metrics: shared.metrics.clone(),
                heartbeat: health::Heartbeat::default(),
                served: Default::default(),
            }),
            batch_timeout: shared.batch_timeout,
            thread: thread.clone(),
            closing: shared.closing.clone(),
        };
        tokio::spawn(supervisor.run(loaded_tx));
        threads.push(thread);
        loads.push(loaded_rx);
    }
    let (loaded_tx, loaded_rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = loaded_tx.send(all_loaded(loads).await);
    });
    (threads, loaded_rx)
}

/// A lower bound of the wait of the last of `images` queued images: they run in full batches,
/// `instances` batches at a time, each batch costing at least one image's recent model time
/// (`per_image_us`, measured per instance).
fn least_wait_us(images: usize, max_batch: usize, instances: usize, per_image_us: u64) -> u64 {
    let batches = images.div_ceil(max_batch.max(1));
    batches.div_ceil(instances.max(1)) as u64 * per_image_us
}

/// How long `images` take when every instance is busy: the copies share them.
fn clearing_time_us(images: usize, instances: usize, per_image_us: u64) -> u64 {
    images as u64 * per_image_us / instances.max(1) as u64
}

/// The model is loaded when every instance is: the first failure otherwise.
async fn all_loaded(loads: Vec<LoadOutcome>) -> Result<(), String> {
    for load in loads {
        load.await
            .unwrap_or_else(|_| Err("the model thread exited while loading".into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_rule_states_the_plateau_tolerance() {
        let percent = ((1.0 - crate::batching::queue::PLATEAU) * 100.0).round();
        assert!(BatchPolicy::RULE.contains(&format!("within {percent} %")));
    }

    #[test]
    fn instance_layouts() {
        let resolve = InstanceLayout::resolve;
        let layout = |solo, pool, pool_threads| InstanceLayout {
            solo_threads: solo,
            pool,
            pool_threads,
        };
        // Fixed copies share the CPUs, or each get --intra-op-threads.
        assert_eq!(
            resolve(Instances::Fixed(1), 2, None, false),
            layout(None, 1, 2)
        );
        assert_eq!(
            resolve(Instances::Fixed(2), 2, None, false),
            layout(None, 2, 1)
        );
        assert_eq!(
            resolve(Instances::Fixed(4), 2, None, false),
            layout(None, 4, 1)
        );
        assert_eq!(
            resolve(Instances::Fixed(2), 8, Some(3), false),
            layout(None, 2, 3)
        );
        // auto: a solo copy with every thread and two copies with half each.
        assert_eq!(
            resolve(Instances::Auto, 2, None, false),
            layout(Some(2), 2, 1)
        );
        assert_eq!(
            resolve(Instances::Auto, 16, None, false),
            layout(Some(16), 2, 8)
        );
        assert_eq!(
            resolve(Instances::Auto, 3, None, false),
            layout(Some(3), 3, 1)
        );
        assert_eq!(
            resolve(Instances::Auto, 8, Some(4), false),
            layout(Some(4), 2, 2)
        );
        // What auto falls back to where its copies do not fit: one copy of the solo's width.
        assert_eq!(
            resolve(Instances::Auto, 2, None, false).single(),
            layout(None, 1, 2)
        );
        assert_eq!(
            resolve(Instances::Auto, 8, Some(4), false).single(),
            layout(None, 1, 4)
        );
        // One CPU, or a GPU: one copy.
        assert_eq!(resolve(Instances::Auto, 1, None, false), layout(None, 1, 1));
        assert_eq!(
            resolve(Instances::Auto, 16, None, true),
            layout(None, 1, 16)
        );
        let auto = resolve(Instances::Auto, 2, None, false);
        assert_eq!(
            auto.copies(),
            [(Lane::Solo, 2), (Lane::Pool, 1), (Lane::Pool, 1)]
        );
        assert_eq!(
            auto.lanes(),
            Lanes {
                solo: true,
                pool: 2
            }
        );
    }

    #[test]
    fn waits_are_shared_among_the_instances() {
        // 20 images in batches of 8: 3 batches; one copy runs them one after another.
        assert_eq!(least_wait_us(20, 8, 1, 1_000), 3_000);
        // Two copies run two batches at a time: 2 rounds.
        assert_eq!(least_wait_us(20, 8, 2, 1_000), 2_000);
        assert_eq!(least_wait_us(0, 8, 2, 1_000), 0);
        assert_eq!(clearing_time_us(100, 1, 10_000), 1_000_000);
        assert_eq!(clearing_time_us(100, 4, 10_000), 250_000);
        // Degenerate settings do not divide by zero.
        assert_eq!(least_wait_us(5, 0, 0, 10), 50);
    }
}
