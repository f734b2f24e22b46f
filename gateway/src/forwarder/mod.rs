//! The forwarder: drains the outbox to the upstream MQTT broker over rumqttc (MQTT 5, or
//! MQTT 3.1.1 with `upstream.protocol = "3.1.1"`).
//!
//! Reads committed outbox rows in sequence order (events lane first; rows committed since it
//! caught up come from the store's memory, `StoreHandle::read_outbox_live`), publishes them to
//! `{topic_prefix}/{row topic}`, and deletes a row only when its PUBACK arrives. Inputs:
//! the [`StoreHandle`] (rows, the "rows added" wake-up) and the rumqttc event loop; outputs:
//! publishes upstream, acks to the store and live counters ([`ForwarderStats`]).
//!
//! The work is a state machine ([`State`]): `Connecting` -> `Online` -> (error) ->
//! `BackingOff` -> `Connecting` ..., and `Stopped` on shutdown. Every connection attempt
//! gets a fresh rumqttc client and event loop (`client.rs`, either MQTT version), polled by
//! its own pump task (it must be polled for anything to move, and `poll` is not cancel-safe
//! inside a `select!`) that hands every event over a channel and ends at the first error.
//! A fresh client per connection means no request queued for a dead connection can be
//! sent on the next one and shift the packet-id correlation.
//!
//! Failover: `upstream.url` may list several URLs (a broker cluster's nodes). Each
//! connection attempt goes to one of them; after a failed attempt or a lost connection the
//! next attempt, after the usual backoff, goes to the next URL of the list, round robin.
//! [`ForwarderStats::current_url`] names the URL connected (or being tried).
//!
//! It runs on the runtime of the devices' listener (`pipeline.rs`), so that a commit
//! wakes one thread for the devices' acks and the forwarder's rows. Nothing in it blocks
//! that thread except reading a backlog from the file, `session::READ_CHUNK` rows at a
//! time (rows committed since it caught up come from memory).
//!
//! Invariants:
//! - Clean start on every connection: rumqttc drops its own queue then, and the outbox is
//!   the only source of truth. After every ConnAck the session first commits pending acks,
//!   then replays from the oldest unacked row.
//! - PUBACKs are correlated through `Outgoing::Publish(pkid)`, which rumqttc emits in the
//!   order of the requests: a FIFO of sent messages gets its packet id there.
//! - At-least-once: a row is sent again only if its PUBACK was not received on the
//!   connection it was sent on (the in-flight window: see "The window" below).
//! - Order is kept per lane (so per device): one connection, publishes in seq order.
//! - Repeats after a crash are bounded: the window's publishes plus at most
//!   `max_uncommitted_acks` rows acked upstream whose deletion is not committed yet
//!   (sending pauses at that bound until the store catches up).
//!
//! The window: how many publishes of a connection may await their PUBACK
//! ([`ForwarderConfig::window`]). `upstream.max_inflight` is its ceiling, by default
//! `"auto"`: [`AUTO_INFLIGHT_V5`] over MQTT 5, [`AUTO_INFLIGHT_V311`] over 3.1.1. Over MQTT 5
//! the broker's Receive Maximum (CONNACK) also caps it, so that a broker that takes 20
//! gets 20, and one that announces no limit gets the ceiling. Unbatched, one connection
//! forwards at most a window per round trip: with 100 on loopback at full speed, the
//! forwarder fell behind one fast device whenever the upstream broker was slow to be
//! scheduled (BENCHMARKS.md, "The forwarder's window").
//!
//! What consumers get over MQTT 5: user properties `id` (`{gateway_id}:{epoch}:{seq}`, the
//! database epoch in 16 hex digits and the outbox seq; stable across replays and restarts,
//! unique across database files: the dedup key) and `replayed` (`true`/`false`), a content type;
//! replayed events also carry `"replayed": true` in their CloudEvents envelope; batches
//! (`{prefix}/batch`) are arrays whose elements carry `id`, `topic`, `received_at`,
//! `replayed` and the original `payload`. Over MQTT 3.1.1, which has no properties, every
//! forwarded message is a JSON envelope (`encode::envelope`) carrying `id`, `replayed`,
//! `content_type` and the original payload.
//!
//! Presence (`presence.rs`): every connection carries a retained `offline` last will on
//! `{topic_prefix}/status`; the session publishes the retained `online` message right after
//! the ConnAck, before the replay, and a retained `offline` before a clean stop. Those
//! publishes are entries of the same packet-id FIFO as the rows, so they never shift the
//! correlation; the client's inflight limit is one more than the window so that the stop
//! message finds a slot even when the window is full of rows (unless an MQTT 5 broker's
//! Receive Maximum is the window: then it waits for the first PUBACK).
//!
//! Downlink ([`Forwarder::with_downlink`]): after every ConnAck the session subscribes
//! (QoS 1) to the command filter and hands each incoming publish to the downlink stage
//! (`crate::downlink`), which acknowledges it once committed (manual acks, `client.rs`).
//! Clean start means commands published while the gateway is not connected are the
//! upstream broker's to keep or drop; once received, a command is the gateway's.

