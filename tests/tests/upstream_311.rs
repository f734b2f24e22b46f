//! The MQTT 3.1.1 upstream through the real binary: `upstream.protocol = "3.1.1"` against
//! the MQTT 3.1.1 listener of an rumqttd in this process (a listener that refuses MQTT 5).
//! A consumer on the same broker gets every reading and event as the JSON envelope
//! `{"id","replayed","content_type","payload"}` (CBOR payloads base64-encoded), ids
//! unique, `replayed` set for the backlog sent after an upstream outage, and the presence
//! status as plain JSON. Downlink commands arrive over 3.1.1 too (acked after their
//! commit), and their status messages come back in the envelope.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use test_support::{publish_all, wait_until_async, Collector, Gateway, Proxy, Received, Rumqttd};

const GATEWAY_ID: &str = "gw-311";

/// A rule without `for`: fires on the first reading with `heat > 10`, resolves on the
/// first without.
const HOT_RULE: &str = "[[rule]]\nname = \"hot\"\nevent = \"Hot\"\ncondition = \"heat > 10.0\"\n";

/// The envelope of a forwarded message, parsed.
struct Enveloped {
    topic: String,
    id: String,
    replayed: bool,
    content_type: String,
    body: Value,
}

fn envelope(m: &Received) -> Enveloped {
    assert_eq!(
        m.id, None,
        "MQTT 3.1.1 has no user properties: the id cannot come as one"
    );
    let v: Value = serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("{}: not a JSON envelope ({e}): {:?}", m.topic, m.payload));
    let field = |k: &str| v.get(k).unwrap_or_else(|| panic!("no {k} in {v}"));
    Enveloped {
        topic: m.topic.clone(),
        id: field("id").as_str().expect("id is a string").to_owned(),
        replayed: field("replayed").as_bool().expect("replayed is a bool"),
        content_type: field("content_type").as_str().unwrap().to_owned(),
        body: field("payload").clone(),
    }
}

/// `/api/status` of the gateway.
fn status(gw: &Gateway) -> Value {
    let (code, body) = gw.http_get("/api/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_upstream(gw: &Gateway, state: &str) {
    wait_until_async(
        &format!("upstream {state}"),
        Duration::from_secs(15),
        || status(gw)["upstream"]["state"] == state,
    )
    .await;
}

/// True once an MQTT 5 CONNECT to `port` has been answered with an error or nothing,
/// never with a CONNACK.
async fn refuses_mqtt5(port: u16) -> bool {
    let opts = rumqttc::v5::MqttOptions::new("mqtt5-probe", "127.0.0.1", port);
    let (_client, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let probe = async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(
                    _,
                ))) => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .unwrap_or(true)
}

