//! The owner thread of the database: takes commands and applies them in groups to one
//! write transaction, which stays open from one checkpoint to the next; each group is
//! made durable by a record in the journal (`journal.rs`), and the transaction is
//! committed to the file every [`CHECKPOINT_INTERVAL`], when the journal is full, and when
//! a flush, a shutdown, a downlink command or the forwarder (`CtlCmd::Checkpoint`) needs
//! the rows in the file. Retention ([`super::retention`]) runs inside each group; after a
//! failed commit the thread runs in degraded mode ([`super::degraded`]). Outbox rows
//! appended since the last checkpoint are held in memory until it, not in the
//! transaction's B-tree ([`super::fresh`]): most are deleted before it comes.
//!
//! Invariants:
//! - The only place that opens write transactions.
//! - "Commit" below means a group's journal record, synced (or a checkpoint, when the
//!   journal has no room for the record): a journal commit writes the group's changes
//!   once, where a redb commit rewrote the B-tree pages on their path (about 640 instead
//!   of 1,370 bytes written per reading at 1000 devices x 10/s, BENCHMARKS.md, "A journal
//!   in front of the database").
//! - Group commit: a group is the first command plus whatever else is queued, and it is
//!   committed as soon as the previous commit has ended, but commits start at least
//!   `storage.flush_interval` apart. So a command that arrives after a quiet spell is
//!   committed at once (no fixed wait at low rates); under load, what arrives while a
//!   commit runs, or within `flush_interval` of its start, forms the next group. A command
//!   waits at most `flush_interval` (or a longer commit in progress) before its commit
//!   starts. The spacing bounds the commits per second, and so the bytes written per
//!   reading (flash wear): without it the writer commits back to back under any steady
//!   load (BENCHMARKS.md, "Group commit"; the default, 1.5 ms, is where a longer spacing
//!   stopped saving CPU: "Commit spacing by default 1.5 ms"). During the spacing the
//!   thread sleeps instead of waking for each command; under load (the last group held
//!   more than one command) it sleeps out the spacing before it looks at the queue at
//!   all, so that a commit costs one wake-up, not one for the first command and one at
//!   the end of the spacing (a command waits no longer for it: it could not be committed
//!   before the spacing ends anyway). It is woken early, and the group committed at
//!   once, when [`COMMIT_EARLY_ROWS`] commands, or messages of the feed's input, wait (the
//!   broker's ingest hook wakes it for the latter, `StoreHandle::early_commit`): such a
//!   group carries as many rows as a spaced one at 6,400 readings/s, so the writes per
//!   reading stay bounded, and a device with many publishes in flight is not held to one
//!   window per spacing (one device with 100 in flight: 10.8k acknowledged readings/s
//!   without it, 22.8k with it; BENCHMARKS.md, "Commit spacing and full groups").
//!   `max_batch` commands, or a flush request or shutdown taken before the sleep, end the
//!   group at once too.
//! - The feed (`feed.rs`: the decode stage with the rules) runs last as a group is
//!   gathered, just before its commit: under load the thread sleeps out the spacing
//!   while the broker's hand-off fills, then the feed takes what arrived (at most what
//!   the group has room for) and its hand-offs join the group after the queue's
//!   commands. The thread wakes for the feed's input and timers as for its own channels,
//!   so a publish after a quiet spell is decoded and committed at once.
//! - Acks (rows delivered upstream, to delete) join the next group that writes rows (it
//!   commits anyway); without such a group they wait until [`ACK_GROUP_ROWS`] of them are
//!   pending, the oldest has waited [`ACK_DELAY`], the outbox nears its byte budget, or a
//!   flush or shutdown asks for them. So at low rates a delivered reading does not cost a
//!   commit of its own for its deletion (10 devices x 1/s: 22.2 KB written per reading
//!   with a commit per ack, 19.0 KB with the acks grouped), and under load the deletes
//!   ride on the commits of new rows: holding them back for groups of 512 wrote 6% more
//!   per reading at 1000 devices x 10/s (BENCHMARKS.md, "Fewer costs per reading and per
//!   commit"). Until then those rows still count in the outbox depth; a crash before
//!   their deletion sends them again (bounded by the forwarder's `max_uncommitted_acks`,
//!   well above [`ACK_GROUP_ROWS`]).
//! - Counters are published to the shared atomics only after a successful commit; a failed
//!   commit reverts them from the atomics and counts its appends as `commit_failed`.
//! - A failed commit makes the store degraded; acks count as committed only once their
//!   deletion is.
//! - The thread ends on the `Shutdown` command, after committing everything queued
//!   before it and what the feed's input held then (see the store's module header for
//!   why this is a command).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flume::Receiver;
use redb::{Database, Durability, ReadableTable, WriteTransaction};
use rumqttd::Ingested;
use tokio::sync::{oneshot, Notify};

