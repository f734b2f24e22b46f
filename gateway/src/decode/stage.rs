//! The decode stage: takes batches of [`RawMessage`]s from the broker's hand-off
//! ([`Intake`]), decodes them, hands readings on and keeps what does not decode in the
//! dead-letter table.
//!
//! Runs on the store's thread, as its feed ([`Feed`], `store/feed.rs`): just before each
//! commit the store has it take what the broker handed over meanwhile, and what it hands
//! to the store joins that commit. It also runs the rules stage ([`RulesLoop`]): each
//! run's readings are decoded, handed to the store, then evaluated, and the store wakes
//! for the rules' timers too.
//!
//! Invariants:
//! - every message is counted exactly once as decoded, dead-lettered or unrouted (a topic
//!   outside `ingest.topic_pattern`, also kept as a dead letter with the client id);
//! - every receipt goes to the store with what its message became (an outbox row, a
//!   dead letter) or on its own when nothing is stored, in message order, so devices are
//!   acknowledged in the order they published and only for what is committed;
//! - no drop paths: what the stage hands to the store joins the group being gathered
//!   (it never waits for the store's queue); a run takes at most a group's worth, so when
//!   the store or the rules fall behind the broker's hand-off fills and the broker stops
//!   reading devices' sockets (see `ingest.rs`); the time it stayed full is counted
//!   (`blocked_micros`); publishing the rules' events on the broker's local link waits
//!   when that is full;
//! - every decoded reading is evaluated by the rules, in the order it arrived;
//! - a bad payload or an unrouted topic never stops the stage; each is logged at most
//!   once per [`WARN_INTERVAL`], with the latest topic, reason and client id;
//! - the stage ends when the intake is over (the gateway is stopping and what was queued
//!   is handled), after the rules saved their state;
//! - every decoded message updates the device read model ([`Devices`]) once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::{decode_into, Spare, TopicPattern, TopicPatterns};
use crate::counters::Counters;
use crate::devices::Devices;
use crate::ingest::{Ingested, Intake, Next, RawMessage};
use crate::reading::Reading;
use crate::rules::{RulesLoop, RulesStage};
use crate::store::{DeadLetter, Feed, OutboxEntry, StoreHandle};

/// Least time between two log lines about dead letters (and about unrouted topics).
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Most messages taken from the intake at once.
pub const BATCH: usize = 256;
/// Most readings' room kept between batches for the rules (a batch of single-reading
/// messages needs [`BATCH`]).
const DECODED_KEEP: usize = 4 * BATCH;
/// Time without a message after which the readings kept for reuse, and the room of the
/// run's lists, are let go (runs come at least once a second, for the rules' timers and
/// the store's housekeeping).
const SPARE_IDLE: Duration = Duration::from_secs(1);

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

/// The stage as the store runs it, with the rules once started.
struct Decoding {
    stage: DecodeStage,
    rules: Option<RulesLoop>,
    batch: Vec<RawMessage>,
    /// The readings of the run, for the rules (when they do not run, each message's
    /// readings leave it once handled); its capacity is kept.
    decoded: Vec<Reading>,
    /// The readings of earlier messages, for reuse.
    spare: Spare,
    /// Where the outbox rows of the readings are encoded ([`OutboxEntry::reading_in`]).
    rows: BytesMut,
    dead: Warning,
    unrouted: Warning,
    span: tracing::Span,
    /// When the last run started.
    last_run: Instant,
    /// When the last run that took a message started.
    last_message: Instant,
}

impl Feed for Decoding {
    fn input(&self) -> Option<&flume::Receiver<Ingested>> {
        self.stage.input.waiting_on()
    }

    fn hold(&mut self, message: Ingested) {
        self.stage.input.hold(message);
    }

    fn queued(&self) -> usize {
        self.stage.input.queued()
    }

    fn next_wake(&self) -> Option<Instant> {
        self.rules.as_ref().map(RulesLoop::next_wake)
    }

