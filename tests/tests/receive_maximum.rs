//! End-to-end MQTT 5 flow control (Receive Maximum, 5.0 sections 3.1.2.11.3, 3.2.2.3.3
//! and 4.9) of the embedded broker, on the MQTT 5 listener of the real gateway binary,
//! with rumqttc's v5 client ([`V5Client`]) and paho-mqtt (`tests/python/v5_conformance.py`,
//! skipped without paho unless `GATEWAY_REQUIRE_PAHO` is set).
//!
//! Covered: the broker never has more unacknowledged QoS 1 forwards in flight to a
//! client than the Receive Maximum of its CONNECT, and it announces its own Receive
//! Maximum (`broker.max_inflight`) in CONNACK.

use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use test_support::mqtt5::payloads;
use test_support::{free_port, paho_available, run_paho, Gateway, V5Client};

/// `broker.max_inflight` of the gateway under test: the Receive Maximum it announces.
const BROKER_RECEIVE_MAXIMUM: u16 = 7;

/// A gateway with the MQTT 5 listener and `broker.max_inflight` = 7; returns it and that
/// listener's port.
fn gateway_v5() -> (Gateway, u16) {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    let max_inflight = BROKER_RECEIVE_MAXIMUM.to_string();
    (
        Gateway::start(&[
            ("GATEWAY__BROKER__LISTEN_V5", &v5),
            ("GATEWAY__BROKER__MAX_INFLIGHT", &max_inflight),
        ]),
        v5_port,
    )
}

fn qos1(path: &str) -> Filter {
    Filter {
        path: path.to_string(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_announces_its_receive_maximum() {
    let (_gw, port) = gateway_v5();
    let client = V5Client::connect(port, "rm-announce", |_| {}).await;
    let props = client
        .connack
        .properties
        .as_ref()
        .expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(BROKER_RECEIVE_MAXIMUM));
}

/// A subscriber with Receive Maximum 2 that holds back its PUBACKs gets two messages,
/// then nothing more (checked after two round trips through the broker) until it
/// acknowledges them; all ten arrive in order in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_forwards_in_flight_than_the_clients_receive_maximum() {
    let (_gw, port) = gateway_v5();
    let topic = "conf/rm/rumqttc";
    let mut sub = V5Client::connect(port, "rm-sub", |o| {
        o.set_manual_acks(true);
        o.set_receive_maximum(Some(2));
    })
    .await;
    sub.subscribe(qos1(topic)).await;
    let mut publisher = V5Client::connect(port, "rm-pub", |_| {}).await;
    for i in 0..10 {
        let payload = format!("m{i}");
        publisher
            .publish(topic, false, payload.as_bytes(), Default::default())
            .await;
    }

    let mut windows = Vec::new();
    let mut received = Vec::new();
    while received.len() < 10 {
        let window = vec![sub.next().await, sub.next().await];
        // Round trips through the broker: a third forward would have come meanwhile.
        sub.subscribe(qos1("conf/rm/sync")).await;
        sub.subscribe(qos1("conf/rm/sync")).await;
        windows.push(2 + sub.buffered());
        for p in &window {
            sub.client.ack(p).await.unwrap();
        }
        received.extend(window);
    }
    assert_eq!(windows, [2, 2, 2, 2, 2], "messages in flight per round");
    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&received), expected);

    if !paho_available() {
        return;
    }
    let line = run_paho(
        "v5_conformance.py",
        &["receive_maximum", &port.to_string(), "conf/rm/paho"],
    );
    let paho: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        paho["broker_receive_maximum"], BROKER_RECEIVE_MAXIMUM,
        "{paho}"
    );
    assert_eq!(
        paho["windows"],
        serde_json::json!([["m0", "m1"], ["m2", "m3"], ["m4", "m5"]]),
        "{paho}"
    );
}
