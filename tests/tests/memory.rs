//! End-to-end: the real gateway binary returns free memory to the operating system once
//! a burst of readings is over (`gateway/src/memory.rs`), and not before.
//!
//! What a trim frees depends on the allocator's state, so the test checks the decision
//! and its wiring (the ingest counter, the rules stage's tick, the log line with the
//! resident memory before and after), not a figure; the figures are in BENCHMARKS.md.

use std::time::{Duration, Instant};

use gateway::memory::{BURST_MIN, QUIET_TICKS, THREAD_CACHE_TUNABLE};
use test_support::{counter, publish_all, Gateway};

const TRIMMED: &str = "free memory returned to the operating system";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_trimmed_once_after_a_burst() {
    let gw = Gateway::start(&[]);
    // A burst of a little more than BURST_MIN readings from four devices at once.
    let per_device = (BURST_MIN / 4 + 100) as usize;
    let publishers = (0..4).map(|d| {
        let addr = gw.addr();
        tokio::spawn(async move {
            let messages: Vec<(String, Vec<u8>)> = (0..per_device)
                .map(|i| {
                    let payload = format!(r#"{{"temperature":{},"seq":{i}}}"#, 20 + i % 10);
                    (format!("devices/m-{d}/telemetry"), payload.into_bytes())
                })
                .collect();
            publish_all(&addr, &format!("e2e-memory-{d}"), &messages).await;
        })
    });
    for p in publishers {
        p.await.unwrap();
    }
    let acked = Instant::now();
    let line = gw.wait_log(TRIMMED, Duration::from_secs(30));
    let waited = acked.elapsed();
    assert!(
        line.contains("rss_before_mb=") && line.contains("rss_after_mb="),
        "{line}"
    );
    // The trim waited for the burst to be over: QUIET_TICKS quiet ticks of 1 s, the
    // first of which may come right after the last reading.
    assert!(
        waited >= Duration::from_secs(u64::from(QUIET_TICKS) - 1) - Duration::from_millis(300),
        "trimmed {waited:?} after the last PUBACK: {line}"
    );
    // A trim on every quiet tick, rather than once, would show within a few more ticks.
    tokio::time::sleep(Duration::from_secs(u64::from(QUIET_TICKS))).await;
    let mut gw = gw;
    let summary = gw.stop();
    assert_eq!(
        counter(&summary, "ingested"),
        4 * per_device as u64,
        "{summary}"
    );
    let log = gw.log();
    assert_eq!(
        log.matches(TRIMMED).count(),
        1,
        "one trim per burst:\n{log}"
    );
}

/// The `GLIBC_TUNABLES` a process runs with, from its environment as the kernel holds it
/// (for a process that called exec, the environment it passed to exec). glibc ends each
/// tunable's value in place with a NUL while it parses them, so there the tunables after
/// the first show up as entries of their own (`glibc.malloc...=N`): they are joined back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tunables_of(gw: &Gateway) -> Option<String> {
    let pid = gw.child.as_ref().expect("running").id();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut entries = environ
        .split(|b| *b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok());
    let first = entries.find_map(|var| var.strip_prefix("GLIBC_TUNABLES="))?;
    let rest = entries.take_while(|var| var.starts_with("glibc."));
    Some(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_gateway_runs_without_per_thread_malloc_caches_unless_told_otherwise() {
    // Started without the tunable: the same process (the pid the test spawned) runs
    // itself again with the caches off, and then serves.
    let mut gw = Gateway::start(&[]);
    assert_eq!(
        tunables_of(&gw).as_deref(),
        Some(format!("{THREAD_CACHE_TUNABLE}=0").as_str())
    );
    assert_eq!(gw.http_get("/metrics").0, 200);
    // Named after its binary, as any process, not after `/proc/self/exe`.
    let pid = gw.child.as_ref().unwrap().id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "gateway");
    gw.stop();

    // Other tunables are kept; one that sets the cache is the operator's choice.
    let mut gw = Gateway::start(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")]);
    assert_eq!(
        tunables_of(&gw).as_deref(),
        Some(format!("glibc.malloc.trim_threshold=131072:{THREAD_CACHE_TUNABLE}=0").as_str())
    );
    gw.stop();
    let chosen = format!("{THREAD_CACHE_TUNABLE}=3");
    let mut gw = Gateway::start(&[("GLIBC_TUNABLES", chosen.as_str())]);
    assert_eq!(tunables_of(&gw).as_deref(), Some(chosen.as_str()));
    gw.stop();
}
