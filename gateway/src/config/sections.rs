//! The section types of a validated configuration: one struct per `[section]` of the
//! file, holding typed values (addresses parsed, durations read, empty strings turned
//! into `None`).
//!
//! Invariants:
//! - a value here has passed every check of the reader (`validate.rs`, `tls.rs`), so
//!   the stages use it as it is and never default or re-parse it;
//! - the upstream URLs are parsed once, into [`UpstreamUrls`] (a non-empty list whose URLs
//!   all share one scheme and differ from each other), and handed on in that form.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::decode::TopicPatterns;
use crate::downlink::CommandTopic;

#[derive(Debug, Clone)]
pub struct HttpSection {
    /// Address of the metrics, API and status-page server; `None` when it is off
    /// (`http.listen = ""` or `"off"`).
    pub listen: Option<SocketAddr>,
}

/// Device authentication on the embedded broker (see `auth.rs`).
#[derive(Debug, Clone)]
pub struct AuthSection {
    /// `true`: any client may connect without credentials (nothing is checked).
    pub anonymous: bool,
    /// Device id -> argon2 hash file; read (and watched) only when `anonymous` is false.
    pub credentials_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct GatewaySection {
    pub id: String,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct BrokerSection {
    pub listen: SocketAddr,
    pub listen_v5: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    pub max_inflight: usize,
    pub connection_timeout: Duration,
    pub segment_bytes: usize,
    pub segment_count: usize,
    /// The TLS listener for devices, `None` when `broker.listen_tls` is empty.
    pub tls: Option<BrokerTls>,
}

/// `broker.listen_tls` and its certificate files (checked to load when configured).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, devices must present a certificate issued by this CA.
    pub client_ca: Option<PathBuf>,
}

impl BrokerTls {
    /// The rustls server configuration of these files.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
        crate::tls::server_config(&self.cert, &self.key, self.client_ca.as_deref())
    }
}

#[derive(Debug, Clone)]
pub struct IngestSection {
    /// One pattern, or several tried in order.
    pub topic_pattern: TopicPatterns,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone)]
pub struct StorageSection {
    pub path: PathBuf,
    pub dead_letter_max: usize,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub flush_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RulesSection {
    pub dir: PathBuf,
    /// Local topic of events; `{type}`, `{device}`, `{rule}` and `{state}` are filled in.
    pub event_topic: String,
    /// Devices' connects and disconnects as events (`DeviceConnected`,
    /// `DeviceDisconnected`, see `device_events/`).
    pub device_events: bool,
}

impl RulesSection {
    /// The subscription filter covering every event topic (each placeholder a `+`).
    pub fn event_filter(&self) -> String {
        self.event_topic
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') {
                    "+"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Commands from upstream to devices (`downlink.rs`); active when forwarding is on.
#[derive(Debug, Clone)]
pub struct DownlinkSection {
    /// The upstream topic of commands, under `upstream.topic_prefix`.
    pub upstream_topic: CommandTopic,
    /// The topic a device receives its commands on, on the embedded broker.
    pub device_topic: CommandTopic,
    /// How long a command waits for its device, unless the upstream message's MQTT 5
    /// message expiry says otherwise.
    pub ttl: Duration,
    /// Commands queued per device at most; the oldest is dropped beyond it.
    pub max_per_device: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamSection {
    /// `None` when forwarding is off (`upstream.url = ""`); else one URL or a failover
    /// list, tried in turn.
    pub url: Option<UpstreamUrls>,
    /// The MQTT version spoken upstream.
    pub protocol: UpstreamProtocol,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub qos: u8,
    pub forward_readings: bool,
    pub max_inflight: UpstreamInflight,
    pub max_packet_bytes: usize,
    pub rate_limit: u32,
    pub batch_max_messages: usize,
    pub batch_linger_ms: u64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Trust and identity for `mqtts://`; `None` for `mqtt://`.
    pub tls: Option<UpstreamTls>,
}

/// `mqtt://host:port` (port defaults to 1883) or `mqtts://host:port` (TLS, port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl UpstreamUrl {
    /// `mqtt://host:port`, without TLS.
    pub fn mqtt(host: impl Into<String>, port: u16) -> Self {
        UpstreamUrl {
            host: host.into(),
            port,
            tls: false,
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{scheme}://{host}:{}", self.port)
    }
}

/// `upstream.url`: the upstream broker's URL, or the URLs of a broker cluster's nodes in
/// the order they are tried. Never empty; all `mqtt://` or all `mqtts://` (one TLS setting
/// serves them all); no URL twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrls(Vec<UpstreamUrl>);

impl UpstreamUrls {
    /// The list, or why it is not one: empty, mixed schemes, or a URL twice.
    pub fn new(urls: Vec<UpstreamUrl>) -> Result<Self, String> {
        let Some(first) = urls.first() else {
            return Err("the list is empty; use \"\" to turn forwarding off".into());
        };
        if urls.iter().any(|u| u.tls != first.tls) {
            return Err(
                "mixes mqtt:// and mqtts:// URLs; all must use the same scheme, as one TLS setting serves them all"
                    .into(),
            );
        }
        for (i, url) in urls.iter().enumerate() {
            if urls[..i].contains(url) {
                return Err(format!("{url} is listed twice"));
            }
        }
        Ok(UpstreamUrls(urls))
    }

    /// True for `mqtts://`.
    pub fn tls(&self) -> bool {
        self.0[0].tls
    }

    /// How many URLs (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: the list is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The URL tried at the `i`-th connection attempt: round robin over the list.
    pub fn nth(&self, i: usize) -> &UpstreamUrl {
        &self.0[i % self.0.len()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &UpstreamUrl> {
        self.0.iter()
    }
}

impl From<UpstreamUrl> for UpstreamUrls {
    fn from(url: UpstreamUrl) -> Self {
        UpstreamUrls(vec![url])
    }
}

impl fmt::Display for UpstreamUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

/// `upstream.protocol`: the MQTT version spoken to the upstream broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// MQTT 5 (`"5"`, the default): a message's id and replay flag are user properties.
    V5,
    /// MQTT 3.1.1 (`"3.1.1"`), for brokers without MQTT 5: a message's id and replay flag
    /// travel in a JSON envelope around its payload (`forwarder/encode.rs`).
    V311,
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamProtocol::V5 => "5",
            UpstreamProtocol::V311 => "3.1.1",
        })
    }
}

/// `upstream.max_inflight`: how many upstream publishes may await their PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamInflight {
    /// `"auto"`, the default: as many as the upstream broker takes. Over MQTT 5 that is
    /// the Receive Maximum of its CONNACK, up to a ceiling; MQTT 3.1.1 has no way to say
    /// it, so a fixed window (the forwarder's `AUTO_INFLIGHT_*` constants).
    Auto,
    /// At most this many (1..=65535); over MQTT 5 also at most the broker's Receive
    /// Maximum.
    Fixed(u16),
}

impl fmt::Display for UpstreamInflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamInflight::Auto => f.write_str("auto"),
            UpstreamInflight::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// `upstream.ca_file`, `upstream.client_cert` and `upstream.client_key` (checked to load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The CA the upstream server's certificate must chain to; the system store if `None`.
    pub ca_file: Option<PathBuf>,
    /// Certificate (chain) and key presented to the upstream broker (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl UpstreamTls {
    /// The rustls client configuration of these files.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
        let client = self
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        crate::tls::client_config(self.ca_file.as_deref(), client)
    }
}

#[derive(Debug, Clone)]
pub struct LogSection {
    pub level: String,
}
