//! End-to-end: the closed loop of device-sim's shipped `cooling` scenario through the real
//! gateway binary with the shipped rules, upstream unreachable throughout. The device
//! heats up, the example temperature rule fires, its action turns the device's fan on,
//! the device cools, the rule resolves, its action turns the fan off and the device heats
//! again; both commands go through the durable command queue (the downlink runs because
//! upstream is configured) and each action is in the event log with the id of the event
//! that caused it.
//! And a rule removed by a reload while firing still runs its `resolved` action.

use std::time::Duration;

use test_support::{free_port, publish_all, subscribe, Gateway};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "t-0001";

/// The readings of the device up to the next event of its rule, and that event. The fan
/// commands themselves are not seen here: a command to a device's command topic goes
/// through the durable command queue, written on the device's own connection only.
async fn until_event(
    readings: &mut UnboundedReceiver<(String, Vec<u8>)>,
    events: &mut UnboundedReceiver<(String, Vec<u8>)>,
    within: Duration,
) -> (Vec<f64>, serde_json::Value) {
    let until = Instant::now() + within;
    let mut temperatures = Vec::new();
    loop {
        tokio::select! {
            event = timeout_at(until, events.recv()) => {
                let (_, payload) = event.expect("an event in time").expect("subscriber alive");
                let event: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                // The reading that caused the transition and the event travel on two
                // subscriptions: take readings until that one has arrived too.
                let cause = event["data"]["values"]["temperature"].as_f64();
                while cause.is_some_and(|t| !temperatures.contains(&t)) {
                    let (_, payload) = timeout_at(until, readings.recv())
                        .await
                        .expect("the event's reading in time")
                        .expect("subscriber alive");
                    let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    temperatures.push(json["temperature"].as_f64().unwrap());
                }
                return (temperatures, event);
            }
            reading = timeout_at(until, readings.recv()) => {
                let (topic, payload) =
                    reading.expect("a reading in time").expect("subscriber alive");
                assert_eq!(topic, format!("devices/{DEVICE}/telemetry"));
                let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                temperatures.push(json["temperature"].as_f64().unwrap());
            }
        }
    }
}

