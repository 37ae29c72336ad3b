//! Model health: the heartbeat a model thread keeps while it runs a batch, and what the
//! supervisor needs to notice a wedged or crashed thread and replace it.
//!
//! A thread that hangs inside libtorch cannot be killed, only abandoned. So the replies of the
//! batch it runs are not held by the thread but parked here, in the heartbeat: when a batch
//! runs past `--batch-timeout`, the supervisor takes them, answers every image at once (503,
//! the model is restarting), retires the thread's generation and starts a new thread. If the
//! old thread ever comes back, it finds its generation retired and exits without answering
//! anyone twice.

use crate::batching::{ImagePrediction, JobError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Where one image's answer goes, and its request's span (for logs that name the request).
pub struct Reply {
    pub sender: oneshot::Sender<Result<ImagePrediction, JobError>>,
    pub span: tracing::Span,
}

/// A batch being run: by which thread generation, since when, and whom to answer.
struct RunningBatch {
    generation: u64,
    started: Instant,
    replies: Vec<Reply>,
}

/// A batch taken away from a thread that ran past the batch timeout.
pub struct Overdue {
    pub running_for: Duration,
    pub replies: Vec<Reply>,
}

/// Shared by a model's threads (each a generation) and its supervisor.
#[derive(Default)]
pub struct Heartbeat {
    /// The generation allowed to run batches; older threads must stop.
    current: AtomicU64,
    running: Mutex<Option<RunningBatch>>,
}

impl Heartbeat {
    pub fn current_generation(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Start a new generation (a new thread); the previous one is retired.
    pub fn next_generation(&self) -> u64 {
        self.current.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<RunningBatch>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread of `generation` starts a batch whose answers go to `replies`. Returns false
    /// (and hands the replies back) if that generation has been retired.
    pub fn begin(&self, generation: u64, replies: Vec<Reply>) -> Result<(), Vec<Reply>> {
        let mut running = self.running();
        if generation != self.current_generation() {
            return Err(replies);
        }
        *running = Some(RunningBatch {
            generation,
            started: Instant::now(),
            replies,
        });
        Ok(())
    }

    /// The batch of `generation` finished: its replies, or `None` if the supervisor took them
    /// (the batch ran past the timeout and was already answered).
    pub fn finish(&self, generation: u64) -> Option<Vec<Reply>> {
        let mut running = self.running();
        match running.as_ref() {
            Some(batch) if batch.generation == generation => running.take().map(|b| b.replies),
            _ => None,
        }
    }

    /// If the running batch has run for longer than `timeout`, take it and retire its
    /// generation: the caller answers the replies and starts a new thread.
    pub fn take_overdue(&self, timeout: Duration) -> Option<Overdue> {
        let mut running = self.running();
        let running_for = running.as_ref()?.started.elapsed();
        if running_for <= timeout {
            return None;
        }
        let batch = running.take()?;
        // Retire under the lock, so the thread cannot begin another batch in between.
        self.current.fetch_add(1, Ordering::AcqRel);
        Some(Overdue {
            running_for,
            replies: batch.replies,
        })
    }
}

/// Delays between restarts of a model that keeps failing: 1 s, doubling up to a minute, back
/// to 1 s once a thread has served for `HEALTHY_AFTER`.
pub struct Backoff {
    next: Duration,
}

pub const HEALTHY_AFTER: Duration = Duration::from_secs(300);
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_DELAY }
    }
}

impl Backoff {
    /// The delay before the next restart, given how long the failed thread had served.
    pub fn delay(&mut self, served_for: Duration) -> Duration {
        if served_for >= HEALTHY_AFTER {
            self.next = FIRST_DELAY;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(
        n: usize,
    ) -> (
        Vec<Reply>,
        Vec<oneshot::Receiver<Result<ImagePrediction, JobError>>>,
    ) {
        (0..n)
            .map(|_| {
                let (sender, receiver) = oneshot::channel();
                (
                    Reply {
                        sender,
                        span: tracing::Span::none(),
                    },
                    receiver,
                )
            })
            .unzip()
    }

    #[test]
    fn a_finished_batch_gives_its_replies_back() {
        let heartbeat = Heartbeat::default();
        let generation = heartbeat.next_generation();
        let (r, _rx) = replies(3);
        assert!(heartbeat.begin(generation, r).is_ok());
        assert!(heartbeat.take_overdue(Duration::from_secs(60)).is_none());
        assert_eq!(heartbeat.finish(generation).map(|r| r.len()), Some(3));
        assert!(heartbeat.finish(generation).is_none());
    }

    #[test]
    fn an_overdue_batch_is_taken_and_its_generation_retired() {
        let heartbeat = Heartbeat::default();
        let generation = heartbeat.next_generation();
        let (r, _rx) = replies(2);
        heartbeat.begin(generation, r).ok().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let overdue = heartbeat.take_overdue(Duration::from_millis(1)).unwrap();
        assert_eq!(overdue.replies.len(), 2);
        assert!(overdue.running_for >= Duration::from_millis(5));
        // The wedged thread comes back: nothing to answer, and it may not start again.
        assert!(heartbeat.finish(generation).is_none());
        let (r, _rx) = replies(1);
        assert!(heartbeat.begin(generation, r).is_err());
        // Its successor runs.
        let next = heartbeat.next_generation();
        let (r, _rx) = replies(1);
        assert!(heartbeat.begin(next, r).is_ok());
    }

    #[test]
    fn backoff_doubles_and_resets_after_healthy_service() {
        let mut backoff = Backoff::default();
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8).map(|_| backoff.delay(short).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff.delay(HEALTHY_AFTER).as_secs(), 1);
    }
}