mod client;
mod encode;
mod presence;
mod session;

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{Config, UpstreamInflight, UpstreamProtocol, UpstreamTls, UpstreamUrls};
use crate::counters::Histogram;
use crate::reading::{now_millis, Millis};
use crate::store::{ByLane, StoreHandle};
use crate::tls::TlsError;
pub use client::UpstreamCommand;
use client::{Connection, Events, Wire};

pub use encode::{id_prefix, message_id, upstream_topic};
pub use presence::STATUS_TOPIC;

/// Errors of the forwarder's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("upstream.qos must be 0 or 1, got {0}")]
    BadQos(u8),
    #[error("upstream.max_inflight must be \"auto\" or between 1 and 65535, got {0}")]
    BadInflight(UpstreamInflight),
    #[error("upstream.url {0}: mqtts:// needs the upstream TLS files, mqtt:// must not have them")]
    TlsMismatch(UpstreamUrls),
    #[error("upstream TLS files: {0}")]
    Tls(#[from] TlsError),
}

/// The window of `upstream.max_inflight = "auto"` over MQTT 5 when the broker announces
/// no smaller Receive Maximum.
pub const AUTO_INFLIGHT_V5: usize = 2000;
/// The window of `upstream.max_inflight = "auto"` over MQTT 3.1.1, whose brokers cannot
/// announce a limit: a common per-connection limit of cloud brokers.
pub const AUTO_INFLIGHT_V311: usize = 100;
/// Rows acked upstream whose deletion is not committed yet, at most (see
/// [`ForwarderConfig::max_uncommitted_acks`]).
pub const MAX_UNCOMMITTED_ACKS: usize = 2000;
/// Longest wait at shutdown for the PUBACKs of messages in flight; a third of
/// `gateway.shutdown_grace` when that is shorter.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The forwarder's settings: the `[upstream]` section of a [`Config`] with the gateway
/// id and the filled-in topic prefix. Built only by [`ForwarderConfig::from_config`]; a
/// test that wants other values changes the `Config` (or a field) before or after.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Where to connect, in the order tried; `tls()` tells `mqtts://` (with
    /// [`ForwarderConfig::tls`]).
    pub urls: UpstreamUrls,
    /// MQTT 5 or 3.1.1.
    pub protocol: UpstreamProtocol,
    pub client_id: String,
    /// First part of message ids (`{gateway_id}:{epoch}:{seq}`).
    pub gateway_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    /// 1 (default, deletes on PUBACK) or 0 (deletes once written to the socket).
    pub qos: u8,
    pub topic_prefix: String,
    /// Ceiling of the window, publishes awaiting PUBACK ([`ForwarderConfig::window`]); the
    /// window is also how many messages may be sent twice after a failure.
    pub max_inflight: UpstreamInflight,
    /// Rows acked upstream whose deletion is not committed yet, at most: sending pauses
    /// beyond it. Bounds the repeats after a crash to the window's publishes plus this.
    /// Not an operator setting: [`MAX_UNCOMMITTED_ACKS`].
    pub max_uncommitted_acks: usize,
    /// Messages per second while replaying a backlog; live traffic is not limited.
    pub rate_limit_per_sec: Option<u32>,
    /// Readings per upstream publish; 1 turns batching off.
    pub batch_max_messages: usize,
    /// How long a partial batch of live readings waits for more.
    pub batch_linger_ms: u64,
    /// Largest packet sent or accepted; bigger rows are dropped and counted.
    pub max_packet_size: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for PUBACKs of messages in flight.
    pub shutdown_grace: Duration,
    /// Trust anchors and optional client certificate for `mqtts://`, loaded by
    /// [`Forwarder::new`]; the server name verified is the host of the URL connected to.
    pub tls: Option<UpstreamTls>,
    /// Unix ms when the gateway started, as its presence messages say: `from_config`
    /// takes the current time; the pipeline sets the start it also reports on the API.
    pub started_at: Millis,
}

