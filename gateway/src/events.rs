//! Events: the CloudEvents 1.0 envelope for the facts the gateway announces.
//!
//! Owns the [`Event`] type and its wire form (CloudEvents 1.0, structured mode, JSON),
//! and [`emit`], the one way an event leaves: the local broker, the event log and the
//! outbox. The envelope is generic over its `data`: [`EventData`] for the transitions of
//! rule instances (built by `rules::Engine`), `DeviceData` for devices' connects and
//! disconnects (built by `device_events`).
//! Output: bytes for the local broker, the event log and the outbox (`to_json`), and the
//! local topic an event is published on (`local_topic`).
//!
//! Invariants:
//! - a rule event's `id` is derived from (gateway, rule, device, state, transition time)
//!   only, so the same transition always carries the same id, and a re-emission after a
//!   crash or a replay from the backlog can be dropped by an idempotent consumer (device
//!   events have ids of the same kind, see `device_events`);
//! - `time` is the transition time, not the time the event was built or sent;
//! - `replayed` (a CloudEvents extension attribute) is `false` when an event is emitted;
//!   only the forwarder sets it, when it sends an event from the backlog;
//! - the wire form of rule events does not depend on the other kinds: `data` is the
//!   kind's own struct, with no tag.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use rumqttd::local::LinkTx;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::reading::{now_millis, Millis, Value};
use crate::store::{OutboxEntry, StoreHandle};

/// The CloudEvents version this module speaks.
pub const SPEC_VERSION: &str = "1.0";
/// The content type of `data`.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The default pattern of the local topic events are published on.
pub const DEFAULT_LOCAL_TOPIC: &str = "events/{type}/{device}";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event is not valid CloudEvents JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported CloudEvents specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
}

/// Which transition an event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    /// The instance started firing.
    Firing,
    /// The instance stopped firing.
    Resolved,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Firing => "firing",
            EventState::Resolved => "resolved",
        }
    }
}

