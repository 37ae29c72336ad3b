//! From request bytes to a model-ready image: plain Rust, no tch.
//!
//! `decode` (bytes -> RGB) and `preprocess` (resize + crop, via `resize`, a port of Pillow's
//! resampler) run on [`DecodePool`], a bounded pool of blocking threads; [`prepare`] is one
//! image's whole trip, with a panic in a codec contained to that image.

pub mod decode;
pub mod preprocess;
pub mod resize;

use decode::{DecodeError, DecodeOptions, DecodeScale};
use preprocess::PreprocessConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Pixels ready for the model, at its input size.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// HWC RGB `u8`, as decoded and resized here (or sent preprocessed by a client): the model
    /// thread normalises them with the model's mean and std.
    Rgb8(Vec<u8>),
    /// CHW `f32`, already normalised by the client.
    Normalized(Vec<f32>),
}

/// An image after decode and preprocess, with the time each stage took.
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Pixels,
    pub decode: Duration,
    pub preprocess: Duration,
    /// The scale it was decoded at (`None`: sent as pixels, not decoded here).
    pub scale: Option<DecodeScale>,
}

/// Decode and preprocess one image (CPU-bound: call from the decode pool); `decode_opts` come
/// from the model's [`PreprocessConfig::decode_options`]. A panic inside a codec or the
/// resampler (a crafted file, a bug in a decoder) fails this image as undecodable (422), never
/// its request's task or the server.
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
    let decoded = decode::decode(bytes, decode_opts)?;
    let t1 = Instant::now();
    let input = preprocess::preprocess(&decoded.image, cfg);
    Ok(Prepared {
        pixels: Pixels::Rgb8(input.pixels),
        decode: t1 - t0,
        preprocess: t1.elapsed(),
        scale: Some(decoded.scale),
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

    /// Run `work` on a blocking thread once one of the pool's permits is free. A panic in
    /// `work` fails only this call (logged here), never the task that awaits it.
    pub async fn run<T, F>(&self, work: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // The semaphore is never closed: a failure here would be a bug, reported as one.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PoolError)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| {
            if e.is_panic() {
                tracing::error!(error = %panic_message(e.into_panic()), "work on the decode pool panicked");
            }
            PoolError
        })
    }
}

/// Work on the decode pool that panicked (or was cancelled as the runtime shut down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("work on the decode pool failed")]
pub struct PoolError;

/// A panic's message, if it carried one.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
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
