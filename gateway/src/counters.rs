//! Live counters of the pipeline, shared by every stage and read by the status output.
//!
//! Invariants: counters only grow (the gauges named so excepted); a message is counted
//! once where it is accepted and once as decoded, dead-lettered or unrouted, so that
//! `ingested == decoded + dead_lettered + unrouted` once the pipeline is idle. Nothing
//! between the broker and the store drops a message: a stage that is behind makes the
//! one before it wait (`blocked_micros`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::reading::Format;

/// Counters of one stage or format; all relaxed atomics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Publishes the broker's connections handed over.
    pub ingested: AtomicU64,
    /// Publishes on topics outside `ingest.topic_pattern` (kept as dead letters).
    pub unrouted: AtomicU64,
    /// Time the broker's hand-off to the decode stage stayed full, in microseconds: the
    /// backpressure that slows devices down (counted from the run before the one that
    /// found it full).
    pub blocked_micros: AtomicU64,
    /// Gauge: publishes waiting in the broker's hand-off channel (at the end of the last
    /// batch).
    pub intake_queued: AtomicU64,
    /// Messages decoded, by format.
    pub decoded: ByFormat<AtomicU64>,
    /// Readings produced (a SenML pack may hold several).
    pub readings: AtomicU64,
    /// Readings produced, by format.
    pub readings_by_format: ByFormat<AtomicU64>,
    /// Messages that did not decode, by the format they were taken for.
    pub dead_lettered: ByFormat<AtomicU64>,
    /// Messages that did not decode and whose format was not recognised.
    pub dead_lettered_unknown: AtomicU64,
    /// Rule conditions evaluated (published by the rules stage).
    pub rule_evaluations: AtomicU64,
}

/// One value per payload format, read and written by [`Format`] (`by_format[Format::Cbor]`),
/// so no code depends on an order of the formats.
#[derive(Debug, Default)]
pub struct ByFormat<T> {
    json: T,
    cbor: T,
    senml_json: T,
    senml_cbor: T,
}

impl<T> ByFormat<T> {
    /// Each format with its value, in [`Format::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Format, &T)> {
        Format::ALL.into_iter().map(move |f| (f, &self[f]))
    }
}

impl<T> std::ops::Index<Format> for ByFormat<T> {
    type Output = T;
    fn index(&self, format: Format) -> &T {
        match format {
            Format::Json => &self.json,
            Format::Cbor => &self.cbor,
            Format::SenmlJson => &self.senml_json,
            Format::SenmlCbor => &self.senml_cbor,
        }
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn count_decoded(&self, format: Format, readings: usize) {
        Self::add(&self.decoded[format], 1);
        Self::add(&self.readings, readings as u64);
        Self::add(&self.readings_by_format[format], readings as u64);
    }

    pub fn count_dead_letter(&self, format: Option<Format>) {
        Self::add(self.dead_lettered_as(format), 1);
    }

    /// Dead letters of `format`; `None`: of no recognised format.
    pub fn dead_lettered_as(&self, format: Option<Format>) -> &AtomicU64 {
        match format {
            Some(format) => &self.dead_lettered[format],
            None => &self.dead_lettered_unknown,
        }
    }

    pub fn decoded_total(&self) -> u64 {
        self.decoded.iter().map(|(_, n)| Self::get(n)).sum()
    }

    pub fn dead_lettered_total(&self) -> u64 {
        let known: u64 = self.dead_lettered.iter().map(|(_, n)| Self::get(n)).sum();
        known + Self::get(&self.dead_lettered_unknown)
    }

    /// One line for logs: `ingested=.. decoded=.. readings=.. dead_lettered=.. ...`.
    pub fn summary(&self) -> String {
        format!(
            "ingested={} decoded={} readings={} dead_lettered={} unrouted={} blocked_ms={}",
            Self::get(&self.ingested),
            self.decoded_total(),
            Self::get(&self.readings),
            self.dead_lettered_total(),
            Self::get(&self.unrouted),
            Self::get(&self.blocked_micros) / 1000,
        )
    }
}

/// Upper bounds (seconds) of the buckets of every [`Histogram`]: 0.5 ms to one hour, wide
/// enough for a commit (milliseconds) and for forwarding a backlog after an outage (hours).
pub const HISTOGRAM_BOUNDS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
];

/// A histogram of durations with the fixed buckets [`HISTOGRAM_BOUNDS`]; lock-free, every
/// field a relaxed atomic, so observing costs a few nanoseconds on any thread.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; HISTOGRAM_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative), `HISTOGRAM_BOUNDS.len() + 1` entries.
    pub buckets: Vec<u64>,
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe_micros(&self, micros: u64) {
        self.observe_micros_n(micros, 1);
    }

    /// Records `n` observations of the same duration.
    pub fn observe_micros_n(&self, micros: u64, n: u64) {
        let seconds = micros as f64 / 1e6;
        let i = HISTOGRAM_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(HISTOGRAM_BOUNDS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros * n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(Counters::get).collect(),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}
