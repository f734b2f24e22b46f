//! The owner thread of the database: takes commands, applies them in groups, one write
//! transaction per group, and enforces retention.
//!
//! Invariants:
//! - The only place that opens write transactions.
//! - A group is: the first command, then whatever else arrives until `max_batch` commands
//!   or `flush_interval` after the first; a flush request or shutdown commits at once.
//! - Counters are published to the shared atomics only after a successful commit; a failed
//!   commit reverts them from the atomics and counts its appends as `commit_failed`.
//! - A failed commit makes the store degraded (see [`super::health`]): nothing more is
//!   written through that handle (it stays open only until the next reopen), data
//!   commands are refused and counted, acks are kept, and a reopen is retried with
//!   backoff; acks count as committed only once their deletion is.
//! - Drops are logged at most once per `DROP_LOG_INTERVAL` with the counts since the last
//!   line, so a burst gives one warning, not one per row.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use redb::{
    ConcurrencyMode, Database, Durability, ReadableTable, ReadableTableMetadata, Table,
    WriteTransaction,
};
use tokio::sync::{oneshot, Notify};

use super::health::{self, Degraded, Reader, ReaderSlot};
use super::stats::{Counter, Counters};
use super::tables::{self, DEAD_LETTERS, EVENT_LOG, META, RULE_STATE};
use super::{CtlCmd, DataCmd, Lane, OverflowPolicy, StoreConfig, StoreError};
use crate::reading::{now_millis, Millis};

/// Without commands the thread still wakes this often (storage retries, drop logs).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// An idle store commits (age retention, counters of drops counted by callers) at most
/// this often: every commit rewrites pages with an fsync, and on an SD card an idle
/// gateway must not wear the flash (a commit every second wrote 32 KB/s).
const IDLE_COMMIT_INTERVAL: Duration = Duration::from_secs(60);
/// Drop warnings are at most this frequent.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Key bytes counted per outbox row on top of the encoded value.
const KEY_BYTES: u64 = 8;

/// Creates the tables and loads the persisted counters into `counters`.
///
/// With `reopen` (recovery after a storage fault) the live counters keep their values,
/// which have grown since the last commit, everything else is taken from the file (the
/// truth about what was committed), and all of them are written back: a real write that
/// proves the storage works again.
pub(super) fn init(db: &Database, counters: &Counters, reopen: bool) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)
        .map_err(redb::Error::from)?;
    {
        let mut meta = txn.open_table(META)?;
        for &c in Counter::ALL {
            let stored = meta.get(c.name())?.map_or(0, |v| v.value());
            if !(reopen && c.is_live()) {
                counters.set(c, stored);
            }
        }
        if counters.get(Counter::NextSeq) == 0 {
            counters.set(Counter::NextSeq, 1);
        }
        if reopen {
            for &c in Counter::ALL {
                meta.insert(c.name(), counters.get(c))?;
            }
        }
        for lane in [Lane::Reading, Lane::Event] {
            let t = txn.open_table(tables::lane_table(lane))?;
            let first = t.first()?;
            counters.set_oldest(
                lane,
                first.and_then(|(_, v)| tables::outbox_received_at(v.value())),
            );
        }
        txn.open_table(DEAD_LETTERS)?;
        txn.open_table(RULE_STATE)?;
        txn.open_table(EVENT_LOG)?;
    }
    txn.commit()?;
    Ok(())
}

pub(super) struct Owner {
    /// The writable database; `None` while degraded.
    db: Option<Arc<Database>>,
    path: PathBuf,
    /// What handles read from (see [`super::health`]).
    slot: Arc<ReaderSlot>,
    /// Set while writes fail.
    degraded: Option<Degraded>,
    /// While degraded, the last writable handle whose write failed. Kept open because its
    /// lock tells read-only opens (ours, `gateway outbox stats`) that the file needs no
    /// repair; dropped just before each reopen.
    failed: Option<Arc<Database>>,
    cfg: StoreConfig,
    data_rx: Receiver<Box<DataCmd>>,
    ctl_rx: Receiver<CtlCmd>,
    counters: Arc<Counters>,
    new_rows: Arc<Notify>,
    /// Counter values of the transaction being built.
    meta: Vec<u64>,
    scratch: Vec<u8>,
    drops_logged: Vec<u64>,
    last_drop_log: Option<Instant>,
    /// Data commands taken off the queue since start.
    data_taken: u64,
    /// When the last transaction committed (idle commits are spaced by
    /// [`IDLE_COMMIT_INTERVAL`]).
    last_commit: Instant,
}

