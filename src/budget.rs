//! What the container gives the server, and the in-flight memory budget derived from it.
//!
//! [`Resources::detect`] reads the memory limit from the cgroup (v2 `memory.max`, v1
//! `memory.limit_in_bytes`), falling back to the machine's RAM, and the CPUs from the standard
//! library's `available_parallelism` (which honours cgroup CPU quotas, unlike libtorch's own
//! default of one thread per physical core: oversubscribed in a container).
//!
//! [`MemoryBudget`] weighs admission by bytes: request bodies being received, images being
//! decoded (their size is read from the header first) and the model inputs of queued images
//! all hold budget until released. A reservation that does not fit waits briefly, then the
//! request gets 429; one larger than the whole budget gets 413.

use crate::error::InferError;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The in-flight budget, as a fraction of the memory limit: the rest is for the model's
/// weights and activations, libtorch's allocator caches and the runtime.
pub const BUDGET_FRACTION: u64 = 4;
pub const MIN_BUDGET: u64 = 64 << 20;

/// How long a reservation waits for budget before the request is refused with 429.
pub const BUDGET_WAIT: Duration = Duration::from_millis(250);

/// What the container (or the machine) gives the server.
#[derive(Debug, Clone)]
pub struct Resources {
    pub memory_limit: u64,
    /// Where the memory limit came from (a cgroup file, or the machine's RAM).
    pub memory_source: String,
    pub cpus: usize,
}

impl Resources {
    pub fn detect() -> Self {
        let ram = physical_memory().unwrap_or(8 << 30);
        let (memory_limit, memory_source) = match cgroup_memory_limit() {
            Some((limit, source)) if limit < ram => (limit, source),
            _ => (ram, "the machine's RAM (no cgroup limit)".to_owned()),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            memory_limit,
            memory_source,
            cpus,
        }
    }

    /// The default in-flight budget: a quarter of the memory limit, at least 64 MiB.
    pub fn default_budget(&self) -> u64 {
        (self.memory_limit / BUDGET_FRACTION).max(MIN_BUDGET)
    }
}

fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The tightest cgroup memory limit that applies to this process, and the file it came from.
fn cgroup_memory_limit() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = vec!["/sys/fs/cgroup/memory.max".to_owned()];
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next()?, fields.next()?);
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned());
    candidates
        .into_iter()
        .filter_map(|file| {
            let limit = parse_limit(&std::fs::read_to_string(&file).ok()?)?;
            Some((limit, file))
        })
        .min_by_key(|(limit, _)| *limit)
}

/// A cgroup memory limit: bytes, or `max` / a page-rounded 2^63 for "none".
fn parse_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 60).then_some(value)
}

/// Budget is counted in KiB so that one `u32` acquisition covers up to 4 TiB.
const UNIT: u64 = 1024;

/// A byte-weighted semaphore for memory in flight, exported as two gauges.
pub struct MemoryBudget {
    total: u64,
    permits: Arc<Semaphore>,
    in_use: Gauge<i64, AtomicI64>,
}

/// Budget held until dropped.
#[derive(Debug)]
pub struct Reservation {
    _permits: OwnedSemaphorePermit,
    bytes: u64,
    in_use: Gauge<i64, AtomicI64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.in_use.dec_by(self.bytes as i64);
    }
}

impl MemoryBudget {
    pub fn new(total: u64, size: Gauge<i64, AtomicI64>, in_use: Gauge<i64, AtomicI64>) -> Self {
        size.set(total as i64);
        Self {
            total,
            permits: Arc::new(Semaphore::new((total / UNIT) as usize)),
            in_use,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Hold `bytes` of budget, waiting at most `wait` for it. `what` names what the bytes are
    /// for, in the 413 of a reservation larger than the whole budget.
    pub async fn reserve(
        &self,
        bytes: u64,
        wait: Duration,
        what: &'static str,
    ) -> Result<Reservation, InferError> {
        let units = bytes.div_ceil(UNIT);
        if units > self.total / UNIT {
            return Err(InferError::OverMemoryBudget {
                what,
                needed: bytes,
                budget: self.total,
            });
        }
        let permits = match self.permits.clone().try_acquire_many_owned(units as u32) {
            Ok(permits) => permits,
            Err(_) => {
                tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(units as u32))
                    .await
                    .map_err(|_| InferError::MemoryBusy { budget: self.total })?
                    .map_err(|_| InferError::MemoryBusy { budget: self.total })?
            }
        };
        self.in_use.inc_by(bytes as i64);
        Ok(Reservation {
            _permits: permits,
            bytes,
            in_use: self.in_use.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64) -> (MemoryBudget, Gauge<i64, AtomicI64>) {
        let in_use = Gauge::<i64, AtomicI64>::default();
        (
            MemoryBudget::new(bytes, Gauge::default(), in_use.clone()),
            in_use,
        )
    }

    #[tokio::test]
    async fn reservations_hold_budget_until_dropped() {
        let (budget, in_use) = budget(10 << 20);
        let wait = Duration::from_millis(10);
        let a = budget.reserve(6 << 20, wait, "a body").await.unwrap();
        assert_eq!(in_use.get(), 6 << 20);
        let refused = budget.reserve(6 << 20, wait, "a body").await.unwrap_err();
        assert_eq!(refused.error_type(), "memory_busy");
        assert_eq!(refused.retry_after_secs(), Some(1));
        drop(a);
        assert_eq!(in_use.get(), 0);
        assert!(budget.reserve(6 << 20, wait, "a body").await.is_ok());
    }

    #[tokio::test]
    async fn a_reservation_waits_briefly_for_a_release() {
        let (budget, _) = budget(8 << 20);
        let budget = Arc::new(budget);
        let held = budget.reserve(8 << 20, Duration::ZERO, "x").await.unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(1 << 20, Duration::from_secs(5), "x").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn more_than_the_whole_budget_is_refused_as_too_large() {
        let (budget, _) = budget(4 << 20);
        let err = budget
            .reserve(5 << 20, Duration::ZERO, "the decoded image")
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "over_memory_budget");
        let message = err.to_string();
        assert!(
            message.contains("the decoded image") && message.contains("4.0 MiB"),
            "{message}"
        );
    }

    #[test]
    fn cgroup_limits_parse() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_limit("2147483648\n"), Some(2 << 30));
    }

    #[test]
    fn the_default_budget_is_a_quarter_of_the_limit() {
        let resources = Resources {
            memory_limit: 2 << 30,
            memory_source: "test".into(),
            cpus: 2,
        };
        assert_eq!(resources.default_budget(), 512 << 20);
        let tiny = Resources {
            memory_limit: 100 << 20,
            ..resources
        };
        assert_eq!(tiny.default_budget(), MIN_BUDGET);
    }
}
