//! When the store's next group commit starts, for a stage that wants to hand its work
//! over just before it rather than as it comes.
//!
//! Under load the owner thread sleeps out the commit spacing (`writer.rs`), so what a
//! stage hands over during the spacing waits for the commit anyway. The decode stage
//! (`ingest.rs` `Intake`) uses this clock to wake once per commit, shortly before it, and
//! hand over everything that arrived meanwhile: one wake-up of its thread per commit
//! instead of two per batch, and no added wait except for what arrives in the moment
//! before a commit, which joins the next one.
//!
//! Invariants:
//! - set by the owner thread after each commit starts: the moment the next one may
//!   start while commands stream in (the last group held several), none otherwise (a
//!   command after a quiet spell is committed at once, and must not be held back);
//! - a reader only gets a time in the future or none;
//! - a commit that was due and has not started (the one before it is still waiting for
//!   the disk) starts at the earliest now, and the one after it a spacing later: that is
//!   the time a reader gets then, so that it still wakes once per commit (BENCHMARKS.md,
//!   "Decode paced to late commits too").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The store's next commit, shared by the owner thread and its readers.
#[derive(Debug)]
pub struct CommitClock {
    base: Instant,
    /// Nanoseconds after `base` of the next commit; 0 for none.
    next: AtomicU64,
    /// `storage.flush_interval`: commits start at least this far apart.
    spacing: Duration,
}

impl CommitClock {
    pub(crate) fn new(spacing: Duration) -> Self {
        CommitClock {
            base: Instant::now(),
            next: AtomicU64::new(0),
            spacing,
        }
    }

    /// The least time between the starts of two commits.
    pub fn spacing(&self) -> Duration {
        self.spacing
    }

    /// Sets (or clears) the moment the next commit may start (the store's owner thread;
    /// tests of its readers).
    pub(crate) fn set(&self, next: Option<Instant>) {
        let nanos = next.map_or(0, |t| {
            (t.saturating_duration_since(self.base).as_nanos() as u64).max(1)
        });
        self.next.store(nanos, Ordering::Relaxed);
    }

    /// The start of the next commit that what is handed over after `now` can join, while
    /// commits are paced: the next one when it is still to come; when it is overdue (the
    /// owner thread is still in the commit before it), the earliest start of the one
    /// after it, as what is handed over now goes into the overdue one.
    pub fn next_after(&self, now: Instant) -> Option<Instant> {
        let nanos = self.next.load(Ordering::Relaxed);
        if nanos == 0 {
            return None;
        }
        let next = self.base + Duration::from_nanos(nanos);
        Some(if next > now { next } else { now + self.spacing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_expected_only_when_set_and_only_in_the_future_even_when_overdue() {
        let clock = CommitClock::new(Duration::from_millis(1));
        let now = Instant::now();
        assert_eq!(clock.next_after(now), None);
        let next = now + Duration::from_millis(1);
        clock.set(Some(next));
        assert_eq!(clock.next_after(now), Some(next));
        let late = next + Duration::from_micros(300);
        assert_eq!(
            clock.next_after(late),
            Some(late + Duration::from_millis(1)),
            "an overdue commit takes what comes now; the next one is a spacing later"
        );
        clock.set(None);
        assert_eq!(clock.next_after(now), None);
    }
}
