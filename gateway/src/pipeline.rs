//! The pipeline, wired in one place: every channel is created here and every stage is
//! started here, from the back (each consumer before its producer), and stopped from the
//! front.
//!
//! ```text
//! broker --local link--> ingest --RawMessage--> decode --Reading--> rules --Event--> local broker
//!                                  (on the store's thread, before each commit: decode, then rules)
//!                                                  |  \                  |  \
//!                                       dead letters   \                 |   event log
//!                                                        outbox (store) <-'
//!                                                             |
//!                                                         forwarder <--> upstream
//!                                                             | commands
//!                                                             v
//! devices <--own connection-- downlink --> command queue (store) + status events (outbox)
//!
//! broker connections --reports--> device events --Event--> local broker, event log, outbox
//!
//! rules --webhook calls (bounded, never waits)--> webhooks task --HTTP POST--> endpoints
//!
//! decode --> device read model --\
//! rules  --> rules snapshot ------+--> http (metrics, API, status page; read-only)
//! counters, store stats, forwarder stats --/
//! ```
//!
//! Start: the HTTP port is bound and the store opens, then the broker with its local
//! links; then the forwarder and webhook tasks, the device-events thread and the decode
//! stage (which also runs the rules), handed to the store's thread as its feed
//! (`store/feed.rs`); then the status logger and the HTTP server.
//!
//! Stop: one [`CancellationToken`] tree, owned by [`run`]. Its child `front` is cancelled
//! when the `shutdown` future completes; the root once the front has drained:
//! 1. `front`: the device-events thread and the status logger stop; `/readyz` turns 503;
//!    the store is told to end its feed ([`StoreHandle::end_feed`]): decode takes what the
//!    broker's hand-off holds at that moment and no more.
//! 2. Decode ends once that is handled, after the rules evaluated the last batch and saved
//!    their state (all on the store's thread, into its next commit). That is the drain: no
//!    stage is told to stop while data is still queued in front of it.
//! 3. The root: the forwarder (a child token) waits for the PUBACKs in flight and stops,
//!    handing its last acks to the store; the downlink stops (commands not committed yet
//!    were not acked upstream); the HTTP server (a child token) stops accepting. The
//!    webhook task finishes the calls the rules stage handed over, for at most
//!    [`WEBHOOK_DRAIN`] (within the grace); then they are abandoned and recorded as they are.
//! 4. The store commits everything queued and closes the file. It is stopped by a command
//!    on its own channel rather than a token, so the stop is ordered after every command
//!    sent before it (see the store's module header).
//!
//! Invariants:
//! - nothing binds a port or opens the database before the configuration is valid and
//!   the ports are known to be free;
//! - the stop is bounded by `gateway.shutdown_grace`: steps 1 to 3 share one deadline,
//!   and closing the store gets at least `STORE_CLOSE_MIN` after it, so what the stages
//!   handed over is committed even when a stage is stuck (decode and the rules excepted:
//!   they run on the store's thread, and only the broker's local link can hold them, for
//!   their events); a stage still running then is
//!   left behind (named in the log, [`RunError::GraceExpired`]); `run` never leaves work on
//!   the blocking pool, so returning from it does not wait for a stuck stage;
//! - `run` waits for the stage threads without blocking a runtime worker
//!   (`stage_threads.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::auth::Authenticator;
use crate::broker::{self, BrokerError};
use crate::config::{Config, ConfigErrors};
use crate::counters::Counters;
use crate::decode::DecodeStage;
use crate::device_events::{DeviceEventStats, DeviceEvents};
use crate::devices::Devices;
use crate::downlink::{ActionQueue, Downlink, DownlinkConfig, DownlinkStats};
use crate::forwarder::{Forwarder, ForwarderConfig, ForwarderError, ForwarderStats};
use crate::http::{self, HttpError, Sources};
use crate::ingest::Intake;
use crate::memory::Trim;
use crate::reading::{now_millis, Millis};
use crate::rules::{RulesStage, SharedRules};
use crate::stage_threads::StageThreads;
use crate::store::{Counter, Store, StoreConfig, StoreError, StoreHandle};
use crate::webhook::{self, WEBHOOK_QUEUE};