    fn run(&mut self, max: usize) -> bool {
        let _span = self.span.enter();
        let now = Instant::now();
        if self.stage.input.is_full() {
            // The broker's connections waited for room since the last run at least.
            let waited = now - self.last_run;
            Counters::add(
                &self.stage.counters.blocked_micros,
                waited.as_micros() as u64,
            );
        }
        self.last_run = now;
        let mut over = false;
        let mut took = false;
        let mut left = max;
        while left > 0 {
            match self.stage.input.take(&mut self.batch, left.min(BATCH)) {
                Next::Over => {
                    over = true;
                    break;
                }
                Next::Idle => break,
                Next::Batch => {
                    took = true;
                    left = left.saturating_sub(self.batch.len());
                    Counters::add(&self.stage.counters.ingested, self.batch.len() as u64);
                    for message in self.batch.drain(..) {
                        match self.stage.pattern.find(message.topic()) {
                            Some(pattern) => {
                                let start = self.decoded.len();
                                self.stage.handle(
                                    pattern,
                                    message,
                                    &mut self.decoded,
                                    &mut self.spare,
                                    &mut self.rows,
                                    &mut self.dead,
                                );
                                if self.rules.is_none() {
                                    self.spare.keep(self.decoded.drain(start..));
                                }
                            }
                            None => self.stage.unrouted(message, &mut self.unrouted),
                        }
                    }
                }
            }
        }
        Counters::set(
            &self.stage.counters.intake_queued,
            self.stage.input.queued() as u64,
        );
        if let Some(rules) = &mut self.rules {
            if !self.decoded.is_empty() || rules.next_wake() <= Instant::now() {
                rules.step(&self.decoded);
            }
        }
        self.spare.keep(self.decoded.drain(..));
        if took {
            self.last_message = now;
        } else if now - self.last_message >= SPARE_IDLE {
            // Traffic has stopped: the kept readings go with the rest of a burst's memory,
            // and so does the room of the run's lists.
            self.spare.clear();
            self.decoded = Vec::new();
            self.batch = Vec::new();
            self.rows = BytesMut::new();
        }
        if self.decoded.capacity() > DECODED_KEEP {
            // A burst of many-record messages (SenML packs) does not stay allocated.
            self.decoded = Vec::new();
        }
        !over
    }

    fn stop(&mut self) {
        self.stage.input.stop();
    }

    fn finish(self: Box<Self>) {
        let Decoding { rules, span, .. } = *self;
        if let Some(rules) = rules {
            rules.finish();
        }
        tracing::debug!(parent: &span, "Decode stopped.");
    }
}

impl DecodeStage {
    /// Starts the rules (their state restored) and returns the stage as the store's feed
    /// (`store/feed.rs`); called on the store's thread, which runs it from then on.
    pub fn start(mut self) -> Box<dyn Feed> {
        let rules = self.rules.take().map(RulesStage::start);
        Box::new(Decoding {
            stage: self,
            rules,
            batch: Vec::with_capacity(BATCH),
            decoded: Vec::new(),
            spare: Spare::default(),
            rows: BytesMut::new(),
            dead: Warning::default(),
            unrouted: Warning::default(),
            span: tracing::info_span!(parent: None, "decode"),
            last_run: Instant::now(),
            last_message: Instant::now(),
        })
    }

    /// Decodes one message; its readings join `decoded`.
    fn handle(
        &self,
        pattern: &TopicPattern,
        mut message: RawMessage,
        decoded: &mut Vec<Reading>,
        spare: &mut Spare,
        rows: &mut BytesMut,
        warning: &mut Warning,
    ) {
        let receipt = message.receipt.take();
        let topic = message.topic();
        let payload = &message.payload;
        let received_at = message.received_at;
        let start = decoded.len();
        match decode_into(
            pattern,
            topic,
            payload,
            message.content_type.as_deref(),
            received_at,
            decoded,
            spare,
        ) {
            Ok(()) => {
                let readings = &decoded[start..];
                let format = readings[0].format;
                self.counters.count_decoded(format, readings.len());
                self.devices.observe(readings, received_at);
                if self.forward_readings {
                    let device = &readings[0].device;
                    let entry =
                        OutboxEntry::reading_in(rows, topic, device, payload, format, received_at);
                    self.store.append_acked(entry, receipt);
                } else if let Some(receipt) = receipt {
                    self.store.release(receipt);
                }
            }
            Err(error) => {
                self.counters.count_dead_letter(error.format());
                let reason = error.to_string();
                if warning.due() {
                    tracing::warn!(topic = %topic, client_id = %message.client_id, reason = %reason, count = warning.unreported, "Payloads did not decode; kept as dead letters.");
                    warning.reported();
                }
                let dl = DeadLetter {
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                    reason,
                    received_at,
                };
                self.store.dead_letter(dl, receipt);
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
            tracing::warn!(topic = %message.topic(), client_id = %message.client_id, pattern = %self.pattern, count = warning.unreported, "Publishes on topics outside ingest.topic_pattern; kept as dead letters.");
            warning.reported();
        }
        let dl = DeadLetter {
            topic: message.topic().to_owned(),
            payload: message.payload.to_vec(),
            reason,
            received_at: message.received_at,
        };
        self.store.dead_letter(dl, message.receipt);
    }
}