use super::feed::{self, Feed};
use super::fresh::{Fresh, Open, Outbox};
use super::health::{Degraded, ReaderSlot};
use super::journal::{self, Journal, LazyLogged, TableId, CHECKPOINT_INTERVAL};
use super::stats::{Counter, Counters};
use super::tables::{self, COMMANDS, DEAD_LETTERS, EVENT_LOG, META, RULE_STATE};
use super::tail::Tails;
use super::{
    ByLane, CtlCmd, DataCmd, Lane, OnCommit, OutboxEntry, OutboxRow, OverflowPolicy, StoreConfig,
    StoreError, ACK_DELAY, ACK_GROUP_ROWS, COMMIT_EARLY_ROWS,
};
use crate::ingest::Receipt;

/// Without commands the thread still wakes this often (storage retries, drop logs).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// An idle store commits (age retention, counters of drops counted by callers) at most
/// this often: every commit rewrites pages with an fsync, and on an SD card an idle
/// gateway must not wear the flash (a commit every second wrote 32 KB/s).
const IDLE_COMMIT_INTERVAL: Duration = Duration::from_secs(60);
/// A group of at least this many data commands means they stream in: the next one is
/// gathered by sleeping out the commit spacing before looking at the queue (see
/// [`Owner::collect`]). A lone command (low rates) is not followed by such a sleep, so a
/// quiet gateway wakes no more often than its commands arrive.
const STREAMING_GROUP: usize = 2;
/// Most messages of the feed's input taken for one group. Under overload a larger
/// take held each commit (and the forwarder's next rows) back for tens of milliseconds of
/// decoding: the forwarder fell behind, its rows reached the file's B-tree, and the
/// store's thread then spent its time there (batched at full speed: 111-184k readings/s,
/// four runs of seven at 1.3-2.1 s of latency, against 144-192k and 0.10-0.14 s with
/// this bound; BENCHMARKS.md, "Decode on the store's thread").
const FEED_GROUP: usize = 1024;
/// Room the group's lists and the rows kept for the tails hold on to between groups once
/// commands no longer stream in. Under load they grow to a group's size (up to
/// [`FEED_GROUP`] readings and what the queue held); after a burst that room was some
/// 1 MB that nothing used until the next one.
const GROUP_KEEP: usize = 64;
/// Key bytes counted per outbox row on top of the encoded value.
pub(super) const KEY_BYTES: u64 = 8;

/// Creates the tables, loads the persisted counters and the database epoch into
/// `counters`, and gives the file an epoch if it has none (a new file, or one from
/// before epochs).
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
        let stored_epoch = meta.get(tables::EPOCH)?.map(|v| v.value());
        let epoch = match stored_epoch {
            Some(epoch) => epoch,
            None => {
                let epoch = tables::new_epoch();
                meta.insert(tables::EPOCH, epoch)?;
                tracing::info!(
                    epoch = %tables::epoch_hex(epoch),
                    next_seq = counters.get(Counter::NextSeq),
                    "new database epoch; message ids are {{gateway id}}:{{epoch}}:{{seq}}"
                );
                epoch
            }
        };
        counters.set_epoch(epoch);
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
        txn.open_table(COMMANDS)?;
    }
    txn.commit()?;
    Ok(())
}

/// Opens the database's contents for the store, at start and when it recovers from a
/// storage fault: applies what the journal holds (groups that were durable but not yet
/// checkpointed), then [`init`], then starts the journal over. Returns the number of
/// journal records applied.
pub(super) fn open_file(
    db: &Database,
    journal: &mut Journal,
    counters: &Counters,
    reopen: bool,
) -> Result<usize, StoreError> {
    let replayed = journal::replay(db, journal)?;
    init(db, counters, reopen)?;
    journal.reset(counters.epoch())?;
    Ok(replayed)
}

