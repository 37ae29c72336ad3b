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
//! - entries whose client has gone are dropped before they reach the model;
//! - with a solo copy (`--instances auto`, [`Lanes::solo`]), a batch none of whose images had
//!   to wait for the model runs on the solo copy, which has every intra-op thread: a lone
//!   request gets the whole machine. Once images queue behind running batches, batches go to
//!   the pool of copies with a share of the threads each, which run side by side without the
//!   threads of one operator waiting for each other. The two lanes never run at once, so
//!   their threads never outnumber the cores;
//! - with priority levels (`crate::priority`), entries are kept in level order, arrival order
//!   within a level, so a batch fills from the highest level first. On a CPU a batch holds one
//!   level: a batch's time grows with its size there, and topping a high-priority image's
//!   batch up with low-priority images would make it wait for all of them (on a GPU, where a
//!   fuller batch costs next to nothing more, batches are topped up: `with_level_mixing`).
//!   And only a batch led by the highest level waits prepared in the hand-off slot while every
//!   copy runs: a batch of lower levels placed there would run before a high-priority image
//!   that arrives a moment later, which would then wait for two batches instead of one.

use crate::priority::Level;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Something queued that may be abandoned by its client, or outlive its deadline.
pub trait Abandonable {
    fn is_abandoned(&self) -> bool;

    /// When the answer stops being useful (`None`: never).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Its priority level: batches fill from the highest first.
    fn level(&self) -> Level {
        Level::HIGHEST
    }
}

#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    pub enqueued_at: Instant,
    /// This image waited for a running batch (it arrived while one ran, or a batch left
    /// without it): the server is loaded.
    pub waited: bool,
}

/// Which copies of a model a batch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The copy with every intra-op thread, for batches that arrive at an idle model.
    Solo,
    /// The copies that run side by side, each with a share of the threads.
    Pool,
}

/// The copies of a model the batcher feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    /// A solo copy runs batches that arrive at an idle model (`--instances auto`).
    pub solo: bool,
    /// Copies that take batches from the shared hand-off (`--instances N`: N).
    pub pool: usize,
}

impl Lanes {
    /// `n` interchangeable copies.
    pub const fn pool(n: usize) -> Self {
        Self {
            solo: false,
            pool: n,
        }
    }
}

/// What the model threads are doing, as the batcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelState {
    /// Batches handed to the pool and not finished: 0 = idle, `pool` = every copy running,
    /// one more = the next batch waiting in the hand-off slot.
    pub outstanding_batches: usize,
    /// The solo copy has a batch (it then holds every core: nothing else is sent).
    pub solo_running: bool,
    /// Images admitted for this model that are still being decoded and will be queued soon.
    pub images_incoming: usize,
}

impl ModelState {
    /// Some copy is running a batch.
    pub fn is_busy(&self) -> bool {
        self.solo_running || self.outstanding_batches > 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the oldest `n` entries now, to this lane.
    Dispatch(usize, Lane),
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
    /// The copies taking batches: up to `lanes.pool` pool batches run at once and one more
    /// waits, prepared, in the hand-off slot; a solo batch runs alone.
    lanes: Lanes,
    /// A batch may hold images of several priority levels.
    mix_levels: bool,
}

impl<T: Abandonable> BatchQueue<T> {
    pub fn new(max_batch_size: usize, max_batch_delay: Duration) -> Self {
        assert!(max_batch_size > 0);
        Self {
            entries: VecDeque::new(),
            max_batch_size,
            batch_limit: max_batch_size,
            max_batch_delay,
            lanes: Lanes::pool(1),
            mix_levels: true,
        }
    }

    /// Let a batch led by one priority level be topped up with lower levels' images (else a
    /// batch holds one level).
    pub fn with_level_mixing(mut self, mix: bool) -> Self {
        self.mix_levels = mix;
        self
    }

    /// The entries the next batch may take: all of them, or those of the front's level when
    /// a batch holds one level.
    fn batchable(&self) -> usize {
        match (self.entries.front(), self.entries.back()) {
            (Some(front), Some(back))
                if !self.mix_levels && front.item.level() != back.item.level() =>
            {
                let level = front.item.level();
                self.entries.partition_point(|e| e.item.level() <= level)
            }
            _ => self.entries.len(),
        }
    }

