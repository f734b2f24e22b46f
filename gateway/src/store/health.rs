//! Storage health: what readers use while the writer is healthy or degraded, and the
//! bookkeeping of a degraded period (disk full, I/O error).
//!
//! Owns: the reader slot shared by the owner thread and every handle, and the state of a
//! degraded period (cause, retry schedule, acks kept for later).
//! Invariants:
//! - The slot holds the owner's writable `Database` while writes work; after a failed
//!   write it holds a read-only handle of the same file, so committed rows stay readable.
//!   Verified on redb 4.6 with a full tmpfs: after ENOSPC every transaction of the failed
//!   `Database` (reads too) returns `PreviousIo`; a read-only open succeeds while the
//!   failed handle is still open, but once it is dropped the file needs a repair and a
//!   read-only open fails (`RepairAborted`); a writable open repairs it. So the reader is
//!   opened before the failed writer is dropped; the slot is empty only if that open
//!   failed, or after shutdown.
//! - Retries back off from the first to the longest wait of `StoreConfig::health_retry`
//!   ([`RETRY_MIN`] to [`RETRY_MAX`] unless a test shortens them); none of them logs,
//!   only the entry into the degraded state and the recovery do (one line each).
//! - A retry reopens the file only when its filesystem has [`RECOVERY_HEADROOM`] free
//!   (when that can be told): a few freed pages must not make the store flap between
//!   recovered and degraded.
//! - Acks received while degraded are kept, at most [`PENDING_ACKS_MAX`] seqs; beyond that
//!   they are discarded and counted (`storage.acks_discarded`): those rows stay in the
//!   outbox and are sent again, a duplicate, never a loss.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadOnlyDatabase};

use super::{read, Lane, StoreError};
use crate::backoff::Backoff;
use crate::reading::{now_millis, Millis};

/// First retry after a failed write.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two retries.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// The retry schedule: no jitter, one owner thread retries alone.
pub const RETRY: Backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
/// Least free space on the database's filesystem before a reopen is tried.
pub const RECOVERY_HEADROOM: u64 = 1024 * 1024;
/// Most acked seqs kept in memory while degraded.
pub const PENDING_ACKS_MAX: usize = 100_000;

/// A database handle for read transactions.
#[derive(Clone)]
pub enum Reader {
    /// The owner's writable database (writes work).
    Writer(Arc<Database>),
    /// A read-only handle opened after a failed write; sees every committed row.
    ReadOnly(Arc<ReadOnlyDatabase>),
}

/// Where handles find the current reader.
pub type ReaderSlot = RwLock<Option<Reader>>;

/// Opens a read-only handle for the degraded period; `None` (and a debug line) if the
/// file cannot be opened now.
pub fn open_reader(path: &Path) -> Option<Reader> {
    match read::open_read_only(path) {
        Ok(db) => Some(Reader::ReadOnly(Arc::new(db))),
        Err(e) => {
            tracing::debug!(error = %e, "cannot open the database read-only while degraded");
            None
        }
    }
}

/// A period during which writes fail.
pub struct Degraded {
    pub started: Instant,
    /// Wall-clock millis of the failure (for the gauge and reports).
    pub since: Millis,
    /// Refused entries counted before the period began (to report the period's share).
    pub refused_before: u64,
    pub next_try: Instant,
    /// The schedule of retries ([`StoreConfig::health_retry`](super::StoreConfig::health_retry)).
    retry: Backoff,
    /// Retries so far, counting the one scheduled at the start as 1.
    attempt: u32,
    /// Acks received while degraded, applied by the first commit after recovery.
    pub acks: Vec<(Lane, Vec<u64>)>,
    pub ack_count: usize,
}

impl Degraded {
    /// A period beginning now; `retry` spaces the reopen attempts.
    pub fn new(refused_before: u64, retry: Backoff) -> Self {
        let now = Instant::now();
        Degraded {
            started: now,
            since: now_millis(),
            refused_before,
            next_try: now + retry.ceiling(1),
            retry,
            attempt: 1,
            acks: Vec::new(),
            ack_count: 0,
        }
    }

    /// Schedules the next retry, waiting longer each time up to the longest wait.
    pub fn retry_later(&mut self) {
        self.attempt += 1;
        self.next_try = Instant::now() + self.retry.ceiling(self.attempt);
    }

    pub fn due(&self) -> bool {
        Instant::now() >= self.next_try
    }

    /// Keeps acks for after recovery; returns how many seqs were discarded instead
    /// (beyond [`PENDING_ACKS_MAX`]).
    pub fn keep_acks(&mut self, acks: impl IntoIterator<Item = (Lane, Vec<u64>)>) -> u64 {
        let mut discarded = 0;
        for (lane, seqs) in acks {
            if self.ack_count + seqs.len() > PENDING_ACKS_MAX {
                discarded += seqs.len() as u64;
                continue;
            }
            self.ack_count += seqs.len();
            self.acks.push((lane, seqs));
        }
        discarded
    }
}

/// True for read errors that mean "the storage is unavailable now", not "the data is bad".
pub fn is_unavailable(e: &StoreError) -> bool {
    use redb::Error;
    match e {
        StoreError::Unavailable | StoreError::Closed => true,
        StoreError::Db(e) => matches!(
            e,
            Error::Io(_)
                | Error::Backend(_)
                | Error::PreviousIo
                | Error::DatabaseClosed
                | Error::DatabaseAlreadyOpen
        ),
        _ => false,
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`; `None`
/// when that cannot be told.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `dir` is a valid NUL-terminated string and `st` a properly sized, writable
    // statvfs that the call fills in; nothing is retained after it returns.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(dir.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_maximum() {
        let mut d = Degraded::new(0, RETRY);
        assert!(d.next_try <= Instant::now() + RETRY_MIN);
        for _ in 0..10 {
            d.retry_later();
        }
        assert_eq!(RETRY.ceiling(d.attempt), RETRY_MAX);
        assert!(!d.due());
    }

    #[test]
    fn acks_beyond_the_bound_are_discarded_and_counted() {
        let mut d = Degraded::new(0, RETRY);
        assert_eq!(d.keep_acks([(Lane::Reading, vec![1, 2, 3])]), 0);
        let big = vec![7; PENDING_ACKS_MAX];
        assert_eq!(d.keep_acks([(Lane::Event, big)]), PENDING_ACKS_MAX as u64);
        assert_eq!(d.ack_count, 3);
        assert_eq!(d.acks.len(), 1);
    }

    #[test]
    fn free_bytes_of_a_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(&dir.path().join("x.redb")).is_some_and(|b| b > 0));
    }
}
