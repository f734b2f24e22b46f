//! The gateway's presence upstream: one retained JSON message on `{topic_prefix}/status`
//! that says whether this gateway is online.
//!
//! Three messages share that topic, all retained, QoS 1, content type `application/json`:
//! - `online`, published by the session after every ConnAck, before the outbox replay;
//! - the MQTT last will, set on every connection: `offline` with `reason: "connection
//!   lost"`, published by the upstream broker when the connection ends without a
//!   DISCONNECT (a crash, `kill -9`, a power cut, a network failure);
//! - `offline` with `reason: "shutdown"`, published before a clean stop (a normal
//!   DISCONNECT suppresses the will, so this message is what announces the stop).
//!
//! Fields: `state`, `gateway_id`, `version` (of the gateway), `started_at` (Unix ms when the
//! process started), `time` (Unix ms when the gateway sent it; not in the will, which the
//! broker sends at a time the gateway cannot know: it has `connected_at` instead, when
//! the lost connection was opened) and, when offline, `reason`.
//!
//! Over MQTT 3.1.1 the messages are the same, without the content type (3.1.1 has no
//! properties) and without an envelope: the payload is the JSON body above.
//!
//! Invariants:
//! - Presence messages carry no `id` (neither a user property nor an envelope): they are not outbox rows, are never
//!   stored and never replayed; a consumer tells them apart by topic.
//! - The retained value is always the latest state: the broker replaces it with each
//!   message, the will included.

use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use super::encode;
use crate::reading::Millis;

/// The last topic level of presence messages, under the upstream topic prefix.
pub const STATUS_TOPIC: &str = "status";
const CONTENT_TYPE: &str = "application/json";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a presence message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Online,
    /// Published by the gateway before a clean stop.
    Shutdown,
}

/// The presence messages of one gateway process.
#[derive(Debug, Clone)]
pub struct Presence {
    topic: String,
    gateway_id: String,
    started_at: Millis,
}

impl Presence {
    pub fn new(topic_prefix: &str, gateway_id: &str, started_at: Millis) -> Self {
        Presence {
            topic: encode::upstream_topic(topic_prefix, STATUS_TOPIC),
            gateway_id: gateway_id.to_owned(),
            started_at,
        }
    }

    /// `{topic_prefix}/status`.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The fields every presence message carries, with its `state`.
    fn body(&self, state: &str) -> serde_json::Value {
        json!({
            "state": state,
            "gateway_id": self.gateway_id,
            "version": VERSION,
            "started_at": self.started_at,
        })
    }

    /// The payload of `status` sent at `now`.
    pub fn payload(&self, status: Status, now: Millis) -> Vec<u8> {
        let mut body = match status {
            Status::Online => self.body("online"),
            Status::Shutdown => {
                let mut body = self.body("offline");
                body["reason"] = "shutdown".into();
                body
            }
        };
        body["time"] = now.into();
        body.to_string().into_bytes()
    }

    /// The properties of every presence publish.
    pub fn properties(&self) -> PublishProperties {
        PublishProperties {
            content_type: Some(CONTENT_TYPE.into()),
            ..PublishProperties::default()
        }
    }

    /// The payload of the last will of a connection opened at `connected_at`.
    fn will_payload(&self, connected_at: Millis) -> String {
        let mut body = self.body("offline");
        body["connected_at"] = connected_at.into();
        body["reason"] = "connection lost".into();
        body.to_string()
    }

    /// The MQTT 3.1.1 last will of a connection opened at `connected_at`.
    pub fn last_will_311(&self, connected_at: Millis) -> rumqttc::LastWill {
        rumqttc::LastWill::new(
            self.topic.clone(),
            self.will_payload(connected_at),
            rumqttc::QoS::AtLeastOnce,
            true,
        )
    }

    /// The MQTT 5 last will of a connection opened at `connected_at`.
    pub fn last_will(&self, connected_at: Millis) -> LastWill {
        let properties = LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some(CONTENT_TYPE.into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        LastWill::new(
            self.topic.clone(),
            self.will_payload(connected_at),
            QoS::AtLeastOnce,
            true,
            Some(properties),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn online_and_shutdown_say_who_when_and_since_when() {
        let p = Presence::new("gateways/gw-1", "gw-1", 1_000);
        assert_eq!(p.topic(), "gateways/gw-1/status");
        let online = parse(&p.payload(Status::Online, 5_000));
        assert_eq!(
            online,
            json!({"state": "online", "gateway_id": "gw-1", "version": VERSION,
                   "started_at": 1_000, "time": 5_000})
        );
        let off = parse(&p.payload(Status::Shutdown, 9_000));
        assert_eq!(off["state"], "offline");
        assert_eq!(off["reason"], "shutdown");
        assert_eq!(off["time"], 9_000);
        assert_eq!(off["started_at"], 1_000);
        assert_eq!(
            p.properties().content_type.as_deref(),
            Some("application/json")
        );
    }

    #[test]
    fn the_will_is_a_retained_offline_on_the_same_topic() {
        let p = Presence::new("", "gw-1", 1_000);
        let will = p.last_will(2_000);
        assert_eq!(&will.topic[..], b"status");
        assert!(will.retain);
        assert_eq!(will.qos, QoS::AtLeastOnce);
        let body = parse(&will.message);
        assert_eq!(body["state"], "offline");
        assert_eq!(body["reason"], "connection lost");
        assert_eq!(body["connected_at"], 2_000);
        assert_eq!(body["gateway_id"], "gw-1");
        assert!(body.get("time").is_none());
        assert_eq!(
            will.properties.and_then(|p| p.content_type).as_deref(),
            Some("application/json")
        );
        let will_311 = p.last_will_311(2_000);
        assert_eq!(will_311.topic, "status");
        assert!(will_311.retain);
        assert_eq!(will_311.qos, rumqttc::QoS::AtLeastOnce);
        assert_eq!(
            parse(&will_311.message),
            body,
            "the same will over MQTT 3.1.1"
        );
    }
}