impl ForwarderConfig {
    /// The forwarder settings of a configuration, `None` when forwarding is off
    /// (`upstream.url` empty).
    pub fn from_config(config: &Config) -> Option<ForwarderConfig> {
        let up = &config.upstream;
        Some(ForwarderConfig {
            urls: up.url.clone()?,
            protocol: up.protocol,
            client_id: up.client_id.clone(),
            gateway_id: config.gateway.id.clone(),
            username: up.username.clone(),
            password: up.password.clone(),
            keep_alive: up.keep_alive,
            qos: up.qos,
            topic_prefix: config.upstream_prefix(),
            max_inflight: up.max_inflight,
            max_uncommitted_acks: MAX_UNCOMMITTED_ACKS,
            rate_limit_per_sec: Some(up.rate_limit).filter(|r| *r > 0),
            batch_max_messages: up.batch_max_messages,
            batch_linger_ms: up.batch_linger_ms,
            max_packet_size: up.max_packet_bytes,
            backoff_min: up.backoff_min,
            backoff_max: up.backoff_max,
            shutdown_grace: (config.gateway.shutdown_grace / 3).min(MAX_SHUTDOWN_GRACE),
            tls: up.tls.clone(),
            started_at: now_millis(),
        })
    }

    fn validate(&self) -> Result<(), ForwarderError> {
        if self.urls.tls() != self.tls.is_some() {
            return Err(ForwarderError::TlsMismatch(self.urls.clone()));
        }
        if self.qos > 1 {
            return Err(ForwarderError::BadQos(self.qos));
        }
        if self.max_inflight == UpstreamInflight::Fixed(0) {
            return Err(ForwarderError::BadInflight(self.max_inflight));
        }
        Ok(())
    }

    /// The largest window of any connection: `upstream.max_inflight`, or for `"auto"`
    /// the protocol's default. The client is built for it before the broker says what
    /// it takes.
    pub fn max_window(&self) -> usize {
        match (self.max_inflight, self.protocol) {
            (UpstreamInflight::Fixed(n), _) => usize::from(n),
            (UpstreamInflight::Auto, UpstreamProtocol::V5) => AUTO_INFLIGHT_V5,
            (UpstreamInflight::Auto, UpstreamProtocol::V311) => AUTO_INFLIGHT_V311,
        }
    }

    /// The window of a connection whose broker announced `receive_max` in its CONNACK
    /// (MQTT 5; `None` when it announced none, which means 65,535, or over 3.1.1).
    pub fn window(&self, receive_max: Option<u16>) -> usize {
        let allowed = receive_max.map_or(usize::MAX, |r| usize::from(r.max(1)));
        self.max_window().min(allowed)
    }

    fn mqtt_qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }
}

