//! `kill -9` of a process that is draining the outbox upstream, then a restart: every row
//! arrives, and the repeats are limited to what was in flight (plus acks not yet committed).
//!
//! The test re-runs this test binary as the child (`drain_child`, ignored in normal runs).

use std::process::{Command, Stdio};
use std::time::Duration;

use gateway::config::{Config, UpstreamInflight, UpstreamUrl};
use gateway::forwarder::{Forwarder, ForwarderConfig};
use gateway::reading::{now_millis, Format};
use gateway::store::{OutboxEntry, Store, StoreConfig};
use test_support::{check_delivery, Collector, Rumqttd};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "OUTBOX_DRAIN_CHILD_DB";
const MAX_INFLIGHT: usize = 100;
const MAX_UNCOMMITTED_ACKS: usize = 500;

/// The child: forwards the outbox at the given db to the given port until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by kill_9_mid_drain_then_restart_loses_nothing"]
async fn drain_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let port: u16 = std::env::var("OUTBOX_DRAIN_PORT").unwrap().parse().unwrap();
    let mut config = Config::defaults();
    config.gateway.id = "gw1".into();
    config.upstream.url = Some(UpstreamUrl::mqtt("127.0.0.1", port).into());
    config.upstream.client_id = "gw-crash".into();
    config.upstream.topic_prefix = "up".into();
    config.upstream.max_inflight = UpstreamInflight::Fixed(MAX_INFLIGHT as u16);
    config.upstream.backoff_min = Duration::from_millis(20);
    let store = Store::open(path.as_ref(), StoreConfig::from_config(&config)).unwrap();
    let cfg = ForwarderConfig {
        max_uncommitted_acks: MAX_UNCOMMITTED_ACKS,
        ..ForwarderConfig::from_config(&config).expect("upstream.url is set")
    };
    Forwarder::new(cfg, store)
        .unwrap()
        .run(CancellationToken::new())
        .await;
}

fn spawn_child(path: &std::path::Path, port: u16) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "drain_child", "--ignored", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env("OUTBOX_DRAIN_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_drain_then_restart_loses_nothing() {
    let broker = Rumqttd::start().port;
    let collector = Collector::start(broker, "up/#").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let n = 20_000u64;
    {
        let store = Store::open(&path, StoreConfig::from_config(&Config::defaults())).unwrap();
        for i in 0..n {
            let device = format!("d{}", i % 10);
            assert!(store.append(OutboxEntry::reading(
                &format!("devices/{device}/telemetry"),
                &device,
                format!("{{\"n\":{i}}}").as_bytes(),
                Format::Json,
                now_millis(),
            )));
        }
        store.shutdown().unwrap();
    }
    let kills = 2;
    for k in 1..=kills {
        let mut child = spawn_child(&path, broker);
        let target = (n as usize) * k / (kills + 1);
        collector.wait_unique(target, Duration::from_secs(60)).await;
        child.kill().unwrap(); // SIGKILL mid-drain
        child.wait().unwrap();
    }
    let mut child = spawn_child(&path, broker);
    collector
        .wait_unique(n as usize, Duration::from_secs(60))
        .await;
    // Give the final child time to commit its last acks, then stop it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The child holds the file; stats read it read-only.
        let depth = gateway::store::read_stats_file(&path).unwrap().depth();
        if depth == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "depth {depth}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let received = collector.snapshot();
    let duplicates = check_delivery(&received, n as usize, |m| {
        m.topic.split('/').nth(2).unwrap_or_default().to_owned()
    });
    eprintln!("{n} rows, {kills} kills, {duplicates} duplicates");
    // Per kill: the in-flight window plus the acks whose deletion was not committed yet
    // (bounded by `max_uncommitted_acks`). A replay from the start would repeat
    // everything sent before the kill, far above this.
    let bound = kills * (MAX_INFLIGHT + MAX_UNCOMMITTED_ACKS);
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {kills} kills"
    );
}
