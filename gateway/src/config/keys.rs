//! The key table: every key the gateway knows, with its built-in default.
//!
//! Invariants:
//! - [`KEYS`] is the only place a default is written; the `config` crate is seeded from
//!   it, and every setting a stage uses is read from the resulting [`super::Config`];
//! - the shipped `config/gateway.toml` documents every key; a test in `tests.rs` checks
//!   that none is missing;
//! - a key missing from the table is reported as unknown.

/// A default value of a known key.
#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    Str(&'static str),
    Int(i64),
    Bool(bool),
}

/// Every key the gateway knows, with its default.
pub const KEYS: &[(&str, DefaultValue)] = &[
    ("gateway.id", DefaultValue::Str("edge-gateway")),
    ("gateway.shutdown_grace", DefaultValue::Str("10s")),
    ("broker.listen", DefaultValue::Str("0.0.0.0:1883")),
    ("broker.listen_v5", DefaultValue::Str("")),
    ("broker.max_connections", DefaultValue::Int(1000)),
    ("broker.max_payload_bytes", DefaultValue::Int(65_536)),
    ("broker.max_inflight", DefaultValue::Int(100)),
    ("broker.connection_timeout", DefaultValue::Str("5s")),
    ("broker.segment_bytes", DefaultValue::Int(4 * 1024 * 1024)),
    ("broker.segment_count", DefaultValue::Int(3)),
    ("broker.listen_tls", DefaultValue::Str("")),
    ("broker.tls_cert", DefaultValue::Str("")),
    ("broker.tls_key", DefaultValue::Str("")),
    ("broker.tls_client_ca", DefaultValue::Str("")),
    (
        "ingest.topic_pattern",
        DefaultValue::Str("devices/{device}/{stream}"),
    ),
    ("ingest.queue_capacity", DefaultValue::Int(65_536)),
    ("storage.path", DefaultValue::Str("data/gateway.redb")),
    ("storage.dead_letter_max", DefaultValue::Int(10_000)),
    ("storage.max_bytes", DefaultValue::Int(256 * 1024 * 1024)),
    ("storage.max_age", DefaultValue::Str("7d")),
    ("storage.flush_interval", DefaultValue::Str("1500us")),
    ("rules.dir", DefaultValue::Str("rules")),
    (
        "rules.event_topic",
        DefaultValue::Str("events/{type}/{device}"),
    ),
    ("rules.device_events", DefaultValue::Bool(true)),
    ("upstream.url", DefaultValue::Str("")),
    ("upstream.protocol", DefaultValue::Str("5")),
    ("upstream.client_id", DefaultValue::Str("")),
    ("upstream.username", DefaultValue::Str("")),
    ("upstream.password", DefaultValue::Str("")),
    (
        "upstream.topic_prefix",
        DefaultValue::Str("gateways/{gateway_id}"),
    ),
    ("upstream.keep_alive", DefaultValue::Str("30s")),
    ("upstream.qos", DefaultValue::Int(1)),
    ("upstream.forward_readings", DefaultValue::Bool(true)),
    ("upstream.max_inflight", DefaultValue::Str("auto")),
    ("upstream.max_packet_bytes", DefaultValue::Int(1024 * 1024)),
    ("upstream.rate_limit", DefaultValue::Int(0)),
    ("upstream.batch_max_messages", DefaultValue::Int(1)),
    ("upstream.batch_linger_ms", DefaultValue::Int(5)),
    ("upstream.backoff_min", DefaultValue::Str("500ms")),
    ("upstream.backoff_max", DefaultValue::Str("30s")),
    ("upstream.ca_file", DefaultValue::Str("")),
    ("upstream.client_cert", DefaultValue::Str("")),
    ("upstream.client_key", DefaultValue::Str("")),
    (
        "downlink.upstream_topic",
        DefaultValue::Str("commands/{device}/{command}"),
    ),
    (
        "downlink.device_topic",
        DefaultValue::Str("devices/{device}/commands/{command}"),
    ),
    ("downlink.ttl", DefaultValue::Str("24h")),
    ("downlink.max_per_device", DefaultValue::Int(100)),
    ("log.level", DefaultValue::Str("info")),
    ("http.listen", DefaultValue::Str("127.0.0.1:8080")),
    ("auth.anonymous", DefaultValue::Bool(true)),
    (
        "auth.credentials_file",
        DefaultValue::Str("config/devices.passwd"),
    ),
];
