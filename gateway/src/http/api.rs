//! The read-only JSON API under `/api/`: the status summary the status page polls, the
//! device read model, the event log, the outbox and the rules. Every response is a JSON
//! object; the README documents each with an example.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};

use super::Sources;
use crate::counters::Counters;
use crate::reading::now_millis;
use crate::store::{LaneStats, StoreError};

/// Events returned when `limit` is not given, and the most ever returned.
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 1000;
/// Queued downlink commands read for `/api/devices`, at most.
const MAX_PENDING_READ: usize = 100_000;

pub fn routes() -> Router<Sources> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/devices", get(devices))
        .route("/api/events", get(events))
        .route("/api/outbox", get(outbox))
        .route("/api/rules", get(rules))
}

fn lane_json(l: &LaneStats) -> JsonValue {
    json!({
        "messages": l.messages,
        "bytes": l.bytes,
        "oldest_received_at": l.oldest_received_at,
        "oldest_age_seconds": l.oldest_age_ms.unwrap_or(0) as f64 / 1000.0,
    })
}

async fn status(State(s): State<Sources>) -> Json<JsonValue> {
    let c = &s.counters;
    let outbox = s.store.stats();
    let rules = s.rules.get();
    let now = now_millis();
    let oldest = outbox.oldest_age_ms().unwrap_or(0);
    Json(json!({
        "gateway_id": s.gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "now": now,
        "uptime_seconds": (now - s.started_at).max(0) / 1000,
        "upstream": {
            "state": s.upstream_state(),
            "url": s.forwarder.as_ref().and_then(|f| f.current_url()),
            "forwarded": s.forwarder.as_ref().map_or(0, |f| Counters::get(&f.rows_acked)),
            "window": s.forwarder.as_ref().map_or(0, |f| f.window()),
        },
        "ingest": {
            "messages": Counters::get(&c.ingested),
            "rate_per_second": s.ingest_rate(),
            "decoded": c.decoded_total(),
            "readings": Counters::get(&c.readings),
            "dead_letters": c.dead_lettered_total(),
            "unrouted": Counters::get(&c.unrouted),
            "queued": Counters::get(&c.intake_queued),
            "backpressure_seconds": Counters::get(&c.blocked_micros) as f64 / 1e6,
        },
        "outbox": {
            "messages": outbox.depth(),
            "bytes": outbox.bytes(),
            "oldest_age_seconds": oldest as f64 / 1000.0,
            "dropped": outbox.dropped(),
        },
        "devices": s.devices.len(),
        "firing": rules.instances.iter().filter(|i| i.state == "firing").count(),
    }))
}

async fn devices(State(s): State<Sources>) -> Json<JsonValue> {
    let rules = s.rules.get();
    // Queued downlink commands per device, also of devices the read model does not hold.
    let mut pending: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(queue) = s.store.pending_commands(None, MAX_PENDING_READ) {
        for c in queue {
            *pending.entry(c.device).or_default() += 1;
        }
    }
    let list: Vec<JsonValue> = s
        .devices
        .list()
        .into_iter()
        .map(|d| {
            let firing: Vec<JsonValue> = rules
                .firing(&d.device)
                .map(|i| json!({"rule": i.rule, "event": i.event, "severity": i.severity, "since": i.since}))
                .collect();
            let mut v = serde_json::to_value(&d).unwrap_or_default();
            v["firing"] = JsonValue::Array(firing);
            v["pending_commands"] = json!(pending.get(&d.device).copied().unwrap_or(0));
            if let Some(presence) = &s.device_events {
                let since = presence.connected_since(&d.device);
                v["connected"] = json!(since.is_some());
                v["connected_since"] = json!(since);
            }
            v
        })
        .collect();
    Json(json!({ "count": list.len(), "devices": list, "pending_commands": pending }))
}

/// `GET /api/events` parameters.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Unix milliseconds or an RFC 3339 time; default: the beginning.
    since: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

fn unavailable(e: StoreError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": e.to_string() })),
    )
        .into_response()
}

fn parse_since(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| {
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp_millis())
    })
}

async fn events(State(s): State<Sources>, Query(q): Query<EventsQuery>) -> Response {
    let since = match q.since.as_deref().filter(|t| !t.is_empty()) {
        None => 0,
        Some(text) => match parse_since(text) {
            Some(ms) => ms,
            None => {
                return bad_request(format!(
                    "since: '{text}' is neither Unix milliseconds nor an RFC 3339 time"
                ))
            }
        },
    };
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS).clamp(1, MAX_EVENTS);
    let store = s.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        store.query_events(
            since,
            q.event_type.as_deref().filter(|t| !t.is_empty()),
            q.device.as_deref().filter(|d| !d.is_empty()),
            limit,
        )
    })
    .await;
    let logged = match found {
        Ok(Ok(events)) => events,
        Ok(Err(e)) => return unavailable(e),
        Err(_) => return unavailable(StoreError::Closed),
    };
    let events: Vec<JsonValue> = logged
        .iter()
        .map(|e| {
            serde_json::from_slice(&e.json).unwrap_or_else(
                |_| json!({"type": e.event_type, "subject": e.device, "time": e.time}),
            )
        })
        .collect();
    Json(json!({ "count": events.len(), "events": events })).into_response()
}

async fn outbox(State(s): State<Sources>) -> Json<JsonValue> {
    let o = s.store.stats();
    let dropped: BTreeMap<String, u64> = o
        .counters
        .iter()
        .filter_map(|(c, v)| c.drop_reason().map(|reason| (reason, *v)))
        .collect();
    let counters: BTreeMap<&str, u64> = o.counters.iter().map(|(c, v)| (c.name(), *v)).collect();
    Json(json!({
        "messages": o.depth(),
        "bytes": o.bytes(),
        "lanes": o.lanes.iter().map(|(lane, l)| (lane.as_str(), lane_json(l))).collect::<BTreeMap<_, _>>(),
        "dropped": dropped,
        "commits": o.commits,
        "last_commit_micros": o.last_commit_micros,
        "max_commit_micros": o.max_commit_micros,
        "counters": counters,
    }))
}

async fn rules(State(s): State<Sources>) -> Json<JsonValue> {
    let snapshot = s.rules.get();
    let events: Vec<JsonValue> = snapshot
        .events
        .iter()
        .map(|((t, state), n)| json!({"type": t, "state": state, "count": n}))
        .collect();
    let mut v = serde_json::to_value(&snapshot).unwrap_or_default();
    v["events"] = JsonValue::Array(events);
    Json(v)
}