    /// A queue feeding these copies of the model.
    pub fn with_lanes(mut self, lanes: Lanes) -> Self {
        self.lanes = Lanes {
            solo: lanes.solo,
            pool: lanes.pool.max(1),
        };
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

    /// Queue `item`, which arrived at `now` while the model was `busy` (running a batch) or not:
    /// after every entry of its level and above, before those of lower levels.
    pub fn push(&mut self, item: T, now: Instant, busy: bool) {
        let level = item.level();
        let entry = Queued {
            item,
            enqueued_at: now,
            waited: busy,
        };
        if self
            .entries
            .back()
            .is_none_or(|last| last.item.level() <= level)
        {
            self.entries.push_back(entry);
        } else {
            let at = self.entries.partition_point(|e| e.item.level() <= level);
            self.entries.insert(at, entry);
        }
    }

    /// When the longest-waiting entry arrived: the front one, unless levels reordered them.
    fn oldest_arrival(&self) -> Option<Instant> {
        let (front, back) = (self.entries.front()?, self.entries.back()?);
        if front.item.level() == back.item.level() {
            return Some(front.enqueued_at);
        }
        self.entries.iter().map(|e| e.enqueued_at).min()
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
        let Some(first) = self.entries.front() else {
            return Decision::Wait(None);
        };
        if model.solo_running {
            // The solo copy holds every core; its completion triggers a new decision.
            return Decision::Wait(None);
        }
        let lane = self.lane_for_next_batch(model);
        let (running, copies) = match lane {
            Lane::Solo => (0, 1),
            Lane::Pool => (model.outstanding_batches, self.lanes.pool),
        };
        if running > copies {
            // Every copy runs a batch and the hand-off slot is taken.
            return Decision::Wait(None);
        }
        if running == copies && first.item.level() > Level::HIGHEST {
            // Only the highest level waits ahead in the hand-off slot (see the module notes).
            return Decision::Wait(None);
        }
        let queued = self.batchable();
        if queued >= self.batch_limit {
            return Decision::Dispatch(self.batch_limit, lane);
        }
        if running >= copies {
            // Busy: keep the batch open so it fills; it is sent when full or when the model
            // finishes (a completion triggers a new decision).
            return Decision::Wait(None);
        }
        if model.images_incoming == 0 {
            return Decision::Dispatch(queued, lane);
        }
        let oldest = self.oldest_arrival().unwrap_or(first.enqueued_at);
        let deadline = oldest + self.max_batch_delay;
        if now >= deadline {
            Decision::Dispatch(queued, lane)
        } else {
            Decision::Wait(Some(deadline))
        }
    }

    /// The solo copy while the server is not loaded (the pool is idle, no other image is on
    /// its way, and no image of the next batch has waited for a running one), else the pool.
    /// When several clients keep the pool busy, the moment it runs dry their next images are
    /// still being decoded: without the `images_incoming` test such a moment would send a
    /// batch solo and hold every other image back until it finished.
    fn lane_for_next_batch(&self, model: ModelState) -> Lane {
        let loaded = model.outstanding_batches > 0
            || model.images_incoming > 0
            || self.entries.iter().take(self.batch_limit).any(|e| e.waited);
        if self.lanes.solo && !loaded {
            Lane::Solo
        } else {
            Lane::Pool
        }
    }

    /// Take the oldest `n` entries, in arrival order, to run them: the others now wait for
    /// that batch.
    pub fn take(&mut self, n: usize) -> Vec<Queued<T>> {
        let n = n.min(self.entries.len());
        let batch = self.entries.drain(..n).collect();
        for entry in &mut self.entries {
            entry.waited = true;
        }
        batch
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
        level: Level,
    }

    impl Abandonable for Job {
        fn is_abandoned(&self) -> bool {
            self.gone.get()
        }

        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }

        fn level(&self) -> Level {
            self.level
        }
    }

    fn job(id: usize) -> Job {
        Job {
            id,
            gone: Rc::new(Cell::new(false)),
            deadline: None,
            level: Level::HIGHEST,
        }
    }

    fn job_at(id: usize, level: u64) -> Job {
        Job {
            level: Level::from_number(level).unwrap(),
            ..job(id)
        }
    }

    fn ids(batch: &[Queued<Job>]) -> Vec<usize> {
        batch.iter().map(|e| e.item.id).collect()
    }

    #[test]
    fn batches_fill_from_the_highest_level_first() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(3, DELAY);
        for (id, level) in [(0, 2), (1, 3), (2, 1), (3, 2), (4, 1), (5, 3)] {
            q.push(job_at(id, level), t0, false);
        }
        assert_eq!(ids(&q.take(3)), [2, 4, 0]);
        assert_eq!(ids(&q.take(3)), [3, 1, 5]);
    }

