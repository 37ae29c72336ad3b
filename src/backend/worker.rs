//! The model thread: owns one model, warms it up, then runs the batches the batcher sends.
//!
//! Everything libtorch-related for serving happens here, on one OS thread per model, because
//! grad mode and the float control register are thread-local and tensors are not `Sync`.

use super::device::flush_denormals;
use super::{ModelStatus, WarmupTiming};
use crate::metrics::ModelMetrics;
use crate::models::{self, Classifier};
use crate::pipeline::preprocess::PreprocessConfig;
use crate::pipeline::queue::Abandonable;
use crate::pipeline::{Batch, BatcherLink, ImagePrediction, InferenceError};
use crate::repository::ModelFiles;
use anyhow::{bail, Context, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
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
    pub intra_op_threads: Option<usize>,
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
        self.model.backend()
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
        })
    }

    /// Normalise exactly as torchvision's `ToTensor` + `Normalize` do on a PIL image (u8 to
    /// f32, `/ 255`, `- mean`, `/ std`, each a separate f32 operation), on the model's device so
    /// that only u8 pixels cross to a GPU.
    fn input(&self, images: &[&[u8]]) -> Result<Tensor> {
        let n = images.len() as i64;
        let mut pixels = Vec::with_capacity(images.iter().map(|p| p.len()).sum());
        for image in images {
            pixels.extend_from_slice(image);
        }
        // The u8 buffer is NHWC; permuting gives an NCHW view with channels-last strides,
        // which native models keep, and TorchScript exports get as a contiguous copy.
        let nchw = Tensor::from_slice(&pixels)
            .f_view([n, self.height, self.width, 3])?
            .f_to_device(self.device)?
            .f_permute([0, 3, 1, 2])?;
        let nchw = if self.channels_last {
            nchw
        } else {
            nchw.f_contiguous()?
        };
        let x = nchw
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255)?
            .f_sub(&self.mean)?
            .f_div(&self.std)?;
        Ok(if self.kind == Kind::Float {
            x
        } else {
            x.f_to_kind(self.kind)?
        })
    }

    /// The `k` most probable classes of each image, as (index, probability).
    pub fn classify(&self, images: &[&[u8]], k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let k = k.min(self.num_classes).max(1);
        let logits = self.model.forward(&self.input(images)?)?;
        let expected = [images.len() as i64, self.num_classes as i64];
        if logits.size() != expected {
            bail!(
                "the model returned logits of shape {:?}, but its config.json says num_classes = {}",
                logits.size(),
                self.num_classes
            );
        }
        let probs = logits.f_to_kind(Kind::Float)?.f_softmax(-1, Kind::Float)?;
        let (values, indices) = probs.f_topk(k as i64, -1, true, true)?;
        let values = Vec::<f32>::try_from(values.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
        let indices = Vec::<i64>::try_from(indices.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
        Ok(values
            .chunks(k)
            .zip(indices.chunks(k))
            .map(|(v, i)| {
                i.iter()
                    .map(|&i| i as usize)
                    .zip(v.iter().copied())
                    .collect()
            })
            .collect())
    }

    /// Run every batch size once so that no client pays for first-call costs (graph
    /// optimisation, allocator growth, cuDNN autotuning).
    fn warm_up(&self, max_batch_size: usize) -> Result<Vec<WarmupTiming>> {
        let image = vec![0u8; (self.height * self.width * 3) as usize];
        (1..=max_batch_size)
            .map(|batch| {
                let images = vec![image.as_slice(); batch];
                let start = Instant::now();
                self.classify(&images, 1)
                    .with_context(|| format!("warm-up at batch size {batch}"))?;
                Ok(WarmupTiming {
                    batch_size: batch,
                    millis: start.elapsed().as_secs_f64() * 1e3,
                })
            })
            .collect()
    }
}

/// Body of the model thread.
pub fn run(
    spec: WorkerSpec,
    mut batches: mpsc::Receiver<Batch>,
    link: Arc<BatcherLink>,
    status: Arc<ModelStatus>,
    metrics: ModelMetrics,
    loaded: oneshot::Sender<Result<(), String>>,
) {
    flush_denormals();
    if spec.device.is_cuda() {
        // Let cuDNN pick the fastest kernels per shape; every batch size is warmed up below,
        // so no client pays for the search.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    if let Some(threads) = spec.intra_op_threads {
        tch::set_num_threads(threads as i32);
    }
    // Grad mode is thread-local: without this guard every forward would record an autograd
    // graph and keep its activations alive.
    let _no_grad = tch::no_grad_guard();
    let runner = match load_and_warm_up(&spec, &status) {
        Ok(runner) => runner,
        Err(e) => {
            let message = format!("{e:#}");
            status.set_failed(message.clone());
            let _ = loaded.send(Err(message));
            return;
        }
    };
    status.set_ready();
    metrics.ready.set(1);
    let _ = loaded.send(Ok(()));

    while let Some(batch) = batches.blocking_recv() {
        // Whatever happens in the batch, the batcher must learn that it finished, or it would
        // count the model as busy forever.
        let ran = catch_unwind(AssertUnwindSafe(|| {
            run_batch(&runner, batch, &metrics, &spec.name)
        }));
        let (images, elapsed) = ran.unwrap_or_else(|panic| {
            tracing::error!(model = %spec.name, error = %panic_message(&panic), "batch bookkeeping panicked");
            (0, Duration::ZERO)
        });
        link.batch_finished(images, elapsed);
    }
    metrics.ready.set(0);
    tracing::info!(model = %spec.name, "model thread stopped");
}

fn load_and_warm_up(spec: &WorkerSpec, status: &ModelStatus) -> Result<Runner> {
    let start = Instant::now();
    let runner = Runner::load(spec)?;
    status.set_backend(runner.backend());
    let loaded_in = start.elapsed();
    let timings = runner.warm_up(spec.max_batch_size)?;
    tracing::info!(
        model = %spec.name,
        backend = status.backend(),
        load_ms = loaded_in.as_millis() as u64,
        warmup = %timings.iter().map(|t| format!("{}:{:.1}ms", t.batch_size, t.millis)).collect::<Vec<_>>().join(" "),
        "model loaded and warmed up"
    );
    status.set_warmup(timings);
    Ok(runner)
}

/// Run one batch and answer its images; returns (images run, model time).
fn run_batch(
    runner: &Runner,
    batch: Batch,
    metrics: &ModelMetrics,
    name: &str,
) -> (usize, Duration) {
    // Clients may have gone while the batch waited in the hand-off slot.
    let (live, abandoned): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|e| !e.item.is_abandoned());
    if !abandoned.is_empty() {
        metrics.dropped_client_gone.inc_by(abandoned.len() as u64);
    }
    if live.is_empty() {
        return (0, Duration::ZERO);
    }
    let start = Instant::now();
    for entry in &live {
        metrics.queue_wait.observe(
            start
                .saturating_duration_since(entry.enqueued_at)
                .as_secs_f64(),
        );
    }
    let k = live.iter().map(|e| e.item.top_k).max().unwrap_or(1);
    let images: Vec<&[u8]> = live.iter().map(|e| e.item.pixels.as_slice()).collect();
    // A libtorch error or a panic inside tch fails this batch only; the thread keeps serving.
    let outcome = catch_unwind(AssertUnwindSafe(|| runner.classify(&images, k)));
    let elapsed = start.elapsed();
    metrics.inference.observe(elapsed.as_secs_f64());
    metrics.batch_size.observe(live.len() as f64);
    let batch_size = live.len();
    match outcome {
        Ok(Ok(results)) => {
            for (entry, mut top) in live.into_iter().zip(results) {
                top.truncate(entry.item.top_k);
                let prediction = ImagePrediction {
                    top,
                    queue_wait: start.saturating_duration_since(entry.enqueued_at),
                    inference: elapsed,
                    batch_size,
                };
                let _ = entry.item.reply.send(Ok(prediction));
            }
        }
        failure => {
            let reason = match failure {
                Ok(Err(e)) => format!("{e:#}"),
                Err(panic) => panic_message(&panic),
                Ok(Ok(_)) => unreachable!(),
            };
            tracing::error!(model = %name, batch_size, error = %reason, "batch failed");
            for entry in live {
                let _ = entry.item.reply.send(Err(InferenceError::Failed));
            }
        }
    }
    (batch_size, elapsed)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}
