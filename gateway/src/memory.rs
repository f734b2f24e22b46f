//! Memory given back to the operating system after a burst of traffic.
//!
//! The gateway runs on glibc's malloc. Under load it takes memory in arenas: the main
//! heap and, for threads that allocate at the same time, further arenas of up to 64 MiB
//! each (by default up to 8 per core). Freed memory stays in the arena for reuse; glibc
//! only shrinks an arena from its top, so what a burst freed elsewhere stays resident:
//! 1000 devices at 10 readings/s for 30 s left 143 MB resident a minute after they had
//! gone, three arenas holding 30 + 39 + 23 MiB; with the two measures below, 106 MB, the
//! rest being memory still in use, mostly the broker's in-memory log (BENCHMARKS.md,
//! "Memory after a burst"). The three measures come without a new dependency:
//!
//! - [`without_thread_caches`], once at start: glibc's per-thread caches off (the
//!   process runs itself again with the tunable set), because the blocks they hold pin
//!   pages that a trim would otherwise return.
//! - [`limit_arenas`], once at start: at most [`ARENA_MAX`] arenas, so fewer heaps keep
//!   free memory between bursts. `MALLOC_ARENA_MAX` in the environment still wins. Too
//!   few cost CPU: the pipeline's threads allocate and free on every reading (readings
//!   are freed on another thread than the one that allocated them), and threads that
//!   share an arena take turns on its lock. With 2 arenas the gateway spent about a fifth
//!   of its CPU in malloc and free at 1000 devices x 10/s; 8 (one per busy thread:
//!   connections, router, decode, rules, store, the async worker) took 15% less CPU for
//!   the same peak and the same memory after the burst (BENCHMARKS.md, "Malloc arenas").
//! - [`Trim`], driven once a second by the rules stage's tick (the gateway's one timer
//!   that always runs, so this adds no wake-up): it watches the messages the gateway
//!   handled (readings ingested and events emitted) and, when a burst is over, calls
//!   `malloc_trim(0)`, which hands every free page of every arena back to the kernel
//!   (`madvise(MADV_DONTNEED)`). Events count because they come in bursts of their own
//!   after the readings stop: a minute after 1000 devices left, the absence rule emits
//!   1000 events at once, which took 5.6 MB more that stayed until the next burst.
//!
//! Invariants:
//! - never trims while traffic flows: only after the rate has stayed at or below a
//!   quarter of the burst's peak for [`QUIET_TICKS`] ticks, and only after at least
//!   [`BURST_MIN`] messages since the previous trim;
//! - trims at most twice per burst: when it has gone quiet, and once more after
//!   [`LATE_QUIET_TICKS`] quiet ticks, for memory freed after the last message
//!   (connections that close later, queues that drain);
//! - elsewhere than Linux with glibc (musl, other systems) the measures do nothing.

/// Most malloc arenas the gateway uses (glibc's default: 8 per core): about one per
/// thread that allocates per reading, so that they do not queue on a shared arena's lock.
pub const ARENA_MAX: i32 = 8;
/// Messages (readings and events) since the previous trim below which there is nothing
/// worth trimming. A trim takes a few milliseconds: trimming after each burst of a fleet
/// that reports once a minute costs nothing to speak of.
pub const BURST_MIN: u64 = 1_000;
/// Quiet ticks (seconds) after which a burst is over.
pub const QUIET_TICKS: u32 = 3;
/// Quiet ticks after which a burst's memory is trimmed a second and last time.
pub const LATE_QUIET_TICKS: u32 = 30;

/// Caps the number of malloc arenas at [`ARENA_MAX`], unless `MALLOC_ARENA_MAX` is set
/// (glibc reads it itself). Call once, first thing in `main`, before threads start.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc tunable; it has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// The glibc tunable for how many freed blocks of each size a thread keeps for itself (its
/// cache, "tcache"; glibc's default is 7 of each of 64 sizes up to 1 KiB).
pub const THREAD_CACHE_TUNABLE: &str = "glibc.malloc.tcache_count";

/// Set by [`without_thread_caches`] for the process it starts again.
const RESTARTED_ENV: &str = "GATEWAY_MALLOC_RESTARTED";

