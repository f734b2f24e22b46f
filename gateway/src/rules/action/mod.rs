//! Rule actions: what a rule publishes on the embedded broker when one of its instances
//! fires or resolves (`[[rule.action]]`, documented in `rules/README.md`).
//!
//! Owns [`Action`] (when, topic and payload templates, QoS), the placeholder syntax of
//! those templates ([`Template`]), their rendering for one [`Event`] ([`Action::render`],
//! giving an [`ActionMessage`]) and the event-log record of a published action
//! ([`ActionMessage::record`], a CloudEvent of type [`ACTION_EVENT_TYPE`]).
//! Input: template text from a rule file, checked by `load`; events from the engine.
//! Output: topic, payload and QoS to publish; the JSON to append to the event log.
//!
//! Invariants:
//! - A placeholder is `{NAME}` with NAME made of letters, digits, `_`, `.` and `-`; any
//!   other brace is literal text, so JSON payloads need no escaping.
//! - Everything but `{device}` and `{value.FIELD}` is known when the rule loads and is
//!   filled in then; an unknown placeholder is a load error, never an empty string at
//!   run time. A topic holds no `+`, `#` or `{value.FIELD}`, so a rendered topic is
//!   always a valid topic name (device ids come from topic levels).
//! - Rendering is pure: the same event gives the same message, and the record's id is
//!   derived from the event's id and the action's position, so it is stable too.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::fast::AGG_VAR;
use crate::events::{rfc3339, Event, EventState, DATA_CONTENT_TYPE, SPEC_VERSION};
use crate::reading::{Millis, Value};

mod load;
#[cfg(test)]
mod tests;

/// The CloudEvents `type` of an action's record in the event log.
pub const ACTION_EVENT_TYPE: &str = "ActionPublished";
/// QoS of an action that does not say.
pub const DEFAULT_ACTION_QOS: u8 = 1;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Device,
    /// `{value.FIELD}`: the event's value of FIELD (`agg.NAME` for an aggregate).
    Value(String),
}

/// A topic or payload with its placeholders resolved as far as the rule allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The text as written in the rule file.
    pub source: String,
    parts: Vec<Part>,
}

/// What a template may refer to, from the rule it belongs to.
pub(super) struct Known<'a> {
    pub rule: &'a str,
    pub event: &'a str,
    pub stream: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
    pub aggregates: &'a [String],
}

/// Where a template is used: a topic takes no `{value.FIELD}` and no wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Topic,
    Payload,
}

impl Template {
    /// Compiles `source`; on failure every problem as (character offset in `source`, message).
    pub(super) fn parse(
        source: &str,
        place: Place,
        known: &Known<'_>,
    ) -> Result<Template, Vec<(usize, String)>> {
        let mut parts: Vec<Part> = Vec::new();
        let mut problems = Vec::new();
        let mut text = String::new();
        let chars: Vec<char> = source.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let Some(len) = placeholder_len(&chars[i..]) else {
                text.push(chars[i]);
                i += 1;
                continue;
            };
            let name: String = chars[i + 1..i + len - 1].iter().collect();
            match resolve(&name, place, known) {
                Ok(Part::Text(t)) => text.push_str(&t),
                Ok(part) => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                Err(message) => problems.push((i, message)),
            }
            i += len;
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if place == Place::Topic {
            topic_problems(source, &parts, &mut problems);
        }
        if problems.is_empty() {
            Ok(Template {
                source: source.to_string(),
                parts,
            })
        } else {
            Err(problems)
        }
    }

    /// The template filled in for `device` and `values`; a missing value renders as `null`.
    pub fn render(&self, device: &str, values: &BTreeMap<String, Value>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Device => out.push_str(device),
                Part::Value(field) => match values.get(field) {
                    Some(Value::Number(n)) => {
                        let _ = write!(
                            out,
                            "{}",
                            serde_json::Number::from_f64(*n)
                                .map_or_else(|| "null".to_string(), |n| n.to_string())
                        );
                    }
                    Some(Value::Bool(b)) => {
                        let _ = write!(out, "{b}");
                    }
                    Some(Value::Text(s)) => out.push_str(s),
                    None => out.push_str("null"),
                },
            }
        }
        out
    }
}

