//! End-to-end session state of the embedded broker that outlives a connection, against
//! the real gateway binary: the MQTT 5 Will Delay Interval (5.0 section 3.1.3.2.2), the
//! Session Expiry Interval (5.0 section 3.1.2.11.2) and the delivery of QoS 1 messages
//! published while a persistent session's client was away (3.1.1 section 3.1.2.4 and
//! 5.0 section 3.1.2.4), on both listeners.
//!
//! Clients are rumqttc's v5 client ([`V5Client`]) and, for the will delay and offline
//! messages, paho-mqtt (`tests/python/v5_conformance.py`; skipped without paho unless
//! `GATEWAY_REQUIRE_PAHO` is set); a connection "lost" is closed without DISCONNECT
//! ([`V5Client::drop_connection`]), so its will applies. MQTT 3.1.1 uses rumqttc.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, LastWillProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use test_support::mqtt5::payloads;
use test_support::{free_port, metric, paho_available, publish_acked, run_paho, Gateway, V5Client};

/// A gateway with the MQTT 5 listener; returns it and that listener's port.
fn gateway_v5() -> (Gateway, u16) {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    (
        Gateway::start(&[("GATEWAY__BROKER__LISTEN_V5", &v5)]),
        v5_port,
    )
}

/// The paho scenario `name` on `topic`, parsed; `None` when paho is not installed.
fn paho(name: &str, port: u16, topic: &str) -> Option<Value> {
    if !paho_available() {
        return None;
    }
    let line = run_paho("v5_conformance.py", &[name, &port.to_string(), topic]);
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line}")))
}

/// Connects `id` with a will on `topic` (payload `id`) delayed by `delay` seconds, and a
/// session that outlives the connection by 60 s.
async fn with_will(port: u16, id: &str, topic: &str, delay: u32, clean_start: bool) -> V5Client {
    let will = LastWill::new(
        topic,
        id.as_bytes().to_vec(),
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    );
    V5Client::connect(port, id, |o| {
        o.set_last_will(will);
        o.set_clean_start(clean_start);
        o.set_session_expiry_interval(Some(60));
    })
    .await
}

/// A subscriber to `topic` and a publisher for its markers.
async fn watcher(port: u16, topic: &str) -> (V5Client, V5Client) {
    let name = topic.replace('/', "-");
    let mut watcher = V5Client::connect(port, &format!("{name}-watcher"), |_| {}).await;
    watcher
        .subscribe(Filter::new(topic, QoS::AtLeastOnce))
        .await;
    let marker = V5Client::connect(port, &format!("{name}-marker"), |_| {}).await;
    (watcher, marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_is_published_when_its_delay_has_passed() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/will/delayed";
    let (mut watcher, _) = watcher(port, topic).await;
    let device = with_will(port, "wd-delayed", topic, 2, true).await;
    let lost = Instant::now();
    device.drop_connection().await;
    let will = watcher.next().await;
    let after = lost.elapsed();
    assert_eq!(payloads(&[will]), ["wd-delayed"]);
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(5)).contains(&after),
        "published {after:?} after the connection was lost, delay 2 s"
    );

    let Some(paho) = paho("will_delay", port, "conf/will/delayed-paho") else {
        return;
    };
    assert_eq!(paho["will"]["payload"], "paho-wd-device", "{paho}");
    let after = paho["after_s"].as_f64().unwrap();
    assert!((2.0..5.0).contains(&after), "{paho}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_is_not_published_when_the_session_is_resumed_in_time() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/will/resumed";
    let (mut watcher, mut marker) = watcher(port, topic).await;
    let device = with_will(port, "wd-resumed", topic, 2, true).await;
    let lost = Instant::now();
    device.drop_connection().await;
    // Back within the delay, resuming the session (clean start 0), without a will.
    let back = V5Client::connect(port, "wd-resumed", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    })
    .await;
    assert!(
        lost.elapsed() < Duration::from_secs(2),
        "reconnect too slow"
    );
    assert!(back.connack.session_present, "the session was resumed");
    // The behaviour under test is the passing of time: let the delay pass, then a
    // marker shows everything the watcher was sent until then.
    tokio::time::sleep(
        Duration::from_secs(2).saturating_sub(lost.elapsed()) + Duration::from_millis(500),
    )
    .await;
    marker
        .publish(topic, false, b"marker", Default::default())
        .await;
    assert_eq!(payloads(&watcher.until(b"marker").await), ["marker"]);

    let Some(paho) = paho("will_cancelled", port, "conf/will/resumed-paho") else {
        return;
    };
    assert_eq!(paho["session_present"], true, "{paho}");
    assert!(paho["resumed_after_s"].as_f64().unwrap() < 2.0, "{paho}");
    let received = paho["received"].as_array().unwrap();
    assert_eq!(received.len(), 1, "only the marker: {paho}");
    assert_eq!(received[0]["payload"], "marker", "{paho}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_is_published_at_once_when_a_new_connection_ends_the_session() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/will/ended";
    let (mut watcher, _) = watcher(port, topic).await;
    let device = with_will(port, "wd-ended", topic, 30, true).await;
    let lost = Instant::now();
    device.drop_connection().await;
    // Clean start 1 ends the old session, and its will is due at once.
    let _back = V5Client::connect(port, "wd-ended", |_| {}).await;
    let will = watcher.next().await;
    assert_eq!(payloads(&[will]), ["wd-ended"]);
    assert!(
        lost.elapsed() < Duration::from_secs(10),
        "{:?}",
        lost.elapsed()
    );
}

