//! PATCH(gateway): each client connection's start and end, reported to the application.
//!
//! With a [`PresenceHook`] set on the broker ([`crate::Broker::set_presence`]), every
//! connection task reports [`PresenceEvent::Connected`] once its CONNACK is written, and
//! [`PresenceEvent::Disconnected`] with a [`DisconnectReason`] when the connection ends.
//!
//! Invariants:
//! - two reports per connection at most, none per packet: the only per-read cost is a
//!   look at the last packet of the read (is it a DISCONNECT?);
//! - a report never blocks a connection: the channel is bounded and a report that finds
//!   it full is dropped and counted ([`PresenceHook::dropped`]);
//! - each report carries the connection's generation (patch 13), so the application
//!   tells a replaced connection's end from the end of the client's current one: a
//!   connection's `Connected` is sent before its `Disconnected`, but the `Disconnected`
//!   of a replaced connection may come before or after its successor's `Connected`;
//! - a connection refused before its CONNACK (authentication, `max_connections`) is not
//!   reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::link::network;
use crate::link::remote;

/// Where connections report their start and end; set with [`crate::Broker::set_presence`].
#[derive(Clone)]
pub struct PresenceHook {
    tx: flume::Sender<PresenceEvent>,
    dropped: Arc<AtomicU64>,
}

impl PresenceHook {
    /// A hook whose channel holds `capacity` reports, and the receiving end.
    pub fn bounded(capacity: usize) -> (PresenceHook, flume::Receiver<PresenceEvent>) {
        let (tx, rx) = flume::bounded(capacity);
        let hook = PresenceHook {
            tx,
            dropped: Arc::default(),
        };
        (hook, rx)
    }

    /// Reports dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn report(&self, event: PresenceEvent) {
        if let Err(flume::TrySendError::Full(_)) = self.tx.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection started or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// The client's CONNECT was accepted and its CONNACK written.
    Connected {
        client_id: Arc<str>,
        generation: u64,
        /// `true` on the MQTT 5 listener, `false` on MQTT 3.1.1.
        mqtt5: bool,
        /// The CONNECT's keep alive in seconds (0: none).
        keep_alive: u16,
        /// Clean session (3.1.1) or clean start (5).
        clean_session: bool,
    },
    /// The connection ended.
    Disconnected {
        client_id: Arc<str>,
        generation: u64,
        reason: DisconnectReason,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Clean,
    /// A newer connection with the same client id replaced it.
    TakenOver,
    /// The socket closed or failed without a DISCONNECT.
    Lost,
    /// Nothing arrived within 1.5 x the keep alive.
    KeepAliveExpired,
    /// The client published or subscribed where the authorizer refused it.
    NotAuthorized,
    /// The client broke the protocol: a malformed packet, an unexpected ack, more
    /// publishes in flight than the Receive Maximum.
    ProtocolError,
    /// The broker or the application ended it (e.g. a publish could not be stored).
    Error,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 7] = [
        DisconnectReason::Clean,
        DisconnectReason::TakenOver,
        DisconnectReason::Lost,
        DisconnectReason::KeepAliveExpired,
        DisconnectReason::NotAuthorized,
        DisconnectReason::ProtocolError,
        DisconnectReason::Error,
    ];

    /// The reason's name in snake case (`clean`, `taken_over`, ..).
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Clean => "clean",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::Lost => "lost",
            DisconnectReason::KeepAliveExpired => "keep_alive_expired",
            DisconnectReason::NotAuthorized => "not_authorized",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::Error => "error",
        }
    }

    /// Why a connection's task ended with `error`: `clean` when its client sent
    /// DISCONNECT, `taken_over` when a newer connection holds its client id.
    pub(crate) fn of(error: &remote::Error, clean: bool, taken_over: bool) -> DisconnectReason {
        if clean {
            return DisconnectReason::Clean;
        }
        if taken_over {
            return DisconnectReason::TakenOver;
        }
        match error {
            remote::Error::Io(_) | remote::Error::Network(network::Error::Io(_)) => {
                DisconnectReason::Lost
            }
            remote::Error::Network(network::Error::KeepAlive) => {
                DisconnectReason::KeepAliveExpired
            }
            remote::Error::NotAuthorized(..) => DisconnectReason::NotAuthorized,
            remote::Error::Network(network::Error::Protocol(_))
            | remote::Error::ReceiveMaximumExceeded(_)
            // The router dropped the connection without a takeover: it refused a packet.
            | remote::Error::Link(_) => DisconnectReason::ProtocolError,
            _ => DisconnectReason::Error,
        }
    }
}
