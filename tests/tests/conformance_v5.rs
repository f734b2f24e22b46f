//! End-to-end MQTT 5 conformance of the embedded broker, on the MQTT 5 listener of the
//! real gateway binary, each behaviour seen by two independent clients: rumqttc's v5
//! client ([`V5Client`]) and paho-mqtt (the scenarios of `tests/python/v5_conformance.py`;
//! skipped without paho unless `GATEWAY_REQUIRE_PAHO` is set).
//!
//! Covered (MQTT 5.0 sections): publish properties delivered unchanged (3.3.2.3), message
//! expiry (3.3.2.3.3, live and retained), No Local, Retain As Published and Retain
//! Handling (3.8.3.1), the client's Maximum Packet Size (3.1.2.11.4), and the gateway's
//! own pipeline still reading MQTT 5 publishes that carry properties. The README's
//! "Broker conformance" table lists these tests.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish, PublishProperties, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use test_support::mqtt5::payloads;
use test_support::{free_port, paho_available, run_paho, wait_until, Gateway, V5Client};

/// A gateway with the MQTT 5 listener; returns it and that listener's port.
fn gateway_v5() -> (Gateway, u16) {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    (
        Gateway::start(&[("GATEWAY__BROKER__LISTEN_V5", &v5)]),
        v5_port,
    )
}

/// A QoS 1 subscription on `path` with the given options.
fn filter(path: &str, nolocal: bool, preserve_retain: bool, rule: RetainForwardRule) -> Filter {
    Filter {
        path: path.to_string(),
        qos: QoS::AtLeastOnce,
        nolocal,
        preserve_retain,
        retain_forward_rule: rule,
    }
}

/// A plain QoS 1 subscription (the 3.1.1 behaviour: retained messages at every subscribe).
fn plain(path: &str) -> Filter {
    filter(path, false, false, RetainForwardRule::OnEverySubscribe)
}

/// The paho scenario `name` on `topic`, parsed; `None` when paho is not installed.
fn paho(name: &str, port: u16, topic: &str) -> Option<Value> {
    if !paho_available() {
        return None;
    }
    let line = run_paho("v5_conformance.py", &[name, &port.to_string(), topic]);
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line}")))
}

