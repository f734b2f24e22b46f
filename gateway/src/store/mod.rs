//! The gateway's durable store: one redb file owned by one thread.
//!
//! Owns the outbox (readings and events waiting for upstream), the dead-letter table,
//! rule-engine state, the event log and the downlink's per-device command queue
//! (`commands.rs`). Inputs are commands sent through a [`StoreHandle`] (append, ack, dead
//! letter, state, event log, queue and remove a downlink command, flush, shutdown); the
//! output is committed rows, live counters ([`OutboxStats`]) and a wake-up of the
//! forwarder after every commit that added rows.
//!
//! Invariants:
//! - All writes happen on the owner thread ([`writer`]), grouped, at once after a quiet
//!   spell and at least `flush_interval` apart under load. A group is durable once its
//!   record in the journal (`{path}.journal`, [`journal`]) is synced; the write
//!   transaction that holds the groups is committed to the file at checkpoints (every
//!   second at most, and on flush and shutdown), and the journal is replayed when the
//!   file is opened after a crash. Other threads only read, through read transactions on
//!   the shared `Database`, so they see the last checkpoint; the forwarder takes the rows
//!   committed since it caught up from memory (`tail.rs`), and asks for a checkpoint when
//!   it reaches the end of the file while newer rows are only journaled.
//! - Sequence numbers are assigned at commit, are strictly increasing across both lanes,
//!   and survive restarts (`META.next_seq` is committed with the rows).
//! - Every file has an epoch ([`StoreHandle::epoch`]), random and fixed when the file is
//!   created (or first opened, for a file from before epochs): a new file restarts the
//!   sequence at 1, so only (epoch, seq) identifies a row across database lifetimes.
//! - Data commands (appends, dead letters, state, the event log) go through a bounded
//!   channel; a full channel makes the sending stage wait. The decode stage and the
//!   rules run on the owner thread as its feed ([`Feed`], `feed.rs`), just before each
//!   commit, and what they hand over joins the group directly; they take at most a
//!   group's worth of the broker's hand-off per commit, so a store that is behind fills
//!   that (backpressure that reaches the devices, see `ingest.rs`). Acks and flushes go through a separate unbounded control
//!   channel (bounded in practice by the forwarder's in-flight window).
//! - A device is acknowledged only for what is committed: appends and dead letters carry
//!   the [`Receipt`] of the publish they came from, and the owner releases receipts only
//!   after the commit that holds them (or, for a publish that needs no write, after
//!   everything queued before it), in queue order. A receipt whose data is refused or lost
//!   (degraded storage, a failed commit, an outbox full under `reject_new`) is dropped
//!   unreleased, which closes the device's connection without a PUBACK: the device keeps
//!   the message and sends it again. So `kill -9` at any moment loses nothing a device
//!   was acknowledged for (journal records are checksummed, redb commits atomic).
//! - A downlink command's `on_commit` (its upstream PUBACK) runs only after the commit that
//!   holds it; a command and its status message are written in the same transaction.
//! - Rows leave the outbox only by an upstream ack or by retention (`max_bytes`, `max_age`),
//!   and every retention drop is counted by reason and lane.
//! - The file is opened in redb's `SingleWriter` concurrency mode, so `gateway outbox
//!   stats` can open it read-only while the gateway runs.
//! - The owner thread stops on a `Shutdown` command ([`StoreHandle::shutdown`]), not on
//!   the pipeline's cancellation token: the command is ordered after every command sent
//!   before it, so "commit what was queued, then close" needs nothing else, and the
//!   thread, blocked on its channels, wakes for it at once (a token would be noticed
//!   only at its next timeout). The pipeline sends it once the producers have stopped, or
//!   when the shutdown grace is over.
//!
//! Storage faults (disk full, I/O errors): redb latches the first I/O error of a
//! `Database` and fails every later transaction, reads included, with `PreviousIo` until
//! the handle is dropped and the file opened again. So a failed commit puts the store in
//! a degraded state (`degraded.rs`, [`health`]) instead of failing one group after another:
//! - it logs one error naming the path and the cause, sets the `storage_degraded` gauge
//!   and counts `storage.errors`; the group that failed is counted as `commit_failed`;
//! - new entries are refused on the caller's thread without touching the disk or the
//!   queue, counted by kind (`drop.refused.readings`, `drop.refused.events`,
//!   `refused.dead_letters`, `refused.state`, `refused.event_log`);
//! - committed rows stay readable through a read-only handle, so the forwarder keeps
//!   draining them; if even that cannot be opened, outbox reads return nothing until
//!   recovery (never an error that would stop the forwarder);
//! - acks are kept in memory (bounded) and applied by the first commit after recovery;
//!   acks beyond the bound, or still pending at shutdown, mean those rows are sent again
//!   (a duplicate, never a loss);
//! - the owner retries with backoff (1 s to 5 s): it reopens the file, reloads the
//!   counters from it (the file is the truth about what was committed) and commits them;
//!   when that works it logs one "storage recovered" line and resumes.