pub(super) struct Owner {
    /// The writable database; `None` while degraded.
    pub(super) db: Option<Arc<Database>>,
    pub(super) path: PathBuf,
    /// What handles read from (see [`super::health`]).
    pub(super) slot: Arc<ReaderSlot>,
    /// Set while writes fail.
    pub(super) degraded: Option<Degraded>,
    /// While degraded, the last writable handle whose write failed. Kept open because its
    /// lock tells read-only opens (ours, `gateway outbox stats`) that the file needs no
    /// repair; dropped just before each reopen.
    pub(super) failed: Option<Arc<Database>>,
    pub(super) cfg: StoreConfig,
    pub(super) data_rx: Receiver<Box<DataCmd>>,
    pub(super) ctl_rx: Receiver<CtlCmd>,
    pub(super) counters: Arc<Counters>,
    pub(super) new_rows: Arc<Notify>,
    /// Where committed rows go for the forwarder (`tail.rs`), once it reads.
    pub(super) tails: Arc<Mutex<Tails>>,
    /// What runs before each group (`feed.rs`), once the pipeline has set it.
    feed: Option<Box<dyn Feed>>,
    /// Told once the feed has ended ([`CtlCmd::EndFeed`]).
    feed_ended: Option<oneshot::Sender<()>>,
    /// Whether the transaction being built keeps its rows for `tails`.
    keep_rows: bool,
    /// The rows the transaction being built appended, by lane, when `keep_rows`.
    appended: ByLane<Vec<OutboxRow>>,
    /// Counter values of the transaction being built.
    pub(super) meta: Vec<u64>,
    /// The value of each counter in the file as of the last commit; `None` when not known
    /// (at start, after a failed commit). Only counters whose value differs are written.
    pub(super) persisted: Vec<Option<u64>>,
    /// Counters written by the transaction being built, taken as persisted once it commits.
    pub(super) staged: Vec<(usize, u64)>,
    /// The row counts of the dead letters and the event log are not known (the store
    /// opened, or a commit failed): the next group counts and trims them
    /// (`retention.rs`).
    pub(super) side_rows_unknown: bool,
    pub(super) scratch: Vec<u8>,
    pub(super) drops_logged: Vec<u64>,
    pub(super) last_drop_log: Option<Instant>,
    /// Data commands taken off the queue since start.
    pub(super) data_taken: u64,
    /// When the last transaction committed (idle commits are spaced by
    /// [`IDLE_COMMIT_INTERVAL`]).
    pub(super) last_commit: Instant,
    /// When the last commit started (commits start `flush_interval` apart at least).
    pub(super) last_commit_start: Option<Instant>,
    /// The last group held [`STREAMING_GROUP`] data commands or more: commands are
    /// streaming in, and the next group is gathered by sleeping out the spacing.
    streaming: bool,
    /// Acks waiting to join a group (see the module header), their row count, and when
    /// the oldest arrived.
    pub(super) deferred_acks: Vec<(Lane, Vec<u64>)>,
    pub(super) deferred_rows: usize,
    pub(super) deferred_since: Option<Instant>,
    /// The write transaction that holds the groups journaled since the last checkpoint
    /// (`journal.rs`), with the outbox rows held for it (`fresh.rs`); `None` when
    /// everything is committed to the database.
    pub(super) txn: Option<Open>,
    /// When `txn` took its first group: it is checkpointed [`CHECKPOINT_INTERVAL`] later.
    txn_since: Instant,
    pub(super) journal: Journal,
    /// The journal record of the group being applied (`Journal::begin`).
    oplog: Vec<u8>,
}

/// What one collection round gathered.
#[derive(Default)]
pub(super) struct Group {
    pub(super) data: Vec<DataCmd>,
    pub(super) acks: Vec<(Lane, Vec<u64>)>,
    /// Flush requests with the count of data commands that must be committed first.
    pub(super) flushes: Vec<(u64, oneshot::Sender<bool>)>,
    pub(super) shutdown: bool,
    /// The forwarder waits for rows that are only journaled (`CtlCmd::Checkpoint`).
    pub(super) checkpoint: bool,
    /// What the feed handed over (`feed.rs`); joins `data` after the queue's commands.
    pub(super) fed: Vec<DataCmd>,
    /// Receipts of what the group's commit stores, in queue order.
    pub(super) receipts: Vec<Receipt>,
    /// What runs after the group's commit (dropped when it fails).
    pub(super) on_commit: Vec<OnCommit>,
}

