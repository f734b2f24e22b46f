//! The forwarder: drains the outbox to the upstream MQTT broker over rumqttc (MQTT 5).
//!
//! Reads committed outbox rows in sequence order (events lane first), publishes them to
//! `{topic_prefix}/{row topic}`, and deletes a row only when its PUBACK arrives. Inputs:
//! the [`StoreHandle`] (rows, the "rows added" wake-up) and the rumqttc event loop; outputs:
//! publishes upstream, acks to the store and live counters ([`ForwarderStats`]).
//!
//! The work is a state machine ([`State`]): `Connecting` -> `Online` -> (error) ->
//! `BackingOff` -> `Connecting` ..., and `Stopped` on shutdown. Every connection attempt
//! gets a fresh rumqttc client and event loop, polled by its own pump task (it must be
//! polled for anything to move, and `poll` is not cancel-safe inside a `select!`) that hands
//! every event over a channel and ends at the first error. A fresh client per connection
//! means no request queued for a dead connection can be sent on the next one and shift
//! the packet-id correlation.
//!
//! Invariants:
//! - Clean start on every connection: rumqttc drops its own queue then, and the outbox is
//!   the only source of truth. After every ConnAck the session first commits pending acks,
//!   then replays from the oldest unacked row.
//! - PUBACKs are correlated through `Outgoing::Publish(pkid)`, which rumqttc emits in the
//!   order of the requests: a FIFO of sent messages gets its packet id there.
//! - At-least-once: a row is sent again only if its PUBACK was not received on the
//!   connection it was sent on (the in-flight window, at most `max_inflight` messages).
//! - Order is kept per lane (so per device): one connection, publishes in seq order.
//! - Repeats after a crash are bounded: `max_inflight` publishes plus at most
//!   `max_uncommitted_acks` rows acked upstream whose deletion is not committed yet
//!   (sending pauses at that bound until the store catches up).
//!
//! What consumers get: MQTT 5 user properties `id` (`{gateway_id}:{seq}`, stable across
//! replays and restarts: the dedup key) and `replayed` (`true`/`false`), a content type;
//! replayed events also carry `"replayed": true` in their CloudEvents envelope; batches
//! (`{prefix}/batch`) are arrays whose elements carry `id`, `topic`, `received_at`,
//! `replayed` and the original `payload`. Only MQTT 5 is implemented; over MQTT 3.1.1
//! there are no user properties, so an unbatched reading would reach the consumer without
//! its id (batches and event envelopes would still carry theirs).

mod encode;
mod session;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::counters::Histogram;
use crate::store::{ByLane, StoreHandle};

pub use encode::{message_id, upstream_topic};

/// Errors of the forwarder's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("upstream.url {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("upstream.qos must be 0 or 1, got {0}")]
    BadQos(u8),
    #[error("upstream.max_inflight must be between 1 and 65535, got {0}")]
    BadInflight(usize),
    #[error(
        "upstream.url {0:?}: mqtts:// needs a TLS client configuration, mqtt:// must not have one"
    )]
    TlsMismatch(String),
}

/// MQTT protocol spoken upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    /// MQTT 5: ids and the replay mark travel as user properties.
    #[default]
    #[serde(rename = "5", alias = "v5")]
    V5,
}

/// Upstream settings (`[upstream]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwarderConfig {
    /// `mqtt://host:port`, or `mqtts://host:port` with [`ForwarderConfig::tls`].
    pub url: String,
    pub client_id: String,
    /// Prefix of message ids (`{gateway_id}:{seq}`); the client id when empty.
    pub gateway_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// 1 (default, deletes on PUBACK) or 0 (deletes once written to the socket).
    pub qos: u8,
    pub topic_prefix: String,
    /// Publishes awaiting PUBACK at most; also the duplicate window after a failure.
    pub max_inflight: usize,
    /// Rows acked upstream whose deletion is not committed yet, at most: sending pauses
    /// beyond it. Bounds the repeats after a crash to `max_inflight` publishes plus this.
    pub max_uncommitted_acks: usize,
    /// Messages per second while replaying a backlog; live traffic is not limited.
    pub rate_limit_per_sec: Option<u32>,
    /// Readings per upstream publish; 1 turns batching off.
    pub batch_max_messages: usize,
    /// How long a partial batch of live readings waits for more.
    pub batch_linger_ms: u64,
    pub protocol: Protocol,
    /// Largest packet sent or accepted; bigger rows are dropped and counted.
    pub max_packet_size: usize,
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long shutdown waits for PUBACKs of messages in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Trust anchors and optional client certificate for `mqtts://` (see `crate::tls`);
    /// the server name verified is the host of `url`.
    #[serde(skip)]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "gateway".into(),
            gateway_id: String::new(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            qos: 1,
            topic_prefix: String::new(),
            max_inflight: 100,
            max_uncommitted_acks: 2000,
            rate_limit_per_sec: None,
            batch_max_messages: 1,
            batch_linger_ms: 20,
            protocol: Protocol::V5,
            max_packet_size: 256 * 1024,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
            tls: None,
        }
    }
}

