//! `/metrics`: the gateway's metric families, written with the [`Encoder`] of
//! [`super::exposition`].
//!
//! Input: [`Sources`]; output: the text of one scrape. The metric names, label names and
//! label values are a contract with the dashboards and alert rules in `ops/`
//! (`ops/metrics.txt`, the README's metric list).
//!
//! Invariants:
//! - each family is declared once, here, with its label type: [`Lane`] (`lane`),
//!   [`Format`] and `Option<Format>` (`format`, `unknown` for none), [`DropReason`],
//!   [`AuthRefusal`] (`reason`), [`EventType`] and [`EventState`], [`RuleName`] and
//!   [`ActionOn`], [`WebhookResult`] (`outcome`), [`Version`], `Url`, [`CommandState`] (`state`), `DisconnectReason`
//!   (`reason`);
//! - per-lane and per-format figures are read through their [`Lane`] or [`Format`], never
//!   by position;
//! - one snapshot of the store's counters serves the outbox and storage families, so a
//!   scrape is consistent across them.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use super::exposition::{Encoder, Kind, Label};
use super::{process, Sources};
use crate::broker::auth::AuthStats;
use crate::counters::Counters;
use crate::reading::Format;
use crate::rules::WebhookResult;
use crate::store::{CommandState, Counter, Lane, OutboxStats};

impl Label for Lane {
    const NAME: &'static str = "lane";
    fn value(&self) -> Cow<'_, str> {
        self.as_str().into()
    }
}

/// Why a device's connection ended.
impl Label for rumqttd::DisconnectReason {
    const NAME: &'static str = "reason";
    fn value(&self) -> Cow<'_, str> {
        self.as_str().into()
    }
}

impl Label for CommandState {
    const NAME: &'static str = "state";
    fn value(&self) -> Cow<'_, str> {
        self.as_str().into()
    }
}

impl Label for Format {
    const NAME: &'static str = "format";
    fn value(&self) -> Cow<'_, str> {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::SenmlJson => "senml_json",
            Format::SenmlCbor => "senml_cbor",
        }
        .into()
    }
}

/// The format a dead letter was taken for; `unknown` when none was recognised.
impl Label for Option<Format> {
    const NAME: &'static str = "format";
    fn value(&self) -> Cow<'_, str> {
        match self {
            Some(format) => format.value(),
            None => "unknown".into(),
        }
    }
}

/// Why outbox rows or store commands were dropped: a `drop.*` [`Counter`].
pub struct DropReason(String);

impl Label for DropReason {
    const NAME: &'static str = "reason";
    fn value(&self) -> Cow<'_, str> {
        self.0.as_str().into()
    }
}

/// Why authentication refused a device's CONNECT.
#[derive(Debug, Clone, Copy)]
pub enum AuthRefusal {
    ClientId,
    UnknownDevice,
    Password,
    Busy,
}

impl AuthRefusal {
    const ALL: [AuthRefusal; 4] = [
        AuthRefusal::ClientId,
        AuthRefusal::UnknownDevice,
        AuthRefusal::Password,
        AuthRefusal::Busy,
    ];

    fn count(self, a: &AuthStats) -> &AtomicU64 {
        match self {
            AuthRefusal::ClientId => &a.refused_client_id,
            AuthRefusal::UnknownDevice => &a.refused_unknown,
            AuthRefusal::Password => &a.refused_password,
            AuthRefusal::Busy => &a.refused_busy,
        }
    }
}

impl Label for AuthRefusal {
    const NAME: &'static str = "reason";
    fn value(&self) -> Cow<'_, str> {
        match self {
            AuthRefusal::ClientId => "client_id",
            AuthRefusal::UnknownDevice => "unknown_device",
            AuthRefusal::Password => "password",
            AuthRefusal::Busy => "busy",
        }
        .into()
    }
}

/// The type of an event, as its rule names it.
pub struct EventType<'a>(&'a str);

impl Label for EventType<'_> {
    const NAME: &'static str = "type";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

