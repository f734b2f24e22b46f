//! The pipeline, wired in one place: every channel is created here and every stage is
//! started here, in order, and stopped from the front.
//!
//! ```text
//! broker --local link--> ingest --RawMessage--> decode --Reading--> (rules)
//!                                                  |  \
//!                                       dead letters  outbox (store) --> forwarder --> upstream
//! ```
//!
//! Invariants:
//! - nothing binds a port or opens the database before the configuration is valid and
//!   the ports are known to be free;
//! - shutdown stops ingest first; each later stage ends when its input closes; the
//!   store commits what it holds and closes the file last; the whole drain is bounded
//!   by `gateway.shutdown_grace`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::broker::{self, BrokerError};
use crate::config::{Config, ConfigErrors};
use crate::counters::Counters;
use crate::decode::DecodeStage;
use crate::ingest::{Ingest, RawMessage};
use crate::store::{Store, StoreConfig, StoreError, StoreHandle};

/// Topic filter the gateway's own events are published under on the local broker.
pub const EVENTS_FILTER: &str = "events/#";
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
    #[error("cannot start a pipeline thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The outbox settings of a configuration.
pub fn store_config(config: &Config) -> StoreConfig {
    StoreConfig {
        flush_interval: config.storage.flush_interval,
        max_bytes: config.storage.max_bytes,
        max_age: Some(config.storage.max_age).filter(|d| !d.is_zero()),
        dead_letter_max: config.storage.dead_letter_max as u64,
        ..StoreConfig::default()
    }
}

/// Runs the gateway until `shutdown` completes, then drains and closes it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    config.check_ports()?;
    let counters = Arc::new(Counters::default());
    let store = Store::open(&config.storage.path, store_config(&config))?;
    let running = start(&config, counters.clone(), store.clone());
    let running = match running {
        Ok(r) => r,
        Err(e) => {
            let _ = store.shutdown();
            return Err(e);
        }
    };
    let listeners = std::iter::once(config.broker.listen.to_string())
        .chain(config.broker.listen_v5.map(|a| format!("{a} (MQTT 5)")))
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

    let status = tokio::spawn(log_status(counters.clone()));
    shutdown.await;
    status.abort();
    tracing::info!(grace = ?config.gateway.shutdown_grace, "Shutting down.");
    let drain = tokio::task::spawn_blocking(move || running.stop());
    match tokio::time::timeout(config.gateway.shutdown_grace, drain).await {
        Ok(_) => tracing::info!(summary = %counters.summary(), "Gateway stopped."),
        Err(_) => tracing::warn!(
            summary = %counters.summary(),
            "Shutdown grace period over; exiting with the pipeline still draining (committed data is safe)."
        ),
    }
    Ok(())
}

/// The running stages, in pipeline order.
struct Running {
    stop_ingest: Arc<AtomicBool>,
    ingest: JoinHandle<()>,
    decode: JoinHandle<()>,
    store: StoreHandle,
}

impl Running {
    /// Stops from the front and waits for each stage in turn.
    fn stop(self) {
        self.stop_ingest.store(true, Ordering::Relaxed);
        let _ = self.ingest.join();
        let _ = self.decode.join();
        if let Err(e) = self.store.shutdown() {
            tracing::error!(error = %e, "Closing the database failed.");
        }
    }
}

fn start(
    config: &Config,
    counters: Arc<Counters>,
    store: StoreHandle,
) -> Result<Running, RunError> {
    let filter = config.ingest.topic_pattern.filter();
    let links = broker::start(&config.broker, &filter, EVENTS_FILTER)?;
    let (_ingest_tx, ingest_rx) = links.ingest;

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
        forward_readings: config.upstream.url.is_some() && config.upstream.forward_readings,
        readings: None,
    };
    let decode = std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || decode.run())?;
    Ok(Running {
        stop_ingest,
        ingest,
        decode,
        store,
    })
}

async fn log_status(counters: Arc<Counters>) {
    let mut last = String::new();
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let summary = counters.summary();
        if summary != last {
            tracing::info!(summary = %summary, "Status.");
            last = summary;
        }
    }
}