/// A subscriber to `topic` whose session outlives its connection by `expiry` seconds.
async fn persistent(port: u16, id: &str, clean_start: bool, expiry: Option<u32>) -> V5Client {
    V5Client::connect(port, id, |o| {
        o.set_clean_start(clean_start);
        o.set_session_expiry_interval(expiry);
    })
    .await
}

/// A session of `id` subscribed to `topic` at QoS 1 that outlives its connection by 60 s,
/// its client gone (created with clean start 1); and a publisher, `{id}-pub`.
async fn session_away(port: u16, id: &str, topic: &str) -> V5Client {
    let mut sub = persistent(port, id, true, Some(60)).await;
    sub.subscribe(Filter::new(topic, QoS::AtLeastOnce)).await;
    sub.drop_connection().await;
    V5Client::connect(port, &format!("{id}-pub"), |_| {}).await
}

/// QoS 1 messages published while a session's client is away are delivered when it
/// resumes the session (clean start 0), without subscribing again. The session was
/// created with clean start 1: on MQTT 5 its expiry interval, not clean start, decides
/// whether it outlives the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_an_offline_session_are_delivered_when_it_resumes() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/offline/v5";
    let mut publisher = session_away(port, "offline-v5", topic).await;
    for i in 0..5 {
        let payload = format!("m{i}");
        publisher
            .publish(topic, false, payload.as_bytes(), Default::default())
            .await;
    }
    let mut back = persistent(port, "offline-v5", false, Some(60)).await;
    assert!(back.connack.session_present);
    assert_eq!(
        payloads(&back.until(b"m4").await),
        ["m0", "m1", "m2", "m3", "m4"]
    );

    let Some(paho) = paho("offline_queue", port, "conf/offline/paho") else {
        return;
    };
    assert_eq!(paho["session_present"], true, "{paho}");
    let received: Vec<&str> = paho["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    assert_eq!(received, ["m0", "m1", "m2"], "{paho}");
}

/// The session is dropped when its expiry interval has passed: a client coming back
/// later finds none (session present 0), and nothing that was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_dropped_when_its_expiry_interval_has_passed() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/offline/expired";
    let mut sub = persistent(port, "expiring-v5", false, Some(1)).await;
    sub.subscribe(Filter::new(topic, QoS::AtLeastOnce)).await;
    let lost = Instant::now();
    sub.drop_connection().await;
    let mut publisher = V5Client::connect(port, "expiring-v5-pub", |_| {}).await;
    publisher
        .publish(topic, false, b"while-away", Default::default())
        .await;
    // The behaviour under test is the passing of time.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(lost.elapsed())).await;
    let mut back = persistent(port, "expiring-v5", false, Some(1)).await;
    assert!(!back.connack.session_present, "the session expired");
    back.subscribe(Filter::new(topic, QoS::AtLeastOnce)).await;
    publisher
        .publish(topic, false, b"marker", Default::default())
        .await;
    assert_eq!(payloads(&back.until(b"marker").await), ["marker"]);
}

/// MQTT 5 with clean start 0 and no Session Expiry Interval (0): the session ends with
/// the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_an_expiry_interval_ends_with_its_connection() {
    let (_gw, port) = gateway_v5();
    let mut sub = persistent(port, "no-expiry-v5", false, None).await;
    sub.subscribe(Filter::new("conf/offline/none", QoS::AtLeastOnce))
        .await;
    sub.drop_connection().await;
    let back = persistent(port, "no-expiry-v5", false, None).await;
    assert!(!back.connack.session_present);
}