mod commands;
mod degraded;
mod feed;
mod fresh;
mod health;
mod journal;
mod read;
mod retention;
mod row;
mod stats;
mod tables;
mod tail;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use flume::Sender;
use redb::{ConcurrencyMode, Database};
use tokio::sync::{oneshot, Notify};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::ingest::Receipt;
use crate::reading::{Format, Millis};

use health::{Reader, ReaderSlot};
use journal::{Journal, JOURNAL_BYTES};
use tail::Tails;

pub use commands::{
    drop_commands_file, list_commands_file, status_entry, CommandState, QueuedCommand,
};
pub use feed::{Feed, StartFeed};
pub use read::{query_events, read_dead_letters, read_outbox_file, LoggedEvent};
pub use row::Row;
pub use stats::{read_stats_file, stats_command, Counter, LaneStats, OutboxStats, StorageHealth};
pub use tables::epoch_hex;
pub use tail::TAIL_ROWS;

use stats::Counters;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("cannot open the database {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("the storage is unavailable (writes failed; see the log); retrying")]
    Unavailable,
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store is shut down")]
    Closed,
    #[error("the store thread panicked")]
    ThreadPanicked,
    #[error("a commit failed; see the log")]
    CommitFailed,
    #[error("corrupt row in table {table} at key {key}")]
    CorruptRow { table: String, key: String },
}

macro_rules! redb_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
redb_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What to do when the outbox exceeds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Drop the oldest readings; events are kept. Only when no reading is left are the
    /// oldest events dropped (counted as `max_bytes_events`).
    DropOldestReadings,
    /// Keep everything stored; refuse new rows of either lane while full (`rejected_full`).
    RejectNew,
}

/// Most commands applied in one write transaction.
pub const MAX_BATCH: usize = 8192;
/// Commands waiting that end the commit spacing early (`writer.rs`'s module header).
pub const COMMIT_EARLY_ROWS: usize = 32;
/// Acks pending deletion that make the next group delete them (`writer.rs`).
pub const ACK_GROUP_ROWS: usize = 512;
/// Longest time an ack waits for its deletion to be committed (`writer.rs`).
pub const ACK_DELAY: Duration = Duration::from_secs(1);
/// Capacity of the command channel; senders wait while it is full (backpressure). Two
/// full groups ([`MAX_BATCH`]): one being committed, the next filling. The queue's slots
/// are resident from the start (16 bytes each), so a deeper queue costs idle memory and
/// only adds waiting under overload.
pub const CHANNEL_CAPACITY: usize = 2 * MAX_BATCH;
/// Event-log rows kept; the oldest are removed beyond it.
pub const EVENT_LOG_MAX: u64 = 100_000;
/// redb page cache in bytes (redb's default of 1 GiB is far too much for an edge box).
/// The outbox is appended at its tail and deleted at its head, so few pages are hot, and
/// the forwarder reads new rows from memory (`tail`): 1 MiB drained a backlog as fast as
/// 4 MiB and 16 MiB did, with as many bytes written per reading, and kept 3 MB less
/// resident at 1000 devices than 4 MiB; 512 KiB drains and writes as 1 MiB does and
/// keeps about 0.6 MB less after a burst (BENCHMARKS.md, "Page cache", "Broker logs
/// nobody reads, the page cache" and "The broker's tables after a fleet left").
pub const CACHE_SIZE: usize = 512 * 1024;

