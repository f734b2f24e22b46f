//! The gateway's presence upstream through the real binary and Mosquitto: a retained
//! `online` status on `{prefix}/status` after every connect, the MQTT last will
//! (`offline`, `connection lost`) when the gateway dies with `kill -9` or its link is cut,
//! and a retained `offline` (`shutdown`) on a clean stop, with the will suppressed.
//! The tests need Mosquitto (its will and retained handling are the reference); without
//! it they are skipped, or fail with `GATEWAY_REQUIRE_MOSQUITTO=1`.

use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{publish_all, wait_until_async, Collector, Gateway, Mosquitto, Proxy, Received};

const GATEWAY_ID: &str = "gw-presence";
const STATUS: &str = "up/status";
/// The smallest `upstream.keep_alive`.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

fn start_gateway(upstream_port: u16) -> Gateway {
    let url = format!("mqtt://127.0.0.1:{upstream_port}");
    Gateway::start(&[
        ("GATEWAY__GATEWAY__ID", GATEWAY_ID),
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__KEEP_ALIVE", "5s"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
    ])
}

/// A gateway forwarding to `gateway_upstream`, watched by a collector of `filter` on the
/// broker at `broker_port`, once its `online` status has arrived.
struct Online {
    live: Collector,
    gw: Gateway,
    /// The first `online` message.
    status: Value,
    /// Unix ms just before and just after the process was started.
    before: i64,
    after: i64,
}

async fn online(broker_port: u16, filter: &str, gateway_upstream: u16) -> Online {
    let live = Collector::start(broker_port, filter).await;
    let before = unix_millis();
    let gw = start_gateway(gateway_upstream);
    let after = unix_millis();
    let status = wait_state(&live, "online", 1, Duration::from_secs(10)).await;
    Online {
        live,
        gw,
        status,
        before,
        after,
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn body(m: &Received) -> Value {
    serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("status payload is not JSON ({e}): {:?}", m.payload))
}

/// The bodies of the status messages `collector` has received so far.
fn states(collector: &Collector) -> Vec<Value> {
    collector.status().iter().map(body).collect()
}

/// Waits until the status messages of `collector` include `n` whose `state` is `state`;
/// returns the last of them.
async fn wait_state(collector: &Collector, state: &str, n: usize, timeout: Duration) -> Value {
    wait_until_async(
        &format!("{n} '{state}' status message(s) on {STATUS}"),
        timeout,
        || {
            states(collector)
                .iter()
                .filter(|b| b["state"] == state)
                .count()
                >= n
        },
    )
    .await;
    states(collector)
        .into_iter()
        .rfind(|b| b["state"] == state)
        .unwrap()
}

/// What a subscriber arriving now gets: the retained status.
async fn retained_status(port: u16) -> (Received, Value) {
    let late = Collector::start(port, STATUS).await;
    wait_until_async("the retained status", Duration::from_secs(5), || {
        !late.status().is_empty()
    })
    .await;
    let m = late.status().remove(0);
    assert!(m.retain, "the status is delivered as a retained message");
    let b = body(&m);
    (m, b)
}

fn assert_identity(b: &Value, started_after: i64, started_before: i64) {
    assert_eq!(b["gateway_id"], GATEWAY_ID, "{b}");
    assert_eq!(b["version"], env!("CARGO_PKG_VERSION"), "{b}");
    let started_at = b["started_at"].as_i64().expect("started_at in Unix ms");
    assert!(
        (started_after..=started_before).contains(&started_at),
        "started_at {started_at} is not the process start ({started_after}..={started_before}): {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_arriving_later_gets_the_retained_online_status() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let Online {
        mut gw,
        status: online,
        before,
        after,
        ..
    } = online(mosquitto.port, STATUS, mosquitto.port).await;
    assert_identity(&online, before, after);
    let time = online["time"].as_i64().expect("time in Unix ms");
    assert!(
        time >= online["started_at"].as_i64().unwrap() && time <= unix_millis(),
        "{online}"
    );
    assert!(online.get("reason").is_none(), "{online}");

    let (m, retained) = retained_status(mosquitto.port).await;
    assert_eq!(m.topic, STATUS);
    assert_eq!(
        retained, online,
        "the retained status is the online message"
    );
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_the_retained_will_offline_within_the_keep_alive() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let Online {
        live,
        mut gw,
        before,
        after,
        ..
    } = online(mosquitto.port, STATUS, mosquitto.port).await;

    let killed = Instant::now();
    gw.kill();
    // Mosquitto publishes the will when it notices the dead connection: at once after a
    // SIGKILL (the kernel closes the socket), and at 1.5 keep-alives at the latest.
    let offline = wait_state(
        &live,
        "offline",
        1,
        KEEP_ALIVE * 3 / 2 + Duration::from_secs(2),
    )
    .await;
    eprintln!(
        "kill -9: the will arrived {:?} after the signal",
        killed.elapsed()
    );
    assert_eq!(offline["reason"], "connection lost", "{offline}");
    assert_identity(&offline, before, after);
    assert!(
        offline["connected_at"].as_i64().unwrap() >= before,
        "{offline}"
    );

    let (_, retained) = retained_status(mosquitto.port).await;
    assert_eq!(
        retained, offline,
        "the will replaced the retained online status"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_publishes_a_retained_offline_and_no_will() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let Online {
        live,
        mut gw,
        before,
        after,
        ..
    } = online(mosquitto.port, "up/#", mosquitto.port).await;

    gw.stop();
    let offline = wait_state(&live, "offline", 1, Duration::from_secs(5)).await;
    assert_eq!(offline["reason"], "shutdown", "{offline}");
    assert_identity(&offline, before, after);
    assert!(
        offline["time"].as_i64().unwrap() <= unix_millis(),
        "{offline}"
    );

    // A message published after the gateway exited arrives after anything the broker
    // did about the gateway's connection: a will would come before it.
    let marker = vec![("up/marker".to_owned(), b"after the stop".to_vec())];
    publish_all(&mosquitto.addr(), "marker", &marker).await;
    wait_until_async("the marker", Duration::from_secs(5), || live.len() == 1).await;
    let seen: Vec<Value> = states(&live).iter().map(|b| b["reason"].clone()).collect();
    assert_eq!(
        seen,
        [Value::Null, Value::from("shutdown")],
        "online, then the clean stop's offline, and no will"
    );
    let (_, retained) = retained_status(mosquitto.port).await;
    assert_eq!(
        retained, offline,
        "the retained status is the clean offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_gives_the_will_then_online_again_on_reconnect() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let proxy = Proxy::start(mosquitto.port, true).await;
    let Online {
        live,
        mut gw,
        status: first,
        ..
    } = online(mosquitto.port, STATUS, proxy.port).await;

    proxy.set_up(false);
    let lost = wait_state(
        &live,
        "offline",
        1,
        KEEP_ALIVE * 3 / 2 + Duration::from_secs(2),
    )
    .await;
    assert_eq!(lost["reason"], "connection lost", "{lost}");
    proxy.set_up(true);
    let second = wait_state(&live, "online", 2, Duration::from_secs(15)).await;
    assert!(
        second["time"].as_i64() > first["time"].as_i64(),
        "a new online message for the new connection: {first} then {second}"
    );
    assert_eq!(
        second["started_at"], first["started_at"],
        "the same process"
    );
    let (_, retained) = retained_status(mosquitto.port).await;
    assert_eq!(retained, second);
    gw.stop();
}
