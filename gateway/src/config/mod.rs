//! Configuration: built-in defaults, then the TOML file, then `GATEWAY__SECTION__KEY`
//! environment variables (the `config` crate), validated in one pass.
//!
//! Invariants:
//! - every problem is reported at once, each naming its key (and the file or variable
//!   it came from when known); an unknown key is a problem, not a silent no-op;
//! - nothing binds a port or opens a file before the whole configuration is valid.
//!
//! The shipped `config/gateway.toml` documents every key; [`KEYS`] is the list of keys
//! with their defaults, and a test checks that the two agree.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::{Environment, File, FileFormat, ValueKind};
use serde::de::DeserializeOwned;

use crate::decode::TopicPattern;

/// The file read when `--config` is not given; a missing default file is not an error.
pub const DEFAULT_PATH: &str = "config/gateway.toml";
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "GATEWAY";

/// A default value of a known key.
#[derive(Debug, Clone, Copy)]
pub enum Default {
    Str(&'static str),
    Int(i64),
    Bool(bool),
}

/// Every key the gateway knows, with its default.
pub const KEYS: &[(&str, Default)] = &[
    ("gateway.id", Default::Str("edge-gateway")),
    ("gateway.shutdown_grace", Default::Str("10s")),
    ("broker.listen", Default::Str("0.0.0.0:1883")),
    ("broker.listen_v5", Default::Str("")),
    ("broker.max_connections", Default::Int(1000)),
    ("broker.max_payload_bytes", Default::Int(65_536)),
    ("broker.max_inflight", Default::Int(100)),
    ("broker.connection_timeout", Default::Str("5s")),
    ("broker.segment_bytes", Default::Int(4 * 1024 * 1024)),
    ("broker.segment_count", Default::Int(3)),
    ("broker.listen_tls", Default::Str("")),
    ("broker.tls_cert", Default::Str("")),
    ("broker.tls_key", Default::Str("")),
    ("broker.tls_client_ca", Default::Str("")),
    (
        "ingest.topic_pattern",
        Default::Str("devices/{device}/{stream}"),
    ),
    ("ingest.queue_capacity", Default::Int(65_536)),
    ("storage.path", Default::Str("data/gateway.redb")),
    ("storage.dead_letter_max", Default::Int(10_000)),
    ("storage.max_bytes", Default::Int(256 * 1024 * 1024)),
    ("storage.max_age", Default::Str("7d")),
    ("storage.flush_interval", Default::Str("5ms")),
    ("rules.dir", Default::Str("rules")),
    ("rules.event_topic", Default::Str("events/{type}/{device}")),
    ("upstream.url", Default::Str("")),
    ("upstream.client_id", Default::Str("")),
    ("upstream.username", Default::Str("")),
    ("upstream.password", Default::Str("")),
    (
        "upstream.topic_prefix",
        Default::Str("gateways/{gateway_id}"),
    ),
    ("upstream.keep_alive", Default::Str("30s")),
    ("upstream.qos", Default::Int(1)),
    ("upstream.forward_readings", Default::Bool(true)),
    ("upstream.max_inflight", Default::Int(100)),
    ("upstream.max_packet_bytes", Default::Int(1024 * 1024)),
    ("upstream.rate_limit", Default::Int(0)),
    ("upstream.batch_max_messages", Default::Int(1)),
    ("upstream.batch_linger_ms", Default::Int(5)),
    ("upstream.backoff_min", Default::Str("500ms")),
    ("upstream.backoff_max", Default::Str("30s")),
    ("upstream.ca_file", Default::Str("")),
    ("upstream.client_cert", Default::Str("")),
    ("upstream.client_key", Default::Str("")),
    ("log.level", Default::Str("info")),
    ("http.listen", Default::Str("127.0.0.1:8080")),
    ("auth.anonymous", Default::Bool(true)),
    (
        "auth.credentials_file",
        Default::Str("config/devices.passwd"),
    ),
];

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewaySection,
    pub broker: BrokerSection,
    pub ingest: IngestSection,
    pub storage: StorageSection,
    pub rules: RulesSection,
    pub upstream: UpstreamSection,
    pub log: LogSection,
    pub http: HttpSection,
    pub auth: AuthSection,
}

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
    pub topic_pattern: TopicPattern,
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