fn strictly_falling(values: &[f64]) -> bool {
    values.windows(2).all(|w| w[1] < w[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cooling_scenario_closes_the_loop_with_upstream_down() {
    let rules_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules");
    // Nothing listens there: the forwarder keeps failing to connect for the whole test.
    let upstream = format!("mqtt://127.0.0.1:{}", free_port());
    let mut gw = Gateway::start(&[
        ("GATEWAY__RULES__DIR", rules_dir),
        ("GATEWAY__UPSTREAM__URL", &upstream),
    ]);
    let mut device = subscribe(&gw.addr(), &format!("devices/{DEVICE}/telemetry")).await;
    let mut events = subscribe(&gw.addr(), "events/SensorTemperatureExceeded/+").await;

    let scenario = device_sim::Scenario::shipped("cooling").unwrap();
    let mut fleet = device_sim::FleetConfig::from_scenario(gw.addr(), scenario);
    fleet.progress = None;
    let stop = CancellationToken::new();
    let sim = tokio::spawn(device_sim::run_until(fleet, stop.clone()));

    // From 60 °C at 1 °C/s: above 75 °C at about 16 s, firing 10 s later; its action
    // queues "fan on" for the device.
    let (heating, firing) = until_event(&mut device, &mut events, Duration::from_secs(60)).await;
    assert_eq!(firing["subject"], DEVICE);
    assert_eq!(firing["data"]["state"], "firing");
    assert!(
        heating.iter().any(|t| *t > 75.0),
        "the rule fires only after the device passed 75 °C: {heating:?}"
    );

    // At 2 °C/s with the fan on it falls below 70 °C within about 8 s: the rule resolves
    // and its action queues "fan off".
    let (cooling, resolved) = until_event(&mut device, &mut events, Duration::from_secs(30)).await;
    assert_eq!(resolved["subject"], DEVICE);
    assert_eq!(resolved["data"]["state"], "resolved");
    // The fan went on: from its peak (a reading may precede the command) it falls.
    let peak = cooling
        .iter()
        .enumerate()
        .fold(0, |best, (i, t)| if *t > cooling[best] { i } else { best });
    let falling = &cooling[peak..];
    assert!(
        falling.len() >= 3 && strictly_falling(falling),
        "with the fan on the temperature falls: {cooling:?}"
    );
    assert!(cooling.iter().any(|t| *t < 70.0), "{cooling:?}");

    // The fan went off: it heats up again, and no event comes before it is hot again.
    let coolest = *cooling.last().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let mut warming = Vec::new();
    while warming.len() < 4 {
        let (_, payload) = timeout_at(until, device.recv())
            .await
            .expect("a reading in time")
            .expect("subscriber alive");
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        warming.push(json["temperature"].as_f64().unwrap());
    }
    assert!(
        events.try_recv().is_err(),
        "no event before it is hot again"
    );
    // The first reading may still be from before the command.
    let rising = &warming[1..];
    assert!(
        rising.windows(2).all(|w| w[1] > w[0]) && rising[2] > coolest,
        "with the fan off the temperature rises: {warming:?} after {coolest}"
    );

    let (_, metrics) = gw.http_get("/metrics");
    for line in [
        "gateway_rule_actions_total{rule=\"temperature-high\",on=\"firing\"} 1",
        "gateway_rule_actions_total{rule=\"temperature-high\",on=\"resolved\"} 1",
        // Both commands went through the durable queue to the device.
        "gateway_commands_total{state=\"delivered\"} 2",
        "gateway_upstream_connected 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }

    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(30), sim)
        .await
        .expect("device-sim stops")
        .unwrap()
        .unwrap();
    assert_eq!(summary.totals.commands, 2, "{:?}", summary.totals);
    assert_eq!(summary.totals.commands_ignored, 0);
    gw.stop();

    // The event log holds both actions, each naming the event that caused it.
    let logged = gateway::store::query_events(
        &gw.db_path(),
        0,
        Some(gateway::rules::ACTION_EVENT_TYPE),
        Some(DEVICE),
        10,
    )
    .unwrap();
    let records: Vec<serde_json::Value> = logged
        .iter()
        .map(|e| serde_json::from_slice(&e.json).unwrap())
        .collect();
    let pairs: Vec<(&serde_json::Value, &serde_json::Value)> = records
        .iter()
        .map(|r| (&r["data"]["event_id"], &r["data"]["payload"]))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(pairs[0].0, &firing["id"]);
    assert_eq!(pairs[1].0, &resolved["id"]);
    assert_eq!(pairs[1].1, r#"{"on": false}"#);
    assert!(records
        .iter()
        .all(|r| r["data"]["topic"] == format!("devices/{DEVICE}/commands/fan")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_firing_rule_runs_its_resolved_action() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let file = rules.join("heat.toml");
    std::fs::write(
        &file,
        r#"[[rule]]
name = "heat"
event = "Heat"
condition = "heat > 10.0"

[[rule.action]]
on = "firing"
topic = "devices/{device}/commands/fan"
payload = '{"on": true, "heat": {value.heat}}'

[[rule.action]]
on = "resolved"
topic = "devices/{device}/commands/fan"
payload = '{"on": false}'
qos = 0
"#,
    )
    .unwrap();
    let mut gw = Gateway::start_in(dir, &[]);
    gw.wait_log("Rules loaded.", Duration::from_secs(5));
    let mut commands = subscribe(&gw.addr(), "devices/r-1/commands/#").await;
    let hot = vec![(
        "devices/r-1/telemetry".to_string(),
        br#"{"heat":20}"#.to_vec(),
    )];
    publish_all(&gw.addr(), "r-1", &hot).await;
    let (topic, on) = tokio::time::timeout(Duration::from_secs(5), commands.recv())
        .await
        .expect("the firing action")
        .unwrap();
    assert_eq!(topic, "devices/r-1/commands/fan");
    assert_eq!(on, br#"{"on": true, "heat": 20.0}"#);

    std::fs::remove_file(&file).unwrap();
    let (topic, off) = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("the resolved action of the removed rule")
        .unwrap();
    assert_eq!(topic, "devices/r-1/commands/fan");
    assert_eq!(off, br#"{"on": false}"#);
    gw.stop();

    let logged =
        gateway::store::query_events(&gw.db_path(), 0, Some("Heat"), Some("r-1"), 10).unwrap();
    let resolved: serde_json::Value = serde_json::from_slice(&logged[1].json).unwrap();
    assert_eq!(resolved["data"]["reason"], "rule-removed");
    let actions = gateway::store::query_events(
        &gw.db_path(),
        0,
        Some(gateway::rules::ACTION_EVENT_TYPE),
        Some("r-1"),
        10,
    )
    .unwrap();
    let last: serde_json::Value = serde_json::from_slice(&actions[1].json).unwrap();
    assert_eq!(last["data"]["event_id"], resolved["id"]);
    assert_eq!(last["data"]["qos"], 0);
}
