//! The batcher task: one per model. It queues images as they arrive, applies the policy in
//! `queue.rs`, and hands batches to the model thread through a one-slot channel, so the next
//! batch is ready the moment the current one finishes.
//!
//! It also owns [`BatcherLink`], the little state the batcher shares with the two sides it
//! schedules between: admission (images on their way) and the model thread (batches running).
//! Both only call its methods; the batcher alone reads the whole picture.

use super::queue::{BatchQueue, Decision, Lane, Lanes, ModelState};
use super::{Batch, ImageJob, JobError};
use crate::metrics::ModelMetrics;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

/// What the batcher must know about a model besides its queue: shared with admission and with
/// the model thread, each of which reports through a method.
#[derive(Debug, Default)]
pub struct BatcherLink {
    /// Batches sent to the pool's model threads and not finished.
    outstanding: AtomicUsize,
    /// Batches sent to the solo copy and not finished (0 or 1).
    solo: AtomicUsize,
    /// Images admitted and still being decoded (they will be queued soon).
    incoming: AtomicUsize,
    /// Wakes the batcher when a batch finishes or incoming images are abandoned.
    wake: Notify,
    /// Recent model cost per image in microseconds, for Retry-After estimates.
    micros_per_image: AtomicU64,
    /// The model thread is being replaced: queued images are answered at once instead of
    /// waiting, possibly for minutes, for the new thread.
    restarting: std::sync::atomic::AtomicBool,
    /// The batch size the model's warm-up profile prefers (0: not known yet, use the maximum).
    batch_limit: AtomicUsize,
}

impl BatcherLink {
    /// Admission let `images` images in: the batcher may hold an idle model for them.
    pub fn images_admitted(&self, images: usize) {
        self.incoming.fetch_add(images, Ordering::AcqRel);
    }

    /// `images` admitted images were queued or abandoned: they are no longer on their way.
    pub fn images_arrived(&self, images: usize) {
        self.incoming.fetch_sub(images, Ordering::AcqRel);
        // The batcher may be holding an idle model for these images: let it re-decide.
        self.wake.notify_one();
    }

    /// A model thread of `lane` finished a batch of `images` (0 if every client had left).
    pub fn batch_finished(&self, lane: Lane, images: usize, elapsed: Duration) {
        if images > 0 {
            let per_image = elapsed.as_micros() as u64 / images as u64;
            self.micros_per_image
                .store(per_image.max(1), Ordering::Relaxed);
        }
        self.lane_count(lane).fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn lane_count(&self, lane: Lane) -> &AtomicUsize {
        match lane {
            Lane::Solo => &self.solo,
            Lane::Pool => &self.outstanding,
        }
    }

    /// The model went down (`true`) or is ready again (`false`).
    pub fn set_restarting(&self, restarting: bool) {
        self.restarting.store(restarting, Ordering::Release);
        self.wake.notify_one();
    }

    /// The model thread measured where batches stop paying off (see
    /// `queue::preferred_batch_size`).
    pub fn set_batch_limit(&self, limit: usize) {
        self.batch_limit.store(limit, Ordering::Release);
        self.wake.notify_one();
    }

    /// Recent model time per image.
    pub fn micros_per_image(&self) -> u64 {
        self.micros_per_image.load(Ordering::Relaxed).max(1)
    }

    fn model_state(&self) -> ModelState {
        ModelState {
            outstanding_batches: self.outstanding.load(Ordering::Acquire),
            solo_running: self.solo.load(Ordering::Acquire) > 0,
            images_incoming: self.incoming.load(Ordering::Acquire),
        }
    }

    fn batch_dispatched(&self, lane: Lane) {
        self.lane_count(lane).fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// The model's copies (threads) taking batches.
    pub lanes: Lanes,
    /// Top batches led by a higher priority level up with lower levels' images (on a GPU,
    /// where a fuller batch costs next to nothing more).
    pub mix_levels: bool,
}

/// The one-slot channels batches go to the model threads through: one per lane.
pub struct Handoff {
    pub pool: mpsc::Sender<Batch>,
    /// Absent unless the model has a solo copy (`Lanes::solo`).
    pub solo: Option<mpsc::Sender<Batch>>,
}

impl Handoff {
    fn lane(&self, lane: Lane) -> &mpsc::Sender<Batch> {
        match (lane, &self.solo) {
            (Lane::Solo, Some(solo)) => solo,
            _ => &self.pool,
        }
    }
}

/// Run until `closing` turns true and every queued image has been handed over (or the model
/// thread has gone, in which case the remaining images are answered with an error).
pub async fn run(
    mut jobs: mpsc::Receiver<ImageJob>,
    to_model: Handoff,
    link: Arc<BatcherLink>,
    metrics: ModelMetrics,
    config: BatcherConfig,
    mut closing: watch::Receiver<bool>,
) {
    let mut queue = BatchQueue::new(config.max_batch_size, config.max_batch_delay)
        .with_lanes(config.lanes)
        .with_level_mixing(config.mix_levels);
    let mut jobs_open = true;
    loop {
        while let Ok(job) = jobs.try_recv() {
            queue.push(job, Instant::now(), link.model_state().is_busy());
        }
        // Expired first: a request that gave up at its deadline also closed its receivers,
        // and its images should count as expired, not abandoned.
        let expired = queue.take_expired(Instant::now());
        if !expired.is_empty() {
            metrics.dropped_deadline.inc_by(expired.len() as u64);
            for job in expired {
                let _ = job.reply.send(Err(JobError::DeadlineExceeded));
            }
        }
        let dropped = queue.drop_abandoned();
        if dropped > 0 {
            metrics.dropped_client_gone.inc_by(dropped as u64);
        }
        if link.restarting.load(Ordering::Acquire) {
            for entry in queue.drain() {
                let _ = entry.item.reply.send(Err(JobError::ModelRestarting));
            }
        }
        metrics.queue_depth.set(queue.len() as i64);
        queue.set_batch_limit(link.batch_limit.load(Ordering::Acquire));

        let state = link.model_state();
        let deadline = match queue.decide(Instant::now(), state) {
            Decision::Dispatch(n, lane) => {
                tracing::debug!(
                    model = metrics.model(),
                    images = n,
                    ?lane,
                    ?state,
                    "batch dispatched"
                );
                let batch = queue.take(n);
                link.batch_dispatched(lane);
                if let Err(mpsc::error::SendError(batch)) = to_model.lane(lane).send(batch).await {
                    tracing::error!(model = metrics.model(), "model thread is gone");
                    fail_all(batch);
                    fail_all(queue.drain());
                    break;
                }
                continue;
            }
            Decision::Wait(deadline) => deadline,
        };
        if !jobs_open && queue.is_empty() {
            break;
        }
        tokio::select! {
            job = jobs.recv(), if jobs_open => match job {
                Some(job) => queue.push(job, Instant::now(), link.model_state().is_busy()),
                None => jobs_open = false,
            },
            _ = link.wake.notified() => {}
            _ = sleep_until(deadline), if deadline.is_some() => {}
            changed = closing.changed(), if jobs_open => {
                if changed.is_err() || *closing.borrow() {
                    // Refuse new images; the ones already sent are still received and run.
                    jobs.close();
                }
            }
        }
    }
    metrics.queue_depth.set(0);
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

fn fail_all(batch: Batch) {
    for entry in batch {
        let _ = entry.item.reply.send(Err(JobError::Stopped));
    }
}