/// The store's settings: the `[storage]` section of a [`Config`] plus the internal
/// knobs above. Built only by [`StoreConfig::from_config`]; a test that wants other
/// values changes the `Config` (or an internal knob) before or after building it.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Shortest time between the starts of two commits, and so the longest a command
    /// waits before its commit starts (beyond a commit in progress); see [`writer`].
    pub flush_interval: Duration,
    /// Most commands applied in one write transaction ([`MAX_BATCH`]).
    pub max_batch: usize,
    /// Capacity of the command channel ([`CHANNEL_CAPACITY`]).
    pub channel_capacity: usize,
    /// Outbox budget in row bytes (keys + encoded rows, both lanes).
    pub max_bytes: u64,
    /// Rows older than this (by `received_at`) are dropped; `None` keeps them forever.
    pub max_age: Option<Duration>,
    /// Always [`OverflowPolicy::DropOldestReadings`] in the gateway.
    pub overflow_policy: OverflowPolicy,
    /// Dead-letter rows kept; the oldest are removed beyond it.
    pub dead_letter_max: u64,
    /// Event-log rows kept ([`EVENT_LOG_MAX`]).
    pub event_log_max: u64,
    /// redb page cache in bytes ([`CACHE_SIZE`]).
    pub cache_size: usize,
    /// Downlink commands queued per device at most (`downlink.max_per_device`).
    pub max_commands_per_device: usize,
    /// While degraded: the first and the longest wait between reopen retries. Not a
    /// setting of the config file; tests shorten it.
    pub health_retry: Backoff,
}

impl StoreConfig {
    /// The store settings of a configuration (`storage.max_age = "0s"` keeps rows forever).
    pub fn from_config(config: &Config) -> StoreConfig {
        let storage = &config.storage;
        StoreConfig {
            flush_interval: storage.flush_interval,
            max_batch: MAX_BATCH,
            channel_capacity: CHANNEL_CAPACITY,
            max_bytes: storage.max_bytes,
            max_age: Some(storage.max_age).filter(|d| !d.is_zero()),
            overflow_policy: OverflowPolicy::DropOldestReadings,
            dead_letter_max: storage.dead_letter_max as u64,
            event_log_max: EVENT_LOG_MAX,
            cache_size: CACHE_SIZE,
            max_commands_per_device: config.downlink.max_per_device,
            health_retry: health::RETRY,
        }
    }
}

/// The two lanes of the outbox. Events drain before readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Reading,
    Event,
}

impl Lane {
    /// Both lanes, readings first: the order of reports and metrics (the forwarder's
    /// drain order is its own).
    pub const ALL: [Lane; 2] = [Lane::Reading, Lane::Event];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Reading => "readings",
            Lane::Event => "events",
        }
    }
}

/// One value per lane, read and written by [`Lane`] (`by_lane[Lane::Event]`), so no code
/// depends on an order of the lanes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ByLane<T> {
    readings: T,
    events: T,
}

impl<T> ByLane<T> {
    pub fn from_fn(mut f: impl FnMut(Lane) -> T) -> Self {
        ByLane {
            readings: f(Lane::Reading),
            events: f(Lane::Event),
        }
    }

    /// Each lane with its value, in [`Lane::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Lane, &T)> {
        Lane::ALL.into_iter().map(move |lane| (lane, &self[lane]))
    }
}

impl<T> std::ops::Index<Lane> for ByLane<T> {
    type Output = T;
    fn index(&self, lane: Lane) -> &T {
        match lane {
            Lane::Reading => &self.readings,
            Lane::Event => &self.events,
        }
    }
}

