//! End-to-end rules: the shipped example temperature rule fires and resolves on readings
//! published by a real MQTT client; the CloudEvents arrive on the embedded broker and
//! upstream; a broken edit of a live rule file keeps the old rules working; rule state
//! survives a restart (a firing instance) and kill -9 (a pending one, saved periodically).
//!
//! Rule durations are short (the example rule's `for` is cut from 10 s to 500 ms) so the
//! transitions happen within a second or two of real time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use test_support::{publish_all, subscribe, Collector, Gateway, Mosquitto, Rumqttd};
use tokio::sync::mpsc;

async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    timeout: Duration,
) -> (String, serde_json::Value) {
    let (topic, payload) = tokio::time::timeout(timeout, rx.recv())
        .await
        .expect("an event in time")
        .expect("subscriber alive");
    let json = serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null);
    (topic, json)
}

/// The shipped `rules/temperature.toml` with `for = "500ms"` instead of 10 s, written
/// into `dir`: the same condition, hysteresis, labels and event, quicker.
fn quick_temperature_rule(dir: &Path) {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules/temperature.toml");
    let rule = std::fs::read_to_string(shipped).unwrap();
    assert!(
        rule.contains("for = \"10s\""),
        "{shipped} changed its `for`"
    );
    let quick = rule.replace("for = \"10s\"", "for = \"500ms\"");
    std::fs::write(dir.join("temperature.toml"), quick).unwrap();
}

fn reading(device: &str, temperature: f64) -> Vec<(String, Vec<u8>)> {
    vec![(
        format!("devices/{device}/telemetry"),
        format!("{{\"temperature\":{temperature}}}").into_bytes(),
    )]
}

/// A gateway on its defaults whose rules directory holds one rule file, `name`, with
/// `toml`; also the path of that file.
fn gateway_with_rule(name: &str, toml: &str) -> (Gateway, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let file = rules.join(name);
    std::fs::write(&file, toml).unwrap();
    (Gateway::start_in(dir, &[]), file)
}

