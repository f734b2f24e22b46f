//! The commit journal: what makes a group durable between two checkpoints of the database.
//!
//! A redb commit rewrites the B-tree pages it touched, their parents and the allocator
//! state, then syncs: tens of kilobytes and most of a millisecond however few rows the
//! group holds. So the owner thread ([`super::writer`]) keeps one write transaction open
//! across many groups, and makes each group durable by appending the changes it made
//! (every insert and removal, key and value bytes, of every table) to this file with one
//! synchronous write. Every [`CHECKPOINT_INTERVAL`] (or when the journal is
//! full, or when a flush, a shutdown or a downlink command asks for it) the transaction is
//! committed to redb, and the journal starts over.
//!
//! Invariants:
//! - A group's receipts are released only after its record is synced (or after the
//!   checkpoint that holds it): a `kill -9` or a power loss at any moment loses nothing a
//!   device was acknowledged for.
//! - The file is `{database}.journal`, of [`JOURNAL_BYTES`], allocated once. A 4 KiB
//!   header holds the database's epoch and the journal's generation; records follow,
//!   each `[body length u32][crc32 u32][generation u64][body]`, the CRC over generation
//!   and body, each starting on a [`BLOCK`] boundary (the rest of its last block is
//!   padding). A checkpoint that committed bumps the generation and rewrites the header
//!   (synced) before any new record: the records of older generations still in the file
//!   are then ignored, without erasing them.
//! - Records are written with direct I/O and `O_DSYNC` where the filesystem allows it:
//!   one `pwrite` that returns once the record is on the disk, without copying it into
//!   the page cache and writing it back from there (`fdatasync`). Whole blocks, so a
//!   record never shares a block with the one before it: a write that tears cannot
//!   damage a record already synced. Where direct I/O is refused (at open, or by a first
//!   write) the same layout is written through the page cache and synced.
//! - Reading stops at the first record that is empty, torn (bad CRC), too long, or of
//!   another generation. A torn record was never synced, so nothing was acknowledged for
//!   it. A journal written before records were aligned (header `GWJRNL01`: records back
//!   to back) is read as it was written; the header of the next generation is the
//!   current one.
//! - Replay ([`replay`]) applies the records of the current generation to the database in
//!   one transaction when the store opens (and when it recovers from a storage fault). The
//!   operations are physical (put this value at this key, remove this key), so replaying
//!   a record twice, for instance after a crash between a checkpoint's commit and the
//!   header rewrite, leaves the same rows: the last operation on a key decides its value.
//! - A journal whose epoch is not the database's (the database file was deleted and
//!   created anew) is discarded, not replayed.
//! - Readers of the file (the HTTP API, `gateway outbox stats` while the gateway runs) see
//!   the last checkpoint, at most [`CHECKPOINT_INTERVAL`] old; the forwarder takes new rows
//!   from memory (`tail.rs`).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Key, ReadableDatabase, StorageError, Table, TableDefinition, Value, WriteTransaction};

use super::tables::{
    COMMANDS, DEAD_LETTERS, EPOCH, EVENT_LOG, META, OUTBOX_EVENTS, OUTBOX_READINGS, RULE_STATE,
};
use super::StoreError;

/// Longest time between two checkpoints (redb commits) while groups are journaled.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the journal file: at 1000 devices x 10 readings/s a second of groups (about 860
/// records of one or two blocks) takes 4 to 7 MiB.
/// A group that does not fit is committed to the database directly (a checkpoint).
pub const JOURNAL_BYTES: u64 = 16 * 1024 * 1024;
/// The header's share of the file; records start here.
const HEADER_BYTES: u64 = 4096;
/// Records start at multiples of this: the unit of a direct write (and the page size, so
/// it suits any disk whose sectors are no larger).
pub(super) const BLOCK: usize = 4096;
/// The header of a journal whose records start on [`BLOCK`] boundaries.
const MAGIC: &[u8; 8] = b"GWJRNL02";
/// The header of a journal whose records follow each other without gaps (written by
/// gateways before records were aligned); read, never written.
const MAGIC_PACKED: &[u8; 8] = b"GWJRNL01";
/// Length, CRC and generation in front of each record's body.
const RECORD_HEAD: usize = 16;
/// A record buffer keeps at most this much capacity once the groups stop streaming (one
/// group of `MAX_BATCH` appends takes megabytes, and would otherwise stay allocated).
const RECORD_KEEP: usize = 64 * 1024;