/// `firing` or `resolved`.
pub struct EventState(&'static str);

impl Label for EventState {
    const NAME: &'static str = "state";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

/// The name of a rule.
pub struct RuleName<'a>(&'a str);

impl Label for RuleName<'_> {
    const NAME: &'static str = "rule";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

/// The transition an action runs on: `firing` or `resolved`.
pub struct ActionOn(&'static str);

impl Label for ActionOn {
    const NAME: &'static str = "on";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

/// How a webhook call ended (`ok`, `http_error`, `timeout`, `error`, `dropped`).
impl Label for WebhookResult {
    const NAME: &'static str = "outcome";
    fn value(&self) -> Cow<'_, str> {
        self.as_str().into()
    }
}

/// The gateway's version.
pub struct Version(&'static str);

impl Label for Version {
    const NAME: &'static str = "version";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

fn get(counter: &AtomicU64) -> f64 {
    Counters::get(counter) as f64
}

/// Renders one scrape.
pub fn render(s: &Sources) -> String {
    let mut e = Encoder::default();
    e.family(
        "gateway_build_info",
        "Build of the running gateway.",
        Kind::Gauge,
    )
    .sample(Version(env!("CARGO_PKG_VERSION")), 1.0);
    pipeline(&mut e, s);
    let store = s.store.stats();
    outbox(&mut e, &store);
    upstream(&mut e, s);
    if let Some(n) = process::established_connections(&s.broker_listeners) {
        e.family(
            "gateway_connected_devices",
            "Established MQTT connections on the broker's listeners.",
            Kind::Gauge,
        )
        .value(n as f64);
    }
    e.family(
        "gateway_broker_messages_lost_total",
        "Messages the embedded broker did not deliver to a subscriber (a persistent session offline, or a slow subscriber) because its in-memory log of the filter (broker.segment_bytes x (broker.segment_count + 1)) had moved past them.",
        Kind::Counter,
    )
    .value(rumqttd::forwards_lost() as f64);
    e.family(
        "gateway_broker_log_bytes",
        "Bytes (topic and payload) of the messages the embedded broker holds in its in-memory logs for subscribers, at most broker.segment_bytes x (broker.segment_count + 1) per subscription filter; a filter that no connection and no saved session subscribes to holds none.",
        Kind::Gauge,
    )
    .value(rumqttd::log_bytes() as f64);
    storage(&mut e, &store);
    commands(&mut e, s, &store);
    device_events(&mut e, s.device_events.as_deref());
    if let Some(auth) = &s.auth {
        auth_families(&mut e, auth.stats());
    }
    process_families(&mut e, s);
    e.finish()
}

/// Ingest, decode and rules.
fn pipeline(e: &mut Encoder, s: &Sources) {
    let c = &s.counters;
    e.family(
        "gateway_messages_ingested_total",
        "MQTT messages devices published to the embedded broker.",
        Kind::Counter,
    )
    .value(get(&c.ingested));
    e.family(
        "gateway_unrouted_total",
        "Publishes on topics outside ingest.topic_pattern (kept as dead letters).",
        Kind::Counter,
    )
    .value(get(&c.unrouted));
    e.family(
        "gateway_ingest_queued",
        "Publishes waiting between the broker's connections and the decode stage.",
        Kind::Gauge,
    )
    .value(get(&c.intake_queued));
    e.family(
        "gateway_backpressure_seconds_total",
        "Time the hand-off to the decode stage stayed full (devices are slowed meanwhile).",
        Kind::Counter,
    )
    .value(get(&c.blocked_micros) / 1e6);
    let mut decoded = e.family(
        "gateway_messages_decoded_total",
        "Messages decoded, by payload format.",
        Kind::Counter,
    );
    for (format, n) in c.decoded.iter() {
        decoded.sample(format, get(n));
    }
    let mut readings = e.family(
        "gateway_readings_decoded_total",
        "Readings decoded (a SenML pack holds several), by payload format.",
        Kind::Counter,
    );
    for (format, n) in c.readings_by_format.iter() {
        readings.sample(format, get(n));
    }
    let mut dead = e.family(
        "gateway_dead_letters_total",
        "Messages that did not decode, by payload format (unknown when none was recognised).",
        Kind::Counter,
    );
    for format in Format::ALL.map(Some).into_iter().chain([None]) {
        dead.sample(format, get(c.dead_lettered_as(format)));
    }
    e.family(
        "gateway_rule_evaluations_total",
        "Rule conditions evaluated.",
        Kind::Counter,
    )
    .value(get(&c.rule_evaluations));
    let rules = s.rules.get();
    let mut events = e.family(
        "gateway_events_total",
        "Events emitted by rules, by event type and state (firing or resolved).",
        Kind::Counter,
    );
    for ((event_type, state), n) in &rules.events {
        events.sample((EventType(event_type), EventState(state)), *n as f64);
    }
    let mut actions = e.family(
        "gateway_rule_actions_total",
        "Rule actions published on the embedded broker, by rule and transition (firing or resolved).",
        Kind::Counter,
    );
    for ((rule, on), n) in &rules.actions {
        actions.sample((RuleName(rule), ActionOn(on)), *n as f64);
    }
    let mut failed = e.family(
        "gateway_rule_action_failures_total",
        "Rule actions the embedded broker did not take, by rule and transition.",
        Kind::Counter,
    );
    for ((rule, on), n) in &rules.action_failures {
        failed.sample((RuleName(rule), ActionOn(on)), *n as f64);
    }
    let mut webhooks = e.family(
        "gateway_rule_webhooks_total",
        "Webhook calls of rule actions by rule and final outcome (every outcome is shown, from 0, for a rule once it made a call).",
        Kind::Counter,
    );
    let called: std::collections::BTreeSet<&str> = rules
        .webhooks
        .keys()
        .map(|(rule, _)| rule.as_str())
        .collect();
    for rule in called {
        for outcome in WebhookResult::ALL {
            let n = rules.webhooks.get(&(rule.to_string(), outcome));
            webhooks.sample((RuleName(rule), outcome), n.copied().unwrap_or(0) as f64);
        }
    }
}

fn outbox(e: &mut Encoder, stats: &OutboxStats) {
    let mut messages = e.family(
        "gateway_outbox_messages",
        "Messages waiting in the outbox, by lane.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        messages.sample(lane, l.messages as f64);
    }
    let mut bytes = e.family(
        "gateway_outbox_bytes",
        "Bytes waiting in the outbox (keys and rows), by lane.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        bytes.sample(lane, l.bytes as f64);
    }
    let mut oldest = e.family(
        "gateway_outbox_oldest_age_seconds",
        "Age of the oldest message in the outbox, by lane; 0 when the lane is empty.",
        Kind::Gauge,
    );
    for (lane, l) in stats.lanes.iter() {
        oldest.sample(lane, l.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
    }
    let mut dropped = e.family(
        "gateway_outbox_dropped_total",
        "Outbox rows and store commands dropped, by reason.",
        Kind::Counter,
    );
    for (counter, n) in &stats.counters {
        if let Some(reason) = counter.drop_reason() {
            dropped.sample(DropReason(reason), *n as f64);
        }
    }
    e.histogram(
        "gateway_store_commit_seconds",
        "Duration of the store's group commits (a journal record, synced).",
        &stats.commit_seconds,
    );
    e.histogram(
        "gateway_store_checkpoint_seconds",
        "Duration of the store's checkpoints (the journaled groups committed to the database file).",
        &stats.checkpoint_seconds,
    );
}

/// One URL of `upstream.url`.
struct Url<'a>(&'a str);

impl Label for Url<'_> {
    const NAME: &'static str = "url";
    fn value(&self) -> Cow<'_, str> {
        self.0.into()
    }
}

fn upstream(e: &mut Encoder, s: &Sources) {
    let f = s.forwarder.as_deref();
    if let Some(f) = f {
        let current = f.current_url();
        let mut urls = e.family(
            "gateway_upstream_url",
            "1 for the URL of upstream.url in use (connected, or being tried while offline), 0 for the others of the list.",
            Kind::Gauge,
        );
        for url in &f.urls {
            urls.sample(Url(url), if current == Some(url) { 1.0 } else { 0.0 });
        }
    }
    e.family(
        "gateway_upstream_connected",
        "1 while connected to the upstream broker, else 0 (also 0 when forwarding is off).",
        Kind::Gauge,
    )
    .value(if f.is_some_and(|f| f.connected()) {
        1.0
    } else {
        0.0
    });
    e.family(
        "gateway_upstream_window",
        "Publishes allowed in flight upstream on the current (or last) connection: upstream.max_inflight, and over MQTT 5 the broker's Receive Maximum; 0 before the first connection.",
        Kind::Gauge,
    )
    .value(f.map_or(0.0, |f| f.window() as f64));
    e.family(
        "gateway_upstream_reconnects_total",
        "Connections to the upstream broker established after the first one.",
        Kind::Counter,
    )
    .value(f.map_or(0.0, |f| (get(&f.connects) - 1.0).max(0.0)));
    let mut forwarded = e.family(
        "gateway_upstream_forwarded_total",
        "Outbox rows acknowledged by the upstream broker, by lane.",
        Kind::Counter,
    );
    for lane in Lane::ALL {
        forwarded.sample(lane, f.map_or(0.0, |f| get(&f.acked_by_lane[lane])));
    }
    let latency = f.map(|f| f.latency.snapshot()).unwrap_or_default();
    e.histogram(
        "gateway_forward_latency_seconds",
        "Time from a message's arrival in the outbox to the upstream PUBACK.",
        &latency,
    );
}

/// Storage health: degraded while the database cannot be written (full disk, I/O errors).
fn storage(e: &mut Encoder, stats: &OutboxStats) {
    e.family(
        "gateway_storage_degraded",
        "1 while the database cannot be written and the outbox refuses new entries.",
        Kind::Gauge,
    )
    .value(stats.storage_degraded() as f64);
    e.family(
        "gateway_storage_errors_total",
        "Writes to the database that failed.",
        Kind::Counter,
    )
    .value(stats.get(Counter::StorageErrors) as f64);
    let mut refused = e.family(
        "gateway_outbox_refused_total",
        "Entries refused while the storage was degraded, by lane.",
        Kind::Counter,
    );
    for lane in Lane::ALL {
        refused.sample(lane, stats.get(Counter::refused(lane)) as f64);
    }
}

/// Downlink commands: the queues in the store, and what the downlink stage counts.
fn commands(e: &mut Encoder, s: &Sources, stats: &OutboxStats) {
    e.family(
        "gateway_commands_pending",
        "Downlink commands queued for their devices.",
        Kind::Gauge,
    )
    .value(stats.get(Counter::CommandsPending) as f64);
    let mut states = e.family(
        "gateway_commands_total",
        "Downlink commands by the state they reached (queued, delivered, expired, dropped).",
        Kind::Counter,
    );
    for (state, c) in [
        (CommandState::Queued, Counter::CommandsQueued),
        (CommandState::Delivered, Counter::CommandsDelivered),
        (CommandState::Expired, Counter::CommandsExpired),
        (CommandState::Dropped, Counter::CommandsDropped),
    ] {
        states.sample(state, stats.get(c) as f64);
    }
    e.family(
        "gateway_commands_unroutable_total",
        "Commands received upstream on a topic that names no device and command (dropped).",
        Kind::Counter,
    )
    .value(s.downlink.as_ref().map_or(0.0, |d| get(&d.unroutable)));
}

/// Devices' connects and disconnects (`rules.device_events`; all 0 while it is off).
fn device_events(e: &mut Encoder, stats: Option<&crate::device_events::DeviceEventStats>) {
    e.family(
        "gateway_device_connects_total",
        "DeviceConnected events: device connections the embedded broker accepted.",
        Kind::Counter,
    )
    .value(stats.map_or(0, |s| s.connects()) as f64);
    let mut ends = e.family(
        "gateway_device_disconnects_total",
        "DeviceDisconnected events, by reason (clean, taken_over, lost, keep_alive_expired, not_authorized, protocol_error, error).",
        Kind::Counter,
    );
    for reason in rumqttd::DisconnectReason::ALL {
        ends.sample(reason, stats.map_or(0, |s| s.disconnects(reason)) as f64);
    }
    e.family(
        "gateway_device_reports_dropped_total",
        "Connects and disconnects the embedded broker could not report because the device-events queue was full (no event for them).",
        Kind::Counter,
    )
    .value(stats.map_or(0, |s| s.dropped()) as f64);
}

/// Device authentication; only when `auth.anonymous = false`.
fn auth_families(e: &mut Encoder, a: &AuthStats) {
    let mut refused = e.family(
        "gateway_auth_failures_total",
        "Device CONNECTs refused by authentication, by reason.",
        Kind::Counter,
    );
    for reason in AuthRefusal::ALL {
        refused.sample(reason, get(reason.count(a)));
    }
    e.family(
        "gateway_auth_accepted_total",
        "Device CONNECTs accepted by authentication.",
        Kind::Counter,
    )
    .value(get(&a.accepted));
}

/// The standard `process_*` families.
fn process_families(e: &mut Encoder, s: &Sources) {
    if let Some(rss) = process::resident_memory_bytes() {
        e.family(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            Kind::Gauge,
        )
        .value(rss as f64);
    }
    if let Some(cpu) = process::cpu_seconds() {
        e.family(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            Kind::Counter,
        )
        .value(cpu);
    }
    e.family(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        Kind::Gauge,
    )
    .value(s.started_at as f64 / 1000.0);
}
