//! The model thread: owns one model, warms it up, then runs the batches the batcher sends.
//!
//! Everything libtorch-related for serving happens here, on one OS thread per model, because
//! grad mode and the float control register are thread-local and tensors are not `Sync`.

use super::device::flush_denormals;
use super::health::{Heartbeat, Reply};
use super::{ModelStatus, WarmupTiming};
use crate::batching::queue::{Abandonable, Lane};
use crate::batching::{Batch, BatcherLink, ImagePrediction, JobError, Outputs};
use crate::images::preprocess::PreprocessConfig;
use crate::images::Pixels;
use crate::metrics::{BatchPhases, ModelMetrics};
use crate::models::{self, Classifier};
use crate::repository::ModelFiles;
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

pub struct WorkerSpec {
    pub name: String,
    pub files: ModelFiles,
    pub preprocess: PreprocessConfig,
    pub num_classes: usize,
    pub device: Device,
    pub kind: Kind,
    pub max_batch_size: usize,
}

/// Turns preprocessed u8 images into probabilities: the part of inference that is the same for
/// every architecture.
pub struct Runner {
    model: Box<dyn Classifier>,
    device: Device,
    kind: Kind,
    height: i64,
    width: i64,
    mean: Tensor,
    std: Tensor,
    num_classes: usize,
    channels_last: bool,
    /// Where a batch's u8 pixels are gathered: `[capacity, H, W, 3]`, allocated once for the
    /// largest batch seen and reused, so that a batch costs one copy per image and no
    /// allocation. On CUDA it is pinned (page-locked) memory, so the upload is a DMA that
    /// runs without blocking this thread.
    staging: RefCell<Option<Tensor>>,
}

impl Runner {
    /// Load the model `spec` describes and wrap it.
    pub fn load(spec: &WorkerSpec) -> Result<Self> {
        let model = models::load(
            &spec.files,
            spec.num_classes,
            spec.preprocess.input_size,
            spec.device,
            spec.kind,
        )?;
        Self::new(model, spec)
    }

