//! "Acknowledged means stored", through the real gateway binary: a device that got a
//! PUBACK for a reading may forget it, whatever happens to the gateway afterwards.
//!
//! - `kill -9` at varying moments while three devices publish QoS 1 as fast as the
//!   gateway acknowledges: every reading a device saw acknowledged, in every run, arrives
//!   upstream after the last restart; repeats are counted and bounded.
//! - Publishes outside the ingest pattern are counted, logged with the client id and kept
//!   as dead letters, and local subscribers still receive them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use test_support::{metric, wait_until_async, Collector, Gateway, UpstreamBroker};
use tokio_util::sync::CancellationToken;

/// Gateway runs, each ended by `kill -9`.
const KILLS: usize = 10;
/// Devices publishing at once; device `k` numbers its readings from `k * DEVICE_SPAN`.
const DEVICES: u64 = 3;
const DEVICE_SPAN: u64 = 1_000_000_000;

fn start_gateway(upstream_port: u16) -> Gateway {
    let url = format!("mqtt://127.0.0.1:{upstream_port}");
    Gateway::start(&[
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
    ])
}

/// A device publishing numbered QoS 1 readings (`{"n": N, ...}`) as fast as it is
/// acknowledged, from `first` on, until its connection fails or `stop` is cancelled;
/// records every number it saw a PUBACK for. Returns the first number not used.
async fn publish_numbered(
    addr: String,
    device: u64,
    first: u64,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: CancellationToken,
) -> u64 {
    let (host, port) = addr.split_once(':').unwrap();
    let mut options = MqttOptions::new(format!("numbered-{device}"), host, port.parse().unwrap());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(100);
    let (client, mut events) = AsyncClient::new(options, 200);
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = first;
            loop {
                let payload = format!("{{\"n\":{n},\"temperature\":21.5}}");
                let topic = format!("devices/d-{device}/telemetry");
                let publish = client.publish(topic, QoS::AtLeastOnce, false, payload);
                tokio::select! {
                    r = publish => if r.is_err() { break },
                    () = stop.cancelled() => break,
                }
                n += 1;
            }
            n
        })
    };
    // rumqttc reports `Outgoing::Publish(pkid)` in request order, then the PUBACK by pkid.
    let mut next = first;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            () = stop.cancelled() => break,
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                in_flight.insert(pkid, next);
                next += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(n) = in_flight.remove(&ack.pkid) {
                    acked.lock().unwrap().insert(n);
                }
            }
            Ok(_) => {}
            // The gateway went away.
            Err(_) => break,
        }
    }
    stop.cancel();
    // The next run numbers on from everything this one asked to send.
    sender.await.unwrap_or(next).max(next)
}

