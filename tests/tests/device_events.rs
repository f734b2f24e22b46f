//! Devices' connects and disconnects as CloudEvents, through the real binary, Mosquitto
//! upstream and real device clients: each `DeviceConnected` / `DeviceDisconnected` is
//! published on the embedded broker, kept in the event log (`/api/events`) and forwarded
//! upstream with the same id; a disconnect says why (a DISCONNECT, a dropped socket, an
//! expired keep alive, a takeover), and a takeover never reports the device offline while
//! its new connection lives. The forwarding tests need Mosquitto; without it they are
//! skipped, or fail with `GATEWAY_REQUIRE_MOSQUITTO=1`.

use std::time::Duration;

use serde_json::Value;
use test_support::{
    metric, publish_all, raw_connect, subscribe, wait_until_async, Collector, Gateway, Mosquitto,
    V5Client,
};

const WAIT: Duration = Duration::from_secs(15);

/// A gateway forwarding to Mosquitto (prefix `up`) with an MQTT 5 listener for devices,
/// and a collector of the events arriving upstream.
struct Setup {
    _mosquitto: Mosquitto,
    gw: Gateway,
    v5_port: u16,
    upstream: Collector,
}

async fn setup() -> Option<Setup> {
    let mosquitto = Mosquitto::start()?;
    let upstream = Collector::start(mosquitto.port, "up/events/+/+").await;
    let v5_port = test_support::free_port();
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    let v5 = format!("127.0.0.1:{v5_port}");
    let gw = Gateway::start(&[
        ("GATEWAY__GATEWAY__ID", "gw-devices"),
        ("GATEWAY__UPSTREAM__URL", url.as_str()),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
        ("GATEWAY__UPSTREAM__BACKOFF_MIN", "50ms"),
        ("GATEWAY__UPSTREAM__BACKOFF_MAX", "200ms"),
        ("GATEWAY__BROKER__LISTEN_V5", v5.as_str()),
    ]);
    Some(Setup {
        _mosquitto: mosquitto,
        gw,
        v5_port,
        upstream,
    })
}

fn get_json(gw: &Gateway, path: &str) -> Value {
    let (status, body) = gw.http_get(path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The device events of `device` in the event log, oldest first.
fn logged(gw: &Gateway, device: &str) -> Vec<Value> {
    let events = get_json(gw, &format!("/api/events?device={device}&limit=1000"));
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("Device")))
        .cloned()
        .collect()
}

/// Waits until the log holds `n` device events of `device`, and returns them.
async fn wait_logged(gw: &Gateway, device: &str, n: usize) -> Vec<Value> {
    let what = format!("{n} device events of {device} in the event log");
    wait_until_async(&what, WAIT, || logged(gw, device).len() >= n).await;
    logged(gw, device)
}

/// `type` and `data.reason` of each event.
fn kinds(events: &[Value]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            let reason = e["data"]["reason"].as_str().map(str::to_string);
            (e["type"].as_str().unwrap().to_string(), reason)
        })
        .collect()
}

fn connected() -> (String, Option<String>) {
    ("DeviceConnected".into(), None)
}

fn disconnected(reason: &str) -> (String, Option<String>) {
    ("DeviceDisconnected".into(), Some(reason.into()))
}

