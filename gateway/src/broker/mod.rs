//! The embedded MQTT broker (rumqttd) that devices connect to.
//!
//! Owns the rumqttd router and listener threads, the TLS listener (`broker.listen_tls`,
//! see [`tls_listener`]) in front of a loopback relay listener, and device
//! authentication ([`auth`]). The router is configured on purpose: rumqttd's defaults
//! panic (`max_segment_size: 0`) or refuse everyone (`max_connections: 0`), and its
//! example keeps gigabytes per filter.
//!
//! Invariants:
//! - the ingest hook (`rumqttd::IngestHook`, `vendor/rumqttd/src/link/ingest.rs`) is set
//!   before any listener accepts a device: every publish of every device connection is
//!   handed to the gateway over one bounded channel (`ingest.queue_capacity`), its
//!   QoS 1/2 acknowledgement held until the gateway has stored it (see `ingest.rs`);
//!   a full channel stops the connection from reading its socket;
//! - the router keeps no log for the ingest topics unless a local app subscribes to
//!   them: the gateway does not read device data through the router;
//! - devices authenticate through [`Authenticator`] unless `auth.anonymous` is on; the
//!   client id must equal the username (a device id); with authentication on, a device
//!   may publish only on its own ingest topics and subscribe only to its own events and
//!   its own command topics ([`auth::topic_authorizer`]), or it is disconnected;
//! - a publish on a topic no subscription filter matches creates no log in the router
//!   (`dynamic_filters = false`; rumqttd 0.20 also never creates one for such a topic,
//!   `DataLog::matches` returns an empty list rather than `None`);
//! - keep alive 0 is accepted on both listeners and never timed out; every accepted
//!   device socket has TCP keepalive on (`rumqttd::enable_tcp_keepalive`), so a device
//!   that vanished is still disconnected;
//! - with `rules.device_events`, every device connection reports its start and end
//!   (`rumqttd::PresenceHook`) over a bounded channel that never holds it up (a full
//!   channel drops the report and counts it); `crate::device_events` turns them into events;
//! - downlink commands are written by a device's own connection (the downlink hook), not
//!   through the router: no other client sees them, and the connection reports the
//!   device's subscriptions and PUBACKs (`crate::downlink`);
//! - a message reaches a subscriber at the lower of its publish QoS and the granted QoS;
//!   the gateway's events are published at QoS 1 (`LinkTx::publish_at_least_once`);
//! - `rumqttd::Broker::start` blocks forever, so it runs on its own OS thread; rumqttd
//!   has no way to stop listeners, they end with the process.

pub mod auth;
pub mod tls_listener;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::{AuthSection, BrokerSection, IngestSection, RulesSection};
use crate::downlink::CommandTopic;
use crate::store::COMMIT_EARLY_ROWS;

use auth::{AuthError, Authenticator};
use tls_listener::TlsListener;

/// Messages the router hands a link per scheduling round.
const MAX_OUTGOING_PACKET_COUNT: u64 = 500;
/// Reports of device connections waiting for the device-events stage; beyond it they
/// are dropped and counted (`rumqttd::PresenceHook::dropped`).
pub const PRESENCE_QUEUE: usize = 4096;
/// Delay between accepting two connections on one listener (a crude flood limit).
const NEXT_CONNECTION_DELAY_MS: u64 = 1;
/// The name of the `broker.listen` listener (its thread's name too).
const PLAIN_LISTENER: &str = "mqtt-v4";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot create the broker's local link: {0}")]
    Link(Box<rumqttd::local::LinkError>),
    #[error("cannot start the broker thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("listener {0} did not start accepting connections within {1:?}")]
    NotListening(SocketAddr, Duration),
    #[error("TLS listener: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("device authentication: {0}")]
    Auth(#[from] AuthError),
}

impl From<rumqttd::local::LinkError> for BrokerError {
    fn from(e: rumqttd::local::LinkError) -> Self {
        BrokerError::Link(Box::new(e))
    }
}