const INSERT: u8 = 1;
const REMOVE: u8 = 0;

/// The tables the journal knows, by the id it writes for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum TableId {
    Readings = 0,
    Events = 1,
    DeadLetters = 2,
    RuleState = 3,
    EventLog = 4,
    Commands = 5,
    Meta = 6,
}

impl TableId {
    const ALL: [TableId; 7] = [
        TableId::Readings,
        TableId::Events,
        TableId::DeadLetters,
        TableId::RuleState,
        TableId::EventLog,
        TableId::Commands,
        TableId::Meta,
    ];

    /// The table a record names by `id`; `None` for an id no table has.
    fn from_u8(id: u8) -> Option<TableId> {
        Self::ALL.into_iter().find(|t| *t as u8 == id)
    }
}

/// The journal file of one database.
pub(super) struct Journal {
    /// Reads, and writes where direct I/O is refused.
    file: File,
    /// The file opened for direct, synchronous writes (`O_DIRECT | O_DSYNC`); `None`
    /// where the filesystem refuses them.
    direct: Option<File>,
    /// Where a direct write is copied to: memory aligned as the write needs.
    blocks: Vec<Block>,
    /// Whether the records of the current generation start on block boundaries (not so
    /// in a journal written before that, until its next generation).
    aligned: bool,
    path: PathBuf,
    /// The epoch of the database the records belong to.
    epoch: u64,
    generation: u64,
    /// Where the next record goes.
    end: u64,
    capacity: u64,
}

/// What a journal held when it was opened.
pub(super) struct Recovered {
    pub(super) epoch: u64,
    /// Bodies of the records of the current generation, in order.
    pub(super) records: Vec<Vec<u8>>,
}

impl Journal {
    /// The journal of the database at `db`.
    pub(super) fn path_for(db: &Path) -> PathBuf {
        let mut name = db.as_os_str().to_owned();
        name.push(".journal");
        PathBuf::from(name)
    }