impl Group {
    /// Lets go of the lists' room beyond [`GROUP_KEEP`]; between groups they are empty.
    fn shrink(&mut self) {
        self.data.shrink_to(GROUP_KEEP);
        self.fed.shrink_to(GROUP_KEEP);
        self.acks.shrink_to(GROUP_KEEP);
        self.receipts.shrink_to(GROUP_KEEP);
        self.on_commit.shrink_to(GROUP_KEEP);
    }
    fn len(&self) -> usize {
        self.data.len() + self.acks.len()
    }
    /// Nothing to write (receipts alone need no commit): only housekeeping would commit.
    fn idle(&self) -> bool {
        !self.shutdown && self.acks.is_empty() && !self.writes_rows()
    }
    /// The group writes rows (not only receipts): it commits anyway.
    fn writes_rows(&self) -> bool {
        self.data.iter().any(|c| !matches!(c, DataCmd::Receipt(_)))
    }
    /// Flushes, shutdown and a checkpoint asked for are answered now rather than after
    /// the interval.
    fn urgent(&self) -> bool {
        self.shutdown || self.checkpoint || !self.flushes.is_empty()
    }
}

impl Owner {
    pub(super) fn new(
        (db, journal): (Arc<Database>, Journal),
        path: PathBuf,
        slot: Arc<ReaderSlot>,
        cfg: StoreConfig,
        (data_rx, ctl_rx): (Receiver<Box<DataCmd>>, Receiver<CtlCmd>),
        counters: Arc<Counters>,
        (new_rows, tails): (Arc<Notify>, Arc<Mutex<Tails>>),
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
            tails,
            feed: None,
            feed_ended: None,
            keep_rows: false,
            appended: ByLane::default(),
            persisted: vec![None; meta.len()],
            staged: Vec::new(),
            side_rows_unknown: true,
            meta,
            scratch: Vec::with_capacity(4096),
            drops_logged,
            last_drop_log: None,
            data_taken: 0,
            last_commit: Instant::now(),
            last_commit_start: None,
            streaming: false,
            deferred_acks: Vec::new(),
            deferred_rows: 0,
            deferred_since: None,
            txn: None,
            txn_since: Instant::now(),
            journal,
            oplog: Vec::new(),
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
            let commands = group
                .data
                .iter()
                .any(|c| matches!(c, DataCmd::QueueCommand(..) | DataCmd::CommandDone { .. }));
            if self.degraded.is_none()
                && group.idle()
                && self.last_commit.elapsed() < IDLE_COMMIT_INTERVAL
            {
                ok = true;
                take_receipts(&mut group);
            } else if self.degraded.is_none() {
                let appended = group.data.iter().any(|c| {
                    matches!(
                        c,
                        DataCmd::Append(..)
                            | DataCmd::QueueCommand(..)
                            | DataCmd::CommandDone { .. }
                    )
                });
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
            // After the commit that holds them, in queue order; a failed commit dropped
            // them unreleased. The group is durable once its journal record is synced, so
            // they do not wait for a checkpoint that follows (nor does a failed one hold
            // them back).
            for receipt in group.receipts.drain(..) {
                receipt.release();
            }
            // The journal record's buffer (and the one direct writes copy it to) is kept
            // while groups stream in: growing it again for each group took 4% of this
            // thread's time at full speed, most of it glibc consolidating its free lists
            // for each step past 64 KiB (BENCHMARKS.md, "Fewer allocations on the store's
            // thread"). Let go after a lone command and when the thread wakes to nothing
            // (committed, idle or degraded alike): after a burst the next group may be a
            // long while away. So are the group's lists and the rows kept for the tails
            // ([`GROUP_KEEP`]).
            if !self.streaming {
                self.journal.shrink(&mut self.oplog);
                group.shrink();
                for lane in Lane::ALL {
                    self.appended[lane].shrink_to(GROUP_KEEP);
                }
            }
            // Flushes and shutdown want the rows in the database file, and the downlink
            // reads its queue from there.
            let mut checkpointed = ok;
            if ok
                && self.txn.is_some()
                && (group.urgent() || commands || self.txn_since.elapsed() >= CHECKPOINT_INTERVAL)
            {
                if let Err(e) = self.checkpoint() {
                    checkpointed = false;
                    self.enter_degraded(&e, &mut group);
                }
            }
            group.checkpoint = false;
            for run in group.on_commit.drain(..) {
                run();
            }
            let taken = self.data_taken;
            let shutdown = group.shutdown;
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut group.flushes)
                .into_iter()
                .partition(|(target, _)| *target <= taken || shutdown);
            group.flushes = waiting;
            for (_, tx) in done {
                let _ = tx.send(checkpointed);
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

    fn take_ctl(&mut self, group: &mut Group, cmd: CtlCmd) {
        match cmd {
            CtlCmd::Ack(lane, seqs) => {
                self.deferred_rows += seqs.len();
                self.deferred_since.get_or_insert_with(Instant::now);
                self.deferred_acks.push((lane, seqs));
            }
            CtlCmd::Flush(tx) => {
                // Everything sent before the flush is taken already or still queued.
                let target = self.data_taken + group.data.len() as u64 + self.data_rx.len() as u64;
                group.flushes.push((target, tx));
            }
            CtlCmd::Checkpoint => group.checkpoint = true,
            CtlCmd::Feed(start) => {
                self.end_feed(group);
                self.feed = Some(feed::collecting(&mut group.fed, start));
            }
            CtlCmd::EndFeed(tx) => match &mut self.feed {
                Some(feed) => {
                    feed.stop();
                    self.feed_ended = Some(tx);
                }
                None => {
                    let _ = tx.send(());
                }
            },
            CtlCmd::Shutdown => group.shutdown = true,
        }
    }

    /// Runs the feed for up to `max` messages of its input; ends it once that is over.
    fn run_feed(&mut self, group: &mut Group, max: usize) {
        let Some(feed) = &mut self.feed else { return };
        if !feed::collecting(&mut group.fed, || feed.run(max.max(1))) {
            self.end_feed(group);
        }
    }

    /// Finishes the feed (what it hands over joins `group`) and tells who asked.
    fn end_feed(&mut self, group: &mut Group) {
        if let Some(feed) = self.feed.take() {
            feed::collecting(&mut group.fed, || feed.finish());
        }
        if let Some(tx) = self.feed_ended.take() {
            let _ = tx.send(());
        }
    }

    /// Messages waiting in the feed's input.
    fn feed_queued(&self) -> usize {
        self.feed.as_ref().map_or(0, |f| f.queued())
    }

    /// Waits up to `timeout` for one command of either channel, or a message of the
    /// feed's input, and adds it to the group (or has the feed hold it); false when none
    /// came in time.
    fn wait_one(&mut self, group: &mut Group, timeout: Duration) -> bool {
        enum Woke {
            Ctl(Result<CtlCmd, flume::RecvError>),
            Data(Result<Box<DataCmd>, flume::RecvError>),
            Input(Result<Ingested, flume::RecvError>),
        }
        let mut select = flume::Selector::new()
            .recv(&self.ctl_rx, Woke::Ctl)
            .recv(&self.data_rx, Woke::Data);
        if let Some(input) = self.feed.as_ref().and_then(|f| f.input()) {
            select = select.recv(input, Woke::Input);
        }
        let Ok(woke) = select.wait_timeout(timeout) else {
            return false;
        };
        match woke {
            Woke::Ctl(Ok(cmd)) => self.take_ctl(group, cmd),
            Woke::Data(Ok(cmd)) => group.data.push(*cmd),
            Woke::Ctl(Err(_)) | Woke::Data(Err(_)) => group.shutdown = true,
            Woke::Input(message) => {
                if let Some(feed) = &mut self.feed {
                    match message {
                        Ok(message) => feed.hold(message),
                        // The broker is gone: the feed ends.
                        Err(_) => feed.stop(),
                    }
                }
            }
        }
        true
    }

    /// Blocks for the first command, input of the feed, the feed's timers or the
    /// housekeeping tick, then gathers a group: what is queued already, and what arrives
    /// until `flush_interval` after the start of the previous commit (at once when that is
    /// past). Last, the feed runs on what its input gathered meanwhile (`feed.rs`), and
    /// what it hands over joins the group. See the module header.
    fn collect(&mut self, group: &mut Group) {
        let first_wait = if group.urgent() || self.feed_queued() > 0 || self.feed_ended.is_some() {
            Duration::ZERO
        } else if let Some(d) = &self.degraded {
            d.next_try
                .saturating_duration_since(Instant::now())
                .min(HOUSEKEEPING_INTERVAL)
        } else if let Some(since) = self.deferred_since {
            (since + ACK_DELAY)
                .saturating_duration_since(Instant::now())
                .min(HOUSEKEEPING_INTERVAL)
        } else {
            HOUSEKEEPING_INTERVAL
        };
        let first_wait = match &self.txn {
            Some(_) => first_wait.min(
                (self.txn_since + CHECKPOINT_INTERVAL).saturating_duration_since(Instant::now()),
            ),
            None => first_wait,
        };
        let first_wait = match self.feed.as_ref().and_then(|f| f.next_wake()) {
            Some(t) => first_wait.min(t.saturating_duration_since(Instant::now())),
            None => first_wait,
        };
        let not_before = self.last_commit_start.map(|t| t + self.cfg.flush_interval);
        // Under load, sleep out the spacing first rather than wait for the next command
        // and then sleep the rest of the spacing: one wake-up per commit instead of two
        // (commands keep arriving meanwhile; see the module header).
        if self.streaming && group.len() == 0 && self.data_rx.is_empty() && !group.urgent() {
            let now = Instant::now();
            if let Some(t) = not_before.filter(|t| *t > now) {
                std::thread::park_timeout(t - now);
            }
        }
        self.wait_one(group, first_wait);
        let max = self.cfg.max_batch.max(1);
        loop {
            while let Ok(cmd) = self.ctl_rx.try_recv() {
                self.take_ctl(group, cmd);
            }
            // Left in the queue while the spacing runs, so that its length tells the
            // senders when COMMIT_EARLY_ROWS commands wait (they wake this thread then).
            let queued = self.data_rx.len();
            let input = self.feed_queued();
            let waiting = group.data.len() + queued + input;
            let now = Instant::now();
            let wait = not_before.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
            if group.len() + queued >= max
                || waiting >= COMMIT_EARLY_ROWS
                || group.urgent()
                || group.len() + queued + input == 0
                || wait.is_zero()
            {
                break;
            }
            // Sleep rather than wake for every command that arrives meanwhile: they wait
            // in the queue and are taken together when the spacing is over, or when
            // COMMIT_EARLY_ROWS of them wait (a flush or shutdown arriving now waits, at
            // most `flush_interval`).
            std::thread::park_timeout(wait);
        }
        while group.data.len() < max {
            match self.data_rx.try_recv() {
                Ok(cmd) => group.data.push(*cmd),
                Err(_) => break,
            }
        }
        if group.shutdown {
            // Commit everything already queued before closing.
            group.data.extend(self.data_rx.try_iter().map(|cmd| *cmd));
            let rest: Vec<CtlCmd> = self.ctl_rx.try_iter().collect();
            for cmd in rest {
                self.take_ctl(group, cmd);
            }
            // The feed hands over what its input holds now, then ends.
            if let Some(feed) = &mut self.feed {
                feed.stop();
            }
            while self.feed.is_some() {
                self.run_feed(group, usize::MAX);
            }
        } else {
            // Just before the commit: what the input gathered meanwhile joins it.
            self.run_feed(group, max.saturating_sub(group.data.len()).min(FEED_GROUP));
        }
        self.data_taken += group.data.len() as u64;
        group.data.append(&mut group.fed);
        self.streaming = group.data.len() >= STREAMING_GROUP;
        if self.acks_due(group) {
            group.acks.append(&mut self.deferred_acks);
            self.deferred_rows = 0;
            self.deferred_since = None;
        }
    }

    /// Whether the pending acks join this group (see the module header).
    fn acks_due(&self, group: &Group) -> bool {
        let Some(since) = self.deferred_since else {
            return false;
        };
        group.writes_rows()
            || self.deferred_rows >= ACK_GROUP_ROWS
            || since.elapsed() >= ACK_DELAY
            || group.urgent()
            || self.degraded.is_some()
            || self.depth_bytes() >= self.cfg.max_bytes / 10 * 9
    }

    pub(super) fn get(&self, c: Counter) -> u64 {
        self.meta[c as usize]
    }
    pub(super) fn set(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] = v;
    }
    pub(super) fn add(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] += v;
    }
    pub(super) fn sub(&mut self, c: Counter, v: u64) {
        self.meta[c as usize] = self.meta[c as usize].saturating_sub(v);
    }

