//! Retention: what leaves the outbox without an upstream ack, and how the drops are told.
//!
//! Owns the retention pass of every write transaction ([`Owner::enforce_retention`]) and
//! the warning about drops.
//! Invariants:
//! - Rows leave the outbox oldest first, by age (`max_age`) and then by size
//!   (`max_bytes`); with `drop_oldest_readings` the events lane is trimmed for size only
//!   when no reading is left; every drop is counted by reason and lane.
//! - Dead letters and the event log keep at most `dead_letter_max` and `event_log_max`
//!   rows; what is trimmed is counted as evicted. Checked by each group that adds to
//!   them, and by the first group after the store opened or a commit failed.
//! - Runs inside the group's write transaction, so a drop is committed together with the
//!   appends that caused it, or not at all.
//! - Drops are logged at most once per [`DROP_LOG_INTERVAL`] with the counts since the
//!   last line, so a burst gives one warning, not one per row.

use std::time::{Duration, Instant};

use redb::ReadableTableMetadata;

use super::fresh::Outbox;
use super::journal::{LazyLogged, Logged};
use super::stats::Counter;
use super::writer::{Owner, KEY_BYTES};
use super::{Lane, OverflowPolicy, StoreError};
use crate::reading::{now_millis, Millis};

/// Drop warnings are at most this frequent.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Owner {
    /// Applies every retention limit to the tables of the transaction being built.
    pub(super) fn enforce_retention(
        &mut self,
        readings: &mut Outbox<'_, '_>,
        events: &mut Outbox<'_, '_>,
        dead: &mut LazyLogged<'_, '_, u64, &'static [u8]>,
        log: &mut LazyLogged<'_, '_, (i64, u64), &'static [u8]>,
    ) -> Result<(), StoreError> {
        self.enforce_age(readings, Lane::Reading)?;
        self.enforce_age(events, Lane::Event)?;
        self.enforce_bytes(readings, Lane::Reading)?;
        if self.cfg.overflow_policy == OverflowPolicy::DropOldestReadings {
            self.enforce_bytes(events, Lane::Event)?;
        }
        // The dead letters and the event log grow only by the groups that write to them,
        // which opened them: their bounds are checked then, and by the first group after
        // the store opened or a commit failed, when their row counts are not known.
        let unknown = std::mem::take(&mut self.side_rows_unknown);
        if unknown || dead.is_open() {
            let dead = dead.get()?;
            let evicted = trim(dead, self.cfg.dead_letter_max)?;
            self.add(Counter::DeadLettersEvicted, evicted);
            self.set(Counter::DeadLetterRows, dead.len()?);
        }
        if unknown || log.is_open() {
            let log = log.get()?;
            let evicted = trim(log, self.cfg.event_log_max)?;
            self.add(Counter::EventLogEvicted, evicted);
            self.set(Counter::EventLogRows, log.len()?);
        }
        Ok(())
    }

    /// Drops rows of `lane` older than `max_age`, oldest first.
    fn enforce_age(&mut self, table: &mut Outbox<'_, '_>, lane: Lane) -> Result<(), StoreError> {
        let Some(max_age) = self.cfg.max_age else {
            return Ok(());
        };
        let cutoff: Millis = now_millis() - max_age.as_millis() as Millis;
        let reason = match lane {
            Lane::Reading => Counter::DropMaxAgeReadings,
            Lane::Event => Counter::DropMaxAgeEvents,
        };
        loop {
            let len = match table.first()? {
                Some(first) if first.received_at.unwrap_or(0) < cutoff => first.len + KEY_BYTES,
                _ => return Ok(()),
            };
            table.pop_first()?;
            self.drop_row(lane, len, reason);
        }
    }

    /// Drops the oldest rows of `lane` while the outbox is over `max_bytes`.
    fn enforce_bytes(&mut self, table: &mut Outbox<'_, '_>, lane: Lane) -> Result<(), StoreError> {
        let reason = match lane {
            Lane::Reading => Counter::DropMaxBytesReadings,
            Lane::Event => Counter::DropMaxBytesEvents,
        };
        while self.depth_bytes() > self.cfg.max_bytes {
            let Some(len) = table.pop_first()? else {
                return Ok(());
            };
            let len = len + KEY_BYTES;
            self.drop_row(lane, len, reason);
        }
        Ok(())
    }

    fn drop_row(&mut self, lane: Lane, len: u64, reason: Counter) {
        self.sub(Counter::messages(lane), 1);
        self.sub(Counter::bytes(lane), len);
        self.add(reason, 1);
    }

    /// One warning per burst of drops: the counts by reason since the last warning.
    pub(super) fn log_drops(&mut self, force: bool) {
        let due = self
            .last_drop_log
            .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL);
        if !(due || force) {
            return;
        }
        let mut parts = Vec::new();
        for &c in Counter::ALL {
            // Refusals while degraded are told by the recovery line, not every 10 s.
            if !c.name().starts_with("drop.") || c.name().starts_with("drop.refused.") {
                continue;
            }
            let now = self.counters.get(c);
            let before = std::mem::replace(&mut self.drops_logged[c as usize], now);
            if now > before {
                parts.push(format!("{}={}", c.name(), now - before));
            }
        }
        if !parts.is_empty() {
            tracing::warn!(drops = %parts.join(" "), "outbox dropped messages");
            self.last_drop_log = Some(Instant::now());
        }
    }
}

/// Removes the oldest rows of `table` beyond `max` rows; returns how many.
fn trim<K: redb::Key + 'static>(
    table: &mut Logged<'_, '_, K, &'static [u8]>,
    max: u64,
) -> Result<u64, StoreError> {
    let len = table.len()?;
    let excess = len.saturating_sub(max);
    for _ in 0..excess {
        table.pop_first()?;
    }
    Ok(excess)
}