/// The `n` of a forwarded reading.
fn number(payload: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v["n"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_reading() {
    let up = UpstreamBroker::start();
    let collector = Collector::start(up.port, "up/devices/#").await;
    let mut gw = start_gateway(up.port);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut next: Vec<u64> = (0..DEVICES).map(|k| k * DEVICE_SPAN).collect();
    let mut per_run = Vec::new();
    for run in 0..KILLS {
        if run > 0 {
            gw.spawn();
        }
        let stop = CancellationToken::new();
        let before = acked.lock().unwrap().len();
        let devices: Vec<_> = (0..DEVICES)
            .map(|k| {
                tokio::spawn(publish_numbered(
                    gw.addr(),
                    k,
                    next[k as usize],
                    acked.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Wait until readings are being acknowledged, then kill at a varying moment.
        let acked_now = acked.clone();
        wait_until_async(
            "the device's first PUBACKs",
            Duration::from_secs(20),
            move || acked_now.lock().unwrap().len() > before + 50 * DEVICES as usize,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100 + 97 * run as u64 % 400)).await;
        gw.kill();
        for (k, device) in devices.into_iter().enumerate() {
            next[k] = tokio::time::timeout(Duration::from_secs(20), device)
                .await
                .expect("the device notices the gateway is gone")
                .unwrap();
        }
        stop.cancel();
        per_run.push(acked.lock().unwrap().len() - before);
    }
    gw.spawn();
    let promised: BTreeSet<u64> = acked.lock().unwrap().clone();
    let arrived = |collector: &Collector| -> BTreeSet<u64> {
        collector
            .snapshot()
            .iter()
            .filter_map(|m| number(&m.payload))
            .collect()
    };
    let c = collector.clone();
    let wanted = promised.clone();
    let _ = tokio::time::timeout(Duration::from_secs(60), async move {
        while !wanted.is_subset(&arrived(&c)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let got = arrived(&collector);
    let lost: Vec<u64> = promised.difference(&got).copied().collect();
    let forwarded = collector
        .snapshot()
        .iter()
        .filter(|m| number(&m.payload).is_some())
        .count();
    let duplicates = forwarded - got.len();
    eprintln!(
        "{KILLS} kills, {DEVICES} devices; readings acknowledged per run: {per_run:?} ({} in all); \
         arrived upstream: {} distinct, {duplicates} repeats; acknowledged but lost: {}",
        promised.len(),
        got.len(),
        lost.len()
    );
    // Repeats come from rows in flight upstream at a kill: bounded by the forwarder's
    // window plus acks not yet deleted, per kill. The window ("auto": up to 2000 against
    // this Mosquitto, which announces no Receive Maximum) is only full while a backlog
    // drains; these devices publish no faster than the gateway acknowledges.
    assert!(
        duplicates <= KILLS * 1000,
        "{duplicates} repeats after {KILLS} kills"
    );
    assert!(
        per_run.iter().all(|&n| n > 50 * DEVICES as usize),
        "every run acknowledged readings"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged readings never arrived upstream, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_outside_the_ingest_pattern_are_counted_logged_and_kept() {
    let gw = Gateway::start(&[]);
    let mut local = test_support::subscribe(&gw.addr(), "#").await;
    let unrouted = ["sensors/t-9/telemetry", "devices/t-9", "devices/t-9/a/b"];
    let mut messages: Vec<(String, Vec<u8>)> = unrouted
        .iter()
        .map(|t| (t.to_string(), b"{\"temperature\":20}".to_vec()))
        .collect();
    messages.push((
        "devices/t-9/telemetry".into(),
        b"{\"temperature\":20}".to_vec(),
    ));
    // Acknowledged (publish_all waits for every PUBACK): each one is stored.
    test_support::publish_all(&gw.addr(), "typo-device", &messages).await;

    // Local subscribers still receive every topic.
    let mut seen = Vec::new();
    while seen.len() < messages.len() {
        let (topic, _) = tokio::time::timeout(Duration::from_secs(10), local.recv())
            .await
            .expect("the local subscriber receives every publish")
            .unwrap();
        // The clients' own connects arrive too, as device events.
        if !topic.starts_with("events/Device") {
            seen.push(topic);
        }
    }
    for t in unrouted {
        assert!(seen.iter().any(|s| s == t), "{t} not delivered locally");
    }

    let line = gw.wait_log(
        "Publishes on topics outside ingest.topic_pattern",
        Duration::from_secs(10),
    );
    assert!(line.contains("typo-device"), "{line}");
    assert!(line.contains("sensors/t-9/telemetry"), "{line}");
    // Once per interval, not once per publish.
    assert_eq!(
        gw.log()
            .matches("Publishes on topics outside ingest.topic_pattern")
            .count(),
        1
    );

    let (_, metrics) = gw.http_get("/metrics");
    assert_eq!(metric(&metrics, "gateway_unrouted_total"), 3.0);
    let (_, status) = gw.http_get("/api/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ingest"]["unrouted"], 3);
    assert_eq!(status["ingest"]["readings"], 1);

    // The database file holds them by the next checkpoint (at most a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let dead = gateway::store::read_dead_letters(&gw.db_path(), 10).unwrap();
        if dead.len() >= unrouted.len() || std::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut topics: Vec<&str> = dead.iter().map(|d| d.topic.as_str()).collect();
    topics.sort();
    let mut want = unrouted.to_vec();
    want.sort();
    assert_eq!(topics, want);
    assert!(dead
        .iter()
        .all(|d| d.reason.starts_with("unrouted") && d.reason.contains("typo-device")));
}

/// QoS 2 from a device: PUBREC once stored, PUBCOMP after PUBREL, each reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_readings_are_completed_and_stored_once() {
    const N: usize = 20;
    let gw = Gateway::start(&[]);
    let (host, port) = gw
        .addr()
        .split_once(':')
        .map(|(h, p)| (h.to_string(), p.parse().unwrap()))
        .unwrap();
    let mut options = MqttOptions::new("qos2-device", host, port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(options, 50);
    for i in 0..N {
        client
            .publish(
                "devices/q-2/telemetry",
                QoS::ExactlyOnce,
                false,
                format!("{{\"n\":{i}}}"),
            )
            .await
            .unwrap();
    }
    let (recs, comps) = tokio::time::timeout(Duration::from_secs(20), async {
        let (mut recs, mut comps) = (0, 0);
        while comps < N {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubRec(_))) => recs += 1,
                Ok(Event::Incoming(Packet::PubComp(_))) => comps += 1,
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
        (recs, comps)
    })
    .await
    .expect("every PUBCOMP within 20 s");
    assert_eq!((recs, comps), (N, N));
    let (_, status) = gw.http_get("/api/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ingest"]["readings"], N as u64, "{status}");
}

/// A fleet with two topic schemes: `ingest.topic_pattern` lists both, each decodes its
/// own topics with the right device id, and a topic of neither is unrouted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_ingest_patterns_decodes_both_topic_schemes() {
    let gw = Gateway::start(&[(
        "GATEWAY__INGEST__TOPIC_PATTERN",
        "devices/{device}/{stream}, site/{device}",
    )]);
    let reading = b"{\"temperature\":20}".to_vec();
    let messages = vec![
        ("devices/a-1/telemetry".to_string(), reading.clone()),
        ("site/b-2".to_string(), reading.clone()),
        ("plant/c-3".to_string(), reading),
    ];
    test_support::publish_all(&gw.addr(), "mixed", &messages).await;
    let (_, devices) = gw.http_get("/api/devices");
    let devices: serde_json::Value = serde_json::from_str(&devices).unwrap();
    let mut ids: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a-1", "b-2"]);
    let (_, metrics) = gw.http_get("/metrics");
    assert_eq!(metric(&metrics, "gateway_unrouted_total"), 1.0);
    gw.wait_log("devices/+/+, site/+", Duration::from_secs(1));
}
