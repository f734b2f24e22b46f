//! End-to-end: the embedded broker delivers a message at the lower of its publish QoS
//! and the subscription's granted QoS (MQTT 3.1.1 section 3.3.5, 5.0 section 3.8.4), on
//! both listeners of the real gateway binary, seen by two independent clients: rumqttc
//! (3.1.1 and 5.0) and the Mosquitto clients (`mosquitto_sub -d` prints the QoS of each
//! PUBLISH it receives). The gateway's own events are published at QoS 1, so a
//! subscriber keeps getting them at the QoS it subscribed with.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use test_support::{free_port, Gateway};

/// (publish QoS, subscription QoS) combinations; payloads carry the publish QoS.
const QOS_PAIRS: [(u8, u8); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// A gateway with both MQTT listeners; returns it and the MQTT 5 port.
fn gateway_v4_v5(extra: &[(&str, &str)]) -> (Gateway, u16) {
    let v5_port = free_port();
    let v5 = format!("127.0.0.1:{v5_port}");
    let mut env = vec![("GATEWAY__BROKER__LISTEN_V5", v5.as_str())];
    env.extend_from_slice(extra);
    (Gateway::start(&env), v5_port)
}

fn topic(version: &str, subscribe_qos: u8) -> String {
    format!("devices/qos-{version}-sub{subscribe_qos}/telemetry")
}

/// Checks one received PUBLISH: (topic, payload `{"p":N}` with the publish QoS, QoS, pkid).
fn check(version: &str, topic: &str, payload: &[u8], qos: u8, pkid: u16) {
    let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
    let publish_qos = json["p"].as_u64().unwrap() as u8;
    let subscribe_qos = if topic.ends_with("sub1/telemetry") {
        1
    } else {
        0
    };
    let expected = publish_qos.min(subscribe_qos);
    assert_eq!(
        qos, expected,
        "{version}: publish QoS {publish_qos}, subscription QoS {subscribe_qos}"
    );
    assert_eq!(
        pkid == 0,
        qos == 0,
        "{version}: QoS {qos} with packet id {pkid}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v4_receives_the_lower_of_publish_and_subscription_qos() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (gw, _) = gateway_v4_v5(&[]);
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("qos-v4", "127.0.0.1", gw.port), 10);
    let qos = |q: u8| {
        if q == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    };
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        for s in [0, 1] {
            client.subscribe(topic("v4", s), qos(s)).await.unwrap();
        }
        let (mut subacks, mut received) = (0, Vec::new());
        while received.len() < QOS_PAIRS.len() {
            match eventloop.poll().await.expect("v4 client") {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 2 {
                        for (p, s) in QOS_PAIRS {
                            let payload = format!("{{\"p\":{p}}}");
                            client
                                .publish(topic("v4", s), qos(p), false, payload)
                                .await
                                .unwrap();
                        }
                    }
                }
                Event::Incoming(Packet::Publish(p)) => received.push(p),
                _ => {}
            }
        }
        received
    })
    .await
    .expect("four messages within 10 s");
    for p in received {
        check("v4", &p.topic, &p.payload, p.qos as u8, p.pkid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_receives_the_lower_of_publish_and_subscription_qos() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    let (_gw, v5_port) = gateway_v4_v5(&[]);
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("qos-v5", "127.0.0.1", v5_port), 10);
    let qos = |q: u8| {
        if q == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    };
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        for s in [0, 1] {
            client.subscribe(topic("v5", s), qos(s)).await.unwrap();
        }
        let (mut subacks, mut received) = (0, Vec::new());
        while received.len() < QOS_PAIRS.len() {
            match eventloop.poll().await.expect("v5 client") {
                Event::Incoming(Incoming::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 2 {
                        for (p, s) in QOS_PAIRS {
                            let payload = format!("{{\"p\":{p}}}");
                            client
                                .publish(topic("v5", s), qos(p), false, payload)
                                .await
                                .unwrap();
                        }
                    }
                }
                Event::Incoming(Incoming::Publish(p)) => received.push(p),
                _ => {}
            }
        }
        received
    })
    .await
    .expect("four messages within 10 s");
    for p in received {
        let topic = String::from_utf8(p.topic.to_vec()).unwrap();
        check("v5", &topic, &p.payload, p.qos as u8, p.pkid);
    }
}

