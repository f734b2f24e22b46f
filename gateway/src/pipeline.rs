//! The pipeline, wired in one place: every channel is created here and every stage is
//! started here, in order, and stopped from the front.
//!
//! ```text
//! broker --local link--> ingest --RawMessage--> decode --Reading--> rules --Event--> local broker
//!                                                  |  \                  |  \
//!                                       dead letters   \                 |   event log
//!                                                        outbox (store) <-'
//!                                                             |
//!                                                         forwarder --> upstream
//!
//! decode --> device read model --\
//! rules  --> rules snapshot ------+--> http (metrics, API, status page; read-only)
//! counters, store stats, forwarder stats --/
//! ```
//!
//! Invariants:
//! - nothing binds a port or opens the database before the configuration is valid and
//!   the ports are known to be free;
//! - shutdown stops ingest first; each later stage ends when its input closes; the
//!   store commits what it holds and closes the file last; the whole drain is bounded
//!   by `gateway.shutdown_grace`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::{self, BrokerError};
use crate::config::{Config, ConfigErrors};
use crate::counters::Counters;
use crate::decode::DecodeStage;
use crate::devices::Devices;
use crate::forwarder::{Forwarder, ForwarderConfig, ForwarderError, ForwarderStats};
use crate::http::{self, HttpError, Sources};
use crate::ingest::{Ingest, RawMessage};
use crate::reading::{now_millis, Reading};
use crate::rules::{RulesStage, SharedRules};
use crate::store::{Counter, Store, StoreConfig, StoreError, StoreHandle};

/// Readings waiting for the rules stage.
const RULES_QUEUE: usize = 65_536;
/// Longest wait for open HTTP connections to finish at shutdown.
const HTTP_GRACE: Duration = Duration::from_secs(2);
/// How often the counters are logged while the gateway runs.
const STATUS_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("upstream: {0}")]
    Forwarder(#[from] ForwarderError),
    #[error("cannot start a pipeline thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] HttpError),
}

/// Runs the gateway until `shutdown` completes, then drains and closes it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    config.check_ports()?;
    let started_at = now_millis();
    let counters = Arc::new(Counters::default());
    let http_listener = match config.http.listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let store = Store::open(&config.storage.path, StoreConfig::from_config(&config))?;
    let views = Views::default();
    let running = match start(&config, counters.clone(), store.clone(), &views) {
        Ok(r) => r,
        Err(e) => {
            let _ = store.shutdown();
            return Err(e);
        }
    };
    let listeners = std::iter::once(config.broker.listen.to_string())
        .chain(config.broker.listen_v5.map(|a| format!("{a} (MQTT 5)")))
        .chain(config.broker.tls.as_ref().map(|t| match t.client_ca {
            Some(_) => format!("{} (TLS, client certificates required)", t.listen),
            None => format!("{} (TLS)", t.listen),
        }))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(
        gateway = %config.gateway.id,
        listen = %listeners,
        topics = %config.ingest.topic_pattern.filter(),
        storage = %config.storage.path.display(),
        upstream = %config.upstream.url.as_ref().map_or("off".to_string(), |u| u.to_string()),
        "Gateway is up."
    );

    let status = tokio::spawn(log_status(
        counters.clone(),
        store.clone(),
        running.forwarder_stats.clone(),
    ));
    let broker_listening = Arc::new(AtomicBool::new(true));
    let stop_http = CancellationToken::new();
    let http_server = http_listener.map(|listener| {
        let sources = Sources {
            gateway_id: config.gateway.id.clone(),
            started_at,
            counters: counters.clone(),
            store: store.clone(),
            forwarder: running.forwarder_stats.clone(),
            devices: views.devices.clone(),
            rules: views.rules.clone(),
            broker_listeners: broker_listeners(&config),
            auth: running.auth.clone(),
            broker_listening: broker_listening.clone(),
            ingest_samples: Default::default(),
        };
        tokio::spawn(http::serve(listener, sources, stop_http.clone()))
    });
    shutdown.await;
    status.abort();
    broker_listening.store(false, Ordering::Relaxed);
    tracing::info!(grace = ?config.gateway.shutdown_grace, "Shutting down.");
    match tokio::time::timeout(config.gateway.shutdown_grace, running.stop()).await {
        Ok(_) => tracing::info!(summary = %counters.summary(), "Gateway stopped."),
        Err(_) => tracing::warn!(
            summary = %counters.summary(),
            "Shutdown grace period over; exiting with the pipeline still draining (committed data is safe)."
        ),
    }
    stop_http.cancel();
    if let Some(mut server) = http_server {
        // Open keep-alive connections (a status page left open) must not hold the exit.
        match tokio::time::timeout(HTTP_GRACE, &mut server).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP server failed."),
            Ok(_) => {}
            Err(_) => server.abort(),
        }
    }
    Ok(())
}