    pub fn backend(&self) -> &'static str {
        self.model.implementation()
    }

    pub fn new(model: Box<dyn Classifier>, spec: &WorkerSpec) -> Result<Self> {
        let (height, width) = spec.preprocess.input_size;
        let channel_tensor = |v: [f32; 3]| -> Result<Tensor> {
            Ok(Tensor::from_slice(&v)
                .f_view([1, 3, 1, 1])?
                .f_to_device(spec.device)?)
        };
        Ok(Self {
            channels_last: model.wants_channels_last(),
            model,
            device: spec.device,
            kind: spec.kind,
            height: height as i64,
            width: width as i64,
            mean: channel_tensor(spec.preprocess.mean)?,
            std: channel_tensor(spec.preprocess.std)?,
            num_classes: spec.num_classes,
            staging: RefCell::new(None),
        })
    }

    /// Normalise exactly as torchvision's `ToTensor` + `Normalize` do on a PIL image (u8 to
    /// f32, `/ 255`, `- mean`, `/ std`, each a separate f32 operation), on the model's device so
    /// that only u8 pixels cross to a GPU.
    fn input(&self, images: &[&Pixels]) -> Result<Tensor> {
        let rgb8: Option<Vec<&[u8]>> = images
            .iter()
            .map(|p| match p {
                Pixels::Rgb8(pixels) => Some(pixels.as_slice()),
                Pixels::Normalized(_) => None,
            })
            .collect();
        let x = match rgb8 {
            // The common case: one upload and one normalisation for the whole batch.
            Some(rgb8) => self.normalize(&rgb8)?,
            // A client sent normalised pixels: build the batch image by image.
            None => {
                let parts = images
                    .iter()
                    .map(|p| match p {
                        Pixels::Rgb8(pixels) => self.normalize(&[pixels.as_slice()]),
                        Pixels::Normalized(values) => self.normalized_nchw(values),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::f_cat(&parts, 0)?
            }
        };
        Ok(if self.kind == Kind::Float {
            x
        } else {
            x.f_to_kind(self.kind)?
        })
    }

    /// `u8` HWC images to normalised `f32` NCHW.
    fn normalize(&self, images: &[&[u8]]) -> Result<Tensor> {
        let batch = self.stage(images)?;
        // The u8 buffer is NHWC; permuting gives an NCHW view with channels-last strides,
        // which native models keep, and TorchScript exports get as a contiguous copy. On a GPU
        // the upload is asynchronous: it is ordered before the kernels that read it.
        let on_device = if self.device == Device::Cpu {
            batch
        } else {
            batch.f_to_device_(self.device, Kind::Uint8, true, false)?
        };
        let nchw = on_device.f_permute([0, 3, 1, 2])?;
        let nchw = if self.channels_last {
            nchw
        } else {
            nchw.f_contiguous()?
        };
        Ok(nchw
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255)?
            .f_sub(&self.mean)?
            .f_div(&self.std)?)
    }

    /// Copy `images` into the staging buffer; returns the `[n, H, W, 3]` part they fill.
    fn stage(&self, images: &[&[u8]]) -> Result<Tensor> {
        let n = images.len() as i64;
        let image_bytes = (self.height * self.width * 3) as usize;
        if let Some(bad) = images.iter().find(|image| image.len() != image_bytes) {
            bail!(
                "an image of {} bytes does not match the model input ({image_bytes} bytes)",
                bad.len()
            );
        }
        let mut staging = self.staging.borrow_mut();
        let capacity = staging.as_ref().map_or(0, |t| t.size()[0]);
        if capacity < n {
            let buffer =
                Tensor::f_empty([n, self.height, self.width, 3], (Kind::Uint8, Device::Cpu))?;
            *staging = Some(if self.device.is_cuda() {
                buffer.f_pin_memory(self.device)?
            } else {
                buffer
            });
        }
        let batch = staging
            .as_ref()
            .expect("allocated above")
            .f_narrow(0, 0, n)?;
        let base = batch.data_ptr() as *mut u8;
        for (i, image) in images.iter().enumerate() {
            // SAFETY: `batch` is a contiguous u8 tensor of n * image_bytes bytes that this
            // thread alone uses (the previous batch's reads of it finished: its outputs were
            // copied off, which waits for the device), and each image has exactly
            // image_bytes bytes (checked above), so the copies stay inside it and do not
            // overlap their sources.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    image.as_ptr(),
                    base.add(i * image_bytes),
                    image_bytes,
                );
            }
        }
        Ok(batch)
    }

    /// One CHW image a client normalised itself, as `[1, 3, H, W]` with the strides the model
    /// wants.
    fn normalized_nchw(&self, values: &[f32]) -> Result<Tensor> {
        let nchw = Tensor::from_slice(values)
            .f_view([1, 3, self.height, self.width])?
            .f_to_device(self.device)?;
        Ok(if self.channels_last {
            nchw.f_permute([0, 2, 3, 1])?
                .f_contiguous()?
                .f_permute([0, 3, 1, 2])?
        } else {
            nchw
        })
    }

    /// Run a batch and copy off the device what `outputs` asks for, per image.
    pub fn run(&self, images: &[&Pixels], outputs: Outputs) -> Result<Vec<ImagePrediction>> {
        Ok(self.run_timed(images, outputs)?.0)
    }

    /// [`Runner::run`], and how long its three phases took. On a GPU, where kernels run
    /// asynchronously, the forward pass is only waited for when outputs are copied off, so its
    /// time shows up in `output`.
    pub fn run_timed(
        &self,
        images: &[&Pixels],
        outputs: Outputs,
    ) -> Result<(Vec<ImagePrediction>, BatchPhases)> {
        let n = images.len();
        let start = Instant::now();
        let input = self.input(images)?;
        let input_done = Instant::now();
        let forward = self.model.forward_with_embeddings(&input)?;
        let forward_done = Instant::now();
        let expected = [n as i64, self.num_classes as i64];
        if forward.logits.size() != expected {
            bail!(
                "the model returned logits of shape {:?}, but its config.json says num_classes = {}",
                forward.logits.size(),
                self.num_classes
            );
        }
        let logits = forward.logits.f_to_kind(Kind::Float)?;
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let mut predictions = vec![ImagePrediction::default(); n];
        let k = outputs.top_k.min(self.num_classes);
        if k > 0 {
            let (values, indices) = probs.f_topk(k as i64, -1, true, true)?;
            let values = to_rows(&values, n)?;
            let indices =
                Vec::<i64>::try_from(indices.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
            for ((prediction, v), i) in predictions.iter_mut().zip(values).zip(indices.chunks(k)) {
                prediction.top = i.iter().map(|&i| i as usize).zip(v).collect();
            }
        }
        if outputs.probabilities {
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&probs, n)?) {
                prediction.probabilities = Some(row);
            }
        }
        if outputs.logits {
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&logits, n)?) {
                prediction.logits = Some(row);
            }
        }
        if outputs.embeddings {
            let embeddings = forward
                .embeddings
                .ok_or_else(|| anyhow::anyhow!("this model does not expose embeddings"))?
                .f_to_kind(Kind::Float)?;
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&embeddings, n)?) {
                prediction.embeddings = Some(row);
            }
        }
        let copied_off = k > 0 || outputs.probabilities || outputs.logits || outputs.embeddings;
        if let (Device::Cuda(index), false) = (self.device, copied_off) {
            // Nothing was copied off, which would have waited for the device: wait here, so
            // that the next batch does not overwrite the staging buffer while it uploads.
            tch::Cuda::synchronize(index as i64);
        }
        let phases = BatchPhases {
            input: input_done - start,
            infer: forward_done - input_done,
            output: forward_done.elapsed(),
        };
        Ok((predictions, phases))
    }

    /// The length of the embeddings this model gives (`None`: it gives none).
    pub fn embedding_size(&self) -> Result<Option<usize>> {
        let image = Tensor::f_zeros([1, 3, self.height, self.width], (self.kind, self.device))?;
        let forward = self.model.forward_with_embeddings(&image)?;
        Ok(forward
            .embeddings
            .map(|e| e.size().last().copied().unwrap_or(0) as usize))
    }

    /// Run every batch size so that no client pays for first-call costs (graph optimisation,
    /// allocator growth, cuDNN autotuning), then time them: up to `TIMED_PASSES` passes over
    /// every size in turn (fewer once `TIMED_TIME` is spent, at least one), keeping each
    /// size's fastest run. Passes interleave the sizes so that a slow spell of the host hits
    /// them alike instead of making the later, larger sizes look slow, and the fastest run is
    /// the one other processes disturbed least. The profile decides where batches stop
    /// growing (`BatchPolicy`). Without `timed`, only the first pass runs (a copy whose
    /// profile nobody reads), and the result is empty.
    fn warm_up(&self, max_batch_size: usize, timed: bool) -> Result<Vec<WarmupTiming>> {
        const TIMED_PASSES: usize = 3;
        const TIMED_TIME: Duration = Duration::from_secs(3);
        let image = Pixels::Rgb8(vec![0u8; (self.height * self.width * 3) as usize]);
        let run = |batch: usize| -> Result<Duration> {
            let images = vec![&image; batch];
            let start = Instant::now();
            self.run(&images, Outputs::top_k(1))
                .with_context(|| format!("warm-up at batch size {batch}"))?;
            Ok(start.elapsed())
        };
        for batch in 1..=max_batch_size {
            run(batch)?;
        }
        if !timed {
            return Ok(Vec::new());
        }
        let (mut fastest, mut spent) = (vec![Duration::MAX; max_batch_size], Duration::ZERO);
        for _ in 0..TIMED_PASSES {
            for (i, fastest) in fastest.iter_mut().enumerate() {
                let took = run(i + 1)?;
                *fastest = (*fastest).min(took);
                spent += took;
            }
            if spent >= TIMED_TIME {
                break;
            }
        }
        Ok(fastest
            .iter()
            .enumerate()
            .map(|(i, took)| WarmupTiming::new(i + 1, took.as_secs_f64() * 1e3))
            .collect())
    }
}