/// Runs the gateway again, at once and in the same process, with glibc's per-thread cache
/// turned off (`GLIBC_TUNABLES` gets `glibc.malloc.tcache_count=0`: glibc reads tunables
/// only at start, from the environment, and has no call to change this one later).
///
/// Why: a block in a thread's cache counts as in use, so the page it lies on cannot be
/// returned by [`release`]. After a burst each busy thread holds up to 448 such blocks
/// (7 of each of 64 sizes), scattered over its arena; a minute after 1000 devices left
/// they pinned about 1-2 MB, for about 1.5% more CPU without them (BENCHMARKS.md,
/// "Per-thread malloc caches off").
///
/// Does nothing when `GLIBC_TUNABLES` already names the tunable (an operator's choice;
/// tools that preload a library of their own, such as heaptrack, want it set so that the
/// gateway starts once), in the process started again, and elsewhere than Linux with
/// glibc. Returns the error when the exec failed: no `/proc`, or a kernel that cannot
/// run the file itself (an Arm build under qemu user emulation on a PC, without
/// binfmt_misc). The gateway then runs with the caches, correctly, only keeping more
/// memory after a burst. Call in `main` for `gateway run` only (the short commands gain
/// nothing from a second start), before any thread starts.
pub fn without_thread_caches() -> Option<std::io::Error> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::OsString;

        let mut tunables = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        // The marker makes sure of one exec at most, whatever a glibc makes of the
        // variable while it parses it (2.36 ends each value in place with a NUL).
        if tunables.to_string_lossy().contains(THREAD_CACHE_TUNABLE)
            || std::env::var_os(RESTARTED_ENV).is_some()
        {
            return None;
        }
        // Appended to the operator's tunables as they are, byte for byte.
        if !tunables.is_empty() {
            tunables.push(":");
        }
        tunables.push(format!("{THREAD_CACHE_TUNABLE}=0"));
        let args: Vec<OsString> = std::env::args_os().collect();
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k != "GLIBC_TUNABLES" && k != RESTARTED_ENV)
            .collect();
        env.push(("GLIBC_TUNABLES".into(), tunables));
        env.push((RESTARTED_ENV.into(), "1".into()));
        // The binary's own path first: the kernel names the process after the file it
        // runs, and `ps`, `top` and `pgrep gateway` should keep seeing `gateway`, not
        // `exe`. `/proc/self/exe` runs it when that path is gone (replaced on disk by an
        // upgrade, say), and only then: under qemu user emulation it is qemu itself.
        let err = match std::env::current_exe() {
            Ok(path) => exec(path.as_os_str(), &args, &env),
            Err(e) => e,
        };
        if err.kind() != std::io::ErrorKind::NotFound {
            return Some(err);
        }
        Some(exec("/proc/self/exe".as_ref(), &args, &env))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Replaces the process with `path` run with `args` (the first is its name) and exactly
/// `env`; returns only when that failed. Unlike `Command::exec`, which calls `execvp`,
/// a file the kernel cannot run is an error (`ENOEXEC`), not a script handed to
/// `/bin/sh`: a gateway binary the kernel refuses must go on running, not turn into a
/// shell reading an ELF file.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exec(
    path: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> std::io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let c = |bytes: &[u8]| CString::new(bytes).map_err(std::io::Error::other);
    let build = || -> std::io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = c(path.as_bytes())?;
        let args = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let env = env
            .iter()
            .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((path, args, env))
    };
    let (path, args, env) = match build() {
        Ok(built) => built,
        Err(e) => return e,
    };
    let pointers = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let (argv, envp) = (pointers(&args), pointers(&env));
    // SAFETY: path, argv and envp are NUL-terminated strings and NULL-terminated arrays
    // of them, alive until the call returns; execve returns only on failure.
    unsafe {
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    std::io::Error::last_os_error()
}

/// Returns the free memory of every malloc arena to the kernel; true if any was.
pub fn release() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' locks itself and only releases free pages.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Decides, from the ingest counter read once per tick, when a burst is over.
#[derive(Debug, Default)]
pub struct Trim {
    /// The ingest counter at the previous tick; the counter starts at 0 with the process,
    /// so a burst that comes before the first tick counts too.
    last_total: u64,
    /// Messages since the previous trim.
    since_trim: u64,
    /// Highest messages per tick since the previous burst ended.
    peak: u64,
    /// Consecutive quiet ticks.
    quiet: u32,
    /// A burst was trimmed and its late trim is still to come.
    late_pending: bool,
}

impl Trim {
    pub fn new() -> Trim {
        Trim::default()
    }

    /// [`Trim::tick`], and when it says so, [`release`], logging the resident memory
    /// before and after.
    pub fn on_tick(&mut self, messages_total: u64) {
        if !self.tick(messages_total) {
            return;
        }
        let before = crate::http::resident_memory_bytes();
        let started = std::time::Instant::now();
        release();
        let mb = |b: Option<u64>| b.map_or(f64::NAN, |b| (b as f64 / 1e6 * 10.0).round() / 10.0);
        tracing::info!(
            rss_before_mb = mb(before),
            rss_after_mb = mb(crate::http::resident_memory_bytes()),
            took_ms = started.elapsed().as_millis() as u64,
            "Traffic went quiet; free memory returned to the operating system."
        );
    }