    /// Opens the journal of the database at `db` (created, and allocated, when missing);
    /// [`replay`] applies what it holds.
    pub(super) fn open(db: &Path, capacity: u64) -> Result<Journal, StoreError> {
        let path = Self::path_for(db);
        let io_error = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error)?;
        let len = file.metadata().map_err(io_error)?.len();
        let capacity = capacity.max(HEADER_BYTES + BLOCK as u64);
        if len < capacity {
            allocate(&file, capacity).map_err(io_error)?;
        }
        let direct = open_direct(&path);
        if direct.is_none() {
            tracing::info!(
                path = %path.display(),
                "the filesystem refuses direct I/O: journal records go through the page cache"
            );
        }
        Ok(Journal {
            file,
            direct,
            blocks: Vec::new(),
            aligned: true,
            path,
            epoch: 0,
            generation: 0,
            end: HEADER_BYTES,
            capacity: capacity.max(len),
        })
    }

    /// An I/O error of this journal, naming its file.
    fn error(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads the header and the records of the current generation from the file (when
    /// the store opens, and when it recovers from a storage fault).
    pub(super) fn recover(&mut self) -> Result<Recovered, StoreError> {
        self.read_all().map_err(|e| self.error(e))
    }

    fn read_all(&mut self) -> io::Result<Recovered> {
        let mut header = [0u8; 28];
        let header = match self.file.read_exact_at(&mut header, 0) {
            Ok(()) => parse_header(&header),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) => return Err(e),
        };
        // A header that does not read (a new file, or one torn by a power loss during a
        // rewrite) gives no generation: take the first record's. Its records were then
        // checkpointed already, and replaying them again changes nothing (module header),
        // nor does reading fewer of them.
        let (epoch, generation, aligned) = match header {
            Some(h) => h,
            None => (0, self.first_generation()?, true),
        };
        self.aligned = aligned;
        self.epoch = epoch;
        self.generation = generation;
        let records = self.read_records()?;
        Ok(Recovered { epoch, records })
    }

    /// The generation of the record at the start, if one is whole.
    fn first_generation(&self) -> io::Result<u64> {
        let mut head = [0u8; RECORD_HEAD];
        if self.file.read_exact_at(&mut head, HEADER_BYTES).is_err() {
            return Ok(0);
        }
        Ok(u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")))
    }

    /// The records of the current generation, from the start to the first that is not
    /// whole; `end` is set after the last of them.
    fn read_records(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut records = Vec::new();
        let mut at = HEADER_BYTES;
        let mut head = [0u8; RECORD_HEAD];
        while at + RECORD_HEAD as u64 <= self.capacity {
            self.file.read_exact_at(&mut head, at)?;
            let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as u64;
            let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            let generation = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            if len == 0
                || generation != self.generation
                || at + RECORD_HEAD as u64 + len > self.capacity
            {
                break;
            }
            let mut body = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut body, at + RECORD_HEAD as u64)?;
            if record_crc(generation, &body) != crc {
                break;
            }
            at = self.next_record(at, RECORD_HEAD as u64 + len);
            records.push(body);
        }
        self.end = at;
        Ok(records)
    }

    /// Empties `record` for the operations of the next group: room for the head, which
    /// [`append`](Self::append) fills in, then the body. Its capacity is kept (see
    /// [`shrink`](Self::shrink) for letting it go).
    pub(super) fn begin(record: &mut Vec<u8>) {
        record.clear();
        record.resize(RECORD_HEAD, 0);
    }

    /// Lets go of `record`'s capacity beyond [`RECORD_KEEP`] (its contents are gone),
    /// and of as much of the buffer direct writes are copied to.
    pub(super) fn shrink(&mut self, record: &mut Vec<u8>) {
        if record.capacity() > RECORD_KEEP {
            *record = Vec::with_capacity(RECORD_KEEP);
        }
        if self.blocks.capacity() > RECORD_KEEP / BLOCK {
            self.blocks = Vec::with_capacity(RECORD_KEEP / BLOCK);
        }
    }

    /// Where the record after one of `len` bytes at `at` starts.
    fn next_record(&self, at: u64, len: u64) -> u64 {
        if self.aligned {
            (at + len).next_multiple_of(BLOCK as u64)
        } else {
            at + len
        }
    }

    /// Whether `record` (from [`begin`](Self::begin)) fits after the records already
    /// written.
    pub(super) fn fits(&self, record: &[u8]) -> bool {
        self.next_record(self.end, record.len() as u64) <= self.capacity
    }

    /// The same journal writing through the page cache, as where direct I/O is refused.
    #[cfg(test)]
    fn without_direct_io(mut self) -> Journal {
        self.direct = None;
        self
    }

    /// Writes `record` (from [`begin`](Self::begin), its body filled) as the next record
    /// and syncs it: once this returns, the group it describes survives a crash or a
    /// power loss.
    pub(super) fn append(&mut self, record: &mut [u8]) -> Result<(), StoreError> {
        self.write_record(record).map_err(|e| self.error(e))
    }

    fn write_record(&mut self, record: &mut [u8]) -> io::Result<()> {
        debug_assert!(self.fits(record) && record.len() >= RECORD_HEAD);
        frame(record, self.generation);
        self.write_synced(record, self.end)?;
        self.end = self.next_record(self.end, record.len() as u64);
        Ok(())
    }

    /// Writes `bytes` at `at` (a block boundary) and returns once they are on the disk: a
    /// direct write of whole blocks (the last one padded with zeros), or a write through
    /// the page cache and `fdatasync` where direct I/O is refused. The buffer the bytes
    /// are copied to keeps its room while groups stream in, as the record's does
    /// ([`shrink`](Self::shrink)).
    fn write_synced(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        debug_assert!(at.is_multiple_of(BLOCK as u64));
        if let Some(direct) = &self.direct {
            let blocks = bytes.len().div_ceil(BLOCK);
            if self.blocks.len() < blocks {
                self.blocks.resize(blocks, Block([0; BLOCK]));
            }
            let buf = Block::bytes_mut(&mut self.blocks[..blocks]);
            buf[..bytes.len()].copy_from_slice(bytes);
            buf[bytes.len()..].fill(0);
            match direct.write_all_at(buf, at) {
                Ok(()) => return Ok(()),
                // Refused for this file's alignment or filesystem: the page cache takes
                // this record (written whole again) and those after it.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        path = %self.path.display(),
                        error = %e,
                        "the filesystem refuses direct writes: journal records go through the page cache"
                    );
                    self.direct = None;
                    self.blocks = Vec::new();
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(bytes, at)?;
        self.file.sync_data()
    }

    /// Starts a new generation for the database of `epoch`, once everything journaled is
    /// committed to the database (a checkpoint): the records written so far stop counting.
    pub(super) fn reset(&mut self, epoch: u64) -> Result<(), StoreError> {
        self.new_generation(epoch).map_err(|e| self.error(e))
    }

    fn new_generation(&mut self, epoch: u64) -> io::Result<()> {
        if self.end == HEADER_BYTES && self.epoch == epoch && self.generation > 0 && self.aligned {
            return Ok(());
        }
        let generation = self.generation + 1;
        self.write_synced(&header(MAGIC, epoch, generation), 0)?;
        self.epoch = epoch;
        self.generation = generation;
        self.aligned = true;
        self.end = HEADER_BYTES;
        Ok(())
    }
}

/// One block of a direct write, aligned as direct I/O needs its memory to be.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

impl Block {
    /// `blocks` as one run of bytes.
    fn bytes_mut(blocks: &mut [Block]) -> &mut [u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array whose size is its alignment,
        // so a slice of blocks is `len * BLOCK` initialised bytes without gaps, borrowed
        // mutably for the lifetime of the result.
        unsafe {
            std::slice::from_raw_parts_mut(
                blocks.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(blocks),
            )
        }
    }
}

/// The journal at `path` opened for direct, synchronous writes; `None` where the
/// filesystem refuses direct I/O (some network and FUSE filesystems).
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
        .ok()
}

