//! The model thread: owns one copy of a model (on the backend that runs it, `runner.rs`), warms
//! it up, then runs the batches the batcher sends.
//!
//! Running a model happens here, on one OS thread per copy, because libtorch's grad mode and
//! the float control register are thread-local, and neither tensors nor OpenVINO's requests
//! may be shared between threads.

use super::device::flush_denormals;
use super::health::{Heartbeat, Reply};
use super::openvino::OpenVinoPrep;
use super::runner::Runner;
pub use super::spec::WorkerSpec;
use super::ModelStatus;
use crate::batching::queue::{Abandonable, Lane};
use crate::batching::{Batch, BatcherLink, ImagePrediction, JobError, Outputs};
use crate::images::Pixels;
use crate::metrics::ModelMetrics;
use anyhow::Result;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What every generation of a model's thread shares with the others and with the supervisor.
pub struct WorkerContext {
    pub spec: Arc<WorkerSpec>,
    /// What the version's copies share to start on OpenVINO.
    pub openvino: Arc<OpenVinoPrep>,
    /// Which copy of the model this is (`--instances`), for logs, thread names and metrics.
    pub instance: usize,
    /// The batches it takes, and libtorch's intra-op threads for them.
    pub lane: Lane,
    pub intra_op_threads: usize,
    /// Its warm-up is timed and sets the batch policy (one copy per model).
    pub profiles: bool,
    /// The batcher's hand-off channel of this copy's lane, shared by the lane's copies:
    /// whichever generation of each is current receives from it.
    pub batches: Arc<Mutex<mpsc::Receiver<Batch>>>,
    /// This copy has been loaded and warmed up before (a later generation is a replacement).
    pub served: std::sync::atomic::AtomicBool,
    /// Held while an instance warms up, so that instances are timed one at a time.
    pub warmup_gate: Arc<Mutex<()>>,
    pub link: Arc<BatcherLink>,
    pub status: Arc<ModelStatus>,
    pub metrics: ModelMetrics,
    pub heartbeat: Heartbeat,
}

/// Why a model thread returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The batcher closed (shutdown), or the model failed to load.
    Closed,
    /// A batch panicked; libtorch's state is not trusted after that, so the thread stops and
    /// the supervisor starts a fresh one.
    Panicked(String),
    /// The supervisor gave up on this thread (a batch ran past the timeout) and started
    /// another one.
    Retired,
}

/// Body of one generation of the model thread: load and warm up (reporting on `loaded`),
/// then run batches until the batcher closes, a batch panics or the generation is retired.
pub fn run(
    ctx: &WorkerContext,
    generation: u64,
    loaded: oneshot::Sender<Result<(), String>>,
) -> Exit {
    let spec = &ctx.spec;
    flush_denormals();
    if spec.device.is_cuda() {
        // Let cuDNN pick the fastest kernels per shape; every batch size is warmed up below,
        // so no client pays for the search.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    // Per thread (OpenMP's thread count is a per-thread setting), and fixed for the thread's
    // life: changing it between batches rebuilds OpenMP's thread team and oneDNN's caches
    // (measured: BENCHMARKS.md, "Instances that share their threads per batch"). libtorch's
    // first parallel call on a thread resets the thread's count to the value some thread set
    // last (`at::init_num_threads`), which with copies of different widths is another copy's:
    // make that call before setting this copy's count.
    let _ = tch::get_num_threads();
    tch::set_num_threads(ctx.intra_op_threads as i32);
    // Grad mode is thread-local: without this guard every forward would record an autograd
    // graph and keep its activations alive.
    let _no_grad = tch::no_grad_guard();
    let runner = match load_and_warm_up(spec, ctx) {
        Ok(runner) => runner,
        Err(e) => {
            let _ = loaded.send(Err(format!("{e:#}")));
            return Exit::Closed;
        }
    };
    let first_time = !ctx.served.swap(true, std::sync::atomic::Ordering::AcqRel);
    if ctx.status.copy_ready(first_time) {
        ctx.link.set_restarting(false);
        ctx.metrics.ready.set(1);
    }
    let _ = loaded.send(Ok(()));

    let batches_run = ctx.metrics.instance_batches(ctx.instance);
    let exit = loop {
        if ctx.heartbeat.current_generation() != generation {
            break Exit::Retired;
        }
        let batch = ctx
            .batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocking_recv();
        let Some(batch) = batch else {
            break Exit::Closed;
        };
        let mut running = RunningBatch { ctx, counted: true };
        let ran = catch_unwind(AssertUnwindSafe(|| {
            run_batch(&runner, batch, ctx, generation, &mut running)
        }));
        match ran {
            Ok(BatchOutcome::Ran { images }) => {
                if images > 0 {
                    batches_run.inc();
                }
            }
            Ok(BatchOutcome::Panicked { message }) => break Exit::Panicked(message),
            Ok(BatchOutcome::Retired) => {
                // The supervisor took the running batch over and told the batcher. (The other
                // way to be retired, a batch received after the generation changed, cannot
                // happen: the generation only changes while this copy runs a batch.)
                running.counted = false;
                break Exit::Retired;
            }
            Err(panic) => {
                break Exit::Panicked(format!("batch bookkeeping: {}", panic_message(&panic)))
            }
        }
    };
    if exit == Exit::Closed {
        ctx.metrics.ready.set(0);
    }
    tracing::info!(model = %spec.name, instance = ctx.instance, generation, exit = ?exit, "model thread stopped");
    exit
}

fn load_and_warm_up(spec: &WorkerSpec, ctx: &WorkerContext) -> Result<Runner> {
    let status = &ctx.status;
    let start = Instant::now();
    let runner = Runner::load(spec, ctx.intra_op_threads, &ctx.openvino)?;
    status.set_execution(runner.execution());
    status.set_warming();
    let loaded_in = start.elapsed();
    let timings = {
        let _alone = ctx.warmup_gate.lock().unwrap_or_else(|e| e.into_inner());
        runner.warm_up(spec.max_batch_size, ctx.profiles)?
    };
    if ctx.profiles {
        // The gauges describe the copy whose full warm-up is timed, not the last to finish.
        ctx.metrics
            .model_loaded(loaded_in, start.elapsed() - loaded_in);
    }
    status.set_embedding_size(runner.embedding_size()?);
    tracing::info!(
        model = %spec.name,
        instance = ctx.instance,
        lane = ?ctx.lane,
        intra_op_threads = ctx.intra_op_threads,
        backend = status.backend(),
        load_ms = loaded_in.as_millis() as u64,
        warmup = %timings.iter().map(|t| format!("{}:{:.1}ms", t.batch_size, t.millis)).collect::<Vec<_>>().join(" "),
        "model loaded and warmed up"
    );
    if !ctx.profiles {
        return Ok(runner);
    }
    if let Some(policy) = status.set_warmup(timings) {
        tracing::info!(
            model = %spec.name,
            preferred_batch_size = policy.preferred_batch_size,
            max_batch_size = spec.max_batch_size,
            "batch policy from the warm-up profile"
        );
        ctx.link.set_batch_limit(policy.preferred_batch_size);
    }
    Ok(runner)
}

/// A batch the batcher counts as running on this copy. Whatever happens to the batch, the
/// batcher must learn that it finished, exactly once, or it would count the copy as busy
/// forever: when the batch ran, as soon as the model is done with it ([`RunningBatch::done`],
/// before its images are answered, so that a client answered at once finds the model idle
/// and its next image is not taken for load); when it failed, after its images are answered;
/// else when this guard drops.
struct RunningBatch<'a> {
    ctx: &'a WorkerContext,
    /// Still counted by the batcher.
    counted: bool,
}

