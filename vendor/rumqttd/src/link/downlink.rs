//! PATCH(gateway): messages the application delivers to one client on that client's own
//! connection, and the client's PUBACKs for them reported back.
//!
//! With a [`DownlinkHook`] set on the broker ([`crate::Broker::set_downlink`]), every
//! connection task reports each SUBSCRIBE its client sends (after authorization) as
//! [`DownlinkEvent::Subscribed`], carrying a [`DownlinkSender`] through which the
//! application hands that connection a [`DownlinkMessage`]. The connection writes it as a
//! QoS 1 PUBLISH itself and reports the client's PUBACK as [`DownlinkEvent::Acked`].
//!
//! Invariants:
//! - the router never sees these messages nor their PUBACKs: nothing is retained, no
//!   other subscriber gets them, and an offline client gets them only through the
//!   application (which keeps them until acked);
//! - their packet ids come from [`PKID_BASE`]`..=u16::MAX`, apart from the router's
//!   forwards (ids 1 to 100, `router/iobufs.rs`), so a PUBACK tells which is which;
//! - each event carries the connection's generation (patch 13): a PUBACK on a replaced
//!   connection cannot be taken for one on its successor;
//! - a message sent to a connection that has ended fails at once
//!   ([`DownlinkSender::send`]); one written but not acked when the connection ends is
//!   never reported acked, so the application delivers it again (at least once);
//! - MQTT 3.1.1 clients get the message without its properties.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::{Packet, Publish, PublishProperties, QoS};

/// The first packet id of a downlink message; the router's forwards stay below it.
pub const PKID_BASE: u16 = 0xF000;
/// Downlink messages a connection holds before the application's sends fail.
const CONNECTION_QUEUE: usize = 64;

/// Where connections report subscriptions and PUBACKs; set with
/// [`crate::Broker::set_downlink`].
#[derive(Clone)]
pub struct DownlinkHook {
    tx: flume::Sender<DownlinkEvent>,
}

impl DownlinkHook {
    /// A hook and the receiving end of its events (unbounded: subscriptions and acks of
    /// messages the application sent, so bounded by what it sends).
    pub fn new() -> (DownlinkHook, flume::Receiver<DownlinkEvent>) {
        let (tx, rx) = flume::unbounded();
        (DownlinkHook { tx }, rx)
    }
}

/// What a connection tells the application.
#[derive(Debug)]
pub enum DownlinkEvent {
    /// The client subscribed to `filters` on this connection.
    Subscribed {
        client_id: Arc<str>,
        generation: u64,
        filters: Vec<String>,
        connection: DownlinkSender,
    },
    /// The client acknowledged the message `id` (as the application numbered it).
    Acked {
        client_id: Arc<str>,
        generation: u64,
        id: u64,
    },
}

/// One message for a client, written by its connection as a QoS 1 PUBLISH.
#[derive(Debug, Clone)]
pub struct DownlinkMessage {
    /// The application's id, reported back with the PUBACK.
    pub id: u64,
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 properties (content type, user properties, ..); left out on MQTT 3.1.1.
    pub properties: Option<PublishProperties>,
}

/// The application's way to one connection.
#[derive(Debug, Clone)]
pub struct DownlinkSender {
    tx: flume::Sender<DownlinkMessage>,
}

impl DownlinkSender {
    /// Hands `message` to the connection; `false` when the connection has ended (or holds
    /// too many unwritten messages).
    pub fn send(&self, message: DownlinkMessage) -> bool {
        self.tx.try_send(message).is_ok()
    }

    /// Whether the connection is still there.
    pub fn is_connected(&self) -> bool {
        !self.tx.is_disconnected()
    }
}

/// A connection's side.
pub(crate) struct Downlink {
    hook: DownlinkHook,
    client_id: Arc<str>,
    generation: u64,
    tx: flume::Sender<DownlinkMessage>,
    rx: flume::Receiver<DownlinkMessage>,
    /// Written and not yet acked: packet id -> the application's id.
    in_flight: HashMap<u16, u64>,
    next_pkid: u16,
}

impl Downlink {
    pub(crate) fn new(hook: DownlinkHook, client_id: &str, generation: u64) -> Downlink {
        let (tx, rx) = flume::bounded(CONNECTION_QUEUE);
        Downlink {
            hook,
            client_id: client_id.into(),
            generation,
            tx,
            rx,
            in_flight: HashMap::new(),
            next_pkid: PKID_BASE,
        }
    }

    /// Looks at the authorized packets of one network read: reports SUBSCRIBEs, and
    /// takes out (and reports) the PUBACKs of downlink messages.
    pub(crate) fn observe(&mut self, packets: &mut Vec<Packet>) {
        packets.retain(|packet| match packet {
            Packet::Subscribe(subscribe, _) => {
                let _ = self.hook.tx.send(DownlinkEvent::Subscribed {
                    client_id: self.client_id.clone(),
                    generation: self.generation,
                    filters: subscribe.filters.iter().map(|f| f.path.clone()).collect(),
                    connection: DownlinkSender {
                        tx: self.tx.clone(),
                    },
                });
                true
            }
            Packet::PubAck(ack, _) if ack.pkid >= PKID_BASE => {
                if let Some(id) = self.in_flight.remove(&ack.pkid) {
                    let _ = self.hook.tx.send(DownlinkEvent::Acked {
                        client_id: self.client_id.clone(),
                        generation: self.generation,
                        id,
                    });
                }
                false
            }
            _ => true,
        });
    }

    /// The receiving end of the application's messages for this connection, for a
    /// receive future that outlives one turn of the remote link's loop (`link/remote.rs`).
    /// It never reports the channel closed: `self.tx` keeps it open.
    pub(crate) fn messages(&self) -> flume::Receiver<DownlinkMessage> {
        self.rx.clone()
    }

    /// The PUBLISH packet of `message`, with a packet id of its own.
    pub(crate) fn publish(&mut self, message: DownlinkMessage, mqtt5: bool) -> Packet {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(PKID_BASE);
        self.in_flight.insert(pkid, message.id);
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            pkid,
            retain: false,
            topic: Bytes::from(message.topic),
            payload: message.payload,
        };
        Packet::Publish(publish, message.properties.filter(|_| mqtt5))
    }
}