/// The ids of `device`'s events that arrived upstream, each once, in arrival order.
async fn wait_upstream_ids(upstream: &Collector, device: &str, n: usize) -> Vec<String> {
    let ids = || {
        let mut ids: Vec<String> = Vec::new();
        for m in upstream.device_events() {
            let event: Value = serde_json::from_slice(&m.payload).expect("an event is JSON");
            let id = event["id"].as_str().unwrap().to_string();
            if event["subject"] == device && !ids.contains(&id) {
                assert_eq!(
                    m.topic,
                    format!("up/events/{}/{device}", event["type"].as_str().unwrap())
                );
                ids.push(id);
            }
        }
        ids
    };
    let what = format!("{n} events of {device} upstream");
    wait_until_async(&what, WAIT, || ids().len() >= n).await;
    ids()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_connect_and_a_clean_disconnect_are_events_locally_in_the_log_and_upstream() {
    let Some(s) = setup().await else { return };
    let mut local = subscribe(&s.gw.addr(), "events/+/dev-a").await;
    let device = V5Client::connect(s.v5_port, "dev-a", |o| {
        o.set_keep_alive(Duration::from_secs(20));
    })
    .await;
    let up = wait_logged(&s.gw, "dev-a", 1).await;
    assert_eq!(up[0]["source"], "gateway/gw-devices/devices");
    assert_eq!(
        up[0]["data"],
        serde_json::json!({"state": "connected", "device": "dev-a", "client_id": "dev-a",
            "protocol": "5", "keep_alive": 20, "clean_session": true})
    );
    device.disconnect().await;
    let events = wait_logged(&s.gw, "dev-a", 2).await;
    assert_eq!(kinds(&events), [connected(), disconnected("clean")]);
    assert_eq!(events[1]["data"]["connected_since"], events[0]["time"]);
    assert_eq!(events[1]["data"]["protocol"], "5");

    // Upstream: the same events, with the same ids, on {prefix}/events/{type}/{device}.
    assert_eq!(
        wait_upstream_ids(&s.upstream, "dev-a", 2).await,
        ids(&events)
    );

    // On the embedded broker, at rules.event_topic.
    for (want_type, want) in [
        ("DeviceConnected", &events[0]),
        ("DeviceDisconnected", &events[1]),
    ] {
        let (topic, payload) = tokio::time::timeout(WAIT, local.recv())
            .await
            .expect("a local event")
            .unwrap();
        assert_eq!(topic, format!("events/{want_type}/dev-a"));
        let got: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(got["id"], want["id"]);
    }

    let (_, scrape) = s.gw.http_get("/metrics");
    assert_eq!(
        metric(
            &scrape,
            "gateway_device_disconnects_total{reason=\"clean\"}"
        ),
        1.0
    );
    // dev-a and the local subscriber.
    assert!(metric(&scrape, "gateway_device_connects_total") >= 2.0);
    assert_eq!(metric(&scrape, "gateway_device_reports_dropped_total"), 0.0);
}

#[tokio::test]
async fn a_dropped_socket_is_lost_and_a_silent_device_expires_its_keep_alive() {
    let Some(s) = setup().await else { return };
    // MQTT 3.1.1 clients that only say CONNECT.
    let socket = raw_connect(s.gw.port, "dev-lost", 30).await;
    let up = wait_logged(&s.gw, "dev-lost", 1).await;
    assert_eq!(up[0]["data"]["protocol"], "3.1.1");
    assert_eq!(up[0]["data"]["keep_alive"], 30);
    drop(socket);
    let events = wait_logged(&s.gw, "dev-lost", 2).await;
    assert_eq!(kinds(&events), [connected(), disconnected("lost")]);

    let _silent = raw_connect(s.gw.port, "dev-idle", 1).await;
    // Closed by the broker 1.5 s after the CONNECT, the socket still open on this side.
    let events = wait_logged(&s.gw, "dev-idle", 2).await;
    assert_eq!(
        kinds(&events),
        [connected(), disconnected("keep_alive_expired")]
    );
    wait_upstream_ids(&s.upstream, "dev-idle", 2).await;
}

#[tokio::test]
async fn a_takeover_never_reports_the_live_connection_offline() {
    let Some(s) = setup().await else { return };
    let old = V5Client::connect(s.v5_port, "dev-t", |_| {}).await;
    wait_logged(&s.gw, "dev-t", 1).await;
    let mut new = V5Client::connect(s.v5_port, "dev-t", |_| {}).await;
    // The old connection reports its end before its socket closes.
    old.wait_closed().await;
    new.publish(
        "devices/dev-t/telemetry",
        false,
        br#"{"temperature": 21.5}"#,
        Default::default(),
    )
    .await;
    // A later connect: once its event is logged, every report before it was handled.
    let _marker = V5Client::connect(s.v5_port, "dev-marker", |_| {}).await;
    wait_logged(&s.gw, "dev-marker", 1).await;
    let events = logged(&s.gw, "dev-t");
    assert_eq!(
        kinds(&events),
        [connected(), disconnected("taken_over"), connected()]
    );
    // The read model agrees: the device is connected, since its new connection.
    let device = || {
        let list = get_json(&s.gw, "/api/devices");
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == "dev-t")
            .cloned()
    };
    wait_until_async("dev-t in /api/devices", WAIT, || device().is_some()).await;
    let view = device().unwrap();
    assert_eq!(view["connected"], true, "{view}");
    let since = view["connected_since"].as_i64().unwrap();
    assert_eq!(gateway::events::rfc3339(since), events[2]["time"]);
    assert_eq!(
        wait_upstream_ids(&s.upstream, "dev-t", 3).await,
        ids(&events)
    );

    new.disconnect().await;
    let events = wait_logged(&s.gw, "dev-t", 4).await;
    assert_eq!(kinds(&events)[3], disconnected("clean"));
    assert_eq!(device().unwrap()["connected"], false);
}

#[tokio::test]
async fn with_device_events_off_connections_are_not_announced() {
    let gw = Gateway::start(&[("GATEWAY__RULES__DEVICE_EVENTS", "false")]);
    let reading = (
        "devices/dev-off/telemetry".to_string(),
        br#"{"t": 1}"#.to_vec(),
    );
    publish_all(&gw.addr(), "dev-off", &[reading]).await;
    let listed = || get_json(&gw, "/api/devices")["count"] == 1;
    wait_until_async("dev-off in /api/devices", WAIT, listed).await;
    let devices = get_json(&gw, "/api/devices");
    assert!(
        devices["devices"][0].get("connected").is_none(),
        "{devices}"
    );
    assert!(logged(&gw, "dev-off").is_empty());
    let (_, scrape) = gw.http_get("/metrics");
    assert_eq!(metric(&scrape, "gateway_device_connects_total"), 0.0);
}
