//! Ingest: the publishes of devices, as the embedded broker's connections hand them over
//! (`rumqttd::IngestHook`, `vendor/rumqttd/src/link/ingest.rs`), each QoS 1 or 2 publish
//! with its acknowledgement held as a [`Receipt`].
//!
//! Acknowledged means stored: a device gets its PUBACK only when the store releases the
//! receipt, after committing what the publish became (an outbox row or a dead letter), or
//! after everything before it when the publish needs no write. The receipts of one
//! connection are released in the order of its publishes because one FIFO path carries
//! them: the hook's channel, then the decode stage and the store's group, both on the
//! store's thread.
//!
//! Backpressure instead of drops: the hook's channel is bounded by
//! `ingest.queue_capacity`; the store's thread takes at most a group's worth from it
//! before each commit, so when the disk or the rules fall behind the channel fills; a
//! full channel stops the broker from reading the devices' sockets, so devices slow down
//! (their inflight window, then TCP) and nothing acknowledged is lost.
//!
//! [`Intake`] is the receiving end, read by the decode stage on the store's thread
//! (`store/feed.rs`): the store waits on the channel together with its own, and takes
//! what arrived just before each commit. Invariants:
//! - hands out messages in the order the channel holds them (a message the store took
//!   while waiting, [`Intake::hold`], first), never waiting for one;
//! - once stopped ([`Intake::stop`], the gateway is stopping) it hands out what is queued
//!   at that moment, then is over; dropping it afterwards drops what arrived later,
//!   unacknowledged: those devices' connections close without a PUBACK and the devices
//!   send those messages again after the restart. It is over too once the broker's end
//!   is gone and nothing is left.

use std::sync::Arc;

use bytes::Bytes;
pub use rumqttd::Ingested;

use crate::reading::{now_millis, Millis};

/// What [`Intake::take`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The batch holds at least one message.
    Batch,
    /// Nothing is queued.
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
    /// UTF-8, read through [`RawMessage::topic`]: a slice of the connection's read
    /// buffer, as the payload, not a copy.
    topic: Bytes,
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
            // MQTT topics are UTF-8; one that is not is replaced by its lossy conversion,
            // so that `topic` always reads.
            topic: match std::str::from_utf8(&ingested.topic) {
                Ok(_) => ingested.topic,
                Err(_) => String::from_utf8_lossy(&ingested.topic).into_owned().into(),
            },
            payload: ingested.payload,
            content_type: ingested.properties.and_then(|p| p.content_type),
            received_at,
            receipt: ingested.ack,
        }
    }

    pub fn topic(&self) -> &str {
        debug_assert!(std::str::from_utf8(&self.topic).is_ok());
        // SAFETY: `topic` is private, set once in `RawMessage::new` to bytes checked to
        // be UTF-8 there (or to a `String`'s), and `Bytes` never changes its bytes. The
        // check is not repeated on every read: the decode stage and the store read the
        // topic of every publish several times.
        unsafe { std::str::from_utf8_unchecked(&self.topic) }
    }
}

/// The receiving end of the broker's hand-off.
pub struct Intake {
    input: flume::Receiver<Ingested>,
    /// Taken from `input` by the store while it waited: handed out first.
    held: Option<Ingested>,
    /// Set once stopped: how many messages are still to be handed out.
    remaining: Option<usize>,
}

impl Intake {
    pub fn new(input: flume::Receiver<Ingested>) -> Intake {
        Intake {
            input,
            held: None,
            remaining: None,
        }
    }

    /// The channel to wait on for the next message; `None` once stopped, and while a
    /// message is held (there is one to hand out already).
    pub fn waiting_on(&self) -> Option<&flume::Receiver<Ingested>> {
        (self.remaining.is_none() && self.held.is_none()).then_some(&self.input)
    }

    /// Keeps a message taken from [`waiting_on`](Self::waiting_on)'s channel: it is handed
    /// out before those still queued.
    pub fn hold(&mut self, message: Ingested) {
        assert!(self.held.is_none(), "a message is held already");
        self.held = Some(message);
    }

    /// Hands out no more than what is queued now.
    pub fn stop(&mut self) {
        if self.remaining.is_none() {
            self.remaining = Some(self.queued());
        }
    }

