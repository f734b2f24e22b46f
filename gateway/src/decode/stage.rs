//! The decode stage: takes batches of [`RawMessage`]s from the broker's hand-off
//! ([`Intake`]), decodes them, hands readings on and keeps what does not decode in the
//! dead-letter table.
//!
//! Runs on its own OS thread (decoding is CPU work, and the hand-offs after it wait when
//! the next stage is full), which also runs the rules stage ([`RulesLoop`]): each batch
//! is decoded, handed to the store, then evaluated, and the thread also wakes for the
//! rules' timers.
//!
//! Invariants:
//! - every message is counted exactly once as decoded, dead-lettered or unrouted (a topic
//!   outside `ingest.topic_pattern`, also kept as a dead letter with the client id);
//! - every receipt goes to the store with what its message became (an outbox row, a
//!   dead letter) or on its own when nothing is stored, in message order, so devices are
//!   acknowledged in the order they published and only for what is committed;
//! - no drop paths: a full store queue (or the broker's local link, for the rules'
//!   events) makes the stage wait, which stops the broker from reading devices' sockets
//!   (see `ingest.rs`); the time spent waiting for the store is counted
//!   (`blocked_micros`);
//! - every decoded reading is evaluated by the rules, in the order it arrived;
//! - a bad payload or an unrouted topic never stops the stage; each is logged at most
//!   once per [`WARN_INTERVAL`], with the latest topic, reason and client id;
//! - the stage ends when the intake ends (the gateway is stopping and what was queued is
//!   handled), after the rules saved their state;
//! - every decoded message updates the device read model ([`Devices`]) once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{decode, TopicPattern, TopicPatterns};
use crate::counters::Counters;
use crate::devices::Devices;
use crate::ingest::{Intake, Next, RawMessage};
use crate::reading::Reading;
use crate::rules::{RulesLoop, RulesStage};
use crate::store::{DeadLetter, OutboxEntry, StoreHandle};

/// Least time between two log lines about dead letters (and about unrouted topics).
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Most messages taken from the intake at once.
pub const BATCH: usize = 256;
/// Most readings' room kept between batches for the rules (a batch of single-reading
/// messages needs [`BATCH`]).
const DECODED_KEEP: usize = 4 * BATCH;

/// The decode stage.
pub struct DecodeStage {
    /// `ingest.topic_pattern`: the first pattern that matches a topic decodes it.
    pub pattern: TopicPatterns,
    pub input: Intake,
    pub counters: Arc<Counters>,
    pub store: StoreHandle,
    /// Append decoded readings to the outbox (forwarding on and `forward_readings`).
    pub forward_readings: bool,
    /// The rules, evaluated on this thread after each batch, when they run.
    pub rules: Option<RulesStage>,
    /// The device read model (last values, last seen).
    pub devices: Arc<Devices>,
}

/// A rate-limited warning: at most one line per [`WARN_INTERVAL`], with a count of the
/// occurrences since the last line.
#[derive(Default)]
struct Warning {
    last: Option<Instant>,
    unreported: u64,
}

impl Warning {
    /// Counts one occurrence; true when a line is due now (with `self.unreported` since
    /// the last one).
    fn due(&mut self) -> bool {
        self.unreported += 1;
        self.last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL)
    }

    fn reported(&mut self) {
        self.last = Some(Instant::now());
        self.unreported = 0;
    }
}

