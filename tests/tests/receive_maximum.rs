//! End-to-end MQTT 5 flow control (Receive Maximum, 5.0 sections 3.1.2.11.3, 3.2.2.3.3
//! and 4.9) of the embedded broker, on the MQTT 5 listener of the real gateway binary,
//! with rumqttc's v5 client ([`V5Client`]) and paho-mqtt (`tests/python/v5_conformance.py`,
//! skipped without paho unless `GATEWAY_REQUIRE_PAHO` is set).
//!
//! Covered: the broker never has more unacknowledged QoS 1 forwards in flight to a
//! client than the Receive Maximum of its CONNECT; it announces its own Receive Maximum
//! (`broker.max_inflight`) in CONNACK, disconnects a client that exceeds it (reason
//! 0x93), and serves one that keeps within it.

use rumqttc::v5::mqttbytes::v5::Filter;
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
    sub.subscribe(Filter::new(topic, QoS::AtLeastOnce)).await;
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
        sub.subscribe(Filter::new("conf/rm/sync", QoS::AtLeastOnce))
            .await;
        sub.subscribe(Filter::new("conf/rm/sync", QoS::AtLeastOnce))
            .await;
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

/// An MQTT 5 packet of type `header` with `body` (remaining length < 128).
fn packet(header: u8, body: Vec<u8>) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![header, body.len() as u8];
    p.extend(body);
    p
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// The packets in `bytes` as (first header byte, body).
fn split_packets(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut packets = Vec::new();
    while !bytes.is_empty() {
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let b = bytes[i];
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        packets.push((bytes[0], bytes[i..i + len].to_vec()));
        bytes = &bytes[i + len..];
    }
    packets
}

/// A client that sends more QoS 1 publishes at once than the broker's Receive Maximum
/// (written by hand: rumqttc and paho keep within it) is disconnected with reason 0x93.
#[test]
fn a_client_exceeding_the_brokers_receive_maximum_is_disconnected_with_0x93() {
    use std::io::{Read, Write};

    let (_gw, port) = gateway_v5();
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // CONNECT: "MQTT" 5, clean start, keep alive 30, no properties, client id.
    let mut connect = string("MQTT");
    connect.extend([5, 0x02, 0, 30, 0]);
    connect.extend(string("rm-greedy"));
    socket.write_all(&packet(0x10, connect)).unwrap();
    // 20 QoS 1 publishes in one write, against a Receive Maximum of 7.
    let mut burst = Vec::new();
    for pkid in 1..=20u16 {
        let mut body = string("devices/rm-greedy/telemetry");
        body.extend(pkid.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(br#"{"temperature":20}"#);
        burst.extend(packet(0x32, body));
    }
    socket.write_all(&burst).unwrap();
    let mut received = Vec::new();
    socket
        .read_to_end(&mut received)
        .expect("the broker closes the connection");
    let packets = split_packets(&received);
    assert_eq!(packets[0].0, 0x20, "CONNACK first: {packets:?}");
    let last = packets.last().unwrap();
    assert_eq!(last.0, 0xE0, "DISCONNECT last: {packets:?}");
    assert_eq!(
        last.1[0], 0x93,
        "reason Receive Maximum exceeded: {packets:?}"
    );
}

/// rumqttc keeps within the broker's Receive Maximum by itself: 20 publishes queued at
/// once are all acknowledged, and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_within_the_brokers_receive_maximum_is_served() {
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};

    let (_gw, port) = gateway_v5();
    let mut opts = MqttOptions::new("rm-polite", "127.0.0.1", port);
    opts.set_keep_alive(std::time::Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    for i in 0..20 {
        let payload = format!(r#"{{"temperature":{i}}}"#);
        client
            .publish(
                "devices/rm-polite/telemetry",
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let acked = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut acked = 0;
        while acked < 20 {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
                Ok(Event::Incoming(Incoming::Disconnect(d))) => panic!("disconnected: {d:?}"),
                Ok(_) => {}
                Err(e) => panic!("connection failed after {acked} PUBACKs: {e}"),
            }
        }
        acked
    })
    .await
    .expect("20 PUBACKs within 20 s");
    assert_eq!(acked, 20);
}