/// Gives the file its blocks up front where the filesystem can (so appends do not
/// allocate, and a full disk is met when the store opens rather than mid-stream); a
/// sparse file otherwise.
fn allocate(file: &File, capacity: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for writing for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, capacity as libc::off_t) };
    if rc != 0 {
        file.set_len(capacity)?;
    }
    Ok(())
}

/// The header of a journal of `epoch` and `generation` whose layout `magic` names.
fn header(magic: &[u8; 8], epoch: u64, generation: u64) -> [u8; 28] {
    let mut header = [0u8; 28];
    header[0..8].copy_from_slice(magic);
    header[8..16].copy_from_slice(&epoch.to_le_bytes());
    header[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&header[0..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Fills in the head of `record` (from [`Journal::begin`], its body filled) for
/// `generation`: the body's length, the CRC, the generation.
fn frame(record: &mut [u8], generation: u64) {
    let (head, body) = record.split_at_mut(RECORD_HEAD);
    head[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    head[4..8].copy_from_slice(&record_crc(generation, body).to_le_bytes());
    head[8..16].copy_from_slice(&generation.to_le_bytes());
}

/// The epoch, the generation and whether records are aligned, from a header that reads.
fn parse_header(h: &[u8; 28]) -> Option<(u64, u64, bool)> {
    let crc = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
    let aligned = match &h[0..8] {
        m if m == MAGIC => true,
        m if m == MAGIC_PACKED => false,
        _ => return None,
    };
    if crc32fast::hash(&h[0..24]) != crc {
        return None;
    }
    let epoch = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let generation = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    Some((epoch, generation, aligned))
}

fn record_crc(generation: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// Appends one operation to a record body.
/// Logs an insert of `value` at `key` of table `id` into the record `log`.
fn log_insert<K: Key, V: Value>(
    log: &RefCell<Vec<u8>>,
    id: TableId,
    key: &K::SelfType<'_>,
    value: &V::SelfType<'_>,
) {
    push_op(
        &mut log.borrow_mut(),
        id,
        K::as_bytes(key).as_ref(),
        Some(V::as_bytes(value).as_ref()),
    );
}

/// Logs the removal of `key` from table `id` into the record `log`.
fn log_remove<K: Key>(log: &RefCell<Vec<u8>>, id: TableId, key: &K::SelfType<'_>) {
    push_op(&mut log.borrow_mut(), id, K::as_bytes(key).as_ref(), None);
}

fn push_op(log: &mut Vec<u8>, table: TableId, key: &[u8], value: Option<&[u8]>) {
    log.push(table as u8);
    log.push(if value.is_some() { INSERT } else { REMOVE });
    log.extend_from_slice(&(key.len() as u32).to_le_bytes());
    log.extend_from_slice(key);
    if let Some(v) = value {
        log.extend_from_slice(&(v.len() as u32).to_le_bytes());
        log.extend_from_slice(v);
    }
}

/// A table of the open write transaction whose changes are also written to the record
/// body of the group being applied. Reads go straight to the table (`Deref`); the three
/// ways the store changes a table (`insert`, `remove`, `pop_first`) are logged.
pub(super) struct Logged<'l, 't, K: Key + 'static, V: Value + 'static> {
    table: Table<'t, K, V>,
    id: TableId,
    log: &'l RefCell<Vec<u8>>,
}

impl<'l, 't, K: Key + 'static, V: Value + 'static> Logged<'l, 't, K, V> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        def: TableDefinition<K, V>,
        id: TableId,
        log: &'l RefCell<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        Ok(Logged {
            table: txn.open_table(def)?,
            id,
            log,
        })
    }

    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<(), StorageError> {
        log_insert::<K, V>(self.log, self.id, key.borrow(), value.borrow());
        self.table.insert(key, value)?;
        Ok(())
    }

    pub(super) fn remove<'k>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
    ) -> Result<Option<redb::AccessGuard<'_, V>>, StorageError> {
        let removed = self.table.remove(key.borrow())?;
        if removed.is_some() {
            log_remove::<K>(self.log, self.id, key.borrow());
        }
        Ok(removed)
    }

    /// Applies an insert logged earlier with [`Logged::log_insert`] (a held row that
    /// goes into the table now); not logged again.
    pub(super) fn insert_logged<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<(), StorageError> {
        self.table.insert(key, value)?;
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn pop_first(
        &mut self,
    ) -> Result<Option<(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>)>, StorageError> {
        let popped = self.table.pop_first()?;
        if let Some((k, _)) = &popped {
            log_remove::<K>(self.log, self.id, &k.value());
        }
        Ok(popped)
    }
}

