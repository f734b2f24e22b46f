//! End-to-end conformance of the embedded broker with MQTT 3.1.1 and 5.0 keep alive 0
//! (section 3.1.2.10 of both), against the real gateway binary with two independent
//! clients: rumqttc (3.1.1; its MQTT 5 client refuses keep alives under 5 s) and MQTT
//! packets written by hand over a `TcpStream` (3.1.1 and 5.0; the Mosquitto clients
//! refuse `-k 0`).
//!
//! Covered: keep alive 0 gets a CONNACK, publishes and receives, is never timed out
//! while keep alive 1 s still is (and a client that keeps talking is not), and accepted
//! sockets carry TCP keepalive instead.
//! Delivery QoS is in `delivery_qos.rs`. The README's "Broker conformance" table lists
//! these tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use test_support::{free_port, wait_until, Gateway, TestCa};

/// A gateway with both MQTT listeners; returns it and the MQTT 5 port.
fn gateway_v4_v5() -> (Gateway, u16) {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    (
        Gateway::start(&[("GATEWAY__BROKER__LISTEN_V5", &v5)]),
        v5_port,
    )
}

/// MQTT protocol level byte of the CONNECT: 4 is 3.1.1, 5 is 5.0.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    V311 = 4,
    V5 = 5,
}

/// Opens a TCP connection, sends a clean-session CONNECT written by hand with the given
/// keep alive, and returns the stream once a successful CONNACK arrived.
fn raw_connect(port: u16, version: Version, client_id: &str, keep_alive: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version as u8, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if version == Version::V5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    stream.write_all(&packet).unwrap();

    let mut header = [0u8; 2];
    stream
        .read_exact(&mut header)
        .unwrap_or_else(|e| panic!("{version:?} keep alive {keep_alive}: no CONNACK: {e}"));
    assert_eq!(header[0], 0x20, "{version:?}: not a CONNACK");
    let mut rest = vec![0u8; header[1] as usize];
    stream.read_exact(&mut rest).unwrap();
    // Byte 2 of the variable header: the 3.1.1 return code / 5.0 reason code.
    assert_eq!(rest[1], 0, "{version:?}: CONNACK refused: {rest:?}");
    stream
}

/// Sends PINGREQ and waits (bounded by the read timeout) for PINGRESP.
fn ping(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&[0xC0, 0])?;
    let mut resp = [0u8; 2];
    stream.read_exact(&mut resp)?;
    assert_eq!(resp, [0xD0, 0], "not a PINGRESP");
    Ok(())
}

/// True once the peer has closed `stream` (read returns 0 or an error other than a
/// timeout), waiting at most `timeout`.
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 16];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn keep_alive_0_gets_a_connack_on_v4_and_v5() {
    let (gw, v5_port) = gateway_v4_v5();
    for (port, version) in [(gw.port, Version::V311), (v5_port, Version::V5)] {
        let mut stream = raw_connect(port, version, &format!("ka0-{version:?}"), 0);
        ping(&mut stream).unwrap_or_else(|e| panic!("{version:?}: no PINGRESP: {e}"));
    }
}

#[test]
fn an_idle_keep_alive_0_connection_is_never_timed_out() {
    let (gw, v5_port) = gateway_v4_v5();
    for (port, version) in [(gw.port, Version::V311), (v5_port, Version::V5)] {
        let mut idle = raw_connect(port, version, &format!("idle-{version:?}"), 0);
        // The control: keep alive 1 s is enforced (closed after 1.5 s of silence), so
        // the idle connection has now been silent longer than that would allow.
        let mut short = raw_connect(port, version, &format!("short-{version:?}"), 1);
        let started = Instant::now();
        assert!(
            closed_within(&mut short, Duration::from_secs(5)),
            "{version:?}: a keep alive 1 s connection stayed open for 5 s"
        );
        assert!(started.elapsed() >= Duration::from_millis(1400));
        std::thread::sleep(Duration::from_millis(500)); // past 1.5 s for certain
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ping(&mut idle).unwrap_or_else(|e| panic!("{version:?}: idle keep alive 0 closed: {e}"));
    }
}

#[test]
fn a_client_that_keeps_talking_outlives_its_keep_alive_and_is_closed_once_silent() {
    // The keep alive is one timer per connection, set at connect and checked when it
    // fires (vendor/rumqttd PATCHES.md, 22): a client that sends a packet every 400 ms
    // with keep alive 1 s must stay connected well past the first 1.5 s, and be closed
    // within 1.5 s (plus the timer's check) of going silent.
    let (gw, v5_port) = gateway_v4_v5();
    for (port, version) in [(gw.port, Version::V311), (v5_port, Version::V5)] {
        let mut talker = raw_connect(port, version, &format!("talker-{version:?}"), 1);
        talker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for i in 0..10 {
            std::thread::sleep(Duration::from_millis(400));
            ping(&mut talker)
                .unwrap_or_else(|e| panic!("{version:?}: closed while talking, ping {i}: {e}"));
        }
        let silent_since = Instant::now();
        assert!(
            closed_within(&mut talker, Duration::from_secs(5)),
            "{version:?}: a keep alive 1 s connection stayed open for 5 s of silence"
        );
        let silence = silent_since.elapsed();
        assert!(
            silence >= Duration::from_millis(1400),
            "{version:?}: closed after {silence:?} of silence, before 1.5 x keep alive"
        );
    }
}

/// Timer field (`tr`) of the gateway's side of the connection `client` from
/// /proc/net/tcp: 2 means the keepalive timer is armed.
fn server_side_timer(server_port: u16, client: &TcpStream) -> Option<u8> {
    let client_port = client.local_addr().unwrap().port();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        (port(fields[1])? == server_port && port(fields[2])? == client_port)
            .then(|| u8::from_str_radix(fields[5].split(':').next()?, 16).ok())?
    })
}