/// Where the forwarder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting {
        attempt: u32,
    },
    /// Connected, with the window the ConnAck allowed ([`ForwarderConfig::window`]).
    Online {
        window: usize,
    },
    BackingOff {
        attempt: u32,
    },
    Stopped,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Connecting { .. } => 0,
            State::Online { .. } => 1,
            State::BackingOff { .. } => 2,
            State::Stopped => 3,
        }
    }
}

/// Live counters of the forwarder.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    state: AtomicU8,
    /// `upstream.url`, in the order tried.
    pub urls: Vec<String>,
    /// Index in `urls` of the URL connected, or being tried while offline.
    url_index: AtomicUsize,
    /// ConnAcks received.
    pub connects: AtomicU64,
    /// Connections lost or refused.
    pub connection_failures: AtomicU64,
    /// Upstream publishes (a batch counts once).
    pub published: AtomicU64,
    /// Outbox rows sent (a batch counts each row), replays included.
    pub rows_sent: AtomicU64,
    /// Rows sent with `replayed = true`.
    pub rows_replayed: AtomicU64,
    /// Rows acked upstream and deleted.
    pub rows_acked: AtomicU64,
    /// Rows deleted without forwarding: larger than `max_packet_size` or an invalid topic.
    pub rows_dropped_unsendable: AtomicU64,
    /// Rows the upstream acked with "no matching subscribers" (acked and deleted: the
    /// upstream broker discarded them, which is its right).
    pub rows_no_subscribers: AtomicU64,
    /// Rows the upstream refused with an error reason code in its PUBACK (deleted).
    pub rows_rejected_upstream: AtomicU64,
    /// See [`ForwarderStats::window`].
    window: AtomicUsize,
    /// Acked rows handed to the store for deletion (see `StoreHandle::acks_committed`).
    pub acks_handed: AtomicU64,
    /// Milliseconds from `received_at` to the PUBACK of the last acked row, and the maximum.
    pub last_latency_ms: AtomicU64,
    pub max_latency_ms: AtomicU64,
    /// Outbox append (`received_at`) to PUBACK, one observation per acked row.
    pub latency: Histogram,
    /// Rows acked upstream, by lane.
    pub acked_by_lane: ByLane<AtomicU64>,
}

impl ForwarderStats {
    /// True while a connection is up.
    pub fn connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == 1
    }
    /// Publishes allowed in flight on the current (or last) connection
    /// ([`ForwarderConfig::window`]); 0 before the first ConnAck.
    pub fn window(&self) -> usize {
        self.window.load(Ordering::Relaxed)
    }
    /// The URL connected to, or the one being tried (or tried next) while offline.
    pub fn current_url(&self) -> Option<&str> {
        self.urls
            .get(self.url_index.load(Ordering::Relaxed))
            .map(String::as_str)
    }
    fn set_state(&self, s: State) {
        self.state.store(s.code(), Ordering::Relaxed);
    }
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

/// The forwarder; build it with [`Forwarder::new`], then drive it with [`Forwarder::run`].
pub struct Forwarder {
    cfg: ForwarderConfig,
    /// The rustls client configuration of `cfg.tls`.
    tls: Option<Arc<rustls::ClientConfig>>,
    store: StoreHandle,
    stats: Arc<ForwarderStats>,
    presence: presence::Presence,
    /// The upstream filter of downlink commands and where to hand them.
    downlink: Option<(String, mpsc::UnboundedSender<UpstreamCommand>)>,
}

impl Forwarder {
    /// Checks the settings and loads the upstream TLS files.
    pub fn new(cfg: ForwarderConfig, store: StoreHandle) -> Result<Self, ForwarderError> {
        cfg.validate()?;
        let tls = cfg
            .tls
            .as_ref()
            .map(UpstreamTls::client_config)
            .transpose()?;
        let presence = presence::Presence::new(&cfg.topic_prefix, &cfg.gateway_id, cfg.started_at);
        let stats = ForwarderStats {
            urls: cfg.urls.iter().map(ToString::to_string).collect(),
            ..ForwarderStats::default()
        };
        Ok(Forwarder {
            cfg,
            tls,
            presence,
            store,
            stats: Arc::new(stats),
            downlink: None,
        })
    }

