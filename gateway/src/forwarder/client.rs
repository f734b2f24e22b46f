//! One upstream connection over either MQTT version: rumqttc's MQTT 5 client
//! (`rumqttc::v5`) or its MQTT 3.1.1 client (`rumqttc`), behind one [`Client`] and one
//! event type ([`Wire`]), so the forwarder's states and the session are written once.
//!
//! A [`Connection`] is a fresh client and event loop per attempt, polled by its own pump
//! task that turns every event of either client into a [`Wire`] event and hands it over a
//! channel, ending at the first error. The events one poll produces (a write of the
//! requests queued meanwhile, or a read of several packets, yields one event per packet)
//! cross the channel together, as one [`PumpBatch`]; [`Events`] gives them out one by
//! one. What the session needs of an event is all [`Wire`] keeps: the ConnAck, a publish
//! given its packet id (`Outgoing::Publish`, in request order), a PUBACK with its outcome
//! (MQTT 3.1.1 PUBACKs have no reason code: they always accept), and an incoming publish
//! (a downlink command) with the means to acknowledge it.
//!
//! Invariants:
//! - Both versions connect alike: clean start, the same keep-alive, packet size limit,
//!   inflight limit (the largest window + 1, room for the presence message at a stop;
//!   over MQTT 5 rumqttc lowers it to the broker's Receive Maximum), 5 s
//!   connection timeout, credentials, TLS, and the presence last will.
//! - MQTT 3.1.1 has no properties: [`Client::try_publish`] drops them, so the caller puts
//!   what a consumer needs into the payload (`encode::envelope`) before publishing.
//! - Incoming publishes are acknowledged by hand (`set_manual_acks`): a command's PUBACK
//!   goes out only when the downlink has committed it ([`UpstreamCommand::ack`]). Those
//!   PUBACKs are outgoing packets of their own (`Outgoing::PubAck`), never an
//!   `Outgoing::Publish`, so the packet-id FIFO of the rows is unaffected. Over MQTT 5 the
//!   gateway's Receive Maximum ([`COMMANDS_IN_FLIGHT`]) bounds the commands the upstream
//!   broker sends before they are acked; over 3.1.1 the broker's own in-flight limit does.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Packet as Packet5, PubAckReason, Publish as Publish5, PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::{v5, Outgoing};
use smallvec::SmallVec;
use tokio::sync::mpsc;

use super::Forwarder;
use crate::config::{UpstreamProtocol, UpstreamUrl};
use crate::reading::now_millis;
use crate::store::OnCommit;

/// A command as the forwarder received it upstream.
pub struct UpstreamCommand {
    /// The full upstream topic.
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 properties of the upstream message (none over MQTT 3.1.1).
    pub correlation_data: Option<Vec<u8>>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    /// Sends the upstream PUBACK; run once the command is committed.
    pub ack: OnCommit,
}

impl std::fmt::Debug for UpstreamCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCommand")
            .field("topic", &self.topic)
            .field("payload_bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Batches of events buffered between the pump and the session.
const PUMP_CAPACITY: usize = 64;
/// Requests a client queues beyond the in-flight window.
const REQUEST_HEADROOM: usize = 16;
/// The MQTT 5 Receive Maximum the gateway announces upstream: commands received and not
/// yet committed (so not yet acked) at most, which bounds the queue to the downlink.
pub(crate) const COMMANDS_IN_FLIGHT: u16 = 100;
/// Seconds to wait for the TCP (and TLS) connection and the ConnAck.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// What the session needs of one event of either client.
#[derive(Debug)]
pub(super) enum Wire {
    /// The connection is up; over MQTT 5 with the broker's Receive Maximum, if it
    /// announced one.
    ConnAck {
        receive_max: Option<u16>,
    },
    /// A publish request was given its packet id (0 for QoS 0), in request order.
    Sent(u16),
    PubAck {
        pkid: u16,
        outcome: AckOutcome,
    },
    /// A publish from upstream, to be acknowledged with [`UpstreamCommand::ack`].
    Command(UpstreamCommand),
    /// Anything else (pings, the outgoing half of acks, ...).
    Other,
}

/// What a PUBACK says about the message it acknowledges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AckOutcome {
    Accepted,
    /// MQTT 5 "no matching subscribers": accepted, and discarded by the broker.
    NoSubscribers,
    /// An MQTT 5 error reason code.
    Refused(PubAckReason),
}