impl fmt::Display for EventState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The `data` of a rule event: what happened, to whom, and the values that made it happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    /// `firing` or `resolved`.
    pub state: EventState,
    /// The name of the rule.
    pub rule: String,
    /// The rule's severity (free text, `warning` by default).
    pub severity: String,
    /// When the instance started firing (RFC 3339); on a resolved event, when the firing began.
    pub firing_since: String,
    /// The values of the reading that caused the transition (or the last one seen), and the
    /// rule's aggregates as `agg.NAME`.
    #[serde(default)]
    pub values: BTreeMap<String, Value>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Why a resolution happened other than by its condition (e.g. `rule-removed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the `data` of an event kind fills into the local topic pattern.
pub trait TopicFields {
    /// `{rule}`: the rule's name.
    fn rule(&self) -> &str;
    /// `{state}`: which transition (`firing`, `resolved`, ..).
    fn state(&self) -> &str;
}

impl TopicFields for EventData {
    fn rule(&self) -> &str {
        &self.rule
    }
    fn state(&self) -> &str {
        self.state.as_str()
    }
}

/// One CloudEvents 1.0 event, in structured JSON form; `D` is its kind's `data`
/// (a rule event's unless said otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<D = EventData> {
    pub specversion: String,
    pub id: String,
    /// `gateway/{gateway_id}/rules/{rule}` for rule events.
    pub source: String,
    /// The event type, e.g. `SensorTemperatureExceeded` (the rule's).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The device id.
    pub subject: String,
    /// The transition time, RFC 3339 with milliseconds, UTC.
    pub time: String,
    pub datacontenttype: String,
    /// Extension attribute: true when sent again from the backlog rather than live.
    #[serde(default)]
    pub replayed: bool,
    pub data: D,
}

/// What the engine knows about one transition; turned into an [`Event`] by [`Event::new`].
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub gateway_id: &'a str,
    pub rule: &'a str,
    pub event_type: &'a str,
    pub device: &'a str,
    pub state: EventState,
    pub at: Millis,
    pub firing_since: Millis,
    pub severity: &'a str,
    pub values: BTreeMap<String, Value>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub reason: Option<String>,
}

impl<D: Serialize + DeserializeOwned> Event<D> {
    /// The structured-mode JSON bytes (content type `application/cloudevents+json`).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, maps and numbers cannot fail.
        serde_json::to_vec(self).expect("event serializes to JSON")
    }

    /// Parses structured-mode JSON; rejects a `specversion` other than 1.0.
    pub fn from_json(bytes: &[u8]) -> Result<Event<D>, EventError> {
        let event: Event<D> = serde_json::from_slice(bytes)?;
        if event.specversion != SPEC_VERSION {
            return Err(EventError::SpecVersion(event.specversion));
        }
        Ok(event)
    }

    /// The transition time in Unix milliseconds, parsed back from `time`.
    pub fn time_millis(&self) -> Option<Millis> {
        let t = humantime::parse_rfc3339(&self.time).ok()?;
        t.duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as Millis)
    }
}

impl<D: TopicFields> Event<D> {
    /// The topic for the local broker: `{type}`, `{device}`, `{rule}` and `{state}` in
    /// `pattern` are replaced (see [`DEFAULT_LOCAL_TOPIC`]).
    pub fn local_topic(&self, pattern: &str) -> String {
        pattern
            .replace("{type}", &self.event_type)
            .replace("{device}", &self.subject)
            .replace("{rule}", self.data.rule())
            .replace("{state}", self.data.state())
    }
}

impl Event {
    /// Builds the event for one transition; its id depends only on the transition.
    pub fn new(t: Transition<'_>) -> Event {
        Event {
            specversion: SPEC_VERSION.to_string(),
            id: event_id(t.gateway_id, t.rule, t.device, t.state, t.at),
            source: format!("gateway/{}/rules/{}", t.gateway_id, t.rule),
            event_type: t.event_type.to_string(),
            subject: t.device.to_string(),
            time: rfc3339(t.at),
            datacontenttype: DATA_CONTENT_TYPE.to_string(),
            replayed: false,
            data: EventData {
                state: t.state,
                rule: t.rule.to_string(),
                severity: t.severity.to_string(),
                firing_since: rfc3339(t.firing_since),
                values: t.values,
                labels: t.labels,
                annotations: t.annotations,
                reason: t.reason,
            },
        }
    }

    /// The rule's event state (`firing` / `resolved`).
    pub fn state(&self) -> EventState {
        self.data.state
    }
}

/// Publishes `event` on the local broker at `topic_pattern` (QoS 1, so a subscriber gets
/// it at the QoS it subscribed with), appends it to the event log and, with `forward`,
/// to the outbox's event lane.
pub fn emit<D: Serialize + DeserializeOwned + TopicFields>(
    event: &Event<D>,
    publish: &mut LinkTx,
    store: &StoreHandle,
    topic_pattern: &str,
    forward: bool,
) {
    let json = event.to_json();
    let time = event.time_millis().unwrap_or_else(now_millis);
    let topic = event.local_topic(topic_pattern);
    if let Err(e) = publish.publish_at_least_once(topic, json.clone()) {
        tracing::error!(error = %e, "Cannot publish an event on the local broker.");
    }
    store.log_event(time, &event.event_type, &event.subject, json.clone());
    if forward {
        store.append(OutboxEntry::event(
            &event.event_type,
            &event.subject,
            &json,
            time,
        ));
    }
}

/// A stable id for one transition: hex of the first 16 bytes of
/// SHA-256(gateway, rule, device, state, time in ms).
pub fn event_id(
    gateway_id: &str,
    rule: &str,
    device: &str,
    state: EventState,
    at: Millis,
) -> String {
    hashed_id(&[gateway_id, rule, device, state.as_str()], at)
}

/// Hex of the first 16 bytes of SHA-256 of `parts` (each followed by a 0 byte) and `at`.
pub fn hashed_id(parts: &[&str], at: Millis) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    hasher.update(at.to_be_bytes());
    let digest = hasher.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &digest[..16] {
        id.push(HEX[usize::from(b >> 4)] as char);
        id.push(HEX[usize::from(b & 0xf)] as char);
    }
    id
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339(at: Millis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(at.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(state: EventState, at: Millis) -> Transition<'static> {
        Transition {
            gateway_id: "gw-1",
            rule: "temperature-high",
            event_type: "SensorTemperatureExceeded",
            device: "t-17",
            state,
            at,
            firing_since: at,
            severity: "warning",
            values: [("temperature".to_string(), Value::Number(76.5))].into(),
            labels: [("site".to_string(), "plant-1".to_string())].into(),
            annotations: BTreeMap::new(),
            reason: None,
        }
    }

    #[test]
    fn envelope_has_every_required_cloudevents_attribute() {
        let event = Event::new(transition(EventState::Firing, 1_700_000_000_123));
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "SensorTemperatureExceeded");
        assert_eq!(json["source"], "gateway/gw-1/rules/temperature-high");
        assert_eq!(json["subject"], "t-17");
        assert_eq!(json["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["replayed"], false);
        assert_eq!(json["data"]["state"], "firing");
        assert_eq!(json["data"]["values"]["temperature"], 76.5);
        assert_eq!(json["data"]["labels"]["site"], "plant-1");
        assert_eq!(json["id"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn id_is_stable_for_one_transition_and_differs_between_transitions() {
        let a = Event::new(transition(EventState::Firing, 1_000));
        let again = Event::new(transition(EventState::Firing, 1_000));
        let resolved = Event::new(transition(EventState::Resolved, 1_000));
        let later = Event::new(transition(EventState::Firing, 1_001));
        assert_eq!(a.id, again.id);
        assert_ne!(a.id, resolved.id);
        assert_ne!(a.id, later.id);
    }

    #[test]
    fn ids_are_the_hex_of_the_first_half_of_the_sha256() {
        // Ids already stored and sent upstream stay what they were: values from an
        // independent SHA-256 (Python's hashlib).
        assert_eq!(
            event_id(
                "gw-1",
                "temperature-high",
                "t-17",
                EventState::Firing,
                1_700_000_000_123
            ),
            "a630346211087b9c3b376be8b65196b8"
        );
        assert_eq!(hashed_id(&[], -1), "12a3ae445661ce5dee78d0650d33362d");
    }

    #[test]
    fn json_round_trips_and_time_parses_back() {
        let mut event = Event::new(transition(EventState::Resolved, 1_700_000_000_123));
        event.replayed = true;
        let back = Event::from_json(&event.to_json()).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.time_millis(), Some(1_700_000_000_123));
    }

    #[test]
    fn rejects_other_spec_versions() {
        let mut event = Event::new(transition(EventState::Firing, 0));
        event.specversion = "0.3".into();
        assert!(matches!(
            Event::<EventData>::from_json(&event.to_json()),
            Err(EventError::SpecVersion(v)) if v == "0.3"
        ));
    }

    #[test]
    fn local_topic_fills_the_pattern() {
        let event = Event::new(transition(EventState::Firing, 0));
        assert_eq!(
            event.local_topic(DEFAULT_LOCAL_TOPIC),
            "events/SensorTemperatureExceeded/t-17"
        );
        assert_eq!(
            event.local_topic("alerts/{rule}/{state}"),
            "alerts/temperature-high/firing"
        );
    }
}
