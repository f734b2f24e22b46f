//! Outbox rows appended since the last checkpoint, held in memory until it (and the
//! counters changed since then, [`Fresh::meta`]).
//!
//! Most rows are delivered upstream and acknowledged within milliseconds, long before the
//! next checkpoint (at most [`super::journal::CHECKPOINT_INTERVAL`] away). Inserting
//! such a row into the open transaction's B-tree and removing it again a few groups later
//! took about half of the store thread's time at full speed (BENCHMARKS.md, "Rows that
//! come and go between two checkpoints"). So an appended row goes into the group's
//! journal record, which is what makes it durable, and into a map in memory; its removal
//! takes it out of the map and goes into the record too. A checkpoint writes the rows
//! still in the maps into the transaction, then commits it.
//!
//! Invariants:
//! - A row is in one place only: in a map (appended since the last checkpoint) or in the
//!   transaction's table. Every change to either is in the group's journal record, so a
//!   replay after a crash gives the rows the owner thread had.
//! - The maps belong to the open transaction ([`Open`]): [`Open::commit`] empties them into
//!   it, and they are dropped with it when it is aborted (a failed group or commit); the
//!   journal replay on recovery restores what they held.
//! - Bounded: a lane holds at most [`HELD_BYTES`] of rows. Beyond, its oldest rows go into
//!   the transaction's table (as at a checkpoint), so while upstream is away the rows are
//!   not kept twice, in the map and in the B-tree pages of the checkpoint.
//! - Sequence numbers only grow, the maps are emptied at each checkpoint and a spill takes
//!   the oldest rows, so every key in a map is above every key in its table;
//!   [`Outbox::first`] and [`Outbox::pop_first`] still look at both.

use std::cell::RefCell;
use std::collections::BTreeMap;

use bytes::Bytes;
use redb::{ReadableTable, WriteTransaction};

use super::journal::{LazyLogged, TableId};
use super::tables;
use super::{Lane, StoreError};
use crate::reading::Millis;

/// Most bytes of rows a lane holds in memory before its oldest go into the table: about
/// 7,000 readings of 150 bytes, 28 ms of them at 250k readings/s. A backlog costs its rows
/// twice up to this bound, in the map and in the checkpoint's B-tree pages: with 4 MiB
/// the gateway's peak RSS while filling and draining a backlog was 33 MB instead of 24
/// MB; with 1 MiB 26.5 MB.
pub(super) const HELD_BYTES: u64 = 1024 * 1024;

/// The open write transaction with the outbox rows appended since it began.
pub(super) struct Open {
    pub(super) txn: WriteTransaction,
    pub(super) fresh: Fresh,
}

/// The outbox rows appended since the last checkpoint, by lane, and the counters changed
/// since then.
#[derive(Default)]
pub(super) struct Fresh {
    readings: Held,
    events: Held,
    /// The last value of each counter a group changed (`META`): written into the table
    /// at the checkpoint, not by every group (the journal records each change).
    pub(super) meta: BTreeMap<&'static str, u64>,
}

/// One lane's rows held in memory.
#[derive(Default)]
pub(super) struct Held {
    rows: BTreeMap<u64, Bytes>,
    /// The rows' lengths, summed.
    bytes: u64,
    /// The first row of the lane's table, once looked up in this transaction (`None`: not
    /// known); forgotten when a row leaves or enters the table. Every group asks for it
    /// (retention, the oldest-row gauge), and most groups change only the rows held here.
    table_first: Option<Option<First>>,
}

impl Held {
    fn take(&mut self, seq: u64) -> Option<Bytes> {
        let row = self.rows.remove(&seq)?;
        self.bytes -= row.len() as u64;
        Some(row)
    }

    fn take_first(&mut self) -> Option<(u64, Bytes)> {
        let (seq, row) = self.rows.pop_first()?;
        self.bytes -= row.len() as u64;
        Some((seq, row))
    }
}

