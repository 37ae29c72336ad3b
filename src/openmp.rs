//! How libtorch's OpenMP threads wait between parallel regions.
//!
//! libtorch runs each operator on a team of OpenMP threads (libgomp in the PyPI wheel) that
//! meet at a barrier after every parallel loop. By default a thread that reaches the barrier
//! early spins for a while before sleeping. That is right on a machine where the team has its
//! cores to itself; here it is not: the decode threads, the HTTP workers and other processes
//! share the same few cores, and a spinning thread burns the core its descheduled teammate
//! needs to reach the barrier. Measured on the 2-vCPU development VM with two other busy
//! processes (`benches/model.rs`, Lite0, 2 intra-op threads): 5.6 images/s at batch 1 and
//! 9.1 at batch 8 with spinning barriers, 20.7 and 25.4 with `OMP_WAIT_POLICY=PASSIVE`
//! (BENCHMARKS.md has the interleaved figures on a quiet machine and under the server's own
//! load).
//!
//! libgomp reads `OMP_WAIT_POLICY` once, in its constructor, which runs when the dynamic
//! loader maps libtorch: before `main`. Setting the variable from `main` is too late, so the
//! process re-executes itself once with it set. A value the user sets (for example `ACTIVE`
//! on a dedicated machine) is left alone.

/// The variable libgomp reads.
const WAIT_POLICY: &str = "OMP_WAIT_POLICY";

/// What the OpenMP runtime was told, for the start-up log.
pub fn wait_policy() -> String {
    std::env::var(WAIT_POLICY).unwrap_or_else(|_| "libgomp default (spin, then sleep)".into())
}

/// Unless `OMP_WAIT_POLICY` is already set, replace this process with itself (same pid,
/// arguments and environment) plus `OMP_WAIT_POLICY=PASSIVE`. Returns only when that is not
/// needed or not possible (the error is printed and the process runs on with spinning
/// barriers).
pub fn reexec_with_passive_wait() {
    if std::env::var_os(WAIT_POLICY).is_some() {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use std::ffi::OsString;
        use std::os::unix::process::CommandExt;
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| OsString::from("visionserve"));
        // /proc/self/exe is this very binary even if argv[0] is a relative path or the file
        // was replaced on disk since.
        let error = std::process::Command::new("/proc/self/exe")
            .arg0(argv0)
            .args(args)
            .env(WAIT_POLICY, "PASSIVE")
            .exec();
        eprintln!(
            "warning: could not re-execute with {WAIT_POLICY}=PASSIVE ({error}); \
             libtorch's threads will spin at barriers"
        );
    }
}