    /// Takes the messages counter (readings ingested and events emitted since the start)
    /// at a tick (about a second after the previous one); true when memory should be
    /// trimmed now.
    pub fn tick(&mut self, messages_total: u64) -> bool {
        let delta = messages_total.saturating_sub(self.last_total);
        self.last_total = messages_total;
        self.since_trim += delta;
        self.peak = self.peak.max(delta);
        if delta > self.peak / 4 {
            self.quiet = 0;
            return false;
        }
        self.quiet = self.quiet.saturating_add(1);
        if self.since_trim >= BURST_MIN && self.quiet >= QUIET_TICKS {
            // The burst is over: trim now, and once more later with what it has left.
            self.since_trim = 0;
            self.peak = delta;
            self.late_pending = true;
            return true;
        }
        if self.late_pending && self.quiet >= LATE_QUIET_TICKS {
            self.late_pending = false;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file the kernel cannot run is an error, not a shell script: were it handed to
    /// `/bin/sh` (as `execvp` does), this test process would become a shell and exit 97.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn exec_of_a_file_the_kernel_cannot_run_returns_an_error_and_runs_no_shell() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-an-executable");
        std::fs::write(&path, "exit 97\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = exec(path.as_os_str(), &["not-an-executable".into()], &[]);
        assert_eq!(err.raw_os_error(), Some(libc::ENOEXEC), "{err}");

        let err = exec(dir.path().join("gone").as_os_str(), &["gone".into()], &[]);
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    }

    /// Feeds per-tick message counts; returns the ticks (0-based) at which it trims.
    fn trims(per_tick: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut trim = Trim::new();
        let mut total = 0;
        per_tick
            .into_iter()
            .enumerate()
            .filter_map(|(i, n)| {
                total += n;
                trim.tick(total).then_some(i)
            })
            .collect()
    }

    fn burst(secs: usize, rate: u64) -> impl Iterator<Item = u64> {
        std::iter::repeat_n(rate, secs)
    }

    #[test]
    fn trims_once_when_a_burst_is_over_and_once_more_later() {
        let ticks = burst(30, 10_000).chain(burst(60, 0));
        assert_eq!(
            trims(ticks),
            vec![
                30 + QUIET_TICKS as usize - 1,
                30 + LATE_QUIET_TICKS as usize - 1
            ]
        );
    }

    #[test]
    fn a_burst_before_the_first_tick_counts() {
        // The whole burst between the start and the first tick: the counter starts at 0.
        assert_eq!(
            trims(burst(1, 2 * BURST_MIN).chain(burst(5, 0))),
            vec![QUIET_TICKS as usize]
        );
    }

    #[test]
    fn never_trims_while_busy() {
        // A steady rate, and one that wobbles by half: neither is a burst that ended.
        assert_eq!(trims(burst(120, 10_000)), Vec::<usize>::new());
        let wobble = (0..120).map(|i| if i % 2 == 0 { 10_000 } else { 5_000 });
        assert_eq!(trims(wobble), Vec::<usize>::new());
    }

    #[test]
    fn a_short_lull_inside_a_burst_is_not_its_end() {
        let lull = burst(10, 10_000)
            .chain(burst(QUIET_TICKS as usize - 1, 0))
            .chain(burst(10, 10_000));
        assert_eq!(trims(lull), Vec::<usize>::new());
    }

    #[test]
    fn trims_when_the_rate_drops_to_a_lower_steady_level() {
        let ticks = burst(10, 10_000).chain(burst(100, 1_000));
        // Once when it dropped; the lower rate is then the new normal, not quiet, so
        // there is no late trim while it lasts.
        assert_eq!(trims(ticks), vec![10 + QUIET_TICKS as usize - 1]);
    }

    #[test]
    fn too_little_traffic_is_not_worth_a_trim() {
        let small = burst(1, BURST_MIN - 1).chain(burst(60, 0));
        assert_eq!(trims(small), Vec::<usize>::new());
        // Small bursts add up until they are worth one.
        let mut ticks = Vec::new();
        for _ in 0..2 {
            ticks.extend(burst(1, BURST_MIN / 2));
            ticks.extend(burst(5, 0));
        }
        assert_eq!(trims(ticks), vec![6 + QUIET_TICKS as usize]);
    }

    #[test]
    fn the_events_after_a_burst_of_readings_are_a_burst_of_their_own() {
        // 1000 devices x 10/s for 30 s; they leave; a minute later the absence rule
        // fires for each of them.
        let ticks = burst(30, 10_000)
            .chain(burst(60, 0))
            .chain(burst(1, 1_000))
            .chain(burst(40, 0));
        let q = QUIET_TICKS as usize - 1;
        let late = LATE_QUIET_TICKS as usize - 1;
        assert_eq!(trims(ticks), vec![30 + q, 30 + late, 91 + q, 91 + late]);
    }

    #[test]
    fn each_burst_is_trimmed() {
        let ticks = burst(10, 10_000)
            .chain(burst(10, 0))
            .chain(burst(10, 10_000))
            .chain(burst(10, 0));
        let q = QUIET_TICKS as usize - 1;
        assert_eq!(trims(ticks), vec![10 + q, 30 + q]);
    }
}