impl RunningBatch<'_> {
    fn done(&mut self, images: usize, elapsed: Duration) {
        if std::mem::take(&mut self.counted) {
            self.ctx.link.batch_finished(self.ctx.lane, images, elapsed);
        }
    }
}

impl Drop for RunningBatch<'_> {
    fn drop(&mut self) {
        self.done(0, Duration::ZERO);
    }
}

/// What became of one batch.
enum BatchOutcome {
    /// It ran (or failed with an error) and its images (how many) were answered.
    Ran { images: usize },
    /// The model panicked; its images were answered with an error.
    Panicked { message: String },
    /// The supervisor took the batch over while it ran: this thread must stop.
    Retired,
}

/// Run one batch and answer its images. The replies are parked in the heartbeat while the
/// model runs, so that the supervisor can answer them if the model never comes back.
fn run_batch(
    runner: &Runner,
    batch: Batch,
    ctx: &WorkerContext,
    generation: u64,
    running: &mut RunningBatch,
) -> BatchOutcome {
    let live = drop_stale(batch, &ctx.metrics);
    if live.is_empty() {
        return BatchOutcome::Ran { images: 0 };
    }
    let start = Instant::now();
    let batch_size = live.len();
    let span = batch_span(&live, ctx);
    let mut inputs = Vec::with_capacity(batch_size);
    let mut replies = Vec::with_capacity(batch_size);
    for entry in live {
        let queue_wait = start.saturating_duration_since(entry.enqueued_at);
        ctx.metrics
            .observe_queue_wait(queue_wait, entry.item.level.index());
        let job = entry.item;
        inputs.push(BatchInput {
            pixels: job.pixels,
            outputs: job.outputs,
            queue_wait,
        });
        replies.push(Reply {
            sender: job.reply,
            span: job.span,
        });
    }
    if let Err(replies) = ctx.heartbeat.begin(generation, replies) {
        answer_all(replies, JobError::ModelRestarting);
        return BatchOutcome::Retired;
    }
    let outputs = inputs
        .iter()
        .map(|input| input.outputs)
        .fold(Outputs::top_k(0), Outputs::union);
    let images: Vec<&Pixels> = inputs.iter().map(|input| &input.pixels).collect();
    // A libtorch error fails this batch only; a panic fails it and replaces the thread.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        #[cfg(feature = "fault-injection")]
        super::fault::before_batch();
        runner.run_timed(&images, outputs)
    }));
    let elapsed = start.elapsed();
    let Some(replies) = ctx.heartbeat.finish(generation) else {
        // Too late: the supervisor answered these images and started another thread.
        return BatchOutcome::Retired;
    };
    match outcome {
        Ok(Ok((results, phases))) => {
            running.done(batch_size, elapsed);
            ctx.metrics.batch_finished(batch_size, elapsed, phases);
            for ((reply, computed), input) in replies.into_iter().zip(results).zip(&inputs) {
                let mut prediction = answer_for(&input.outputs, computed, elapsed, batch_size);
                prediction.queue_wait = input.queue_wait;
                let _ = reply.sender.send(Ok(prediction));
            }
            BatchOutcome::Ran { images: batch_size }
        }
        Ok(Err(error)) => {
            span.record("otel.status_code", "ERROR");
            fail_batch(ctx, replies, &format!("{error:#}"), elapsed, running);
            BatchOutcome::Ran { images: batch_size }
        }
        Err(panic) => {
            let message = panic_message(&panic);
            let reason = format!("the model panicked: {message}");
            span.record("otel.status_code", "ERROR");
            // This thread stops after the batch: no new request may be admitted meanwhile.
            ctx.status.set_restarting(reason.clone());
            ctx.metrics.ready.set(0);
            fail_batch(ctx, replies, &reason, elapsed, running);
            BatchOutcome::Panicked { message }
        }
    }
}

