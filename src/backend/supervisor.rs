//! The supervisor of one model: starts its thread, watches its heartbeat, and replaces it
//! when a batch runs past `--batch-timeout` or the thread panics.
//!
//! Replacing means: the model turns not ready (`/health/ready` 503, `visionserve_model_ready`
//! 0, `visionserve_model_restarts_total` + 1, an error log naming each request of the batch),
//! the batch's requests are answered at once (503 when it wedged, 500 when it panicked), and
//! after a backoff (1 s doubling to 60 s) a fresh thread loads and warms the model up, then
//! turns it ready again. A wedged thread cannot be killed: it is abandoned with its copy of
//! the model, and exits if it ever returns. A model that fails to load at start-up is not
//! retried: the server stops with the reason.

use super::health::Backoff;
use super::worker::{self, answer_all, panic_message, Exit, WorkerContext};
use super::LoadOutcome;
use crate::batching::JobError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// The current generation's thread, for `ModelHandle::join`.
pub type ThreadSlot = Arc<Mutex<Option<JoinHandle<()>>>>;

pub struct Supervisor {
    pub ctx: Arc<WorkerContext>,
    pub batch_timeout: Duration,
    pub thread: ThreadSlot,
    pub closing: watch::Receiver<bool>,
}

impl Supervisor {
    /// Run until the model stops for good. The first load's outcome goes to `first_load`.
    pub async fn run(mut self, first_load: oneshot::Sender<Result<(), String>>) {
        let name = self.ctx.spec.name.clone();
        let mut first_load = Some(first_load);
        let mut backoff = Backoff::default();
        loop {
            let generation = self.ctx.heartbeat.next_generation();
            let (loaded, exited) = match self.start(generation) {
                Ok(channels) => channels,
                Err(e) => {
                    let message = format!("cannot start the model thread: {e}");
                    self.fail(first_load.take(), message);
                    return;
                }
            };
            let load = loaded
                .await
                .unwrap_or_else(|_| Err("the model thread exited while loading".into()));
            let served_since = Instant::now();
            let reason = match (load, first_load.take()) {
                (Ok(()), Some(first)) => {
                    let _ = first.send(Ok(()));
                    self.watch(generation, exited).await
                }
                (Ok(()), None) => {
                    tracing::info!(model = %name, generation, "model thread replaced; ready again");
                    self.watch(generation, exited).await
                }
                (Err(message), Some(first)) => {
                    self.fail(Some(first), message);
                    return;
                }
                (Err(message), None) => {
                    let reason = format!("reloading failed: {message}");
                    self.not_ready(&reason);
                    Some(reason)
                }
            };
            let Some(reason) = reason else {
                return;
            };
            let delay = backoff.delay(served_since.elapsed());
            tracing::error!(
                model = %name,
                reason = %reason,
                restart_in_s = delay.as_secs_f64(),
                "model not ready: restarting its thread"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.closing.wait_for(|closing| *closing) => return,
            }
        }
    }

    /// Spawn the thread of `generation`; returns its load outcome and its exit.
    fn start(&self, generation: u64) -> std::io::Result<(LoadOutcome, oneshot::Receiver<Exit>)> {
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        let ctx = self.ctx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("model-{}", ctx.spec.name))
            .spawn(move || {
                let exit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::run(&ctx, generation, loaded_tx)
                }))
                .unwrap_or_else(|panic| Exit::Panicked(panic_message(&panic)));
                let _ = exit_tx.send(exit);
            })?;
        // A previous, wedged thread's handle is dropped here: it is detached, not joined.
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok((loaded_rx, exit_rx))
    }

    /// Watch a serving thread until it exits or wedges. Returns why it must be replaced, or
    /// `None` when it stopped because the model is shutting down.
    async fn watch(&self, generation: u64, mut exited: oneshot::Receiver<Exit>) -> Option<String> {
        let tick =
            (self.batch_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                exit = &mut exited => {
                    let exit = exit.unwrap_or_else(|_| Exit::Panicked("the thread vanished".into()));
                    return self.after_exit(generation, exit);
                }
                _ = ticks.tick() => {
                    if let Some(reason) = self.take_overdue_batch() {
                        return Some(reason);
                    }
                }
            }
        }
    }

    /// A batch ran past the timeout: answer its images now (503) and give up on the thread.
    fn take_overdue_batch(&self) -> Option<String> {
        let overdue = self.ctx.heartbeat.take_overdue(self.batch_timeout)?;
        let images = overdue.replies.len();
        let reason = format!(
            "a batch of {images} images ran for {:.1} s, past --batch-timeout ({:.1} s)",
            overdue.running_for.as_secs_f64(),
            self.batch_timeout.as_secs_f64()
        );
        // Not ready before anyone hears about it: a client that got its 503 and asks
        // /health/ready must see the model not ready.
        self.not_ready(&reason);
        for reply in &overdue.replies {
            reply.span.in_scope(|| {
                tracing::error!(model = %self.ctx.spec.name, error = %reason, "model wedged: answering 503");
            });
        }
        answer_all(overdue.replies, JobError::ModelRestarting);
        self.ctx.metrics.batch_failed(images, overdue.running_for);
        self.ctx.metrics.restarts_batch_timeout.inc();
        // The batcher counts the batch as running until told otherwise.
        self.ctx
            .link
            .batch_finished(self.ctx.lane, 0, Duration::ZERO);
        Some(reason)
    }

    fn after_exit(&self, generation: u64, exit: Exit) -> Option<String> {
        match exit {
            Exit::Closed => None,
            Exit::Retired => {
                let reason = "the model thread was retired".to_owned();
                self.not_ready(&reason);
                Some(reason)
            }
            Exit::Panicked(message) => {
                let reason = format!("the model thread panicked: {message}");
                self.not_ready(&reason);
                // Replies the thread parked but never answered (it panicked outside the model
                // call; it has told the batcher the batch is over).
                if let Some(replies) = self.ctx.heartbeat.finish(generation) {
                    answer_all(replies, JobError::Failed);
                }
                self.ctx.metrics.restarts_panic.inc();
                Some(reason)
            }
        }
    }

    /// The model stops taking requests until a new thread is ready.
    fn not_ready(&self, reason: &str) {
        self.ctx.status.set_restarting(reason.to_owned());
        self.ctx.status.count_restart();
        self.ctx.link.set_restarting(true);
        self.ctx.metrics.ready.set(0);
    }

    /// The model could not be (re)started at all.
    fn fail(&self, first_load: Option<oneshot::Sender<Result<(), String>>>, message: String) {
        self.ctx.status.set_failed(message.clone());
        self.ctx.metrics.ready.set(0);
        match first_load {
            Some(first) => {
                let _ = first.send(Err(message));
            }
            None => tracing::error!(model = %self.ctx.spec.name, error = %message, "model failed"),
        }
    }
}
