//! Counters of the store: live atomics inside the gateway, persisted in `META`, and the
//! `gateway outbox stats` report that reads them from the file.
//!
//! Invariants:
//! - Every [`Counter`] is persisted under its name in `META` at each commit, so the file
//!   alone tells depth, totals and drops, whether or not the gateway runs. The database
//!   epoch (`META.epoch`, not a counter) is loaded and reported with them.
//! - Live counters ([`Counter::is_live`]: queue drops `*_overflow`, `commit_failed`,
//!   refusals while the storage is unavailable `*refused*`, `storage.*`) are counted on
//!   the thread that saw them, at once, and persisted with the next commit; everything
//!   else is published to the atomics only after the commit that made it true.
//! - `storage_degraded` is a gauge of this process only: it is never persisted (a
//!   degraded store cannot write), so the report of a file does not show it.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable};

use super::tables::{self, META};
use super::{ByLane, Lane, StoreError};
use crate::counters::{Histogram, HistogramSnapshot};
use crate::reading::{now_millis, Millis};

macro_rules! counters {
    ($($variant:ident => $name:literal,)*) => {
        /// Every persisted counter of the store, with its name in `META`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $($variant,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];
            pub fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    NextSeq => "next_seq",
    ReadingsMessages => "readings.messages",
    ReadingsBytes => "readings.bytes",
    EventsMessages => "events.messages",
    EventsBytes => "events.bytes",
    AppendedReadings => "appended.readings",
    AppendedEvents => "appended.events",
    Acked => "acked",
    DropStoreOverflow => "drop.store_overflow",
    DropMaxBytesReadings => "drop.max_bytes.readings",
    DropMaxBytesEvents => "drop.max_bytes.events",
    DropMaxAgeReadings => "drop.max_age.readings",
    DropMaxAgeEvents => "drop.max_age.events",
    DropRejectedFull => "drop.rejected_full",
    DropCommitFailed => "drop.commit_failed",
    DropDeadLetterOverflow => "drop.dead_letter_overflow",
    DropStateOverflow => "drop.state_overflow",
    DropEventLogOverflow => "drop.event_log_overflow",
    DeadLettersEvicted => "dead_letters.evicted",
    DeadLetterNext => "dead_letters.next",
    DeadLetterRows => "dead_letters.rows",
    EventLogNext => "event_log.next",
    EventLogRows => "event_log.rows",
    EventLogEvicted => "event_log.evicted",
    DropRefusedReadings => "drop.refused.readings",
    DropRefusedEvents => "drop.refused.events",
    RefusedDeadLetters => "refused.dead_letters",
    RefusedState => "refused.state",
    RefusedEventLog => "refused.event_log",
    StorageErrors => "storage.errors",
    AcksDiscarded => "storage.acks_discarded",
    CommandsNext => "commands.next",
    CommandsPending => "commands.pending",
    CommandsQueued => "commands.queued",
    CommandsDelivered => "commands.delivered",
    CommandsExpired => "commands.expired",
    CommandsDropped => "commands.dropped",
}

impl Counter {
    /// Counted live where it happens (a full queue, a refusal while the storage is
    /// unavailable, a storage error), not by a commit; a failed commit does not revert it.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Counter::DropStoreOverflow
                | Counter::DropDeadLetterOverflow
                | Counter::DropStateOverflow
                | Counter::DropEventLogOverflow
                | Counter::DropCommitFailed
                | Counter::DropRefusedReadings
                | Counter::DropRefusedEvents
                | Counter::RefusedDeadLetters
                | Counter::RefusedState
                | Counter::RefusedEventLog
                | Counter::StorageErrors
                | Counter::AcksDiscarded
        )
    }

    /// Outbox appends refused while the storage is unavailable, by lane.
    pub fn refused(lane: Lane) -> Counter {
        match lane {
            Lane::Reading => Counter::DropRefusedReadings,
            Lane::Event => Counter::DropRefusedEvents,
        }
    }

    pub fn messages(lane: Lane) -> Counter {
        match lane {
            Lane::Reading => Counter::ReadingsMessages,
            Lane::Event => Counter::EventsMessages,
        }
    }

    pub fn bytes(lane: Lane) -> Counter {
        match lane {
            Lane::Reading => Counter::ReadingsBytes,
            Lane::Event => Counter::EventsBytes,
        }
    }

    /// The `reason` of a drop counter (`drop.max_bytes.readings` -> `max_bytes_readings`),
    /// `None` for the others; the label of `gateway_outbox_dropped_total`.
    pub fn drop_reason(self) -> Option<String> {
        self.name()
            .strip_prefix("drop.")
            .map(|reason| reason.replace('.', "_"))
    }
}

