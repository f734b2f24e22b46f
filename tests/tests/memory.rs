//! End-to-end: the real gateway binary returns free memory to the operating system once
//! a burst of readings is over (`gateway/src/memory.rs`), and not before.
//!
//! What a trim frees depends on the allocator's state, so the test checks the decision
//! and its wiring (the ingest counter, the rules stage's tick, the log line with the
//! resident memory before and after), not a figure; the figures are in BENCHMARKS.md.

use std::time::{Duration, Instant};

use gateway::memory::{BURST_MIN, QUIET_TICKS};
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
