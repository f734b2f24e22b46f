//! Each section built from the reader's typed values and checked: ranges, formats,
//! the upstream URL list and protocol, and the rules that tie keys together (listeners that must differ,
//! `upstream.backoff_min` not above `upstream.backoff_max`, ...). The TLS keys are
//! checked in `tls.rs`.
//!
//! Invariants:
//! - every key is read, even after a problem, so one pass reports everything;
//! - the result is a [`Config`] only when no problem was found.

use std::path::PathBuf;
use std::time::Duration;

use config::ValueKind;

use super::reader::Reader;
use super::{
    AuthSection, BrokerSection, Config, ConfigErrors, DownlinkSection, GatewaySection, HttpSection,
    IngestSection, LogSection, RulesSection, StorageSection, UpstreamInflight, UpstreamProtocol,
    UpstreamSection, UpstreamUrl, UpstreamUrls,
};
use crate::decode::{TopicPattern, TopicPatterns};
use crate::downlink::CommandTopic;

impl Reader {
    /// Builds and checks every section; all problems at once, or the configuration.
    pub(super) fn finish(mut self) -> Result<Config, ConfigErrors> {
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
            device_events: self.boolean("rules.device_events").unwrap_or(true),
        };
        let upstream = self.upstream(&gateway.id);
        let downlink = DownlinkSection {
            upstream_topic: self.command_topic("downlink.upstream_topic"),
            device_topic: self.command_topic("downlink.device_topic"),
            ttl: self.duration("downlink.ttl").unwrap_or_default(),
            max_per_device: self
                .uint("downlink.max_per_device", 1, 1_000_000)
                .unwrap_or(1) as usize,
        };
        if downlink.ttl.is_zero() {
            self.problem("downlink.ttl", "must be longer than 0s");
        }
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
                downlink,
                log,
                http,
                auth,
            })
        } else {
            Err(ConfigErrors(self.problems))
        }
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

    /// A `downlink.*_topic` pattern; the default's when it is invalid (with a problem).
    fn command_topic(&mut self, key: &str) -> CommandTopic {
        let fallback = || CommandTopic::parse("commands/{device}/{command}").expect("valid");
        let Some(text) = self.nonempty(key) else {
            return fallback();
        };
        CommandTopic::parse(&text).unwrap_or_else(|e| {
            self.problem(key, format!("'{text}' {e}"));
            fallback()
        })
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

    /// `ingest.topic_pattern`: one pattern, or several (a TOML array of strings, or one
    /// string with the patterns separated by commas, the form an environment variable
    /// can carry), tried in order.
    fn topic_pattern(&mut self) -> TopicPatterns {
        const KEY: &str = "ingest.topic_pattern";
        let fallback: TopicPatterns = TopicPattern::parse("devices/{device}/{stream}")
            .expect("valid")
            .into();
        let Ok(value) = self.merged.get::<config::Value>(KEY) else {
            return fallback;
        };
        let texts: Vec<String> = match value.kind {
            ValueKind::Array(items) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| match item.kind {
                    ValueKind::String(s) => Some(s),
                    other => {
                        self.problem(
                            KEY,
                            format!("entry {} is '{other}', expected a string like \"devices/{{device}}/{{stream}}\"", i + 1),
                        );
                        None
                    }
                })
                .collect(),
            _ => match self.string(KEY) {
                Some(text) => text.split(',').map(|s| s.trim().to_owned()).collect(),
                None => return fallback,
            },
        };
        let list = texts.len() > 1;
        let mut patterns: Vec<TopicPattern> = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let at = if list {
                format!("entry {} ", i + 1)
            } else {
                String::new()
            };
            match TopicPattern::parse(text) {
                Ok(p) if patterns.contains(&p) => {
                    self.problem(KEY, format!("{at}'{text}' is listed twice"));
                }
                Ok(p) => patterns.push(p),
                Err(e) => self.problem(KEY, format!("{at}'{text}': {e}")),
            }
        }
        TopicPatterns::new(patterns).unwrap_or_else(|| {
            if texts.is_empty() {
                self.problem(KEY, "must name at least one pattern");
            }
            fallback
        })
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
        let url = self.upstream_urls();
        let protocol = self.upstream_protocol();
        let client_id = self.string("upstream.client_id").unwrap_or_default();
        let nonblank = |s: Option<String>| s.filter(|s| !s.is_empty());
        let section = UpstreamSection {
            url,
            protocol,
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
            max_inflight: self.upstream_inflight(),
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

    /// `upstream.url`: empty (off), one URL, or a failover list: a TOML array of strings,
    /// or one string with the URLs separated by commas (the form an environment variable
    /// can carry).
    fn upstream_urls(&mut self) -> Option<UpstreamUrls> {
        const KEY: &str = "upstream.url";
        let value = self.merged.get::<config::Value>(KEY).ok()?;
        let mut bad = false;
        let texts: Vec<String> = match value.kind {
            ValueKind::Array(items) => {
                let mut texts = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item.kind {
                        ValueKind::String(s) => texts.push(s),
                        other => {
                            bad = true;
                            self.problem(
                                KEY,
                                format!("entry {} is '{other}', expected a string like \"mqtt://host:port\"", i + 1),
                            );
                        }
                    }
                }
                texts
            }
            _ => {
                let text = self.string(KEY)?;
                if text.trim().is_empty() {
                    return None;
                }
                text.split(',').map(|s| s.trim().to_owned()).collect()
            }
        };
        let list = texts.len() > 1;
        let mut urls = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let parsed = match text.split_once("://") {
                Some(("mqtt", rest)) => parse_host_port(rest, false),
                Some(("mqtts", rest)) => parse_host_port(rest, true),
                _ => Err("expected mqtt://host:port or mqtts://host:port".to_string()),
            };
            match parsed {
                Ok(url) => urls.push(url),
                Err(e) if list => {
                    bad = true;
                    self.problem(KEY, format!("entry {} '{text}': {e}", i + 1));
                }
                Err(e) => {
                    bad = true;
                    self.problem(KEY, format!("'{text}': {e}"));
                }
            }
        }
        if bad {
            return None;
        }
        match UpstreamUrls::new(urls) {
            Ok(urls) => Some(urls),
            Err(e) => {
                self.problem(KEY, e);
                None
            }
        }
    }

    fn upstream_inflight(&mut self) -> UpstreamInflight {
        let key = "upstream.max_inflight";
        let Some(text) = self.string(key) else {
            return UpstreamInflight::Auto;
        };
        match text.trim() {
            "auto" => UpstreamInflight::Auto,
            n => match n.parse::<u16>() {
                Ok(n) if n > 0 => UpstreamInflight::Fixed(n),
                _ => {
                    self.problem(
                        key,
                        format!("'{n}': expected \"auto\" or a number of messages from 1 to 65535"),
                    );
                    UpstreamInflight::Auto
                }
            },
        }
    }

    fn upstream_protocol(&mut self) -> UpstreamProtocol {
        match self.string("upstream.protocol").as_deref().map(str::trim) {
            Some("5") | None => UpstreamProtocol::V5,
            Some("3.1.1") => UpstreamProtocol::V311,
            Some(other) => {
                self.problem(
                    "upstream.protocol",
                    format!("'{other}': expected \"5\" (MQTT 5) or \"3.1.1\" (MQTT 3.1.1)"),
                );
                UpstreamProtocol::V5
            }
        }
    }
}

/// `host[:port]` after the scheme; the port defaults to 1883, or 8883 with TLS.
pub(super) fn parse_host_port(rest: &str, tls: bool) -> Result<UpstreamUrl, String> {
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
