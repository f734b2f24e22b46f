//! Placeholder rendering and the load errors of `[[rule.action]]`, positioned in the file.

use std::collections::BTreeMap;

use super::*;
use crate::events::{Event, EventState, Transition};
use crate::rules::RuleSet;

fn rule_with(actions: &str) -> String {
    format!(
        r#"[[rule]]
name = "hot"
event = "Hot"
stream = "telemetry"
condition = "temperature > 75.0"
labels = {{ site = "plant-1" }}

[[rule.aggregate]]
name = "avg_t"
field = "temperature"
fn = "avg"
window = "1m"

{actions}"#
    )
}

fn load(actions: &str) -> Result<RuleSet, String> {
    RuleSet::parse("hot.toml", &rule_with(actions)).map_err(|d| d.to_string())
}

fn event(state: EventState, values: &[(&str, Value)]) -> Event {
    Event::new(Transition {
        gateway_id: "gw",
        rule: "hot",
        event_type: "Hot",
        device: "t-7",
        state,
        at: 1_000,
        firing_since: 1_000,
        severity: "warning",
        values: values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        reason: None,
    })
}

#[test]
fn every_placeholder_renders() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
topic = "sites/{label.site}/devices/{device}/{stream}/{rule}/{event}"
payload = '{"t": {value.temperature}, "avg": {value.agg.avg_t}, "mode": "{value.mode}", "ok": {value.ok}, "gone": {value.gone}, "who": "{device}"}'
"#,
    )
    .unwrap();
    let actions = &set.rules()[0].actions;
    let e = event(
        EventState::Firing,
        &[
            ("temperature", Value::Number(80.5)),
            ("agg.avg_t", Value::Number(77.0)),
            ("mode", Value::Text("auto".into())),
            ("ok", Value::Bool(true)),
        ],
    );
    let messages = messages(actions, &e);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.topic, "sites/plant-1/devices/t-7/telemetry/hot/Hot");
    assert_eq!(
        m.payload,
        r#"{"t": 80.5, "avg": 77.0, "mode": "auto", "ok": true, "gone": null, "who": "t-7"}"#
    );
    assert_eq!((m.qos, m.index, m.on), (1, 0, EventState::Firing));
    let json: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
    assert_eq!(json["t"], 80.5);
}

#[test]
fn an_action_runs_only_on_its_transition_and_in_declared_order() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
topic = "devices/{device}/commands/fan"
payload = '{"on": true}'

[[rule.action]]
on = "resolved"
topic = "devices/{device}/commands/fan"
payload = '{"on": false}'
qos = 0

[[rule.action]]
on = "firing"
topic = "alarms/{device}"
"#,
    )
    .unwrap();
    let actions = &set.rules()[0].actions;
    let firing = messages(actions, &event(EventState::Firing, &[]));
    let fired: Vec<(usize, &str, &str)> = firing
        .iter()
        .map(|m| (m.index, m.topic.as_str(), m.payload.as_str()))
        .collect();
    assert_eq!(
        fired,
        [
            (0, "devices/t-7/commands/fan", r#"{"on": true}"#),
            (2, "alarms/t-7", "")
        ]
    );
    let resolved = messages(actions, &event(EventState::Resolved, &[]));
    assert_eq!(resolved.len(), 1);
    assert_eq!(
        (resolved[0].payload.as_str(), resolved[0].qos),
        (r#"{"on": false}"#, 0)
    );
}

#[test]
fn braces_that_are_no_placeholder_stay_literal() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
topic = "x/{device}"
payload = '{} {"a": {"b": 1}} { device} {1x} {device'
"#,
    )
    .unwrap();
    let m = &messages(&set.rules()[0].actions, &event(EventState::Firing, &[]))[0];
    assert_eq!(m.payload, r#"{} {"a": {"b": 1}} { device} {1x} {device"#);
}

#[test]
fn unknown_placeholders_are_errors_at_their_position() {
    // Line 14 is the first action line in `rule_with`.
    let err = load(
        r#"[[rule.action]]
on = "firing"
topic = "devices/{devce}/commands/{value.temperature}"
payload = 'x {label.room} {value.agg.max_t} {stream}'
"#,
    )
    .unwrap_err();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[0].starts_with("hot.toml:16:18: in action `topic`: unknown placeholder `{devce}`"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(
            "hot.toml:16:35: in action `topic`: `{value.temperature}` is not allowed in a topic"
        ),
        "{err}"
    );
    assert!(
        lines[2].starts_with("hot.toml:17:14: in action `payload`: unknown label `room`"),
        "{err}"
    );
    assert!(
        lines[3].starts_with("hot.toml:17:27: in action `payload`: unknown aggregate `max_t`"),
        "{err}"
    );
}

#[test]
fn stream_needs_the_rules_stream() {
    let err = RuleSet::parse(
        "s.toml",
        r#"[[rule]]
name = "any"
event = "Any"
condition = "true"

[[rule.action]]
on = "resolved"
topic = "x/{stream}"
"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "s.toml:8:12: in action `topic`: `{stream}` needs the rule to name its `stream`"
    );
}

#[test]
fn topics_are_names_not_filters_and_keys_are_checked() {
    let err = load(
        r#"[[rule.action]]
on = "fired"
topic = "devices/+/commands/#"
qos = 2
retain = true

[[rule.action]]
on = "firing"
topic = "$SYS/x"

[[rule.action]]
on = "firing"
payload = "no topic"
"#,
    )
    .unwrap_err();
    let expect = [
        "hot.toml:15:6: bad `on` \"fired\": it is \"firing\" or \"resolved\"",
        "hot.toml:16:18: in action `topic`: an action topic may not contain '+'",
        "hot.toml:17:7: `qos` must be 0 or 1",
        "hot.toml:18:1: unknown key `retain` in [[rule.action]]",
        "hot.toml:22:10: in action `topic`: an action topic may not start with `$`",
        "hot.toml:24:1: missing required key `topic` in [[rule.action]]",
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), expect.len(), "{err}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(line.starts_with(want), "{want}\n{err}");
    }
}

#[test]
fn the_record_names_the_event_and_has_a_stable_id() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
topic = "devices/{device}/commands/fan"
payload = '{"on": true}'
"#,
    )
    .unwrap();
    let e = event(EventState::Firing, &[]);
    let m = &messages(&set.rules()[0].actions, &e)[0];
    let bytes = m.record("gw", &e, 2_000);
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["type"], ACTION_EVENT_TYPE);
    assert_eq!(json["specversion"], "1.0");
    assert_eq!(json["subject"], "t-7");
    assert_eq!(json["source"], "gateway/gw/rules/hot/actions");
    assert_eq!(json["time"], "1970-01-01T00:00:02.000Z");
    assert_eq!(json["data"]["event_id"], e.id.as_str());
    assert_eq!(json["data"]["topic"], "devices/t-7/commands/fan");
    assert_eq!(json["data"]["payload"], r#"{"on": true}"#);
    assert_eq!(json["data"]["on"], "firing");
    assert_eq!(json["data"]["qos"], 1);
    assert_ne!(json["id"], e.id.as_str());
    let again: serde_json::Value = serde_json::from_slice(&m.record("gw", &e, 2_000)).unwrap();
    assert_eq!(again["id"], json["id"]);
}
