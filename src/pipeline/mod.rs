//! From request bytes to a model-ready image, and from there to a batch: plain Rust, no tch.
//!
//! `decode` (bytes -> RGB) and `preprocess` (resize + crop, via `resize`) run on a bounded pool
//! of blocking threads; `queue` holds the batching policy and `batcher` is the task that applies
//! it and hands batches to the model thread.

pub mod batcher;
pub mod decode;
pub mod preprocess;
pub mod queue;
pub mod resize;

use decode::{DecodeError, DecodeOptions};
use preprocess::PreprocessConfig;
use queue::{Abandonable, Queued};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Semaphore};

pub use batcher::BatcherLink;

/// Pixels ready for the model, at its input size.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// HWC RGB `u8`, as decoded and resized here (or sent preprocessed by a client): the model
    /// thread normalises them with the model's mean and std.
    Rgb8(Vec<u8>),
    /// CHW `f32`, already normalised by the client.
    Normalized(Vec<f32>),
}

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
    pub reply: oneshot::Sender<Result<ImagePrediction, InferenceError>>,
    pub span: tracing::Span,
    /// The request's deadline: past it, the image is dropped before inference.
    pub deadline: Option<Instant>,
}

impl Abandonable for ImageJob {
    fn is_abandoned(&self) -> bool {
        // The request handler owns the receiver; it is dropped when the client disconnects.
        self.reply.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
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

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum InferenceError {
    #[error("inference failed")]
    Failed,
    #[error("the model is shutting down")]
    Stopped,
    #[error("the request's deadline passed before the image ran")]
    DeadlineExceeded,
    #[error("the model stopped responding and is restarting")]
    ModelRestarting,
}

/// An image after decode and preprocess, with the time each stage took.
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Pixels,
    pub decode: Duration,
    pub preprocess: Duration,
}

/// Decode and preprocess one image (CPU-bound: call from the decode pool). A panic inside a
/// codec or the resampler (a crafted file, a bug in a decoder) fails this image as undecodable
/// (422), never its request's task or the server.
pub fn prepare(
    bytes: &[u8],
    decode_opts: &DecodeOptions,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DecodeError> {
    contain_panic(|| prepare_image(bytes, decode_opts, cfg))
}

/// Run `work`, turning a panic into an undecodable-image error (logged with its message).
fn contain_panic<T>(work: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        tracing::error!(error = message, "decoding or resizing an image panicked");
        Err(DecodeError::Corrupt {
            format: "image",
            reason: "the decoder failed on this file".into(),
        })
    })
}

fn prepare_image(
    bytes: &[u8],
    decode_opts: &DecodeOptions,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DecodeError> {
    let t0 = Instant::now();
    let image = decode::decode(bytes, decode_opts)?;
    let t1 = Instant::now();
    let input = preprocess::preprocess(&image, cfg);
    Ok(Prepared {
        pixels: Pixels::Rgb8(input.pixels),
        decode: t1 - t0,
        preprocess: t1.elapsed(),
    })
}

/// A bounded pool for CPU-heavy work: at most `threads` closures run at once on tokio's
/// blocking threads, so decoding never runs on (or starves) the async workers, and a burst of
/// uploads queues here instead of spawning hundreds of threads.
#[derive(Debug, Clone)]
pub struct DecodePool {
    permits: Arc<Semaphore>,
}

impl DecodePool {
    pub fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    pub async fn run<T, F>(&self, work: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("pool semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .expect("decode work does not panic")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_fails_only_its_image() {
        let failed = contain_panic::<()>(|| panic!("codec bug"));
        let err = failed.unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("decoder failed"), "{err}");
        assert_eq!(contain_panic(|| Ok(7)).unwrap(), 7);
    }
}