impl<T> std::ops::IndexMut<Lane> for ByLane<T> {
    fn index_mut(&mut self, lane: Lane) -> &mut T {
        match lane {
            Lane::Reading => &mut self.readings,
            Lane::Event => &mut self.events,
        }
    }
}

/// One message to forward upstream, as the row it is stored as.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub lane: Lane,
    /// Its topic is relative to the upstream prefix: the device's original topic for
    /// readings, `events/{type}/{device}` for events (see [`OutboxEntry::event`]).
    pub row: Row,
}

impl OutboxEntry {
    /// A reading as it arrived on `topic`.
    pub fn reading(
        topic: &str,
        device: &str,
        payload: &[u8],
        format: Format,
        received_at: Millis,
    ) -> Self {
        OutboxEntry {
            lane: Lane::Reading,
            row: Row::encode(received_at, format, topic, device, payload),
        }
    }

    /// [`OutboxEntry::reading`], its row written into `rows`, which the caller keeps
    /// between readings ([`Row::encode_in`]).
    pub fn reading_in(
        rows: &mut bytes::BytesMut,
        topic: &str,
        device: &str,
        payload: &[u8],
        format: Format,
        received_at: Millis,
    ) -> Self {
        OutboxEntry {
            lane: Lane::Reading,
            row: Row::encode_in(rows, received_at, format, topic, device, payload),
        }
    }

    /// An event (a CloudEvents JSON envelope), forwarded to `events/{type}/{device}`.
    pub fn event(event_type: &str, device: &str, json: &[u8], time: Millis) -> Self {
        let topic = format!("events/{event_type}/{device}");
        OutboxEntry::on_event_lane(&topic, device, json, time)
    }

    /// A JSON message on the event lane, forwarded to `topic`.
    pub fn on_event_lane(topic: &str, device: &str, json: &[u8], time: Millis) -> Self {
        OutboxEntry {
            lane: Lane::Event,
            row: Row::encode(time, Format::Json, topic, device, json),
        }
    }
}

/// A committed outbox row, as the forwarder reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: u64,
    pub lane: Lane,
    pub row: Row,
}

impl OutboxRow {
    /// Topic relative to the upstream prefix.
    pub fn topic(&self) -> &str {
        self.row.topic()
    }

    pub fn device(&self) -> &str {
        self.row.device()
    }

    pub fn payload(&self) -> &[u8] {
        self.row.payload()
    }

    pub fn format(&self) -> Format {
        self.row.format()
    }

    pub fn received_at(&self) -> Millis {
        self.row.received_at()
    }
}

/// A payload that could not be decoded, kept for the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub topic: String,
    pub payload: Vec<u8>,
    pub reason: String,
    pub received_at: Millis,
}

/// Commands that carry data; sent with `try_send`, dropped and counted when the queue is full.
enum DataCmd {
    /// With the receipt of the device publish it came from, released once committed.
    Append(OutboxEntry, Option<Receipt>),
    DeadLetter(DeadLetter, Option<Receipt>),
    /// A device publish that needs no write, acknowledged in order with the others.
    Receipt(Receipt),
    PutState(String, Vec<u8>),
    DeleteState(String),
    LogEvent {
        time: Millis,
        event_type: String,
        device: String,
        json: Vec<u8>,
    },
    /// A downlink command for its device's queue; `on_commit` runs after the commit that
    /// holds it (and is dropped, not run, when it is not stored).
    QueueCommand(QueuedCommand, Option<OnCommit>),
    /// A queued command leaves the queue as `state`.
    CommandDone {
        device: String,
        seq: u64,
        state: CommandState,
    },
}

/// What runs once a command is committed (the upstream PUBACK of a downlink command).
pub type OnCommit = Box<dyn FnOnce() + Send>;

