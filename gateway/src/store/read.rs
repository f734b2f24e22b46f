//! Read-only queries on the store's tables: outbox rows for the forwarder, dead letters,
//! rule state and the event log. Runs on the caller's thread in a read transaction,
//! concurrently with the owner thread's writes (redb allows many readers).

use std::path::Path;

use bytes::Bytes;
use redb::{ConcurrencyMode, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::tables::{self, DEAD_LETTERS, EVENT_LOG, RULE_STATE};
use super::{DeadLetter, Lane, OutboxRow, Row, StoreError};
use crate::reading::Millis;

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub time: Millis,
    pub seq: u64,
    pub event_type: String,
    pub device: String,
    pub json: Vec<u8>,
}

/// Opens a table of a read transaction; a table never written yet reads as `None`.
macro_rules! open_or_empty {
    ($txn:expr, $def:expr) => {
        match $txn.open_table($def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Default::default()),
            Err(e) => return Err(e.into()),
        }
    };
}

fn corrupt(def: TableDefinition<'_, u64, &[u8]>, key: u64) -> StoreError {
    StoreError::CorruptRow {
        table: def.name().to_owned(),
        key: key.to_string(),
    }
}

pub(super) fn outbox_rows(
    db: &impl ReadableDatabase,
    lane: Lane,
    from_seq: u64,
    limit: usize,
    out: &mut Vec<OutboxRow>,
) -> Result<(), StoreError> {
    out.clear();
    let txn = db.begin_read()?;
    let def = tables::lane_table(lane);
    let table = open_or_empty!(txn, def);
    for row in table.range(from_seq..)?.take(limit) {
        let (k, v) = row?;
        let row = Row::decode(Bytes::copy_from_slice(v.value()))
            .ok_or_else(|| corrupt(def, k.value()))?;
        out.push(OutboxRow {
            seq: k.value(),
            lane,
            row,
        });
    }
    Ok(())
}

pub(super) fn dead_letters(
    db: &impl ReadableDatabase,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let txn = db.begin_read()?;
    let table = open_or_empty!(txn, DEAD_LETTERS);
    let mut out = Vec::new();
    for row in table.iter()?.rev().take(limit) {
        let (k, v) = row?;
        out.push(
            tables::decode_dead_letter(v.value())
                .ok_or_else(|| corrupt(DEAD_LETTERS, k.value()))?,
        );
    }
    Ok(out)
}

pub(super) fn state(db: &impl ReadableDatabase, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let txn = db.begin_read()?;
    let table = open_or_empty!(txn, RULE_STATE);
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

pub(super) fn state_prefix(
    db: &impl ReadableDatabase,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let txn = db.begin_read()?;
    let table = open_or_empty!(txn, RULE_STATE);
    let mut out = Vec::new();
    for row in table.range(prefix..)? {
        let (k, v) = row?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

pub(super) fn events(
    db: &impl ReadableDatabase,
    since: Millis,
    event_type: Option<&str>,
    device: Option<&str>,
    limit: usize,
) -> Result<Vec<LoggedEvent>, StoreError> {
    let txn = db.begin_read()?;
    let table = open_or_empty!(txn, EVENT_LOG);
    let mut out = Vec::new();
    for row in table.range((since, 0)..)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = row?;
        let (time, seq) = k.value();
        let (t, d, json) =
            tables::decode_logged_event(v.value()).ok_or_else(|| StoreError::CorruptRow {
                table: "event_log".into(),
                key: format!("({time}, {seq})"),
            })?;
        if event_type.is_some_and(|want| want != t) || device.is_some_and(|want| want != d) {
            continue;
        }
        out.push(LoggedEvent {
            time,
            seq,
            event_type: t.to_owned(),
            device: d.to_owned(),
            json: json.to_vec(),
        });
    }
    Ok(out)
}

pub(super) fn open_read_only(path: &Path) -> Result<redb::ReadOnlyDatabase, StoreError> {
    Ok(redb::Builder::new()
        .set_concurrency_mode(ConcurrencyMode::SingleWriter)
        .set_cache_size(4 * 1024 * 1024)
        .open_read_only(path)?)
}

/// The newest `limit` dead letters of the database file at `path`, newest first
/// (for the CLI and tests; works while the gateway runs).
pub fn read_dead_letters(path: &Path, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
    dead_letters(&open_read_only(path)?, limit)
}

/// Logged events of the database file at `path` (see [`StoreHandle::query_events`]).
///
/// [`StoreHandle::query_events`]: super::StoreHandle::query_events
pub fn query_events(
    path: &Path,
    since: Millis,
    event_type: Option<&str>,
    device: Option<&str>,
    limit: usize,
) -> Result<Vec<LoggedEvent>, StoreError> {
    events(&open_read_only(path)?, since, event_type, device, limit)
}

/// Up to `limit` committed outbox rows of `lane` with `seq >= from_seq` of the database
/// file at `path` (for tests and tools; works while the gateway runs, degraded or not).
pub fn read_outbox_file(
    path: &Path,
    lane: Lane,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<OutboxRow>, StoreError> {
    let mut out = Vec::new();
    outbox_rows(&open_read_only(path)?, lane, from_seq, limit, &mut out)?;
    Ok(out)
}