    fn commit(&mut self, group: &mut Group) -> Result<(), StoreError> {
        let started = Instant::now();
        self.last_commit_start = Some(started);
        self.keep_rows = self.tails.lock().unwrap_or_else(|e| e.into_inner()).wanted;
        let appends = group
            .data
            .iter()
            .filter(|c| matches!(c, DataCmd::Append(..)))
            .count() as u64;
        let result = self.write_group(group);
        group.data.clear();
        if result.is_err() {
            // Not stored: the devices are not acknowledged and send them again.
            group.receipts.clear();
            group.on_commit.clear();
        }
        match result {
            Ok(()) => {
                self.last_commit = Instant::now();
                for (i, v) in self.staged.drain(..) {
                    self.persisted[i] = Some(v);
                }
                if self.keep_rows {
                    let mut tails = self.tails.lock().unwrap_or_else(|e| e.into_inner());
                    for lane in Lane::ALL {
                        tails.push(lane, &mut self.appended[lane]);
                    }
                    tails.journaled |= self.txn.is_some();
                }
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
                self.staged.clear();
                self.persisted.fill(None);
                self.side_rows_unknown = true;
                for lane in Lane::ALL {
                    self.appended[lane].clear();
                }
                self.counters.add(Counter::DropCommitFailed, appends);
                Err(e)
            }
        }
    }

