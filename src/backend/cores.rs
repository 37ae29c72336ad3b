//! The CPU cores that the model threads of every model served by the process take turns for.
//!
//! Each model's batcher already keeps its own copies from running more threads than there are
//! cores (`--instances auto` never runs its solo and pool copies at once). Across models nothing
//! did: three models with two intra-op threads each ran six threads on two cores whenever their
//! batches overlapped. libtorch's OpenMP teams wait for each other at the end of every parallel
//! region, so a team that loses a core to another model's team stalls at each layer until its
//! thread is scheduled again, and both batches end up slower than the two run one after the
//! other.
//!
//! The [`CoreArbiter`] is one process-wide count of free cores. A model thread takes a
//! [`CoreLease`] for its intra-op threads before it runs a batch (and each warm-up batch) and
//! gives it back when the batch is done. Leases are granted strictly in arrival order: a batch
//! that needs every core is not starved by a stream of one-thread batches slipping past it,
//! and no model can keep the others waiting for longer than the batches queued before theirs.
//! A batch never waits while its own model is the only one running, so a one-model server pays
//! one uncontended lock per batch.
//!
//! A lease that is never given back would stop every model. The lease of a batch that runs past
//! `--batch-timeout` is therefore dropped with the batch's replies when the supervisor takes
//! them (`health.rs`): the wedged thread is abandoned, and so are its cores.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The cores the model threads share, granted first come, first served.
#[derive(Debug)]
pub struct CoreArbiter {
    capacity: usize,
    state: Mutex<Turns>,
    changed: Condvar,
}

#[derive(Debug)]
struct Turns {
    free: usize,
    /// The ticket the next caller of [`CoreArbiter::acquire`] gets.
    next_ticket: u64,
    /// The oldest ticket not yet granted: only its holder may take cores.
    serving: u64,
}

/// Cores held by one batch; they are given back when the lease drops.
#[derive(Debug)]
#[must_use = "the cores are given back as soon as the lease drops"]
pub struct CoreLease {
    arbiter: Arc<CoreArbiter>,
    cores: usize,
    /// How long the batch waited for its turn.
    waited: Duration,
}