/// Length in chars of the placeholder at the start of `s`, if one starts there.
fn placeholder_len(s: &[char]) -> Option<usize> {
    if s.first() != Some(&'{') {
        return None;
    }
    let name_len = s[1..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .count();
    let starts_well = s
        .get(1)
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_');
    (starts_well && s.get(1 + name_len) == Some(&'}')).then_some(name_len + 2)
}

/// What `{name}` stands for, or why it is not allowed here.
fn resolve(name: &str, place: Place, known: &Known<'_>) -> Result<Part, String> {
    let names = "{device}, {stream}, {event}, {rule}, {label.NAME}";
    match name {
        "device" => Ok(Part::Device),
        "rule" => Ok(Part::Text(known.rule.to_string())),
        "event" => Ok(Part::Text(known.event.to_string())),
        "stream" => known
            .stream
            .map(|s| Part::Text(s.to_string()))
            .ok_or_else(|| "`{stream}` needs the rule to name its `stream`".to_string()),
        _ => {
            if let Some(label) = name.strip_prefix("label.") {
                return known
                    .labels
                    .get(label)
                    .map(|v| Part::Text(v.clone()))
                    .ok_or_else(|| {
                        let declared: Vec<&str> = known.labels.keys().map(String::as_str).collect();
                        format!(
                            "unknown label `{label}` in `{{{name}}}` (labels: {})",
                            if declared.is_empty() {
                                "none".to_string()
                            } else {
                                declared.join(", ")
                            }
                        )
                    });
            }
            if let Some(field) = name.strip_prefix("value.") {
                if place == Place::Topic {
                    return Err(format!(
                        "`{{{name}}}` is not allowed in a topic (a reading's value is not a topic level)"
                    ));
                }
                if let Some(agg) = field.strip_prefix(&format!("{AGG_VAR}.")) {
                    if !known.aggregates.iter().any(|a| a == agg) {
                        return Err(format!(
                            "unknown aggregate `{agg}` in `{{{name}}}` (declared: {})",
                            if known.aggregates.is_empty() {
                                "none".to_string()
                            } else {
                                known.aggregates.join(", ")
                            }
                        ));
                    }
                }
                if field.is_empty() {
                    return Err("`{value.}` names no field".to_string());
                }
                return Ok(Part::Value(field.to_string()));
            }
            let also = match place {
                Place::Topic => "",
                Place::Payload => ", {value.FIELD}",
            };
            Err(format!(
                "unknown placeholder `{{{name}}}` (known: {names}{also})"
            ))
        }
    }
}

/// A topic must be a topic name once filled in: not empty, no wildcards, no `$` start.
fn topic_problems(source: &str, parts: &[Part], problems: &mut Vec<(usize, String)>) {
    if let Some((i, c)) = source
        .chars()
        .enumerate()
        .find(|(_, c)| matches!(c, '+' | '#' | '\0'))
    {
        problems.push((
            i,
            format!("an action topic may not contain {c:?}: it is a topic name, not a filter"),
        ));
    }
    // Labels filled in at load may bring wildcards too.
    for part in parts {
        if let Part::Text(t) = part {
            if t.contains(['+', '#']) && !source.contains(['+', '#']) {
                problems.push((0, format!("an action topic may not contain `+` or `#` (a label value brings one: {t:?})")));
            }
        }
    }
    if source.is_empty() {
        problems.push((0, "an action topic is empty".to_string()));
    } else if source.starts_with('$') {
        problems.push((
            0,
            "an action topic may not start with `$` (reserved by the broker)".to_string(),
        ));
    }
}

/// One `[[rule.action]]`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// The transition that triggers it.
    pub on: EventState,
    pub topic: Template,
    pub payload: Template,
    /// 0 or 1.
    pub qos: u8,
}

impl Action {
    /// The message this action publishes for `event` (the `index`-th action of its rule),
    /// or `None` when the event is the other transition.
    pub fn render(&self, index: usize, event: &Event) -> Option<ActionMessage> {
        (event.data.state == self.on).then(|| ActionMessage {
            index,
            on: self.on,
            topic: self.topic.render(&event.subject, &event.data.values),
            payload: self.payload.render(&event.subject, &event.data.values),
            qos: self.qos,
        })
    }
}

/// Every message the `actions` publish for `event`, in the order they are declared.
pub fn messages(actions: &[Action], event: &Event) -> Vec<ActionMessage> {
    actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.render(i, event))
        .collect()
}

/// One rendered action, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionMessage {
    /// Position of the action in its rule (0-based).
    pub index: usize,
    pub on: EventState,
    pub topic: String,
    pub payload: String,
    pub qos: u8,
}

/// The `data` of an action's event-log record.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ActionData<'a> {
    /// The id of the event whose transition triggered the action.
    event_id: &'a str,
    event_type: &'a str,
    rule: &'a str,
    on: EventState,
    /// Position of the action in its rule (0-based).
    action: usize,
    topic: &'a str,
    payload: &'a str,
    qos: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct ActionRecord<'a> {
    specversion: &'static str,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: ActionData<'a>,
}

impl ActionMessage {
    /// The event-log record of this message, published for `event` at `at` (Unix ms): a
    /// CloudEvent of type [`ACTION_EVENT_TYPE`] whose `data.event_id` is the event's id.
    /// The action's id: derived from its event's id and its position, so it is stable.
    pub fn id(&self, event: &Event) -> String {
        let mut hasher = Sha256::new();
        hasher.update(event.id.as_bytes());
        hasher.update([0u8]);
        hasher.update((self.index as u64).to_be_bytes());
        hasher.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn record(&self, gateway_id: &str, event: &Event, at: Millis) -> Vec<u8> {
        let record = ActionRecord {
            specversion: SPEC_VERSION,
            id: self.id(event),
            source: format!("gateway/{gateway_id}/rules/{}/actions", event.data.rule),
            event_type: ACTION_EVENT_TYPE,
            subject: &event.subject,
            time: rfc3339(at),
            datacontenttype: DATA_CONTENT_TYPE,
            data: ActionData {
                event_id: &event.id,
                event_type: &event.event_type,
                rule: &event.data.rule,
                on: self.on,
                action: self.index,
                topic: &self.topic,
                payload: &self.payload,
                qos: self.qos,
            },
        };
        serde_json::to_vec(&record).expect("an action record serializes to JSON")
    }
}
