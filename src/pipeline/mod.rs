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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};

/// One image on its way to the model: preprocessed pixels (HWC u8 at the model's input size)
/// and where to send its answer.
#[derive(Debug)]
pub struct ImageJob {
    pub pixels: Vec<u8>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<ImagePrediction, InferenceError>>,
}

impl Abandonable for ImageJob {
    fn is_abandoned(&self) -> bool {
        // The request handler owns the receiver; it is dropped when the client disconnects.
        self.reply.is_closed()
    }
}

/// A batch as handed to the model thread, in queue order.
pub type Batch = Vec<Queued<ImageJob>>;

/// The answer for one image.
#[derive(Debug, Clone)]
pub struct ImagePrediction {
    /// (class index, probability), best first.
    pub top: Vec<(usize, f32)>,
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
}

/// State shared by a model's request handlers, its batcher and its model thread.
#[derive(Debug, Default)]
pub struct BatcherLink {
    /// Batches sent to the model thread and not finished (decremented by the model thread).
    pub outstanding: AtomicUsize,
    /// Images admitted and still being decoded (they will be queued soon).
    pub incoming: AtomicUsize,
    /// Wakes the batcher when a batch finishes or an incoming image is abandoned.
    pub wake: Notify,
    /// Recent model cost per image in microseconds, for Retry-After estimates.
    pub micros_per_image: AtomicU64,
}

impl BatcherLink {
    pub fn batch_finished(&self, images: usize, elapsed: Duration) {
        if images > 0 {
            let per_image = elapsed.as_micros() as u64 / images as u64;
            self.micros_per_image
                .store(per_image.max(1), Ordering::Relaxed);
        }
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }
}

/// An image after decode and preprocess, with the time each stage took.
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Vec<u8>,
    pub decode: Duration,
    pub preprocess: Duration,
}

/// Decode and preprocess one image (CPU-bound: call from the decode pool).
pub fn prepare(
    bytes: &[u8],
    decode_opts: &DecodeOptions,
    cfg: &PreprocessConfig,
) -> Result<Prepared, DecodeError> {
    let t0 = Instant::now();
    let image = decode::decode(bytes, decode_opts)?;
    let t1 = Instant::now();
    let input = preprocess::preprocess(&image, cfg);
    Ok(Prepared {
        pixels: input.pixels,
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