/// What one collection round gathered.
#[derive(Default)]
struct Group {
    data: Vec<DataCmd>,
    acks: Vec<(Lane, Vec<u64>)>,
    /// Flush requests with the count of data commands that must be committed first.
    flushes: Vec<(u64, oneshot::Sender<bool>)>,
    shutdown: bool,
}

impl Group {
    fn len(&self) -> usize {
        self.data.len() + self.acks.len()
    }
    /// Nothing to write: only housekeeping would commit.
    fn idle(&self) -> bool {
        self.len() == 0 && !self.shutdown
    }
    /// Flushes and shutdown are answered now rather than after the interval.
    fn urgent(&self) -> bool {
        self.shutdown || !self.flushes.is_empty()
    }
}

impl Owner {
    pub(super) fn new(
        db: Arc<Database>,
        path: PathBuf,
        slot: Arc<ReaderSlot>,
        cfg: StoreConfig,
        (data_rx, ctl_rx): (Receiver<Box<DataCmd>>, Receiver<CtlCmd>),
        counters: Arc<Counters>,
        new_rows: Arc<Notify>,
    ) -> Self {
        let meta: Vec<u64> = Counter::ALL.iter().map(|&c| counters.get(c)).collect();
        let drops_logged = meta.clone();
        Owner {
            db: Some(db),
            path,
            slot,
            degraded: None,
            failed: None,
            cfg,
            data_rx,
            ctl_rx,
            counters,
            new_rows,
            meta,
            scratch: Vec::with_capacity(4096),
            drops_logged,
            last_drop_log: None,
            data_taken: 0,
            last_commit: Instant::now(),
        }
    }