/// The live counters shared by the owner thread and every handle.
pub struct Counters {
    values: Vec<AtomicU64>,
    /// `received_at` of the oldest row per lane, `i64::MIN` when the lane is empty.
    oldest: ByLane<AtomicI64>,
    commits: AtomicU64,
    /// Acked seqs applied by committed transactions since open (found or not).
    acks_committed: AtomicU64,
    last_commit_micros: AtomicU64,
    max_commit_micros: AtomicU64,
    /// Wall-clock millis since the storage is unavailable; 0 while it works.
    degraded_since: AtomicI64,
    /// The database epoch (`META.epoch`); 0 until it is read.
    epoch: AtomicU64,

    commit_seconds: Histogram,
    checkpoint_seconds: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: Counter::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            oldest: ByLane::from_fn(|_| AtomicI64::new(i64::MIN)),
            commits: AtomicU64::new(0),
            acks_committed: AtomicU64::new(0),
            last_commit_micros: AtomicU64::new(0),
            max_commit_micros: AtomicU64::new(0),
            degraded_since: AtomicI64::new(0),
            epoch: AtomicU64::new(0),

            commit_seconds: Histogram::default(),
            checkpoint_seconds: Histogram::default(),
        }
    }
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }
    pub fn set(&self, c: Counter, v: u64) {
        self.values[c as usize].store(v, Ordering::Relaxed)
    }
    pub fn add(&self, c: Counter, v: u64) {
        self.values[c as usize].fetch_add(v, Ordering::Relaxed);
    }
    pub fn set_oldest(&self, lane: Lane, at: Option<Millis>) {
        self.oldest[lane].store(at.unwrap_or(i64::MIN), Ordering::Relaxed);
    }
    pub fn add_acks_committed(&self, n: u64) {
        self.acks_committed.fetch_add(n, Ordering::Release);
    }
    pub fn acks_committed(&self) -> u64 {
        self.acks_committed.load(Ordering::Acquire)
    }
    /// True while the storage is unavailable and writes are refused.
    pub fn degraded(&self) -> bool {
        self.degraded_since.load(Ordering::Acquire) != 0
    }
    pub fn set_degraded(&self, since: Option<Millis>) {
        self.degraded_since
            .store(since.map_or(0, |t| t.max(1)), Ordering::Release);
    }
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed)
    }
    pub fn record_commit(&self, micros: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.last_commit_micros.store(micros, Ordering::Relaxed);
        self.max_commit_micros.fetch_max(micros, Ordering::Relaxed);
        self.commit_seconds.observe_micros(micros);
    }
    /// A checkpoint: the journaled groups committed to the database file.
    pub fn record_checkpoint(&self, micros: u64) {
        self.checkpoint_seconds.observe_micros(micros);
    }

    pub fn snapshot(&self) -> OutboxStats {
        let now = now_millis();
        let lane = |l: Lane| {
            let oldest = self.oldest[l].load(Ordering::Relaxed);
            LaneStats {
                messages: self.get(Counter::messages(l)),
                bytes: self.get(Counter::bytes(l)),
                oldest_received_at: (oldest != i64::MIN).then_some(oldest),
                oldest_age_ms: (oldest != i64::MIN).then(|| (now - oldest).max(0) as u64),
            }
        };
        let epoch = self.epoch();
        OutboxStats {
            epoch: (epoch != 0).then_some(epoch),
            lanes: ByLane::from_fn(lane),
            counters: Counter::ALL.iter().map(|&c| (c, self.get(c))).collect(),
            commits: self.commits.load(Ordering::Relaxed),
            last_commit_micros: self.last_commit_micros.load(Ordering::Relaxed),
            max_commit_micros: self.max_commit_micros.load(Ordering::Relaxed),
            storage: Some(match self.degraded_since.load(Ordering::Acquire) {
                0 => StorageHealth::Ok,
                since => StorageHealth::Degraded {
                    since,
                    for_ms: (now - since).max(0) as u64,
                },
            }),

            commit_seconds: self.commit_seconds.snapshot(),
            checkpoint_seconds: self.checkpoint_seconds.snapshot(),
        }
    }
}

