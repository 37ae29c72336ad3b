//! From request bytes to a model-ready image: plain Rust, no tch.
//!
//! `decode` (bytes -> RGB) and `preprocess` (resize + crop, via `resize`, a port of Pillow's
//! resampler) run on [`DecodePool`], a bounded pool of blocking threads; [`prepare`] is one
//! image's whole trip, with a panic in a codec contained to that image.

pub mod decode;
pub mod files;
pub mod preprocess;
pub mod resize;

use crate::priority::Level;
use decode::{DecodeError, DecodeOptions, DecodeScale};
use preprocess::PreprocessConfig;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
///
/// Waiting work starts cheapest first, within a bound: each waiter's place in line is its arrival
/// time plus [`OVERTAKE_FACTOR`] times its estimated cost ([`estimated_cost`]). A thumbnail that
/// arrives behind a queue of 12-megapixel decodes takes the next free thread instead of waiting
/// for all of them (measured: BENCHMARKS.md, "Large photos beside small ones"), while a large
/// image is overtaken only by work that arrives within `OVERTAKE_FACTOR` times its own cost, so
/// it cannot starve. With request priorities (`crate::priority`), a higher level's work starts
/// before any lower level's, as its images go before theirs in the model's queue: a flood at a
/// low level, which its own queue limit bounds, cannot make a high-priority image wait for its
/// decodes.
#[derive(Debug, Clone)]
pub struct DecodePool {
    slots: Arc<Mutex<Slots>>,
}

/// How much later than a large image a cheap one may arrive and still start first, in multiples
/// of the large one's estimated cost: a 12 MP JPEG decoded whole (about 70 ms of one core here)
/// yields to small images for at most about 2 s, one decoded with `--jpeg-draft` (about 25 ms)
/// for 0.8 s, a 500x333 thumbnail (2 ms) for 60 ms. 8 left small images behind the photos that
/// had waited longer than half a second at 32 clients (BENCHMARKS.md).
pub const OVERTAKE_FACTOR: u32 = 32;

/// The pool's free threads and its waiters, cheapest place in line first.
#[derive(Debug)]
struct Slots {
    free: usize,
    waiting: BinaryHeap<Reverse<Waiter>>,
    arrivals: u64,
}

#[derive(Debug)]
struct Waiter {
    /// The request's priority level: a higher level is served first.
    level: Level,
    place: Instant,
    arrival: u64,
    wake: oneshot::Sender<Slot>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.level, self.place, self.arrival) == (other.level, other.place, other.arrival)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.level, self.place, self.arrival).cmp(&(other.level, other.place, other.arrival))
    }
}

/// One of the pool's threads, held by the work running on it; dropping it hands the thread to
/// the first waiter still waiting, or frees it.
#[derive(Debug)]
struct Slot {
    slots: Option<Arc<Mutex<Slots>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(slots) = self.slots.take() else {
            return;
        };
        let mut state = slots.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(Reverse(waiter)) = state.waiting.pop() {
            let handed = Slot {
                slots: Some(slots.clone()),
            };
            match waiter.wake.send(handed) {
                Ok(()) => return,
                // That waiter gave up (its request ended): disarm the slot it did not take, so
                // that dropping it does not hand the thread on a second time, and try the next.
                Err(mut unclaimed) => unclaimed.slots = None,
            }
        }
        state.free += 1;
    }
}

impl DecodePool {
    pub fn new(threads: usize) -> Self {
        Self {
            slots: Arc::new(Mutex::new(Slots {
                free: threads.max(1),
                waiting: BinaryHeap::new(),
                arrivals: 0,
            })),
        }
    }

    /// Run `work` on a blocking thread once one of the pool's threads is free, as cheap work
    /// (parsing a request body). A panic in `work` fails only this call (logged here), never the
    /// task that awaits it.
    pub async fn run<T, F>(&self, work: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.run_costing(Duration::ZERO, Level::HIGHEST, work).await
    }

    /// As [`run`](Self::run), for work estimated to take `cost` of one thread's time, for a
    /// request at priority `level`: waiting work of a higher level starts first, and within a
    /// level work that costs less may start before it (see [`DecodePool`]).
    pub async fn run_costing<T, F>(
        &self,
        cost: Duration,
        level: Level,
        work: F,
    ) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = self.slot(cost, level).await?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
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

    /// A free thread now, or a place in line ordered by arrival plus `OVERTAKE_FACTOR` x `cost`.
    async fn slot(&self, cost: Duration, level: Level) -> Result<Slot, PoolError> {
        let wait = {
            let mut state = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            // A thread is only freed when no one is waiting (a slot's drop hands it to the
            // first waiter), so a free thread means an empty line.
            if state.free > 0 {
                state.free -= 1;
                return Ok(Slot {
                    slots: Some(self.slots.clone()),
                });
            }
            let (wake, wait) = oneshot::channel();
            state.arrivals += 1;
            let waiter = Waiter {
                level,
                place: Instant::now() + cost * OVERTAKE_FACTOR,
                arrival: state.arrivals,
                wake,
            };
            state.waiting.push(Reverse(waiter));
            wait
        };
        // Every waiter is woken by a slot's drop; the sender goes away unsent only if the pool
        // itself is gone, which would be a bug, reported as one.
        wait.await.map_err(|_| PoolError)
    }
}