    pub(super) fn run(mut self) {
        let span = tracing::info_span!("store");
        let _enter = span.enter();
        let mut group = Group::default();
        loop {
            self.collect(&mut group);
            if self.degraded.is_some() {
                self.refuse(&mut group);
                self.try_recover(&mut group);
            }
            let mut ok = false;
            if self.degraded.is_none()
                && group.idle()
                && self.last_commit.elapsed() < IDLE_COMMIT_INTERVAL
            {
                ok = true;
            } else if self.degraded.is_none() {
                let appended = group.data.iter().any(|c| matches!(c, DataCmd::Append(_)));
                let acks: u64 = group.acks.iter().map(|(_, s)| s.len() as u64).sum();
                match self.commit(&mut group) {
                    Ok(()) => {
                        ok = true;
                        self.counters.add_acks_committed(acks);
                        if appended || acks > 0 {
                            self.new_rows.notify_one();
                        }
                    }
                    Err(e) => self.enter_degraded(&e, &mut group),
                }
            }
            let taken = self.data_taken;
            let shutdown = group.shutdown;
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut group.flushes)
                .into_iter()
                .partition(|(target, _)| *target <= taken || shutdown);
            group.flushes = waiting;
            for (_, tx) in done {
                let _ = tx.send(ok);
            }
            self.log_drops(group.shutdown);
            if group.shutdown {
                break;
            }
        }
        if let Some(d) = &self.degraded {
            tracing::warn!(
                path = %self.path.display(),
                acks_pending = d.ack_count,
                "store closed while the storage is unavailable; rows acked meanwhile stay in the outbox and are sent again"
            );
        }
        tracing::info!(
            messages = self.counters.get(Counter::ReadingsMessages)
                + self.counters.get(Counter::EventsMessages),
            "store closed"
        );
    }

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
    fn enter_degraded(&mut self, error: &StoreError, group: &mut Group) {
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
    fn refuse(&mut self, group: &mut Group) {
        for cmd in group.data.drain(..) {
            let c = match cmd {
                DataCmd::Append(e) => Counter::refused(e.lane),
                DataCmd::DeadLetter(_) => Counter::RefusedDeadLetters,
                DataCmd::PutState(..) | DataCmd::DeleteState(_) => Counter::RefusedState,
                DataCmd::LogEvent { .. } => Counter::RefusedEventLog,
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
    fn try_recover(&mut self, group: &mut Group) {
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
            .and_then(|db| match init(&db, &self.counters, true) {
                Ok(()) => Ok(db),
                Err(e) => {
                    self.failed = Some(db);
                    Err(e)
                }
            });
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

    fn take_ctl(&mut self, group: &mut Group, cmd: CtlCmd) {
        match cmd {
            CtlCmd::Ack(lane, seqs) => group.acks.push((lane, seqs)),
            CtlCmd::Flush(tx) => {
                // Everything sent before the flush is taken already or still queued.
                let target = self.data_taken + group.data.len() as u64 + self.data_rx.len() as u64;
                group.flushes.push((target, tx));
            }
            CtlCmd::Shutdown => group.shutdown = true,
        }
    }

    /// Waits up to `timeout` for one command of either channel and adds it to the group;
    /// false when none came in time.
    fn wait_one(&mut self, group: &mut Group, timeout: Duration) -> bool {
        select! {
            recv(self.ctl_rx) -> m => match m {
                Ok(cmd) => self.take_ctl(group, cmd),
                Err(_) => group.shutdown = true,
            },
            recv(self.data_rx) -> m => match m {
                Ok(cmd) => group.data.push(*cmd),
                Err(_) => group.shutdown = true,
            },
            default(timeout) => return false,
        }
        true
    }

    /// Blocks for the first command (or the housekeeping tick), then gathers a group.
    fn collect(&mut self, group: &mut Group) {
        let first_wait = if group.urgent() {
            Duration::ZERO
        } else if let Some(d) = &self.degraded {
            d.next_try
                .saturating_duration_since(Instant::now())
                .min(HOUSEKEEPING_INTERVAL)
        } else {
            HOUSEKEEPING_INTERVAL
        };
        self.wait_one(group, first_wait);
        let deadline = Instant::now() + self.cfg.flush_interval;
        let max = self.cfg.max_batch.max(1);
        loop {
            while let Ok(cmd) = self.ctl_rx.try_recv() {
                self.take_ctl(group, cmd);
            }
            while group.data.len() < max {
                match self.data_rx.try_recv() {
                    Ok(cmd) => group.data.push(*cmd),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if group.len() >= max || group.urgent() || group.len() == 0 || now >= deadline {
                break;
            }
            if !self.wait_one(group, deadline - now) {
                break;
            }
        }
        if group.shutdown {
            // Commit everything already queued before closing.
            group.data.extend(self.data_rx.try_iter().map(|cmd| *cmd));
            let rest: Vec<CtlCmd> = self.ctl_rx.try_iter().collect();
            for cmd in rest {
                self.take_ctl(group, cmd);
            }
        }
        self.data_taken += group.data.len() as u64;
    }

    fn get(&self, c: Counter) -> u64 {
        self.meta[c as usize]
    }
    fn set(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] = v;
    }
    fn add(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] += v;
    }
    fn sub(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] = self.meta[c as usize].saturating_sub(v);
    }

    fn commit(&mut self, group: &mut Group) -> Result<(), StoreError> {
        let started = Instant::now();
        let appends = group
            .data
            .iter()
            .filter(|c| matches!(c, DataCmd::Append(_)))
            .count() as u64;
        let result = self.write_group(group);
        group.data.clear();
        match result {
            Ok(()) => {
                self.last_commit = Instant::now();
                group.acks.clear();
                for &c in Counter::ALL {
                    if !c.is_live() {
                        self.counters.set(c, self.get(c));
                    }
                }
                self.counters
                    .record_commit(started.elapsed().as_micros() as u64);
                Ok(())
            }
            Err(e) => {
                for &c in Counter::ALL {
                    self.meta[c as usize] = self.counters.get(c);
                }
                self.counters.add(Counter::DropCommitFailed, appends);
                Err(e)
            }
        }
    }

    fn write_group(&mut self, group: &mut Group) -> Result<(), StoreError> {
        let db = self.db.clone().ok_or(StoreError::Unavailable)?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        self.apply(&txn, group)?;
        txn.commit()?;
        Ok(())
    }

    fn apply(&mut self, txn: &WriteTransaction, group: &mut Group) -> Result<(), StoreError> {
        let mut readings = txn.open_table(tables::OUTBOX_READINGS)?;
        let mut events = txn.open_table(tables::OUTBOX_EVENTS)?;
        let mut dead = txn.open_table(DEAD_LETTERS)?;
        let mut state = txn.open_table(RULE_STATE)?;
        let mut log = txn.open_table(EVENT_LOG)?;

        // Not drained: a failed commit keeps them for after recovery.
        for (lane, seqs) in &group.acks {
            let table = match lane {
                Lane::Reading => &mut readings,
                Lane::Event => &mut events,
            };
            for &seq in seqs {
                if let Some(v) = table.remove(seq)? {
                    let len = v.value().len() as u64 + KEY_BYTES;
                    drop(v);
                    self.sub(Counter::messages(*lane), 1);
                    self.sub(Counter::bytes(*lane), len);
                    self.add(Counter::Acked, 1);
                }
            }
        }

        let mut scratch = std::mem::take(&mut self.scratch);
        for cmd in group.data.drain(..) {
            match cmd {
                DataCmd::Append(e) => {
                    tables::encode_outbox(
                        &mut scratch,
                        e.received_at,
                        e.format,
                        &e.topic,
                        &e.device,
                        &e.payload,
                    );
                    let len = scratch.len() as u64 + KEY_BYTES;
                    if self.cfg.overflow_policy == OverflowPolicy::RejectNew
                        && self.depth_bytes() + len > self.cfg.max_bytes
                    {
                        self.add(Counter::DropRejectedFull, 1);
                        continue;
                    }
                    let seq = self.get(Counter::NextSeq);
                    self.set(Counter::NextSeq, seq + 1);
                    let (table, appended) = match e.lane {
                        Lane::Reading => (&mut readings, Counter::AppendedReadings),
                        Lane::Event => (&mut events, Counter::AppendedEvents),
                    };
                    table.insert(seq, scratch.as_slice())?;
                    self.add(appended, 1);
                    self.add(Counter::messages(e.lane), 1);
                    self.add(Counter::bytes(e.lane), len);
                }
                DataCmd::DeadLetter(dl) => {
                    tables::encode_dead_letter(&mut scratch, &dl);
                    let id = self.get(Counter::DeadLetterNext);
                    self.set(Counter::DeadLetterNext, id + 1);
                    dead.insert(id, scratch.as_slice())?;
                }
                DataCmd::PutState(k, v) => {
                    state.insert(k.as_str(), v.as_slice())?;
                }
                DataCmd::DeleteState(k) => {
                    state.remove(k.as_str())?;
                }
                DataCmd::LogEvent {
                    time,
                    event_type,
                    device,
                    json,
                } => {
                    tables::encode_logged_event(&mut scratch, &event_type, &device, &json);
                    let seq = self.get(Counter::EventLogNext);
                    self.set(Counter::EventLogNext, seq + 1);
                    log.insert((time, seq), scratch.as_slice())?;
                }
            }
        }
        self.scratch = scratch;

        self.enforce_age(&mut readings, Lane::Reading)?;
        self.enforce_age(&mut events, Lane::Event)?;
        self.enforce_bytes(&mut readings, Lane::Reading)?;
        if self.cfg.overflow_policy == OverflowPolicy::DropOldestReadings {
            self.enforce_bytes(&mut events, Lane::Event)?;
        }
        let evicted = trim(&mut dead, self.cfg.dead_letter_max)?;
        self.add(Counter::DeadLettersEvicted, evicted);
        self.set(Counter::DeadLetterRows, dead.len()?);
        let evicted = trim(&mut log, self.cfg.event_log_max)?;
        self.add(Counter::EventLogEvicted, evicted);
        self.set(Counter::EventLogRows, log.len()?);

        for (lane, table) in [(Lane::Reading, &readings), (Lane::Event, &events)] {
            let first = table.first()?;
            self.counters.set_oldest(
                lane,
                first.and_then(|(_, v)| tables::outbox_received_at(v.value())),
            );
        }

        let mut meta = txn.open_table(META)?;
        for &c in Counter::ALL {
            let v = if c.is_live() {
                self.counters.get(c)
            } else {
                self.get(c)
            };
            meta.insert(c.name(), v)?;
        }
        Ok(())
    }

    fn depth_bytes(&self) -> u64 {
        self.get(Counter::ReadingsBytes) + self.get(Counter::EventsBytes)
    }

    /// Drops rows of `lane` older than `max_age`, oldest first.
    fn enforce_age(&mut self, table: &mut Table<u64, &[u8]>, lane: Lane) -> Result<(), StoreError> {
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
                Some((_, v)) if tables::outbox_received_at(v.value()).unwrap_or(0) < cutoff => {
                    v.value().len() as u64 + KEY_BYTES
                }
                _ => return Ok(()),
            };
            table.pop_first()?;
            self.drop_row(lane, len, reason);
        }
    }

    /// Drops the oldest rows of `lane` while the outbox is over `max_bytes`.
    fn enforce_bytes(
        &mut self,
        table: &mut Table<u64, &[u8]>,
        lane: Lane,
    ) -> Result<(), StoreError> {
        let reason = match lane {
            Lane::Reading => Counter::DropMaxBytesReadings,
            Lane::Event => Counter::DropMaxBytesEvents,
        };
        while self.depth_bytes() > self.cfg.max_bytes {
            let Some((_, v)) = table.pop_first()? else {
                return Ok(());
            };
            let len = v.value().len() as u64 + KEY_BYTES;
            drop(v);
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
    fn log_drops(&mut self, force: bool) {
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
fn trim<K: redb::Key + 'static>(table: &mut Table<K, &[u8]>, max: u64) -> Result<u64, StoreError> {
    let len = table.len()?;
    let excess = len.saturating_sub(max);
    for _ in 0..excess {
        table.pop_first()?;
    }
    Ok(excess)
}