/// The batch's span, when traces are exported (`Span::none()` otherwise): a root span with a
/// link to the request span of each request it serves, since one batch serves many requests
/// and OpenTelemetry models that with links, not parents. It is sampled when one of those
/// requests is (`telemetry`'s sampler); it ends when `run_batch` returns.
fn batch_span(live: &Batch, ctx: &WorkerContext) -> tracing::Span {
    if !crate::telemetry::active() {
        return tracing::Span::none();
    }
    let mut links: Vec<opentelemetry::trace::SpanContext> = Vec::new();
    for entry in live {
        if let Some(link) = crate::telemetry::link_to(&entry.item.span) {
            // Several images of one request: one link.
            if !links.iter().any(|l| l.span_id() == link.span_id()) {
                links.push(link);
            }
        }
    }
    let span = tracing::info_span!(
        parent: None,
        "batch",
        otel.kind = "internal",
        otel.status_code = tracing::field::Empty,
        model = %ctx.spec.name,
        instance = ctx.instance as i64,
        device = %super::device::describe(ctx.spec.device),
        batch_size = live.len() as i64,
        requests = links.len() as i64,
    );
    for link in links {
        crate::telemetry::add_link(&span, link);
    }
    span
}

/// One image of a running batch: its pixels, what it asked for and how long it waited.
struct BatchInput {
    pixels: Pixels,
    outputs: Outputs,
    queue_wait: Duration,
}

/// The entries of `batch` still worth running: those whose deadline passed while the batch
/// waited in the hand-off slot are answered and counted, those whose client left are counted.
fn drop_stale(batch: Batch, metrics: &ModelMetrics) -> Batch {
    let now = Instant::now();
    let (live, expired): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|e| e.item.deadline.is_none_or(|d| d > now));
    if !expired.is_empty() {
        metrics.dropped_deadline.inc_by(expired.len() as u64);
        for entry in expired {
            let _ = entry.item.reply.send(Err(JobError::DeadlineExceeded));
        }
    }
    let (live, abandoned): (Vec<_>, Vec<_>) =
        live.into_iter().partition(|e| !e.item.is_abandoned());
    if !abandoned.is_empty() {
        metrics.dropped_client_gone.inc_by(abandoned.len() as u64);
    }
    live
}

/// A batch failed with `reason`: count it and answer every image with the failure, logging it
/// once per image inside its request's span, so that each request id of the batch appears in
/// the log.
fn fail_batch(
    ctx: &WorkerContext,
    replies: Vec<Reply>,
    reason: &str,
    elapsed: Duration,
    running: &mut RunningBatch,
) {
    let batch_size = replies.len();
    ctx.metrics.batch_failed(batch_size, elapsed);
    for reply in replies {
        reply.span.in_scope(|| {
            tracing::error!(model = %ctx.spec.name, batch_size, error = %reason, "batch failed");
        });
        let _ = reply.sender.send(Err(JobError::Failed));
    }
    running.done(batch_size, elapsed);
}

/// Answer every image of a batch with `error`.
pub fn answer_all(replies: Vec<Reply>, error: JobError) {
    for reply in replies {
        let _ = reply.sender.send(Err(error));
    }
}

/// Keep only what this image asked for out of what the batch computed for it.
fn answer_for(
    wanted: &Outputs,
    mut computed: ImagePrediction,
    inference: Duration,
    batch_size: usize,
) -> ImagePrediction {
    computed.top.truncate(wanted.top_k);
    ImagePrediction {
        top: computed.top,
        probabilities: computed.probabilities.filter(|_| wanted.probabilities),
        logits: computed.logits.filter(|_| wanted.logits),
        embeddings: computed.embeddings.filter(|_| wanted.embeddings),
        queue_wait: Duration::ZERO,
        inference,
        batch_size,
    }
}

pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}