/// How often the counters are logged while the gateway runs.
const STATUS_INTERVAL: Duration = Duration::from_secs(60);
/// Least time given to closing the store, even when the drain used up the grace.
const STORE_CLOSE_MIN: Duration = Duration::from_millis(500);
/// Longest wait for webhook calls in progress or queued once the rules stage has stopped.
pub const WEBHOOK_DRAIN: Duration = Duration::from_secs(1);

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
    /// The stop took longer than `gateway.shutdown_grace`; these stages were left running.
    #[error(
        "the shutdown grace period ({}) ran out with {} still running",
        humantime::format_duration(*.grace),
        .still_running.join(", ")
    )]
    GraceExpired {
        grace: Duration,
        still_running: Vec<String>,
    },
}

/// A fault injected into a real gateway by the test that the shutdown grace holds (the
/// binary reads it from `GATEWAY_TEST_FAULT`); nothing else sets one.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device events thread never returns once its input has closed, as a stage
    /// stuck in a blocking call would.
    StuckDeviceEvents,
}

/// Runs the gateway until `shutdown` completes, then drains and closes it within
/// `gateway.shutdown_grace` (the module header has the sequence).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_fault(config, shutdown, None).await
}

/// [`run`] with a [`Fault`], for tests of the shutdown.
#[doc(hidden)]
pub async fn run_with_fault(
    config: Config,
    shutdown: impl Future<Output = ()>,
    fault: Option<Fault>,
) -> Result<(), RunError> {
    config.check_ports()?;
    let started_at = now_millis();
    let counters = Arc::new(Counters::default());
    let http_listener = match config.http.listen {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let store = Store::open(&config.storage.path, StoreConfig::from_config(&config))?;
    let views = Views::default();
    let stop = CancellationToken::new();
    let running = match start(
        &config,
        started_at,
        counters.clone(),
        store.clone(),
        &views,
        &stop,
        fault,
    ) {
        Ok(r) => r,
        Err(e) => {
            stop.cancel();
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
        topics = %config.ingest.topic_pattern.filters(),
        storage = %config.storage.path.display(),
        upstream = %config.upstream.url.as_ref().map_or("off".to_string(), |u| u.to_string()),
        "Gateway is up."
    );

    tokio::spawn(log_status(
        counters.clone(),
        store.clone(),
        running.forwarder_stats.clone(),
        running.front.child_token(),
    ));
    let broker_listening = Arc::new(AtomicBool::new(true));
    let http_server = http_listener.map(|listener| {
        let sources = Sources {
            gateway_id: config.gateway.id.clone(),
            started_at,
            counters: counters.clone(),
            store: store.clone(),
            forwarder: running.forwarder_stats.clone(),
            downlink: running.downlink_stats.clone(),
            device_events: running.device_events.clone(),
            devices: views.devices.clone(),
            rules: views.rules.clone(),
            broker_listeners: broker_listeners(&config),
            auth: running.auth.clone(),
            broker_listening: broker_listening.clone(),
            ingest_samples: Default::default(),
        };
        tokio::spawn(http::serve(listener, sources, stop.child_token()))
    });
    shutdown.await;
    let grace = config.gateway.shutdown_grace;
    let deadline = Instant::now() + grace;
    broker_listening.store(false, Ordering::Relaxed);
    tracing::info!(grace = ?grace, "Shutting down.");
    let still_running = running.stop(deadline).await;
    if let Some(server) = http_server {
        // Not part of the drain: connections still open at the deadline close with the
        // runtime.
        match tokio::time::timeout_at(deadline, server).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP server failed."),
            Ok(_) => {}
            Err(_) => tracing::debug!("HTTP connections still open at the end of the grace."),
        }
    }
    if still_running.is_empty() {
        tracing::info!(summary = %counters.summary(), "Gateway stopped.");
        return Ok(());
    }
    tracing::warn!(
        summary = %counters.summary(),
        still_running = %still_running.join(", "),
        "Shutdown grace period over; exiting without waiting for what is still running (committed data is safe)."
    );
    Err(RunError::GraceExpired {
        grace,
        still_running,
    })
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

/// The running stages.
struct Running {
    /// Cancelled first: ingest and the status logger watch it.
    front: CancellationToken,
    /// The root, cancelled once the front has drained: the forwarder and HTTP watch it.
    stop: CancellationToken,
    threads: StageThreads,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    forwarder_stats: Option<Arc<ForwarderStats>>,
    downlink: Option<tokio::task::JoinHandle<()>>,
    downlink_stats: Option<Arc<DownlinkStats>>,
    /// The webhook task and the token that abandons its calls.
    webhooks: (tokio::task::JoinHandle<()>, CancellationToken),
    /// `None` with `rules.device_events = false`.
    device_events: Option<Arc<DeviceEventStats>>,
    /// Device authentication; `None` with anonymous access.
    auth: Option<Authenticator>,
    store: StoreHandle,
}

impl Running {
    /// Stops from the front (steps 1 to 4 of the module header); returns the names of the
    /// stages still running when `deadline` passed.
    async fn stop(self, deadline: Instant) -> Vec<String> {
        self.front.cancel();
        let fed = self.store.end_feed();
        let mut still_running = self.threads.wait(deadline).await;
        if tokio::time::timeout_at(deadline, fed).await.is_err() {
            still_running.push("decode".into());
        }
        self.stop.cancel();
        // The rules stage hands over no more calls: those left get WEBHOOK_DRAIN.
        let webhooks_by = deadline.min(Instant::now() + WEBHOOK_DRAIN);
        if let Some(task) = self.forwarder {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                still_running.push("forwarder".into());
            }
        }
        if let Some(task) = self.downlink {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                still_running.push("downlink".into());
            }
        }
        let (mut task, abandon) = self.webhooks;
        if tokio::time::timeout_at(webhooks_by, &mut task)
            .await
            .is_err()
        {
            abandon.cancel();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                still_running.push("webhooks".into());
            }
        }
        let close_by = deadline.max(Instant::now() + STORE_CLOSE_MIN);
        match close_store(self.store, close_by).await {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::error!(error = %e, "Closing the database failed."),
            None => still_running.push("store".into()),
        }
        still_running
    }
}