/// What every generation of a model's thread shares with the others and with the supervisor.
pub struct WorkerContext {
    pub spec: Arc<WorkerSpec>,
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
    let runner = Runner::load(spec)?;
    status.set_backend(runner.backend());
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
        intra_op_threads = tch::get_num_threads(),
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
    let mut inputs = Vec::with_capacity(batch_size);
    let mut replies = Vec::with_capacity(batch_size);
    for entry in live {
        let queue_wait = start.saturating_duration_since(entry.enqueued_at);
        ctx.metrics.observe_queue_wait(queue_wait);
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
            fail_batch(ctx, replies, &format!("{error:#}"), elapsed, running);
            BatchOutcome::Ran { images: batch_size }
        }
        Err(panic) => {
            let message = panic_message(&panic);
            let reason = format!("the model panicked: {message}");
            // This thread stops after the batch: no new request may be admitted meanwhile.
            ctx.status.set_restarting(reason.clone());
            ctx.metrics.ready.set(0);
            fail_batch(ctx, replies, &reason, elapsed, running);
            BatchOutcome::Panicked { message }
        }
    }
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

/// A `[n, m]` tensor as `n` rows of `f32` on the CPU.
fn to_rows(tensor: &Tensor, n: usize) -> Result<Vec<Vec<f32>>> {
    let flat = Vec::<f32>::try_from(tensor.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let width = flat.len() / n.max(1);
    Ok(flat.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
}
