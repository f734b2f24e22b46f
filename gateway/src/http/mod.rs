//! The gateway's HTTP server (`http.listen`): Prometheus metrics, health and readiness
//! probes, a read-only JSON API and the status page.
//!
//! ```text
//! GET /            status page (one HTML file, inline CSS/JS, polls /api/status etc.)
//! GET /metrics     Prometheus text format 0.0.4          (metrics.rs, exposition.rs)
//! GET /healthz     200 while the process serves requests
//! GET /readyz      200 when the broker listens and the store is open, else 503
//! GET /api/status | /api/devices | /api/events | /api/outbox | /api/rules   (api.rs)
//! ```
//!
//! Inputs are read-only views shared with the pipeline ([`Sources`]): the pipeline
//! counters, the store's live stats and event log, the forwarder's stats, the device read
//! model and the rules snapshot. Nothing here writes to the pipeline.
//!
//! Invariants:
//! - a request never locks a pipeline stage: every source is atomics, a short-held
//!   snapshot mutex, or a redb read transaction (run on the blocking pool);
//! - upstream being offline is a normal state: reported, never "not ready";
//! - the server runs on the gateway's tokio runtime and stops when its cancellation token
//!   (a child of the pipeline's) is cancelled, at most `DRAIN_MAX` later.

mod api;
mod exposition;
mod metrics;
mod process;

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::counters::Counters;
use crate::devices::Devices;
use crate::forwarder::ForwarderStats;
use crate::reading::Millis;
use crate::rules::SharedRules;
use crate::store::StoreHandle;

pub use exposition::{Encoder, Family, Kind, Label, Labels};
pub use metrics::render as render_metrics;
pub use process::resident_memory_bytes;

/// The status page, served at `/`.
const STATUS_PAGE: &str = include_str!("status.html");
/// How often the ingest counter is sampled for the ingest rate, and how many samples the
/// rate spans (a 10 s window).
const RATE_SAMPLE: Duration = Duration::from_secs(1);
const RATE_SAMPLES: usize = 11;
/// Longest wait for open connections to finish once the server is told to stop.
const DRAIN_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Everything the server reads; cheap to clone.
#[derive(Clone)]
pub struct Sources {
    pub gateway_id: String,
    /// Unix ms when the gateway started.
    pub started_at: Millis,
    pub counters: Arc<Counters>,
    pub store: StoreHandle,
    /// `None` when forwarding is off.
    pub forwarder: Option<Arc<ForwarderStats>>,
    /// `None` when forwarding is off (commands come from upstream).
    pub downlink: Option<Arc<crate::downlink::DownlinkStats>>,
    /// `None` with `rules.device_events = false`.
    pub device_events: Option<Arc<crate::device_events::DeviceEventStats>>,
    pub devices: Arc<Devices>,
    pub rules: SharedRules,
    /// The broker's MQTT listeners (to count connected devices).
    pub broker_listeners: Vec<SocketAddr>,
    /// Device authentication; `None` with anonymous access.
    pub auth: Option<crate::broker::auth::Authenticator>,
    /// True once the broker accepts connections, false again when shutdown begins.
    pub broker_listening: Arc<AtomicBool>,
    /// Samples of the ingest counter, for the ingest rate (filled by [`serve`]).
    pub ingest_samples: Arc<Mutex<VecDeque<(Instant, u64)>>>,
}

impl Sources {
    /// `connected`, `offline`, or `off` when no upstream is configured.
    pub fn upstream_state(&self) -> &'static str {
        match &self.forwarder {
            None => "off",
            Some(f) if f.connected() => "connected",
            Some(_) => "offline",
        }
    }

    /// Messages ingested per second over the last samples (up to 10 s); 0 until two
    /// samples exist.
    pub fn ingest_rate(&self) -> f64 {
        let Ok(samples) = self.ingest_samples.lock() else {
            return 0.0;
        };
        match (samples.front(), samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    fn sample_ingest(&self) {
        let n = Counters::get(&self.counters.ingested);
        if let Ok(mut samples) = self.ingest_samples.lock() {
            samples.push_back((Instant::now(), n));
            while samples.len() > RATE_SAMPLES {
                samples.pop_front();
            }
        }
    }

    fn ready(&self) -> (bool, serde_json::Value) {
        let broker = self.broker_listening.load(Ordering::Relaxed);
        let store = self.store.database().is_ok();
        let body = json!({
            "broker": if broker { "listening" } else { "not_listening" },
            "store": if store { "open" } else { "closed" },
            "upstream": self.upstream_state(),
        });
        (broker && store, body)
    }
}

/// The routes of the server.
pub fn router(sources: Sources) -> Router {
    Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api::routes())
        .with_state(sources)
}

/// Binds `addr` (before the pipeline starts, so a taken port fails early).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| HttpError::Bind(addr, e))
}

/// Serves until `shutdown` is cancelled, then lets open requests finish for at most
/// `DRAIN_MAX`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "HTTP server is up.");
    }
    let sampled = sources.clone();
    let sample = async move {
        let mut tick = tokio::time::interval(RATE_SAMPLE);
        loop {
            tick.tick().await;
            sampled.sample_ingest();
        }
    };
    let stopped = shutdown.clone();
    let served = axum::serve(listener, router(sources))
        .with_graceful_shutdown(async move { stopped.cancelled().await })
        .into_future();
    // Open keep-alive connections (a status page left open) must not hold the exit.
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_MAX).await;
    };
    tokio::select! {
        served = served => served.map_err(HttpError::Serve),
        // The sampler loops for ever: only the other two branches end the server.
        () = sample => Ok(()),
        () = drained => {
            tracing::debug!("HTTP connections still open; the server stops without them.");
            Ok(())
        }
    }
}

async fn metrics_handler(axum::extract::State(sources): axum::extract::State<Sources>) -> Response {
    let body = metrics::render(&sources);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn readyz(axum::extract::State(sources): axum::extract::State<Sources>) -> Response {
    let (ready, body) = sources.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
