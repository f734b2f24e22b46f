//! End-to-end store-and-forward through the real gateway binary: devices publish to its
//! embedded broker while the upstream (Mosquitto when installed, else a second rumqttd in
//! this process) is unreachable; then it comes back, or the gateway is killed with
//! SIGKILL mid-drain and restarted. Nothing committed may be lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use test_support::{
    check_delivery, counter, publish_all, Collector, Gateway, Proxy, Received, UpstreamBroker,
};

fn device_of(m: &Received) -> String {
    m.topic.split('/').nth(2).unwrap_or_default().to_string()
}

/// Readings of `devices` devices, `per_device` each, as (topic, payload) in publish order.
fn readings(devices: usize, per_device: usize) -> Vec<Vec<(String, Vec<u8>)>> {
    (0..devices)
        .map(|d| {
            (0..per_device)
                .map(|i| {
                    (
                        format!("devices/d-{d}/telemetry"),
                        format!("{{\"seq\":{i},\"temperature\":{}}}", 20 + i % 10).into_bytes(),
                    )
                })
                .collect()
        })
        .collect()
}

async fn publish_devices(addr: &str, batches: &[Vec<(String, Vec<u8>)>]) {
    let tasks: Vec<_> = batches
        .iter()
        .enumerate()
        .map(|(d, msgs)| {
            let addr = addr.to_string();
            let msgs = msgs.clone();
            tokio::spawn(async move { publish_all(&addr, &format!("dev-{d}"), &msgs).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until the outbox's readings lane holds `n` messages (read from the db file
/// while it runs; the event lane holds the devices' connects besides).
fn wait_depth(gw: &Gateway, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let depth = gateway::store::read_stats_file(&gw.db_path())
            .map(|s| s.lanes[gateway::store::Lane::Reading].messages)
            .unwrap_or(0);
        if depth >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox depth {depth} < {n} after {timeout:?}; log:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Per device, the payload `seq` of first arrivals must rise: the device's own order.
fn check_payload_order(received: &[Received]) {
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in received {
        if !seen.insert(m.seq()) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        if let Some(prev) = last.insert(device_of(m), seq) {
            assert!(
                prev < seq,
                "device {}: reading {seq} after {prev}",
                device_of(m)
            );
        }
    }
}

fn gateway_env(proxy_port: u16) -> Vec<(String, String)> {
    vec![
        (
            "GATEWAY__UPSTREAM__URL".into(),
            format!("mqtt://127.0.0.1:{proxy_port}"),
        ),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX".into(), "up".into()),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN".into(), "50ms".into()),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX".into(), "500ms".into()),
    ]
}

fn start_gateway(env: &[(String, String)]) -> Gateway {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Gateway::start(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_down_while_50k_readings_arrive_then_every_one_arrives_in_order() {
    const DEVICES: usize = 5;
    const PER_DEVICE: usize = 10_000;
    let up = UpstreamBroker::start();
    let proxy = Proxy::start(up.port, false).await;
    let collector = Collector::start(up.port, "up/#").await;
    let mut gw = start_gateway(&gateway_env(proxy.port));

    publish_devices(&gw.addr(), &readings(DEVICES, PER_DEVICE)).await;
    wait_depth(&gw, (DEVICES * PER_DEVICE) as u64, Duration::from_secs(60));
    assert_eq!(
        collector.len(),
        0,
        "nothing can arrive while upstream is unreachable"
    );

    proxy.set_up(true);
    collector
        .wait_unique(DEVICES * PER_DEVICE, Duration::from_secs(120))
        .await;
    let received = collector.snapshot();
    let duplicates = check_delivery(&received, DEVICES * PER_DEVICE, device_of);
    check_payload_order(&received);
    assert_eq!(duplicates, 0, "one clean connection sends nothing twice");
    assert!(
        received.iter().all(|m| m.replayed == Some(true)),
        "the backlog is marked as replayed"
    );
    let summary = gw.stop();
    assert_eq!(
        counter(&summary, "decoded"),
        (DEVICES * PER_DEVICE) as u64,
        "{summary}"
    );
    let stats = gateway::store::read_stats_file(&gw.db_path()).unwrap();
    assert_eq!(stats.depth(), 0, "every row was deleted after its PUBACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_drain_then_restart_loses_nothing_committed() {
    const DEVICES: usize = 4;
    const PER_DEVICE: usize = 5_000;
    const TOTAL: usize = DEVICES * PER_DEVICE;
    let up = UpstreamBroker::start();
    let proxy = Proxy::start(up.port, false).await;
    let collector = Collector::start(up.port, "up/#").await;
    let mut env = gateway_env(proxy.port);
    // Pace the drain so the kill lands in the middle of it.
    env.push(("GATEWAY__UPSTREAM__RATE_LIMIT".into(), "4000".into()));
    let mut gw = start_gateway(&env);

    publish_devices(&gw.addr(), &readings(DEVICES, PER_DEVICE)).await;
    wait_depth(&gw, TOTAL as u64, Duration::from_secs(60));
    proxy.set_up(true);
    collector
        .wait_unique(TOTAL / 4, Duration::from_secs(60))
        .await;
    gw.kill();
    let at_kill = collector.unique();
    assert!(
        at_kill < TOTAL,
        "the kill must land mid-drain (got {at_kill} of {TOTAL} already)"
    );

    gw.spawn();
    collector.wait_unique(TOTAL, Duration::from_secs(120)).await;
    let received = collector.snapshot();
    let duplicates = check_delivery(&received, TOTAL, device_of);
    // A repeat is only possible for what was in flight or acked-but-not-yet-deleted at
    // the kill: at most upstream.max_inflight (100) + the forwarder's uncommitted acks.
    let bound = 100 + gateway::forwarder::MAX_UNCOMMITTED_ACKS;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after one kill (bound {bound})"
    );
    eprintln!("kill -9 mid-drain: {at_kill} delivered before the kill, {duplicates} duplicates after restart");
    gw.stop();
}