impl<'t, K: Key + 'static, V: Value + 'static> std::ops::Deref for Logged<'_, 't, K, V> {
    type Target = Table<'t, K, V>;
    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// A [`Logged`] table opened on its first use in a group, not before. Most groups touch
/// only the outbox (rows held in memory, `fresh.rs`), and opening a redb table is not
/// free: a lookup in the table tree, often a page read from the file, and an update of
/// the table tree when it is dropped.
pub(super) struct LazyLogged<'l, 't, K: Key + 'static, V: Value + 'static> {
    txn: &'t WriteTransaction,
    def: TableDefinition<'static, K, V>,
    id: TableId,
    log: &'l RefCell<Vec<u8>>,
    table: Option<Logged<'l, 't, K, V>>,
}

impl<'l, 't, K: Key + 'static, V: Value + 'static> LazyLogged<'l, 't, K, V> {
    pub(super) fn new(
        txn: &'t WriteTransaction,
        def: TableDefinition<'static, K, V>,
        id: TableId,
        log: &'l RefCell<Vec<u8>>,
    ) -> Self {
        LazyLogged {
            txn,
            def,
            id,
            log,
            table: None,
        }
    }

    /// Logs an insert without opening the table or applying it: the caller holds the row
    /// until it goes into the table ([`Logged::insert_logged`], `fresh.rs`).
    pub(super) fn log_insert<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) {
        log_insert::<K, V>(self.log, self.id, key.borrow(), value.borrow());
    }

    /// Logs the removal of a row the caller held (see [`LazyLogged::log_insert`]).
    pub(super) fn log_remove<'k>(&mut self, key: impl std::borrow::Borrow<K::SelfType<'k>>) {
        log_remove::<K>(self.log, self.id, key.borrow());
    }

    /// Whether the table was opened in this group (it was used).
    pub(super) fn is_open(&self) -> bool {
        self.table.is_some()
    }

    /// The table, opened now if this is its first use.
    pub(super) fn get(&mut self) -> Result<&mut Logged<'l, 't, K, V>, StoreError> {
        if self.table.is_none() {
            self.table = Some(Logged::open(self.txn, self.def, self.id, self.log)?);
        }
        Ok(self.table.as_mut().expect("opened above"))
    }
}

