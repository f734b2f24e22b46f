//! Ingest: the broker's local link, subscribed to the device topics, turned into
//! [`RawMessage`]s on the decode queue.
//!
//! Runs on its own OS thread because `LinkRx::recv` blocks.
//!
//! Invariants:
//! - never waits on downstream work: a full decode queue drops the message and counts
//!   it (`ingest_overflow`), because waiting here would make the broker overrun its
//!   in-memory log and lose messages silently;
//! - answers every `Unschedule` with `ready()`, without which the router stops sending
//!   after a few hundred messages;
//! - detects what the broker dropped before ingest read it (a jump in the log offset)
//!   and counts it as `link_lost`;
//! - once its cancellation token is cancelled (the gateway is stopping, or decode is
//!   gone), keeps reading until the link has been quiet for [`POLL`] (at most
//!   [`DRAIN_MAX`]), so what the broker acknowledged before the stop is not left behind;
//!   then closes the queue, which is how the later stages learn to stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx};
use rumqttd::Notification;
use tokio_util::sync::CancellationToken;

use crate::counters::Counters;
use crate::reading::{now_millis, Millis};

/// How often the loop looks at its cancellation token while the broker is quiet.
const POLL: Duration = Duration::from_millis(50);
/// Longest time spent draining the link once cancelled.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Least time between two warnings about lost or dropped messages.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// One message as the broker delivered it.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: String,
    pub payload: Bytes,
    /// The MQTT 5 content type, when the publisher set one.
    pub content_type: Option<String>,
    pub received_at: Millis,
}

/// The ingest stage.
pub struct Ingest {
    link: LinkRx,
    queue: flume::Sender<RawMessage>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    last_offset: Option<u64>,
    last_warning: Option<Instant>,
}

impl Ingest {
    pub fn new(
        link: LinkRx,
        queue: flume::Sender<RawMessage>,
        counters: Arc<Counters>,
        stop: CancellationToken,
    ) -> Ingest {
        Ingest {
            link,
            queue,
            counters,
            stop,
            last_offset: None,
            last_warning: None,
        }
    }

    /// Runs until `stop` is cancelled (then drains) or the broker goes away.
    pub fn run(mut self) {
        let _span = tracing::info_span!("ingest").entered();
        let mut drain_until = None;
        loop {
            if drain_until.is_none() && self.stop.is_cancelled() {
                drain_until = Some(Instant::now() + DRAIN_MAX);
            }
            if drain_until.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            match self.link.recv_deadline(Instant::now() + POLL) {
                Ok(Some(Notification::Forward(forward))) => {
                    self.track_offset(forward.cursor.map(|c| c.1));
                    let message = RawMessage {
                        topic: String::from_utf8_lossy(&forward.publish.topic).into_owned(),
                        payload: forward.publish.payload,
                        content_type: forward.properties.and_then(|p| p.content_type),
                        received_at: now_millis(),
                    };
                    self.accept(message);
                }
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = self.link.ready() {
                        tracing::error!(error = %e, "Broker link closed.");
                        break;
                    }
                }
                Ok(_) => {}
                Err(LinkError::RecvTimeout(_)) if drain_until.is_some() => break,
                Err(LinkError::RecvTimeout(_)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "Broker link closed.");
                    break;
                }
            }
        }
        tracing::debug!("Ingest stopped.");
    }

    fn accept(&mut self, message: RawMessage) {
        Counters::add(&self.counters.ingested, 1);
        if let Err(e) = self.queue.try_send(message) {
            match e {
                flume::TrySendError::Full(_) => {
                    Counters::add(&self.counters.ingest_overflow, 1);
                    self.warn("Decode queue full: dropping messages (counted as ingest_overflow).");
                }
                flume::TrySendError::Disconnected(_) => {
                    tracing::error!("Decode stage is gone; ingest stops.");
                    self.stop.cancel();
                }
            }
        }
    }

    fn track_offset(&mut self, offset: Option<u64>) {
        let Some(offset) = offset else { return };
        if let Some(last) = self.last_offset {
            if offset > last + 1 {
                Counters::add(&self.counters.link_lost, offset - last - 1);
                self.warn("The broker dropped messages before ingest read them (counted as link_lost); raise broker.segment_bytes.");
            }
        }
        self.last_offset = Some(offset);
    }

    fn warn(&mut self, message: &str) {
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= WARN_INTERVAL)
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(summary = %self.counters.summary(), "{message}");
        }
    }
}