    #[test]
    fn without_level_mixing_a_batch_holds_one_level() {
        let t0 = Instant::now();
        let idle = ModelState {
            outstanding_batches: 0,
            solo_running: false,
            images_incoming: 0,
        };
        let mut q = BatchQueue::new(4, DELAY).with_level_mixing(false);
        for (id, level) in [(0, 2), (1, 2), (2, 1), (3, 2), (4, 2), (5, 2)] {
            q.push(job_at(id, level), t0, false);
        }
        assert_eq!(q.decide(t0, idle), Decision::Dispatch(1, Lane::Pool));
        assert_eq!(ids(&q.take(1)), [2]);
        assert_eq!(q.decide(t0, idle), Decision::Dispatch(4, Lane::Pool));
    }

    #[test]
    fn only_the_highest_level_waits_in_the_hand_off_slot() {
        let t0 = Instant::now();
        let every_copy_busy = ModelState {
            outstanding_batches: 1,
            solo_running: false,
            images_incoming: 0,
        };
        let mut q = BatchQueue::new(2, DELAY);
        q.push(job_at(0, 2), t0, true);
        q.push(job_at(1, 2), t0, true);
        assert_eq!(q.decide(t0, every_copy_busy), Decision::Wait(None));
        q.push(job_at(2, 1), t0, true);
        assert_eq!(
            q.decide(t0, every_copy_busy),
            Decision::Dispatch(2, Lane::Pool)
        );
        assert_eq!(ids(&q.take(2)), [2, 0]);
    }

    #[test]
    fn the_batch_delay_counts_from_the_oldest_image_of_any_level() {
        let t0 = Instant::now();
        let idle_with_more_coming = ModelState {
            outstanding_batches: 0,
            solo_running: false,
            images_incoming: 1,
        };
        let mut q = BatchQueue::new(4, DELAY);
        q.push(job_at(0, 2), t0, false);
        q.push(job_at(1, 1), t0 + DELAY / 2, false);
        assert_eq!(
            q.decide(t0, idle_with_more_coming),
            Decision::Wait(Some(t0 + DELAY))
        );
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
                false,
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
        solo_running: false,
        images_incoming: 0,
    };
    const DELAY: Duration = Duration::from_millis(5);