/// The links the gateway uses on its own broker.
pub struct Links {
    /// Device publishes, as the connections hand them over.
    pub ingest: flume::Receiver<rumqttd::Ingested>,
    pub publish: (LinkTx, LinkRx),
    /// `None` when anonymous access is on.
    pub auth: Option<Authenticator>,
    /// Device subscriptions and PUBACKs of downlink commands, as the connections report
    /// them (`vendor/rumqttd/src/link/downlink.rs`).
    pub downlink: flume::Receiver<rumqttd::DownlinkEvent>,
    /// With `rules.device_events`: device connections' starts and ends
    /// (`vendor/rumqttd/src/link/presence.rs`) and the link their events are published on.
    pub presence: Option<PresenceLinks>,
    /// The runtime of the plain listener (`broker.listen`), which runs the devices'
    /// connections and wakes them for their acks: the forwarder runs there too, so that a
    /// commit wakes one thread for both (`pipeline.rs`).
    pub runtime: tokio::runtime::Handle,
}

/// What the device-events stage takes from the broker.
pub struct PresenceLinks {
    pub reports: flume::Receiver<rumqttd::PresenceEvent>,
    /// Counts the reports dropped because `reports` was full.
    pub hook: rumqttd::PresenceHook,
    pub publish: LinkTx,
}

/// The rumqttd configuration for the gateway's broker section.
///
/// `initialized_filters` get their in-memory logs up front; a publish on a topic that no
/// filter matches is dropped. `dynamic_filters` stays off so that no rumqttd version can
/// turn such publishes into a new log of up to `segment_bytes x (segment_count + 1)`
/// per topic (a memory exhaustion vector).
/// `gateway_links` is the number of local links the gateway itself holds: they count as
/// connections too, so devices get exactly `broker.max_connections`.
pub fn rumqttd_config(
    section: &BrokerSection,
    initialized_filters: Vec<String>,
    auth: Option<&Authenticator>,
    gateway_links: usize,
) -> rumqttd::Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: section.connection_timeout.as_millis().min(u16::MAX as u128) as u16,
        max_payload_size: section.max_payload_bytes,
        max_inflight_count: section.max_inflight,
        auth: None,
        external_auth: auth.map(Authenticator::handler),
        dynamic_filters: false,
    };
    let server = |name: &str, listen: SocketAddr| ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: NEXT_CONNECTION_DELAY_MS,
        connections: connections.clone(),
    };
    let v4 = HashMap::from([("v4".to_string(), server(PLAIN_LISTENER, section.listen))]);
    let v5 = section
        .listen_v5
        .map(|listen| HashMap::from([("v5".to_string(), server("mqtt-v5", listen))]));
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: section.max_connections + gateway_links,
            max_outgoing_packet_count: MAX_OUTGOING_PACKET_COUNT,
            max_segment_size: section.segment_bytes,
            max_segment_count: section.segment_count,
            custom_segment: None,
            initialized_filters: Some(initialized_filters),
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5,
        ..Default::default()
    }
}