impl ForwarderConfig {
    /// `(host, port)` of `url`.
    pub fn host_port(&self) -> Result<(String, u16), ForwarderError> {
        let bad = |reason| ForwarderError::BadUrl {
            url: self.url.clone(),
            reason,
        };
        let (rest, default_port) = match self.url.strip_prefix("mqtts://") {
            Some(rest) => (rest, 8883),
            None => (
                self.url
                    .strip_prefix("mqtt://")
                    .or_else(|| self.url.strip_prefix("tcp://"))
                    .ok_or_else(|| bad("expected mqtt://host:port or mqtts://host:port"))?,
                1883,
            ),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if rest.starts_with('[') == h.ends_with(']') => {
                (h, p.parse().map_err(|_| bad("bad port"))?)
            }
            _ => (rest, default_port),
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok((host.trim_matches(['[', ']']).to_owned(), port))
    }

    /// True for `mqtts://`.
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("mqtts://")
    }

    fn validate(&self) -> Result<(), ForwarderError> {
        self.host_port()?;
        if self.is_tls() != self.tls.is_some() {
            return Err(ForwarderError::TlsMismatch(self.url.clone()));
        }
        if self.qos > 1 {
            return Err(ForwarderError::BadQos(self.qos));
        }
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            return Err(ForwarderError::BadInflight(self.max_inflight));
        }
        Ok(())
    }

    fn gateway_id(&self) -> &str {
        if self.gateway_id.is_empty() {
            &self.client_id
        } else {
            &self.gateway_id
        }
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
    Connecting { attempt: u32 },
    Online,
    BackingOff { attempt: u32 },
    Stopped,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Connecting { .. } => 0,
            State::Online => 1,
            State::BackingOff { .. } => 2,
            State::Stopped => 3,
        }
    }
}

/// Live counters of the forwarder.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    state: AtomicU8,
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
    fn set_state(&self, s: State) {
        self.state.store(s.code(), Ordering::Relaxed);
    }
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

type PumpEvent = Result<Event, ConnectionError>;

/// The forwarder; build it with [`Forwarder::new`], then drive it with [`Forwarder::run`].
pub struct Forwarder {
    cfg: ForwarderConfig,
    store: StoreHandle,
    stats: Arc<ForwarderStats>,
}

impl Forwarder {
    pub fn new(cfg: ForwarderConfig, store: StoreHandle) -> Result<Self, ForwarderError> {
        cfg.validate()?;
        Ok(Forwarder {
            cfg,
            store,
            stats: Arc::new(ForwarderStats::default()),
        })
    }

    /// The live counters; keep a clone before calling `run`.
    pub fn stats(&self) -> Arc<ForwarderStats> {
        self.stats.clone()
    }

