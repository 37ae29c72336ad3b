//! From a model-ready image to a batch: one job per image, the queue that holds them and the
//! batcher task that forms batches and hands them to the model threads. Plain Rust, no tch.
//!
//! `queue` holds the batching policy as a pure state with unit tests; `batcher` is the task
//! that applies it and hands batches over through one-slot channels.

pub mod batcher;
pub mod queue;

use crate::images::Pixels;
use crate::priority::Level;
use queue::{Abandonable, Queued};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub use batcher::BatcherLink;

/// What a caller wants back for one image. The model thread computes every output for the
/// whole batch, but copies off the device only what some image asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outputs {
    /// The `top_k` most probable classes (0: none).
    pub top_k: usize,
    /// Every class's probability (softmax of the logits).
    pub probabilities: bool,
    pub logits: bool,
    /// The pooled features before the classifier (native models only).
    pub embeddings: bool,
}

impl Outputs {
    /// Just the top `k` classes: what `/v1` asks for.
    pub fn top_k(k: usize) -> Self {
        Self {
            top_k: k,
            probabilities: false,
            logits: false,
            embeddings: false,
        }
    }

    /// What a batch must compute so that every image gets what it asked for.
    pub fn union(self, other: Outputs) -> Outputs {
        Outputs {
            top_k: self.top_k.max(other.top_k),
            probabilities: self.probabilities || other.probabilities,
            logits: self.logits || other.logits,
            embeddings: self.embeddings || other.embeddings,
        }
    }
}

/// One image on its way to the model: its pixels, what to compute and where to send the
/// answer. `span` is the request's tracing span, so that the model thread's log lines about
/// this image carry the request id.
#[derive(Debug)]
pub struct ImageJob {
    pub pixels: Pixels,
    pub outputs: Outputs,
    pub reply: oneshot::Sender<Result<ImagePrediction, JobError>>,
    pub span: tracing::Span,
    /// The request's deadline: past it, the image is dropped before inference.
    pub deadline: Option<Instant>,
    /// The request's priority level: batches fill from the highest.
    pub level: Level,
}

impl Abandonable for ImageJob {
    fn is_abandoned(&self) -> bool {
        // The request handler owns the receiver; it is dropped when the client disconnects.
        self.reply.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn level(&self) -> Level {
        self.level
    }
}

/// A batch as handed to the model thread, in queue order.
pub type Batch = Vec<Queued<ImageJob>>;

/// The answer for one image: what its `Outputs` asked for, and how long it took.
#[derive(Debug, Clone, Default)]
pub struct ImagePrediction {
    /// (class index, probability), best first.
    pub top: Vec<(usize, f32)>,
    pub probabilities: Option<Vec<f32>>,
    pub logits: Option<Vec<f32>>,
    pub embeddings: Option<Vec<f32>>,
    pub queue_wait: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

/// Why an image got no prediction from the model (the service turns it into an `InferError`).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("inference failed")]
    Failed,
    #[error("the model is shutting down")]
    Stopped,
    #[error("the request's deadline passed before the image ran")]
    DeadlineExceeded,
    #[error("the model stopped responding and is restarting")]
    ModelRestarting,
}