    /// Fills `batch` with what is queued, at most `max` messages, without waiting.
    pub fn take(&mut self, batch: &mut Vec<RawMessage>, max: usize) -> Next {
        let limit = self.remaining.map_or(max, |r| r.min(max));
        let received_at = now_millis();
        let before = batch.len();
        if let Some(first) = self.held.take() {
            batch.push(RawMessage::new(first, received_at));
        }
        let mut gone = false;
        while batch.len() - before < limit {
            match self.input.try_recv() {
                Ok(m) => batch.push(RawMessage::new(m, received_at)),
                Err(flume::TryRecvError::Empty) => break,
                Err(flume::TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        let taken = batch.len() - before;
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(taken);
        }
        if taken > 0 {
            Next::Batch
        } else if gone || self.remaining.is_some() {
            // Stopped: nothing left of what was queued then.
            Next::Over
        } else {
            Next::Idle
        }
    }

    /// Messages waiting to be handed out.
    pub fn queued(&self) -> usize {
        let queued = self.input.len() + usize::from(self.held.is_some());
        self.remaining.map_or(queued, |r| r.min(queued))
    }

    /// The hand-off channel is full: the broker's connections wait for room.
    pub fn is_full(&self) -> bool {
        self.input.is_full()
    }
}

#[cfg(test)]
mod tests {
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
    fn a_topic_is_the_publish_s_own_bytes_and_one_not_utf8_reads_as_its_lossy_text() {
        let message = publish(1);
        let at = message.topic.as_ptr();
        let raw = RawMessage::new(message, 0);
        assert_eq!(raw.topic(), "devices/d-1/telemetry");
        assert_eq!(raw.topic.as_ptr(), at, "shared, not copied");

        let mut message = publish(2);
        message.topic = Bytes::from_static(b"devices/d\xff/telemetry");
        assert_eq!(
            RawMessage::new(message, 0).topic(),
            "devices/d\u{fffd}/telemetry"
        );
    }

    #[test]
    fn hands_out_what_is_queued_in_order_a_held_message_first_and_never_waits() {
        let (tx, rx) = flume::bounded(8);
        let mut intake = Intake::new(rx);
        let mut batch = Vec::new();
        assert_eq!(intake.take(&mut batch, 16), Next::Idle);
        assert!(batch.is_empty());

        for n in 1..=4 {
            tx.send(publish(n)).unwrap();
        }
        // The store took the first one while it waited.
        let first = intake.waiting_on().unwrap().try_recv().unwrap();
        intake.hold(first);
        // Nothing to wait for while a message is held.
        assert!(intake.waiting_on().is_none());
        assert_eq!(intake.queued(), 4);
        assert_eq!(intake.take(&mut batch, 3), Next::Batch);
        assert_eq!(payloads(&batch), [1, 2, 3]);
        batch.clear();
        assert_eq!(intake.take(&mut batch, 3), Next::Batch);
        assert_eq!(payloads(&batch), [4]);
        batch.clear();
        assert_eq!(intake.take(&mut batch, 3), Next::Idle);

        // The broker's end gone: what is left is handed out, then the intake is over.
        tx.send(publish(5)).unwrap();
        drop(tx);
        assert_eq!(intake.take(&mut batch, 3), Next::Batch);
        assert_eq!(payloads(&batch), [5]);
        batch.clear();
        assert_eq!(intake.take(&mut batch, 3), Next::Over);
    }

    #[test]
    fn once_stopped_what_is_queued_is_handed_out_then_the_intake_is_over() {
        let (tx, rx) = flume::bounded(8);
        let mut intake = Intake::new(rx);
        for n in 1..=3 {
            tx.send(publish(n)).unwrap();
        }
        let first = intake.waiting_on().unwrap().try_recv().unwrap();
        intake.hold(first);
        intake.stop();
        assert!(intake.waiting_on().is_none());
        let mut batch = Vec::new();
        assert_eq!(intake.take(&mut batch, 2), Next::Batch);
        assert_eq!(payloads(&batch), [1, 2]);
        batch.clear();
        // Arrived after the stop: not handed out.
        tx.send(publish(4)).unwrap();
        assert_eq!(intake.queued(), 1);
        assert_eq!(intake.take(&mut batch, 2), Next::Batch);
        assert_eq!(payloads(&batch), [3]);
        batch.clear();
        assert_eq!(intake.queued(), 0);
        assert_eq!(intake.take(&mut batch, 2), Next::Over);
        assert!(batch.is_empty());
    }
}