impl CoreArbiter {
    /// An arbiter for `cpus` cores (at least one).
    pub fn new(cpus: usize) -> Arc<Self> {
        let capacity = cpus.max(1);
        Arc::new(Self {
            capacity,
            state: Mutex::new(Turns {
                free: capacity,
                next_ticket: 0,
                serving: 0,
            }),
            changed: Condvar::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Cores neither leased nor promised, for tests and logs.
    pub fn free(&self) -> usize {
        self.turns().free
    }

    fn turns(&self) -> MutexGuard<'_, Turns> {
        // The state is a few counters, consistent after every statement: a panic elsewhere
        // while the lock was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for this caller's turn and for `threads` cores to be free, then take them. More
    /// threads than the arbiter has cores take every core (the batch runs alone).
    pub fn acquire(self: &Arc<Self>, threads: usize) -> CoreLease {
        let cores = threads.clamp(1, self.capacity);
        let start = Instant::now();
        let mut turns = self.turns();
        let ticket = turns.next_ticket;
        turns.next_ticket += 1;
        while turns.serving != ticket || turns.free < cores {
            turns = self.changed.wait(turns).unwrap_or_else(|e| e.into_inner());
        }
        turns.free -= cores;
        turns.serving += 1;
        drop(turns);
        // The next ticket may fit in what is left.
        self.changed.notify_all();
        CoreLease {
            arbiter: self.clone(),
            cores,
            waited: start.elapsed(),
        }
    }

    fn give_back(&self, cores: usize) {
        self.turns().free += cores;
        self.changed.notify_all();
    }
}

impl CoreLease {
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// How long the batch waited for the cores (0 when they were free and nobody was ahead).
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for CoreLease {
    fn drop(&mut self) {
        self.arbiter.give_back(self.cores);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    /// Give a thread time to block in `acquire` (it cannot be observed directly).
    fn settle() {
        thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn an_uncontended_lease_is_granted_at_once_and_given_back_on_drop() {
        let arbiter = CoreArbiter::new(2);
        let lease = arbiter.acquire(2);
        assert_eq!(lease.cores(), 2);
        assert_eq!(arbiter.free(), 0);
        drop(lease);
        assert_eq!(arbiter.free(), 2);
    }

    #[test]
    fn more_threads_than_cores_take_every_core_and_none_take_zero() {
        let arbiter = CoreArbiter::new(4);
        assert_eq!(arbiter.acquire(16).cores(), 4);
        assert_eq!(arbiter.acquire(0).cores(), 1);
        assert_eq!(CoreArbiter::new(0).capacity(), 1);
    }

    #[test]
    fn leases_that_fit_together_run_together() {
        let arbiter = CoreArbiter::new(2);
        let a = arbiter.acquire(1);
        let b = arbiter.acquire(1);
        assert_eq!(arbiter.free(), 0);
        drop((a, b));
        assert_eq!(arbiter.free(), 2);
    }

    #[test]
    fn a_batch_waits_until_the_cores_it_needs_are_given_back() {
        let arbiter = CoreArbiter::new(2);
        let held = arbiter.acquire(2);
        let (granted_tx, granted) = mpsc::channel();
        let waiter = {
            let arbiter = arbiter.clone();
            thread::spawn(move || {
                let lease = arbiter.acquire(1);
                granted_tx.send(lease.waited()).unwrap();
            })
        };
        settle();
        assert!(
            granted.try_recv().is_err(),
            "granted while every core was held"
        );
        drop(held);
        let waited = granted.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(waited >= Duration::from_millis(40), "waited {waited:?}");
        waiter.join().unwrap();
        assert_eq!(arbiter.free(), 2);
    }

    #[test]
    fn a_wide_batch_is_not_overtaken_by_narrow_ones_that_arrive_after_it() {
        let arbiter = CoreArbiter::new(2);
        let first = arbiter.acquire(1);
        let (order_tx, order) = mpsc::channel();
        let spawn = |name: &'static str, threads: usize, hold: Duration| {
            let (arbiter, order_tx) = (arbiter.clone(), order_tx.clone());
            thread::spawn(move || {
                let _lease = arbiter.acquire(threads);
                order_tx.send(name).unwrap();
                thread::sleep(hold);
            })
        };
        // One core is free, but the wide batch needs both: it waits at the head of the line.
        let wide = spawn("wide", 2, Duration::from_millis(20));
        settle();
        // A narrow batch would fit in the free core, but arrived later: it waits its turn.
        let narrow = spawn("narrow", 1, Duration::ZERO);
        settle();
        assert!(order.try_recv().is_err(), "a batch was granted out of turn");
        drop(first);
        let granted: Vec<_> = (0..2)
            .map(|_| order.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(granted, ["wide", "narrow"]);
        wide.join().unwrap();
        narrow.join().unwrap();
        assert_eq!(arbiter.free(), 2);
    }

    #[test]
    fn concurrent_batches_never_hold_more_cores_than_there_are() {
        let arbiter = CoreArbiter::new(3);
        let in_use = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (arbiter, in_use, peak) = (arbiter.clone(), in_use.clone(), peak.clone());
                thread::spawn(move || {
                    use std::sync::atomic::Ordering::SeqCst;
                    for _ in 0..200 {
                        let lease = arbiter.acquire(1 + i % 3);
                        let now = in_use.fetch_add(lease.cores(), SeqCst) + lease.cores();
                        peak.fetch_max(now, SeqCst);
                        thread::yield_now();
                        in_use.fetch_sub(lease.cores(), SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
        assert!(peak <= 3, "{peak} cores in use at once");
        assert!(
            peak >= 2,
            "the batches never overlapped ({peak}): the test proves nothing"
        );
        assert_eq!(arbiter.free(), 3);
    }
}