impl DecodeStage {
    pub fn run(mut self) {
        let _span = tracing::info_span!("decode").entered();
        let mut rules = self.rules.take().map(RulesStage::start);
        let mut batch = Vec::with_capacity(BATCH);
        // The readings of the batch, for the rules; its capacity is kept.
        let mut decoded = Vec::new();
        let mut dead = Warning::default();
        let mut unrouted = Warning::default();
        loop {
            let deadline = rules.as_ref().map(RulesLoop::next_wake);
            match self.input.next_batch(&mut batch, BATCH, deadline) {
                Next::Over => break,
                // Only the rules' timers are due.
                Next::Idle => {}
                Next::Batch => {
                    Counters::add(&self.counters.ingested, batch.len() as u64);
                    for message in batch.drain(..) {
                        let evaluated = rules.as_ref().map(|_| &mut decoded);
                        match self.pattern.find(&message.topic) {
                            Some(pattern) => self.handle(pattern, message, evaluated, &mut dead),
                            None => self.unrouted(message, &mut unrouted),
                        }
                    }
                    Counters::set(&self.counters.intake_queued, self.input.queued() as u64);
                }
            }
            if let Some(rules) = &mut rules {
                rules.step(&decoded);
            }
            decoded.clear();
            if decoded.capacity() > DECODED_KEEP {
                // A burst of many-record messages (SenML packs) does not stay allocated.
                decoded = Vec::new();
            }
        }
        if let Some(rules) = rules {
            rules.finish();
        }
        tracing::debug!("Decode stopped.");
    }

    /// Decodes one message; its readings join `decoded` when the rules run.
    fn handle(
        &self,
        pattern: &TopicPattern,
        message: RawMessage,
        decoded: Option<&mut Vec<Reading>>,
        warning: &mut Warning,
    ) {
        let RawMessage {
            client_id,
            topic,
            payload,
            content_type,
            received_at,
            receipt,
        } = message;
        match decode(
            pattern,
            &topic,
            &payload,
            content_type.as_deref(),
            received_at,
        ) {
            Ok(readings) => {
                let format = readings[0].format;
                self.counters.count_decoded(format, readings.len());
                self.devices.observe(&readings, received_at);
                if self.forward_readings {
                    let device = readings[0].device.clone();
                    let entry =
                        OutboxEntry::reading(topic, device, payload.to_vec(), format, received_at);
                    self.waiting(|| self.store.append_acked(entry, receipt));
                } else if let Some(receipt) = receipt {
                    self.waiting(|| self.store.release(receipt));
                }
                if let Some(decoded) = decoded {
                    decoded.extend(readings);
                }
            }
            Err(error) => {
                self.counters.count_dead_letter(error.format());
                let reason = error.to_string();
                if warning.due() {
                    tracing::warn!(topic = %topic, client_id = %client_id, reason = %reason, count = warning.unreported, "Payloads did not decode; kept as dead letters.");
                    warning.reported();
                }
                let dl = DeadLetter {
                    topic,
                    payload: payload.to_vec(),
                    reason,
                    received_at,
                };
                self.waiting(|| self.store.dead_letter(dl, receipt));
            }
        }
    }

    /// A publish on a topic outside the ingest pattern: counted, logged, kept as a dead
    /// letter with the client id (local subscribers got it from the broker anyway).
    fn unrouted(&self, message: RawMessage, warning: &mut Warning) {
        Counters::add(&self.counters.unrouted, 1);
        let reason = format!(
            "unrouted: topic matches no ingest.topic_pattern ('{}'); published by client '{}'",
            self.pattern, message.client_id
        );
        if warning.due() {
            tracing::warn!(topic = %message.topic, client_id = %message.client_id, pattern = %self.pattern, count = warning.unreported, "Publishes on topics outside ingest.topic_pattern; kept as dead letters.");
            warning.reported();
        }
        let dl = DeadLetter {
            topic: message.topic,
            payload: message.payload.to_vec(),
            reason,
            received_at: message.received_at,
        };
        self.waiting(|| self.store.dead_letter(dl, message.receipt));
    }

    /// Runs a hand-off that may wait for room downstream, counting the time it took.
    fn waiting<T>(&self, hand_off: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = hand_off();
        let waited = started.elapsed();
        if waited >= Duration::from_micros(50) {
            Counters::add(&self.counters.blocked_micros, waited.as_micros() as u64);
        }
        result
    }
}
