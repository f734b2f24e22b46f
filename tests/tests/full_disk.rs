//! End-to-end full disk: the real gateway with `storage.path` on a small tmpfs and the
//! upstream down. The disk fills; the gateway keeps running, does not acknowledge new
//! readings (the device keeps them), still publishes rule events on its embedded broker
//! and forwards what was committed (across a reconnect); when space returns it recovers
//! by itself: every reading committed before the fault arrived upstream (none lost), the
//! readings the device kept while the disk was full arrive once it sends them again,
//! and the acks kept meanwhile empty the outbox.
//!
//! Needs `mount` (root): skipped with a message when mounting is not permitted, unless
//! `GATEWAY_REQUIRE_MOUNT=1` (CI), which makes that a failure.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use gateway::store::{read_outbox_file, read_stats_file, Counter, Lane};
use test_support::tmpfs::{fill, Tmpfs};
use test_support::{
    metric, publish_acked, publish_all, subscribe, wait_until_async, Collector, Gateway, Proxy,
    Rumqttd,
};

/// Readings `range` of device t-1, each about 1.5 KB, numbered by `n`.
fn readings(range: std::ops::Range<u64>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|n| {
            let payload = format!(
                "{{\"temperature\":21.5,\"n\":{n},\"pad\":\"{}\"}}",
                "x".repeat(1500)
            );
            ("devices/t-1/telemetry".to_string(), payload.into_bytes())
        })
        .collect()
}

fn n_of(payload: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v["n"].as_u64()
}

/// The `n` of every reading committed in the outbox file.
fn committed(db: &Path) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let mut from = 0;
    loop {
        let rows = read_outbox_file(db, Lane::Reading, from, 1000).unwrap();
        let Some(last) = rows.last() else { break };
        from = last.seq + 1;
        out.extend(rows.iter().filter_map(|r| n_of(r.payload())));
    }
    out
}

