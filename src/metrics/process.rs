//! The standard `process_*` metrics every Prometheus client library exports (Go's and Python's
//! names and meanings), read from `/proc/self` at each scrape. Absent on other systems.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self/stat` and friends say about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcessStats {
    #[cfg(target_os = "linux")]
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = boot_time_seconds(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf and getrlimit only read process-wide settings into locals.
        let (ticks, page_size, max_fds) = unsafe {
            let mut limit = std::mem::zeroed::<libc::rlimit>();
            let max_fds = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur
            } else {
                0
            };
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
                max_fds,
            )
        };
        let mut stats = parse_stat(&stat, ticks as f64, page_size as u64, boot_time)?;
        stats.open_fds = open_fds;
        stats.max_fds = max_fds;
        Some(stats)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn read() -> Option<Self> {
        None
    }
}

/// `/proc/self/stat`: the fields after the parenthesised command name (which may itself hold
/// spaces and parentheses, hence the last `)`), numbered as in proc(5).
fn parse_stat(
    stat: &str,
    ticks_per_second: f64,
    page_size: u64,
    boot_time: f64,
) -> Option<ProcessStats> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // proc(5) numbers fields from 1 (pid); `after_name` starts at field 3 (state).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks_per_second,
        threads: field(20)?,
        start_time_seconds: boot_time + field(22)? as f64 / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
        open_fds: 0,
        max_fds: 0,
    })
}

/// `btime` in `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time_seconds(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let e = &mut encoder;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stats.resident_bytes as f64,
        )?;
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stats.virtual_bytes as f64,
        )?;
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stats.start_time_seconds,
        )?;
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            stats.open_fds as f64,
        )?;
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            stats.max_fds as f64,
        )?;
        gauge(
            e,
            "process_threads",
            "Number of OS threads in the process.",
            stats.threads as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_command_holds_spaces_and_parentheses() {
        // Fields 3.. of a real line, behind a hostile command name.
        let stat = "4242 (vision (serve) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 3000 18446744073709551615";
        let stats = parse_stat(stat, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.threads, 7);
        assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
        assert_eq!(stats.virtual_bytes, 123_456_789);
        assert_eq!(stats.resident_bytes, 3000 * 4096);
    }

    #[test]
    fn finds_the_boot_time() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1764633600\nprocesses 9\n";
        assert_eq!(boot_time_seconds(text), Some(1_764_633_600.0));
        assert_eq!(boot_time_seconds("cpu 1\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().unwrap();
        assert!(stats.resident_bytes > 1 << 20, "{stats:?}");
        assert!(
            stats.open_fds >= 3 && stats.open_fds <= stats.max_fds,
            "{stats:?}"
        );
        assert!(stats.threads >= 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            stats.start_time_seconds <= now + 1.0
                && stats.start_time_seconds > now - 86_400.0 * 365.0
        );
    }
}
