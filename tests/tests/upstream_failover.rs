//! A failover list in `upstream.url` through the real binary and two Mosquittos: a device
//! publishes numbered readings at a steady rate; the Mosquitto the gateway is connected to
//! is killed with `kill -9` mid-run, then (restarted) the other one: the gateway moves to
//! the next URL each time, round robin, and every numbered reading arrives at one of the
//! two (repeats allowed and counted). The status API and `/metrics` name the URL in use.
//! Bad lists are refused at start with exit code 64 and every problem named.
//! The failover test needs Mosquitto; without it, it is skipped (or fails with
//! `GATEWAY_REQUIRE_MOSQUITTO=1`).

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use test_support::{
    check_delivery_with, wait_until_async, workspace_bin, Collector, Gateway, Mosquitto, Received,
};

/// Readings the device publishes, one every [`PACE`].
const N: usize = 1500;
const PACE: Duration = Duration::from_millis(5);
/// `upstream.max_inflight`: the most a kill can leave unacked, so the most repeats per kill.
const MAX_INFLIGHT: usize = 100;

/// `/api/status` of the gateway.
fn status(gw: &Gateway) -> Value {
    let (code, body) = gw.http_get("/api/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the gateway is connected to `url`.
async fn wait_connected_to(gw: &Gateway, url: &str) {
    wait_until_async(
        &format!("connected to {url}"),
        Duration::from_secs(20),
        || {
            let s = status(gw);
            s["upstream"]["state"] == "connected" && s["upstream"]["url"] == url
        },
    )
    .await;
}

/// Publishes readings `{"n":0}`..`{"n":N-1}` of device d-1, one every [`PACE`], QoS 1;
/// ends when every PUBACK has arrived.
fn steady_device(addr: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (host, port) = addr.split_once(':').unwrap();
        let mut opts = MqttOptions::new("steady-d-1", host, port.parse().unwrap());
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let acks = tokio::spawn(async move {
            let mut acked = 0;
            while acked < N {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("device connection failed: {e}"),
                }
            }
        });
        let mut tick = tokio::time::interval(PACE);
        for n in 0..N {
            tick.tick().await;
            let payload = format!("{{\"n\":{n},\"temperature\":21.5}}");
            client
                .publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(30), acks)
            .await
            .expect("every reading acked by the gateway")
            .unwrap();
    })
}

fn number(m: &Received) -> usize {
    let v: Value = serde_json::from_slice(&m.payload).expect("a JSON reading");
    v["n"].as_u64().expect("a numbered reading") as usize
}

/// Distinct reading numbers among `received`.
fn numbers(received: &[Received]) -> HashSet<usize> {
    received.iter().map(number).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_connected_broker_moves_to_the_next_url_and_nothing_is_lost() {
    let (Some(mut a), Some(mut b)) = (Mosquitto::start(), Mosquitto::start()) else {
        return;
    };
    let url_a = format!("mqtt://127.0.0.1:{}", a.port);
    let url_b = format!("mqtt://127.0.0.1:{}", b.port);
    let at_a = Collector::start(a.port, "up/#").await;
    let at_b = Collector::start(b.port, "up/#").await;
    let mut gw = Gateway::start(&[
        ("GATEWAY__UPSTREAM__URL", &format!("{url_a}, {url_b}")),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
    ]);
    wait_connected_to(&gw, &url_a).await;
    let (_, metrics) = gw.http_get("/metrics");
    assert!(
        metrics.contains(&format!("gateway_upstream_url{{url=\"{url_a}\"}} 1"))
            && metrics.contains(&format!("gateway_upstream_url{{url=\"{url_b}\"}} 0")),
        "the first URL is in use:\n{metrics}"
    );

    let device = steady_device(gw.addr());
    wait_until_async(
        "a third of the readings at A",
        Duration::from_secs(30),
        || at_a.len() >= N / 3,
    )
    .await;
    a.kill();
    wait_connected_to(&gw, &url_b).await;
    // A is gone: what its subscriber got is all it will get from it. Dropped, so that it
    // does not subscribe to the restarted A as well and count the end of the run twice.
    let first_at_a = at_a.snapshot();
    drop(at_a);

    // A comes back (empty: it kept nothing) with a new subscriber; then B dies too and
    // the gateway wraps round to A.
    a.restart();
    let at_a_again = Collector::start(a.port, "up/#").await;
    let all = || -> Vec<Received> {
        let mut all = first_at_a.clone();
        all.extend(at_b.snapshot());
        all.extend(at_a_again.snapshot());
        all
    };
    wait_until_async(
        "two thirds of the readings",
        Duration::from_secs(30),
        || numbers(&all()).len() >= 2 * N / 3,
    )
    .await;
    let b_before_kill = at_b.len();
    b.kill();
    wait_connected_to(&gw, &url_a).await;

    device.await.unwrap();
    wait_until_async("every reading at A or B", Duration::from_secs(60), || {
        numbers(&all()).len() >= N
    })
    .await;
    let (_, metrics) = gw.http_get("/metrics");
    assert!(
        metrics.contains(&format!("gateway_upstream_url{{url=\"{url_a}\"}} 1")),
        "{metrics}"
    );
    let summary = gw.stop();

    let received = all();
    assert_eq!(numbers(&received), (0..N).collect(), "nothing lost");
    assert!(b_before_kill > 0, "B carried part of the run");
    assert!(
        !at_a_again.is_empty(),
        "A carried the end of the run after the wrap"
    );
    // Per device, the readings that arrived once are in order; repeats are the in-flight
    // windows of the two killed connections.
    let duplicates = check_delivery_with(&received, N, |_| "d-1".to_owned(), false);
    let mut per_number: HashMap<usize, usize> = HashMap::new();
    for m in &received {
        *per_number.entry(number(m)).or_default() += 1;
    }
    assert_eq!(
        duplicates,
        per_number.values().map(|c| c - 1).sum::<usize>(),
        "ids and numbers agree on the repeats"
    );
    assert!(
        duplicates <= 2 * MAX_INFLIGHT,
        "{duplicates} repeats after two kills (bound {})",
        2 * MAX_INFLIGHT
    );
    eprintln!(
        "failover: {N} readings, {} at A before its kill, {b_before_kill} at B before its kill, {} at A after, {duplicates} repeats; {summary}",
        first_at_a.len(),
        at_a_again.len()
    );
}

#[test]
fn bad_url_lists_are_refused_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[upstream]\nurl = [\"mqtt://node-1\", \"mqtts://node-2\"]\nprotocol = \"4\"\n",
    )
    .unwrap();
    for sub in ["run", "check-config"] {
        let out = Command::new(workspace_bin("gateway"))
            .args([sub, "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{sub}: {err}");
        assert!(err.contains("invalid configuration (2 problems)"), "{err}");
        assert!(
            err.contains("upstream.url: mixes mqtt:// and mqtts:// URLs"),
            "{err}"
        );
        assert!(
            err.contains("upstream.protocol: '4': expected \"5\" (MQTT 5) or \"3.1.1\""),
            "{err}"
        );
    }
    let out = Command::new(workspace_bin("gateway"))
        .arg("check-config")
        .env("GATEWAY__UPSTREAM__URL", "mqtt://node-1,mqtt://node-1:1883")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("upstream.url: mqtt://node-1:1883 is listed twice (from environment variable GATEWAY__UPSTREAM__URL)"),
        "{err}"
    );
}
