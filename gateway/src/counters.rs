//! Live counters of the pipeline, shared by every stage and read by the status output.
//!
//! Invariants: counters only grow; a message is counted once where it is accepted,
//! once where it is decoded or dead-lettered, and once more wherever it is dropped, with
//! the reason, so that `ingested == decoded + dead_lettered + dropped` once the pipeline
//! is idle.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::reading::Format;

/// Counters of one stage or format; all relaxed atomics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages the ingest link received from the broker.
    pub ingested: AtomicU64,
    /// Messages the broker dropped before ingest read them (its in-memory log overran).
    pub link_lost: AtomicU64,
    /// Messages dropped because the decode queue was full.
    pub ingest_overflow: AtomicU64,
    /// Readings dropped because the rules queue was full.
    pub rules_overflow: AtomicU64,
    /// Messages decoded, by format (index of [`Format::ALL`]).
    pub decoded: [AtomicU64; 4],
    /// Readings produced (a SenML pack may hold several).
    pub readings: AtomicU64,
    /// Messages that did not decode, by format when one was recognised; `[4]` = none.
    pub dead_lettered: [AtomicU64; 5],
}

fn index(format: Format) -> usize {
    Format::ALL.iter().position(|f| *f == format).unwrap_or(0)
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn count_decoded(&self, format: Format, readings: usize) {
        Self::add(&self.decoded[index(format)], 1);
        Self::add(&self.readings, readings as u64);
    }

    pub fn count_dead_letter(&self, format: Option<Format>) {
        Self::add(&self.dead_lettered[format.map_or(4, index)], 1);
    }

    pub fn decoded_total(&self) -> u64 {
        self.decoded.iter().map(Self::get).sum()
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.iter().map(Self::get).sum()
    }

    /// One line for logs: `ingested=.. decoded=.. readings=.. dead_lettered=.. ...`.
    pub fn summary(&self) -> String {
        format!(
            "ingested={} decoded={} readings={} dead_lettered={} ingest_overflow={} link_lost={} rules_overflow={}",
            Self::get(&self.ingested),
            self.decoded_total(),
            Self::get(&self.readings),
            self.dead_lettered_total(),
            Self::get(&self.ingest_overflow),
            Self::get(&self.link_lost),
            Self::get(&self.rules_overflow),
        )
    }
}