    fn mqtt_options(&self) -> MqttOptions {
        let (host, port) = self
            .cfg
            .host_port()
            .unwrap_or_else(|_| ("127.0.0.1".into(), 1883));
        let mut o = MqttOptions::new(self.cfg.client_id.clone(), host, port);
        o.set_keep_alive(self.cfg.keep_alive.max(Duration::from_secs(1)))
            .set_clean_start(true)
            .set_connection_timeout(5)
            .set_max_packet_size(Some(self.cfg.max_packet_size as u32))
            .set_outgoing_inflight_upper_limit(self.cfg.max_inflight as u16);
        if let Some(user) = &self.cfg.username {
            o.set_credentials(user.clone(), self.cfg.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.cfg.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }

    /// Forwards until `shutdown` is cancelled; then waits up to `shutdown_grace` for the
    /// PUBACKs of messages in flight and disconnects.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("forwarder", upstream = %self.cfg.url);
        self.drive(shutdown).instrument(span).await
    }

    async fn drive(self, shutdown: CancellationToken) {
        let mut state = State::Connecting { attempt: 0 };
        let mut conn: Option<Connection> = None;
        loop {
            self.stats.set_state(state);
            state = match state {
                State::Connecting { attempt } => {
                    let c = conn.insert(Connection::open(self.mqtt_options(), &self.cfg));
                    self.connecting(attempt, &mut c.events, &shutdown).await
                }
                State::Online => match conn.as_mut() {
                    Some(c) => {
                        session::Session::new(&self, &c.client)
                            .run(&mut c.events, &shutdown)
                            .await
                    }
                    None => State::Connecting { attempt: 0 },
                },
                State::BackingOff { attempt } => {
                    conn = None;
                    self.backing_off(attempt, &shutdown).await
                }
                State::Stopped => break,
            };
        }
        if let Some(mut c) = conn.take() {
            let _ = c.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(200), c.events.recv()).await;
        }
        tracing::info!(
            acked = ForwarderStats::get(&self.stats.rows_acked),
            "forwarder stopped"
        );
    }

    /// Waits for the ConnAck of the connection being opened.
    async fn connecting(
        &self,
        attempt: u32,
        events: &mut mpsc::Receiver<PumpEvent>,
        shutdown: &CancellationToken,
    ) -> State {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return State::Stopped,
                ev = events.recv() => ev,
            };
            match ev {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(attempt, "connected upstream");
                    return State::Online;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.stats
                        .connection_failures
                        .fetch_add(1, Ordering::Relaxed);
                    if matches!(e, ConnectionError::Tls(_)) {
                        // Rarely fixed by retrying: say so at once, then on attempts 1, 2, 4, 8..
                        if attempt == 0 || attempt.is_power_of_two() {
                            tracing::error!(error = %e, attempt, "Upstream TLS handshake failed: check upstream.ca_file (it must hold the CA of the upstream server's certificate), the host name in upstream.url, and upstream.client_cert; retrying with backoff, data stays in the outbox.");
                        }
                    } else if attempt == 0 {
                        tracing::warn!(error = %e, "upstream connection failed; retrying with backoff");
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

/// One upstream connection: a fresh rumqttc client and event loop per attempt, so nothing
/// queued for a dead connection (requests, packet ids, events) can leak into the next one.
struct Connection {
    client: AsyncClient,
    events: mpsc::Receiver<PumpEvent>,
    pump: tokio::task::JoinHandle<()>,
}

impl Connection {
    fn open(options: MqttOptions, cfg: &ForwarderConfig) -> Connection {
        let (client, eventloop) = AsyncClient::new(options, cfg.max_inflight + 16);
        let (tx, events) = mpsc::channel(1024);
        let pump = tokio::spawn(pump(eventloop, tx));
        Connection {
            client,
            events,
            pump,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Polls the event loop and hands every event over, until the first error (which ends
/// the connection: the next attempt gets a new event loop).
async fn pump(mut eventloop: EventLoop, events: mpsc::Sender<PumpEvent>) {
    loop {
        let ev = eventloop.poll().await;
        let failed = ev.is_err();
        if events.send(ev).await.is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let cfg = |url: &str| ForwarderConfig {
            url: url.into(),
            ..ForwarderConfig::default()
        };
        assert_eq!(
            cfg("mqtt://h:1884").host_port().unwrap(),
            ("h".into(), 1884)
        );
        assert_eq!(cfg("mqtt://h").host_port().unwrap(), ("h".into(), 1883));
        assert_eq!(cfg("mqtts://h").host_port().unwrap(), ("h".into(), 8883));
        assert_eq!(
            cfg("mqtts://[::1]").host_port().unwrap(),
            ("::1".into(), 8883)
        );
        assert!(cfg("http://h:8883").host_port().is_err());
        assert!(cfg("mqtt://:1").host_port().is_err());
    }
}