/// The error that ended a connection.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct WireError {
    message: String,
    /// The TLS handshake failed (rarely fixed by retrying).
    pub tls: bool,
}

pub(super) type PumpEvent = Result<Wire, WireError>;

/// The events of one poll of an event loop, in order: the one it returned and those it
/// left buffered. An error ends a batch (and the pump). Handed over together, they cost
/// the channel one send and one receive: per event, the channel's sends and receives
/// were about 2% of the gateway's samples at 1000 devices x 10/s (BENCHMARKS.md,
/// "Fewer hand-offs and allocations per forwarded reading").
pub(super) type PumpBatch = SmallVec<[PumpEvent; 1]>;

/// The session's end of a pump: its events one at a time, in order, taken from the
/// channel a batch at a time. Both receives are cancel-safe, as the channel's own are: an
/// event is taken from the batch only when it is returned.
pub(super) struct Events {
    rx: mpsc::Receiver<PumpBatch>,
    batch: smallvec::IntoIter<[PumpEvent; 1]>,
}

impl Events {
    fn new(rx: mpsc::Receiver<PumpBatch>) -> Events {
        Events {
            rx,
            batch: PumpBatch::new().into_iter(),
        }
    }

    /// The next event; `None` once the pump has ended and every event was taken.
    pub(super) async fn recv(&mut self) -> Option<PumpEvent> {
        loop {
            if let Some(ev) = self.batch.next() {
                return Some(ev);
            }
            self.batch = self.rx.recv().await?.into_iter();
        }
    }

    /// The next event if one is there already.
    pub(super) fn try_recv(&mut self) -> Option<PumpEvent> {
        loop {
            if let Some(ev) = self.batch.next() {
                return Some(ev);
            }
            self.batch = self.rx.try_recv().ok()?.into_iter();
        }
    }
}

/// A request could not be queued: the connection's event loop is gone.
#[derive(Debug, thiserror::Error)]
#[error("the connection's event loop has stopped")]
pub(super) struct Closed;

