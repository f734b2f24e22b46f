//! Message ids through the real gateway binary and a real upstream broker (Mosquitto when
//! installed, else a rumqttd in this process): an id is `{gateway.id}:{epoch}:{seq}`, it
//! is the same when a row is sent again after a restart, and a database created anew (a
//! wiped data directory) never repeats an id of the old one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use gateway::store::Lane;

use test_support::{
    publish_all, wait_until_async, Collector, Gateway, Proxy, Received, UpstreamBroker,
};

const GATEWAY_ID: &str = "gw-ids";

fn start_gateway(upstream_port: u16) -> Gateway {
    let url = format!("mqtt://127.0.0.1:{upstream_port}");
    Gateway::start(&[
        ("GATEWAY__GATEWAY__ID", GATEWAY_ID),
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
    ])
}

/// `n` JSON readings of device `d-1`, tagged with `round` so every payload is distinct.
fn readings(round: u32, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                "devices/d-1/telemetry".to_owned(),
                format!("{{\"round\":{round},\"i\":{i},\"temperature\":21.5}}").into_bytes(),
            )
        })
        .collect()
}

/// `(epoch, seq)` of an id `{GATEWAY_ID}:{epoch}:{seq}`; panics on any other shape.
fn parts(m: &Received) -> (String, u64) {
    let id = m.id.as_deref().expect("a message without an id");
    let rest = id
        .strip_prefix(GATEWAY_ID)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or_else(|| panic!("id {id} does not start with the gateway id"));
    let (epoch, seq) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("id {id} has no epoch"));
    assert!(
        epoch.len() == 16
            && epoch
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "epoch of {id} is not 16 lowercase hex digits"
    );
    (epoch.to_owned(), seq.parse().expect("a decimal seq"))
}

async fn wait_received(collector: &Collector, n: usize) {
    wait_until_async(
        &format!("{n} messages upstream"),
        Duration::from_secs(30),
        || collector.len() >= n,
    )
    .await;
}

/// The `round` a reading of [`readings`] was published in.
fn round_of(m: &Received) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("a JSON reading");
    v["round"].as_u64().expect("a round")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_created_anew_never_repeats_an_old_id() {
    const N: usize = 30;
    let up = UpstreamBroker::start();
    let collector = Collector::start(up.port, "up/#").await;
    let mut gw = start_gateway(up.port);

    publish_all(&gw.addr(), "dev-1", &readings(1, N)).await;
    wait_received(&collector, N).await;
    gw.stop();
    std::fs::remove_file(gw.db_path()).expect("delete the database");
    gw.spawn();
    publish_all(&gw.addr(), "dev-1", &readings(2, N)).await;
    wait_received(&collector, 2 * N).await;
    gw.stop();

    // Repeats of one reading (at-least-once) are allowed; one id for two readings is not.
    let received = collector.snapshot();
    let mut payloads_of: HashMap<&str, HashSet<&[u8]>> = HashMap::new();
    for m in &received {
        let id = m.id.as_deref().expect("a message without an id");
        payloads_of.entry(id).or_default().insert(&m.payload);
    }
    for (id, payloads) in &payloads_of {
        assert_eq!(
            payloads.len(),
            1,
            "id {id} was given to {} readings",
            payloads.len()
        );
    }
    assert_eq!(payloads_of.len(), 2 * N, "every reading has its own id");

    // Device events are outbox rows too: the first row of a database may be its device's
    // DeviceConnected rather than a reading, so each database's first seq is taken over
    // both.
    let rows: Vec<(String, u64)> = received
        .iter()
        .chain(&collector.device_events())
        .map(parts)
        .collect();
    let of_round = |round: u64| -> (HashSet<String>, u64) {
        let epochs: HashSet<String> = received
            .iter()
            .filter(|m| round_of(m) == round)
            .map(|m| parts(m).0)
            .collect();
        let first = rows
            .iter()
            .filter(|(e, _)| epochs.contains(e))
            .map(|(_, s)| *s)
            .min()
            .unwrap();
        (epochs, first)
    };
    let (old_epochs, old_first_seq) = of_round(1);
    let (new_epochs, new_first_seq) = of_round(2);
    assert_eq!(old_epochs.len(), 1, "one database, one epoch");
    assert_eq!(new_epochs.len(), 1, "one database, one epoch");
    assert_ne!(old_epochs, new_epochs, "the new database has a new epoch");
    assert_eq!(
        old_first_seq, new_first_seq,
        "the new database starts its sequence again, as the old one did"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_sent_after_a_restart_keeps_its_id() {
    const N: usize = 30;
    let up = UpstreamBroker::start();
    let proxy = Proxy::start(up.port, false).await;
    let collector = Collector::start(up.port, "up/#").await;
    let mut gw = start_gateway(proxy.port);

    // Upstream is unreachable: the readings stay in the outbox across a restart.
    publish_all(&gw.addr(), "dev-1", &readings(1, N)).await;
    wait_until_async(
        "the outbox holds every reading",
        Duration::from_secs(20),
        || {
            gateway::store::read_stats_file(&gw.db_path())
                .is_ok_and(|s| s.lanes[Lane::Reading].messages == N as u64)
        },
    )
    .await;
    gw.stop();
    let stats = gateway::store::read_stats_file(&gw.db_path()).unwrap();
    let prefix = gateway::forwarder::id_prefix(GATEWAY_ID, stats.epoch.expect("an epoch"));
    let rows = gateway::store::read_outbox_file(&gw.db_path(), Lane::Reading, 0, N + 1).unwrap();
    let expected: HashMap<Vec<u8>, String> = rows
        .iter()
        .map(|r| {
            (
                r.payload().to_vec(),
                gateway::forwarder::message_id(&prefix, r.seq),
            )
        })
        .collect();
    assert_eq!(expected.len(), N);

    gw.spawn();
    proxy.set_up(true);
    wait_received(&collector, N).await;
    for m in collector.snapshot() {
        assert_eq!(
            m.id.as_ref(),
            expected.get(&m.payload),
            "the id of {} changed across the restart",
            String::from_utf8_lossy(&m.payload)
        );
        assert_eq!(m.replayed, Some(true), "sent from the backlog");
    }
    gw.stop();
}