/// Read models the stages keep for the HTTP server.
#[derive(Default)]
struct Views {
    devices: Arc<Devices>,
    rules: SharedRules,
}

fn broker_listeners(config: &Config) -> Vec<SocketAddr> {
    std::iter::once(config.broker.listen)
        .chain(config.broker.listen_v5)
        .chain(config.broker.tls.as_ref().map(|t| t.listen))
        .collect()
}

/// The running stages, in pipeline order.
struct Running {
    stop_ingest: Arc<AtomicBool>,
    ingest: JoinHandle<()>,
    decode: JoinHandle<()>,
    rules: JoinHandle<()>,
    forwarder: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    forwarder_stats: Option<Arc<ForwarderStats>>,
    /// Device authentication; `None` with anonymous access.
    auth: Option<Authenticator>,
    store: StoreHandle,
}

impl Running {
    /// Stops from the front and waits for each stage in turn.
    async fn stop(self) {
        let Running {
            stop_ingest,
            ingest,
            decode,
            rules,
            forwarder,
            store,
            ..
        } = self;
        stop_ingest.store(true, Ordering::Relaxed);
        let front = tokio::task::spawn_blocking(move || {
            let _ = ingest.join();
            let _ = decode.join();
            let _ = rules.join();
        });
        let _ = front.await;
        if let Some((cancel, task)) = forwarder {
            cancel.cancel();
            let _ = task.await;
        }
        let closed = tokio::task::spawn_blocking(move || store.shutdown()).await;
        if let Ok(Err(e)) = closed {
            tracing::error!(error = %e, "Closing the database failed.");
        }
    }
}

fn start(
    config: &Config,
    counters: Arc<Counters>,
    store: StoreHandle,
    views: &Views,
) -> Result<Running, RunError> {
    let forwarder = ForwarderConfig::from_config(config)
        .map(|cfg| Forwarder::new(cfg, store.clone()))
        .transpose()?;
    let links = broker::start(
        &config.broker,
        &config.auth,
        &config.ingest.topic_pattern,
        &config.rules,
    )?;
    let (_ingest_tx, ingest_rx) = links.ingest;
    let auth = links.auth;
    let forwarding = config.upstream.url.is_some();

    let (readings_tx, readings_rx) = flume::bounded::<Reading>(RULES_QUEUE);
    let rules = RulesStage {
        gateway_id: config.gateway.id.clone(),
        dir: config.rules.dir.clone(),
        input: readings_rx,
        store: store.clone(),
        publish: links.publish.0,
        event_topic: config.rules.event_topic.clone(),
        forward: forwarding,
        counters: counters.clone(),
        snapshot: views.rules.clone(),
    };
    let rules = std::thread::Builder::new()
        .name("rules".into())
        .spawn(move || rules.run())?;

    let (raw_tx, raw_rx) = flume::bounded::<RawMessage>(config.ingest.queue_capacity);
    let stop_ingest = Arc::new(AtomicBool::new(false));
    let ingest = Ingest::new(ingest_rx, raw_tx, counters.clone(), stop_ingest.clone());
    let ingest = std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || ingest.run())?;

    let decode = DecodeStage {
        pattern: config.ingest.topic_pattern.clone(),
        input: raw_rx,
        counters,
        store: store.clone(),
        forward_readings: forwarding && config.upstream.forward_readings,
        readings: Some(readings_tx),
        devices: views.devices.clone(),
    };
    let decode = std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || decode.run())?;

    let forwarder_stats = forwarder.as_ref().map(Forwarder::stats);
    let forwarder = forwarder.map(|f| {
        let cancel = CancellationToken::new();
        (cancel.clone(), tokio::spawn(f.run(cancel)))
    });
    Ok(Running {
        stop_ingest,
        ingest,
        decode,
        rules,
        forwarder,
        forwarder_stats,
        auth,
        store,
    })
}

async fn log_status(
    counters: Arc<Counters>,
    store: StoreHandle,
    forwarder: Option<Arc<ForwarderStats>>,
) {
    let mut last = String::new();
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let summary = counters.summary();
        let outbox = store.stats();
        if summary != last || outbox.storage_degraded() == 1 {
            tracing::info!(
                summary = %summary,
                outbox_depth = outbox.depth(),
                outbox_dropped = outbox.dropped(),
                storage_degraded = outbox.storage_degraded(),
                storage_errors = outbox.get(Counter::StorageErrors),
                outbox_refused_readings = outbox.get(Counter::DropRefusedReadings),
                outbox_refused_events = outbox.get(Counter::DropRefusedEvents),
                upstream_connected = forwarder.as_ref().is_some_and(|f| f.connected()),
                "Status."
            );
            last = summary;
        }
    }
}