/// Applies the records the journal holds to `db`, in one transaction, when they belong
/// to it (same epoch). Returns the number of records applied. The journal keeps them
/// until it is [reset](Journal::reset) (replaying them again changes nothing).
pub(super) fn replay(db: &redb::Database, journal: &mut Journal) -> Result<usize, StoreError> {
    let recovered = journal.recover()?;
    let epoch = {
        let txn = db.begin_read()?;
        match txn.open_table(META) {
            Ok(meta) => meta.get(EPOCH)?.map(|v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    let mut applied = 0;
    if !recovered.records.is_empty() {
        match epoch {
            Some(epoch) if epoch == recovered.epoch => {
                apply_bodies(db, &recovered.records, &journal.path)?;
                applied = recovered.records.len();
            }
            _ => tracing::warn!(
                path = %journal.path.display(),
                records = recovered.records.len(),
                "the journal belongs to another database (the database file was created anew); discarded"
            ),
        }
    }
    Ok(applied)
}

/// Applies record bodies to `db`, in order, in one transaction; `source` (the journal's
/// path) names them in an error.
pub(super) fn apply_bodies(
    db: &redb::Database,
    bodies: &[Vec<u8>],
    source: &Path,
) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let mut tables = Tables::open(&txn)?;
        for body in bodies {
            tables.apply(body).map_err(|e| match e {
                Some(e) => e,
                None => StoreError::CorruptRow {
                    table: "journal".into(),
                    key: source.display().to_string(),
                },
            })?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Every table a record can name, open in one transaction.
struct Tables<'t> {
    readings: Table<'t, u64, &'static [u8]>,
    events: Table<'t, u64, &'static [u8]>,
    dead: Table<'t, u64, &'static [u8]>,
    state: Table<'t, &'static str, &'static [u8]>,
    log: Table<'t, (i64, u64), &'static [u8]>,
    commands: Table<'t, (&'static str, u64), &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            readings: txn.open_table(OUTBOX_READINGS)?,
            events: txn.open_table(OUTBOX_EVENTS)?,
            dead: txn.open_table(DEAD_LETTERS)?,
            state: txn.open_table(RULE_STATE)?,
            log: txn.open_table(EVENT_LOG)?,
            commands: txn.open_table(COMMANDS)?,
            meta: txn.open_table(META)?,
        })
    }

    /// Applies one record body; `Err(None)` when it does not parse.
    fn apply(&mut self, mut body: &[u8]) -> Result<(), Option<StoreError>> {
        while !body.is_empty() {
            let (table, key, value, rest) = parse_op(body).ok_or(None)?;
            body = rest;
            let done = match TableId::from_u8(table).ok_or(None)? {
                TableId::Readings => put(&mut self.readings, key, value),
                TableId::Events => put(&mut self.events, key, value),
                TableId::DeadLetters => put(&mut self.dead, key, value),
                TableId::RuleState => put(&mut self.state, key, value),
                TableId::EventLog => put(&mut self.log, key, value),
                TableId::Commands => put(&mut self.commands, key, value),
                TableId::Meta => put(&mut self.meta, key, value),
            };
            done.map_err(|e| Some(e.into()))?;
        }
        Ok(())
    }
}

type Op<'a> = (u8, &'a [u8], Option<&'a [u8]>, &'a [u8]);

fn parse_op(b: &[u8]) -> Option<Op<'_>> {
    let (&table, b) = b.split_first()?;
    let (&kind, b) = b.split_first()?;
    let (key, b) = take_sized(b)?;
    match kind {
        INSERT => {
            let (value, b) = take_sized(b)?;
            Some((table, key, Some(value), b))
        }
        REMOVE => Some((table, key, None, b)),
        _ => None,
    }
}

fn take_sized(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let rest = &b[4..];
    (rest.len() >= len).then(|| rest.split_at(len))
}