fn reading(i: usize, heat: f64) -> (String, Vec<u8>) {
    (
        "devices/d-1/telemetry".to_owned(),
        format!("{{\"i\":{i},\"heat\":{heat}}}").into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_events_arrive_in_the_envelope_and_the_backlog_is_marked_replayed() {
    const LIVE: usize = 10;
    const BACKLOG: usize = 10;
    let broker = Rumqttd::start();
    assert!(
        refuses_mqtt5(broker.v311_port).await,
        "the test broker's upstream listener must speak MQTT 3.1.1 only"
    );
    let collector = Collector::start(broker.port, "up/#").await;
    let proxy = Proxy::start(broker.v311_port, true).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(dir.path().join("rules/hot.toml"), HOT_RULE).unwrap();
    let url = format!("mqtt://127.0.0.1:{}", proxy.port);
    let mut gw = Gateway::start_in(
        dir,
        &[
            ("GATEWAY__GATEWAY__ID", GATEWAY_ID),
            ("GATEWAY__UPSTREAM__URL", &url),
            ("GATEWAY__UPSTREAM__PROTOCOL", "3.1.1"),
            ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
            ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
            ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
        ],
    );
    wait_upstream(&gw, "connected").await;
    assert_eq!(status(&gw)["upstream"]["url"], url.as_str());
    // "auto" over 3.1.1, whose brokers cannot announce a Receive Maximum: 100.
    assert_eq!(status(&gw)["upstream"]["window"], 100);

    // Live: readings, one of them hot (an event fires), and a CBOR reading.
    let mut live: Vec<_> = (0..LIVE)
        .map(|i| reading(i, if i == 3 { 20.0 } else { 1.0 }))
        .collect();
    let cbor = serde_cbor::to_vec(&serde_json::json!({"i": 100, "heat": 1.0})).unwrap();
    live.push(("devices/d-1/telemetry".to_owned(), cbor.clone()));
    publish_all(&gw.addr(), "dev-1", &live).await;
    // LIVE + 1 readings, the firing and the resolving event (the reading after the hot one).
    let live_total = LIVE + 1 + 2;
    wait_until_async(
        "the live messages upstream",
        Duration::from_secs(15),
        || collector.len() >= live_total,
    )
    .await;

    // Every live message acknowledged upstream and deleted before the outage: one still in
    // flight when the proxy goes down would be sent again, marked replayed.
    wait_until_async(
        "the live messages acknowledged",
        Duration::from_secs(15),
        || status(&gw)["outbox"]["messages"].as_u64() == Some(0),
    )
    .await;

    // Outage: the backlog waits in the outbox, starting with a hot reading (an event).
    proxy.set_up(false);
    wait_upstream(&gw, "offline").await;
    let backlog: Vec<_> = (0..BACKLOG)
        .map(|i| reading(LIVE + i, if i == 0 { 30.0 } else { 1.0 }))
        .collect();
    publish_all(&gw.addr(), "dev-1", &backlog).await;
    let backlog_total = BACKLOG + 2;
    // In the outbox besides: dev-1's connect and disconnect (device events).
    wait_until_async("the backlog in the outbox", Duration::from_secs(15), || {
        status(&gw)["outbox"]["messages"].as_u64() >= Some(backlog_total as u64 + 2)
    })
    .await;
    proxy.set_up(true);
    wait_until_async("the backlog upstream", Duration::from_secs(20), || {
        collector.len() >= live_total + backlog_total
    })
    .await;
    gw.stop();

    let received: Vec<Enveloped> = collector.snapshot().iter().map(envelope).collect();
    // Unique ids: one id per message (a repeat would have the same id and the same body).
    let mut bodies: HashMap<&str, HashSet<String>> = HashMap::new();
    for m in &received {
        assert!(
            m.id.starts_with(&format!("{GATEWAY_ID}:")),
            "id {} is {{gateway.id}}:{{epoch}}:{{seq}}",
            m.id
        );
        bodies.entry(&m.id).or_default().insert(m.body.to_string());
    }
    assert!(bodies.values().all(|b| b.len() == 1), "one id, one message");
    assert_eq!(
        bodies.len(),
        live_total + backlog_total,
        "every message has its own id"
    );

    let readings: Vec<&Enveloped> = received
        .iter()
        .filter(|m| m.topic == "up/devices/d-1/telemetry")
        .collect();
    let events: Vec<&Enveloped> = received
        .iter()
        .filter(|m| m.topic.starts_with("up/events/Hot/"))
        .collect();
    assert_eq!(readings.len() + events.len(), received.len());
    assert_eq!(
        events.len(),
        4,
        "fired and resolved, live and from the backlog"
    );

    let live_index = |m: &Enveloped| match &m.body {
        Value::String(b64) => {
            assert_eq!(m.content_type, "application/cbor");
            // base64 of the CBOR bytes as the device sent them.
            assert_eq!(
                *b64,
                base64_of(&cbor),
                "a CBOR payload travels base64-encoded"
            );
            100
        }
        body => {
            assert_eq!(m.content_type, "application/json", "{body}");
            body["i"].as_u64().expect("a reading") as usize
        }
    };
    for m in &readings {
        let i = live_index(m);
        let from_backlog = (LIVE..LIVE + BACKLOG).contains(&i);
        assert_eq!(m.replayed, from_backlog, "reading {i}: replayed");
    }
    // Events arrive in order: the live pair, then the pair from the backlog.
    for (n, m) in events.iter().enumerate() {
        assert_eq!(m.content_type, "application/cloudevents+json");
        assert_eq!(m.body["type"], "Hot", "{}", m.body);
        let from_backlog = n >= 2;
        assert_eq!(m.replayed, from_backlog, "{}", m.body);
        // A replayed event also says so inside its CloudEvents envelope.
        assert_eq!(
            m.body.get("replayed") == Some(&Value::Bool(true)),
            from_backlog,
            "{}",
            m.body
        );
    }

    // Presence over 3.1.1: the same JSON, no envelope.
    let states: Vec<Value> = collector
        .status()
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert!(
        states.iter().filter(|s| s["state"] == "online").count() >= 2,
        "online after each connect: {states:?}"
    );
    assert_eq!(states[0]["gateway_id"], GATEWAY_ID);
}

/// Standard base64 with padding, written out here so the test does not share the
/// gateway's encoder.
fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A 3.1.1 client on `port` with its event loop polled; publishes arrive on the channel.
async fn client_311(
    port: u16,
    id: &str,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    tokio::task::JoinHandle<()>,
) {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                let _ = tx.send(p);
            }
        }
    });
    (client, rx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_arrive_over_3_1_1_and_their_status_comes_back_in_the_envelope() {
    let broker = Rumqttd::start();
    let collector = Collector::start(broker.port, "up/commands/+/+/status").await;
    let url = format!("mqtt://127.0.0.1:{}", broker.v311_port);
    let gw = Gateway::start(&[
        ("GATEWAY__GATEWAY__ID", GATEWAY_ID),
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__PROTOCOL", "3.1.1"),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
    ]);
    wait_upstream(&gw, "connected").await;
    let (device, mut commands, device_task) = client_311(gw.port, "d-9").await;
    device
        .subscribe("devices/d-9/commands/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (operator, _, operator_task) = client_311(broker.v311_port, "operator").await;

    // Until the gateway's upstream subscription is in place, the broker drops commands:
    // send one every 300 ms until the device has one.
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            operator
                .publish(
                    "up/commands/d-9/light",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    "on",
                )
                .await
                .unwrap();
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), commands.recv()).await
            {
                return got.unwrap();
            }
        }
    })
    .await
    .expect("a command reached the device within 15 s");
    assert_eq!(got.topic, "devices/d-9/commands/light");
    assert_eq!(&got.payload[..], b"on");

    // Without an id property, the collector keeps messages on `.../status` apart.
    let is_command_status = |m: &Received| m.topic.ends_with("/light/status");
    wait_until_async("the delivered status", Duration::from_secs(15), || {
        collector
            .status()
            .iter()
            .filter(|m| is_command_status(m))
            .any(|m| envelope(m).body["state"] == "delivered")
    })
    .await;
    let delivered = collector
        .status()
        .iter()
        .filter(|m| is_command_status(m))
        .map(envelope)
        .find(|e| e.body["state"] == "delivered")
        .unwrap();
    assert_eq!(delivered.topic, "up/commands/d-9/light/status");
    assert_eq!(delivered.body["device"], "d-9");
    assert_eq!(delivered.body["command"], "light");
    let id = delivered.body["id"].as_str().unwrap();
    assert!(
        id.starts_with("gw-311:cmd:"),
        "an id made up without correlation data: {id}"
    );
    device_task.abort();
    operator_task.abort();
}
