//! The per-model queue of preprocessed images and the batching decision, as plain state.
//!
//! The batcher task (`batcher.rs`) owns one `BatchQueue` and asks it what to do whenever
//! something changes; keeping the policy here, free of channels and clocks, lets the unit tests
//! below pin it down exactly.
//!
//! Policy (one queue entry per image, so any image can join any batch):
//! - a full batch is sent as soon as the model can take it: while every instance of the model
//!   runs a batch, the next full one waits in the one-slot hand-off, prepared. "Full" is the
//!   batch limit: `max_batch_size`, or less where the model's warm-up profile shows that larger
//!   batches stop raising its throughput (`preferred_batch_size`);
//! - an idle model (an instance with nothing to run) takes what is queued at once when nothing
//!   more is on its way;
//! - when images are still being decoded, an idle model waits for them, but never longer than
//!   `max_batch_delay` after the oldest queued image arrived;
//! - while the model is busy, a partial batch stays open so that it fills up: those images
//!   could not run sooner anyway;
//! - entries whose client has gone are dropped before they reach the model.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Something queued that may be abandoned by its client, or outlive its deadline.
pub trait Abandonable {
    fn is_abandoned(&self) -> bool;

    /// When the answer stops being useful (`None`: never).
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    pub enqueued_at: Instant,
}

/// What the model thread is doing, as the batcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelState {
    /// Batches handed to the model thread and not finished: 0 = idle, 1 = running,
    /// 2 = running with the next one waiting in the hand-off slot.
    pub outstanding_batches: usize,
    /// Images admitted for this model that are still being decoded and will be queued soon.
    pub images_incoming: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the oldest `n` entries now.
    Dispatch(usize),
    /// Nothing to send; re-decide on the next arrival, completion, or at this instant.
    Wait(Option<Instant>),
}

#[derive(Debug)]
pub struct BatchQueue<T> {
    entries: VecDeque<Queued<T>>,
    max_batch_size: usize,
    /// The size a batch stops growing at (at most `max_batch_size`).
    batch_limit: usize,
    max_batch_delay: Duration,
    /// Model instances taking batches from the hand-off: up to `instances` batches run at once,
    /// and one more waits, prepared, in the hand-off slot.
    instances: usize,
}

impl<T: Abandonable> BatchQueue<T> {
    pub fn new(max_batch_size: usize, max_batch_delay: Duration) -> Self {
        assert!(max_batch_size > 0);
        Self {
            entries: VecDeque::new(),
            max_batch_size,
            batch_limit: max_batch_size,
            max_batch_delay,
            instances: 1,
        }
    }

    /// A queue feeding `instances` copies of the model.
    pub fn with_instances(mut self, instances: usize) -> Self {
        self.instances = instances.max(1);
        self
    }

    /// Stop growing batches at `limit` images (0 or above `max_batch_size`: at the maximum).
    pub fn set_batch_limit(&mut self, limit: usize) {
        self.batch_limit = match limit {
            0 => self.max_batch_size,
            limit => limit.min(self.max_batch_size),
        };
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, item: T, now: Instant) {
        self.entries.push_back(Queued {
            item,
            enqueued_at: now,
        });
    }

    /// Remove entries whose client has gone; returns how many were dropped.
    pub fn drop_abandoned(&mut self) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| !e.item.is_abandoned());
        before - self.entries.len()
    }

    /// Remove and return the entries whose deadline has passed by `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<T> {
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for entry in self.entries.drain(..) {
            if entry.item.deadline().is_some_and(|d| d <= now) {
                expired.push(entry.item);
            } else {
                kept.push_back(entry);
            }
        }
        self.entries = kept;
        expired
    }

    pub fn decide(&self, now: Instant, model: ModelState) -> Decision {
        let Some(oldest) = self.entries.front() else {
            return Decision::Wait(None);
        };
        if model.outstanding_batches > self.instances {
            // Every instance runs a batch and the hand-off slot is taken.
            return Decision::Wait(None);
        }
        let queued = self.entries.len();
        if queued >= self.batch_limit {
            return Decision::Dispatch(self.batch_limit);
        }
        if model.outstanding_batches >= self.instances {
            // Busy: keep the batch open so it fills; it is sent when full or when the model
            // finishes (a completion triggers a new decision).
            return Decision::Wait(None);
        }
        if model.images_incoming == 0 {
            return Decision::Dispatch(queued);
        }
        let deadline = oldest.enqueued_at + self.max_batch_delay;
        if now >= deadline {
            Decision::Dispatch(queued)
        } else {
            Decision::Wait(Some(deadline))
        }
    }

    /// Take the oldest `n` entries, in arrival order.
    pub fn take(&mut self, n: usize) -> Vec<Queued<T>> {
        let n = n.min(self.entries.len());
        self.entries.drain(..n).collect()
    }

    /// Take everything, for shutdown paths that must answer every entry.
    pub fn drain(&mut self) -> Vec<Queued<T>> {
        self.entries.drain(..).collect()
    }
}