/// Loads the device credentials (unless anonymous access is on), starts the router,
/// sets the ingest hook and creates the publish link, then starts the listeners and
/// waits until they accept connections. `wake` is called when a group's worth of
/// publishes waits in the ingest channel ([`COMMIT_EARLY_ROWS`]: the store, which takes
/// them, may be sleeping out its commit spacing).
pub fn start(
    section: &BrokerSection,
    auth: &AuthSection,
    ingest: &IngestSection,
    rules: &RulesSection,
    commands: &CommandTopic,
    wake: impl Fn() + Send + Sync + 'static,
) -> Result<Links, BrokerError> {
    let events_filter = &rules.event_filter();
    let authenticator = if auth.anonymous {
        tracing::warn!(
            "Anonymous access is on (auth.anonymous = true): any client that reaches the broker port can publish as any device. Set auth.anonymous = false and add devices with `gateway devices add ID` in production."
        );
        None
    } else {
        Some(Authenticator::start(&auth.credentials_file)?)
    };
    // The publish link, and the device-events link when those are on.
    let gateway_links = 1 + usize::from(rules.device_events);
    let mut config = rumqttd_config(
        section,
        vec![events_filter.to_string()],
        authenticator.as_ref(),
        gateway_links,
    );
    let tls = tls_relay(section, &mut config)?;
    let mut broker = rumqttd::Broker::new(config);
    if authenticator.is_some() {
        broker.set_authorizer(auth::topic_authorizer(
            ingest.topic_pattern.clone(),
            &rules.event_topic,
            commands.clone(),
        ));
    }
    let (hook, ingest_rx) = rumqttd::IngestHook::bounded(ingest.queue_capacity);
    let hook = hook.wake_at(COMMIT_EARLY_ROWS, wake);
    broker.set_ingest(hook);
    let (downlink_hook, downlink) = rumqttd::DownlinkHook::new();
    broker.set_downlink(downlink_hook);
    let presence = if rules.device_events {
        let (hook, reports) = rumqttd::PresenceHook::bounded(PRESENCE_QUEUE);
        broker.set_presence(hook.clone());
        let (publish, _) = broker.link("gateway-device-events")?;
        Some(PresenceLinks {
            reports,
            hook,
            publish,
        })
    } else {
        None
    };
    let publish = broker.link("gateway-publish")?;
    let (runtime_tx, runtime_rx) = std::sync::mpsc::sync_channel(1);
    broker.set_runtime_hook(Arc::new(move |name, handle| {
        if name == PLAIN_LISTENER {
            let _ = runtime_tx.try_send(handle);
        }
    }));
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded broker stopped.");
            }
        })?;
    let timeout = Duration::from_secs(10);
    for addr in std::iter::once(section.listen).chain(section.listen_v5) {
        wait_listening(addr, timeout)?;
    }
    let runtime = runtime_rx
        .recv_timeout(timeout)
        .map_err(|_| BrokerError::NotListening(section.listen, timeout))?;
    if let Some((listen, server_config, relay)) = tls {
        wait_listening(relay, timeout)?;
        // Bound before this returns: no probe (it would count as a failed handshake).
        start_tls_listener(listen, server_config, relay, section.max_connections)?;
    }
    Ok(Links {
        ingest: ingest_rx,
        publish,
        auth: authenticator,
        downlink,
        presence,
        runtime,
    })
}

/// With `broker.listen_tls`: adds the loopback relay listener the TLS listener hands its
/// connections to (a copy of the `broker.listen` settings on a free 127.0.0.1 port) and
/// loads the certificates. Returns the TLS address, its server config and the relay.
#[allow(clippy::type_complexity)]
fn tls_relay(
    section: &BrokerSection,
    config: &mut rumqttd::Config,
) -> Result<Option<(SocketAddr, Arc<rustls::ServerConfig>, SocketAddr)>, BrokerError> {
    let Some(tls) = &section.tls else {
        return Ok(None);
    };
    let server_config = tls.server_config()?;
    let relay = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?;
    let v4 = config.v4.get_or_insert_with(HashMap::new);
    if let Some(plain) = v4.get("v4").cloned() {
        v4.insert(
            "tls-relay".to_string(),
            ServerSettings {
                name: "mqtt-tls-relay".to_string(),
                listen: relay,
                tls: None,
                ..plain
            },
        );
    }
    Ok(Some((tls.listen, server_config, relay)))
}

/// Runs the TLS listener on its own thread (like rumqttd's listeners, until the process
/// ends).
fn start_tls_listener(
    listen: SocketAddr,
    server_config: Arc<rustls::ServerConfig>,
    relay: SocketAddr,
    max_connections: usize,
) -> Result<(), BrokerError> {
    let listener = TlsListener::bind(listen, server_config, relay, max_connections)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("broker-tls".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(listener.serve()) {
                tracing::error!(error = %e, "TLS listener stopped.");
            }
        })?;
    Ok(())
}

fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<(), BrokerError> {
    let target = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn tasks_spawned_on_the_devices_listener_runtime_run_on_its_thread() {
        let mut config = Config::defaults();
        config.auth.anonymous = true;
        config.broker.listen = SocketAddr::from(([127, 0, 0, 1], test_support::free_port()));
        config.broker.listen_v5 = None;
        config.broker.tls = None;
        let links = start(
            &config.broker,
            &config.auth,
            &config.ingest,
            &config.rules,
            &config.downlink.device_topic,
            || {},
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        links.runtime.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let thread = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(thread.as_deref(), Some(PLAIN_LISTENER));
    }
}