/// (payload, retain) of each message a paho scenario reported.
fn paho_flags(received: &Value) -> Vec<(String, bool)> {
    received
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["payload"].as_str().unwrap().to_string(),
                m["retain"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// (payload, retain) of each rumqttc PUBLISH.
fn flags(received: &[Publish]) -> Vec<(String, bool)> {
    payloads(received)
        .into_iter()
        .zip(received.iter().map(|p| p.retain))
        .collect()
}

fn owned(pairs: &[(&str, bool)]) -> Vec<(String, bool)> {
    pairs.iter().map(|(p, r)| (p.to_string(), *r)).collect()
}

fn all_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("replies/rumqttc".into()),
        correlation_data: Some(b"\x00\x01corr".to_vec().into()),
        user_properties: vec![
            ("unit".into(), "celsius".into()),
            ("site".into(), "north".into()),
            ("unit".into(), "kelvin".into()),
        ],
        content_type: Some("application/json".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_reach_subscribers_unchanged() {
    let (_gw, port) = gateway_v5();
    let mut sub = V5Client::connect(port, "props-sub", |_| {}).await;
    sub.subscribe(plain("conf/props/rumqttc")).await;
    let mut publisher = V5Client::connect(port, "props-pub", |_| {}).await;
    publisher
        .publish("conf/props/rumqttc", false, b"{}", all_properties())
        .await;
    let got = sub.next().await;
    // Exactly what was published: order and repeats of user properties included.
    assert_eq!(got.properties, Some(all_properties()));

    let Some(paho) = paho("properties", port, "conf/props/paho") else {
        return;
    };
    let props = &paho["received"][0]["properties"];
    assert_eq!(
        props["UserProperty"],
        json!([["unit", "celsius"], ["site", "north"], ["unit", "kelvin"]]),
        "{paho}"
    );
    assert_eq!(props["ContentType"], "application/json", "{paho}");
    assert_eq!(props["PayloadFormatIndicator"], 1, "{paho}");
    assert_eq!(props["ResponseTopic"], "replies/paho", "{paho}");
    // paho's JSON shows correlation data as hex.
    assert_eq!(props["CorrelationData"], "0001636f7272", "{paho}");
}

/// The gateway's own pipeline ignores the properties it does not use: a reading with
/// user properties, correlation data and a content type is still decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_reads_v5_publishes_that_carry_properties() {
    let (gw, port) = gateway_v5();
    let mut device = V5Client::connect(port, "props-device", |_| {}).await;
    device
        .publish(
            "devices/p-1/telemetry",
            false,
            br#"{"temperature":21.5}"#,
            all_properties(),
        )
        .await;
    wait_until(
        "p-1's reading in /api/devices",
        Duration::from_secs(10),
        || {
            let (_, body) = gw.http_get("/api/devices");
            let v: Value = serde_json::from_str(&body).unwrap();
            v["devices"].as_array().unwrap().iter().any(|d| {
                d["device"] == "p-1" && d["values"]["temperature"] == 21.5 && d["messages"] == 1
            })
        },
    );
}

/// A message still in the log when its interval has passed is not delivered; one
/// delivered late carries the interval that remains (5.0 section 3.3.2.3.3). The
/// subscriber holds back its PUBACKs so that its 100 inflight slots stay full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_is_not_delivered_and_a_late_one_has_its_remaining_interval() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/expiry/live";
    let mut sub = V5Client::connect(port, "exp-sub", |o| {
        o.set_manual_acks(true);
    })
    .await;
    sub.subscribe(plain(topic)).await;
    let mut publisher = V5Client::connect(port, "exp-pub", |_| {}).await;
    for i in 0..100 {
        let payload = format!("fill-{i}");
        publisher
            .publish(topic, false, payload.as_bytes(), Default::default())
            .await;
    }
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    publisher.publish(topic, false, b"gone", expiring(1)).await;
    publisher.publish(topic, false, b"late", expiring(60)).await;
    publisher
        .publish(topic, false, b"last", Default::default())
        .await;
    let held = sub.until(b"fill-99").await;
    assert_eq!(held.len(), 100);
    tokio::time::sleep(Duration::from_millis(1600)).await; // "gone" expires meanwhile
    for p in &held {
        sub.client.ack(p).await.unwrap();
    }
    let rest = sub.until(b"last").await;
    for p in &rest {
        sub.client.ack(p).await.unwrap();
    }
    assert_eq!(payloads(&rest), ["late", "last"]);
    // 60 s minus the 1.6 s and more it waited, rounded up.
    let remaining = rest[0].properties.as_ref().unwrap().message_expiry_interval;
    assert!(matches!(remaining, Some(55..=59)), "{remaining:?}");
}

/// A retained message keeps its properties, and its expiry counts from when it was
/// published: a subscriber after 1.1 s of 3 s gets 2 s left, one after 3.3 s gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_keep_their_properties_and_expire() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/expiry/retained";
    let mut publisher = V5Client::connect(port, "ret-pub", |_| {}).await;
    let props = PublishProperties {
        message_expiry_interval: Some(3),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publisher
        .publish(topic, true, b"expiring", props.clone())
        .await;
    let published = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 0..2 {
        // Two subscribers: reading a retained message must not shorten it for the next.
        let mut early = V5Client::connect(port, &format!("ret-early-{n}"), |_| {}).await;
        early.subscribe(plain(topic)).await;
        let got = early.next().await;
        assert_eq!(got.payload.as_ref(), b"expiring");
        assert!(got.retain);
        let got_props = got.properties.unwrap();
        assert_eq!(got_props.user_properties, props.user_properties);
        assert_eq!(got_props.message_expiry_interval, Some(2), "subscriber {n}");
    }
    tokio::time::sleep_until(published + Duration::from_millis(3300)).await;
    let mut late = V5Client::connect(port, "ret-late", |_| {}).await;
    late.subscribe(plain(topic)).await;
    publisher
        .publish(topic, false, b"marker", Default::default())
        .await;
    assert_eq!(payloads(&late.until(b"marker").await), ["marker"]);

    let Some(paho) = paho("retained_expiry", port, "conf/expiry/paho") else {
        return;
    };
    let early = &paho["early"][0];
    assert_eq!(early["payload"], "expiring", "{paho}");
    assert_eq!(early["retain"], true, "{paho}");
    assert_eq!(early["properties"]["MessageExpiryInterval"], 2, "{paho}");
    assert_eq!(
        early["properties"]["UserProperty"],
        json!([["k", "v"]]),
        "{paho}"
    );
    assert_eq!(paho_flags(&paho["late"]), owned(&[("marker-late", false)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_subscriptions_do_not_get_the_clients_own_messages() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/nolocal/rumqttc";
    let mut own = V5Client::connect(port, "nolocal-own", |_| {}).await;
    own.subscribe(filter(
        topic,
        true,
        false,
        RetainForwardRule::OnEverySubscribe,
    ))
    .await;
    let mut other = V5Client::connect(port, "nolocal-other", |_| {}).await;
    other.subscribe(plain(topic)).await;
    own.publish(topic, false, b"own", Default::default()).await;
    other
        .publish(topic, false, b"other", Default::default())
        .await;
    assert_eq!(payloads(&own.until(b"other").await), ["other"]);
    assert_eq!(payloads(&other.until(b"other").await), ["own", "other"]);

    let Some(paho) = paho("no_local", port, "conf/nolocal/paho") else {
        return;
    };
    assert_eq!(paho_flags(&paho["nolocal"]), owned(&[("other", false)]));
    assert_eq!(
        paho_flags(&paho["control"]),
        owned(&[("own", false), ("other", false)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_keeps_the_flag_and_others_see_it_cleared() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/rap/rumqttc";
    let mut publisher = V5Client::connect(port, "rap-pub", |_| {}).await;
    publisher
        .publish(topic, true, b"first", Default::default())
        .await;
    let mut keep = V5Client::connect(port, "rap-keep", |_| {}).await;
    keep.subscribe(filter(
        topic,
        false,
        true,
        RetainForwardRule::OnEverySubscribe,
    ))
    .await;
    let mut clear = V5Client::connect(port, "rap-clear", |_| {}).await;
    clear.subscribe(plain(topic)).await;
    publisher
        .publish(topic, true, b"second", Default::default())
        .await;
    publisher
        .publish(topic, false, b"third", Default::default())
        .await;
    // A retained message sent for the subscription has the flag either way.
    let expected_keep = owned(&[("first", true), ("second", true), ("third", false)]);
    let expected_clear = owned(&[("first", true), ("second", false), ("third", false)]);
    assert_eq!(flags(&keep.until(b"third").await), expected_keep);
    assert_eq!(flags(&clear.until(b"third").await), expected_clear);

    let Some(paho) = paho("retain_as_published", port, "conf/rap/paho") else {
        return;
    };
    assert_eq!(paho_flags(&paho["keep"]), expected_keep, "{paho}");
    assert_eq!(paho_flags(&paho["clear"]), expected_clear, "{paho}");
}

/// Retain Handling 0 sends the retained message at every SUBSCRIBE (also one repeating
/// an existing subscription), 1 only when the subscription is new, 2 never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_decides_when_retained_messages_are_sent() {
    let (_gw, port) = gateway_v5();
    let mut publisher = V5Client::connect(port, "rh-pub", |_| {}).await;
    let expected = [
        vec!["kept", "m1", "kept", "m2"],
        vec!["kept", "m1", "m2"],
        vec!["m1", "m2"],
    ];
    let rules = [
        RetainForwardRule::OnEverySubscribe,
        RetainForwardRule::OnNewSubscribe,
        RetainForwardRule::Never,
    ];
    for (handling, rule) in rules.into_iter().enumerate() {
        let topic = format!("conf/rh/rumqttc/rh{handling}");
        publisher
            .publish(&topic, true, b"kept", Default::default())
            .await;
        let mut sub = V5Client::connect(port, &format!("rh{handling}"), |_| {}).await;
        sub.subscribe(filter(&topic, false, false, rule.clone()))
            .await;
        publisher
            .publish(&topic, false, b"m1", Default::default())
            .await;
        let mut got = sub.until(b"m1").await;
        sub.subscribe(filter(&topic, false, false, rule)).await;
        publisher
            .publish(&topic, false, b"m2", Default::default())
            .await;
        got.extend(sub.until(b"m2").await);
        assert_eq!(
            payloads(&got),
            expected[handling],
            "retain handling {handling}"
        );
    }

    let Some(paho) = paho("retain_handling", port, "conf/rh/paho") else {
        return;
    };
    for (handling, expected) in expected.iter().enumerate() {
        let got: Vec<String> = paho_flags(&paho[handling.to_string()])
            .into_iter()
            .map(|(payload, _)| payload)
            .collect();
        assert_eq!(&got, expected, "paho, retain handling {handling}: {paho}");
    }
}

/// A message bigger than a subscriber's Maximum Packet Size is not sent to it (and its
/// connection stays up); other subscribers still get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_bigger_than_the_clients_maximum_packet_size_are_not_sent_to_it() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/mps/rumqttc";
    let mut small = V5Client::connect(port, "mps-small", |o| {
        o.set_max_packet_size(Some(200));
    })
    .await;
    small.subscribe(plain(topic)).await;
    let mut control = V5Client::connect(port, "mps-control", |_| {}).await;
    control.subscribe(plain(topic)).await;
    let mut publisher = V5Client::connect(port, "mps-pub", |_| {}).await;
    let big = vec![b'x'; 1000];
    publisher
        .publish(topic, false, &big, Default::default())
        .await;
    publisher
        .publish(topic, false, b"small", Default::default())
        .await;
    assert_eq!(payloads(&small.until(b"small").await), ["small"]);
    let to_control = control.until(b"small").await;
    assert_eq!(to_control.len(), 2);
    assert_eq!(to_control[0].payload.len(), 1000);

    let Some(paho) = paho("max_packet_size", port, "conf/mps/paho") else {
        return;
    };
    assert_eq!(paho_flags(&paho["small"]), owned(&[("small", false)]));
    let control = paho["control"].as_array().unwrap();
    assert_eq!(control.len(), 2, "{paho}");
    assert_eq!(control[0]["payload"].as_str().unwrap().len(), 1000);
}