/// MQTT 3.1.1 clean session 0: the session is kept (no expiry in 3.1.1) and what was
/// published while the client was away is delivered when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_311_persistent_session_gets_what_was_published_while_it_was_away() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let gw = Gateway::start(&[]);
    let topic = "conf/offline/v311";
    let connect = |clean: bool| {
        let mut opts = MqttOptions::new("offline-v311", "127.0.0.1", gw.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(clean);
        AsyncClient::new(opts, 10)
    };
    // Polls until `done` holds for an incoming packet; the packets before it, in order.
    async fn poll_until(
        eventloop: &mut rumqttc::EventLoop,
        done: impl Fn(&Packet) -> bool,
    ) -> Vec<Packet> {
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(p) = eventloop.poll().await.unwrap() {
                    let stop = done(&p);
                    seen.push(p);
                    if stop {
                        return;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out; so far: {seen:?}"));
        seen
    }

    let (client, mut eventloop) = connect(false);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut eventloop, |p| matches!(p, Packet::SubAck(_))).await;
    drop((client, eventloop)); // no DISCONNECT: the connection is lost

    let messages: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (topic.to_string(), format!("m{i}").into_bytes()))
        .collect();
    assert_eq!(
        publish_acked(&gw.addr(), "offline-v311-pub", &messages).await,
        5
    );

    let (_client, mut eventloop) = connect(false);
    let seen = poll_until(
        &mut eventloop,
        |p| matches!(p, Packet::Publish(p) if p.payload.as_ref() == b"m4"),
    )
    .await;
    assert!(
        matches!(&seen[0], Packet::ConnAck(ack) if ack.session_present),
        "{seen:?}"
    );
    let received: Vec<String> = seen
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(received, ["m0", "m1", "m2", "m3", "m4"]);
}

/// One sample of the gateway's `/metrics`.
fn sample(gw: &Gateway, name: &str) -> f64 {
    let (code, text) = gw.http_get("/metrics");
    assert_eq!(code, 200, "{text}");
    metric(&text, name)
}

/// `gateway_broker_messages_lost_total` from the gateway's `/metrics`.
fn messages_lost(gw: &Gateway) -> u64 {
    sample(gw, "gateway_broker_messages_lost_total") as u64
}

/// The broker's log of a filter holds messages only while someone may read them: while
/// a persistent session is away (which gets them when it resumes), and while the resumed
/// session is subscribed. Once nobody subscribes (the resumed session unsubscribed, which
/// it can like a new one), the log holds nothing, whatever is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_holds_messages_only_while_a_subscriber_may_read_them() {
    let (gw, port) = gateway_v5();
    let held = || sample(&gw, "gateway_broker_log_bytes");
    let topic = "conf/log/held";
    let mut publisher = session_away(port, "held-v5", topic).await;
    for i in 0..10 {
        let mut payload = format!("m{i}-").into_bytes();
        payload.resize(1024, b'x');
        publisher
            .publish(topic, false, &payload, Default::default())
            .await;
    }
    assert!(
        held() >= 10.0 * 1024.0,
        "kept for the session away: {}",
        held()
    );

    let mut back = persistent(port, "held-v5", false, Some(60)).await;
    assert!(back.connack.session_present);
    publisher
        .publish(topic, false, b"resumed", Default::default())
        .await;
    let received = back.until(b"resumed").await;
    assert_eq!(received.len(), 11, "{:?}", payloads(&received));
    assert!(held() > 10.0 * 1024.0, "still read: {}", held());

    back.unsubscribe(topic).await;
    publisher
        .publish(topic, false, b"unread", Default::default())
        .await;
    assert_eq!(held(), 0.0, "nobody reads the log");
    assert_eq!(messages_lost(&gw), 0);
}

/// Offline messages are bounded by the broker's log of the filter (here 2 x 64 KiB):
/// a session away while 400 KiB were published gets the newest ones, in order, and
/// the ones it missed are counted; nothing is missing from either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_beyond_the_log_are_dropped_and_counted() {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    let gw = Gateway::start(&[
        ("GATEWAY__BROKER__LISTEN_V5", &v5),
        ("GATEWAY__BROKER__SEGMENT_BYTES", "65536"),
        ("GATEWAY__BROKER__SEGMENT_COUNT", "1"),
    ]);
    let topic = "conf/offline/overrun";
    let mut publisher = session_away(v5_port, "overrun-v5", topic).await;
    assert_eq!(messages_lost(&gw), 0);
    const PUBLISHED: usize = 400;
    for i in 0..PUBLISHED {
        let mut payload = format!("m{i:03}-").into_bytes();
        payload.resize(1024, b'x');
        publisher
            .publish(topic, false, &payload, Default::default())
            .await;
    }
    let mut back = persistent(v5_port, "overrun-v5", false, Some(60)).await;
    assert!(back.connack.session_present);
    publisher
        .publish(topic, false, b"end", Default::default())
        .await;
    let received = back.until(b"end").await;
    let got: Vec<String> = payloads(&received[..received.len() - 1])
        .into_iter()
        .map(|p| p[..4].to_string())
        .collect();
    let first = PUBLISHED - got.len();
    let expected: Vec<String> = (first..PUBLISHED).map(|i| format!("m{i:03}")).collect();
    assert_eq!(got, expected, "the newest ones, in order");
    assert!(first > 0, "the log was overrun");
    assert_eq!(messages_lost(&gw), first as u64, "every missed one counted");
}
