//! `/metrics`: the Prometheus text exposition format (0.0.4), written by a small encoder
//! rather than a metrics crate (the figures already live in atomics; only the text is new).
//!
//! Input: [`Sources`]; output: the text of one scrape. The metric names are a contract
//! with the dashboards and alert rules in `ops/` (see the README's metric list).
//!
//! Invariants:
//! - every family has exactly one `# HELP` and one `# TYPE` line, before its samples;
//! - label values are escaped (`\\`, `"`, newline), HELP text too (`\\`, newline);
//! - counters end in `_total`; histograms have cumulative `le` buckets ending in `+Inf`,
//!   with `_sum` and `_count`.

use std::fmt::Write;
use std::sync::atomic::AtomicU64;

use super::{process, Sources};
use crate::counters::{ByFormat, Counters, HistogramSnapshot, HISTOGRAM_BOUNDS};
use crate::reading::Format;
use crate::store::{Counter, Lane, OutboxStats};

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Writes families of samples in the text format.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        write_value(&mut self.out, value);
        self.out.push('\n');
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, value: f64) -> &mut Self {
        self.family(name, help, kind).sample(name, &[], value)
    }

    /// A histogram family of durations in seconds.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) -> &mut Self {
        self.family(name, help, Kind::Histogram);
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, bound) in HISTOGRAM_BOUNDS.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            self.sample(&bucket, &[("le", &bound.to_string())], cumulative as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count() as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum_micros as f64 / 1e6);
        self.sample(&format!("{name}_count"), &[], h.count() as f64)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// The label value of a format: `json`, `cbor`, `senml_json`, `senml_cbor`.
fn format_label(f: Format) -> String {
    f.as_str().replace('-', "_")
}

/// Renders one scrape.
pub fn render(s: &Sources) -> String {
    let mut e = Encoder::default();
    let get = Counters::get;
    let c = &s.counters;
    e.family(
        "gateway_build_info",
        "Build of the running gateway.",
        Kind::Gauge,
    )
    .sample(
        "gateway_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.single(
        "gateway_messages_ingested_total",
        "MQTT messages taken from the embedded broker.",
        Kind::Counter,
        get(&c.ingested) as f64,
    );
    e.single(
        "gateway_ingest_overflow_total",
        "Messages dropped because the decode queue was full.",
        Kind::Counter,
        get(&c.ingest_overflow) as f64,
    );
    e.single(
        "gateway_link_lost_total",
        "Messages the broker dropped before ingest read them.",
        Kind::Counter,
        get(&c.link_lost) as f64,
    );
    let by_format = |e: &mut Encoder, name: &str, help: &str, values: &ByFormat<AtomicU64>| {
        e.family(name, help, Kind::Counter);
        for (f, v) in values.iter() {
            e.sample(name, &[("format", &format_label(f))], get(v) as f64);
        }
    };
    by_format(
        &mut e,
        "gateway_messages_decoded_total",
        "Messages decoded, by payload format.",
        &c.decoded,
    );
    by_format(
        &mut e,
        "gateway_readings_decoded_total",
        "Readings decoded (a SenML pack holds several), by payload format.",
        &c.readings_by_format,
    );
    by_format(
        &mut e,
        "gateway_dead_letters_total",
        "Messages that did not decode, by payload format (unknown when none was recognised).",
        &c.dead_lettered,
    );
    e.sample(
        "gateway_dead_letters_total",
        &[("format", "unknown")],
        get(&c.dead_lettered_unknown) as f64,
    );
    e.single(
        "gateway_rule_evaluations_total",
        "Rule conditions evaluated.",
        Kind::Counter,
        get(&c.rule_evaluations) as f64,
    );
    e.single(
        "gateway_rules_overflow_total",
        "Readings dropped because the rules queue was full.",
        Kind::Counter,
        get(&c.rules_overflow) as f64,
    );
    let rules = s.rules.get();
    e.family(
        "gateway_events_total",
        "Events emitted by rules, by event type and state (firing or resolved).",
        Kind::Counter,
    );
    for ((event_type, state), n) in &rules.events {
        e.sample(
            "gateway_events_total",
            &[("type", event_type), ("state", state)],
            *n as f64,
        );
    }
    // One snapshot of the store's counters serves the outbox and storage families, so a
    // scrape is consistent across them.
    let store = s.store.stats();
    outbox(&mut e, &store);
    upstream(&mut e, s);
    if let Some(n) = process::established_connections(&s.broker_listeners) {
        e.single(
            "gateway_connected_devices",
            "Established MQTT connections on the broker's listeners.",
            Kind::Gauge,
            n as f64,
        );
    }
    storage(&mut e, &store);
    if let Some(auth) = &s.auth {
        let a = auth.stats();
        e.family(
            "gateway_auth_failures_total",
            "Device CONNECTs refused by authentication, by reason.",
            Kind::Counter,
        );
        for (reason, n) in [
            ("client_id", &a.refused_client_id),
            ("unknown_device", &a.refused_unknown),
            ("password", &a.refused_password),
            ("busy", &a.refused_busy),
        ] {
            e.sample(
                "gateway_auth_failures_total",
                &[("reason", reason)],
                get(n) as f64,
            );
        }
        e.single(
            "gateway_auth_accepted_total",
            "Device CONNECTs accepted by authentication.",
            Kind::Counter,
            get(&a.accepted) as f64,
        );
    }
    if let Some(rss) = process::resident_memory_bytes() {
        e.single(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Kind::Gauge,
            rss as f64,
        );
    }
    if let Some(cpu) = process::cpu_seconds() {
        e.single(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            Kind::Counter,
            cpu,
        );
    }
    e.single(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        Kind::Gauge,
        s.started_at as f64 / 1000.0,
    );
    e.finish()
}

