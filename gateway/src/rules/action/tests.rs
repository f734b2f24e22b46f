//! Placeholder rendering and the load errors of `[[rule.action]]`, positioned in the file,
//! for publish actions (`topic`) and webhooks (`url`).

use std::collections::BTreeMap;

use super::*;
use crate::events::{Event, EventState, Transition};
use crate::reading::Value;
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

/// The publish actions among what `actions` do for `e`.
fn messages(actions: &[Action], e: &Event) -> Vec<ActionMessage> {
    super::messages(actions, e)
        .into_iter()
        .filter_map(|r| match r {
            Rendered::Publish(m) => Some(m),
            Rendered::Webhook(_) => None,
        })
        .collect()
}

/// The webhook calls among what `actions` do for `e`.
fn calls(actions: &[Action], e: &Event) -> Vec<WebhookCall> {
    super::messages(actions, e)
        .into_iter()
        .filter_map(|r| match r {
            Rendered::Webhook(c) => Some(c),
            Rendered::Publish(_) => None,
        })
        .collect()
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
        "hot.toml:24:1: missing required key `topic` (or `url`, for a webhook) in [[rule.action]]",
    ];
    assert_errors(&err, &expect);
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

#[test]
fn a_webhook_renders_its_url_with_encoded_values_and_its_payload() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
url = "http://relay.local:8080/hooks/{label.site}/{device}?t={value.temperature}&mode={value.mode}"
payload = '{"device": "{device}", "t": {value.temperature}}'
timeout = "2s"
retries = 1
headers = { Authorization = "Bearer abc" }

[[rule.action]]
on = "firing"
url = "http://127.0.0.1/plain"
payload = "fan on"

[[rule.action]]
on = "resolved"
url = "http://127.0.0.1/off"
"#,
    )
    .unwrap();
    let actions = &set.rules()[0].actions;
    let e = event(
        EventState::Firing,
        &[
            ("temperature", Value::Number(80.5)),
            ("mode", Value::Text("a b&c/d".into())),
        ],
    );
    let calls = calls(actions, &e);
    assert_eq!(calls.len(), 2);
    let c = &calls[0];
    assert_eq!(
        c.url,
        "http://relay.local:8080/hooks/plant-1/t-7?t=80.5&mode=a%20b%26c%2Fd"
    );
    assert_eq!(c.payload, r#"{"device": "t-7", "t": 80.5}"#);
    assert_eq!(c.content_type(), "application/json");
    assert_eq!(c.settings.timeout, std::time::Duration::from_secs(2));
    assert_eq!(c.settings.retries, 1);
    assert_eq!(
        c.settings.headers,
        [("Authorization".to_string(), "Bearer abc".to_string())]
    );
    assert_eq!(
        (c.index, c.on, c.rule.as_str()),
        (0, EventState::Firing, "hot")
    );
    assert_eq!(
        (c.event_id.as_str(), c.device.as_str()),
        (e.id.as_str(), "t-7")
    );
    let plain = &calls[1];
    assert_eq!(plain.content_type(), "text/plain; charset=utf-8");
    assert_eq!(plain.settings.timeout, DEFAULT_WEBHOOK_TIMEOUT);
    assert_eq!(plain.settings.retries, DEFAULT_WEBHOOK_RETRIES);
    assert!(plain.settings.headers.is_empty());
    // A device id is percent-encoded too.
    let mut odd = e.clone();
    odd.subject = "t 7/x".into();
    assert_eq!(
        super::messages(actions, &odd)
            .into_iter()
            .find_map(|r| match r {
                Rendered::Webhook(c) => Some(c.url),
                Rendered::Publish(_) => None,
            })
            .unwrap(),
        "http://relay.local:8080/hooks/plant-1/t%207%2Fx?t=80.5&mode=a%20b%26c%2Fd"
    );
}

#[test]
fn the_webhook_record_has_the_outcome_and_no_headers() {
    let set = load(
        r#"[[rule.action]]
on = "firing"
url = "http://127.0.0.1:9000/h/{device}"
payload = "x"
headers = { Authorization = "Bearer s3cret" }
"#,
    )
    .unwrap();
    let e = event(EventState::Firing, &[]);
    let c = &calls(&set.rules()[0].actions, &e)[0];
    let outcome = WebhookOutcome {
        result: WebhookResult::HttpError,
        status: Some(503),
        error: None,
        attempts: 4,
    };
    let bytes = c.record("gw", &outcome, 2_000);
    assert!(!String::from_utf8_lossy(&bytes).contains("s3cret"));
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["type"], WEBHOOK_EVENT_TYPE);
    assert_eq!(json["source"], "gateway/gw/rules/hot/actions");
    assert_eq!(json["subject"], "t-7");
    assert_eq!(json["id"], action_id(&e.id, 0).as_str());
    let data = &json["data"];
    assert_eq!(data["event_id"], e.id.as_str());
    assert_eq!(data["url"], "http://127.0.0.1:9000/h/t-7");
    assert_eq!(data["outcome"], "http_error");
    assert_eq!(data["status"], 503);
    assert_eq!(data["attempts"], 4);
    assert!(data["error"].is_null());
}

#[test]
fn webhook_problems_are_errors_at_their_position() {
    // Line 14 is the first action line in `rule_with`.
    let err = load(
        r#"[[rule.action]]
on = "firing"
topic = "x/{device}"
url = "http://127.0.0.1/"
timeout = "1s"

[[rule.action]]
on = "firing"
url = "https://example.com/hook"

[[rule.action]]
on = "firing"
url = "mqtt://127.0.0.1/"

[[rule.action]]
on = "firing"
url = "http://127.0.0.1/{devise}"
qos = 1

[[rule.action]]
on = "firing"
url = "http://{device}.local/x"

[[rule.action]]
on = "firing"
url = "http://user:pw@127.0.0.1/x"

[[rule.action]]
on = "firing"
url = "http://127.0.0.1:99999/x"
timeout = "0s"
retries = 50
headers = { "Content-Length" = "3" }
"#,
    )
    .unwrap_err();
    let expect = [
        "hot.toml:17:7: an action has `topic` (publish on the broker) or `url` (a webhook), not both",
        "hot.toml:22:8: in action `url`: https webhooks are not supported",
        "hot.toml:26:8: in action `url`: a webhook `url` starts with http://",
        "hot.toml:30:25: in action `url`: unknown placeholder `{devise}`",
        "hot.toml:31:1: `qos` is for actions with a `topic`",
        "hot.toml:35:15: in action `url`: placeholders go in a webhook url's path or query",
        "hot.toml:39:15: in action `url`: a webhook `url` may not hold credentials",
        "hot.toml:43:25: in action `url`: bad port \"99999\"",
        "hot.toml:44:11: `timeout` must be longer than 0s",
        "hot.toml:45:11: `retries` must be an integer from 0 to 10",
        "hot.toml:46:11: in action `headers`: header \"Content-Length\" is set by the gateway's HTTP client",
    ];
    assert_errors(&err, &expect);
}

#[test]
fn webhook_keys_do_not_go_with_a_topic() {
    let err = load(
        r#"[[rule.action]]
on = "firing"
topic = "x/{device}"
retries = 2
"#,
    )
    .unwrap_err();
    assert!(
        err.starts_with("hot.toml:17:1: `retries` is for webhook actions (with `url`)"),
        "{err}"
    );
}

/// `err` has exactly one line per `expect`ed one, each starting with it.
fn assert_errors(err: &str, expect: &[&str]) {
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), expect.len(), "{err}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(line.starts_with(want), "{want}\n{err}");
    }
}
