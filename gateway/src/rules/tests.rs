//! State-machine tests of the engine, one per transition, with controlled time.

use std::collections::BTreeMap;

use super::*;
use crate::events::{Event, EventState};
use crate::reading::{Format, Millis, Reading, Value};

const T0: Millis = 1_767_225_600_000;
const S: Millis = 1000;

fn set(text: &str) -> RuleSet {
    RuleSet::parse("test.toml", text).unwrap_or_else(|d| panic!("{d}"))
}

fn reading(device: &str, stream: &str, fields: &[(&str, f64)]) -> Reading {
    Reading {
        device: device.into(),
        stream: stream.into(),
        topic: format!("devices/{device}/{stream}"),
        time: 0,
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::Number(*v)))
            .collect(),
        units: BTreeMap::new(),
        format: Format::Json,
    }
}

fn temp(device: &str, t: f64) -> Reading {
    reading(device, "telemetry", &[("temperature", t)])
}

/// (seconds after T0, state) of each event.
fn times(events: &[Event]) -> Vec<(Millis, EventState)> {
    events
        .iter()
        .map(|e| ((e.time_millis().unwrap() - T0) / S, e.data.state))
        .collect()
}

const HYSTERESIS: &str = r#"
[[rule]]
name = "temperature-high"
event = "SensorTemperatureExceeded"
stream = "telemetry"
condition = "temperature > 75.0"
clear = "temperature < 70.0"
for = "10s"
severity = "critical"
labels = { site = "plant-1" }
"#;

#[test]
fn pending_fires_when_for_has_elapsed_at_the_exact_due_time() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    assert!(e.on_reading(&temp("t-1", 80.0), T0).is_empty());
    assert_eq!(e.instances()[0].state, InstanceState::Pending { since: T0 });
    assert!(e.tick(T0 + 9 * S).is_empty());
    // The tick comes late; the event carries the due time.
    let events = e.tick(T0 + 12 * S);
    assert_eq!(times(&events), vec![(10, EventState::Firing)]);
    let ev = &events[0];
    assert_eq!(ev.event_type, "SensorTemperatureExceeded");
    assert_eq!(ev.subject, "t-1");
    assert_eq!(ev.source, "gateway/gw/rules/temperature-high");
    assert_eq!(ev.data.severity, "critical");
    assert_eq!(ev.data.labels["site"], "plant-1");
    assert_eq!(ev.data.values["temperature"], Value::Number(80.0));
}

#[test]
fn active_instances_are_the_pending_and_firing_ones_in_the_order_of_all() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-3", 80.0), T0);
    e.on_reading(&temp("t-2", 60.0), T0);
    e.on_reading(&temp("t-1", 80.0), T0);
    e.tick(T0 + 10 * S);
    e.on_reading(&temp("t-4", 80.0), T0 + 11 * S);
    let all = e.instances();
    assert_eq!(all.len(), 4);
    let active: Vec<(String, InstanceState)> = e
        .active_instances()
        .into_iter()
        .map(|i| (i.device, i.state))
        .collect();
    let expected: Vec<(String, InstanceState)> = all
        .into_iter()
        .filter(|i| i.state != InstanceState::Inactive)
        .map(|i| (i.device, i.state))
        .collect();
    assert_eq!(active, expected);
    let devices: Vec<&str> = active.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices, ["t-1", "t-3", "t-4"]);
    assert!(matches!(active[0].1, InstanceState::Firing { .. }));
    assert_eq!(active[2].1, InstanceState::Pending { since: T0 + 11 * S });
}

#[test]
fn pending_returns_to_inactive_without_an_event_when_the_condition_stops() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    assert!(e.on_reading(&temp("t-1", 74.0), T0 + 5 * S).is_empty());
    assert!(e.tick(T0 + 60 * S).is_empty());
    assert_eq!(e.instances()[0].state, InstanceState::Inactive);
}

#[test]
fn a_reading_after_the_due_time_fires_before_it_is_applied() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    // No tick in between: the reading at 15s first lets the 10s timer fall due.
    let events = e.on_reading(&temp("t-1", 60.0), T0 + 15 * S);
    assert_eq!(
        times(&events),
        vec![(10, EventState::Firing), (15, EventState::Resolved)]
    );
}