/// True when the Mosquitto clients are installed; without them the test is skipped,
/// unless CI requires them (`GATEWAY_REQUIRE_MOSQUITTO`).
fn mosquitto_clients() -> bool {
    let found = Command::new("mosquitto_sub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("GATEWAY_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto_sub is required (GATEWAY_REQUIRE_MOSQUITTO)"
        );
        eprintln!("mosquitto_sub not installed: test skipped");
    }
    found
}

/// `mosquitto_sub -d` (line-buffered through `stdbuf`) whose output lines arrive on a
/// channel; killed when dropped.
struct MosquittoSub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl MosquittoSub {
    /// Starts the subscriber and waits for its SUBACK.
    fn start(port: u16, version: &str, topic: &str, qos: u8) -> MosquittoSub {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-d", "-h", "127.0.0.1"])
            .args(["-p", &port.to_string(), "-V", version, "-t", topic])
            .args([
                "-q",
                &qos.to_string(),
                "-i",
                &format!("sub-{}", free_port()),
            ])
            .args(["-W", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("stdbuf mosquitto_sub");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sub = MosquittoSub { child, lines };
        sub.wait_line("received SUBACK");
        sub
    }

    /// The next output line containing `needle`, waiting at most 10 s.
    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub: no line with {needle:?} within 10 s ({e})"),
            }
        }
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub` one message; panics unless it exits successfully within 10 s
/// (coreutils' `timeout` bounds it).
fn mosquitto_pub(port: u16, version: &str, topic: &str, qos: u8, payload: &str) {
    let out = Command::new("timeout")
        .args([
            "10",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args([
            "-V",
            version,
            "-t",
            topic,
            "-q",
            &qos.to_string(),
            "-m",
            payload,
        ])
        .output()
        .expect("timeout mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub {version} (status {}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The QoS of a PUBLISH in a `mosquitto_sub -d` line:
/// `Client x received PUBLISH (d0, q1, r0, m1, 'topic', ... (2 bytes))`.
fn received_qos(line: &str) -> u8 {
    let at = line.find("(d").expect("PUBLISH flags") + 1;
    let flags: Vec<&str> = line[at..].splitn(3, ", ").collect();
    flags[1].trim_start_matches('q').parse().expect("qos")
}

#[test]
fn mosquitto_clients_receive_the_lower_of_publish_and_subscription_qos() {
    if !mosquitto_clients() {
        return;
    }
    let (gw, v5_port) = gateway_v4_v5(&[]);
    for (port, version) in [(gw.port, "mqttv311"), (v5_port, "mqttv5")] {
        for (publish_qos, subscribe_qos) in QOS_PAIRS {
            let topic = format!("devices/mq-{version}-{publish_qos}{subscribe_qos}/telemetry");
            let mut sub = MosquittoSub::start(port, version, &topic, subscribe_qos);
            mosquitto_pub(port, version, &topic, publish_qos, "{}");
            let line = sub.wait_line("received PUBLISH");
            assert_eq!(
                received_qos(&line),
                publish_qos.min(subscribe_qos),
                "{version}: publish QoS {publish_qos}, subscription QoS {subscribe_qos}: {line}"
            );
        }
    }
}

/// The gateway publishes its events at QoS 1: a QoS 1 subscriber gets them at QoS 1
/// (as before delivery QoS became the lower of the two), a QoS 0 one at QoS 0.
#[test]
fn events_reach_a_qos_1_subscriber_at_qos_1() {
    if !mosquitto_clients() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("hot.toml"),
        "[[rule]]\nname = \"hot\"\nevent = \"Hot\"\ncondition = \"heat > 10.0\"\n",
    )
    .unwrap();
    // start_in points rules.dir at <dir>/rules.
    let gw = Gateway::start_in(dir, &[]);
    gw.wait_log("Rules loaded.", Duration::from_secs(5));
    let mut qos1 = MosquittoSub::start(gw.port, "mqttv311", "events/Hot/+", 1);
    let mut qos0 = MosquittoSub::start(gw.port, "mqttv311", "events/+/h-1", 0);
    mosquitto_pub(
        gw.port,
        "mqttv311",
        "devices/h-1/telemetry",
        0,
        r#"{"heat":20}"#,
    );
    let line = qos1.wait_line("received PUBLISH");
    assert!(line.contains("events/Hot/h-1"), "{line}");
    assert_eq!(received_qos(&line), 1, "{line}");
    let line = qos0.wait_line("received PUBLISH");
    assert_eq!(received_qos(&line), 0, "{line}");
}
