//! Device events: devices' connects and disconnects on the embedded broker, announced as
//! CloudEvents `DeviceConnected` and `DeviceDisconnected`.
//!
//! Reads the broker's connection reports (`rumqttd::PresenceEvent`,
//! `vendor/rumqttd/src/link/presence.rs`); [`Sessions`] decides what each report
//! announces; every event goes out through [`crate::events::emit`], like a rule's: on the
//! local broker at `rules.event_topic`, into the event log, and into the outbox's event
//! lane when forwarding. Runs on its own OS thread (publishing on a local link is a
//! blocking send); on with `rules.device_events` (the default).
//!
//! Invariants:
//! - a device is the client whose client id is the device id (as for the downlink);
//! - per device the events alternate, connected then disconnected, and a replaced
//!   connection never announces the device offline while its successor is connected (a
//!   takeover reads `DeviceDisconnected` `taken_over`, then `DeviceConnected`);
//! - an event's `id` is derived from (gateway, type, device, connection generation, time),
//!   so it is fixed when the event is built and its replays from the backlog carry it;
//! - reports the broker dropped because this stage fell behind are counted
//!   ([`DeviceEventStats::dropped`]), never waited for: a connection is never held up;
//! - the stage ends once the front of the pipeline is cancelled; a gateway that stops
//!   announces no disconnects (its own `offline` status says its devices are gone).

pub mod sessions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rumqttd::local::LinkTx;
use rumqttd::{DisconnectReason, PresenceEvent, PresenceHook};
use serde::{Deserialize, Serialize};

use crate::events::{hashed_id, rfc3339, Event, TopicFields, DATA_CONTENT_TYPE, SPEC_VERSION};
use crate::reading::{now_millis, Millis};
use crate::store::StoreHandle;

pub use sessions::{Change, Session, Sessions};

/// The event type of a device's connect.
pub const DEVICE_CONNECTED: &str = "DeviceConnected";
/// The event type of a device's disconnect.
pub const DEVICE_DISCONNECTED: &str = "DeviceDisconnected";
/// What `{rule}` of `rules.event_topic` becomes for device events.
pub const TOPIC_RULE: &str = "device";

/// Whether a device event is a connect or a disconnect (`{state}` of the topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Connected,
    Disconnected,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Connected => "connected",
            DeviceState::Disconnected => "disconnected",
        }
    }
}

/// The `data` of a device event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceData {
    pub state: DeviceState,
    pub device: String,
    pub client_id: String,
    /// The MQTT version of the connection: `5` or `3.1.1`.
    pub protocol: String,
    /// The CONNECT's keep alive in seconds (0: none).
    pub keep_alive: u16,
    /// Clean session (3.1.1) or clean start (5).
    pub clean_session: bool,
    /// On a disconnect: when the connection was announced (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// On a disconnect: `clean`, `taken_over`, `lost`, `keep_alive_expired`,
    /// `not_authorized`, `protocol_error` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TopicFields for DeviceData {
    fn rule(&self) -> &str {
        TOPIC_RULE
    }
    fn state(&self) -> &str {
        self.state.as_str()
    }
}

/// The event announcing `change`, built at `at` (Unix ms; a connect's time is when its
/// report arrived).
pub fn device_event(gateway_id: &str, change: &Change, at: Millis) -> Event<DeviceData> {
    let (client_id, session, state, reason, time) = match change {
        Change::Connected { client_id, session } => (
            client_id,
            session,
            DeviceState::Connected,
            None,
            session.since,
        ),
        Change::Disconnected {
            client_id,
            session,
            reason,
        } => (
            client_id,
            session,
            DeviceState::Disconnected,
            Some(*reason),
            at,
        ),
    };
    let event_type = match state {
        DeviceState::Connected => DEVICE_CONNECTED,
        DeviceState::Disconnected => DEVICE_DISCONNECTED,
    };
    let device = client_id.to_string();
    let generation = session.generation.to_string();
    Event {
        specversion: SPEC_VERSION.to_string(),
        id: hashed_id(&[gateway_id, event_type, &device, &generation], time),
        source: format!("gateway/{gateway_id}/devices"),
        event_type: event_type.to_string(),
        subject: device.clone(),
        time: rfc3339(time),
        datacontenttype: DATA_CONTENT_TYPE.to_string(),
        replayed: false,
        data: DeviceData {
            state,
            device,
            client_id: client_id.to_string(),
            protocol: if session.mqtt5 { "5" } else { "3.1.1" }.to_string(),
            keep_alive: session.keep_alive,
            clean_session: session.clean_session,
            connected_since: reason.map(|_| rfc3339(session.since)),
            reason: reason.map(|r| r.as_str().to_string()),
        },
    }
}