#[test]
fn hysteresis_keeps_firing_inside_the_band_and_resolves_below_clear() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    e.tick(T0 + 10 * S);
    for (i, t) in [78.0, 74.0, 72.0, 70.5, 76.0].iter().enumerate() {
        let at = T0 + (11 + i as Millis) * S;
        assert!(e.on_reading(&temp("t-1", *t), at).is_empty(), "{t}");
    }
    let events = e.on_reading(&temp("t-1", 69.9), T0 + 20 * S);
    assert_eq!(times(&events), vec![(20, EventState::Resolved)]);
    let ev = &events[0];
    assert_eq!(ev.data.values["temperature"], Value::Number(69.9));
    assert_eq!(ev.data.firing_since, crate::events::rfc3339(T0 + 10 * S));
}

#[test]
fn one_event_per_transition_not_per_matching_reading() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    let mut all = Vec::new();
    for i in 0..100 {
        all.extend(e.on_reading(&temp("t-1", 90.0), T0 + i * S));
        all.extend(e.tick(T0 + i * S));
    }
    assert_eq!(times(&all), vec![(10, EventState::Firing)]);
}

#[test]
fn without_clear_the_condition_no_longer_holding_resolves() {
    let mut e = Engine::new(
        set(r#"
[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
"#),
        "gw",
    );
    let fired = e.on_reading(&temp("t-1", 76.0), T0);
    assert_eq!(times(&fired), vec![(0, EventState::Firing)]);
    assert!(e.on_reading(&temp("t-1", 75.5), T0 + S).is_empty());
    let resolved = e.on_reading(&temp("t-1", 75.0), T0 + 2 * S);
    assert_eq!(times(&resolved), vec![(2, EventState::Resolved)]);
}

const KEEP: &str = r#"
[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
keep_firing_for = "30s"
"#;

#[test]
fn keep_firing_for_delays_the_resolution() {
    let mut e = Engine::new(set(KEEP), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    assert!(e.on_reading(&temp("t-1", 60.0), T0 + 10 * S).is_empty());
    assert!(e.tick(T0 + 39 * S).is_empty());
    assert_eq!(
        times(&e.tick(T0 + 40 * S)),
        vec![(40, EventState::Resolved)]
    );
}

#[test]
fn keep_firing_for_restarts_when_the_condition_returns() {
    let mut e = Engine::new(set(KEEP), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    e.on_reading(&temp("t-1", 60.0), T0 + 10 * S);
    assert!(e.on_reading(&temp("t-1", 80.0), T0 + 20 * S).is_empty());
    assert!(e.tick(T0 + 45 * S).is_empty(), "back above: no resolution");
    e.on_reading(&temp("t-1", 60.0), T0 + 50 * S);
    assert_eq!(
        times(&e.tick(T0 + 90 * S)),
        vec![(80, EventState::Resolved)]
    );
}

#[test]
fn cooldown_defers_the_next_firing() {
    let mut e = Engine::new(
        set(r#"
[[rule]]
name = "hot"
event = "Hot"
condition = "temperature > 75.0"
cooldown = "60s"
"#),
        "gw",
    );
    e.on_reading(&temp("t-1", 80.0), T0);
    e.on_reading(&temp("t-1", 60.0), T0 + 10 * S);
    // Above again within the cooldown: pending, not firing.
    assert!(e.on_reading(&temp("t-1", 80.0), T0 + 20 * S).is_empty());
    assert!(e.tick(T0 + 69 * S).is_empty());
    assert_eq!(times(&e.tick(T0 + 70 * S)), vec![(70, EventState::Firing)]);
}

#[test]
fn cooldown_pending_is_dropped_if_the_condition_stops() {
    let mut e = Engine::new(
        set("[[rule]]\nname = \"hot\"\nevent = \"Hot\"\ncondition = \"temperature > 75.0\"\ncooldown = \"60s\"\n"),
        "gw",
    );
    e.on_reading(&temp("t-1", 80.0), T0);
    e.on_reading(&temp("t-1", 60.0), T0 + 10 * S);
    e.on_reading(&temp("t-1", 80.0), T0 + 20 * S);
    e.on_reading(&temp("t-1", 60.0), T0 + 30 * S);
    assert!(e.tick(T0 + 200 * S).is_empty());
}

const OFFLINE: &str = r#"
[[rule]]
name = "device-offline"
event = "DeviceOffline"
stream = "telemetry"
absent_for = "60s"
"#;

#[test]
fn absence_fires_after_the_silence_and_the_next_reading_resolves() {
    let mut e = Engine::new(set(OFFLINE), "gw");
    assert!(
        e.tick(T0 + 600 * S).is_empty(),
        "unseen devices are not offline"
    );
    e.on_reading(&temp("t-1", 20.0), T0);
    e.on_reading(&temp("t-1", 20.0), T0 + 30 * S);
    assert!(e.tick(T0 + 89 * S).is_empty());
    let fired = e.tick(T0 + 95 * S);
    assert_eq!(times(&fired), vec![(90, EventState::Firing)]);
    assert_eq!(fired[0].data.values["temperature"], Value::Number(20.0));
    assert!(e.tick(T0 + 200 * S).is_empty());
    let back = e.on_reading(&temp("t-1", 21.0), T0 + 300 * S);
    assert_eq!(times(&back), vec![(300, EventState::Resolved)]);
    assert_eq!(
        times(&e.tick(T0 + 360 * S)),
        vec![(360, EventState::Firing)]
    );
}

#[test]
fn absence_is_per_device() {
    let mut e = Engine::new(set(OFFLINE), "gw");
    e.on_reading(&temp("a", 1.0), T0);
    for i in 0..10 {
        e.on_reading(&temp("b", 1.0), T0 + i * 10 * S);
    }
    let events = e.tick(T0 + 100 * S);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject, "a");
}

/// The rise of the temperature per second over the last minute.
const RISING: &str = r#"
[[rule]]
name = "rising"
event = "TemperatureRisingFast"
condition = "has(agg.rise) && agg.rise > 0.5"
[[rule.aggregate]]
name = "rise"
field = "temperature"
fn = "rate"
window = "60s"
"#;

#[test]
fn rate_of_change_over_a_time_window() {
    let mut e = Engine::new(set(RISING), "gw");
    // +0.2 °C per 10 s: 0.02/s.
    for i in 0..10 {
        assert!(e
            .on_reading(&temp("t-1", 20.0 + 0.2 * i as f64), T0 + i * 10 * S)
            .is_empty());
    }
    // A jump to 50 °C: over the 60 s window the rate is (50 - 21) / 50 s = 0.58/s.
    let events = e.on_reading(&temp("t-1", 50.0), T0 + 100 * S);
    assert_eq!(times(&events), vec![(100, EventState::Firing)]);
    let rate = events[0].data.values["agg.rise"].as_f64().unwrap();
    // The window holds samples after 40 s: 21.0 at 50 s ... 50.0 at 100 s.
    assert!((rate - (50.0 - 21.0) / 50.0).abs() < 1e-9, "{rate}");
}

#[test]
fn a_rate_window_saved_before_spans_is_restored() {
    let mut e = Engine::new(set(RISING), "gw");
    for i in 0..10 {
        e.on_reading(&temp("t-1", 20.0 + 0.2 * i as f64), T0 + i * 10 * S);
    }
    // Saved as before spans: each bucket holds one sample here, so every statistic of
    // it is that sample.
    let mut state = serde_json::to_value(e.snapshot()).unwrap();
    let window = &mut state["instances"][0]["instance"]["windows"][0];
    let spans = window["spans"].take();
    let buckets: Vec<serde_json::Value> = (spans.as_array().unwrap().iter())
        .map(|s| {
            let (at, x) = (s[0].as_i64().unwrap(), s[3].as_f64().unwrap());
            assert_eq!((s[1].as_u64(), s[2].as_u64()), (Some(0), Some(1)));
            serde_json::json!({"start": at, "count": 1, "sum": x, "min": x, "max": x,
                "first": [at, x], "last": [at, x]})
        })
        .collect();
    assert_eq!(buckets.len(), 6, "the samples of the last 60 s");
    *window = serde_json::json!({ "buckets": buckets });
    let state: EngineState = serde_json::from_value(state).unwrap();

    let (mut e, _) = Engine::restore(set(RISING), "gw", state, T0 + 95 * S);
    // As in `rate_of_change_over_a_time_window`: (50 - 21) / 50 s.
    let events = e.on_reading(&temp("t-1", 50.0), T0 + 100 * S);
    assert_eq!(times(&events), vec![(100, EventState::Firing)]);
    let rate = events[0].data.values["agg.rise"].as_f64().unwrap();
    assert!((rate - (50.0 - 21.0) / 50.0).abs() < 1e-9, "{rate}");
}

#[test]
fn count_window_average() {
    let mut e = Engine::new(
        set(r#"
[[rule]]
name = "battery-low"
event = "BatteryLow"
condition = "agg.battery_avg < 20.0"
[[rule.aggregate]]
name = "battery_avg"
field = "battery"
fn = "avg"
samples = 3
"#),
        "gw",
    );
    let b = |v| reading("s-1", "telemetry", &[("battery", v)]);
    assert!(e.on_reading(&b(30.0), T0).is_empty());
    assert!(e.on_reading(&b(15.0), T0 + S).is_empty());
    // (30 + 15 + 14) / 3 = 19.67
    assert_eq!(
        times(&e.on_reading(&b(14.0), T0 + 2 * S)),
        vec![(2, EventState::Firing)]
    );
    // (15 + 14 + 30) / 3 = 19.67: the oldest sample left, the average did not move.
    assert!(e.on_reading(&b(30.0), T0 + 3 * S).is_empty());
    // (14 + 30 + 30) / 3 = 24.67
    let resolved = e.on_reading(&b(30.0), T0 + 4 * S);
    assert_eq!(times(&resolved), vec![(4, EventState::Resolved)]);
    assert_eq!(
        resolved[0].data.values["agg.battery_avg"],
        Value::Number(74.0 / 3.0)
    );
}

#[test]
fn a_reading_without_the_field_changes_nothing_and_is_counted() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    let other = reading("t-1", "telemetry", &[("humidity", 40.0)]);
    assert!(e.on_reading(&other, T0 + 5 * S).is_empty());
    assert_eq!(e.stats().eval_errors, 1);
    assert_eq!(times(&e.tick(T0 + 10 * S)), vec![(10, EventState::Firing)]);
}

#[test]
fn rules_of_other_streams_and_devices_are_not_touched() {
    let mut e = Engine::new(
        set(r#"
[[rule]]
name = "hot-t"
event = "Hot"
stream = "telemetry"
device = "t-*"
condition = "temperature > 75.0"
[[rule]]
name = "hot-topic"
event = "Hot"
topic = "site/+/boiler"
condition = "temperature > 75.0"
"#),
        "gw",
    );
    assert!(e.on_reading(&temp("h-1", 90.0), T0).is_empty());
    assert!(e
        .on_reading(&reading("t-1", "status", &[("temperature", 90.0)]), T0)
        .is_empty());
    assert!(e.instances().is_empty());
    assert_eq!(e.stats().evaluations, 0);
    let mut boiler = temp("b-1", 90.0);
    boiler.topic = "site/b-1/boiler".into();
    boiler.stream = "boiler".into();
    let events = e.on_reading(&boiler, T0);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data.rule, "hot-topic");
}

#[test]
fn restore_neither_refires_nor_forgets_a_firing_instance() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    let fired = e.tick(T0 + 10 * S);
    assert_eq!(fired.len(), 1);
    let json = serde_json::to_vec(&e.snapshot()).unwrap();
    drop(e);

    let state: EngineState = serde_json::from_slice(&json).unwrap();
    let (mut e, orphans) = Engine::restore(set(HYSTERESIS), "gw", state, T0 + 20 * S);
    assert!(orphans.is_empty());
    assert!(e.on_reading(&temp("t-1", 85.0), T0 + 21 * S).is_empty());
    assert!(e.tick(T0 + 60 * S).is_empty());
    let resolved = e.on_reading(&temp("t-1", 65.0), T0 + 61 * S);
    assert_eq!(times(&resolved), vec![(61, EventState::Resolved)]);
    assert_eq!(resolved[0].data.firing_since, fired[0].time);
}

#[test]
fn restore_resolves_firing_instances_of_rules_that_are_gone() {
    let mut e = Engine::new(set(HYSTERESIS), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    e.tick(T0 + 10 * S);
    let (e2, events) = Engine::restore(RuleSet::empty(), "gw", e.snapshot(), T0 + 20 * S);
    assert!(e2.instances().is_empty());
    assert_eq!(times(&events), vec![(20, EventState::Resolved)]);
    assert_eq!(events[0].data.reason.as_deref(), Some(REASON_RULE_REMOVED));
}

#[test]
fn replace_keeps_the_state_of_kept_rules_and_resolves_removed_ones() {
    let two = format!("{HYSTERESIS}{OFFLINE}");
    let mut e = Engine::new(set(&two), "gw");
    e.on_reading(&temp("t-1", 80.0), T0);
    e.tick(T0 + 10 * S);
    e.tick(T0 + 70 * S);
    assert_eq!(
        e.instances()
            .iter()
            .map(|i| i.state.name())
            .collect::<Vec<_>>(),
        vec!["firing", "firing"]
    );

    // Reload without the offline rule and with a changed threshold.
    let edited = HYSTERESIS.replace("temperature > 75.0", "temperature > 78.0");
    let events = e.replace(set(&edited), T0 + 80 * S);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "DeviceOffline");
    assert_eq!(events[0].data.reason.as_deref(), Some(REASON_RULE_REMOVED));
    assert_eq!(e.instances().len(), 1);
    assert!(matches!(
        e.instances()[0].state,
        InstanceState::Firing { .. }
    ));
    assert!(e.on_reading(&temp("t-1", 79.0), T0 + 81 * S).is_empty());
}

#[test]
fn event_times_do_not_depend_on_the_tick_cadence() {
    let run = |tick_every: Millis| {
        let mut e = Engine::new(set(&format!("{HYSTERESIS}{OFFLINE}")), "gw");
        let mut out = Vec::new();
        let inputs = [(0, 80.0), (5, 81.0), (30, 65.0)];
        let mut next = inputs.iter().peekable();
        let mut t = 0;
        while t <= 200 {
            while let Some((at, v)) = next.next_if(|(at, _)| *at <= t) {
                out.extend(e.on_reading(&temp("t-1", *v), T0 + at * S));
            }
            out.extend(e.tick(T0 + t * S));
            t += tick_every;
        }
        let mut ids: Vec<_> = out.into_iter().map(|e| (e.time, e.id)).collect();
        ids.sort();
        ids
    };
    let fine = run(1);
    assert_eq!(fine.len(), 3, "{fine:?}");
    assert_eq!(fine, run(7));
    assert_eq!(fine, run(50));
}

#[test]
fn the_fast_path_agrees_with_the_cel_interpreter() {
    let fast_shaped = [
        "temperature > 75.0",
        "temperature > 75",
        "75 < temperature",
        "temperature == 76",
        "temperature != 76.0",
        "temperature >= 76.0 && humidity < 30.0",
        "temperature > 75.0 || humidity < 30.0",
        "humidity < 30.0 || temperature > 75.0",
        "humidity < 30.0 && temperature > 75.0",
        "!(temperature > 75.0)",
        "has(agg.a) && agg.a > 1.0",
        "!has(agg.a) || agg.a < 0.5",
        "agg.a >= 2",
        "temperature > 75.0 && true",
        "false || temperature <= 10",
    ];
    let cel_only = [
        "device == 't-1'",
        "temperature + 1.0 > 2.0",
        "status == 'ok'",
    ];
    let mut text = String::new();
    for (i, c) in fast_shaped.iter().chain(cel_only.iter()).enumerate() {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nevent = \"E\"\ncondition = {c:?}\n\
             [[rule.aggregate]]\nname = \"a\"\nfield = \"x\"\nfn = \"avg\"\nsamples = 2\n"
        ));
    }
    let set = set(&text);
    let contexts: Vec<BTreeMap<String, Value>> = vec![
        [("temperature", Value::Number(80.0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        [
            ("temperature", Value::Number(76.0)),
            ("humidity", Value::Number(20.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        [("temperature", Value::Number(5.0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        BTreeMap::new(),
        [("humidity", Value::Number(20.0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        [("humidity", Value::Number(50.0))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        [("temperature", Value::Text("hot".into()))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        [("temperature", Value::Bool(true))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        [
            ("agg", Value::Number(1.0)),
            ("temperature", Value::Number(80.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    ];
    let agg_sets: Vec<Vec<(&str, f64)>> =
        vec![vec![], vec![("a", 1.5)], vec![("a", 0.2)], vec![("a", 2.0)]];
    let mut fast_taken = 0;
    for rule in set.rules() {
        let RuleKind::Condition { condition, .. } = &rule.kind else {
            unreachable!()
        };
        let shaped = fast_shaped.contains(&condition.source.as_str());
        assert_eq!(condition.is_fast(), shaped, "{}", condition.source);
        for fields in &contexts {
            for aggs in &agg_sets {
                let mut r = temp("t-1", 0.0);
                r.fields = fields.clone();
                let (fast, cel) = eval::eval_both(set.env(), condition, &r, aggs);
                if let Some(fast) = fast {
                    fast_taken += 1;
                    assert_eq!(fast, cel, "{} with {fields:?} {aggs:?}", condition.source);
                }
            }
        }
    }
    // Most combinations are decided natively; the rest fell back to CEL.
    assert!(
        fast_taken > fast_shaped.len() * contexts.len() * agg_sets.len() / 2,
        "{fast_taken}"
    );
}

#[test]
fn replace_follows_rules_that_moved_and_resets_changed_windows() {
    let agg = "[[rule]]\nname = \"avg-high\"\nevent = \"AvgHigh\"\ncondition = \"agg.m > 75.0\"\n\
               [[rule.aggregate]]\nname = \"m\"\nfield = \"temperature\"\nfn = \"avg\"\nsamples = 3\n";
    let mut e = Engine::new(set(&format!("{HYSTERESIS}{agg}")), "gw");
    let mut fired = e.on_reading(&temp("t-1", 80.0), T0);
    fired.extend(e.tick(T0 + 10 * S));
    assert_eq!(
        times(&fired),
        vec![(0, EventState::Firing), (10, EventState::Firing)]
    );

    // Reordered, and the aggregate now averages 2 samples: its window starts afresh.
    let moved = format!("{}{HYSTERESIS}", agg.replace("samples = 3", "samples = 2"));
    assert!(e.replace(set(&moved), T0 + 11 * S).is_empty());
    let states: Vec<_> = e
        .instances()
        .iter()
        .map(|i| (i.rule.clone(), i.state.name()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("avg-high".to_string(), "firing"),
            ("temperature-high".to_string(), "firing")
        ]
    );
    // 72 alone in the fresh window averages 72: resolved (with the old window, (80 + 72) / 2
    // would still be above 75). 72 is inside the other rule's hysteresis band: still firing.
    let events = e.on_reading(&temp("t-1", 72.0), T0 + 12 * S);
    let rules: Vec<_> = events
        .iter()
        .map(|e| (e.data.rule.as_str(), e.data.state))
        .collect();
    assert_eq!(rules, vec![("avg-high", EventState::Resolved)]);
}

#[test]
fn the_rule_index_finds_exactly_the_rules_a_full_scan_finds() {
    let filters = [
        "devices/+/telemetry",
        "devices/#",
        "#",
        "+/+/telemetry",
        "devices/t-1/telemetry",
        "devices/+",
        "site/+/boiler/#",
        "devices/t-1/telemetry/#",
    ];
    let mut text = String::new();
    for (i, f) in filters.iter().enumerate() {
        text.push_str(&format!(
            "[[rule]]\nname = \"topic-{i}\"\nevent = \"E\"\ntopic = \"{f}\"\ncondition = \"x > 1.0\"\n"
        ));
    }
    text.push_str("[[rule]]\nname = \"stream\"\nevent = \"E\"\nstream = \"telemetry\"\ncondition = \"x > 1.0\"\n");
    text.push_str("[[rule]]\nname = \"all\"\nevent = \"E\"\ncondition = \"x > 1.0\"\n");
    let set = set(&text);
    let topics = [
        ("devices/t-1/telemetry", "telemetry"),
        ("devices/t-2/telemetry", "telemetry"),
        ("devices/t-1/status", "status"),
        ("devices", "x"),
        ("devices/t-1", "x"),
        ("site/a/boiler", "boiler"),
        ("site/a/boiler/x/y", "boiler"),
        ("other/t-1/telemetry", "telemetry"),
        ("devices/t-1/telemetry/extra", "telemetry"),
    ];
    let mut out = Vec::new();
    for (topic, stream) in topics {
        let mut r = reading("t-1", stream, &[]);
        r.topic = topic.to_string();
        set.applicable(&r, &mut out);
        let scan: Vec<usize> = (0..set.len())
            .filter(|&i| set.rules()[i].applies_to(stream, topic, "t-1"))
            .collect();
        assert_eq!(out, scan, "{topic}");
    }
}

#[test]
fn the_engine_can_move_to_a_task_and_rule_sets_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Engine>();
    send_sync::<RuleSet>();
    send_sync::<Diagnostics>();
    // A rule set built on a watcher thread is swapped into an engine elsewhere.
    let built = std::thread::spawn(|| set(HYSTERESIS)).join().unwrap();
    let mut e = Engine::new(RuleSet::empty(), "gw");
    assert!(e.replace(built, T0).is_empty());
    assert_eq!(e.rules().len(), 1);
}

#[test]
fn event_values_are_set_in_place_to_the_fields_and_aggregates_of_the_latest_reading() {
    use super::eval::set_values;
    // What an event shows: the reading's fields, then `agg.NAME` for each aggregate.
    fn expected(reading: &Reading, aggs: &[(&str, f64)]) -> BTreeMap<String, Value> {
        let mut values = reading.fields.clone();
        for (name, v) in aggs {
            values.insert(format!("agg.{name}"), Value::Number(*v));
        }
        values
    }
    let mut text = reading("d1", "telemetry", &[("temperature", 20.0)]);
    text.fields
        .insert("state".into(), Value::Text("charging".into()));
    // A field named like an aggregate is shadowed by the aggregate, as in conditions.
    let shadow = reading("d1", "telemetry", &[("agg.avg", 1.0), ("humidity", 40.0)]);
    let steps: Vec<(Reading, Vec<(&str, f64)>)> = vec![
        (temp("d1", 20.0), vec![]),
        (temp("d1", 21.5), vec![("avg", 20.75)]),
        (
            reading("d1", "telemetry", &[("humidity", 40.0), ("battery", 3.1)]),
            vec![("avg", 20.75)],
        ),
        (text, vec![("avg", 1.0), ("max", 2.0)]),
        (shadow, vec![("avg", 3.0)]),
        (reading("d1", "telemetry", &[]), vec![]),
        (temp("d1", 22.0), vec![("max", 22.0)]),
        // The same keys again (the in-place walk), then as many keys but other ones.
        (temp("d1", 23.0), vec![]),
        (temp("d1", 24.0), vec![]),
        (reading("d1", "telemetry", &[("humidity", 50.0)]), vec![]),
    ];
    let mut values = super::state::Values::default();
    for (i, (r, aggs)) in steps.iter().enumerate() {
        set_values(&mut values, r, aggs);
        assert_eq!(values.to_map(), expected(r, aggs), "step {i}");
    }
}

#[test]
fn devices_whose_instances_moved_are_listed_once_until_saved() {
    let mut e = Engine::new(set(OFFLINE), "gw");
    assert!(e.take_moved().is_empty());
    for t in [1, 2, 3] {
        e.on_reading(&temp("d1", 20.0), T0 + t * S);
    }
    e.on_reading(&temp("d2", 20.0), T0 + 4 * S);
    // A reading no rule applies to moves nothing.
    e.on_reading(&reading("d3", "other", &[("x", 1.0)]), T0 + 5 * S);
    assert_eq!(e.take_moved(), ["d1", "d2"]);
    assert!(
        e.take_moved().is_empty(),
        "listed again without a new reading"
    );
    // Saved by the owner in between (an event changed it): not listed.
    e.on_reading(&temp("d1", 21.0), T0 + 6 * S);
    e.on_reading(&temp("d2", 21.0), T0 + 6 * S);
    e.saved("d1");
    assert_eq!(e.take_moved(), ["d2"]);
    // Moved again after that save: listed again, once.
    e.on_reading(&temp("d1", 22.0), T0 + 7 * S);
    e.on_reading(&temp("d1", 23.0), T0 + 8 * S);
    assert_eq!(e.take_moved(), ["d1"]);
}

#[test]
fn devices_are_taken_for_saving_once_their_oldest_change_is_old_enough_a_few_at_a_time() {
    let mut e = Engine::new(set(OFFLINE), "gw");
    assert_eq!(e.oldest_moved(), None);
    e.on_reading(&temp("d1", 20.0), T0 + S);
    e.on_reading(&temp("d2", 20.0), T0 + 2 * S);
    e.on_reading(&temp("d1", 21.0), T0 + 3 * S);
    e.on_reading(&temp("d3", 20.0), T0 + 4 * S);
    assert_eq!(e.oldest_moved(), Some(T0 + S));
    // Nothing is old enough yet.
    assert!(e.take_moved_before(T0, 10).is_empty());
    // d1's oldest change (T0 + 1 s) decides, not its latest.
    assert_eq!(e.take_moved_before(T0 + 3 * S, 10), ["d1", "d2"]);
    assert_eq!(e.oldest_moved(), Some(T0 + 4 * S));
    // At most `max` per call, oldest first.
    e.on_reading(&temp("d1", 22.0), T0 + 5 * S);
    e.on_reading(&temp("d2", 22.0), T0 + 6 * S);
    assert_eq!(e.take_moved_before(T0 + 9 * S, 2), ["d3", "d1"]);
    // Saved with an event meanwhile: skipped, and it does not count against `max`.
    e.on_reading(&temp("d4", 20.0), T0 + 7 * S);
    e.saved("d2");
    assert_eq!(e.take_moved_before(T0 + 9 * S, 1), ["d4"]);
    assert_eq!(e.oldest_moved(), None);
    assert!(e.take_moved().is_empty());
}

#[test]
fn a_device_saved_with_an_event_is_due_again_only_from_its_next_change() {
    let mut e = Engine::new(set(OFFLINE), "gw");
    e.on_reading(&temp("d1", 20.0), T0 + S);
    // Saved with an event at 2 s, moved again at 3 s: its first entry (1 s) is stale.
    e.saved("d1");
    e.on_reading(&temp("d1", 21.0), T0 + 3 * S);
    assert!(
        e.take_moved_before(T0 + 2 * S, 10).is_empty(),
        "the change of 1 s was saved at 2 s"
    );
    assert_eq!(e.take_moved_before(T0 + 3 * S, 10), ["d1"]);
}

#[test]
fn a_device_saved_alone_writes_what_the_whole_snapshot_has_for_it() {
    // Several rules (a window, an absence, a firing instance) on two devices.
    let rules = format!("{HYSTERESIS}\n{OFFLINE}\n{RISING}");
    let mut e = Engine::new(set(&rules), "gw");
    for (i, t) in [70.0, 80.0, 82.0, 85.0].into_iter().enumerate() {
        e.on_reading(&temp("t-1", t), T0 + i as Millis * S);
        e.on_reading(&temp("t-2", t - 30.0), T0 + i as Millis * S);
    }
    e.tick(T0 + 20 * S);
    for device in ["t-1", "t-2"] {
        let mut owned: Vec<InstanceRecord> = (e.snapshot().instances.into_iter())
            .filter(|r| r.device == device)
            .collect();
        owned.sort_by(|a, b| a.rule.cmp(&b.rule));
        assert!(owned.len() >= 3, "{device}: {owned:?}");
        let saved = serde_json::to_string(&e.device_records(device)).unwrap();
        assert_eq!(saved, serde_json::to_string(&owned).unwrap(), "{device}");
        let back: Vec<InstanceRecord> = serde_json::from_str(&saved).unwrap();
        assert_eq!(back, owned, "{device}");
    }
    assert!(e.device_records("t-3").is_empty());
}

#[test]
fn an_aggregate_has_no_value_until_its_samples_span_min_span() {
    let rules = "[[rule]]\nname = \"rising\"\nevent = \"Rising\"\n\
                 condition = \"has(agg.rise) && agg.rise > 0.1\"\n\
                 clear = \"!has(agg.rise) || agg.rise < 0.05\"\n\
                 [[rule.aggregate]]\nname = \"rise\"\nfield = \"temperature\"\nfn = \"rate\"\n\
                 window = \"1m\"\nmin_span = \"20s\"\n";
    let mut e = Engine::new(set(rules), "gw");
    // Ten readings a second jittering by 0.05: 0.5 per second between two neighbours,
    // but the window spans less than 20 s, so the rate has no value and nothing fires.
    let mut events = Vec::new();
    for i in 0..150 {
        let t = 20.0 + if i % 2 == 0 { 0.0 } else { 0.05 };
        events.extend(e.on_reading(&temp("t-1", t), T0 + i * 100));
    }
    assert!(events.is_empty(), "{:?}", times(&events));
    // A real rise: 20.05 at 14.9 s to 26 at 20 s spans 20 s from the first sample at 0 s:
    // (26 - 20) / 20 s = 0.3 per second.
    let fired = e.on_reading(&temp("t-1", 26.0), T0 + 20 * S);
    assert_eq!(times(&fired), vec![(20, EventState::Firing)]);
    let values = &fired[0].data.values;
    assert_eq!(
        values.get("agg.rise"),
        Some(&Value::Number(0.3)),
        "{values:?}"
    );

    // Without `min_span` the first jitter of the same readings fires at once.
    let eager = rules.replace("min_span = \"20s\"\n", "");
    let mut e = Engine::new(set(&eager), "gw");
    assert!(e.on_reading(&temp("t-1", 20.0), T0).is_empty());
    let fired = e.on_reading(&temp("t-1", 20.05), T0 + 100);
    assert_eq!(times(&fired), vec![(0, EventState::Firing)]);
}

#[test]
fn changing_only_min_span_keeps_the_windows() {
    let with = |span: &str| {
        set(&format!(
            "[[rule]]\nname = \"rising\"\nevent = \"Rising\"\ncondition = \"has(agg.rise) && agg.rise > 0.1\"\n\
             [[rule.aggregate]]\nname = \"rise\"\nfield = \"temperature\"\nfn = \"rate\"\n\
             window = \"1m\"\nmin_span = \"{span}\"\n"
        ))
    };
    let mut e = Engine::new(with("30s"), "gw");
    assert!(e.on_reading(&temp("t-1", 20.0), T0).is_empty());
    assert!(e.on_reading(&temp("t-1", 21.0), T0 + 5 * S).is_empty());
    assert!(e.replace(with("10s"), T0 + 6 * S).is_empty());
    // The window still holds the sample at 0 s: 20 -> 23 over 10 s is 0.3 per second.
    let fired = e.on_reading(&temp("t-1", 23.0), T0 + 10 * S);
    assert_eq!(times(&fired), vec![(10, EventState::Firing)]);
}