/// Whether the store can write, as this process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageHealth {
    Ok,
    /// Writes failed (disk full, I/O error): new entries are refused until a retry works.
    Degraded {
        /// Wall-clock millis of the failure.
        since: Millis,
        for_ms: u64,
    },
}

/// Depth of one lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneStats {
    pub messages: u64,
    pub bytes: u64,
    pub oldest_received_at: Option<Millis>,
    pub oldest_age_ms: Option<u64>,
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// The database epoch, the middle part of every message id; `None` for a file from
    /// before epochs that no gateway has opened since.
    pub epoch: Option<u64>,
    /// Depth of each lane.
    pub lanes: ByLane<LaneStats>,
    /// Every persisted counter (totals, drops by reason, table sizes).
    pub counters: Vec<(Counter, u64)>,
    /// Commits since this process opened the store (0 when read from the file).
    pub commits: u64,
    pub last_commit_micros: u64,
    pub max_commit_micros: u64,
    /// Storage health of the running store; `None` when read from the file.
    pub storage: Option<StorageHealth>,

    /// Durations of this process's commits.
    pub commit_seconds: HistogramSnapshot,
    /// Durations of this process's checkpoints (`journal.rs`).
    pub checkpoint_seconds: HistogramSnapshot,
}

impl OutboxStats {
    pub fn get(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }

    /// Total rows dropped by any reason.
    pub fn dropped(&self) -> u64 {
        self.counters
            .iter()
            .filter(|(c, _)| c.name().starts_with("drop."))
            .map(|(_, v)| v)
            .sum()
    }

    /// 1 while the running store refuses writes (storage unavailable), else 0.
    pub fn storage_degraded(&self) -> u64 {
        u64::from(matches!(self.storage, Some(StorageHealth::Degraded { .. })))
    }

    /// Messages waiting in both lanes.
    pub fn depth(&self) -> u64 {
        self.lanes.iter().map(|(_, l)| l.messages).sum()
    }

    /// Bytes waiting in both lanes.
    pub fn bytes(&self) -> u64 {
        self.lanes.iter().map(|(_, l)| l.bytes).sum()
    }

    /// Age of the oldest message of either lane; `None` when both are empty.
    pub fn oldest_age_ms(&self) -> Option<u64> {
        self.lanes.iter().filter_map(|(_, l)| l.oldest_age_ms).max()
    }