#[derive(Debug, Clone)]
pub struct UpstreamSection {
    /// `None` when forwarding is off (`upstream.url = ""`).
    pub url: Option<UpstreamUrl>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub qos: u8,
    pub forward_readings: bool,
    pub max_inflight: u16,
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

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the configuration file comes from.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// `--config PATH`: the file must exist.
    Explicit(&'a Path),
    /// No flag: `config/gateway.toml` when present, else the defaults.
    Default,
    /// No file at all (tests).
    None,
}

impl Config {
    /// Loads defaults < file < environment and validates the result.
    pub fn load(source: Source<'_>) -> Result<Config, ConfigErrors> {
        Self::load_with(source, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly.
    pub fn load_with(
        source: Source<'_>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut builder = config::Config::builder();
        let mut provenance = Provenance::default();
        for (key, default) in KEYS {
            builder = match *default {
                Default::Str(s) => builder.set_default(*key, s),
                Default::Int(i) => builder.set_default(*key, i),
                Default::Bool(b) => builder.set_default(*key, b),
            }
            .expect("static default keys are valid");
        }
        match source {
            Source::Explicit(path) => {
                if !path.is_file() {
                    return Err(ConfigErrors(vec![format!(
                        "config file {} does not exist",
                        path.display()
                    )]));
                }
                builder = builder.add_source(File::from(path).format(FileFormat::Toml));
                provenance.read_file(path);
            }
            Source::Default => {
                builder =
                    builder.add_source(File::new(DEFAULT_PATH, FileFormat::Toml).required(false));
                provenance.read_file(Path::new(DEFAULT_PATH));
            }
            Source::None => {}
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        provenance.env_vars = env.keys().cloned().collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Reader {
            merged,
            provenance,
            problems: Vec::new(),
        }
        .finish()
    }

    /// The configuration built from the defaults alone.
    pub fn defaults() -> Config {
        Config::load_with(Source::None, []).expect("the built-in defaults are valid")
    }

    /// The upstream topic prefix with `{gateway_id}` filled in, without a trailing `/`.
    pub fn upstream_prefix(&self) -> String {
        self.upstream
            .topic_prefix
            .replace("{gateway_id}", &self.gateway.id)
            .trim_end_matches('/')
            .to_string()
    }

    /// Checks that the broker's ports can be bound, before anything starts.
    pub fn check_ports(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let listeners = [
            ("broker.listen", Some(self.broker.listen)),
            ("broker.listen_v5", self.broker.listen_v5),
            ("http.listen", self.http.listen),
            (
                "broker.listen_tls",
                self.broker.tls.as_ref().map(|t| t.listen),
            ),
        ];
        for (key, addr) in listeners {
            let Some(addr) = addr else { continue };
            if let Err(e) = std::net::TcpListener::bind(addr) {
                problems.push(format!("{key}: cannot listen on {addr}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

/// Where each key's value came from, so a problem can say which file or variable to fix.
#[derive(Default)]
struct Provenance {
    file: Option<(PathBuf, toml::Table)>,
    env_vars: BTreeSet<String>,
}

impl Provenance {
    fn read_file(&mut self, path: &Path) {
        let table = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok());
        self.file = table.map(|t| (path.to_path_buf(), t));
    }

    /// ` (from ...)` for a `section.key` or a `section`, empty when it is a default.
    fn of(&self, key: &str) -> String {
        let var = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
        if let Some(var) = self
            .env_vars
            .iter()
            .find(|v| v.to_uppercase() == var || v.to_uppercase().starts_with(&format!("{var}__")))
        {
            return format!(" (from environment variable {var})");
        }
        if let Some((path, table)) = &self.file {
            let mut parts = key.split('.');
            let section = parts.next().and_then(|s| table.get(s));
            let found = match parts.next() {
                Some(name) => section.and_then(|s| s.get(name)).is_some(),
                None => section.is_some(),
            };
            if found {
                return format!(" (from {})", path.display());
            }
        }
        String::new()
    }
}

/// Reads typed values out of the merged configuration, collecting every problem.
struct Reader {
    merged: config::Config,
    provenance: Provenance,
    problems: Vec<String>,
}

impl Reader {
    fn problem(&mut self, key: &str, message: impl fmt::Display) {
        let origin = self.provenance.of(key);
        self.problems.push(format!("{key}: {message}{origin}"));
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str, expected: &str) -> Option<T> {
        match self.merged.get::<T>(key) {
            Ok(v) => Some(v),
            Err(_) => {
                let found = match self.merged.get::<config::Value>(key) {
                    Ok(v) => format!("{}", v.kind),
                    Err(e) => e.to_string(),
                };
                self.problem(key, format!("expected {expected}, found '{found}'"));
                None
            }
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        self.get::<String>(key, "a string")
    }

    fn uint(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        let v = self.get::<i64>(key, "an integer")?;
        if v < min as i64 || v as u64 > max {
            self.problem(key, format!("{v} is out of range {min}..={max}"));
            return None;
        }
        Some(v as u64)
    }

    fn boolean(&mut self, key: &str) -> Option<bool> {
        self.get::<bool>(key, "true or false")
    }

    fn duration(&mut self, key: &str) -> Option<Duration> {
        let text = self.string(key)?;
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    key,
                    format!("'{text}' is not a duration like \"500ms\", \"30s\" or \"7d\" ({e})"),
                );
                None
            }
        }
    }

    fn addr(&mut self, key: &str) -> Option<SocketAddr> {
        let text = self.string(key)?;
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("'{text}' is not an address like \"0.0.0.0:1883\""),
                );
                None
            }
        }
    }

    fn optional<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        match self.merged.get::<String>(key) {
            Ok(s) if s.trim().is_empty() => Some(None),
            _ => parse(self).map(Some),
        }
    }

    fn unknown_keys(&mut self) {
        let known: BTreeSet<&str> = KEYS.iter().map(|(k, _)| *k).collect();
        let sections: BTreeSet<&str> = known.iter().filter_map(|k| k.split('.').next()).collect();
        let table = match self
            .merged
            .clone()
            .try_deserialize::<config::Map<String, config::Value>>()
        {
            Ok(t) => t,
            Err(e) => return self.problems.push(e.to_string()),
        };
        for (section, value) in table {
            if !sections.contains(section.as_str()) {
                self.problem(&section, "unknown section");
                continue;
            }
            let ValueKind::Table(keys) = value.kind else {
                self.problem(&section, "expected a table of keys");
                continue;
            };
            for key in keys.keys() {
                let full = format!("{section}.{key}");
                if !known.contains(full.as_str()) {
                    let hint = closest(&full, &known)
                        .map(|k| format!("; did you mean '{k}'?"))
                        .unwrap_or_default();
                    self.problem(&full, format!("unknown key{hint}"));
                }
            }
        }
    }

    fn finish(mut self) -> Result<Config, ConfigErrors> {
        self.unknown_keys();
        let gateway = GatewaySection {
            id: self.gateway_id().unwrap_or_default(),
            shutdown_grace: self.duration("gateway.shutdown_grace").unwrap_or_default(),
        };
        let broker = BrokerSection {
            listen: self
                .addr("broker.listen")
                .unwrap_or(([0, 0, 0, 0], 0).into()),
            listen_v5: self
                .optional("broker.listen_v5", |r| r.addr("broker.listen_v5"))
                .flatten(),
            max_connections: self
                .uint("broker.max_connections", 1, 1_000_000)
                .unwrap_or(1) as usize,
            max_payload_bytes: self
                .uint("broker.max_payload_bytes", 16, 256 << 20)
                .unwrap_or(16) as usize,
            max_inflight: self
                .uint("broker.max_inflight", 1, u16::MAX as u64)
                .unwrap_or(1) as usize,
            connection_timeout: self
                .duration("broker.connection_timeout")
                .unwrap_or_default(),
            segment_bytes: self
                .uint("broker.segment_bytes", 64 * 1024, 1 << 30)
                .unwrap_or(1) as usize,
            segment_count: self.uint("broker.segment_count", 1, 1000).unwrap_or(1) as usize,
            tls: None,
        };
        let broker = BrokerSection {
            tls: self.broker_tls(&broker),
            ..broker
        };
        if broker.listen_v5 == Some(broker.listen) {
            self.problem("broker.listen_v5", "must differ from broker.listen");
        }
        if broker.connection_timeout.as_millis() > u16::MAX as u128 {
            self.problem("broker.connection_timeout", "must be at most 65s");
        }
        let ingest = IngestSection {
            topic_pattern: self.topic_pattern(),
            queue_capacity: self
                .uint("ingest.queue_capacity", 16, 10_000_000)
                .unwrap_or(16) as usize,
        };
        let storage = StorageSection {
            path: PathBuf::from(self.nonempty("storage.path").unwrap_or_default()),
            dead_letter_max: self
                .uint("storage.dead_letter_max", 1, 10_000_000)
                .unwrap_or(1) as usize,
            max_bytes: self
                .uint("storage.max_bytes", 1024 * 1024, u64::MAX >> 1)
                .unwrap_or(0),
            max_age: self.duration("storage.max_age").unwrap_or_default(),
            flush_interval: self.duration("storage.flush_interval").unwrap_or_default(),
        };
        let rules = RulesSection {
            dir: PathBuf::from(self.nonempty("rules.dir").unwrap_or_default()),
            event_topic: self.event_topic().unwrap_or_default(),
        };
        let upstream = self.upstream(&gateway.id);
        let log = LogSection {
            level: self.log_level().unwrap_or_default(),
        };
        let http = HttpSection {
            listen: match self.merged.get::<String>("http.listen") {
                Ok(s) if s.trim() == "off" => None,
                _ => self
                    .optional("http.listen", |r| r.addr("http.listen"))
                    .flatten(),
            },
        };
        let broker_ports = [Some(broker.listen), broker.listen_v5].map(|a| a.map(|a| a.port()));
        if http
            .listen
            .is_some_and(|a| a.port() != 0 && broker_ports.contains(&Some(a.port())))
        {
            self.problem("http.listen", "must differ from the broker's listeners");
        }
        let auth = AuthSection {
            anonymous: self.boolean("auth.anonymous").unwrap_or(true),
            credentials_file: PathBuf::from(
                self.string("auth.credentials_file").unwrap_or_default(),
            ),
        };
        if !auth.anonymous && auth.credentials_file.as_os_str().is_empty() {
            self.problem(
                "auth.credentials_file",
                "must not be empty when auth.anonymous is false",
            );
        }
        if self.problems.is_empty() {
            Ok(Config {
                gateway,
                broker,
                ingest,
                storage,
                rules,
                upstream,
                log,
                http,
                auth,
            })
        } else {
            Err(ConfigErrors(self.problems))
        }
    }

    fn nonempty(&mut self, key: &str) -> Option<String> {
        let s = self.string(key)?;
        if s.trim().is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn event_topic(&mut self) -> Option<String> {
        let topic = self.nonempty("rules.event_topic")?;
        let bad_placeholder = topic.split('/').any(|s| {
            (s.contains(['{', '}']) && !["{type}", "{device}", "{rule}", "{state}"].contains(&s))
                || s.contains(['+', '#'])
        });
        if bad_placeholder || topic.starts_with('$') {
            self.problem("rules.event_topic", format!("'{topic}': levels are literals or one of {{type}}, {{device}}, {{rule}}, {{state}}; no wildcards"));
            return None;
        }
        Some(topic)
    }

    fn gateway_id(&mut self) -> Option<String> {
        let id = self.nonempty("gateway.id")?;
        if id.contains(['/', '+', '#']) || id.chars().any(char::is_whitespace) {
            self.problem(
                "gateway.id",
                format!("'{id}' must not contain '/', '+', '#' or spaces"),
            );
            return None;
        }
        Some(id)
    }

    fn topic_pattern(&mut self) -> TopicPattern {
        let fallback = TopicPattern::parse("devices/{device}/{stream}").expect("valid");
        let Some(text) = self.string("ingest.topic_pattern") else {
            return fallback;
        };
        match TopicPattern::parse(&text) {
            Ok(p) => p,
            Err(e) => {
                self.problem("ingest.topic_pattern", format!("'{text}': {e}"));
                fallback
            }
        }
    }

    fn log_level(&mut self) -> Option<String> {
        let level = self.string("log.level")?;
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let valid = level.split(',').map(str::trim).all(|directive| {
            let level_part = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
            LEVELS.contains(&level_part.to_ascii_lowercase().as_str())
        });
        if !valid
            || tracing_subscriber::EnvFilter::builder()
                .parse(&level)
                .is_err()
        {
            self.problem("log.level", format!("'{level}' is not a level (error, warn, info, debug, trace) or a filter like \"info,gateway=debug\""));
            return None;
        }
        Some(level)
    }

    fn upstream(&mut self, gateway_id: &str) -> UpstreamSection {
        let url = self
            .optional("upstream.url", |r| r.upstream_url())
            .flatten();
        let client_id = self.string("upstream.client_id").unwrap_or_default();
        let nonblank = |s: Option<String>| s.filter(|s| !s.is_empty());
        let section = UpstreamSection {
            url,
            client_id: if client_id.is_empty() {
                gateway_id.to_string()
            } else {
                client_id
            },
            username: nonblank(self.string("upstream.username")),
            password: nonblank(self.string("upstream.password")),
            topic_prefix: self.string("upstream.topic_prefix").unwrap_or_default(),
            keep_alive: self.duration("upstream.keep_alive").unwrap_or_default(),
            qos: self.uint("upstream.qos", 0, 1).unwrap_or(1) as u8,
            forward_readings: self.boolean("upstream.forward_readings").unwrap_or(true),
            max_inflight: self
                .uint("upstream.max_inflight", 1, u16::MAX as u64)
                .unwrap_or(1) as u16,
            max_packet_bytes: self
                .uint("upstream.max_packet_bytes", 1024, 256 << 20)
                .unwrap_or(1024) as usize,
            rate_limit: self
                .uint("upstream.rate_limit", 0, u32::MAX as u64)
                .unwrap_or(0) as u32,
            batch_max_messages: self
                .uint("upstream.batch_max_messages", 1, 10_000)
                .unwrap_or(1) as usize,
            batch_linger_ms: self
                .uint("upstream.batch_linger_ms", 0, 60_000)
                .unwrap_or(0),
            backoff_min: self.duration("upstream.backoff_min").unwrap_or_default(),
            backoff_max: self.duration("upstream.backoff_max").unwrap_or_default(),
            tls: None,
        };
        let section = UpstreamSection {
            tls: self.upstream_tls(section.url.as_ref()),
            ..section
        };
        if section.keep_alive < Duration::from_secs(5) {
            self.problem("upstream.keep_alive", "must be at least 5s");
        }
        if section.backoff_min > section.backoff_max {
            self.problem(
                "upstream.backoff_min",
                "must not exceed upstream.backoff_max",
            );
        }
        if section.topic_prefix.contains(['+', '#']) {
            self.problem("upstream.topic_prefix", "must not contain MQTT wildcards");
        }
        section
    }

    fn upstream_url(&mut self) -> Option<UpstreamUrl> {
        let text = self.string("upstream.url")?;
        let parsed = match text.split_once("://") {
            Some(("mqtt", rest)) => parse_host_port(rest, false),
            Some(("mqtts", rest)) => parse_host_port(rest, true),
            _ => Err("expected mqtt://host:port or mqtts://host:port".to_string()),
        };
        match parsed {
            Ok(url) => Some(url),
            Err(e) => {
                self.problem("upstream.url", format!("'{text}': {e}"));
                None
            }
        }
    }
}

fn parse_host_port(rest: &str, tls: bool) -> Result<UpstreamUrl, String> {
    let default_port = if tls { 8883 } else { 1883 };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if rest.starts_with('[') == h.ends_with(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port"))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || rest.contains('/') {
        return Err("expected mqtt://host:port or mqtts://host:port".into());
    }
    Ok(UpstreamUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// The known key closest to a misspelt one, when one is close enough to suggest.
fn closest<'a>(key: &str, known: &BTreeSet<&'a str>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

mod tls;

#[cfg(test)]
mod tests;