#[test]
fn accepted_device_sockets_have_tcp_keepalive() {
    let pki = tempfile::tempdir().unwrap();
    let server = TestCa::new("ca").issue(pki.path(), "gateway", &["127.0.0.1"]);
    let (v5_port, tls_port) = (free_port(), free_port());
    let (v5, tls) = (
        format!("127.0.0.1:{v5_port}"),
        format!("127.0.0.1:{tls_port}"),
    );
    let (cert, key) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );
    let gw = Gateway::start(&[
        ("GATEWAY__BROKER__LISTEN_V5", &v5),
        ("GATEWAY__BROKER__LISTEN_TLS", &tls),
        ("GATEWAY__BROKER__TLS_CERT", &cert),
        ("GATEWAY__BROKER__TLS_KEY", &key),
    ]);
    for (port, version) in [(gw.port, Version::V311), (v5_port, Version::V5)] {
        let stream = raw_connect(port, version, &format!("tcp-ka-{version:?}"), 30);
        assert_eq!(
            server_side_timer(port, &stream),
            Some(2),
            "{version:?}: the gateway's socket has no keepalive timer"
        );
    }
    // The TLS listener's device socket, right after accept (no handshake needed).
    let stream = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    wait_until(
        "keepalive on the TLS device socket",
        Duration::from_secs(5),
        || server_side_timer(tls_port, &stream) == Some(2),
    );
}

/// rumqttc's MQTT 3.1.1 client with keep alive 0 (its MQTT 5 client refuses less than
/// 5 s; the Mosquitto clients cover 5.0 below) publishes and receives its own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_with_keep_alive_0_publishes_and_receives() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (gw, _) = gateway_v4_v5();
    let mut opts = MqttOptions::new("ka0-rumqttc", "127.0.0.1", gw.port);
    opts.set_keep_alive(Duration::ZERO);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("devices/ka0/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("devices/ka0/telemetry", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await.expect("keep alive 0 connection") {
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("own message within 10 s");
    assert_eq!(received.payload.as_ref(), b"{}");
}

/// Writes one packet: `first` byte, one-byte remaining length, `body`.
fn send(stream: &mut TcpStream, first: u8, body: &[u8]) {
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![first, body.len() as u8];
    packet.extend_from_slice(body);
    stream.write_all(&packet).unwrap();
}

/// Reads one packet with a short remaining length: (first byte, body).
fn receive(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).expect("a packet in time");
    assert!(header[1] < 128, "one-byte remaining length");
    let mut body = vec![0u8; header[1] as usize];
    stream.read_exact(&mut body).unwrap();
    (header[0], body)
}

/// `len` as a two-byte length followed by `s`.
fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

#[test]
fn raw_keep_alive_0_clients_publish_and_receive_on_v4_and_v5() {
    let (gw, v5_port) = gateway_v4_v5();
    for (port, version) in [(gw.port, Version::V311), (v5_port, Version::V5)] {
        let topic = format!("devices/raw-{version:?}/telemetry");
        let mut stream = raw_connect(port, version, &format!("raw-{version:?}"), 0);
        let v5_properties: &[u8] = if version == Version::V5 { &[0] } else { &[] };
        // SUBSCRIBE packet id 1, QoS 0.
        let mut body = vec![0, 1];
        body.extend_from_slice(v5_properties);
        body.extend(string(&topic));
        body.push(0);
        send(&mut stream, 0x82, &body);
        let (first, _) = receive(&mut stream);
        assert_eq!(first, 0x90, "{version:?}: not a SUBACK");
        // PUBLISH QoS 0.
        let mut body = string(&topic);
        body.extend_from_slice(v5_properties);
        body.extend_from_slice(b"{\"n\":1}");
        send(&mut stream, 0x30, &body);
        let (first, body) = receive(&mut stream);
        assert_eq!(first, 0x30, "{version:?}: not a QoS 0 PUBLISH");
        assert!(body.ends_with(b"{\"n\":1}"), "{version:?}: {body:?}");
    }
}

/// Packets bigger than a connection's first read buffer (2 KiB, grown on demand: patch
/// 20 in `vendor/rumqttd/PATCHES.md`) arrive whole, back to back with small ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_larger_than_the_read_buffer_arrive_whole() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (gw, _) = gateway_v4_v5();
    let opts = MqttOptions::new("big-rumqttc", "127.0.0.1", gw.port);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let topic = "devices/big/telemetry";
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let sizes = [1usize, 2_000, 2_048, 2_100, 9_000, 30, 5_000, 10];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| format!(r#"{{"i":{i},"blob":"{}"}}"#, "x".repeat(n)).into_bytes())
        .collect();
    for p in &payloads {
        client
            .publish(topic, QoS::AtLeastOnce, false, p.clone())
            .await
            .unwrap();
    }
    let (received, acked) = tokio::time::timeout(Duration::from_secs(20), async {
        let (mut received, mut acked) = (Vec::new(), 0);
        while received.len() < payloads.len() || acked < payloads.len() {
            match eventloop.poll().await.expect("connection") {
                Event::Incoming(Packet::Publish(p)) => received.push(p.payload.to_vec()),
                Event::Incoming(Packet::PubAck(_)) => acked += 1,
                _ => {}
            }
        }
        (received, acked)
    })
    .await
    .expect("every publish back and acknowledged within 20 s");
    assert_eq!(acked, payloads.len());
    assert!(received == payloads, "payloads changed on the way");
}
