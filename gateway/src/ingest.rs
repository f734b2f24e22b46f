//! Ingest: the publishes of devices, as the embedded broker's connections hand them over
//! (`rumqttd::IngestHook`, `vendor/rumqttd/src/link/ingest.rs`), each QoS 1 or 2 publish
//! with its acknowledgement held as a [`Receipt`].
//!
//! Acknowledged means stored: a device gets its PUBACK only when the store releases the
//! receipt, after committing what the publish became (an outbox row or a dead letter), or
//! after everything before it when the publish needs no write. The receipts of one
//! connection are released in the order of its publishes because one FIFO path carries
//! them: the hook's channel, the decode stage (one thread) and the store's queue.
//!
//! Backpressure instead of drops: the hook's channel is bounded by
//! `ingest.queue_capacity`; the decode stage waits when the rules queue or the store's
//! queue is full; a full channel stops the broker from reading the devices' sockets, so
//! devices slow down (their inflight window, then TCP) and nothing acknowledged is lost.
//!
//! [`Intake`] is the receiving end, read by the decode stage. Invariants:
//! - hands out messages in the order the channel holds them, in batches of what is
//!   queued; under load a small batch waits [`COALESCE`] for more (one wake-up per
//!   batch, not per message), or, paced to the store's commits ([`Intake::paced`], as
//!   the pipeline runs it), the intake sleeps until just before the next commit and then
//!   takes what arrived meanwhile (one wake-up per commit); at low rates a message is
//!   handed out at once;
//! - once its stop channel closes (the gateway is stopping) it hands out what is queued
//!   at that moment, then ends; dropping it afterwards drops what arrived later,
//!   unacknowledged: those devices' connections close without a PUBACK and the devices
//!   send those messages again after the restart;
//! - it sleeps until a message, the stop or the caller's deadline comes (the caller's
//!   timers, see `decode::stage`): no wake-up of its own while no device publishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::Ingested;

use crate::reading::{now_millis, Millis};
use crate::store::CommitClock;

/// While publishes stream in (the previous batch started less than [`STREAMING`] ago),
/// a batch that would hold fewer than [`COALESCE_MIN`] messages waits [`COALESCE`] for
/// more: one wake-up of the decode thread per few messages instead of per message, for
/// at most this much latency, and only under load.
const STREAMING: Duration = Duration::from_millis(2);
const COALESCE: Duration = Duration::from_micros(500);
const COALESCE_MIN: usize = 16;
/// How long before the store's next commit a paced batch is taken: time to wake, decode
/// it and queue it for that commit ([`Intake::paced`]).
const LEAD: Duration = Duration::from_micros(300);

/// What [`Intake::next_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The batch holds at least one message.
    Batch,
    /// The deadline passed with nothing queued.
    Idle,
    /// The intake is over (stopped and drained, or the broker gone).
    Over,
}

/// The acknowledgement a device waits for (QoS 1 and 2); see the module header.
/// Dropping it unreleased closes the device's connection without acknowledging it.
pub type Receipt = rumqttd::PendingAck;

/// One publish as a device sent it.
#[derive(Debug)]
pub struct RawMessage {
    /// The publishing connection's client id.
    pub client_id: Arc<str>,
    pub topic: String,
    pub payload: Bytes,
    /// The MQTT 5 content type, when the publisher set one.
    pub content_type: Option<String>,
    pub received_at: Millis,
    /// `None` for QoS 0.
    pub receipt: Option<Receipt>,
}

impl RawMessage {
    fn new(ingested: Ingested, received_at: Millis) -> RawMessage {
        RawMessage {
            client_id: ingested.client_id,
            topic: String::from_utf8_lossy(&ingested.topic).into_owned(),
            payload: ingested.payload,
            content_type: ingested.properties.and_then(|p| p.content_type),
            received_at,
            receipt: ingested.ack,
        }
    }
}

/// The receiving end of the broker's hand-off.
pub struct Intake {
    input: flume::Receiver<Ingested>,
    /// Closes (its sender dropped) when the gateway stops.
    stop: flume::Receiver<()>,
    /// Set once stopping: how many messages are still to be handed out.
    remaining: Option<usize>,
    /// When the last batch started.
    last_batch: Option<Instant>,
    /// The store's commits, which batches are paced to under load ([`Intake::paced`]).
    clock: Option<Arc<CommitClock>>,
    /// The commit the last paced batch was taken for.
    served: Option<Instant>,
}

impl Intake {
    pub fn new(input: flume::Receiver<Ingested>, stop: flume::Receiver<()>) -> Intake {
        Intake {
            input,
            stop,
            remaining: None,
            last_batch: None,
            clock: None,
            served: None,
        }
    }

    /// Under load, hands out a batch once per commit of the store, just before it
    /// (`store/clock.rs`), instead of one per [`COALESCE`].
    pub fn paced(mut self, clock: Arc<CommitClock>) -> Intake {
        self.clock = Some(clock);
        self
    }

