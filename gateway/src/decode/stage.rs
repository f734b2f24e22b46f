//! The decode stage: takes [`RawMessage`]s off the ingest queue, decodes them, hands
//! readings on and keeps what does not decode in the dead-letter table.
//!
//! Runs on its own OS thread (decoding is CPU work, and the store and rule hand-offs are
//! non-blocking channel sends).
//!
//! Invariants:
//! - every message is counted exactly once as decoded or dead-lettered;
//! - a bad payload never stops the stage; the log says so at most once per
//!   [`WARN_INTERVAL`], with the latest reason;
//! - the stage ends when the ingest queue is closed and empty;
//! - every decoded message updates the device read model ([`Devices`]) once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{decode, TopicPattern};
use crate::counters::Counters;
use crate::devices::Devices;
use crate::ingest::RawMessage;
use crate::reading::Reading;
use crate::store::{DeadLetter, OutboxEntry, StoreHandle};

/// Least time between two log lines about dead letters.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The decode stage.
pub struct DecodeStage {
    pub pattern: TopicPattern,
    pub input: flume::Receiver<RawMessage>,
    pub counters: Arc<Counters>,
    pub store: StoreHandle,
    /// Append decoded readings to the outbox (forwarding on and `forward_readings`).
    pub forward_readings: bool,
    /// Where decoded readings go next (the rules stage), when anything listens.
    pub readings: Option<flume::Sender<Reading>>,
    /// The device read model (last values, last seen).
    pub devices: Arc<Devices>,
}

impl DecodeStage {
    pub fn run(self) {
        let _span = tracing::info_span!("decode").entered();
        let mut last_warning: Option<Instant> = None;
        let mut unreported = 0u64;
        for message in self.input.iter() {
            let RawMessage {
                topic,
                payload,
                content_type,
                received_at,
            } = message;
            match decode(
                &self.pattern,
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
                        self.store.append(OutboxEntry::reading(
                            topic,
                            device,
                            payload.to_vec(),
                            format,
                            received_at,
                        ));
                    }
                    if let Some(next) = &self.readings {
                        for reading in readings {
                            // The rules stage keeps up or its queue fills; a full queue
                            // must not stall decoding, so the reading is counted and skipped.
                            if next.try_send(reading).is_err() {
                                Counters::add(&self.counters.rules_overflow, 1);
                            }
                        }
                    }
                }
                Err(error) => {
                    self.counters.count_dead_letter(error.format());
                    unreported += 1;
                    let reason = error.to_string();
                    if last_warning.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
                        tracing::warn!(topic = %topic, reason = %reason, count = unreported, "Payloads did not decode; kept as dead letters.");
                        last_warning = Some(Instant::now());
                        unreported = 0;
                    }
                    self.store.dead_letter(DeadLetter {
                        topic,
                        payload: payload.to_vec(),
                        reason,
                        received_at,
                    });
                }
            }
        }
        tracing::debug!("Decode stopped.");
    }
}
