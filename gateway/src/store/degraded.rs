//! Degraded mode of the owner thread: what it does after a failed commit (disk full, an
//! I/O error) until a reopen of the file works again.
//!
//! Owns the transitions of [`Owner`] into and out of the degraded state; the state itself
//! (retry schedule, acks kept for later) and the reader slot are in [`super::health`].
//! Invariants:
//! - A failed commit makes the store degraded: nothing more is written through that
//!   handle (it stays open only until the next reopen), data commands are refused and
//!   counted by kind (their receipts dropped unreleased: no device is acknowledged), acks are kept (bounded), and a reopen is retried with backoff.
//! - Entering and leaving the state log one line each; the retries in between do not.
//! - A read-only handle is opened before the failed writer is dropped, so committed rows
//!   stay readable (the forwarder keeps draining them).
//! - Recovery applies the journal to the reopened file (the groups that were durable but
//!   not yet checkpointed when the writes failed; until then the forwarder reads only
//!   what was checkpointed), takes the counters from the file (the truth about what was
//!   committed), and the kept acks are committed by the next group.

use std::sync::Arc;
use std::time::Duration;

use redb::{ConcurrencyMode, Database};

use super::health::{self, Degraded, Reader};
use super::stats::Counter;
use super::writer::{open_file, Group, Owner};
use super::{DataCmd, StoreError};

impl Owner {
    /// Entries refused so far, of every kind.
    fn refused_total(&self) -> u64 {
        [
            Counter::DropRefusedReadings,
            Counter::DropRefusedEvents,
            Counter::RefusedDeadLetters,
            Counter::RefusedState,
            Counter::RefusedEventLog,
        ]
        .iter()
        .map(|&c| self.counters.get(c))
        .sum()
    }

    /// A commit failed: stop writing through this handle (redb fails every later
    /// transaction on it), keep committed rows readable, keep the group's acks, and say so
    /// once.
    pub(super) fn enter_degraded(&mut self, error: &StoreError, group: &mut Group) {
        let mut d = Degraded::new(self.refused_total(), self.cfg.health_retry);
        self.keep_acks(&mut d, group);
        self.counters.add(Counter::StorageErrors, 1);
        self.counters.set_degraded(Some(d.since));
        tracing::error!(
            path = %self.path.display(),
            error = %error,
            "Storage unavailable: a write to the database failed. The outbox is refusing new entries; \
             readings and events are not buffered until space returns. Rules keep running and events are \
             still published locally; committed rows stay readable and are forwarded. Retrying every 1 to 5 s."
        );
        self.degraded = Some(d);
        // Aborted: what it held of earlier groups is in the journal, replayed on recovery.
        self.txn = None;
        // A read-only handle opens only while the failed writer is still open: once that
        // is dropped the file needs a repair, which only a writable open can do.
        let reader = health::open_reader(&self.path);
        if let Ok(mut slot) = self.slot.write() {
            *slot = reader;
        }
        self.failed = self.db.take();
    }

    /// Keeps the group's acks in `d`; acks beyond the bound are given up (those rows are
    /// sent again) and counted as committed so the forwarder does not wait for them.
    fn keep_acks(&self, d: &mut Degraded, group: &mut Group) {
        let discarded = d.keep_acks(group.acks.drain(..));
        if discarded > 0 {
            self.counters.add(Counter::AcksDiscarded, discarded);
            self.counters.add_acks_committed(discarded);
        }
    }

    /// While degraded: counts the group's data commands as refused, keeps its acks.
    pub(super) fn refuse(&mut self, group: &mut Group) {
        for cmd in group.data.drain(..) {
            let c = match cmd {
                DataCmd::Append(e, _) => Counter::refused(e.lane),
                DataCmd::DeadLetter(..) => Counter::RefusedDeadLetters,
                // Dropped unreleased: the device is not acknowledged and sends it again.
                DataCmd::Receipt(_) => continue,
                DataCmd::PutState(..) | DataCmd::DeleteState(_) => Counter::RefusedState,
                DataCmd::LogEvent { .. } => Counter::RefusedEventLog,
                // A command not stored is not acked upstream; one not removed stays
                // queued and is delivered again.
                DataCmd::QueueCommand(..) | DataCmd::CommandDone { .. } => {
                    Counter::DropRefusedEvents
                }
            };
            self.counters.add(c, 1);
        }
        if let Some(mut d) = self.degraded.take() {
            self.keep_acks(&mut d, group);
            self.degraded = Some(d);
        }
    }

    /// When a retry is due: reopens the file and commits the counters to it. On success
    /// the store is healthy again and the kept acks join `group`, to be committed now.
    pub(super) fn try_recover(&mut self, group: &mut Group) {
        let Some(d) = self.degraded.as_mut().filter(|d| d.due()) else {
            return;
        };
        if health::free_bytes(&self.path).is_some_and(|free| free < health::RECOVERY_HEADROOM) {
            d.retry_later();
            return;
        }
        // The file lock of the failed handle must go before the file can be reopened.
        self.failed = None;
        let opened = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(self.cfg.cache_size)
            .open(&self.path)
            .map_err(StoreError::from)
            .map(Arc::new)
            .and_then(
                |db| match open_file(&db, &mut self.journal, &self.counters, true) {
                    Ok(_) => Ok(db),
                    Err(e) => {
                        self.failed = Some(db);
                        Err(e)
                    }
                },
            );
        let db = match opened {
            Ok(db) => db,
            Err(e) => {
                tracing::debug!(error = %e, "storage still unavailable");
                d.retry_later();
                let missing = self.slot.read().map_or(true, |s| s.is_none());
                if missing {
                    let reader = health::open_reader(&self.path);
                    if let Ok(mut slot) = self.slot.write() {
                        *slot = reader;
                    }
                }
                return;
            }
        };
        let Some(d) = self.degraded.take() else {
            return;
        };
        for &c in Counter::ALL {
            self.meta[c as usize] = self.counters.get(c);
        }
        if let Ok(mut slot) = self.slot.write() {
            *slot = Some(Reader::Writer(db.clone()));
        }
        self.db = Some(db);
        self.counters.set_degraded(None);
        let refused = self.refused_total().saturating_sub(d.refused_before);
        let after = humantime::format_duration(Duration::from_secs(d.started.elapsed().as_secs()));
        tracing::info!(
            path = %self.path.display(),
            refused,
            acks_pending = d.ack_count,
            "Storage recovered after {after}, {refused} entries refused; the outbox accepts new entries again."
        );
        group.acks.extend(d.acks);
        // The forwarder may have read nothing meanwhile: let it read again.
        self.new_rows.notify_one();
    }
}