    /// Fills `batch` with what is queued (at most `max`), waiting for the first message
    /// until `deadline` (without one, for as long as it takes).
    pub fn next_batch(
        &mut self,
        batch: &mut Vec<RawMessage>,
        max: usize,
        deadline: Option<Instant>,
    ) -> Next {
        loop {
            if self.remaining.is_none() && self.stop.is_disconnected() {
                self.remaining = Some(self.input.len());
            }
            if self.remaining == Some(0) {
                return Next::Over;
            }
            let slept = self.remaining.is_none() && self.pace(deadline);
            let first = match self.remaining {
                Some(_) => self.input.try_recv().ok(),
                None => {
                    let select = flume::Selector::new()
                        .recv(&self.input, |m| Some(m.ok()))
                        .recv(&self.stop, |_| None);
                    let selected = match deadline {
                        Some(deadline) => match select.wait_deadline(deadline) {
                            Ok(selected) => selected,
                            Err(flume::select::SelectError::Timeout) => return Next::Idle,
                        },
                        None => select.wait(),
                    };
                    match selected {
                        Some(m) => m,
                        // Stopping: what is queued now is handed out (the loop's top).
                        None => continue,
                    }
                }
            };
            let Some(first) = first else {
                return Next::Over;
            };
            let now = Instant::now();
            let streaming = self.streaming(now);
            self.last_batch = Some(now);
            if streaming
                && !slept
                && self.remaining.is_none()
                && self.input.len() + 1 < COALESCE_MIN
            {
                std::thread::sleep(COALESCE);
            }
            let received_at = now_millis();
            let limit = self.remaining.map_or(max, |r| r.min(max)).max(1);
            batch.push(RawMessage::new(first, received_at));
            while batch.len() < limit {
                match self.input.try_recv() {
                    Ok(m) => batch.push(RawMessage::new(m, received_at)),
                    Err(_) => break,
                }
            }
            if let Some(r) = &mut self.remaining {
                *r = r.saturating_sub(batch.len());
            }
            return Next::Batch;
        }
    }

    /// Under load, and when the store's commits are paced (its clock is set), sleeps
    /// until [`LEAD`] before the next commit this intake has not handed a batch for, so
    /// that the batch taken then is decoded and queued in time for it: what arrives
    /// during the sleep waits in the channel, as it would have waited in the store's
    /// queue. One wake-up per commit instead of two per batch (the wake for the first
    /// message, then the [`COALESCE`] sleep). Returns whether it slept; it does not sleep
    /// past `deadline` (the rules' timers) or for longer than two commit spacings.
    fn pace(&mut self, deadline: Option<Instant>) -> bool {
        let now = Instant::now();
        let Some(clock) = &self.clock else {
            return false;
        };
        if !self.streaming(now) || self.input.len() >= COALESCE_MIN {
            return false;
        }
        let Some(next) = clock.next_after(now) else {
            return false;
        };
        // The commit this batch is for: the next one, unless a batch went to it already
        // (the store may start a commit a little later than its clock said).
        let served = self.served.is_some_and(|s| next < s + clock.spacing() / 2);
        let commit = if served { next + clock.spacing() } else { next };
        let latest = now + 2 * clock.spacing();
        let wake = commit
            .checked_sub(LEAD)
            .unwrap_or(now)
            .min(latest)
            .min(deadline.unwrap_or(latest));
        self.served = Some(commit);
        if wake <= now {
            return false;
        }
        std::thread::sleep(wake - now);
        true
    }

    /// Whether publishes stream in: the previous batch started less than [`STREAMING`]
    /// before `now`.
    fn streaming(&self, now: Instant) -> bool {
        // Paced batches come a commit spacing apart, which may be configured longer.
        let streaming = self
            .clock
            .as_ref()
            .map_or(STREAMING, |c| STREAMING.max(2 * c.spacing()));
        self.last_batch.is_some_and(|t| now - t < streaming)
    }

    /// Messages waiting in the hand-off channel.
    pub fn queued(&self) -> usize {
        self.input.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn publish(n: u8) -> Ingested {
        Ingested {
            client_id: "c-1".into(),
            topic: Bytes::from_static(b"devices/d-1/telemetry"),
            payload: Bytes::from(vec![n]),
            qos: 0,
            retain: false,
            properties: None,
            ack: None,
        }
    }

    fn payloads(batch: &[RawMessage]) -> Vec<u8> {
        batch.iter().map(|m| m.payload[0]).collect()
    }

    #[test]
    fn a_deadline_with_nothing_queued_is_idle_and_later_messages_still_come() {
        let (tx, rx) = flume::bounded(8);
        let (_stop_tx, stop_rx) = flume::bounded::<()>(0);
        let mut intake = Intake::new(rx, stop_rx);
        let mut batch = Vec::new();
        // Should the deadline be ignored, this message ends the wait (and the test fails)
        // instead of the test hanging.
        let idle_seen = Arc::new(AtomicBool::new(false));
        let (watchdog_tx, watchdog_idle) = (tx.clone(), idle_seen.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(5));
            if !watchdog_idle.load(Ordering::SeqCst) {
                let _ = watchdog_tx.send(publish(99));
            }
        });
        let started = Instant::now();
        let deadline = started + Duration::from_millis(30);
        assert_eq!(
            intake.next_batch(&mut batch, 16, Some(deadline)),
            Next::Idle
        );
        idle_seen.store(true, Ordering::SeqCst);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(batch.is_empty());