/// Commands that steer the store; never dropped.
enum CtlCmd {
    Ack(Lane, Vec<u64>),
    Flush(oneshot::Sender<bool>),
    /// The forwarder reached the end of the file while newer rows are only journaled
    /// (`tail.rs`): commit them to the file now rather than at the checkpoint interval.
    Checkpoint,
    /// The feed the owner runs before each group (`feed.rs`).
    Feed(StartFeed),
    /// The feed takes no more input than what waits now; the sender is told once it has
    /// handled that and finished.
    EndFeed(oneshot::Sender<()>),
    Shutdown,
}

struct Shared {
    path: PathBuf,
    /// Boxed: the bounded queue allocates and writes every slot up front, and a 16-byte
    /// slot keeps [`CHANNEL_CAPACITY`] of them at 256 KiB (96-byte commands: 1.5 MiB).
    data_tx: Sender<Box<DataCmd>>,
    ctl_tx: Sender<CtlCmd>,
    db: Arc<ReaderSlot>,
    counters: Arc<Counters>,
    new_rows: Arc<Notify>,
    /// The newest committed rows, for [`StoreHandle::read_outbox_live`].
    tails: Arc<Mutex<Tails>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The owner thread, woken when [`COMMIT_EARLY_ROWS`] commands wait.
    owner: std::thread::Thread,
}

/// Runs a read on whichever reader the store has now.
macro_rules! with_reader {
    ($self:ident, |$db:ident| $body:expr) => {
        match $self.reader() {
            Ok(Reader::Writer($db)) => $body,
            Ok(Reader::ReadOnly($db)) => $body,
            Err(e) => Err(e),
        }
    };
}

/// The store: [`Store::open`] starts its owner thread and returns a handle.
pub struct Store;

impl Store {
    /// Opens (or creates) the database at `path` and spawns the owner thread.
    pub fn open(path: &Path, cfg: StoreConfig) -> Result<StoreHandle, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        // A database that could not be created (e.g. no space) must not leave a partial
        // file behind: it would fail every later start as "not a redb database".
        let existed = path.exists();
        let open_error = |source: redb::Error| {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            StoreError::Open {
                path: path.to_owned(),
                source,
            }
        };
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(cfg.cache_size)
            .create(path)
            .map_err(|e| open_error(e.into()))?;
        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let mut journal = Journal::open(path, JOURNAL_BYTES)?;
        match writer::open_file(&db, &mut journal, &counters, false) {
            Ok(0) => {}
            Ok(replayed) => tracing::info!(
                path = %path.display(),
                commits = replayed,
                "the store was not closed by the last run; its journaled commits are applied"
            ),
            Err(e) => {
                drop(db);
                return Err(match e {
                    StoreError::Db(e) => open_error(e),
                    e => e,
                });
            }
        }
        let slot = Arc::new(ReaderSlot::new(Some(Reader::Writer(db.clone()))));
        let (data_tx, data_rx) = flume::bounded(cfg.channel_capacity.max(1));
        let (ctl_tx, ctl_rx) = flume::unbounded();
        let new_rows = Arc::new(Notify::new());
        let tails = Arc::new(Mutex::new(Tails::default()));
        let owner = writer::Owner::new(
            (db, journal),
            path.to_owned(),
            slot.clone(),
            cfg,
            (data_rx, ctl_rx),
            counters.clone(),
            (new_rows.clone(), tails.clone()),
        );
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || owner.run())
            .map_err(|source| StoreError::Io {
                path: path.to_owned(),
                source,
            })?;
        let owner = thread.thread().clone();
        tracing::info!(path = %path.display(), "store opened");
        Ok(StoreHandle {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                data_tx,
                ctl_tx,
                db: slot,
                counters,
                new_rows,
                tails,
                thread: Mutex::new(Some(thread)),
                owner,
            }),
        })
    }
}

/// A cheap, cloneable handle to the store. Dropping the last one shuts the store down.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
}