/// Commits what the store holds and closes it, waiting until `deadline` at most; `None`
/// when it had not closed by then.
async fn close_store(store: StoreHandle, deadline: Instant) -> Option<Result<(), StoreError>> {
    let (tx, rx) = oneshot::channel();
    let closing = store.clone();
    // A thread of its own rather than the blocking pool: if the store is stuck, nothing
    // must wait for this thread when the runtime shuts down.
    let closer = std::thread::Builder::new()
        .name("store-close".into())
        .spawn(move || {
            let _ = tx.send(closing.shutdown());
        });
    match closer {
        Ok(_) => tokio::time::timeout_at(deadline, rx).await.ok()?.ok(),
        // No thread to spare: close it here.
        Err(_) => Some(store.shutdown()),
    }
}

fn start(
    config: &Config,
    started_at: Millis,
    counters: Arc<Counters>,
    store: StoreHandle,
    views: &Views,
    stop: &CancellationToken,
    fault: Option<Fault>,
) -> Result<Running, RunError> {
    let forwarder = ForwarderConfig::from_config(config)
        .map(|cfg| Forwarder::new(ForwarderConfig { started_at, ..cfg }, store.clone()))
        .transpose()?;
    let links = broker::start(
        &config.broker,
        &config.auth,
        &config.ingest,
        &config.rules,
        &config.downlink.device_topic,
        store.early_commit(),
    )?;
    let auth = links.auth;
    let forwarding = config.upstream.url.is_some();
    let front = stop.child_token();
    let mut threads = StageThreads::new();

    // Commands from upstream: the forwarder receives them, the downlink queues and
    // delivers them.
    // Rule actions on a device's command topic join the same queue.
    let (forwarder, downlink, action_queue) = match forwarder {
        Some(f) => {
            let cfg = DownlinkConfig::from_config(config);
            let (commands_tx, commands_rx) = tokio::sync::mpsc::unbounded_channel();
            let actions = ActionQueue::new(cfg.clone(), commands_tx.clone());
            let f = f.with_downlink(cfg.upstream_filter(), commands_tx);
            let downlink = Downlink::new(cfg, store.clone(), commands_rx, links.downlink);
            (Some(f), Some(downlink), Some(actions))
        }
        None => (None, None, None),
    };
    let downlink_stats = downlink.as_ref().map(Downlink::stats);
    let downlink = downlink.map(|d| tokio::spawn(d.run(stop.child_token())));
    let forwarder_stats = forwarder.as_ref().map(Forwarder::stats);
    // On the devices' listener runtime: the commit that releases the devices' acks also
    // hands the forwarder its rows, and waking one thread for both costs one wake-up.
    let forwarder = forwarder.map(|f| links.runtime.spawn(f.run(stop.child_token())));

    // Devices' connects and disconnects, announced as events.
    let device_events = match links.presence {
        Some(presence) => {
            let stats = Arc::new(DeviceEventStats::new(presence.hook));
            let stage = DeviceEvents {
                gateway_id: config.gateway.id.clone(),
                reports: presence.reports,
                publish: presence.publish,
                store: store.clone(),
                event_topic: config.rules.event_topic.clone(),
                forward: forwarding,
                stats: stats.clone(),
                stop: closed_on_cancel(&front),
            };
            threads.spawn("device-events", move || {
                stage.run();
                if fault == Some(Fault::StuckDeviceEvents) {
                    tracing::warn!("Injected fault: the device events stage hangs.");
                    loop {
                        std::thread::park();
                    }
                }
            })?;
            Some(stats)
        }
        None => None,
    };

    // Webhook calls of rule actions, made on the runtime, never by the thread that runs
    // the rules.
    let abandon = CancellationToken::new();
    let (webhook_queue, webhook_task) = webhook::channel(
        WEBHOOK_QUEUE,
        &config.gateway.id,
        store.clone(),
        views.rules.clone(),
        abandon.clone(),
    );
    let webhooks = (tokio::spawn(webhook_task.run()), abandon);

    // Evaluated by the decode stage, after each batch (`rules::stage`).
    let rules = RulesStage {
        gateway_id: config.gateway.id.clone(),
        dir: config.rules.dir.clone(),
        store: store.clone(),
        publish: links.publish.0,
        event_topic: config.rules.event_topic.clone(),
        forward: forwarding,
        counters: counters.clone(),
        snapshot: views.rules.clone(),
        trim: Trim::new(),
        commands: action_queue,
        webhooks: webhook_queue,
    };
    let decode = DecodeStage {
        pattern: config.ingest.topic_pattern.clone(),
        input: Intake::new(links.ingest),
        counters: counters.clone(),
        store: store.clone(),
        forward_readings: forwarding && config.upstream.forward_readings,
        rules: Some(rules),
        devices: views.devices.clone(),
    };
    // Run by the store's thread before each commit (`store/feed.rs`).
    store.feed(Box::new(move || decode.start()));

    Ok(Running {
        front,
        stop: stop.clone(),
        threads,
        forwarder,
        forwarder_stats,
        downlink,
        downlink_stats,
        webhooks,
        device_events,
        auth,
        store,
    })
}

/// A channel that closes (its sender dropped) once `token` is cancelled: a stage thread
/// waits on it together with its input, and so sleeps until data or the stop comes
/// instead of waking now and then to look at a token.
fn closed_on_cancel(token: &CancellationToken) -> flume::Receiver<()> {
    let (closing, closed) = flume::bounded::<()>(0);
    let token = token.clone();
    tokio::spawn(async move {
        token.cancelled().await;
        drop(closing);
    });
    closed
}

async fn log_status(
    counters: Arc<Counters>,
    store: StoreHandle,
    forwarder: Option<Arc<ForwarderStats>>,
    stop: CancellationToken,
) {
    let mut last = String::new();
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
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