/// What the stage counts, and which devices are connected, for `/metrics` and the API.
pub struct DeviceEventStats {
    hook: PresenceHook,
    connects: AtomicU64,
    /// By the position of the reason in `DisconnectReason::ALL`.
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    /// Connected devices and since when (Unix ms).
    connected: Mutex<HashMap<String, Millis>>,
}

impl DeviceEventStats {
    pub fn new(hook: PresenceHook) -> DeviceEventStats {
        DeviceEventStats {
            hook,
            connects: AtomicU64::new(0),
            disconnects: Default::default(),
            connected: Mutex::new(HashMap::new()),
        }
    }

    /// `DeviceConnected` events emitted.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// `DeviceDisconnected` events emitted with `reason`.
    pub fn disconnects(&self, reason: DisconnectReason) -> u64 {
        let i = DisconnectReason::ALL.iter().position(|r| *r == reason);
        i.map_or(0, |i| self.disconnects[i].load(Ordering::Relaxed))
    }

    /// Connection reports the broker dropped because the stage's queue was full.
    pub fn dropped(&self) -> u64 {
        self.hook.dropped()
    }

    /// Since when `device` is connected (Unix ms), if it is.
    pub fn connected_since(&self, device: &str) -> Option<Millis> {
        let connected = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        connected.get(device).copied()
    }

    fn record(&self, change: &Change) {
        let mut connected = self.connected.lock().unwrap_or_else(|e| e.into_inner());
        match change {
            Change::Connected { client_id, session } => {
                self.connects.fetch_add(1, Ordering::Relaxed);
                connected.insert(client_id.to_string(), session.since);
            }
            Change::Disconnected {
                client_id, reason, ..
            } => {
                if let Some(i) = DisconnectReason::ALL.iter().position(|r| r == reason) {
                    self.disconnects[i].fetch_add(1, Ordering::Relaxed);
                }
                connected.remove(&**client_id);
            }
        }
    }
}

/// The device-events stage.
pub struct DeviceEvents {
    pub gateway_id: String,
    /// The broker's connection reports.
    pub reports: flume::Receiver<PresenceEvent>,
    /// The local link events are published on.
    pub publish: LinkTx,
    pub store: StoreHandle,
    /// Topic pattern of local events (`rules.event_topic`).
    pub event_topic: String,
    /// Hand events to the outbox (forwarding on).
    pub forward: bool,
    pub stats: Arc<DeviceEventStats>,
    /// Closes (its sender dropped) when the pipeline's front is cancelled: the stage
    /// then ends. A channel rather than a token, so the thread sleeps until a report or
    /// the stop comes, with no wake-up while no device comes or goes.
    pub stop: flume::Receiver<()>,
}

impl DeviceEvents {
    pub fn run(mut self) {
        let _span = tracing::info_span!("device_events").entered();
        let mut sessions = Sessions::default();
        loop {
            let next = flume::Selector::new()
                .recv(&self.reports, |r| r.ok())
                .recv(&self.stop, |_| None)
                .wait();
            match next {
                Some(report) => self.announce(&mut sessions, report),
                None => break,
            }
        }
        tracing::debug!("Device events stopped.");
    }

    fn announce(&mut self, sessions: &mut Sessions, report: PresenceEvent) {
        let now = now_millis();
        for change in sessions.on_report(report, now) {
            let event = device_event(&self.gateway_id, &change, now);
            crate::events::emit(
                &event,
                &mut self.publish,
                &self.store,
                &self.event_topic,
                self.forward,
            );
            self.stats.record(&change);
            match &event.data.reason {
                None => {
                    tracing::info!(device = %event.subject, protocol = %event.data.protocol, "Device connected.")
                }
                Some(reason) => {
                    tracing::info!(device = %event.subject, reason = %reason, "Device disconnected.")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
