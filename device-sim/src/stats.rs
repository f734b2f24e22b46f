//! Counters shared by the device tasks, and resource use of this process and of
//! watched processes (the broker under test).
//!
//! Inputs: increments from the device tasks; `getrusage(2)` for this process;
//! `/proc/PID/stat` and `/proc/PID/status` for watched processes.
//! Outputs: [`Snapshot`]s for progress lines and summaries, [`CpuSample`] and
//! [`ProcessUsage`] figures.
//!
//! Invariants:
//! - counters only grow (except `connected`, a gauge); relaxed atomics, no locks
//!   on the publish path.
//! - CPU percentages are of one core (200% = both cores of a 2-core machine).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices with a live connection (gauge).
    pub connected: AtomicI64,
    /// Highest value `connected` reached.
    pub connected_peak: AtomicI64,
    /// Successful CONNACKs, including reconnects.
    pub connects: AtomicU64,
    /// Connection errors seen by device event loops.
    pub errors: AtomicU64,
    /// Payloads handed to the MQTT client (readings + malformed).
    pub published: AtomicU64,
    /// Malformed payloads among `published`.
    pub malformed: AtomicU64,
    /// PUBLISH packets written to the network.
    pub sent: AtomicU64,
    /// PUBACKs received (QoS 1).
    pub acked: AtomicU64,
    /// Publishes discarded from a device's queue when its connection dropped.
    pub dropped: AtomicU64,
    /// Ticks that fell more than a second behind schedule and were skipped.
    pub late: AtomicU64,
    /// Commands received that set a switch.
    pub commands: AtomicU64,
    /// Commands received that named no switch of the device or said neither on nor off.
    pub commands_ignored: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub connected: i64,
    pub connects: u64,
    pub errors: u64,
    pub published: u64,
    pub malformed: u64,
    pub sent: u64,
    pub acked: u64,
    pub dropped: u64,
    pub late: u64,
    #[serde(default)]
    pub commands: u64,
    #[serde(default)]
    pub commands_ignored: u64,
}

impl Counters {
    /// Moves the `connected` gauge by `delta`, keeping the peak.
    pub fn connection(&self, delta: i64) {
        let now = self.connected.fetch_add(delta, Relaxed) + delta;
        self.connected_peak.fetch_max(now, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Relaxed),
            connects: self.connects.load(Relaxed),
            errors: self.errors.load(Relaxed),
            published: self.published.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            late: self.late.load(Relaxed),
            commands: self.commands.load(Relaxed),
            commands_ignored: self.commands_ignored.load(Relaxed),
        }
    }
}

/// CPU time of this process so far.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    cpu: Duration,
    max_rss_kb: u64,
}

impl CpuSample {
    pub fn now() -> CpuSample {
        // SAFETY: getrusage writes into the struct we pass and nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        CpuSample {
            at: Instant::now(),
            cpu: if ok {
                tv(usage.ru_utime) + tv(usage.ru_stime)
            } else {
                Duration::ZERO
            },
            max_rss_kb: if ok { usage.ru_maxrss as u64 } else { 0 },
        }
    }

    /// Use between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSample) -> CpuUse {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        let cpu = self.cpu.saturating_sub(earlier.cpu).as_secs_f64();
        CpuUse {
            cpu_s: cpu,
            percent: if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 },
            max_rss_kb: self.max_rss_kb,
        }
    }
}

/// CPU used over a window, and peak memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub cpu_s: f64,
    /// Percent of one core.
    pub percent: f64,
    pub max_rss_kb: u64,
}

/// Resource use of another process over the measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    pub name: String,
    pub pid: u32,
    pub cpu_s: f64,
    /// Percent of one core.
    pub cpu_percent: f64,
    /// Resident set size at the end of the window.
    pub rss_kb: u64,
    /// Peak resident set size over the process lifetime (VmHWM).
    pub peak_rss_kb: u64,
}

/// A process to measure, e.g. `gateway=1234`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID, got `{s}`"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("`{pid}` is not a process id"))?;
        Ok(Watch {
            name: name.to_owned(),
            pid,
        })
    }
}

/// CPU ticks of a process from `/proc/PID/stat`, with the time they were read.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    at: Instant,
    ticks: u64,
}

impl Watch {
    pub fn sample(&self) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name, which may itself hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the full line: 11 and 12 here.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(ProcSample {
            at: Instant::now(),
            ticks: utime + stime,
        })
    }

    /// Usage between `start` and now; `None` if the process is gone.
    pub fn usage_since(&self, start: &ProcSample) -> Option<ProcessUsage> {
        let end = self.sample()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_s = end.ticks.saturating_sub(start.ticks) as f64 / hz;
        let wall = end.at.saturating_duration_since(start.at).as_secs_f64();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Some(ProcessUsage {
            name: self.name.clone(),
            pid: self.pid,
            cpu_s,
            cpu_percent: if wall > 0.0 {
                100.0 * cpu_s / wall
            } else {
                0.0
            },
            rss_kb: kb("VmRSS:"),
            peak_rss_kb: kb("VmHWM:"),
        })
    }
}

/// Raises this process's open-file limit to its hard limit (1000 devices need
/// 1000 sockets); returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_is_measured() {
        let start = CpuSample::now();
        let give_up = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        // Spin until getrusage shows 30 ms of CPU (the machine may be busy).
        let used = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            let used = CpuSample::now().since(&start);
            if used.cpu_s >= 0.03 {
                break used;
            }
            assert!(Instant::now() < give_up, "no CPU time seen: {used:?}");
        };
        assert!(x > 0);
        assert!(used.percent > 0.0 && used.max_rss_kb > 0, "{used:?}");
    }

    #[test]
    fn watched_process_is_measured() {
        let me = Watch {
            name: "self".into(),
            pid: std::process::id(),
        };
        let start = me.sample().expect("own /proc entry");
        let usage = me.usage_since(&start).unwrap();
        assert!(usage.rss_kb > 0 && usage.peak_rss_kb >= usage.rss_kb);
        assert!("x=12".parse::<Watch>().is_ok());
        assert!("x".parse::<Watch>().is_err());
    }
}