impl StoreHandle {
    /// Queues `cmd`, waiting while the queue is full (backpressure on the stage that
    /// sends it). Refused at once, and counted as `refused`, while the storage is
    /// unavailable; counted as `overflow` when the store has shut down.
    fn send_data(&self, cmd: DataCmd, overflow: Counter, refused: Counter) -> bool {
        if self.shared.counters.degraded() {
            self.shared.counters.add(refused, 1);
            return false;
        }
        // The feed, on the owner thread, hands over into the group being gathered.
        let Some(cmd) = feed::keep(cmd) else {
            return true;
        };
        match self.shared.data_tx.send(Box::new(cmd)) {
            Ok(()) => {
                // A group this full need not wait out the commit spacing (`writer.rs`):
                // the owner holds the group's first command, the queue the rest.
                if self.shared.data_tx.len() == COMMIT_EARLY_ROWS - 1 {
                    self.shared.owner.unpark();
                }
                true
            }
            Err(_) => {
                self.shared.counters.add(overflow, 1);
                false
            }
        }
    }

    /// Queues a message for upstream, waiting while the queue is full. Returns false and
    /// counts `drop.refused.{lane}` while the storage is unavailable, or `store_overflow`
    /// once the store has shut down.
    pub fn append(&self, entry: OutboxEntry) -> bool {
        self.append_acked(entry, None)
    }

    /// [`append`](Self::append), releasing `receipt` once the entry is committed. When the
    /// entry is refused or dropped the receipt is dropped unreleased: the device is not
    /// acknowledged.
    pub fn append_acked(&self, entry: OutboxEntry, receipt: Option<Receipt>) -> bool {
        let refused = Counter::refused(entry.lane);
        self.send_data(
            DataCmd::Append(entry, receipt),
            Counter::DropStoreOverflow,
            refused,
        )
    }

    /// Keeps a payload that did not decode, releasing `receipt` once it is committed;
    /// waits while the queue is full. Counts `refused.dead_letters` while the storage is
    /// unavailable, `dead_letter_overflow` once the store has shut down.
    pub fn dead_letter(&self, dl: DeadLetter, receipt: Option<Receipt>) -> bool {
        self.send_data(
            DataCmd::DeadLetter(dl, receipt),
            Counter::DropDeadLetterOverflow,
            Counter::RefusedDeadLetters,
        )
    }

    /// Releases `receipt` in order with the commits of what was queued before it (a
    /// device publish that is not stored, such as a reading with forwarding off). While
    /// the storage is unavailable it is dropped unreleased.
    pub fn release(&self, receipt: Receipt) {
        if !self.shared.counters.degraded() {
            if let Some(cmd) = feed::keep(DataCmd::Receipt(receipt)) {
                let _ = self.shared.data_tx.send(Box::new(cmd));
            }
        }
    }

    /// Stores a rule-engine state value under `key` (replacing any older value).
    pub fn put_state(&self, key: String, value: Vec<u8>) -> bool {
        self.send_data(
            DataCmd::PutState(key, value),
            Counter::DropStateOverflow,
            Counter::RefusedState,
        )
    }

    /// Removes a rule-engine state value.
    pub fn delete_state(&self, key: String) -> bool {
        self.send_data(
            DataCmd::DeleteState(key),
            Counter::DropStateOverflow,
            Counter::RefusedState,
        )
    }

    /// Appends an event to the event log (not the outbox; use [`append`](Self::append) for that).
    pub fn log_event(&self, time: Millis, event_type: &str, device: &str, json: Vec<u8>) -> bool {
        let cmd = DataCmd::LogEvent {
            time,
            event_type: event_type.to_owned(),
            device: device.to_owned(),
            json,
        };
        self.send_data(cmd, Counter::DropEventLogOverflow, Counter::RefusedEventLog)
    }

    /// Queues a downlink command (and its `queued` status message) and runs `on_commit`
    /// once that is committed; waits while the queue is full. When the command is refused
    /// (the storage is unavailable) or lost, `on_commit` is dropped without running.
    pub fn queue_command(&self, command: QueuedCommand, on_commit: Option<OnCommit>) -> bool {
        self.send_data(
            DataCmd::QueueCommand(command, on_commit),
            Counter::DropStoreOverflow,
            Counter::DropRefusedEvents,
        )
    }