    /// Applies the group to the open transaction (one is begun if none is open) and
    /// makes it durable: a journal record, or a checkpoint when the journal is full.
    fn write_group(&mut self, group: &mut Group) -> Result<(), StoreError> {
        let db = self.db.clone().ok_or(StoreError::Unavailable)?;
        let mut open = match self.txn.take() {
            Some(open) => open,
            None => {
                let mut txn = db.begin_write()?;
                txn.set_durability(Durability::Immediate)
                    .map_err(redb::Error::from)?;
                self.txn_since = Instant::now();
                Open::new(txn)
            }
        };
        let mut record = std::mem::take(&mut self.oplog);
        Journal::begin(&mut record);
        let oplog = RefCell::new(record);
        // On an error the transaction is dropped (aborted); the groups journaled before
        // this one are replayed when the store recovers.
        let Open { txn, fresh } = &mut open;
        let applied = self.apply(txn, fresh, &oplog, group);
        self.oplog = oplog.into_inner();
        applied?;
        if self.journal.fits(&self.oplog) {
            self.journal
                .append(&mut self.oplog)
                .map(|()| self.txn = Some(open))
        } else {
            self.txn = Some(open);
            self.checkpoint()
        }
    }

    /// Commits the open transaction to the database and starts the journal over.
    pub(super) fn checkpoint(&mut self) -> Result<(), StoreError> {
        let Some(open) = self.txn.take() else {
            return Ok(());
        };
        let started = Instant::now();
        open.commit()?;
        self.tails
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checkpointed();
        self.journal.reset(self.counters.epoch())?;
        self.counters
            .record_checkpoint(started.elapsed().as_micros() as u64);
        // Rows the forwarder could not take from memory are now readable in the file.
        self.new_rows.notify_one();
        Ok(())
    }

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        fresh: &mut Fresh,
        oplog: &RefCell<Vec<u8>>,
        group: &mut Group,
    ) -> Result<(), StoreError> {
        let (mut readings, mut events) = fresh.outboxes(txn, oplog);
        let mut dead = LazyLogged::new(txn, DEAD_LETTERS, TableId::DeadLetters, oplog);
        let mut state = LazyLogged::new(txn, RULE_STATE, TableId::RuleState, oplog);
        let mut log = LazyLogged::new(txn, EVENT_LOG, TableId::EventLog, oplog);
        let mut commands = LazyLogged::new(txn, COMMANDS, TableId::Commands, oplog);

        // Not drained: a failed commit keeps them for after recovery.
        for (lane, seqs) in &group.acks {
            let table = match lane {
                Lane::Reading => &mut readings,
                Lane::Event => &mut events,
            };
            for &seq in seqs {
                if let Some(len) = table.remove(seq)? {
                    let len = len + KEY_BYTES;
                    self.sub(Counter::messages(*lane), 1);
                    self.sub(Counter::bytes(*lane), len);
                    self.add(Counter::Acked, 1);
                }
            }
        }

        let mut scratch = std::mem::take(&mut self.scratch);
        for cmd in group.data.drain(..) {
            match cmd {
                DataCmd::Append(e, receipt) => {
                    let len = e.row.len() as u64 + KEY_BYTES;
                    if self.cfg.overflow_policy == OverflowPolicy::RejectNew
                        && self.depth_bytes() + len > self.cfg.max_bytes
                    {
                        self.add(Counter::DropRejectedFull, 1);
                        // Not stored: the device is not acknowledged (its connection
                        // closes and it sends the reading again).
                        drop(receipt);
                        continue;
                    }
                    let table = match e.lane {
                        Lane::Reading => &mut readings,
                        Lane::Event => &mut events,
                    };
                    self.append_row(table, e)?;
                    group.receipts.extend(receipt);
                }
                DataCmd::DeadLetter(dl, receipt) => {
                    tables::encode_dead_letter(&mut scratch, &dl);
                    let id = self.get(Counter::DeadLetterNext);
                    self.set(Counter::DeadLetterNext, id + 1);
                    dead.get()?.insert(id, scratch.as_slice())?;
                    group.receipts.extend(receipt);
                }
                DataCmd::Receipt(receipt) => group.receipts.push(receipt),
                DataCmd::PutState(k, v) => {
                    state.get()?.insert(k.as_str(), v.as_slice())?;
                }
                DataCmd::DeleteState(k) => {
                    state.get()?.remove(k.as_str())?;
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
                    log.get()?.insert((time, seq), scratch.as_slice())?;
                }
                DataCmd::QueueCommand(command, on_commit) => {
                    let max = self.cfg.max_commands_per_device;
                    self.queue_command(commands.get()?, &mut events, command, max)?;
                    group.on_commit.extend(on_commit);
                }
                DataCmd::CommandDone { device, seq, state } => {
                    self.command_done(commands.get()?, &mut events, &device, seq, state)?;
                }
            }
        }
        self.scratch = scratch;

        self.enforce_retention(&mut readings, &mut events, &mut dead, &mut log)?;

        for (lane, table) in [(Lane::Reading, &mut readings), (Lane::Event, &mut events)] {
            let first = table.first()?;
            self.counters
                .set_oldest(lane, first.and_then(|f| f.received_at));
        }

        drop((readings, events));
        // Only what changed, into the journal record; the table gets the last values at
        // the checkpoint (`Fresh::meta`).
        let mut meta = LazyLogged::new(txn, META, TableId::Meta, oplog);
        self.staged.clear();
        for &c in Counter::ALL {
            let v = if c.is_live() {
                self.counters.get(c)
            } else {
                self.get(c)
            };
            if self.persisted[c as usize] != Some(v) {
                meta.log_insert(c.name(), v);
                fresh.meta.insert(c.name(), v);
                self.staged.push((c as usize, v));
            }
        }
        Ok(())
    }

    /// Appends `entry` to the outbox table of its lane with the next seq (no budget check:
    /// retention runs after the group).
    pub(super) fn append_row(
        &mut self,
        table: &mut Outbox<'_, '_>,
        e: OutboxEntry,
    ) -> Result<(), StoreError> {
        let seq = self.get(Counter::NextSeq);
        self.set(Counter::NextSeq, seq + 1);
        table.insert(seq, e.row.bytes())?;
        let appended = match e.lane {
            Lane::Reading => Counter::AppendedReadings,
            Lane::Event => Counter::AppendedEvents,
        };
        self.add(appended, 1);
        self.add(Counter::messages(e.lane), 1);
        self.add(Counter::bytes(e.lane), e.row.len() as u64 + KEY_BYTES);
        self.keep_row(seq, e);
        Ok(())
    }

    /// Keeps an appended row for the forwarder (`tail.rs`), when it reads.
    fn keep_row(&mut self, seq: u64, e: OutboxEntry) {
        if self.keep_rows {
            self.appended[e.lane].push(OutboxRow {
                seq,
                lane: e.lane,
                row: e.row,
            });
        }
    }

    pub(super) fn depth_bytes(&self) -> u64 {
        self.get(Counter::ReadingsBytes) + self.get(Counter::EventsBytes)
    }
}

/// A group with nothing to write: its receipts are released without a commit.
fn take_receipts(group: &mut Group) {
    for cmd in group.data.drain(..) {
        if let DataCmd::Receipt(receipt) = cmd {
            group.receipts.push(receipt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_lets_go_of_the_room_a_burst_gave_its_lists() {
        let mut group = Group::default();
        let burst = 10 * GROUP_KEEP;
        group.data.reserve(burst);
        group.fed.reserve(burst);
        group.acks.reserve(burst);
        group.receipts.reserve(burst);
        group.on_commit.reserve(burst);
        group.shrink();
        let rooms = [
            group.data.capacity(),
            group.fed.capacity(),
            group.acks.capacity(),
            group.receipts.capacity(),
            group.on_commit.capacity(),
        ];
        assert!(rooms.iter().all(|&room| room <= GROUP_KEEP), "{rooms:?}");
    }
}