        tx.send(publish(1)).unwrap();
        tx.send(publish(2)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            intake.next_batch(&mut batch, 16, Some(deadline)),
            Next::Batch
        );
        assert_eq!(payloads(&batch), [1, 2]);
        batch.clear();

        // Without a deadline the wait lasts until a message comes.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(publish(3)).unwrap();
            tx
        });
        assert_eq!(intake.next_batch(&mut batch, 16, None), Next::Batch);
        assert_eq!(payloads(&batch), [3]);
        drop(sender.join().unwrap());
    }

    #[test]
    fn under_load_a_paced_intake_hands_out_one_batch_just_before_each_commit() {
        let spacing = Duration::from_millis(400);
        let clock = Arc::new(CommitClock::new(spacing));
        let (tx, rx) = flume::bounded(64);
        let (_stop_tx, stop_rx) = flume::bounded::<()>(0);
        let mut intake = Intake::new(rx, stop_rx).paced(clock.clone());
        let mut batch = Vec::new();
        let deadline = Some(Instant::now() + Duration::from_secs(10));

        // After a quiet spell a message is handed out at once, whatever the clock says.
        clock.set(Some(Instant::now() + spacing));
        let started = Instant::now();
        tx.send(publish(1)).unwrap();
        assert_eq!(intake.next_batch(&mut batch, 16, deadline), Next::Batch);
        assert_eq!(payloads(&batch), [1]);
        assert!(started.elapsed() < spacing / 2, "{:?}", started.elapsed());
        batch.clear();

        // Streaming now: the next batch is taken LEAD before the commit, with what
        // arrived during the wait.
        let commit = Instant::now() + spacing / 2;
        clock.set(Some(commit));
        tx.send(publish(2)).unwrap();
        let sender = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                tx.send(publish(3)).unwrap();
            })
        };
        assert_eq!(intake.next_batch(&mut batch, 16, deadline), Next::Batch);
        assert!(Instant::now() + LEAD >= commit, "taken too early");
        assert_eq!(payloads(&batch), [2, 3]);
        sender.join().unwrap();
        batch.clear();

        // That commit has its batch: the next one waits for the commit after it (the
        // store starts it a little late, as it may).
        clock.set(Some(commit + Duration::from_millis(5)));
        tx.send(publish(4)).unwrap();
        assert_eq!(intake.next_batch(&mut batch, 16, deadline), Next::Batch);
        assert!(Instant::now() + LEAD >= commit + spacing, "taken too early");
        assert_eq!(payloads(&batch), [4]);
        batch.clear();

        // The store runs late: the commit its clock names is overdue (the one before it
        // still waits for the disk), so what is handed over now goes into that one. The
        // batch is taken for the commit after it, a spacing from now at the earliest,
        // not as soon as a message comes (and then again after a coalescing sleep).
        clock.set(Some(Instant::now() - Duration::from_millis(1)));
        let started = Instant::now();
        tx.send(publish(40)).unwrap();
        assert_eq!(intake.next_batch(&mut batch, 16, deadline), Next::Batch);
        assert!(
            started.elapsed() + LEAD >= spacing,
            "taken before the commit after the overdue one: {:?}",
            started.elapsed()
        );
        assert_eq!(payloads(&batch), [40]);
        batch.clear();

        // Many messages waiting are handed out at once.
        for n in 5..5 + COALESCE_MIN as u8 {
            tx.send(publish(n)).unwrap();
        }
        let started = Instant::now();
        assert_eq!(intake.next_batch(&mut batch, 64, deadline), Next::Batch);
        assert!(started.elapsed() < spacing / 2, "{:?}", started.elapsed());
        assert_eq!(batch.len(), COALESCE_MIN);
    }

    #[test]
    fn once_stopped_what_is_queued_is_handed_out_then_the_intake_is_over() {
        let (tx, rx) = flume::bounded(8);
        let (stop_tx, stop_rx) = flume::bounded::<()>(0);
        let mut intake = Intake::new(rx, stop_rx);
        for n in 1..=3 {
            tx.send(publish(n)).unwrap();
        }
        drop(stop_tx);
        let mut batch = Vec::new();
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        assert_eq!(intake.next_batch(&mut batch, 2, deadline), Next::Batch);
        assert_eq!(payloads(&batch), [1, 2]);
        batch.clear();
        // Arrived after the stop: not handed out.
        tx.send(publish(4)).unwrap();
        assert_eq!(intake.next_batch(&mut batch, 2, deadline), Next::Batch);
        assert_eq!(payloads(&batch), [3]);
        batch.clear();
        assert_eq!(intake.next_batch(&mut batch, 2, deadline), Next::Over);
        assert!(batch.is_empty());
    }
}