    /// Writes the human-readable report of `gateway outbox stats`.
    pub fn write_report(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let age = |a: Option<u64>| match a {
            Some(ms) => {
                humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
            }
            None => "-".into(),
        };
        writeln!(
            out,
            "depth: {} messages, {} bytes",
            self.depth(),
            self.bytes()
        )?;
        for (lane, l) in self.lanes.iter() {
            writeln!(
                out,
                "  {:<9} {:>10} messages {:>12} bytes  oldest age {}",
                lane.as_str(),
                l.messages,
                l.bytes,
                age(l.oldest_age_ms)
            )?;
        }
        writeln!(out, "oldest age: {}", age(self.oldest_age_ms()))?;
        if let Some(epoch) = self.epoch {
            writeln!(out, "database epoch: {}", tables::epoch_hex(epoch))?;
        }
        match self.storage {
            Some(StorageHealth::Ok) => writeln!(out, "storage: ok")?,
            Some(StorageHealth::Degraded { for_ms, .. }) => writeln!(
                out,
                "storage: DEGRADED for {}: new entries are refused",
                age(Some(for_ms))
            )?,
            None => {}
        }
        let errors = self.get(Counter::StorageErrors);
        let refused: u64 = Lane::ALL
            .iter()
            .map(|&lane| self.get(Counter::refused(lane)))
            .sum();
        if errors > 0 {
            writeln!(
                out,
                "storage errors: {errors} (outbox entries refused while unavailable: {refused})"
            )?;
        }
        writeln!(out, "counters:")?;
        for (c, v) in &self.counters {
            writeln!(out, "  {:<28} {v}", c.name())?;
        }
        Ok(())
    }
}

/// Reads the counters and oldest rows from a database file.
pub(crate) fn read_stats(db: &impl ReadableDatabase) -> Result<OutboxStats, StoreError> {
    let counters = Counters::default();
    let txn = db.begin_read()?;
    match txn.open_table(META) {
        Ok(meta) => {
            for &c in Counter::ALL {
                if let Some(v) = meta.get(c.name())? {
                    counters.set(c, v.value());
                }
            }
            if let Some(v) = meta.get(tables::EPOCH)? {
                counters.set_epoch(v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    for lane in Lane::ALL {
        match txn.open_table(tables::lane_table(lane)) {
            Ok(t) => {
                let first = t.first()?;
                counters.set_oldest(
                    lane,
                    first.and_then(|(_, v)| tables::outbox_received_at(v.value())),
                );
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut stats = counters.snapshot();
    stats.storage = None;
    Ok(stats)
}

/// Opens `path` read-only (allowed while the gateway holds it: both use redb's
/// `SingleWriter` mode) and returns its counters.
pub fn read_stats_file(path: &Path) -> Result<OutboxStats, StoreError> {
    read_stats(&super::read::open_read_only(path)?)
}

/// `gateway outbox stats`: prints depth in messages and bytes, oldest age, per-lane counts
/// and drop counters of the database at `path`, whether or not the gateway is running.
pub fn stats_command(path: &Path, out: &mut dyn Write) -> Result<(), StoreError> {
    let stats = read_stats_file(path)?;
    stats.write_report(out).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stats: &OutboxStats) -> String {
        let mut out = Vec::new();
        stats.write_report(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_report_tells_storage_health_and_refusals() {
        let counters = Counters::default();
        let healthy = counters.snapshot();
        assert_eq!(healthy.storage, Some(StorageHealth::Ok));
        assert_eq!(healthy.storage_degraded(), 0);
        assert!(report(&healthy).contains("storage: ok"));
        assert!(!report(&healthy).contains("storage errors"));

        counters.set_degraded(Some(now_millis() - 2000));
        counters.add(Counter::StorageErrors, 1);
        counters.add(Counter::DropRefusedReadings, 5);
        counters.add(Counter::DropRefusedEvents, 2);
        let degraded = counters.snapshot();
        assert_eq!(degraded.storage_degraded(), 1);
        let text = report(&degraded);
        assert!(text.contains("storage: DEGRADED for 2s"), "{text}");
        assert!(
            text.contains("storage errors: 1 (outbox entries refused while unavailable: 7)"),
            "{text}"
        );
        assert!(text.contains("drop.refused.readings"));
        assert_eq!(degraded.dropped(), 7);

        counters.set_degraded(None);
        assert_eq!(counters.snapshot().storage_degraded(), 0);
    }
}
