//! The batcher task: one per model. It queues images as they arrive, applies the policy in
//! `queue.rs`, and hands batches to the model thread through a one-slot channel, so the next
//! batch is ready the moment the current one finishes.

use super::queue::{BatchQueue, Decision, ModelState};
use super::{Batch, BatcherLink, ImageJob, InferenceError};
use crate::metrics::ModelMetrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
}

/// Run until `closing` turns true and every queued image has been handed over (or the model
/// thread has gone, in which case the remaining images are answered with an error).
pub async fn run(
    mut jobs: mpsc::Receiver<ImageJob>,
    to_model: mpsc::Sender<Batch>,
    link: Arc<BatcherLink>,
    metrics: ModelMetrics,
    config: BatcherConfig,
    mut closing: watch::Receiver<bool>,
) {
    let mut queue = BatchQueue::new(config.max_batch_size, config.max_batch_delay);
    let mut jobs_open = true;
    loop {
        while let Ok(job) = jobs.try_recv() {
            queue.push(job, Instant::now());
        }
        let dropped = queue.drop_abandoned();
        if dropped > 0 {
            metrics.dropped_client_gone.inc_by(dropped as u64);
        }
        metrics.queue_depth.set(queue.len() as i64);

        let state = ModelState {
            outstanding_batches: link.outstanding.load(Ordering::Acquire),
            images_incoming: link.incoming.load(Ordering::Acquire),
        };
        let deadline = match queue.decide(Instant::now(), state) {
            Decision::Dispatch(n) => {
                let batch = queue.take(n);
                link.outstanding.fetch_add(1, Ordering::AcqRel);
                if let Err(mpsc::error::SendError(batch)) = to_model.send(batch).await {
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
                Some(job) => queue.push(job, Instant::now()),
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
        let _ = entry.item.reply.send(Err(InferenceError::Stopped));
    }
}