const BATTERY_RULE: &str = r#"
[[rule]]
name = "battery-low"
event = "BatteryLow"
stream = "telemetry"
condition = "battery < 20.0"
clear = "battery >= 25.0"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_keeps_the_gateway_running_and_loses_nothing_committed() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let db = fs.path().join("gateway.redb");

    // Upstream: a real broker with a subscriber, behind a proxy that is down for now.
    let up_port = Rumqttd::start().port;
    let collector = Collector::start(up_port, "up/devices/#").await;
    let proxy = Proxy::start(up_port, false).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/battery.toml"), BATTERY_RULE).unwrap();
    let url = format!("mqtt://127.0.0.1:{}", proxy.port);
    let db_str = db.display().to_string();
    let gw = Gateway::start_in(
        dir,
        &[
            ("GATEWAY__STORAGE__PATH", &db_str),
            ("GATEWAY__UPSTREAM__URL", &url),
            ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
            ("GATEWAY__UPSTREAM__BACKOFF_MAX", "1s"),
        ],
    );
    let mut events = subscribe(&gw.addr(), "events/BatteryLow/+").await;

    // Readings before the fault, committed.
    let mut next = 0u64;
    publish_all(&gw.addr(), "t-1", &readings(0..200)).await;
    next += 200;
    wait_until_async("first readings committed", Duration::from_secs(10), || {
        read_stats_file(&db).is_ok_and(|s| s.get(Counter::AppendedReadings) == 200)
    })
    .await;

    // The disk fills up; keep publishing until the gateway says the storage failed. A
    // reading it did not acknowledge is kept by the device and sent again.
    let filler = fill(fs.path());
    let degraded = "Storage unavailable";
    for _ in 0..200 {
        if gw.log().contains(degraded) {
            break;
        }
        next += publish_acked(&gw.addr(), "t-1", &readings(next..next + 50)).await as u64;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = gw.wait_log(degraded, Duration::from_secs(5));
    assert!(line.contains(&db_str), "the error names the path: {line}");
    assert!(
        line.contains("No space left"),
        "the error names the cause: {line}"
    );

    // What the database file holds now is forwarded while the storage is down. Every
    // reading the device saw acknowledged is durable: in the file, or in the journal of
    // the groups since the last checkpoint, which the recovery applies. All of them must
    // arrive upstream later.
    let before_fault = committed(&db);
    assert!(before_fault.len() >= 200);
    let acked_before_fault: BTreeSet<u64> = (0..next).collect();
    assert!(before_fault.is_subset(&acked_before_fault));

    // Still degraded: the gateway acknowledges nothing it cannot store; the device's
    // connection is closed without a PUBACK and it keeps its readings.
    let kept_from = next;
    for _ in 0..3 {
        let acked = publish_acked(&gw.addr(), "t-1", &readings(next..next + 100)).await;
        assert_eq!(acked, 0, "a reading acknowledged while the storage is down");
    }

    // Rules keep running: an event is published locally while the storage is down.
    let battery = vec![(
        "devices/b-1/telemetry".to_string(),
        b"{\"battery\":10.0}".to_vec(),
    )];
    assert_eq!(publish_acked(&gw.addr(), "b-1", &battery).await, 0);
    let (topic, _) = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a local event while the storage is degraded")
        .unwrap();
    assert_eq!(topic, "events/BatteryLow/b-1");
    assert!(!gw.log().contains("Storage recovered"));
    // Operators see it in the metrics too.
    let (status, metrics) = gw.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\ngateway_storage_degraded 1\n"),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "gateway_outbox_refused_total{lane=\"readings\"}") >= 3.0,
        "{metrics}"
    );
    assert_eq!(
        committed(&db),
        before_fault,
        "nothing committed while degraded"
    );

    // Upstream comes up while the storage is still down: committed rows are forwarded
    // (read through a read-only handle; their acks wait in memory).
    proxy.set_up(true);
    let arrived = || -> BTreeSet<u64> {
        collector
            .snapshot()
            .iter()
            .filter_map(|m| n_of(&m.payload))
            .collect()
    };
    wait_until_async(
        "committed readings forwarded while degraded",
        Duration::from_secs(20),
        || before_fault.is_subset(&arrived()),
    )
    .await;
    // A reconnect while degraded: the forwarder cannot commit its acks, replays and goes on.
    let connects = || gw.log().matches("connected upstream").count();
    let before = connects();
    proxy.set_up(false);
    gw.wait_log("upstream connection lost", Duration::from_secs(10));
    proxy.set_up(true);
    wait_until_async("reconnect while degraded", Duration::from_secs(10), || {
        connects() > before
    })
    .await;
    assert!(!gw.log().contains("Storage recovered"));

    // Space returns: the gateway recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let line = gw.wait_log("Storage recovered", Duration::from_secs(15));
    assert!(line.contains("entries refused"), "{line}");
    let (_, metrics) = gw.http_get("/metrics");
    assert!(
        metrics.contains("\ngateway_storage_degraded 0\n"),
        "{metrics}"
    );

    // The device sends again what it kept, then new readings: all are stored again.
    let after: Vec<u64> = (kept_from..next + 50).collect();
    publish_all(&gw.addr(), "t-1", &readings(kept_from..next + 50)).await;

    // Every acknowledged reading arrived upstream, and the new ones.
    let expected: BTreeSet<u64> = acked_before_fault.iter().copied().chain(after).collect();
    wait_until_async(
        "every committed reading upstream",
        Duration::from_secs(20),
        || expected.is_subset(&arrived()),
    )
    .await;
    let arrived = arrived();
    let lost: Vec<_> = expected.difference(&arrived).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");

    eprintln!(
        "committed before the fault: {}, arrived upstream: {}, refused while degraded: {}",
        before_fault.len(),
        arrived.len(),
        read_stats_file(&db).map_or(0, |s| s.get(Counter::DropRefusedReadings))
    );
    for line in gw.log().lines().filter(|l| l.contains("Storage")) {
        eprintln!("gateway: {line}");
    }
    // The acks kept while degraded were applied: the outbox drains to empty.
    wait_until_async("outbox empty", Duration::from_secs(10), || {
        read_stats_file(&db).is_ok_and(|s| s.depth() == 0)
    })
    .await;
    // One error line for the whole period, one recovery line.
    assert_eq!(gw.log().matches("Storage unavailable").count(), 1);
    assert_eq!(gw.log().matches("Storage recovered").count(), 1);
    let stats = read_stats_file(&db).unwrap();
    assert_eq!(stats.get(Counter::StorageErrors), 1);
    assert!(stats.get(Counter::DropRefusedReadings) >= 3);
    assert!(stats.get(Counter::DropRefusedEvents) >= 1);
    drop(gw);
}