/// One thread's time to decode and resize an image, estimated from its size before decoding,
/// for the pool's order. Measured on the 2-vCPU EPYC (BENCHMARKS.md, "Large photos"): entropy
/// decoding costs about 11 ns per encoded byte whatever the output scale (a 2.2 MB 12 MP JPEG
/// takes 24 ms even at 1/8), and the rest (IDCT, colour conversion, resize) about 0.5 ns per
/// byte of [`decode::decode_memory`]'s estimate (7 bytes per decoded pixel).
pub fn estimated_cost(encoded_bytes: usize, decode_memory: Option<u64>) -> Duration {
    let entropy_ns = encoded_bytes as u64 * 11;
    let pixels_ns = decode_memory.unwrap_or(0) / 2;
    Duration::from_nanos(entropy_ns.saturating_add(pixels_ns))
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

    /// Occupy `pool`'s one thread until the returned sender is dropped or sent to.
    async fn occupy(pool: &DecodePool) -> std::sync::mpsc::Sender<()> {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let busy = pool.clone();
        tokio::spawn(async move {
            busy.run(move || {
                let _ = started.send(());
                let _ = hold.recv();
            })
            .await
        });
        running.await.unwrap();
        release
    }

    /// Queue work of `cost` that records `name` when it runs.
    fn queue(
        pool: &DecodePool,
        cost: Duration,
        name: &'static str,
        ran: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<(), PoolError>> {
        let (pool, ran) = (pool.clone(), ran.clone());
        tokio::spawn(async move {
            pool.run_costing(cost, Level::HIGHEST, move || ran.lock().unwrap().push(name))
                .await
        })
    }

    async fn let_tasks_queue() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn cheap_work_overtakes_large_work_that_arrived_just_before() {
        let pool = DecodePool::new(1);
        let release = occupy(&pool).await;
        let ran = Arc::new(Mutex::new(Vec::new()));
        let large = queue(&pool, Duration::from_secs(1), "large", &ran);
        let_tasks_queue().await;
        let small = queue(&pool, Duration::from_millis(1), "small", &ran);
        let_tasks_queue().await;
        drop(release);
        large.await.unwrap().unwrap();
        small.await.unwrap().unwrap();
        assert_eq!(*ran.lock().unwrap(), ["small", "large"]);
    }

    #[tokio::test]
    async fn large_work_is_overtaken_only_for_a_bounded_time() {
        let pool = DecodePool::new(1);
        let release = occupy(&pool).await;
        let ran = Arc::new(Mutex::new(Vec::new()));
        // A place in line OVERTAKE_FACTOR ms after its arrival: work arriving later comes after.
        let large = queue(&pool, Duration::from_millis(1), "large", &ran);
        tokio::time::sleep(Duration::from_millis(u64::from(OVERTAKE_FACTOR) + 40)).await;
        let small = queue(&pool, Duration::ZERO, "small", &ran);
        let_tasks_queue().await;
        drop(release);
        large.await.unwrap().unwrap();
        small.await.unwrap().unwrap();
        assert_eq!(*ran.lock().unwrap(), ["large", "small"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_the_thread() {
        let pool = DecodePool::new(1);
        let release = occupy(&pool).await;
        let ran = Arc::new(Mutex::new(Vec::new()));
        let gave_up = queue(&pool, Duration::ZERO, "gave up", &ran);
        let_tasks_queue().await;
        gave_up.abort();
        let _ = gave_up.await;
        let later = queue(&pool, Duration::from_secs(1), "later", &ran);
        let_tasks_queue().await;
        drop(release);
        tokio::time::timeout(Duration::from_secs(5), later)
            .await
            .expect("the thread was handed on")
            .unwrap()
            .unwrap();
        assert_eq!(*ran.lock().unwrap(), ["later"]);
        // And the thread is free again afterwards.
        tokio::time::timeout(Duration::from_secs(5), pool.run(|| ()))
            .await
            .expect("the thread is free")
            .unwrap();
    }

    #[test]
    fn cost_grows_with_bytes_and_pixels() {
        let thumbnail = estimated_cost(60_000, Some(500 * 333 * 7));
        let photo = estimated_cost(2_200_000, Some(4032 * 3024 * 7));
        assert!(thumbnail < Duration::from_millis(2), "{thumbnail:?}");
        assert!(
            (Duration::from_millis(50)..Duration::from_millis(80)).contains(&photo),
            "{photo:?}"
        );
    }
}