fn put<K: Key + 'static, V: Value + 'static>(
    table: &mut Table<'_, K, V>,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), StorageError> {
    let key = K::from_bytes(key);
    match value {
        Some(v) => {
            table.insert(key, V::from_bytes(v))?;
        }
        None => {
            table.remove(key)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::Database;

    fn db_with_epoch(path: &Path, epoch: u64) -> Database {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert(EPOCH, epoch).unwrap();
        txn.open_table(OUTBOX_READINGS).unwrap();
        txn.commit().unwrap();
        db
    }

    fn append(j: &mut Journal, body: &[u8]) {
        let mut record = Vec::new();
        Journal::begin(&mut record);
        record.extend_from_slice(body);
        j.append(&mut record).unwrap();
    }

    /// The record of inserting `rows` into the readings lane and removing `gone`,
    /// applied to `txn` as the owner thread would.
    fn change(txn: &WriteTransaction, rows: &[(u64, &[u8])], gone: &[u64]) -> Vec<u8> {
        let mut record = Vec::new();
        Journal::begin(&mut record);
        let log = RefCell::new(record);
        {
            let mut t = Logged::open(txn, OUTBOX_READINGS, TableId::Readings, &log).unwrap();
            for &(k, v) in rows {
                t.insert(k, v).unwrap();
            }
            for &k in gone {
                t.remove(k).unwrap();
            }
        }
        log.into_inner()
    }

    /// A database of epoch 7 with `groups` (rows inserted, keys removed) journaled in one
    /// write transaction that is never committed, as a process that dies leaves them.
    #[allow(clippy::type_complexity)]
    fn journaled_only(path: &Path, groups: &[(&[(u64, &[u8])], &[u64])]) -> Database {
        let db = db_with_epoch(path, 7);
        let mut j = Journal::open(path, 64 * 1024).unwrap();
        j.reset(7).unwrap();
        let txn = db.begin_write().unwrap();
        for (rows, gone) in groups {
            let mut record = change(&txn, rows, gone);
            j.append(&mut record).unwrap();
        }
        drop(txn);
        db
    }

    fn readings(db: &Database) -> Vec<(u64, Vec<u8>)> {
        super::super::tables::lane_rows(db, super::super::Lane::Reading)
    }

    #[test]
    fn a_big_records_buffer_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("gw.redb"), 1024 * 1024).unwrap();
        j.reset(7).unwrap();
        let mut record = Vec::new();
        Journal::begin(&mut record);
        record.resize(RECORD_KEEP * 8, 1);
        j.append(&mut record).unwrap();
        j.shrink(&mut record);
        assert!(record.capacity() <= RECORD_KEEP, "{}", record.capacity());
        assert!(
            j.blocks.capacity() * BLOCK <= RECORD_KEEP,
            "{}",
            j.blocks.capacity()
        );
        let mut small = Vec::with_capacity(100);
        small.push(1u8);
        j.shrink(&mut small);
        assert_eq!(
            (small.capacity(), small.len()),
            (100, 1),
            "a small one is left as it is"
        );
    }

    #[test]
    fn synced_records_are_read_back_and_a_torn_one_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gw.redb");
        let mut j = Journal::open(&db, 64 * 1024).unwrap();
        assert!(j.recover().unwrap().records.is_empty());
        j.reset(7).unwrap();
        append(&mut j, b"first");
        append(&mut j, b"second");
        // A third record whose body never fully reached the disk: its CRC does not match.
        let mut torn = Vec::new();
        torn.extend_from_slice(&5u32.to_le_bytes());
        torn.extend_from_slice(&record_crc(j.generation, b"third").to_le_bytes());
        torn.extend_from_slice(&j.generation.to_le_bytes());
        torn.extend_from_slice(b"thi");
        j.file.write_all_at(&torn, j.end).unwrap();
        drop(j);

        let mut j = Journal::open(&db, 64 * 1024).unwrap();
        let recovered = j.recover().unwrap();
        assert_eq!(recovered.epoch, 7);
        assert_eq!(
            recovered.records,
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        assert!(j.fits(&[0; 1000]) && !j.fits(&[0; 64 * 1024]));
    }

    #[test]
    fn records_start_on_block_boundaries_written_directly_or_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let bodies: [&[u8]; 4] = [b"one", &[7; BLOCK - RECORD_HEAD], &[8; BLOCK], b"four"];
        let mut files = Vec::new();
        for direct in [true, false] {
            let db = dir.path().join(format!("gw-{direct}.redb"));
            let mut j = Journal::open(&db, 64 * 1024).unwrap();
            if !direct {
                j = j.without_direct_io();
            }
            j.reset(7).unwrap();
            let mut starts = Vec::new();
            for body in bodies {
                starts.push(j.end);
                append(&mut j, body);
            }
            // A small record, one of exactly one block, one of a block and 16 bytes (two
            // blocks), a small one.
            let b = BLOCK as u64;
            assert_eq!(starts, [b, 2 * b, 3 * b, 5 * b], "direct {direct}");
            assert_eq!(j.end, 6 * b);
            drop(j);
            let recovered = Journal::open(&db, 64 * 1024).unwrap().recover().unwrap();
            assert_eq!(
                recovered.records,
                bodies.map(<[u8]>::to_vec),
                "direct {direct}"
            );
            files.push(std::fs::read(Journal::path_for(&db)).unwrap());
        }
        assert!(files[0] == files[1], "both ways write the same bytes");
        assert_eq!(&files[0][0..8], MAGIC);
    }

    #[test]
    fn a_journal_of_records_back_to_back_is_replayed_then_continued_aligned() {
        // With records of its generation, and with none (its header must be rewritten
        // all the same: the records after it are aligned).
        for records in [2, 0] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("gw.redb");
            let db = db_with_epoch(&path, 7);
            // As a gateway before aligned records left it: header `GWJRNL01`, generation
            // 3, records back to back, written by hand here.
            let mut file = header(MAGIC_PACKED, 7, 3).to_vec();
            file.resize(HEADER_BYTES as usize, 0);
            let txn = db.begin_write().unwrap();
            let mut changes = [
                change(&txn, &[(1, b"a"), (2, b"b")], &[]),
                change(&txn, &[(3, b"c")], &[1]),
            ];
            for record in &mut changes[..records] {
                frame(record, 3);
                file.extend_from_slice(record);
            }
            drop(txn);
            file.resize(64 * 1024, 0);
            std::fs::write(Journal::path_for(&path), &file).unwrap();

            let mut j = Journal::open(&path, 64 * 1024).unwrap();
            assert_eq!(replay(&db, &mut j).unwrap(), records);
            let want = match records {
                0 => vec![],
                _ => vec![(2, b"b".to_vec()), (3, b"c".to_vec())],
            };
            assert_eq!(readings(&db), want);
            // The store starts over in the current layout once the records are in the
            // database file.
            let counters = super::super::stats::Counters::default();
            super::super::writer::open_file(&db, &mut j, &counters, false).unwrap();
            assert_eq!(readings(&db), want);
            append(&mut j, b"x");
            append(&mut j, b"y");
            drop(j);
            let written = std::fs::read(Journal::path_for(&path)).unwrap();
            assert_eq!(&written[0..8], MAGIC, "{records} records");
            let second = HEADER_BYTES as usize + BLOCK;
            assert_eq!(&written[second + RECORD_HEAD..][..1], b"y");
            let recovered = Journal::open(&path, 64 * 1024).unwrap().recover().unwrap();
            assert_eq!(recovered.records, vec![b"x".to_vec(), b"y".to_vec()]);
        }
    }

    #[test]
    fn after_a_reset_the_earlier_records_no_longer_count() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gw.redb");
        let mut j = Journal::open(&db, 64 * 1024).unwrap();
        j.reset(7).unwrap();
        append(&mut j, b"checkpointed 1");
        append(&mut j, b"checkpointed 2");
        j.reset(7).unwrap();
        append(&mut j, b"new");
        drop(j);
        let recovered = Journal::open(&db, 64 * 1024).unwrap().recover().unwrap();
        assert_eq!(recovered.records, vec![b"new".to_vec()]);
    }

    #[test]
    fn replay_restores_uncommitted_changes_and_twice_changes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.redb");
        let db = journaled_only(
            &path,
            &[
                (&[(1, b"a"), (2, b"b"), (3, b"c")], &[]),
                (&[(2, b"b2")], &[1]),
            ],
        );
        assert!(readings(&db).is_empty());
        let want = vec![(2, b"b2".to_vec()), (3, b"c".to_vec())];

        let mut j = Journal::open(&path, 64 * 1024).unwrap();
        assert_eq!(replay(&db, &mut j).unwrap(), 2);
        assert_eq!(readings(&db), want);
        // The checkpoint's commit done, the header not yet rewritten: replayed again.
        assert_eq!(replay(&db, &mut j).unwrap(), 2);
        assert_eq!(readings(&db), want);
        // Opening the store replays, then the journal starts over.
        let counters = super::super::stats::Counters::default();
        super::super::writer::open_file(&db, &mut j, &counters, false).unwrap();
        assert_eq!(readings(&db), want);
        drop(j);
        let recovered = Journal::open(&path, 64 * 1024).unwrap().recover().unwrap();
        assert!(recovered.records.is_empty());
    }

    #[test]
    fn table_ids_read_back_and_an_unknown_id_is_refused() {
        for (i, t) in TableId::ALL.into_iter().enumerate() {
            assert_eq!(t as u8 as usize, i, "ids are the positions in ALL");
            assert_eq!(TableId::from_u8(t as u8), Some(t));
        }
        assert_eq!(TableId::from_u8(TableId::ALL.len() as u8), None);
    }

    #[test]
    fn the_journal_of_another_database_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.redb");
        drop(journaled_only(&path, &[(&[(1, b"old")], &[])]));
        // The database is deleted and created anew; its journal stays behind.
        std::fs::remove_file(&path).unwrap();
        let db = db_with_epoch(&path, 8);
        let mut j = Journal::open(&path, 64 * 1024).unwrap();
        assert_eq!(replay(&db, &mut j).unwrap(), 0);
        assert!(readings(&db).is_empty());
    }
}