/// One telemetry reading of `device` with the field `heat`.
fn heat(device: &str, heat: u32) -> Vec<(String, Vec<u8>)> {
    vec![(
        format!("devices/{device}/telemetry"),
        format!("{{\"heat\":{heat}}}").into_bytes(),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_temperature_rule_fires_and_resolves_locally_and_upstream() {
    let mosquitto = Mosquitto::start();
    let up_port = match &mosquitto {
        Some(m) => m.port,
        None => Rumqttd::start().port,
    };
    let collector = Collector::start(up_port, "up/events/#").await;
    let rules = tempfile::tempdir().unwrap();
    quick_temperature_rule(rules.path());
    let url = format!("mqtt://127.0.0.1:{up_port}");
    let mut gw = Gateway::start(&[
        ("GATEWAY__RULES__DIR", rules.path().to_str().unwrap()),
        ("GATEWAY__UPSTREAM__URL", &url),
        ("GATEWAY__UPSTREAM__TOPIC_PREFIX", "up"),
    ]);
    // The rule's own events (the clients' connects are device events on events/Device*).
    let mut local = subscribe(&gw.addr(), "events/SensorTemperatureExceeded/+").await;

    // 80 °C held for more than the rule's `for`, and readings at 80 °C go on after it
    // fired: one firing event, not one per reading.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        publish_all(&gw.addr(), "t-hot", &reading("t-hot", 80.0)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (topic, firing) = next_event(&mut local, Duration::from_secs(5)).await;
    assert_eq!(topic, "events/SensorTemperatureExceeded/t-hot");
    assert_eq!(firing["specversion"], "1.0");
    assert_eq!(firing["type"], "SensorTemperatureExceeded");
    assert_eq!(firing["subject"], "t-hot");
    assert_eq!(
        firing["source"],
        "gateway/edge-gateway/rules/temperature-high"
    );
    assert_eq!(firing["datacontenttype"], "application/json");
    assert_eq!(firing["data"]["state"], "firing");
    assert_eq!(firing["data"]["values"]["temperature"], 80.0);
    assert_eq!(firing["data"]["labels"]["team"], "facilities");

    // 72 °C is inside the hysteresis band; 65 °C resolves.
    publish_all(&gw.addr(), "t-hot", &reading("t-hot", 72.0)).await;
    publish_all(&gw.addr(), "t-hot", &reading("t-hot", 65.0)).await;
    let (_, resolved) = next_event(&mut local, Duration::from_secs(5)).await;
    assert_eq!(resolved["data"]["state"], "resolved");
    assert_ne!(resolved["id"], firing["id"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), local.recv())
            .await
            .is_err(),
        "no event per reading"
    );

    // The same two events reach the upstream broker, ids unchanged.
    collector.wait_unique(2, Duration::from_secs(10)).await;
    let upstream_ids: Vec<serde_json::Value> = collector
        .snapshot()
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["id"].clone())
        .collect();
    assert_eq!(
        upstream_ids,
        vec![firing["id"].clone(), resolved["id"].clone()]
    );
    assert!(collector
        .snapshot()
        .iter()
        .all(|m| m.topic == "up/events/SensorTemperatureExceeded/t-hot"));

    gw.stop();
    // And the event log holds both.
    let logged = gateway::store::query_events(
        &gw.db_path(),
        0,
        Some("SensorTemperatureExceeded"),
        Some("t-hot"),
        10,
    )
    .unwrap();
    assert_eq!(logged.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_keeps_the_old_rules_running() {
    let (mut gw, file) = gateway_with_rule(
        "hot.toml",
        "[[rule]]\nname = \"hot\"\nevent = \"Hot\"\ncondition = \"heat > 10.0\"\n",
    );
    // start_in points rules.dir at <dir>/rules.
    gw.wait_log("Rules loaded.", Duration::from_secs(5));
    let mut local = subscribe(&gw.addr(), "events/Hot/+").await;

    std::fs::write(
        &file,
        "[[rule]]\nname = \"hot\"\nevent = \"Hot\"\ncondition = \"heat >>> 10.0\"\n",
    )
    .unwrap();
    let error = gw.wait_log("hot.toml:4:", Duration::from_secs(10));
    assert!(error.contains("condition"), "{error}");
    gw.wait_log("the previous rules stay in force", Duration::from_secs(5));

    publish_all(&gw.addr(), "h-1", &heat("h-1", 20)).await;
    let (topic, event) = next_event(&mut local, Duration::from_secs(5)).await;
    assert_eq!(topic, "events/Hot/h-1");
    assert_eq!(event["data"]["state"], "firing");
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_neither_refires_nor_forgets_a_firing_instance() {
    let (mut gw, _) = gateway_with_rule(
        "heat.toml",
        "[[rule]]\nname = \"heat\"\nevent = \"Heat\"\ncondition = \"heat > 10.0\"\nclear = \"heat < 5.0\"\n",
    );
    let heat = |v: u32| heat("r-1", v);

    let mut local = subscribe(&gw.addr(), "events/Heat/+").await;
    publish_all(&gw.addr(), "r-1", &heat(20)).await;
    let (_, firing) = next_event(&mut local, Duration::from_secs(5)).await;
    assert_eq!(firing["data"]["state"], "firing");
    gw.stop();

    gw.spawn();
    let mut local = subscribe(&gw.addr(), "events/Heat/+").await;
    publish_all(&gw.addr(), "r-1", &heat(20)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), local.recv())
            .await
            .is_err(),
        "still firing after the restart: no second firing event"
    );
    publish_all(&gw.addr(), "r-1", &heat(1)).await;
    let (_, resolved) = next_event(&mut local, Duration::from_secs(5)).await;
    assert_eq!(resolved["data"]["state"], "resolved");
    assert_eq!(
        resolved["data"]["firing_since"],
        firing["data"]["firing_since"]
    );
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_instance_saved_periodically_survives_kill_9_and_fires_on_time() {
    // A reading starts a `for = 8s` condition: pending, no event yet, so only the rules
    // stage's periodic save (of a device whose instances moved, at the first batch or
    // 1 s tick once that change is 5 s old) keeps it.
    // After kill -9 and a restart with no further reading, it must still fire 8 s after
    // that reading.
    let (mut gw, _) = gateway_with_rule(
        "heat.toml",
        "[[rule]]\nname = \"heat\"\nevent = \"Heat\"\ncondition = \"heat > 10.0\"\nfor = \"8s\"\n",
    );
    publish_all(&gw.addr(), "p-1", &heat("p-1", 20)).await;
    let published = Instant::now();
    // Past one save interval and a tick (6 s) with room to spare, before the `for` is over.
    tokio::time::sleep(Duration::from_millis(7000)).await;
    gw.kill();

    gw.spawn();
    let mut local = subscribe(&gw.addr(), "events/Heat/+").await;
    let (_, firing) = next_event(&mut local, Duration::from_secs(10)).await;
    assert_eq!(firing["data"]["state"], "firing");
    assert!(
        published.elapsed() >= Duration::from_millis(7500),
        "fired {:?} after the reading, before its `for` of 8 s",
        published.elapsed()
    );
    gw.stop();
}