    fn queue_with(n: usize, now: Instant) -> BatchQueue<Job> {
        let mut q = BatchQueue::new(4, DELAY);
        for i in 0..n {
            q.push(job(i), now, false);
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
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1, Lane::Pool));
    }

    #[test]
    fn idle_model_waits_for_images_still_decoding_until_the_deadline() {
        let t0 = Instant::now();
        let q = queue_with(2, t0);
        let state = ModelState {
            outstanding_batches: 0,
            images_incoming: 3,
            ..IDLE
        };
        assert_eq!(q.decide(t0, state), Decision::Wait(Some(t0 + DELAY)));
        assert_eq!(
            q.decide(t0 + DELAY, state),
            Decision::Dispatch(2, Lane::Pool)
        );
    }

    #[test]
    fn deadline_counts_from_the_oldest_entry() {
        let t0 = Instant::now();
        let mut q = queue_with(1, t0);
        q.push(job(9), t0 + Duration::from_millis(4), false);
        let state = ModelState {
            outstanding_batches: 0,
            images_incoming: 1,
            ..IDLE
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
            ..IDLE
        };
        assert_eq!(q.decide(now, state), Decision::Dispatch(4, Lane::Pool));
    }

    #[test]
    fn busy_model_gets_only_full_batches_prefetched() {
        let now = Instant::now();
        let busy = ModelState {
            outstanding_batches: 1,
            images_incoming: 0,
            ..IDLE
        };
        assert_eq!(
            queue_with(3, now).decide(now + DELAY * 10, busy),
            Decision::Wait(None)
        );
        assert_eq!(
            queue_with(4, now).decide(now, busy),
            Decision::Dispatch(4, Lane::Pool)
        );
    }

    #[test]
    fn batches_stop_at_the_preferred_size() {
        let now = Instant::now();
        let mut q = queue_with(4, now);
        q.set_batch_limit(3);
        let busy = ModelState {
            outstanding_batches: 1,
            images_incoming: 5,
            ..IDLE
        };
        assert_eq!(q.decide(now, busy), Decision::Dispatch(3, Lane::Pool));
        q.set_batch_limit(0);
        assert_eq!(q.decide(now, busy), Decision::Dispatch(4, Lane::Pool));
        q.set_batch_limit(9);
        assert_eq!(q.decide(now, busy), Decision::Dispatch(4, Lane::Pool));
    }

    #[test]
    fn an_idle_instance_takes_a_partial_batch() {
        let now = Instant::now();
        let q = queue_with(3, now).with_lanes(Lanes::pool(2));
        let one_running = ModelState {
            outstanding_batches: 1,
            images_incoming: 0,
            ..IDLE
        };
        assert_eq!(
            q.decide(now, one_running),
            Decision::Dispatch(3, Lane::Pool)
        );
        let both_running = ModelState {
            outstanding_batches: 2,
            images_incoming: 0,
            ..IDLE
        };
        assert_eq!(q.decide(now, both_running), Decision::Wait(None));
        let slot_taken = ModelState {
            outstanding_batches: 3,
            images_incoming: 0,
            ..IDLE
        };
        assert_eq!(
            queue_with(8, now)
                .with_lanes(Lanes::pool(2))
                .decide(now, slot_taken),
            Decision::Wait(None)
        );
    }

    const AUTO: Lanes = Lanes {
        solo: true,
        pool: 2,
    };

    #[test]
    fn a_lone_request_runs_on_the_solo_copy() {
        let now = Instant::now();
        let q = queue_with(1, now).with_lanes(AUTO);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1, Lane::Solo));
    }

    #[test]
    fn images_on_their_way_mean_load() {
        let now = Instant::now();
        let q = queue_with(1, now).with_lanes(AUTO);
        // Other images are still decoding: they are waited for as usual, then the batch goes
        // to the pool, where the next one can run beside it.
        let incoming = ModelState {
            images_incoming: 2,
            ..IDLE
        };
        assert_eq!(q.decide(now, incoming), Decision::Wait(Some(now + DELAY)));
        assert_eq!(
            q.decide(now + DELAY, incoming),
            Decision::Dispatch(1, Lane::Pool)
        );
        assert_eq!(
            queue_with(4, now).with_lanes(AUTO).decide(now, incoming),
            Decision::Dispatch(4, Lane::Pool)
        );
    }

    #[test]
    fn nothing_runs_beside_the_solo_copy() {
        let now = Instant::now();
        let solo = ModelState {
            solo_running: true,
            ..IDLE
        };
        // Not even a full batch: the solo copy's threads hold every core.
        let mut q = queue_with(0, now).with_lanes(AUTO);
        for i in 0..8 {
            q.push(job(i), now, true);
        }
        assert_eq!(q.decide(now + DELAY * 10, solo), Decision::Wait(None));
        // Once it finishes, images that waited for it go to the pool.
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(4, Lane::Pool));
    }

    #[test]
    fn under_load_batches_go_to_the_pool_side_by_side() {
        let now = Instant::now();
        let mut q = queue_with(0, now).with_lanes(AUTO);
        q.push(job(0), now, true);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1, Lane::Pool));
        // A pool copy is running: even images that arrived at an idle moment join the pool,
        // on the other copy, at once.
        let one_running = ModelState {
            outstanding_batches: 1,
            ..IDLE
        };
        let q = queue_with(2, now).with_lanes(AUTO);
        assert_eq!(
            q.decide(now, one_running),
            Decision::Dispatch(2, Lane::Pool)
        );
        let both_running = ModelState {
            outstanding_batches: 2,
            ..IDLE
        };
        assert_eq!(q.decide(now, both_running), Decision::Wait(None));
        assert_eq!(
            queue_with(4, now)
                .with_lanes(AUTO)
                .decide(now, both_running),
            Decision::Dispatch(4, Lane::Pool)
        );
    }

    #[test]
    fn only_the_images_of_the_next_batch_decide_its_lane() {
        let now = Instant::now();
        let mut q = queue_with(3, now).with_lanes(AUTO);
        q.push(job(9), now, true);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(4, Lane::Pool));
        // With batches of 3, the fourth image, which waited, is not in the next batch.
        q.set_batch_limit(3);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(3, Lane::Solo));
    }

    #[test]
    fn images_left_behind_by_a_solo_batch_go_to_the_pool() {
        let now = Instant::now();
        // A burst at an idle model, in batches of one: the first runs solo, the rest waited.
        let mut q = queue_with(3, now).with_lanes(AUTO);
        q.set_batch_limit(1);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1, Lane::Solo));
        q.take(1);
        assert_eq!(q.decide(now, IDLE), Decision::Dispatch(1, Lane::Pool));
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
            ..IDLE
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
        q.push(job(0), Instant::now(), false);
        q.push(gone, Instant::now(), false);
        q.push(job(2), Instant::now(), false);
        assert_eq!(q.drop_abandoned(), 1);
        let ids: Vec<usize> = q.drain().into_iter().map(|e| e.item.id).collect();
        assert_eq!(ids, vec![0, 2]);
    }
}