/// Storage health: degraded while the database cannot be written (full disk, I/O errors).
fn storage(e: &mut Encoder, stats: &OutboxStats) {
    e.single(
        "gateway_storage_degraded",
        "1 while the database cannot be written and the outbox refuses new entries.",
        Kind::Gauge,
        stats.storage_degraded() as f64,
    );
    e.single(
        "gateway_storage_errors_total",
        "Writes to the database that failed.",
        Kind::Counter,
        stats.get(Counter::StorageErrors) as f64,
    );
    e.family(
        "gateway_outbox_refused_total",
        "Entries refused while the storage was degraded, by lane.",
        Kind::Counter,
    );
    for lane in Lane::ALL {
        e.sample(
            "gateway_outbox_refused_total",
            &[("lane", lane.as_str())],
            stats.get(Counter::refused(lane)) as f64,
        );
    }
}

fn outbox(e: &mut Encoder, stats: &OutboxStats) {
    e.family(
        "gateway_outbox_messages",
        "Messages waiting in the outbox, by lane.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        e.sample(
            "gateway_outbox_messages",
            &[("lane", lane.as_str())],
            l.messages as f64,
        );
    }
    e.family(
        "gateway_outbox_bytes",
        "Bytes waiting in the outbox (keys and rows), by lane.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        e.sample(
            "gateway_outbox_bytes",
            &[("lane", lane.as_str())],
            l.bytes as f64,
        );
    }
    e.family(
        "gateway_outbox_oldest_age_seconds",
        "Age of the oldest message in the outbox, by lane; 0 when the lane is empty.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        e.sample(
            "gateway_outbox_oldest_age_seconds",
            &[("lane", lane.as_str())],
            l.oldest_age_ms.unwrap_or(0) as f64 / 1000.0,
        );
    }
    e.family(
        "gateway_outbox_dropped_total",
        "Outbox rows and store commands dropped, by reason.",
        Kind::Counter,
    );
    for (counter, v) in &stats.counters {
        if let Some(reason) = counter.drop_reason() {
            e.sample(
                "gateway_outbox_dropped_total",
                &[("reason", &reason)],
                *v as f64,
            );
        }
    }
    e.histogram(
        "gateway_store_commit_seconds",
        "Duration of the store's write transactions (group commits).",
        &stats.commit_seconds,
    );
}

fn upstream(e: &mut Encoder, s: &Sources) {
    let f = s.forwarder.as_deref();
    let get = |pick: fn(&crate::forwarder::ForwarderStats) -> &std::sync::atomic::AtomicU64| {
        f.map_or(0, |f| Counters::get(pick(f))) as f64
    };
    e.single(
        "gateway_upstream_connected",
        "1 while connected to the upstream broker, else 0 (also 0 when forwarding is off).",
        Kind::Gauge,
        if f.is_some_and(|f| f.connected()) {
            1.0
        } else {
            0.0
        },
    );
    e.single(
        "gateway_upstream_reconnects_total",
        "Connections to the upstream broker established after the first one.",
        Kind::Counter,
        (get(|f| &f.connects) - 1.0).max(0.0),
    );
    e.family(
        "gateway_upstream_forwarded_total",
        "Outbox rows acknowledged by the upstream broker, by lane.",
        Kind::Counter,
    );
    for lane in Lane::ALL {
        let v = f.map_or(0, |f| Counters::get(&f.acked_by_lane[lane]));
        e.sample(
            "gateway_upstream_forwarded_total",
            &[("lane", lane.as_str())],
            v as f64,
        );
    }
    let latency = f.map(|f| f.latency.snapshot()).unwrap_or_default();
    e.histogram(
        "gateway_forward_latency_seconds",
        "Time from a message's arrival in the outbox to the upstream PUBACK.",
        &latency,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Histogram;

    #[test]
    fn escapes_label_values_and_help() {
        let mut e = Encoder::default();
        e.family("m", "a \\ b\nc", Kind::Gauge)
            .sample("m", &[("l", "x\"y\\z\nw")], 1.5);
        assert_eq!(
            e.finish(),
            "# HELP m a \\\\ b\\nc\n# TYPE m gauge\nm{l=\"x\\\"y\\\\z\\nw\"} 1.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_micros(300); // 0.0003 s: first bucket
        h.observe_micros(2_000_000); // 2 s: bucket 2.5
        h.observe_micros(7_200_000_000); // 2 h: +Inf only
        let mut e = Encoder::default();
        e.histogram("lat_seconds", "help", &h.snapshot());
        let text = e.finish();
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(
            text.contains("lat_seconds_bucket{le=\"2.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"3600\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_count 3\n"), "{text}");
        assert!(text.contains("lat_seconds_sum 7202.0003\n"), "{text}");
    }
}