    /// Removes a queued command as `state` (delivered, expired or dropped) with its status
    /// message; nothing when it has left the queue already.
    pub fn command_done(&self, device: &str, seq: u64, state: CommandState) -> bool {
        let cmd = DataCmd::CommandDone {
            device: device.to_owned(),
            seq,
            state,
        };
        self.send_data(cmd, Counter::DropStoreOverflow, Counter::DropRefusedEvents)
    }

    /// The committed commands of `device` (of every device with `None`), oldest first per
    /// device, at most `limit`.
    pub fn pending_commands(
        &self,
        device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<QueuedCommand>, StoreError> {
        with_reader!(self, |db| commands::pending(&*db, device, limit))
    }

    /// Deletes forwarded rows of `lane` (upstream acked them). Unknown seqs are ignored.
    pub fn ack(&self, lane: Lane, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            let _ = self.shared.ctl_tx.send(CtlCmd::Ack(lane, seqs));
        }
    }

    /// Waits until everything queued before this call is committed; `CommitFailed` when
    /// that commit failed or the storage is unavailable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .ctl_tx
            .send(CtlCmd::Flush(tx))
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::CommitFailed),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// [`flush`](Self::flush) for threads outside a tokio runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .ctl_tx
            .send(CtlCmd::Flush(tx))
            .map_err(|_| StoreError::Closed)?;
        match rx.blocking_recv() {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::CommitFailed),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Commits what is queued, stops the owner thread and releases the file once no read
    /// is running. Later calls (from any clone) return `Ok`.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        let thread = self
            .shared
            .thread
            .lock()
            .map(|mut t| t.take())
            .ok()
            .flatten();
        let Some(thread) = thread else { return Ok(()) };
        let _ = self.shared.ctl_tx.send(CtlCmd::Shutdown);
        let joined = thread.join();
        if let Ok(mut db) = self.shared.db.write() {
            db.take();
        }
        joined.map_err(|_| StoreError::ThreadPanicked)
    }

    /// Live counters of the outbox, as of the last commit (queue drops, refusals and
    /// storage errors are live), with the storage health (`stats().storage`,
    /// `stats().storage_degraded()`).
    pub fn stats(&self) -> OutboxStats {
        self.shared.counters.snapshot()
    }

    /// A live counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.shared.counters.get(c)
    }

    /// True while the storage is unavailable: new entries are refused until a retry works.
    pub fn is_degraded(&self) -> bool {
        self.shared.counters.degraded()
    }

    /// The epoch of this database file: set when the file was created, never changed, and
    /// different for every file (see `tables::new_epoch`). Message ids carry it so they
    /// stay unique when a wiped data directory starts the sequence at 1 again.
    pub fn epoch(&self) -> u64 {
        self.shared.counters.epoch()
    }

    /// The highest sequence number committed so far (0 when none).
    pub fn last_committed_seq(&self) -> u64 {
        self.shared.counters.get(Counter::NextSeq).saturating_sub(1)
    }

    /// Acked seqs whose deletion is committed, since the store was opened (ack calls made
    /// minus this is what a crash now would send again).
    pub fn acks_committed(&self) -> u64 {
        self.shared.counters.acks_committed()
    }

    /// Has the owner thread run `start`'s feed before each group from now on (`feed.rs`);
    /// what the feed hands to the store joins the group being gathered.
    pub fn feed(&self, start: StartFeed) {
        let _ = self.shared.ctl_tx.send(CtlCmd::Feed(start));
    }

    /// Wakes the owner thread from its commit spacing (`writer.rs`): for the feed's input,
    /// once [`COMMIT_EARLY_ROWS`] messages wait in it.
    pub fn early_commit(&self) -> impl Fn() + Send + Sync + 'static {
        let owner = self.shared.owner.clone();
        move || owner.unpark()
    }

    /// Ends the feed: what its input holds now is handled, then it finishes. The receiver
    /// resolves once it has (at once without a feed), or errs when the store has closed.
    pub fn end_feed(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.ctl_tx.send(CtlCmd::EndFeed(tx));
        rx
    }

    /// Resolves after the next commit that added outbox rows or applied acks (or at once
    /// if one happened since the last call). Meant for the single forwarder.
    pub async fn rows_added(&self) {
        self.shared.new_rows.notified().await
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The current reader: the writable database, or a read-only handle while degraded.
    fn reader(&self) -> Result<Reader, StoreError> {
        match self.shared.db.read().ok().and_then(|db| db.clone()) {
            Some(r) => Ok(r),
            None if self.shared.counters.degraded() => Err(StoreError::Unavailable),
            None => Err(StoreError::Closed),
        }
    }

    /// The shared writable database for read transactions; `Closed` after shutdown,
    /// `Unavailable` while the storage is degraded.
    pub fn database(&self) -> Result<Arc<Database>, StoreError> {
        match self.reader()? {
            Reader::Writer(db) => Ok(db),
            Reader::ReadOnly(_) => Err(StoreError::Unavailable),
        }
    }

    /// Reads up to `limit` committed rows of `lane` with `seq >= from_seq`, in seq order,
    /// into `out` (cleared first).
    ///
    /// While the storage is unavailable and not even readable, this reads nothing and
    /// returns `Ok`: the caller waits for [`rows_added`](Self::rows_added), which fires
    /// again on recovery. Errors are only for shutdown and corrupt rows.
    pub fn read_outbox(
        &self,
        lane: Lane,
        from_seq: u64,
        limit: usize,
        out: &mut Vec<OutboxRow>,
    ) -> Result<(), StoreError> {
        let res = with_reader!(self, |db| read::outbox_rows(
            &*db, lane, from_seq, limit, out
        ));
        match res {
            Err(StoreError::Closed) => Err(StoreError::Closed),
            Err(e) if health::is_unavailable(&e) && self.thread_running() => {
                out.clear();
                Ok(())
            }
            other => other,
        }
    }

    /// [`StoreHandle::read_outbox`] for the one reader that reads the outbox in seq order
    /// and takes each row once (the forwarder): rows committed since it caught up come
    /// from memory (`tail.rs`), anything older from the file. Any other reader must use
    /// [`StoreHandle::read_outbox`], or the forwarder would miss the rows it took.
    pub fn read_outbox_live(
        &self,
        lane: Lane,
        from_seq: u64,
        limit: usize,
        out: &mut Vec<OutboxRow>,
    ) -> Result<(), StoreError> {
        out.clear();
        let taken = self
            .shared
            .tails
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(lane, from_seq, limit, out);
        if taken {
            return Ok(());
        }
        self.read_outbox(lane, from_seq, limit, out)?;
        if out.len() < limit {
            let ask = self
                .shared
                .tails
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ask_checkpoint();
            if ask {
                let _ = self.shared.ctl_tx.send(CtlCmd::Checkpoint);
            }
        }
        Ok(())
    }

    fn thread_running(&self) -> bool {
        self.shared.thread.lock().is_ok_and(|t| t.is_some())
    }

    /// The newest `limit` dead letters, newest first.
    pub fn read_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        with_reader!(self, |db| read::dead_letters(&*db, limit))
    }

    /// One rule-engine state value.
    pub fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        with_reader!(self, |db| read::state(&*db, key))
    }

    /// Every rule-engine state value whose key starts with `prefix`.
    pub fn load_state_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        with_reader!(self, |db| read::state_prefix(&*db, prefix))
    }

    /// Logged events with `time >= since`, oldest first, filtered by type and device.
    pub fn query_events(
        &self,
        since: Millis,
        event_type: Option<&str>,
        device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        with_reader!(self, |db| read::events(
            &*db, since, event_type, device, limit
        ))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.get_mut().ok().and_then(|t| t.take()) {
            let _ = self.ctl_tx.send(CtlCmd::Shutdown);
            let _ = thread.join();
        }
    }
}