/// The client half of one connection.
pub(super) enum Client {
    V5(v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    /// Queues a publish without waiting. MQTT 3.1.1 sends no `properties`. The topic is
    /// UTF-8 (`encode::upstream_topic_in`); over MQTT 5 its bytes go out as they are, over
    /// 3.1.1 (whose client takes a `String`) they are copied.
    pub(super) fn try_publish(
        &self,
        topic: Bytes,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<(), Closed> {
        match self {
            Client::V5(c) => {
                let mut publish = Publish5::new(String::new(), qos, payload, Some(properties));
                publish.topic = topic;
                publish.retain = retain;
                c.try_publish_built(publish).map_err(|_| Closed)
            }
            Client::V311(c) => {
                let topic = String::from_utf8_lossy(&topic).into_owned();
                c.try_publish(topic, qos_311(qos), retain, payload)
                    .map_err(|_| Closed)
            }
        }
    }

    /// Queues a QoS 1 SUBSCRIBE to `filter` without waiting.
    pub(super) fn try_subscribe(&self, filter: String) -> Result<(), Closed> {
        match self {
            Client::V5(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|_| Closed),
            Client::V311(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|_| Closed),
        }
    }

    /// Queues a DISCONNECT; when the event loop is gone there is nothing to disconnect.
    pub(super) fn try_disconnect(&self) {
        let _queued = match self {
            Client::V5(c) => c.try_disconnect().is_ok(),
            Client::V311(c) => c.try_disconnect().is_ok(),
        };
    }
}

/// One upstream connection: a fresh client and event loop per attempt, so nothing queued
/// for a dead connection (requests, packet ids, events) can leak into the next one.
pub(super) struct Connection {
    pub client: Client,
    pub events: Events,
    pump: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts connecting to `url` with the forwarder's settings.
    pub(super) fn open(fwd: &Forwarder, url: &UpstreamUrl) -> Connection {
        let cfg = &fwd.cfg;
        // Built for the largest window: the broker says what it takes in its ConnAck.
        let window = cfg.max_window();
        let capacity = window + REQUEST_HEADROOM;
        // One more than the rows' window: room for the presence message at a stop.
        let inflight = (window + 1).min(u16::MAX as usize) as u16;
        let keep_alive = cfg.keep_alive.max(Duration::from_secs(1));
        let transport = fwd.tls.as_ref().map(|tls| {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone()))
        });
        let (tx, events) = mpsc::channel(PUMP_CAPACITY);
        let (client, pump) = match cfg.protocol {
            UpstreamProtocol::V5 => {
                let mut o = v5::MqttOptions::new(cfg.client_id.clone(), url.host.clone(), url.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_start(true)
                    .set_connection_timeout(CONNECT_TIMEOUT_SECS)
                    .set_max_packet_size(Some(cfg.max_packet_size as u32))
                    .set_outgoing_inflight_upper_limit(inflight)
                    .set_manual_acks(true)
                    // The outbox sends again what was not acked, on the next connection.
                    .set_keep_unacked_publishes(false)
                    .set_receive_maximum(Some(COMMANDS_IN_FLIGHT))
                    .set_last_will(fwd.presence.last_will(now_millis()));
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (client, eventloop) = v5::AsyncClient::new(o, capacity);
                let pump = tokio::spawn(pump((eventloop, client.clone()), tx));
                (Client::V5(client), pump)
            }
            UpstreamProtocol::V311 => {
                let mut o =
                    rumqttc::MqttOptions::new(cfg.client_id.clone(), url.host.clone(), url.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(true)
                    .set_max_packet_size(cfg.max_packet_size, cfg.max_packet_size)
                    .set_inflight(inflight)
                    .set_manual_acks(true)
                    .set_keep_unacked_publishes(false)
                    .set_last_will(fwd.presence.last_will_311(now_millis()));
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(o, capacity);
                eventloop
                    .network_options
                    .set_connection_timeout(CONNECT_TIMEOUT_SECS);
                let pump = tokio::spawn(pump((eventloop, client.clone()), tx));
                (Client::V311(client), pump)
            }
        };
        Connection {
            client,
            events: Events::new(events),
            pump,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

fn qos_311(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// An event loop of either MQTT version as the pump polls it: events already turned into
/// [`Wire`] events.
trait Polled {
    /// The next event; an error ends the connection.
    async fn next(&mut self) -> Result<Wire, WireError>;
    /// The events the last poll left buffered, in the order the next polls would have
    /// returned them.
    fn buffered(&mut self) -> impl Iterator<Item = Wire> + '_;
}

impl Polled for (v5::EventLoop, v5::AsyncClient) {
    async fn next(&mut self) -> Result<Wire, WireError> {
        match self.0.poll().await {
            Ok(ev) => Ok(wire_v5(&self.1, ev)),
            Err(e) => Err(WireError {
                tls: matches!(e, v5::ConnectionError::Tls(_)),
                message: e.to_string(),
            }),
        }
    }

    fn buffered(&mut self) -> impl Iterator<Item = Wire> + '_ {
        let (eventloop, client) = self;
        eventloop
            .state
            .events
            .drain(..)
            .map(|ev| wire_v5(client, ev))
    }
}

impl Polled for (rumqttc::EventLoop, rumqttc::AsyncClient) {
    async fn next(&mut self) -> Result<Wire, WireError> {
        match self.0.poll().await {
            Ok(ev) => Ok(wire_311(&self.1, ev)),
            Err(e) => Err(WireError {
                tls: matches!(e, rumqttc::ConnectionError::Tls(_)),
                message: e.to_string(),
            }),
        }
    }

    fn buffered(&mut self) -> impl Iterator<Item = Wire> + '_ {
        let (eventloop, client) = self;
        eventloop
            .state
            .events
            .drain(..)
            .map(|ev| wire_311(client, ev))
    }
}

/// Polls an event loop and hands every event over, a poll's events at a time, until the
/// first error (which ends the connection: the next attempt gets a new event loop).
async fn pump(mut eventloop: impl Polled, events: mpsc::Sender<PumpBatch>) {
    loop {
        let mut batch = PumpBatch::new();
        let ev = eventloop.next().await;
        let failed = ev.is_err();
        batch.push(ev);
        if !failed {
            // What the same poll left buffered goes with it.
            batch.extend(eventloop.buffered().map(Ok));
        }
        if events.send(batch).await.is_err() || failed {
            return;
        }
    }
}

/// What the session needs of an MQTT 5 event.
fn wire_v5(client: &v5::AsyncClient, ev: v5::Event) -> Wire {
    match ev {
        v5::Event::Incoming(Packet5::ConnAck(ack)) => Wire::ConnAck {
            receive_max: ack.properties.and_then(|p| p.receive_max),
        },
        v5::Event::Incoming(Packet5::Publish(p)) => Wire::Command(command_v5(client, p)),
        v5::Event::Outgoing(Outgoing::Publish(pkid)) => Wire::Sent(pkid),
        v5::Event::Incoming(Packet5::PubAck(ack)) => Wire::PubAck {
            pkid: ack.pkid,
            outcome: match ack.reason {
                PubAckReason::Success => AckOutcome::Accepted,
                PubAckReason::NoMatchingSubscribers => AckOutcome::NoSubscribers,
                reason => AckOutcome::Refused(reason),
            },
        },
        _ => Wire::Other,
    }
}

/// What the session needs of an MQTT 3.1.1 event (its PUBACKs always accept).
fn wire_311(client: &rumqttc::AsyncClient, ev: rumqttc::Event) -> Wire {
    match ev {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
            Wire::ConnAck { receive_max: None }
        }
        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
            Wire::Command(command_311(client, p))
        }
        rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => Wire::Sent(pkid),
        rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)) => Wire::PubAck {
            pkid: ack.pkid,
            outcome: AckOutcome::Accepted,
        },
        _ => Wire::Other,
    }
}

/// An MQTT 5 publish from upstream as a command, acknowledged through `client`.
fn command_v5(client: &v5::AsyncClient, p: v5::mqttbytes::v5::Publish) -> UpstreamCommand {
    let props = p.properties.clone().unwrap_or_default();
    let client = client.clone();
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let payload = p.payload.to_vec();
    UpstreamCommand {
        topic,
        payload,
        correlation_data: props.correlation_data.map(|c| c.to_vec()),
        message_expiry: props.message_expiry_interval,
        content_type: props.content_type,
        user_properties: props.user_properties,
        // A failed ack means the connection is gone; the command is stored anyway.
        ack: Box::new(move || {
            let _ = client.try_ack(&p);
        }),
    }
}

/// An MQTT 3.1.1 publish from upstream as a command (no properties).
fn command_311(client: &rumqttc::AsyncClient, p: rumqttc::Publish) -> UpstreamCommand {
    let client = client.clone();
    UpstreamCommand {
        topic: p.topic.clone(),
        payload: p.payload.to_vec(),
        correlation_data: None,
        message_expiry: None,
        content_type: None,
        user_properties: Vec::new(),
        ack: Box::new(move || {
            let _ = client.try_ack(&p);
        }),
    }
}

#[cfg(test)]
mod tests;