impl Fresh {
    /// The two outbox lanes of `txn` with the rows held here, changes logged into `log`.
    /// A lane's table is opened only when a row must be read from it or written to it.
    pub(super) fn outboxes<'s, 'l>(
        &'s mut self,
        txn: &'s WriteTransaction,
        log: &'l RefCell<Vec<u8>>,
    ) -> (Outbox<'l, 's>, Outbox<'l, 's>) {
        let open = |lane: Lane, fresh| -> Outbox<'l, 's> {
            let id = match lane {
                Lane::Reading => TableId::Readings,
                Lane::Event => TableId::Events,
            };
            Outbox {
                table: LazyLogged::new(txn, tables::lane_table(lane), id, log),
                fresh,
            }
        };
        (
            open(Lane::Reading, &mut self.readings),
            open(Lane::Event, &mut self.events),
        )
    }
}

impl Open {
    pub(super) fn new(txn: WriteTransaction) -> Self {
        Open {
            txn,
            fresh: Fresh::default(),
        }
    }

    /// Writes the rows and counters still held in memory into their tables (the journal
    /// has them already) and commits the transaction.
    pub(super) fn commit(self) -> Result<(), StoreError> {
        let Open { txn, fresh } = self;
        for (lane, held) in [(Lane::Reading, fresh.readings), (Lane::Event, fresh.events)] {
            if held.rows.is_empty() {
                continue;
            }
            let mut table = txn.open_table(tables::lane_table(lane))?;
            for (seq, row) in held.rows {
                table.insert(seq, row.as_ref())?;
            }
        }
        if !fresh.meta.is_empty() {
            let mut meta = txn.open_table(tables::META)?;
            for (name, value) in fresh.meta {
                meta.insert(name, value)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// The first row of an outbox lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct First {
    pub(super) received_at: Option<Millis>,
    /// Length of the stored row (without its key).
    pub(super) len: u64,
}

impl First {
    fn of(row: &[u8]) -> Self {
        First {
            received_at: tables::outbox_received_at(row),
            len: row.len() as u64,
        }
    }
}

/// One outbox lane of the open transaction: its table and the rows appended since the
/// last checkpoint. Every change is logged into the group's journal record.
pub(super) struct Outbox<'l, 't> {
    table: LazyLogged<'l, 't, u64, &'static [u8]>,
    fresh: &'t mut Held,
}

impl Outbox<'_, '_> {
    /// Appends `row` as `seq`: into the group's record, and held here (sharing its bytes).
    pub(super) fn insert(&mut self, seq: u64, row: &Bytes) -> Result<(), StoreError> {
        self.table.log_insert(seq, row.as_ref());
        self.fresh.rows.insert(seq, row.clone());
        self.fresh.bytes += row.len() as u64;
        while self.fresh.bytes > HELD_BYTES {
            let Some((seq, row)) = self.fresh.take_first() else {
                break;
            };
            self.table.get()?.insert_logged(seq, row.as_ref())?;
            self.fresh.table_first = None;
        }
        Ok(())
    }

    /// Removes the row `seq`; its stored length if it was there.
    pub(super) fn remove(&mut self, seq: u64) -> Result<Option<u64>, StoreError> {
        if let Some(row) = self.fresh.take(seq) {
            self.table.log_remove(seq);
            return Ok(Some(row.len() as u64));
        }
        if self.fresh.table_first == Some(None) {
            // The table is empty.
            return Ok(None);
        }
        let removed = self
            .table
            .get()?
            .remove(seq)?
            .map(|v| v.value().len() as u64);
        if removed.is_some() {
            self.fresh.table_first = None;
        }
        Ok(removed)
    }

    pub(super) fn first(&mut self) -> Result<Option<First>, StoreError> {
        let table_first = match self.fresh.table_first {
            Some(first) => first,
            None => {
                let first = self
                    .table
                    .get()?
                    .first()?
                    .map(|(_, v)| First::of(v.value()));
                self.fresh.table_first = Some(first);
                first
            }
        };
        if table_first.is_some() {
            return Ok(table_first);
        }
        Ok(self.fresh.rows.values().next().map(|row| First::of(row)))
    }

    /// Removes the first row; its stored length if there was one.
    pub(super) fn pop_first(&mut self) -> Result<Option<u64>, StoreError> {
        if self.fresh.table_first != Some(None) {
            let popped = self
                .table
                .get()?
                .pop_first()?
                .map(|(_, v)| v.value().len() as u64);
            self.fresh.table_first = if popped.is_some() { None } else { Some(None) };
            if popped.is_some() {
                return Ok(popped);
            }
        }
        Ok(self.fresh.take_first().map(|(seq, row)| {
            self.table.log_remove(seq);
            row.len() as u64
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableTableMetadata};

    use tables::lane_rows as rows;

    fn row(received_at: Millis, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        tables::encode_outbox(
            &mut out,
            received_at,
            crate::reading::Format::Json,
            "devices/d/t",
            "d",
            text.as_bytes(),
        );
        out
    }

    /// [`row`] as the store holds it.
    fn held(received_at: Millis, text: &str) -> Bytes {
        row(received_at, text).into()
    }

    /// Applies `f` to both lanes of `open` and returns the record it logged.
    fn group(open: &mut Open, f: impl FnOnce(&mut Outbox, &mut Outbox)) -> Vec<u8> {
        let log = RefCell::new(Vec::new());
        {
            let Open { txn, fresh } = open;
            let (mut readings, mut events) = fresh.outboxes(txn, &log);
            f(&mut readings, &mut events);
        }
        log.into_inner()
    }

    #[test]
    fn rows_removed_before_the_checkpoint_never_reach_the_table_and_the_rest_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("gw.redb")).unwrap();
        // One row committed by an earlier checkpoint.
        let mut open = Open::new(db.begin_write().unwrap());
        group(&mut open, |r, _| r.insert(1, &held(10, "old")).unwrap());
        open.commit().unwrap();
        assert_eq!(rows(&db, Lane::Reading), vec![(1, row(10, "old"))]);

        let mut open = Open::new(db.begin_write().unwrap());
        let first = group(&mut open, |r, e| {
            r.insert(2, &held(20, "two")).unwrap();
            r.insert(3, &held(30, "three")).unwrap();
            e.insert(4, &held(40, "event")).unwrap();
            // The first row is the committed one, then the held ones in order.
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(10));
            assert_eq!(r.remove(1).unwrap(), Some(row(10, "old").len() as u64));
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(20));
        });
        let second = group(&mut open, |r, e| {
            assert_eq!(r.remove(2).unwrap(), Some(row(20, "two").len() as u64));
            assert_eq!(r.remove(2).unwrap(), None, "already gone");
            assert_eq!(e.pop_first().unwrap(), Some(row(40, "event").len() as u64));
            assert_eq!(e.first().unwrap(), None);
        });
        // Until the checkpoint the table still has only what the last one committed.
        let txn = &open.txn;
        assert_eq!(
            txn.open_table(tables::lane_table(Lane::Reading))
                .unwrap()
                .len()
                .unwrap(),
            0,
            "row 1 removed, rows 2 and 3 held in memory"
        );
        open.commit().unwrap();
        assert_eq!(rows(&db, Lane::Reading), vec![(3, row(30, "three"))]);
        assert!(rows(&db, Lane::Event).is_empty());

        // The two records hold every change: replayed onto the database as it was before
        // them (row 1 only), they give the same rows.
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = Database::create(dir2.path().join("gw.redb")).unwrap();
        let mut open = Open::new(db2.begin_write().unwrap());
        group(&mut open, |r, _| r.insert(1, &held(10, "old")).unwrap());
        open.commit().unwrap();
        super::super::journal::apply_bodies(&db2, &[first, second], dir2.path()).unwrap();
        assert_eq!(rows(&db2, Lane::Reading), vec![(3, row(30, "three"))]);
        assert!(rows(&db2, Lane::Event).is_empty());
    }

    /// The table's first row is looked up once per transaction and forgotten when a row
    /// leaves the table, whichever group that happens in.
    #[test]
    fn the_first_row_follows_the_table_across_groups() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("gw.redb")).unwrap();
        let mut open = Open::new(db.begin_write().unwrap());
        group(&mut open, |r, _| {
            r.insert(1, &held(10, "one")).unwrap();
            r.insert(2, &held(20, "two")).unwrap();
        });
        open.commit().unwrap();

        let mut open = Open::new(db.begin_write().unwrap());
        group(&mut open, |r, e| {
            r.insert(3, &held(30, "three")).unwrap();
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(10));
            assert_eq!(e.first().unwrap(), None);
            assert_eq!(e.remove(7).unwrap(), None, "nothing to remove");
        });
        group(&mut open, |r, _| {
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(10));
            assert_eq!(r.remove(1).unwrap(), Some(row(10, "one").len() as u64));
        });
        group(&mut open, |r, e| {
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(20));
            assert_eq!(r.pop_first().unwrap(), Some(row(20, "two").len() as u64));
            e.insert(4, &held(40, "event")).unwrap();
        });
        group(&mut open, |r, e| {
            assert_eq!(r.first().unwrap().unwrap().received_at, Some(30));
            assert_eq!(r.remove(2).unwrap(), None, "already gone");
            assert_eq!(e.first().unwrap().unwrap().received_at, Some(40));
        });
        open.commit().unwrap();
        assert_eq!(rows(&db, Lane::Reading), vec![(3, row(30, "three"))]);
        assert_eq!(rows(&db, Lane::Event), vec![(4, row(40, "event"))]);
    }

    #[test]
    fn an_aborted_transaction_takes_its_held_rows_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("gw.redb")).unwrap();
        let mut open = Open::new(db.begin_write().unwrap());
        group(&mut open, |r, _| {
            r.insert(1, &held(10, "committed")).unwrap()
        });
        open.commit().unwrap();
        let mut open = Open::new(db.begin_write().unwrap());
        group(&mut open, |r, _| {
            r.insert(2, &held(20, "held")).unwrap();
            assert_eq!(
                r.remove(1).unwrap(),
                Some(row(10, "committed").len() as u64)
            );
        });
        drop(open);
        Open::new(db.begin_write().unwrap()).commit().unwrap();
        assert_eq!(rows(&db, Lane::Reading), vec![(1, row(10, "committed"))]);
    }

    #[test]
    fn past_the_bound_the_oldest_held_rows_go_into_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("gw.redb")).unwrap();
        let big = held(1, &"x".repeat(64 * 1024));
        let len = big.len() as u64;
        let n = HELD_BYTES / len + 10;
        let mut open = Open::new(db.begin_write().unwrap());
        let record = group(&mut open, |r, _| {
            for seq in 1..=n {
                r.insert(seq, &big).unwrap();
            }
            let held: u64 = r.fresh.rows.values().map(|v| v.len() as u64).sum();
            assert_eq!(r.fresh.bytes, held);
            assert!(held <= HELD_BYTES && held > HELD_BYTES - len, "{held}");
            assert!(
                *r.fresh.rows.keys().next().unwrap() > 1,
                "the oldest went into the table"
            );
            // All still there, in order, whichever place holds them.
            for seq in 1..=n {
                assert_eq!(r.first().unwrap().unwrap().len, len);
                assert_eq!(r.pop_first().unwrap(), Some(len), "row {seq}");
            }
            assert_eq!(r.pop_first().unwrap(), None);
            assert_eq!(r.fresh.bytes, 0);
        });
        open.commit().unwrap();
        assert!(rows(&db, Lane::Reading).is_empty());
        // Each insert is in the record once: a spill is not logged again.
        assert!(record.len() as u64 >= n * len, "{}", record.len());
        assert!((record.len() as u64) < (n + 1) * len, "{}", record.len());
    }
}