/// Throughputs within this fraction of the best are as good as the best.
pub const PLATEAU: f64 = 0.97;

/// Where a batch should stop growing, from a throughput profile of `(batch size, images/s)`
/// ordered by batch size (`None` for an empty profile): the smallest size from which every
/// larger size is within [`PLATEAU`] of the best, i.e. where throughput has stopped rising
/// (larger batches would only add latency: every image of a batch waits for the whole batch).
/// Without such a plateau, the largest size.
///
/// Only a plateau is acted on, never a fall: a warm-up on a busy host (another server starting
/// beside this one, a noisy neighbour) slows the long runs of large batches more than the short
/// ones, so an apparent fall past some size is more often a disturbed timing than a real one,
/// and capping batches on it would cost throughput for the life of the process. A false
/// plateau needs every larger size to look as fast as the best, which noise rarely fakes.
pub fn preferred_batch_size(profile: &[(usize, f64)]) -> Option<usize> {
    let best = profile.iter().map(|p| p.1).fold(f64::NAN, f64::max);
    let plateau = (0..profile.len()).find(|&i| profile[i..].iter().all(|p| p.1 >= best * PLATEAU));
    // No plateau means the largest size is not within PLATEAU of the best: a fall, ignored.
    plateau
        .or(profile.len().checked_sub(1))
        .map(|i| profile[i].0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Debug)]
    struct Job {
        id: usize,
        gone: Rc<Cell<bool>>,
        deadline: Option<Instant>,
    }

    impl Abandonable for Job {
        fn is_abandoned(&self) -> bool {
            self.gone.get()
        }

        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
    }

    fn job(id: usize) -> Job {
        Job {
            id,
            gone: Rc::new(Cell::new(false)),
            deadline: None,
        }
    }

    #[test]
    fn expired_entries_are_taken_out_in_order() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, DELAY);
        for (id, deadline) in [
            (0, None),
            (1, Some(t0)),
            (2, Some(t0 + DELAY)),
            (3, Some(t0)),
        ] {
            q.push(
                Job {
                    deadline,
                    ..job(id)
                },
                t0,
            );
        }
        let expired: Vec<usize> = q.take_expired(t0).iter().map(|j| j.id).collect();
        assert_eq!(expired, [1, 3]);
        assert_eq!(q.len(), 2);
        assert!(q.take_expired(t0).is_empty());
        let later: Vec<usize> = q.take_expired(t0 + DELAY).iter().map(|j| j.id).collect();
        assert_eq!(later, [2]);
        assert_eq!(q.take(1)[0].item.id, 0);
    }

    const IDLE: ModelState = ModelState {
        outstanding_batches: 0,
        images_incoming: 0,
    };
    const DELAY: Duration = Duration::from_millis(5);

    fn queue_with(n: usize, now: Instant) -> BatchQueue<Job> {
        let mut q = BatchQueue::new(4, DELAY);
        for i in 0..n {
            q.push(job(i), now);
        }
        q
    }

    #[test]
    fn empty_queue_waits_without_deadline() {
        let q = queue_with(0, Instant::now());
        assert_eq!(q.decide(Instant::now(), IDLE), Decision::Wait(None));
    }

    #[test]
    fn idle_model_with_nothing_incoming_runs_at_once() {
        let now = Instant::now();
        let q = queue_with(1, now);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1));
    }

    #[test]
    fn idle_model_waits_for_images_still_decoding_until_the_deadline() {
        let t0 = Instant::now();
        let q = queue_with(2, t0);
        let state = ModelState {
            outstanding_batches: 0,
            images_incoming: 3,
        };
        assert_eq!(q.decide(t0, state), Decision::Wait(Some(t0 + DELAY)));
        assert_eq!(q.decide(t0 + DELAY, state), Decision::Dispatch(2));
    }

    #[test]
    fn deadline_counts_from_the_oldest_entry() {
        let t0 = Instant::now();
        let mut q = queue_with(1, t0);
        q.push(job(9), t0 + Duration::from_millis(4));
        let state = ModelState {
            outstanding_batches: 0,
            images_incoming: 1,
        };
        assert_eq!(
            q.decide(t0 + Duration::from_millis(4), state),
            Decision::Wait(Some(t0 + DELAY))
        );
    }

    #[test]
    fn full_batch_goes_even_while_images_are_incoming() {
        let now = Instant::now();
        let q = queue_with(6, now);
        let state = ModelState {
            outstanding_batches: 0,
            images_incoming: 10,
        };
        assert_eq!(q.decide(now, state), Decision::Dispatch(4));
    }

    #[test]
    fn busy_model_gets_only_full_batches_prefetched() {
        let now = Instant::now();
        let busy = ModelState {
            outstanding_batches: 1,
            images_incoming: 0,
        };
        assert_eq!(
            queue_with(3, now).decide(now + DELAY * 10, busy),
            Decision::Wait(None)
        );
        assert_eq!(queue_with(4, now).decide(now, busy), Decision::Dispatch(4));
    }

    #[test]
    fn batches_stop_at_the_preferred_size() {
        let now = Instant::now();
        let mut q = queue_with(4, now);
        q.set_batch_limit(3);
        let busy = ModelState {
            outstanding_batches: 1,
            images_incoming: 5,
        };
        assert_eq!(q.decide(now, busy), Decision::Dispatch(3));
        q.set_batch_limit(0);
        assert_eq!(q.decide(now, busy), Decision::Dispatch(4));
        q.set_batch_limit(9);
        assert_eq!(q.decide(now, busy), Decision::Dispatch(4));
    }

    #[test]
    fn an_idle_instance_takes_a_partial_batch() {
        let now = Instant::now();
        let q = queue_with(3, now).with_instances(2);
        let one_running = ModelState {
            outstanding_batches: 1,
            images_incoming: 0,
        };
        assert_eq!(q.decide(now, one_running), Decision::Dispatch(3));
        let both_running = ModelState {
            outstanding_batches: 2,
            images_incoming: 0,
        };
        assert_eq!(q.decide(now, both_running), Decision::Wait(None));
        let slot_taken = ModelState {
            outstanding_batches: 3,
            images_incoming: 0,
        };
        assert_eq!(
            queue_with(8, now).with_instances(2).decide(now, slot_taken),
            Decision::Wait(None)
        );
    }

    #[test]
    fn preferred_batch_size_is_where_throughput_stops_rising() {
        // Lite0-like on 2 cores: throughput keeps rising to 8.
        let rising = [(1, 80.0), (2, 100.0), (4, 125.0), (8, 144.0)];
        assert_eq!(preferred_batch_size(&rising), Some(8));
        // A GPU-like profile that saturates at 16: 32 is within 3 % and only adds latency.
        let plateau = [
            (1, 300.0),
            (8, 2000.0),
            (16, 3000.0),
            (24, 2960.0),
            (32, 3050.0),
        ];
        assert_eq!(preferred_batch_size(&plateau), Some(16));
        // A fall past some size is not acted on (more likely a disturbed timing).
        let falling = [(1, 50.0), (2, 90.0), (4, 85.0), (8, 60.0)];
        assert_eq!(preferred_batch_size(&falling), Some(8));
        // One lucky small batch in a rising profile is noise, not a plateau.
        let noisy = [(1, 80.0), (2, 140.0), (3, 110.0), (4, 120.0), (8, 136.0)];
        assert_eq!(preferred_batch_size(&noisy), Some(8));
        // One thread per instance: batching barely raises throughput, so images run at once.
        let flat = [(1, 40.0), (2, 40.5), (4, 41.0), (8, 40.8)];
        assert_eq!(preferred_batch_size(&flat), Some(1));
        assert_eq!(preferred_batch_size(&[(1, 10.0)]), Some(1));
        assert_eq!(preferred_batch_size(&[]), None);
    }

    #[test]
    fn full_hand_off_slot_blocks_dispatch() {
        let now = Instant::now();
        let full = ModelState {
            outstanding_batches: 2,
            images_incoming: 0,
        };
        assert_eq!(queue_with(8, now).decide(now, full), Decision::Wait(None));
    }

    #[test]
    fn take_keeps_arrival_order_and_never_exceeds_the_queue() {
        let mut q = queue_with(6, Instant::now());
        let ids: Vec<usize> = q.take(4).into_iter().map(|e| e.item.id).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(q.take(10).len(), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn abandoned_entries_are_dropped() {
        let mut q = queue_with(0, Instant::now());
        let gone = job(1);
        gone.gone.set(true);
        q.push(job(0), Instant::now());
        q.push(gone, Instant::now());
        q.push(job(2), Instant::now());
        assert_eq!(q.drop_abandoned(), 1);
        let ids: Vec<usize> = q.drain().into_iter().map(|e| e.item.id).collect();
        assert_eq!(ids, vec![0, 2]);
    }
}