    /// Subscribes upstream to `filter` on every connection and hands what arrives to
    /// `commands` (the downlink stage).
    pub fn with_downlink(
        mut self,
        filter: String,
        commands: mpsc::UnboundedSender<UpstreamCommand>,
    ) -> Self {
        self.downlink = Some((filter, commands));
        self
    }

    /// The live counters; keep a clone before calling `run`.
    pub fn stats(&self) -> Arc<ForwarderStats> {
        self.stats.clone()
    }

    /// Forwards until `shutdown` is cancelled; then waits up to `shutdown_grace` for the
    /// PUBACKs of messages in flight, publishes the retained `offline` status (waiting
    /// for its PUBACK at most [`session::OFFLINE_ACK_WAIT`]) and disconnects.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("forwarder", upstream = %self.cfg.urls);
        self.drive(shutdown).instrument(span).await
    }

    async fn drive(self, shutdown: CancellationToken) {
        let mut state = State::Connecting { attempt: 0 };
        let mut conn: Option<Connection> = None;
        // Index of the URL of the current (or next) connection attempt.
        let mut url = 0;
        loop {
            self.stats.set_state(state);
            state = match state {
                State::Connecting { attempt } => {
                    self.stats.url_index.store(url, Ordering::Relaxed);
                    let target = self.cfg.urls.nth(url);
                    let c = conn.insert(Connection::open(&self, target));
                    self.connecting(attempt, &mut c.events, &shutdown).await
                }
                State::Online { window } => match conn.as_mut() {
                    Some(c) => {
                        session::Session::new(&self, &c.client, window)
                            .run(&mut c.events, &shutdown)
                            .await
                    }
                    None => State::Connecting { attempt: 0 },
                },
                State::BackingOff { attempt } => {
                    // Entered only after a failed attempt or a lost connection: the next
                    // attempt goes to the next URL of the list.
                    conn = None;
                    url = (url + 1) % self.cfg.urls.len();
                    self.stats.url_index.store(url, Ordering::Relaxed);
                    self.backing_off(attempt, &shutdown).await
                }
                State::Stopped => break,
            };
        }
        if let Some(mut c) = conn.take() {
            c.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(200), c.events.recv()).await;
        }
        tracing::info!(
            acked = ForwarderStats::get(&self.stats.rows_acked),
            "forwarder stopped"
        );
    }

    /// Waits for the ConnAck of the connection being opened, which sets its window.
    async fn connecting(
        &self,
        attempt: u32,
        events: &mut Events,
        shutdown: &CancellationToken,
    ) -> State {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return State::Stopped,
                ev = events.recv() => ev,
            };
            let url = self.stats.current_url().unwrap_or_default();
            match ev {
                Some(Ok(Wire::ConnAck { receive_max })) => {
                    let window = self.cfg.window(receive_max);
                    self.stats.window.store(window, Ordering::Relaxed);
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(attempt, url, window, "connected upstream");
                    return State::Online { window };
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.stats
                        .connection_failures
                        .fetch_add(1, Ordering::Relaxed);
                    if e.tls {
                        // Rarely fixed by retrying: say so at once, then on attempts 1, 2, 4, 8..
                        if attempt == 0 || attempt.is_power_of_two() {
                            tracing::error!(error = %e, attempt, url, "Upstream TLS handshake failed: check upstream.ca_file (it must hold the CA of the upstream server's certificate), the host name in upstream.url, and upstream.client_cert; retrying with backoff, data stays in the outbox.");
                        }
                    } else if attempt == 0 {
                        tracing::warn!(error = %e, url, "upstream connection failed; retrying with backoff");
                    } else {
                        tracing::debug!(error = %e, attempt, url, "upstream connection failed");
                    }
                    return State::BackingOff {
                        attempt: attempt + 1,
                    };
                }
                None => {
                    return State::BackingOff {
                        attempt: attempt + 1,
                    }
                }
            }
        }
    }

    /// Sleeps the backoff delay of `attempt` (exponential, with jitter) unless shut down
    /// meanwhile.
    async fn backing_off(&self, attempt: u32, shutdown: &CancellationToken) -> State {
        let delay = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max).delay(attempt);
        tokio::select! {
            _ = shutdown.cancelled() => State::Stopped,
            _ = tokio::time::sleep(delay) => State::Connecting { attempt },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamUrl;

    #[test]
    fn settings_come_from_the_configuration() {
        let mut config = Config::defaults();
        assert!(
            ForwarderConfig::from_config(&config).is_none(),
            "forwarding is off"
        );
        config.upstream.url = Some(UpstreamUrl::mqtt("up.example", 2883).into());
        let cfg = ForwarderConfig::from_config(&config).unwrap();
        assert_eq!(cfg.urls, config.upstream.url.clone().unwrap());
        assert_eq!(cfg.protocol, UpstreamProtocol::V5);
        assert_eq!(cfg.gateway_id, "edge-gateway");
        assert_eq!(cfg.topic_prefix, "gateways/edge-gateway");
        assert_eq!(cfg.backoff_min, config.upstream.backoff_min);
        assert_eq!(cfg.batch_linger_ms, config.upstream.batch_linger_ms);
        assert_eq!(cfg.max_packet_size, config.upstream.max_packet_bytes);
        assert_eq!(cfg.rate_limit_per_sec, None);
        assert_eq!(cfg.max_uncommitted_acks, MAX_UNCOMMITTED_ACKS);
        assert_eq!(cfg.shutdown_grace, config.gateway.shutdown_grace / 3);
        cfg.validate().unwrap();

        config.upstream.url = Some(
            UpstreamUrl {
                tls: true,
                ..UpstreamUrl::mqtt("up.example", 8883)
            }
            .into(),
        );
        let cfg = ForwarderConfig::from_config(&config).unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ForwarderError::TlsMismatch(_))
        ));
    }

    #[test]
    fn the_window_is_the_ceiling_or_the_brokers_receive_maximum_whichever_is_lower() {
        let mut config = Config::defaults();
        config.upstream.url = Some(UpstreamUrl::mqtt("up.example", 1883).into());
        let mut cfg = ForwarderConfig::from_config(&config).unwrap();
        assert_eq!(cfg.max_inflight, UpstreamInflight::Auto, "the default");
        assert_eq!(cfg.max_window(), AUTO_INFLIGHT_V5);
        assert_eq!(cfg.window(None), AUTO_INFLIGHT_V5, "no limit announced");
        assert_eq!(cfg.window(Some(20)), 20);
        assert_eq!(cfg.window(Some(u16::MAX)), AUTO_INFLIGHT_V5);
        assert_eq!(
            cfg.window(Some(0)),
            1,
            "a broker announcing 0 still gets one"
        );

        cfg.protocol = UpstreamProtocol::V311;
        assert_eq!(cfg.max_window(), AUTO_INFLIGHT_V311);
        assert_eq!(cfg.window(None), AUTO_INFLIGHT_V311);

        cfg.max_inflight = UpstreamInflight::Fixed(300);
        assert_eq!(cfg.window(None), 300);
        cfg.protocol = UpstreamProtocol::V5;
        assert_eq!(cfg.window(None), 300);
        assert_eq!(cfg.window(Some(20)), 20, "the broker's limit still holds");
        cfg.validate().unwrap();

        cfg.max_inflight = UpstreamInflight::Fixed(0);
        assert!(matches!(
            cfg.validate(),
            Err(ForwarderError::BadInflight(_))
        ));
    }
}
